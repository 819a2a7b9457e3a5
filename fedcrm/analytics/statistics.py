"""A firm's side of a query: its statistics, with every customer's contribution bounded.

:func:`firm_statistics` turns a :class:`~fedcrm.analytics.spec.QuerySpec` and the firm's prepared
store into exact per-group statistics on an integer grid (they never leave the firm) in the
query's public :func:`layout`, which also gives the L2 sensitivity of the whole vector when one
customer is added or removed. The node adds discrete Gaussian noise and charges the firm's ledger
(:meth:`fedcrm.node.FirmNode.answer_query`); only the noisy integers leave, alone or inside a
secure sum.

**The grid.** Counts are integers. Queries with sums (``sum``, ``mean``, ``weekly_trend``) divide
each customer's clipped value by its bound (so it lies in [-1, 1], or a vector of norm <= 1),
multiply by :data:`RESOLUTION` and truncate toward zero - per customer, before adding up - and
scale counts by the same factor, so one noise multiplier serves the whole vector and the
sensitivity is exact (truncation never makes a contribution larger).

Bounds per kind, with ``k = group_by.max_groups`` (the customers table has one row per customer:
k = 1), in units of one customer's largest contribution:

| kind | released per group | Δ₂ |
|---|---|---|
| count | customers | √k |
| sum, mean | customers, Σ clip(value) | √(2k) |
| churn_rate | customers who stayed, who churned (one of the two) | 1 |
| histogram, quantiles | customers per public bin | √k |
| segment_sizes | customers per RFM segment (public thresholds) | 1 |
| retention | churned / censored customers per week of lifetime | 1 |
| weekly_trend | Σ purchase days per week, each customer's vector clipped to L2 norm C | 1 |

On the transactions table a customer's value in a group is the sum of the column over their
transactions in that group (e.g. total spend); a customer counts in at most ``k`` groups.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import pandas as pd

from fedcrm.analytics.spec import QueryKind, QuerySpec, RfmThresholds, Table
from fedcrm.data.features import RfmSegment, rfm, segment_for_scores
from fedcrm.data.store import PreparedStore
from fedcrm.privacy.errors import SchemaError

#: The segments of a segment_sizes query, in release order (public).
SEGMENTS: tuple[str, ...] = tuple(s.value for s in RfmSegment)

#: Grid units per "one customer's largest contribution" for queries with sums: each customer's
#: normalised value is truncated toward zero onto this grid before anything is added up, so the
#: sensitivity stays exact (truncation never grows a value) and the secure sum adds integers.
#: Queries of counts only use a grid of 1.
RESOLUTION = 1 << 16



@dataclass(frozen=True)
class Statistic:
    """One released statistic's public shape: its name, length and grid unit."""

    name: str
    length: int
    unit: float  # one grid unit in the statistic's own units (customers, the value's unit, ...)


@dataclass(frozen=True)
class Layout:
    """The public layout of a query's release: what the firms send, in which order and unit.

    Derived from the query alone (never from data), so the coordinator checks every reply
    against it. ``l2_sensitivity`` is the whole vector's, in grid units, when one customer is
    added or removed.
    """

    statistics: tuple[Statistic, ...]
    resolution: int
    l2_sensitivity: float

    @property
    def length(self) -> int:
        return sum(s.length for s in self.statistics)

    def split(self, vector: np.ndarray) -> dict[str, np.ndarray]:
        """The concatenated vector back into its named statistics."""
        out, at = {}, 0
        for s in self.statistics:
            out[s.name] = vector[at : at + s.length]
            at += s.length
        return out


