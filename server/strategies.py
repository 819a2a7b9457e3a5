"""Strategies: Flower's own aggregators, wrapped by a guard that validates every update.

The guard is a wrapper around a strategy, in Flower's style (like its DP wrappers): it never
edits the aggregation. Before the inner strategy sees a training reply, the guard decodes it into
the protocol's typed reply and

* drops replies that are errors or never arrived (dropouts) and reports them; a firm whose node
  is gone (no reply before the round timeout, or the SuperLink answering that the node is
  unavailable) is taken out of later rounds and shown as stopped, so a dead firm does not stall
  every round; a firm whose ClientApp failed once stays in,
* takes firms whose budget cannot fund a round out of later rounds (their status says so),
* rejects updates whose shape/dtype differ from the global model, hold NaN/inf, or move
  farther from it than ``max_update_norm`` or ``max_update_norm_ratio`` times the round's
  median update distance (:mod:`fedcrm.coordinator.update_validation`) - logged with the node
  id and the reason,

and stops the run cleanly (:class:`FederationStopped`) when fewer than ``min_firms`` can train.
Every decision is reported as a typed event (:mod:`fedcrm.coordinator.events`).

With secure aggregation (:class:`~fedcrm.server.secure_sum.SecureTraining`) firms keep their
updates: the guard takes the firms that trained into the round's secure sum and computes the
FedAvg/FedProx weighted mean from the sum of the weighted updates and the sum of the weights; it
never sees a firm's update, so it cannot check one (each firm checks its own against the sum's
declared range instead).
"""

from __future__ import annotations

from collections.abc import Iterable
from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common import log
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    FedAdam,
    FedAvg,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    Krum,
    Strategy,
)

from fedcrm.coordinator.events import (
    EventSink,
    FirmDropped,
    FirmHeads,
    FirmStopped,
    RoundEvaluated,
    RoundStarted,
    RoundTrained,
    SecureSumCompleted,
    UpdateAccepted,
    UpdateLost,
    UpdateRejected,
)
from fedcrm.coordinator.run_config import RunConfig, StrategyKind
from fedcrm.coordinator.run_state import DROPPED, FirmState, RoundRecord
from fedcrm.coordinator.update_validation import round_norm_bound, validate_update
from fedcrm.flower.records import CONFIG, to_records, wire_of
from fedcrm.privacy.errors import FedcrmError, SecureSumError
from fedcrm.protocol import (
    ErrorReply,
    EvaluateReply,
    EvaluateRequest,
    MessageKind,
    ReplyState,
    RunSpec,
    TrainReply,
    arrays_hash,
)
from fedcrm.server.secure_sum import SecureTraining
from fedcrm.tasks.base import NoisyStatistics, Task

BUDGET_EXHAUSTED = "privacy budget exhausted"
#: Errors the SuperLink writes in a node's place: the node itself is gone.
_NODE_GONE = frozenset({ErrorCode.NODE_UNAVAILABLE, ErrorCode.REPLY_MESSAGE_UNAVAILABLE})
TIMED_OUT = "no reply before the round timeout"


class FederationStopped(Exception):
    """Not enough firms can continue; the run ends cleanly with what it has."""


def build_strategy(cfg: RunConfig) -> Strategy:
    """The inner Flower strategy. Node sampling is left to the guard (no waiting forever)."""
    common: dict[str, Any] = {
        "fraction_train": 1.0,
        "fraction_evaluate": 1.0,
        "min_train_nodes": 0,
        "min_evaluate_nodes": 0,
        "min_available_nodes": 0,
    }
    if cfg.strategy is StrategyKind.FEDAVG:
        return FedAvg(**common)
    if cfg.strategy is StrategyKind.FEDPROX:
        return FedProx(**common, proximal_mu=cfg.proximal_mu)
    if cfg.strategy is StrategyKind.FEDADAM:
        return FedAdam(**common, eta=cfg.server_learning_rate, eta_l=cfg.learning_rate)
    if cfg.strategy is StrategyKind.FEDMEDIAN:
        return FedMedian(**common)
    if cfg.strategy is StrategyKind.TRIMMED_MEAN:
        return FedTrimmedAvg(**common, beta=cfg.trim_fraction)
    return Krum(**common, num_malicious_nodes=cfg.krum_malicious)


def _error_line(msg: Message) -> str:
    lines = str(msg.error.reason).strip().splitlines()
    return f"error reply: {lines[-1][:200] if lines else '?'}"


