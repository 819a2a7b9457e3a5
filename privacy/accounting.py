"""Rényi-DP accounting for the mechanisms fedcrm releases through.

Pure functions over numpy/scipy, no torch. Three mechanisms:

* :attr:`Mechanism.SUBSAMPLED_GAUSSIAN` - DP-SGD with Poisson sampling. RDP of the Sampled
  Gaussian Mechanism from Mironov, Talwar & Zhang, "Rényi Differential Privacy of the Sampled
  Gaussian Mechanism" (2019, arXiv:1908.10530), Sec. 3.3: ``log A_α`` summed exactly for integer
  orders and by the two-sided series for fractional orders.
* :attr:`Mechanism.GAUSSIAN` - a single Gaussian query (no subsampling, ``sample_rate=1``):
  ``RDP(α) = α / (2σ²)`` (Mironov 2017, "Rényi Differential Privacy", Prop. 7).
* :attr:`Mechanism.LAPLACE` - a Laplace query with ``b / Δ₁ = noise_multiplier``, ``ε₀ = 1/nm``:
  ``RDP(α) = ε₀ + log(1 + (α-1)(exp((1-2α)ε₀) - 1)/(2α-1)) / (α-1)`` (Mironov 2017, Prop. 6).

RDP composes by addition at every order (Mironov 2017, Prop. 1); the total is converted once to
(ε, δ) with the improved bound of Canonne, Kamath & Steinke (2020, arXiv:2004.00010, Prop. 12),
equivalently Balle et al. (2020, arXiv:1905.09982, Thm. 21) - the conversion Opacus and Google's
``dp_accounting`` use. The series and the order grid follow ``dp_accounting``'s RDP accountant so
both give the same numbers (checked in ``tests/test_accounting.py``).

Privacy facts are immutable :class:`DpEvent` values; totals are always derived by composing them.
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt
from scipy import special

from fedcrm.privacy.errors import PlanDoesNotFit

FloatArray = npt.NDArray[np.float64]
ContextValue = str | int | float


_V = TypeVar("_V")


class FrozenMapping(Mapping[str, _V]):
    """An immutable, hashable, picklable ``str``-keyed mapping (event context, ε per purpose)."""

    __slots__ = ("_data",)

    def __init__(self, data: Mapping[str, _V] | None = None) -> None:
        self._data: dict[str, _V] = dict(data or {})

    def __getitem__(self, key: str) -> _V:
        return self._data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __hash__(self) -> int:
        return hash(frozenset(self._data.items()))

    def __repr__(self) -> str:
        return f"FrozenMapping({self._data!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (FrozenMapping, (self._data,))


class Mechanism(StrEnum):
    """The noise mechanism of a DP release."""

    SUBSAMPLED_GAUSSIAN = "subsampled_gaussian"
    GAUSSIAN = "gaussian"
    LAPLACE = "laplace"


DEFAULT_ORDERS: tuple[float, ...] = tuple(
    [1.0 + x / 10.0 for x in range(1, 100)]
    + [float(a) for a in range(11, 64)]
    + [128.0, 256.0, 512.0, 1024.0]
)
"""RDP orders α: ``dp_accounting``'s ``DEFAULT_RDP_ORDERS`` grid (dense near 1, up to 1024)."""

MAX_NOISE_MULTIPLIER = 1e4
""":func:`calibrate_noise` gives up above this noise multiplier: the release would be useless."""

MIN_NOISE_MULTIPLIER = 1e-3
""":func:`calibrate_noise` never returns less noise than this."""

_SERIES_TERMS = (64, 256, 1000)
"""Terms tried for the fractional-order series; the cap (1000) is ``dp_accounting``'s, so an order
it cannot evaluate is excluded here too and both report the same ε (the audit relies on that)."""


# ------------------------------------------------------------------------------ validation


