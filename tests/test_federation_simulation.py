"""A real Flower simulation on the Telco data with misbehaving firms.

One run covers: an update with NaN (rejected), an update far from the global model (rejected),
a firm that fails mid-run (dropout), a firm whose budget is already spent (stops participating),
and a capture of every reply the server receives, checked for raw PII and raw records.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from fedcrm.coordinator.run_config import RunConfig
from fedcrm.simulations.run import SimulationConfig, SimulationSection, simulate

pytestmark = [pytest.mark.slow, pytest.mark.data]


def _documented_reply_fields() -> set[tuple[str, str, str]]:
    """(message, record, field) of every row of docs/privacy.md's reply-field table."""
    text = (Path(__file__).resolve().parents[1] / "docs" / "privacy.md").read_text()
    rows = set()
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 5 and cells[0] in {
            "describe", "train", "evaluate", "query.offer", "query.answer", "secure_sum_keys",
            "secure_sum_share", "secure_sum_mask", "secure_sum_confirm", "secure_sum_unmask",
            "query.overlap_offer", "query.overlap_blind", "query.overlap_reblind", "train.trees",
            "error",
        }:
            assert cells[3].startswith(("public", "DP (")), line  # every field says which
            rows.add((cells[0], cells[1], cells[2]))
    return rows


def _capture_and_misbehave(dump_dir: Path) -> list[Any]:
    from flwr.app import ArrayRecord

    def mod(msg: Any, context: Any, call_next: Any) -> Any:
        part = int(context.node_config["partition-id"])
        kind = msg.metadata.message_type
        server_round = (
            int(msg.content["config"].get("server-round", 0)) if "config" in msg.content else 0
        )
        if kind == "train" and part == 3 and server_round == 2:
            raise RuntimeError("simulated crash of firm4 during round 2")
        reply = call_next(msg, context)
        if kind == "train" and "arrays" in reply.content:
            arrays = reply.content["arrays"].to_numpy_ndarrays()
            if part == 1:
                arrays = [np.full_like(a, np.nan) for a in arrays]
            elif part == 2:
                arrays = [a * 1e6 + 1e3 for a in arrays]
            reply.content["arrays"] = ArrayRecord(arrays)
        dump: dict[str, Any] = {"type": kind, "partition": part}
        for name, record in reply.content.items():
            if isinstance(record, ArrayRecord):
                dump[name] = [a.tobytes().hex() for a in record.to_numpy_ndarrays()]
            else:
                dump[name] = {k: str(v) for k, v in record.items()}
        path = dump_dir / f"{kind}-{part}-{server_round}.json"
        path.write_text(json.dumps(dump))
        return reply

    return [mod]


