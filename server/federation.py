"""The coordinator's side of a run over Flower's ``Grid``: describe, admit, train, save.

Called by the ServerApp (simulation or deployment). The messages are the typed ones of
:mod:`fedcrm.protocol`; what they mean for the run is decided in
:mod:`fedcrm.coordinator.run_state`.
Writes into the run directory: ``events.jsonl`` (typed progress events), the signed federation
log, a checkpoint after every completed round, ``model.pt`` (global model with provenance) and
``summary.json``. A ServerApp started for a run folder that holds a checkpoint resumes that run
after its last completed round (a restart of the SuperLink or of the coordinator).
"""

from __future__ import annotations

import time
from logging import WARNING
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, Message
from flwr.common import log
from flwr.serverapp import Grid

from fedcrm.audit.log import EntryKind
from fedcrm.coordinator.app_bundle import installed_release
from fedcrm.coordinator.events import (
    EVENTS,
    EventLog,
    FirmDropped,
    FirmsAdmitted,
    FirmStopped,
    NodesConnected,
    RunFinished,
    RunResumed,
    RunStarted,
)
from fedcrm.coordinator.federation_log import FederationAudit
from fedcrm.coordinator.run_checkpoint import RunCheckpoint, load_checkpoint
from fedcrm.coordinator.run_config import RunConfig
from fedcrm.coordinator.run_state import (
    LAYOUT_MISMATCH,
    Admission,
    FirmState,
    admit,
    provenance,
    restore_firms,
    summary,
)
from fedcrm.coordinator.runs import save_global_model, write_summary
from fedcrm.flower.records import config_record, to_records, wire_of
from fedcrm.learning.settings import ChurnModelKind
from fedcrm.privacy.errors import FedcrmError
from fedcrm.protocol import (
    DescribeReply,
    DescribeRequest,
    ErrorReply,
    MessageKind,
    ReplyState,
    RunSpec,
    arrays_hash,
)
from fedcrm.server.resume import CheckpointedRounds
from fedcrm.server.run_grid import RunGrid
from fedcrm.server.secure_sum import SecureTraining, register_keys
from fedcrm.server.strategies import FederationStopped, GuardedStrategy, build_strategy
from fedcrm.server.trees import grow_trees
from fedcrm.tasks import task_for

#: Seconds between polls for replies in a simulation (Flower's in-memory grid).
SIMULATION_PULL_INTERVAL = 0.01

#: Once ``min_firms`` nodes are connected, the run starts when no further node has connected
#: for this many seconds (firms connecting together - or a simulation registering its nodes
#: while the ServerApp already runs - are not cut off at ``min_firms``).
NODES_SETTLE_SECONDS = 0.3


def _wait_for_nodes(grid: Grid, cfg: RunConfig, events: EventLog) -> list[int]:
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
            events.emit(NodesConnected(count=len(nodes)))
            return nodes
        time.sleep(0.05 if enough else 0.5)


def _polling_grid(grid: Grid, n_nodes: int) -> Grid:
    """Poll for replies sooner than Flower's defaults; in a deployment, name dead firms.

    Flower's in-memory (simulation) grid polls every 0.1 s by default; a round is two exchanges,
    so with a few firms that interval, not the firms' work, sets the pace. One poll scans every
    stored message, so its cost grows with the federation: the interval grows with it (back to
    Flower's 0.1 s at 100 firms). A deployment's grid is wrapped in :class:`RunGrid`.
    """
    if not isinstance(grid, Grid):
        return grid  # a test's or benchmark's in-process grid: nothing to poll
    current = getattr(grid, "pull_interval", None)
    if isinstance(current, float):
        # only Flower's in-memory (simulation) grid has this attribute
        grid.pull_interval = min(  # type: ignore[attr-defined]
            current, max(SIMULATION_PULL_INTERVAL, 0.001 * n_nodes)
        )
        return grid
    return RunGrid(grid)


