"""A firm's side of a real Flower deployment: its SuperNode and its own ClientApp process.

:func:`start_supernode` runs ``flower-supernode`` against the coordinator's Fleet gateway over TLS
(verifying it with the federation CA), authenticating with the firm's OpenSSH EC private key
(registered beforehand by the coordinator), with its own ``FLWR_HOME`` and its own local
Runtime API port, in ``--isolation process`` mode: the SuperNode starts no ClientApp. Next to it
runs the firm's one long-lived ClientApp process (:mod:`fedcrm.clients.runtime`), which answers
every message with the ClientApp of the installed fedcrm release, and only for runs whose app
bundle declares exactly that release; nothing of a bundle is ever imported. The firm's local
settings - where its prepared store and key directory are - reach the ClientApp only through
``--node-config``; they never travel to the coordinator.
"""

from __future__ import annotations

import math
import re
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from fedcrm.coordinator.app_bundle import FEDCRM_CLIENTAPP
from fedcrm.coordinator.processes import (
    LOCALHOST,
    SUPERNODE_CONNECTION_ERROR,
    DeploymentError,
    ManagedProcess,
    ProcessGroup,
    find_executable,
    flower_env,
    free_port,
)
from fedcrm.data.contract import load_firm_config
from fedcrm.privacy.certs import load_node_private_key
from fedcrm.privacy.errors import ConfigError, KeyFileError

NodeConfigValue = str | int | float | bool
#: The one key of a firm's ``--node-config``: the absolute path of its firm config.
NODE_CONFIG_KEY = "firm-config"
_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$")
_NODE_ID = re.compile(r"SuperNode ID: (\d+)")



def format_node_config(node_config: Mapping[str, NodeConfigValue]) -> str:
    """Encode ``node_config`` for ``flower-supernode --node-config``.

    Flower parses the value as space-separated ``key=value`` pairs, each value a TOML scalar,
    with a regex that allows spaces only inside quotes and no escaped quotes. So strings are
    written as TOML literal strings (``'...'``, no escapes: Windows paths survive) and strings
    containing a quote or newline are refused.
    """
    parts: list[str] = []
    for key, value in node_config.items():
        if not _KEY.match(key):
            raise DeploymentError(
                f"node-config key {key!r} must be letters, digits, '_' or '-' (no dots or spaces)"
            )
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, int):
            text = str(value)
        elif isinstance(value, float):
            if not math.isfinite(value):
                raise DeploymentError(f"node-config '{key}' must be a finite number")
            text = repr(value)
        elif isinstance(value, str):
            if any(c in value for c in "'\"\n\r"):
                raise DeploymentError(
                    f"node-config '{key}' contains a quote or line break, which Flower's "
                    "--node-config cannot carry; rename the path or value"
                )
            text = f"'{value}'"
        else:
            raise DeploymentError(
                f"node-config '{key}' has type {type(value).__name__}; use str, int, float or bool"
            )
        parts.append(f"{key}={text}")
    return " ".join(parts)


def supernode_command(
    *,
    superlink_address: str,
    root_cert: Path,
    auth_key: Path,
    node_config: Mapping[str, NodeConfigValue],
    runtime_port: int,
    max_retries: int | None,
    max_wait_time: float | None,
) -> list[str]:
    """The ``flower-supernode`` argv (TLS, node authentication, own Runtime API port)."""
    argv = [
        str(find_executable("flower-supernode")),
        "--superlink", superlink_address,
        "--root-certificates", str(Path(root_cert).resolve()),
        "--auth-supernode-private-key", str(Path(auth_key).resolve()),
        "--host", LOCALHOST,
        "--port", str(runtime_port),
        "--isolation", "process",  # the firm's own ClientApp process takes the tasks
    ]
    if node_config:
        argv += ["--node-config", format_node_config(node_config)]
    if max_retries is not None:
        argv += ["--max-retries", str(max_retries)]
    if max_wait_time is not None:
        argv += ["--max-wait-time", str(max_wait_time)]
    return argv


def start_supernode(
    *,
    superlink_address: str,
    root_cert: Path,
    auth_key: Path,
    node_config: Mapping[str, NodeConfigValue],
    workdir: Path,
    max_retries: int | None = 10,
    max_wait_time: float | None = 60.0,
    name: str = "supernode",
    runtime_port: int | None = None,
    extra_pythonpath: Sequence[Path] = (),
    group: ProcessGroup | None = None,
    clientapp: str = FEDCRM_CLIENTAPP,
) -> FirmProcesses:
    """Start a firm's ``flower-supernode`` and its ClientApp process; return both.

    ``auth_key`` is the firm's OpenSSH EC private key (0600), checked here first so a wrong
    file fails with a clear message. ``workdir`` holds the node's ``FLWR_HOME`` and logs
    (``workdir/<name>.log``, ``workdir/clientapp.log``); the ClientApp process runs ``clientapp``
    (an installed ``module:attribute``) with it as working directory. With
    ``max_retries``/``max_wait_time`` set the node gives up on an unreachable SuperLink
    (Flower exit code 305) instead of retrying forever; 305 is also what a node whose key is not
    registered gets (logged as ``Exit Code: 305``; see ``ManagedProcess.flower_exit_code``).
    """
    load_node_private_key(Path(auth_key))
    workdir = Path(workdir).resolve()
    flwr_home = workdir / "flwr-home"
    flwr_home.mkdir(parents=True, exist_ok=True)
    port = free_port() if runtime_port is None else runtime_port
    process = ManagedProcess(
        name=name,
        argv=supernode_command(
            superlink_address=superlink_address,
            root_cert=root_cert,
            auth_key=auth_key,
            node_config=node_config,
            runtime_port=port,
            max_retries=max_retries,
            max_wait_time=max_wait_time,
        ),
        env=flower_env(flwr_home=flwr_home, extra_pythonpath=extra_pythonpath),
        log_path=workdir / f"{name}.log",
        cwd=workdir,
        port=port,
    )
    app_process = ManagedProcess(
        name=f"{name}-clientapp",
        argv=[sys.executable, "-m", "fedcrm.clients.runtime",
              "--runtime-api-address", f"{LOCALHOST}:{port}", "--app", clientapp],
        env=flower_env(flwr_home=flwr_home, extra_pythonpath=extra_pythonpath),
        log_path=workdir / "clientapp.log",
        cwd=workdir,
    )
    for started in (process, app_process):
        if group is not None:
            group.add(started)
        else:
            started.start()
    return FirmProcesses(supernode=process, clientapp=app_process)


