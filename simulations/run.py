"""Federated simulations on real public data (``fedcrm simulate --config ...``).

Each simulated firm gets its own export file, config, keys, prepared encrypted store and privacy
ledger under ``runs/<run-id>/firms/<firm>/`` and runs the full client pipeline
(validate -> mask -> encrypt -> DP train) inside Flower's simulation engine. The coordinator's
ServerApp writes ``runs/<run-id>/summary.json``; this harness then adds the centralized
baseline(s), computed on the SAME prepared features and the SAME held-out customers.

Splits:
* Telco, ``split = "dirichlet"``: non-IID by contract type - for each contract type
  (month-to-month / one year / two year) its customers are divided among the firms in
  proportions drawn from Dirichlet(alpha); small alpha = very different firms.
* CDNOW: customers (all of a customer's purchases together) are divided among firms by a seeded
  random permutation, so each firm's customer base is a different cohort sample.

Logs: Flower's log lines, the driver's Ray messages and Python warnings go to
``runs/<run-id>/flower.log``, not the terminal, unless ``verbose`` (then they go to both, coloured
only on a terminal). Ray's worker processes (the firms' ClientApps) write to Ray's own session log
folder and are forwarded to the terminal only when ``verbose``.

The harness runs Flower's ``flwr.simulation.run_simulation``, which Flower 1.41 marks deprecated
in favour of ``flwr run`` against a SuperLink's simulation runtime; docs/architecture.md
("Simulations") says why that entry point does not fit here.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, model_validator

from fedcrm.config_file import load_toml
from fedcrm.coordinator.run_config import RunConfig
from fedcrm.coordinator.runs import load_summary, new_run_id, write_summary
from fedcrm.data.contract import FirmConfig, load_firm_config
from fedcrm.data.prepare import prepare
from fedcrm.privacy.keys import init_keys, write_signing_key
from fedcrm.protocol import TaskKind
from fedcrm.simulations.datasets import load_cdnow, load_telco, telco_schema
from fedcrm.simulations.partners import (
    cdnow_export,
    cdnow_firm_config,
    public_size,
    telco_export,
    telco_firm_config,
    write_toml,
)


class Dataset(StrEnum):
    TELCO = "telco"
    CDNOW = "cdnow"


class Split(StrEnum):
    DIRICHLET = "dirichlet"  # per contract type (Telco) or at random, by Dirichlet(alpha) shares
    RANDOM = "random"


class PartnerScenario(BaseModel):
    """Which public data set is split into how many partner firms, and their budgets."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    name: str = Field(default="simulation", pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]{0,40}$")
    dataset: Dataset = Dataset.TELCO
    firms: int = Field(default=5, ge=1, le=1000)
    split: Split = Split.DIRICHLET
    dirichlet_alpha: float = Field(default=0.5, gt=0, allow_inf_nan=False)
    seed: int = Field(default=0, description="seed of the split into firms and of their PII")
    epsilon_budget: float = Field(
        default=1.0, gt=0, le=100, allow_inf_nan=False, description="each firm's total ε cap"
    )
    delta: float = Field(default=1e-5, gt=0, lt=1e-2)
    gbk_firms: int = Field(default=1, ge=0, description="how many firms export GB18030 CSV")
    workdir: Path = Path("runs")


class SimulationSection(PartnerScenario):
    """``[simulation]``: a scenario run in one process with Flower's simulation engine."""

    baseline: bool = True
    exhausted_firms: int = Field(
        default=0,
        ge=0,
        description="the first N firms start with their budget already spent by an earlier release",
    )
    actors: int = Field(
        default=0,
        ge=0,
        description="Ray actors (processes) that run the firms' ClientApps; 0 = one per CPU",
    )


def with_public_schema(run: RunConfig, scenario: PartnerScenario) -> RunConfig:
    """A churn run on Telco without a declared schema gets the Telco data dictionary's."""
    if run.task is TaskKind.CHURN and not run.feature_schema and scenario.dataset is Dataset.TELCO:
        return run.model_copy(update={"feature_schema": telco_schema().canonical_json()})
    return run


class SimulationConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    simulation: SimulationSection = SimulationSection()
    run: RunConfig = RunConfig()

    @model_validator(mode="after")
    def _public_schema(self) -> SimulationConfig:
        # set once while validating (the model is frozen afterwards)
        object.__setattr__(self, "run", with_public_schema(self.run, self.simulation))
        return self


def load_simulation_config(path: Path) -> SimulationConfig:
    """``[simulation]`` + ``[run]``."""
    return load_toml(Path(path), SimulationConfig, what="simulation config")


PEER_KEYS_DIR = "peer-keys"
"""In a run directory: every simulated firm's signing.pub as <firm>.pub (each firm's
``peer_keys_dir``)."""


@dataclass(frozen=True)
class SimFirm:
    name: str
    config: Path
    rows: int


def split_telco(telco: pd.DataFrame, sim: SimulationSection) -> list[pd.DataFrame]:
    rng = np.random.default_rng(sim.seed)
    assignment = np.empty(len(telco), dtype=int)
    if sim.split is Split.RANDOM:
        assignment[:] = rng.integers(0, sim.firms, len(telco))
    else:
        for _, idx in telco.groupby("contract").indices.items():
            idx = rng.permutation(idx)
            props = rng.dirichlet([sim.dirichlet_alpha] * sim.firms)
            cuts = (np.cumsum(props)[:-1] * len(idx)).astype(int)
            for firm, part in enumerate(np.split(idx, cuts)):
                assignment[part] = firm
    return [telco.iloc[np.flatnonzero(assignment == f)] for f in range(sim.firms)]


def split_cdnow(tx: pd.DataFrame, sim: SimulationSection) -> list[pd.DataFrame]:
    rng = np.random.default_rng(sim.seed)
    customers = tx["customer_id"].unique()
    firm_of = dict(
        zip(rng.permutation(customers), np.arange(len(customers)) % sim.firms, strict=True)
    )
    labels = tx["customer_id"].map(firm_of).to_numpy()
    return [tx[labels == f] for f in range(sim.firms)]


ExportHook = Callable[[str, pd.DataFrame], pd.DataFrame]
"""``(firm, export) -> export``: rewrites a firm's export before it is written and prepared (a
hostile firm's altered data in the poisoning benchmark, :mod:`fedcrm.simulations.poisoning`)."""


def build_firms(
    cfg: SimulationConfig,
    run_dir: Path,
    *,
    on_firm: Callable[[str, int], None] | None = None,
    alter_export: ExportHook | None = None,
) -> list[SimFirm]:
    """Create every firm's export, config, keys and prepared store (the client pipeline)."""
    sim = cfg.simulation
    firms: list[SimFirm] = []
    if sim.dataset is Dataset.TELCO:
        parts = split_telco(load_telco(), sim)
    else:
        parts = split_cdnow(load_cdnow(), sim)
    training = None
    for i, part in enumerate(parts):
        name = f"firm{i + 1:03d}" if sim.firms > 9 else f"firm{i + 1}"
        root = run_dir / "firms" / name
        root.mkdir(parents=True, exist_ok=True)
        cap = sim.epsilon_budget
        if sim.dataset is Dataset.TELCO:
            encoding = "gb18030" if i < sim.gbk_firms else "utf-8"
            export = telco_export(part, seed=sim.seed * 1000 + i)
            if alter_export is not None:
                export = alter_export(name, export)
            export.to_csv(root / "customers.csv", index=False, encoding=encoding)
            os.chmod(root / "customers.csv", 0o600)  # (synthetic) personal data
            data = telco_firm_config(
                firm=name,
                csv_path=Path("customers.csv"),
                keys_dir=Path("keys"),
                store_dir=Path("store"),
                epsilon=cap,
                delta=sim.delta,
                encoding=encoding,
                training=training,
                public_size=public_size(len(part)),
            )
        else:
            export = cdnow_export(part)
            if alter_export is not None:
                export = alter_export(name, export)
            export.to_csv(root / "transactions.csv", index=False)
            os.chmod(root / "transactions.csv", 0o600)
            data = cdnow_firm_config(
                firm=name,
                csv_path=Path("transactions.csv"),
                keys_dir=Path("keys"),
                store_dir=Path("store"),
                epsilon=cap,
                delta=sim.delta,
                training=training,
                public_size=public_size(int(part["customer_id"].nunique())),
            )
        # The firms' signing keys, as each firm would receive its peers' out of band: a peer's
        # secure-sum key counts only if the key held here signed it.
        data.setdefault("federation", {})["peer_keys_dir"] = f"../../{PEER_KEYS_DIR}"
        config = write_toml(root / "firm.toml", data)
        init_keys(root / "keys", firm=name)
        shutil.copy(root / "keys" / "signing.pub", root / "signing.pub")  # for auditors
        (run_dir / PEER_KEYS_DIR).mkdir(exist_ok=True)
        shutil.copy(root / "keys" / "signing.pub", run_dir / PEER_KEYS_DIR / f"{name}.pub")
        firm_cfg = load_firm_config(config)
        prepare(firm_cfg)
        if i < sim.exhausted_firms:
            _spend_budget(firm_cfg)
        firms.append(SimFirm(name, config, len(part)))
        if on_firm is not None:
            on_firm(name, len(part))
    return firms


