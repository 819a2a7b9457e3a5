"""The RDP accountant: agreement with dp_accounting, monotonicity, calibration, edge cases."""

from __future__ import annotations

import functools
import logging
import math
import pickle
from collections.abc import Iterator
from datetime import UTC, datetime

import dp_accounting
import numpy as np
import pytest
from dp_accounting.rdp import RdpAccountant, rdp_privacy_accountant
from hypothesis import given, settings
from hypothesis import strategies as st

from fedcrm.privacy.accounting import (
    DEFAULT_ORDERS,
    DpEvent,
    Mechanism,
    calibrate_noise,
    compose_epsilon,
    epsilon_for,
    epsilon_from_rdp,
    make_event,
    rdp,
)
from fedcrm.privacy.errors import PlanDoesNotFit

DELTA = 1e-5
NOW = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)


@pytest.fixture(scope="module", autouse=True)
def _fast_reference() -> Iterator[None]:
    """Memoise dp_accounting's pure ``log A_α`` so each (σ, q) is computed once across step counts.

    Only speeds the reference up; its results are unchanged. Its convergence warnings are muted.
    """
    with pytest.MonkeyPatch.context() as mp:
        cached = functools.lru_cache(maxsize=None)(rdp_privacy_accountant._compute_log_a)
        mp.setattr(rdp_privacy_accountant, "_compute_log_a", cached)
        logging.disable(logging.WARNING)
        try:
            yield
        finally:
            logging.disable(logging.NOTSET)


def _reference_event(
    mechanism: Mechanism, nm: float, q: float, steps: int
) -> dp_accounting.DpEvent:
    if mechanism is Mechanism.LAPLACE:
        return dp_accounting.SelfComposedDpEvent(dp_accounting.LaplaceDpEvent(nm), steps)
    base: dp_accounting.DpEvent = dp_accounting.GaussianDpEvent(nm)
    if q < 1.0:
        base = dp_accounting.PoissonSampledDpEvent(q, base)
    return dp_accounting.SelfComposedDpEvent(base, steps)


def _reference_epsilon(events: list[tuple[Mechanism, float, float, int]], delta: float) -> float:
    accountant = RdpAccountant()
    for mechanism, nm, q, steps in events:
        accountant.compose(_reference_event(mechanism, nm, q, steps))
    return float(accountant.get_epsilon(delta))


def _event(mechanism: Mechanism, nm: float, q: float, steps: int, purpose: str = "t") -> DpEvent:
    return make_event(
        mechanism=mechanism, noise_multiplier=nm, sample_rate=q, steps=steps, delta=DELTA,
        purpose=purpose, now=NOW,
    )


# ------------------------------------------------------------------ reference: dp_accounting


@pytest.mark.parametrize("noise", [0.5, 1.1, 5.0])
@pytest.mark.parametrize("rate", [0.001, 0.04, 0.5])
def test_subsampled_gaussian_matches_dp_accounting(noise: float, rate: float) -> None:
    for steps in (1, 10, 1000, 10000):
        ours = epsilon_for(noise_multiplier=noise, sample_rate=rate, steps=steps, delta=DELTA)
        ref = _reference_epsilon([(Mechanism.SUBSAMPLED_GAUSSIAN, noise, rate, steps)], DELTA)
        assert ours == pytest.approx(ref, rel=0.01), (noise, rate, steps)


@pytest.mark.parametrize("noise", [0.5, 2.0, 8.0])
@pytest.mark.parametrize("steps", [1, 3, 50])
def test_gaussian_and_laplace_match_dp_accounting(noise: float, steps: int) -> None:
    gauss = _event(Mechanism.GAUSSIAN, noise, 1.0, steps)
    assert gauss.epsilon == pytest.approx(
        _reference_epsilon([(Mechanism.GAUSSIAN, noise, 1.0, steps)], DELTA), rel=0.01
    )
    lap = _event(Mechanism.LAPLACE, noise, 1.0, steps)
    rdp_ref = _reference_epsilon([(Mechanism.LAPLACE, noise, 1.0, steps)], DELTA)
    # Laplace: the smaller of the RDP bound and pure-DP basic composition steps / b.
    assert lap.epsilon == pytest.approx(min(rdp_ref, steps / noise), rel=0.01)


