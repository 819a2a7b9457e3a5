"""Wall time and peak memory of ``fedcrm prepare`` on a large synthetic customers export.

    python benchmarks/prepare.py [--rows 1000000] [--repeat 1] [--cprofile 25]
                                 [--before-tree /path/to/older/checkout]
                                 [--out benchmarks/results/prepare.json]

Generates a seeded synthetic customers CSV with 10 columns (``cust_id``; 3 PII columns
``full_name`` -> pseudonymize, ``email`` -> partial, ``phone`` -> partial; ``signup`` date;
``plan`` categorical; ``tenure``, ``monthly``, ``total`` numeric; ``churned`` label) and about
0.5% bad rows (duplicate ids, impossible dates, out-of-range tenure, missing charges), writes the
firm's TOML config and keys into a temporary directory, then runs
`fedcrm.prepare.prepare` in a fresh subprocess so that the peak RSS (that child's
``ru_maxrss``, read with ``os.wait4``: the ``RUSAGE_CHILDREN`` share of this one run, including
pseudonymize workers it forked) is the prepare's own. The child times each
phase (ingest / validate / quarantine / mask / encrypt / features / hash) with wrappers around the
functions `fedcrm.prepare` calls, which costs nothing measurable; ``--cprofile N`` adds one more
run under cProfile and prints its top ``N`` functions by own time.

Target (issue): 1,000,000 rows in <= 30 s wall and <= 2 GB peak RSS. The machine may be shared:
the 1-minute load average before/after and the child's CPU seconds are recorded with the result.
``--before-tree DIR`` also runs the ``fedcrm``/``privacy`` packages found in DIR (an older
checkout, put first on the child's ``PYTHONPATH``), alternating before/after runs so both see the
same load, and prints the two side by side.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

TARGET_SECONDS = 30.0
TARGET_RSS_MB = 2048.0
PLANS = ("basic", "plus", "premium")
AS_OF = "2025-01-01"
RESULTS = Path(__file__).resolve().parent / "results" / "prepare.json"

COLUMNS: dict[str, dict[str, Any]] = {
    "cust_id": {"role": "id"},
    "full_name": {"role": "pii", "pii": "name", "policy": "pseudonymize"},
    "email": {"role": "pii", "pii": "email", "policy": "partial"},
    "phone": {"role": "pii", "pii": "phone", "policy": "partial"},
    "signup": {"role": "timestamp", "name": "signup_date"},
    "plan": {"role": "feature", "kind": "categorical", "categories": list(PLANS)},
    "tenure": {"role": "feature", "name": "tenure_months", "kind": "numeric", "min": 0, "max": 120},
    "monthly": {"role": "feature", "name": "monthly_charges", "kind": "numeric", "min": 0,
                "max": 200},
    "total": {"role": "feature", "name": "total_charges", "kind": "numeric", "min": 0,
              "max": 20_000, "missing": "allow"},
    "churned": {"role": "label", "name": "churn", "true_values": ["Yes"], "false_values": ["No"]},
}


# --------------------------------------------------------------------------------------------
# Synthetic firm
# --------------------------------------------------------------------------------------------


def synthetic_customers(n: int, *, seed: int) -> pd.DataFrame:
    """A customers export of ``n`` rows, all generated; about 0.5% of rows break one rule."""
    rng = np.random.default_rng(seed)
    latin = np.array(["Anna", "Ben", "Chloe", "Dmitri", "Elena", "Farid", "Grace", "Hugo"])
    han = np.array(["张伟", "王芳", "李娜", "欧阳娜娜"])
    last = np.array(["Meyer", "Okafor", "Rossi", "Tanaka", "Novak", "Silva", "Berg"])
    domains = np.array(["mail.example.com", "example.org", "corp.example.net"])
    ids = np.char.add("C", np.char.zfill(np.arange(n).astype(str), 8)).astype(object)
    bad = rng.random(n)
    dup = np.flatnonzero(bad < 0.002)
    dup = dup[dup > 0]
    ids[dup] = ids[rng.integers(0, dup)]  # an earlier id: "duplicate customer id"
    names = np.where(rng.random(n) < 0.8,
                     np.char.add(np.char.add(rng.choice(latin, n), " "), rng.choice(last, n)),
                     rng.choice(han, n))
    emails = np.char.add(np.char.add("person", np.arange(n).astype(str)),
                         np.char.add("@", rng.choice(domains, n)))
    mobiles = np.char.add(np.char.add("1", rng.integers(3, 10, n).astype(str)),
                          np.char.zfill(rng.integers(0, 10**9, n).astype(str), 9))
    phones = np.where(rng.random(n) < 0.3, np.char.add("+86 ", mobiles), mobiles)
    signup = (pd.Timestamp("2015-01-01")
              + pd.to_timedelta(rng.integers(0, 3600, n), "D")).strftime("%Y-%m-%d").to_numpy(
                  dtype=object)
    signup[(bad >= 0.002) & (bad < 0.003)] = "2021-13-45"  # "not a date"
    tenure = rng.integers(0, 72, n)
    tenure_txt = tenure.astype(str).astype(object)
    tenure_txt[(bad >= 0.003) & (bad < 0.004)] = "500"  # "above declared max"
    monthly = rng.uniform(10, 120, n).round(2)
    total = (monthly * np.maximum(tenure, 1) * rng.uniform(0.9, 1.1, n)).round(2)
    total_txt = np.char.mod("%.2f", total).astype(object)
    total_txt[(bad >= 0.004) & (bad < 0.005)] = ""  # allowed missing, like Telco's blanks
    total_txt[(bad >= 0.005) & (bad < 0.0055)] = "n/a"  # "not a number"
    churn_p = 1 / (1 + np.exp(-(0.03 * monthly - 0.05 * tenure - 1.0)))
    return pd.DataFrame(
        {
            "cust_id": ids,
            "full_name": names,
            "email": emails,
            "phone": phones,
            "signup": signup,
            "plan": rng.choice(PLANS, n),
            "tenure": tenure_txt,
            "monthly": np.char.mod("%.2f", monthly),
            "total": total_txt,
            "churned": np.where(rng.random(n) < churn_p, "Yes", "No"),
        }
    )


def write_firm(root: Path, *, rows: int, seed: int, chunk_rows: int | None) -> Path:
    """CSV + ``firm.toml`` + keys under ``root`` (reused if already there); returns the config."""
    import tomli_w

    from fedcrm.privacy.keys import init_keys

    root.mkdir(parents=True, exist_ok=True)
    data = root / f"customers-{rows}-{seed}.csv"
    if not data.exists():
        synthetic_customers(rows, seed=seed).to_csv(data.with_suffix(".tmp"), index=False)
        data.with_suffix(".tmp").rename(data)
    source: dict[str, Any] = {"kind": "csv", "path": data.name}
    if chunk_rows is not None:
        source["chunk_rows"] = chunk_rows
    cfg = {
        "firm": {"name": "benchfirm", "keys_dir": "keys", "store_dir": "store"},
        "budget": {"epsilon": 2.0, "delta": 1e-5},
        "features": {"as_of": AS_OF},
        "tables": {"customers": {"source": source, "columns": COLUMNS}},
    }
    path = root / "firm.toml"
    path.write_text(tomli_w.dumps(cfg), encoding="utf-8")
    if not (root / "keys" / "keys.json").exists():
        init_keys(root / "keys", firm="benchfirm")
    return path


# --------------------------------------------------------------------------------------------
# Child: one prepare run with phase timers
# --------------------------------------------------------------------------------------------


class PhaseTimer:
    """Accumulates seconds per phase; nested phases are recorded as ``outer/inner``."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self._stack: list[str] = []

    def wrap(self, name: str, fn: Callable[..., Any],
             suffix: Callable[..., str] | None = None) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            label = name + (suffix(*args, **kwargs) if suffix is not None else "")
            label = f"{self._stack[-1]}/{label}" if self._stack else label
            self._stack.append(label)
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[label] += time.perf_counter() - start
                self.calls[label] += 1
                self._stack.pop()

        return timed

    def current(self) -> str:
        stack = self._stack
        return stack[-1] if stack else "other"

    def wrap_iter(self, name: str, fn: Callable[..., Iterator[Any]]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Iterator[Any]:
            it = fn(*args, **kwargs)
            while True:
                start = time.perf_counter()
                self._stack.append(name)
                try:
                    item = next(it)
                except StopIteration:
                    return
                finally:
                    self._stack.pop()
                    self.seconds[name] += time.perf_counter() - start
                self.calls[name] += 1
                yield item

        return timed


def _rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class RssSampler(threading.Thread):
    """Samples this process's RSS every 20 ms and keeps the peak seen in each phase."""

    def __init__(self, timer: PhaseTimer) -> None:
        super().__init__(daemon=True)
        self.timer = timer
        self.peak: dict[str, float] = defaultdict(float)
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.02):
            try:
                rss = _rss_mb()
            except OSError:  # not Linux
                return
            phase = self.timer.current()
            self.peak[phase] = max(self.peak[phase], rss)


