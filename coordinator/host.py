"""What the coordinator's host runs for a long-lived federation (``coordinator.toml``).

* :func:`start_link` - the SuperLink on 127.0.0.1 (TLS, SuperNode authentication, a persistent
  database) and the Fleet gateway on the interface the firms dial, plus the ``flwr`` CLI
  connection the other commands use;
* :func:`register_firm` / :func:`unregister_firm` / :func:`list_firms` - the firms' node keys;
* :func:`submit_run` - write the app bundle for one run (run config defaults from
  :meth:`RunConfig.to_flower`: no secret, no firm path; the fedcrm release it needs), submit it
  and follow it to its end across SuperLink restarts (:mod:`coordinator.run_attempts`).

All of them are what ``fedcrm link ...`` and ``fedcrm run`` call; the CLI only renders.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path

from fedcrm.coordinator.app_bundle import AppSpec, write_app_dir
from fedcrm.coordinator.deploy_config import CoordinatorConfig
from fedcrm.coordinator.events import EVENTS, watch_rounds
from fedcrm.coordinator.flower_cli import (
    LinkService,
    NodeRecord,
    list_nodes,
    register_node,
    start_link_service,
    unregister_node,
    write_flwr_config,
)
from fedcrm.coordinator.overlap_run import OverlapRunConfig
from fedcrm.coordinator.processes import DeploymentError, ProcessGroup, port_open
from fedcrm.coordinator.query_run import QueryRunConfig
from fedcrm.coordinator.run_attempts import (
    ATTEMPTS,
    DEFAULT_RETRIES,
    Attempt,
    RunOutcome,
    run_to_end,
)
from fedcrm.coordinator.run_config import RunConfig
from fedcrm.privacy.certs import CA_KEY, ServerCertFiles, certificate_hosts
from fedcrm.privacy.durable import write_private
from fedcrm.privacy.errors import ConfigError, KeyFileError
from fedcrm.privacy.keys import ENV_COORDINATOR_KEY as COORDINATOR_KEY_ENV
from fedcrm.privacy.keys import check_firm_name, write_signing_key

CONNECTION = "fedcrm"
APP_DIR = "app"
#: The firms' names and node ids, as registered here (``<workdir>/firms.json``, 0600).
FIRMS_FILE = "firms.json"
_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
_LOOPBACK = ("127.0.0.1", "localhost", "::1")


def server_cert_files(cfg: CoordinatorConfig) -> ServerCertFiles:
    """The SuperLink's TLS files from ``[link] certs_dir``, each checked to exist."""
    for path, command in (
        (cfg.ca_cert, "fedcrm certs ca"),
        (cfg.server_cert, "fedcrm certs server"),
        (cfg.server_key, "fedcrm certs server"),
    ):
        if not path.exists():
            raise KeyFileError(
                f"{path} not found (certs_dir in {cfg.config_path}); create it with `{command} "
                f"--out {cfg.link.certs_dir}`"
            )
    return ServerCertFiles(
        ca_cert=cfg.ca_cert, cert=cfg.server_cert, key=cfg.server_key, hosts=()
    )


def link_warnings(cfg: CoordinatorConfig) -> list[str]:
    """What the coordinator should fix before firms rely on this SuperLink."""
    warnings = []
    if (cfg.link.certs_dir / CA_KEY).exists():
        warnings.append(
            f"{cfg.link.certs_dir / CA_KEY} sits next to the SuperLink's files: move it offline "
            "(it is needed only to issue server.crt); the SuperLink reads ca.crt, server.crt and "
            "server.key"
        )
    return warnings


def dial_addresses(cfg: CoordinatorConfig) -> list[str]:
    """The addresses firms may dial: each name in server.crt at the gateway's port.

    On a wildcard bind (``0.0.0.0``) that is every non-loopback name in the certificate; on a
    specific interface, that interface. Loopback names are for a one-machine trial only.
    """
    port = cfg.link.port
    if cfg.link.host not in ("0.0.0.0", "::", ""):
        return [f"{cfg.link.host}:{port}"]
    hosts = [h for h in certificate_hosts(cfg.server_cert) if h not in _LOOPBACK]
    return [f"[{h}]:{port}" if ":" in h else f"{h}:{port}" for h in hosts] or [
        f"127.0.0.1:{port}"
    ]


