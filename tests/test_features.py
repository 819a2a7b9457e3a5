"""CRM features: RFM, scores and segments, subscription value, churn labels, weekly series."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedcrm.data.features import (
    RFM_SEGMENT_GRID,
    PurchaseCount,
    RfmSegment,
    build_features,
    churn_labels,
    customer_value_from_charges,
    rfm,
    rfm_scores,
    segment_for_scores,
    weekly_series,
)
from fedcrm.privacy.errors import ConfigError, SchemaError


def _tx(rows: list[tuple[str, str, float]]) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "customer_id": [r[0] for r in rows],
            "timestamp": pd.to_datetime([r[1] for r in rows], format="ISO8601"),
            "quantity": 1.0,
            "amount": [r[2] for r in rows],
        }
    )


TINY = _tx(
    [
        ("A", "2024-01-01 09:00", 10.0),
        ("A", "2024-01-01 17:30", 5.0),  # same day: one purchase day worth 15
        ("A", "2024-01-11", 25.0),
        ("B", "2024-01-05", 40.0),
        ("A", "2024-02-01", 99.0),  # after as_of: ignored
        ("C", "2024-02-01", 7.0),  # first purchase after as_of: not a customer yet
    ]
)


def test_rfm_matches_hand_computation() -> None:
    out = rfm(TINY, as_of=pd.Timestamp("2024-01-21"))
    assert list(out.index) == ["A", "B"]
    a, b = out.loc["A"], out.loc["B"]
    assert a["recency_days"] == 10 and a["frequency"] == 2
    assert a["monetary"] == pytest.approx(20.0)  # (15 + 25) / 2 purchase days
    assert a["historical_value"] == pytest.approx(40.0)
    assert a["tenure_days"] == 20 and a["first_purchase"] == pd.Timestamp("2024-01-01")
    assert b["recency_days"] == 16 and b["frequency"] == 1 and b["tenure_days"] == 16
    assert b["monetary"] == pytest.approx(40.0)


def test_rfm_counts_a_purchase_on_the_as_of_day_as_history() -> None:
    out = rfm(TINY, as_of=pd.Timestamp("2024-02-01"))
    assert out.loc["A", "frequency"] == 3 and out.loc["A", "recency_days"] == 0
    assert out.loc["C", "frequency"] == 1


def test_rfm_names_missing_column() -> None:
    with pytest.raises(SchemaError, match="amount"):
        rfm(TINY.drop(columns=["amount"]), as_of=pd.Timestamp("2024-01-21"))


def test_scores_in_range_and_segments_valid_on_random_customers() -> None:
    rng = np.random.default_rng(0)
    n = 500
    frame = pd.DataFrame(
        {
            "recency_days": rng.integers(0, 365, n),
            "frequency": rng.geometric(0.4, n),  # many ties at 1
            "monetary": rng.gamma(2.0, 20.0, n),
        },
        index=[f"C{i}" for i in range(n)],
    )
    scores = rfm_scores(frame)
    for col in ("r_score", "f_score", "m_score"):
        assert scores[col].between(1, 5).all()
        assert scores[col].nunique() >= 3
    assert set(scores["segment"].astype(str)) <= {s.value for s in RfmSegment}
    code = (scores["r_score"].astype(str) + scores["f_score"].astype(str)
            + scores["m_score"].astype(str))
    assert (scores["rfm_score"] == code).all()
    # ties share one score (rank-robust)
    assert scores.groupby(frame["frequency"])["f_score"].nunique().max() == 1
    # more recent → never a worse R score
    order = np.argsort(frame["recency_days"].to_numpy())
    assert np.all(np.diff(scores["r_score"].to_numpy()[order]) <= 0)


def test_segment_mapping_follows_the_documented_grid() -> None:
    r = np.array([5, 1, 5, 1, 2, 4, 3])
    f = np.array([5, 5, 1, 1, 3, 5, 2])
    assert segment_for_scores(r, f).tolist() == [
        "champions", "cant_lose", "new", "lost", "at_risk", "loyal", "potential_loyalist"
    ]
    # two-bin scores spread to the ends of the 5×5 grid
    assert segment_for_scores(np.array([2, 1]), np.array([2, 1]), bins=2).tolist() == [
        "champions", "lost"
    ]
    frame = pd.DataFrame(
        {"recency_days": [1, 300, 2, 299], "frequency": [50, 50, 1, 1], "monetary": [5.0] * 4},
        index=["best", "lapsed_big", "new", "lost"],
    )
    seg = rfm_scores(frame, bins=2)["segment"].astype(str)
    assert seg.to_dict() == {"best": "champions", "lapsed_big": "cant_lose", "new": "new",
                             "lost": "lost"}
    assert RFM_SEGMENT_GRID[4][4] is RfmSegment.CHAMPIONS
    assert RFM_SEGMENT_GRID[0][0] is RfmSegment.LOST


def test_constant_column_scores_in_the_middle() -> None:
    frame = pd.DataFrame({"recency_days": [3, 3, 3], "frequency": [1, 2, 3], "monetary": [1.0] * 3})
    assert set(rfm_scores(frame)["r_score"]) == {3}


def test_customer_value_from_charges_for_subscribers() -> None:
    customers = pd.DataFrame(
        {
            "customer_id": ["T1", "T2", "T3"],
            "tenure_months": [1.0, 24.0, 70.0],
            "monthly_charges": [20.0, 50.0, 100.0],
            "total_charges": [np.nan, 1200.0, 7000.0],
            "churn": [1, 0, 0],
        }
    )
    out = customer_value_from_charges(customers)
    assert out.loc["T1", "historical_value"] == pytest.approx(20.0)  # filled: 1 × 20
    assert out.loc["T3", "historical_value"] == pytest.approx(7000.0)
    assert (out["recency_days"] == 0).all() and (out["r_score"] == 5).all()
    assert out.loc["T1", "segment"] == RfmSegment.NEW
    assert out.loc["T3", "segment"] == RfmSegment.CHAMPIONS
    assert "churn" not in out.columns  # the label never feeds a feature


def test_churn_labels_hand_example_with_boundary_days() -> None:
    tx = _tx(
        [
            ("stays", "2024-01-01", 1.0),
            ("stays", "2024-01-31", 1.0),  # exactly cutoff + 30 days: inside the window
            ("churns", "2024-01-01", 1.0),
            ("churns", "2024-02-01", 1.0),  # cutoff + 31 days: outside
            ("cutoff_day", "2024-01-01", 1.0),  # purchase ON the cutoff day is history
            ("late", "2024-01-05", 1.0),  # first purchase after cutoff: excluded
            ("late", "2024-03-01", 1.0),
        ]
    )
    labels = churn_labels(tx, cutoff=pd.Timestamp("2024-01-01"), horizon_days=30)
    assert labels.to_dict() == {"churns": 1, "cutoff_day": 1, "stays": 0}


def test_churn_labels_refuse_a_censored_window_and_name_the_dates() -> None:
    with pytest.raises(ConfigError, match=r"2024-01-11.*2024-02-11.*2024-02-01"):
        churn_labels(TINY, cutoff=pd.Timestamp("2024-01-11"), horizon_days=10 + 21)


def _brute_force(tx: pd.DataFrame, start: pd.Timestamp, n_weeks: int, customers: list[str],
                 distinct_days: bool) -> np.ndarray:
    out = np.zeros((len(customers), n_weeks))
    seen: set[tuple[str, pd.Timestamp]] = set()
    for cid, ts in zip(tx["customer_id"], tx["timestamp"], strict=True):
        day = ts.normalize()
        offset = (day - start).days
        if offset < 1 or offset > 7 * n_weeks or cid not in customers:
            continue
        if distinct_days:
            if (cid, day) in seen:
                continue
            seen.add((cid, day))
        out[customers.index(cid), (offset - 1) // 7] += 1
    return out


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    n_rows=st.integers(0, 200),
    n_weeks=st.integers(1, 10),
    distinct=st.booleans(),
)
def test_weekly_series_matches_a_brute_force_loop(seed: int, n_rows: int, n_weeks: int,
                                                  distinct: bool) -> None:
    rng = np.random.default_rng(seed)
    start = pd.Timestamp("2024-03-03")
    customers = [f"K{i}" for i in range(6)]
    tx = pd.DataFrame(
        {
            "customer_id": rng.choice(customers[:5], n_rows),  # K5 never buys
            "timestamp": start + pd.to_timedelta(rng.integers(-5, 7 * n_weeks + 5, n_rows), "D")
            + pd.to_timedelta(rng.integers(0, 24, n_rows), "h"),
            "quantity": 1.0,
            "amount": 1.0,
        }
    )
    count = PurchaseCount.DAYS if distinct else PurchaseCount.TRANSACTIONS
    got = weekly_series(tx, start=start, end=start + pd.Timedelta(weeks=n_weeks), count=count,
                        customers=pd.Index(customers))
    assert got.shape == (6, n_weeks) and all(d == np.float32 for d in got.dtypes)
    expected = _brute_force(tx, start, n_weeks, customers, distinct)
    np.testing.assert_array_equal(got.to_numpy(), expected)


def test_weekly_series_without_customer_list_keeps_buyers_in_the_window() -> None:
    got = weekly_series(TINY, start=pd.Timestamp("2023-12-31"), end=pd.Timestamp("2024-01-14"))
    assert list(got.index) == ["A", "B"]
    assert list(got.loc["A"]) == [1.0, 1.0]  # two lines on 01-01 are one purchase day


def test_build_features_for_transaction_and_subscription_firms() -> None:
    as_of = pd.Timestamp("2024-01-21")
    tx_firm = build_features(None, TINY, as_of=as_of)
    assert {"recency_days", "frequency", "monetary", "segment", "rfm_score"} <= set(tx_firm.columns)
    assert list(tx_firm.index) == ["A", "B"]
    customers = pd.DataFrame({"customer_id": ["T1", "T2"], "tenure_months": [2.0, 40.0],
                              "monthly_charges": [30.0, 80.0], "churn": [1, 0]})
    sub_firm = build_features(customers, None, as_of=as_of)
    assert list(sub_firm["churn"]) == [1, 0]
    assert sub_firm["segment"].notna().all()
    with pytest.raises(ConfigError):
        build_features(None, None, as_of=as_of)