def _check_mechanism(mechanism: Mechanism | str) -> Mechanism:
    try:
        return Mechanism(mechanism)
    except ValueError:
        allowed = ", ".join(m.value for m in Mechanism)
        raise ValueError(f"unknown DP mechanism {mechanism!r}; use one of: {allowed}") from None


def _check_noise(noise_multiplier: float) -> float:
    if (
        isinstance(noise_multiplier, bool)
        or not isinstance(noise_multiplier, numbers.Real)
        or not math.isfinite(noise_multiplier)
        or noise_multiplier <= 0
    ):
        raise ValueError(
            f"noise_multiplier must be a finite number > 0 (noise std / sensitivity), got "
            f"{noise_multiplier!r}; a release without noise has no DP guarantee"
        )
    return float(noise_multiplier)


def _check_rate(mechanism: Mechanism, sample_rate: float) -> float:
    if (
        isinstance(sample_rate, bool)
        or not isinstance(sample_rate, numbers.Real)
        or not 0.0 <= sample_rate <= 1.0
    ):
        raise ValueError(f"sample_rate must be a probability in [0, 1], got {sample_rate!r}")
    if mechanism is not Mechanism.SUBSAMPLED_GAUSSIAN and sample_rate != 1.0:
        raise ValueError(
            f"the {mechanism.value} mechanism queries the whole table, so sample_rate must be 1.0 "
            f"(got {sample_rate!r}); use Mechanism.SUBSAMPLED_GAUSSIAN for Poisson-sampled DP-SGD"
        )
    return float(sample_rate)


def _check_steps(steps: int) -> int:
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 0:
        raise ValueError(f"steps must be an integer >= 0, got {steps!r}")
    return int(steps)


def _check_delta(delta: float) -> float:
    if isinstance(delta, bool) or not isinstance(delta, numbers.Real) or not 0.0 < delta < 1.0:
        raise ValueError(f"delta must lie in (0, 1), got {delta!r}; a typical choice is 1e-5")
    return float(delta)


def _check_orders(orders: Sequence[float]) -> tuple[float, ...]:
    out = tuple(float(a) for a in orders)
    if not out or not all(math.isfinite(a) and a > 1.0 for a in out):
        raise ValueError(
            f"RDP orders must be a non-empty list of finite numbers > 1, got {orders!r}"
        )
    return out


# ------------------------------------------------------------------------- RDP, one step


def _log_comb(n: float | FloatArray, k: float | FloatArray) -> FloatArray:
    """log |C(n, k)| for real n (negative binomial coefficients give their magnitude)."""
    return np.asarray(
        special.gammaln(n + 1.0) - special.gammaln(k + 1.0) - special.gammaln(n - k + 1.0),
        dtype=np.float64,
    )


def _log_a_int(q: float, sigma: float, alphas: FloatArray) -> FloatArray:
    """``log A_α`` for integer orders (Mironov, Talwar & Zhang 2019, Sec. 3.3, binomial sum).

    ``log A_α = log Σ_{i=0..α} C(α, i) q^i (1-q)^(α-i) exp((i² - i) / (2σ²))``. Orders up to 64
    are evaluated as one block, larger ones one by one (the sum has α + 1 terms).
    """
    out = np.empty(alphas.shape, dtype=np.float64)
    if alphas.size == 0:
        return out
    log_fact = special.gammaln(np.arange(int(alphas.max()) + 1, dtype=np.float64) + 1.0)
    small = alphas <= 64
    groups = [np.flatnonzero(small)] + [np.array([k]) for k in np.flatnonzero(~small)]
    for rows in groups:
        if rows.size == 0:
            continue
        a_idx = alphas[rows].astype(np.int64)[:, None]
        i_idx = np.arange(int(a_idx.max()) + 1)[None, :]
        valid = i_idx <= a_idx
        a, i = a_idx.astype(np.float64), i_idx.astype(np.float64)
        log_coef = log_fact[a_idx] - log_fact[i_idx] - log_fact[np.where(valid, a_idx - i_idx, 0)]
        terms = (
            log_coef + i * math.log(q) + (a - i) * math.log1p(-q) + (i * i - i) / (2.0 * sigma**2)
        )
        terms = np.where(valid, terms, -np.inf)
        peak = terms.max(axis=1, keepdims=True)
        out[rows] = peak[:, 0] + np.log(np.exp(terms - peak).sum(axis=1))
    return out