def _shape(spec: QuerySpec) -> tuple[list[tuple[str, int, float]], float, bool]:
    """(name, length, scale) of each statistic, the normalised L2 sensitivity, and whether the
    query adds up values (not only counts). A statistic's scale is one customer's largest
    contribution in its own units (1 for a count, the clipping bound for a sum)."""
    kind, groups = spec.kind, len(spec.groups)
    k = spec.group_by.max_groups if spec.group_by is not None else 1
    if kind is QueryKind.COUNT:
        return [("count", groups, 1.0)], float(np.sqrt(k)), False
    if kind in (QueryKind.SUM, QueryKind.MEAN):
        assert spec.value is not None
        return ([("count", groups, 1.0), ("sum", groups, spec.value.bound)],
                float(np.sqrt(2.0 * k)), True)
    if kind is QueryKind.CHURN_RATE:
        # a customer is either a churner or not: one of the two counts moves, by one
        return [("stayed", groups, 1.0), ("churners", groups, 1.0)], 1.0, False
    if kind in (QueryKind.HISTOGRAM, QueryKind.QUANTILES):
        assert spec.bins is not None
        return [("count", groups * (len(spec.bins) - 1), 1.0)], float(np.sqrt(k)), False
    if kind is QueryKind.SEGMENT_SIZES:
        return [("count", len(SEGMENTS), 1.0)], 1.0, False
    if kind is QueryKind.RETENTION:
        cells = groups * (spec.weeks + 1)  # per cohort, weeks 0..weeks (the last: censored)
        return [("churned", cells, 1.0), ("censored", cells, 1.0)], 1.0, False
    return [("purchase_days", spec.weeks, spec.max_purchase_days)], 1.0, True


def layout(spec: QuerySpec, *, secure: bool = False) -> Layout:
    """The release layout of ``spec`` (see :class:`Layout`).

    The grid is :data:`RESOLUTION` per customer's largest contribution when the query adds up
    values, or when the answers go into a secure sum (each firm then adds only a share of the
    noise, which must stay large in grid units for the sum of the firms' discrete Gaussians to
    be as private as one: ``docs/analytics.md``); plain count queries use a grid of 1.
    """
    statistics, sensitivity, sums = _shape(spec)
    r = RESOLUTION if (sums or secure) else 1
    return Layout(
        tuple(Statistic(name, length, scale / r) for name, length, scale in statistics),
        r, float(sensitivity * r),
    )


@dataclass(frozen=True)
class BoundedStatistics:
    """Exact statistics on the grid (never released as such) in :func:`layout`'s order."""

    values: Mapping[str, np.ndarray]  # int64 grid units
    layout: Layout

    def vector(self) -> np.ndarray:
        return np.concatenate(
            [np.asarray(self.values[s.name], dtype=np.int64) for s in self.layout.statistics]
        )


def _grid(normalised: np.ndarray, resolution: int) -> np.ndarray:
    """Per-customer normalised values (|v| <= 1) onto the integer grid, truncated toward zero."""
    return np.trunc(np.asarray(normalised, dtype=np.float64) * resolution).astype(np.int64)


def _require(frame: pd.DataFrame | None, columns: tuple[str, ...], firm: str,
             table: Table) -> pd.DataFrame:
    if frame is None or len(frame.columns) == 0:
        raise SchemaError(f"firm '{firm}' has no {table.value} table, which this query reads")
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise SchemaError(
            f"firm '{firm}': the query reads column(s) {', '.join(missing)} of its "
            f"{table.value} table, which it does not declare (canonical names)"
        )
    return frame


def _key_index(keys: tuple[str, ...], column: pd.Series) -> np.ndarray:
    """Each row's public key index (−1: not one of the keys, left out)."""
    lookup = {k: i for i, k in enumerate(keys)}
    return np.asarray(
        [lookup.get(str(v), -1) if pd.notna(v) else -1 for v in column], dtype=np.int64
    )


def _one_row_per_customer(frame: pd.DataFrame) -> pd.DataFrame:
    """A customer counts once: the customers table's first row per ``customer_id``."""
    if "customer_id" in frame.columns:
        return frame.drop_duplicates("customer_id", keep="first")
    return frame


@dataclass(frozen=True)
class _Rows:
    """Per-customer (or per customer-and-group) rows: group index and the row's value."""

    group: np.ndarray  # int64, −1 = not counted
    value: np.ndarray  # float64 (NaN = no value)


