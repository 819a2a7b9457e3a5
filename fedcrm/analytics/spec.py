"""A federated DP query, declared once in TOML and sent to every firm as canonical JSON.

The shape borrows from Tumult Analytics' QueryBuilder + KeySet (groups are a *public* key set
declared in the query, never read from the data; every customer's contribution is bounded
explicitly) and from NVIDIA FLARE's statistics config (count, sum, mean, histogram, quantiles over
declared bins). A query file::

    [query]
    name = "churn_by_contract"
    kind = "churn_rate"          # see QueryKind
    epsilon = 1.0                # what the query may spend at EACH firm
    delta = 1e-6
    min_firms = 2                # answered only if at least this many firms take part
    suppress_below = 20          # groups whose noisy count is below are not reported

    [query.group_by]             # public keys: the groups exist whether or not a firm has them
    column = "contract"
    keys = ["Month-to-month", "One year", "Two year"]

Built-in CRM queries: ``churn_rate`` (by segment), ``segment_sizes`` (RFM segments from public
recency/frequency thresholds), ``retention`` (weekly Kaplan-Meier from event and censoring
histograms), ``weekly_trend`` (purchase days per week), ``histogram`` / ``quantiles`` (of a
clipped value over public bins), and the plain ``count``, ``sum``, ``mean``.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
from datetime import date
from enum import StrEnum
from typing import Self

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from fedcrm.privacy.errors import ConfigError


class QueryKind(StrEnum):
    COUNT = "count"
    SUM = "sum"
    MEAN = "mean"
    HISTOGRAM = "histogram"
    QUANTILES = "quantiles"
    CHURN_RATE = "churn_rate"
    SEGMENT_SIZES = "segment_sizes"
    RETENTION = "retention"
    WEEKLY_TREND = "weekly_trend"


class Table(StrEnum):
    CUSTOMERS = "customers"
    TRANSACTIONS = "transactions"


_FROZEN = ConfigDict(frozen=True, extra="forbid")


class GroupBy(BaseModel):
    """Groups by a categorical column over PUBLIC keys (values outside them are not counted)."""

    model_config = _FROZEN

    column: str = Field(min_length=1, max_length=200)
    keys: list[str] = Field(min_length=1, max_length=1000)
    max_groups: int = Field(
        default=1, ge=1, le=1000,
        description="transactions table: the most groups one customer counts in (its "
        "contribution bound); the customers table has one row, so one group, per customer",
    )

    @model_validator(mode="after")
    def _distinct(self) -> Self:
        if len(set(self.keys)) != len(self.keys):
            raise ValueError("group_by.keys must be distinct")
        return self


class ValueRange(BaseModel):
    """A numeric column and the public range every customer's value is clipped to."""

    model_config = _FROZEN

    column: str = Field(min_length=1, max_length=200)
    lower: float = Field(allow_inf_nan=False)
    upper: float = Field(allow_inf_nan=False)

    @model_validator(mode="after")
    def _ordered(self) -> Self:
        if not self.lower < self.upper:
            raise ValueError("value.lower must be below value.upper")
        return self

    @property
    def bound(self) -> float:
        """The largest |value| after clipping: one customer's sensitivity on a sum."""
        return max(abs(self.lower), abs(self.upper))


class RfmThresholds(BaseModel):
    """Public cut points that give recency and frequency scores 1..5 (not data quantiles, which
    would let one customer move everyone's segment)."""

    model_config = _FROZEN

    recency_days: list[int] = Field(default=[30, 60, 120, 240], min_length=4, max_length=4)
    frequency: list[int] = Field(default=[1, 2, 4, 8], min_length=4, max_length=4)

    @model_validator(mode="after")
    def _increasing(self) -> Self:
        for name in ("recency_days", "frequency"):
            cuts = getattr(self, name)
            if any(b <= a for a, b in itertools.pairwise(cuts)):
                raise ValueError(f"rfm.{name} must be strictly increasing")
        return self


