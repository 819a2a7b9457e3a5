"""Start, watch and always stop the long-running executables of a federation.

A :class:`ManagedProcess` is one executable (``flower-superlink``, ``flower-supernode``,
``flwr log --stream`` ...) started in **its own session / process group** with an explicit
environment, its output going to a log file. Stopping it signals the whole group (SIGTERM,
then SIGKILL after a grace period), so helpers it spawned (``flower-superexec``,
``flwr-serverapp``, ``flwr-clientapp``) go with it. Every process also carries a
``FEDCRM_PROCESS_TOKEN`` environment marker; descendants inherit it, and a stop sweeps any
straggler that still carries the token but left the group.

A :class:`ProcessGroup` owns several processes and stops them in reverse start order on
normal exit, on exceptions, on KeyboardInterrupt / SIGTERM and at interpreter exit.

This module only runs executables; it never imports Flower.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from types import FrameType, TracebackType
from typing import IO, Self

import psutil

from fedcrm.privacy.errors import FedcrmError

TOKEN_ENV = "FEDCRM_PROCESS_TOKEN"
_FLOWER_EXIT = re.compile(r"Exit Code: (\d+)")
LOCALHOST = "127.0.0.1"
#: Files a federation process writes (logs, state databases, plans) are readable by their
#: owner only.
PRIVATE_FILE_MODE = 0o600
PRIVATE_UMASK = 0o077
#: Flower's exit code (``flwr.supercore.exit.ExitCode.SUPERNODE_CONNECTION_ERROR``) that
#: ``flower-supernode`` logs when the SuperLink refuses it (key not registered) or cannot be
#: reached. Spelled out because only the Flower adapters import flwr; a test checks it matches.
SUPERNODE_CONNECTION_ERROR = 305
DEFAULT_GRACE_S = 5.0

# Environment that keeps Flower offline and quiet: no telemetry, no update check.
OFFLINE_FLOWER_ENV: Mapping[str, str] = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "PYTHONUNBUFFERED": "1",
}


class DeploymentError(FedcrmError):
    """A federation process failed to start, was refused, or a run did not complete."""

    exit_code = 8


def venv_bin() -> Path:
    """The directory holding this interpreter's console scripts (``flwr``, ``flower-*``)."""
    return Path(sys.executable).parent


def find_executable(name: str) -> Path:
    """Locate ``name`` next to the running interpreter (the venv), else on PATH."""
    candidate = venv_bin() / name
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return candidate
    for folder in os.environ.get("PATH", "").split(os.pathsep):
        path = Path(folder) / name
        if folder and path.is_file() and os.access(path, os.X_OK):
            return path
    raise DeploymentError(
        f"executable '{name}' not found in {venv_bin()} or on PATH; install fedcrm with "
        "`pip install -e .` in this environment (it brings flwr)"
    )


