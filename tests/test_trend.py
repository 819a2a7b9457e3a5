"""TrendModel: time-shifted training data, features, loss, DP-trainability, forecast, roll-up,
evaluation (curve and ranking), and the firm's DP evaluation statistics."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from fedcrm.learning.dp_engine import DpOptimizer, plan_for_budget, train_dp, train_non_dp
from fedcrm.learning.metrics import auc
from fedcrm.learning.models import model_to_arrays
from fedcrm.learning.trend_model import (
    FIRM_TOTAL,
    TREND_FEATURE_NAMES,
    TREND_FEATURE_SPECS,
    build_trend_model,
    capture_from_histograms,
    evaluate_holdout,
    forecast,
    rollup,
    top_share_capture,
    trend_dataset,
    trend_features,
    trend_fingerprint,
    trend_per_sample_loss,
)
from fedcrm.privacy.errors import ConfigError
from fedcrm.tasks.base import NoisyStatistics
from fedcrm.tasks.trend import (
    EVALUATION_CLIP,
    EVALUATION_QUANTA,
    RANK_PURCHASE_CLIP,
    FirmTrendData,
    pooled_trend_metrics,
    rank_bins,
)

torch.set_num_threads(1)

CAL_END = pd.Timestamp("2024-06-30")
START = CAL_END - pd.Timedelta(weeks=52)


def _poisson_firm(n: int, weekly_rate: float, *, weeks: int, seed: int) -> pd.DataFrame:
    """Customers buying on random days at a constant weekly rate from week 0 on (no dropout)."""
    rng = np.random.default_rng(seed)
    counts = rng.poisson(weekly_rate, size=(n, weeks))
    counts[:, 0] = np.maximum(counts[:, 0], 1)  # everyone has a first purchase in week 0
    cust, week = np.nonzero(counts)
    reps = counts[cust, week]
    cust, week = np.repeat(cust, reps), np.repeat(week, reps)
    day = week * 7 + rng.integers(1, 8, cust.size)
    return pd.DataFrame(
        {
            "customer_id": [f"P{c:05d}" for c in cust],
            "timestamp": START + pd.to_timedelta(day, "D"),
            "quantity": 1.0,
            "amount": 10.0,
        }
    )


def test_dataset_shapes_and_one_example_per_customer() -> None:
    tx = _poisson_firm(300, 0.3, weeks=52, seed=1)
    data = trend_dataset(tx, calibration_end=CAL_END, train_horizon_weeks=(8, 13))
    n = len(data.customer_ids)
    assert n == tx["customer_id"].nunique() and data.customer_ids.is_unique
    assert data.X.shape == (n, len(TREND_FEATURE_NAMES)) and data.X.dtype == np.float32
    assert data.Y.shape == (n, 13) and data.Y.dtype == np.float32
    assert np.all((data.X >= 0) & (data.X <= 1))
    short = data.cutoffs == CAL_END - pd.Timedelta(weeks=8)
    assert 0 < short.sum() < n  # both horizons drawn
    assert np.isnan(data.Y[short, 8:]).all() and not np.isnan(data.Y[short, :8]).any()
    assert not np.isnan(data.Y[~short]).any()


def test_removing_one_customer_changes_exactly_one_training_row() -> None:
    """Add/remove neighbours: every other customer's example is unchanged (the horizon draw is
    per customer, not a shared random sequence)."""
    tx = _poisson_firm(297, 0.3, weeks=52, seed=4)
    full = trend_dataset(tx, calibration_end=CAL_END)
    assert len(set(full.cutoffs)) > 1  # several horizons are in play
    gone = full.customer_ids[100]
    without = trend_dataset(tx[tx["customer_id"] != gone], calibration_end=CAL_END)
    assert list(without.customer_ids) == [c for c in full.customer_ids if c != gone]
    keep = full.customer_ids != gone
    np.testing.assert_array_equal(without.X, full.X[keep])
    np.testing.assert_array_equal(without.Y, full.Y[keep])
    np.testing.assert_array_equal(without.cutoffs, full.cutoffs[keep])


def test_no_leakage_features_before_cutoff_targets_only_until_calibration_end() -> None:
    tx = _poisson_firm(200, 0.3, weeks=52, seed=2)
    base = trend_dataset(tx, calibration_end=CAL_END, train_horizon_weeks=13)
    t0 = CAL_END - pd.Timedelta(weeks=13)
    assert (base.cutoffs == t0).all()
    ids = list(base.customer_ids[:3])
    extra = pd.DataFrame({"customer_id": ids * 2,
                          "timestamp": [CAL_END + pd.Timedelta(days=1)] * 3
                          + [t0 + pd.Timedelta(days=1)] * 3,
                          "quantity": 1.0, "amount": 1.0})
    after_cal = trend_dataset(pd.concat([tx, extra.iloc[:3]]), calibration_end=CAL_END,
                              train_horizon_weeks=13)
    np.testing.assert_array_equal(after_cal.X, base.X)
    np.testing.assert_array_equal(after_cal.Y, base.Y)
    after_t0 = trend_dataset(pd.concat([tx, extra.iloc[3:]]), calibration_end=CAL_END,
                             train_horizon_weeks=13)
    np.testing.assert_array_equal(after_t0.X, base.X)  # features never see (T0, cal_end]
    diff = after_t0.Y - base.Y
    day1 = t0 + pd.Timedelta(days=1)
    bought_day1 = [bool((pd.to_datetime(tx.loc[tx["customer_id"] == c, "timestamp"]).dt.normalize()
                         == day1).any()) for c in ids]
    assert diff[:3, 0].tolist() == [0.0 if b else 1.0 for b in bought_day1]  # one purchase day
    assert not diff[:3, 1:].any() and not diff[3:].any()
    # brute force target for one customer
    cid = base.customer_ids[5]
    days = pd.to_datetime(tx.loc[tx["customer_id"] == cid, "timestamp"]).dt.normalize().unique()
    expected = np.zeros(13)
    for d in days:
        off = (d - t0).days
        if 1 <= off <= 91:
            expected[(off - 1) // 7] += 1
    np.testing.assert_array_equal(base.Y[5], expected)


def test_dataset_refuses_horizon_longer_than_history() -> None:
    tx = _poisson_firm(20, 0.3, weeks=10, seed=3)
    with pytest.raises(ConfigError, match="train_horizon_weeks"):
        trend_dataset(tx, calibration_end=START + pd.Timedelta(weeks=10), train_horizon_weeks=26)


def test_loss_masks_padded_weeks_and_has_one_value_per_customer() -> None:
    out = torch.zeros(4, 3, requires_grad=True)
    y = torch.tensor([[1.0, 0.0, float("nan")]] * 4)
    loss = trend_per_sample_loss(out, y)
    assert loss.shape == (4,) and torch.isfinite(loss).all()
    loss.sum().backward()
    assert out.grad is not None and torch.isfinite(out.grad).all()
    padded_free = trend_per_sample_loss(out.detach(), y[:, :2])
    torch.testing.assert_close(loss.detach(), padded_free)


def test_non_dp_training_recovers_a_known_weekly_rate() -> None:
    rate = 0.4
    tx = _poisson_firm(1500, rate, weeks=52, seed=4)
    data = trend_dataset(tx, calibration_end=CAL_END)
    model = build_trend_model()
    train_non_dp(model, torch.from_numpy(data.X), torch.from_numpy(data.Y),
                 per_sample_loss=trend_per_sample_loss, epochs=40, batch_size=256,
                 learning_rate=0.05, generator=torch.Generator().manual_seed(0),
                 optimizer=DpOptimizer.ADAM)
    X, ids = trend_features(tx, as_of=CAL_END)
    weekly = forecast(model, X, weeks=26)
    assert weekly.shape == (len(ids), 26)
    assert weekly.mean() == pytest.approx(rate, rel=0.15)
    # a constant-rate population keeps its rate: the firm curve stays flat
    firm = weekly.sum(axis=0)
    assert firm[-1] / firm[0] == pytest.approx(1.0, abs=0.2)


def test_dp_engine_trains_the_trend_model() -> None:
    tx = _poisson_firm(400, 0.3, weeks=52, seed=5)
    data = trend_dataset(tx, calibration_end=CAL_END)
    plan = plan_for_budget(n_examples=len(data.customer_ids), target_epsilon=3.0, delta=1e-4,
                           epochs=2, batch_size=100, max_grad_norm=1.0, learning_rate=0.05)
    model = build_trend_model()
    before = [p.detach().clone() for p in model.parameters()]
    stats = train_dp(model, torch.from_numpy(data.X), torch.from_numpy(data.Y),
                     per_sample_loss=trend_per_sample_loss, plan=plan,
                     generator=torch.Generator().manual_seed(0), optimizer=DpOptimizer.ADAM)
    assert stats.steps == plan.steps
    after = list(model.parameters())
    assert all(torch.isfinite(p).all() for p in after)
    assert any(not torch.equal(a, b) for a, b in zip(after, before, strict=True))


def test_mlp_variant_has_the_same_interface() -> None:
    model = build_trend_model(hidden=8, seed=1)
    out = forecast(model, np.zeros((5, len(TREND_FEATURE_NAMES)), np.float32), weeks=4)
    assert out.shape == (5, 4) and np.all(out > 0)


def test_rollup_sums_segments_and_firm() -> None:
    weekly = np.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    out = rollup(weekly, ["loyal", "lost", "loyal"])
    assert list(out.loc["loyal"]) == [6.0, 8.0]
    assert list(out.loc["lost"]) == [3.0, 4.0]
    assert list(out.loc[FIRM_TOTAL]) == [9.0, 12.0]
    assert list(out.columns) == [1, 2]


def test_evaluate_holdout_on_a_known_forecast() -> None:
    actual = np.array([[1.0, 0.0, 1.0], [0.0, 2.0, 0.0]])  # firm weekly 1, 2, 1 → cum 1, 3, 4
    fc = np.array([[0.5, 0.5, 0.5], [0.5, 0.5, 0.5]])  # firm weekly 1, 1, 1 → cum 1, 2, 3
    got = evaluate_holdout(fc, actual)
    assert got["cumulative_error"] == pytest.approx((0 + 1 + 1) / 3)
    assert got["cumulative_relative_error"] == pytest.approx(2 / 3 / 4)
    assert got["end_relative_error"] == pytest.approx(-0.25)
    assert got["customer_mae"] == pytest.approx((0.5 + 0.5) / 2)
    assert got["forecast_total"] == 3.0 and got["actual_total"] == 4.0
    assert np.isnan(got["repeat_buyer_auc"])  # everyone bought: no ranking to judge
    perfect = evaluate_holdout(actual, actual)
    assert perfect["cumulative_error"] == 0.0 and perfect["customer_mae"] == 0.0
    with pytest.raises(ValueError):
        evaluate_holdout(fc[:, :2], actual)


def test_fingerprint_changes_with_any_declared_feature_range(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import fedcrm.learning.trend_model as trend_model

    fp = trend_fingerprint()
    assert fp == trend_fingerprint()
    wider = dict(trend_model.TREND_FEATURE_SPECS)
    wider["repeat_purchases"] = ("log1p", 200.0)
    monkeypatch.setattr(trend_model, "TREND_FEATURE_SPECS", wider)
    assert trend_fingerprint() != fp  # firms with another layout would be told apart


def test_features_on_a_hand_made_history() -> None:
    """Purchases (distinct days) 70, 42 and 14 days before the cutoff, spending 10, 20 and 60:
    the recency, inter-purchase and monetary features follow their declared scaling."""
    days = [CAL_END - pd.Timedelta(days=d) for d in (70, 42, 14)]
    tx = pd.DataFrame({"customer_id": "C1", "timestamp": days, "quantity": 1.0,
                       "amount": [10.0, 20.0, 60.0]})
    X, ids = trend_features(tx, as_of=CAL_END)
    got = dict(zip(TREND_FEATURE_NAMES, X[0].tolist(), strict=True))

    def scaled(name: str, raw: float) -> float:
        transform, upper = TREND_FEATURE_SPECS[name]
        return float(np.log1p(raw) / np.log1p(upper)) if transform == "log1p" else raw / upper

    assert list(ids) == ["C1"]
    assert got["recency_weeks"] == pytest.approx(scaled("recency_weeks", 2.0))
    assert got["mean_gap_weeks"] == pytest.approx(scaled("mean_gap_weeks", 4.0))  # 8 weeks / 2
    assert got["overdue"] == pytest.approx(scaled("overdue", 0.5))
    assert got["mean_spend"] == pytest.approx(scaled("mean_spend", 30.0))
    assert got["recency_share"] == pytest.approx(0.2)
    one_timer = trend_features(tx.iloc[:1], as_of=CAL_END)[0][0]
    named = dict(zip(TREND_FEATURE_NAMES, one_timer.tolist(), strict=True))
    assert named["mean_gap_weeks"] == 0.0 and named["overdue"] == 0.0 and named["no_repeat"] == 1


def test_capture_counts_the_top_fifth_and_splits_ties_in_proportion() -> None:
    scores = np.arange(10.0)
    purchases = np.arange(10.0)  # the top two customers made 9 + 8 of 45 purchases
    assert top_share_capture(scores, purchases) == pytest.approx(17 / 45)
    # four customers tied at the top: two of them are in the top 20%, i.e. half of their 16
    tied = np.array([0, 0, 0, 0, 0, 0, 1, 1, 1, 1.0])
    bought = np.array([1, 1, 1, 1, 1, 1, 4, 4, 4, 4.0])
    assert top_share_capture(tied, bought) == pytest.approx(8 / 22)
    # the same from a histogram of two bins
    assert capture_from_histograms(np.array([6, 4.0]), np.array([6, 16.0])) == pytest.approx(8 / 22)
    rng = np.random.default_rng(3)
    s, p = rng.random(500), rng.poisson(1.0, 500).astype(float)
    order = np.argsort(-s)
    assert top_share_capture(s, p) == pytest.approx(p[order[:100]].sum() / p.sum())


def test_evaluate_holdout_ranks_customers_by_their_forecast_total() -> None:
    rng = np.random.default_rng(0)
    actual = rng.poisson(0.3, size=(400, 6)).astype(float)
    perfect = evaluate_holdout(actual, actual)
    assert perfect["repeat_buyer_auc"] == pytest.approx(1.0)
    flat = evaluate_holdout(np.full_like(actual, 0.3), actual)
    assert flat["repeat_buyer_auc"] == pytest.approx(0.5)
    assert flat["top20_capture"] == pytest.approx(0.2)  # ties: a fifth of the purchases
    reversed_ = evaluate_holdout(-actual + actual.max(), actual)
    assert reversed_["repeat_buyer_auc"] < 0.5 and reversed_["top20_capture"] < 0.2


def _firm(n: int, *, seed: int, holdout_weeks: int = 12) -> tuple[FirmTrendData, list[np.ndarray]]:
    """A firm's trend data with heavy and light buyers and a model that forecasts spread out."""
    rng = np.random.default_rng(seed)
    d = len(TREND_FEATURE_NAMES)
    x = rng.random((n, d)).astype(np.float32)
    rate = np.exp(rng.normal(-2.5, 1.5, n))
    actual = rng.poisson(rate[:, None], size=(n, holdout_weeks)).astype(np.float64)
    actual[:3] = 20.0  # far above every clip
    model = build_trend_model()
    with torch.no_grad():
        model.weight[0] = torch.from_numpy(rng.normal(0, 3, d).astype(np.float32))
    data = FirmTrendData(
        x_train=x, y_train=np.zeros((n, 4), np.float32), x_pred=x, actual=actual,
        calibration_end=CAL_END, holdout_weeks=holdout_weeks, fingerprint=trend_fingerprint(),
    )
    return data, model_to_arrays(model)


