"""The coordinator's side of a real Flower deployment: SuperLink, node registry, runs.

Everything goes through Flower's own executables (``flower-superlink`` and the ``flwr`` CLI)
started with :mod:`fedcrm.processes`, each with its own ``FLWR_HOME``:

* :func:`start_link_service` - the SuperLink on 127.0.0.1 (its one HTTPS port serves the Fleet,
  Control and Runtime APIs) with TLS from :mod:`privacy.certs`, SuperNode authentication on (only
  registered public keys may connect), no runtime ``uv sync`` (offline); and in front of it the
  Fleet gateway (:mod:`fedcrm.coordinator.fleet_gateway`) on the interface the firms dial, which
  forwards the Fleet API only: the Control API stays the coordinator's;
* :func:`write_flwr_config` - the ``[superlink.NAME]`` connection the ``flwr`` CLI reads;
* :func:`register_node` / :func:`unregister_node` / :func:`node_statuses` - the node registry
  (``flwr supernode register|unregister|ls``) for firms' OpenSSH public keys;
* :func:`run_app` / :func:`follow_run` / :func:`run_status` - submit a Flower app, stream its
  log until it finishes, read its final status.
"""

from __future__ import annotations

import json
import os
import selectors
import sys
import time
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

import tomli_w

from fedcrm.coordinator.processes import (
    LOCALHOST,
    DeploymentError,
    ManagedProcess,
    ProcessGroup,
    find_executable,
    flower_env,
    free_port,
    port_open,
    run_command,
)
from fedcrm.privacy.certs import ServerCertFiles, load_node_public_key
from fedcrm.privacy.durable import write_atomic

FLWR_CONFIG_FILE = "config.toml"
CLI_TIMEOUT_S = 120.0

#: A value of a Flower run config (``flwr.app.UserConfigValue``, spelled out here because only the
#: Flower adapters import flwr; ``tests/test_deploy.py`` checks the two agree).
FlowerConfigValue = bool | float | int | str
FlowerRunConfig = Mapping[str, FlowerConfigValue]


class RunState(StrEnum):
    """Final state of a Flower run as ``flwr ls`` reports it (``finished:<state>``)."""

    COMPLETED = "completed"
    FAILED = "failed"
    STOPPED = "stopped"
    UNFINISHED = "unfinished"  # still pending/starting/running when we stopped waiting


@dataclass(frozen=True)
class RunStatus:
    run_id: int
    status_text: str  # e.g. "finished:completed", "running"
    details: str = ""

    @property
    def state(self) -> RunState:
        status, _, sub = self.status_text.partition(":")
        if status != "finished":
            return RunState.UNFINISHED
        try:
            return RunState(sub)
        except ValueError:
            return RunState.FAILED

    @property
    def completed(self) -> bool:
        return self.state is RunState.COMPLETED


def superlink_command(
    *,
    certs: ServerCertFiles,
    database: Path,
    host: str,
    port: int,
    log_file: Path | None = None,
) -> list[str]:
    """The ``flower-superlink`` argv for a TLS, node-authenticating, offline SuperLink."""
    argv = [
        str(find_executable("flower-superlink")),
        "--ssl-ca-certfile", str(Path(certs.ca_cert).resolve()),
        "--ssl-certfile", str(Path(certs.cert).resolve()),
        "--ssl-keyfile", str(Path(certs.key).resolve()),
        "--enable-supernode-auth",
        "--disable-runtime-dependency-installation",
        "--database", str(Path(database).resolve()),
        "--host", host,
        "--port", str(port),
    ]
    if log_file is not None:
        argv += ["--log-file", str(Path(log_file).resolve())]
    return argv


