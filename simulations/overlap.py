"""``fedcrm overlap`` on two simulated firms that share a known number of customers.

The ``[simulation]`` section of an overlap file splits the public Telco customers into the two
firms the overlap names, gives each its synthetic contact details (as ``fedcrm simulate`` does)
and then makes ``shared`` of the second firm's customers the first firm's: the same mobile
numbers, written the other way (``+86 139 1234 5678`` against ``139-1234-5678``), so both firms'
normalisation is exercised. Each firm gets its own export, config (``[overlap] column =
"phone"``, the other firm as its peer), keys and ledger; the count then runs in Flower's
simulation engine and the result lands in ``runs/<overlap-id>/`` with the true overlap (which
only the simulation knows) beside the noisy estimate.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from fedcrm.config_file import validate
from fedcrm.coordinator.overlap_run import RESULT_JSON, OverlapFileConfig
from fedcrm.coordinator.runs import new_run_id
from fedcrm.privacy.keys import init_keys
from fedcrm.privacy.match_keys import normalise_keys
from fedcrm.privacy.policies import PiiKind
from fedcrm.simulations.datasets import load_telco
from fedcrm.simulations.partners import public_size, telco_export, telco_firm_config, write_toml
from fedcrm.simulations.run import (
    SimFirm,
    SimulationConfig,
    SimulationSection,
    run_flower_simulation,
    start_engine,
    stop_engine,
)


class OverlapSimulation(BaseModel):
    """``[simulation]`` of an overlap file: two Telco firms sharing ``shared`` customers."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    shared: int = Field(default=500, ge=0, description="customers the two firms share")
    seed: int = Field(default=0, description="seed of the split and of the synthetic contacts")
    epsilon_budget: float = Field(default=3.0, gt=0, le=100, allow_inf_nan=False)
    delta: float = Field(default=1e-5, gt=0, lt=1e-2)
    workdir: Path = Path("runs")


@dataclass(frozen=True)
class OverlapFirms:
    firms: list[SimFirm]
    true_overlap: int


def build_overlap_firms(
    file_cfg: OverlapFileConfig, sim: OverlapSimulation, run_dir: Path,
    *, on_firm: Callable[[str, int], None] | None = None,
) -> OverlapFirms:
    """The two firms' exports, configs and keys; returns them and the true overlap."""
    spec = file_cfg.overlap
    if spec.key is not PiiKind.PHONE:
        raise ValueError("simulated firms share customers by phone: set key = \"phone\"")
    telco = load_telco()
    rng = np.random.default_rng(sim.seed)
    order = rng.permutation(len(telco))
    half = len(telco) // 2
    parts = [telco.iloc[order[:half]], telco.iloc[order[half:]]]
    if sim.shared > min(len(p) for p in parts):
        raise ValueError(f"shared = {sim.shared} exceeds a firm's {half} customers")
    exports = [telco_export(part, seed=sim.seed * 1000 + i) for i, part in enumerate(parts)]
    first = exports[0]["phone"].iloc[:sim.shared]
    exports[1].loc[exports[1].index[:sim.shared], "phone"] = [
        f"+86 {p.replace('-', ' ')}" for p in first
    ]
    roots = [run_dir / "firms" / name for name in spec.firms]
    firms = []
    for i, (name, root, export) in enumerate(zip(spec.firms, roots, exports, strict=True)):
        root.mkdir(parents=True, exist_ok=True)
        export.to_csv(root / "customers.csv", index=False)
        peer, peer_root = spec.firms[1 - i], roots[1 - i]
        data = telco_firm_config(
            firm=name, csv_path=Path("customers.csv"), keys_dir=Path("keys"),
            store_dir=Path("store"), epsilon=sim.epsilon_budget, delta=sim.delta,
            public_size=public_size(len(export)),
        )
        data["overlap"] = {"column": "phone", "region": "CN",
                           "peers": {peer: str((peer_root / "keys" / "signing.pub").resolve())}}
        data["federation"]["max_query_epsilon"] = max(1.0, spec.epsilon)
        config = write_toml(root / "firm.toml", data)
        init_keys(root / "keys", firm=name)
        shutil.copy(root / "keys" / "signing.pub", root / "signing.pub")  # for auditors
        firms.append(SimFirm(name, config, len(export)))
        if on_firm is not None:
            on_firm(name, len(export))
    keys = [normalise_keys(e["phone"], kind=PiiKind.PHONE, region="CN").keys for e in exports]
    return OverlapFirms(firms=firms, true_overlap=len(keys[0] & keys[1]))


def simulate_overlap(
    file_cfg: OverlapFileConfig, *, run_id: str | None = None,
    on_firm: Callable[[str, int], None] | None = None,
) -> tuple[Path, dict[str, Any]]:
    """Build the two firms and count their overlap in Flower's simulation engine; returns the
    overlap's run directory and its result (with ``true_overlap`` added)."""
    sim = validate(OverlapSimulation, file_cfg.simulation or {}, where="overlap file",
                   prefix="simulation")
    run_id = run_id or new_run_id(file_cfg.overlap.name.replace("_", "-"))
    run_dir = (sim.workdir / run_id).resolve()
    run_dir.mkdir(parents=True, exist_ok=False)
    engine = SimulationConfig(simulation=SimulationSection(
        firms=2, baseline=False, seed=sim.seed, epsilon_budget=sim.epsilon_budget,
        delta=sim.delta, workdir=sim.workdir, actors=2,
    ))
    started = time.perf_counter()
    try:
        built = build_overlap_firms(file_cfg, sim, run_dir, on_firm=on_firm)
        start_engine(engine.simulation)
        prepared = time.perf_counter()
        run_cfg = file_cfg.run_config()
        run_cfg = run_cfg.model_copy(update={
            "coordinator": run_cfg.coordinator.model_copy(update={"expected_firms": 2})
        })
        run_flower_simulation(engine, built.firms, run_id=run_id, run_dir=run_dir,
                              server_config=run_cfg)
    finally:
        stop_engine()
    path = run_dir / RESULT_JSON
    if not path.exists():
        raise RuntimeError(f"the overlap wrote no {RESULT_JSON} in {run_dir}; see events.jsonl")
    result: dict[str, Any] = json.loads(path.read_text())
    result["true_overlap"] = built.true_overlap
    result["timings"] = {"build_seconds": round(prepared - started, 3),
                         "overlap_seconds": round(time.perf_counter() - prepared, 3)}
    return run_dir, result
