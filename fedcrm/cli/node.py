"""The firm's federation commands: ``fedcrm node start | export-audit``.

Flower and torch are imported only
when the command runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fedcrm.cli.console import err, finite_non_negative, out, plain, user_errors

node_app = typer.Typer(help="The firm's SuperNode (its side of a deployed federation).",
                       no_args_is_help=True)


@node_app.command("start")
@user_errors
def node_start(
    config: Annotated[Path, typer.Option(help="the firm's config (TOML), already prepared")],
    superlink: Annotated[str, typer.Option(help="the coordinator's SuperLink, HOST:PORT")],
    ca: Annotated[Path, typer.Option(help="the federation's ca.crt from the coordinator")],
    auth_key: Annotated[
        Path, typer.Option(help="the firm's SuperNode private key (FIRM.key, 0600)")
    ],
    workdir: Annotated[
        Path | None,
        typer.Option(help="the node's FLWR_HOME and log (default: node/ next to the config)"),
    ] = None,
    max_retries: Annotated[
        int, typer.Option(min=0, help="connection attempts before giving up (0: retry forever)")
    ] = 30,
    max_wait_time: Annotated[
        float,
        typer.Option(callback=finite_non_negative,
                     help="seconds to keep trying to connect (0: no limit)"),
    ] = 600.0,
) -> None:
    """Run this firm's SuperNode and ClientApp process until Ctrl-C; data and keys stay here."""
    from fedcrm.clients.node import FirmProcesses, serve_firm_node
    from fedcrm.coordinator.app_bundle import installed_release
    from fedcrm.privacy.certs import certificate_fingerprint

    plain(out, f"CA {ca}: {certificate_fingerprint(ca)} (compare it with the coordinator's)")

    def on_started(node: FirmProcesses) -> None:
        plain(out, f"SuperNode started for {config}; connecting to {superlink} (TLS); "
                   f"log {node.log_path}. Press Ctrl-C to stop")
        plain(out, f"answers only runs of {installed_release()}, with its installed ClientApp; "
                   f"log {node.clientapp.log_path}")

    def on_online(node_id: int) -> None:
        plain(out, f"accepted by the SuperLink as node {node_id}; waiting for runs")

    try:
        serve_firm_node(
            firm_config=config, superlink_address=superlink, root_cert=ca, auth_key=auth_key,
            workdir=workdir, max_retries=max_retries or None,
            max_wait_time=max_wait_time or None, on_online=on_online, on_started=on_started,
        )
    except KeyboardInterrupt:
        err.print("SuperNode stopped")


@node_app.command("export-audit")
@user_errors
def node_export_audit(
    config: Annotated[Path, typer.Option(help="the firm's config (TOML)")],
    out_path: Annotated[Path, typer.Option("--out", help="zip to write (send it to the auditor)")],
    run: Annotated[
        str | None, typer.Option(help="the run id, to count that run's updates in the log")
    ] = None,
) -> None:
    """Export this firm's signed audit log and public key for a run's auditor (no key, no data)."""
    from fedcrm.audit.assemble import export_firm_log
    from fedcrm.data.contract import load_firm_config

    cfg = load_firm_config(config)
    files = cfg.budget_files()
    export = export_firm_log(
        firm=cfg.firm.name, log=files.audit_log, public_key=cfg.firm.keys_dir / "signing.pub",
        out=out_path, run_id=run,
    )
    counted = f"; run {run}: {export.updates_sent} update(s) sent, {export.updates_resent} " \
              "resent" if run else ""
    plain(out, f"wrote {export.path}: {cfg.firm.name}'s signed log ({export.entries} entries, "
               f"verified with its own key) and public key{counted}")


def register(app: typer.Typer) -> None:
    app.add_typer(node_app, name="node")
