"""The accountant: events translated to dp_accounting, checked against an independent
implementation (Opacus's RDP analysis); monotonicity, calibration, edge cases."""

from __future__ import annotations

import math
import pickle
from datetime import UTC, datetime

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedcrm.audit.epsilon import CROSS_CHECK_RANGE, ORDERS, opacus_rdp
from fedcrm.privacy.accounting import (
    DpEvent,
    Mechanism,
    calibrate_noise,
    compose_epsilon,
    epsilon_for,
    make_event,
)
from fedcrm.privacy.errors import PlanDoesNotFit

DELTA = 1e-5
NOW = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)


def _opacus_epsilon(events: list[tuple[Mechanism, float, float, int]], delta: float) -> float:
    """The reference: Opacus's own RDP analysis (written independently of dp_accounting)."""
    rdp = opacus_rdp()
    curve = np.zeros(len(ORDERS))
    for mechanism, nm, q, steps in events:
        rate = 1.0 if mechanism is Mechanism.GAUSSIAN else q
        curve += rdp.compute_rdp(q=rate, noise_multiplier=nm, steps=steps, orders=list(ORDERS))
    eps, _ = rdp.get_privacy_spent(orders=list(ORDERS), rdp=curve, delta=delta)
    return float(eps)


def _event(mechanism: Mechanism, nm: float, q: float, steps: int, purpose: str = "t") -> DpEvent:
    return make_event(
        mechanism=mechanism, noise_multiplier=nm, sample_rate=q, steps=steps, delta=DELTA,
        purpose=purpose, now=NOW,
    )


# ------------------------------------------------------------------ reference: Opacus


@pytest.mark.parametrize("noise", [0.5, 1.1, 5.0])
@pytest.mark.parametrize("rate", [0.001, 0.04, 0.5])
def test_subsampled_gaussian_matches_opacus(noise: float, rate: float) -> None:
    for steps in (1, 10, 1000, 10000):
        ours = epsilon_for(noise_multiplier=noise, sample_rate=rate, steps=steps, delta=DELTA)
        ref = _opacus_epsilon([(Mechanism.SUBSAMPLED_GAUSSIAN, noise, rate, steps)], DELTA)
        # Never below the independent analysis; equal within 1% in the range budgets live in
        # (beyond it dp_accounting drops unconverged fractional orders and is more conservative).
        assert ours >= ref * 0.99, (noise, rate, steps)
        if ref <= CROSS_CHECK_RANGE:
            assert ours == pytest.approx(ref, rel=0.01), (noise, rate, steps)


@pytest.mark.parametrize("noise", [0.5, 2.0, 8.0])
@pytest.mark.parametrize("steps", [1, 3, 50])
def test_whole_table_gaussian_matches_opacus(noise: float, steps: int) -> None:
    gauss = _event(Mechanism.GAUSSIAN, noise, 1.0, steps)
    assert gauss.epsilon == pytest.approx(
        _opacus_epsilon([(Mechanism.GAUSSIAN, noise, 1.0, steps)], DELTA), rel=0.01
    )


def test_composition_of_heterogeneous_events_matches_opacus() -> None:
    plan = [
        (Mechanism.SUBSAMPLED_GAUSSIAN, 1.1, 0.04, 1000),
        (Mechanism.GAUSSIAN, 5.0, 1.0, 3),
        (Mechanism.SUBSAMPLED_GAUSSIAN, 5.0, 0.001, 10),
        (Mechanism.SUBSAMPLED_GAUSSIAN, 1.1, 0.04, 10),
        (Mechanism.SUBSAMPLED_GAUSSIAN, 1.1, 0.04, 10),  # repeated: composed as a group of two
    ]
    events = [_event(*p) for p in plan]
    for delta in (1e-5, 1e-7):
        ours = compose_epsilon(events, delta=delta)
        assert ours == pytest.approx(_opacus_epsilon(plan, delta), rel=0.01)
    # Composition is cheaper than adding the events' own ε (that is why we compose RDP).
    assert compose_epsilon(events, delta=DELTA) < sum(e.epsilon for e in events)
    # Order does not matter.
    assert compose_epsilon(events[::-1], delta=DELTA) == compose_epsilon(events, delta=DELTA)


def test_epsilon_for_composes_prior_events() -> None:
    prior = [_event(Mechanism.GAUSSIAN, 5.0, 1.0, 2), _event(Mechanism.GAUSSIAN, 8.0, 1.0, 1)]
    ours = epsilon_for(
        noise_multiplier=1.1, sample_rate=0.04, steps=1000, delta=DELTA, prior_events=prior
    )
    ref = _opacus_epsilon(
        [(Mechanism.GAUSSIAN, 5.0, 1.0, 2), (Mechanism.GAUSSIAN, 8.0, 1.0, 1),
         (Mechanism.SUBSAMPLED_GAUSSIAN, 1.1, 0.04, 1000)],
        DELTA,
    )
    assert ours == pytest.approx(ref, rel=0.01)
    alone = epsilon_for(noise_multiplier=1.1, sample_rate=0.04, steps=1000, delta=DELTA)
    assert ours > alone


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
    sigma = calibrate_noise(target_epsilon=target, delta=DELTA, sample_rate=rate, steps=steps)
    eps = epsilon_for(noise_multiplier=sigma, sample_rate=rate, steps=steps, delta=DELTA)
    assert eps <= target
    assert eps >= target * 0.99
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


def test_event_translates_to_dp_accounting_algebra() -> None:
    import dp_accounting

    sgd = _event(Mechanism.SUBSAMPLED_GAUSSIAN, 1.3, 0.02, 7).to_dp_accounting()
    assert sgd == dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(0.02, dp_accounting.GaussianDpEvent(1.3)), 7
    )
    query = _event(Mechanism.GAUSSIAN, 2.0, 1.0, 1).to_dp_accounting()
    assert query == dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(2.0), 1)


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
