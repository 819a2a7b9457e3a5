"""A run's progress as typed events, and their JSON Lines log (``runs/<run-id>/events.jsonl``).

The ServerApp emits these events; the federation's signed audit log
(:mod:`fedcrm.coordinator.federation_log`) and the live display (:mod:`fedcrm.coordinator.live`)
consume the same values, and the coordinator's commands follow round progress from the log
file - never from Flower's own log. Events hold firm names, counts, ε and metrics, never a data
value.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import MISSING, asdict, dataclass, field, fields
from enum import StrEnum
from pathlib import Path
from typing import Any, ClassVar

EVENTS = "events.jsonl"
"""The events file in a run's folder."""


class EventKind(StrEnum):
    RUN_STARTED = "run_started"
    RUN_RESUMED = "run_resumed"
    NODES_CONNECTED = "nodes_connected"
    FIRMS_ADMITTED = "firms_admitted"
    ROUND_STARTED = "round_started"
    FIRM_DROPPED = "firm_dropped"
    FIRM_STOPPED = "firm_stopped"
    UPDATE_REJECTED = "update_rejected"
    UPDATE_ACCEPTED = "update_accepted"
    UPDATE_LOST = "update_lost"
    ROUND_TRAINED = "round_trained"
    FIRM_HEADS = "firm_heads"
    ROUND_EVALUATED = "round_evaluated"
    RUN_FINISHED = "run_finished"
    SECURE_SUM = "secure_sum"


@dataclass(frozen=True)
class RunStarted:
    kind: ClassVar[EventKind] = EventKind.RUN_STARTED
    run_id: str
    task: str
    strategy: str
    rounds: int


@dataclass(frozen=True)
class RunResumed:
    """A new attempt of the run continues after its last completed round (a restart)."""

    kind: ClassVar[EventKind] = EventKind.RUN_RESUMED
    run_id: str
    completed_round: int
    attempt: int


@dataclass(frozen=True)
class NodesConnected:
    kind: ClassVar[EventKind] = EventKind.NODES_CONNECTED
    count: int


@dataclass(frozen=True)
class FirmsAdmitted:
    kind: ClassVar[EventKind] = EventKind.FIRMS_ADMITTED
    firms: Mapping[str, int]  # firm -> node id
    layout: str


@dataclass(frozen=True)
class RoundStarted:
    kind: ClassVar[EventKind] = EventKind.ROUND_STARTED
    round: int
    firms: tuple[str, ...]


@dataclass(frozen=True)
class FirmDropped:
    """A firm did not answer (error reply, lost connection, timeout)."""

    kind: ClassVar[EventKind] = EventKind.FIRM_DROPPED
    round: int
    firm: str
    node_id: int
    reason: str


@dataclass(frozen=True)
class FirmStopped:
    """A firm answered that it stops taking part (budget, error on its side, wrong layout)."""

    kind: ClassVar[EventKind] = EventKind.FIRM_STOPPED
    round: int
    firm: str
    node_id: int
    state: str
    detail: str


@dataclass(frozen=True)
class UpdateRejected:
    kind: ClassVar[EventKind] = EventKind.UPDATE_REJECTED
    round: int
    firm: str
    node_id: int
    reason: str


@dataclass(frozen=True)
class UpdateAccepted:
    kind: ClassVar[EventKind] = EventKind.UPDATE_ACCEPTED
    round: int
    firm: str
    node_id: int
    update_hash: str
    replayed: bool = False  # the firm sent again the update it released for this round before


@dataclass(frozen=True)
class UpdateLost:
    """A firm released (and was charged for) an update for this round that never arrived."""

    kind: ClassVar[EventKind] = EventKind.UPDATE_LOST
    round: int
    firm: str
    node_id: int
    reason: str


@dataclass(frozen=True)
class RoundTrained:
    kind: ClassVar[EventKind] = EventKind.ROUND_TRAINED
    round: int
    accepted: tuple[str, ...]
    rejected: int
    dropped: tuple[str, ...]
    epsilon: Mapping[str, float]
    epsilon_cap: Mapping[str, float]


@dataclass(frozen=True)
class FirmHeads:
    """Each answering firm's audit-log head this round (hash and length)."""

    kind: ClassVar[EventKind] = EventKind.FIRM_HEADS
    round: int
    heads: Mapping[str, Mapping[str, Any]]


