"""``fedcrm deploy local``: the real fedcrm apps on a real Flower deployment on this machine.

Where ``fedcrm simulate`` runs the firms inside Flower's simulation engine, this starts the
same processes a multi-host federation runs (``docs/deployment.md``), all on 127.0.0.1:

1. N firms from a public dataset, each with its own export, config, data keys and prepared
   encrypted store (the same :func:`simulations.run.build_firms` as the simulations);
2. a federation CA, a SuperLink certificate and one SuperNode key per firm, all generated
   into the run's directory with mode 0600 (never into configs or the app bundle);
3. a :class:`fedcrm.coordinator.local_deployment.LocalFederation` with the real ServerApp /
   ClientApp: a TLS SuperLink with SuperNode authentication behind the Fleet gateway, one
   ``flower-supernode`` and one ClientApp process per firm whose only node config is the
   absolute path of its firm config, the run submitted with ``flwr run`` and followed to the end.

The ServerApp writes ``<workdir>/<run-id>/summary.json``; this adds the deployment's facts
(Flower run id, status, node ids, duration) and each firm's δ and ledger path. Every process is
stopped before :func:`run_local_deployment` returns or raises, also on Ctrl-C.

Config (``configs/deploy/local.toml``): ``[deploy]`` (:class:`DeploySection`) and ``[run]``
(:class:`fedcrm.run_config.RunConfig`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from fedcrm.clients.node import firm_node_config, start_supernode
from fedcrm.config_file import load_toml
from fedcrm.coordinator.app_bundle import AppSpec
from fedcrm.coordinator.events import EVENTS
from fedcrm.coordinator.host import default_run_timeout, use_coordinator_key
from fedcrm.coordinator.local_deployment import (
    DeployEvent,
    DeploymentResult,
    LocalFederation,
    LocalFirm,
)
from fedcrm.coordinator.run_config import RunConfig
from fedcrm.coordinator.runs import SUMMARY, load_summary, new_run_id, write_summary
from fedcrm.data.contract import load_firm_config
from fedcrm.privacy.errors import ConfigError
from fedcrm.simulations.run import (
    PartnerScenario,
    SimulationConfig,
    SimulationSection,
    build_firms,
    with_public_schema,
)

FEDERATION_DIR = "federation"


class DeploySection(PartnerScenario):
    """``[deploy]``: which firms to build and where the deployment's files go."""

    name: str = Field(default="deploy-local", pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]{0,40}$")
    firms: int = Field(default=3, ge=1, le=20, description="one SuperNode process per firm")
    workdir: Path = Path("runs/deploy")


class LocalDeployConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    deploy: DeploySection = DeploySection()
    run: RunConfig = RunConfig()

    @model_validator(mode="after")
    def _public_schema(self) -> LocalDeployConfig:
        # set once while validating (the model is frozen afterwards)
        object.__setattr__(self, "run", with_public_schema(self.run, self.deploy))
        return self


def load_local_deploy_config(path: Path) -> LocalDeployConfig:
    """``[deploy]`` + ``[run]`` (``deploy.workdir`` is relative to the current folder)."""
    return load_toml(Path(path), LocalDeployConfig, what="deployment config")


@dataclass(frozen=True)
class LocalDeployment:
    """A finished local deployment: the run's directory, its summary and the process facts."""

    run_id: str
    run_dir: Path
    summary: dict[str, Any]
    result: DeploymentResult

    @property
    def summary_path(self) -> Path:
        return self.run_dir / SUMMARY

    @property
    def completed(self) -> bool:
        return self.result.completed and self.summary.get("status") == "completed"


def _simulation_config(cfg: LocalDeployConfig, firms: int) -> SimulationConfig:
    scenario = cfg.deploy.model_dump(include=set(PartnerScenario.model_fields))
    return SimulationConfig(
        simulation=SimulationSection(**{**scenario, "firms": firms, "baseline": False}),
        run=cfg.run,
    )


def run_local_deployment(
    cfg: LocalDeployConfig,
    *,
    firms: int | None = None,
    run_id: str | None = None,
    on_firm: Callable[[str, int], None] | None = None,
    on_event: Callable[[DeployEvent], None] | None = None,
    run_timeout_s: float | None = None,
    on_federation: Callable[[LocalFederation], None] | None = None,
) -> LocalDeployment:
    """Build the firms, deploy the real fedcrm apps on 127.0.0.1, run, stop everything.

    ``firms`` overrides ``[deploy] firms``. The run directory is
    ``<deploy.workdir>/<run_id>``: ``firms/<firm>/`` (export, config, data keys, store, ledger),
    ``federation/`` (certs, node keys, SuperLink, SuperNodes, CLI home, app bundle and logs),
    and the ServerApp's ``summary.json``, ``model.pt`` and ``events.jsonl``. ``on_federation``
    receives the running federation before the run is submitted (tests use it to inject faults).
    """
    n = cfg.deploy.firms if firms is None else firms
    if n < 1:
        raise ConfigError(f"--firms must be at least 1 (got {n})")
    if n < cfg.run.min_firms:
        raise ConfigError(
            f"{n} firm(s) cannot meet [run] min_firms = {cfg.run.min_firms}; deploy more firms "
            "or lower min_firms"
        )
    rid = run_id or new_run_id(cfg.deploy.name)
    run_dir = (cfg.deploy.workdir / rid).resolve()
    if run_dir.exists():
        raise ConfigError(f"{run_dir} already exists; choose another run id")
    run_dir.mkdir(parents=True)

    sim_firms = build_firms(_simulation_config(cfg, n), run_dir, on_firm=on_firm)
    use_coordinator_key(run_dir / "coordinator" / "signing.key")
    nodes = [LocalFirm(f.name, firm_node_config(f.config)) for f in sim_firms]
    run_cfg = cfg.run.model_copy(update={"expected_firms": n})
    with LocalFederation(
        firms=nodes, workdir=run_dir / FEDERATION_DIR, start_node=start_supernode,
        app=AppSpec(), on_event=on_event,
    ) as federation:
        if on_federation is not None:
            on_federation(federation)
        result = federation.run(
            run_config=run_cfg.to_flower(run_id=rid, run_dir=run_dir),
            rounds=cfg.run.rounds,
            run_dir=run_dir,
            cfg=run_cfg,
            run_id=rid,
            events=run_dir / EVENTS,
            timeout_s=default_run_timeout(cfg.run) if run_timeout_s is None else run_timeout_s,
        )

    summary: dict[str, Any] = load_summary(run_dir) if (run_dir / SUMMARY).exists() else {}
    if summary:
        by_name = {f.name: f for f in sim_firms}
        for entry in summary.get("firms", []):
            if entry["firm"] in by_name:
                fcfg = load_firm_config(by_name[entry["firm"]].config)
                entry["delta"] = fcfg.budget.delta
                entry["ledger"] = str(fcfg.ledger_path)
                entry["audit_log"] = str(fcfg.audit_path)
        summary["deployment"] = {
            "flower_run_id": result.run_id,
            "flower_status": result.status.status_text,
            "superlink": result.superlink_address,
            "node_ids": dict(result.node_ids),
            "logs": {name: str(path) for name, path in result.logs.items()},
            "seconds": round(result.duration_s, 3),
            "attempts": [
                {"flower_run_id": a.flower_run_id, "ended": a.ended} for a in result.attempts
            ],
        }
        summary["deploy"] = cfg.deploy.model_dump(mode="json") | {"firms": n}
        write_summary(run_dir, summary)
    return LocalDeployment(run_id=rid, run_dir=run_dir, summary=summary, result=result)
