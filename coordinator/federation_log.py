"""The coordinator's signed federation log (``runs/<run-id>/federation/audit.jsonl``).

It is fed by the run's typed progress events (:mod:`fedcrm.coordinator.events`): accepted and
rejected updates, firms' log heads and each round's global model become signed entries, with the
run's start and end recorded explicitly. The coordinator's Ed25519 key comes from the environment
variable ``FEDCRM_COORDINATOR_KEY`` (a 0600 key file), never from a run config. A resumed run
(after a restart) appends to the same log: ``run_resumed`` marks where the new attempt starts.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import queue
import threading
from pathlib import Path
from typing import Any

from fedcrm.audit.log import AuditLog, EntryKind, public_key_pem
from fedcrm.coordinator.events import (
    FirmHeads,
    RoundEvaluated,
    RunEvent,
    SecureSumCompleted,
    UpdateAccepted,
    UpdateLost,
    UpdateRejected,
)
from fedcrm.privacy.keys import ENV_COORDINATOR_KEY, load_signing_key

log = logging.getLogger(__name__)


class FederationAudit:
    """The coordinator's signed federation log, written from the run's events.

    Entries are appended in order by one writer thread, off the rounds' critical path: each
    append rewrites and fsyncs the whole log, which grows by one entry per accepted update (with
    100 firms that cost grew every round). :meth:`close` returns once every entry is durable and
    re-raises an append that failed; the coordinator calls it before it reports the run finished.
    """

    def __init__(self, run_dir: Path) -> None:
        self.log: AuditLog | None = None
        self._pending: queue.Queue[tuple[EntryKind, dict[str, Any]] | None] = queue.Queue()
        self._failure: BaseException | None = None
        self._writer: threading.Thread | None = None
        key_path = os.environ.get(ENV_COORDINATOR_KEY)
        if not key_path:
            log.warning("%s is not set: this run keeps no signed federation log",
                        ENV_COORDINATOR_KEY)
            return
        key = load_signing_key(Path(key_path))
        fed = run_dir / "federation"
        fed.mkdir(parents=True, exist_ok=True)
        (fed / "signing.pub").write_bytes(public_key_pem(key.public_key()))
        self.log = AuditLog(fed / "audit.jsonl", signing_key=key)
        self._writer = threading.Thread(target=self._write, name="federation-audit", daemon=True)
        self._writer.start()

    def append(self, kind: EntryKind, payload: dict[str, Any]) -> None:
        if self.log is None:
            return
        if self._failure is not None:
            raise self._failure
        self._pending.put((kind, copy.deepcopy(payload)))

    def _write(self) -> None:
        assert self.log is not None
        while (item := self._pending.get()) is not None:
            if self._failure is None:
                try:
                    self.log.append(*item)
                except BaseException as exc:  # re-raised by append/close
                    self._failure = exc

    def close(self) -> None:
        """Wait until every entry is appended; raise the first append that failed."""
        if self._writer is not None:
            self._pending.put(None)
            self._writer.join()
            self._writer = None
        if self._failure is not None:
            raise self._failure

    def record(self, event: RunEvent) -> None:
        """The audit entry an event stands for, if any (an :data:`EventSink`)."""
        match event:
            case UpdateAccepted():
                self.append(EntryKind.UPDATE_ACCEPTED, {
                    "round": event.round, "firm": event.firm, "node_id": str(event.node_id),
                    "update_hash": event.update_hash,
                    **({"replayed": True} if event.replayed else {}),
                })
            case UpdateLost():
                self.append(EntryKind.UPDATE_LOST, {
                    "round": event.round, "firm": event.firm, "node_id": str(event.node_id),
                    "reason": event.reason,
                })
            case UpdateRejected():
                self.append(EntryKind.UPDATE_REJECTED, {
                    "round": event.round, "firm": event.firm, "node_id": str(event.node_id),
                    "reason": event.reason,
                })
            case FirmHeads():
                self.append(EntryKind.FIRM_HEADS, {
                    "round": event.round, "heads": {k: dict(v) for k, v in event.heads.items()},
                })
            case RoundEvaluated() if event.model_hash:
                metrics = {
                    k: float(v) for k, v in event.pooled.items()
                    if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
                }
                self.append(EntryKind.GLOBAL_MODEL, {
                    "round": event.round, "model_hash": event.model_hash, "metrics": metrics,
                })
            case SecureSumCompleted():
                self.append(EntryKind.SECURE_SUM_RESULT, {
                    "run_id": event.run_id, "round": event.round, "query": event.query,
                    "spec_hash": event.spec_hash, "firms": list(event.firms),
                    "dropped": list(event.dropped), "sum_hash": event.sum_hash,
                })
            case _:
                pass
