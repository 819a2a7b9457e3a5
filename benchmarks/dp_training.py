"""DP-SGD engine benchmark on IBM Telco churn: stock Opacus vs fedcrm ``train_dp`` vs non-DP.

For each churn model (logistic regression, MLP), in ONE process and interleaved repeat by repeat
(so that machine noise hits all variants alike):

(a) the stock Opacus pattern: ``PrivacyEngine().make_private(module, optimizer, data_loader,
    noise_multiplier, max_grad_norm, poisson_sampling=True)`` over a ``TensorDataset`` DataLoader;
(b) fedcrm :func:`fedcrm.dp_engine.train_dp` with a seeded ``torch.Generator`` (reproducible);
(b') the same run with the production noise source, :func:`fedcrm.dp_engine.noise_generator`
    (ChaCha20 keystream, ``fedcrm.privacy.noise.SecureRandom``): same model, data and plan,
    ``--noise-pairs`` seeded/secure pairs per repeat in alternating order; the ratio of their
    medians is the CSPRNG overhead (target ≤ 1.10), and the noise draws alone are timed too;
(c) fedcrm :func:`fedcrm.dp_engine.train_non_dp` (no privacy).

Same model, same optimizer, learning rate, clip, epochs and batch size; (a) and (b) use the same
noise multiplier, calibrated once by :func:`fedcrm.dp_engine.plan_for_budget` for (ε, δ) and the
whole plan, and run the same number of steps. Opacus derives its sampling rate as
``1 / len(data_loader)`` (slightly below ``batch_size / n`` when ``n`` is not a multiple of the
batch size); the JSON records both.

Data: features from the fixed layout of ``simulations.datasets`` declarations (never fitted on
data); the 11 blank ``total_charges`` (all tenure-0 customers) are ZERO-FILLED by the layout (no
rows dropped). Training on non-test rows, AUC on ``telco_is_test`` rows.

Run: ``python benchmarks/dp_training.py [--repeats 10] [--noise-pairs 3] [--epsilon 1]
[--delta 1e-5]`` (not
``-m``: a third-party wheel installs a top-level ``benchmarks`` package);
writes ``benchmarks/results/dp_training.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from torch import Tensor, nn

from fedcrm.data.encoding import layout_from_declared
from fedcrm.learning.dp_engine import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_EPOCHS,
    DEFAULT_LEARNING_RATE,
    DEFAULT_MAX_GRAD_NORM,
    DEFAULT_OPTIMIZER,
    DpOptimizer,
    DpPlan,
    NoiseSource,
    SeededNoise,
    noise_generator,
    plan_for_budget,
    poisson_batches,
    train_dp,
    train_non_dp,
)
from fedcrm.learning.models import (
    ChurnModelKind,
    build_churn_model,
    churn_per_sample_loss,
    predict_proba,
)
from fedcrm.simulations.datasets import (
    TELCO_BOOLEAN,
    TELCO_CATEGORICAL,
    TELCO_NUMERIC,
    load_telco,
    telco_is_test,
)

RESULTS = Path(__file__).parent / "results" / "dp_training.json"


def telco_tensors() -> dict[str, Any]:
    df = load_telco()
    layout = layout_from_declared(TELCO_CATEGORICAL, TELCO_BOOLEAN, TELCO_NUMERIC)
    X = torch.from_numpy(layout.encode(df))
    y = torch.from_numpy((df["churn"] == "Yes").to_numpy(dtype=np.float32))
    test = torch.from_numpy(telco_is_test(df["customer_id"]))
    return {
        "X_train": X[~test], "y_train": y[~test], "X_test": X[test], "y_test": y[test],
        "layout": layout, "blank_total_charges": int(df["total_charges"].isna().sum()),
    }


def _optimizer(kind: DpOptimizer, model: nn.Module, lr: float) -> torch.optim.Optimizer:
    if kind is DpOptimizer.ADAM:
        return torch.optim.Adam(model.parameters(), lr=lr)
    return torch.optim.SGD(model.parameters(), lr=lr)


def run_opacus(model: nn.Module, X: Tensor, y: Tensor, plan: DpPlan, batch_size: int,
               optimizer: DpOptimizer, seed: int) -> dict[str, Any]:
    """The stock Opacus pattern, stopped after ``plan.steps`` optimizer steps."""
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    # Opacus' Poisson sampler and noise use the global RNG (non-secure mode).
    torch.manual_seed(seed)
    opt = _optimizer(optimizer, model, plan.learning_rate)
    loader = DataLoader(TensorDataset(X, y), batch_size=batch_size)
    engine = PrivacyEngine(accountant="rdp")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module, dp_opt, dp_loader = engine.make_private(
            module=model, optimizer=opt, data_loader=loader,
            noise_multiplier=plan.noise_multiplier, max_grad_norm=plan.max_grad_norm,
            poisson_sampling=True,
        )
    steps = 0
    while steps < plan.steps:
        for xb, yb in dp_loader:
            dp_opt.zero_grad()
            if len(xb):
                loss = churn_per_sample_loss(module(xb), yb).mean()
                loss.backward()
            dp_opt.step()
            steps += 1
            if steps >= plan.steps:
                break
    return {"engine": engine, "module": module, "sample_rate": 1 / len(loader)}


def _timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def draw_noise_only(source: NoiseSource, n: int, plan: DpPlan, total: int) -> None:
    """Exactly the random draws of one ``train_dp`` run (sampling and noise), no training."""
    for _ in poisson_batches(n, plan.sample_rate, plan.steps, source):
        pass
    source.normal(total * plan.steps, dtype=torch.float32)


def bench_kind(kind: ChurnModelKind, data: dict[str, Any], *, epsilon: float, delta: float,
               epochs: float, batch_size: int, lr: float, clip: float, optimizer: DpOptimizer,
               repeats: int, noise_pairs: int) -> dict[str, Any]:
    X, y, Xt, yt = data["X_train"], data["y_train"], data["X_test"], data["y_test"]
    dim = data["layout"].dim
    plan = plan_for_budget(n_examples=len(X), target_epsilon=epsilon, delta=delta, epochs=epochs,
                           batch_size=batch_size, max_grad_norm=clip, learning_rate=lr)
    variants = ("opacus", "fedcrm_dp", "fedcrm_dp_secure", "non_dp")
    times: dict[str, list[float]] = {k: [] for k in variants}
    aucs: dict[str, list[float]] = {k: [] for k in variants}
    noise_only: dict[str, list[float]] = {"seeded": [], "secure": []}
    opacus_epsilon = float("nan")
    for r in range(repeats):
        seed = 1000 + r
        m_a = build_churn_model(kind, dim, seed=seed)
        t, out = _timed(partial(run_opacus, m_a, X, y, plan, batch_size, optimizer, seed))
        times["opacus"].append(t)
        aucs["opacus"].append(float(roc_auc_score(yt, predict_proba(out["module"], Xt))))
        if r == 0:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                opacus_epsilon = float(out["engine"].get_epsilon(delta))
            opacus_rate = out["sample_rate"]

        # (b) seeded and (b') secure, side by side, alternating which goes first.
        source: NoiseSource
        for k in range(noise_pairs):
            order = ("fedcrm_dp", "fedcrm_dp_secure")
            for variant in order if (r + k) % 2 == 0 else order[::-1]:
                m_b = build_churn_model(kind, dim, seed=seed)
                source = (SeededNoise(torch.Generator().manual_seed(seed))
                          if variant == "fedcrm_dp" else noise_generator())
                t, _ = _timed(partial(train_dp, m_b, X, y, per_sample_loss=churn_per_sample_loss,
                                      plan=plan, generator=source, optimizer=optimizer))
                times[variant].append(t)
                if k == 0:
                    aucs[variant].append(float(roc_auc_score(yt, predict_proba(m_b, Xt))))
        total = sum(p.numel() for p in build_churn_model(kind, dim, seed=seed).parameters())
        sources: dict[str, NoiseSource] = {
            "seeded": SeededNoise(torch.Generator().manual_seed(seed)), "secure": noise_generator()}
        for label, source in sources.items():
            t, _ = _timed(partial(draw_noise_only, source, len(X), plan, total))
            noise_only[label].append(t)

        m_c = build_churn_model(kind, dim, seed=seed)
        gen = torch.Generator().manual_seed(seed)
        t, _ = _timed(partial(train_non_dp, m_c, X, y, per_sample_loss=churn_per_sample_loss,
                              epochs=epochs, batch_size=batch_size, learning_rate=lr,
                              generator=gen, optimizer=optimizer))
        times["non_dp"].append(t)
        aucs["non_dp"].append(float(roc_auc_score(yt, predict_proba(m_c, Xt))))

    med = {k: statistics.median(v) for k, v in times.items()}
    mean_auc = {k: float(np.mean(v)) for k, v in aucs.items()}
    paired = [s / t for s, t in zip(times["fedcrm_dp_secure"], times["fedcrm_dp"], strict=True)]
    noise_med = {k: statistics.median(v) for k, v in noise_only.items()}
    return {
        "model": kind.value,
        "plan": asdict(plan),
        "plan_epsilon": plan.epsilon(),
        "opacus_sample_rate": opacus_rate,
        "opacus_epsilon_own_accountant": opacus_epsilon,
        "hyperparameters": {"epochs": epochs, "batch_size": batch_size, "learning_rate": lr,
                            "max_grad_norm": clip, "optimizer": optimizer.value},
        "seconds_median": med,
        "seconds_all": times,
        "auc_mean": mean_auc,
        "auc_all": aucs,
        "speedup_opacus_over_fedcrm_dp": med["opacus"] / med["fedcrm_dp"],
        "slowdown_fedcrm_dp_over_non_dp": med["fedcrm_dp"] / med["non_dp"],
        "auc_gap_fedcrm_minus_opacus": mean_auc["fedcrm_dp"] - mean_auc["opacus"],
        "csprng_overhead": {
            "ratio_of_medians_secure_over_seeded": med["fedcrm_dp_secure"] / med["fedcrm_dp"],
            "median_of_paired_ratios": statistics.median(paired),
            "runs_per_variant": len(paired),
            "noise_draws_only_seconds_median": noise_med,
            "noise_draws_share_of_seeded_run": {
                k: v / med["fedcrm_dp"] for k, v in noise_med.items()},
            "secure_source": "fedcrm.learning.dp_engine.noise_generator() (ChaCha20 keystream)",
            "seeded_source": "SeededNoise(torch.Generator().manual_seed(seed)) (Mersenne Twister)",
        },
    }


def machine_info() -> dict[str, Any]:
    import opacus
    import sklearn

    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "opacus": opacus.__version__,
        "sklearn": sklearn.__version__,
        "note": "shared machine (other jobs running); compare ratios within this run only",
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epsilon", type=float, default=1.0)
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--epochs", type=float, default=DEFAULT_EPOCHS)
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE)
    parser.add_argument("--lr", type=float, default=DEFAULT_LEARNING_RATE)
    parser.add_argument("--clip", type=float, default=DEFAULT_MAX_GRAD_NORM)
    parser.add_argument("--optimizer", type=DpOptimizer, default=DEFAULT_OPTIMIZER)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--noise-pairs", type=int, default=3,
                        help="seeded/secure fedcrm DP runs per repeat (CSPRNG overhead)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    # Opacus' "secure RNG off", hook and accountant-order warnings are expected in a benchmark.
    warnings.simplefilter("ignore", UserWarning)

    data = telco_tensors()
    rows = [
        bench_kind(kind, data, epsilon=args.epsilon, delta=args.delta, epochs=args.epochs,
                   batch_size=args.batch_size, lr=args.lr, clip=args.clip,
                   optimizer=args.optimizer, repeats=args.repeats, noise_pairs=args.noise_pairs)
        for kind in (ChurnModelKind.LOGISTIC, ChurnModelKind.MLP)
    ]
    targets = {
        "logistic_speedup_vs_opacus_min": 5.0,
        "mlp_speedup_vs_opacus_min": 3.0,
        "dp_over_non_dp_max": 1.5,
        "auc_gap_vs_opacus_max": 0.005,
        "dp_logistic_auc_min": 0.84,
        "csprng_overhead_max": 1.10,
    }
    by = {r["model"]: r for r in rows}
    met = {
        "logistic_speedup": by["logistic"]["speedup_opacus_over_fedcrm_dp"] >= 5.0,
        "mlp_speedup": by["mlp"]["speedup_opacus_over_fedcrm_dp"] >= 3.0,
        "dp_over_non_dp": all(r["slowdown_fedcrm_dp_over_non_dp"] <= 1.5 for r in rows),
        "auc_gap": all(abs(r["auc_gap_fedcrm_minus_opacus"]) <= 0.005 for r in rows),
        "dp_logistic_auc": by["logistic"]["auc_mean"]["fedcrm_dp"] >= 0.84,
        "csprng_overhead": all(
            r["csprng_overhead"]["ratio_of_medians_secure_over_seeded"] <= 1.10 for r in rows),
    }
    result = {
        "benchmark": "fedcrm DP-SGD engine vs stock Opacus vs non-DP, IBM Telco churn",
        "dataset": {
            "n_train": len(data["X_train"]), "n_test": len(data["X_test"]),
            "features": data["layout"].dim, "layout_fingerprint": data["layout"].fingerprint(),
            "blank_total_charges": data["blank_total_charges"],
            "blank_total_charges_handling": "zero-filled by the fixed layout (no rows dropped)",
        },
        "privacy": {"epsilon": args.epsilon, "delta": args.delta},
        "repeats": args.repeats,
        "noise_pairs": args.noise_pairs,
        "machine": machine_info(),
        "results": rows,
        "targets": targets,
        "targets_met": met,
    }
    print(f"Telco churn, ε={args.epsilon:g}, δ={args.delta:g}, {args.repeats} repeats "
          f"({args.noise_pairs} seeded/secure fedcrm DP pairs each), {torch.get_num_threads()} "
          "thread(s); seconds are medians; fedcrm = seeded torch generator, secure = ChaCha20")
    header = (f"{'model':9} {'opacus s':>9} {'fedcrm s':>9} {'secure s':>9} {'nonDP s':>8} "
              f"{'a/b':>6} {'b/c':>5} {'sec/b':>6} {'paired':>6} "
              f"{'AUC opacus':>10} {'AUC fedcrm':>10} {'AUC secure':>10} {'AUC nonDP':>9}")
    print(header)
    print("-" * len(header))
    for r in rows:
        s, a, o = r["seconds_median"], r["auc_mean"], r["csprng_overhead"]
        print(f"{r['model']:9} {s['opacus']:9.3f} {s['fedcrm_dp']:9.3f} "
              f"{s['fedcrm_dp_secure']:9.3f} {s['non_dp']:8.3f} "
              f"{r['speedup_opacus_over_fedcrm_dp']:6.1f} "
              f"{r['slowdown_fedcrm_dp_over_non_dp']:5.2f} "
              f"{o['ratio_of_medians_secure_over_seeded']:6.3f} "
              f"{o['median_of_paired_ratios']:6.3f} "
              f"{a['opacus']:10.4f} {a['fedcrm_dp']:10.4f} {a['fedcrm_dp_secure']:10.4f} "
              f"{a['non_dp']:9.4f}")
    for r in rows:
        nd = r["csprng_overhead"]["noise_draws_only_seconds_median"]
        print(f"{r['model']}: the random draws of one run alone take {nd['seeded'] * 1e3:.2f} ms "
              f"(seeded) vs {nd['secure'] * 1e3:.2f} ms (ChaCha20)")
    print("targets met:", json.dumps(met))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
