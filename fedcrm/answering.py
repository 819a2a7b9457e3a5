"""A firm's answers to federated DP analytics queries, through the one release path.

A query reaches a firm twice: as an **offer** (:func:`plan_answer` checks everything - the firm's
policy, the columns, the budget - and spends nothing) and as a **request to answer**
(:func:`answer`: the release of :mod:`fedcrm.release`, so the ledger is checked before any noise is
drawn, committed, and signed into the firm's audit log with the answer's hash before the answer
may leave).

What the firm releases is its bounded-contribution statistics
(:func:`fedcrm.analytics.statistics.firm_statistics`) on the query's integer grid plus discrete
Gaussian noise of standard deviation ``σ = m · Δ₂ · √f`` grid units, where ``m`` is the noise
multiplier that makes the query alone ``(ε, δ)``-DP (calibrated by ``dp_accounting``), ``Δ₂`` the
layout's sensitivity and ``f`` the firm's share of the noise:

* **plain** (the coordinator sees each firm's vector): ``f = 1``; each firm's answer is
  ``(ε, δ)``-DP on its own;
* **secure** (the answers are only ever seen summed, :mod:`fedcrm.privacy.secure_sum`): ``f =
  1 / min_firms``. The sum opens only when at least ``min_firms`` firms' inputs are in it, so the
  total carries at least the full noise ``m · Δ₂``. The ledger records that worst case the firm
  accepted (ε of multiplier ``m``); a coordinator colluding with other firms can subtract their
  shares, leaving the firm protected by its own share only (``docs/analytics.md``).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
from dataclasses import dataclass

import numpy as np

from fedcrm.analytics.spec import QuerySpec, Table
from fedcrm.analytics.statistics import Layout, firm_statistics, layout
from fedcrm.audit.log import EntryKind
from fedcrm.data.contract import ColumnRole, FirmConfig, TableName
from fedcrm.data.store import PreparedStore
from fedcrm.privacy.accounting import DpEvent, calibrate_noise
from fedcrm.privacy.durable import create_exclusive
from fedcrm.privacy.errors import FedcrmError, PlanDoesNotFit
from fedcrm.privacy.noise import discrete_gaussian
from fedcrm.release import FirmPrivacy, Released, gaussian_query_event, release

log = logging.getLogger(__name__)

#: Purpose prefix of every query release in a firm's ledger.
QUERY_PURPOSE = "query:"


class QueryDeclined(FedcrmError):
    """The firm's policy, data or budget says no to a query (one line, no data values)."""

    def __init__(self, detail: str, *, budget: bool = False) -> None:
        super().__init__(detail)
        self.budget = budget


@functools.lru_cache(maxsize=256)
def noise_multiplier(epsilon: float, delta: float) -> float:
    """The Gaussian noise multiplier that makes one query ``(epsilon, delta)``-DP on its own."""
    return calibrate_noise(target_epsilon=epsilon, delta=delta, sample_rate=1.0, steps=1)


def noise_fraction(spec: QuerySpec, *, secure: bool) -> float:
    """The share of the query's noise variance each firm adds (see the module docstring)."""
    return 1.0 / spec.min_firms if secure else 1.0


@dataclass(frozen=True)
class AnswerPlan:
    """What answering a query will release and cost at one firm (decided before any noise)."""

    query_id: str
    spec: QuerySpec
    layout: Layout
    secure: bool
    noise_std: float  # grid units, this firm's share
    event: DpEvent


def _columns_read(spec: QuerySpec) -> list[str]:
    return [c for c in (
        spec.group_by.column if spec.group_by else None,
        spec.value.column if spec.value else None,
    ) if c]


def _check_columns(cfg: FirmConfig, spec: QuerySpec) -> None:
    """Queries group by and sum only the firm's declared, non-personal feature and label columns
    (by their canonical names): never an id, a timestamp, a dropped or a PII column."""
    table = TableName(spec.table.value)
    declared = cfg.tables.get(table)
    if declared is None:
        raise QueryDeclined(f"this firm has no {spec.table.value} table")
    by_name = {col.canonical(source, table): col for source, col in declared.columns.items()}
    for column in _columns_read(spec):
        col = by_name.get(column)
        if col is None or col.role is ColumnRole.DROP:
            raise QueryDeclined(
                f"this firm declares no column '{column}' in its {spec.table.value} table"
            )
        if col.pii is not None or col.policy is not None or col.role in (
            ColumnRole.PII, ColumnRole.ID
        ):
            raise QueryDeclined(
                f"column '{column}' is personal data in this firm's contract; queries may group "
                "by or add up only non-personal columns"
            )
        if col.role is ColumnRole.TIMESTAMP:
            raise QueryDeclined(
                f"column '{column}' is a timestamp; queries read dates only through the "
                "transactions kinds (retention, weekly_trend, segment_sizes)"
            )


def answered_event(privacy: FirmPrivacy, query_id: str) -> DpEvent | None:
    """The release of this firm's answer to ``query_id`` (from its ledger), if it answered."""
    for e in privacy.ledger.events:
        if e.purpose.startswith(QUERY_PURPOSE) and e.context.get("query_id") == query_id:
            return e
    return None


def answered(privacy: FirmPrivacy, query_id: str) -> bool:
    """Whether this firm already released an answer to ``query_id`` (from its ledger)."""
    return answered_event(privacy, query_id) is not None


