"""Privacy/utility curve on IBM Telco churn: test AUC of centralized DP-SGD churn models vs ε.

Trains as ``fedcrm train`` does with no ``[training]`` settings (:data:`LOCAL_TRAINING`: the
budget rule of :mod:`fedcrm.learning.settings` sizes each run from n and ε), with the fixed
feature layout (blank ``total_charges`` zero-filled) and the fixed ``telco_is_test`` split;
reports mean ± std over seeds next to the non-DP model (5 epochs, batch 256, Adam at 0.05) and
scikit-learn's (C=1) logistic regression as an independent reference.

Run: ``python benchmarks/telco_utility.py [--seeds 5]``; writes
``benchmarks/results/telco_utility.json``.
"""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from fedcrm.data.encoding import layout_from_declared
from fedcrm.learning.dp_engine import plan_for_budget, train_dp, train_non_dp
from fedcrm.learning.models import (
    ChurnModelKind,
    build_churn_model,
    churn_per_sample_loss,
    predict_proba,
)
from fedcrm.learning.settings import LOCAL_TRAINING
from fedcrm.simulations.datasets import (
    TELCO_BOOLEAN,
    TELCO_CATEGORICAL,
    TELCO_NUMERIC,
    load_telco,
    telco_is_test,
)

RESULTS = Path(__file__).parent / "results" / "telco_utility.json"
NON_DP_EPOCHS, NON_DP_BATCH, NON_DP_LEARNING_RATE = 5.0, 256, 0.05


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epsilons", type=float, nargs="+",
                        default=[0.25, 0.5, 1.0, 2.0, 4.0, 8.0])
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    warnings.simplefilter("ignore", UserWarning)

    df = load_telco()
    layout = layout_from_declared(TELCO_CATEGORICAL, TELCO_BOOLEAN, TELCO_NUMERIC)
    X = torch.from_numpy(layout.encode(df))
    y = torch.from_numpy((df["churn"] == "Yes").to_numpy(dtype=np.float32))
    test = torch.from_numpy(telco_is_test(df["customer_id"]))
    Xtr, ytr, Xte, yte = X[~test], y[~test], X[test], y[test]
    sklearn_auc = float(roc_auc_score(
        yte, LogisticRegression(max_iter=5000).fit(Xtr, ytr).predict_proba(Xte)[:, 1]))

    rows: list[dict[str, Any]] = []
    for kind in (ChurnModelKind.LOGISTIC, ChurnModelKind.MLP):
        non_dp = []
        for seed in range(args.seeds):
            model = build_churn_model(kind, layout.dim, seed=seed)
            train_non_dp(model, Xtr, ytr, per_sample_loss=churn_per_sample_loss,
                         generator=torch.Generator().manual_seed(seed),
                         epochs=NON_DP_EPOCHS, batch_size=NON_DP_BATCH,
                         learning_rate=NON_DP_LEARNING_RATE, optimizer=LOCAL_TRAINING.optimizer)
            non_dp.append(float(roc_auc_score(yte, predict_proba(model, Xte))))
        rows.append({"model": kind.value, "epsilon": None, "auc_mean": float(np.mean(non_dp)),
                     "auc_std": float(np.std(non_dp)), "noise_multiplier": 0.0})
        for eps in args.epsilons:
            plan = plan_for_budget(
                n_examples=len(Xtr), target_epsilon=eps, delta=args.delta,
                epochs=LOCAL_TRAINING.epochs, batch_size=LOCAL_TRAINING.batch_size,
                learning_rate=LOCAL_TRAINING.learning_rate,
                max_grad_norm=LOCAL_TRAINING.max_grad_norm,
                hidden_layers=kind is ChurnModelKind.MLP)
            aucs = []
            for seed in range(args.seeds):
                model = build_churn_model(kind, layout.dim, seed=seed)
                train_dp(model, Xtr, ytr, per_sample_loss=churn_per_sample_loss, plan=plan,
                         generator=torch.Generator().manual_seed(seed),
                         optimizer=LOCAL_TRAINING.optimizer,
                         average_tail=LOCAL_TRAINING.average_tail)
                aucs.append(float(roc_auc_score(yte, predict_proba(model, Xte))))
            rows.append({"model": kind.value, "epsilon": eps, "auc_mean": float(np.mean(aucs)),
                         "auc_std": float(np.std(aucs)), "noise_multiplier": plan.noise_multiplier,
                         "steps": plan.steps, "sample_rate": plan.sample_rate,
                         "epochs": plan.epochs, "learning_rate": plan.learning_rate})

    print(f"Telco churn test AUC (δ={args.delta:g}, {args.seeds} seeds); sklearn LR "
          f"{sklearn_auc:.4f}")
    print(f"{'model':9} {'ε':>6} {'σ':>6} {'AUC':>7} {'±':>6}")
    for r in rows:
        eps = "none" if r["epsilon"] is None else f"{r['epsilon']:g}"
        print(f"{r['model']:9} {eps:>6} {r['noise_multiplier']:6.2f} {r['auc_mean']:7.4f} "
              f"{r['auc_std']:6.4f}")
    result = {
        "benchmark": "fedcrm DP churn models, privacy/utility on IBM Telco",
        "defaults": LOCAL_TRAINING.model_dump(mode="json"),
        "non_dp": {"epochs": NON_DP_EPOCHS, "batch_size": NON_DP_BATCH,
                   "learning_rate": NON_DP_LEARNING_RATE},
        "blank_total_charges_handling": "zero-filled by the fixed layout (no rows dropped)",
        "n_train": len(Xtr), "n_test": len(Xte), "layout_fingerprint": layout.fingerprint(),
        "sklearn_logistic_auc": sklearn_auc,
        "results": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
