"""Centralized baselines for simulations, on the pooled prepared data of all simulated firms.

Only a simulation can do this (it holds every firm's keys); in a real federation nobody can.
The baselines use exactly the features and held-out customers the federation used.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from sklearn.linear_model import LogisticRegression

from fedcrm.config import load_firm_config
from fedcrm.federation import churn_data, layout_from_config
from fedcrm.metrics import auc
from fedcrm.store import load_store
from privacy.keys import load_keys


class _Firm(Protocol):
    name: str
    config: Path


def _firm_churn(firm: _Firm) -> Any:
    cfg = load_firm_config(firm.config)
    store = load_store(cfg.prepared_dir, keys=load_keys(cfg.firm.keys_dir))
    return churn_data(store, layout_from_config(cfg))


def churn_baselines(firms: Sequence[_Firm], model_path: Path | None) -> dict[str, Any]:
    data = [_firm_churn(f) for f in firms]
    x_train = np.concatenate([d.x_train for d in data])
    y_train = np.concatenate([d.y_train for d in data])
    x_test = np.concatenate([d.x_test for d in data])
    y_test = np.concatenate([d.y_test for d in data])
    clf = LogisticRegression(max_iter=2000, C=1.0)
    clf.fit(x_train, y_train)
    out: dict[str, Any] = {
        "centralized_auc": auc(clf.predict_proba(x_test)[:, 1], y_test),
        "centralized_model": "non-DP logistic regression (scikit-learn, C=1) on pooled train split",
        "test_customers": len(y_test),
        "train_customers": len(y_train),
    }
    if model_path is not None and model_path.exists():
        from fedcrm.models import load_model, predict_proba

        model, _ = load_model(model_path)
        out["federated_auc_exact"] = auc(predict_proba(model, x_test), y_test)
        out["federated_auc_per_firm_exact"] = {
            f.name: auc(predict_proba(model, d.x_test), d.y_test) for f, d in zip(firms, data, strict=True)
        }
    return out


def trend_baselines(firms: Sequence[_Firm], model_path: Path | None) -> dict[str, Any]:
    from fedcrm.trend_task import bgnbd_baseline

    return bgnbd_baseline(firms, model_path)
