"""The task protocol: what every federated task (churn, trend) provides, to firms and coordinator.

A :class:`Task` is stateless and knows its model family: it builds a firm's examples from the
firm's config and prepared store (:meth:`Task.firm_data`), the coordinator's starting model, how
firms' evaluation replies pool into federation-wide metrics, and how a model is saved with its
provenance. A firm's :class:`TaskData` knows its own examples: what it may describe publicly, its
DP training problem, and how it evaluates a global model. The node and the coordinator call these
and never branch on the task.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from fedcrm.data.contract import FirmConfig
from fedcrm.data.store import PreparedStore
from fedcrm.learning.settings import ChurnModelKind
from fedcrm.protocol import DescribeReply, TaskKind

PerSampleLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class TrainingProblem:
    """A firm's training examples (one per customer), a fresh model and its per-example loss."""

    x: np.ndarray
    y: np.ndarray
    model: nn.Module
    loss: PerSampleLoss


@dataclass(frozen=True)
class EvaluationStatistics:
    """What a firm may release about a model on its held-out customers, before noise.

    Vectors of counts or sums in which each customer's contribution is bounded, and the L2
    sensitivity that bound gives when one customer is added or removed. ``integer`` statistics
    (counts) get discrete Gaussian noise, the others Gaussian noise. The exact values never
    leave the firm; only their noisy version does (:meth:`fedcrm.node.FirmNode.evaluate`).
    """

    values: Mapping[str, np.ndarray]
    l2_sensitivity: float
    integer: bool


@dataclass(frozen=True)
class NoisyStatistics:
    """One firm's released evaluation statistics and the standard deviation of their noise."""

    values: Mapping[str, Sequence[float]]
    noise_std: float


class TaskData(Protocol):
    """One firm's prepared examples for one task."""

    @property
    def layout(self) -> str:
        """Fingerprint of the model input layout (public: it is fixed by declared schema)."""

    @property
    def input_dim(self) -> int: ...

    def describe(self, firm: str, *, public_size: int) -> DescribeReply: ...

    def training_problem(self, *, model: ChurnModelKind, seed: int) -> TrainingProblem: ...

    def check_local_training(self) -> None:
        """Refuse (a :class:`~fedcrm.privacy.errors.FedcrmError`), before any ε is spent, a
        local training whose model could not be fitted or whose held-out metrics would be
        undefined; federated rounds do not call it (other firms hold what this one lacks)."""

    def local_metrics(
        self, arrays: Sequence[np.ndarray], *, model: ChurnModelKind
    ) -> dict[str, float]:
        """Exact held-out metrics for the firm itself (local training); never sent anywhere."""

    def evaluation(
        self, arrays: Sequence[np.ndarray], *, model: ChurnModelKind
    ) -> EvaluationStatistics: ...


class Task(Protocol):
    """A federated task's definition."""

    kind: TaskKind

    def firm_data(self, cfg: FirmConfig, store: PreparedStore, *, schema: str = "") -> TaskData:
        """The firm's examples; ``schema`` is a federated run's public feature schema (the
        layout the shared model uses), ``""`` for the firm's own declared layout (local)."""

    def initial_arrays(
        self, *, model: ChurnModelKind, input_dim: int, seed: int
    ) -> list[np.ndarray]: ...

    def pooled_metrics(self, statistics: Sequence[NoisyStatistics]) -> dict[str, float]:
        """Federation-wide metrics from firms' noisy statistics (post-processing only), with
        the noise's effect on them where it can be estimated."""

    def save_model(
        self, path: Path, arrays: Sequence[np.ndarray], provenance: Mapping[str, Any]
    ) -> Path:
        """Save ``arrays`` with ``provenance`` (``kind``, ``input_dim``, ``layout_fingerprint``
        and anything else worth keeping), atomically."""