def _log_a_frac(q: float, sigma: float, alphas: FloatArray) -> FloatArray:
    """``log A_α`` for fractional orders (Mironov, Talwar & Zhang 2019, Sec. 3.3, two-sided series).

    Magnitudes of the (alternating) binomial terms are summed, which upper-bounds ``A_α`` and
    matches ``dp_accounting``; the series stops once both halves are decreasing and 30 nats below
    the running total. An order whose series has not converged after 1000 terms gets ``inf``
    (excluded, which can only raise ε).
    """
    out = np.full(alphas.shape, np.inf, dtype=np.float64)
    z0 = sigma**2 * math.log(1.0 / q - 1.0) + 0.5
    log_q, log_1mq = math.log(q), math.log1p(-q)
    pending = np.arange(alphas.size)
    for n_terms in _SERIES_TERMS:
        if pending.size == 0:
            break
        a = alphas[pending][:, None]
        i = np.arange(n_terms, dtype=np.float64)[None, :]
        j = a - i
        log_coef = _log_comb(a, i)
        log_t0 = log_coef + i * log_q + j * log_1mq
        log_t1 = log_coef + j * log_q + i * log_1mq
        log_e0 = special.log_ndtr(-(i - z0) / sigma)  # log(erfc((i - z0) / (√2σ)) / 2)
        log_e1 = special.log_ndtr(-(z0 - j) / sigma)
        log_s0 = log_t0 + (i * i - i) / (2.0 * sigma**2) + log_e0
        log_s1 = log_t1 + (j * j - j) / (2.0 * sigma**2) + log_e1
        total = np.logaddexp(
            np.logaddexp.accumulate(log_s0, axis=1), np.logaddexp.accumulate(log_s1, axis=1)
        )
        done = np.zeros(log_s0.shape, dtype=bool)
        done[:, 1:] = (
            (log_s0[:, 1:] < log_s0[:, :-1])
            & (log_s1[:, 1:] < log_s1[:, :-1])
            & (np.maximum(log_s0[:, 1:], log_s1[:, 1:]) < total[:, 1:] - 30.0)
        )
        converged = done.any(axis=1)
        first = done.argmax(axis=1)
        rows = np.flatnonzero(converged)
        out[pending[rows]] = total[rows, first[rows]]
        pending = pending[~converged]
    return out


@functools.lru_cache(maxsize=4096)
def _rdp_one_step(
    mechanism: Mechanism, noise_multiplier: float, sample_rate: float, orders: tuple[float, ...]
) -> tuple[float, ...]:
    """RDP of one application of the mechanism at each order (validated inputs, cached)."""
    if mechanism is Mechanism.LAPLACE:
        eps0 = 1.0 / noise_multiplier
        return tuple(
            eps0 + math.log1p((a - 1.0) * math.expm1((1.0 - 2.0 * a) * eps0) / (2.0 * a - 1.0))
            / (a - 1.0)
            for a in orders
        )
    q, sigma = sample_rate, noise_multiplier
    if q == 0.0:
        return tuple(0.0 for _ in orders)
    if q == 1.0:
        return tuple(a / (2.0 * sigma**2) for a in orders)
    alphas = np.asarray(orders, dtype=np.float64)
    is_int = alphas == np.floor(alphas)
    log_a = np.empty_like(alphas)
    log_a[is_int] = _log_a_int(q, sigma, alphas[is_int])
    log_a[~is_int] = _log_a_frac(q, sigma, alphas[~is_int])
    return tuple(float(v) for v in log_a / (alphas - 1.0))


