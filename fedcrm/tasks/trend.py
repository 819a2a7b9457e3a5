"""The trend task: data, model, evaluation, pooled metrics (see :mod:`fedcrm.tasks.base`).

A firm's calibration period ends at its config's ``features.as_of``; everything after it up to
the last transaction is its holdout. Training examples come from the calibration period only
(time-shifted, see :mod:`fedcrm.trend`), one per customer. Evaluation sends the coordinator the
firm's weekly forecast and actual purchase totals (sums over customers) and the sum of absolute
per-customer errors: aggregates, never a customer's record.
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping, Sequence
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
from fedcrm.learning.models import arrays_to_model, model_to_arrays
from fedcrm.learning.settings import ChurnModelKind
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
from fedcrm.privacy.durable import write_private
from fedcrm.privacy.errors import ConfigError, SchemaError
from fedcrm.protocol import DescribeReply, EvaluateReply, TaskKind
from fedcrm.tasks.base import Evaluation, TrainingProblem

TREND_MODEL_FORMAT = "fedcrm/trend-model/v1"
SUM_FORECAST, SUM_ACTUAL = "sum-forecast", "sum-actual"


@dataclass(frozen=True)
class FirmTrendData:
    x_train: np.ndarray
    y_train: np.ndarray
    x_pred: np.ndarray
    actual: np.ndarray  # [customers, holdout weeks] purchase days
    calibration_end: pd.Timestamp
    holdout_weeks: int
    fingerprint: str

    @property
    def layout(self) -> str:
        return self.fingerprint

    @property
    def input_dim(self) -> int:
        return len(TREND_FEATURE_NAMES)

    def describe(self, firm: str) -> DescribeReply:
        return DescribeReply(
            firm=firm,
            layout=self.fingerprint,
            input_dim=self.input_dim,
            num_train=len(self.y_train),
            num_test=len(self.x_pred),
            holdout_weeks=self.holdout_weeks,
        )

    def training_problem(self, *, model: ChurnModelKind, seed: int) -> TrainingProblem:
        """``model`` names the churn architecture and does not apply: the trend network is
        fixed (:func:`fedcrm.learning.trend_model.build_trend_model`)."""
        return TrainingProblem(
            x=self.x_train, y=self.y_train, model=build_trend_model(seed=seed),
            loss=trend_per_sample_loss,
        )

    def evaluate(self, arrays: Sequence[np.ndarray], *, model: ChurnModelKind) -> Evaluation:
        net = arrays_to_model(build_trend_model(), arrays)
        weekly = forecast(net, self.x_pred, weeks=self.holdout_weeks)
        own = evaluate_holdout(weekly, self.actual)
        abs_err = float(np.abs(weekly.sum(axis=1) - self.actual.sum(axis=1)).sum())
        return Evaluation(
            num_examples=len(self.x_pred),
            metrics={
                "customer-abs-error-sum": abs_err,
                "cumulative-error": own["cumulative_error"],
                "customer-mae": own["customer_mae"],
            },
            vectors={SUM_FORECAST: weekly.sum(axis=0), SUM_ACTUAL: self.actual.sum(axis=0)},
        )


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
    data = trend_dataset(calibration, calibration_end=calibration_end)
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


def pooled_trend_metrics(replies: Sequence[EvaluateReply]) -> dict[str, float]:
    """Federation-wide trend errors from the firms' weekly sums (curves add up across firms).

    A small firm's last purchase can fall in an earlier week, so its holdout is shorter: the
    weeks every firm covers are pooled (as the simulation's BG/NBD baseline does).
    """
    with_sums = [r for r in replies if SUM_FORECAST in r.vectors and SUM_ACTUAL in r.vectors]
    if not with_sums:
        return {}
    weeks = min(len(r.vectors[SUM_ACTUAL]) for r in with_sums)
    f = np.sum([np.asarray(r.vectors[SUM_FORECAST][:weeks]) for r in with_sums], axis=0)
    a = np.sum([np.asarray(r.vectors[SUM_ACTUAL][:weeks]) for r in with_sums], axis=0)
    cum_f, cum_a = f.cumsum(), a.cumsum()
    mae = float(np.abs(cum_f - cum_a).mean())
    total = float(cum_a[-1]) if len(cum_a) else float("nan")
    n = sum(r.num_examples for r in replies)
    abs_sum = sum(r.metrics.get("customer-abs-error-sum", 0.0) for r in replies)
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
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_private(path, buffer.getvalue())
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


class TrendTask:
    """The trend task's definition (see :class:`fedcrm.tasks.base.Task`)."""

    kind = TaskKind.TREND

    def firm_data(self, cfg: FirmConfig, store: PreparedStore) -> FirmTrendData:
        return firm_trend_data(store, cfg)

    def initial_arrays(
        self, *, model: ChurnModelKind, input_dim: int, seed: int
    ) -> list[np.ndarray]:
        if input_dim != len(TREND_FEATURE_NAMES):
            raise ConfigError(
                f"trend model input has {len(TREND_FEATURE_NAMES)} features, firms reported "
                f"{input_dim}"
            )
        return model_to_arrays(build_trend_model(seed=seed))

    def pooled_metrics(self, replies: Sequence[EvaluateReply]) -> dict[str, float]:
        return pooled_trend_metrics(replies)

    def save_model(
        self, path: Path, arrays: Sequence[np.ndarray], provenance: Mapping[str, Any]
    ) -> Path:
        return save_trend_model(path, list(arrays), dict(provenance))


TREND = TrendTask()
