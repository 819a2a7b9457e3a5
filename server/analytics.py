"""The coordinator's side of a federated DP query over Flower's ``Grid``.

1. **offer** the query to every connected firm (``query.offer``); each says whether it will
   answer - its policy, columns, data and budget checked - spending nothing;
2. if at least ``min_firms`` accept, ask them to **answer** (``query.answer``): each releases its
   noisy vector through its ledger; fewer than ``min_firms`` answers and no result is published;
3. **sum** the answers, derive the estimates and their intervals
   (:mod:`fedcrm.analytics.estimates`) and write ``result.json``, ``result.md`` and the figures.

The signed federation log records the query (``query_started``: the spec and who was offered
it) and its result (``query_result``: who answered, each answer's hash, the sum's hash and the
result's hash); each firm's own log records its release and its answer's hash.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from flwr.app import Message
from flwr.serverapp import Grid

from fedcrm.analytics.estimates import Totals, estimate
from fedcrm.analytics.statistics import layout
from fedcrm.audit.log import EntryKind
from fedcrm.coordinator.events import (
    EVENTS,
    EventLog,
    FirmDropped,
    FirmStopped,
    NodesConnected,
    RunFinished,
    RunStarted,
)
from fedcrm.coordinator.federation_log import FederationAudit
from fedcrm.coordinator.query_run import QueryRunConfig, result_hash, result_table, write_result
from fedcrm.flower.records import to_records, wire_of
from fedcrm.privacy.errors import FedcrmError
from fedcrm.protocol import (
    ErrorReply,
    MessageKind,
    QueryAnswer,
    QueryAnswerRequest,
    QueryOffer,
    QueryOfferReply,
    ReplyState,
    Wire,
)
from fedcrm.server.federation import NODES_SETTLE_SECONDS, _tune_simulation_polling

R = TypeVar("R")

#: Stage numbers in events: 0 = offer, 1 = answer.
OFFER, ANSWER = 0, 1


def _wait_for_nodes(grid: Grid, *, needed: int, wait_for: float, events: EventLog) -> list[int]:
    """The connected nodes once ``needed`` have settled (or after ``wait_for`` seconds)."""
    deadline = time.monotonic() + wait_for
    settled_at: float | None = None
    nodes: list[int] = []
    while True:
        now = time.monotonic()
        current = list(grid.get_node_ids())
        if len(current) != len(nodes):
            nodes, settled_at = current, now
        enough = len(nodes) >= needed
        if (enough and settled_at is not None and now - settled_at >= NODES_SETTLE_SECONDS) or (
            now > deadline
        ):
            events.emit(NodesConnected(count=len(nodes)))
            return nodes
        time.sleep(0.05 if enough else 0.5)


def _exchange(
    grid: Grid, wires: dict[int, Wire], kind: MessageKind, *, timeout: float, stage: int,
    decode: Callable[[Wire], R], events: EventLog,
) -> dict[int, R]:
    """Send one message per node and decode the replies; failures become events."""
    messages = [Message(content=to_records(w), dst_node_id=n, message_type=kind.value)
                for n, w in wires.items()]
    replies: dict[int, R] = {}
    heard: set[int] = set()
    for reply in grid.send_and_receive(messages, timeout=timeout):
        node = reply.metadata.src_node_id
        heard.add(node)
        if reply.has_error():
            lines = str(reply.error.reason).strip().splitlines()
            events.emit(FirmDropped(round=stage, firm=f"node-{node}", node_id=node,
                                    reason=lines[-1][:200] if lines else "error reply"))
            continue
        try:
            wire = wire_of(reply)
            error = ErrorReply.decode(wire)
            if error is not None:
                events.emit(FirmStopped(round=stage, firm=error.firm or f"node-{node}",
                                        node_id=node, state=ReplyState.ERROR.value,
                                        detail=error.detail))
                continue
            replies[node] = decode(wire)
        except FedcrmError as exc:
            events.emit(FirmDropped(round=stage, firm=f"node-{node}", node_id=node,
                                    reason=f"malformed reply: {exc}"))
    for node in sorted(set(wires) - heard):
        events.emit(FirmDropped(round=stage, firm=f"node-{node}", node_id=node,
                                reason=f"no reply within {timeout:g} s"))
    return replies


def run_query(grid: Grid, cfg: QueryRunConfig, *, run_id: str, run_dir: Path) -> dict[str, Any]:
    """Offer, answer, sum, estimate, write; returns the result (also in ``result.json``)."""
    started = time.time()
    spec = cfg.query
    if cfg.coordinator.secure_sum:
        raise FedcrmError("secure_sum queries need the secure-sum protocol, which this "
                          "coordinator does not have yet; set [coordinator] secure_sum = false")
    shape = layout(spec, secure=cfg.coordinator.secure_sum)
    run_dir.mkdir(parents=True, exist_ok=True)
    audit = FederationAudit(run_dir)
    events = EventLog(run_dir / EVENTS, sinks=[audit.record])
    mode = "secure_sum" if cfg.coordinator.secure_sum else "plain"
    events.emit(RunStarted(run_id=run_id, task=f"query:{spec.kind.value}", strategy=mode,
                           rounds=1))
    nodes = _wait_for_nodes(grid, needed=max(spec.min_firms, cfg.coordinator.expected_firms),
                            wait_for=cfg.coordinator.wait_for_firms, events=events)
    _tune_simulation_polling(grid, len(nodes))
    timeout = cfg.coordinator.timeout
    offer = QueryOffer(query_id=run_id, spec=spec.canonical_json(),
                       secure=cfg.coordinator.secure_sum)
    offers = _exchange(grid, {n: offer.encode() for n in nodes}, MessageKind.QUERY_OFFER,
                       timeout=timeout, stage=OFFER, decode=QueryOfferReply.decode,
                       events=events)
    accepted: dict[int, str] = {}
    declined: dict[str, str] = {}
    for node, r in offers.items():
        if r.state is ReplyState.OK:
            accepted[node] = r.firm
        else:
            declined[r.firm] = r.detail
            events.emit(FirmStopped(round=OFFER, firm=r.firm, node_id=node,
                                    state=r.state.value, detail=r.detail))
    audit.append(EntryKind.QUERY_STARTED, {
        "query_id": run_id, "query": spec.name, "fingerprint": spec.fingerprint(),
        "spec": spec.canonical_json(), "firms": sorted(accepted.values()),
    })
    answers: dict[int, QueryAnswer] = {}
    status, reason = "completed", ""
    if len(accepted) < spec.min_firms:
        status = "not_enough_firms"
        reason = (f"{len(accepted)} firm(s) accepted the query, fewer than min_firms="
                  f"{spec.min_firms}; no firm was asked to answer, nothing was spent")
    else:
        request = QueryAnswerRequest(query_id=run_id, spec=spec.canonical_json(),
                                     secure=cfg.coordinator.secure_sum)
        replies = _exchange(grid, {n: request.encode() for n in accepted},
                            MessageKind.QUERY_ANSWER, timeout=timeout, stage=ANSWER,
                            decode=QueryAnswer.decode, events=events)
        for node, a in replies.items():
            if a.state is not ReplyState.OK:
                events.emit(FirmStopped(round=ANSWER, firm=a.firm, node_id=node,
                                        state=a.state.value, detail=a.detail))
            elif len(a.values) != shape.length or a.firm != accepted[node]:
                events.emit(FirmDropped(round=ANSWER, firm=accepted[node], node_id=node,
                                        reason=f"answer of {len(a.values)} values does not fit "
                                        f"the query's layout of {shape.length}"))
            else:
                answers[node] = a
        if len(answers) < spec.min_firms:
            status = "not_enough_answers"
            reason = (f"{len(answers)} firm(s) answered, fewer than min_firms={spec.min_firms}; "
                      "no result is published (the firms that answered spent their ε)")
    estimates = []
    total_hash = ""
    answer_hashes: dict[str, str] = {}
    if status == "completed":
        vectors = [np.asarray(a.values, dtype=np.int64) for a in answers.values()]
        total = np.asarray(np.sum(vectors, axis=0, dtype=np.int64))
        total_hash = hashlib.sha256(total.tobytes()).hexdigest()
        variance = float(sum(a.noise_std ** 2 for a in answers.values()))
        estimates = estimate(spec, Totals.from_sum(spec, total, variance,
                                                   secure=cfg.coordinator.secure_sum),
                             seed=cfg.coordinator.seed)
        answer_hashes = {
            a.firm: hashlib.sha256(np.asarray(a.values, dtype=np.int64).tobytes()).hexdigest()
            for a in answers.values()
        }
    result: dict[str, Any] = {
        "query_id": run_id, "run_id": run_id, "status": status, "stop_reason": reason,
        "query": spec.model_dump(mode="json"), "mode": mode,
        "offered_to": len(nodes), "accepted": sorted(accepted.values()),
        "declined": declined,
        "answered_by": sorted(a.firm for a in answers.values()),
        "epsilon": {a.firm: a.epsilon for a in answers.values()},
        "epsilon_total": {a.firm: a.epsilon_total for a in answers.values()},
        "noise_std_grid_units": {a.firm: a.noise_std for a in answers.values()},
        "estimates": [e.to_json() for e in estimates],
        "result_hash": result_hash(estimates) if estimates else "",
        "seconds": round(time.time() - started, 3),
    }
    files = write_result(run_dir, result, spec, estimates)
    result["files"] = files
    audit.append(EntryKind.QUERY_RESULT, {
        "query_id": run_id, "status": status, "answers": answer_hashes, "sum_hash": total_hash,
        "result_hash": result["result_hash"],
    })
    audit.close()
    events.emit(RunFinished(status=status, reason=reason, model=None))
    result["table"] = result_table(spec, estimates) if estimates else ""
    return result
