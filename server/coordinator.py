"""The coordinator's side of a run: admit firms, run the strategy, save a versioned model.

Called by the ServerApp (simulation or deployment) with Flower's ``Grid``. Writes into the run
directory: ``events.jsonl`` (live progress), ``model.pt`` (global model with provenance) and
``summary.json``.
"""

from __future__ import annotations

import hashlib
import time
from collections import Counter
from dataclasses import asdict
from logging import WARNING
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.common import log
from flwr.serverapp import Grid

import fedcrm
from fedcrm.federation import initial_arrays
from fedcrm.progress import EventLog
from fedcrm.run_config import RunConfig
from fedcrm.runs import save_global_model, write_summary
from server.strategies import FederationStopped, FirmState, GuardedStrategy, build_strategy

QUERY = "query"


def arrays_hash(arrays: list[np.ndarray]) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(str(a.dtype).encode() + str(a.shape).encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def _wait_for_nodes(grid: Grid, cfg: RunConfig, events: EventLog) -> list[int]:
    deadline = time.monotonic() + cfg.wait_for_firms
    while True:
        nodes = list(grid.get_node_ids())
        if len(nodes) >= cfg.min_firms or time.monotonic() > deadline:
            events.emit("nodes_connected", count=len(nodes))
            return nodes
        time.sleep(0.5)


def _describe(grid: Grid, nodes: list[int], cfg: RunConfig, events: EventLog) -> dict[int, dict[str, Any]]:
    messages = [
        Message(content=RecordDict({"config": ConfigRecord({"task": cfg.task.value})}),
                dst_node_id=n, message_type=QUERY)
        for n in nodes
    ]
    info: dict[int, dict[str, Any]] = {}
    for reply in grid.send_and_receive(messages, timeout=cfg.round_timeout):
        node = reply.metadata.src_node_id
        if reply.has_error():
            events.emit("firm_dropped", round=0, node_id=node, reason=reply.error.reason)
            continue
        if "describe" in reply.content:
            info[node] = dict(reply.content["describe"])
        elif "status" in reply.content:
            detail = str(reply.content["status"].get("detail", ""))
            events.emit("firm_stopped", round=0, node_id=node, state="error", detail=detail,
                        firm=f"node-{node}")
    return info


def run_federation(grid: Grid, cfg: RunConfig, *, run_id: str, run_dir: Path) -> dict[str, Any]:
    """Run the whole federation and write the summary; returns it."""
    started = time.time()
    run_dir.mkdir(parents=True, exist_ok=True)
    events = EventLog(run_dir / "events.jsonl")
    events.emit("run_started", run_id=run_id, task=cfg.task.value, strategy=cfg.strategy.value,
                rounds=cfg.rounds)
    nodes = _wait_for_nodes(grid, cfg, events)
    info = _describe(grid, nodes, cfg, events)
    layouts = Counter((str(i.get("layout")), int(i.get("input-dim", 0))) for i in info.values())
    firms: dict[int, FirmState] = {}
    if layouts:
        (layout, input_dim), _ = layouts.most_common(1)[0]
        for node, i in info.items():
            state = FirmState(node_id=node, firm=str(i.get("firm", f"node-{node}")))
            if (str(i.get("layout")), int(i.get("input-dim", 0))) != (layout, input_dim):
                state.excluded = "feature layout differs from the federation's"
                events.emit("firm_stopped", round=0, firm=state.firm, node_id=node,
                            state="layout_mismatch", detail=state.excluded)
            firms[node] = state
    else:
        layout, input_dim = "", 0
    events.emit("firms_admitted", firms={f.firm: n for n, f in firms.items() if not f.excluded},
                layout=layout)
    spec = cfg.round_spec(run_id)
    update_hashes: list[dict[str, Any]] = []

    def on_update(server_round: int, firm: FirmState, update: list[np.ndarray]) -> None:
        update_hashes.append({"round": server_round, "firm": firm.firm, "node_id": firm.node_id,
                              "hash": arrays_hash(update)})

    guard = GuardedStrategy(
        build_strategy(cfg),
        firms=firms,
        min_firms=cfg.min_firms,
        max_update_norm=cfg.max_update_norm,
        on_event=events.emit,
        on_update=on_update,
    )
    arrays = initial_arrays(cfg.task, model=cfg.model.value, input_dim=max(input_dim, 1),
                            seed=cfg.seed) if input_dim else []
    status = "completed"
    stop_reason = ""
    final_arrays = arrays
    if not arrays:
        status, stop_reason = "stopped", "no firm described a usable feature layout"
    else:
        try:
            result = guard.start(
                grid=grid,
                initial_arrays=ArrayRecord(arrays),
                num_rounds=cfg.rounds,
                timeout=cfg.round_timeout,
                train_config=ConfigRecord(spec.to_config()),
                evaluate_config=ConfigRecord(spec.to_config()),
            )
            if result.arrays is not None:
                final_arrays = result.arrays.to_numpy_ndarrays()
        except FederationStopped as exc:
            status, stop_reason = "stopped", str(exc)
            log(WARNING, "%s", exc)
            last = [r for r in guard.rounds.values() if r.accepted]
            final_arrays = _latest_arrays(guard, arrays) if last else arrays
    last_round = max(guard.rounds) if guard.rounds else 0
    last_metrics = next(
        (guard.rounds[r].metrics for r in sorted(guard.rounds, reverse=True) if guard.rounds[r].metrics),
        {},
    )
    model_hash = arrays_hash(final_arrays) if final_arrays else ""
    provenance = {
        "run_id": run_id,
        "task": cfg.task.value,
        "model": cfg.model.value,
        "strategy": cfg.strategy.value,
        "rounds": cfg.rounds,
        "rounds_completed": last_round,
        "config_hash": cfg.config_hash(),
        "fedcrm_version": fedcrm.__version__,
        "layout_fingerprint": layout,
        "input_dim": input_dim,
        "firms": sorted(f.firm for f in firms.values() if f.rounds_trained),
        "epsilon": {f.firm: f.epsilon_total for f in firms.values()},
        "metrics": last_metrics.get("pooled", {}),
        "model_hash": model_hash,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    model_path = save_global_model(run_dir, cfg, final_arrays, provenance) if final_arrays else None
    summary = {
        "run_id": run_id,
        "task": cfg.task.value,
        "strategy": cfg.strategy.value,
        "rounds": cfg.rounds,
        "rounds_completed": last_round,
        "status": status,
        "stop_reason": stop_reason,
        "firms": [
            {
                "firm": f.firm,
                "node_id": f.node_id,
                "epsilon": f.epsilon_total,
                "delta": None,
                "epsilon_budget": f.epsilon_cap,
                "num_examples": f.num_examples,
                "rounds_trained": f.rounds_trained,
                "stopped": f.excluded,
            }
            for f in sorted(firms.values(), key=lambda s: s.firm)
        ],
        "metrics": last_metrics,
        "rounds_detail": [asdict(r) for _, r in sorted(guard.rounds.items())],
        "updates": update_hashes,
        "model": str(model_path) if model_path else None,
        "model_hash": model_hash,
        "config": cfg.model_dump(mode="json"),
        "config_hash": cfg.config_hash(),
        "wall_seconds": round(time.time() - started, 3),
    }
    write_summary(run_dir, summary)
    events.emit("run_finished", status=status, reason=stop_reason, model=summary["model"])
    return summary


def _latest_arrays(guard: GuardedStrategy, fallback: list[np.ndarray]) -> list[np.ndarray]:
    return guard._global or fallback  # the last global model the firms trained on
