"""TrendModel: per-customer weekly purchase forecasts, rolled up to segment and firm trend.

Design
------
The unit of privacy is a customer, so every customer contributes ONE training example: a row of
features describing their purchase history up to a cutoff ``T0`` and the vector of their weekly
purchase counts (distinct purchase days, the Fader-Hardie unit) in ``(T0, calibration_end]``.

*Staggered cutoffs.* The training data come from the calibration period itself by time-shifting.
Each customer's ``T0`` is ``calibration_end − h`` weeks, where ``h`` is drawn (injected ``rng``)
from ``train_horizon_weeks`` (default 13, 18, 22 and 26 weeks) among the horizons at which the
customer already existed. Spreading the cutoffs shows the model many (customer age, horizon)
pairs, which it needs because the forecast is made for older customers (at ``calibration_end``)
over a longer horizon (39 weeks) than any single shifted window could show. Weeks after
``calibration_end`` are never used for training: targets of a customer with a short horizon are
padded with NaN and masked out of the loss.

*Model.* A linear map (``nn.Linear``, or a small MLP) from the declared features to three numbers
per customer, decoded by :func:`weekly_rates` into an expected purchase count for each week
``k = 1, 2, ...`` after the cutoff::

    rate_k = exp(level) · (floor + (1 − floor) · exp(−decay · k / TREND_DECAY_WEEKS))
    decay = softplus(o₁),  floor = sigmoid(o₂)

i.e. a customer's current rate relaxes exponentially (constant dropout hazard, as at the individual
level of Pareto/NBD and BG/NBD) towards a long-run floor. Heterogeneity across customers (each has
its own level, decay and floor) gives the firm-level curve its slower-than-exponential shape, and
the floor lets the population's long-run rate settle instead of decaying to zero, which a model
has to extrapolate beyond the calibration period. The loss is the Poisson negative log-likelihood
summed over a customer's observed weeks (:func:`trend_per_sample_loss`); because the network
itself is a plain ``nn.Linear`` / ``Sequential``, :mod:`fedcrm.dp_engine` clips it with ghost norms.

*Features* (:data:`TREND_FEATURE_NAMES`) are scaled by DECLARED ranges (:data:`TREND_FEATURE_SPECS`)
and clipped to [0, 1] — nothing is fitted on a firm's data, so every firm produces the same layout
(compare :func:`trend_fingerprint`). Besides frequency and recency ratios they hold the
inter-purchase time (mean gap between purchases, and how overdue the next purchase is) and the
monetary value (mean spend per purchase day), which rank customers: ``benchmarks/trend.py
--validate`` chose them on a validation window inside CDNOW's calibration period (calibration
end 13 weeks earlier, the last 13 calibration weeks as holdout), never on the classic holdout.
A two-part decoder (P(active) times a Poisson rate, as in BG/NBD) was tried there too and ranked
no better while tracking the firm's curve worse, so the decoder stays one rate curve.

*Ranking.* :func:`evaluate_holdout` reports, besides the firm-level curve, how well the forecast
total ranks customers: the repeat-buyer AUC (does the customer buy in the holdout at all) and the
top-20% capture (share of holdout purchases made by the fifth of customers with the highest
forecast). Per-customer absolute error is not a ranking measure and favours predicting the
median (zero), so it is reported but not used to choose models.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from fedcrm.data.features import WEEK, _purchase_days, rfm, rfm_scores
from fedcrm.learning.metrics import auc
from fedcrm.privacy.errors import ConfigError

TREND_FORMAT = "fedcrm/trend-features/v2"
#: Time scale (weeks) of the per-customer decay term.
TREND_DECAY_WEEKS = 13.0
#: Default training horizons (weeks before calibration end at which training cutoffs sit).
DEFAULT_TRAIN_HORIZONS: tuple[int, ...] = (13, 18, 22, 26)
#: Outputs of the trend network per customer: log level, decay logit, floor logit.
TREND_OUTPUTS = 3
#: Prior weekly purchase rate the level bias starts at (data-independent initialisation).
TREND_INITIAL_WEEKLY_RATE = 0.05

#: name → (transform, declared upper bound of the raw quantity); every feature lands in [0, 1].
#: ``log1p``: log1p(v) / log1p(upper); ``linear``: v / upper; ``flag``: 0/1.
#: Customer age is deliberately NOT a feature: forecast-time customers are always older than any
#: training-time customer, so it would lie outside its training range exactly when the forecast
#: is made. Weeks since the last purchase are (on a log scale, so that the stretch beyond the
#: training range is short); without them every one-time buyer would get the same forecast and
#: the ranking would tie more than half of a typical firm's customers.
#: ``mean_spend`` is in the unit of the transactions' ``amount`` column, which must be the same
#: currency unit at every firm of a federation.
TREND_FEATURE_SPECS: dict[str, tuple[str, float]] = {
    "repeat_purchases": ("log1p", 100.0),  # purchase days after the first (trial) one
    "no_repeat": ("flag", 1.0),  # only the trial purchase so far
    "purchases_last_4w": ("log1p", 28.0),  # purchase days in the last 4 weeks
    "purchases_last_13w": ("log1p", 91.0),  # purchase days in the last 13 weeks
    "annual_repeat_rate": ("log1p", 365.0),  # 52 · repeat_purchases / max(age_weeks, 1)
    "recency_share": ("linear", 1.0),  # weeks since last purchase / max(age_weeks, 1)
    "recency_weeks": ("log1p", 104.0),  # weeks since the last purchase
    "mean_gap_weeks": ("log1p", 52.0),  # (last − first purchase) / repeat purchases; 0 if none
    "overdue": ("log1p", 52.0),  # recency_weeks / max(mean_gap_weeks, 1); 0 without a repeat
    "mean_spend": ("log1p", 1000.0),  # mean spend per purchase day (amount units)
}
TREND_FEATURE_NAMES: tuple[str, ...] = tuple(TREND_FEATURE_SPECS)


def trend_fingerprint() -> str:
    """sha256 of the trend layout: feature names, transforms, declared ranges, decoder constants."""
    spec = {
        "format": TREND_FORMAT,
        "features": [[n, t, u] for n, (t, u) in TREND_FEATURE_SPECS.items()],
        "decay_weeks": TREND_DECAY_WEEKS,
        "outputs": TREND_OUTPUTS,
    }
    canonical = json.dumps(spec, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


# ---------------------------------------------------------------------------------------------
# Features and training data
# ---------------------------------------------------------------------------------------------


def _scale(raw: dict[str, np.ndarray]) -> np.ndarray:
    cols = []
    for name, (transform, upper) in TREND_FEATURE_SPECS.items():
        v = raw[name].astype(np.float64)
        if transform == "log1p":
            v = np.log1p(np.maximum(v, 0.0)) / math.log1p(upper)
        elif transform == "linear":
            v = v / upper
        cols.append(np.clip(v, 0.0, 1.0))
    return np.stack(cols, axis=1).astype(np.float32)


def _features_from_days(days: pd.DataFrame, index: pd.Index, as_of: pd.Timestamp) -> np.ndarray:
    """Scaled features at ``as_of`` from purchase days on or before it; rows follow ``index``.

    Customers of ``index`` without any purchase by ``as_of`` get a row of zeros (callers exclude
    them from training; they are never forecast).
    """
    past = days[days["day"] <= as_of]
    codes = index.get_indexer(pd.Index(past["customer_id"]))
    keep = codes >= 0
    codes = codes[keep]
    age_days = ((as_of - past["day"]).to_numpy()[keep] // np.timedelta64(1, "D")).astype(np.int64)
    n = len(index)
    count = np.bincount(codes, minlength=n).astype(np.float64)
    first = np.full(n, -1, dtype=np.int64)
    np.maximum.at(first, codes, age_days)  # oldest purchase: largest age
    last = np.full(n, np.iinfo(np.int64).max, dtype=np.int64)
    np.minimum.at(last, codes, age_days)  # newest purchase: smallest age
    last4 = np.bincount(codes[age_days < 28], minlength=n).astype(np.float64)
    last13 = np.bincount(codes[age_days < 91], minlength=n).astype(np.float64)
    spend = np.bincount(codes, weights=past["amount"].to_numpy(np.float64)[keep], minlength=n)
    has = count > 0
    age_w = np.where(has, first, 0) / 7.0
    rec_w = np.where(has, last, 0) / 7.0
    repeat = np.maximum(count - 1.0, 0.0)
    mean_gap = np.where(repeat > 0, (age_w - rec_w) / np.maximum(repeat, 1.0), 0.0)
    raw = {
        "repeat_purchases": repeat,
        "no_repeat": (has & (repeat == 0)).astype(np.float64),
        "purchases_last_4w": last4,
        "purchases_last_13w": last13,
        "annual_repeat_rate": 52.0 * repeat / np.maximum(age_w, 1.0),
        "recency_share": rec_w / np.maximum(age_w, 1.0),
        "recency_weeks": rec_w,
        "mean_gap_weeks": mean_gap,
        "overdue": np.where(repeat > 0, rec_w / np.maximum(mean_gap, 1.0), 0.0),
        "mean_spend": spend / np.maximum(count, 1.0),
    }
    X = _scale(raw)
    X[~has] = 0.0
    return X


def _weekly_counts(days: pd.DataFrame, index: pd.Index, start: pd.Timestamp,
                   weeks: int) -> np.ndarray:
    """``[len(index), weeks]`` purchase-day counts in weeks (start + 7k, start + 7(k+1)]."""
    end = start + weeks * WEEK
    window = days[(days["day"] > start) & (days["day"] <= end)]
    codes = index.get_indexer(pd.Index(window["customer_id"]))
    offset = ((window["day"] - start).to_numpy() // np.timedelta64(1, "D")).astype(np.int64)
    keep = codes >= 0
    week = (offset[keep] - 1) // 7
    flat = np.bincount(codes[keep] * weeks + week, minlength=len(index) * weeks)
    return flat.reshape(len(index), weeks).astype(np.float32)


@dataclass(frozen=True)
class TrendData:
    """One training example per customer.

    ``X`` ``[n, len(TREND_FEATURE_NAMES)]`` float32 features at the customer's cutoff;
    ``Y`` ``[n, max(horizons)]`` float32 weekly purchase-day counts after the cutoff, NaN after
    ``calibration_end`` (masked out of the loss); ``cutoffs`` the per-customer cutoff days.
    """

    X: np.ndarray
    Y: np.ndarray
    customer_ids: pd.Index
    cutoffs: pd.DatetimeIndex


def trend_features(transactions: pd.DataFrame, *, as_of: pd.Timestamp,
                   customers: pd.Index | None = None) -> tuple[np.ndarray, pd.Index]:
    """Scaled trend features at ``as_of`` for every customer with a purchase on or before it.

    Returns ``(X, customer_ids)``; with ``customers`` given, rows follow it instead (customers
    with no purchase by ``as_of`` get zeros).
    """
    as_of = pd.Timestamp(as_of).normalize()
    days = _purchase_days(transactions)
    if customers is None:
        customers = pd.Index(np.sort(days.loc[days["day"] <= as_of, "customer_id"].unique()),
                             name="customer_id")
    return _features_from_days(days, customers, as_of), customers


HORIZON_SALT = b"fedcrm/trend-horizon/v1/"


def customer_uniforms(customer_ids: pd.Index, *, salt: bytes) -> np.ndarray:
    """One uniform number in [0, 1) per customer, from ``sha256(salt + pseudonym)``.

    Anything random per customer is drawn this way: a customer's draw depends on the customer
    alone, so adding or removing one customer changes no other customer's training row (the
    neighbouring datasets DP reasons about differ in exactly one example). The pseudonyms are
    keyed HMAC tokens, so the draws cannot be predicted without the firm's key.
    """
    return np.fromiter(
        (
            int.from_bytes(hashlib.sha256(salt + str(c).encode()).digest()[:8], "big") / 2.0**64
            for c in customer_ids
        ),
        dtype=np.float64,
        count=len(customer_ids),
    )


def trend_dataset(
    transactions: pd.DataFrame,
    *,
    calibration_end: pd.Timestamp,
    train_horizon_weeks: int | Sequence[int] = DEFAULT_TRAIN_HORIZONS,
    horizon_salt: bytes = HORIZON_SALT,
) -> TrendData:
    """Time-shifted training data from the calibration period (see the module docstring).

    Each customer gets one cutoff ``calibration_end − h`` weeks, ``h`` drawn uniformly from the
    horizons in ``train_horizon_weeks`` at which the customer had already made a purchase, by
    :func:`customer_uniforms` (``horizon_salt`` varies the draw, e.g. per benchmark seed);
    customers with no such horizon are left out. Only purchases on or before ``calibration_end``
    are read.
    """
    if isinstance(train_horizon_weeks, int | np.integer):
        horizons = [int(train_horizon_weeks)]
    else:
        horizons = sorted({int(h) for h in train_horizon_weeks})
    if not horizons or horizons[0] < 1:
        raise ConfigError(
            f"trend training horizons must be positive week counts, got {list(horizons)}; "
            "set train_horizon_weeks to e.g. 13 or (13, 18, 22, 26)"
        )
    calibration_end = pd.Timestamp(calibration_end).normalize()
    days = _purchase_days(transactions)
    days = days[days["day"] <= calibration_end]
    cutoffs = [calibration_end - h * WEEK for h in horizons]
    first = days.groupby("customer_id", sort=True)["day"].min()
    if first.empty or not (first <= cutoffs[-1]).any():
        raise ConfigError(
            f"no customer purchased on or before {cutoffs[-1].date()} (calibration end "
            f"{calibration_end.date()} − {horizons[-1]} weeks); the calibration period is too "
            "short for these training horizons: lower train_horizon_weeks"
        )
    ids = pd.Index(first.index, name="customer_id")
    eligible = np.stack([(first <= c).to_numpy() for c in cutoffs], axis=1)  # [n, m]
    n_ok = eligible.sum(1)
    draws = customer_uniforms(ids, salt=horizon_salt)
    pick_rank = np.floor(draws * np.maximum(n_ok, 1)).astype(np.int64)
    # index of the (pick_rank)-th eligible horizon per customer
    choice = np.argmax(np.cumsum(eligible, axis=1) > pick_rank[:, None], axis=1)
    keep = n_ok > 0
    ids, choice = ids[keep], choice[keep]

    h_max = horizons[-1]
    X = np.zeros((len(ids), len(TREND_FEATURE_NAMES)), dtype=np.float32)
    Y = np.full((len(ids), h_max), np.nan, dtype=np.float32)
    for j, (h, cut) in enumerate(zip(horizons, cutoffs, strict=True)):
        rows = np.flatnonzero(choice == j)
        if rows.size == 0:
            continue
        sub = ids[rows]
        X[rows] = _features_from_days(days, sub, cut)
        Y[rows, :h] = _weekly_counts(days, sub, cut, h)
    cut_days = pd.DatetimeIndex(np.asarray(cutoffs, dtype="datetime64[ns]")[choice])
    return TrendData(X=X, Y=Y, customer_ids=ids, cutoffs=cut_days)


# ---------------------------------------------------------------------------------------------
# Model, loss, forecast
# ---------------------------------------------------------------------------------------------


def build_trend_model(*, hidden: int = 0, generator: torch.Generator | None = None,
                      seed: int | None = None) -> nn.Module:
    """The trend network: ``[n, len(TREND_FEATURE_NAMES)]`` → ``[n, TREND_OUTPUTS]``.

    ``hidden = 0`` (default): one ``nn.Linear`` (a Poisson log-link regression for the level,
    with linear decay and floor logits), weights zero and the level bias at
    ``log(TREND_INITIAL_WEEKLY_RATE)``, so every firm starts from the same model.
    ``hidden > 0``: ``Linear → ReLU → Linear``, initialised from ``generator`` (or ``seed``).
    """
    d = len(TREND_FEATURE_NAMES)
    if hidden < 0:
        raise ConfigError(f"trend model hidden width must be ≥ 0, got {hidden}")
    if hidden == 0:
        head = nn.Linear(d, TREND_OUTPUTS)
        with torch.no_grad():
            head.weight.zero_()
            head.bias.zero_()
            head.bias[0] = math.log(TREND_INITIAL_WEEKLY_RATE)
        return head
    if generator is None:
        generator = torch.Generator().manual_seed(0 if seed is None else seed)
    first, last = nn.Linear(d, hidden), nn.Linear(hidden, TREND_OUTPUTS)
    with torch.no_grad():
        for layer in (first, last):
            bound = 1.0 / math.sqrt(layer.in_features)
            nn.init.uniform_(layer.weight, -bound, bound, generator=generator)
            nn.init.uniform_(layer.bias, -bound, bound, generator=generator)
        last.bias[0] += math.log(TREND_INITIAL_WEEKLY_RATE)
    return nn.Sequential(first, nn.ReLU(), last)


def weekly_rates(outputs: Tensor, weeks: int) -> Tensor:
    """Decode outputs ``[n, 3]`` into expected purchases ``[n, weeks]`` for weeks 1..weeks."""
    if outputs.ndim != 2 or outputs.shape[1] != TREND_OUTPUTS:
        raise ValueError(f"trend outputs must be [n, {TREND_OUTPUTS}], got {tuple(outputs.shape)}")
    level = outputs[:, 0:1].clamp(max=10.0)
    decay = nn.functional.softplus(outputs[:, 1:2])
    floor = torch.sigmoid(outputs[:, 2:3])
    k = torch.arange(1, weeks + 1, dtype=outputs.dtype, device=outputs.device).unsqueeze(0)
    return torch.exp(level) * (floor + (1.0 - floor) * torch.exp(-decay * k / TREND_DECAY_WEEKS))


def trend_per_sample_loss(outputs: Tensor, targets: Tensor) -> Tensor:
    """Poisson negative log-likelihood per customer, summed over observed (non-NaN) weeks: ``[n]``.

    Constant terms (``log y!``) are dropped. NaN targets are masked before any arithmetic so
    that they contribute neither loss nor gradient.
    """
    observed = ~torch.isnan(targets)
    y = torch.where(observed, targets, torch.zeros_like(targets))
    mu = weekly_rates(outputs, targets.shape[1])
    nll = mu - y * torch.log(mu + 1e-8)
    return (nll * observed.to(nll.dtype)).sum(dim=1)


def forecast(model: nn.Module, X: np.ndarray | Tensor, *, weeks: int = 39) -> np.ndarray:
    """Expected purchase days per customer and week after the features' date: ``[n, weeks]``."""
    if weeks < 1:
        raise ConfigError(f"forecast needs at least 1 week, got {weeks}")
    features = torch.as_tensor(X, dtype=torch.float32)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        out = weekly_rates(model(features), weeks)
    model.train(was_training)
    return out.double().numpy()