def rdp(
    *,
    mechanism: Mechanism | str,
    noise_multiplier: float,
    sample_rate: float,
    steps: int,
    orders: Sequence[float] = DEFAULT_ORDERS,
) -> FloatArray:
    """RDP ε(α) of ``steps`` self-composed releases, one value per order in ``orders``.

    Subsampled Gaussian: Mironov, Talwar & Zhang (2019), Sec. 3.3. Gaussian: Mironov (2017),
    Prop. 7. Laplace (``noise_multiplier`` = scale / L1 sensitivity): Mironov (2017), Prop. 6.
    Composition over steps is additive (Mironov 2017, Prop. 1). May contain ``inf``.

    Raises:
        ValueError: on an unknown mechanism, non-positive noise, a rate outside [0, 1] (or != 1
            for the non-subsampled mechanisms), negative steps or orders not > 1.
    """
    mech = _check_mechanism(mechanism)
    sigma = _check_noise(noise_multiplier)
    q = _check_rate(mech, sample_rate)
    n = _check_steps(steps)
    alphas = _check_orders(orders)
    if n == 0:
        return np.zeros(len(alphas), dtype=np.float64)
    return np.asarray(_rdp_one_step(mech, sigma, q, alphas), dtype=np.float64) * float(n)


# ------------------------------------------------------------------------ RDP -> (ε, δ)


def epsilon_from_rdp(
    *, orders: Sequence[float], rdp: Sequence[float] | FloatArray, delta: float
) -> float:
    """Smallest ε over ``orders`` such that the RDP curve implies (ε, δ)-DP.

    Uses the improved conversion of Canonne, Kamath & Steinke (2020, Prop. 12) / Balle et al.
    (2020, Thm. 21): ``ε = r + log(1 - 1/α) - log(δ·α)/(α - 1)``, and ε = 0 where the KL bound
    ``δ ≥ sqrt(1 - exp(-r))`` already holds - exactly as ``dp_accounting.rdp.compute_epsilon``.
    Returns ``inf`` when no order gives a finite bound.
    """
    d = _check_delta(delta)
    alphas = np.asarray(_check_orders(orders), dtype=np.float64)
    r = np.asarray(rdp, dtype=np.float64)
    if r.shape != alphas.shape:
        raise ValueError(
            f"orders and rdp must have the same length, got {alphas.size} orders and "
            f"{r.size} RDP values"
        )
    if np.isnan(r).any():
        raise ValueError("rdp contains NaN; recompute it with rdp()")
    with np.errstate(over="ignore", invalid="ignore"):
        eps = r + np.log1p(-1.0 / alphas) - np.log(d * alphas) / (alphas - 1.0)
        kl_enough = d**2 + np.expm1(-r) > 0
    eps = np.where((r <= 0) | kl_enough, 0.0, eps)
    best = float(np.min(eps))
    return max(0.0, best)


# ------------------------------------------------------------------------------ events


def _check_context(context: Mapping[str, Any] | None) -> Mapping[str, ContextValue]:
    if context is None:
        return FrozenMapping()
    if not isinstance(context, Mapping):
        raise ValueError(
            f"context must be a mapping of str to str/int/float, got {type(context).__name__}"
        )
    out: dict[str, ContextValue] = {}
    for key, value in context.items():
        if not isinstance(key, str):
            raise ValueError(f"context keys must be strings, got {key!r}")
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"context[{key!r}] must be finite, got {value!r}")
        if not isinstance(value, str | int | float):
            raise ValueError(
                f"context[{key!r}] must be a str, int or float, got {type(value).__name__}"
            )
        out[key] = value
    return FrozenMapping(out)