def start_superlink(
    *,
    workdir: Path,
    certs: ServerCertFiles,
    database: Path | None = None,
    port: int | None = None,
    host: str = LOCALHOST,
    extra_pythonpath: Sequence[Path] = (),
    group: ProcessGroup | None = None,
    startup_timeout_s: float = 60.0,
) -> ManagedProcess:
    """Start ``flower-superlink`` and wait until its HTTPS port accepts connections.

    ``workdir`` holds its ``FLWR_HOME`` (``workdir/flwr-home``), log (``workdir/superlink.log``)
    and default database (``workdir/state.db``); the ServerApp runs with ``workdir`` as its
    working directory. Registrations persist in ``database`` across restarts. ``host`` is
    127.0.0.1 by default; bind another interface only on a coordinator host whose certificate
    carries that name. ``extra_pythonpath`` lets the ServerApp import app modules.
    """
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port(LOCALHOST if host in ("0.0.0.0", "::") else host) if port is None else port
    database = workdir / "state.db" if database is None else Path(database)
    flwr_home = workdir / "flwr-home"
    flwr_home.mkdir(parents=True, exist_ok=True)
    process = ManagedProcess(
        name="superlink",
        argv=superlink_command(certs=certs, database=database, host=host, port=port),
        env=flower_env(flwr_home=flwr_home, extra_pythonpath=extra_pythonpath),
        log_path=workdir / "superlink.log",
        cwd=workdir,
        port=port,
        host=LOCALHOST if host in ("0.0.0.0", "::") else host,
    )
    return _launched(process, group, startup_timeout_s)


def _launched(process: ManagedProcess, group: ProcessGroup | None,
              startup_timeout_s: float) -> ManagedProcess:
    """Start ``process`` (in ``group`` when given) and wait for its port; stopped on failure."""
    if group is not None:
        group.add(process)
    else:
        process.start()
    try:
        process.wait_for_port(startup_timeout_s)
    except BaseException:
        process.stop()
        raise
    return process


class SuperLinkUnreachable(DeploymentError):
    """The SuperLink stopped answering (it was stopped or is restarting)."""


def start_fleet_gateway(
    *,
    certs: ServerCertFiles,
    upstream_port: int,
    host: str,
    port: int,
    log_path: Path,
    extra_pythonpath: Sequence[Path] = (),
    group: ProcessGroup | None = None,
    startup_timeout_s: float = 60.0,
) -> ManagedProcess:
    """Start the Fleet-only gateway on ``host:port`` in front of the SuperLink on loopback."""
    from fedcrm.coordinator import fleet_gateway

    process = ManagedProcess(
        name="fleet-gateway",
        argv=[
            sys.executable, "-m", fleet_gateway.__name__,
            "--host", host, "--port", str(port), "--upstream", f"{LOCALHOST}:{upstream_port}",
            "--certfile", str(Path(certs.cert).resolve()),
            "--keyfile", str(Path(certs.key).resolve()),
            "--ca", str(Path(certs.ca_cert).resolve()),
        ],
        env=flower_env(flwr_home=log_path.parent, extra_pythonpath=extra_pythonpath),
        log_path=log_path,
        port=port,
        host=LOCALHOST if host in ("0.0.0.0", "::") else host,
    )
    return _launched(process, group, startup_timeout_s)


@dataclass
class LinkService:
    """The coordinator's SuperLink (loopback only) and the Fleet gateway the firms dial."""

    superlink: ManagedProcess
    gateway: ManagedProcess
    fleet_host: str

    @property
    def control_port(self) -> int:
        assert self.superlink.port is not None
        return self.superlink.port

    @property
    def control_address(self) -> str:
        """Where the coordinator's own ``flwr`` CLI dials: the SuperLink on 127.0.0.1."""
        return self.superlink.address

    @property
    def fleet_address(self) -> str:
        """The gateway's bound address (on a wildcard bind, firms dial a name in server.crt)."""
        return f"{self.fleet_host}:{self.gateway.port}"

    @property
    def running(self) -> bool:
        return self.superlink.running and self.gateway.running

    def restart_superlink(self, group: ProcessGroup | None = None,
                          startup_timeout_s: float = 60.0) -> None:
        """Stop the SuperLink (and the ServerApp it runs) and start it again on its port."""
        self.superlink.stop()
        self.superlink = self.superlink.fresh()
        if group is not None:
            group.add(self.superlink)
        else:
            self.superlink.start()
        self.superlink.wait_for_port(startup_timeout_s)