@dataclass(frozen=True)
class RoundEvaluated:
    kind: ClassVar[EventKind] = EventKind.ROUND_EVALUATED
    round: int
    pooled: Mapping[str, Any]
    per_firm: Mapping[str, Mapping[str, float]]
    model_hash: str


@dataclass(frozen=True)
class RunFinished:
    kind: ClassVar[EventKind] = EventKind.RUN_FINISHED
    status: str
    reason: str
    model: str | None


@dataclass(frozen=True)
class SecureSumCompleted:
    """A secure sum finished: the firms it adds up, those that dropped, the hash of its total."""

    kind: ClassVar[EventKind] = EventKind.SECURE_SUM
    round: int
    query: str
    run_id: str
    spec_hash: str
    firms: tuple[str, ...]
    dropped: tuple[str, ...]
    sum_hash: str


RunEvent = (
    RunStarted | RunResumed | NodesConnected | FirmsAdmitted | RoundStarted | FirmDropped
    | FirmStopped | UpdateRejected | UpdateAccepted | UpdateLost | RoundTrained | FirmHeads
    | RoundEvaluated | RunFinished | SecureSumCompleted
)
EventSink = Callable[[RunEvent], None]

_TYPES: dict[EventKind, type[Any]] = {
    cls.kind: cls
    for cls in (
        RunStarted, RunResumed, NodesConnected, FirmsAdmitted, RoundStarted, FirmDropped,
        FirmStopped, UpdateRejected, UpdateAccepted, UpdateLost, RoundTrained, FirmHeads,
        RoundEvaluated, RunFinished, SecureSumCompleted,
    )
}


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):  # numpy scalars
        return value.item()
    return str(value)


def event_to_json(event: RunEvent, *, t: float | None = None) -> dict[str, Any]:
    return {"t": round(time.time() if t is None else t, 3), "kind": event.kind.value,
            **asdict(event)}


def event_from_json(record: Mapping[str, Any]) -> RunEvent:
    """Parse one logged event (unknown fields are ignored; lists become tuples)."""
    cls = _TYPES[EventKind(record["kind"])]
    values = {}
    for f in fields(cls):
        if f.name not in record and f.default is not MISSING:
            continue  # a field added later, with a default
        value = record[f.name]
        values[f.name] = tuple(value) if isinstance(value, list) else value
    event: RunEvent = cls(**values)
    return event


@dataclass
class EventLog:
    """Appends events to ``path`` (one JSON object per line, flushed and fsynced; mode 0600)."""

    path: Path
    sinks: list[EventSink] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def emit(self, event: RunEvent) -> None:
        line = json.dumps(event_to_json(event), default=_plain) + "\n"
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        with os.fdopen(fd, "a", encoding="utf-8") as fh:
            fh.write(line)
            fh.flush()
            os.fsync(fh.fileno())
        for sink in self.sinks:
            sink(event)


def read_run_events(path: Path) -> list[RunEvent]:
    """Every complete event logged so far (a line still being written is left out)."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            try:
                out.append(event_from_json(json.loads(line)))
            except json.JSONDecodeError:
                break
    return out


def follow(
    path: Path, *, poll: float = 0.2, stop: Callable[[], bool] | None = None
) -> Iterator[RunEvent]:
    """Yield events as they are appended until ``stop()`` is true and the file is drained."""
    offset = 0
    buf = ""
    while True:
        if path.exists():
            with path.open("r", encoding="utf-8") as fh:
                fh.seek(offset)
                chunk = fh.read()
                offset = fh.tell()
            buf += chunk
            while "\n" in buf:
                line, buf = buf.split("\n", 1)
                if line.strip():
                    yield event_from_json(json.loads(line))
        if stop is not None and stop():
            return
        time.sleep(poll)


@contextlib.contextmanager
def watch_rounds(path: Path, on_round: Callable[[int, int], None]) -> Iterator[None]:
    """While the block runs, call ``on_round(round, total)`` for each round the run's
    ``events.jsonl`` reports trained (in a background thread; drained when the block ends)."""
    done = threading.Event()

    def watch() -> None:
        total = 0
        for event in follow(path, poll=0.25, stop=done.is_set):
            if isinstance(event, RunStarted):
                total = event.rounds
            elif isinstance(event, RoundTrained):
                on_round(event.round, total)

    thread = threading.Thread(target=watch, name="round-watcher", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join(timeout=5)
