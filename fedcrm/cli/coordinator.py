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
from rich.text import Text

from fedcrm.cli.console import err, finite_positive, out, plain, user_errors

certs_app = typer.Typer(
    help="Federation CA, SuperLink certificate and SuperNode keys.", no_args_is_help=True
)
link_app = typer.Typer(
    help="The coordinator's SuperLink, its Fleet gateway and the registered firms.",
    no_args_is_help=True,
)

# Help texts are rich markup (typer's help format): a literal "[" is written "\\[".
COORDINATOR_HELP = "the coordinator's config (TOML with a \\[link] section)"


# --------------------------------------------------------------------------- certs


@certs_app.command("ca")
@user_errors
def certs_ca(
    out_dir: Annotated[Path, typer.Option("--out", help="directory for ca.crt and ca.key")],
    name: Annotated[str, typer.Option(help="the CA's common name")] = "fedcrm federation CA",
    force: Annotated[bool, typer.Option(help="replace an existing ca.key")] = False,
) -> None:
    """Create the federation CA (EC P-384): ca.crt goes to every firm, ca.key stays offline."""
    from fedcrm.privacy.certs import certificate_fingerprint, generate_ca

    ca = generate_ca(out_dir, common_name=name, force=force)
    plain(out, f"created CA '{name}': {ca.cert} (send to every firm), {ca.key} (secret, 0600)")
    plain(out, f"CA fingerprint {certificate_fingerprint(ca.cert)} (firms check it by phone)")
    plain(out, "after `fedcrm certs server`, move ca.key offline: the SuperLink never needs it")


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
    """Issue the SuperLink's TLS certificate, signed by the federation CA.

    --out gets server.crt, server.key and a copy of ca.crt (never ca.key): the SuperLink's
    certs_dir.
    """
    from fedcrm.privacy.certs import CA_CERT, CA_KEY, DEFAULT_HOSTS, CaFiles, issue_server_cert

    hosts = tuple(dict.fromkeys([*(host or []), *DEFAULT_HOSTS]))
    files = issue_server_cert(
        CaFiles(cert=ca_dir / CA_CERT, key=ca_dir / CA_KEY), out_dir, hosts=hosts, force=force
    )
    plain(out, f"issued {files.cert} for {', '.join(files.hosts)}; key {files.key} (secret, "
               f"0600); CA certificate {files.ca_cert}")


@certs_app.command("fingerprint")
@user_errors
def certs_fingerprint(
    cert: Annotated[Path, typer.Argument(help="a certificate, e.g. the federation's ca.crt")],
) -> None:
    """Print a certificate's SHA-256 fingerprint: coordinator and firms compare it by phone."""
    from fedcrm.privacy.certs import certificate_fingerprint

    plain(out, f"{cert}: {certificate_fingerprint(cert)}")


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
    plain(out, f"created {keys.private_key} (secret, 0600, stays here) and {keys.public_key} "
               "(send it to the coordinator for `fedcrm link register`)")


# --------------------------------------------------------------------------- link


@link_app.command("start")
@user_errors
def link_start(
    config: Annotated[Path, typer.Option(help=COORDINATOR_HELP)] = Path("coordinator.toml"),
) -> None:
    """Run the SuperLink (loopback) and the firms' Fleet gateway until Ctrl-C."""
    from fedcrm.coordinator.deploy_config import load_coordinator_config
    from fedcrm.coordinator.host import dial_addresses, link_warnings, start_link
    from fedcrm.coordinator.processes import DeploymentError, ProcessGroup
    from fedcrm.privacy.certs import certificate_fingerprint

    cfg = load_coordinator_config(config)
    for warning in link_warnings(cfg):
        plain(err, f"warning: {warning}", style="yellow")
    with ProcessGroup() as group:
        link = start_link(cfg, group=group)
        plain(out, f"SuperLink on {link.control_address} (TLS, SuperNode authentication; "
                   f"Control API: this host only); log {link.superlink.log_path}")
        plain(out, f"firms dial {' or '.join(dial_addresses(cfg))} (the Fleet gateway on "
                   f"{cfg.link.host}:{cfg.link.port}: Fleet API only)")
        plain(out, f"firms need {cfg.ca_cert}, fingerprint {certificate_fingerprint(cfg.ca_cert)}; "
                   "register each firm with `fedcrm link register`")
        plain(out, "press Ctrl-C to stop")
        try:
            while link.running:
                time.sleep(0.5)
        except KeyboardInterrupt:
            err.print("stopping the SuperLink ...")
            group.stop_all()
            out.print("SuperLink stopped")
            return
        stopped = link.superlink if not link.superlink.running else link.gateway
        raise DeploymentError(
            f"the {stopped.name} exited with code {stopped.poll()}; see {stopped.log_path}: "
            f"{stopped.log_tail(3)}"
        )


