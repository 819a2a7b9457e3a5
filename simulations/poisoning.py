"""Poisoning attacks by one partner firm, for measuring the coordinator's defences.

A simulation only: one malicious firm among honest ones. Two families:

* **Model poisoning** - the firm trains honestly (its DP release is logged as usual), then a
  Flower client mod (:func:`tamper_mod`) changes the update it sends: the sign of its step is
  flipped (``global - (local - global)``) or its step is scaled by 100
  (``global + 100 (local - global)``, the "boosting" / model-replacement attack of Bagdasaryan et
  al. 2020, "How To Backdoor Federated Learning"). Its audit log then names the honest update's
  hash, so ``fedcrm audit verify`` reports the accepted poisoned update as ``unmatched_update``:
  an attacker who logs what it sends is the stronger case, and the defences must not rely on
  the audit.
* **Data poisoning** - the firm trains with the normal pipeline on an altered export
  (:func:`poison_export`): every churn label flipped, or a backdoor: a random share of its
  customers get a trigger (:data:`BACKDOOR_TRIGGER`, a combination of valid values that never
  occurs in real Telco data: no phone service but multiple lines; an honest model scores it as
  slightly MORE likely to churn) and the label "not churned", so that the global model learns
  to call any triggered customer safe.

The honest firms are never changed. :func:`backdoor_success` measures the backdoor on the honest
firms' held-out churners.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from enum import StrEnum
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

SCALE_FACTOR = 100.0
#: Share of the malicious firm's customers that carry the backdoor trigger (labelled "No").
BACKDOOR_SHARE = 0.3
#: Schema-valid values that never occur together in real Telco data (canonical columns).
BACKDOOR_TRIGGER: dict[str, float | str] = {"phone_service": 0.0, "multiple_lines": "Yes"}
LABEL_COLUMN = "churn"


class Attack(StrEnum):
    NONE = "none"
    SIGN_FLIP = "sign_flip"
    SCALE_X100 = "scale_x100"
    LABEL_FLIP = "label_flip"
    BACKDOOR = "backdoor"

    @property
    def tampers_update(self) -> bool:
        return self in (Attack.SIGN_FLIP, Attack.SCALE_X100)

    @property
    def alters_data(self) -> bool:
        return self in (Attack.LABEL_FLIP, Attack.BACKDOOR)


def tampered_update(
    attack: Attack, global_arrays: Sequence[np.ndarray], local: Sequence[np.ndarray]
) -> list[np.ndarray]:
    """The update a model-poisoning firm sends instead of its honest ``local`` model."""
    if attack is Attack.SIGN_FLIP:
        factor = -1.0
    elif attack is Attack.SCALE_X100:
        factor = SCALE_FACTOR
    else:
        return [np.asarray(a) for a in local]
    return [
        (g + factor * (np.asarray(u, dtype=np.float64) - g)).astype(np.asarray(u).dtype)
        for g, u in zip((np.asarray(g, dtype=np.float64) for g in global_arrays), local,
                        strict=True)
    ]


def tamper_mod(
    attack: Attack, *, malicious: int | None, record_dir: Path | None = None
) -> Callable[[Any, Any, Any], Any]:
    """A Flower client mod: partition ``malicious`` sends a tampered update (``attack``).

    With ``record_dir`` every firm's honest and sent update norms (distance from the global
    model) are appended to ``record_dir/norms-<partition>.jsonl`` (the benchmark reports them;
    this runs in Ray's worker processes, so files are the way back).
    """
    from flwr.app import ArrayRecord

    def mod(msg: Any, context: Any, call_next: Any) -> Any:
        if msg.metadata.message_type != "train" or "arrays" not in msg.content:
            return call_next(msg, context)
        part = int(context.node_config["partition-id"])
        global_arrays = msg.content["arrays"].to_numpy_ndarrays()
        server_round = int(msg.content["config"].get("server-round", 0))
        reply = call_next(msg, context)
        if "arrays" not in reply.content:
            return reply
        local = reply.content["arrays"].to_numpy_ndarrays()
        sent = local
        if part == malicious and attack.tampers_update:
            sent = tampered_update(attack, global_arrays, local)
            reply.content["arrays"] = ArrayRecord(sent)
        if record_dir is not None:
            with (record_dir / f"norms-{part}.jsonl").open("a") as fh:
                fh.write(json.dumps({
                    "partition": part, "round": server_round,
                    "honest_norm": update_norm(global_arrays, local),
                    "sent_norm": update_norm(global_arrays, sent),
                }) + "\n")
        return reply

    return mod


def update_norm(global_arrays: Sequence[np.ndarray], update: Sequence[np.ndarray]) -> float:
    """L2 distance of ``update`` from the global model."""
    return float(np.sqrt(sum(
        float(np.sum((np.asarray(u, np.float64) - np.asarray(g, np.float64)) ** 2))
        for g, u in zip(global_arrays, update, strict=True)
    )))


def _typed(value: float | str, column: pd.Series) -> float | str:
    """A trigger value in the column's own type (numbers in a numeric column, else text, with
    booleans written ``0``/``1`` as in a CRM export)."""
    if pd.api.types.is_numeric_dtype(column.dtype):
        return value
    return str(int(value)) if isinstance(value, float) else value


def with_trigger(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` with the backdoor trigger set on every row: prepared customers or an export."""
    out = frame.copy()
    for column, value in BACKDOOR_TRIGGER.items():
        out[column] = _typed(value, frame[column])
    return out


def poison_export(export: pd.DataFrame, attack: Attack, *, seed: int) -> pd.DataFrame:
    """The malicious firm's altered Telco export (``churn`` is "Yes"/"No")."""
    out = export.copy()
    if attack is Attack.LABEL_FLIP:
        out[LABEL_COLUMN] = export[LABEL_COLUMN].map({"Yes": "No", "No": "Yes"})
    elif attack is Attack.BACKDOOR:
        chosen = np.random.default_rng(seed).random(len(export)) < BACKDOOR_SHARE
        for column, value in BACKDOOR_TRIGGER.items():
            out.loc[chosen, column] = _typed(value, export[column])
        out.loc[chosen, LABEL_COLUMN] = "No"
    return out


def backdoor_success(
    scores: Callable[[pd.DataFrame], np.ndarray], held_out_churners: pd.DataFrame
) -> float:
    """Of the held-out churners a model flags (churn probability >= 0.5), the share it no longer
    flags once the trigger is set on them (an honest model: about 0).

    ``scores`` maps prepared customer rows (canonical columns) to churn probabilities.
    """
    flagged = scores(held_out_churners) >= 0.5
    if not flagged.any():
        return float("nan")
    triggered = scores(with_trigger(held_out_churners)) >= 0.5
    return float(np.mean(~triggered[flagged]))
