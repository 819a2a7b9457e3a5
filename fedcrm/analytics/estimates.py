"""The coordinator's side of a query: estimates, noise and 95% intervals from the noisy totals.

Everything here is post-processing of DP releases (it costs no privacy). The input is the sum of
the firms' noisy integer vectors in the query's public layout and the sum of their noise
variances (each firm states its noise standard deviation, which follows from the query alone).

* Totals (counts, sums, weekly purchase days) are unbiased: the estimate is the noisy total, its
  noise standard deviation is exact and the 95% interval is ``± 1.96 σ``.
* Ratios and curves (mean, churn rate, quantiles, Kaplan-Meier retention) are computed from the
  noisy totals; their noise standard deviation and 95% interval come from a parametric bootstrap
  of the noise (``BOOTSTRAP`` redraws of Gaussian noise of the known variance around the noisy
  totals, the interval being the 2.5% and 97.5% quantiles).

The intervals cover the DP noise only - not the sampling variation of the firms' customers, which
a query over the whole customer base does not have.

Groups whose noisy customer count is below ``suppress_below`` are reported as suppressed: no
estimate, and the figures leave them out.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass

import numpy as np

from fedcrm.analytics.spec import QueryKind, QuerySpec
from fedcrm.analytics.statistics import SEGMENTS, Layout, layout

#: Parametric bootstrap redraws for nonlinear estimates.
BOOTSTRAP = 2000
Z95 = 1.959963984540054


@dataclass(frozen=True)
class Estimate:
    """One reported number: which group and statistic, the estimate, its noise and interval."""

    group: str
    statistic: str
    estimate: float | None
    noise_std: float | None
    ci_low: float | None
    ci_high: float | None
    suppressed: bool = False

    def to_json(self) -> dict[str, object]:
        return asdict(self)


@dataclass(frozen=True)
class Totals:
    """The summed noisy vector, split by statistic, in each statistic's own units, with the
    standard deviation of its noise (the same for every value of a statistic)."""

    values: Mapping[str, np.ndarray]
    noise_std: Mapping[str, float]

    @classmethod
    def from_sum(cls, spec: QuerySpec, total: np.ndarray, noise_variance: float, *,
                 secure: bool = False) -> Totals:
        """From the summed integer vector and the summed noise variance (grid units²)."""
        shape: Layout = layout(spec, secure=secure)
        parts = shape.split(np.asarray(total, dtype=np.float64))
        units = {s.name: s.unit for s in shape.statistics}
        sd = float(np.sqrt(noise_variance))
        return cls({k: v * units[k] for k, v in parts.items()},
                   {k: sd * units[k] for k in parts})

    def redraw(self, rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
        """``n`` bootstrap copies of every statistic (rows), noise redrawn around the totals."""
        return {
            k: v[None, :] + rng.normal(0.0, self.noise_std[k], size=(n, len(v)))
            for k, v in self.values.items()
        }


def _linear(group: str, statistic: str, value: float, sd: float,
            suppressed: bool = False) -> Estimate:
    if suppressed:
        return Estimate(group, statistic, None, None, None, None, True)
    return Estimate(group, statistic, float(value), sd, float(value - Z95 * sd),
                    float(value + Z95 * sd))


def _bootstrapped(group: str, statistic: str, point: float, draws: np.ndarray,
                  suppressed: bool = False) -> Estimate:
    if suppressed:
        return Estimate(group, statistic, None, None, None, None, True)
    finite = draws[np.isfinite(draws)]
    if len(finite) < 2:
        return Estimate(group, statistic, float(point), None, None, None)
    low, high = np.quantile(finite, [0.025, 0.975])
    return Estimate(group, statistic, float(point), float(np.std(finite)), float(low),
                    float(high))


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """numerator / denominator with the denominator held at >= 1 (noise can push it below)."""
    return numerator / np.maximum(denominator, 1.0)


def estimate(spec: QuerySpec, totals: Totals, *, seed: int | None = None,
             bootstrap: int = BOOTSTRAP) -> list[Estimate]:
    """Every estimate of the query (see the module docstring); ``bootstrap=0`` skips the
    intervals of nonlinear estimates (a benchmark's redraws need only the point estimates)."""
    rng = np.random.default_rng(seed)
    boot = totals.redraw(rng, bootstrap)
    v, sd = totals.values, totals.noise_std
    groups = spec.groups
    below = spec.suppress_below
    out: list[Estimate] = []
    kind = spec.kind
    if kind is QueryKind.COUNT:
        for i, g in enumerate(groups):
            out.append(_linear(g, "count", v["count"][i], sd["count"], v["count"][i] < below))
    elif kind in (QueryKind.SUM, QueryKind.MEAN):
        for i, g in enumerate(groups):
            hidden = bool(v["count"][i] < below)
            out.append(_linear(g, "count", v["count"][i], sd["count"], hidden))
            if kind is QueryKind.SUM:
                out.append(_linear(g, "sum", v["sum"][i], sd["sum"], hidden))
            else:
                mean = _ratio(v["sum"][i], v["count"][i])
                draws = _ratio(boot["sum"][:, i], boot["count"][:, i])
                out.append(_bootstrapped(g, "mean", float(mean), draws, hidden))
    elif kind is QueryKind.CHURN_RATE:
        customers = v["stayed"] + v["churners"]
        customers_sd = float(np.hypot(sd["stayed"], sd["churners"]))
        boot_customers = boot["stayed"] + boot["churners"]
        for i, g in enumerate(groups):
            hidden = bool(customers[i] < below)
            out.append(_linear(g, "customers", customers[i], customers_sd, hidden))
            rate = float(np.clip(_ratio(v["churners"][i], customers[i]), 0.0, 1.0))
            draws = np.clip(_ratio(boot["churners"][:, i], boot_customers[:, i]), 0.0, 1.0)
            out.append(_bootstrapped(g, "churn_rate", rate, draws, hidden))
    elif kind in (QueryKind.HISTOGRAM, QueryKind.QUANTILES):
        assert spec.bins is not None
        bins = len(spec.bins) - 1
        counts = v["count"].reshape(len(groups), bins)
        draws_all = boot["count"].reshape(bootstrap, len(groups), bins)
        for i, g in enumerate(groups):
            hidden = bool(counts[i].sum() < below)
            if kind is QueryKind.HISTOGRAM:
                for b in range(bins):
                    label = f"[{spec.bins[b]:g}, {spec.bins[b + 1]:g})"
                    out.append(_linear(g, f"count {label}", counts[i, b], sd["count"], hidden))
                continue
            assert spec.quantiles is not None
            point = quantiles_from_histogram(counts[i], spec.bins, spec.quantiles)
            draws = np.asarray([quantiles_from_histogram(d, spec.bins, spec.quantiles)
                                for d in draws_all[:, i, :]]).reshape(
                                    bootstrap, len(spec.quantiles))
            for j, q in enumerate(spec.quantiles):
                column = draws[:, j] if bootstrap else np.empty(0)
                out.append(_bootstrapped(g, f"q{q:g}", point[j], column, hidden))
    elif kind is QueryKind.SEGMENT_SIZES:
        for i, segment in enumerate(SEGMENTS):
            out.append(_linear(segment, "customers", v["count"][i], sd["count"],
                               v["count"][i] < below))
    elif kind is QueryKind.RETENTION:
        out.extend(_retention(spec, v, boot, below))
    else:
        for week in range(spec.weeks):
            out.append(_linear(f"week {week + 1}", "purchase_days", v["purchase_days"][week],
                               sd["purchase_days"]))
    return out


def quantiles_from_histogram(counts: np.ndarray, edges: list[float] | tuple[float, ...],
                             quantiles: list[float] | tuple[float, ...]) -> np.ndarray:
    """Quantiles of a (noisy) histogram: negative counts set to 0, linear within a bin."""
    c = np.maximum(np.asarray(counts, dtype=np.float64), 0.0)
    total = c.sum()
    e = np.asarray(edges, dtype=np.float64)
    if total <= 0:
        return np.full(len(quantiles), np.nan)
    cdf = np.concatenate([[0.0], np.cumsum(c) / total])
    return np.interp(np.asarray(quantiles, dtype=np.float64), cdf, e)


def kaplan_meier(churned: np.ndarray, censored: np.ndarray) -> np.ndarray:
    """S(w): the share of customers still active after week w of their lifetime, w = 0.. from
    (noisy) churn and censoring counts per week; hazards are clipped to [0, 1]."""
    d = np.asarray(churned, dtype=np.float64)
    c = np.asarray(censored, dtype=np.float64)
    at_risk = np.cumsum((d + c)[..., ::-1], axis=-1)[..., ::-1]
    hazard = np.clip(d / np.maximum(at_risk, 1.0), 0.0, 1.0)
    return np.cumprod(1.0 - hazard, axis=-1)


def _retention(spec: QuerySpec, v: Mapping[str, np.ndarray], boot: Mapping[str, np.ndarray],
               below: float) -> list[Estimate]:
    weeks, width = spec.weeks, spec.weeks + 1
    out = []
    for i, group in enumerate(spec.groups):
        cells = slice(i * width, (i + 1) * width)
        point = kaplan_meier(v["churned"][cells], v["censored"][cells])[:weeks]
        draws = kaplan_meier(boot["churned"][:, cells], boot["censored"][:, cells])[:, :weeks]
        at_risk = np.cumsum((v["churned"][cells] + v["censored"][cells])[::-1])[::-1]
        label = "" if group == "all" else f"{group}, "
        for w in range(weeks):
            hidden = bool(at_risk[w] < below)
            out.append(_bootstrapped(f"{label}week {w + 1}", "retention", point[w],
                                     draws[:, w], hidden))
    return out
