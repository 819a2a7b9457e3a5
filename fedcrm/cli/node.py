"""The firm's federation command: ``fedcrm node start``.

Flower and torch are imported only
when the command runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fedcrm.cli.console import err, finite_non_negative, out, user_errors

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
    """Run this firm's SuperNode until Ctrl-C; its data and keys never leave this host."""
    from fedcrm.clients.node import serve_firm_node
    from fedcrm.coordinator.processes import ManagedProcess

    def on_started(node: ManagedProcess) -> None:
        out.print(f"SuperNode started for {config}; connecting to {superlink} (TLS); "
                  f"log {node.log_path}. Press Ctrl-C to stop")

    def on_online(node_id: int) -> None:
        out.print(f"accepted by the SuperLink as node {node_id}; waiting for runs")

    try:
        serve_firm_node(
            firm_config=config, superlink_address=superlink, root_cert=ca, auth_key=auth_key,
            workdir=workdir, max_retries=max_retries or None,
            max_wait_time=max_wait_time or None, on_online=on_online, on_started=on_started,
        )
    except KeyboardInterrupt:
        err.print("SuperNode stopped")


def register(app: typer.Typer) -> None:
    app.add_typer(node_app, name="node")