def _customer_rows(spec: QuerySpec, store: PreparedStore, value_column: str | None) -> _Rows:
    """One row per customer (customers table), or per customer and group (transactions table:
    the value summed over the customer's transactions in the group; each customer in at most
    ``group_by.max_groups`` groups - those with the lowest key index, a public rule)."""
    firm = store.firm
    columns = tuple(c for c in (value_column,) if c)
    group_column = (spec.group_by.column,) if spec.group_by is not None else ()
    if spec.table is Table.CUSTOMERS:
        frame = _one_row_per_customer(
            _require(store.customers, columns + group_column, firm, spec.table)
        )
        group = (
            _key_index(spec.groups, frame[spec.group_by.column]) if spec.group_by is not None
            else np.zeros(len(frame), dtype=np.int64)
        )
        value = (pd.to_numeric(frame[value_column], errors="coerce").to_numpy(dtype=np.float64)
                 if value_column else np.zeros(len(frame)))
        return _Rows(group, value)
    tx = _require(store.transactions, ("customer_id", *columns, *group_column), firm,
                  spec.table)
    frame = pd.DataFrame({"customer_id": tx["customer_id"].to_numpy()})
    frame["group"] = (
        _key_index(spec.groups, tx[spec.group_by.column]) if spec.group_by is not None else 0
    )
    frame["value"] = (pd.to_numeric(tx[value_column], errors="coerce").to_numpy(np.float64)
                      if value_column else 0.0)
    frame = frame[frame["group"] >= 0]
    per = frame.groupby(["customer_id", "group"], sort=True)["value"].sum(
        min_count=1
    ).reset_index()
    k = spec.group_by.max_groups if spec.group_by is not None else 1
    per = per[per.groupby("customer_id").cumcount() < k]
    return _Rows(per["group"].to_numpy(dtype=np.int64), per["value"].to_numpy(np.float64))


def _counts(index: np.ndarray, size: int, weight: int = 1) -> np.ndarray:
    counted = index[index >= 0]
    return np.bincount(counted, minlength=size).astype(np.int64) * weight


def firm_statistics(spec: QuerySpec, store: PreparedStore, *,
                    secure: bool = False) -> BoundedStatistics:
    """The query's exact, contribution-bounded statistics on one firm's store, on the grid of
    ``layout(spec, secure=secure)``."""
    shape = layout(spec, secure=secure)
    r = shape.resolution
    kind = spec.kind
    groups = len(spec.groups)
    if kind is QueryKind.COUNT:
        rows = _customer_rows(spec, store, None)
        return BoundedStatistics({"count": _counts(rows.group, groups, r)}, shape)
    if kind in (QueryKind.SUM, QueryKind.MEAN):
        assert spec.value is not None
        rows = _customer_rows(spec, store, spec.value.column)
        present = (rows.group >= 0) & np.isfinite(rows.value)
        clipped = np.clip(rows.value[present], spec.value.lower, spec.value.upper)
        sums = np.bincount(rows.group[present], weights=_grid(clipped / spec.value.bound, r),
                           minlength=groups)
        return BoundedStatistics(
            {"count": _counts(np.where(present, rows.group, -1), groups, r),
             "sum": np.rint(sums).astype(np.int64)},
            shape,
        )
    if kind is QueryKind.CHURN_RATE:
        rows = _customer_rows(spec, store, "churn")
        known = (rows.group >= 0) & np.isfinite(rows.value)
        return BoundedStatistics(
            {"stayed": _counts(np.where(known & (rows.value <= 0.5), rows.group, -1), groups, r),
             "churners": _counts(np.where(known & (rows.value > 0.5), rows.group, -1), groups,
                                 r)},
            shape,
        )
    if kind in (QueryKind.HISTOGRAM, QueryKind.QUANTILES):
        assert spec.value is not None and spec.bins is not None
        rows = _customer_rows(spec, store, spec.value.column)
        edges = np.asarray(spec.bins, dtype=np.float64)
        present = (rows.group >= 0) & np.isfinite(rows.value)
        clipped = np.clip(rows.value, spec.value.lower, spec.value.upper)
        bins = np.clip(np.searchsorted(edges, clipped, side="right") - 1, 0, len(edges) - 2)
        cell = np.where(present, rows.group * (len(edges) - 1) + bins, -1)
        return BoundedStatistics({"count": _counts(cell, groups * (len(edges) - 1), r)}, shape)
    tx = _require(store.transactions, ("customer_id", "timestamp"), store.firm, spec.table)
    assert spec.as_of is not None
    as_of = pd.Timestamp(spec.as_of)
    if kind is QueryKind.SEGMENT_SIZES:
        if "amount" not in tx.columns:
            tx = tx.assign(amount=0.0)
        base = rfm(tx, as_of=as_of)
        segment = _segments(base, spec.rfm or RfmThresholds())
        index = np.asarray([SEGMENTS.index(s) for s in segment], dtype=np.int64)
        return BoundedStatistics({"count": _counts(index, len(SEGMENTS), r)}, shape)
    if kind is QueryKind.RETENTION:
        return _retention(spec, tx, as_of, shape)
    return _weekly_trend(spec, tx, as_of, shape)


