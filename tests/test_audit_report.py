"""Audit report and export bundle: verdict first, a figure per firm, escaped text, no secrets."""

from __future__ import annotations

import base64
import re
import shutil
import zipfile
from pathlib import Path

import pytest
from test_audit import FIRMS, Run, build_run, copy_run  # the synthetic run of test_audit

from fedcrm.audit.log import AuditLog, EntryKind
from fedcrm.audit.report import export_bundle, render_report
from fedcrm.audit.verify import FailureKind, verify_run
from fedcrm.privacy.errors import AuditError

PNG_IMG = '<img src="data:image/png;base64,'


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Run:
    return build_run(tmp_path_factory.mktemp("report") / "run")


@pytest.fixture
def run(template: Run, tmp_path: Path) -> Run:
    return copy_run(template, tmp_path / "run")


def _firm_sections(text: str) -> list[str]:
    return text.split('<div class="firm">')[1:]


def test_clean_run_report_has_pass_verdict_and_a_figure_per_firm(run: Run, tmp_path: Path) -> None:
    out = render_report(run.root, tmp_path / "report.html")
    text = out.read_text(encoding="utf-8")
    assert text.index("PASS") < text.index("<h2>Firms</h2>")  # verdict first
    assert "FAIL" not in text
    sections = _firm_sections(text)
    assert len(sections) == len(FIRMS)
    for firm, section in zip(sorted(FIRMS), sections, strict=True):
        assert f"<h3>{firm}</h3>" in section
        assert PNG_IMG in section
        assert "pseudonymize" in section and "rows_quarantined" in section
    for blob in re.findall(r'data:image/png;base64,([A-Za-z0-9+/=]+)"', text):
        assert base64.b64decode(blob).startswith(b"\x89PNG")
    assert "norm too large" in text  # the rejected update of round 2
    assert "<link" not in text and "<script" not in text  # self-contained, nothing to fetch


def test_tampered_run_report_says_fail_and_names_the_problem(run: Run, tmp_path: Path) -> None:
    path = run.firm_log("globex")
    lines = run.lines(path)
    del lines[2]
    run.write_lines(path, lines)
    text = render_report(run.root, tmp_path / "report.html").read_text(encoding="utf-8")
    assert "FAIL" in text and "PASS" not in text
    assert "broken_chain" in text and "firms/globex/audit.jsonl" in text
    assert text.index("FAIL") < text.index("<h2>Firms</h2>")


def test_report_escapes_text_from_the_logs(run: Run, tmp_path: Path) -> None:
    fed = AuditLog(run.fed_log, signing_key=run.fed_key)
    fed.append(EntryKind.UPDATE_REJECTED, {"round": 3, "firm": "acme", "node_id": "n1",
                                           "reason": "<script>alert(1)</script>"})
    text = render_report(run.root, tmp_path / "report.html").read_text(encoding="utf-8")
    assert "<script>" not in text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text


def test_export_bundle_holds_logs_public_keys_report_and_no_private_key(
        run: Run, tmp_path: Path) -> None:
    (run.root / "summary.json").write_text('{"rounds": 3}')
    (run.root / "firms" / "acme" / "signing.key").write_text("-----BEGIN PRIVATE KEY-----\n")
    out = export_bundle(run.root, tmp_path / "bundle.zip")
    with zipfile.ZipFile(out) as zf:
        names = set(zf.namelist())
        assert {"federation/audit.jsonl", "federation/signing.pub", "summary.json",
                "report.html", "verification.json"} <= names
        for firm in FIRMS:
            assert {f"firms/{firm}/audit.jsonl", f"firms/{firm}/signing.pub"} <= names
        assert not any(n.endswith(".key") or n.endswith(".lock") for n in names)
        for name in names:
            assert b"PRIVATE KEY" not in zf.read(name)
        zf.extractall(tmp_path / "unzipped")
    # the bundle alone is enough to verify the run
    assert verify_run(tmp_path / "unzipped").ok


def test_export_and_report_refuse_a_folder_that_is_not_a_run(tmp_path: Path) -> None:
    with pytest.raises(AuditError, match="not a fedcrm run folder"):
        export_bundle(tmp_path, tmp_path / "bundle.zip")
    with pytest.raises(AuditError, match="does not exist"):
        render_report(tmp_path / "missing", tmp_path / "report.html")
    assert not (tmp_path / "bundle.zip").exists() and not (tmp_path / "report.html").exists()


def test_verify_fails_a_firm_folder_that_never_took_part(run: Run) -> None:
    intruder = run.root / "firms" / "initech"
    shutil.copytree(run.root / "firms" / "acme", intruder)
    report = verify_run(run.root)
    assert [(f.file, f.kind) for f in report.failures] == [
        ("firms/initech", FailureKind.UNEXPECTED_LOG)]
    assert "initech" not in report.firms