# ---------------------------------------------------------------------------------------------
# Roll-up and evaluation
# ---------------------------------------------------------------------------------------------

FIRM_TOTAL = "firm_total"


def rollup(forecast_weekly: np.ndarray,
           segments: Sequence[str] | pd.Series | np.ndarray) -> pd.DataFrame:
    """Segment × week expected purchases plus a ``firm_total`` row; columns are weeks 1..K."""
    F = np.asarray(forecast_weekly, dtype=np.float64)
    seg = np.asarray(pd.Series(segments).astype(str).to_numpy())
    if F.ndim != 2 or F.shape[0] != seg.shape[0]:
        raise ValueError(
            f"rollup needs one segment per forecast row; got forecast {F.shape}, "
            f"{seg.shape[0]} segments"
        )
    columns = pd.RangeIndex(1, F.shape[1] + 1, name="week")
    by_segment = pd.DataFrame(F, columns=columns).groupby(seg, sort=True).sum()
    total = pd.DataFrame([F.sum(axis=0)], index=[FIRM_TOTAL], columns=columns)
    out = pd.concat([by_segment, total])
    out.index.name = "segment"
    return out


#: Share of customers (those with the highest forecast) whose holdout purchases the capture counts.
TOP_SHARE = 0.2


def top_share_capture(scores: np.ndarray, purchases: np.ndarray, *,
                      share: float = TOP_SHARE) -> float:
    """Share of all ``purchases`` made by the ``share`` of customers with the highest ``scores``.

    Customers tied at the cut count in proportion (the expected capture when ties are broken at
    random), so a model that forecasts the same value for many customers gets no credit for an
    arbitrary order among them. NaN when there are no purchases.
    """
    s = np.asarray(scores, dtype=np.float64)
    p = np.asarray(purchases, dtype=np.float64)
    if s.shape != p.shape or s.ndim != 1:
        raise ValueError(f"scores {s.shape} and purchases {p.shape} must be one value per customer")
    values, inverse = np.unique(-s, return_inverse=True)  # descending score groups
    counts = np.bincount(inverse, minlength=len(values)).astype(np.float64)
    sums = np.bincount(inverse, weights=p, minlength=len(values))
    return capture_from_histograms(counts[::-1], sums[::-1], share=share)