def _describe(
    grid: Grid, nodes: list[int], cfg: RunConfig, spec: RunSpec, events: EventLog
) -> dict[int, DescribeReply]:
    request = DescribeRequest(task=cfg.task, schema=spec.schema).encode()
    messages = [
        Message(content=to_records(request), dst_node_id=n, message_type=MessageKind.DESCRIBE)
        for n in nodes
    ]
    described: dict[int, DescribeReply] = {}
    for reply in grid.send_and_receive(messages, timeout=cfg.round_timeout):
        node = reply.metadata.src_node_id
        if reply.has_error():
            lines = str(reply.error.reason).strip().splitlines()
            events.emit(FirmDropped(round=0, firm=f"node-{node}", node_id=node,
                                    reason=lines[-1][:200] if lines else "error reply"))
            continue
        try:
            wire = wire_of(reply)
            error = ErrorReply.decode(wire)
            if error is not None:
                events.emit(FirmStopped(round=0, firm=error.firm or f"node-{node}", node_id=node,
                                        state=ReplyState.ERROR.value, detail=error.detail))
                continue
            described[node] = DescribeReply.decode(wire)
        except FedcrmError as exc:
            events.emit(FirmDropped(round=0, firm=f"node-{node}", node_id=node,
                                    reason=f"malformed describe reply: {exc}"))
    return described


def _secure_training(
    grid: Grid, cfg: RunConfig, run_id: str, firms: dict[int, FirmState], events: EventLog
) -> SecureTraining:
    """Collect the admitted firms' signed secure-sum keys; a firm without one stops here."""
    nodes = {f.firm: n for n, f in firms.items() if f.excluded is None}
    keys, failed = register_keys(grid, nodes, run_id=run_id, timeout=cfg.round_timeout)
    for firm, reason in sorted(failed.items()):
        state = firms[nodes[firm]]
        state.excluded = f"no secure-sum key: {reason}"
        events.emit(FirmStopped(round=0, firm=firm, node_id=nodes[firm],
                                state=ReplyState.ERROR.value, detail=state.excluded))
    return SecureTraining(
        run_id=run_id, nodes=nodes, keys=keys, bound=cfg.max_update_norm,
        timeout=cfg.round_timeout, neighbours=cfg.secure_sum_neighbours,
    )


