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
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from flwr.app import Message
from flwr.serverapp import Grid

from fedcrm.analytics.estimates import Totals, estimate
from fedcrm.analytics.statistics import layout
from fedcrm.answering import (
    NOISE_TAIL,
    QUERY_SUM,
    answer_hash,
    noise_fraction,
    noise_multiplier,
)
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
from fedcrm.privacy.errors import FedcrmError, SumAborted
from fedcrm.privacy.secure_sum import FixedPoint, SumId, SumSpec
from fedcrm.protocol import (
    ErrorReply,
    MessageKind,
    QueryAnswer,
    QueryAnswerRequest,
    QueryOffer,
    QueryOfferReply,
    ReplyState,
    SecureSumQuery,
    SumInput,
    Wire,
)
from fedcrm.server.federation import NODES_SETTLE_SECONDS, _polling_grid
from fedcrm.server.secure_sum import register_keys, secure_sum

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


@dataclass(frozen=True)
class Answers:
    """What the answer step produced: the summed vector (None without a result), its noise
    variance (grid units²), and per firm what it reported."""

    status: str
    reason: str
    total: np.ndarray | None = None
    variance: float = 0.0
    sum_hash: str = ""
    answer_hashes: Mapping[str, str] = field(default_factory=dict)  # "" for a secure answer
    epsilon: Mapping[str, float] = field(default_factory=dict)
    epsilon_total: Mapping[str, float] = field(default_factory=dict)
    noise_std: Mapping[str, float] = field(default_factory=dict)


def _plain_answers(grid: Grid, cfg: QueryRunConfig, *, run_id: str, accepted: dict[int, str],
                   events: EventLog) -> Answers:
    """Each firm sends its noisy answer; the coordinator adds them up."""
    spec = cfg.query
    shape = layout(spec)
    request = QueryAnswerRequest(query_id=run_id, spec=spec.canonical_json(), secure=False)
    replies = _exchange(grid, {n: request.encode() for n in accepted}, MessageKind.QUERY_ANSWER,
                        timeout=cfg.coordinator.timeout, stage=ANSWER,
                        decode=QueryAnswer.decode, events=events)
    answers: dict[int, QueryAnswer] = {}
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
    epsilon = {a.firm: a.epsilon for a in answers.values()}
    epsilon_total = {a.firm: a.epsilon_total for a in answers.values()}
    noise_std = {a.firm: a.noise_std for a in answers.values()}
    if len(answers) < spec.min_firms:
        return Answers(
            "not_enough_answers",
            f"{len(answers)} firm(s) answered, fewer than min_firms={spec.min_firms}; no result "
            "is published (the firms that answered spent their ε)",
            epsilon=epsilon, epsilon_total=epsilon_total, noise_std=noise_std,
        )
    vectors = [np.asarray(a.values, dtype=np.int64) for a in answers.values()]
    total = np.asarray(np.sum(vectors, axis=0, dtype=np.int64))
    return Answers(
        "completed", "", total=total,
        variance=float(sum(a.noise_std ** 2 for a in answers.values())),
        sum_hash=hashlib.sha256(total.tobytes()).hexdigest(),
        answer_hashes={a.firm: answer_hash(np.asarray(a.values, dtype=np.int64))
                       for a in answers.values()},
        epsilon=epsilon, epsilon_total=epsilon_total, noise_std=noise_std,
    )


def _secure_answers(grid: Grid, cfg: QueryRunConfig, *, run_id: str, accepted: dict[int, str],
                    sizes: Mapping[str, int], events: EventLog,
                    audit: FederationAudit) -> Answers:
    """The firms' answers go into one secure sum: the coordinator sees only their total.

    Each firm adds 1/min_firms of the noise variance and refuses to help open a sum of fewer
    than min_firms firms, so whatever total the coordinator can see carries the full noise.
    """
    spec = cfg.query
    shape = layout(spec, secure=True)
    firm_nodes = {firm: node for node, firm in accepted.items()}
    keys, failed = register_keys(grid, firm_nodes, run_id=run_id, timeout=cfg.coordinator.timeout)
    for firm, why in failed.items():
        events.emit(FirmDropped(round=ANSWER, firm=firm, node_id=firm_nodes[firm],
                                reason=f"no secure-sum key: {why}"))
    parties = tuple(sorted(keys))
    if len(parties) < spec.min_firms:
        return Answers("not_enough_firms",
                       f"{len(parties)} firm(s) registered a secure-sum key, fewer than "
                       f"min_firms={spec.min_firms}; nothing was spent")
    noise_std = noise_multiplier(spec.epsilon, spec.delta) * shape.l2_sensitivity * math.sqrt(
        noise_fraction(spec, secure=True))
    bound = max(
        shape.resolution * max(sizes[f] for f in parties) + NOISE_TAIL * noise_std, 1.0
    )
    sum_spec = SumSpec(
        sum_id=SumId(run_id, 0, QUERY_SUM), parties=parties, length=shape.length,
        fixed_point=FixedPoint(-float(math.ceil(bound)), float(math.ceil(bound)), 1),
        neighbours=cfg.coordinator.secure_sum_neighbours,
    )
    query = SecureSumQuery(sum_spec, SumInput.QUERY_ANSWER, query_spec=spec.canonical_json())

    def on_drop(firm: str, node: int, reason: str) -> None:
        events.emit(FirmDropped(round=ANSWER, firm=firm, node_id=node, reason=reason))

    try:
        result = secure_sum(grid, query, nodes=firm_nodes, keys=keys,
                            timeout=cfg.coordinator.timeout, on_drop=on_drop, confirm=True)
    except SumAborted as exc:
        return Answers("not_enough_answers",
                       f"the secure sum did not open ({exc}); no result is published (the firms "
                       "that masked their answers spent their ε)")
    audit.append(EntryKind.SECURE_SUM_RESULT, {
        "run_id": run_id, "round": 0, "query": QUERY_SUM, "spec_hash": sum_spec.digest(),
        "firms": list(result.survivors), "dropped": list(result.dropped),
        "sum_hash": result.sum_hash,
    })
    if len(result.survivors) < spec.min_firms:  # the firms refuse to open such a sum
        return Answers("not_enough_answers",
                       f"{len(result.survivors)} firm(s) in the sum, fewer than min_firms")
    total = np.rint(np.asarray(result.values, dtype=np.float64)).astype(np.int64)
    return Answers(
        "completed", "", total=total,
        variance=len(result.survivors) * noise_std**2, sum_hash=result.sum_hash,
        answer_hashes={f: "" for f in result.survivors},
        epsilon={f: spec.epsilon for f in result.survivors},  # accounted (worst case), query δ
        noise_std={f: noise_std for f in result.survivors},
    )