def capture_from_histograms(counts: np.ndarray, purchases: np.ndarray, *,
                            share: float = TOP_SHARE) -> float:
    """:func:`top_share_capture` from customers and purchases per score bin, bins in ASCENDING
    score order; the bin at the cut counts in proportion, as ties do."""
    c = np.asarray(counts, dtype=np.float64)[::-1]
    p = np.asarray(purchases, dtype=np.float64)[::-1]
    total = float(p.sum())
    if total <= 0 or c.sum() <= 0:
        return float("nan")
    before = np.concatenate([[0.0], np.cumsum(c)[:-1]])  # customers in higher bins
    taken = np.clip(share * c.sum() - before, 0.0, c)
    fraction = np.divide(taken, c, out=np.zeros_like(c), where=c > 0)
    return float((fraction * p).sum() / total)


def evaluate_holdout(forecast_weekly: np.ndarray | pd.DataFrame,
                     actual_weekly: np.ndarray | pd.DataFrame) -> dict[str, float]:
    """Compare a forecast with the holdout, both ``[customers × weeks]`` in the same row order.

    The firm-level curve:

    * ``cumulative_error``: mean over holdout weeks of |forecast − actual| of the firm's
      cumulative (repeat-)purchase curve, in purchases;
    * ``cumulative_relative_error``: that, divided by the actual total at the end of the holdout;
    * ``end_relative_error``: signed (forecast − actual) / actual of the end-of-holdout total;
    * ``forecast_total`` / ``actual_total``: the end-of-holdout totals.

    Ranking customers by their forecast total over the holdout:

    * ``repeat_buyer_auc``: ROC AUC of that score for "buys at least once in the holdout";
    * ``top20_capture``: share of holdout purchases made by the 20% of customers with the highest
      score (:func:`top_share_capture`).

    And ``customer_mae``: mean over customers of |forecast − actual| total holdout purchases (it
    favours forecasting the median, zero for most customers, so it is no ranking measure).
    """
    F = np.asarray(forecast_weekly, dtype=np.float64)
    A = np.asarray(actual_weekly, dtype=np.float64)
    if F.shape != A.shape or F.ndim != 2:
        raise ValueError(f"forecast {F.shape} and actual {A.shape} must both be [customers, weeks]")
    cum_f = F.sum(axis=0).cumsum()
    cum_a = A.sum(axis=0).cumsum()
    mae = float(np.abs(cum_f - cum_a).mean())
    actual_total = float(cum_a[-1])
    forecast_total = float(cum_f[-1])
    scale = actual_total if actual_total > 0 else float("nan")
    score, bought = F.sum(axis=1), A.sum(axis=1)
    return {
        "cumulative_error": mae,
        "cumulative_relative_error": mae / scale,
        "end_relative_error": (forecast_total - actual_total) / scale,
        "repeat_buyer_auc": auc(score, bought > 0),
        "top20_capture": top_share_capture(score, bought),
        "customer_mae": float(np.abs(score - bought).mean()),
        "forecast_total": forecast_total,
        "actual_total": actual_total,
    }


def segments_at(transactions: pd.DataFrame, *, as_of: pd.Timestamp,
                customers: pd.Index) -> pd.Series:
    """RFM segment of each of ``customers`` at ``as_of`` (for :func:`rollup`)."""
    base = rfm(transactions, as_of=as_of)
    scores = rfm_scores(base)
    seg = scores["segment"].astype(str).reindex(customers)
    return seg.fillna("none")
