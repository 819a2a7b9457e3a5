"""A complete TLS-authenticated Flower deployment on this machine, for trials and CI.

:class:`LocalFederation` composes the real pieces a multi-host deployment uses
(``docs/deployment.md``), only all on 127.0.0.1:

1. a federation CA and a SuperLink certificate (:mod:`privacy.certs`),
2. the SuperLink on loopback with TLS and SuperNode authentication, and the Fleet gateway the
   firms dial (:func:`fedcrm.coordinator.flower_cli.start_link_service`),
3. one authentication key per firm, registered with the SuperLink,
4. one SuperNode and one ClientApp process per firm (started by the injected ``start_node``,
   normally :func:`clients.node.start_supernode`: ``coordinator`` never imports ``clients``),
5. a generated app bundle (:mod:`coordinator.app_bundle`) submitted with ``flwr run`` and
   followed to its end across SuperLink restarts (:mod:`coordinator.run_attempts`),

and stops every process when it leaves its ``with`` block, also on errors and KeyboardInterrupt.
:func:`deploy_local` runs one app on one such federation. Tests use the class to restart the
SuperLink or stop a firm in the middle of a run.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext, suppress
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from types import TracebackType
from typing import Protocol, Self

from fedcrm.coordinator.app_bundle import AppSpec, write_app_dir
from fedcrm.coordinator.events import watch_rounds
from fedcrm.coordinator.flower_cli import (
    FlowerConfigValue,
    LinkService,
    RunStatus,
    register_node,
    start_link_service,
    write_flwr_config,
)
from fedcrm.coordinator.processes import (
    SUPERNODE_CONNECTION_ERROR,
    DeploymentError,
    ProcessGroup,
)
from fedcrm.coordinator.run_attempts import DEFAULT_RETRIES, Attempt, run_to_end
from fedcrm.coordinator.run_config import RunConfig
from fedcrm.privacy.certs import (
    CaFiles,
    NodeKeyFiles,
    generate_ca,
    generate_node_auth_key,
    issue_server_cert,
)

CONNECTION = "fedcrm-local"
ROUNDS_KEY = "num-rounds"

NodeConfigValue = str | int | float | bool


class NodeProcesses(Protocol):
    """What the deployment needs of a started firm node (its SuperNode and ClientApp process)."""

    @property
    def running(self) -> bool: ...

    @property
    def log_path(self) -> Path: ...

    def poll(self) -> int | None: ...

    def read_log(self) -> str: ...

    def flower_exit_code(self) -> int | None: ...

    def stop(self) -> object: ...

    def pids(self) -> list[int]: ...


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
        clientapp: str = ...,
    ) -> NodeProcesses: ...


@dataclass(frozen=True)
class LocalFirm:
    """One firm's node in a local deployment.

    ``node_config`` carries the firm-local settings its ClientApp reads (store path, key
    directory ...). ``keys`` reuses an existing authentication key pair; without it one is
    generated under ``workdir/keys``. ``register=False`` starts the node without registering
    its key (it is then refused: only useful to demonstrate authentication).
    """

    firm: str
    node_config: Mapping[str, NodeConfigValue] = field(default_factory=dict)
    keys: NodeKeyFiles | None = None
    register: bool = True


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
    run_id: int  # the Flower run id of the last attempt
    status: RunStatus
    superlink_address: str  # the address the firms dialled (the Fleet gateway)
    node_ids: Mapping[str, int]
    workdir: Path
    logs: Mapping[str, Path]
    duration_s: float
    attempts: tuple[Attempt, ...] = ()

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
    nodes: Mapping[str, NodeProcesses],
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


class LocalFederation:
    """A coordinator and its firms on 127.0.0.1, up while the ``with`` block runs.

    ``workdir`` receives ``certs/`` (CA, server certificate), ``keys/`` (generated node keys),
    ``superlink/`` (state, logs, the ServerApp's working directory), ``nodes/<firm>/`` (each
    firm's SuperNode home and logs), ``cli/`` (the ``flwr`` CLI's own ``FLWR_HOME``) and
    ``app/`` (the bundle of the last run).
    """

    def __init__(
        self,
        *,
        firms: Sequence[LocalFirm],
        workdir: Path,
        start_node: NodeStarter,
        app: AppSpec | None = None,
        on_event: Callable[[DeployEvent], None] | None = None,
        extra_pythonpath: Sequence[Path] = (),
        node_online_timeout_s: float = 60.0,
    ) -> None:
        if not firms:
            raise DeploymentError("a deployment needs at least one firm")
        self.firms = list(firms)
        self.workdir = Path(workdir).resolve()
        self.start_node = start_node
        self.app = app or AppSpec()
        self.on_event = on_event
        self.extra_pythonpath = tuple(extra_pythonpath)
        self.node_online_timeout_s = node_online_timeout_s
        self.cli_home = self.workdir / "cli"
        self.group = ProcessGroup()
        self.node_ids: dict[str, int] = {}
        self.nodes: dict[str, NodeProcesses] = {}
        self.logs: dict[str, Path] = {}
        self._link: LinkService | None = None
        self._ca: CaFiles | None = None
        self.started = time.monotonic()

    def emit(self, kind: DeployEventKind, message: str, *, firm: str | None = None,
             round: int | None = None, total_rounds: int | None = None) -> None:
        if self.on_event is not None:
            self.on_event(DeployEvent(kind, message, firm=firm, round=round,
                                      total_rounds=total_rounds))

    @property
    def link(self) -> LinkService:
        if self._link is None:
            raise DeploymentError("the federation is not started")
        return self._link

    @property
    def ca(self) -> CaFiles:
        if self._ca is None:
            raise DeploymentError("the federation is not started")
        return self._ca

    # ------------------------------------------------------------------ lifecycle

    def __enter__(self) -> Self:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.group.__enter__()
        try:
            self._start()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        try:
            self.group.__exit__(exc_type, exc, tb)
        finally:
            self.emit(DeployEventKind.STOPPED, "all deployment processes stopped")

    def _start(self) -> None:
        self._ca = generate_ca(self.workdir / "certs", common_name="fedcrm local federation CA",
                               force=True)
        server_certs = issue_server_cert(self._ca, self.workdir / "certs", force=True)
        keys = _node_keys(self.firms, self.workdir / "keys")
        self.emit(DeployEventKind.CERTS_READY,
                  f"CA and server certificate in {self.workdir / 'certs'}")
        for stale in (self.workdir / "superlink").glob("state.db*"):  # a fresh registry
            stale.unlink()
        self._link = start_link_service(
            workdir=self.workdir / "superlink", certs=server_certs,
            extra_pythonpath=self.extra_pythonpath, group=self.group,
        )
        self.logs["superlink"] = self._link.superlink.log_path
        self.logs["fleet-gateway"] = self._link.gateway.log_path
        self.emit(DeployEventKind.SUPERLINK_STARTED,
                  f"SuperLink on {self._link.control_address} (TLS, Control API: loopback only); "
                  f"firms dial the Fleet gateway on {self._link.fleet_address}")
        write_flwr_config(self.cli_home, CONNECTION, self._link.control_address, self._ca.cert)
        registering = [f.firm for f in self.firms if f.register]
        with ThreadPoolExecutor(max_workers=4) as pool:  # one `flwr` CLI process each
            ids = pool.map(
                lambda name: register_node(
                    flwr_home=self.cli_home, connection_name=CONNECTION,
                    public_key_path=keys[name].public_key, name=name,
                ),
                registering,
            )
            for name, node_id in zip(registering, ids, strict=True):
                self.node_ids[name] = node_id
                self.emit(DeployEventKind.NODE_REGISTERED, f"registered {name} as node {node_id}",
                          firm=name)
        for firm in self.firms:
            self.nodes[firm.firm] = self.start_node(
                superlink_address=self._link.fleet_address,
                root_cert=self._ca.cert,
                auth_key=keys[firm.firm].private_key,
                node_config=firm.node_config,
                workdir=self.workdir / "nodes" / firm.firm,
                max_retries=None,  # ride out a SuperLink restart
                max_wait_time=None,
                name=f"supernode-{firm.firm}",
                extra_pythonpath=self.extra_pythonpath,
                group=self.group,
                clientapp=self.app.clientapp,
            )
            self.logs[f"supernode-{firm.firm}"] = self.nodes[firm.firm].log_path
            self.emit(DeployEventKind.NODE_STARTED, f"started the SuperNode of {firm.firm}",
                      firm=firm.firm)
        _wait_nodes_online(nodes=self.nodes, node_ids=self.node_ids,
                           timeout_s=self.node_online_timeout_s)
        self.emit(DeployEventKind.NODES_ONLINE, f"{len(self.node_ids)} SuperNodes online")

    # ------------------------------------------------------------------ faults (tests, drills)

    def restart_superlink(self) -> None:
        """Stop the SuperLink (and the ServerApp it runs) and start it again on its port."""
        self.link.restart_superlink(self.group)

    def stop_firm(self, firm: str) -> None:
        """Stop a firm's SuperNode and ClientApp process (a firm going away mid-run)."""
        self.nodes[firm].stop()

    def kill_firm(self, firm: str) -> None:
        """SIGKILL a firm's SuperNode and ClientApp process: no goodbye to the SuperLink."""
        for pid in self.nodes[firm].pids():
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    # ------------------------------------------------------------------ runs

    def run(
        self,
        *,
        run_config: Mapping[str, FlowerConfigValue],
        rounds: int,
        run_dir: Path | None = None,
        cfg: RunConfig | None = None,
        run_id: str = "",
        events: Path | None = None,
        timeout_s: float = 900.0,
        retries: int = DEFAULT_RETRIES,
    ) -> DeploymentResult:
        """Submit the app for ``rounds`` rounds and follow it to its end (across restarts).

        ``run_config`` must not hold secrets (it goes to every party); ``rounds`` is passed as
        ``num-rounds``. ``events``, the run's ``events.jsonl`` (fedcrm's ServerApp writes it), is
        followed for round progress. ``cfg`` (fedcrm's apps) lets a run that cannot finish end
        on record (summary and signed ``run_finished``) in ``run_dir``.
        """
        if rounds < 1:
            raise DeploymentError(f"rounds must be at least 1 (got {rounds})")
        app_dir = write_app_dir(self.workdir / "app", app=self.app,
                                run_config_defaults={**dict(run_config), ROUNDS_KEY: rounds})

        def on_round(n: int, total: int) -> None:
            self.emit(DeployEventKind.ROUND, f"round {n}/{total or rounds} trained", round=n,
                      total_rounds=total or rounds)

        def on_attempt(attempt: Attempt) -> None:
            if attempt.ended == "running":
                self.emit(DeployEventKind.RUN_STARTED,
                          f"run {attempt.flower_run_id} started ({rounds} rounds)")
            else:
                self.emit(DeployEventKind.RUN_FINISHED,
                          f"run {attempt.flower_run_id}: {attempt.ended}")

        with watch_rounds(events, on_round) if events is not None else nullcontext():
            outcome = run_to_end(
                cfg=cfg, run_id=run_id, run_dir=run_dir or self.workdir, app_dir=app_dir,
                flwr_home=self.cli_home, connection=CONNECTION,
                control_port=self.link.control_port, timeout_s=timeout_s, retries=retries,
                extra_pythonpath=self.extra_pythonpath, on_attempt=on_attempt,
            )
        self.logs["run"] = outcome.log_path
        return DeploymentResult(
            run_id=outcome.flower_run_id, status=outcome.status,
            superlink_address=self.link.fleet_address, node_ids=dict(self.node_ids),
            workdir=self.workdir, logs=dict(self.logs),
            duration_s=time.monotonic() - self.started, attempts=outcome.attempts,
        )


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
    cfg: RunConfig | None = None,
    run_dir: Path | None = None,
    run_id: str = "",
) -> DeploymentResult:
    """Run ``app`` for ``rounds`` rounds on a fresh local federation; see :class:`LocalFederation`.

    Every process is stopped before this returns or raises.
    """
    if rounds < 1:
        raise DeploymentError(f"rounds must be at least 1 (got {rounds})")
    with LocalFederation(
        firms=firms, workdir=workdir, start_node=start_node, app=app, on_event=on_event,
        extra_pythonpath=extra_pythonpath, node_online_timeout_s=node_online_timeout_s,
    ) as federation:
        return federation.run(
            run_config=run_config, rounds=rounds, run_dir=run_dir, cfg=cfg, run_id=run_id,
            events=events, timeout_s=run_timeout_s,
        )