def _check_timestamp(timestamp: str) -> str:
    try:
        parsed = datetime.fromisoformat(timestamp)
    except (TypeError, ValueError):
        raise ValueError(f"timestamp must be an ISO-8601 UTC string, got {timestamp!r}") from None
    offset = parsed.utcoffset()
    if offset is None or offset.total_seconds() != 0:
        raise ValueError(f"timestamp must be in UTC (offset +00:00), got {timestamp!r}")
    return timestamp


def _utc_iso(now: datetime | None) -> str:
    moment = datetime.now(UTC) if now is None else now
    if moment.tzinfo is None:
        raise ValueError("now must be timezone-aware (e.g. datetime.now(UTC))")
    return moment.astimezone(UTC).isoformat()


@dataclass(frozen=True)
class DpEvent:
    """One DP release: the mechanism's parameters and the ε it alone costs at its δ.

    ``noise_multiplier`` is noise std / L2 sensitivity for the Gaussian mechanisms and
    scale / L1 sensitivity for Laplace. ``epsilon`` is informational: ledgers and accountants
    recompute ε from the parameters by composing RDP. Mirrors ``dp_accounting``'s
    ``SelfComposedDpEvent(PoissonSampledDpEvent(q, GaussianDpEvent(σ)), steps)``.
    """

    mechanism: Mechanism
    noise_multiplier: float
    sample_rate: float
    steps: int
    delta: float
    epsilon: float
    purpose: str
    timestamp: str
    context: Mapping[str, ContextValue] = field(default_factory=FrozenMapping)

    def __post_init__(self) -> None:
        mech = _check_mechanism(self.mechanism)
        object.__setattr__(self, "mechanism", mech)
        object.__setattr__(self, "noise_multiplier", _check_noise(self.noise_multiplier))
        object.__setattr__(self, "sample_rate", _check_rate(mech, self.sample_rate))
        object.__setattr__(self, "steps", _check_steps(self.steps))
        object.__setattr__(self, "delta", _check_delta(self.delta))
        eps = self.epsilon
        if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not eps >= 0:
            raise ValueError(f"epsilon must be a number >= 0, got {eps!r}")
        object.__setattr__(self, "epsilon", float(eps))
        if not isinstance(self.purpose, str) or not self.purpose.strip():
            raise ValueError(f"purpose must be a non-empty string, got {self.purpose!r}")
        object.__setattr__(self, "timestamp", _check_timestamp(self.timestamp))
        object.__setattr__(self, "context", _check_context(self.context))

    def to_json(self) -> dict[str, Any]:
        """Plain JSON-serialisable dict (``mechanism`` as its string value)."""
        return {
            "mechanism": self.mechanism.value,
            "noise_multiplier": self.noise_multiplier,
            "sample_rate": self.sample_rate,
            "steps": self.steps,
            "delta": self.delta,
            "epsilon": self.epsilon,
            "purpose": self.purpose,
            "timestamp": self.timestamp,
            "context": dict(self.context),
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> DpEvent:
        """Parse and validate a dict written by :meth:`to_json`; unknown keys are ignored.

        Raises:
            ValueError: naming the missing or invalid field.
        """
        if not isinstance(d, Mapping):
            raise ValueError(f"a DP event must be a JSON object, got {type(d).__name__}")
        required = ("mechanism", "noise_multiplier", "sample_rate", "steps", "delta", "epsilon",
                    "purpose", "timestamp")
        missing = [k for k in required if k not in d]
        if missing:
            raise ValueError(f"DP event is missing field(s): {', '.join(missing)}")
        eps = d["epsilon"]
        if isinstance(eps, float | int) and not isinstance(eps, bool) and math.isinf(eps):
            raise ValueError("DP event has epsilon=inf, which no budget can fund")
        return cls(
            mechanism=d["mechanism"],
            noise_multiplier=d["noise_multiplier"],
            sample_rate=d["sample_rate"],
            steps=d["steps"],
            delta=d["delta"],
            epsilon=eps,
            purpose=d["purpose"],
            timestamp=d["timestamp"],
            context=d.get("context") or {},
        )


def _events_rdp(events: Sequence[DpEvent]) -> FloatArray:
    """RDP at :data:`DEFAULT_ORDERS` of all ``events`` composed (summed per order)."""
    total = np.zeros(len(DEFAULT_ORDERS), dtype=np.float64)
    for event in events:
        total += rdp(
            mechanism=event.mechanism,
            noise_multiplier=event.noise_multiplier,
            sample_rate=event.sample_rate,
            steps=event.steps,
        )
    return total


def compose_epsilon(events: Sequence[DpEvent], *, delta: float) -> float:
    """ε at ``delta`` of all ``events`` together: RDP summed per order, converted once.

    Each event's own δ is ignored; the composition is evaluated at ``delta`` (typically the firm's
    budget δ). When every event is Laplace, the pure-DP basic composition ``Σ steps / b``
    (Dwork et al. 2006) is also a valid bound and the smaller of the two is returned.
    ``0.0`` for no events.
    """
    d = _check_delta(delta)
    if not events:
        return 0.0
    eps = epsilon_from_rdp(orders=DEFAULT_ORDERS, rdp=_events_rdp(events), delta=d)
    if all(e.mechanism is Mechanism.LAPLACE for e in events):
        eps = min(eps, math.fsum(e.steps / e.noise_multiplier for e in events))
    return eps


def make_event(
    *,
    mechanism: Mechanism | str,
    noise_multiplier: float,
    sample_rate: float,
    steps: int,
    delta: float,
    purpose: str,
    context: Mapping[str, ContextValue] | None = None,
    now: datetime | None = None,
) -> DpEvent:
    """Build a :class:`DpEvent`, computing its ε alone at its own ``delta``.

    ``now`` (timezone-aware) fixes the timestamp for tests; default is the current UTC time.
    """
    mech = _check_mechanism(mechanism)
    # Validate and compute through a provisional event so errors name the bad field once.
    provisional = DpEvent(
        mechanism=mech,
        noise_multiplier=noise_multiplier,
        sample_rate=sample_rate,
        steps=steps,
        delta=delta,
        epsilon=0.0,
        purpose=purpose,
        timestamp=_utc_iso(now),
        context=_check_context(context),
    )
    eps = compose_epsilon([provisional], delta=provisional.delta)
    if not math.isfinite(eps):
        raise ValueError(
            f"{mech.value} release with noise_multiplier={noise_multiplier} has no finite ε at "
            f"δ={delta}; add noise"
        )
    return DpEvent(
        mechanism=provisional.mechanism,
        noise_multiplier=provisional.noise_multiplier,
        sample_rate=provisional.sample_rate,
        steps=provisional.steps,
        delta=provisional.delta,
        epsilon=eps,
        purpose=provisional.purpose,
        timestamp=provisional.timestamp,
        context=provisional.context,
    )


# ---------------------------------------------------------------------- planning DP-SGD


def _plan_rdp(*, noise_multiplier: float, sample_rate: float, steps: int) -> FloatArray:
    return rdp(
        mechanism=Mechanism.SUBSAMPLED_GAUSSIAN,
        noise_multiplier=noise_multiplier,
        sample_rate=sample_rate,
        steps=steps,
    )


def epsilon_for(
    *,
    noise_multiplier: float,
    sample_rate: float,
    steps: int,
    delta: float,
    prior_events: Sequence[DpEvent] = (),
) -> float:
    """ε at ``delta`` of ``steps`` Poisson-subsampled Gaussian steps composed with ``prior_events``.

    The DP-SGD analysis of Abadi et al. (2016) with the RDP accountant of Mironov, Talwar & Zhang
    (2019). ``steps=0`` or ``sample_rate=0`` adds nothing.
    """
    d = _check_delta(delta)
    total = _events_rdp(prior_events) + _plan_rdp(
        noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=steps
    )
    return epsilon_from_rdp(orders=DEFAULT_ORDERS, rdp=total, delta=d)


def calibrate_noise(
    *,
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    prior_events: Sequence[DpEvent] = (),
    tolerance: float = 0.01,
) -> float:
    """Smallest noise multiplier σ such that ``prior_events`` + this DP-SGD plan stays within
    ``target_epsilon`` (the firm's TOTAL cap) at ``delta``.

    Bisection on σ in log space (as Opacus' ``get_noise_multiplier``), using
    :func:`epsilon_for`. ``tolerance`` is relative: the returned σ always satisfies
    ``ε(σ) <= target_epsilon``, lies within a factor ``1 + tolerance`` of the smallest feasible
    σ, and gives ``ε(σ) >= (1 - tolerance) * target_epsilon`` (unless the bracket has shrunk to
    a 1e-6 relative width first, e.g. when ε barely moves with σ).

    Raises:
        ValueError: on invalid arguments (steps and sample_rate must be positive).
        PlanDoesNotFit: when the prior releases already use the cap, or the plan would need a
            noise multiplier above ``MAX_NOISE_MULTIPLIER``; the message names the numbers.
    """
    if (
        isinstance(target_epsilon, bool)
        or not isinstance(target_epsilon, numbers.Real)
        or not math.isfinite(target_epsilon)
        or target_epsilon <= 0
    ):
        raise ValueError(f"target_epsilon must be a finite number > 0, got {target_epsilon!r}")
    d = _check_delta(delta)
    q = _check_rate(Mechanism.SUBSAMPLED_GAUSSIAN, sample_rate)
    n = _check_steps(steps)
    if n == 0 or q == 0.0:
        raise ValueError(
            f"calibrate_noise needs steps >= 1 and sample_rate > 0 (got steps={steps}, "
            f"sample_rate={sample_rate}); a plan that touches no data needs no noise"
        )
    if not 0.0 < tolerance < 1.0:
        raise ValueError(f"tolerance must lie in (0, 1), got {tolerance!r}")
    target = float(target_epsilon)
    prior = _events_rdp(prior_events)
    spent = epsilon_from_rdp(orders=DEFAULT_ORDERS, rdp=prior, delta=d)

    def eps_at(sigma: float) -> float:
        plan = _plan_rdp(noise_multiplier=sigma, sample_rate=q, steps=n)
        return epsilon_from_rdp(orders=DEFAULT_ORDERS, rdp=prior + plan, delta=d)

    def does_not_fit(why: str) -> PlanDoesNotFit:
        return PlanDoesNotFit(
            f"DP plan of {n} steps at sample rate q={q:.4g} cannot fit the ε cap {target:.4f} "
            f"at δ={d:g}: ε already spent {spent:.4f}; {why}. Raise the firm's epsilon budget "
            "(a governance decision), or train fewer rounds/epochs or with a smaller batch"
        )

    if spent >= target:
        raise does_not_fit("nothing is left for this plan")
    if eps_at(MAX_NOISE_MULTIPLIER) > target:
        raise does_not_fit(
            f"even noise multiplier {MAX_NOISE_MULTIPLIER:g} would exceed it"
        )
    if eps_at(MIN_NOISE_MULTIPLIER) <= target:
        return MIN_NOISE_MULTIPLIER

    # Invariant: eps(lo) > target >= eps(hi); bisect geometrically (σ spans decades).
    lo, hi = MIN_NOISE_MULTIPLIER, MAX_NOISE_MULTIPLIER
    eps_hi = eps_at(hi)
    for _ in range(200):
        if (eps_hi >= (1.0 - tolerance) * target and hi / lo <= 1.0 + tolerance) or (
            hi / lo <= 1.0 + 1e-6
        ):
            break
        mid = math.sqrt(lo * hi)
        eps_mid = eps_at(mid)
        if eps_mid > target:
            lo = mid
        else:
            hi, eps_hi = mid, eps_mid
    return hi
