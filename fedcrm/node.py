"""A firm's node in a federation, with no Flower in it.

The firm's Flower ClientApp (:mod:`fedcrm.clients.client_app`) decodes a message into a typed
request of :mod:`fedcrm.protocol`, calls :meth:`FirmNode.describe` / :meth:`FirmNode.train` /
:meth:`FirmNode.evaluate` and encodes the typed reply. Everything a firm decides - its budget, its
keys, its data - stays here, on the firm's machine.

A training round is one DP release through :func:`fedcrm.release.release`. The run's DP plan is
calibrated once, at the firm's first round of a run, for the whole run (rounds x local steps x
sampling rate) from what the firm has already spent, and persisted in
``<store>/runs/<run_id>.plan.json`` so restarts reuse it.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from fedcrm.audit.log import EntryKind
from fedcrm.data.contract import FirmConfig, load_firm_config
from fedcrm.data.store import PreparedStore, load_store
from fedcrm.learning.dp_engine import DpPlan, noise_generator, train_dp
from fedcrm.learning.models import arrays_to_model, model_to_arrays
from fedcrm.privacy.durable import write_private
from fedcrm.privacy.errors import BudgetExhausted, ConfigError, PlanDoesNotFit
from fedcrm.privacy.keys import FirmKeys, load_keys
from fedcrm.protocol import (
    DescribeReply,
    DescribeRequest,
    EvaluateReply,
    EvaluateRequest,
    ReplyState,
    RunSpec,
    TaskKind,
    TrainReply,
    TrainRequest,
    arrays_hash,
)
from fedcrm.release import FirmPrivacy, plan_dp_sgd, release
from fedcrm.tasks import task_for
from fedcrm.tasks.base import TaskData

_NODES: dict[tuple[str, float], FirmNode] = {}


class FirmNode:
    """One firm's node: its config, keys, privacy state and decrypted examples (cached)."""

    def __init__(self, cfg: FirmConfig, keys: FirmKeys) -> None:
        self.cfg = cfg
        self.keys = keys
        self.privacy = FirmPrivacy(cfg, keys)
        self._data: dict[TaskKind, tuple[str, TaskData]] = {}

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

    def task_data(self, kind: TaskKind) -> TaskData:
        """This firm's examples for a task, rebuilt only when the prepared store changed."""
        store = self.store()
        cached = self._data.get(kind)
        if cached is None or cached[0] != store.store_hash:
            cached = (store.store_hash, task_for(kind).firm_data(self.cfg, store))
            self._data[kind] = cached
        return cached[1]

    # ------------------------------------------------------------------ messages

    def describe(self, request: DescribeRequest) -> DescribeReply:
        return self.task_data(request.task).describe(self.firm)

    def train(self, request: TrainRequest) -> TrainReply:
        """One federated training round on this firm's data: one DP release."""
        started = time.perf_counter()
        torch.set_num_threads(1)
        spec = request.spec
        problem = self.task_data(spec.task).training_problem(model=spec.model, seed=spec.seed)
        model = arrays_to_model(problem.model, request.arrays)
        try:
            plan = self._run_plan(spec, len(problem.y))
            event = plan.round_event(
                purpose=f"train:{spec.task.value}",
                context={
                    "run_id": spec.run_id, "round": request.server_round, "task": spec.task.value,
                },
            )
            global_params = [p.detach().clone() for p in model.parameters()]
            proximal = (global_params, spec.proximal_mu) if spec.proximal_mu > 0 else None

            def compute() -> list[np.ndarray]:
                train_dp(
                    model,
                    torch.as_tensor(problem.x),
                    torch.as_tensor(problem.y),
                    per_sample_loss=problem.loss,
                    plan=plan,
                    generator=noise_generator(),
                    optimizer=spec.optimizer,
                    proximal=proximal,
                )
                return model_to_arrays(model)

            released = release(
                self.privacy,
                event,
                compute,
                funded=lambda arrays: (
                    EntryKind.UPDATE_SENT,
                    {
                        "run_id": spec.run_id,
                        "round": request.server_round,
                        "task": spec.task.value,
                        "model_hash": arrays_hash(arrays),
                    },
                ),
            )
        except (PlanDoesNotFit, BudgetExhausted) as exc:
            return self._declined(str(exc))
        head = released.audit_head
        return TrainReply(
            firm=self.firm,
            state=ReplyState.OK,
            detail="",
            arrays=released.value,
            num_examples=len(problem.y),
            epsilon_round=float(event.epsilon),
            epsilon_total=released.epsilon_total,
            epsilon_cap=self.privacy.cap,
            delta=self.privacy.delta,
            train_seconds=time.perf_counter() - started,
            audit_head_hash=head.hash if head else "",
            audit_head_length=head.length if head else 0,
        )

    def _declined(self, detail: str) -> TrainReply:
        return TrainReply(
            firm=self.firm,
            state=ReplyState.BUDGET_EXHAUSTED,
            detail=detail,
            arrays=None,
            num_examples=0,
            epsilon_round=0.0,
            epsilon_total=self.privacy.spent(),
            epsilon_cap=self.privacy.cap,
            delta=self.privacy.delta,
            train_seconds=0.0,
        )

    def _run_plan(self, spec: RunSpec, n_examples: int) -> DpPlan:
        """The run's DP plan: calibrated at the firm's first round of the run, then reused."""
        path = self.cfg.firm.store_dir / "runs" / f"{spec.run_id}.plan.json"
        if path.exists():
            return DpPlan(**json.loads(path.read_text()))
        plan = plan_dp_sgd(
            self.privacy,
            n_examples=n_examples,
            epsilon=spec.target_epsilon,
            settings=spec.dp_sgd(),
            rounds=spec.rounds,
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        write_private(path, json.dumps(asdict(plan)).encode())
        return plan

    def evaluate(self, request: EvaluateRequest) -> EvaluateReply:
        torch.set_num_threads(1)
        spec = request.spec
        outcome = self.task_data(spec.task).evaluate(request.arrays, model=spec.model)
        return EvaluateReply(
            firm=self.firm,
            num_examples=outcome.num_examples,
            metrics=dict(outcome.metrics),
            vectors={k: tuple(float(x) for x in v) for k, v in outcome.vectors.items()},
        )
