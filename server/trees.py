"""The coordinator's side of a DP tree run (``model = "trees"``) over Flower's ``Grid``.

FedAvg's round loop does not fit growing trees, so a tree run has its own loop here; the
algorithm is :mod:`fedcrm.learning.dp_trees` and the messages are
:class:`fedcrm.protocol.TreesRequest` / :class:`~fedcrm.protocol.TreesReply`. For every step of
the run's public schedule (per round: the histograms of each level when splits are chosen by
histograms, then the leaves) the coordinator sends the ensemble so far to every firm still in the
run, sums the firms' noisy (G, H) cells and lets :class:`~fedcrm.learning.dp_trees.TreeGrower`
choose the splits or leaf values. Firms that decline (budget, contract) or fail stop, as in a
FedAvg run; a reply of the wrong shape is rejected. The run's state (firms, rounds, accepted
releases, evaluations) lives in the same :class:`~fedcrm.server.strategies.GuardedStrategy` a
FedAvg run uses, whose DP evaluation is reused unchanged, so summary, provenance and events have
the same shape.
"""

from __future__ import annotations

import math
from logging import WARNING

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.common import log
from flwr.serverapp import Grid

from fedcrm.coordinator.events import (
    FirmDropped,
    FirmHeads,
    FirmStopped,
    RoundStarted,
    RoundTrained,
    UpdateAccepted,
    UpdateRejected,
)
from fedcrm.coordinator.run_config import RunConfig
from fedcrm.coordinator.run_state import FirmState, RoundRecord
from fedcrm.data.encoding import FeatureLayout
from fedcrm.flower.records import to_records, wire_of
from fedcrm.learning.dp_trees import TreeGrower, TreeSchedule
from fedcrm.privacy.errors import FedcrmError
from fedcrm.protocol import (
    ErrorReply,
    MessageKind,
    ReplyState,
    RunSpec,
    TreesReply,
    TreesRequest,
    arrays_hash,
)
from fedcrm.server.strategies import BUDGET_EXHAUSTED, FederationStopped, GuardedStrategy
from fedcrm.tasks.churn import tree_grid


def tree_schedule(cfg: RunConfig, spec: RunSpec) -> TreeSchedule:
    """The run's public schedule, from its feature schema and tree settings (firms derive the
    same one from the same public values)."""
    settings = cfg.tree_settings()
    bins, groups = tree_grid(FeatureLayout.from_json(spec.schema), settings.bins)
    return TreeSchedule(settings, bins, groups, spec.seed)


def _firm(guard: GuardedStrategy, node: int) -> FirmState:
    return guard.firms.get(node) or FirmState(node_id=node, firm=f"node-{node}")


def _decode(msg: Message) -> TreesReply | ErrorReply | str:
    if msg.has_error():
        lines = str(msg.error.reason).strip().splitlines()
        return f"error reply: {lines[-1][:200] if lines else '?'}"
    try:
        wire = wire_of(msg)
        return ErrorReply.decode(wire) or TreesReply.decode(wire)
    except FedcrmError as exc:
        return f"malformed reply: {exc}"


