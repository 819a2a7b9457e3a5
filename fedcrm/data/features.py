"""CRM features from the canonical tables: RFM, value, segments, churn labels, weekly series.

Everything here is vectorised pandas / numpy (groupby, ``np.bincount``); a million transactions
take seconds. Dates are compared at DAY resolution: a timestamp is reduced to its calendar day,
and ``as_of`` / ``cutoff`` days belong to the past (a purchase ON the cutoff day is history).

Conventions, following customer-base analysis practice (Fader, Hardie & Lee, "RFM and CLV:
Using Iso-Value Curves for Customer Base Analysis", JMR 2005):

* a **purchase** is a customer-day: several transaction lines on one day are one purchase;
* **frequency** is the number of distinct purchase days, **monetary** the mean spend per purchase
  day, **recency** the days since the last purchase;
* RFM **scores** are quantile scores 1..``bins`` computed from average ranks, so tied customers
  always get the same score (rank-robust) and a constant column scores in the middle;
* **segments** map the (R, F) score pair to a :class:`RfmSegment` with :data:`RFM_SEGMENT_GRID`,
  a condensed form of the widely used 5×5 R-F segment map ("champions", "loyal", "at risk",
  "can't lose them", "hibernating", "lost", ...). Monetary is reported but, as in that map, does
  not move a customer between segments.
"""

from __future__ import annotations

from enum import StrEnum

import numpy as np
import pandas as pd

from fedcrm.privacy.errors import ConfigError, SchemaError

DAY = pd.Timedelta(days=1)
WEEK = pd.Timedelta(days=7)

RFM_COLUMNS: tuple[str, ...] = (
    "recency_days",
    "frequency",
    "monetary",
    "first_purchase",
    "tenure_days",
    "historical_value",
)
SCORE_COLUMNS: tuple[str, ...] = ("r_score", "f_score", "m_score", "rfm_score", "segment")


class RfmSegment(StrEnum):
    """Customer segments of the standard R-F segment map (see :data:`RFM_SEGMENT_GRID`)."""

    CHAMPIONS = "champions"
    LOYAL = "loyal"
    POTENTIAL_LOYALIST = "potential_loyalist"
    NEW = "new"
    AT_RISK = "at_risk"
    CANT_LOSE = "cant_lose"
    HIBERNATING = "hibernating"
    LOST = "lost"


class PurchaseCount(StrEnum):
    """What :func:`weekly_series` counts per customer and week."""

    #: distinct purchase days (several lines on one day are one purchase): the Fader-Hardie unit
    DAYS = "days"
    #: transaction rows
    TRANSACTIONS = "transactions"


_S = RfmSegment
#: ``RFM_SEGMENT_GRID[r - 1][f - 1]`` is the segment of R score ``r`` and F score ``f`` (1..5).
#:
#: ======  ===========  ===========  ===========  ==========  ==========
#: R \\ F   1            2            3            4           5
#: ======  ===========  ===========  ===========  ==========  ==========
#: 5       new          potential    potential    champions   champions
#: 4       new          potential    potential    loyal       loyal
#: 3       hibernating  potential    potential    loyal       loyal
#: 2       hibernating  hibernating  at_risk      at_risk     cant_lose
#: 1       lost         lost         at_risk      at_risk     cant_lose
#: ======  ===========  ===========  ===========  ==========  ==========
RFM_SEGMENT_GRID: tuple[tuple[RfmSegment, ...], ...] = (
    (_S.LOST, _S.LOST, _S.AT_RISK, _S.AT_RISK, _S.CANT_LOSE),  # r = 1
    (_S.HIBERNATING, _S.HIBERNATING, _S.AT_RISK, _S.AT_RISK, _S.CANT_LOSE),  # r = 2
    (_S.HIBERNATING, _S.POTENTIAL_LOYALIST, _S.POTENTIAL_LOYALIST, _S.LOYAL, _S.LOYAL),  # r = 3
    (_S.NEW, _S.POTENTIAL_LOYALIST, _S.POTENTIAL_LOYALIST, _S.LOYAL, _S.LOYAL),  # r = 4
    (_S.NEW, _S.POTENTIAL_LOYALIST, _S.POTENTIAL_LOYALIST, _S.CHAMPIONS, _S.CHAMPIONS),  # r = 5
)


# ---------------------------------------------------------------------------------------------
# Input checks
# ---------------------------------------------------------------------------------------------


def _require_columns(df: pd.DataFrame, columns: tuple[str, ...], table: str) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise SchemaError(
            f"{table} table lacks column(s) {', '.join(missing)}; map them in the firm's config "
            "(canonical schema: docs/architecture.md)"
        )