def test_composition_of_heterogeneous_events_matches_dp_accounting() -> None:
    plan = [
        (Mechanism.SUBSAMPLED_GAUSSIAN, 1.1, 0.04, 1000),
        (Mechanism.GAUSSIAN, 5.0, 1.0, 3),
        (Mechanism.LAPLACE, 8.0, 1.0, 2),
        (Mechanism.SUBSAMPLED_GAUSSIAN, 5.0, 0.001, 10),
        (Mechanism.SUBSAMPLED_GAUSSIAN, 1.1, 0.04, 10),
    ]
    events = [_event(*p) for p in plan]
    for delta in (1e-5, 1e-7):
        ours = compose_epsilon(events, delta=delta)
        assert ours == pytest.approx(_reference_epsilon(plan, delta), rel=0.01)
    # Composition is cheaper than adding the events' own ε (that is why we compose RDP).
    assert compose_epsilon(events, delta=DELTA) < sum(e.epsilon for e in events)


def test_epsilon_for_composes_prior_events() -> None:
    prior = [_event(Mechanism.GAUSSIAN, 5.0, 1.0, 2), _event(Mechanism.LAPLACE, 8.0, 1.0, 1)]
    ours = epsilon_for(
        noise_multiplier=1.1, sample_rate=0.04, steps=1000, delta=DELTA, prior_events=prior
    )
    ref = _reference_epsilon(
        [(Mechanism.GAUSSIAN, 5.0, 1.0, 2), (Mechanism.LAPLACE, 8.0, 1.0, 1),
         (Mechanism.SUBSAMPLED_GAUSSIAN, 1.1, 0.04, 1000)],
        DELTA,
    )
    assert ours == pytest.approx(ref, rel=0.01)
    alone = epsilon_for(noise_multiplier=1.1, sample_rate=0.04, steps=1000, delta=DELTA)
    assert ours > alone


def test_epsilon_from_rdp_uses_improved_conversion() -> None:
    orders = [2.0, 8.0, 32.0]
    values = [0.1, 0.5, 3.0]
    expected = min(
        r + math.log1p(-1 / a) - math.log(DELTA * a) / (a - 1)
        for a, r in zip(orders, values, strict=True)
    )
    assert epsilon_from_rdp(orders=orders, rdp=values, delta=DELTA) == pytest.approx(expected)
    assert epsilon_from_rdp(orders=orders, rdp=[0.0, 0.0, 0.0], delta=DELTA) == 0.0
    assert math.isinf(epsilon_from_rdp(orders=orders, rdp=[math.inf] * 3, delta=DELTA))


# ------------------------------------------------------------------ properties


_noise = st.floats(min_value=0.5, max_value=20.0)
_rate = st.floats(min_value=1e-3, max_value=0.5)


@settings(max_examples=25, deadline=None)
@given(noise=_noise, rate=_rate, s1=st.integers(0, 3000), s2=st.integers(0, 3000))
def test_epsilon_is_non_decreasing_in_steps(noise: float, rate: float, s1: int, s2: int) -> None:
    lo, hi = sorted((s1, s2))
    eps_lo = epsilon_for(noise_multiplier=noise, sample_rate=rate, steps=lo, delta=DELTA)
    eps_hi = epsilon_for(noise_multiplier=noise, sample_rate=rate, steps=hi, delta=DELTA)
    assert eps_lo <= eps_hi + 1e-12


@settings(max_examples=25, deadline=None)
@given(n1=_noise, n2=_noise, rate=_rate, steps=st.integers(1, 3000))
def test_epsilon_is_non_increasing_in_noise(n1: float, n2: float, rate: float, steps: int) -> None:
    lo, hi = sorted((n1, n2))
    eps_lo = epsilon_for(noise_multiplier=lo, sample_rate=rate, steps=steps, delta=DELTA)
    eps_hi = epsilon_for(noise_multiplier=hi, sample_rate=rate, steps=steps, delta=DELTA)
    assert eps_hi <= eps_lo * (1 + 1e-9)