def grow_trees(
    grid: Grid, cfg: RunConfig, spec: RunSpec, guard: GuardedStrategy
) -> tuple[list[np.ndarray], str, str]:
    """Run the tree schedule; returns the finished ensemble's arrays, status and stop reason.

    A run that stops (fewer than ``min_firms`` can continue) keeps the trees of the rounds it
    finished."""
    schedule = tree_schedule(cfg, spec)
    settings = schedule.settings
    grower = TreeGrower(schedule)
    emit = guard.on_event
    finished = 0  # rounds whose leaves are set
    try:
        while not grower.done:
            step = grower.step
            arrays = grower.request()
            connected = set(grid.get_node_ids())
            active = sorted(n for n, f in guard.firms.items()
                            if f.excluded is None and n in connected)
            if len(active) < guard.min_firms:
                raise FederationStopped(
                    f"round {step.round}: only {len(active)} firm(s) can still train, fewer "
                    f"than min_firms={guard.min_firms}"
                )
            record = guard.rounds.get(step.round)
            if record is None:
                record = guard.rounds[step.round] = RoundRecord(step.round)
                record.participants = sorted(guard.firms[n].firm for n in active)
                emit(RoundStarted(round=step.round, firms=tuple(record.participants)))
            request = TreesRequest(spec=spec, settings=settings, server_round=step.round,
                                   level=step.level, arrays=arrays).encode()
            messages = [Message(content=to_records(request), dst_node_id=n,
                                message_type=MessageKind.TREES) for n in active]
            replies = list(grid.send_and_receive(messages, timeout=cfg.round_timeout))
            replies.sort(key=lambda m: _firm(guard, m.metadata.src_node_id).firm)
            total = np.zeros((schedule.cells(step), 2))
            variance = 0.0
            accepted: list[str] = []
            answered: set[int] = set()
            for msg in replies:
                node = msg.metadata.src_node_id
                answered.add(node)
                firm = _firm(guard, node)
                reply = _decode(msg)
                if isinstance(reply, str):
                    record.dropped.append(firm.firm)
                    emit(FirmDropped(round=step.round, firm=firm.firm, node_id=node,
                                     reason=reply))
                    continue
                if isinstance(reply, TreesReply):
                    if reply.audit_head_hash:
                        record.heads[firm.firm] = {"hash": reply.audit_head_hash,
                                                   "length": reply.audit_head_length}
                    firm.epsilon_total = reply.epsilon_total
                    firm.epsilon_cap = reply.epsilon_cap
                    firm.delta = reply.delta
                if isinstance(reply, ErrorReply) or reply.state is not ReplyState.OK:
                    state = ReplyState.ERROR if isinstance(reply, ErrorReply) else reply.state
                    firm.excluded = (BUDGET_EXHAUSTED if state is ReplyState.BUDGET_EXHAUSTED
                                     else f"firm error: {reply.detail}")
                    record.declined.append(
                        {"firm": firm.firm, "state": state.value, "detail": reply.detail})
                    emit(FirmStopped(round=step.round, firm=firm.firm, node_id=node,
                                     state=state.value, detail=reply.detail))
                    log(WARNING, "firm %s (node %d) stops participating: %s", firm.firm, node,
                        reply.detail)
                    continue
                if reply.sums.shape != total.shape or not (
                    math.isfinite(reply.noise_std) and reply.noise_std >= 0
                ):
                    problem = (f"statistics of shape {reply.sums.shape} for round "
                               f"{step.round}, level {step.level}; expected {total.shape}")
                    record.rejected.append({"firm": firm.firm, "node_id": str(node),
                                            "reason": problem})
                    emit(UpdateRejected(round=step.round, firm=firm.firm, node_id=node,
                                        reason=problem))
                    continue
                total += reply.sums
                variance += reply.noise_std**2
                firm.num_examples = reply.num_examples
                accepted.append(firm.firm)
                update_hash = arrays_hash([reply.sums])
                guard.updates.append({"round": step.round, "level": step.level,
                                      "firm": firm.firm, "node_id": node, "hash": update_hash})
                emit(UpdateAccepted(round=step.round, firm=firm.firm, node_id=node,
                                    update_hash=update_hash))
            for node in active:
                if node not in answered:
                    record.dropped.append(guard.firms[node].firm)
                    emit(FirmDropped(round=step.round, firm=guard.firms[node].firm, node_id=node,
                                     reason="no reply before the round timeout"))
            if not accepted:
                raise FederationStopped(
                    f"round {step.round}, level {step.level}: no firm's statistics were usable"
                )
            grower.apply(total, math.sqrt(variance))
            if step.level == schedule.depth:
                _finish_round(grid, cfg, grower, guard, record, accepted)
                finished = step.round
    except FederationStopped as exc:
        log(WARNING, "%s", exc)
        return _finished(grower, finished), "stopped", str(exc)
    return _finished(grower, finished), "completed", ""


def _finished(grower: TreeGrower, rounds: int) -> list[np.ndarray]:
    return grower.ensemble.first(rounds * grower.schedule.per_round).to_arrays()


def _finish_round(grid: Grid, cfg: RunConfig, grower: TreeGrower, guard: GuardedStrategy,
                  record: RoundRecord, accepted: list[str]) -> None:
    """The round's leaves are set: record it, report it and run its DP evaluation if planned.

    As in a FedAvg run, firms evaluate the model they received for training in the round (the
    trees finished before it); the round's own trees are evaluated in a later round, if any."""
    step_round = record.server_round
    record.accepted = list(accepted)
    for firm in guard.firms.values():
        if firm.firm in accepted:
            firm.rounds_trained += 1
    record.model_hash = arrays_hash(_finished(grower, step_round))
    guard.on_event(RoundTrained(
        round=step_round, accepted=tuple(record.accepted), rejected=len(record.rejected),
        dropped=tuple(sorted(set(record.dropped))),
        epsilon={f.firm: round(f.epsilon_total, 4) for f in guard.firms.values()},
        epsilon_cap={f.firm: f.epsilon_cap for f in guard.firms.values()},
    ))
    if record.heads:
        guard.on_event(FirmHeads(round=step_round, heads=dict(record.heads)))
    if step_round in guard.evaluation_rounds:
        guard.global_arrays = _finished(grower, step_round - 1)
        messages = guard.configure_evaluate(step_round, ArrayRecord(guard.global_arrays),
                                            ConfigRecord(), grid)
        replies = grid.send_and_receive(list(messages), timeout=cfg.round_timeout)
        guard.aggregate_evaluate(step_round, replies)
