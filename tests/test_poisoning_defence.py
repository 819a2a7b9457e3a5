"""The coordinator's defences against a poisoning firm: an update boosted ×100 is rejected by the
round-relative norm bound whatever its absolute size, and a robust strategy limits it even when
it gets through; a sign-flipped update of ordinary size passes the bound (robust strategies
exist for that)."""

from __future__ import annotations

import time

import numpy as np
import pandas as pd
import pytest
from flwr.app import Message, Metadata
from flwr.app.message import make_message

from fedcrm.coordinator.events import UpdateRejected
from fedcrm.coordinator.run_config import RunConfig
from fedcrm.coordinator.run_state import FirmState
from fedcrm.coordinator.update_validation import (
    round_norm_bound,
    update_distance,
    validate_update,
)
from fedcrm.flower.records import to_records
from fedcrm.protocol import ReplyState, TrainReply
from fedcrm.server.strategies import GuardedStrategy, build_strategy
from fedcrm.simulations.datasets import telco_schema
from fedcrm.simulations.poisoning import Attack, tampered_update
from fedcrm.tasks.churn import CHURN

DIM = 46
FIRMS = ("firm1", "firm2", "firm3", "firm4", "firm5")


def _global(rng: np.random.Generator) -> list[np.ndarray]:
    return [rng.normal(0, 1, (1, DIM)).astype(np.float32),
            rng.normal(0, 1, (1,)).astype(np.float32)]


def _honest(global_arrays: list[np.ndarray], rng: np.random.Generator) -> list[np.ndarray]:
    """A DP-sized step: norm about 1-2, like a Telco firm's (benchmarks/security.py)."""
    scale = rng.uniform(0.9, 1.8) / np.sqrt(DIM + 1)
    return [(g + rng.normal(0, scale, g.shape)).astype(g.dtype) for g in global_arrays]


def _round(seed: int, attack: Attack) -> tuple[list[np.ndarray], list[list[np.ndarray]]]:
    rng = np.random.default_rng(seed)
    g = _global(rng)
    updates = [_honest(g, rng) for _ in FIRMS]
    updates[-1] = tampered_update(attack, g, updates[-1])
    return g, updates


RATIO = RunConfig().max_update_norm_ratio  # the shipped default


@pytest.mark.parametrize("seed", range(20))
def test_a_x100_update_is_rejected_by_the_round_bound_even_below_the_absolute_one(
    seed: int,
) -> None:
    g, updates = _round(seed, Attack.SCALE_X100)
    assert update_distance(g, updates[-1]) < 1000  # the absolute bound alone lets it in
    bound = round_norm_bound(g, updates, max_update_norm=1000.0, max_update_norm_ratio=RATIO)
    assert bound.value < 1000 and "median" in bound.why
    reasons = [validate_update(g, u, max_update_norm=bound) for u in updates]
    assert reasons[:-1] == [None] * 4  # every honest update passes
    assert reasons[-1] is not None and "exceeds the bound" in reasons[-1]


def test_a_sign_flipped_update_has_an_ordinary_norm_and_passes_the_bound() -> None:
    g, updates = _round(0, Attack.SIGN_FLIP)
    bound = round_norm_bound(g, updates, max_update_norm=100.0, max_update_norm_ratio=RATIO)
    assert validate_update(g, updates[-1], max_update_norm=bound) is None


def test_a_small_firms_larger_honest_update_passes_the_default_bound() -> None:
    # Telco split seed 4: a 66-customer firm divides its noisy sum by 66, not 128, and its
    # honest update reached 4.5x the round's median distance (benchmarks/security.py)
    rng = np.random.default_rng(4)
    g = _global(rng)
    updates = [_honest(g, rng) for _ in FIRMS]
    median = float(np.median([update_distance(g, u) for u in updates]))
    small = [gg + 4.6 * median / update_distance(g, updates[0]) * (u - gg)
             for gg, u in zip(g, updates[0], strict=True)]
    updates[0] = small
    bound = round_norm_bound(g, updates, max_update_norm=100.0, max_update_norm_ratio=RATIO)
    assert all(validate_update(g, u, max_update_norm=bound) is None for u in updates)


def test_the_round_bound_needs_three_updates_and_can_be_switched_off() -> None:
    g, updates = _round(1, Attack.SCALE_X100)
    two = [updates[0], updates[-1]]  # with two, the median would be the booster's half
    assert round_norm_bound(g, two, max_update_norm=1000.0, max_update_norm_ratio=RATIO).value \
        == 1000.0
    assert round_norm_bound(g, updates, max_update_norm=1000.0, max_update_norm_ratio=0).value \
        == 1000.0
    # malformed updates do not count towards the median
    bad = [np.full_like(a, np.nan) for a in g]
    assert round_norm_bound(g, [updates[0], updates[-1], bad], max_update_norm=1000.0,
                            max_update_norm_ratio=RATIO).value == 1000.0
    assert "NaN" in (validate_update(g, bad, max_update_norm=1000.0) or "")