def test_simulation_rejects_bad_updates_survives_dropout_and_stops_exhausted_firm(
    tmp_path: Path, capfd: pytest.CaptureFixture[str],
) -> None:
    dump = tmp_path / "replies"
    dump.mkdir()
    cfg = SimulationConfig(
        simulation=SimulationSection(
            name="faulty",
            dataset="telco",
            firms=5,
            seed=1,
            epsilon_budget=1.0,
            workdir=tmp_path / "runs",
            exhausted_firms=1,
            gbk_firms=1,
        ),
        run=RunConfig(
            task="churn",
            rounds=3,
            min_firms=1,
            round_timeout=60,
            target_epsilon=1.0,
            max_update_norm=100.0,
            batch_size=128,
        ),
    )
    run_dir, summary = simulate(cfg, run_id="faulty-run", client_mods=_capture_and_misbehave(dump))
    # Quiet by default: Flower's lines (and its colour codes) are in the run's log, not on the
    # terminal.
    terminal = capfd.readouterr()
    for stream in (terminal.out, terminal.err):
        assert "\x1b[" not in stream and "INFO :" not in stream and "DEPRECATED" not in stream
    engine_log = (run_dir / "flower.log").read_text()
    assert "[ROUND 1/3]" in engine_log and "\x1b[" not in engine_log

    assert summary["status"] == "completed"
    assert summary["rounds_completed"] == 3
    first = summary["rounds_detail"][0]
    reasons = {r["firm"]: r["reason"] for r in first["rejected"]}
    assert "NaN" in reasons["firm2"]
    assert "exceeds the bound" in reasons["firm3"]
    assert first["accepted"] == ["firm4", "firm5"]
    assert "firm4" in summary["rounds_detail"][1]["dropped"]
    assert summary["rounds_detail"][2]["accepted"] == ["firm4", "firm5"]
    firms = {f["firm"]: f for f in summary["firms"]}
    assert firms["firm1"]["stopped"] == "privacy budget exhausted"
    for f in summary["firms"]:
        assert f["epsilon"] <= f["epsilon_budget"] + 1e-9
    assert Path(summary["model"]).exists()
    assert summary["baseline"]["centralized_auc"] > 0.75
    # the saved model's exact AUC (the simulation's privileged view, for benchmarking) and the
    # federation's DP-evaluated AUC, which comes with the spread of its noise
    assert summary["baseline"]["federated_auc_exact"] > 0.6
    pooled = summary["metrics"]["pooled"]
    assert 0.0 <= pooled["auc"] <= 1.0 and pooled["auc_noise_sd"] > 0.0
    events = [json.loads(x)["kind"] for x in (run_dir / "events.jsonl").read_text().splitlines()]
    assert "update_rejected" in events and "firm_stopped" in events and "firm_dropped" in events

    # The auditor's independent verification passes on the run's signed logs, and the report
    # carries the verdict and a figure per firm.
    from fedcrm.audit.report import render_report
    from fedcrm.audit.verify import verify_run

    verification = verify_run(run_dir)
    assert verification.ok, [str(f) for f in verification.failures]

    # Membership inference on the released model: every customer of every firm is a candidate
    # (members = training customers), and the report shows the result.
    from typer.testing import CliRunner

    from fedcrm.cli import app

    mia_run = CliRunner().invoke(app, ["audit", "mia", str(run_dir), "--shadows", "2"])
    assert mia_run.exit_code == 0, mia_run.output
    mia = json.loads((run_dir / "mia.json").read_text())
    assert set(mia["attacks"]) == {"loss_threshold", "lira"}
    for attack in mia["attacks"].values():
        assert 0.0 <= attack["auc"] <= 1.0
        assert attack["members"] == summary["baseline"]["train_customers"]
        assert attack["non_members"] == summary["baseline"]["test_customers"]
    html = render_report(run_dir, tmp_path / "report.html").read_text()
    assert "PASS" in html and html.count("data:image/png;base64,") >= 5
    assert "Membership inference" in html and "lira" in html
    rejected = [
        json.loads(x)
        for x in (run_dir / "federation" / "audit.jsonl").read_text().splitlines()
        if '"update_rejected"' in x
    ]
    assert {e["payload"]["firm"] for e in rejected} >= {"firm2", "firm3"}

    # Every field of every reply is in docs/privacy.md's table, as DP or public.
    documented = _documented_reply_fields()
    seen: set[tuple[str, str, str]] = set()
    for path in sorted(dump.iterdir()):
        reply = json.loads(path.read_text())
        config = reply.get("config", {})
        message = "error" if config.get("state") == "error" else {
            "query.describe": "describe", "train": "train", "evaluate": "evaluate",
        }[reply["type"]]
        for record in ("config", "metrics", "arrays"):
            if record not in reply:
                continue
            fields = ["(model parameters)"] if record == "arrays" else list(reply[record])
            seen.update((message, record, field) for field in fields)
    undocumented = sorted(seen - documented)
    assert not undocumented, f"reply fields missing from docs/privacy.md: {undocumented}"
    assert ("evaluate", "metrics", "hist-pos") in seen  # the DP evaluation really ran
    assert ("train", "arrays", "(model parameters)") in seen

    # No raw PII and no raw record in anything the server received.
    replies = "\n".join(p.read_text() for p in sorted(dump.iterdir()))
    assert replies
    for firm_dir in sorted((run_dir / "firms").iterdir()):
        export = pd.read_csv(
            firm_dir / "customers.csv",
            dtype=str,
            encoding="gb18030" if firm_dir.name == "firm1" else "utf-8",
        )
        for column in ("customer_id", "name", "email", "phone", "birth_date", "postcode"):
            for value in export[column].dropna().unique():
                # whole-token match: a 6-digit postcode may occur inside a float's digits
                pattern = rf"(?<![0-9A-Za-z]){re.escape(value)}(?![0-9A-Za-z])"
                assert not re.search(pattern, replies), (column, "raw value reached the server")
                assert value.encode().hex() not in replies