def plan_answer(
    privacy: FirmPrivacy, cfg: FirmConfig, spec: QuerySpec, *, query_id: str, secure: bool
) -> AnswerPlan:
    """Everything the firm checks before it answers; raises :class:`QueryDeclined`.

    Checks the firm's ``[federation]`` policy (``answer_queries``; ``max_query_epsilon`` against
    what the query costs at the firm's own δ), that
    the query reads only declared, non-personal columns, that it has not answered this query id
    before (one answer per query: a repeated request would be a second release), and that its
    budget covers the query - all before any noise is drawn.
    """
    policy = cfg.federation
    if not policy.answer_queries:
        raise QueryDeclined("this firm does not answer analytics queries "
                            "([federation] answer_queries = false)")
    if spec.table is Table.TRANSACTIONS and cfg.tables.get(TableName.TRANSACTIONS) is None:
        raise QueryDeclined("this firm has no transactions table")
    _check_columns(cfg, spec)
    if answered(privacy, query_id):
        raise QueryDeclined(f"this firm already answered query {query_id}")
    shape = layout(spec, secure=secure)
    try:
        multiplier = noise_multiplier(spec.epsilon, spec.delta)
    except PlanDoesNotFit as exc:
        raise QueryDeclined(f"the query's ε={spec.epsilon:g} needs more noise than any useful "
                            f"answer carries ({exc})") from None
    fraction = noise_fraction(spec, secure=secure)
    event = gaussian_query_event(
        multiplier, delta=privacy.delta, purpose=f"{QUERY_PURPOSE}{spec.name}",
        context={"query_id": query_id, "fingerprint": spec.fingerprint(),
                 "secure": secure, "min_firms": spec.min_firms, "noise_fraction": fraction},
    )
    # the ε the query costs at the firm's own δ (a query's larger δ would cost more here)
    if event.epsilon > policy.max_query_epsilon + 1e-9:
        raise QueryDeclined(
            f"the query would spend ε={event.epsilon:.4g} (at this firm's δ={privacy.delta:g}); "
            f"this firm answers queries of at most ε={policy.max_query_epsilon:g} "
            "([federation] max_query_epsilon)"
        )
    if privacy.ledger.would_exceed(event):
        raise QueryDeclined(
            f"the query would bring this firm's ε to {privacy.ledger.total_with(event):.4f}, "
            f"above its cap {privacy.cap:g} (spent {privacy.spent():.4f})", budget=True,
        )
    return AnswerPlan(
        query_id=query_id, spec=spec, layout=shape, secure=secure,
        noise_std=multiplier * shape.l2_sensitivity * math.sqrt(fraction), event=event,
    )


#: The ``query`` part of the secure sum of an analytics query (its run id is the query id).
QUERY_SUM = "query"

#: A secure sum's range covers each firm's exact statistics plus this many noise standard
#: deviations (a draw beyond it has probability below 1e-800).
NOISE_TAIL = 64.0


def answer_bound(plan: AnswerPlan, public_size: int) -> float:
    """The largest |value| of a firm's answer: on the grid, no coordinate of the exact statistics
    exceeds ``resolution x customers`` (each customer adds at most one resolution to it), plus
    :data:`NOISE_TAIL` noise deviations. A firm sizes it by its declared public size, a public
    upper bound on its customers."""
    return float(plan.layout.resolution * public_size + NOISE_TAIL * plan.noise_std)


def answer_hash(values: np.ndarray) -> str:
    """sha256 of the answer's int64 bytes (logged by the firm; matched by the auditor)."""
    return hashlib.sha256(np.ascontiguousarray(values, dtype=np.int64).tobytes()).hexdigest()


def _claim(privacy: FirmPrivacy, query_id: str) -> None:
    """One release per query id, also between concurrent requests: the id is claimed by a file
    created exclusively next to the ledger before anything is drawn (a claim whose release then
    fails leaves the id used)."""
    folder = privacy.files.ledger.parent / "queries"
    folder.mkdir(parents=True, exist_ok=True)
    name = hashlib.sha256(query_id.encode()).hexdigest()[:40]
    if not create_exclusive(folder / f"{name}.claim", json.dumps({"query_id": query_id}).encode()):
        raise QueryDeclined(f"this firm already answered query {query_id}")


def answer(privacy: FirmPrivacy, store: PreparedStore, plan: AnswerPlan, *,
           public_size: int | None = None) -> Released[np.ndarray]:
    """Release the firm's noisy answer: check, draw, commit, audit (:func:`fedcrm.release.release`).

    The exact statistics are computed before the release (an error in the data refuses the query
    without spending anything); the noise is drawn only after the ledger's check. For a secure
    sum (``public_size`` given) every exact coordinate is first clamped to
    ``±resolution x public_size`` - a contraction, so the sensitivity stays - and the noisy answer
    is clipped to the sum's range (post-processing): an answer always fits the range, whatever a
    firm's true size, so a sum never fails on a firm's data.
    """
    exact = firm_statistics(plan.spec, store, secure=plan.secure).vector()
    if len(exact) != plan.layout.length:  # pragma: no cover - layout and statistics agree
        raise FedcrmError("internal error: the firm's statistics do not fit the query's layout")
    bound = None
    if public_size is not None:
        box = plan.layout.resolution * public_size
        if np.abs(exact).max(initial=0) > box:
            log.warning("query %s: statistics exceed this firm's declared public size %d; "
                        "clamped (declare a larger [federation] public_size)",
                        plan.query_id, public_size)
        exact = np.clip(exact, -box, box)
        bound = math.floor(answer_bound(plan, public_size))
    _claim(privacy, plan.query_id)

    def compute() -> np.ndarray:
        noisy = exact + discrete_gaussian(len(exact), plan.noise_std)
        return noisy if bound is None else np.clip(noisy, -bound, bound)

    return release(
        privacy, plan.event, compute,
        funded=lambda values: (EntryKind.QUERY_ANSWERED, {
            "query_id": plan.query_id, "query": plan.spec.name,
            "fingerprint": plan.spec.fingerprint(), "answer_hash": answer_hash(values),
            "length": len(values), "secure": plan.secure,
        }),
    )