def start_link_service(
    *,
    workdir: Path,
    certs: ServerCertFiles,
    database: Path | None = None,
    control_port: int | None = None,
    fleet_host: str = LOCALHOST,
    fleet_port: int | None = None,
    extra_pythonpath: Sequence[Path] = (),
    group: ProcessGroup | None = None,
    startup_timeout_s: float = 60.0,
) -> LinkService:
    """Start the SuperLink on ``127.0.0.1:control_port`` and the Fleet gateway on
    ``fleet_host:fleet_port`` (free ports when not given); see :func:`start_superlink`."""
    superlink = start_superlink(
        workdir=workdir, certs=certs, database=database, port=control_port, host=LOCALHOST,
        extra_pythonpath=extra_pythonpath, group=group, startup_timeout_s=startup_timeout_s,
    )
    try:
        bind = LOCALHOST if fleet_host in ("0.0.0.0", "::") else fleet_host
        gateway = start_fleet_gateway(
            certs=certs, upstream_port=int(superlink.port or 0), host=fleet_host,
            port=free_port(bind) if fleet_port is None else fleet_port,
            log_path=Path(workdir).resolve() / "fleet-gateway.log",
            extra_pythonpath=extra_pythonpath, group=group, startup_timeout_s=startup_timeout_s,
        )
    except BaseException:
        superlink.stop()
        raise
    return LinkService(superlink=superlink, gateway=gateway, fleet_host=fleet_host)


def write_flwr_config(flwr_home: Path, name: str, address: str, root_cert: Path) -> Path:
    """Add (or replace) the connection ``[superlink.NAME]`` in ``FLWR_HOME/config.toml``.

    The connection becomes the default; other connections in the file are kept.
    """
    flwr_home = Path(flwr_home)
    flwr_home.mkdir(parents=True, exist_ok=True)
    path = flwr_home / FLWR_CONFIG_FILE
    config: dict[str, object] = {}
    if path.exists():
        try:
            config = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise DeploymentError(
                f"{path} is not valid TOML ({exc}); delete it to regenerate"
            ) from None
    superlink = config.get("superlink")
    superlink = dict(superlink) if isinstance(superlink, dict) else {}
    superlink["default"] = name
    superlink[name] = {"address": address, "root-certificates": str(Path(root_cert).resolve())}
    config["superlink"] = superlink
    write_atomic(path, tomli_w.dumps(config).encode(), mode=0o644)
    return path


def _flwr(
    args: Sequence[str],
    *,
    flwr_home: Path,
    what: str,
    timeout: float = CLI_TIMEOUT_S,
    extra_pythonpath: Sequence[Path] = (),
) -> dict[str, object]:
    """Run ``flwr ARGS --format json`` with ``FLWR_HOME`` and return its JSON answer."""
    argv = [str(find_executable("flwr")), *args, "--format", "json"]
    env = flower_env(flwr_home=flwr_home, extra_pythonpath=extra_pythonpath)
    result = run_command(argv, env=env, timeout=timeout, what=what)
    payload = _last_json_object(result.stdout)
    if result.returncode != 0 or payload is None or payload.get("success") is False:
        reason = ""
        if payload is not None:
            reason = " ".join(str(payload.get("error-message", "")).split())
        if not reason:
            output = (result.stderr.strip() or result.stdout.strip()).splitlines()
            reason = output[-1] if output else f"exit code {result.returncode}"
        raise DeploymentError(f"{what} failed: {reason}")
    return payload


def _last_json_object(text: str) -> dict[str, object] | None:
    """The JSON object printed by ``flwr ... --format json`` (it may follow other output)."""
    start = text.find("{")
    while start != -1:
        try:
            value = json.loads(text[start:])
        except json.JSONDecodeError:
            start = text.find("{", start + 1)
            continue
        return value if isinstance(value, dict) else None
    return None


def register_node(
    *,
    flwr_home: Path,
    connection_name: str,
    public_key_path: Path,
    name: str | None = None,
) -> int:
    """Register a firm's SuperNode public key with the SuperLink; return the new node id.

    Only registered keys may connect when the SuperLink runs with node authentication.
    """
    public_key_path = Path(public_key_path).resolve()
    load_node_public_key(public_key_path)  # clear error before Flower's
    args = ["supernode", "register", str(public_key_path), connection_name]
    if name:
        args += ["--name", name]
    payload = _flwr(args, flwr_home=flwr_home, what=f"registering {public_key_path.name}")
    node_id = payload.get("node-id")
    if not isinstance(node_id, int):
        raise DeploymentError(f"registering {public_key_path.name} returned no node id")
    return node_id


def unregister_node(*, flwr_home: Path, connection_name: str, node_id: int) -> None:
    """Remove a firm's SuperNode from the federation; its key is refused from then on."""
    _flwr(
        ["supernode", "unregister", str(node_id), connection_name],
        flwr_home=flwr_home,
        what=f"unregistering node {node_id}",
    )


