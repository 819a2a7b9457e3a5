"""A firm holds a coordinator to the run it planned, and answers evaluations only with DP.

Each test plays a coordinator that breaks the contract (extra rounds, changed parameters, a
crafted model to evaluate, a second model in one round) against a real firm node.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from conftest import make_customers

from fedcrm.data.contract import load_firm_config
from fedcrm.data.encoding import FeatureLayout, layout_from_declared
from fedcrm.data.prepare import prepare
from fedcrm.learning.settings import ChurnModelKind, DpOptimizer
from fedcrm.node import FirmNode
from fedcrm.privacy.accounting import calibrate_noise
from fedcrm.privacy.keys import load_keys
from fedcrm.protocol import (
    DescribeRequest,
    EvaluateRequest,
    ReplyState,
    RunSpec,
    TaskKind,
    TrainRequest,
)
from fedcrm.release import gaussian_query_event, release
from fedcrm.tasks import task_for
from fedcrm.tasks.churn import HIST_NEGATIVE, HIST_POSITIVE


def _node(write_firm: Callable[..., Path], *, cap: float = 2.0, evaluate: bool = True,
          max_evaluations: int = 4) -> FirmNode:
    cfg_path = write_firm(
        make_customers(1200),
        extra={
            "budget": {"epsilon": cap, "delta": 1e-5},
            "federation": {"public_size": 1200, "evaluate": evaluate,
                           "max_evaluations": max_evaluations},
        },
    )
    prepare(load_firm_config(cfg_path))
    cfg = load_firm_config(cfg_path)
    return FirmNode(cfg, load_keys(cfg.firm.keys_dir))


#: The run's public schema: the firm's columns, with ranges that differ from the firm's own.
SCHEMA = layout_from_declared(
    {"plan": ("basic", "plus", "premium")}, [],
    {"tenure_months": (0.0, 72.0), "monthly_charges": (0.0, 150.0)},
).canonical_json()


def _spec(run_id: str = "run-1", *, rounds: int = 2, evaluations: int = 1,
          target: float = 1.0) -> RunSpec:
    return RunSpec(
        run_id=run_id, task=TaskKind.CHURN, rounds=rounds, model=ChurnModelKind.LOGISTIC,
        target_epsilon=target, local_epochs=0.5, batch_size=128, learning_rate=0.5,
        max_grad_norm=1.0, optimizer=DpOptimizer.SGD, proximal_mu=0.0, seed=0,
        evaluations=evaluations, schema=SCHEMA,
    )


def _start(node: FirmNode) -> list[np.ndarray]:
    dim = node.task_data(TaskKind.CHURN, SCHEMA).input_dim
    return task_for(TaskKind.CHURN).initial_arrays(
        model=ChurnModelKind.LOGISTIC, input_dim=dim, seed=0
    )


def test_the_shared_model_uses_the_runs_public_schema_not_the_firms_own_ranges(
    write_firm: Callable[..., Path],
) -> None:
    node = _node(write_firm)
    described = node.describe(DescribeRequest(task=TaskKind.CHURN, schema=SCHEMA))
    assert described.layout == FeatureLayout.from_json(SCHEMA).fingerprint()
    own = node.task_data(TaskKind.CHURN)  # the firm's declared (local-only) layout
    assert own.layout != described.layout
    refused = node.train(TrainRequest(spec=replace(_spec(), schema=""), server_round=1,
                                      arrays=_start(node)))
    assert refused.state is ReplyState.DECLINED and "schema" in refused.detail


def test_extra_rounds_and_repeated_rounds_are_refused_and_the_run_target_holds(
    write_firm: Callable[..., Path],
) -> None:
    node = _node(write_firm, cap=5.0)
    spec = _spec(rounds=2, evaluations=0, target=1.0)
    arrays = _start(node)
    for rnd in (1, 2):
        reply = node.train(TrainRequest(spec=spec, server_round=rnd, arrays=arrays))
        assert reply.state is ReplyState.OK
    spent = node.privacy.spent()
    assert spent <= 1.0 + 1e-9
    other_model = [a + 0.5 for a in arrays]
    for rnd, sent in ((3, arrays), (4, arrays), (5, arrays), (6, arrays), (2, other_model)):
        reply = node.train(TrainRequest(spec=spec, server_round=rnd, arrays=sent))
        assert reply.state is ReplyState.DECLINED and reply.arrays is None
        assert "outside" in reply.detail or "already trained" in reply.detail
    assert node.privacy.spent() == spent  # nothing more was spent
    assert len(node.privacy.ledger.events) == 2


def test_a_round_asked_again_on_the_same_model_gets_the_same_update_without_a_new_charge(
    write_firm: Callable[..., Path],
) -> None:
    """A restarted coordinator resumes a run: the firm resends what it released, once paid."""
    from fedcrm.audit.log import EntryKind
    from fedcrm.protocol import arrays_hash

    node = _node(write_firm, cap=5.0)
    spec = _spec(rounds=2, evaluations=0, target=1.0)
    arrays = _start(node)
    first = node.train(TrainRequest(spec=spec, server_round=1, arrays=arrays))
    assert first.state is ReplyState.OK and not first.replayed
    assert first.rounds_released == (1,)
    spent, releases = node.privacy.spent(), len(node.privacy.ledger.events)
    again = node.train(TrainRequest(spec=spec, server_round=1, arrays=arrays))
    assert again.state is ReplyState.OK and again.replayed
    assert arrays_hash(again.arrays or []) == arrays_hash(first.arrays or [])
    assert again.epsilon_round == 0.0 and again.epsilon_total == spent
    assert node.privacy.spent() == spent and len(node.privacy.ledger.events) == releases
    entries = node.privacy.audit.entries()
    sent = [e for e in entries if e.kind is EntryKind.UPDATE_SENT]
    resent = [e for e in entries if e.kind is EntryKind.UPDATE_RESENT]
    assert len(sent) == 1 and len(resent) == 1
    assert resent[0].payload["sent"] == sent[0].hash
    assert resent[0].payload["model_hash"] == sent[0].payload["model_hash"]
    kept = node._update_path(spec.run_id, 1)
    assert kept.exists() and (kept.stat().st_mode & 0o777) == 0o600


def test_a_released_update_that_was_not_kept_is_declined_and_reported_as_released(
    write_firm: Callable[..., Path],
) -> None:
    """Killed between commit and sending: the round is not trained again, and the coordinator
    learns from ``rounds_released`` that it was charged."""
    node = _node(write_firm, cap=5.0)
    spec = _spec(rounds=2, evaluations=0, target=1.0)
    arrays = _start(node)
    assert node.train(TrainRequest(spec=spec, server_round=1, arrays=arrays)).state is (
        ReplyState.OK
    )
    node._update_path(spec.run_id, 1).unlink()  # as if the node died before publishing it
    spent = node.privacy.spent()
    reply = node.train(TrainRequest(spec=spec, server_round=1, arrays=arrays))
    assert reply.state is ReplyState.DECLINED and reply.arrays is None
    assert "not kept" in reply.detail and reply.rounds_released == (1,)
    assert node.privacy.spent() == spent


def test_a_kept_update_the_log_does_not_record_is_never_sent(
    write_firm: Callable[..., Path],
) -> None:
    from fedcrm.privacy.errors import LedgerTampered

    node = _node(write_firm, cap=5.0)
    spec = _spec(rounds=2, evaluations=0, target=1.0)
    arrays = _start(node)
    node.train(TrainRequest(spec=spec, server_round=1, arrays=arrays))
    kept = node._update_path(spec.run_id, 1)
    np.savez(kept, *[a + 1.0 for a in arrays])  # a swapped file: not what was released
    with pytest.raises(LedgerTampered, match="does not record as sent"):
        node.train(TrainRequest(spec=spec, server_round=1, arrays=arrays))


def test_a_round_is_refused_when_the_budget_was_spent_elsewhere_mid_run(
    write_firm: Callable[..., Path],
) -> None:
    node = _node(write_firm, cap=1.0)
    spec = _spec(rounds=3, evaluations=0, target=0.6)
    first = node.train(TrainRequest(spec=spec, server_round=1, arrays=_start(node)))
    assert first.state is ReplyState.OK and first.arrays is not None
    assert first.epsilon_total <= 0.6 + 1e-9
    # another analysis spends almost all of the rest of the budget between rounds
    ledger = node.privacy.ledger
    sigma = calibrate_noise(
        target_epsilon=0.98, delta=1e-5, sample_rate=1.0, steps=1, prior_events=ledger.events
    )
    release(node.privacy, gaussian_query_event(sigma, delta=1e-5, purpose="analytics"),
            lambda: None)
    before = len(ledger.events)
    second = node.train(TrainRequest(spec=spec, server_round=2, arrays=first.arrays))
    assert second.state is ReplyState.BUDGET_EXHAUSTED
    assert second.arrays is None and "budget exhausted" in second.detail
    assert len(ledger.events) == before
    assert ledger.spent() <= 1.0 and np.isfinite(second.epsilon_total)


def test_changing_the_run_parameters_mid_run_is_refused(write_firm: Callable[..., Path]) -> None:
    node = _node(write_firm, cap=5.0)
    spec = _spec(rounds=2, evaluations=0)
    arrays = _start(node)
    assert node.train(TrainRequest(spec=spec, server_round=1, arrays=arrays)).state is (
        ReplyState.OK
    )
    for changed in (replace(spec, rounds=6), replace(spec, target_epsilon=3.0),
                    replace(spec, local_epochs=5.0)):
        reply = node.train(TrainRequest(spec=changed, server_round=2, arrays=arrays))
        assert reply.state is ReplyState.DECLINED and "changed" in reply.detail
    assert len(node.privacy.ledger.events) == 1


def test_a_firm_evaluates_only_the_model_it_trained_on_once_per_round(
    write_firm: Callable[..., Path],
) -> None:
    node = _node(write_firm)
    spec = _spec(rounds=2, evaluations=2)
    start = _start(node)
    crafted = [a + 1.0 for a in start]
    # nothing trained yet in this run: nothing to evaluate
    early = node.evaluate(EvaluateRequest(spec=spec, server_round=1, arrays=start))
    assert early.state is ReplyState.DECLINED and not early.statistics
    trained = node.train(TrainRequest(spec=spec, server_round=1, arrays=start))
    assert trained.state is ReplyState.OK
    spent = node.privacy.spent()
    other = node.evaluate(EvaluateRequest(spec=spec, server_round=1, arrays=crafted))
    assert other.state is ReplyState.DECLINED and "received for training" in other.detail
    assert node.privacy.spent() == spent
    first = node.evaluate(EvaluateRequest(spec=spec, server_round=1, arrays=start))
    assert first.state is ReplyState.OK and first.noise_std > 0
    assert set(first.statistics) == {HIST_POSITIVE, HIST_NEGATIVE}
    assert all(float(v).is_integer() for v in first.statistics[HIST_POSITIVE])
    assert node.privacy.spent() > spent
    again = node.evaluate(EvaluateRequest(spec=spec, server_round=1, arrays=start))
    assert again.state is ReplyState.DECLINED and "already evaluated" in again.detail
    purposes = [e.purpose for e in node.privacy.ledger.events]
    assert purposes == ["train:churn", "evaluate:churn"]


def test_a_firm_that_turned_evaluation_off_declines(write_firm: Callable[..., Path]) -> None:
    node = _node(write_firm, evaluate=False)
    spec = _spec(rounds=1, evaluations=1)
    start = _start(node)
    node.train(TrainRequest(spec=spec, server_round=1, arrays=start))
    reply = node.evaluate(EvaluateRequest(spec=spec, server_round=1, arrays=start))
    assert reply.state is ReplyState.DECLINED and "evaluate = false" in reply.detail
    assert [e.purpose for e in node.privacy.ledger.events] == ["train:churn"]


@pytest.mark.parametrize("attack", ["one-feature", "random-projection"])
def test_crafted_models_recover_no_exact_count(
    write_firm: Callable[..., Path], attack: str
) -> None:
    """The attacks of the privacy review, replayed: a crafted model sent as the global model
    (so the firm trains on it, then evaluates it). Every released count is off by noise of the
    planned spread, so the exact counts are not recovered."""
    node = _node(write_firm, cap=100.0, max_evaluations=1)
    data = node.task_data(TaskKind.CHURN, SCHEMA)
    rng = np.random.default_rng(0)
    errors: list[float] = []
    noise: list[float] = []
    for run in range(3):
        start = _start(node)
        if attack == "one-feature":  # all weight on one feature: two score bins
            crafted = [np.zeros_like(start[0]), np.zeros_like(start[1])]
            crafted[0][0, 0] = 8.0
        else:  # a random projection spreads customers thinly over the bins
            crafted = [rng.normal(0, 3, start[0].shape).astype(np.float32),
                       np.zeros_like(start[1])]
        spec = _spec(f"attack-{attack}-{run}", rounds=1, evaluations=1, target=1.0)
        assert node.train(TrainRequest(spec=spec, server_round=1, arrays=crafted)).state is (
            ReplyState.OK
        )
        reply = node.evaluate(EvaluateRequest(spec=spec, server_round=1, arrays=crafted))
        assert reply.state is ReplyState.OK
        exact = data.evaluation(crafted, model=ChurnModelKind.LOGISTIC).values
        for key in (HIST_POSITIVE, HIST_NEGATIVE):
            errors.extend(np.asarray(reply.statistics[key]) - exact[key])
        noise.append(reply.noise_std)
    errors_arr = np.asarray(errors)
    assert min(noise) > 1.0  # counts carry noise of a real spread
    assert errors_arr.std() >= 0.7 * float(np.mean(noise))
    assert np.mean(errors_arr == 0) < 0.25  # few counts come out exact, and the attacker
    # cannot tell which