class QuerySpec(BaseModel):
    """One federated DP query (see the module docstring)."""

    model_config = _FROZEN

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]{0,60}$")
    kind: QueryKind
    table: Table = Table.CUSTOMERS
    epsilon: float = Field(gt=0, le=10, allow_inf_nan=False)
    delta: float = Field(default=1e-6, gt=0, le=1e-3)
    min_firms: int = Field(default=2, ge=1, le=10_000)
    suppress_below: float = Field(default=0.0, ge=0, allow_inf_nan=False)
    group_by: GroupBy | None = None
    value: ValueRange | None = None
    bins: list[float] | None = Field(default=None, min_length=2, max_length=1001)
    quantiles: list[float] | None = None
    rfm: RfmThresholds | None = None
    as_of: date | None = None
    start: date | None = None
    weeks: int = Field(default=26, ge=1, le=520)
    max_purchase_days: float = Field(
        default=4.0, gt=0, allow_inf_nan=False,
        description="weekly_trend: each customer's weekly purchase-day vector is clipped to "
        "this L2 norm (its sensitivity)",
    )
    inactive_days: int = Field(
        default=90, ge=1, description="retention: no purchase for this long means churned"
    )
    cohorts: list[date] | None = Field(
        default=None, min_length=1, max_length=104,
        description="retention: public cohort start dates; a customer belongs to the cohort "
        "in which their first purchase falls (before the first date: in no cohort)",
    )

    @model_validator(mode="after")
    def _fits_kind(self) -> Self:
        kind = self.kind
        needs_value = {QueryKind.SUM, QueryKind.MEAN, QueryKind.HISTOGRAM, QueryKind.QUANTILES}
        if kind in needs_value and self.value is None:
            raise ValueError(f"a {kind.value} query needs [query.value] (column, lower, upper)")
        if kind in (QueryKind.HISTOGRAM, QueryKind.QUANTILES):
            if self.bins is None:
                raise ValueError(f"a {kind.value} query needs public bin edges: bins = [...]")
            if any(b <= a for a, b in zip(self.bins, self.bins[1:], strict=False)) or not all(
                math.isfinite(b) for b in self.bins
            ):
                raise ValueError("bins must be finite and strictly increasing")
        if kind is QueryKind.QUANTILES and not self.quantiles:
            raise ValueError("a quantiles query needs quantiles = [0.25, 0.5, ...]")
        if self.quantiles and not all(0 < q < 1 for q in self.quantiles):
            raise ValueError("quantiles must lie strictly between 0 and 1")
        if kind is QueryKind.CHURN_RATE and self.table is not Table.CUSTOMERS:
            raise ValueError("a churn_rate query reads the customers table")
        if kind in (QueryKind.RETENTION, QueryKind.WEEKLY_TREND, QueryKind.SEGMENT_SIZES):
            if self.table is not Table.TRANSACTIONS:
                raise ValueError(f"a {kind.value} query reads the transactions table")
            if self.as_of is None:
                raise ValueError(f"a {kind.value} query needs as_of (a public date)")
        if self.cohorts is not None:
            if kind is not QueryKind.RETENTION:
                raise ValueError("cohorts belong to a retention query")
            if any(b <= a for a, b in itertools.pairwise(self.cohorts)):
                raise ValueError("cohorts must be strictly increasing dates")
        if kind is QueryKind.WEEKLY_TREND and self.start is None:
            raise ValueError("a weekly_trend query needs start (the first week's start date)")
        if self.group_by is not None and kind in (
            QueryKind.SEGMENT_SIZES, QueryKind.RETENTION, QueryKind.WEEKLY_TREND
        ):
            raise ValueError(f"a {kind.value} query has its own groups; drop [query.group_by]")
        return self

    @property
    def groups(self) -> tuple[str, ...]:
        """The public group keys ("all" when the query is not grouped; the cohorts' start
        dates for a retention query with cohorts)."""
        if self.kind is QueryKind.RETENTION and self.cohorts:
            return tuple(f"cohort {c.isoformat()}" for c in self.cohorts)
        return tuple(self.group_by.keys) if self.group_by else ("all",)

    def canonical_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))

    def fingerprint(self) -> str:
        return hashlib.sha256(self.canonical_json().encode()).hexdigest()

    @classmethod
    def from_json(cls, text: str) -> QuerySpec:
        try:
            return cls.model_validate(json.loads(text))
        except (ValueError, ValidationError) as exc:
            raise ConfigError(f"malformed query from the coordinator: {exc}") from None


class QueryFile(BaseModel):
    """``query.toml``: one ``[query]``."""

    model_config = _FROZEN

    query: QuerySpec