def _without(data: FirmTrendData, row: int) -> FirmTrendData:
    keep = np.arange(len(data.actual)) != row
    return FirmTrendData(
        x_train=data.x_train[keep], y_train=data.y_train[keep], x_pred=data.x_pred[keep],
        actual=data.actual[keep], calibration_end=data.calibration_end,
        holdout_weeks=data.holdout_weeks, fingerprint=data.fingerprint,
    )


def test_one_customer_moves_the_evaluation_statistics_by_at_most_their_sensitivity() -> None:
    data, arrays = _firm(300, seed=1)
    full = data.evaluation(arrays, model=None)  # type: ignore[arg-type]
    assert full.integer
    for values in full.values.values():
        np.testing.assert_array_equal(values, np.rint(values))
    flat = np.concatenate([np.asarray(v) for v in full.values.values()])
    norms = []
    for row in [0, 1, 2, *range(3, 300, 7)]:  # the heavy buyers and a spread of the rest
        less = _without(data, row).evaluation(arrays, model=None)  # type: ignore[arg-type]
        assert less.l2_sensitivity == full.l2_sensitivity
        diff = flat - np.concatenate([np.asarray(v) for v in less.values.values()])
        norms.append(float(np.linalg.norm(diff)))
    assert max(norms) <= full.l2_sensitivity + 1e-6
    assert max(norms) > 0.8 * full.l2_sensitivity  # a heavy buyer uses most of the bound