def _day(ts: pd.Timestamp | str) -> pd.Timestamp:
    return pd.Timestamp(ts).normalize()


def _purchase_days(transactions: pd.DataFrame) -> pd.DataFrame:
    """One row per (customer, day) with the day's total spend: columns customer_id, day, amount."""
    _require_columns(transactions, ("customer_id", "timestamp", "amount"), "transactions")
    days = pd.DataFrame(
        {
            "customer_id": transactions["customer_id"].to_numpy(),
            "day": pd.to_datetime(transactions["timestamp"]).dt.normalize().to_numpy(),
            "amount": transactions["amount"].to_numpy(dtype=np.float64),
        }
    )
    return days.groupby(["customer_id", "day"], sort=False)["amount"].sum().reset_index()


# ---------------------------------------------------------------------------------------------
# RFM
# ---------------------------------------------------------------------------------------------


def rfm(transactions: pd.DataFrame, *, as_of: pd.Timestamp) -> pd.DataFrame:
    """Recency, frequency and monetary value of every customer who bought on or before ``as_of``.

    Indexed by ``customer_id``: ``recency_days`` (``as_of`` − last purchase day), ``frequency``
    (distinct purchase days), ``monetary`` (mean spend per purchase day), ``first_purchase``,
    ``tenure_days`` (``as_of`` − first purchase day) and ``historical_value`` (total spend).
    Purchases after ``as_of`` are ignored.
    """
    as_of = _day(as_of)
    days = _purchase_days(transactions)
    days = days[days["day"] <= as_of]
    g = days.groupby("customer_id", sort=True)
    first = g["day"].min()
    last = g["day"].max()
    frequency = g["day"].size()
    total = g["amount"].sum()
    out = pd.DataFrame(
        {
            "recency_days": (as_of - last).dt.days.astype(np.int64),
            "frequency": frequency.astype(np.int64),
            "monetary": (total / frequency).astype(np.float64),
            "first_purchase": first,
            "tenure_days": (as_of - first).dt.days.astype(np.int64),
            "historical_value": total.astype(np.float64),
        }
    )
    out.index.name = "customer_id"
    return out


def _quantile_score(values: pd.Series, bins: int) -> pd.Series:
    """Scores 1..bins from average ranks: ties share a score; a constant column scores mid-range.

    The score is ``ceil(bins · (rank − ½) / n)``, ``rank`` the average rank (1 = smallest).
    """
    if values.empty:
        return pd.Series(np.zeros(0, dtype=np.int64), index=values.index)
    # mid-rank percentile (rank − ½) / n: symmetric, so a constant column lands in the middle bin
    pct = (values.rank(method="average").to_numpy(dtype=np.float64) - 0.5) / len(values)
    score = np.ceil(pct * bins - 1e-9).astype(np.int64)
    return pd.Series(np.clip(score, 1, bins), index=values.index)


def segment_for_scores(r_score: np.ndarray | pd.Series, f_score: np.ndarray | pd.Series, *,
                       bins: int = 5) -> np.ndarray:
    """Segment of each (R, F) score pair via :data:`RFM_SEGMENT_GRID` (scores rescaled to 1..5)."""
    r = np.asarray(r_score, dtype=np.int64)
    f = np.asarray(f_score, dtype=np.int64)
    if bins != 5:  # spread 1..bins evenly over 1..5, keeping both ends
        r = np.rint(1 + (r - 1) * 4 / (bins - 1)).astype(np.int64)
        f = np.rint(1 + (f - 1) * 4 / (bins - 1)).astype(np.int64)
    grid = np.array([[s.value for s in row] for row in RFM_SEGMENT_GRID], dtype=object)
    return np.asarray(grid[np.clip(r, 1, 5) - 1, np.clip(f, 1, 5) - 1], dtype=object)


def _segment_series(r: pd.Series, f: pd.Series, bins: int) -> pd.Series:
    return pd.Series(
        pd.Categorical(segment_for_scores(r, f, bins=bins),
                       categories=[s.value for s in RfmSegment]),
        index=r.index,
    )


def rfm_scores(rfm_df: pd.DataFrame, *, bins: int = 5) -> pd.DataFrame:
    """Quantile scores and segments for an :func:`rfm` frame.

    Returns ``r_score``, ``f_score``, ``m_score`` (1..``bins``; 5 is best: most recent, most
    frequent, highest spend), ``rfm_score`` (e.g. ``"545"``) and ``segment`` (an
    :class:`RfmSegment` value, categorical), on ``rfm_df``'s index.
    """
    if not 2 <= bins <= 9:
        raise ConfigError(f"RFM bins must be between 2 and 9 (one digit per score), got {bins}")
    _require_columns(rfm_df, ("recency_days", "frequency", "monetary"), "RFM")
    r = _quantile_score(-rfm_df["recency_days"].astype(np.float64), bins)
    f = _quantile_score(rfm_df["frequency"].astype(np.float64), bins)
    m = _quantile_score(rfm_df["monetary"].astype(np.float64), bins)
    return _scores_frame(r, f, m, bins)