@dataclass(frozen=True)
class NodeRecord:
    """One registered SuperNode as the SuperLink lists it."""

    node_id: int
    name: str  # the firm name given at registration ("" if none)
    status: str  # registered, online, offline, unregistered ...


def list_nodes(*, flwr_home: Path, connection: str) -> list[NodeRecord]:
    """Every SuperNode the SuperLink knows (``flwr supernode ls``), with the firm names."""
    payload = _flwr(["supernode", "ls", connection], flwr_home=flwr_home, what="listing SuperNodes")
    nodes = payload.get("nodes")
    records: list[NodeRecord] = []
    if isinstance(nodes, list):
        for node in nodes:
            if isinstance(node, dict):
                records.append(NodeRecord(
                    node_id=int(str(node.get("node-id"))),
                    name=str(node.get("name") or ""),
                    status=str(node.get("status", "")),
                ))
    return records


def node_statuses(*, flwr_home: Path, connection: str) -> dict[int, str]:
    """Registered SuperNodes and their status (``registered``, ``online``, ``offline`` ...)."""
    return {n.node_id: n.status for n in list_nodes(flwr_home=flwr_home, connection=connection)}


def _app_run_config_keys(app_dir: Path) -> set[str]:
    path = Path(app_dir) / "pyproject.toml"
    try:
        pyproject = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise DeploymentError(f"cannot read the Flower app config {path}: {exc}") from None
    config = pyproject.get("tool", {}).get("flwr", {}).get("app", {}).get("config", {})
    return set(config) if isinstance(config, dict) else set()


def run_app(
    *,
    app_dir: Path,
    flwr_home: Path,
    connection: str,
    run_config: FlowerRunConfig | None = None,
    extra_pythonpath: Sequence[Path] = (),
) -> int:
    """Submit the Flower app in ``app_dir`` to the SuperLink ``connection``; return the run id.

    ``run_config`` overrides keys of the app's ``[tool.flwr.app.config]`` (Flower rejects
    unknown keys, so they are checked here first). Returns as soon as the run is accepted;
    use :func:`follow_run` to wait for it. ``flwr run`` checks that the app's component
    modules import, so ``extra_pythonpath`` must cover them when they are not installed.
    """
    app_dir = Path(app_dir).resolve()
    args = ["run", str(app_dir), connection]
    if run_config:
        unknown = sorted(set(run_config) - _app_run_config_keys(app_dir))
        if unknown:
            raise DeploymentError(
                f"run config keys {unknown} are not declared in {app_dir / 'pyproject.toml'} "
                "[tool.flwr.app.config]; add them to the app's run_config_defaults"
            )
        overrides = Path(flwr_home) / "run-config.toml"
        overrides.write_text(tomli_w.dumps(dict(run_config)))
        args += ["--run-config", str(overrides)]
    payload = _flwr(
        args, flwr_home=flwr_home, what=f"starting the Flower app in {app_dir}",
        extra_pythonpath=extra_pythonpath,
    )
    run_id = payload.get("run-id")
    try:
        return int(str(run_id))
    except ValueError:
        raise DeploymentError(
            f"the SuperLink accepted the app but returned no run id ({run_id!r})"
        ) from None


def run_status(*, flwr_home: Path, connection: str, run_id: int) -> RunStatus:
    """The current status of ``run_id`` (``flwr ls --run-id``)."""
    payload = _flwr(
        ["ls", connection, "--run-id", str(run_id)],
        flwr_home=flwr_home,
        what=f"reading run {run_id}",
    )
    runs = payload.get("runs")
    if not isinstance(runs, list) or not runs or not isinstance(runs[0], dict):
        raise DeploymentError(f"the SuperLink does not know run {run_id}")
    row = runs[0]
    return RunStatus(
        run_id=run_id,
        status_text=str(row.get("status", "")),
        details=str(row.get("status-details", "")),
    )


