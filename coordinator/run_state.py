"""What the coordinator knows about a run while it runs, without Flower: firms, rounds, summary.

The ServerApp's strategy guard (:mod:`fedcrm.server.strategies`) feeds the typed replies of
:mod:`fedcrm.protocol` in; this module decides what they mean for the run (who is admitted, who
stops, which updates count) and writes the run's summary and provenance.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

import fedcrm
from fedcrm.coordinator.run_config import RunConfig
from fedcrm.learning.settings import ChurnModelKind
from fedcrm.protocol import DescribeReply


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
    secure_sum: dict[str, Any] = field(default_factory=dict)  # survivors, dropped, sum hash
    replayed: list[str] = field(default_factory=list)  # firms that resent an earlier release
    lost: list[str] = field(default_factory=list)  # firms charged for an update never received


#: ``FirmState.excluded`` of a firm that stopped answering (dead node, lost connection, timeout).
DROPPED = "dropped"


LAYOUT_MISMATCH = "feature layout differs from the federation's"


@dataclass(frozen=True)
class Admission:
    """The federation's layout (the majority's) and every described firm's state."""

    layout: str
    input_dim: int
    firms: dict[int, FirmState]

    @property
    def admitted(self) -> dict[str, int]:
        return {f.firm: n for n, f in self.firms.items() if not f.excluded}


def admit(described: Mapping[int, DescribeReply]) -> Admission:
    """Admit the firms whose feature layout is the majority's; the others are excluded."""
    layouts = Counter((d.layout, d.input_dim) for d in described.values())
    if not layouts:
        return Admission(layout="", input_dim=0, firms={})
    (layout, input_dim), _ = layouts.most_common(1)[0]
    firms = {
        node: FirmState(
            node_id=node,
            firm=d.firm or f"node-{node}",
            excluded=None if (d.layout, d.input_dim) == (layout, input_dim) else LAYOUT_MISMATCH,
        )
        for node, d in described.items()
    }
    return Admission(layout=layout, input_dim=input_dim, firms=firms)


def restore_firms(firms: dict[int, FirmState], before: Sequence[FirmState]) -> None:
    """Carry each firm's state over from an earlier attempt of the run, by firm name.

    A firm excluded for its own reasons (budget, error, layout) stays excluded; one that had
    dropped out takes part again if its node is back. Firms not connected now keep their record
    (their ε stays in the summary) and are marked as not back.
    """
    by_name = {f.firm: node for node, f in firms.items()}
    for prior in before:
        node = by_name.get(prior.firm)
        if node is None:
            if prior.node_id not in firms:
                firms[prior.node_id] = FirmState(
                    **{**asdict(prior), "excluded": prior.excluded
                       or f"{DROPPED}: not connected when the run resumed"}
                )
            continue
        state = firms[node]
        state.epsilon_total, state.epsilon_cap = prior.epsilon_total, prior.epsilon_cap
        state.delta, state.num_examples = prior.delta, prior.num_examples
        state.rounds_trained = prior.rounds_trained
        if state.excluded is None and prior.excluded and not prior.excluded.startswith(DROPPED):
            state.excluded = prior.excluded


def latest_metrics(rounds: Mapping[int, RoundRecord]) -> dict[str, Any]:
    """The most recent round's evaluation (pooled and per firm), or empty."""
    return next(
        (rounds[r].metrics for r in sorted(rounds, reverse=True) if rounds[r].metrics), {}
    )


def provenance(
    cfg: RunConfig,
    *,
    run_id: str,
    admission: Admission,
    rounds: Mapping[int, RoundRecord],
    model_hash: str,
) -> dict[str, Any]:
    """What a saved global model says about where it came from."""
    firms = admission.firms.values()
    return {
        "run_id": run_id,
        "task": cfg.task.value,
        "kind": cfg.model.value if cfg.task.value == "churn" else cfg.task.value,
        "model": cfg.model.value,
        "strategy": cfg.aggregation,
        "rounds": cfg.rounds,
        "rounds_completed": max(rounds) if rounds else 0,
        "config_hash": cfg.config_hash(),
        "fedcrm_version": fedcrm.__version__,
        "layout_fingerprint": admission.layout,
        "input_dim": admission.input_dim,
        "firms": sorted(f.firm for f in firms if f.rounds_trained),
        "epsilon": {f.firm: f.epsilon_total for f in firms},
        "metrics": latest_metrics(rounds).get("pooled", {}),
        "model_hash": model_hash,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **({"trees": cfg.tree_settings().model_dump(mode="json")}
           if cfg.model is ChurnModelKind.TREES else {}),
    }


def summary(
    cfg: RunConfig,
    *,
    run_id: str,
    status: str,
    stop_reason: str,
    firms: Sequence[FirmState],
    rounds: Mapping[int, RoundRecord],
    updates: Sequence[Mapping[str, Any]],
    model_path: Path | None,
    model_hash: str,
    started: float,
    attempts: int = 1,
    release: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The run's ``summary.json``.

    ``lost_updates``: rounds a firm released (and was charged for) an update the coordinator
    never received; ``replayed_updates``: rounds where a firm sent again, unchanged and without a
    new charge, the update it had released for that round before a restart.
    """
    last = latest_metrics(rounds)
    return {
        "run_id": run_id,
        **dict(release or {}),
        "attempts": attempts,
        "task": cfg.task.value,
        "strategy": cfg.aggregation,
        "rounds": cfg.rounds,
        "rounds_completed": max(rounds) if rounds else 0,
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
            for f in sorted(firms, key=lambda s: s.firm)
        ],
        # Headline metrics at the top level (pooled held-out set: "auc" for churn, the trend
        # errors for trend), plus the pooled and per-firm breakdowns.
        "metrics": {
            **{k: v for k, v in last.get("pooled", {}).items() if k != "num_examples"},
            **last,
        },
        "rounds_detail": [asdict(r) for _, r in sorted(rounds.items())],
        "updates": list(updates),
        "lost_updates": [
            {"round": r.server_round, "firm": firm} for _, r in sorted(rounds.items())
            for firm in r.lost
        ],
        "replayed_updates": [
            {"round": r.server_round, "firm": firm} for _, r in sorted(rounds.items())
            for firm in r.replayed
        ],
        "model": str(model_path) if model_path else None,
        "model_hash": model_hash,
        "config": cfg.model_dump(mode="json"),
        "config_hash": cfg.config_hash(),
        "wall_seconds": round(time.time() - started, 3),
    }


def finite_metrics(values: Mapping[str, Any]) -> dict[str, float]:
    """The numeric, finite entries of a metrics mapping."""
    return {
        k: float(v) for k, v in values.items()
        if isinstance(v, int | float) and not isinstance(v, bool) and np.isfinite(v)
    }
