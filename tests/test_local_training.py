"""Local DP training, scoring and the budget CLI on a generated firm; check-then-commit."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pandas as pd
from conftest import make_customers
from typer.testing import CliRunner

from fedcrm.cli import app
from fedcrm.data.contract import load_firm_config
from fedcrm.data.prepare import prepare

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


def test_a_held_out_set_with_one_class_is_refused_before_any_epsilon_is_spent(
    write_firm: Callable[..., Path], tmp_path: Path
) -> None:
    from fedcrm.privacy.keys import load_keys
    from fedcrm.privacy.masking import pseudonymize
    from fedcrm.tasks.churn import holdout_mask

    frame = make_customers(400)
    cfg_path = write_firm(frame)  # creates the keys, which decide who is held out
    keys = load_keys(cfg_path.parent / "keys")
    held_out = holdout_mask(pseudonymize(frame["cust_id"], key=keys.pseudonym_key(),
                                         key_id=keys.pseudonym_key_id))
    # Every churner is a training customer: the held-out AUC would be undefined (it was nan).
    frame["churned"] = "No"
    frame.loc[~held_out & (frame.index % 3 == 0), "churned"] = "Yes"
    cfg_path = write_firm(frame)
    prepare(load_firm_config(cfg_path))
    r = RUNNER.invoke(app, ["train", "--config", str(cfg_path), "--out",
                            str(tmp_path / "m.pt"), "--epsilon", "1"])
    assert r.exit_code != 0
    assert "held-out customers have a single churn class (none churned)" in r.output
    assert "nothing was spent" in r.output and "nan" not in r.output
    assert not (tmp_path / "m.pt").exists()
    ledger = cfg_path.parent / "store" / "budget.jsonl"
    assert not ledger.exists() or not ledger.read_text().strip()


def test_a_tree_model_trains_scores_and_records_its_budget_split(
    write_firm: Callable[..., Path], tmp_path: Path
) -> None:
    cfg = _prepared(write_firm)
    model = tmp_path / "churn-trees.json"
    r = RUNNER.invoke(app, ["train", "--config", str(cfg), "--out", str(model), "--epsilon", "1",
                            "--model", "trees"])
    assert r.exit_code == 0, r.output
    from fedcrm.learning.dp_trees import load_trees

    ensemble, provenance = load_trees(model)
    assert provenance["kind"] == "trees" and provenance["metrics"]["auc"] > 0.6
    trees = provenance["trees"]
    assert ensemble.n_trees == trees["rounds"] * trees["trees_per_round"]
    ledger = (cfg.parent / "store" / "budget.jsonl").read_text().splitlines()
    events = [json.loads(x) for x in ledger if '"purpose"' in x]
    assert [e["purpose"] for e in events] == ["train:churn-trees:local"]
    context = events[0]["context"]
    assert context["leaf_releases"] == provenance["noise"]["releases"] and context["leaf_noise"] > 0
    assert 0.9 < provenance["epsilon"] <= 1.0 + 1e-9
    risks = tmp_path / "risks.csv"
    r = RUNNER.invoke(
        app, ["score", "--model", str(model), "--config", str(cfg), "--out", str(risks)]
    )
    assert r.exit_code == 0, r.output
    table = pd.read_csv(risks)
    assert table["churn_probability"].between(0, 1).all()
    assert table["churn_probability"].is_monotonic_decreasing
