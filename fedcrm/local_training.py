"""A firm's local, centralized DP training on its own store (on the firm's machine only).

:func:`train_local` is one DP release through :func:`fedcrm.release.release`: it plans DP-SGD
for at most the ε asked for, refuses before any noise if the budget cannot fund it, trains, and
saves a provenance-stamped model once the ledger has committed the release.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

import fedcrm
from fedcrm.data.contract import FirmConfig
from fedcrm.learning.dp_engine import noise_generator, train_dp
from fedcrm.learning.dp_trees import grow_alone
from fedcrm.learning.models import model_to_arrays
from fedcrm.learning.settings import ChurnModelKind
from fedcrm.node import FirmNode
from fedcrm.privacy.accounting import DpEvent
from fedcrm.privacy.durable import StagedFile, check_output_file
from fedcrm.privacy.errors import ConfigError
from fedcrm.privacy.keys import FirmKeys, load_keys
from fedcrm.protocol import TaskKind
from fedcrm.release import check_epsilon, plan_dp_sgd, plan_trees, release
from fedcrm.tasks import task_for
from fedcrm.tasks.base import TaskData
from fedcrm.tasks.churn import ChurnData


@dataclass(frozen=True)
class LocalTrainResult:
    model_path: Path
    task: TaskKind
    epsilon_release: float  # the release's own ε, at its δ
    epsilon_added: float  # what it added to the firm's composed total
    epsilon_total: float
    epsilon_cap: float
    noise_multiplier: float
    metrics: dict[str, float]
    seconds: float


def train_local(
    cfg: FirmConfig,
    *,
    out: Path,
    epsilon: float,
    task: TaskKind = TaskKind.CHURN,
    model_kind: ChurnModelKind | None = None,
    keys: FirmKeys | None = None,
) -> LocalTrainResult:
    """Centralized DP training on this firm's own store, spending at most ``epsilon``.

    ``epsilon`` must fit in what the firm has left (refused before any work otherwise) and
    ``out`` must be writable; the model is staged next to ``out`` and moved into place only once
    the release is committed and audited.
    """
    started = time.perf_counter()
    epsilon = check_epsilon(epsilon)
    out = check_output_file(Path(out), what="--out model file")
    torch.set_num_threads(1)
    node = FirmNode(cfg, keys or load_keys(cfg.firm.keys_dir, firm=cfg.firm.name))
    spent_before = node.privacy.spent()
    settings = cfg.training
    dp_sgd = settings.dp_sgd
    kind = ChurnModelKind(model_kind or settings.model)
    data = node.task_data(task)
    if kind is ChurnModelKind.TREES:
        if not isinstance(data, ChurnData):
            raise ConfigError("a tree model is a churn model: train it with --task churn")
        return _train_local_trees(cfg, node, data, out=out, epsilon=epsilon,
                                  spent_before=spent_before, started=started)
    data.check_local_training()  # before any plan or noise: a refusal spends nothing
    problem = data.training_problem(model=kind, seed=settings.seed)
    plan = plan_dp_sgd(
        node.privacy, n_examples=len(problem.y), epsilon=epsilon, settings=dp_sgd, whole=True,
        hidden_layers=not isinstance(problem.model, torch.nn.Linear),
    )
    event = plan.round_event(purpose=f"train:{task.value}:local", context={"task": task.value})

    def compute() -> list[np.ndarray]:
        train_dp(
            problem.model,
            torch.as_tensor(problem.x),
            torch.as_tensor(problem.y),
            per_sample_loss=problem.loss,
            plan=plan,
            generator=noise_generator(),
            optimizer=dp_sgd.optimizer,
            average_tail=dp_sgd.average_tail,
        )
        return model_to_arrays(problem.model)

    return _release_model(
        cfg, node, data, event, compute, out=out, task=task, model=kind,
        spent_before=spent_before, started=started, noise_multiplier=plan.noise_multiplier,
        extra={"noise_multiplier": plan.noise_multiplier},
    )


def _train_local_trees(
    cfg: FirmConfig, node: FirmNode, data: ChurnData, *, out: Path, epsilon: float,
    spent_before: float, started: float,
) -> LocalTrainResult:
    """DP trees on the firm's own customers: a federation of one, the same algorithm as a
    federated run (:mod:`fedcrm.learning.dp_trees`). No step's statistics leave the process
    before the model, so the whole schedule is one release of its composed event (exactly the ε
    of its level and leaf releases at their own noise), planned, checked, computed, committed."""
    settings = cfg.training.trees
    schedule = data.tree_schedule(settings, seed=cfg.training.seed)
    plan = plan_trees(node.privacy, schedule=schedule, epsilon=epsilon, whole=True)
    task = TaskKind.CHURN
    event = plan.whole_event(schedule, delta=node.privacy.delta,
                             purpose=f"train:{task.value}-trees:local",
                             context={"task": task.value})
    xb = data.binned_train(schedule)

    def compute() -> list[np.ndarray]:
        return grow_alone(schedule, xb, data.y_train, plan.noise).to_arrays()

    return _release_model(
        cfg, node, data, event, compute, out=out, task=task, model=ChurnModelKind.TREES,
        spent_before=spent_before, started=started, noise_multiplier=plan.noise.leaf,
        extra={"trees": settings.model_dump(mode="json"),
               "noise": {"uniform": plan.uniform, "level": plan.noise.level,
                         "leaf": plan.noise.leaf, "releases": plan.releases}},
    )


def _release_model(
    cfg: FirmConfig, node: FirmNode, data: TaskData, event: DpEvent,
    compute: Callable[[], list[np.ndarray]], *, out: Path, task: TaskKind, model: ChurnModelKind,
    spent_before: float, started: float, noise_multiplier: float, extra: dict[str, Any],
) -> LocalTrainResult:
    """The one release of a local model: computed, then staged beside ``out`` with its
    provenance (``extra``: what the model kind adds), committed, and moved into place."""
    metrics: dict[str, float] = {}

    def stage(arrays: list[np.ndarray]) -> StagedFile:
        staged = StagedFile(out)
        try:
            metrics.update(data.local_metrics(arrays, model=model))
            task_for(task).save_model(staged.path, arrays, {
                "kind": model.value if task is TaskKind.CHURN else "trend",
                "task": task.value,
                "input_dim": data.input_dim,
                "layout_fingerprint": data.layout,
                "firm": cfg.firm.name,
                "fedcrm_version": fedcrm.__version__,
                "config_sha256": cfg.config_sha256,
                "epsilon": node.privacy.ledger.total_with(event),  # the total once committed
                "epsilon_release": float(event.epsilon),
                "delta": cfg.budget.delta,
                **extra,
                "metrics": dict(metrics),
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            })
        except BaseException:
            staged.discard()
            raise
        return staged

    released = release(node.privacy, event, compute, stage=stage)
    return LocalTrainResult(
        model_path=out,
        task=task,
        epsilon_release=float(event.epsilon),
        epsilon_added=released.epsilon_total - spent_before,
        epsilon_total=released.epsilon_total,
        epsilon_cap=node.privacy.cap,
        noise_multiplier=noise_multiplier,
        metrics=metrics,
        seconds=time.perf_counter() - started,
    )
