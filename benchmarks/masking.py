"""Throughput of privacy.masking on synthetic PII.

    python benchmarks/masking.py [--n 1000000] [--repeat 3] [--out benchmarks/results/masking.json]

Generates ``n`` synthetic mainland-China mobile numbers and ``n`` synthetic 18-character PRC
resident ids (seeded), then times `pseudonymize` with one and with two worker processes and
`partial_mask`, best of ``--repeat`` runs. Prints a table of values/s and writes JSON with the
machine description. Target: >= 1,000,000 values/s for pseudonymize.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from fedcrm.privacy.masking import derive_pseudonym_key, partial_mask, pseudonymize
from fedcrm.privacy.policies import PiiKind

TARGET_PER_S = 1_000_000
_ID_WEIGHTS = np.array([7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2])


def synthetic_mobiles(n: int, rng: np.random.Generator) -> pd.Series:
    second = rng.integers(3, 10, n)
    rest = rng.integers(0, 10**9, n)
    return pd.Series([f"1{a}{b:09d}" for a, b in zip(second, rest, strict=True)], name="phone")


def synthetic_ids(n: int, rng: np.random.Generator) -> pd.Series:
    regions = np.array([110105, 310101, 440305, 510107, 330106])[rng.integers(0, 5, n)]
    born = np.datetime64("1950-01-01") + rng.integers(0, 25_000, n).astype("timedelta64[D]")
    births = pd.DatetimeIndex(born).strftime("%Y%m%d")
    seq = rng.integers(0, 1000, n)
    bodies = [f"{r}{b}{s:03d}" for r, b, s in zip(regions, births, seq, strict=True)]
    digits = np.frombuffer("".join(bodies).encode(), dtype=np.uint8).reshape(n, 17) - 48
    checks = np.frombuffer(b"10X98765432", dtype=np.uint8)[(digits @ _ID_WEIGHTS) % 11]
    return pd.Series([b + chr(c) for b, c in zip(bodies, checks, strict=True)],
                     name="national_id")


def best_rate(fn: Callable[[], object], n: int, repeat: int) -> tuple[float, float]:
    """(values/s of the fastest run, seconds of the fastest run)."""
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return n / best, best


def machine() -> dict[str, Any]:
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count() or 1
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "cpu_count": os.cpu_count(),
        "usable_cpus": usable,
        "cpu_model": cpu,
        "python": sys.version.split()[0],
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "pandas": pd.__version__,
        "numpy": np.__version__,
    }


def load_average() -> float | None:
    """1-minute load average: on a shared machine, read results against it."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def run(n: int, repeat: int, seed: int) -> dict[str, Any]:
    load_before = load_average()
    rng = np.random.default_rng(seed)
    phones = synthetic_mobiles(n, rng)
    ids = synthetic_ids(n, rng)
    key = derive_pseudonym_key(rng.bytes(32), firm="bench", version=1)
    key_id = "pseudonym-v1-bench"
    cases: list[tuple[str, str, Callable[[], object]]] = [
        ("pseudonymize", "phone", lambda: pseudonymize(phones, key=key, key_id=key_id, workers=1)),
        ("pseudonymize", "phone", lambda: pseudonymize(phones, key=key, key_id=key_id, workers=2)),
        ("pseudonymize", "national_id",
         lambda: pseudonymize(ids, key=key, key_id=key_id, workers=1)),
        ("pseudonymize", "national_id",
         lambda: pseudonymize(ids, key=key, key_id=key_id, workers=2)),
        ("partial_mask", "phone", lambda: partial_mask(phones, kind=PiiKind.PHONE)),
        ("partial_mask", "national_id", lambda: partial_mask(ids, kind=PiiKind.NATIONAL_ID)),
    ]
    workers = [1, 2, 1, 2, None, None]
    rows: list[dict[str, Any]] = []
    for (op, data, fn), w in zip(cases, workers, strict=True):
        rate, seconds = best_rate(fn, n, repeat)
        rows.append({"operation": op, "data": data, "workers": w, "values": n,
                     "seconds": round(seconds, 4), "values_per_s": round(rate)})
    pseudo = [int(r["values_per_s"]) for r in rows if r["operation"] == "pseudonymize"]
    return {
        "benchmark": "privacy.masking",
        "timestamp": datetime.now(UTC).isoformat(timespec="seconds"),
        "n": n,
        "repeat": repeat,
        "seed": seed,
        "target_values_per_s": TARGET_PER_S,
        "pseudonymize_best_values_per_s": max(pseudo),
        "meets_target": max(pseudo) >= TARGET_PER_S,
        "machine": machine(),
        "load_average_1m": {"before": load_before, "after": load_average()},
        "results": rows,
    }


def print_table(report: dict[str, Any]) -> None:
    headers = ("operation", "data", "workers", "seconds", "values/s")
    lines = [
        (r["operation"], r["data"], "-" if r["workers"] is None else str(r["workers"]),
         f"{r['seconds']:.3f}", f"{r['values_per_s']:,}")
        for r in report["results"]
    ]
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        widths = [max(len(h), *(len(x[i]) for x in lines)) for i, h in enumerate(headers)]
        print("  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)))
        for x in lines:
            print("  ".join(c.ljust(w) for c, w in zip(x, widths, strict=True)))
    else:
        m = report["machine"]
        table = Table(title=f"privacy.masking, n={report['n']:,} "
                            f"({m['usable_cpus']} CPUs, Python {m['python']})")
        for h in headers:
            table.add_column(h, justify="right" if h in ("seconds", "values/s") else "left")
        for x in lines:
            table.add_row(*x)
        Console().print(table)
    load = report["load_average_1m"]
    print(f"1-min load average before/after: {load['before']}/{load['after']} "
          f"on {report['machine']['usable_cpus']} CPUs (other work on the machine slows this)")
    verdict = "meets" if report["meets_target"] else "MISSES"
    print(f"pseudonymize best {report['pseudonymize_best_values_per_s']:,} values/s: {verdict} "
          f"the {TARGET_PER_S:,} values/s target")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--n", type=int, default=1_000_000, help="values per data set")
    parser.add_argument("--repeat", type=int, default=3, help="runs per case; best is kept")
    parser.add_argument("--seed", type=int, default=20240601)
    parser.add_argument("--out", type=Path,
                        default=Path(__file__).resolve().parent / "results" / "masking.json")
    args = parser.parse_args(argv)
    report = run(args.n, args.repeat, args.seed)
    print_table(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
