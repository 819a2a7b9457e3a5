"""Where a run stands after its last completed round, so that a restart resumes it there.

The ServerApp writes a checkpoint into the run's folder each time a round is complete (trained,
aggregated and, when asked, evaluated): ``checkpoint.json`` (the round, every firm's state, the
round records, the accepted updates, the layout) and ``checkpoint.npz`` (the global model the
next round trains on), both private (0600) and each replaced atomically; the JSON names the
sha256 of the arrays file, so a torn pair is refused.

When the SuperLink (and with it the ServerApp) or the coordinator restarts mid-run, ``fedcrm run``
submits the run again with the same run id and folder; the new ServerApp finds the checkpoint
and continues with the next round on the same model. Firms that had already trained that round
in the lost attempt send the very update they released then (no new charge; see
:meth:`fedcrm.node.FirmNode.train`).
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from fedcrm.coordinator.run_state import FirmState, RoundRecord
from fedcrm.privacy.durable import write_private
from fedcrm.privacy.errors import ConfigError

CHECKPOINT = "checkpoint.json"
CHECKPOINT_ARRAYS = "checkpoint.npz"


@dataclass(frozen=True)
class RunCheckpoint:
    """A run after ``completed_round`` rounds; ``arrays`` is the model round + 1 trains on."""

    run_id: str
    config_hash: str
    completed_round: int
    attempt: int
    started: float
    layout: str
    input_dim: int
    firms: tuple[FirmState, ...]
    rounds: Mapping[int, RoundRecord]
    updates: tuple[Mapping[str, Any], ...]
    arrays: tuple[np.ndarray, ...]

    def firm_states(self) -> dict[str, FirmState]:
        return {f.firm: f for f in self.firms}


def _arrays_bytes(arrays: Sequence[np.ndarray]) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, *[np.asarray(a) for a in arrays])
    return buffer.getvalue()


def save_checkpoint(run_dir: Path, checkpoint: RunCheckpoint) -> None:
    """Write the arrays, then the JSON that names their hash (each replaced atomically)."""
    data = _arrays_bytes(checkpoint.arrays)
    write_private(run_dir / CHECKPOINT_ARRAYS, data)
    record = {
        "run_id": checkpoint.run_id,
        "config_hash": checkpoint.config_hash,
        "completed_round": checkpoint.completed_round,
        "attempt": checkpoint.attempt,
        "started": checkpoint.started,
        "layout": checkpoint.layout,
        "input_dim": checkpoint.input_dim,
        "firms": [asdict(f) for f in checkpoint.firms],
        "rounds": [asdict(r) for _, r in sorted(checkpoint.rounds.items())],
        "updates": [dict(u) for u in checkpoint.updates],
        "arrays_sha256": hashlib.sha256(data).hexdigest(),
    }
    write_private(run_dir / CHECKPOINT, json.dumps(record, default=str).encode())


def _dataclass(cls: type[Any], values: Mapping[str, Any]) -> Any:
    return cls(**{f.name: values[f.name] for f in fields(cls) if f.name in values})


def load_checkpoint(run_dir: Path) -> RunCheckpoint | None:
    """The run's last checkpoint, or None when no round has completed yet."""
    path = run_dir / CHECKPOINT
    if not path.exists():
        return None
    try:
        record = json.loads(path.read_text())
        data = (run_dir / CHECKPOINT_ARRAYS).read_bytes()
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path} is unreadable ({exc}); the run cannot resume from it") from None
    if hashlib.sha256(data).hexdigest() != record["arrays_sha256"]:
        raise ConfigError(
            f"{run_dir / CHECKPOINT_ARRAYS} does not match {path}; the run cannot resume from it"
        )
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        arrays = tuple(npz[f"arr_{i}"] for i in range(len(npz.files)))
    return RunCheckpoint(
        run_id=str(record["run_id"]),
        config_hash=str(record["config_hash"]),
        completed_round=int(record["completed_round"]),
        attempt=int(record["attempt"]),
        started=float(record["started"]),
        layout=str(record["layout"]),
        input_dim=int(record["input_dim"]),
        firms=tuple(_dataclass(FirmState, f) for f in record["firms"]),
        rounds={int(r["server_round"]): _dataclass(RoundRecord, r) for r in record["rounds"]},
        updates=tuple(record["updates"]),
        arrays=arrays,
    )
