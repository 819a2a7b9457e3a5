"""fedcrm's privacy events and their accounting, delegated to Google's ``dp_accounting``.

No accountant mathematics lives here. A release is recorded as a frozen, serialisable
:class:`DpEvent` (mechanism, noise multiplier, sampling rate, steps, δ, purpose, context);
:meth:`DpEvent.to_dp_accounting` turns it into ``dp_accounting``'s event algebra
(``SelfComposedDpEvent(PoissonSampledDpEvent(q, GaussianDpEvent(σ)), steps)``, Abadi et al. 2016;
a plain ``GaussianDpEvent`` for whole-table queries), and ``dp_accounting``'s
RDP accountant (Mironov 2017; Mironov, Talwar & Zhang 2019 for the subsampled Gaussian; the
RDP → (ε, δ) conversion of Balle et al. 2020 / Canonne, Kamath & Steinke 2020) composes them.
Noise is calibrated with ``dp_accounting.mechanism_calibration.calibrate_dp_mechanism`` over the
firm's composed events, so "what would ε be if I composed this?" is answered before anything is
committed (as ``dp_accounting``'s accountants do).

Totals are always derived by composing the recorded events; nothing stores a running ε.
"""

from __future__ import annotations

import collections
import functools
import logging
import math
import numbers
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, TypeVar

import dp_accounting
from dp_accounting import mechanism_calibration
from dp_accounting.rdp import RdpAccountant

from fedcrm.privacy.errors import PlanDoesNotFit

ContextValue = str | int | float


