"""A firm's budget cannot be reset, bypassed or overspent by accident: each accident as a test.

Every case ends with one clear line, a non-zero exit and no ε spent: the ledger and the signed
audit log are unchanged (compared byte for byte where they exist).
"""

from __future__ import annotations

import json
import math
import shutil
import tomllib
from collections.abc import Callable
from pathlib import Path

import pytest
import tomli_w
from conftest import make_customers
from typer.testing import CliRunner

from fedcrm.cli import app
from fedcrm.data.contract import load_firm_config
from fedcrm.data.prepare import prepare

RUNNER = CliRunner()


def _firm(write_firm: Callable[..., Path], *, epsilon: float = 3.0) -> Path:
    cfg = write_firm(make_customers(800), extra={"budget": {"epsilon": epsilon, "delta": 1e-5}})
    prepare(load_firm_config(cfg))
    return cfg


def _train(cfg: Path, out: Path, epsilon: str = "0.6") -> object:
    return RUNNER.invoke(
        app, ["train", "--config", str(cfg), "--out", str(out), "--epsilon", epsilon]
    )


def _spent(cfg: Path) -> float:
    result = RUNNER.invoke(app, ["budget", "status", "--config", str(cfg), "--json"])
    assert result.exit_code == 0, result.output
    return float(json.loads(result.output)["spent"])


def _files(cfg: Path) -> dict[str, bytes]:
    store = cfg.parent / "store"
    return {p.name: p.read_bytes() for p in (store / "budget.jsonl", store / "audit.jsonl")
            if p.exists()}


def _one_clear_line(output: str) -> None:
    assert "Traceback" not in output and "internal error" not in output, output
    assert len(output.strip().splitlines()) <= 4, output


def test_deleting_the_ledger_stops_training_until_it_is_rebuilt(
    write_firm: Callable[..., Path], tmp_path: Path
) -> None:
    cfg = _firm(write_firm)
    assert _train(cfg, tmp_path / "a.pt").exit_code == 0  # type: ignore[attr-defined]
    spent = _spent(cfg)
    ledger = cfg.parent / "store" / "budget.jsonl"
    ledger.unlink()
    refused = _train(cfg, tmp_path / "b.pt")
    assert refused.exit_code == 6, refused.output  # type: ignore[attr-defined]
    assert "rebuild" in refused.output and "budget.jsonl" in refused.output  # type: ignore[attr-defined]
    _one_clear_line(refused.output)  # type: ignore[attr-defined]
    assert not (tmp_path / "b.pt").exists() and not ledger.exists()
    rebuilt = RUNNER.invoke(app, ["budget", "rebuild", "--config", str(cfg)])
    assert rebuilt.exit_code == 0, rebuilt.output
    assert _spent(cfg) == pytest.approx(spent)  # nothing forgotten


def test_deleting_the_last_ledger_line_is_caught(
    write_firm: Callable[..., Path], tmp_path: Path
) -> None:
    cfg = _firm(write_firm)
    for name in ("a.pt", "b.pt"):
        assert _train(cfg, tmp_path / name).exit_code == 0  # type: ignore[attr-defined]
    ledger = cfg.parent / "store" / "budget.jsonl"
    ledger.write_text(ledger.read_text().splitlines()[0] + "\n")
    before = _files(cfg)
    refused = _train(cfg, tmp_path / "c.pt")
    assert refused.exit_code == 6  # type: ignore[attr-defined]
    assert "holds 1 releases but its signed audit log records 2" in refused.output  # type: ignore[attr-defined]
    assert _files(cfg) == before


def test_editing_a_ledger_line_is_caught(write_firm: Callable[..., Path], tmp_path: Path) -> None:
    cfg = _firm(write_firm)
    assert _train(cfg, tmp_path / "a.pt").exit_code == 0  # type: ignore[attr-defined]
    ledger = cfg.parent / "store" / "budget.jsonl"
    record = json.loads(ledger.read_text())
    record["noise_multiplier"] *= 10  # "that release was much cheaper"
    ledger.write_text(json.dumps(record) + "\n")
    refused = _train(cfg, tmp_path / "b.pt")
    assert refused.exit_code == 6 and "differs" in refused.output  # type: ignore[attr-defined]


