"""The coordinator's commands: ``fedcrm certs``, ``fedcrm link``, ``fedcrm run``.

Heavy imports (Flower, torch) happen
inside the commands, so ``fedcrm --help`` stays fast.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from fedcrm.cli.console import err, out, user_errors

certs_app = typer.Typer(
    help="Federation CA, SuperLink certificate and SuperNode keys.", no_args_is_help=True
)
link_app = typer.Typer(help="The coordinator's SuperLink and its registered firms.",
                       no_args_is_help=True)

COORDINATOR_HELP = "the coordinator's config (TOML with a [link] section)"


# --------------------------------------------------------------------------- certs


@certs_app.command("ca")
@user_errors
def certs_ca(
    out_dir: Annotated[Path, typer.Option("--out", help="directory for ca.crt and ca.key")],
    name: Annotated[str, typer.Option(help="the CA's common name")] = "fedcrm federation CA",
    force: Annotated[bool, typer.Option(help="replace an existing ca.key")] = False,
) -> None:
    """Create the federation CA (EC P-384): ca.crt goes to every firm, ca.key stays here."""
    from fedcrm.privacy.certs import generate_ca

    ca = generate_ca(out_dir, common_name=name, force=force)
    out.print(f"created CA '{name}': {ca.cert} (send to every firm), {ca.key} (secret, 0600)")


@certs_app.command("server")
@user_errors
def certs_server(
    ca_dir: Annotated[Path, typer.Option("--ca", help="directory holding ca.crt and ca.key")],
    out_dir: Annotated[Path, typer.Option("--out", help="directory for server.crt/server.key")],
    host: Annotated[
        list[str] | None,
        typer.Option(help="DNS name or IP the firms dial (repeatable); 127.0.0.1 and localhost "
                          "are always included"),
    ] = None,
    force: Annotated[bool, typer.Option(help="replace an existing server.key")] = False,
) -> None:
    """Issue the SuperLink's TLS certificate, signed by the federation CA."""
    from fedcrm.privacy.certs import CA_CERT, CA_KEY, DEFAULT_HOSTS, CaFiles, issue_server_cert

    hosts = tuple(dict.fromkeys([*(host or []), *DEFAULT_HOSTS]))
    files = issue_server_cert(
        CaFiles(cert=ca_dir / CA_CERT, key=ca_dir / CA_KEY), out_dir, hosts=hosts, force=force
    )
    out.print(f"issued {files.cert} for {', '.join(files.hosts)}; key {files.key} (secret, 0600)")


@certs_app.command("node-key")
@user_errors
def certs_node_key(
    firm: Annotated[str, typer.Option(help="the firm's name")],
    out_dir: Annotated[Path, typer.Option("--out", help="directory for FIRM.key and FIRM.pub")],
    force: Annotated[bool, typer.Option(help="replace an existing FIRM.key")] = False,
) -> None:
    """Create a firm's SuperNode authentication key: send FIRM.pub to the coordinator."""
    from fedcrm.privacy.certs import generate_node_auth_key

    keys = generate_node_auth_key(out_dir, firm=firm, force=force)
    out.print(f"created {keys.private_key} (secret, 0600, stays here) and {keys.public_key} "
              "(send it to the coordinator for `fedcrm link register`)")


# --------------------------------------------------------------------------- link


@link_app.command("start")
@user_errors
def link_start(
    config: Annotated[Path, typer.Option(help=COORDINATOR_HELP)] = Path("coordinator.toml"),
) -> None:
    """Run the SuperLink (TLS, node authentication, persistent state) until Ctrl-C."""
    from fedcrm.coordinator.deploy_config import load_coordinator_config
    from fedcrm.coordinator.host import start_link
    from fedcrm.coordinator.processes import DeploymentError, ProcessGroup

    cfg = load_coordinator_config(config)
    with ProcessGroup() as group:
        link = start_link(cfg, group=group)
        out.print(f"SuperLink listening on {cfg.link.host}:{cfg.link.port} (TLS, SuperNode "
                  f"authentication on); log {link.log_path}")
        out.print(f"firms need the CA certificate {cfg.ca_cert} and this address (a name or IP "
                  "in server.crt); register each firm with `fedcrm link register`")
        out.print("press Ctrl-C to stop")
        try:
            while link.running:
                time.sleep(0.5)
        except KeyboardInterrupt:
            err.print("stopping the SuperLink ...")
            group.stop_all()
            out.print("SuperLink stopped")
            return
        raise DeploymentError(
            f"the SuperLink exited with code {link.poll()}; see {link.log_path}: "
            f"{link.log_tail(3)}"
        )


@link_app.command("register")
@user_errors
def link_register(
    firm: Annotated[str, typer.Option(help="the firm's name (shown in `flwr supernode ls`)")],
    public_key: Annotated[Path, typer.Option(help="the firm's FIRM.pub (OpenSSH EC public key)")],
    config: Annotated[Path, typer.Option(help=COORDINATOR_HELP)] = Path("coordinator.toml"),
) -> None:
    """Allow a firm's SuperNode to connect (the SuperLink must be running)."""
    from fedcrm.coordinator.deploy_config import load_coordinator_config
    from fedcrm.coordinator.host import register_firm

    cfg = load_coordinator_config(config)
    node_id = register_firm(cfg, firm=firm, public_key=public_key)
    out.print(f"registered {firm} as node {node_id}")