class _ExcludedOrderFilter(logging.Filter):
    """Mute ``dp_accounting``'s note that a fractional RDP order did not converge.

    At very small noise the series for some orders near 1 does not converge in 1000 terms;
    ``dp_accounting`` then leaves those orders out of the minimum over orders, which can only make
    ε larger (more conservative). The note is expected during calibration, which probes small σ.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return "failed to converge" not in record.getMessage()


logging.getLogger("absl").addFilter(_ExcludedOrderFilter())


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


class NeighbouringRelation(StrEnum):
    """Which datasets a release's ε compares: fedcrm's releases are all add/remove one customer
    (``dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE``, its RDP accountant's default), which
    is why no exact count leaves a firm."""

    ADD_REMOVE = "add_remove"


MAX_NOISE_MULTIPLIER = 1e4
""":func:`calibrate_noise` gives up above this noise multiplier: the release would be useless."""

MIN_NOISE_MULTIPLIER = 1e-3
""":func:`calibrate_noise` never returns less noise than this."""

_BRACKET_START = 16.0
"""Where :func:`calibrate_noise` starts bracketing σ (budgets of ε ≈ 0.1-10 need σ ≈ 0.5-40)."""


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

    ``noise_multiplier`` is noise std / L2 sensitivity. ``epsilon`` is informational: ledgers and
    accountants recompute ε from the parameters by composing RDP. Mirrors ``dp_accounting``'s
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
    neighbouring: NeighbouringRelation = NeighbouringRelation.ADD_REMOVE

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
        try:
            object.__setattr__(self, "neighbouring", NeighbouringRelation(self.neighbouring))
        except ValueError:
            raise ValueError(
                f"neighbouring relation {self.neighbouring!r} is not supported; fedcrm accounts "
                "every release under add_remove"
            ) from None

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
            "neighbouring": self.neighbouring.value,
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
            neighbouring=d.get("neighbouring", NeighbouringRelation.ADD_REMOVE),
        )

    def to_dp_accounting(self) -> dp_accounting.DpEvent:
        """This release in ``dp_accounting``'s event algebra (what the accountant composes)."""
        return _dp_accounting_event(
            self.mechanism, self.noise_multiplier, self.sample_rate, self.steps
        )


def _dp_accounting_event(
    mechanism: Mechanism, noise_multiplier: float, sample_rate: float, steps: int
) -> dp_accounting.DpEvent:
    base: dp_accounting.DpEvent
    if sample_rate == 0.0 or steps == 0:
        return dp_accounting.NoOpDpEvent()  # touches no data
    else:
        base = dp_accounting.GaussianDpEvent(noise_multiplier)
        if mechanism is Mechanism.SUBSAMPLED_GAUSSIAN and sample_rate < 1.0:
            base = dp_accounting.PoissonSampledDpEvent(sample_rate, base)
    return dp_accounting.SelfComposedDpEvent(base, steps)


_Params = tuple[Mechanism, float, float, int]
"""What the accountant needs of an event: mechanism, noise multiplier, sample rate, steps."""


def _params(event: DpEvent) -> _Params:
    return (event.mechanism, event.noise_multiplier, event.sample_rate, event.steps)


def _grouped(events: Sequence[DpEvent]) -> tuple[tuple[_Params, int], ...]:
    """Identical releases counted once: a run repeats the same round event every round, and
    ``dp_accounting`` composes ``k`` copies of an event as cheaply as one."""
    return tuple(sorted(collections.Counter(_params(e) for e in events).items()))


def _composed_event(groups: Sequence[tuple[_Params, int]]) -> dp_accounting.DpEvent:
    return dp_accounting.ComposedDpEvent(
        [dp_accounting.SelfComposedDpEvent(_dp_accounting_event(*p), count) for p, count in groups]
    )


@functools.lru_cache(maxsize=4096)
def _epsilon_of(groups: tuple[tuple[_Params, int], ...], delta: float) -> float:
    """ε at ``delta`` of the composed groups (memoised: check, commit and status of one release
    ask for the same composition)."""
    if not groups:
        return 0.0
    accountant = RdpAccountant()
    accountant.compose(_composed_event(groups))
    return float(accountant.get_epsilon(delta))


def compose_epsilon(events: Sequence[DpEvent], *, delta: float) -> float:
    """ε at ``delta`` of all ``events`` together, by ``dp_accounting``'s RDP accountant.

    Each event's own δ is ignored; the composition is evaluated at ``delta`` (typically the firm's
    budget δ). ``0.0`` for no events.
    """
    return _epsilon_of(_grouped(events), _check_delta(delta))


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


def _plan_event(
    noise_multiplier: float, sample_rate: float, steps: int
) -> dp_accounting.DpEvent:
    return _dp_accounting_event(Mechanism.SUBSAMPLED_GAUSSIAN, noise_multiplier, sample_rate, steps)


def epsilon_for(
    *,
    noise_multiplier: float,
    sample_rate: float,
    steps: int,
    delta: float,
    prior_events: Sequence[DpEvent] = (),
) -> float:
    """ε at ``delta`` of ``steps`` Poisson-subsampled Gaussian steps composed with ``prior_events``.

    The DP-SGD analysis of Abadi et al. (2016), accounted by ``dp_accounting``. ``steps=0`` or
    ``sample_rate=0`` adds nothing.
    """
    plan = (Mechanism.SUBSAMPLED_GAUSSIAN, _check_noise(noise_multiplier),
            _check_rate(Mechanism.SUBSAMPLED_GAUSSIAN, sample_rate), _check_steps(steps))
    groups = collections.Counter(dict(_grouped(prior_events)))
    groups[plan] += 1
    return _epsilon_of(tuple(sorted(groups.items())), _check_delta(delta))


def calibrate_noise(
    *,
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    prior_events: Sequence[DpEvent] = (),
    tolerance: float = 1e-3,
) -> float:
    """Smallest noise multiplier σ such that ``prior_events`` + this DP-SGD plan stays within
    ``target_epsilon`` (the firm's TOTAL cap) at ``delta``.

    ``dp_accounting.mechanism_calibration.calibrate_dp_mechanism`` over the composition of
    ``prior_events`` and the plan. The returned σ always satisfies ``ε(σ) <= target_epsilon`` and
    lies within a factor ``1 + tolerance`` of the smallest feasible σ.

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
    return _calibrated(float(target_epsilon), d, q, n, tolerance, _grouped(prior_events))


@functools.lru_cache(maxsize=1024)
def _calibrated(target: float, d: float, q: float, n: int, tolerance: float,
                prior: tuple[tuple[_Params, int], ...]) -> float:
    """:func:`calibrate_noise` on checked arguments (memoised: a plan, its check and the budget
    rule's reference rate ask for the same calibrations, each a root search over RDP)."""
    spent = _epsilon_of(prior, d)
    prior_events_dpa = [
        dp_accounting.SelfComposedDpEvent(_dp_accounting_event(*p), count) for p, count in prior
    ]

    def composed_with_plan(sigma: float) -> dp_accounting.DpEvent:
        return dp_accounting.ComposedDpEvent([*prior_events_dpa, _plan_event(sigma, q, n)])

    def eps_at(sigma: float) -> float:
        return float(RdpAccountant().compose(composed_with_plan(sigma)).get_epsilon(d))

    def does_not_fit(why: str) -> PlanDoesNotFit:
        return PlanDoesNotFit(
            f"DP plan of {n} steps at sample rate q={q:.4g} cannot fit the ε cap {target:.4f} "
            f"at δ={d:g}: ε already spent {spent:.4f}; {why}. Raise the firm's epsilon budget "
            "(a governance decision), or train fewer rounds/epochs or with a smaller batch"
        )

    if spent >= target:
        raise does_not_fit("nothing is left for this plan")
    # Bracket the answer by doubling/halving from a large σ, where ε is cheap to evaluate (the RDP
    # series of small σ converge slowly), then let dp_accounting run Brent's method inside it; its
    # result is guaranteed to satisfy ε(σ) <= target and to lie within ``tol`` of the optimum.
    hi = _BRACKET_START
    while eps_at(hi) > target:
        if hi >= MAX_NOISE_MULTIPLIER:
            raise does_not_fit(f"even noise multiplier {MAX_NOISE_MULTIPLIER:g} would exceed it")
        hi = min(2 * hi, MAX_NOISE_MULTIPLIER)
    lo = hi / 2
    while eps_at(lo) <= target:
        if lo <= MIN_NOISE_MULTIPLIER:
            return MIN_NOISE_MULTIPLIER
        hi, lo = lo, max(lo / 2, MIN_NOISE_MULTIPLIER)
    sigma = mechanism_calibration.calibrate_dp_mechanism(
        RdpAccountant,
        composed_with_plan,
        target,
        d,
        bracket_interval=mechanism_calibration.ExplicitBracketInterval(lo, hi),
        tol=tolerance * lo,
    )
    return float(sigma)
