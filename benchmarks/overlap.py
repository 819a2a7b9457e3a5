"""Time and bytes of ``fedcrm overlap`` on two firms of 100,000 customers sharing 30,000.

    python benchmarks/overlap.py [--customers 100000] [--shared 30000] [--repeat 1]
                                 [--epsilon 1.0] [--out benchmarks/results/overlap.json]

Writes two firms' customer exports (seeded synthetic mainland mobile numbers; the shared
customers' numbers written differently at the second firm, ``+86 139 ...`` against
``139-....-....``, so normalisation is part of the run), their configs (``[overlap] column =
"phone"``, each the other's peer) and keys into a temporary directory, then runs the real
coordinator code (:func:`fedcrm.server.overlap.run_overlap`) against the real ClientApp of both
firms **in one process** (:class:`fedcrm.simulations.in_process.InProcessGrid`: Flower
``Message`` objects, no transport): reading and normalising each firm's source, hashing,
blinding, signing, the DP release and the sealed state, the relay, the second blinding and the
count. Nothing is cached between steps or repeats.

Reported per party: CPU seconds (thread time of its ClientApp calls; the coordinator's is the
process's CPU minus the firms'), wall seconds, payload bytes in and out. In one process the two
firms run one after the other; in a deployment each has its own machine, so the table also
gives the **two-core critical path**: the coordinator's CPU plus, for each step, the slower
firm's CPU. The target (issue 15) is 100,000 × 100,000 identifiers in <= 60 s on 2 cores. The
machine may be shared: the 1-minute load average before and after is recorded, and CPU seconds
are the load-independent measure.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import tomli_w

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "benchmarks" / "results" / "overlap.json"
TARGET_SECONDS = 60.0


def _numbers(rng: np.random.Generator, n: int, salt: int) -> np.ndarray:
    """``n`` distinct 8-digit numbers (a multiplicative walk mod 10^8 from a random start)."""
    start = int(rng.integers(0, 10**8))
    return (start + salt + np.arange(n, dtype=np.int64) * 7_919) % 10**8


def write_firms(root: Path, *, customers: int, shared: int, epsilon: float, seed: int
                ) -> list[Path]:
    """Two firms' exports, configs and keys; firm2's first ``shared`` customers are firm1's."""
    from fedcrm.privacy.keys import init_keys

    rng = np.random.default_rng(seed)
    a = [f"139-{n // 10**4:04d}-{n % 10**4:04d}" for n in _numbers(rng, customers, 0)]
    b = [f"138-{n // 10**4:04d}-{n % 10**4:04d}" for n in _numbers(rng, customers, 1)]
    b[:shared] = [f"+86 {p[:3]} {p[4:8]} {p[9:]}" for p in a[:shared]]
    order = rng.permutation(customers)
    b = [b[i] for i in order]
    configs = []
    for name, phones in (("firm1", a), ("firm2", b)):
        firm_dir = root / name
        firm_dir.mkdir(parents=True)
        pd.DataFrame({"customer_id": [f"{name}-{i:07d}" for i in range(customers)],
                      "phone": phones}).to_csv(firm_dir / "customers.csv", index=False)
        peer = "firm2" if name == "firm1" else "firm1"
        cfg = {
            "firm": {"name": name, "keys_dir": "keys", "store_dir": "store"},
            "budget": {"epsilon": max(3.0, 2 * epsilon), "delta": 1e-5},
            "federation": {"public_size": customers, "max_query_epsilon": max(1.0, epsilon)},
            "overlap": {"column": "phone", "region": "CN",
                        "peers": {peer: str(root / peer / "keys" / "signing.pub")}},
            "tables": {"customers": {
                "source": {"kind": "csv", "path": "customers.csv"},
                "columns": {"customer_id": {"role": "id"},
                            "phone": {"role": "pii", "pii": "phone", "policy": "partial"}},
            }},
        }
        (firm_dir / "firm.toml").write_text(tomli_w.dumps(cfg), encoding="utf-8")
        init_keys(firm_dir / "keys", firm=name)
        configs.append(firm_dir / "firm.toml")
    return configs


