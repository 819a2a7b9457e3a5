"""The churn task: one row per customer, the declared features as input, churned or not as label.

A firm's held-out customers are chosen by a hash of their pseudonym (:func:`holdout_mask`), so every
round, every restart and a simulation's centralized baseline agree on them without coordination.
Evaluation releases, for the held-out customers, how many churners and non-churners fall in each
of a few fixed score bins (:data:`EVALUATION_EDGES`): each customer counts once, so one customer
more or less changes one count by one (L2 sensitivity 1); the node adds discrete Gaussian noise.
The coordinator sums the noisy bins over firms into a pooled AUC
(:func:`fedcrm.learning.metrics.auc_from_histograms`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from fedcrm.data.contract import ColumnRole, FeatureKind, FirmConfig, TableName
from fedcrm.data.encoding import (
    BooleanSpec,
    CategoricalSpec,
    FeatureLayout,
    FeatureSpec,
    NumericSpec,
)
from fedcrm.data.store import PreparedStore
from fedcrm.learning.dp_trees import TreeEnsemble, TreeSchedule, digitize, save_trees
from fedcrm.learning.metrics import auc, auc_from_histograms, score_histograms
from fedcrm.learning.models import (
    arrays_to_model,
    build_churn_model,
    churn_per_sample_loss,
    model_to_arrays,
    predict_proba,
    save_model,
)
from fedcrm.learning.settings import ChurnModelKind, TreeSettings
from fedcrm.privacy.errors import ConfigError, SchemaError
from fedcrm.protocol import DescribeReply, TaskKind
from fedcrm.tasks.base import EvaluationStatistics, NoisyStatistics, TrainingProblem

HOLDOUT_FRACTION = 0.2
HIST_POSITIVE, HIST_NEGATIVE = "hist-pos", "hist-neg"
#: Score bin edges of the released evaluation histograms (public, fixed). Few bins, because every
#: bin carries noise; spaced evenly in logit over [-2.5, 0] (churn probabilities mostly lie below
#: one half), because equal-width bins put most customers in the first bin and the histogram's
#: AUC then loses its resolution (on a Telco run: 0.79 from 5 equal-width bins, 0.83 from these,
#: against 0.85 unbinned; chosen on seed 0's scores, checked on the other seeds).
EVALUATION_EDGES = np.array([0.0, *(1 / (1 + np.exp(-np.linspace(-2.5, 0.0, 4)))), 1.0])
#: Parametric-bootstrap draws for the pooled AUC's noise standard deviation (post-processing).
_AUC_BOOTSTRAP = 200


def layout_from_config(cfg: FirmConfig) -> FeatureLayout:
    """The churn model's input layout, fixed by the firm's declared customer features."""
    if TableName.CUSTOMERS not in cfg.tables:
        raise ConfigError(
            f"{cfg.config_path}: the churn task needs a customers table with declared features"
        )
    table = cfg.tables[TableName.CUSTOMERS]
    numeric: list[FeatureSpec] = []
    boolean: list[FeatureSpec] = []
    categorical: list[FeatureSpec] = []
    for source, col in table.columns.items():
        if col.role is not ColumnRole.FEATURE:
            continue
        name = col.canonical(source, TableName.CUSTOMERS)
        if col.kind is FeatureKind.NUMERIC:
            assert col.min is not None and col.max is not None
            numeric.append(
                NumericSpec(
                    name,
                    float(col.min),
                    float(col.max),
                    missing_indicator=col.missing.value == "allow",
                )
            )
        elif col.kind is FeatureKind.BOOLEAN:
            boolean.append(BooleanSpec(name))
        else:
            categorical.append(CategoricalSpec(name, tuple(col.categories or ())))
    key = lambda s: s.name  # noqa: E731
    return FeatureLayout(
        [*sorted(numeric, key=key), *sorted(boolean, key=key), *sorted(categorical, key=key)]
    )


def tree_grid(layout: FeatureLayout, bins: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The public split candidates of a tree model on ``layout``: ``bins`` equal-width bins for a
    numeric column (its declared range is [0, 1] once encoded), 2 for every 0/1 column (booleans,
    one-hot categories, missing indicators); and the declared feature each column belongs to."""
    candidates: list[int] = []
    groups: list[int] = []
    for feature, spec in enumerate(layout.specs):
        for column, _ in enumerate(spec.feature_names):
            numeric = isinstance(spec, NumericSpec) and column == 0
            candidates.append(bins if numeric else 2)
            groups.append(feature)
    return tuple(candidates), tuple(groups)


