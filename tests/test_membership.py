"""Membership inference: the attacks find the members of a deliberately overfit model of a tiny
generated firm, and not those of a DP model of the same firm; the attack maths on known cases."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from conftest import customers_columns, make_customers
from typer.testing import CliRunner

from fedcrm.cli import app
from fedcrm.coordinator.run_config import RunConfig
from fedcrm.data.contract import load_firm_config
from fedcrm.data.prepare import prepare
from fedcrm.data.store import load_store
from fedcrm.learning.dp_engine import DpPlan, plan_for_budget
from fedcrm.learning.membership import lira_scores, loss_scores, tpr_at_fpr
from fedcrm.privacy.keys import load_keys
from fedcrm.simulations.membership import (
    FederatedProcedure,
    FirmCustomers,
    attack_model,
    train_federated,
)
from fedcrm.tasks.churn import CHURN

NOISE_FEATURES = 30


def _tiny_firm(write_firm: Callable[..., Path]) -> FirmCustomers:
    """400 generated customers with 30 meaningless numeric features and coin-toss labels:
    nothing to learn, everything to memorise."""
    frame = make_customers(400, seed=3)
    rng = np.random.default_rng(3)
    frame["churned"] = rng.choice(["Yes", "No"], len(frame))
    columns = customers_columns()
    for k in range(NOISE_FEATURES):
        frame[f"f{k}"] = [f"{v:.4f}" for v in rng.random(len(frame))]
        columns[f"f{k}"] = {"role": "feature", "kind": "numeric", "min": 0, "max": 1}
    cfg = load_firm_config(write_firm(frame, columns=columns))
    prepare(cfg)
    store = load_store(cfg.prepared_dir, keys=load_keys(cfg.firm.keys_dir))
    data = CHURN.firm_data(cfg, store)
    return FirmCustomers(
        firm="acme",
        x=np.concatenate([data.x_train, data.x_test]),
        y=np.concatenate([data.y_train, data.y_test]),
        member=np.r_[np.ones(len(data.y_train), bool), np.zeros(len(data.y_test), bool)],
        public_size=400,
    )


def _procedure(firm: FirmCustomers, plan: DpPlan, rounds: int) -> FederatedProcedure:
    run = RunConfig(model="mlp", optimizer="adam", learning_rate=plan.learning_rate)
    return FederatedProcedure(run=run, input_dim=firm.x.shape[1],
                              rounds=tuple({"acme": plan} for _ in range(rounds)))


@pytest.fixture
def firm(write_firm: Callable[..., Path]) -> FirmCustomers:
    return _tiny_firm(write_firm)


def test_attacks_find_the_members_of_an_overfit_model(firm: FirmCustomers) -> None:
    members = int(firm.member.sum())
    overfit = DpPlan(steps=150, sample_rate=1.0, noise_multiplier=0.0, max_grad_norm=1e6,
                     learning_rate=0.02, delta=1e-5, epochs=150.0, expected_batch=members)
    procedure = _procedure(firm, overfit, rounds=2)
    target = train_federated(procedure, [firm], [firm.member], seed=0)
    loss, lira = attack_model(target, procedure, [firm], shadows=8, seed=0)
    assert loss.members == members and loss.non_members == len(firm.y) - members
    assert loss.auc > 0.7, loss
    assert lira.auc > 0.7, lira


def test_attacks_are_near_chance_on_a_dp_model_of_the_same_firm(firm: FirmCustomers) -> None:
    members = int(firm.member.sum())
    plan = plan_for_budget(n_examples=members, target_epsilon=1.0, delta=1e-5, epochs=10,
                           batch_size=64, max_grad_norm=1.0, learning_rate=0.02)
    procedure = _procedure(firm, plan, rounds=1)
    target = train_federated(procedure, [firm], [firm.member], seed=0)
    loss, lira = attack_model(target, procedure, [firm], shadows=8, seed=0)
    # 80 non-members: the AUC of a coin toss has a standard error of about 0.035 here
    assert abs(loss.auc - 0.5) < 0.12, loss
    assert abs(lira.auc - 0.5) < 0.12, lira


def test_lira_separates_when_the_target_sits_on_the_in_distribution() -> None:
    rng = np.random.default_rng(0)
    n, shadows = 400, 16
    shadow_in = rng.random((shadows, n)) < 0.5
    # IN shadows see phi around +1, OUT shadows around -1, for every customer
    shadow_phi = np.where(shadow_in, 1.0, -1.0) + rng.normal(0, 0.3, (shadows, n))
    member = rng.random(n) < 0.5
    target = np.where(member, 1.0, -1.0) + rng.normal(0, 0.3, n)
    scores = lira_scores(target, shadow_phi, shadow_in)
    assert np.mean(scores[member] > 0) > 0.95 and np.mean(scores[~member] < 0) > 0.95
    with pytest.raises(ValueError, match="shadows, customers"):
        lira_scores(target, shadow_phi[:, :10], shadow_in)


def test_loss_scores_rank_by_loss_and_tpr_counts_only_below_the_fpr() -> None:
    phi = np.array([-2.0, 0.0, 3.0])
    assert np.all(np.diff(loss_scores(phi)) > 0)  # higher confidence = lower loss = higher score
    scores = np.r_[np.arange(100.0), np.arange(100.0) + 0.5]  # members score 0.5 higher
    member = np.r_[np.zeros(100, bool), np.ones(100, bool)]
    # at most 1 of 100 non-members (99) may score above the threshold (98): members 98.5, 99.5
    assert tpr_at_fpr(scores, member, 0.01) == pytest.approx(0.02)
    assert tpr_at_fpr(scores, member, 0.10) == pytest.approx(0.11)
    assert tpr_at_fpr(scores, member, 0.0) == pytest.approx(0.01)  # above every non-member


def test_audit_mia_refuses_a_folder_that_is_not_a_run(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["audit", "mia", str(tmp_path)])
    assert result.exit_code != 0
    assert "summary.json" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "mia.json").exists()


def test_audit_mia_refuses_a_run_without_a_model_or_without_the_firms_data(tmp_path: Path) -> None:
    import json

    summary = {"run_id": "r", "config": {"task": "churn"}, "firms": [{"firm": "acme"}],
               "model": str(tmp_path / "gone.pt")}
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    result = CliRunner().invoke(app, ["audit", "mia", str(tmp_path)])
    assert result.exit_code != 0 and "no saved global model" in result.output, result.output
    (tmp_path / "model.pt").write_bytes(b"not a model")
    result = CliRunner().invoke(app, ["audit", "mia", str(tmp_path)])
    assert result.exit_code != 0 and "needs every firm's data" in result.output, result.output
    assert "Traceback" not in result.output and not (tmp_path / "mia.json").exists()