def child(config: Path, out: Path, cprofile: int) -> None:
    import fedcrm.data.prepare as fp
    from fedcrm.data.contract import load_firm_config
    from fedcrm.privacy.keys import load_keys

    imported = time.perf_counter()
    timer = PhaseTimer()
    fp.iter_chunks = timer.wrap_iter("ingest", fp.iter_chunks)  # type: ignore[assignment]
    fp.check_columns = timer.wrap("validate", fp.check_columns)  # type: ignore[assignment]
    fp.validate_chunk = timer.wrap("validate", fp.validate_chunk)  # type: ignore[assignment]
    fp._write_quarantine = timer.wrap("quarantine", fp._write_quarantine)  # type: ignore[assignment]
    fp._mask_frame = timer.wrap("mask", fp._mask_frame)  # type: ignore[assignment]
    fp.pseudonymize = timer.wrap("pseudonymize", fp.pseudonymize)  # type: ignore[assignment]
    fp.apply_policy = timer.wrap(  # type: ignore[assignment]
        "apply_policy", fp.apply_policy,
        lambda values, **kw: f"({values.name}: {kw['policy'].value})")
    if hasattr(fp, "file_sha256"):  # older prepare re-read each file to hash it
        fp.file_sha256 = timer.wrap("hash", fp.file_sha256)
    feats = fp.crm_features
    feats.build_features = timer.wrap("features", feats.build_features)  # type: ignore[assignment]
    writer = fp.EncryptedTableWriter
    writer.write = timer.wrap("encrypt", writer.write)  # type: ignore[method-assign]
    writer.close = timer.wrap("encrypt", writer.close)  # type: ignore[method-assign]

    cfg = load_firm_config(config)
    keys = load_keys(cfg.firm.keys_dir)
    today = pd.Timestamp(AS_OF)
    profiler = None
    if cprofile:
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    sampler = RssSampler(timer)
    sampler.start()
    start = time.perf_counter()
    result = fp.prepare(cfg, keys=keys, today=today)
    seconds = time.perf_counter() - start
    sampler.done.set()
    sampler.join()
    top: list[dict[str, Any]] = []
    if profiler is not None:
        import pstats

        profiler.disable()
        stats = pstats.Stats(profiler)
        rows = sorted(stats.stats.items(), key=lambda kv: kv[1][2], reverse=True)  # type: ignore[attr-defined]
        for (filename, line, func), (_, ncalls, tottime, cumtime, _) in rows[:cprofile]:
            where = filename.split("site-packages/")[-1].replace(str(Path.cwd()) + "/", "")
            top.append({"function": f"{where}:{line}({func})", "calls": ncalls,
                        "tottime_s": round(tottime, 3), "cumtime_s": round(cumtime, 3)})
    store = result.store_dir
    report = {
        "prepare_seconds": seconds,
        "import_seconds": imported - START,
        "phases": {k: round(v, 3) for k, v in timer.seconds.items()},
        "phase_calls": dict(timer.calls),
        "phase_peak_rss_mb": {k: round(v) for k, v in sampler.peak.items()},
        "rows_read": sum(t.rows_read for t in result.tables),
        "rows_kept": sum(t.rows_kept for t in result.tables),
        "rows_quarantined": sum(t.rows_quarantined for t in result.tables),
        "quarantine_reasons": {t.table: t.reasons for t in result.tables},
        "store_bytes": {p.name: p.stat().st_size for p in sorted(store.glob("*.fcs"))},
        "chunks": result.manifest["tables"]["customers"]["chunks"],
        "fedcrm_module": fp.__file__,
        "top_functions": top,
    }
    out.write_text(json.dumps(report, indent=2) + "\n")


