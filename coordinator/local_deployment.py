"""A complete TLS-authenticated Flower deployment on this machine, for trials and CI.

:func:`deploy_local` composes the real pieces a multi-host deployment uses
(``docs/deployment.md``), only all on 127.0.0.1:

1. a federation CA and a SuperLink certificate (:mod:`privacy.certs`),
2. ``flower-superlink`` with TLS and SuperNode authentication (:mod:`server.link`),
3. one authentication key per firm, registered with the SuperLink,
4. one ``flower-supernode`` per firm (started by the injected ``start_node``, normally
   :func:`clients.node.start_supernode`: ``server`` never imports ``clients``),
5. a generated app directory (:mod:`server.app_bundle`) submitted with ``flwr run``,
6. the run's log followed until it finishes,

and stops every process in a ``finally`` block, also on errors and KeyboardInterrupt.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Protocol

from fedcrm.coordinator.app_bundle import write_app_dir
from fedcrm.coordinator.events import watch_rounds
from fedcrm.coordinator.flower_cli import (
    FlowerConfigValue,
    RunStatus,
    follow_run,
    register_node,
    run_app,
    start_superlink,
    write_flwr_config,
)
from fedcrm.coordinator.processes import (
    SUPERNODE_CONNECTION_ERROR,
    DeploymentError,
    ManagedProcess,
    ProcessGroup,
)
from fedcrm.privacy.certs import (
    NodeKeyFiles,
    generate_ca,
    generate_node_auth_key,
    issue_server_cert,
)

CONNECTION = "fedcrm-local"
ROUNDS_KEY = "num-rounds"

NodeConfigValue = str | int | float | bool


class NodeStarter(Protocol):
    """Signature of :func:`clients.node.start_supernode` (injected to keep layers apart)."""

    def __call__(
        self,
        *,
        superlink_address: str,
        root_cert: Path,
        auth_key: Path,
        node_config: Mapping[str, NodeConfigValue],
        workdir: Path,
        max_retries: int | None = ...,
        max_wait_time: float | None = ...,
        name: str = ...,
        runtime_port: int | None = ...,
        extra_pythonpath: Sequence[Path] = ...,
        group: ProcessGroup | None = ...,
    ) -> ManagedProcess: ...


@dataclass(frozen=True)
class LocalFirm:
    """One firm's SuperNode in a local deployment.

    ``node_config`` carries the firm-local settings its ClientApp reads (store path, key
    directory ...). ``keys`` reuses an existing authentication key pair; without it one is
    generated under ``workdir/keys``. ``register=False`` starts the node without registering
    its key (it is then refused: only useful to demonstrate authentication).
    """

    firm: str
    node_config: Mapping[str, NodeConfigValue] = field(default_factory=dict)
    keys: NodeKeyFiles | None = None
    register: bool = True


@dataclass(frozen=True)
class AppSpec:
    """Which ServerApp / ClientApp the deployment runs (``module:attribute`` references)."""

    serverapp: str = "fedcrm.server.server_app:app"
    clientapp: str = "fedcrm.clients.client_app:app"
    name: str = "fedcrm-federation"


class DeployEventKind(StrEnum):
    CERTS_READY = "certs-ready"
    SUPERLINK_STARTED = "superlink-started"
    NODE_REGISTERED = "node-registered"
    NODE_STARTED = "node-started"
    NODES_ONLINE = "nodes-online"
    RUN_STARTED = "run-started"
    ROUND = "round"
    RUN_FINISHED = "run-finished"
    STOPPED = "stopped"


@dataclass(frozen=True)
class DeployEvent:
    kind: DeployEventKind
    message: str
    firm: str | None = None
    round: int | None = None
    total_rounds: int | None = None


@dataclass(frozen=True)
class DeploymentResult:
    run_id: int
    status: RunStatus
    superlink_address: str
    node_ids: Mapping[str, int]
    workdir: Path
    logs: Mapping[str, Path]
    duration_s: float

    @property
    def completed(self) -> bool:
        return self.status.completed


def _node_keys(firms: Sequence[LocalFirm], keys_dir: Path) -> dict[str, NodeKeyFiles]:
    names = [f.firm for f in firms]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise DeploymentError(f"firm names must be unique; repeated: {duplicates}")
    # keys generated here belong to this throw-away deployment: replace them on a re-run
    return {
        f.firm: f.keys
        if f.keys is not None
        else generate_node_auth_key(keys_dir, firm=f.firm, force=True)
        for f in firms
    }


def _wait_nodes_online(
    *,
    nodes: Mapping[str, ManagedProcess],
    node_ids: Mapping[str, int],
    timeout_s: float,
) -> None:
    """Wait until every registered node has been accepted; fail fast if a node exits.

    A SuperNode logs ``SuperNode ID: <id>`` once the SuperLink has authenticated and activated
    it, so its log is the cheap readiness signal (``flwr supernode ls`` costs a CLI start).
    """
    deadline = time.monotonic() + timeout_s
    waiting = dict(node_ids)
    while True:
        for firm, process in nodes.items():
            if process.poll() is not None:
                code = process.flower_exit_code()
                hint = ""
                if code == SUPERNODE_CONNECTION_ERROR:
                    hint = (
                        " (connection refused: is its public key registered, and is the "
                        "SuperLink reachable with this CA?)"
                    )
                raise DeploymentError(
                    f"SuperNode of firm '{firm}' exited (Flower exit code {code}){hint}; "
                    f"see {process.log_path}"
                )
        for firm, node_id in list(waiting.items()):
            if f"SuperNode ID: {node_id}" in nodes[firm].read_log():
                del waiting[firm]
        if not waiting:
            return
        if time.monotonic() > deadline:
            raise DeploymentError(
                f"SuperNodes of {sorted(waiting)} did not come online within {timeout_s:.0f}s; "
                "see their logs under the deployment's nodes/ directory"
            )
        time.sleep(0.5)


def deploy_local(
    *,
    firms: Sequence[LocalFirm],
    workdir: Path,
    rounds: int,
    run_config: Mapping[str, FlowerConfigValue],
    start_node: NodeStarter,
    app: AppSpec | None = None,
    on_event: Callable[[DeployEvent], None] | None = None,
    extra_pythonpath: Sequence[Path] = (),
    run_timeout_s: float = 900.0,
    node_online_timeout_s: float = 60.0,
    events: Path | None = None,
) -> DeploymentResult:
    """Run ``app`` for ``rounds`` rounds on a local TLS + node-auth Flower deployment.

    ``workdir`` receives ``certs/`` (CA, server certificate), ``keys/`` (generated node keys),
    ``superlink/`` (state, log, the ServerApp's working directory), ``nodes/<firm>/`` (each
    SuperNode's home and log), ``cli/`` (the ``flwr`` CLI's own ``FLWR_HOME``) and ``app/``.
    ``run_config`` must not hold secrets (it goes to every party); ``rounds`` is passed as
    ``num-rounds``. ``events``, the run's ``events.jsonl`` (fedcrm's ServerApp writes it), is
    followed for round progress. Every process is stopped before this returns or raises.
    """
    if rounds < 1:
        raise DeploymentError(f"rounds must be at least 1 (got {rounds})")
    if not firms:
        raise DeploymentError("a deployment needs at least one firm")
    app = app or AppSpec()
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()

    def emit(
        kind: DeployEventKind,
        message: str,
        *,
        firm: str | None = None,
        round: int | None = None,
        total_rounds: int | None = None,
    ) -> None:
        if on_event is not None:
            on_event(DeployEvent(kind, message, firm=firm, round=round, total_rounds=total_rounds))

    ca = generate_ca(workdir / "certs", common_name="fedcrm local federation CA", force=True)
    server_certs = issue_server_cert(ca, workdir / "certs", force=True)
    keys = _node_keys(firms, workdir / "keys")
    emit(DeployEventKind.CERTS_READY, f"CA and server certificate in {workdir / 'certs'}")

    config = {**dict(run_config), ROUNDS_KEY: rounds}
    app_dir = write_app_dir(
        workdir / "app", serverapp=app.serverapp, clientapp=app.clientapp, name=app.name,
        run_config_defaults=config,
    )
    cli_home = workdir / "cli"
    for stale in (workdir / "superlink").glob("state.db*"):  # a re-run starts a fresh registry
        stale.unlink()
    logs: dict[str, Path] = {}
    node_ids: dict[str, int] = {}

    with ProcessGroup() as group:
        try:
            link = start_superlink(
                workdir=workdir / "superlink", certs=server_certs,
                extra_pythonpath=extra_pythonpath, group=group,
            )
            logs["superlink"] = link.log_path
            emit(DeployEventKind.SUPERLINK_STARTED, f"SuperLink listening on {link.address} (TLS)")
            write_flwr_config(cli_home, CONNECTION, link.address, ca.cert)

            for firm in firms:
                if firm.register:
                    node_ids[firm.firm] = register_node(
                        flwr_home=cli_home, connection_name=CONNECTION,
                        public_key_path=keys[firm.firm].public_key, name=firm.firm,
                    )
                    emit(DeployEventKind.NODE_REGISTERED,
                         f"registered {firm.firm} as node {node_ids[firm.firm]}", firm=firm.firm)

            nodes: dict[str, ManagedProcess] = {}
            for firm in firms:
                nodes[firm.firm] = start_node(
                    superlink_address=link.address,
                    root_cert=ca.cert,
                    auth_key=keys[firm.firm].private_key,
                    node_config=firm.node_config,
                    workdir=workdir / "nodes" / firm.firm,
                    max_retries=5,
                    max_wait_time=node_online_timeout_s,
                    name=f"supernode-{firm.firm}",
                    extra_pythonpath=extra_pythonpath,
                    group=group,
                )
                logs[f"supernode-{firm.firm}"] = nodes[firm.firm].log_path
                emit(DeployEventKind.NODE_STARTED, f"started the SuperNode of {firm.firm}",
                     firm=firm.firm)
            _wait_nodes_online(nodes=nodes, node_ids=node_ids, timeout_s=node_online_timeout_s)
            emit(DeployEventKind.NODES_ONLINE, f"{len(node_ids)} SuperNodes online")

            run_id = run_app(app_dir=app_dir, flwr_home=cli_home, connection=CONNECTION,
                             extra_pythonpath=extra_pythonpath)
            emit(DeployEventKind.RUN_STARTED, f"run {run_id} started ({rounds} rounds)")

            def on_round(n: int, total: int) -> None:
                emit(DeployEventKind.ROUND, f"round {n}/{total or rounds} trained", round=n,
                     total_rounds=total or rounds)

            with contextlib.ExitStack() as watching:
                if events is not None:
                    watching.enter_context(watch_rounds(events, on_round))
                status = follow_run(
                    flwr_home=cli_home, connection=CONNECTION, run_id=run_id,
                    timeout_s=run_timeout_s, log_path=workdir / f"run-{run_id}.log",
                )
            logs["run"] = workdir / f"run-{run_id}.log"
            emit(DeployEventKind.RUN_FINISHED, f"run {run_id}: {status.status_text}")
            return DeploymentResult(
                run_id=run_id, status=status, superlink_address=link.address,
                node_ids=dict(node_ids), workdir=workdir, logs=dict(logs),
                duration_s=time.monotonic() - started,
            )
        finally:
            group.stop_all()
            emit(DeployEventKind.STOPPED, "all deployment processes stopped")