# --------------------------------------------------------------------------- run


@user_errors
def run(
    config: Annotated[Path, typer.Option(help="the run config (TOML with a [run] section)")],
    coordinator: Annotated[Path, typer.Option(help=COORDINATOR_HELP)] = Path("coordinator.toml"),
    run_id: Annotated[str | None, typer.Option(help="run id (default: generated)")] = None,
    timeout: Annotated[
        float | None, typer.Option(help="seconds to wait for the run (default: from the config)")
    ] = None,
) -> None:
    """Run the federated job of RUN.toml on the running federation; wait for the result."""
    from fedcrm.coordinator.deploy_config import load_coordinator_config, load_run_file
    from fedcrm.coordinator.host import require_running_link, submit_run
    from fedcrm.coordinator.live import RunDisplay, print_run_summary
    from fedcrm.coordinator.processes import DeploymentError
    from fedcrm.coordinator.runs import load_summary, new_run_id

    run_cfg = load_run_file(config)
    cfg = load_coordinator_config(coordinator)
    rid = run_id or new_run_id(config.stem.replace("_", "-"))
    run_dir = cfg.runs_dir / rid
    require_running_link(cfg)
    out.print(f"run [bold]{rid}[/]: {run_cfg.task.value}, {run_cfg.rounds} rounds, strategy "
              f"{run_cfg.aggregation}, ε {run_cfg.target_epsilon:g} per firm -> {run_dir}")

    def on_round(n: int, total: int) -> None:
        out.print(f"[ROUND {n}/{total}]")

    with RunDisplay(run_dir / "events.jsonl", console=out, title=rid):
        outcome = submit_run(cfg, run_cfg, run_id=rid, timeout_s=timeout, on_round=on_round)
    summary = load_summary(outcome.run_dir) if outcome.summary_path.exists() else {}
    if summary:
        print_run_summary(out, summary, outcome.run_dir)
    if not outcome.completed or summary.get("status") != "completed":
        if not outcome.completed:
            ended = outcome.status.status_text
        elif not summary:
            ended = f"{outcome.status.status_text} but the ServerApp wrote no summary.json"
        else:
            ended = f"{summary.get('status')}: {summary.get('stop_reason') or 'no reason given'}"
        raise DeploymentError(
            f"run {rid} (Flower run {outcome.flower_run_id}) ended {ended}; see "
            f"{outcome.log_path} and {cfg.superlink_dir / 'superlink.log'}"
        )
    out.print(f"run {rid} completed; summary {outcome.summary_path}")


# --------------------------------------------------------------------------- runs

runs_app = typer.Typer(help="Past runs (summaries under runs/).", no_args_is_help=True)


@runs_app.command("list")
@user_errors
def runs_list(
    root: Annotated[Path, typer.Option(help="directory holding run directories")] = Path("runs"),
) -> None:
    """One line per finished run: id, task, strategy, rounds, status, main metric."""
    from fedcrm.coordinator.runs import list_runs

    runs = list_runs(root)
    if not runs:
        out.print(f"no finished runs under {root}")
        return
    t = Table(title=f"runs under {root}")
    t.add_column("run id", no_wrap=True)
    for col in ("task", "strategy", "rounds", "status", "firms", "metric"):
        t.add_column(col)
    for r in runs:
        pooled = r.get("metrics", {}).get("pooled", {})
        metric = (
            f"auc={pooled['auc']:.4f}" if "auc" in pooled
            else f"cum.err={pooled['cumulative_error']:.1f}" if "cumulative_error" in pooled
            else "-"
        )
        t.add_row(r["run_id"], r["task"], r["strategy"],
                  f"{r.get('rounds_completed', '?')}/{r['rounds']}", str(r.get("status", "")),
                  str(len(r.get("firms", []))), metric)
    out.print(t)


@runs_app.command("show")
@user_errors
def runs_show(
    run_id: Annotated[str, typer.Argument(help="run id (or a unique prefix)")],
    root: Annotated[Path, typer.Option(help="directory holding run directories")] = Path("runs"),
    as_json: Annotated[bool, typer.Option("--json", help="print the whole summary")] = False,
) -> None:
    """A past run's summary: firms' ε against budget, metrics, baseline, model and provenance."""
    from fedcrm.coordinator.runs import find_run, load_summary

    run_dir = find_run(root, run_id)
    summary = load_summary(run_dir)
    if as_json:
        sys.stdout.write(json.dumps(summary, indent=2) + "\n")
        return
    from fedcrm.coordinator.live import print_run_summary

    print_run_summary(out, summary, run_dir)


def register(app: typer.Typer) -> None:
    app.add_typer(certs_app, name="certs")
    app.add_typer(link_app, name="link")
    app.command("run")(run)
    app.add_typer(runs_app, name="runs")
