"""Churn scoring on the firm's own machine: the early-warning list.

``score_customers`` scores every customer of the firm's store with a saved churn model:
pseudonymous id, churn probability, risk band and RFM segment, highest risk first. Nothing of it
leaves the firm, and scoring releases nothing, so it spends no budget.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from fedcrm.data.contract import FirmConfig
from fedcrm.data.store import load_store
from fedcrm.learning.models import load_churn_predictor
from fedcrm.privacy.errors import ConfigError
from fedcrm.privacy.keys import FirmKeys, load_keys
from fedcrm.tasks.churn import layout_from_config

RISK_BANDS = ((0.5, "high"), (0.25, "medium"), (0.0, "low"))


def risk_band(p: np.ndarray) -> np.ndarray:
    bands = np.full(len(p), RISK_BANDS[-1][1], dtype=object)
    for threshold, name in reversed(RISK_BANDS):
        bands[p >= threshold] = name
    return bands


def score_customers(
    cfg: FirmConfig, *, model_path: Path, keys: FirmKeys | None = None
) -> pd.DataFrame:
    """The churn early-warning list for the firm's own customers, sorted by risk."""
    keys = keys or load_keys(cfg.firm.keys_dir)
    keys.require_signing_key(cfg.firm.keys_dir)  # fail closed, like every firm command
    predict, provenance = load_churn_predictor(model_path)
    layout = layout_from_config(cfg)
    if provenance.get("layout_fingerprint") != layout.fingerprint():
        raise ConfigError(
            f"model {model_path} was trained on feature layout "
            f"{str(provenance.get('layout_fingerprint'))[:12]}..., this firm's config declares "
            f"{layout.fingerprint()[:12]}...; use a model trained for this schema"
        )
    store = load_store(cfg.prepared_dir, keys=keys)
    customers = store.customers
    if customers is None:
        raise ConfigError(f"firm '{cfg.firm.name}' has no customers table to score")
    p = predict(layout.encode(customers))
    out = pd.DataFrame(
        {
            "customer_id": customers["customer_id"].to_numpy(),
            "churn_probability": np.round(p, 6),
            "risk_band": risk_band(p),
        }
    )
    feats = store.features
    if "segment" in feats.columns:
        seg = (
            feats.set_index("customer_id")["segment"]
            if "customer_id" in feats.columns
            else feats["segment"]
        )
        out["segment"] = out["customer_id"].map(seg.astype(str)).fillna("unknown")
    return out.sort_values("churn_probability", ascending=False, kind="stable").reset_index(
        drop=True
    )
