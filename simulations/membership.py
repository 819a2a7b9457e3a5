"""Membership inference against a simulation's released global churn model (``fedcrm audit mia``).

Who can run it: whoever holds the members' data. The attacks score every candidate customer,
members (each firm's training customers) and non-members (its held-out customers,
:func:`fedcrm.tasks.churn.holdout_mask`), and LiRA's shadow models train on them. A simulation's
run folder has all of it (``runs/<id>/firms/<firm>/``: each firm's config, keys and prepared
store), so this runs on a simulation; in a real federation no single party holds every firm's
customers. The auditor's package (:mod:`fedcrm.audit`) only renders the resulting ``mia.json``.

The shadow models repeat the run as the logs describe it, in-process: the same initial model,
and in every round each firm whose update the coordinator accepted takes the DP-SGD steps its
signed audit log records for that round (noise multiplier, sampling rate, steps; the run
config's clipping norm, learning rate and optimizer; the firm's public size as expected batch
normaliser) on its own share of the shadow's training set, then the coordinator's weighted mean
(FedAvg; for other strategies the shadows still average, an approximation recorded in the
result). Each shadow trains on a random subset of every firm's customers, each customer IN with
the probability that a customer is a member of the real run (80%), so that shadows see as much
data as the real firms did. Shadow noise comes from a seeded generator (reproducible; a shadow
is the attacker's simulation and never leaves the process).
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedcrm.audit.log import FIRMS_DIR, LOG_FILE, AuditEntry, EntryKind
from fedcrm.config_file import validate
from fedcrm.coordinator.run_config import RunConfig
from fedcrm.coordinator.runs import load_summary
from fedcrm.data.contract import load_firm_config
from fedcrm.data.store import load_store
from fedcrm.learning.dp_engine import DpPlan, train_dp
from fedcrm.learning.membership import (
    AttackResult,
    evaluate_attack,
    lira_scores,
    loss_scores,
    signed_logits,
)
from fedcrm.learning.models import (
    arrays_to_model,
    build_churn_model,
    churn_per_sample_loss,
    load_model,
    model_to_arrays,
)
from fedcrm.privacy.durable import write_atomic
from fedcrm.privacy.errors import AuditError, ConfigError
from fedcrm.privacy.keys import load_keys
from fedcrm.protocol import TaskKind
from fedcrm.tasks.churn import CHURN

MIA_FILE = "mia.json"
DEFAULT_SHADOWS = 32
#: Clipping norm that never binds: the non-DP contrast clips nothing.
_NO_CLIP = 1e6


@dataclass(frozen=True)
class FirmCustomers:
    """One firm's candidates: every customer's features and label, and who was a member."""

    firm: str
    x: np.ndarray
    y: np.ndarray
    member: np.ndarray
    public_size: int


@dataclass(frozen=True)
class FederatedProcedure:
    """How the run trained, as its logs tell it: the model, and per round the firms whose update
    was accepted with the DP-SGD plan each used."""

    run: RunConfig
    input_dim: int
    rounds: tuple[Mapping[str, DpPlan], ...]
    dp: bool = True

    def without_dp(self) -> FederatedProcedure:
        """The same rounds, firms and local steps with no clipping and no noise (the non-DP
        contrast: what the federation would release if firms sent plain updates)."""
        return replace(self, dp=False, rounds=tuple(
            {firm: replace(plan, noise_multiplier=0.0, max_grad_norm=_NO_CLIP)
             for firm, plan in plans.items()}
            for plans in self.rounds
        ))


def _firm_rounds(run_dir: Path, firm: str, run_id: str) -> dict[int, tuple[float, float, int]]:
    """(noise multiplier, sampling rate, steps) of the firm's training release in each round,
    from its signed audit log (the auditor's view of what it did)."""
    path = run_dir / FIRMS_DIR / firm / LOG_FILE
    if not path.is_file():
        raise ConfigError(f"{path} is missing: membership inference needs each firm's audit log")
    out = {}
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        try:
            entry = AuditEntry.from_dict(json.loads(line))
        except (ValueError, TypeError) as exc:
            raise AuditError(
                f"{path}:{n}: unreadable audit entry ({type(exc).__name__}); run `fedcrm audit "
                "verify` on the run folder"
            ) from None
        payload = entry.payload
        context = payload.get("context") or {}
        if (entry.kind is EntryKind.DP_RELEASE and str(payload.get("purpose", "")).startswith(
                "train:") and context.get("run_id") == run_id):
            out[int(context["round"])] = (
                float(payload["noise_multiplier"]), float(payload["sample_rate"]),
                int(payload["steps"]),
            )
    return out


def load_run(run_dir: Path) -> tuple[FederatedProcedure, list[FirmCustomers], Path]:
    """A simulation's procedure, every firm's candidates and the released model's path."""
    run_dir = Path(run_dir)
    summary = load_summary(run_dir)
    run = validate(RunConfig, summary.get("config") or {}, where=f"{run_dir}/summary.json config")
    if run.task is not TaskKind.CHURN:
        raise ConfigError(
            f"{run_dir}: membership inference is implemented for churn runs (this one is "
            f"{run.task.value})"
        )
    model_path = Path(str(summary.get("model") or ""))
    if not summary.get("model") or not model_path.is_file():
        model_path = run_dir / "model.pt"
    if not model_path.is_file():
        raise ConfigError(f"{run_dir} has no saved global model (model.pt); nothing to attack")
    run_id = str(summary.get("run_id") or run_dir.name)
    firms: list[FirmCustomers] = []
    plans: dict[str, dict[int, DpPlan]] = {}
    for entry in summary.get("firms", []):
        name = str(entry["firm"])
        config = run_dir / FIRMS_DIR / name / "firm.toml"
        if not config.is_file():
            raise ConfigError(
                f"{config} is missing: membership inference needs every firm's data (a "
                "simulation's run folder holds it; in a real federation no single party does)"
            )
        cfg = load_firm_config(config)
        store = load_store(cfg.prepared_dir, keys=load_keys(cfg.firm.keys_dir))
        data = CHURN.firm_data(cfg, store, schema=run.feature_schema)
        size = int(cfg.federation.public_size or entry.get("num_examples") or len(data.y_train))
        firms.append(FirmCustomers(
            firm=name,
            x=np.concatenate([data.x_train, data.x_test]),
            y=np.concatenate([data.y_train, data.y_test]),
            member=np.concatenate([np.ones(len(data.y_train), bool),
                                   np.zeros(len(data.y_test), bool)]),
            public_size=size,
        ))
        plans[name] = {
            r: DpPlan(steps=steps, sample_rate=q, noise_multiplier=sigma,
                      max_grad_norm=run.max_grad_norm, learning_rate=run.learning_rate,
                      delta=cfg.budget.delta, epochs=run.local_epochs,
                      expected_batch=size * q)
            for r, (sigma, q, steps) in _firm_rounds(run_dir, name, run_id).items()
        }
    if not firms:
        raise ConfigError(f"{run_dir}/summary.json lists no firms")
    rounds = []
    for detail in sorted(summary.get("rounds_detail", []), key=lambda d: d["server_round"]):
        r = int(detail["server_round"])
        accepted = {f: plans[f][r] for f in detail.get("accepted", []) if r in plans.get(f, {})}
        rounds.append(accepted)
    input_dim = firms[0].x.shape[1]
    return FederatedProcedure(run=run, input_dim=input_dim, rounds=tuple(rounds)), firms, model_path


def train_federated(
    procedure: FederatedProcedure,
    firms: Sequence[FirmCustomers],
    include: Sequence[np.ndarray],
    *,
    seed: int,
) -> torch.nn.Module:
    """Repeat the run in-process on the customers ``include`` marks (one mask per firm)."""
    torch.set_num_threads(1)  # small models: more threads only contend
    run = procedure.run
    generator = torch.Generator().manual_seed(seed)
    model = build_churn_model(run.model, procedure.input_dim, seed=run.seed)
    global_arrays = model_to_arrays(model)
    by_name = {f.firm: (f, mask) for f, mask in zip(firms, include, strict=True)}
    for plans in procedure.rounds:
        updates, weights = [], []
        for name, plan in sorted(plans.items()):
            firm, mask = by_name[name]
            local = arrays_to_model(build_churn_model(run.model, procedure.input_dim),
                                    global_arrays)
            if mask.any():
                anchors = [p.detach().clone() for p in local.parameters()]
                train_dp(
                    local, torch.as_tensor(firm.x[mask]), torch.as_tensor(firm.y[mask]),
                    per_sample_loss=churn_per_sample_loss, plan=plan, generator=generator,
                    optimizer=run.optimizer,
                    proximal=(anchors, run.proximal_mu) if run.strategy.value == "fedprox"
                    else None,
                )
            updates.append(model_to_arrays(local))
            weights.append(float(firm.public_size))
        if updates:
            w = np.asarray(weights) / sum(weights)
            global_arrays = [
                np.sum([wi * u[k] for wi, u in zip(w, updates, strict=True)], axis=0).astype(
                    global_arrays[k].dtype)
                for k in range(len(global_arrays))
            ]
    return arrays_to_model(model, global_arrays)


@dataclass(frozen=True)
class MembershipReport:
    """What the attacks achieved against one released model (``mia.json``)."""

    run_id: str
    model: str
    dp: bool
    epsilon: Mapping[str, float]
    attacks: tuple[AttackResult, ...]
    shadows: int
    shadow_in_probability: float
    strategy: str
    seconds: float
    notes: tuple[str, ...] = field(default=())

    def to_json(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id, "model": self.model, "dp": self.dp,
            "epsilon": dict(self.epsilon), "epsilon_max": max(self.epsilon.values(), default=0.0),
            "attacks": {a.attack: a.to_json() for a in self.attacks},
            "shadows": self.shadows, "shadow_in_probability": self.shadow_in_probability,
            "strategy": self.strategy, "seconds": round(self.seconds, 1),
            "notes": list(self.notes),
            "method": "loss threshold (Yeom et al. 2018); online LiRA with fixed variance "
                      "(Carlini et al. 2022) over shadow federations repeated from the run's "
                      "audit logs; members = firms' training customers, non-members = their "
                      "held-out customers",
        }


def attack_model(
    target: torch.nn.Module,
    procedure: FederatedProcedure,
    firms: Sequence[FirmCustomers],
    *,
    shadows: int = DEFAULT_SHADOWS,
    seed: int = 0,
) -> tuple[AttackResult, ...]:
    """Loss-threshold and (with ``shadows`` > 0) LiRA attacks on ``target``."""
    x = np.concatenate([f.x for f in firms])
    y = np.concatenate([f.y for f in firms])
    member = np.concatenate([f.member for f in firms])
    phi = signed_logits(target, x, y)
    results = [evaluate_attack("loss_threshold", loss_scores(phi), member)]
    if shadows > 0:
        rng = np.random.default_rng(seed)
        p_in = float(member.mean())
        shadow_phi = np.empty((shadows, len(y)))
        shadow_in = np.empty((shadows, len(y)), dtype=bool)
        for s in range(shadows):
            include = [rng.random(len(f.y)) < p_in for f in firms]
            shadow = train_federated(procedure, firms, include, seed=seed * 100_003 + s + 1)
            shadow_phi[s] = signed_logits(shadow, x, y)
            shadow_in[s] = np.concatenate(include)
        results.append(evaluate_attack("lira", lira_scores(phi, shadow_phi, shadow_in), member))
    return tuple(results)


def membership_audit(
    run_dir: Path, *, shadows: int = DEFAULT_SHADOWS, seed: int = 0, dp: bool = True
) -> MembershipReport:
    """Attack the run's released global model (``dp=False``: a non-DP model trained in-process
    by the same procedure on the same members instead, for contrast)."""
    started = time.perf_counter()
    procedure, firms, model_path = load_run(run_dir)
    summary = load_summary(Path(run_dir))
    notes = []
    if procedure.run.strategy.value not in ("fedavg", "fedprox"):
        notes.append(f"the run aggregated with {procedure.run.strategy.value}; the shadow "
                     "federations average (FedAvg), an approximation")
    if dp:
        target, _ = load_model(model_path)
        model = str(model_path)
    else:
        procedure = procedure.without_dp()
        target = train_federated(procedure, firms, [f.member for f in firms], seed=seed)
        model = "non-DP contrast: the run's procedure without clipping or noise, trained in-process"
    attacks = attack_model(target, procedure, firms, shadows=shadows, seed=seed)
    epsilon = {str(f["firm"]): float(f.get("epsilon", 0.0)) for f in summary.get("firms", [])}
    return MembershipReport(
        run_id=str(summary.get("run_id") or Path(run_dir).name), model=model, dp=dp,
        epsilon=epsilon if dp else {}, attacks=attacks, shadows=shadows,
        shadow_in_probability=float(np.concatenate([f.member for f in firms]).mean()),
        strategy=procedure.run.strategy.value, seconds=time.perf_counter() - started,
        notes=tuple(notes),
    )


def write_report(report: MembershipReport, out: Path) -> Path:
    write_atomic(Path(out), (json.dumps(report.to_json(), indent=2) + "\n").encode(), mode=0o644)
    return Path(out)