def _scores_frame(r: pd.Series, f: pd.Series, m: pd.Series, bins: int) -> pd.DataFrame:
    code = r.astype(str) + f.astype(str) + m.astype(str)
    return pd.DataFrame(
        {
            "r_score": r.astype(np.int64),
            "f_score": f.astype(np.int64),
            "m_score": m.astype(np.int64),
            "rfm_score": code,
            "segment": _segment_series(r, f, bins),
        },
        index=r.index,
    )


# ---------------------------------------------------------------------------------------------
# Subscription customers (Telco)
# ---------------------------------------------------------------------------------------------


def customer_value_from_charges(customers: pd.DataFrame, *, bins: int = 5) -> pd.DataFrame:
    """Value and RFM-like segment of subscription customers from tenure and charges.

    ``historical_value`` is ``total_charges``, or ``tenure_months × monthly_charges`` where the
    total is missing (brand-new customers). The RFM analogue for a subscriber snapshot is
    ``recency_days = 0`` (every customer in the table is an active subscriber at the snapshot),
    ``frequency = tenure_months`` (monthly bills paid) and ``monetary = monthly_charges``; every
    active subscriber gets the best R score, so segments run from ``new`` to ``champions`` by
    tenure. The ``churn`` column is a LABEL and is never used here (no label leakage).
    """
    _require_columns(customers, ("customer_id", "tenure_months", "monthly_charges"), "customers")
    ids = customers["customer_id"].astype(str)
    if ids.duplicated().any():
        raise SchemaError("customers table has duplicate customer_id values; deduplicate it first")
    tenure = pd.to_numeric(customers["tenure_months"], errors="coerce").astype(np.float64)
    monthly = pd.to_numeric(customers["monthly_charges"], errors="coerce").astype(np.float64)
    if "total_charges" in customers.columns:
        total = pd.to_numeric(customers["total_charges"], errors="coerce").astype(np.float64)
    else:
        total = pd.Series(np.nan, index=customers.index)
    value = total.where(total.notna(), tenure * monthly)
    out = pd.DataFrame(
        {
            "tenure_months": tenure.to_numpy(),
            "monthly_charges": monthly.to_numpy(),
            "historical_value": value.to_numpy(),
            "recency_days": np.zeros(len(customers), dtype=np.int64),
            "frequency": tenure.to_numpy(),
            "monetary": monthly.to_numpy(),
        },
        index=pd.Index(ids.to_numpy(), name="customer_id"),
    )
    r = pd.Series(np.full(len(out), bins, dtype=np.int64), index=out.index)
    f = _quantile_score(out["frequency"], bins)
    m = _quantile_score(out["monetary"], bins)
    return out.join(_scores_frame(r, f, m, bins))


# ---------------------------------------------------------------------------------------------
# Churn labels
# ---------------------------------------------------------------------------------------------


def churn_labels(transactions: pd.DataFrame, *, cutoff: pd.Timestamp,
                 horizon_days: int) -> pd.Series:
    """1 for customers active by ``cutoff`` with no purchase in (cutoff, cutoff + horizon_days].

    Customers whose first purchase is after ``cutoff`` are excluded. Raises :class:`ConfigError`
    when the window ends after the data's last purchase day (the label would be censored).
    """
    if horizon_days < 1:
        raise ConfigError(f"churn horizon must be at least 1 day, got {horizon_days}")
    cutoff = _day(cutoff)
    days = _purchase_days(transactions)
    if days.empty:
        raise ConfigError("cannot label churn: the transactions table is empty")
    end = cutoff + horizon_days * DAY
    last_day = days["day"].max()
    if end > last_day:
        raise ConfigError(
            f"churn window {cutoff.date()} + {horizon_days} days ends {end.date()}, after the "
            f"data's last purchase day {last_day.date()}; choose an earlier cutoff or a shorter "
            "horizon"
        )
    active = pd.Index(days.loc[days["day"] <= cutoff, "customer_id"].unique()).sort_values()
    in_window = (days["day"] > cutoff) & (days["day"] <= end)
    returned = active.isin(days.loc[in_window, "customer_id"].unique())
    return pd.Series((~returned).astype(np.int8), index=pd.Index(active, name="customer_id"),
                     name="churn")


# ---------------------------------------------------------------------------------------------
# Weekly purchase series
# ---------------------------------------------------------------------------------------------