def run_query(grid: Grid, cfg: QueryRunConfig, *, run_id: str, run_dir: Path) -> dict[str, Any]:
    """Offer, answer, sum, estimate, write; returns the result (also in ``result.json``)."""
    started = time.time()
    spec = cfg.query
    run_dir.mkdir(parents=True, exist_ok=True)
    audit = FederationAudit(run_dir)
    events = EventLog(run_dir / EVENTS, sinks=[audit.record])
    mode = "secure_sum" if cfg.coordinator.secure_sum else "plain"
    events.emit(RunStarted(run_id=run_id, task=f"query:{spec.kind.value}", strategy=mode,
                           rounds=1))
    nodes = _wait_for_nodes(grid, needed=max(spec.min_firms, cfg.coordinator.expected_firms),
                            wait_for=cfg.coordinator.wait_for_firms, events=events)
    grid = _polling_grid(grid, len(nodes))
    timings = {"wait_for_firms": time.time() - started}
    timeout = cfg.coordinator.timeout
    offer = QueryOffer(query_id=run_id, spec=spec.canonical_json(),
                       secure=cfg.coordinator.secure_sum)
    offers = _exchange(grid, {n: offer.encode() for n in nodes}, MessageKind.QUERY_OFFER,
                       timeout=timeout, stage=OFFER, decode=QueryOfferReply.decode,
                       events=events)
    accepted: dict[int, str] = {}
    sizes: dict[str, int] = {}
    declined: dict[str, str] = {}
    for node, r in offers.items():
        if r.state is ReplyState.OK:
            accepted[node] = r.firm
            sizes[r.firm] = r.public_size
        else:
            declined[r.firm] = r.detail
            events.emit(FirmStopped(round=OFFER, firm=r.firm, node_id=node,
                                    state=r.state.value, detail=r.detail))
    timings["offer"] = time.time() - started - sum(timings.values())
    audit.append(EntryKind.QUERY_STARTED, {
        "query_id": run_id, "query": spec.name, "fingerprint": spec.fingerprint(),
        "spec": spec.canonical_json(), "firms": sorted(accepted.values()),
    })
    outcome: Answers | None = None
    status, reason = "completed", ""
    if len(accepted) < spec.min_firms:
        status = "not_enough_firms"
        reason = (f"{len(accepted)} firm(s) accepted the query, fewer than min_firms="
                  f"{spec.min_firms}; no firm was asked to answer, nothing was spent")
    else:
        if cfg.coordinator.secure_sum:
            outcome = _secure_answers(grid, cfg, run_id=run_id, accepted=accepted,
                                      sizes=sizes, events=events, audit=audit)
        else:
            outcome = _plain_answers(grid, cfg, run_id=run_id, accepted=accepted, events=events)
        status, reason = outcome.status, outcome.reason
    timings["answer"] = time.time() - started - sum(timings.values())
    estimates = []
    if status == "completed":
        assert outcome is not None and outcome.total is not None
        estimates = estimate(spec, Totals.from_sum(spec, outcome.total, outcome.variance,
                                                   secure=cfg.coordinator.secure_sum),
                             seed=cfg.coordinator.seed)
    result: dict[str, Any] = {
        "query_id": run_id, "run_id": run_id, "status": status, "stop_reason": reason,
        "query": spec.model_dump(mode="json"), "mode": mode,
        "offered_to": len(nodes), "accepted": sorted(accepted.values()),
        "declined": declined,
        "answered_by": sorted(outcome.epsilon) if outcome else [],
        "epsilon": dict(outcome.epsilon) if outcome else {},
        "epsilon_total": dict(outcome.epsilon_total) if outcome else {},
        "noise_std_grid_units": dict(outcome.noise_std) if outcome else {},
        "estimates": [e.to_json() for e in estimates],
        "result_hash": result_hash(estimates) if estimates else "",
        "seconds": round(time.time() - started, 3),
        "timings": {k: round(v, 3) for k, v in timings.items()},
    }
    files = write_result(run_dir, result, spec, estimates)
    result["files"] = files
    audit.append(EntryKind.QUERY_RESULT, {
        "query_id": run_id, "status": status,
        "answers": dict(outcome.answer_hashes) if outcome else {},
        "sum_hash": outcome.sum_hash if outcome else "", "result_hash": result["result_hash"],
    })
    audit.close()
    events.emit(RunFinished(status=status, reason=reason, model=None))
    result["table"] = result_table(spec, estimates) if estimates else ""
    return result
