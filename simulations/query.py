"""``fedcrm query`` on a simulated federation: public data split into firms, one query.

The ``[simulation]`` section of a query file is the partner scenario of ``fedcrm simulate``
(dataset, number of firms, split, budgets); each firm is built exactly as there (export ->
validate -> mask -> encrypt), then the query runs in Flower's simulation engine and the result
lands in ``runs/<query-id>/``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from fedcrm.config_file import validate
from fedcrm.coordinator.query_run import RESULT_JSON, QueryFileConfig
from fedcrm.coordinator.runs import new_run_id
from fedcrm.simulations.run import (
    ENGINE_LOG,
    SimFirm,
    SimulationConfig,
    SimulationSection,
    _import_apps,
    build_firms,
    engine_logs,
    run_flower_simulation,
    start_engine,
    stop_engine,
)


def simulation_of(file_cfg: QueryFileConfig) -> SimulationConfig:
    """The query file's ``[simulation]`` as a simulation config (no baseline: nothing trains)."""
    section = validate(
        SimulationSection, {"baseline": False, **(file_cfg.simulation or {})},
        where="query file", prefix="simulation",
    )
    return SimulationConfig(simulation=section)


def simulate_query(
    file_cfg: QueryFileConfig,
    *,
    run_id: str | None = None,
    on_firm: Callable[[str, int], None] | None = None,
    firms: list[SimFirm] | None = None,
    workdir: Path | None = None,
    verbose: bool = False,
) -> tuple[Path, dict[str, Any]]:
    """Build the firms (unless ``firms`` are given, e.g. to query them again) and run the query;
    returns the query's run directory and its result. Flower's and Ray's logs go to
    ``<run dir>/flower.log`` (and the terminal too if ``verbose``)."""
    import json

    cfg = simulation_of(file_cfg)
    sim = cfg.simulation
    run_id = run_id or new_run_id(file_cfg.query.name.replace("_", "-"))
    run_dir = ((workdir or sim.workdir) / run_id).resolve()
    run_dir.mkdir(parents=True, exist_ok=False)
    started = time.perf_counter()
    with engine_logs(run_dir / ENGINE_LOG, verbose=verbose):
        try:
            with ThreadPoolExecutor(max_workers=2, thread_name_prefix="prepare") as pool:
                building = (pool.submit(build_firms, cfg, run_dir, on_firm=on_firm)
                            if firms is None else None)
                importing = pool.submit(_import_apps)
                try:
                    start_engine(sim, verbose=verbose)
                finally:
                    built = building.result() if building is not None else firms
                    importing.result()
            assert built is not None
            prepared = time.perf_counter()
            query_cfg = file_cfg.run_config()
            query_cfg = query_cfg.model_copy(update={
                "coordinator": query_cfg.coordinator.model_copy(
                    update={"expected_firms": len(built)})
            })
            run_flower_simulation(cfg, built, run_id=run_id, run_dir=run_dir,
                                  server_config=query_cfg, verbose=verbose)
        finally:
            stop_engine()
    result_path = run_dir / RESULT_JSON
    if not result_path.exists():
        raise RuntimeError(f"the query wrote no {RESULT_JSON} in {run_dir}; see its events.jsonl")
    result: dict[str, Any] = json.loads(result_path.read_text())
    result["harness_timings"] = {
        "prepare_seconds": round(prepared - started, 3),
        "engine_and_query_seconds": round(time.perf_counter() - prepared, 3),
    }
    return run_dir, result
