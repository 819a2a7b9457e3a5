"""Strategies: Flower's own aggregators, wrapped by a guard that validates every update.

The guard is a wrapper around a strategy, in Flower's style (like its DP wrappers): it never
edits the aggregation. Before the inner strategy sees a training reply, the guard

* drops replies that are errors or never arrived (dropouts) and reports them,
* takes firms whose budget cannot fund a round out of later rounds (their status says so),
* rejects updates whose shape/dtype differ from the global model, hold NaN/inf, or move
  farther than ``max_update_norm`` from it - logged with the node id and the reason,

and stops the run cleanly (:class:`FederationStopped`) when fewer than ``min_firms`` can train.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from logging import INFO, WARNING
from typing import Any, cast

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common import log
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

from fedcrm.coordinator.run_config import RunConfig, StrategyKind
from fedcrm.learning.metrics import auc_from_histograms
from fedcrm.node import arrays_hash
from fedcrm.server.update_validation import validate_update

EventFn = Callable[..., None]


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


@dataclass
class FirmState:
    node_id: int
    firm: str
    excluded: str | None = None
    epsilon_total: float = 0.0
    epsilon_cap: float = 0.0
    delta: float | None = None
    num_examples: int = 0
    rounds_trained: int = 0


@dataclass
class RoundRecord:
    server_round: int
    participants: list[str] = field(default_factory=list)
    accepted: list[str] = field(default_factory=list)
    rejected: list[dict[str, str]] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    declined: list[dict[str, str]] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)
    heads: dict[str, dict[str, Any]] = field(default_factory=dict)
    model_hash: str = ""


class GuardedStrategy(Strategy):
    """Validate, exclude and report around an inner strategy; see the module docstring."""

    def __init__(
        self,
        inner: Strategy,
        *,
        firms: dict[int, FirmState],
        min_firms: int,
        max_update_norm: float,
        on_event: EventFn,
        on_update: Callable[[int, FirmState, list[np.ndarray]], None] | None = None,
    ) -> None:
        self.inner = inner
        self.firms = firms
        self.min_firms = min_firms
        self.max_update_norm = max_update_norm
        self.on_event = on_event
        self.on_update = on_update
        self.rounds: dict[int, RoundRecord] = {}
        self._global: list[np.ndarray] = []

    def summary(self) -> None:
        log(
            INFO,
            "\t├──> fedcrm guard: min firms %d, max update norm %g",
            self.min_firms,
            self.max_update_norm,
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
        self._global = arrays.to_numpy_ndarrays()
        messages = [
            m
            for m in self.inner.configure_train(server_round, arrays, config, grid)
            if m.metadata.dst_node_id in active
        ]
        record = RoundRecord(server_round)
        record.participants = sorted(self.firms[m.metadata.dst_node_id].firm for m in messages)
        self.rounds[server_round] = record
        self.on_event("round_started", round=server_round, firms=record.participants)
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        # In firm order, not arrival order: the round's record, events and aggregate do not
        # depend on which firm happened to answer first.
        replies = sorted(replies, key=lambda m: self._firm(m.metadata.src_node_id).firm)
        record = self.rounds.setdefault(server_round, RoundRecord(server_round))
        answered = set()
        valid: list[Message] = []
        for msg in replies:
            node = msg.metadata.src_node_id
            answered.add(node)
            firm = self._firm(node)
            if msg.has_error():
                record.dropped.append(firm.firm)
                lines = str(msg.error.reason).strip().splitlines()
                self.on_event(
                    "firm_dropped",
                    round=server_round,
                    firm=firm.firm,
                    node_id=node,
                    reason=f"error reply: {lines[-1][:200] if lines else '?'}",
                )
                continue
            content = msg.content
            status: dict[str, Any] | None = dict(content["status"]) if "status" in content else None
            state = str(status["state"]) if status is not None and "state" in status else "ok"
            if status is not None and str(status.get("audit-head-hash", "")):
                record.heads[firm.firm] = {
                    "hash": str(status["audit-head-hash"]),
                    "length": int(status["audit-head-length"]),
                }
            metrics: dict[str, Any] | None = (
                dict(content["metrics"]) if "metrics" in content else None
            )
            if metrics is not None:
                firm.epsilon_total = float(metrics.get("epsilon-total", firm.epsilon_total))
                firm.epsilon_cap = float(metrics.get("epsilon-cap", firm.epsilon_cap))
                if "delta" in metrics:
                    firm.delta = float(metrics["delta"])
            if state != "ok":
                detail = str(status["detail"]) if status is not None else ""
                if state == "budget_exhausted":
                    firm.excluded = "privacy budget exhausted"
                else:
                    firm.excluded = f"firm error: {detail}"
                record.declined.append({"firm": firm.firm, "state": state, "detail": detail})
                self.on_event(
                    "firm_stopped",
                    round=server_round,
                    firm=firm.firm,
                    node_id=node,
                    state=state,
                    detail=detail,
                )
                log(WARNING, "firm %s (node %d) stops participating: %s", firm.firm, node, detail)
                continue
            update: list[np.ndarray] = []
            problem: str | None
            if "arrays" not in content:
                problem = "reply has no model arrays"
            else:
                update = cast(ArrayRecord, content["arrays"]).to_numpy_ndarrays()
                problem = validate_update(
                    self._global, update, max_update_norm=self.max_update_norm
                )
            if problem is not None:
                reason = problem
                record.rejected.append({"firm": firm.firm, "node_id": str(node), "reason": reason})
                self.on_event(
                    "update_rejected",
                    round=server_round,
                    firm=firm.firm,
                    node_id=node,
                    reason=reason,
                )
                log(WARNING, "rejected update from firm %s (node %d): %s", firm.firm, node, reason)
                continue
            firm.num_examples = int(metrics["num-examples"]) if metrics is not None else 0
            firm.rounds_trained += 1
            record.accepted.append(firm.firm)
            if self.on_update is not None:
                self.on_update(server_round, firm, update)
            self.on_event(
                "update_accepted",
                round=server_round,
                firm=firm.firm,
                node_id=node,
                update_hash=arrays_hash(update),
            )
            valid.append(msg)
        for name in record.participants:
            silent = next((n for n, f in self.firms.items() if f.firm == name), None)
            if silent is not None and silent not in answered:
                record.dropped.append(name)
                self.on_event(
                    "firm_dropped",
                    round=server_round,
                    firm=name,
                    node_id=silent,
                    reason="no reply before the round timeout",
                )
        self.on_event(
            "round_trained",
            round=server_round,
            accepted=record.accepted,
            rejected=len(record.rejected),
            dropped=record.dropped,
            epsilon={f.firm: round(f.epsilon_total, 4) for f in self.firms.values()},
            epsilon_cap={f.firm: f.epsilon_cap for f in self.firms.values()},
        )
        if record.heads:
            self.on_event("firm_heads", round=server_round, heads=record.heads)
        if not valid:
            return None, None
        # Strip our status record so the inner strategy sees exactly arrays + metrics.
        for msg in valid:
            if "status" in msg.content:
                del msg.content["status"]
        arrays, aggregated = self.inner.aggregate_train(server_round, valid)
        if arrays is not None:
            record.model_hash = arrays_hash(arrays.to_numpy_ndarrays())
        return arrays, aggregated

    # ------------------------------------------------------------------ evaluation

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        connected = set(grid.get_node_ids())
        usable = {
            n
            for n, f in self.firms.items()
            if n in connected and (f.excluded is None or f.excluded == "privacy budget exhausted")
        }
        return [
            m
            for m in self.inner.configure_evaluate(server_round, arrays, config, grid)
            if m.metadata.dst_node_id in usable
        ]

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        record = self.rounds.setdefault(server_round, RoundRecord(server_round))
        per_firm: dict[str, dict[str, float]] = {}
        pos_total: np.ndarray | None = None
        neg_total: np.ndarray | None = None
        sums: dict[str, np.ndarray] = {}
        n_total = 0
        for msg in sorted(replies, key=lambda m: self._firm(m.metadata.src_node_id).firm):
            if msg.has_error() or "metrics" not in msg.content:
                continue
            metrics: dict[str, Any] = dict(msg.content["metrics"])
            firm = self._firm(msg.metadata.src_node_id).firm
            n = int(metrics.get("num-examples", 0))
            scalars = {
                k: float(v)
                for k, v in metrics.items()
                if not isinstance(v, list) and k != "num-examples"
            }
            per_firm[firm] = {**scalars, "num_examples": n}
            n_total += n
            for key in ("hist-pos", "hist-neg"):
                if key in metrics:
                    arr = np.asarray(metrics[key], dtype=np.float64)
                    if key == "hist-pos":
                        pos_total = arr if pos_total is None else pos_total + arr
                    else:
                        neg_total = arr if neg_total is None else neg_total + arr
            for key, value in metrics.items():
                if isinstance(value, list) and key.startswith("sum-"):
                    sums_arr = np.asarray(value, dtype=np.float64)
                    prev = sums.get(key)
                    if prev is not None:
                        # A small firm's last purchase can fall in an earlier week, so its
                        # holdout is shorter: pool the weeks every firm covers (as the
                        # simulation's BG/NBD baseline does).
                        weeks = min(len(prev), len(sums_arr))
                        sums_arr = prev[:weeks] + sums_arr[:weeks]
                    sums[key] = sums_arr
        pooled: dict[str, Any] = {"num_examples": n_total}
        if pos_total is not None and neg_total is not None:
            pooled["auc"] = auc_from_histograms(pos_total, neg_total)
        if sums:
            from fedcrm.tasks.trend import pooled_trend_metrics

            pooled.update(pooled_trend_metrics(sums, per_firm))
        record.metrics = {"pooled": pooled, "per_firm": per_firm}
        self.on_event(
            "round_evaluated",
            round=server_round,
            pooled=pooled,
            per_firm=per_firm,
            model_hash=record.model_hash,
        )
        if not per_firm:
            return None
        return MetricRecord(
            {
                k: float(v)
                for k, v in pooled.items()
                if isinstance(v, (int, float)) and not isinstance(v, bool)
            }
        )
