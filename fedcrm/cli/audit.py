"""The auditor's commands: ``fedcrm audit verify | report | export | assemble`` (read-only) and
``fedcrm audit mia`` (membership inference on a simulation's global model; needs the members'
data, so it runs where that is: on a simulation's run folder)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.text import Text

from fedcrm.cli.console import err, out, plain, user_errors

# --------------------------------------------------------------------------- audit

audit_app = typer.Typer(
    help="Auditor's tools: verify, report, export, assemble (read-only); mia (membership "
    "inference, on a simulation).",
    no_args_is_help=True,
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
            "every update covered by a DP release; the run finished"
        )
        out.print(Text.assemble(("PASS ", "bold green"), f"{run_dir}: {checked}"))
        for firm, summary in sorted(report.firms.items()):
            cap = "no cap logged" if summary.epsilon_cap is None else f"{summary.epsilon_cap:g}"
            plain(out, f"  {firm}: ε spent {summary.epsilon_spent:.4f} of {cap}")
    else:
        for failure in report.failures:
            err.print(Text.assemble(("FAIL ", "red"), str(failure)), soft_wrap=True)
    if not as_json:
        for label, found in (("lost (sent and charged, never accepted)", report.lost_updates),
                             ("resent after a restart (one release)", report.replayed_updates)):
            for u in found:
                plain(out, f"  update {label}: {u.firm} round {u.round} ({u.model_hash[:12]})")
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


@audit_app.command("assemble")
@user_errors
def audit_assemble(
    run_dir: Annotated[
        Path, typer.Argument(help="the coordinator's run folder (<workdir>/runs/<run-id>)")
    ],
    firm: Annotated[
        list[Path], typer.Option(help="a firm's export (`fedcrm node export-audit`), repeatable")
    ],
    out_dir: Annotated[Path, typer.Option("--out", help="new folder for the run's audit")],
) -> None:
    """Put a deployed run's logs together (federation + every firm) and verify them."""
    from fedcrm.audit.assemble import assemble_run
    from fedcrm.audit.verify import verify_run
    from fedcrm.privacy.errors import AuditError

    _quiet_accounting_logs()
    folder = assemble_run(run_dir=run_dir, firm_exports=firm, out=out_dir)
    report = verify_run(folder)
    plain(out, f"assembled {folder} from {run_dir} and {len(firm)} firm export(s)")
    if report.ok:
        plain(out, f"PASS: verify it again any time with `fedcrm audit verify {folder}`",
              style="green")
    else:
        for failure in report.failures:
            plain(err, f"FAIL {failure}", style="red")
        raise typer.Exit(AuditError.exit_code)


@audit_app.command("mia")
@user_errors
def audit_mia(
    run_dir: Annotated[Path, typer.Argument(help="a simulation's run directory (runs/<run-id>)")],
    shadows: Annotated[
        int, typer.Option(min=0, max=1024, help="LiRA shadow federations (0: loss attack only)")
    ] = 16,
    seed: Annotated[int, typer.Option(help="seed of the shadows' subsets and noise")] = 0,
    out_path: Annotated[
        Path | None, typer.Option("--out", help="JSON file to write (default: RUN_DIR/mia.json)")
    ] = None,
) -> None:
    """Membership inference (loss threshold, LiRA) against the run's released global model.

    Needs every firm's data (members: training customers, non-members: held-out customers), so
    it runs on a simulation's run folder. `fedcrm audit report` shows the result.
    """
    from fedcrm.coordinator.runs import load_summary
    from fedcrm.privacy.durable import check_output_file
    from fedcrm.simulations.membership import MIA_FILE, membership_audit, write_report

    load_summary(run_dir)  # a finished run's folder, before anything else
    target = check_output_file(out_path or Path(run_dir) / MIA_FILE, what="--out JSON file")
    report = membership_audit(run_dir, shadows=shadows, seed=seed)
    write_report(report, target)
    eps = max(report.epsilon.values(), default=0.0)
    out.print(f"membership inference on {report.run_id} (ε ≤ {eps:.3g} per firm), "
              f"{report.attacks[0].members:,} members vs {report.attacks[0].non_members:,} "
              "non-members:", highlight=False, markup=False)
    for attack in report.attacks:
        out.print(f"  {attack.attack}: AUC {attack.auc:.4f}, TPR {attack.tpr_at_low_fpr:.4f} at "
                  f"{attack.low_fpr:.0%} FPR", highlight=False, markup=False)
    out.print(f"wrote {target}", highlight=False, markup=False)


def register(app: typer.Typer) -> None:
    app.add_typer(audit_app, name="audit")
