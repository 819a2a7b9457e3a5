"""Local DP training, scoring and the budget CLI on a generated firm; check-then-commit."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
from conftest import make_customers
from typer.testing import CliRunner

from fedcrm.cli import app
from fedcrm.data.contract import load_firm_config
from fedcrm.data.prepare import prepare
from fedcrm.learning.settings import ChurnModelKind, DpOptimizer
from fedcrm.node import FirmNode
from fedcrm.privacy.accounting import Mechanism, calibrate_noise, make_event
from fedcrm.privacy.keys import load_keys
from fedcrm.protocol import ReplyState, RunSpec, TaskKind, TrainRequest
from fedcrm.release import release
from fedcrm.tasks import task_for

RUNNER = CliRunner()


def _prepared(write_firm: Callable[..., Path], n: int = 1500, epsilon: float = 2.0) -> Path:
    cfg_path = write_firm(
        make_customers(n),
        extra={"budget": {"epsilon": epsilon, "delta": 1e-5},
               "federation": {"public_size": 1500}},
    )
    prepare(load_firm_config(cfg_path))
    return cfg_path


def test_train_score_and_budget_status_from_the_cli(
    write_firm: Callable[..., Path], tmp_path: Path
) -> None:
    cfg = _prepared(write_firm)
    model = tmp_path / "churn.pt"
    r = RUNNER.invoke(app, ["train", "--config", str(cfg), "--out", str(model), "--epsilon", "1"])
    assert r.exit_code == 0, r.output
    assert model.exists()
    risks = tmp_path / "risks.csv"
    r = RUNNER.invoke(
        app, ["score", "--model", str(model), "--config", str(cfg), "--out", str(risks)]
    )
    assert r.exit_code == 0, r.output
    table = pd.read_csv(risks)
    assert list(table.columns[:3]) == ["customer_id", "churn_probability", "risk_band"]
    assert table["churn_probability"].is_monotonic_decreasing
    assert set(table["risk_band"]) <= {"high", "medium", "low"}
    assert table["customer_id"].str.startswith("pseudonym-v1-").all()
    raw_ids = set(make_customers(1500)["cust_id"])
    assert not raw_ids & set(table["customer_id"])
    ledger = cfg.parent / "store" / "budget.jsonl"
    r = RUNNER.invoke(app, ["budget", "status", "--ledger", str(ledger), "--json"])
    assert r.exit_code == 0, r.output
    status = json.loads(r.output)
    assert 0.9 < status["spent"] <= 1.0 + 1e-9
    assert status["epsilon_cap"] == 2.0
    assert "train:churn:local" in status["by_purpose"]


def test_training_beyond_the_budget_is_refused_before_anything_is_released(
    write_firm: Callable[..., Path],
    tmp_path: Path,
) -> None:
    cfg = _prepared(write_firm, epsilon=1.0)
    first = RUNNER.invoke(
        app, ["train", "--config", str(cfg), "--out", str(tmp_path / "a.pt"), "--epsilon", "1"]
    )
    assert first.exit_code == 0, first.output
    lines = (cfg.parent / "store" / "budget.jsonl").read_text().splitlines()
    second = RUNNER.invoke(
        app, ["train", "--config", str(cfg), "--out", str(tmp_path / "b.pt"), "--epsilon", "1"]
    )
    assert second.exit_code == 6, second.output
    # a request above what remains is refused whole, never silently reduced
    assert "privacy budget exhausted" in second.output and "remaining" in second.output
    assert not (tmp_path / "b.pt").exists()
    assert (cfg.parent / "store" / "budget.jsonl").read_text().splitlines() == lines


def test_firm_node_refuses_a_round_when_its_budget_was_spent_elsewhere_mid_run(
    write_firm: Callable[..., Path],
) -> None:
    cfg_path = _prepared(write_firm, epsilon=1.0)
    node = FirmNode(load_firm_config(cfg_path), load_keys(cfg_path.parent / "keys"))
    spec = RunSpec(
        run_id="r1",
        task=TaskKind.CHURN,
        rounds=3,
        model=ChurnModelKind.LOGISTIC,
        target_epsilon=0.6,
        local_epochs=0.5,
        batch_size=128,
        learning_rate=0.05,
        max_grad_norm=1.0,
        optimizer=DpOptimizer.ADAM,
        proximal_mu=0.0,
        seed=0,
    )
    start = task_for(TaskKind.CHURN).initial_arrays(
        model=ChurnModelKind.LOGISTIC, input_dim=node.task_data(TaskKind.CHURN).input_dim, seed=0
    )
    first = node.train(TrainRequest(spec=spec, server_round=1, arrays=start))
    assert first.state is ReplyState.OK and first.arrays is not None
    assert first.epsilon_total <= 0.6 + 1e-9
    # another analysis spends almost all of the rest of the budget between rounds
    ledger = node.privacy.ledger
    sigma = calibrate_noise(
        target_epsilon=0.98, delta=1e-5, sample_rate=1.0, steps=1, prior_events=ledger.events
    )
    analytics = make_event(
        mechanism=Mechanism.GAUSSIAN,
        noise_multiplier=sigma,
        sample_rate=1.0,
        steps=1,
        delta=1e-5,
        purpose="analytics",
    )
    release(node.privacy, analytics, lambda: None)
    before = len(ledger.events)
    second = node.train(TrainRequest(spec=spec, server_round=2, arrays=first.arrays))
    assert second.state is ReplyState.BUDGET_EXHAUSTED
    assert second.arrays is None
    assert "budget exhausted" in second.detail
    assert len(ledger.events) == before
    assert ledger.spent() <= 1.0
    assert np.isfinite(second.epsilon_total)
