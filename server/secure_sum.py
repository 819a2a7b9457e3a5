"""The coordinator's side of a secure sum over Flower's ``Grid``: relay three steps, unmask.

:func:`register_keys` collects the firms' signed long-term keys once per run
(``query.secure_sum_keys``); :func:`secure_sum` runs one sum
(``query.secure_sum_share`` -> ``query.secure_sum_mask`` -> ``query.secure_sum_unmask``) with
the typed messages of :mod:`fedcrm.protocol` and the coordinator's state of
:mod:`fedcrm.privacy.secure_sum`. A firm that answers a step with an error, or not before the
timeout, has dropped from that step on; the sum is over the firms whose masked vectors arrived,
exactly. Works the same in a simulation and a deployment (it only sends messages).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import Message
from flwr.serverapp import Grid

from fedcrm.flower.records import to_records, wire_of
from fedcrm.privacy.errors import FedcrmError, SumAborted
from fedcrm.privacy.secure_sum import (
    MIN_SURVIVORS,
    TRAINING_SUM_QUERY,
    AgreementKey,
    FixedPoint,
    SumCoordinator,
    SumId,
    SumResult,
    SumSpec,
)
from fedcrm.protocol import (
    ErrorReply,
    MessageKind,
    SecureSumConfirmReply,
    SecureSumConfirmRequest,
    SecureSumKeysReply,
    SecureSumKeysRequest,
    SecureSumMaskReply,
    SecureSumMaskRequest,
    SecureSumQuery,
    SecureSumShareReply,
    SecureSumShareRequest,
    SecureSumUnmaskReply,
    SecureSumUnmaskRequest,
    SumInput,
    Wire,
)

DropSink = Callable[[str, int, str], None]
"""Called with (firm, node id, reason) for each firm that drops out of a step."""


@dataclass
class SumTrace:
    """How a sum went: who dropped at which step and why, and each step's wall time."""

    dropped: dict[str, str] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)


def _exchange(
    grid: Grid, kind: MessageKind, requests: Mapping[str, Wire], nodes: Mapping[str, int],
    timeout: float,
) -> tuple[dict[str, Wire], dict[str, str]]:
    """Send each firm its request; the replies that arrived, and why the others did not."""
    by_node = {nodes[f]: f for f in requests}
    messages = [
        Message(content=to_records(wire), dst_node_id=nodes[firm], message_type=kind.value)
        for firm, wire in requests.items()
    ]
    replies: dict[str, Wire] = {}
    failed: dict[str, str] = {}
    for reply in grid.send_and_receive(messages, timeout=timeout):
        firm = by_node.get(reply.metadata.src_node_id)
        if firm is None:
            continue
        if reply.has_error():
            lines = str(reply.error.reason).strip().splitlines()
            failed[firm] = f"error reply: {lines[-1][:200] if lines else '?'}"
            continue
        try:
            wire = wire_of(reply)
        except FedcrmError as exc:
            failed[firm] = f"malformed reply: {exc}"
            continue
        error = ErrorReply.decode(wire)
        if error is not None:
            failed[firm] = error.detail
            continue
        replies[firm] = wire
    for firm in requests:
        if firm not in replies and firm not in failed:
            failed[firm] = "no reply before the timeout"
    return replies, failed


def register_keys(
    grid: Grid, nodes: Mapping[str, int], *, run_id: str, timeout: float,
) -> tuple[dict[str, AgreementKey], dict[str, str]]:
    """Each firm's signed long-term key (firm -> key), and why the missing ones are missing.

    The coordinator only relays the keys: every firm checks each peer's signature itself.
    """
    request = SecureSumKeysRequest(run_id=run_id).encode()
    replies, failed = _exchange(grid, MessageKind.SECURE_SUM_KEYS,
                                {f: request for f in nodes}, nodes, timeout)
    keys: dict[str, AgreementKey] = {}
    for firm, wire in replies.items():
        try:
            key = SecureSumKeysReply.decode(wire).key
        except FedcrmError as exc:
            failed[firm] = f"malformed secure-sum key: {exc}"
            continue
        if key.firm != firm:
            failed[firm] = f"answered with the key of '{key.firm}'"
            continue
        keys[firm] = key
    return keys, failed


def _decode_each(replies: Mapping[str, Wire], decode: Callable[[Wire], Any],
                 failed: dict[str, str]) -> dict[str, Any]:
    out = {}
    for firm, wire in replies.items():
        try:
            out[firm] = decode(wire)
        except FedcrmError as exc:
            failed[firm] = f"malformed reply: {exc}"
    return out


