"""A firm's side of a real Flower deployment: its SuperNode.

:func:`start_supernode` runs ``flower-supernode`` against the coordinator's SuperLink over TLS
(verifying it with the federation CA), authenticating with the firm's OpenSSH EC private key
(registered beforehand by the coordinator), with its own ``FLWR_HOME`` and its own local
Runtime API port. The firm's local settings - where its prepared store and key directory
are - reach the ClientApp only through ``--node-config``; they never travel to the coordinator.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

from flwr.supercore.exit.exit_code import ExitCode

from fedcrm.processes import (
    LOCALHOST,
    DeploymentError,
    ManagedProcess,
    ProcessGroup,
    find_executable,
    flower_env,
    free_port,
)
from privacy.certs import load_node_private_key

NodeConfigValue = str | int | float | bool
_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$")

# Flower exit code logged by flower-supernode ("Exit Code: 305") when the SuperLink refuses it
# (its key is not registered) or cannot be reached within --max-retries / --max-wait-time.
# The process status itself is 1; read the code with ManagedProcess.flower_exit_code().
SUPERNODE_CONNECTION_ERROR: int = ExitCode.SUPERNODE_CONNECTION_ERROR


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
) -> ManagedProcess:
    """Start a firm's ``flower-supernode`` and return it (it runs until stopped).

    ``auth_key`` is the firm's OpenSSH EC private key (0600), checked here first so a wrong
    file fails with a clear message. ``workdir`` holds the node's ``FLWR_HOME`` and log
    (``workdir/<name>.log``); ClientApps run with it as working directory. With
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
    if group is not None:
        group.add(process)
    else:
        process.start()
    return process