def test_pooled_ranking_without_noise_is_the_binned_ranking_of_all_firms() -> None:
    firms = [_firm(400, seed=s) for s in (1, 2, 3)]
    arrays = firms[0][1]
    released = [NoisyStatistics(values={k: tuple(v) for k, v in d.evaluation(
        arrays, model=None).values.items()}, noise_std=0.0)  # type: ignore[arg-type]
        for d, _ in firms]
    pooled = pooled_trend_metrics(released)
    score = np.concatenate([d._forecast(arrays).sum(axis=1) for d, _ in firms])
    bought = np.concatenate([d.actual.sum(axis=1) for d, _ in firms])
    binned = rank_bins(score / firms[0][0].holdout_weeks)
    assert len(np.unique(binned)) >= 4  # the forecasts spread over several bins
    assert pooled["repeat_buyer_auc"] == pytest.approx(auc(binned, bought > 0))
    assert pooled["top20_capture"] == pytest.approx(
        top_share_capture(binned.astype(float), np.minimum(bought, RANK_PURCHASE_CLIP)))
    assert pooled["repeat_buyer_auc_noise_sd"] == 0.0
    clipped = np.concatenate([
        np.minimum(d.actual.reshape(len(d.actual), 3, -1).sum(axis=2), EVALUATION_CLIP).sum(0)
        for d, _ in firms]).reshape(3, 3).sum(0)
    assert pooled["actual_total"] == pytest.approx(clipped.sum(), abs=3 / EVALUATION_QUANTA)
    noisy = pooled_trend_metrics([NoisyStatistics(values=r.values, noise_std=2e5)
                                  for r in released])
    assert noisy["repeat_buyer_auc_noise_sd"] > 0 and noisy["top20_capture_noise_sd"] > 0


def test_every_trend_evaluation_statistic_is_in_the_privacy_tables_reply_fields() -> None:
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "privacy.md").read_text()
    rows = {tuple(c.strip() for c in line.strip("|").split("|")[:3])
            for line in text.splitlines() if line.startswith("| evaluate |")}
    data, arrays = _firm(50, seed=4)
    names = data.evaluation(arrays, model=None).values  # type: ignore[arg-type]
    assert {("evaluate", "metrics", name) for name in names} <= rows
