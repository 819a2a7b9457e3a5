"""The coordinator's side of the private customer-overlap count over Flower's ``Grid``.

The coordinator is the only party both firms talk to; it relays and counts:

1. **offer** the overlap to every connected firm (``query.overlap_offer``); the two firms it
   names say whether they take part (policy, key, peer, size, budget), spending nothing;
2. **blind**: each of the two sends its signed, padded, shuffled set of blinded keys
   (``query.overlap_blind``) - each firm's DP release;
3. **reblind**: each receives the other's signed set, relayed unchanged, and returns it blinded
   again with its own dummies and padding (``query.overlap_reblind``), to the coordinator only;
4. **count** the values the two lists share, subtract both firms' public offsets and report the
   estimate with its noise standard deviation and 95% interval.

The signed federation log records the start (``overlap_started``: the spec and the firms) and the
result (``overlap_result``: the noisy estimate and the hash of every set and list received); each
firm's own log records its release and the hash of what it sent, so an auditor matches them.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

from flwr.serverapp import Grid

from fedcrm.audit.log import EntryKind
from fedcrm.coordinator.events import EVENTS, EventLog, FirmStopped, RunFinished, RunStarted
from fedcrm.coordinator.federation_log import FederationAudit
from fedcrm.coordinator.overlap_run import Z95, OverlapRunConfig, result_table, write_result
from fedcrm.privacy.blinding import count_common, elements_hash
from fedcrm.protocol import (
    MessageKind,
    OverlapBlindReply,
    OverlapBlindRequest,
    OverlapMatches,
    OverlapOffer,
    OverlapOfferReply,
    OverlapReblindRequest,
    ReplyState,
)
from fedcrm.server.analytics import _exchange, _wait_for_nodes
from fedcrm.server.federation import _polling_grid

#: Stage numbers in events.
OFFER, BLIND, REBLIND = 0, 1, 2


def run_overlap(grid: Grid, cfg: OverlapRunConfig, *, run_id: str, run_dir: Path
                ) -> dict[str, Any]:
    """Offer, blind, reblind, count, write; returns the result (also in ``result.json``)."""
    started = time.time()
    spec = cfg.overlap
    noise = spec.noise()
    run_dir.mkdir(parents=True, exist_ok=True)
    audit = FederationAudit(run_dir)
    events = EventLog(run_dir / EVENTS, sinks=[audit.record])
    events.emit(RunStarted(run_id=run_id, task=f"overlap:{spec.key.value}", strategy="psi",
                           rounds=1))
    c = cfg.coordinator
    nodes = _wait_for_nodes(grid, needed=max(2, c.expected_firms), wait_for=c.wait_for_firms,
                            events=events)
    grid = _polling_grid(grid, len(nodes))
    timeout = c.timeout
    spec_json = spec.canonical_json()

    offer = OverlapOffer(overlap_id=run_id, spec=spec_json).encode()
    offers = _exchange(grid, dict.fromkeys(nodes, offer), MessageKind.OVERLAP_OFFER,
                       timeout=timeout, stage=OFFER, decode=OverlapOfferReply.decode,
                       events=events)
    parties: dict[str, int] = {}
    lengths: dict[str, int] = {}
    declined: dict[str, str] = {}
    for node, r in offers.items():
        if r.firm not in spec.firms:
            continue  # not a party: it declined, as it should
        if r.state is ReplyState.OK and r.firm not in parties:
            parties[r.firm], lengths[r.firm] = node, r.padded_length
        else:
            declined[r.firm] = r.detail or "took part twice"
            events.emit(FirmStopped(round=OFFER, firm=r.firm, node_id=node,
                                    state=r.state.value, detail=r.detail))
    audit.append(EntryKind.OVERLAP_STARTED, {
        "overlap_id": run_id, "overlap": spec.name, "fingerprint": spec.fingerprint(),
        "spec": spec_json, "firms": sorted(parties),
    })
    status, reason = "completed", ""
    sets: dict[str, Any] = {}
    matches: dict[str, Any] = {}
    epsilon: dict[str, float] = {}
    epsilon_total: dict[str, float] = {}
    count: int | None = None
    if len(parties) < 2:
        status = "not_enough_firms"
        missing = [f for f in spec.firms if f not in parties]
        reason = (f"{', '.join(missing)} did not accept the overlap; no firm was asked to blind "
                  "its keys and nothing was spent")
    else:
        request = OverlapBlindRequest(overlap_id=run_id, spec=spec_json).encode()
        blinded = _exchange(grid, {parties[f]: request for f in spec.firms},
                            MessageKind.OVERLAP_BLIND, timeout=timeout, stage=BLIND,
                            decode=OverlapBlindReply.decode, events=events)
        for firm in spec.firms:
            node = parties[firm]
            reply = blinded.get(node)
            if reply is None:
                continue
            problem = _blind_problem(reply, firm, spec.peer_of(firm) or "", lengths[firm],
                                     run_id)
            if problem:
                events.emit(FirmStopped(round=BLIND, firm=firm, node_id=node,
                                        state=reply.state.value, detail=problem))
                continue
            assert reply.blinded is not None
            sets[firm] = reply.blinded
            epsilon[firm], epsilon_total[firm] = reply.epsilon, reply.epsilon_total
        if len(sets) < 2:
            status = "not_enough_answers"
            reason = ("a firm did not send its blinded set; no count is published (a firm "
                      "that sent its set spent its ε)")
        else:
            first, second = spec.firms
            wires = {
                parties[first]: OverlapReblindRequest(run_id, spec_json, sets[second]).encode(),
                parties[second]: OverlapReblindRequest(run_id, spec_json, sets[first]).encode(),
            }
            replies = _exchange(grid, wires, MessageKind.OVERLAP_REBLIND, timeout=timeout,
                                stage=REBLIND, decode=OverlapMatches.decode, events=events)
            for firm in spec.firms:
                node = parties[firm]
                m = replies.get(node)
                peer = spec.peer_of(firm) or ""
                expected = lengths[peer] + noise.allowance
                if m is None:
                    continue
                if m.state is not ReplyState.OK or m.elements is None or m.firm != firm:
                    events.emit(FirmStopped(round=REBLIND, firm=firm, node_id=node,
                                            state=m.state.value, detail=m.detail))
                elif len(m.elements) != expected:
                    events.emit(FirmStopped(round=REBLIND, firm=firm, node_id=node,
                                            state=ReplyState.ERROR.value,
                                            detail=f"sent {len(m.elements)} values, not the "
                                            f"public {expected}"))
                else:
                    matches[firm] = m.elements
            if len(matches) < 2:
                status = "not_enough_answers"
                reason = "a firm did not send its matches; no count is published"
            else:
                count = count_common(matches[first], matches[second])
    estimate = None if count is None else count - 2 * noise.offset
    noise_std = math.sqrt(2.0) * noise.noise_std
    result: dict[str, Any] = {
        "overlap_id": run_id, "run_id": run_id, "status": status, "stop_reason": reason,
        "task": f"overlap:{spec.key.value}", "strategy": "psi",
        "overlap": spec.model_dump(mode="json"), "firms": list(spec.firms),
        "declined": declined, "padded_lengths": lengths,
        "estimate": estimate, "noise_std": noise_std,
        "ci_low": None if estimate is None else estimate - Z95 * noise_std,
        "ci_high": None if estimate is None else estimate + Z95 * noise_std,
        "noise": {"per_firm_std": noise.noise_std, "offset_per_firm": noise.offset,
                  "allowance_per_firm": noise.allowance,
                  "truncation_delta": noise.truncation_delta},
        "epsilon": epsilon, "epsilon_total": epsilon_total,
        "bytes_received": {
            firm: {"blinded_set": int(sets[firm].elements.nbytes) if firm in sets else 0,
                   "matches": int(matches[firm].nbytes) if firm in matches else 0}
            for firm in spec.firms
        },
        "seconds": round(time.time() - started, 3),
    }
    result["files"] = write_result(run_dir, result)
    audit.append(EntryKind.OVERLAP_RESULT, {
        "overlap_id": run_id, "status": status, "estimate": estimate,
        "sets": {f: elements_hash(s.elements) for f, s in sets.items()},
        "matches": {f: elements_hash(m) for f, m in matches.items()},
    })
    audit.close()
    events.emit(RunFinished(status=status, reason=reason, model=None))
    result["table"] = result_table(result) if estimate is not None else ""
    return result


def _blind_problem(reply: OverlapBlindReply, firm: str, peer: str, length: int,
                   overlap_id: str) -> str:
    """Why a blind reply cannot be relayed, or "" (the peer checks the signature itself)."""
    if reply.state is not ReplyState.OK or reply.blinded is None:
        return reply.detail or "no blinded set"
    s = reply.blinded
    if reply.firm != firm or s.sender != firm or s.recipient != peer or s.overlap_id != overlap_id:
        return "the blinded set names another firm or overlap"
    if len(s.elements) != length:
        return f"sent {len(s.elements)} values, not its public {length}"
    return ""