@settings(max_examples=8, deadline=None)
@given(
    target=st.floats(min_value=0.3, max_value=10.0),
    rate=st.floats(min_value=1e-3, max_value=0.5),
    steps=st.integers(1, 2000),
)
def test_calibrated_noise_reaches_target_and_is_minimal(
    target: float, rate: float, steps: int
) -> None:
    tolerance = 0.01
    sigma = calibrate_noise(
        target_epsilon=target, delta=DELTA, sample_rate=rate, steps=steps, tolerance=tolerance
    )
    eps = epsilon_for(noise_multiplier=sigma, sample_rate=rate, steps=steps, delta=DELTA)
    assert eps <= target
    assert eps >= target * (1 - tolerance)
    less = epsilon_for(noise_multiplier=sigma * 0.97, sample_rate=rate, steps=steps, delta=DELTA)
    assert less > target


def test_calibrate_noise_counts_prior_spending_against_the_cap() -> None:
    prior = [_event(Mechanism.GAUSSIAN, 4.0, 1.0, 1)]
    spent = compose_epsilon(prior, delta=DELTA)
    alone = calibrate_noise(target_epsilon=2.0, delta=DELTA, sample_rate=0.05, steps=200)
    sigma = calibrate_noise(
        target_epsilon=2.0, delta=DELTA, sample_rate=0.05, steps=200, prior_events=prior
    )
    assert 0 < spent < 2.0
    assert sigma > alone
    total = epsilon_for(
        noise_multiplier=sigma, sample_rate=0.05, steps=200, delta=DELTA, prior_events=prior
    )
    assert 2.0 * 0.99 <= total <= 2.0


def test_calibrate_noise_refuses_when_prior_spending_is_at_the_cap() -> None:
    prior = [_event(Mechanism.GAUSSIAN, 1.0, 1.0, 4)]
    spent = compose_epsilon(prior, delta=DELTA)
    with pytest.raises(PlanDoesNotFit) as info:
        calibrate_noise(target_epsilon=spent, delta=DELTA, sample_rate=0.01, steps=100,
                        prior_events=prior)
    message = str(info.value)
    assert f"{spent:.4f}" in message and "100 steps" in message and "q=0.01" in message
    assert "Raise the firm's epsilon budget" in message


def test_calibrate_noise_refuses_a_target_no_noise_level_reaches() -> None:
    with pytest.raises(PlanDoesNotFit, match="even noise multiplier 10000"):
        calibrate_noise(target_epsilon=1e-3, delta=DELTA, sample_rate=1.0, steps=10)


# ------------------------------------------------------------------ edge cases and validation


def test_no_steps_or_no_sampling_costs_nothing() -> None:
    assert epsilon_for(noise_multiplier=1.0, sample_rate=0.1, steps=0, delta=DELTA) == 0.0
    assert epsilon_for(noise_multiplier=1.0, sample_rate=0.0, steps=100, delta=DELTA) == 0.0
    assert compose_epsilon([], delta=DELTA) == 0.0
    assert _event(Mechanism.SUBSAMPLED_GAUSSIAN, 1.0, 0.1, 0).epsilon == 0.0
    assert np.all(rdp(mechanism=Mechanism.LAPLACE, noise_multiplier=1.0, sample_rate=1.0,
                      steps=0) == 0.0)