class GuardedStrategy(Strategy):
    """Validate, exclude and report around an inner strategy; see the module docstring."""

    def __init__(
        self,
        inner: Strategy,
        *,
        task: Task,
        spec: RunSpec,
        evaluation_rounds: tuple[int, ...],
        firms: dict[int, FirmState],
        min_firms: int,
        max_update_norm: float,
        on_event: EventSink,
        secure: SecureTraining | None = None,
        max_update_norm_ratio: float = 0.0,
    ) -> None:
        self.inner = inner
        self.secure = secure
        self._grid: Grid | None = None
        self.task = task
        self.spec = spec
        self.evaluation_rounds = evaluation_rounds
        self.firms = firms
        self.min_firms = min_firms
        self.max_update_norm = max_update_norm
        self.max_update_norm_ratio = max_update_norm_ratio
        self.on_event = on_event
        self.rounds: dict[int, RoundRecord] = {}
        self.updates: list[dict[str, Any]] = []
        self.global_arrays: list[np.ndarray] = []

    def summary(self) -> None:
        log(
            INFO,
            "\t├──> fedcrm guard: min firms %d, max update norm %g (and %g × the round's median)",
            self.min_firms,
            self.max_update_norm,
            self.max_update_norm_ratio,
        )
        self.inner.summary()

    def _firm(self, node_id: int) -> FirmState:
        return self.firms.get(node_id) or FirmState(node_id=node_id, firm=f"node-{node_id}")

    def _active(self, grid: Grid) -> set[int]:
        connected = set(grid.get_node_ids())
        return {n for n, f in self.firms.items() if f.excluded is None and n in connected}

    # ------------------------------------------------------------------ training

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        active = self._active(grid)
        if len(active) < self.min_firms:
            raise FederationStopped(
                f"round {server_round}: only {len(active)} firm(s) can still train, "
                f"fewer than min_firms={self.min_firms}"
            )
        self.global_arrays = arrays.to_numpy_ndarrays()
        self._grid = grid
        messages = [
            m
            for m in self.inner.configure_train(server_round, arrays, config, grid)
            if m.metadata.dst_node_id in active
        ]
        record = RoundRecord(server_round)
        record.participants = sorted(self.firms[m.metadata.dst_node_id].firm for m in messages)
        self.rounds[server_round] = record
        self.on_event(RoundStarted(round=server_round, firms=tuple(record.participants)))
        return messages

    def _decode_train(self, msg: Message) -> TrainReply | ErrorReply | str:
        """The typed reply, or why it could not be read."""
        if msg.has_error():
            return _error_line(msg)
        try:
            wire = wire_of(msg)
            return ErrorReply.decode(wire) or TrainReply.decode(wire)
        except FedcrmError as exc:
            return f"malformed reply: {exc}"

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        # In firm order, not arrival order: the round's record, events and aggregate do not
        # depend on which firm happened to answer first.
        replies = sorted(replies, key=lambda m: self._firm(m.metadata.src_node_id).firm)
        record = self.rounds.setdefault(server_round, RoundRecord(server_round))
        answered = set()
        valid: list[Message] = []
        held: dict[str, int] = {}  # secure aggregation: firm -> public size
        train_replies: list[tuple[FirmState, TrainReply]] = []
        decoded = [(msg, self._decode_train(msg)) for msg in replies]
        bound = round_norm_bound(
            self.global_arrays,
            [[np.asarray(a) for a in r.arrays] for _, r in decoded
             if isinstance(r, TrainReply) and r.state is ReplyState.OK and r.arrays is not None],
            max_update_norm=self.max_update_norm,
            max_update_norm_ratio=self.max_update_norm_ratio,
        )
        for msg, reply in decoded:
            node = msg.metadata.src_node_id
            answered.add(node)
            firm = self._firm(node)
            if isinstance(reply, str):
                gone = msg.has_error() and msg.error.code in _NODE_GONE
                self._drop(server_round, record, firm, reply, gone=gone)
                continue
            if isinstance(reply, TrainReply):
                train_replies.append((firm, reply))
                if reply.audit_head_hash:
                    record.heads[firm.firm] = {
                        "hash": reply.audit_head_hash, "length": reply.audit_head_length,
                    }
                firm.epsilon_total = reply.epsilon_total
                firm.epsilon_cap = reply.epsilon_cap
                firm.delta = reply.delta
            if isinstance(reply, ErrorReply) or reply.state is not ReplyState.OK:
                state = ReplyState.ERROR if isinstance(reply, ErrorReply) else reply.state
                firm.excluded = (
                    BUDGET_EXHAUSTED if state is ReplyState.BUDGET_EXHAUSTED
                    else f"firm error: {reply.detail}"
                )
                record.declined.append(
                    {"firm": firm.firm, "state": state.value, "detail": reply.detail}
                )
                self.on_event(FirmStopped(round=server_round, firm=firm.firm, node_id=node,
                                          state=state.value, detail=reply.detail))
                log(WARNING, "firm %s (node %d) stops participating: %s", firm.firm, node,
                    reply.detail)
                continue
            if (self.secure is not None) != reply.secure_sum:
                reason = ("sent its update in the clear in a secure-aggregation run"
                          if self.secure is not None else
                          "kept its update for a secure sum in a run without secure aggregation")
                record.rejected.append({"firm": firm.firm, "node_id": str(node), "reason": reason})
                self.on_event(UpdateRejected(round=server_round, firm=firm.firm, node_id=node,
                                             reason=reason))
                continue
            if self.secure is not None:
                held[firm.firm] = reply.num_examples
                continue
            update = [np.asarray(a) for a in reply.arrays or []]
            problem = validate_update(self.global_arrays, update, max_update_norm=bound)
            if problem is not None:
                record.rejected.append({"firm": firm.firm, "node_id": str(node), "reason": problem})
                self.on_event(UpdateRejected(round=server_round, firm=firm.firm, node_id=node,
                                             reason=problem))
                log(WARNING, "rejected update from firm %s (node %d): %s", firm.firm, node,
                    problem)
                continue
            firm.num_examples = reply.num_examples
            firm.rounds_trained += 1
            record.accepted.append(firm.firm)
            update_hash = arrays_hash(update)
            self.updates.append({"round": server_round, "firm": firm.firm, "node_id": node,
                                 "hash": update_hash, "replayed": reply.replayed})
            if reply.replayed:
                record.replayed.append(firm.firm)
            self.on_event(UpdateAccepted(round=server_round, firm=firm.firm, node_id=node,
                                         update_hash=update_hash, replayed=reply.replayed))
            valid.append(msg)
        if held:
            secure_result = self._secure_aggregate(server_round, record, held)
        for firm, typed in train_replies:
            self._lost(server_round, firm, typed)
        for name in record.participants:
            silent = next((n for n, f in self.firms.items() if f.firm == name), None)
            if silent is not None and silent not in answered:
                self._drop(server_round, record, self.firms[silent], TIMED_OUT, gone=True)
        self.on_event(RoundTrained(
            round=server_round,
            accepted=tuple(record.accepted),
            rejected=len(record.rejected),
            dropped=tuple(record.dropped),
            epsilon={f.firm: round(f.epsilon_total, 4) for f in self.firms.values()},
            epsilon_cap={f.firm: f.epsilon_cap for f in self.firms.values()},
        ))
        if record.heads:
            self.on_event(FirmHeads(round=server_round, heads=dict(record.heads)))
        if held:
            return secure_result
        if not valid:
            return None, None
        # Strip the protocol's config record so the inner strategy sees exactly arrays + metrics.
        for msg in valid:
            if CONFIG in msg.content:
                del msg.content[CONFIG]
        arrays, aggregated = self.inner.aggregate_train(server_round, valid)
        if arrays is not None:
            record.model_hash = arrays_hash(arrays.to_numpy_ndarrays())
        return arrays, aggregated

    def _secure_aggregate(
        self, server_round: int, record: RoundRecord, held: dict[str, int]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The round's weighted mean through the secure sum of the firms that trained."""
        assert self.secure is not None and self._grid is not None
        node_of = {f.firm: n for n, f in self.firms.items()}

        def on_drop(firm: str, node: int, reason: str) -> None:
            record.dropped.append(firm)
            self.on_event(FirmDropped(round=server_round, firm=firm, node_id=node,
                                      reason=reason))

        try:
            outcome = self.secure.weighted_mean(
                self._grid, server_round, self.global_arrays, held, on_drop=on_drop
            )
        except SecureSumError as exc:
            log(WARNING, "round %d: secure sum failed: %s", server_round, exc)
            record.secure_sum = {"error": str(exc)}
            return None, None
        result = outcome.result
        for name in result.survivors:
            firm = self.firms[node_of[name]]
            firm.num_examples = held[name]
            firm.rounds_trained += 1
            record.accepted.append(name)
            self.updates.append({"round": server_round, "firm": name, "node_id": node_of[name],
                                 "secure_sum": result.sum_hash})
        record.secure_sum = {
            "firms": list(result.survivors), "dropped": list(result.dropped),
            "sum_hash": result.sum_hash, "spec_hash": outcome.spec_hash,
            "seconds": {k: round(v, 4) for k, v in outcome.trace.seconds.items()},
        }
        self.on_event(SecureSumCompleted(
            round=server_round, query=result.sum_id.query, run_id=result.sum_id.run_id,
            spec_hash=outcome.spec_hash, firms=result.survivors, dropped=result.dropped,
            sum_hash=result.sum_hash,
        ))
        record.model_hash = arrays_hash(outcome.arrays)
        firms = len(result.survivors)
        return ArrayRecord(outcome.arrays), MetricRecord({"secure-sum-firms": firms})
    def _drop(self, server_round: int, record: RoundRecord, firm: FirmState, reason: str, *,
              gone: bool) -> None:
        """A firm did not answer this round; if its node is gone, it takes no part in later
        rounds of this attempt (a resumed run asks it again if its node is back)."""
        record.dropped.append(firm.firm)
        if gone and firm.excluded is None:
            firm.excluded = f"{DROPPED} in round {server_round}: {reason}"
        self.on_event(FirmDropped(round=server_round, firm=firm.firm, node_id=firm.node_id,
                                  reason=reason))

    def _lost(self, server_round: int, firm: FirmState, reply: TrainReply) -> None:
        """Record the rounds the firm says it released an update for that never arrived here."""
        received = {int(u["round"]) for u in self.updates if u["firm"] == firm.firm} | {
            r for r, rec in self.rounds.items()
            if any(x.get("firm") == firm.firm for x in rec.rejected)
        }
        for released in sorted(set(reply.rounds_released) - received):
            if released > server_round:
                continue
            record = self.rounds.setdefault(released, RoundRecord(released))
            if firm.firm in record.lost:
                continue
            record.lost.append(firm.firm)
            self.on_event(UpdateLost(
                round=released, firm=firm.firm, node_id=firm.node_id,
                reason="the firm released (and was charged for) this update; it never arrived",
            ))

    # ------------------------------------------------------------------ evaluation

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Ask for a DP evaluation of the model the firms trained on in this round.

        Firms evaluate only the global model they received for training in the same round (the
        new aggregate ``arrays`` is evaluated in the next round, or not at all after the last).
        """
        if server_round not in self.evaluation_rounds or not self.global_arrays:
            return []
        connected = set(grid.get_node_ids())
        usable = sorted(
            n for n, f in self.firms.items()
            if n in connected and (f.excluded is None or f.excluded == BUDGET_EXHAUSTED)
        )
        request = EvaluateRequest(
            spec=self.spec, server_round=server_round, arrays=self.global_arrays
        ).encode()
        return [
            Message(content=to_records(request), dst_node_id=n,
                    message_type=MessageKind.EVALUATE)
            for n in usable
        ]

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        record = self.rounds.setdefault(server_round, RoundRecord(server_round))
        statistics: dict[str, NoisyStatistics] = {}
        per_firm: dict[str, dict[str, float]] = {}
        for msg in sorted(replies, key=lambda m: self._firm(m.metadata.src_node_id).firm):
            firm = self._firm(msg.metadata.src_node_id).firm
            if msg.has_error():
                continue
            try:
                wire = wire_of(msg)
                if ErrorReply.decode(wire) is not None:
                    continue
                reply = EvaluateReply.decode(wire)
            except FedcrmError:
                continue
            state = self._firm(msg.metadata.src_node_id)
            state.epsilon_total = max(state.epsilon_total, reply.epsilon_total)
            if reply.state is not ReplyState.OK:
                record.declined.append(
                    {"firm": firm, "state": reply.state.value, "detail": reply.detail}
                )
                continue
            statistics[firm] = NoisyStatistics(reply.statistics, reply.noise_std)
            per_firm[firm] = {
                **self.task.pooled_metrics([statistics[firm]]),
                "noise_std": reply.noise_std,
                "epsilon": reply.epsilon,
            }
        pooled: dict[str, Any] = {
            "evaluated_model_round": server_round - 1,
            "firms_evaluated": len(statistics),
        }
        pooled.update(self.task.pooled_metrics(list(statistics.values())))
        record.metrics = {"pooled": pooled, "per_firm": per_firm}
        self.on_event(RoundEvaluated(round=server_round, pooled=pooled, per_firm=per_firm,
                                     model_hash=arrays_hash(self.global_arrays)))
        if not per_firm:
            return None
        return MetricRecord(
            {
                k: float(v)
                for k, v in pooled.items()
                if isinstance(v, int | float) and not isinstance(v, bool)
            }
        )
