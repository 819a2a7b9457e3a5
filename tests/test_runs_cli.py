from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from fedcrm.cli import app

RUNNER = CliRunner()


def _summary(run_id: str, auc: float) -> dict[str, object]:
    return {
        "run_id": run_id,
        "task": "churn",
        "strategy": "fedavg",
        "rounds": 5,
        "rounds_completed": 5,
        "status": "completed",
        "firms": [
            {"firm": "a", "epsilon": 0.9, "delta": 1e-5, "epsilon_budget": 1.0, "num_examples": 100}
        ],
        "metrics": {"pooled": {"auc": auc}},
        "baseline": {"centralized_auc": 0.85},
        "model": None,
    }


def test_runs_list_and_show_read_past_summaries(tmp_path: Path) -> None:
    for rid, auc in (("run-a", 0.81), ("run-b", 0.84)):
        (tmp_path / rid).mkdir()
        (tmp_path / rid / "summary.json").write_text(json.dumps(_summary(rid, auc)))
    (tmp_path / "unfinished").mkdir()
    r = RUNNER.invoke(app, ["runs", "list", "--root", str(tmp_path)])
    assert r.exit_code == 0, r.output
    assert "run-a" in r.output and "run-b" in r.output and "auc=0.8400" in r.output
    assert "unfinished" not in r.output
    r = RUNNER.invoke(app, ["runs", "show", "run-b", "--root", str(tmp_path), "--json"])
    assert r.exit_code == 0 and json.loads(r.output)["metrics"]["pooled"]["auc"] == 0.84
    r = RUNNER.invoke(app, ["runs", "show", "run", "--root", str(tmp_path)])
    assert r.exit_code == 2 and "matches 2 runs" in r.output
    r = RUNNER.invoke(app, ["runs", "show", "nope", "--root", str(tmp_path)])
    assert r.exit_code == 2 and "fedcrm runs list" in r.output


def test_runs_show_prints_a_querys_result_table(tmp_path: Path) -> None:
    run = tmp_path / "q-1"
    run.mkdir()
    (run / "summary.json").write_text(json.dumps(
        {"run_id": "q-1", "query_id": "q-1", "status": "completed", "query": {"name": "churn"}}))
    (run / "result.md").write_text("| group | statistic |\n|---|---|\n| [b]Month | rate |\n")
    r = RUNNER.invoke(app, ["runs", "show", "q-1", "--root", str(tmp_path)])
    assert r.exit_code == 0, r.output
    assert "| [b]Month | rate |" in r.output  # printed as text, never read as markup


def test_runs_show_of_a_summary_missing_a_field_says_it_is_damaged(tmp_path: Path) -> None:
    run = tmp_path / "run-c"
    run.mkdir()
    damaged = _summary("run-c", 0.8)
    del damaged["strategy"]
    (run / "summary.json").write_text(json.dumps(damaged))
    r = RUNNER.invoke(app, ["runs", "show", "run-c", "--root", str(tmp_path)])
    assert r.exit_code not in (0, 70), r.output
    assert "damaged" in r.output and "internal error" not in r.output