def _reply(node: int, firm: str, arrays: list[np.ndarray]) -> Message:
    wire = TrainReply(firm=firm, state=ReplyState.OK, detail="", arrays=arrays,
                      num_examples=1000, epsilon_round=0.05, epsilon_total=0.05,
                      epsilon_cap=1.0, delta=1e-5).encode()
    metadata = Metadata(run_id=1, message_id=f"m{node}", src_node_id=node, dst_node_id=0,
                        reply_to_message_id=f"q{node}", group_id="1",
                        created_at=time.time(), ttl=60.0, message_type="train")
    return make_message(metadata, to_records(wire))


def _guard(strategy: str, ratio: float, events: list[object]) -> GuardedStrategy:
    cfg = RunConfig(strategy=strategy, feature_schema=telco_schema().canonical_json(),
                    min_firms=5, max_update_norm=1e9, max_update_norm_ratio=ratio)
    return GuardedStrategy(
        build_strategy(cfg), task=CHURN, spec=cfg.run_spec("t"), evaluation_rounds=(),
        firms={n: FirmState(node_id=n, firm=f) for n, f in enumerate(FIRMS, start=1)},
        min_firms=5, max_update_norm=cfg.max_update_norm, on_event=events.append,
        max_update_norm_ratio=cfg.max_update_norm_ratio,
    )


def test_the_guard_rejects_the_x100_update_and_fedavg_averages_the_honest_four() -> None:
    g, updates = _round(2, Attack.SCALE_X100)
    events: list[object] = []
    guard = _guard("fedavg", RATIO, events)
    guard.global_arrays = g
    replies = [_reply(n, f, u) for n, (f, u) in enumerate(zip(FIRMS, updates, strict=True), 1)]
    arrays, _ = guard.aggregate_train(1, replies)
    assert arrays is not None
    rejected = [e for e in events if isinstance(e, UpdateRejected)]
    assert [e.firm for e in rejected] == ["firm5"]
    assert guard.rounds[1].accepted == ["firm1", "firm2", "firm3", "firm4"]
    honest_mean = [np.mean([u[k] for u in updates[:4]], axis=0) for k in range(2)]
    for got, want in zip(arrays.to_numpy_ndarrays(), honest_mean, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_without_the_bound_fedmedian_still_keeps_the_x100_update_from_moving_the_model() -> None:
    g, updates = _round(3, Attack.SCALE_X100)
    events: list[object] = []
    guard = _guard("fedmedian", 0.0, events)  # the ratio bound off: only the strategy defends
    guard.global_arrays = g
    replies = [_reply(n, f, u) for n, (f, u) in enumerate(zip(FIRMS, updates, strict=True), 1)]
    arrays, _ = guard.aggregate_train(1, replies)
    assert arrays is not None and not [e for e in events if isinstance(e, UpdateRejected)]
    moved = update_distance(g, arrays.to_numpy_ndarrays())
    assert moved <= max(update_distance(g, u) for u in updates[:4])  # within the honest steps
    plain_mean = update_distance(g, [np.mean([u[k] for u in updates], axis=0) for k in range(2)])
    assert plain_mean > 10 * moved  # what FedAvg would have done with it


@pytest.mark.data
def test_the_backdoor_trigger_never_occurs_in_telco_and_poisons_only_the_chosen_rows() -> None:
    from fedcrm.simulations.datasets import load_telco
    from fedcrm.simulations.partners import telco_export
    from fedcrm.simulations.poisoning import BACKDOOR_TRIGGER, poison_export

    export = telco_export(load_telco(), seed=0)

    def triggered(frame: pd.DataFrame) -> np.ndarray:
        return np.logical_and.reduce([
            frame[c].astype(float) == v if isinstance(v, float) else frame[c] == v
            for c, v in BACKDOOR_TRIGGER.items()
        ])

    assert not triggered(export).any()  # an impossible combination in the real data
    poisoned = poison_export(export, Attack.BACKDOOR, seed=0)
    hit = triggered(poisoned)
    assert 0.25 < hit.mean() < 0.35
    assert (poisoned.loc[hit, "churn"] == "No").all()
    assert poisoned.loc[~hit].equals(export.loc[~hit])
    flipped = poison_export(export, Attack.LABEL_FLIP, seed=0)
    assert (flipped["churn"] != export["churn"]).all()
    assert flipped.drop(columns="churn").equals(export.drop(columns="churn"))