def run_once(configs: list[Path], run_dir: Path, *, epsilon: float) -> dict[str, Any]:
    from fedcrm.coordinator.overlap_run import OverlapCoordination, OverlapRunConfig
    from fedcrm.node import _NODES
    from fedcrm.server.overlap import run_overlap
    from fedcrm.simulations.in_process import InProcessGrid, server_identity

    _NODES.clear()  # every repeat opens the firms afresh
    cfg = OverlapRunConfig.model_validate({
        "overlap": {"name": "benchmark", "firms": ["firm1", "firm2"], "key": "phone",
                    "epsilon": epsilon, "delta": 1e-6},
        "coordinator": OverlapCoordination(wait_for_firms=0).model_dump(),
    })
    grid = InProcessGrid(configs)
    with server_identity():
        wall, cpu = time.perf_counter(), time.process_time()
        result = run_overlap(grid, cfg, run_id=run_dir.name, run_dir=run_dir)  # type: ignore[arg-type]
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    names = {100: "firm1", 101: "firm2"}
    firms_cpu = sum(c.cpu_seconds for c in grid.costs.values())
    parties: dict[str, Any] = {
        names[node]: {"cpu_seconds": round(c.cpu_seconds, 3),
                      "wall_seconds": round(c.wall_seconds, 3),
                      "bytes_in": c.bytes_in, "bytes_out": c.bytes_out}
        for node, c in grid.costs.items()
    }
    coordinator_cpu = max(cpu - firms_cpu, 0.0)
    parties["coordinator"] = {
        "cpu_seconds": round(coordinator_cpu, 3),
        "wall_seconds": round(wall - sum(c.wall_seconds for c in grid.costs.values()), 3),
        "bytes_in": sum(c.bytes_out for c in grid.costs.values()),
        "bytes_out": sum(c.bytes_in for c in grid.costs.values()),
    }
    steps: dict[str, dict[str, float]] = {}
    for (node, kind), c in grid.step_costs.items():
        steps.setdefault(kind, {})[names[node]] = round(c.cpu_seconds, 3)
    critical = coordinator_cpu + sum(max(per.values()) for per in steps.values())
    return {
        "status": result["status"], "estimate": result["estimate"],
        "noise_std": round(result["noise_std"], 3),
        "ci_95": [round(result["ci_low"], 1), round(result["ci_high"], 1)]
        if result["estimate"] is not None else None,
        "padded_lengths": result["padded_lengths"],
        "wall_seconds_one_process": round(wall, 3), "cpu_seconds_one_process": round(cpu, 3),
        "two_core_critical_path_cpu_seconds": round(critical, 3),
        "parties": parties, "step_cpu_seconds": steps,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--customers", type=int, default=100_000)
    parser.add_argument("--shared", type=int, default=30_000)
    parser.add_argument("--epsilon", type=float, default=1.0)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    from fedcrm.privacy.keys import ENV_COORDINATOR_KEY, write_signing_key

    load_before = os.getloadavg()[0]
    runs = []
    with tempfile.TemporaryDirectory(prefix="fedcrm-overlap-bench-") as tmp:
        root = Path(tmp)
        key = root / "coordinator" / "signing.key"
        write_signing_key(key)
        os.environ[ENV_COORDINATOR_KEY] = str(key)
        for i in range(args.repeat):
            firms_dir = root / f"firms-{i}"
            configs = write_firms(firms_dir, customers=args.customers, shared=args.shared,
                                  epsilon=args.epsilon, seed=args.seed + i)
            runs.append(run_once(configs, root / "runs" / f"overlap-{i}", epsilon=args.epsilon))
    load_after = os.getloadavg()[0]
    report = {
        "benchmark": "overlap", "time": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version(),
                    "load_average_1min": [round(load_before, 2), round(load_after, 2)]},
        "customers_per_firm": args.customers, "true_overlap": args.shared,
        "epsilon_per_firm": args.epsilon, "delta": 1e-6,
        "in_process": True, "target_seconds_two_cores": TARGET_SECONDS, "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    _print(report)
    return 0


def _print(report: dict[str, Any]) -> None:
    print(f"overlap of {report['customers_per_firm']:,} × {report['customers_per_firm']:,} "
          f"identifiers, true overlap {report['true_overlap']:,}, ε = "
          f"{report['epsilon_per_firm']:g} per firm (in one process; load average "
          f"{report['machine']['load_average_1min'][0]:g} → "
          f"{report['machine']['load_average_1min'][1]:g} on {report['machine']['cpus']} CPUs)")
    for i, run in enumerate(report["runs"]):
        print(f"\nrun {i + 1}: {run['status']}, estimate {run['estimate']} (truth "
              f"{report['true_overlap']}), noise sd {run['noise_std']}, 95% interval "
              f"{run['ci_95']}")
        print("| party | CPU s | wall s | bytes in | bytes out |\n|---|---|---|---|---|")
        for party, p in run["parties"].items():
            print(f"| {party} | {p['cpu_seconds']:.2f} | {p['wall_seconds']:.2f} | "
                  f"{p['bytes_in']:,} | {p['bytes_out']:,} |")
        print(f"| all, one process | {run['cpu_seconds_one_process']:.2f} | "
              f"{run['wall_seconds_one_process']:.2f} | | |")
        print(f"two-core critical path (coordinator + slower firm per step, CPU): "
              f"{run['two_core_critical_path_cpu_seconds']:.2f} s (target "
              f"{report['target_seconds_two_cores']:g} s)")
        for step, per in run["step_cpu_seconds"].items():
            print(f"  {step}: " + ", ".join(f"{f} {s:.2f} s" for f, s in per.items()))


if __name__ == "__main__":
    raise SystemExit(main())