def _stream_log(
    *,
    flwr_home: Path,
    connection: str,
    run_id: int,
    deadline: float,
    on_log: Callable[[str], None] | None,
    log_path: Path,
) -> None:
    """Copy ``flwr log RUN --stream`` to ``log_path`` and ``on_log`` until it ends or time is up."""
    streamer = ManagedProcess(
        name=f"log-run-{run_id}",
        argv=[str(find_executable("flwr")), "log", str(run_id), connection, "--stream"],
        env=flower_env(flwr_home=flwr_home),
        log_path=log_path,
        capture_stdout=True,
    )
    with streamer, log_path.open("ab") as copy, selectors.DefaultSelector() as selector:
        stdout = streamer.stdout
        if stdout is None:  # pragma: no cover - capture_stdout guarantees a pipe
            return
        selector.register(stdout, selectors.EVENT_READ)
        pending = b""
        while time.monotonic() < deadline:
            if not selector.select(timeout=0.5):
                if streamer.poll() is not None:
                    break
                continue
            chunk = os.read(stdout.fileno(), 65536)
            if not chunk:
                break
            copy.write(chunk)
            copy.flush()
            *lines, pending = (pending + chunk).split(b"\n")
            if on_log is not None:
                for line in lines:
                    on_log(line.decode(errors="replace"))
        if pending and on_log is not None:
            on_log(pending.decode(errors="replace"))


def follow_run(
    *,
    flwr_home: Path,
    connection: str,
    run_id: int,
    timeout_s: float = 600.0,
    on_log: Callable[[str], None] | None = None,
    log_path: Path | None = None,
    control_port: int | None = None,
) -> RunStatus:
    """Stream the run's log (``flwr log --stream``) until it finishes; return its final status.

    ``on_log`` receives each log line (e.g. to report ``[ROUND 2/3]`` progress); the log is
    also copied to ``log_path``. The stream ends when the run finishes; if it breaks earlier it
    is resumed. If the run is still going after ``timeout_s`` it is stopped (``flwr stop``) and
    :class:`DeploymentError` is raised. When the SuperLink stops answering on ``control_port``
    (it was stopped or restarts), :class:`SuperLinkUnreachable` is raised.
    """
    flwr_home = Path(flwr_home)
    log_path = Path(log_path) if log_path is not None else flwr_home / f"run-{run_id}.log"
    deadline = time.monotonic() + timeout_s
    while True:
        _stream_log(
            flwr_home=flwr_home, connection=connection, run_id=run_id, deadline=deadline,
            on_log=on_log, log_path=log_path,
        )
        status = _status_or_unreachable(flwr_home=flwr_home, connection=connection,
                                        run_id=run_id, control_port=control_port)
        if status.state is not RunState.UNFINISHED:
            return status
        if time.monotonic() >= deadline:
            stop_run(flwr_home=flwr_home, connection=connection, run_id=run_id)
            raise DeploymentError(
                f"run {run_id} did not finish within {timeout_s:.0f}s and was stopped; "
                "see the SuperLink log"
            )
        time.sleep(2.0)  # the stream can end just before the final status is stored


#: How long a resubmission waits for a SuperLink that has just restarted to serve its Control API
#: (it binds its port before it answers).
STATUS_RETRY_S = 20.0


def _status_or_unreachable(
    *, flwr_home: Path, connection: str, run_id: int, control_port: int | None,
) -> RunStatus:
    """:func:`run_status`; while following a run on a known Control port, a status that cannot
    be read is the SuperLink's trouble (stopped, or restarting: its port may already be open
    before its Control API answers), never the run's end: :class:`SuperLinkUnreachable`."""
    try:
        return run_status(flwr_home=flwr_home, connection=connection, run_id=run_id)
    except DeploymentError as exc:
        if control_port is None:
            raise
        state = "stopped answering" if not port_open(control_port) else "did not answer"
        raise SuperLinkUnreachable(
            f"the SuperLink {state} on {LOCALHOST}:{control_port} during run {run_id}"
        ) from exc


def submit_when_answering(
    submit: Callable[[], int], *, control_port: int, window_s: float | None = None
) -> int:
    """``submit()`` (:func:`run_app`), tried again while a SuperLink that has just restarted
    does not serve its Control API yet."""
    deadline = time.monotonic() + (STATUS_RETRY_S if window_s is None else window_s)
    while True:
        try:
            return submit()
        except DeploymentError as exc:
            starting = "unavailable" in str(exc).lower() or not port_open(control_port)
            if not starting or time.monotonic() >= deadline:
                raise
            time.sleep(1.0)


def stop_run(*, flwr_home: Path, connection: str, run_id: int) -> None:
    """Stop a Flower run (``flwr stop``)."""
    _flwr(["stop", str(run_id), connection], flwr_home=flwr_home, what=f"stopping run {run_id}")