START = time.perf_counter()


# --------------------------------------------------------------------------------------------
# Parent
# --------------------------------------------------------------------------------------------


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
    import pyarrow

    return {
        "cpu_count": os.cpu_count(),
        "usable_cpus": usable,
        "cpu_model": cpu,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "pandas": pd.__version__,
        "numpy": np.__version__,
        "pyarrow": pyarrow.__version__,
    }


def load_average() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def run_child(config: Path, *, cprofile: int = 0, tree: Path | None = None) -> dict[str, Any]:
    """One prepare in a fresh interpreter; wall, CPU and peak RSS measured from here.

    ``tree`` puts another source tree first on the child's ``PYTHONPATH`` (the "before" code).
    """
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as fh:
        out = Path(fh.name)
    env = dict(os.environ)
    if tree is not None:
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(tree), env.get("PYTHONPATH", "")) if p)
    load = load_average()
    start = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), "--child", str(config), str(out),
         "--cprofile", str(cprofile)],
        env=env,
    )
    # wait4 gives this child's own rusage (with the pseudonymize workers it waited for):
    # ru_maxrss is the largest of those processes, in KiB on Linux.
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"prepare child failed with exit code {proc.returncode}")
    report = json.loads(out.read_text())
    out.unlink()
    report.update(
        {
            "process_seconds": round(wall, 3),
            "prepare_seconds": round(report["prepare_seconds"], 3),
            "import_seconds": round(report["import_seconds"], 3),
            "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 3),
            "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
            "load_average_1m": {"before": load, "after": load_average()},
        }
    )
    return report


