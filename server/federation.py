"""The coordinator's side of a run: admit firms, run the strategy, save a versioned model.

Called by the ServerApp (simulation or deployment) with Flower's ``Grid``. Writes into the run
directory: ``events.jsonl`` (live progress), ``model.pt`` (global model with provenance) and
``summary.json``.
"""

from __future__ import annotations

import copy
import os
import queue
import threading
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
from fedcrm.audit.log import AuditLog, EntryKind, public_key_pem
from fedcrm.coordinator.events import EventLog
from fedcrm.coordinator.run_config import RunConfig
from fedcrm.coordinator.runs import save_global_model, write_summary
from fedcrm.node import arrays_hash, initial_arrays
from fedcrm.privacy.keys import ENV_COORDINATOR_KEY as COORDINATOR_KEY_ENV
from fedcrm.privacy.keys import load_signing_key
from fedcrm.server.strategies import FederationStopped, FirmState, GuardedStrategy, build_strategy

#: Path of the coordinator's Ed25519 signing key (PEM, 0600). An environment variable, never
#: run config: secrets do not travel in the app bundle or the run config.

QUERY = "query"
#: Seconds between polls for replies in a simulation (Flower's in-memory grid).
SIMULATION_PULL_INTERVAL = 0.01


class FederationAudit:
    """The coordinator's signed federation log, fed by the run's progress events.

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
        key_path = os.environ.get(COORDINATOR_KEY_ENV)
        if not key_path:
            log(
                WARNING,
                "%s is not set: this run keeps no signed federation log",
                COORDINATOR_KEY_ENV,
            )
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

    def on_event(self, kind: str, **ev: Any) -> None:
        if kind == "update_accepted":
            self.append(
                EntryKind.UPDATE_ACCEPTED,
                {
                    "round": int(ev["round"]),
                    "firm": str(ev["firm"]),
                    "node_id": str(ev["node_id"]),
                    "update_hash": str(ev["update_hash"]),
                },
            )
        elif kind == "update_rejected":
            self.append(
                EntryKind.UPDATE_REJECTED,
                {
                    "round": int(ev["round"]),
                    "firm": str(ev["firm"]),
                    "node_id": str(ev["node_id"]),
                    "reason": str(ev["reason"]),
                },
            )
        elif kind == "firm_heads":
            self.append(EntryKind.FIRM_HEADS, {"round": int(ev["round"]), "heads": ev["heads"]})
        elif kind == "round_evaluated" and ev.get("model_hash"):
            metrics = {
                k: float(v)
                for k, v in ev.get("pooled", {}).items()
                if isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v)
            }
            self.append(
                EntryKind.GLOBAL_MODEL,
                {
                    "round": int(ev["round"]),
                    "model_hash": str(ev["model_hash"]),
                    "metrics": metrics,
                },
            )


#: Once ``min_firms`` nodes are connected, the run starts when no further node has connected
#: for this many seconds (firms connecting together - or a simulation registering its nodes
#: while the ServerApp already runs - are not cut off at ``min_firms``).
NODES_SETTLE_SECONDS = 0.3


def _wait_for_nodes(grid: Grid, cfg: RunConfig, events: _AuditedEvents) -> list[int]:
    deadline = time.monotonic() + cfg.wait_for_firms
    settled_at: float | None = None
    nodes: list[int] = []
    while True:
        now = time.monotonic()
        current = list(grid.get_node_ids())
        if len(current) != len(nodes):
            nodes, settled_at = current, now
        enough = len(nodes) >= max(cfg.min_firms, cfg.expected_firms)
        if (
            enough and settled_at is not None and now - settled_at >= NODES_SETTLE_SECONDS
        ) or now > deadline:
            events.emit("nodes_connected", count=len(nodes))
            return nodes
        time.sleep(0.05 if enough else 0.5)


def _tune_simulation_polling(grid: Grid, n_nodes: int) -> None:
    """Poll Flower's in-memory (simulation) grid for replies sooner in small federations.

    It polls every 0.1 s by default; a round is two exchanges, so with a few firms that interval,
    not the firms' work, sets the pace. One poll scans every stored message, so its cost grows
    with the federation: the interval grows with it (back to Flower's 0.1 s at 100 firms).
    """
    current = getattr(grid, "pull_interval", None)
    if isinstance(current, float):
        # only Flower's in-memory (simulation) grid has this attribute
        grid.pull_interval = min(  # type: ignore[attr-defined]
            current, max(SIMULATION_PULL_INTERVAL, 0.001 * n_nodes)
        )


def _describe(
    grid: Grid, nodes: list[int], cfg: RunConfig, events: _AuditedEvents
) -> dict[int, dict[str, Any]]:
    messages = [
        Message(
            content=RecordDict({"config": ConfigRecord({"task": cfg.task.value})}),
            dst_node_id=n,
            message_type=QUERY,
        )
        for n in nodes
    ]
    info: dict[int, dict[str, Any]] = {}
    for reply in grid.send_and_receive(messages, timeout=cfg.round_timeout):
        node = reply.metadata.src_node_id
        if reply.has_error():
            lines = str(reply.error.reason).strip().splitlines()
            events.emit(
                "firm_dropped",
                round=0,
                node_id=node,
                reason=lines[-1][:200] if lines else "error reply",
            )
            continue
        if "describe" in reply.content:
            info[node] = dict(reply.content["describe"])
        elif "status" in reply.content:
            detail = str(reply.content["status"].get("detail", ""))
            events.emit(
                "firm_stopped",
                round=0,
                node_id=node,
                state="error",
                detail=detail,
                firm=f"node-{node}",
            )
    return info


def run_federation(grid: Grid, cfg: RunConfig, *, run_id: str, run_dir: Path) -> dict[str, Any]:
    """Run the whole federation and write the summary; returns it."""
    started = time.time()
    run_dir.mkdir(parents=True, exist_ok=True)
    audit = FederationAudit(run_dir)
    events = _AuditedEvents(EventLog(run_dir / "events.jsonl"), audit)
    events.emit(
        "run_started",
        run_id=run_id,
        task=cfg.task.value,
        strategy=cfg.strategy.value,
        rounds=cfg.rounds,
    )
    nodes = _wait_for_nodes(grid, cfg, events)
    _tune_simulation_polling(grid, len(nodes))
    info = _describe(grid, nodes, cfg, events)
    layouts = Counter((str(i.get("layout")), int(i.get("input-dim", 0))) for i in info.values())
    firms: dict[int, FirmState] = {}
    if layouts:
        (layout, input_dim), _ = layouts.most_common(1)[0]
        for node, i in info.items():
            state = FirmState(node_id=node, firm=str(i.get("firm", f"node-{node}")))
            if (str(i.get("layout")), int(i.get("input-dim", 0))) != (layout, input_dim):
                state.excluded = "feature layout differs from the federation's"
                events.emit(
                    "firm_stopped",
                    round=0,
                    firm=state.firm,
                    node_id=node,
                    state="layout_mismatch",
                    detail=state.excluded,
                )
            firms[node] = state
    else:
        layout, input_dim = "", 0
    admitted = {f.firm: n for n, f in firms.items() if not f.excluded}
    events.emit("firms_admitted", firms=admitted, layout=layout)
    audit.append(
        EntryKind.RUN_STARTED,
        {
            "run_id": run_id,
            "config_hash": cfg.config_hash(),
            "strategy": cfg.strategy.value,
            "rounds": cfg.rounds,
            "task": cfg.task.value,
            "firms": {k: str(v) for k, v in admitted.items()},
        },
    )
    spec = cfg.round_spec(run_id)
    update_hashes: list[dict[str, Any]] = []

    def on_update(server_round: int, firm: FirmState, update: list[np.ndarray]) -> None:
        update_hashes.append(
            {
                "round": server_round,
                "firm": firm.firm,
                "node_id": firm.node_id,
                "hash": arrays_hash(update),
            }
        )

    guard = GuardedStrategy(
        build_strategy(cfg),
        firms=firms,
        min_firms=cfg.min_firms,
        max_update_norm=cfg.max_update_norm,
        on_event=events.emit,
        on_update=on_update,
    )
    arrays = (
        initial_arrays(cfg.task, model=cfg.model.value, input_dim=max(input_dim, 1), seed=cfg.seed)
        if input_dim
        else []
    )
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
        (
            guard.rounds[r].metrics
            for r in sorted(guard.rounds, reverse=True)
            if guard.rounds[r].metrics
        ),
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
                "delta": f.delta,
                "epsilon_budget": f.epsilon_cap,
                "num_examples": f.num_examples,
                "rounds_trained": f.rounds_trained,
                "stopped": f.excluded,
            }
            for f in sorted(firms.values(), key=lambda s: s.firm)
        ],
        # Headline metrics at the top level (pooled held-out set: "auc" for churn, the trend
        # errors for trend), plus the pooled and per-firm breakdowns.
        "metrics": {
            **{k: v for k, v in last_metrics.get("pooled", {}).items() if k != "num_examples"},
            **last_metrics,
        },
        "rounds_detail": [asdict(r) for _, r in sorted(guard.rounds.items())],
        "updates": update_hashes,
        "model": str(model_path) if model_path else None,
        "model_hash": model_hash,
        "config": cfg.model_dump(mode="json"),
        "config_hash": cfg.config_hash(),
        "wall_seconds": round(time.time() - started, 3),
    }
    write_summary(run_dir, summary)
    audit.append(
        EntryKind.RUN_FINISHED,
        {
            "status": status,
            "reason": stop_reason,
            "rounds_completed": last_round,
            "model_hash": model_hash,
        },
    )
    audit.close()
    events.emit("run_finished", status=status, reason=stop_reason, model=summary["model"])
    return summary


class _AuditedEvents:
    """Progress events that also feed the federation audit log."""

    def __init__(self, events: EventLog, audit: FederationAudit) -> None:
        self._events = events
        self._audit = audit

    def emit(self, kind: str, **fields: Any) -> None:
        self._events.emit(kind, **fields)
        self._audit.on_event(kind, **fields)


def _latest_arrays(guard: GuardedStrategy, fallback: list[np.ndarray]) -> list[np.ndarray]:
    return guard._global or fallback  # the last global model the firms trained on