def _spend_budget(cfg: FirmConfig) -> None:
    """Make an earlier (Gaussian) release that used 99.9% of the firm's budget."""
    from fedcrm.privacy.accounting import Mechanism, calibrate_noise, make_event
    from fedcrm.privacy.keys import load_keys
    from fedcrm.release import FirmPrivacy, release

    sigma = calibrate_noise(
        target_epsilon=cfg.budget.epsilon * 0.999, delta=cfg.budget.delta, sample_rate=1.0, steps=1
    )
    event = make_event(
        mechanism=Mechanism.GAUSSIAN,
        noise_multiplier=sigma,
        sample_rate=1.0,
        steps=1,
        delta=cfg.budget.delta,
        purpose="analytics:earlier-query",
    )
    release(FirmPrivacy(cfg, load_keys(cfg.firm.keys_dir)), event, lambda: None)


def _engine_cpus(sim: SimulationSection) -> int:
    """CPUs given to Ray = number of ClientApp actors (each actor takes one)."""
    return sim.actors or max(1, os.cpu_count() or 1)


#: Imported by each Ray worker as it starts, before Flower hands it a ClientApp actor.
CLIENT_APP_MODULE = "fedcrm.clients.client_app"

#: The run folder's log of Flower, Ray (driver side) and Python warnings.
ENGINE_LOG = "flower.log"


def _ray_init_args(sim: SimulationSection, *, verbose: bool = False) -> dict[str, Any]:
    return {
        "num_cpus": _engine_cpus(sim),
        "include_dashboard": False,
        "logging_level": "info" if verbose else "error",
        "log_to_driver": verbose,
        "_system_config": {"preload_python_modules": [CLIENT_APP_MODULE]},
    }


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