def secure_sum(
    grid: Grid,
    query: SecureSumQuery,
    *,
    nodes: Mapping[str, int],
    keys: Mapping[str, AgreementKey],
    timeout: float,
    on_drop: DropSink | None = None,
    trace: SumTrace | None = None,
    confirm: bool = False,
) -> SumResult:
    """Run one secure sum over ``query.spec.parties`` (each must be in ``nodes`` and ``keys``).

    ``confirm`` adds the consistency step (analytics sums): the survivors sign the one list the
    coordinator will unmask, and each firm reveals shares only for a list it signed that a
    majority of the parties signed too.

    Raises :class:`~fedcrm.privacy.errors.SumAborted` when too few firms are left to finish it.
    """
    spec = query.spec
    state = SumCoordinator(spec)
    trace = trace if trace is not None else SumTrace()

    def dropped(step: str, failed: Mapping[str, str]) -> None:
        for firm, reason in failed.items():
            trace.dropped[firm] = f"{step}: {reason}"
            if on_drop is not None:
                on_drop(firm, nodes[firm], f"secure sum {step} step: {reason}")

    def step(name: str, kind: MessageKind, requests: Mapping[str, Wire]) -> dict[str, Wire]:
        started = time.perf_counter()
        replies, failed = _exchange(grid, kind, requests, nodes, timeout)
        trace.seconds[name] = time.perf_counter() - started
        dropped(name, failed)
        return replies

    replies = step("share", MessageKind.SECURE_SUM_SHARE, {
        f: SecureSumShareRequest(query, {v: keys[v] for v in spec.neighbours_of(f)}).encode()
        for f in spec.parties
    })
    failed: dict[str, str] = {}
    for firm, reply in _decode_each(replies, SecureSumShareReply.decode, failed).items():
        try:
            state.receive_shares(firm, reply.shares)
        except FedcrmError as exc:
            failed[firm] = str(exc)
    dropped("share", failed)

    shared = state.shared
    replies = step("mask", MessageKind.SECURE_SUM_MASK, {
        f: SecureSumMaskRequest(query, shared, state.ephemerals_for(f)).encode() for f in shared
    })
    failed = {}
    for firm, reply in _decode_each(replies, SecureSumMaskReply.decode, failed).items():
        try:
            state.receive_masked(firm, reply.masked)
        except FedcrmError as exc:
            failed[firm] = str(exc)
    dropped("mask", failed)

    survivors = state.survivors
    confirmations: dict[str, bytes] = {}
    if confirm:
        replies = step("confirm", MessageKind.SECURE_SUM_CONFIRM, {
            f: SecureSumConfirmRequest(query, survivors).encode() for f in survivors
        })
        failed = {}
        for firm, reply in _decode_each(replies, SecureSumConfirmReply.decode, failed).items():
            confirmations[firm] = reply.signature
        dropped("confirm", failed)
        if len(confirmations) < len(spec.parties) // 2 + 1:
            raise SumAborted(
                f"sum {spec.sum_id.label()}: {len(confirmations)} firms confirmed the survivors, "
                f"fewer than a majority of the {len(spec.parties)} parties"
            )
    replies = step("unmask", MessageKind.SECURE_SUM_UNMASK, {
        f: SecureSumUnmaskRequest(query, shared, survivors, state.ciphertexts_for(f),
                                  confirmations).encode()
        for f in survivors
    })
    failed = {}
    for firm, reply in _decode_each(replies, SecureSumUnmaskReply.decode, failed).items():
        state.receive_revealed(firm, reply.revealed)
    dropped("unmask", failed)
    started = time.perf_counter()
    result = state.finish()
    trace.seconds["finish"] = time.perf_counter() - started
    return result


TRAINING_SCALE = 2**24
"""Fixed-point steps per unit for training updates: a firm's rounding error is at most 2^-25 per
coordinate (far below its DP noise)."""


@dataclass(frozen=True)
class SecureMean:
    """A round's weighted mean from a secure sum, with the sum it came from."""

    arrays: list[np.ndarray]
    result: SumResult
    spec_hash: str
    trace: SumTrace


@dataclass
class SecureTraining:
    """Secure aggregation of a run's rounds: FedAvg's weighted mean from one secure sum.

    Each firm adds ``a_u * update_u`` and ``a_u`` with ``a_u = public_size_u / W`` (``W`` the sum
    of the parties' public sizes, so ``0 < a_u <= 1``); the mean is the global model plus the
    sum of the first over the sum of the second, the same weighted mean FedAvg and FedProx take.
    Each coordinate must lie in ``[-bound, bound]`` (``bound``: the run's ``max_update_norm``,
    at least 1, which bounds every coordinate of an update the plain guard would accept).
    """

    run_id: str
    nodes: dict[str, int]
    keys: dict[str, AgreementKey]
    bound: float
    timeout: float
    neighbours: int = 0
    scale: int = TRAINING_SCALE

    def weighted_mean(
        self, grid: Grid, server_round: int, global_arrays: Sequence[np.ndarray],
        weights: Mapping[str, int], *, on_drop: DropSink | None = None,
    ) -> SecureMean:
        parties = tuple(sorted(f for f in weights if f in self.keys))
        for firm in sorted(set(weights) - set(parties)):
            if on_drop is not None:
                on_drop(firm, self.nodes[firm], "no registered secure-sum key")
        if len(parties) < MIN_SURVIVORS:
            raise SumAborted(
                f"round {server_round}: {len(parties)} firm(s) trained; a secure sum needs "
                f"{MIN_SURVIVORS}"
            )
        sizes = [int(np.asarray(a).size) for a in global_arrays]
        spec = SumSpec(
            sum_id=SumId(self.run_id, server_round, TRAINING_SUM_QUERY),
            parties=parties,
            length=sum(sizes) + 1,
            fixed_point=FixedPoint(-max(self.bound, 1.0), max(self.bound, 1.0), self.scale),
            neighbours=self.neighbours,
        )
        query = SecureSumQuery(spec, SumInput.TRAINING_UPDATE,
                               weight_norm=sum(weights[f] for f in parties))
        trace = SumTrace()
        result = secure_sum(grid, query, nodes=self.nodes, keys=self.keys,
                            timeout=self.timeout, on_drop=on_drop, trace=trace)
        total_weight = float(result.values[-1])
        if not total_weight > 0:
            raise SumAborted(f"round {server_round}: the secure sum's weights add up to zero")
        mean = result.values[:-1] / total_weight
        arrays, start = [], 0
        for a, size in zip(global_arrays, sizes, strict=True):
            a = np.asarray(a)
            step = mean[start:start + size].reshape(a.shape)
            arrays.append((a.astype(np.float64) + step).astype(a.dtype))
            start += size
        return SecureMean(arrays, result, spec.digest(), trace)
