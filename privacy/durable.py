"""Crash-safe file primitives: the one atomic write and the one file lock of fedcrm.

Every file whose loss or tearing would matter (ledgers, audit logs, key and certificate files,
models, run plans, run summaries) is written with :func:`write_atomic`: a temporary file in the
same directory, fsync, ``os.replace`` over the target, fsync of the directory. A crash at any point
leaves the old file or the new one, never a mix. :func:`locked` is the advisory lock that
serialises the read-modify-write of ledgers and audit logs across processes.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from fedcrm.privacy.errors import ConfigError

PRIVATE_MODE = 0o600


def fsync_dir(directory: Path) -> None:
    """Flush a directory entry (after a create or rename) to disk."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _temp_prefix(path: Path) -> str:
    return f".{path.name}."


def write_atomic(path: Path, data: bytes, *, mode: int = PRIVATE_MODE) -> None:
    """Replace ``path`` with ``data`` atomically and durably, as ``mode`` (default 0600).

    The parent directory must exist. On any failure the temporary file is removed and the old
    ``path`` (if any) is untouched.
    """
    path = Path(path)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=_temp_prefix(path), suffix=".tmp")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp_name)
        raise
    fsync_dir(path.parent)


def create_exclusive(path: Path, data: bytes) -> bool:
    """Create ``path`` (0600) holding ``data`` only if it does not exist yet, durably; returns
    False when it already existed. The one-time claim of a step that must never run twice
    (``O_CREAT | O_EXCL``: of two processes racing, exactly one creates it)."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_MODE)
    except FileExistsError:
        return False
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException:
        with contextlib.suppress(OSError):
            path.unlink()
        raise
    fsync_dir(path.parent)
    return True


def write_private(path: Path, data: bytes) -> None:
    """Write a secret or private file: atomically, mode 0600 (even if it existed as 0644)."""
    write_atomic(path, data, mode=PRIVATE_MODE)


def remove_stale_temps(path: Path) -> None:
    """Delete temporary files a crashed :func:`write_atomic` of ``path`` left behind.

    Call only while holding :func:`locked` for ``path`` (another writer's temp file is live).
    """
    for stale in Path(path).parent.glob(f"{_temp_prefix(Path(path))}*.tmp"):
        with contextlib.suppress(OSError):
            stale.unlink()


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """Exclusive advisory lock on ``<path>.lock``, shared by every process using ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path.with_name(path.name + ".lock"), os.O_RDWR | os.O_CREAT, PRIVATE_MODE)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def check_output_file(path: Path, *, what: str = "output file") -> Path:
    """Refuse an output path that cannot be written, before any work (or budget) is spent."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{what} {path} is a folder; give a file name, e.g. {path / 'out'}")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise ConfigError(f"{what} {path}: folder {parent} does not exist; create it first")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"{what} {path}: folder {parent} is not writable")
    if path.exists() and not os.access(path, os.W_OK):
        raise ConfigError(f"{what} {path} exists and is not writable")
    return path


def ensure_output_dir(path: Path, *, what: str, mode: int | None = None) -> Path:
    """Create the folder ``path`` (and its parents) for output, or refuse in one clear line.

    A path that is a file, or whose parent is a file, or that the system refuses to create, is a
    :class:`ConfigError` naming ``what`` and the path, before anything is written. ``mode``
    (e.g. 0o700 for key folders) is applied to the folder only after it exists and is checked.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{what} {path} is a file, not a folder; give a folder path")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(
            f"{what} {path} cannot be created ({exc.strerror or type(exc).__name__}); check "
            "that every folder above it is a folder and writable"
        ) from None
    if mode is not None:
        os.chmod(path, mode)
    return path


class StagedFile:
    """A file written next to its destination and moved into place only by :meth:`publish`.

    Used for results that cost privacy budget: the result is staged, the ledger commits, then it
    is published; if the commit fails the staged file is discarded and the destination untouched.
    """

    def __init__(self, destination: Path) -> None:
        self.destination = Path(destination)
        fd, name = tempfile.mkstemp(
            dir=self.destination.parent, prefix=f".{self.destination.name}.", suffix=".staged"
        )
        os.close(fd)
        self.path = Path(name)

    def publish(self) -> None:
        with open(self.path, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(self.path, self.destination)
        fsync_dir(self.destination.parent)

    def discard(self) -> None:
        with contextlib.suppress(OSError):
            self.path.unlink()