class _PlainText(logging.Filter):
    """Strip ANSI colour codes from a record (Ray colours the tracebacks it forwards); a filter,
    not a formatter, because Ray replaces the formatters of its logger's handlers."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "\x1b[" in message:
            record.msg, record.args = _ANSI.sub("", message), ()
        if record.exc_text and "\x1b[" in record.exc_text:
            record.exc_text = _ANSI.sub("", record.exc_text)
        return True


@contextlib.contextmanager
def engine_logs(log_file: Path, *, verbose: bool = False) -> Iterator[Path]:
    """Send Flower's and Ray's log lines and Python warnings to ``log_file`` for the duration.

    Flower logs through its ``flwr`` logger to a console handler that writes ANSI colour codes
    whatever the stream is; quiet (the default), that handler is detached and the lines go to the
    file only. ``verbose`` keeps it, coloured only when stderr is a terminal, and writes the file
    too. Everything is restored on exit.
    """
    import flwr.common.logger  # noqa: F401 - creates Flower's console handler, to detach it now

    file_handler = logging.FileHandler(log_file, encoding="utf-8")
    file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    file_handler.setLevel(logging.DEBUG if verbose else logging.INFO)
    file_handler.addFilter(_PlainText())
    flwr_logger = logging.getLogger("flwr")
    consoles = [h for h in flwr_logger.handlers if type(h).__name__ == "ConsoleHandler"]
    colours = {h: getattr(h, "colored", None) for h in consoles}
    others = [logging.getLogger(name) for name in ("ray", "py.warnings")]
    levels = {lg: lg.level for lg in others}
    if not verbose:
        for handler in consoles:
            flwr_logger.removeHandler(handler)
    else:
        for handler in consoles:
            handler.colored = sys.stderr.isatty()  # type: ignore[attr-defined]
    flwr_logger.addHandler(file_handler)
    for lg in others:
        lg.addHandler(file_handler)
        lg.setLevel(logging.INFO)
    capturing = logging.getLogger("py.warnings").propagate
    logging.getLogger("py.warnings").propagate = verbose
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")  # Ray's FutureWarning tip
    logging.captureWarnings(True)
    try:
        yield log_file
    finally:
        logging.captureWarnings(False)
        logging.getLogger("py.warnings").propagate = capturing
        flwr_logger.removeHandler(file_handler)
        for lg in others:
            lg.removeHandler(file_handler)
            lg.setLevel(levels[lg])
        for handler in consoles:
            if handler not in flwr_logger.handlers:
                flwr_logger.addHandler(handler)
            if colours[handler] is not None:
                handler.colored = colours[handler]  # type: ignore[attr-defined]
        file_handler.close()


def start_engine(sim: SimulationSection, *, verbose: bool = False) -> None:
    """Start Ray for Flower's simulation engine now, as its Ray backend would (it reuses it).

    Ray prestarts one idle worker process per CPU at ``ray.init``, and Flower's ClientApp actors
    take over those workers when they run in the job's own environment. So the harness passes
    ``PYTHONPATH`` through the environment (Flower's backend sets it there too) rather than a
    ``runtime_env``, and has the workers preload the ClientApp's module (torch, pandas, flwr:
    seconds of imports): Ray's start and the workers' imports then overlap the firms' prepare
    instead of following it.
    """
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    import ray

    if ray.is_initialized():
        return
    pythonpath = os.pathsep.join(sys.path)
    if os.environ.get("PYTHONPATH"):
        pythonpath = f"{pythonpath}{os.pathsep}{os.environ['PYTHONPATH']}"
    os.environ["PYTHONPATH"] = pythonpath
    ray.init(**_ray_init_args(sim, verbose=verbose))


def _import_apps() -> None:
    """Import Flower's simulation engine and the fedcrm apps (seconds of imports, overlapped)."""
    import flwr.simulation  # noqa: F401

    import fedcrm.clients.client_app
    import fedcrm.server.server_app  # noqa: F401


def stop_engine() -> None:
    """Shut Ray down if a failed run left it up (Flower's backend stops it after a run)."""
    import ray

    if ray.is_initialized():
        ray.shutdown()


def run_flower_simulation(
    cfg: SimulationConfig,
    firms: list[SimFirm],
    *,
    run_id: str,
    run_dir: Path,
    client_mods: list[Any] | None = None,
    server_config: Any = None,
    verbose: bool = False,
) -> None:
    """Run the ServerApp and one ClientApp per firm in Flower's simulation engine.

    ``server_config`` replaces the ServerApp's config (an analytics query's
    :class:`~fedcrm.coordinator.query_run.QueryRunConfig`); by default it runs ``cfg.run``.
    """
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    from flwr.simulation import run_simulation

    from fedcrm.clients.client_app import make_client_app
    from fedcrm.privacy.keys import ENV_COORDINATOR_KEY as COORDINATOR_KEY_ENV
    from fedcrm.server.server_app import make_server_app

    mapping = {i: str(f.config.resolve()) for i, f in enumerate(firms)}
    coordinator_key = run_dir / "coordinator" / "signing.key"
    if not coordinator_key.exists():
        write_signing_key(coordinator_key)
    os.environ[COORDINATOR_KEY_ENV] = str(coordinator_key)
    run_simulation(
        server_app=make_server_app(
            server_config or cfg.run.model_copy(update={"expected_firms": len(firms)}),
            run_id=run_id,
            run_dir=str(run_dir.resolve()),
        ),
        client_app=make_client_app(mapping, mods=client_mods),
        num_supernodes=len(firms),
        backend_config={
            "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
            "init_args": _ray_init_args(cfg.simulation, verbose=verbose),
        },
        verbose_logging=False,  # DEBUG lines would also turn Flower's colours back on
    )