@link_app.command("register")
@user_errors
def link_register(
    firm: Annotated[str, typer.Option(help="the firm's name (shown by `fedcrm link ls`)")],
    public_key: Annotated[Path, typer.Option(help="the firm's FIRM.pub (OpenSSH EC public key)")],
    config: Annotated[Path, typer.Option(help=COORDINATOR_HELP)] = Path("coordinator.toml"),
) -> None:
    """Allow a firm's SuperNode to connect (the SuperLink must be running)."""
    from fedcrm.coordinator.deploy_config import load_coordinator_config
    from fedcrm.coordinator.host import register_firm

    cfg = load_coordinator_config(config)
    node_id = register_firm(cfg, firm=firm, public_key=public_key)
    plain(out, f"registered {firm} as node {node_id}")


@link_app.command("ls")
@user_errors
def link_ls(
    config: Annotated[Path, typer.Option(help=COORDINATOR_HELP)] = Path("coordinator.toml"),
) -> None:
    """The registered firms: node id, firm name and status (online, offline, registered)."""
    from fedcrm.coordinator.deploy_config import load_coordinator_config
    from fedcrm.coordinator.host import list_firms

    nodes = list_firms(load_coordinator_config(config))
    if not nodes:
        out.print("no firm is registered; add one with `fedcrm link register`")
        return
    t = Table(title="registered firms")
    for col in ("firm", "node id", "status"):
        t.add_column(col)
    for node in sorted(nodes, key=lambda n: (n.name, n.node_id)):
        t.add_row(Text(node.name or "-"), str(node.node_id), node.status)
    out.print(t)


@link_app.command("unregister")
@user_errors
def link_unregister(
    firm: Annotated[str, typer.Option(help="the firm's name, as `fedcrm link ls` shows it")],
    config: Annotated[Path, typer.Option(help=COORDINATOR_HELP)] = Path("coordinator.toml"),
) -> None:
    """Remove a firm: its node key is refused from then on (a new key needs a new register)."""
    from fedcrm.coordinator.deploy_config import load_coordinator_config
    from fedcrm.coordinator.host import unregister_firm

    node_id = unregister_firm(load_coordinator_config(config), firm=firm)
    plain(out, f"unregistered {firm} (node {node_id}); its key is refused from now on")


# --------------------------------------------------------------------------- run


@user_errors
def run(
    config: Annotated[Path, typer.Option(help="the run config (TOML with a \\[run] section)")],
    coordinator: Annotated[Path, typer.Option(help=COORDINATOR_HELP)] = Path("coordinator.toml"),
    run_id: Annotated[str | None, typer.Option(help="run id (default: generated)")] = None,
    timeout: Annotated[
        float | None,
        typer.Option(callback=finite_positive,
                     help="seconds to wait for the run (default: from the config)"),
    ] = None,
    retries: Annotated[
        int, typer.Option(help="times to submit the run again after a SuperLink restart")
    ] = 3,
    resume: Annotated[
        bool, typer.Option(help="continue RUN_ID after this command or the coordinator stopped")
    ] = False,
) -> None:
    """Run the federated job of RUN.toml on the running federation; wait for the result."""
    from fedcrm.coordinator.deploy_config import load_coordinator_config, load_run_file
    from fedcrm.coordinator.host import require_running_link, submit_run
    from fedcrm.coordinator.live import RunDisplay, print_run_summary
    from fedcrm.coordinator.processes import DeploymentError
    from fedcrm.coordinator.run_attempts import Attempt
    from fedcrm.coordinator.runs import new_run_id
    from fedcrm.privacy.errors import ConfigError

    run_cfg = load_run_file(config)
    cfg = load_coordinator_config(coordinator)
    if resume and not run_id:
        raise ConfigError("--resume needs the --run-id of the run to continue")
    rid = run_id or new_run_id(config.stem.replace("_", "-"))
    run_dir = cfg.runs_dir / rid
    require_running_link(cfg)
    plain(out, f"run {rid}: {run_cfg.task.value}, {run_cfg.rounds} rounds, strategy "
               f"{run_cfg.aggregation}, ε {run_cfg.target_epsilon:g} per firm -> {run_dir}")

    def on_attempt(attempt: Attempt) -> None:
        if attempt.ended == "running":
            plain(err, f"submitted as Flower run {attempt.flower_run_id}")
        else:
            plain(err, f"Flower run {attempt.flower_run_id}: {attempt.ended}")

    with RunDisplay(run_dir / "events.jsonl", console=out, title=rid):
        outcome = submit_run(cfg, run_cfg, run_id=rid, timeout_s=timeout, retries=retries,
                             resume=resume, on_attempt=on_attempt)
    summary = outcome.summary
    if summary:
        print_run_summary(out, summary, outcome.run_dir)
    if not outcome.completed:
        if summary:
            ended = f"{summary.get('status')}: {summary.get('stop_reason') or 'no reason given'}"
        else:
            ended = f"{outcome.status.status_text} but the ServerApp wrote no summary.json"
        raise DeploymentError(
            f"run {rid} (Flower run {outcome.flower_run_id}, {len(outcome.attempts)} attempt(s)) "
            f"ended {ended}; see {outcome.log_path} and {cfg.superlink_dir / 'superlink.log'}"
        )
    plain(out, f"run {rid} completed; summary {outcome.summary_path}")


