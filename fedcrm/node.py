"""A firm's side of federated training, with no Flower in it.

The ClientApp (``clients/client_app.py``) only decodes a message into a :class:`RoundSpec` and
the global arrays, calls :meth:`FirmNode.train` / :meth:`FirmNode.evaluate` /
:meth:`FirmNode.describe`
and encodes the outcome. Everything a firm decides - its budget, its keys, its data - stays here,
on the firm's machine.

Privacy flow of one training round (check, then commit):

1. The run's DP plan is calibrated once, at the firm's first round of a run, from the firm's
   ledger (what it already spent), its cap, and the whole plan (rounds x local steps x sampling
   rate), and persisted in ``<store>/runs/<run_id>.plan.json`` so restarts reuse it.
2. ``ledger.check(event)`` refuses a round the budget cannot fund - before any noise is drawn.
3. DP-SGD runs; ``ledger.commit(event)`` is fsynced; only then are the parameters returned.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from fedcrm.audit.log import AuditLog, EntryKind
from fedcrm.data.contract import ColumnRole, FeatureKind, FirmConfig, TableName, load_firm_config
from fedcrm.data.encoding import (
    BooleanSpec,
    CategoricalSpec,
    FeatureLayout,
    FeatureSpec,
    NumericSpec,
)
from fedcrm.data.store import PreparedStore, load_store
from fedcrm.learning.dp_engine import DpPlan, plan_for_budget, train_dp
from fedcrm.learning.metrics import auc, score_histograms
from fedcrm.learning.models import (
    ChurnModelKind,
    arrays_to_model,
    build_churn_model,
    churn_per_sample_loss,
    model_to_arrays,
    predict_proba,
)
from fedcrm.privacy.errors import BudgetExhausted, ConfigError, PlanDoesNotFit, SchemaError
from fedcrm.privacy.keys import FirmKeys, load_keys
from fedcrm.privacy.ledger import Budget, PrivacyLedger

HOLDOUT_FRACTION = 0.2
#: A firm declines a run when less than this fraction of the run's ε is left in its budget
#: (the noise needed would make its update useless).
MIN_USEFUL_FRACTION = 0.05


class Task(StrEnum):
    CHURN = "churn"
    TREND = "trend"


class RoundStatus(StrEnum):
    OK = "ok"
    BUDGET_EXHAUSTED = "budget_exhausted"


@dataclass(frozen=True)
class RoundSpec:
    """What the coordinator asks of every firm in a round (decoded from the run config)."""

    run_id: str
    task: Task
    server_round: int
    rounds: int
    model: str = ChurnModelKind.LOGISTIC.value
    target_epsilon: float = 1.0
    local_epochs: float = 1.0
    batch_size: int = 256
    learning_rate: float = 0.5
    max_grad_norm: float = 1.0
    optimizer: str = "sgd"
    proximal_mu: float = 0.0
    seed: int = 0

    def to_config(self) -> dict[str, Any]:
        """Flat, hyphenated keys (Flower's convention); ``server-round`` is set per round."""
        return {
            k.replace("_", "-"): (v.value if isinstance(v, StrEnum) else v)
            for k, v in asdict(self).items()
        }

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> RoundSpec:
        known = set(cls.__dataclass_fields__)
        values = {k.replace("-", "_"): v for k, v in config.items()}
        values = {k: v for k, v in values.items() if k in known}
        try:
            values["task"] = Task(str(values["task"]))
            return cls(**values)
        except (KeyError, ValueError, TypeError) as exc:
            raise ConfigError(
                f"malformed round configuration from the coordinator: {exc}"
            ) from None


@dataclass(frozen=True)
class TrainOutcome:
    status: RoundStatus
    arrays: list[np.ndarray] | None
    num_examples: int
    epsilon_round: float
    epsilon_total: float
    epsilon_cap: float
    delta: float
    message: str = ""
    seconds: float = 0.0
    audit_head_hash: str = ""
    audit_head_length: int = 0


@dataclass(frozen=True)
class EvalOutcome:
    num_examples: int
    metrics: dict[str, float]
    histograms: dict[str, np.ndarray] = field(default_factory=dict)


PerSampleLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def noise_generator() -> torch.Generator:
    """A generator seeded from the OS for DP noise and Poisson sampling (never a fixed seed)."""
    return torch.Generator().manual_seed(int.from_bytes(os.urandom(8), "big") >> 1)


def arrays_hash(arrays: list[np.ndarray]) -> str:
    """sha256 over dtype, shape and bytes of each array: the id of a model or an update.

    Firms log it in ``update_sent``, the coordinator in ``update_accepted``; an auditor matches
    the two.
    """
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(str(a.dtype).encode() + str(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()


def firm_audit_log(cfg: FirmConfig, keys: FirmKeys) -> AuditLog | None:
    """The firm's signed audit log, or None when the firm has no signing key."""
    if keys.signing_key is None:
        return None
    return AuditLog(cfg.audit_path, signing_key=keys.signing_key)


def layout_from_config(cfg: FirmConfig) -> FeatureLayout:
    """The churn model's input layout, fixed by the firm's declared customer features."""
    if TableName.CUSTOMERS not in cfg.tables:
        raise ConfigError(
            f"{cfg.config_path}: the churn task needs a customers table with declared features"
        )
    table = cfg.tables[TableName.CUSTOMERS]
    numeric: list[FeatureSpec] = []
    boolean: list[FeatureSpec] = []
    categorical: list[FeatureSpec] = []
    for source, col in table.columns.items():
        if col.role is not ColumnRole.FEATURE:
            continue
        name = col.canonical(source, TableName.CUSTOMERS)
        if col.kind is FeatureKind.NUMERIC:
            assert col.min is not None and col.max is not None
            numeric.append(
                NumericSpec(
                    name,
                    float(col.min),
                    float(col.max),
                    missing_indicator=col.missing.value == "allow",
                )
            )
        elif col.kind is FeatureKind.BOOLEAN:
            boolean.append(BooleanSpec(name))
        else:
            categorical.append(CategoricalSpec(name, tuple(col.categories or ())))
    key = lambda s: s.name  # noqa: E731
    return FeatureLayout(
        [*sorted(numeric, key=key), *sorted(boolean, key=key), *sorted(categorical, key=key)]
    )


def holdout_mask(customer_ids: pd.Series, fraction: float = HOLDOUT_FRACTION) -> np.ndarray:
    """A firm's held-out customers: ``sha256("fedcrm/holdout/v1/" + pseudonym) < fraction``.

    Deterministic per customer pseudonym, so every round, every restart and the centralized
    baseline of a simulation agree on it without any coordination.
    """
    limit = int(fraction * 2**64)
    return np.fromiter(
        (
            int.from_bytes(hashlib.sha256(f"fedcrm/holdout/v1/{c}".encode()).digest()[:8], "big")
            < limit
            for c in customer_ids.astype(str)
        ),
        dtype=bool,
        count=len(customer_ids),
    )


@dataclass(frozen=True)
class ChurnData:
    layout: FeatureLayout
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def churn_data(store: PreparedStore, layout: FeatureLayout) -> ChurnData:
    customers = store.customers
    if customers is None or "churn" not in customers.columns:
        raise SchemaError(
            f"firm '{store.firm}': the prepared store has no churn label; declare a label column "
            "or set features.churn_cutoff"
        )
    test = holdout_mask(customers["customer_id"])
    x = layout.encode(customers)
    y = customers["churn"].to_numpy(dtype=np.float32)
    return ChurnData(layout, x[~test], y[~test], x[test], y[test])


_NODES: dict[tuple[str, float], FirmNode] = {}


class FirmNode:
    """One firm's node: its config, keys, decrypted store (cached) and privacy ledger."""

    def __init__(self, cfg: FirmConfig, keys: FirmKeys) -> None:
        self.cfg = cfg
        self.keys = keys
        self.ledger = PrivacyLedger(
            cfg.ledger_path,
            firm=cfg.firm.name,
            budget=Budget(epsilon=cfg.budget.epsilon, delta=cfg.budget.delta),
        )
        self._churn: ChurnData | None = None
        self._churn_hash = ""
        self._trend: Any = None
        self._trend_hash = ""
        self.audit = firm_audit_log(cfg, keys)
        self._log_budget()

    def _log_budget(self) -> None:
        """Record the firm's budget in its audit log when it is new or changed."""
        if self.audit is None:
            return
        cap, delta = self.cfg.budget.epsilon, self.cfg.budget.delta
        last = next(
            (e for e in reversed(self.audit.entries()) if e.kind is EntryKind.BUDGET_CHANGED), None
        )
        if last is None or (last.payload["epsilon_cap"], last.payload["delta"]) != (cap, delta):
            self.audit.append(EntryKind.BUDGET_CHANGED, {"epsilon_cap": cap, "delta": delta})

    def log_release(
        self, event: Any, *, model_hash: str | None = None, cumulative_epsilon: float | None = None
    ) -> None:
        """Audit a committed DP release (and the update it funded); no-op without a signing key.

        ``cumulative_epsilon`` is the ledger's total after the commit, when the caller has it.
        """
        if self.audit is None:
            return
        payload = {k: v for k, v in event.to_json().items()}
        payload.update(
            ledger_path=str(self.cfg.ledger_path),
            cumulative_epsilon=(
                self.ledger.spent() if cumulative_epsilon is None else cumulative_epsilon
            ),
            epsilon_cap=self.cfg.budget.epsilon,
        )
        release = self.audit.append(EntryKind.DP_RELEASE, payload)
        if model_hash is not None:
            ctx = dict(event.context)
            self.audit.append(
                EntryKind.UPDATE_SENT,
                {
                    "run_id": str(ctx.get("run_id", "")),
                    "round": int(ctx.get("round", 0)),
                    "task": str(ctx.get("task", "")),
                    "model_hash": model_hash,
                    "release": release.hash,
                },
            )

    @classmethod
    def open(cls, firm_config: Path | str) -> FirmNode:
        """Open (or reuse, within this process) the node for a firm config path."""
        path = Path(firm_config).expanduser().resolve()
        if not path.exists():
            raise ConfigError(f"node config points at {path}, which does not exist")
        key = (str(path), path.stat().st_mtime)
        node = _NODES.get(key)
        if node is None:
            cfg = load_firm_config(path)
            node = cls(cfg, load_keys(cfg.firm.keys_dir))
            _NODES[key] = node
        return node

    @property
    def firm(self) -> str:
        return self.cfg.firm.name

    def store(self) -> PreparedStore:
        return load_store(self.cfg.prepared_dir, keys=self.keys)

    def churn(self) -> ChurnData:
        store = self.store()
        if self._churn is None or self._churn_hash != store.store_hash:
            self._churn = churn_data(store, layout_from_config(self.cfg))
            self._churn_hash = store.store_hash
        return self._churn

    def trend(self) -> Any:
        from fedcrm.tasks import trend as trend_task

        store = self.store()
        if self._trend is None or self._trend_hash != store.store_hash:
            self._trend = trend_task.firm_trend_data(store, self.cfg)
            self._trend_hash = store.store_hash
        return self._trend

    # ------------------------------------------------------------------ describe

    def describe(self, task: Task) -> dict[str, str | int | float]:
        if task is Task.CHURN:
            data = self.churn()
            return {
                "firm": self.firm,
                "layout": data.layout.fingerprint(),
                "input-dim": data.layout.dim,
                "num-train": len(data.y_train),
                "num-test": len(data.y_test),
            }
        from fedcrm.tasks import trend as trend_task

        return trend_task.describe(self.trend(), firm=self.firm)

    # ------------------------------------------------------------------ training

    def training_problem(
        self, task: Task, *, model_kind: str, seed: int
    ) -> tuple[np.ndarray, np.ndarray, nn.Module, PerSampleLoss]:
        """This firm's training examples, a fresh model and its per-example loss for ``task``."""
        if task is Task.CHURN:
            data = self.churn()
            model = build_churn_model(model_kind, data.layout.dim, seed=seed)
            return data.x_train, data.y_train, model, churn_per_sample_loss
        from fedcrm.tasks import trend as trend_task

        tdata = self.trend()
        return (
            tdata.x_train,
            tdata.y_train,
            trend_task.build_model(tdata),
            trend_task.per_sample_loss,
        )

    def _plan_path(self, run_id: str) -> Path:
        return self.cfg.firm.store_dir / "runs" / f"{run_id}.plan.json"

    def _run_plan(self, spec: RoundSpec, n_examples: int) -> DpPlan:
        path = self._plan_path(spec.run_id)
        if path.exists():
            return DpPlan(**json.loads(path.read_text()))
        prior = self.ledger.events
        spent = self.ledger.spent()
        available = self.cfg.budget.epsilon - spent
        if available < MIN_USEFUL_FRACTION * spec.target_epsilon:
            raise PlanDoesNotFit(
                f"firm '{self.firm}' has spent ε={spent:.4f} of its cap "
                f"ε={self.cfg.budget.epsilon:g}; "
                f"the remaining ε={max(available, 0):.4f} cannot fund a useful run (at least "
                f"{MIN_USEFUL_FRACTION:.0%} of the run's ε={spec.target_epsilon:g}). It stops "
                "participating; raising the cap is a governance decision for the firm"
            )
        total_target = min(self.cfg.budget.epsilon, spent + spec.target_epsilon)
        plan = plan_for_budget(
            n_examples=n_examples,
            target_epsilon=total_target,
            delta=self.cfg.budget.delta,
            epochs=spec.local_epochs,
            batch_size=spec.batch_size,
            max_grad_norm=spec.max_grad_norm,
            learning_rate=spec.learning_rate,
            rounds=spec.rounds,
            prior_events=prior,
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(plan)))
        os.replace(tmp, path)
        return plan

    def _refuse(self, spec: RoundSpec, message: str) -> TrainOutcome:
        return TrainOutcome(
            status=RoundStatus.BUDGET_EXHAUSTED,
            arrays=None,
            num_examples=0,
            epsilon_round=0.0,
            epsilon_total=self.ledger.spent(),
            epsilon_cap=self.cfg.budget.epsilon,
            delta=self.cfg.budget.delta,
            message=message,
        )

    def train(self, spec: RoundSpec, arrays: list[np.ndarray]) -> TrainOutcome:
        """One federated training round on this firm's data (check, train, commit, reply)."""
        started = time.perf_counter()
        torch.set_num_threads(1)
        x, y, model, loss = self.training_problem(spec.task, model_kind=spec.model, seed=spec.seed)
        arrays_to_model(model, arrays)
        try:
            plan = self._run_plan(spec, len(y))
        except PlanDoesNotFit as exc:
            return self._refuse(spec, str(exc))
        event = plan.round_event(
            purpose=f"train:{spec.task.value}",
            context={"run_id": spec.run_id, "round": spec.server_round, "task": spec.task.value},
        )
        try:
            self.ledger.check(event)
        except BudgetExhausted as exc:
            return self._refuse(spec, str(exc))
        generator = noise_generator()
        global_params = [p.detach().clone() for p in model.parameters()]
        proximal = (global_params, spec.proximal_mu) if spec.proximal_mu > 0 else None
        train_dp(
            model,
            torch.as_tensor(x),
            torch.as_tensor(y),
            per_sample_loss=loss,
            plan=plan,
            generator=generator,
            optimizer=spec.optimizer,
            proximal=proximal,
        )
        self.ledger.commit(event)  # fsynced before the parameters leave this process
        spent = self.ledger.spent()
        trained = model_to_arrays(model)
        self.log_release(event, model_hash=arrays_hash(trained), cumulative_epsilon=spent)
        head = self.audit.head() if self.audit is not None else None
        return TrainOutcome(
            status=RoundStatus.OK,
            arrays=trained,
            audit_head_hash=head.hash if head else "",
            audit_head_length=head.length if head else 0,
            num_examples=len(y),
            epsilon_round=float(event.epsilon),
            epsilon_total=spent,
            epsilon_cap=self.cfg.budget.epsilon,
            delta=self.cfg.budget.delta,
            seconds=time.perf_counter() - started,
        )

    # ------------------------------------------------------------------ evaluation

    def evaluate(self, spec: RoundSpec, arrays: list[np.ndarray]) -> EvalOutcome:
        torch.set_num_threads(1)
        if spec.task is Task.TREND:
            from fedcrm.tasks import trend as trend_task

            return trend_task.evaluate(self.trend(), arrays)
        data = self.churn()
        model = arrays_to_model(build_churn_model(spec.model, data.layout.dim), arrays)
        scores = predict_proba(model, data.x_test)
        pos, neg = score_histograms(scores, data.y_test)
        return EvalOutcome(
            num_examples=len(data.y_test),
            metrics={"auc": auc(scores, data.y_test)},
            histograms={"hist-pos": pos, "hist-neg": neg},
        )


def initial_arrays(task: Task, *, model: str, input_dim: int, seed: int = 0) -> list[np.ndarray]:
    """The coordinator's starting global model for a task."""
    if task is Task.CHURN:
        return model_to_arrays(build_churn_model(model, input_dim, seed=seed))
    from fedcrm.tasks import trend as trend_task

    return model_to_arrays(trend_task.build_model_for_dim(input_dim, seed=seed))
