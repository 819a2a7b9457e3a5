"""The trend task: data, model, evaluation, pooled metrics (see :mod:`fedcrm.tasks.base`).

A firm's calibration period ends at its config's ``features.as_of``; everything after it up to
the last transaction is its holdout. Training examples come from the calibration period only
(time-shifted, see :mod:`fedcrm.trend`), one per customer. Evaluation sends the coordinator the
firm's weekly forecast and actual purchase totals (sums over customers) and the sum of absolute
per-customer errors: aggregates, never a customer's record.
"""

from __future__ import annotations

import io
import itertools
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
from fedcrm.protocol import DescribeReply, TaskKind
from fedcrm.tasks.base import EvaluationStatistics, NoisyStatistics, TrainingProblem

TREND_MODEL_FORMAT = "fedcrm/trend-model/v1"
SUM_FORECAST, SUM_ACTUAL = "sum-forecast", "sum-actual"
#: Evaluation releases the holdout's forecast and actual purchase days summed over customers in
#: this many equal periods, each customer's value clipped to [0, EVALUATION_CLIP] per period.
EVALUATION_PERIODS = 3
EVALUATION_CLIP = 4.0


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

    def describe(self, firm: str, *, public_size: int) -> DescribeReply:
        return DescribeReply(
            firm=firm,
            layout=self.fingerprint,
            input_dim=self.input_dim,
            public_size=public_size,
            holdout_weeks=self.holdout_weeks,
        )

    def training_problem(self, *, model: ChurnModelKind, seed: int) -> TrainingProblem:
        """``model`` names the churn architecture and does not apply: the trend network is
        fixed (:func:`fedcrm.learning.trend_model.build_trend_model`)."""
        return TrainingProblem(
            x=self.x_train, y=self.y_train, model=build_trend_model(seed=seed),
            loss=trend_per_sample_loss,
        )

    def check_local_training(self) -> None:
        """Nothing to refuse: the holdout is declared (``features.holdout_end``) and its error
        is defined for any customers."""

    def _forecast(self, arrays: Sequence[np.ndarray]) -> np.ndarray:
        net = arrays_to_model(build_trend_model(), arrays)
        return forecast(net, self.x_pred, weeks=self.holdout_weeks)

    def local_metrics(
        self, arrays: Sequence[np.ndarray], *, model: ChurnModelKind
    ) -> dict[str, float]:
        own = evaluate_holdout(self._forecast(arrays), self.actual)
        return {"cumulative_error": own["cumulative_error"],
                "customer_mae": own["customer_mae"]}

    def evaluation(
        self, arrays: Sequence[np.ndarray], *, model: ChurnModelKind
    ) -> EvaluationStatistics:
        """Per period: Σ over customers of min(forecast, C) and of min(actual, C).

        One customer more or less changes each of the 2·K sums by at most C, so the L2
        sensitivity is C·sqrt(2K). No per-customer value is released.
        """
        weekly = self._forecast(arrays)
        edges = np.linspace(0, self.holdout_weeks, EVALUATION_PERIODS + 1).round().astype(int)

        def per_period(values: np.ndarray) -> np.ndarray:
            sums = [values[:, a:b].sum(axis=1) for a, b in itertools.pairwise(edges)]
            return np.clip(np.stack(sums, axis=1), 0.0, EVALUATION_CLIP).sum(axis=0)

        return EvaluationStatistics(
            values={SUM_FORECAST: per_period(weekly), SUM_ACTUAL: per_period(self.actual)},
            l2_sensitivity=EVALUATION_CLIP * float(np.sqrt(2 * EVALUATION_PERIODS)),
            integer=False,
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
    if cfg.features.holdout_end is None:
        raise ConfigError(
            f"{cfg.config_path}: the trend task needs features.holdout_end (the declared end of "
            "the holdout after features.as_of); it is public, the date of a firm's last purchase "
            "is not"
        )
    calibration_end = pd.Timestamp(cfg.features.as_of)
    holdout_weeks = int((pd.Timestamp(cfg.features.holdout_end) - calibration_end).days // 7)
    if holdout_weeks < EVALUATION_PERIODS:
        raise ConfigError(
            f"{cfg.config_path}: features.holdout_end must be at least {EVALUATION_PERIODS} weeks "
            "after features.as_of"
        )
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


def pooled_trend_metrics(statistics: Sequence[NoisyStatistics]) -> dict[str, float]:
    """Federation-wide trend errors from the firms' noisy per-period sums (they add up across
    firms; every firm's holdout covers the same declared weeks), and the noise's standard
    deviation on each pooled period sum (``period_noise_sd``)."""
    with_sums = [s for s in statistics if SUM_FORECAST in s.values and SUM_ACTUAL in s.values]
    if not with_sums:
        return {}
    f = np.sum([np.asarray(s.values[SUM_FORECAST]) for s in with_sums], axis=0)
    a = np.sum([np.asarray(s.values[SUM_ACTUAL]) for s in with_sums], axis=0)
    cum_f, cum_a = f.cumsum(), a.cumsum()
    mae = float(np.abs(cum_f - cum_a).mean())
    total = float(cum_a[-1])
    return {
        "cumulative_error": mae,
        "cumulative_relative_error": mae / total if total > 0 else float("nan"),
        "end_relative_error": (float(cum_f[-1]) - total) / total if total > 0 else float("nan"),
        "forecast_total": float(cum_f[-1]),
        "actual_total": total,
        "period_noise_sd": float(np.sqrt(sum(s.noise_std**2 for s in with_sums))),
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

    def firm_data(
        self, cfg: FirmConfig, store: PreparedStore, *, schema: str = ""
    ) -> FirmTrendData:
        """The trend features are fixed and public (``TREND_FEATURE_SPECS``); no schema."""
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

    def pooled_metrics(self, statistics: Sequence[NoisyStatistics]) -> dict[str, float]:
        return pooled_trend_metrics(statistics)

    def save_model(
        self, path: Path, arrays: Sequence[np.ndarray], provenance: Mapping[str, Any]
    ) -> Path:
        return save_trend_model(path, list(arrays), dict(provenance))


TREND = TrendTask()
