"""DP-SGD engine benchmark: stock Opacus and Opacus ghost clipping vs fedcrm ``train_dp`` vs non-DP.

Two cases, each for both churn models (logistic regression, MLP), measured in ONE process and
interleaved repeat by repeat (so that machine noise hits all variants alike):

* ``telco`` - IBM Telco churn (5,653 training customers x 50 features), ε = 1, δ = 1e-5, MLP
  with 32 hidden units; 5 epochs at batch 256, Adam at 0.05 (the hyperparameters this case has
  always used, kept fixed so that its ratios compare across versions; ``fedcrm train`` itself now
  sizes its runs by the budget rule of ``fedcrm.learning.settings``);
* ``scale`` - 200,000 synthetic customers x 64 features (uniform on [0, 1], outcome from a fixed
  random logistic model), ONE epoch at batch 4,096, ε = 1, δ = 1e-6 (δ must stay below 1/n),
  MLP with 128 hidden units: a firm with hundreds of thousands of customers.

Variants, all with the same model, optimizer, learning rate, clip, plan and number of steps:

(a) the stock Opacus pattern: ``PrivacyEngine().make_private(module, optimizer, data_loader,
    noise_multiplier, max_grad_norm, poisson_sampling=True)`` over a ``TensorDataset`` DataLoader;
(a') the same with ``grad_sample_mode="ghost"`` (Opacus' fast gradient clipping, with
    ``BCEWithLogitsLoss`` as the criterion it wraps);
(b) fedcrm :func:`fedcrm.learning.dp_engine.train_dp` with a seeded ``torch.Generator``;
(b') the same run with the production noise source,
    :func:`fedcrm.learning.dp_engine.noise_generator`
    (ChaCha20 keystream): ``--noise-pairs`` seeded/secure pairs per repeat in alternating order;
    the ratio of their medians is the CSPRNG overhead (target ≤ 1.10), and the random draws alone
    are timed too;
(c) fedcrm :func:`fedcrm.learning.dp_engine.train_non_dp` (no privacy).

(a) and (b) use the same noise multiplier, calibrated once by
:func:`fedcrm.learning.dp_engine.plan_for_budget`; Opacus derives its sampling rate as
``1 / len(data_loader)`` (slightly below ``batch_size / n`` when ``n`` is not a multiple of the
batch size); the JSON records both.

Time is measured twice per run: wall clock (``perf_counter``) and the CPU time of the training
thread (``thread_time``; torch runs single-threaded here, so that is all the work). On a machine
shared with other jobs the wall clock mostly measures the scheduler; the CPU time is the fairer
measure there, and the ratios quoted first are CPU-time ratios. Both are in the JSON.

Telco data: features from the fixed layout of ``simulations.datasets`` declarations (never
fitted on data); the 11 blank ``total_charges`` (all tenure-0 customers) are ZERO-FILLED by the
layout. Training on non-test rows, AUC on ``telco_is_test`` rows; the scale case's AUC is on
20,000 further synthetic customers from the same model.

Run: ``python benchmarks/dp_training.py [--cases telco scale] [--repeats 10] [--scale-repeats 3]
[--noise-pairs 3]`` (not ``-m``: a third-party wheel installs a top-level ``benchmarks``
package); writes ``benchmarks/results/dp_training.json``.
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
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from torch import Tensor, nn

from fedcrm.data.encoding import layout_from_declared
from fedcrm.learning.dp_engine import (
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
VARIANTS = ("opacus", "opacus_ghost", "fedcrm_dp", "fedcrm_dp_secure", "non_dp")


@dataclass(frozen=True)
class Case:
    """One benchmark case: data and the one plan every variant runs."""

    name: str
    description: str
    epsilon: float
    delta: float
    epochs: float
    batch_size: int
    learning_rate: float
    max_grad_norm: float
    optimizer: DpOptimizer
    mlp_hidden: int
    repeats: int


def telco_tensors() -> dict[str, Any]:
    df = load_telco()
    layout = layout_from_declared(TELCO_CATEGORICAL, TELCO_BOOLEAN, TELCO_NUMERIC)
    X = torch.from_numpy(layout.encode(df))
    y = torch.from_numpy((df["churn"] == "Yes").to_numpy(dtype=np.float32))
    test = torch.from_numpy(telco_is_test(df["customer_id"]))
    return {
        "X_train": X[~test], "y_train": y[~test], "X_test": X[test], "y_test": y[test],
        "info": {"layout_fingerprint": layout.fingerprint(),
                 "blank_total_charges": int(df["total_charges"].isna().sum()),
                 "blank_total_charges_handling": "zero-filled by the fixed layout"},
    }


def synthetic_tensors(n: int = 200_000, d: int = 64, n_test: int = 20_000,
                      seed: int = 0) -> dict[str, Any]:
    """``n`` + ``n_test`` synthetic customers: features uniform on [0, 1] (as declared ranges
    scale them), churn ~ Bernoulli(sigmoid(w·(x - 0.5))) with ``w ~ N(0, 1)``, all seeded."""
    gen = torch.Generator().manual_seed(seed)
    X = torch.rand(n + n_test, d, generator=gen)
    w = torch.randn(d, generator=gen)
    y = (torch.rand(n + n_test, generator=gen) < torch.sigmoid((X - 0.5) @ w)).float()
    return {"X_train": X[:n].contiguous(), "y_train": y[:n].contiguous(),
            "X_test": X[n:], "y_test": y[n:],
            "info": {"generator": "torch.Generator().manual_seed(0); x ~ U[0,1]^d, "
                                  "y ~ Bernoulli(sigmoid(w·(x-0.5))), w ~ N(0, I)"}}


def _optimizer(kind: DpOptimizer, model: nn.Module, lr: float) -> torch.optim.Optimizer:
    if kind is DpOptimizer.ADAM:
        return torch.optim.Adam(model.parameters(), lr=lr)
    return torch.optim.SGD(model.parameters(), lr=lr)


def run_opacus(model: nn.Module, X: Tensor, y: Tensor, plan: DpPlan, batch_size: int,
               optimizer: DpOptimizer, seed: int, *, ghost: bool = False) -> dict[str, Any]:
    """The stock Opacus pattern (or its ghost-clipping mode), stopped after ``plan.steps``
    optimizer steps."""
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    # Opacus' Poisson sampler and noise use the global RNG (non-secure mode).
    torch.manual_seed(seed)
    opt = _optimizer(optimizer, model, plan.learning_rate)
    loader = DataLoader(TensorDataset(X, y.unsqueeze(1) if ghost else y), batch_size=batch_size)
    engine = PrivacyEngine(accountant="rdp")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if ghost:
            module, dp_opt, criterion, dp_loader = engine.make_private(
                module=model, optimizer=opt, data_loader=loader,
                criterion=nn.BCEWithLogitsLoss(), noise_multiplier=plan.noise_multiplier,
                max_grad_norm=plan.max_grad_norm, poisson_sampling=True,
                grad_sample_mode="ghost",
            )
        else:
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
                if ghost:
                    criterion(module(xb), yb).backward()
                else:
                    churn_per_sample_loss(module(xb), yb).mean().backward()
            dp_opt.step()
            steps += 1
            if steps >= plan.steps:
                break
    return {"engine": engine, "module": module, "sample_rate": 1 / len(loader)}


def _timed(fn: Callable[[], Any]) -> tuple[float, float, Any]:
    """``(wall seconds, CPU seconds of this thread, result)``."""
    wall, cpu = time.perf_counter(), time.thread_time()
    out = fn()
    return time.perf_counter() - wall, time.thread_time() - cpu, out


def draw_noise_only(source: NoiseSource, n: int, plan: DpPlan, total: int) -> None:
    """Exactly the random draws of one ``train_dp`` run (sampling and noise), no training."""
    for _ in poisson_batches(n, plan.sample_rate, plan.steps, source):
        pass
    source.normal(total * plan.steps, dtype=torch.float32)


def _auc(y: Tensor, model: nn.Module, X: Tensor) -> float:
    return float(roc_auc_score(y.numpy(), predict_proba(model, X)))


def bench_kind(kind: ChurnModelKind, case: Case, data: dict[str, Any], *,
               noise_pairs: int) -> dict[str, Any]:
    X, y, Xt, yt = data["X_train"], data["y_train"], data["X_test"], data["y_test"]
    dim = X.shape[1]
    hidden = case.mlp_hidden
    plan = plan_for_budget(n_examples=len(X), target_epsilon=case.epsilon, delta=case.delta,
                           epochs=case.epochs, batch_size=case.batch_size,
                           max_grad_norm=case.max_grad_norm, learning_rate=case.learning_rate)
    wall: dict[str, list[float]] = {k: [] for k in VARIANTS}
    cpu: dict[str, list[float]] = {k: [] for k in VARIANTS}
    aucs: dict[str, list[float]] = {k: [] for k in VARIANTS}
    noise_only: dict[str, list[float]] = {"seeded": [], "secure": []}
    opacus_epsilon = float("nan")
    opacus_rate = float("nan")

    def record(variant: str, timing: tuple[float, float, Any]) -> Any:
        wall[variant].append(timing[0])
        cpu[variant].append(timing[1])
        return timing[2]

    def model(seed: int) -> nn.Module:
        return build_churn_model(kind, dim, hidden=hidden, seed=seed)

    for r in range(case.repeats):
        seed = 1000 + r
        for variant, ghost in (("opacus", False), ("opacus_ghost", True)):
            m = model(seed)
            out = record(variant, _timed(partial(run_opacus, m, X, y, plan, case.batch_size,
                                                 case.optimizer, seed, ghost=ghost)))
            aucs[variant].append(_auc(yt, out["module"], Xt))
            if r == 0 and not ghost:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    opacus_epsilon = float(out["engine"].get_epsilon(case.delta))
                opacus_rate = out["sample_rate"]

        # (b) seeded and (b') secure, side by side, alternating which goes first.
        source: NoiseSource
        for k in range(noise_pairs):
            order = ("fedcrm_dp", "fedcrm_dp_secure")
            for variant in order if (r + k) % 2 == 0 else order[::-1]:
                m = model(seed)
                source = (SeededNoise(torch.Generator().manual_seed(seed))
                          if variant == "fedcrm_dp" else noise_generator())
                record(variant, _timed(partial(
                    train_dp, m, X, y, per_sample_loss=churn_per_sample_loss, plan=plan,
                    generator=source, optimizer=case.optimizer)))
                if k == 0:
                    aucs[variant].append(_auc(yt, m, Xt))
        total = sum(p.numel() for p in model(seed).parameters())
        sources: dict[str, NoiseSource] = {
            "seeded": SeededNoise(torch.Generator().manual_seed(seed)), "secure": noise_generator()}
        for label, source in sources.items():
            noise_only[label].append(_timed(partial(draw_noise_only, source, len(X), plan,
                                                    total))[1])

        m = model(seed)
        record("non_dp", _timed(partial(
            train_non_dp, m, X, y, per_sample_loss=churn_per_sample_loss, epochs=case.epochs,
            batch_size=case.batch_size, learning_rate=case.learning_rate,
            generator=torch.Generator().manual_seed(seed), optimizer=case.optimizer)))
        aucs["non_dp"].append(_auc(yt, m, Xt))

    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    med_wall = {k: statistics.median(v) for k, v in wall.items()}
    mean_auc = {k: float(np.mean(v)) for k, v in aucs.items()}
    paired = [s / t for s, t in zip(cpu["fedcrm_dp_secure"], cpu["fedcrm_dp"], strict=True)]
    noise_med = {k: statistics.median(v) for k, v in noise_only.items()}

    def ratios(med: dict[str, float]) -> dict[str, float]:
        return {
            "opacus_over_fedcrm_dp": med["opacus"] / med["fedcrm_dp"],
            "opacus_ghost_over_fedcrm_dp": med["opacus_ghost"] / med["fedcrm_dp"],
            "fedcrm_dp_over_non_dp": med["fedcrm_dp"] / med["non_dp"],
            "fedcrm_dp_secure_over_non_dp": med["fedcrm_dp_secure"] / med["non_dp"],
            "secure_over_seeded": med["fedcrm_dp_secure"] / med["fedcrm_dp"],
        }

    return {
        "model": kind.value,
        "hidden": hidden if kind is ChurnModelKind.MLP else None,
        "plan": asdict(plan),
        "plan_epsilon": plan.epsilon(),
        "opacus_sample_rate": opacus_rate,
        "opacus_epsilon_own_accountant": opacus_epsilon,
        "cpu_seconds_median": med_cpu,
        "wall_seconds_median": med_wall,
        "cpu_seconds_all": cpu,
        "wall_seconds_all": wall,
        "ratios_cpu": ratios(med_cpu),
        "ratios_wall": ratios(med_wall),
        "auc_mean": mean_auc,
        "auc_all": aucs,
        "auc_gap_fedcrm_minus_opacus": mean_auc["fedcrm_dp"] - mean_auc["opacus"],
        "csprng_overhead": {
            "ratio_of_cpu_medians_secure_over_seeded": med_cpu["fedcrm_dp_secure"]
            / med_cpu["fedcrm_dp"],
            "median_of_paired_cpu_ratios": statistics.median(paired),
            "runs_per_variant": len(paired),
            "noise_draws_only_cpu_seconds_median": noise_med,
            "noise_draws_share_of_seeded_run": {
                k: v / med_cpu["fedcrm_dp"] for k, v in noise_med.items()},
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
        "load_average_at_start": os.getloadavg(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "opacus": opacus.__version__,
        "sklearn": sklearn.__version__,
        "note": "shared machine (other jobs running); compare ratios within this run only",
    }


def _print_case(case: Case, rows: list[dict[str, Any]], noise_pairs: int) -> None:
    print(f"\n{case.description}: ε={case.epsilon:g}, δ={case.delta:g}, {case.repeats} repeats "
          f"({noise_pairs} seeded/secure fedcrm DP pairs each), {torch.get_num_threads()} "
          "thread(s); CPU seconds of the training thread, medians; fedcrm = seeded torch "
          "generator, secure = ChaCha20")
    header = (f"{'model':9} {'opacus':>8} {'ghost':>8} {'fedcrm':>8} {'secure':>8} {'nonDP':>8} "
              f"{'op/b':>6} {'gh/b':>6} {'b/c':>5} {'sec/c':>5} {'sec/b':>6} "
              f"{'AUC opacus':>10} {'AUC ghost':>9} {'AUC fedcrm':>10} {'AUC secure':>10} "
              f"{'AUC nonDP':>9}")
    print(header)
    print("-" * len(header))
    for r in rows:
        s, a, q = r["cpu_seconds_median"], r["auc_mean"], r["ratios_cpu"]
        print(f"{r['model']:9} {s['opacus']:8.3f} {s['opacus_ghost']:8.3f} {s['fedcrm_dp']:8.3f} "
              f"{s['fedcrm_dp_secure']:8.3f} {s['non_dp']:8.3f} "
              f"{q['opacus_over_fedcrm_dp']:6.1f} {q['opacus_ghost_over_fedcrm_dp']:6.1f} "
              f"{q['fedcrm_dp_over_non_dp']:5.2f} {q['fedcrm_dp_secure_over_non_dp']:5.2f} "
              f"{q['secure_over_seeded']:6.3f} "
              f"{a['opacus']:10.4f} {a['opacus_ghost']:9.4f} {a['fedcrm_dp']:10.4f} "
              f"{a['fedcrm_dp_secure']:10.4f} {a['non_dp']:9.4f}")
    for r in rows:
        w = r["ratios_wall"]
        nd = r["csprng_overhead"]["noise_draws_only_cpu_seconds_median"]
        print(f"{r['model']}: wall-clock ratios op/b {w['opacus_over_fedcrm_dp']:.1f}, gh/b "
              f"{w['opacus_ghost_over_fedcrm_dp']:.1f}, b/c {w['fedcrm_dp_over_non_dp']:.2f}, "
              f"sec/b {w['secure_over_seeded']:.3f}; random draws alone "
              f"{nd['seeded'] * 1e3:.2f} ms (seeded) vs {nd['secure'] * 1e3:.2f} ms (ChaCha20)")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", choices=("telco", "scale"),
                        default=["telco", "scale"])
    parser.add_argument("--repeats", type=int, default=10, help="Telco case")
    parser.add_argument("--scale-repeats", type=int, default=3, help="200k x 64 case")
    parser.add_argument("--noise-pairs", type=int, default=3,
                        help="seeded/secure fedcrm DP runs per repeat (CSPRNG overhead)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    # Opacus' "secure RNG off", hook and accountant-order warnings are expected in a benchmark.
    warnings.simplefilter("ignore", UserWarning)
    machine = machine_info()

    cases = {
        "telco": (Case("telco", "IBM Telco churn (5,653 x 50)", epsilon=1.0, delta=1e-5,
                       epochs=5.0, batch_size=256, learning_rate=0.05, max_grad_norm=1.0,
                       optimizer=DpOptimizer.ADAM, mlp_hidden=32, repeats=args.repeats),
                  telco_tensors),
        "scale": (Case("scale", "200,000 synthetic customers x 64 features, one epoch",
                       epsilon=1.0, delta=1e-6, epochs=1.0, batch_size=4096,
                       learning_rate=0.05, max_grad_norm=1.0, optimizer=DpOptimizer.ADAM,
                       mlp_hidden=128, repeats=args.scale_repeats),
                  synthetic_tensors),
    }
    results: dict[str, Any] = {}
    for name in args.cases:
        case, load = cases[name]
        data = load()
        rows = [bench_kind(kind, case, data, noise_pairs=args.noise_pairs)
                for kind in (ChurnModelKind.LOGISTIC, ChurnModelKind.MLP)]
        results[name] = {
            "case": asdict(case),
            "dataset": {"n_train": len(data["X_train"]), "n_test": len(data["X_test"]),
                        "features": int(data["X_train"].shape[1]), **data["info"]},
            "results": rows,
        }
        _print_case(case, rows, args.noise_pairs)

    targets = {
        "telco": {"logistic_speedup_vs_opacus_min": 5.0, "mlp_speedup_vs_opacus_min": 3.0,
                  "dp_over_non_dp_max": 1.5, "auc_gap_vs_opacus_max": 0.005,
                  "dp_logistic_auc_min": 0.84, "csprng_overhead_max": 1.10},
        "scale": {"dp_over_non_dp_max": 1.3},
    }
    met: dict[str, dict[str, bool]] = {}
    if "telco" in results:
        by = {r["model"]: r for r in results["telco"]["results"]}
        rows = list(by.values())
        met["telco"] = {
            "logistic_speedup": by["logistic"]["ratios_cpu"]["opacus_over_fedcrm_dp"] >= 5.0,
            "mlp_speedup": by["mlp"]["ratios_cpu"]["opacus_over_fedcrm_dp"] >= 3.0,
            "dp_over_non_dp": all(r["ratios_cpu"]["fedcrm_dp_over_non_dp"] <= 1.5 for r in rows),
            "auc_gap": all(abs(r["auc_gap_fedcrm_minus_opacus"]) <= 0.005 for r in rows),
            "dp_logistic_auc": by["logistic"]["auc_mean"]["fedcrm_dp"] >= 0.84,
            "csprng_overhead": all(
                r["csprng_overhead"]["ratio_of_cpu_medians_secure_over_seeded"] <= 1.10
                for r in rows),
        }
    if "scale" in results:
        met["scale"] = {
            "dp_over_non_dp": all(r["ratios_cpu"]["fedcrm_dp_over_non_dp"] <= 1.3
                                  for r in results["scale"]["results"]),
        }
    result = {
        "benchmark": "fedcrm DP-SGD engine vs stock Opacus (and ghost clipping) vs non-DP",
        "noise_pairs": args.noise_pairs,
        "machine": machine,
        "timing": "ratios from the training thread's CPU time (thread_time); wall clock too",
        "cases": results,
        "targets": {k: v for k, v in targets.items() if k in results},
        "targets_met": met,
    }
    print("\ntargets met:", json.dumps(met))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