def holdout_mask(customer_ids: pd.Series, fraction: float = HOLDOUT_FRACTION) -> np.ndarray:
    """A firm's held-out customers: ``sha256("fedcrm/holdout/v1/" + pseudonym) < fraction``.

    Deterministic per customer pseudonym, so every round, every restart and the centralized
    baseline of a simulation agree on it without any coordination.
    """
    limit = int(fraction * 2**64)
    return np.fromiter(
        (
            int.from_bytes(hashlib.sha256(f"fedcrm/holdout/v1/{c}".encode()).digest()[:8], "big")
            < limit
            for c in customer_ids.astype(str)
        ),
        dtype=bool,
        count=len(customer_ids),
    )


@dataclass(frozen=True)
class ChurnData:
    """A firm's churn examples, split into training and held-out customers."""

    feature_layout: FeatureLayout
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray

    @property
    def layout(self) -> str:
        return self.feature_layout.fingerprint()

    @property
    def input_dim(self) -> int:
        return self.feature_layout.dim

    def describe(self, firm: str, *, public_size: int) -> DescribeReply:
        return DescribeReply(
            firm=firm, layout=self.layout, input_dim=self.input_dim, public_size=public_size
        )

    def training_problem(self, *, model: ChurnModelKind, seed: int) -> TrainingProblem:
        return TrainingProblem(
            x=self.x_train,
            y=self.y_train,
            model=build_churn_model(model, self.input_dim, seed=seed),
            loss=churn_per_sample_loss,
        )

    def check_local_training(self) -> None:
        """Refuse a training or held-out set with a single churn class: the model would learn
        nothing, or its held-out AUC would be undefined (it was printed as ``auc=nan``)."""
        churners = int(self.y_train.sum() + self.y_test.sum())
        customers = len(self.y_train) + len(self.y_test)
        for what, y, cannot in (
            ("training", self.y_train, "learn churn"),
            ("held-out", self.y_test, "be measured (held-out AUC)"),
        ):
            if 0 < int(y.sum()) < len(y):
                continue
            side = "none" if int(y.sum()) == 0 else "all"
            raise SchemaError(
                f"the {len(y):,} {what} customers have a single churn class ({side} churned), "
                f"so the model could not {cannot}; nothing was spent. The prepared store has "
                f"{churners:,} churners among {customers:,} customers (held out: "
                f"{HOLDOUT_FRACTION:.0%}, chosen by a hash of each pseudonym); check the label's "
                "true_values / false_values, or train on more customers"
            )

    def tree_schedule(self, settings: TreeSettings, *, seed: int) -> TreeSchedule:
        """The public schedule of a DP tree run on this layout (candidates fixed by it)."""
        bins, groups = tree_grid(self.feature_layout, settings.bins)
        return TreeSchedule(settings, bins, groups, seed)

    def binned_train(self, schedule: TreeSchedule) -> np.ndarray:
        """The training customers' bins under ``schedule``'s candidates."""
        return digitize(self.x_train, np.asarray(schedule.bins))

    def _scores(self, arrays: Sequence[np.ndarray], model: ChurnModelKind) -> np.ndarray:
        if model is ChurnModelKind.TREES:
            return TreeEnsemble.from_arrays(arrays).predict_proba(self.x_test)
        net = arrays_to_model(build_churn_model(model, self.input_dim), arrays)
        return predict_proba(net, self.x_test)

    def local_metrics(
        self, arrays: Sequence[np.ndarray], *, model: ChurnModelKind
    ) -> dict[str, float]:
        return {"auc": auc(self._scores(arrays, model), self.y_test)}

    def evaluation(
        self, arrays: Sequence[np.ndarray], *, model: ChurnModelKind
    ) -> EvaluationStatistics:
        pos, neg = score_histograms(
            self._scores(arrays, model), self.y_test, edges=EVALUATION_EDGES
        )
        return EvaluationStatistics(
            values={HIST_POSITIVE: pos, HIST_NEGATIVE: neg}, l2_sensitivity=1.0, integer=True
        )


