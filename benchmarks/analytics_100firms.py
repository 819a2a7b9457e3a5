"""Where the time of one query over 100 firms goes, in Flower's simulation engine.

Builds 100 CDNOW firms (the real prepare pipeline), then runs the built-in RFM segment-size query
once in plain mode and once over the secure sum (min_firms 80, 20 neighbours). A client mod
timestamps every message inside the firms' ClientApps, so the ServerApp's offer and answer
stages can be split into the firms' own work and the engine's latency (Ray's actors importing the
ClientApp on first contact, message passing).

Run: ``python benchmarks/analytics_100firms.py``; writes
``benchmarks/results/analytics_100firms.json``.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
QUERY = ROOT / "configs" / "queries" / "cdnow_rfm_segments.toml"


def main() -> None:
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    from fedcrm.coordinator.query_run import load_query_file
    from fedcrm.simulations.run import (
        ENGINE_LOG,
        SimulationConfig,
        SimulationSection,
        build_firms,
        engine_logs,
        run_flower_simulation,
        start_engine,
        stop_engine,
    )

    out: dict[str, Any] = {"firms": 100, "query": QUERY.name, "runs": []}
    with tempfile.TemporaryDirectory(prefix="fedcrm-q100-") as tmp:
        root = Path(tmp)
        cfg = SimulationConfig(simulation=SimulationSection(
            dataset="cdnow", firms=100, epsilon_budget=50.0, baseline=False, workdir=root))
        started = time.perf_counter()
        firms = build_firms(cfg, root / "firms100")
        out["prepare_seconds"] = round(time.perf_counter() - started, 1)
        base = load_query_file(QUERY)
        for secure in (False, True):
            log = root / f"messages-{secure}.jsonl"

            def mod(msg: Any, context: Any, call_next: Any, log: Path = log) -> Any:
                t, c = time.perf_counter(), time.process_time()
                reply = call_next(msg, context)
                with log.open("a") as fh:
                    fh.write(json.dumps({
                        "kind": msg.metadata.message_type, "at": time.time(),
                        "wall": time.perf_counter() - t, "cpu": time.process_time() - c,
                    }) + "\n")
                return reply

            query = base.query.model_copy(update={"min_firms": 80 if secure else 3})
            run_cfg = base.run_config().model_copy(update={"query": query})
            run_cfg = run_cfg.model_copy(update={"coordinator": run_cfg.coordinator.model_copy(
                update={"expected_firms": 100, "secure_sum": secure, "secure_sum_neighbours": 20,
                        "timeout": 600.0})})
            run_dir = root / "runs" / f"q100-{'secure' if secure else 'plain'}"
            run_dir.mkdir(parents=True)
            with engine_logs(run_dir / ENGINE_LOG):
                engine = time.perf_counter()
                start_engine(cfg.simulation)
                try:
                    run_flower_simulation(cfg, firms, run_id=run_dir.name, run_dir=run_dir,
                                          server_config=run_cfg, client_mods=[mod])
                finally:
                    stop_engine()
            result = json.loads((run_dir / "result.json").read_text())
            steps: dict[str, list[dict[str, float]]] = defaultdict(list)
            for line in log.read_text().splitlines():
                row = json.loads(line)
                steps[row["kind"]].append(row)
            out["runs"].append({
                "mode": "secure" if secure else "plain", "status": result["status"],
                "answered": len(result["answered_by"]),
                "serverapp_seconds": result["seconds"], "serverapp_stages": result["timings"],
                "wall_with_engine_start": round(time.perf_counter() - engine, 1),
                "firm_side": {
                    kind: {"messages": len(rows),
                           "handler_wall_sum": round(sum(r["wall"] for r in rows), 2),
                           "handler_cpu_sum": round(sum(r["cpu"] for r in rows), 2),
                           "span_first_to_last": round(
                               max(r["at"] for r in rows) - min(r["at"] - r["wall"] for r in rows),
                               2)}
                    for kind, rows in steps.items()
                },
                "load_average": Path("/proc/loadavg").read_text().split()[:3],
            })
            print(json.dumps(out["runs"][-1], indent=1))
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "analytics_100firms.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