def connect_cli(cfg: CoordinatorConfig) -> Path:
    """Point the coordinator's ``flwr`` CLI home at its SuperLink; return that ``FLWR_HOME``."""
    if not cfg.ca_cert.exists():
        raise KeyFileError(f"{cfg.ca_cert} not found; create the CA with `fedcrm certs ca`")
    write_flwr_config(cfg.cli_home, CONNECTION, cfg.control_address, cfg.ca_cert)
    return cfg.cli_home


def require_running_link(cfg: CoordinatorConfig) -> None:
    """Fail with the command to run when no SuperLink answers on its loopback port."""
    if not port_open(cfg.link.control_port):
        raise DeploymentError(
            f"no SuperLink answers on {cfg.control_address}; start it with "
            f"`fedcrm link start --config {cfg.config_path}`"
        )


def use_coordinator_key(path: Path) -> Path:
    """Create (once) the coordinator's signing key and hand its path to the ServerApp.

    The SuperLink inherits this process's environment and passes it to the ServerApp process,
    which signs the federation log with it (``server.coordinator.COORDINATOR_KEY_ENV``). Only the
    path travels, in an environment variable, never in the run config or the app bundle.
    """
    if not path.exists():
        write_signing_key(path)
    os.environ[COORDINATOR_KEY_ENV] = str(path.resolve())
    return path


def start_link(cfg: CoordinatorConfig, *, group: ProcessGroup) -> LinkService:
    """Start the SuperLink (loopback) and the Fleet gateway (the firms' one port)."""
    certs = server_cert_files(cfg)
    for port, key in ((cfg.link.control_port, "control_port"), (cfg.link.port, "port")):
        if port_open(port):
            # a key name in brackets would read as markup in a terminal: name it plainly
            raise DeploymentError(
                f"port {port} is already in use: is a SuperLink already running? Stop it or "
                f"change {key} in the link section of {cfg.config_path}"
            )
    cfg.database.parent.mkdir(parents=True, exist_ok=True)
    use_coordinator_key(cfg.signing_key)
    link = start_link_service(
        workdir=cfg.superlink_dir, certs=certs, database=cfg.database,
        control_port=cfg.link.control_port, fleet_host=cfg.link.host, fleet_port=cfg.link.port,
        group=group,
    )
    connect_cli(cfg)
    return link


def _registry(cfg: CoordinatorConfig) -> dict[str, int]:
    """Firm name -> node id, as ``fedcrm link register`` recorded them (Flower keeps no names)."""
    path = cfg.workdir / FIRMS_FILE
    if not path.exists():
        return {}
    return {str(k): int(v) for k, v in json.loads(path.read_text()).items()}


def _save_registry(cfg: CoordinatorConfig, firms: dict[str, int]) -> None:
    write_private(cfg.workdir / FIRMS_FILE, json.dumps(firms, indent=2, sort_keys=True).encode())


def register_firm(cfg: CoordinatorConfig, *, firm: str, public_key: Path) -> int:
    """Register a firm's SuperNode public key with the running SuperLink; return its node id."""
    require_running_link(cfg)
    check_firm_name(firm)
    registry = _registry(cfg)
    live = {n.node_id for n in list_firms(cfg) if n.status != "unregistered"}
    if registry.get(firm) in live:
        raise ConfigError(
            f"firm {firm} is already registered as node {registry[firm]}; unregister it first "
            f"(`fedcrm link unregister --firm {firm}`) to register a new key"
        )
    node_id = register_node(
        flwr_home=connect_cli(cfg), connection_name=CONNECTION, public_key_path=public_key,
        name=firm,
    )
    _save_registry(cfg, {**registry, firm: node_id})
    return node_id