def centralized_baseline(
    firms: list[SimFirm], cfg: SimulationConfig, model_path: Path | None
) -> dict[str, Any]:
    """Baselines on the pooled prepared data: same features, same held-out customers."""
    from fedcrm.simulations import baselines

    if cfg.run.task is TaskKind.CHURN:
        return baselines.churn_baselines(firms, model_path)
    return baselines.trend_baselines(firms, model_path)


def simulate(
    cfg: SimulationConfig,
    *,
    run_id: str | None = None,
    on_firm: Callable[[str, int], None] | None = None,
    on_phase: Callable[[str], None] | None = None,
    client_mods: list[Any] | None = None,
    verbose: bool = False,
    alter_export: ExportHook | None = None,
) -> tuple[Path, dict[str, Any]]:
    """The whole simulation; returns the run directory and the final summary. Flower's and Ray's
    logs go to ``<run dir>/flower.log`` (and the terminal too if ``verbose``)."""
    sim = cfg.simulation
    run_id = run_id or new_run_id(sim.name)
    run_dir = (sim.workdir / run_id).resolve()
    run_dir.mkdir(parents=True, exist_ok=False)
    started = time.perf_counter()
    phase = on_phase or (lambda _p: None)
    phase("prepare")
    # The firms are prepared in a thread while this (main) thread starts Ray: ray.init mostly
    # waits for Ray's processes, and it must run in the main thread (its child processes are
    # tied to the thread that starts them).
    with engine_logs(run_dir / ENGINE_LOG, verbose=verbose):
        try:
            with ThreadPoolExecutor(max_workers=2, thread_name_prefix="prepare") as pool:
                building = pool.submit(
                    build_firms, cfg, run_dir, on_firm=on_firm, alter_export=alter_export
                )
                importing = pool.submit(_import_apps)
                try:
                    start_engine(sim, verbose=verbose)
                finally:
                    firms = building.result()
                    importing.result()
            prepared = time.perf_counter()
            phase("federate")
            run_flower_simulation(cfg, firms, run_id=run_id, run_dir=run_dir,
                                  client_mods=client_mods, verbose=verbose)
        finally:
            stop_engine()
    federated = time.perf_counter()
    summary = load_summary(run_dir)
    if sim.baseline:
        phase("baseline")
        model = Path(summary["model"]) if summary.get("model") else None
        summary["baseline"] = centralized_baseline(firms, cfg, model)
    by_name = {f.name: f for f in firms}
    for entry in summary["firms"]:
        fcfg = load_firm_config(by_name[entry["firm"]].config) if entry["firm"] in by_name else None
        if fcfg is not None:
            entry["delta"] = fcfg.budget.delta
            entry["ledger"] = str(fcfg.ledger_path)
            entry["audit_log"] = str(fcfg.audit_path)
    summary["ledgers"] = {f["firm"]: f.get("ledger") for f in summary["firms"]}
    summary["simulation"] = sim.model_dump(mode="json")
    summary["timings"] = {
        "prepare_seconds": round(prepared - started, 3),
        "federation_seconds": round(federated - prepared, 3),
        "total_seconds": round(time.perf_counter() - started, 3),
    }
    write_summary(run_dir, summary)
    return run_dir, summary
