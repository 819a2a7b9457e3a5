"""Noise calibration time per firm per run, on the README simulation's plan.

A firm calibrates its DP-SGD noise once per federated run (``fedcrm.release.plan_dp_sgd`` ->
``dp_accounting.mechanism_calibration.calibrate_dp_mechanism`` over the composition of its ledger
and the run's plan). The plan is ``configs/simulations/telco_5firms.toml``'s: 20 rounds of
0.5 local epochs at batch 128, the run's ε = 1 on a cap of 1, δ = 1e-5. Firm sizes span the
README simulation's (about 700-1,900 training customers per firm) and beyond. "prior runs" puts
that many earlier, different runs in the firm's ledger (each a distinct event to compose).

Run:  .venv/bin/python benchmarks/calibration.py   (writes benchmarks/results/calibration.json)
Target: <= 0.5 s per firm per run on the README simulation (no prior run).
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from fedcrm.learning.dp_engine import plan_for_budget
from fedcrm.privacy.accounting import Mechanism, make_event

RESULTS = Path(__file__).parent / "results" / "calibration.json"
SIZES = (500, 1000, 1500, 2000, 5000)
PRIORS = (0, 1, 3)
REPEATS = 3
DELTA = 1e-5


def _prior_runs(k: int) -> list:
    """k earlier runs, each a distinct subsampled-Gaussian event (different n, hence q)."""
    return [
        make_event(
            mechanism=Mechanism.SUBSAMPLED_GAUSSIAN, noise_multiplier=6.0 + i, sample_rate=0.05,
            steps=200 + 50 * i, delta=DELTA, purpose=f"train:churn:earlier-{i}",
        )
        for i in range(k)
    ]


def main() -> None:
    rows = []
    for prior in PRIORS:
        events = _prior_runs(prior)
        for n in SIZES:
            times = []
            for _ in range(REPEATS):
                started = time.perf_counter()
                plan = plan_for_budget(
                    n_examples=n, target_epsilon=3.0 if prior else 1.0, delta=DELTA, epochs=0.5,
                    batch_size=128, max_grad_norm=2.0, learning_rate=1.0, rounds=20,
                    prior_events=events,
                )
                times.append(time.perf_counter() - started)
            rows.append({
                "prior_runs": prior, "n": n, "noise_multiplier": plan.noise_multiplier,
                "steps_per_round": plan.steps, "seconds_median": statistics.median(times),
                "seconds_max": max(times),
            })
    table = Table(title="noise calibration per firm per run (README simulation's plan)")
    for col in ("prior runs", "n", "σ", "steps/round", "median s", "max s"):
        table.add_column(col)
    for r in rows:
        table.add_row(str(r["prior_runs"]), str(r["n"]), f"{r['noise_multiplier']:.3f}",
                      str(r["steps_per_round"]), f"{r['seconds_median']:.3f}",
                      f"{r['seconds_max']:.3f}")
    Console().print(table)
    readme = [r for r in rows if r["prior_runs"] == 0 and r["n"] <= 2000]
    worst = max(r["seconds_max"] for r in readme)
    Console().print(f"README simulation (no prior run, n <= 2000): worst {worst:.3f}s "
                    f"(target <= 0.5 s: {'met' if worst <= 0.5 else 'MISSED'})")
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps({
        "benchmark": "calibration", "machine": platform.platform(), "rows": rows,
        "readme_worst_seconds": worst,
    }, indent=2) + "\n")


if __name__ == "__main__":
    main()