def list_firms(cfg: CoordinatorConfig) -> list[NodeRecord]:
    """Every SuperNode the SuperLink knows, with the firm name it was registered under."""
    require_running_link(cfg)
    names = {node_id: firm for firm, node_id in _registry(cfg).items()}
    return [
        replace(n, name=names.get(n.node_id, n.name))
        for n in list_nodes(flwr_home=connect_cli(cfg), connection=CONNECTION)
    ]


def unregister_firm(cfg: CoordinatorConfig, *, firm: str) -> int:
    """Unregister a firm's node (found by name); its key is refused from then on."""
    matches = [n for n in list_firms(cfg) if n.name == firm and n.status != "unregistered"]
    if not matches:
        raise ConfigError(f"no registered firm named {firm}; see `fedcrm link ls`")
    for node in matches:
        unregister_node(flwr_home=cfg.cli_home, connection_name=CONNECTION, node_id=node.node_id)
    _save_registry(cfg, {k: v for k, v in _registry(cfg).items() if k != firm})
    return matches[0].node_id


def default_run_timeout(run: RunConfig | QueryRunConfig | OverlapRunConfig) -> float:
    """Seconds to wait for a run: waiting for firms, describe, train + evaluate per round (a
    query: waiting for firms, offer and answer; an overlap: offer, blind and reblind)."""
    if isinstance(run, OverlapRunConfig):
        return run.coordinator.wait_for_firms + 3 * run.coordinator.timeout + 300.0
    if isinstance(run, QueryRunConfig):
        c = run.coordinator
        return c.wait_for_firms + 2 * c.timeout + 300.0
    return run.wait_for_firms + run.round_timeout * (1 + 2 * run.rounds) + 300.0


def submit_run(
    cfg: CoordinatorConfig,
    run: RunConfig | QueryRunConfig | OverlapRunConfig,
    *,
    run_id: str,
    timeout_s: float | None = None,
    retries: int = DEFAULT_RETRIES,
    resume: bool = False,
    on_round: Callable[[int, int], None] | None = None,
    on_attempt: Callable[[Attempt], None] | None = None,
    app: AppSpec | None = None,
) -> RunOutcome:
    """Run ``run`` on the federation and follow it to its end.

    The app bundle is written to ``<workdir>/runs/<run_id>/app`` with the whole run config as
    its defaults (``RunConfig.to_flower``: plain values, no secret, no firm path); the
    ServerApp writes ``summary.json``, the model, ``events.jsonl`` and a checkpoint per round
    next to it. If the SuperLink restarts, the run is submitted again (up to ``retries`` times)
    and resumes after its last completed round. ``resume=True`` continues a run whose
    ``fedcrm run`` process stopped (the coordinator restarted): it follows the Flower run if it
    is still going, or submits the run again. ``on_round`` receives ``(round, total)`` for each
    round ``events.jsonl`` reports trained.
    """
    if not _RUN_ID.match(run_id):
        raise ConfigError(
            f"run id {run_id!r} must start with a letter or digit and use only letters, digits, "
            "'.', '_' or '-'"
        )
    require_running_link(cfg)
    run_dir = cfg.runs_dir / run_id
    if resume and not (run_dir / ATTEMPTS).exists():
        raise ConfigError(f"{run_dir} holds no run to resume; start it without --resume")
    if not resume and run_dir.exists():
        raise ConfigError(
            f"{run_dir} already exists; choose another --run-id, or add --resume to continue it"
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    app_dir = write_app_dir(
        run_dir / APP_DIR, app=app or AppSpec(),
        run_config_defaults=run.to_flower(run_id=run_id, run_dir=run_dir),
    )
    use_coordinator_key(cfg.signing_key)
    watching = (
        watch_rounds(run_dir / EVENTS, on_round) if on_round is not None else nullcontext()
    )
    with watching:
        return run_to_end(
            cfg=run if isinstance(run, RunConfig) else None, run_id=run_id, run_dir=run_dir,
            app_dir=app_dir,
            flwr_home=connect_cli(cfg), connection=CONNECTION,
            control_port=cfg.link.control_port,
            timeout_s=default_run_timeout(run) if timeout_s is None else timeout_s,
            retries=retries, on_attempt=on_attempt,
        )