# --------------------------------------------------------------------------- runs

runs_app = typer.Typer(
    help="Past runs: the coordinator's (coordinator.toml) or those under runs/.",
    no_args_is_help=True,
)
ROOT_HELP = (
    "directory holding run directories (default: the runs of ./coordinator.toml if there is "
    "one, else ./runs)"
)


def _runs_root(root: Path | None, coordinator: Path | None) -> Path:
    """Where the runs are: --root, else the coordinator's runs folder, else ./runs."""
    if root is not None:
        return root
    from fedcrm.coordinator.deploy_config import load_coordinator_config

    if coordinator is not None or Path("coordinator.toml").exists():
        return load_coordinator_config(coordinator or Path("coordinator.toml")).runs_dir
    return Path("runs")


@runs_app.command("list")
@user_errors
def runs_list(
    root: Annotated[Path | None, typer.Option(help=ROOT_HELP)] = None,
    coordinator: Annotated[
        Path | None, typer.Option(help="list this coordinator's runs (its coordinator.toml)")
    ] = None,
) -> None:
    """One line per run: id, task, strategy, rounds, status, main metric."""
    from fedcrm.coordinator.runs import list_runs

    root = _runs_root(root, coordinator)
    runs = list_runs(root)
    if not runs:
        plain(out, f"no runs under {root}")
        return
    t = Table(title=Text(f"runs under {root}"))
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
        t.add_row(Text(str(r.get("run_id", "?"))), str(r.get("task", "-")),
                  str(r.get("strategy", "-")),
                  f"{r.get('rounds_completed', '?')}/{r.get('rounds', '?')}",
                  str(r.get("status", "")), str(len(r.get("firms", []))), metric)
    out.print(t)


@runs_app.command("show")
@user_errors
def runs_show(
    run_id: Annotated[str, typer.Argument(help="run id (or a unique prefix)")],
    root: Annotated[Path | None, typer.Option(help=ROOT_HELP)] = None,
    coordinator: Annotated[
        Path | None, typer.Option(help="a run of this coordinator (its coordinator.toml)")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the whole summary")] = False,
) -> None:
    """A past run's summary: firms' ε against budget, metrics, baseline, model and provenance."""
    from fedcrm.coordinator.runs import find_run, load_summary

    run_dir = find_run(_runs_root(root, coordinator), run_id)
    summary = load_summary(run_dir)
    if as_json:
        sys.stdout.write(json.dumps(summary, indent=2) + "\n")
        return
    from fedcrm.coordinator.live import print_run_summary
    from fedcrm.privacy.errors import ConfigError

    if "query" in summary or "overlap" in summary:  # an analytics query or an overlap count
        table = run_dir / "result.md"
        if not table.is_file():
            raise ConfigError(f"{table} not found; `fedcrm runs show {run_id} --json` prints "
                              "the result")
        out.print(table.read_text(encoding="utf-8"), markup=False, highlight=False)
        return
    try:
        print_run_summary(out, summary, run_dir)
    except (KeyError, TypeError, ValueError, AttributeError):
        raise ConfigError(f"{run_dir / 'summary.json'} is damaged (a field is missing or of the "
                          "wrong type); `fedcrm runs show --json` prints what it holds") from None


def register(app: typer.Typer) -> None:
    app.add_typer(certs_app, name="certs")
    app.add_typer(link_app, name="link")
    app.command("run")(run)
    app.add_typer(runs_app, name="runs")