def flower_env(
    *,
    flwr_home: Path,
    extra_pythonpath: Sequence[Path] = (),
    extra: Mapping[str, str] | None = None,
    base: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The environment for one Flower component.

    Its own ``FLWR_HOME`` (never the user's ``~/.flwr``), the venv's ``bin`` first on ``PATH``
    (the SuperLink and SuperNode start ``flower-superexec`` by name), telemetry and update
    checks off, and optional extra ``PYTHONPATH`` entries for app modules.
    """
    env = dict(os.environ if base is None else base)
    env.update(OFFLINE_FLOWER_ENV)
    env["FLWR_HOME"] = str(Path(flwr_home).resolve())
    path_entries = [str(venv_bin()), *[p for p in env.get("PATH", "").split(os.pathsep) if p]]
    env["PATH"] = os.pathsep.join(dict.fromkeys(path_entries))
    if extra_pythonpath:
        entries = [str(Path(p).resolve()) for p in extra_pythonpath]
        entries += [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
        env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(entries))
    if extra:
        env.update(extra)
    return env


def free_port(host: str = LOCALHOST) -> int:
    """A TCP port on ``host`` that is free right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def port_open(port: int, host: str = LOCALHOST, *, timeout: float = 0.5) -> bool:
    """Whether something accepts TCP connections on ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _processes(*, token: str, pgid: int | None = None) -> list[psutil.Process]:
    """Live (non-zombie) processes in process group ``pgid`` or with ``token`` in their environment.

    The group is asked first (cheap); a process's environment is read only when it is not in
    the group. Processes that exit during the scan, or that we may not inspect (other users'),
    are skipped.
    """
    found: list[psutil.Process] = []
    for proc in psutil.process_iter(["status"]):
        try:
            if proc.info["status"] in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD):
                continue
            in_group = pgid is not None and os.getpgid(proc.pid) == pgid
            if in_group or proc.environ().get(TOKEN_ENV) == token:
                found.append(proc)
        except (psutil.Error, ProcessLookupError, PermissionError):
            continue
    return found


def pids_with_token(token: str) -> list[int]:
    """PIDs of live processes whose environment carries ``FEDCRM_PROCESS_TOKEN=token``."""
    return [proc.pid for proc in _processes(token=token)]


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


class ManagedProcess:
    """One executable in its own process group, logging to a file, always stopped.

    Use as a context manager (or call :meth:`start` / :meth:`stop`). ``port`` is the TCP port
    the process is expected to listen on, if any (see :meth:`wait_for_port`).
    """

    def __init__(
        self,
        *,
        name: str,
        argv: Sequence[str],
        env: Mapping[str, str],
        log_path: Path,
        cwd: Path | None = None,
        port: int | None = None,
        host: str = LOCALHOST,
        grace_s: float = DEFAULT_GRACE_S,
        capture_stdout: bool = False,
    ) -> None:
        self.name = name
        self.argv = [str(a) for a in argv]
        self.log_path = Path(log_path)
        self.cwd = Path(cwd) if cwd is not None else None
        self.port = port
        self.host = host
        self.grace_s = grace_s
        self.token = uuid.uuid4().hex
        self._env = dict(env)
        self._env[TOKEN_ENV] = self.token
        self._capture_stdout = capture_stdout
        self._popen: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._stopped = False
        self._terminated_at = 0.0
        self._log_start = 0  # where this session's output starts in the (appended) log

    def fresh(self) -> ManagedProcess:
        """An unstarted copy (same command, environment, log and port), to start it again."""
        env = {k: v for k, v in self._env.items() if k != TOKEN_ENV}
        return ManagedProcess(
            name=self.name, argv=self.argv, env=env, log_path=self.log_path, cwd=self.cwd,
            port=self.port, host=self.host, grace_s=self.grace_s,
            capture_stdout=self._capture_stdout,
        )

    # ---- lifecycle -------------------------------------------------------------------
    def start(self) -> Self:
        if self._popen is not None:
            raise RuntimeError(f"{self.name} was already started")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        if self.cwd is not None:
            self.cwd.mkdir(parents=True, exist_ok=True)
        # the log and everything the process writes are private to this user (0600): logs and
        # state databases name firms, nodes and paths
        fd = os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, PRIVATE_FILE_MODE)
        os.fchmod(fd, PRIVATE_FILE_MODE)
        self._log = os.fdopen(fd, "ab")
        self._log_start = os.fstat(fd).st_size
        self._log.write(f"$ {' '.join(self.argv)}\n".encode())
        self._log.flush()
        try:
            self._popen = subprocess.Popen(
                self.argv,
                cwd=self.cwd,
                env=self._env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE if self._capture_stdout else self._log,
                stderr=self._log,
                start_new_session=True,  # own session => own process group, no terminal SIGINT
                umask=PRIVATE_UMASK,
            )
        except OSError as exc:
            self._log.close()
            raise DeploymentError(
                f"could not start {self.name} ({self.argv[0]}): {exc.strerror}; check the "
                "executable exists in the venv"
            ) from None
        return self

    @property
    def started(self) -> bool:
        return self._popen is not None

    @property
    def pid(self) -> int:
        if self._popen is None:
            raise RuntimeError(f"{self.name} is not started")
        return self._popen.pid

    @property
    def address(self) -> str:
        if self.port is None:
            raise RuntimeError(f"{self.name} has no port")
        return f"{self.host}:{self.port}"

    @property
    def stdout(self) -> IO[bytes] | None:
        return None if self._popen is None else self._popen.stdout

    def poll(self) -> int | None:
        """The exit code, or None while the process runs."""
        return None if self._popen is None else self._popen.poll()

    @property
    def running(self) -> bool:
        return self._popen is not None and self._popen.poll() is None

    def wait(self, timeout: float | None = None) -> int:
        """Wait for the process to exit and return its exit code (raises on timeout)."""
        if self._popen is None:
            raise RuntimeError(f"{self.name} is not started")
        try:
            return self._popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise DeploymentError(
                f"{self.name} did not exit within {timeout:.0f}s; see {self.log_path}"
            ) from None

    def wait_for_port(self, timeout: float = 60.0, *, poll_s: float = 0.2) -> None:
        """Block until the process accepts TCP connections on its port.

        Raises :class:`DeploymentError` (with the log's tail) if it exits first or times out.
        """
        if self.port is None:
            raise RuntimeError(f"{self.name} has no port to wait for")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            code = self.poll()
            if code is not None:
                raise DeploymentError(
                    f"{self.name} exited with code {code} before listening on {self.address}; "
                    f"see {self.log_path}: {self.log_tail(3)}"
                )
            if port_open(self.port, self.host):
                return
            time.sleep(poll_s)
        raise DeploymentError(
            f"{self.name} did not listen on {self.address} within {timeout:.0f}s; "
            f"see {self.log_path}"
        )

    def wait_for_log(self, text: str, timeout: float = 60.0, *, poll_s: float = 0.2) -> bool:
        """Wait until ``text`` appears in the log; False if the process exits or time runs out."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.read_log():
                return True
            if self.poll() is not None:
                return text in self.read_log()
            time.sleep(poll_s)
        return False

    def read_log(self) -> str:
        """This session's output: the log from where this start appended, not earlier runs."""
        try:
            with self.log_path.open("rb") as fh:
                fh.seek(self._log_start)
                return fh.read().decode(errors="replace")
        except OSError:
            return ""

    def flower_exit_code(self) -> int | None:
        """The code of a Flower executable's ``Exit Code: N`` log line, if it wrote one.

        Flower logs its specific code (e.g. 305: SuperNode connection refused) but the process
        itself exits with status 1 for every error.
        """
        codes = _FLOWER_EXIT.findall(self.read_log())
        return int(codes[-1]) if codes else None

    def log_tail(self, lines: int = 20) -> str:
        return " | ".join(s.strip() for s in self.read_log().splitlines()[-lines:] if s.strip())

    def terminate(self) -> None:
        """Send SIGTERM to the whole group without waiting (:meth:`stop` finishes the job)."""
        if self._popen is None or self._terminated_at:
            return
        self._terminated_at = time.monotonic()
        _signal_group(self._popen.pid, signal.SIGTERM)

    def stop(self, grace_s: float | None = None) -> int | None:
        """Stop the whole process group: SIGTERM, then SIGKILL after ``grace_s``. Idempotent.

        Also sweeps descendants that left the group but still carry this process's token.
        Returns the exit code of the main process (None if it was never started).
        """
        if self._popen is None:
            return None
        grace = self.grace_s if grace_s is None else grace_s
        pgid = self._popen.pid  # start_new_session: pgid == pid
        if not self._stopped:
            self._stopped = True
            self.terminate()
            deadline = self._terminated_at + grace
            while time.monotonic() < deadline:
                self._popen.poll()
                if not _processes(token=self.token, pgid=pgid):
                    break
                time.sleep(0.1)
            _signal_group(pgid, signal.SIGKILL)
            for straggler in _processes(token=self.token, pgid=pgid):
                # psutil checks the pid still names the same process before signalling it.
                with contextlib.suppress(psutil.Error):
                    straggler.kill()
        try:
            code = self._popen.wait(timeout=max(grace, 1.0))
        except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL cannot be ignored
            code = None
        deadline = time.monotonic() + 2.0
        while _processes(token=self.token, pgid=pgid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if self._popen.stdout is not None:
            self._popen.stdout.close()
        if self._log is not None and not self._log.closed:
            self._log.close()
        return code

    def leftover_pids(self) -> list[int]:
        """Live processes started by this one (same token), for checks after :meth:`stop`."""
        return pids_with_token(self.token)

    def pids(self) -> list[int]:
        """This process and every live process it started (e.g. to kill them without warning)."""
        return self.leftover_pids()

    def __enter__(self) -> Self:
        if self._popen is None:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "not started" if self._popen is None else f"pid={self._popen.pid} rc={self.poll()}"
        return f"ManagedProcess({self.name!r}, {state})"


class ProcessGroup:
    """Owns the processes of one deployment; stops them all, whatever happens.

    Inside ``with ProcessGroup() as group:`` a SIGTERM is turned into ``SystemExit`` (so
    ``finally`` blocks run) and an ``atexit`` hook stops whatever is still running.
    """

    def __init__(self, *, grace_s: float = DEFAULT_GRACE_S) -> None:
        self.grace_s = grace_s
        self.processes: list[ManagedProcess] = []
        self._lock = threading.Lock()
        self._previous_sigterm: Callable[[int, FrameType | None], object] | int | None = None
        self._installed_sigterm = False

    def add(self, process: ManagedProcess) -> ManagedProcess:
        """Start ``process`` (if needed) and take ownership of it."""
        with self._lock:
            self.processes.append(process)
        if not process.started:
            process.start()
        return process

    def start(
        self,
        *,
        name: str,
        argv: Sequence[str],
        env: Mapping[str, str],
        log_path: Path,
        cwd: Path | None = None,
        port: int | None = None,
    ) -> ManagedProcess:
        return self.add(
            ManagedProcess(
                name=name, argv=argv, env=env, log_path=log_path, cwd=cwd, port=port,
                grace_s=self.grace_s,
            )
        )

    def stop_all(self) -> None:
        """Stop every owned process, newest first (nodes before the SuperLink).

        A second Ctrl-C while stopping is ignored, so clean-up cannot be cut short.
        """
        with self._lock:
            processes = list(reversed(self.processes))
        in_main = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if in_main else None
        try:
            for process in processes:  # SIGTERM everyone first, so they shut down in parallel
                with contextlib.suppress(Exception):
                    process.terminate()
            for process in processes:
                with contextlib.suppress(Exception):
                    process.stop()
        finally:
            if in_main:
                signal.signal(signal.SIGINT, previous if previous is not None else signal.SIG_DFL)

    def leftover_pids(self) -> list[int]:
        return [pid for p in self.processes for pid in p.leftover_pids()]

    def __iter__(self) -> Iterator[ManagedProcess]:
        return iter(list(self.processes))

    def _on_sigterm(self, signum: int, frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    def __enter__(self) -> Self:
        atexit.register(self.stop_all)
        if threading.current_thread() is threading.main_thread():
            self._previous_sigterm = signal.getsignal(signal.SIGTERM)
            signal.signal(signal.SIGTERM, self._on_sigterm)
            self._installed_sigterm = True
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            self.stop_all()
        finally:
            atexit.unregister(self.stop_all)
            if self._installed_sigterm:
                previous = self._previous_sigterm
                signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
                self._installed_sigterm = False


def run_command(
    argv: Sequence[str],
    *,
    env: Mapping[str, str],
    cwd: Path | None = None,
    timeout: float = 120.0,
    what: str = "command",
) -> subprocess.CompletedProcess[str]:
    """Run a short command to completion in its own process group; kill the group on timeout."""
    proc = subprocess.Popen(
        [str(a) for a in argv],
        cwd=cwd,
        env=dict(env),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _signal_group(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise DeploymentError(
            f"{what} did not finish within {timeout:.0f}s; the command was killed"
        ) from None
    except BaseException:
        _signal_group(proc.pid, signal.SIGKILL)
        proc.wait()
        raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
