"""The auditor's commands: ``fedcrm audit verify | report | export`` (read-only)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.text import Text

from fedcrm.cli.console import err, out, user_errors

# --------------------------------------------------------------------------- audit

audit_app = typer.Typer(
    help="Auditor's tools: verify, report, export (read-only).", no_args_is_help=True
)


def _quiet_accounting_logs() -> None:
    import logging

    logging.getLogger("absl").setLevel(logging.ERROR)


@audit_app.command("verify")
@user_errors
def audit_verify(
    run_dir: Annotated[
        Path,
        typer.Argument(help="run directory or unpacked audit bundle; or a firm's own audit.jsonl "
                            "with --key"),
    ],
    key: Annotated[
        Path | None,
        typer.Option(help="the firm's signing.pub, to verify one firm's own audit log"),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the verification as JSON")] = False,
) -> None:
    """Verify every signature, chain and head, and recompute each firm's ε independently."""
    from fedcrm.audit.verify import is_run_folder, verify_firm_log, verify_run
    from fedcrm.privacy.errors import AuditError

    _quiet_accounting_logs()
    if key is not None and run_dir.is_dir() and is_run_folder(run_dir):
        raise AuditError(f"--key is for one firm's own log; {run_dir} is a run folder (its "
                         "public keys are inside it): drop --key")
    single = key is not None
    report = verify_firm_log(run_dir, key) if key is not None else verify_run(run_dir)
    if as_json:
        sys.stdout.write(json.dumps(report.to_dict(), indent=2, default=str) + "\n")
    elif report.ok:
        checked = (
            "chain and signatures verified; recomputed ε within the budget" if single else
            "every chain, signature and firm head verified; recomputed ε within every budget; "
            "every update covered by a DP release"
        )
        out.print(Text.assemble(("PASS ", "bold green"), f"{run_dir}: {checked}"))
        for firm, summary in sorted(report.firms.items()):
            cap = "no cap logged" if summary.epsilon_cap is None else f"{summary.epsilon_cap:g}"
            out.print(f"  {firm}: ε spent {summary.epsilon_spent:.4f} of {cap}")
    else:
        for failure in report.failures:
            err.print(Text.assemble(("FAIL ", "red"), str(failure)), soft_wrap=True)
    if not report.ok:
        raise typer.Exit(AuditError.exit_code)


@audit_app.command("report")
@user_errors
def audit_report(
    run_dir: Annotated[Path, typer.Argument(help="run directory or unpacked audit bundle")],
    out_path: Annotated[Path, typer.Option("--out", help="HTML file to write")] = Path(
        "report.html"
    ),
) -> None:
    """One self-contained HTML report (verdict first, figures embedded) for offline reading."""
    from fedcrm.audit.report import render_report

    _quiet_accounting_logs()
    path = render_report(run_dir, out_path)
    out.print(f"wrote {path}")


@audit_app.command("export")
@user_errors
def audit_export(
    run_dir: Annotated[Path, typer.Argument(help="run directory")],
    out_path: Annotated[Path, typer.Option("--out", help="zip file to write")] = Path("bundle.zip"),
) -> None:
    """Logs, public keys and the report in one zip, for an outside auditor."""
    from fedcrm.audit.report import export_bundle

    _quiet_accounting_logs()
    path = export_bundle(run_dir, out_path)
    out.print(f"wrote {path} (logs, public keys, summary, report; no private key, no data)")


def register(app: typer.Typer) -> None:
    app.add_typer(audit_app, name="audit")