def test_rdp_is_linear_in_steps_and_matches_closed_form_gaussian() -> None:
    one = rdp(mechanism=Mechanism.GAUSSIAN, noise_multiplier=2.0, sample_rate=1.0, steps=1)
    assert one == pytest.approx(np.asarray(DEFAULT_ORDERS) / 8.0)
    seven = rdp(mechanism="subsampled_gaussian", noise_multiplier=1.3, sample_rate=0.02, steps=7)
    single = rdp(mechanism="subsampled_gaussian", noise_multiplier=1.3, sample_rate=0.02, steps=1)
    assert seven == pytest.approx(7 * single)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"noise_multiplier": 0.0}, "noise_multiplier"),
        ({"noise_multiplier": -1.0}, "noise_multiplier"),
        ({"noise_multiplier": math.nan}, "noise_multiplier"),
        ({"sample_rate": 1.5}, "sample_rate"),
        ({"sample_rate": -0.1}, "sample_rate"),
        ({"steps": -1}, "steps"),
        ({"steps": 2.5}, "steps"),
        ({"delta": 0.0}, "delta"),
        ({"delta": 1.0}, "delta"),
        ({"mechanism": "gausian"}, "unknown DP mechanism"),
        ({"mechanism": Mechanism.GAUSSIAN, "sample_rate": 0.5}, "sample_rate must be 1.0"),
        ({"purpose": ""}, "purpose"),
        ({"context": {"round": [1]}}, "context"),
    ],
)
def test_make_event_rejects_invalid_arguments(kwargs: dict[str, object], match: str) -> None:
    args: dict[str, object] = {
        "mechanism": Mechanism.SUBSAMPLED_GAUSSIAN, "noise_multiplier": 1.0, "sample_rate": 0.1,
        "steps": 10, "delta": DELTA, "purpose": "train:churn", "now": NOW,
    }
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        make_event(**args)  # type: ignore[arg-type]


def test_calibrate_noise_rejects_invalid_arguments() -> None:
    with pytest.raises(ValueError, match="target_epsilon"):
        calibrate_noise(target_epsilon=0.0, delta=DELTA, sample_rate=0.1, steps=10)
    with pytest.raises(ValueError, match="steps >= 1"):
        calibrate_noise(target_epsilon=1.0, delta=DELTA, sample_rate=0.1, steps=0)
    with pytest.raises(ValueError, match="orders"):
        rdp(mechanism=Mechanism.GAUSSIAN, noise_multiplier=1.0, sample_rate=1.0, steps=1,
            orders=(0.5, 2.0))


# ------------------------------------------------------------------ DpEvent values


def test_event_round_trips_through_json_and_is_frozen() -> None:
    event = make_event(
        mechanism=Mechanism.SUBSAMPLED_GAUSSIAN, noise_multiplier=1.1, sample_rate=0.04,
        steps=100, delta=DELTA, purpose="train:churn",
        context={"run_id": "r1", "round": 3, "lr": 0.05}, now=NOW,
    )
    assert event.timestamp == "2025-03-01T12:00:00+00:00"
    assert event.epsilon == pytest.approx(
        epsilon_for(noise_multiplier=1.1, sample_rate=0.04, steps=100, delta=DELTA)
    )
    assert DpEvent.from_json(event.to_json()) == event
    with pytest.raises(AttributeError):
        event.steps = 5  # type: ignore[misc]
    with pytest.raises(TypeError):
        event.context["round"] = 4  # type: ignore[index]
    assert hash(event) == hash(DpEvent.from_json(event.to_json()))
    assert pickle.loads(pickle.dumps(event)) == event  # crosses process boundaries (simulation)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"mechanism": "exponential"}, "unknown DP mechanism"),
        ({"steps": "10"}, "steps"),
        ({"epsilon": -1.0}, "epsilon"),
        ({"timestamp": "yesterday"}, "ISO-8601"),
        ({"timestamp": "2025-03-01T12:00:00+02:00"}, "UTC"),
        ({"delta": None}, "delta"),
    ],
)
def test_event_from_json_rejects_bad_fields(change: dict[str, object], match: str) -> None:
    record = _event(Mechanism.GAUSSIAN, 2.0, 1.0, 1).to_json()
    record.update(change)
    with pytest.raises(ValueError, match=match):
        DpEvent.from_json(record)


def test_event_from_json_names_missing_fields() -> None:
    record = _event(Mechanism.GAUSSIAN, 2.0, 1.0, 1).to_json()
    del record["noise_multiplier"], record["purpose"]
    with pytest.raises(ValueError, match="noise_multiplier, purpose"):
        DpEvent.from_json(record)


def test_make_event_requires_an_aware_timestamp() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        make_event(mechanism=Mechanism.GAUSSIAN, noise_multiplier=1.0, sample_rate=1.0, steps=1,
                   delta=DELTA, purpose="q", now=datetime(2025, 1, 1))
