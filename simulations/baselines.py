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

from fedcrm.data.contract import load_firm_config
from fedcrm.data.store import load_store
from fedcrm.learning.metrics import auc
from fedcrm.privacy.keys import load_keys
from fedcrm.tasks.churn import churn_data, layout_from_config


class _Firm(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def config(self) -> Path: ...


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
        from fedcrm.learning.models import load_churn_predictor

        predict, _ = load_churn_predictor(model_path)
        out["federated_auc_exact"] = auc(predict(x_test), y_test)
        out["federated_auc_per_firm_exact"] = {
            f.name: auc(predict(d.x_test), d.y_test)
            for f, d in zip(firms, data, strict=True)
        }
    return out


def _bgnbd_weekly(cal: Any, customers: Any, calibration_end: Any, weeks: int) -> np.ndarray:
    import warnings

    from lifetimes import BetaGeoFitter
    from lifetimes.utils import summary_data_from_transaction_data

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        summary = summary_data_from_transaction_data(
            cal,
            "customer_id",
            "timestamp",
            observation_period_end=calibration_end,
            freq="D",
        ).reindex(customers)
        fitter = BetaGeoFitter(penalizer_coef=0.0)
        fitter.fit(summary["frequency"], summary["recency"], summary["T"])
        cum = np.stack(
            [
                np.asarray(
                    fitter.conditional_expected_number_of_purchases_up_to_time(
                        7.0 * k, summary["frequency"], summary["recency"], summary["T"]
                    ),
                    dtype=np.float64,
                )
                for k in range(1, weeks + 1)
            ],
            axis=1,
        )
    return np.diff(np.concatenate([np.zeros((len(customers), 1)), cum], axis=1), axis=1)


def trend_baselines(firms: Sequence[_Firm], model_path: Path | None) -> dict[str, Any]:
    """BG/NBD (lifetimes, daily) fitted on the pooled calibration data, same holdout weeks, and
    the saved federated model evaluated exactly on every firm's customers.

    This is the simulation's privileged view (it holds every firm's keys), for benchmarking
    only: the federation itself sees the firms' DP evaluation statistics (the run's pooled
    metrics). Both report the curve's cumulative error and the ranking metrics, the repeat-buyer
    AUC and the top-20% capture (:func:`fedcrm.learning.trend_model.evaluate_holdout`).
    """
    import pandas as pd

    from fedcrm.learning.trend_model import evaluate_holdout, forecast
    from fedcrm.tasks.trend import firm_trend_data, load_trend_model

    txs, datas = [], []
    for f in firms:
        cfg = load_firm_config(f.config)
        store = load_store(cfg.prepared_dir, keys=load_keys(cfg.firm.keys_dir))
        assert store.transactions is not None
        txs.append(store.transactions)
        datas.append(firm_trend_data(store, cfg))
    tx = pd.concat(txs, ignore_index=True)
    calibration_end = datas[0].calibration_end
    weeks = min(d.holdout_weeks for d in datas)
    from fedcrm.learning.trend_model import trend_features

    cal = tx[tx["timestamp"] <= calibration_end]
    _, customers = trend_features(cal, as_of=calibration_end)
    actual = np.concatenate([d.actual[:, :weeks] for d in datas])
    bg = _bgnbd_weekly(cal, customers, calibration_end, weeks)
    # the firms' customer order: concatenate per firm; reorder BG/NBD rows to match
    order = pd.Index(customers)
    firm_customers = []
    for f in firms:
        cfg = load_firm_config(f.config)
        store = load_store(cfg.prepared_dir, keys=load_keys(cfg.firm.keys_dir))
        assert store.transactions is not None
        c = store.transactions[store.transactions["timestamp"] <= calibration_end]
        firm_customers.append(trend_features(c, as_of=calibration_end)[1])
    idx = order.get_indexer(pd.Index(np.concatenate([np.asarray(c) for c in firm_customers])))
    out: dict[str, Any] = {
        "bgnbd": evaluate_holdout(bg[idx], actual),
        "holdout_weeks": weeks,
        "bgnbd_model": "BG/NBD (lifetimes BetaGeoFitter, daily) on pooled calibration data",
    }
    if model_path is not None and model_path.exists():
        model, _ = load_trend_model(model_path)
        fed = np.concatenate([forecast(model, d.x_pred, weeks=weeks) for d in datas])
        out["federated"] = evaluate_holdout(fed, actual)
        fed, bgnbd = out["federated"], out["bgnbd"]
        out["federated_beats_bgnbd_cumulative"] = bool(
            fed["cumulative_error"] < bgnbd["cumulative_error"]
        )
        out["federated_beats_bgnbd_auc"] = bool(
            fed["repeat_buyer_auc"] > bgnbd["repeat_buyer_auc"]
        )
        out["federated_beats_bgnbd_capture"] = bool(
            fed["top20_capture"] > bgnbd["top20_capture"]
        )
    return out