def _segments(base: pd.DataFrame, thresholds: RfmThresholds) -> np.ndarray:
    """R score: 5 for the most recent (recency under the first cut), ... 1; F score: 1..5 by
    frequency cuts. Then the standard R-F segment map (:func:`segment_for_scores`)."""
    recency = base["recency_days"].to_numpy()
    frequency = base["frequency"].to_numpy()
    r = 5 - np.searchsorted(np.asarray(thresholds.recency_days), recency, side="left")
    f = 1 + np.searchsorted(np.asarray(thresholds.frequency), frequency, side="right")
    return segment_for_scores(np.clip(r, 1, 5), np.clip(f, 1, 5))


def _retention(spec: QuerySpec, tx: pd.DataFrame, as_of: pd.Timestamp,
               shape: Layout) -> BoundedStatistics:
    """Churned / censored customers per cohort and week of lifetime (first to last purchase).

    A customer who has not bought in the ``inactive_days`` before ``as_of`` churned at their last
    purchase; the others are censored at ``as_of``. Lifetimes of ``weeks`` weeks or more are
    censored at ``weeks``. With ``cohorts``, a customer's cohort is the last cohort start on or
    before their first purchase. Each customer lands in at most one cell.
    """
    days = pd.to_datetime(tx["timestamp"]).dt.normalize()
    frame = pd.DataFrame({"customer_id": tx["customer_id"].to_numpy(), "day": days.to_numpy()})
    frame = frame[frame["day"] <= as_of]
    g = frame.groupby("customer_id")["day"]
    first, last = g.min(), g.max()
    churned = (as_of - last).dt.days >= spec.inactive_days
    end = last.where(churned, as_of)
    weeks = ((end - first).dt.days // 7).to_numpy()
    horizon = spec.weeks
    event = churned.to_numpy() & (weeks < horizon)
    week = np.minimum(weeks, horizon).astype(np.int64)
    if spec.cohorts:
        starts = pd.DatetimeIndex([pd.Timestamp(c) for c in spec.cohorts]).to_numpy()
        cohort = np.searchsorted(starts, first.to_numpy(), side="right") - 1
    else:
        cohort = np.zeros(len(week), dtype=np.int64)
    cells = len(spec.groups) * (horizon + 1)
    cell = np.where(cohort >= 0, cohort * (horizon + 1) + week, -1)
    return BoundedStatistics(
        {"churned": _counts(np.where(event, cell, -1), cells, shape.resolution),
         "censored": _counts(np.where(~event, cell, -1), cells, shape.resolution)},
        shape,
    )


def _weekly_trend(spec: QuerySpec, tx: pd.DataFrame, as_of: pd.Timestamp,
                  shape: Layout) -> BoundedStatistics:
    """Σ over customers of purchase days per week from ``start``; each customer's weekly vector
    is scaled down to L2 norm ``max_purchase_days`` when longer, then put on the grid."""
    from fedcrm.data.features import weekly_series

    assert spec.start is not None
    start = pd.Timestamp(spec.start)
    end = min(start + pd.Timedelta(weeks=spec.weeks), as_of)
    if end <= start:
        raise SchemaError("weekly_trend: start must lie before as_of")
    series = weekly_series(tx, start=start, end=end).to_numpy(dtype=np.float64)
    norms = np.linalg.norm(series, axis=1)
    scale = np.minimum(1.0, spec.max_purchase_days / np.maximum(norms, 1e-12))
    normalised = series * scale[:, None] / spec.max_purchase_days
    sums = _grid(normalised, shape.resolution).sum(axis=0)
    padded = np.zeros(spec.weeks, dtype=np.int64)
    padded[: len(sums)] = sums
    return BoundedStatistics({"purchase_days": padded}, shape)