PHASE_ORDER = ("ingest", "validate", "quarantine", "mask", "encrypt", "features", "hash")


def summarize(runs: list[dict[str, Any]], *, rows: int) -> dict[str, Any]:
    best = min(runs, key=lambda r: r["prepare_seconds"])
    store = sum(best["store_bytes"].values())
    return {
        "prepare_seconds": best["prepare_seconds"],
        "prepare_seconds_median": round(float(np.median([r["prepare_seconds"] for r in runs])), 3),
        "cpu_seconds_min": min(r["cpu_seconds"] for r in runs),
        "process_seconds": best["process_seconds"],
        "cpu_seconds": best["cpu_seconds"],
        "rows_per_s": round(rows / best["prepare_seconds"]),
        "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
        "store_mb": round(store / 2**20, 1),
        "rows_quarantined": best["rows_quarantined"],
        "phases": best["phases"],
        "meets_time": best["prepare_seconds"] <= TARGET_SECONDS,
        "meets_memory": max(r["peak_rss_mb"] for r in runs) <= TARGET_RSS_MB,
    }


def print_report(report: dict[str, Any]) -> None:
    cols = [("after" if "before" in report else "result", report["summary"])]
    if "before" in report:
        cols.insert(0, ("before", report["before"]["summary"]))
    lines: list[tuple[str, ...]] = []

    def add(label: str, fmt: Callable[[dict[str, Any]], str]) -> None:
        lines.append((label, *(fmt(s) for _, s in cols)))

    add("prepare() wall s, best", lambda s: f"{s['prepare_seconds']:.2f}")
    add("subprocess wall s (incl. imports)", lambda s: f"{s['process_seconds']:.2f}")
    add("  median over runs", lambda s: f"{s['prepare_seconds_median']:.2f}")
    add("CPU s (user+sys incl. workers), min", lambda s: f"{s['cpu_seconds_min']:.2f}")
    add("rows/s", lambda s: f"{s['rows_per_s']:,}")
    add("peak RSS MB", lambda s: f"{s['peak_rss_mb']:,.0f}")
    add("encrypted store MB (.fcs)", lambda s: f"{s['store_mb']:.1f}")
    add("rows quarantined", lambda s: f"{s['rows_quarantined']:,}")
    names: list[str] = []
    for _, s in cols:
        for name in sorted(s["phases"], key=lambda k: (
                PHASE_ORDER.index(k.split("/")[0]) if k.split("/")[0] in PHASE_ORDER else 99, k)):
            if name not in names:
                names.append(name)
    def phase(name: str) -> Callable[[dict[str, Any]], str]:
        return lambda s: f"{s['phases'][name]:.2f}" if name in s["phases"] else "-"

    for name in names:
        indent = "    " * name.count("/")
        add(f"  {indent}{name.split('/')[-1]} s", phase(name))
    def other(s: dict[str, Any]) -> str:
        top_level = sum(v for k, v in s["phases"].items() if "/" not in k)
        return f"{s['prepare_seconds'] - top_level:.2f}"

    add("  (other: concat, manifest, swap) s", other)
    headers = ("", *(c for c, _ in cols))
    widths = [max(len(h), *(len(x[i]) for x in lines)) for i, h in enumerate(headers)]
    m = report["machine"]
    print(f"\nfedcrm prepare, {report['rows']:,} rows x 10 columns (3 PII), chunk_rows="
          f"{report['chunk_rows'] or 'default'}, {m['usable_cpus']} CPUs, Python {m['python']}")
    print("  ".join(h.ljust(w) if i == 0 else h.rjust(w)
                    for i, (h, w) in enumerate(zip(headers, widths, strict=True))))
    for x in lines:
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                        for i, (c, w) in enumerate(zip(x, widths, strict=True))))
    for label, _ in cols:
        loads = [r["load_average_1m"] for r in (report.get("before", {}).get("runs", [])
                                                  if label == "before" else report["runs"])]
        print(f"{label}: 1-min load average before/after each run: "
              + ", ".join(f"{x['before']}/{x['after']}" for x in loads))
    s = report["summary"]
    print(f"target <= {TARGET_SECONDS:.0f} s: {'met' if s['meets_time'] else 'MISSED'} "
          f"({s['prepare_seconds']:.1f} s); <= {TARGET_RSS_MB:,.0f} MB peak RSS: "
          f"{'met' if s['meets_memory'] else 'MISSED'} ({s['peak_rss_mb']:,.0f} MB)")
    if report.get("top_functions"):
        print("\ncProfile (separate run, profiler overhead included), top functions by own time:")
        for f in report["top_functions"]:
            print(f"  {f['tottime_s']:8.2f} s own {f['cumtime_s']:8.2f} s cum "
                  f"{f['calls']:>9,} calls  {f['function']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--seed", type=int, default=20240601)
    parser.add_argument("--repeat", type=int, default=1, help="prepare runs; the fastest is kept")
    parser.add_argument("--chunk-rows", type=int, default=None,
                        help="source chunk_rows (default: the config default)")
    parser.add_argument("--cprofile", type=int, default=0,
                        help="also run once under cProfile and show this many functions")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="keep the CSV, keys and store here (reused across runs)")
    parser.add_argument("--before-tree", type=Path, default=None,
                        help="also run the fedcrm/privacy packages of this older checkout, "
                             "alternating with this one, and show both")
    parser.add_argument("--label", default=None, help="free text stored with the result")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--child", nargs=2, type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child[0], args.child[1], args.cprofile)
        return 0

    with tempfile.TemporaryDirectory(prefix="fedcrm-prepare-bench-") as tmp:
        root = args.workdir or Path(tmp)
        t0 = time.perf_counter()
        config = write_firm(root, rows=args.rows, seed=args.seed, chunk_rows=args.chunk_rows)
        csv_path = next(root.glob(f"customers-{args.rows}-{args.seed}.csv"))
        print(f"synthetic firm ready in {time.perf_counter() - t0:.1f} s: {csv_path} "
              f"({csv_path.stat().st_size / 2**20:.1f} MB)")
        runs: list[dict[str, Any]] = []
        before_runs: list[dict[str, Any]] = []
        for i in range(args.repeat):
            if args.before_tree is not None:
                before_runs.append(run_child(config, tree=args.before_tree))
                r = before_runs[-1]
                print(f"run {i + 1} before: prepare {r['prepare_seconds']:.2f} s, CPU "
                      f"{r['cpu_seconds']:.1f} s, peak RSS {r['peak_rss_mb']:,.0f} MB, "
                      f"load {r['load_average_1m']}", flush=True)
            runs.append(run_child(config))
            r = runs[-1]
            print(f"run {i + 1}{' after' if before_runs else ''}: prepare "
                  f"{r['prepare_seconds']:.2f} s, CPU {r['cpu_seconds']:.1f} s, peak RSS "
                  f"{r['peak_rss_mb']:,.0f} MB, load {r['load_average_1m']}", flush=True)
        top: list[dict[str, Any]] = []
        if args.cprofile:
            top = run_child(config, cprofile=args.cprofile)["top_functions"]
        report: dict[str, Any] = {
            "benchmark": "fedcrm.data.prepare",
            "timestamp": datetime.now(UTC).isoformat(timespec="seconds"),
            "label": args.label,
            "rows": args.rows,
            "columns": 10,
            "pii_columns": {c: s["policy"] for c, s in COLUMNS.items() if s["role"] == "pii"},
            "chunk_rows": args.chunk_rows,
            "seed": args.seed,
            "csv_mb": round(csv_path.stat().st_size / 2**20, 1),
            "target": {"seconds": TARGET_SECONDS, "peak_rss_mb": TARGET_RSS_MB},
            "machine": machine(),
            "summary": summarize(runs, rows=args.rows),
            "runs": runs,
            "top_functions": top,
        }
        if before_runs:
            report["before"] = {"tree": str(args.before_tree),
                                "summary": summarize(before_runs, rows=args.rows),
                                "runs": before_runs}
    print_report(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