@dataclass(frozen=True)
class FirmProcesses:
    """A firm's two long-running processes: its SuperNode and its ClientApp process."""

    supernode: ManagedProcess
    clientapp: ManagedProcess

    @property
    def running(self) -> bool:
        return self.supernode.running and self.clientapp.running

    @property
    def log_path(self) -> Path:
        return self.supernode.log_path

    def poll(self) -> int | None:
        """The exit code of whichever of the two exited first, None while both run."""
        for process in (self.supernode, self.clientapp):
            code = process.poll()
            if code is not None:
                return code
        return None

    def read_log(self) -> str:
        return self.supernode.read_log()

    def flower_exit_code(self) -> int | None:
        return self.supernode.flower_exit_code()

    def stop(self) -> None:
        for process in (self.clientapp, self.supernode):
            process.stop()

    def pids(self) -> list[int]:
        """Every live process of this firm's node (both processes and their children)."""
        return [pid for p in (self.supernode, self.clientapp) for pid in p.leftover_pids()]


def firm_node_config(firm_config: Path) -> dict[str, NodeConfigValue]:
    """The whole ``--node-config`` of a firm's SuperNode: the absolute path of its firm config.

    The ClientApp opens the firm's store and keys from that file; nothing else about the firm
    goes into the node config, and none of it leaves the firm's host.
    """
    return {NODE_CONFIG_KEY: str(Path(firm_config).expanduser().resolve())}


def serve_firm_node(
    *,
    firm_config: Path,
    superlink_address: str,
    root_cert: Path,
    auth_key: Path,
    workdir: Path | None = None,
    max_retries: int | None = 30,
    max_wait_time: float | None = 600.0,
    on_online: Callable[[int], None] | None = None,
    on_started: Callable[[FirmProcesses], None] | None = None,
) -> None:
    """Run a firm's SuperNode and ClientApp process until they stop; only returns by an exception.

    Checks first that the firm config parses, its prepared store exists and the CA file is
    there, so a firm sees its own mistakes before Flower's. ``workdir`` (default: ``node/``
    next to the firm config) holds the node's ``FLWR_HOME`` and logs. ``on_online`` receives
    the node id once the SuperLink has accepted the node (read from this session's log only).
    Raises :class:`DeploymentError` when either process exits: refused (its key is not
    registered) or the SuperLink unreachable (Flower exit code 305), or any other failure;
    ``KeyboardInterrupt`` / SIGTERM stop both.
    """
    firm_config = Path(firm_config).expanduser().resolve()
    cfg = load_firm_config(firm_config)
    firm = cfg.firm.name
    if not (cfg.prepared_dir / "manifest.json").exists():
        raise ConfigError(
            f"firm {firm} has no prepared store in {cfg.prepared_dir}; run "
            f"`fedcrm prepare --config {firm_config}` before starting its node"
        )
    if not Path(root_cert).exists():
        raise KeyFileError(
            f"CA certificate {root_cert} not found; ask the coordinator for the federation's "
            "ca.crt (and check its fingerprint out of band: `fedcrm certs fingerprint`)"
        )
    workdir = firm_config.parent / "node" if workdir is None else Path(workdir)
    with ProcessGroup() as group:
        node = start_supernode(
            superlink_address=superlink_address, root_cert=Path(root_cert),
            auth_key=Path(auth_key), node_config=firm_node_config(firm_config),
            workdir=workdir, max_retries=max_retries, max_wait_time=max_wait_time,
            name=f"supernode-{firm}", group=group,
        )
        if on_started is not None:
            on_started(node)
        announced = False
        while node.running:
            if not announced and on_online is not None:
                found = _NODE_ID.search(node.read_log())
                if found:
                    announced = True
                    on_online(int(found.group(1)))
            time.sleep(0.5)
        if node.clientapp.poll() is not None and node.supernode.running:
            raise DeploymentError(
                f"the ClientApp process of firm '{firm}' exited (status {node.clientapp.poll()});"
                f" see {node.clientapp.log_path}: {node.clientapp.log_tail(3)}"
            )
        code = node.flower_exit_code()
        if code == SUPERNODE_CONNECTION_ERROR:
            raise DeploymentError(
                f"the SuperLink at {superlink_address} refused or could not be reached by the "
                f"SuperNode of firm '{firm}' (Flower exit code {code}): check that the "
                f"coordinator registered this node's public key (`fedcrm link register --firm "
                f"{firm} ...`), the address and the CA certificate; see {node.log_path}"
            )
        raise DeploymentError(
            f"the SuperNode of firm '{firm}' exited (status {node.supernode.poll()}, Flower exit "
            f"code {code}); see {node.log_path}: {node.supernode.log_tail(3)}"
        )