def churn_data(store: PreparedStore, layout: FeatureLayout) -> ChurnData:
    customers = store.customers
    if customers is None or "churn" not in customers.columns:
        raise SchemaError(
            f"firm '{store.firm}': the prepared store has no churn label; declare a label column "
            "or set features.churn_cutoff"
        )
    test = holdout_mask(customers["customer_id"])
    x = layout.encode(customers)
    y = customers["churn"].to_numpy(dtype=np.float32)
    return ChurnData(layout, x[~test], y[~test], x[test], y[test])


class ChurnTask:
    """The churn task's definition (see :class:`fedcrm.tasks.base.Task`)."""

    kind = TaskKind.CHURN

    def firm_data(self, cfg: FirmConfig, store: PreparedStore, *, schema: str = "") -> ChurnData:
        """With a run's ``schema`` the firm encodes its customers with the run's public feature
        specs (matched by canonical column name); its own declared ranges and categories - which
        a starter config may have derived from its data - then shape nothing it sends."""
        layout = FeatureLayout.from_json(schema) if schema else layout_from_config(cfg)
        return churn_data(store, layout)

    def initial_arrays(
        self, *, model: ChurnModelKind, input_dim: int, seed: int
    ) -> list[np.ndarray]:
        return model_to_arrays(build_churn_model(model, input_dim, seed=seed))

    def pooled_metrics(self, statistics: Sequence[NoisyStatistics]) -> dict[str, float]:
        """The pooled held-out AUC from the firms' summed noisy score histograms (negative noisy
        counts clipped to 0 after summing) and ``auc_noise_sd``, the AUC's spread under noise of
        the firms' stated size (parametric bootstrap: post-processing of public values)."""
        hists = [s for s in statistics
                 if HIST_POSITIVE in s.values and HIST_NEGATIVE in s.values]
        if not hists:
            return {}
        pos = np.sum([np.asarray(h.values[HIST_POSITIVE]) for h in hists], axis=0)
        neg = np.sum([np.asarray(h.values[HIST_NEGATIVE]) for h in hists], axis=0)
        sd = float(np.sqrt(sum(h.noise_std**2 for h in hists)))

        def clipped_auc(p: np.ndarray, n: np.ndarray) -> float:
            return auc_from_histograms(np.clip(p, 0, None), np.clip(n, 0, None))

        value = clipped_auc(pos, neg)
        rng = np.random.default_rng(0)  # describes the noise; draws no DP noise
        draws = [clipped_auc(pos + rng.normal(0, sd, pos.shape), neg + rng.normal(0, sd, neg.shape))
                 for _ in range(_AUC_BOOTSTRAP)] if sd > 0 else [value]
        return {"auc": value, "auc_noise_sd": float(np.nanstd(draws)),
                "held_out": float(np.clip(pos, 0, None).sum() + np.clip(neg, 0, None).sum())}

    def save_model(
        self, path: Path, arrays: Sequence[np.ndarray], provenance: Mapping[str, Any]
    ) -> Path:
        kind = ChurnModelKind(provenance["kind"])
        if kind is ChurnModelKind.TREES:
            return save_trees(path, TreeEnsemble.from_arrays(arrays), provenance)
        net = arrays_to_model(build_churn_model(kind, int(provenance["input_dim"])), arrays)
        return save_model(path, net, provenance)


CHURN = ChurnTask()
