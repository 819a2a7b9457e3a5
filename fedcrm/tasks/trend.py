"""The trend task of a firm's node: data, model, evaluation, pooled metrics (no Flower).

A firm's calibration period ends at its config's ``features.as_of``; everything after it up to
the last transaction is its holdout. Training examples come from the calibration period only
(time-shifted, see :mod:`fedcrm.trend`), one per customer. Evaluation sends the coordinator the
firm's weekly forecast and actual purchase totals (sums over customers) and the sum of absolute
per-customer errors: aggregates, never a customer's record.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from fedcrm.data.contract import FirmConfig
from fedcrm.data.features import weekly_series
from fedcrm.data.store import PreparedStore
from fedcrm.learning.models import arrays_to_model
from fedcrm.learning.trend_model import (
    TREND_FEATURE_NAMES,
    build_trend_model,
    evaluate_holdout,
    forecast,
    trend_dataset,
    trend_features,
    trend_fingerprint,
    trend_per_sample_loss,
)
from fedcrm.privacy.errors import ConfigError, SchemaError

TREND_MODEL_FORMAT = "fedcrm/trend-model/v1"
per_sample_loss = trend_per_sample_loss


@dataclass(frozen=True)
class FirmTrendData:
    x_train: np.ndarray
    y_train: np.ndarray
    x_pred: np.ndarray
    actual: np.ndarray  # [customers, holdout weeks] purchase days
    calibration_end: pd.Timestamp
    holdout_weeks: int
    fingerprint: str


def firm_trend_data(store: PreparedStore, cfg: FirmConfig) -> FirmTrendData:
    tx = store.transactions
    if tx is None or len(tx) == 0:
        raise SchemaError(f"firm '{cfg.firm.name}': the trend task needs a transactions table")
    if cfg.features.as_of is None:
        raise ConfigError(
            f"{cfg.config_path}: the trend task needs features.as_of (the end of the calibration "
            "period); transactions after it are the holdout"
        )
    calibration_end = pd.Timestamp(cfg.features.as_of)
    last = pd.Timestamp(tx["timestamp"].max()).normalize()
    holdout_weeks = max(1, int((last - calibration_end).days // 7))
    calibration = tx[tx["timestamp"] <= calibration_end]
    seed = int.from_bytes(hashlib.sha256(cfg.firm.name.encode()).digest()[:4], "big")
    data = trend_dataset(
        calibration, calibration_end=calibration_end, rng=np.random.default_rng(seed)
    )
    x_pred, customers = trend_features(calibration, as_of=calibration_end)
    actual = weekly_series(
        tx,
        start=calibration_end,
        end=calibration_end + pd.Timedelta(weeks=holdout_weeks),
        customers=customers,
    ).to_numpy(dtype=np.float64)
    return FirmTrendData(
        x_train=data.X,
        y_train=data.Y,
        x_pred=x_pred,
        actual=actual,
        calibration_end=calibration_end,
        holdout_weeks=actual.shape[1],
        fingerprint=trend_fingerprint(),
    )


def describe(data: FirmTrendData, *, firm: str) -> dict[str, str | int | float]:
    return {
        "firm": firm,
        "layout": data.fingerprint,
        "input-dim": len(TREND_FEATURE_NAMES),
        "num-train": len(data.y_train),
        "num-test": len(data.x_pred),
        "holdout-weeks": data.holdout_weeks,
    }


def build_model(data: FirmTrendData | None = None, *, seed: int = 0) -> nn.Module:
    return build_trend_model(seed=seed)


def build_model_for_dim(input_dim: int, *, seed: int = 0) -> nn.Module:
    if input_dim != len(TREND_FEATURE_NAMES):
        raise ConfigError(
            f"trend model input has {len(TREND_FEATURE_NAMES)} features, firms reported {input_dim}"
        )
    return build_trend_model(seed=seed)


def evaluate(data: FirmTrendData, arrays: list[np.ndarray]) -> Any:
    from fedcrm.node import EvalOutcome

    model = arrays_to_model(build_trend_model(), arrays)
    weekly = forecast(model, data.x_pred, weeks=data.holdout_weeks)
    own = evaluate_holdout(weekly, data.actual)
    abs_err = float(np.abs(weekly.sum(axis=1) - data.actual.sum(axis=1)).sum())
    return EvalOutcome(
        num_examples=len(data.x_pred),
        metrics={
            "customer-abs-error-sum": abs_err,
            "cumulative-error": own["cumulative_error"],
            "customer-mae": own["customer_mae"],
        },
        histograms={"sum-forecast": weekly.sum(axis=0), "sum-actual": data.actual.sum(axis=0)},
    )


def pooled_trend_metrics(
    sums: dict[str, np.ndarray], per_firm: dict[str, dict[str, float]]
) -> dict[str, float]:
    """Federation-wide trend errors from the firms' weekly sums (curves add up across firms)."""
    f = np.asarray(sums["sum-forecast"], dtype=np.float64)
    a = np.asarray(sums["sum-actual"], dtype=np.float64)
    cum_f, cum_a = f.cumsum(), a.cumsum()
    mae = float(np.abs(cum_f - cum_a).mean())
    total = float(cum_a[-1]) if len(cum_a) else float("nan")
    n = sum(m.get("num_examples", 0) for m in per_firm.values())
    abs_sum = sum(m.get("customer-abs-error-sum", 0.0) for m in per_firm.values())
    return {
        "cumulative_error": mae,
        "cumulative_relative_error": mae / total if total else float("nan"),
        "end_relative_error": (float(cum_f[-1]) - total) / total if total else float("nan"),
        "customer_mae": abs_sum / n if n else float("nan"),
        "forecast_total": float(cum_f[-1]) if len(cum_f) else 0.0,
        "actual_total": total,
    }


def save_trend_model(path: Path, arrays: list[np.ndarray], provenance: dict[str, Any]) -> Path:
    model = arrays_to_model(build_trend_model(), arrays)
    payload = {
        "format": TREND_MODEL_FORMAT,
        "provenance": json.dumps(provenance, sort_keys=True, default=str),
        "state_dict": {k: v.detach().clone() for k, v in model.state_dict().items()},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "wb") as fh:
        torch.save(payload, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return path


def load_trend_model(path: Path) -> tuple[nn.Module, dict[str, Any]]:
    try:
        payload = torch.load(path, weights_only=True, map_location="cpu")
    except FileNotFoundError:
        raise ConfigError(f"model file {path} not found") from None
    if not isinstance(payload, dict) or payload.get("format") != TREND_MODEL_FORMAT:
        raise ConfigError(f"{path} is not a {TREND_MODEL_FORMAT} file")
    model = build_trend_model()
    model.load_state_dict(payload["state_dict"])
    provenance: dict[str, Any] = json.loads(payload["provenance"])
    return model, provenance
