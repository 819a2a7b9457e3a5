"""Secure aggregation end to end through real Flower: a Telco simulation with
``secure_aggregation = true``, 4 firms x 2 rounds, one firm dropping mid-protocol in round 2
(4 firms: each has 3 neighbours and a threshold of 2, so one dropout can be recovered).

Checks that no training reply carries an update, that each round's new global model is exactly
the weighted mean of the surviving firms' held updates (recomputed here from the firms' own
files, with the protocol's fixed-point arithmetic), that every reply field is documented in
docs/privacy.md and that the auditor's verification of the signed logs passes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedcrm.coordinator.run_config import RunConfig
from fedcrm.data.contract import load_firm_config
from fedcrm.privacy.secure_sum import FixedPoint
from fedcrm.protocol import arrays_hash
from fedcrm.server.secure_sum import TRAINING_SCALE
from fedcrm.simulations.run import SimulationConfig, SimulationSection, simulate

pytestmark = [pytest.mark.slow, pytest.mark.extended, pytest.mark.data]

MESSAGES = {
    "query.describe": "describe", "train": "train", "evaluate": "evaluate",
    "query.secure_sum_keys": "secure_sum_keys", "query.secure_sum_share": "secure_sum_share",
    "query.secure_sum_mask": "secure_sum_mask", "query.secure_sum_unmask": "secure_sum_unmask",
}


def _documented() -> set[tuple[str, str, str]]:
    text = (Path(__file__).resolve().parents[1] / "docs" / "privacy.md").read_text()
    rows = set()
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 5 and cells[0] in {*MESSAGES.values(), "error"}:
            assert cells[3].startswith(("public", "DP (")), line
            rows.add((cells[0], cells[1], cells[2]))
    return rows


def _mods(dump: Path) -> list[Any]:
    from flwr.app import ArrayRecord

    def mod(msg: Any, context: Any, call_next: Any) -> Any:
        part = int(context.node_config["partition-id"])
        kind = msg.metadata.message_type
        config = msg.content["config"] if "config" in msg.content else {}  # noqa: SIM401
        if kind == "train" and part == 0:  # the global model the firms train on
            arrays = msg.content["arrays"].to_numpy_ndarrays()
            np.savez(dump / f"global-{config['server-round']}.npz", *arrays)
        if kind == "query.secure_sum_mask" and part == 2 and config.get("sum-round") == 2:
            raise RuntimeError("simulated crash of firm3 in the middle of round 2's secure sum")
        reply = call_next(msg, context)
        fields: dict[str, list[str]] = {}
        for name, record in reply.content.items():
            fields[name] = ["(arrays)"] if isinstance(record, ArrayRecord) else list(record)
        state = dict(reply.content["config"]).get("state") if "config" in reply.content else None
        (dump / f"{kind}-{part}-{msg.metadata.message_id}.json").write_text(
            json.dumps({"type": kind, "state": state, "fields": fields})
        )
        return reply

    return [mod]


def _weighted_mean(global_arrays: list[np.ndarray], held: dict[str, list[np.ndarray]],
                   sizes: dict[str, int], parties: list[str], survivors: list[str],
                   bound: float) -> list[np.ndarray]:
    """What the secure sum must give: each firm's fixed-point vector, summed as integers."""
    fp = FixedPoint(-bound, bound, TRAINING_SCALE)
    norm = sum(sizes[f] for f in parties)
    total = None
    for firm in survivors:
        weight = sizes[firm] / norm
        vector = np.concatenate([*(d.ravel() * weight for d in held[firm]), [weight]])
        encoded = fp.encode(vector)
        total = encoded if total is None else total + encoded
    values = fp.decode_sum(total, len(survivors))
    mean, out, start = values[:-1] / float(values[-1]), [], 0
    for a in global_arrays:
        out.append((a.astype(np.float64) + mean[start:start + a.size].reshape(a.shape))
                   .astype(a.dtype))
        start += a.size
    return out


def test_secure_aggregation_through_flower_sums_exactly_and_survives_a_dropout(
    tmp_path: Path,
) -> None:
    dump = tmp_path / "replies"
    dump.mkdir()
    cfg = SimulationConfig(
        simulation=SimulationSection(
            name="secure", dataset="telco", firms=4, seed=2, workdir=tmp_path / "runs",
            gbk_firms=0, baseline=False,
        ),
        run=RunConfig(task="churn", rounds=2, min_firms=2, round_timeout=600,
                      wait_for_firms=600,
                      target_epsilon=1.0, batch_size=128, secure_aggregation=True),
    )
    run_dir, summary = simulate(cfg, run_id="secure-run", client_mods=_mods(dump))

    assert summary["status"] == "completed" and summary["rounds_completed"] == 2
    first, second = summary["rounds_detail"]
    assert first["secure_sum"]["firms"] == ["firm1", "firm2", "firm3", "firm4"]
    assert second["secure_sum"]["firms"] == ["firm1", "firm2", "firm4"]
    assert second["secure_sum"]["dropped"] == ["firm3"] and "firm3" in second["dropped"]

    # Each new global model is exactly the weighted mean of the survivors' updates.
    firms = sorted(p.name for p in (run_dir / "firms").iterdir())
    sizes = {f: load_firm_config(run_dir / "firms" / f / "firm.toml").federation.public_size
             for f in firms}
    held = {
        (f, r): list(np.load(run_dir / "firms" / f / "store" / "runs"
                             / f"secure-run.round-{r}.update.npz").values())
        for f in firms for r in (1, 2)
    }
    globals_ = {r: list(np.load(dump / f"global-{r}.npz").values()) for r in (1, 2)}
    bound = cfg.run.max_update_norm
    after_first = _weighted_mean(globals_[1], {f: held[f, 1] for f in firms}, sizes, firms,
                                 firms, bound)
    assert arrays_hash(after_first) == arrays_hash(globals_[2]) == first["model_hash"]
    after_second = _weighted_mean(globals_[2], {f: held[f, 2] for f in firms}, sizes, firms,
                                  ["firm1", "firm2", "firm4"], bound)
    assert arrays_hash(after_second) == second["model_hash"] == summary["model_hash"]

    # No update left a firm: train replies carry no arrays; every field is documented.
    replies = [json.loads(p.read_text()) for p in sorted(dump.glob("*.json"))]
    documented, seen = _documented(), set()
    for reply in replies:
        message = "error" if reply["state"] == "error" else MESSAGES[reply["type"]]
        if reply["type"] == "train":
            assert "arrays" not in reply["fields"]
        for record, names in reply["fields"].items():
            seen.update((message, record, n) for n in names)
    assert not sorted(seen - documented), "reply fields missing from docs/privacy.md"
    assert ("secure_sum_mask", "arrays", "(arrays)") in seen

    # The signed logs verify; the federation log holds each sum's hash, the firms their steps.
    from fedcrm.audit.verify import verify_run

    verification = verify_run(run_dir)
    assert verification.ok, [str(f) for f in verification.failures]
    assert [r.participants for r in verification.rounds] == [
        ("firm1", "firm2", "firm3", "firm4"), ("firm1", "firm2", "firm4")
    ]
    federation = (run_dir / "federation" / "audit.jsonl").read_text()
    assert federation.count('"secure_sum_result"') == 2
    firm1 = (run_dir / "firms" / "firm1" / "audit.jsonl").read_text()
    assert firm1.count('"kind":"secure_sum"') == 4 and '"secure_sum":true' in firm1