def test_a_new_store_dir_with_the_same_keys_continues_the_same_budget(
    write_firm: Callable[..., Path], tmp_path: Path
) -> None:
    cfg = _firm(write_firm)
    assert _train(cfg, tmp_path / "a.pt").exit_code == 0  # type: ignore[attr-defined]
    spent = _spent(cfg)
    data = tomllib.loads(cfg.read_text())
    data["firm"]["store_dir"] = "store2"
    cfg.write_text(tomli_w.dumps(data))
    prepare(load_firm_config(cfg))
    assert _spent(cfg) == pytest.approx(spent)  # the recorded ledger, not a fresh one
    assert not (cfg.parent / "store2" / "budget.jsonl").exists()
    # and naming a fresh ledger explicitly is refused
    data["budget"]["ledger"] = "fresh/budget.jsonl"
    data["firm"]["audit_log"] = "fresh/audit.jsonl"
    cfg.write_text(tomli_w.dumps(data))
    refused = _train(cfg, tmp_path / "b.pt")
    assert refused.exit_code == 6 and "would not start a new budget" in refused.output  # type: ignore[attr-defined]


def test_raising_the_cap_in_the_toml_is_refused_and_the_raise_command_is_logged(
    write_firm: Callable[..., Path], tmp_path: Path
) -> None:
    cfg = _firm(write_firm, epsilon=1.0)
    assert _train(cfg, tmp_path / "a.pt", "0.9").exit_code == 0  # type: ignore[attr-defined]
    data = tomllib.loads(cfg.read_text())
    data["budget"]["epsilon"] = 50.0
    cfg.write_text(tomli_w.dumps(data))
    before = _files(cfg)
    refused = _train(cfg, tmp_path / "b.pt", "5")
    assert refused.exit_code == 6, refused.output  # type: ignore[attr-defined]
    assert "fedcrm budget raise" in refused.output  # type: ignore[attr-defined]
    assert _files(cfg) == before and not (tmp_path / "b.pt").exists()
    raised = RUNNER.invoke(app, ["budget", "raise", "--config", str(cfg), "--epsilon", "50",
                                 "--reason", "board decision 2026-12-01"])
    assert raised.exit_code == 0, raised.output
    assert _train(cfg, tmp_path / "b.pt", "5").exit_code == 0  # type: ignore[attr-defined]
    log = (cfg.parent / "store" / "audit.jsonl").read_text()
    assert "board decision 2026-12-01" in log  # the auditor sees the change and why


@pytest.mark.parametrize("epsilon", ["nan", "inf", "0", "-1", "5"])
def test_bad_or_oversized_epsilon_is_refused_before_anything_is_spent(
    write_firm: Callable[..., Path], tmp_path: Path, epsilon: str
) -> None:
    cfg = _firm(write_firm, epsilon=3.0)
    before = _files(cfg)
    spent = _spent(cfg)
    result = _train(cfg, tmp_path / "m.pt", epsilon)
    assert result.exit_code != 0  # type: ignore[attr-defined]
    _one_clear_line(result.output)  # type: ignore[attr-defined]
    if math.isfinite(float(epsilon)) and float(epsilon) > 0:
        assert result.exit_code == 6 and "budget exhausted" in result.output  # type: ignore[attr-defined]
    else:
        assert "finite number > 0" in result.output  # type: ignore[attr-defined]
    assert _spent(cfg) == spent
    assert not (tmp_path / "m.pt").exists()
    budget_file = cfg.parent / "store" / "budget.jsonl"
    assert not budget_file.exists() or _files(cfg)["budget.jsonl"] == before.get("budget.jsonl")


@pytest.mark.parametrize("where", ["folder", "missing-folder"])
def test_an_unwritable_out_path_is_refused_before_anything_is_spent(
    write_firm: Callable[..., Path], tmp_path: Path, where: str
) -> None:
    cfg = _firm(write_firm)
    out = tmp_path if where == "folder" else tmp_path / "nowhere" / "m.pt"
    result = _train(cfg, out)
    assert result.exit_code == 2, result.output  # type: ignore[attr-defined]
    _one_clear_line(result.output)  # type: ignore[attr-defined]
    assert _spent(cfg) == 0.0


def test_without_a_signing_key_no_firm_command_runs(
    write_firm: Callable[..., Path], tmp_path: Path
) -> None:
    cfg = _firm(write_firm)
    assert _train(cfg, tmp_path / "a.pt").exit_code == 0  # type: ignore[attr-defined]
    keys = cfg.parent / "keys"
    shutil.move(keys / "signing.key", tmp_path / "signing.key.bak")
    before = _files(cfg)
    for args in (
        ["train", "--config", str(cfg), "--out", str(tmp_path / "b.pt"), "--epsilon", "0.5"],
        ["prepare", "--config", str(cfg)],
        ["score", "--model", str(tmp_path / "a.pt"), "--config", str(cfg), "--out",
         str(tmp_path / "r.csv")],
    ):
        result = RUNNER.invoke(app, args)
        assert result.exit_code == 4, (args, result.output)  # KeyFileError
        assert "no signing key" in result.output
        _one_clear_line(result.output)
    assert _files(cfg) == before
    assert not (tmp_path / "b.pt").exists() and not (tmp_path / "r.csv").exists()