def week_ends(*, start: pd.Timestamp, end: pd.Timestamp) -> pd.DatetimeIndex:
    """Last day of each week of :func:`weekly_series` over (start, end]."""
    start, end = _day(start), _day(end)
    n = int(np.ceil((end - start) / WEEK))
    return pd.DatetimeIndex([start + (k + 1) * WEEK for k in range(max(n, 0))], name="week_end")


def weekly_series(
    transactions: pd.DataFrame,
    *,
    start: pd.Timestamp,
    end: pd.Timestamp,
    count: PurchaseCount | str = PurchaseCount.DAYS,
    customers: pd.Index | None = None,
) -> pd.DataFrame:
    """Customers × weeks purchase counts over (start, end], float32.

    Week ``k`` (0-based) covers the days (start + 7k, start + 7(k+1)]; the last week may be
    partial when ``end − start`` is not a multiple of 7 days. Columns are the weeks' last days
    (:func:`week_ends`). ``count`` picks distinct purchase days (default, the Fader-Hardie unit)
    or transaction rows. Rows are ``customers`` when given (unknown customers get zeros;
    purchases of customers not listed are dropped), else every customer with a purchase in the
    window, sorted.
    """
    count = PurchaseCount(count)
    start, end = _day(start), _day(end)
    if end <= start:
        raise ConfigError(f"weekly series needs end after start, got {start.date()}..{end.date()}")
    _require_columns(transactions, ("customer_id", "timestamp"), "transactions")
    columns = week_ends(start=start, end=end)
    n_weeks = len(columns)
    day = pd.to_datetime(transactions["timestamp"]).dt.normalize().to_numpy()
    in_window = (day > start.to_datetime64()) & (day <= end.to_datetime64())
    ids = transactions["customer_id"].to_numpy()[in_window]
    offset = (day[in_window] - start.to_datetime64()) // np.timedelta64(1, "D")
    if customers is None:
        codes, uniques = pd.factorize(ids, sort=True)
        index = pd.Index(uniques, name="customer_id")
    else:
        index = pd.Index(customers, name="customer_id")
        codes = index.get_indexer(ids)
        keep = codes >= 0
        codes, offset = codes[keep], offset[keep]
    codes = codes.astype(np.int64)
    offset = offset.astype(np.int64)
    if count is PurchaseCount.DAYS:
        key = np.unique(codes * (n_weeks * 7 + 7) + offset)
        codes, offset = key // (n_weeks * 7 + 7), key % (n_weeks * 7 + 7)
    week = (offset - 1) // 7
    flat = np.bincount(codes * n_weeks + week, minlength=len(index) * n_weeks)
    return pd.DataFrame(flat.reshape(len(index), n_weeks).astype(np.float32), index=index,
                        columns=columns)


# ---------------------------------------------------------------------------------------------
# One row per customer
# ---------------------------------------------------------------------------------------------


def build_features(customers: pd.DataFrame | None, transactions: pd.DataFrame | None, *,
                   as_of: pd.Timestamp, bins: int = 5) -> pd.DataFrame:
    """One row per customer with every feature the firm's tables support, indexed by customer_id.

    * transactions → :func:`rfm` at ``as_of`` and :func:`rfm_scores` (CDNOW);
    * customers with tenure and charges → :func:`customer_value_from_charges` (Telco), plus the
      ``churn`` label column when present (labels are passed through, never used as features);
    * both → transaction RFM wins for customers with purchases; subscription columns are joined.
    """
    if customers is None and transactions is None:
        raise ConfigError("build_features needs a customers table, a transactions table, or both")
    parts: list[pd.DataFrame] = []
    if transactions is not None:
        base = rfm(transactions, as_of=as_of)
        parts.append(base.join(rfm_scores(base, bins=bins)))
    if customers is not None:
        _require_columns(customers, ("customer_id",), "customers")
        cust = customers.assign(customer_id=customers["customer_id"].astype(str))
        if {"tenure_months", "monthly_charges"} <= set(cust.columns):
            sub = customer_value_from_charges(cust, bins=bins)
        else:
            sub = pd.DataFrame(index=pd.Index(cust["customer_id"].to_numpy(), name="customer_id"))
        if "churn" in cust.columns:
            sub["churn"] = cust.set_index("customer_id")["churn"].reindex(sub.index)
        parts.append(sub)
    if len(parts) == 1:
        return parts[0]
    tx, sub = parts
    extra = sub.drop(columns=[c for c in sub.columns if c in tx.columns])
    merged = tx.join(extra, how="outer")
    fill = sub.reindex(merged.index)
    for column in tx.columns:
        if column in sub.columns:
            merged[column] = merged[column].where(merged[column].notna(), fill[column])
    return merged
