"""What the coordinator's host runs for a long-lived federation (``coordinator.toml``).

* :func:`start_link` - the SuperLink with TLS, SuperNode authentication and a persistent
  database, plus the ``flwr`` CLI connection the other commands use;
* :func:`register_firm` - admit a firm's SuperNode public key;
* :func:`submit_run` - write the app bundle for one run (run config defaults from
  :meth:`RunConfig.to_flower`: no secret, no firm path), submit it with ``flwr run``, follow its
  log to the end and report where the ServerApp wrote ``summary.json``.

All three are what ``fedcrm link start|register`` and ``fedcrm run`` call; the CLI only renders.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fedcrm.coordinator.app_bundle import write_app_dir
from fedcrm.coordinator.deploy_config import CoordinatorConfig
from fedcrm.coordinator.events import EVENTS, watch_rounds
from fedcrm.coordinator.flower_cli import (
    RunStatus,
    follow_run,
    register_node,
    run_app,
    start_superlink,
    write_flwr_config,
)
from fedcrm.coordinator.local_deployment import AppSpec
from fedcrm.coordinator.overlap_run import OverlapRunConfig
from fedcrm.coordinator.processes import DeploymentError, ManagedProcess, ProcessGroup, port_open
from fedcrm.coordinator.query_run import QueryRunConfig
from fedcrm.coordinator.run_config import RunConfig
from fedcrm.coordinator.runs import SUMMARY
from fedcrm.privacy.certs import ServerCertFiles
from fedcrm.privacy.errors import ConfigError, KeyFileError
from fedcrm.privacy.keys import ENV_COORDINATOR_KEY as COORDINATOR_KEY_ENV
from fedcrm.privacy.keys import write_signing_key

CONNECTION = "fedcrm"
APP_DIR = "app"
_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")


@dataclass(frozen=True)
class RunOutcome:
    """How a submitted run ended and where its results are."""

    run_id: str
    flower_run_id: int
    status: RunStatus
    run_dir: Path
    log_path: Path

    @property
    def summary_path(self) -> Path:
        return self.run_dir / SUMMARY

    @property
    def completed(self) -> bool:
        return self.status.completed


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


def connect_cli(cfg: CoordinatorConfig) -> Path:
    """Point the coordinator's ``flwr`` CLI home at its SuperLink; return that ``FLWR_HOME``."""
    if not cfg.ca_cert.exists():
        raise KeyFileError(f"{cfg.ca_cert} not found; create the CA with `fedcrm certs ca`")
    write_flwr_config(cfg.cli_home, CONNECTION, cfg.local_address, cfg.ca_cert)
    return cfg.cli_home


def require_running_link(cfg: CoordinatorConfig) -> None:
    """Fail with the command to run when no SuperLink answers on the configured port."""
    host, _, port = cfg.local_address.rpartition(":")
    if not port_open(int(port), host.strip("[]")):
        raise DeploymentError(
            f"no SuperLink answers on {cfg.local_address}; start it with "
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


def start_link(cfg: CoordinatorConfig, *, group: ProcessGroup) -> ManagedProcess:
    """Start the federation's SuperLink (TLS, node authentication, persistent registrations)."""
    certs = server_cert_files(cfg)
    host, _, port = cfg.local_address.rpartition(":")
    if port_open(int(port), host.strip("[]")):
        raise DeploymentError(
            f"port {cfg.link.port} is already in use: is a SuperLink already running? Stop it or "
            f"change [link] port in {cfg.config_path}"
        )
    cfg.database.parent.mkdir(parents=True, exist_ok=True)
    use_coordinator_key(cfg.signing_key)
    link = start_superlink(
        workdir=cfg.superlink_dir, certs=certs, database=cfg.database, port=cfg.link.port,
        host=cfg.link.host, group=group,
    )
    connect_cli(cfg)
    return link


def register_firm(cfg: CoordinatorConfig, *, firm: str, public_key: Path) -> int:
    """Register a firm's SuperNode public key with the running SuperLink; return its node id."""
    require_running_link(cfg)
    return register_node(
        flwr_home=connect_cli(cfg), connection_name=CONNECTION, public_key_path=public_key,
        name=firm,
    )


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
    on_round: Callable[[int, int], None] | None = None,
    app: AppSpec | None = None,
) -> RunOutcome:
    """Run ``run`` on the federation and wait for it to finish.

    The app bundle is written to ``<workdir>/runs/<run_id>/app`` with the whole run config as
    its defaults (``RunConfig.to_flower``: plain values, no secret, no firm path); the
    ServerApp writes ``summary.json``, the model and ``events.jsonl`` next to it. ``on_round``
    receives ``(round, total)`` for each round ``events.jsonl`` reports trained.
    """
    if not _RUN_ID.match(run_id):
        raise ConfigError(
            f"run id {run_id!r} must start with a letter or digit and use only letters, digits, "
            "'.', '_' or '-'"
        )
    require_running_link(cfg)
    run_dir = cfg.runs_dir / run_id
    if run_dir.exists():
        raise ConfigError(f"{run_dir} already exists; choose another --run-id")
    run_dir.mkdir(parents=True)
    app = app or AppSpec()
    app_dir = write_app_dir(
        run_dir / APP_DIR, serverapp=app.serverapp, clientapp=app.clientapp, name=app.name,
        run_config_defaults=run.to_flower(run_id=run_id, run_dir=run_dir),
    )
    cli_home = connect_cli(cfg)
    flower_run_id = run_app(app_dir=app_dir, flwr_home=cli_home, connection=CONNECTION)
    log_path = run_dir / "flower.log"
    with watch_rounds(run_dir / EVENTS, on_round or (lambda _round, _total: None)):
        status = follow_run(
            flwr_home=cli_home, connection=CONNECTION, run_id=flower_run_id,
            timeout_s=default_run_timeout(run) if timeout_s is None else timeout_s,
            log_path=log_path,
        )
    return RunOutcome(
        run_id=run_id, flower_run_id=flower_run_id, status=status, run_dir=run_dir,
        log_path=log_path,
    )