def run_federation(grid: Grid, cfg: RunConfig, *, run_id: str, run_dir: Path) -> dict[str, Any]:
    """Run the whole federation (or resume it after its checkpoint) and write the summary."""
    started = time.time()
    spec = cfg.run_spec(run_id)  # refuses a run that cannot be described to firms
    run_dir.mkdir(parents=True, exist_ok=True)
    checkpoint = load_checkpoint(run_dir)
    if checkpoint is not None and (
        checkpoint.run_id != run_id or checkpoint.config_hash != cfg.config_hash()
    ):
        raise FedcrmError(
            f"{run_dir} holds a checkpoint of run {checkpoint.run_id} with another config; a run "
            "resumes only with the config it started with"
        )
    release = installed_release()
    audit = FederationAudit(run_dir)
    events = EventLog(run_dir / EVENTS, sinks=[audit.record])
    completed, attempt = 0, 0
    if checkpoint is None:
        events.emit(RunStarted(run_id=run_id, task=cfg.task.value, strategy=cfg.aggregation,
                               rounds=cfg.rounds))
    else:
        completed, attempt, started = (
            checkpoint.completed_round, checkpoint.attempt + 1, checkpoint.started
        )
        events.emit(RunResumed(run_id=run_id, completed_round=completed, attempt=attempt))
        audit.append(EntryKind.RUN_RESUMED, {
            "run_id": run_id, "completed_round": completed, "attempt": attempt,
        })
    nodes = _wait_for_nodes(grid, cfg, events)
    grid = _polling_grid(grid, len(nodes))
    described = _describe(grid, nodes, cfg, spec, events)
    admission = admit(described)
    for node, state in admission.firms.items():
        if state.excluded == LAYOUT_MISMATCH:
            events.emit(FirmStopped(round=0, firm=state.firm, node_id=node,
                                    state="layout_mismatch", detail=LAYOUT_MISMATCH))
    if checkpoint is not None:
        restore_firms(admission.firms, checkpoint.firms)
    events.emit(FirmsAdmitted(firms=admission.admitted, layout=admission.layout))
    if checkpoint is None:
        audit.append(
            EntryKind.RUN_STARTED,
            {
                "run_id": run_id,
                "config_hash": cfg.config_hash(),
                "strategy": cfg.aggregation,
                "rounds": cfg.rounds,
                "task": cfg.task.value,
                "firms": {k: str(v) for k, v in admission.admitted.items()},
                "fedcrm_version": release.version,
                "app_hash": release.app_hash,
            },
        )
    task = task_for(cfg.task)
    secure = _secure_training(grid, cfg, run_id, admission.firms, events) if (
        cfg.secure_aggregation
    ) else None
    guard = GuardedStrategy(
        build_strategy(cfg),
        task=task,
        spec=spec,
        evaluation_rounds=cfg.evaluation_rounds(),
        firms=admission.firms,
        min_firms=cfg.min_firms,
        max_update_norm=cfg.max_update_norm,
        max_update_norm_ratio=cfg.max_update_norm_ratio,
        on_event=events.emit,
        secure=secure,
    )
    trees = cfg.model is ChurnModelKind.TREES
    initial: list[np.ndarray] = (
        task.initial_arrays(model=cfg.model, input_dim=admission.input_dim, seed=cfg.seed)
        if admission.input_dim and not trees
        else []
    )
    status, stop_reason = "completed", ""
    if checkpoint is not None:
        guard.rounds.update(checkpoint.rounds)
        guard.updates.extend(dict(u) for u in checkpoint.updates)
        initial = list(checkpoint.arrays)
        if admission.layout != checkpoint.layout or admission.input_dim != checkpoint.input_dim:
            status, stop_reason = "stopped", (
                "after the restart the firms describe another feature layout than the run's"
            )
    final_arrays = initial
    if trees and admission.input_dim:
        final_arrays, status, stop_reason = grow_trees(grid, cfg, spec, guard)
    elif not initial:
        status, stop_reason = "stopped", (
            "no firm described a usable feature layout" if described else
            f"no firm took part: {len(nodes)} node(s) connected, none answered the describe "
            "request (each firm's reason is in the progress above and in events.jsonl)"
        )
    elif status == "completed":
        rounds = CheckpointedRounds(
            guard, completed=completed, initial=initial, run_dir=run_dir,
            snapshot=lambda done, model: _checkpoint(
                run_id=run_id, cfg=cfg, admission=admission, guard=guard, completed=done,
                attempt=attempt, started=started, model=model,
            ),
        )
        try:
            result = rounds.start(
                grid=grid,
                initial_arrays=ArrayRecord(initial),
                num_rounds=cfg.rounds - completed,
                timeout=cfg.round_timeout,
                train_config=config_record(spec.to_config()),
                evaluate_config=config_record(spec.to_config()),
            )
            if result.arrays is not None:
                final_arrays = result.arrays.to_numpy_ndarrays()
        except FederationStopped as exc:
            status, stop_reason = "stopped", str(exc)
            log(WARNING, "%s", exc)
            if any(r.accepted for r in guard.rounds.values()):
                final_arrays = guard.global_arrays or initial  # the last model firms trained on
    model_hash = arrays_hash(final_arrays) if final_arrays else ""
    model_path = (
        save_global_model(
            run_dir, cfg, final_arrays,
            provenance(cfg, run_id=run_id, admission=admission, rounds=guard.rounds,
                       model_hash=model_hash),
        )
        if final_arrays else None
    )
    result_summary = summary(
        cfg, run_id=run_id, status=status, stop_reason=stop_reason,
        firms=list(admission.firms.values()), rounds=guard.rounds, updates=guard.updates,
        model_path=model_path, model_hash=model_hash, started=started, attempts=attempt + 1,
        release={"fedcrm_version": release.version, "app_hash": release.app_hash},
    )
    write_summary(run_dir, result_summary)
    audit.append(
        EntryKind.RUN_FINISHED,
        {
            "status": status,
            "reason": stop_reason,
            "rounds_completed": result_summary["rounds_completed"],
            "model_hash": model_hash,
        },
    )
    audit.close()
    events.emit(RunFinished(status=status, reason=stop_reason, model=result_summary["model"]))
    return result_summary


def _checkpoint(
    *,
    run_id: str,
    cfg: RunConfig,
    admission: Admission,
    guard: GuardedStrategy,
    completed: int,
    attempt: int,
    started: float,
    model: list[np.ndarray],
) -> RunCheckpoint:
    return RunCheckpoint(
        run_id=run_id, config_hash=cfg.config_hash(), completed_round=completed,
        attempt=attempt, started=started, layout=admission.layout,
        input_dim=admission.input_dim, firms=tuple(admission.firms.values()),
        rounds=dict(guard.rounds), updates=tuple(guard.updates), arrays=tuple(model),
    )
