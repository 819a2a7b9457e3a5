"""A firm's local, centralized DP training and churn scoring (on the firm's machine only).

``train_local`` spends part of the firm's privacy budget (check, then commit, like a federated
round) and saves a provenance-stamped model. ``score_customers`` writes the churn early-warning
list: pseudonymous id, churn probability, risk band and RFM segment, highest risk first.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

import fedcrm
from fedcrm.data.contract import FirmConfig
from fedcrm.data.store import load_store
from fedcrm.learning.dp_engine import plan_for_budget, train_dp
from fedcrm.learning.metrics import auc
from fedcrm.learning.models import (
    load_model,
    predict_proba,
    save_model,
)
from fedcrm.node import (
    MIN_USEFUL_FRACTION,
    FirmNode,
    Task,
    layout_from_config,
    noise_generator,
)
from fedcrm.privacy.errors import ConfigError, PlanDoesNotFit
from fedcrm.privacy.keys import FirmKeys, load_keys

RISK_BANDS = ((0.5, "high"), (0.25, "medium"), (0.0, "low"))


@dataclass(frozen=True)
class LocalTrainResult:
    model_path: Path
    task: Task
    epsilon_spent: float
    epsilon_total: float
    epsilon_cap: float
    noise_multiplier: float
    metrics: dict[str, float]
    seconds: float


def train_local(
    cfg: FirmConfig,
    *,
    out: Path,
    epsilon: float,
    task: Task = Task.CHURN,
    model_kind: str | None = None,
    keys: FirmKeys | None = None,
) -> LocalTrainResult:
    """Centralized DP training on this firm's own store, spending at most ``epsilon``."""
    started = time.perf_counter()
    torch.set_num_threads(1)
    keys = keys or load_keys(cfg.firm.keys_dir)
    node = FirmNode(cfg, keys)
    ledger = node.ledger
    t = cfg.training
    spent = ledger.spent()
    target_total = min(cfg.budget.epsilon, spent + epsilon)
    kind = (model_kind or t.model.value) if task is Task.CHURN else "trend"
    x, y, model, loss = node.training_problem(task, model_kind=kind, seed=t.seed)
    if target_total - spent < MIN_USEFUL_FRACTION * epsilon:
        raise PlanDoesNotFit(
            f"firm '{cfg.firm.name}' has spent ε={spent:.4f} of its cap "
            f"ε={cfg.budget.epsilon:.4f}; no useful budget is left for training (less than "
            f"{MIN_USEFUL_FRACTION:.0%} of the ε={epsilon:g} asked). Raising budget.epsilon is a "
            "governance decision"
        )
    plan = plan_for_budget(
        n_examples=len(y),
        target_epsilon=target_total,
        delta=cfg.budget.delta,
        epochs=t.epochs,
        batch_size=t.batch_size,
        max_grad_norm=t.max_grad_norm,
        learning_rate=t.learning_rate,
        rounds=1,
        prior_events=ledger.events,
    )
    event = plan.round_event(purpose=f"train:{task.value}:local", context={"task": task.value})
    ledger.check(event)
    generator = noise_generator()
    train_dp(
        model,
        torch.as_tensor(x),
        torch.as_tensor(y),
        per_sample_loss=loss,
        plan=plan,
        generator=generator,
        optimizer=t.optimizer,
    )
    ledger.commit(event)
    node.log_release(event)
    metrics: dict[str, float] = {}
    if task is Task.CHURN:
        data = node.churn()
        metrics["auc"] = auc(predict_proba(model, data.x_test), data.y_test)
        provenance = {
            "kind": kind,
            "input_dim": data.layout.dim,
            "layout_fingerprint": data.layout.fingerprint(),
            "firm": cfg.firm.name,
            "fedcrm_version": fedcrm.__version__,
            "config_sha256": cfg.config_sha256,
            "epsilon": ledger.spent(),
            "epsilon_release": float(event.epsilon),
            "delta": cfg.budget.delta,
            "noise_multiplier": plan.noise_multiplier,
            "metrics": metrics,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        save_model(out, model, provenance)
    else:
        from fedcrm.learning.models import model_to_arrays
        from fedcrm.tasks import trend as trend_task

        tdata = node.trend()
        metrics = trend_task.evaluate(tdata, model_to_arrays(model)).metrics
        trend_task.save_trend_model(
            out,
            model_to_arrays(model),
            {
                "firm": cfg.firm.name,
                "epsilon": ledger.spent(),
                "metrics": metrics,
                "input_dim": int(x.shape[1]),
                "layout_fingerprint": tdata.fingerprint,
            },
        )
    return LocalTrainResult(
        out,
        task,
        float(event.epsilon),
        ledger.spent(),
        cfg.budget.epsilon,
        plan.noise_multiplier,
        metrics,
        time.perf_counter() - started,
    )


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
    model, provenance = load_model(model_path)
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
    p = predict_proba(model, layout.encode(customers))
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
