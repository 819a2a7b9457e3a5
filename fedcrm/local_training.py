"""A firm's local, centralized DP training on its own store (on the firm's machine only).

:func:`train_local` is one DP release through :func:`fedcrm.release.release`: it plans DP-SGD
for at most the ε asked for, refuses before any noise if the budget cannot fund it, trains, and
saves a provenance-stamped model once the ledger has committed the release.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import fedcrm
from fedcrm.data.contract import FirmConfig
from fedcrm.learning.dp_engine import noise_generator, train_dp
from fedcrm.learning.models import model_to_arrays
from fedcrm.learning.settings import ChurnModelKind
from fedcrm.node import FirmNode
from fedcrm.privacy.keys import FirmKeys, load_keys
from fedcrm.protocol import TaskKind
from fedcrm.release import plan_dp_sgd, release
from fedcrm.tasks import task_for


@dataclass(frozen=True)
class LocalTrainResult:
    model_path: Path
    task: TaskKind
    epsilon_spent: float
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
    """Centralized DP training on this firm's own store, spending at most ``epsilon``."""
    started = time.perf_counter()
    torch.set_num_threads(1)
    node = FirmNode(cfg, keys or load_keys(cfg.firm.keys_dir))
    settings = cfg.training
    kind = ChurnModelKind(model_kind or settings.model)
    data = node.task_data(task)
    problem = data.training_problem(model=kind, seed=settings.seed)
    plan = plan_dp_sgd(
        node.privacy, n_examples=len(problem.y), epsilon=epsilon, settings=settings.dp_sgd
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
            optimizer=settings.optimizer,
        )
        return model_to_arrays(problem.model)

    released = release(node.privacy, event, compute)
    metrics = {k: float(v) for k, v in data.evaluate(released.value, model=kind).metrics.items()}
    task_for(task).save_model(
        out,
        released.value,
        {
            "kind": kind.value if task is TaskKind.CHURN else "trend",
            "task": task.value,
            "input_dim": data.input_dim,
            "layout_fingerprint": data.layout,
            "firm": cfg.firm.name,
            "fedcrm_version": fedcrm.__version__,
            "config_sha256": cfg.config_sha256,
            "epsilon": released.epsilon_total,
            "epsilon_release": float(event.epsilon),
            "delta": cfg.budget.delta,
            "noise_multiplier": plan.noise_multiplier,
            "metrics": metrics,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        },
    )
    return LocalTrainResult(
        out,
        task,
        float(event.epsilon),
        released.epsilon_total,
        cfg.budget.epsilon,
        plan.noise_multiplier,
        metrics,
        time.perf_counter() - started,
    )
