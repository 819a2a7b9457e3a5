"""Rounds that survive a restart: a strategy wrapper that numbers and checkpoints them.

:class:`CheckpointedRounds` wraps the run's strategy guard like Flower's own wrappers wrap a
strategy: it edits nothing inside it. It

* shifts Flower's round numbers by the rounds an earlier attempt of the run completed, so a
  resumed run asks firms for round ``completed + 1`` (firms hold each run to its rounds), and
* saves a checkpoint (:mod:`fedcrm.coordinator.run_checkpoint`) each time a round is complete,
  with the model the next round trains on.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedcrm.coordinator.run_checkpoint import RunCheckpoint, save_checkpoint

#: Builds the checkpoint of the rounds completed so far, given that round and the next model.
Snapshot = Callable[[int, list[np.ndarray]], RunCheckpoint]


class CheckpointedRounds(Strategy):
    """Run ``inner`` from round ``completed + 1``, checkpointing each completed round."""

    def __init__(
        self,
        inner: Strategy,
        *,
        completed: int,
        initial: list[np.ndarray],
        snapshot: Snapshot,
        run_dir: Path,
    ) -> None:
        self.inner = inner
        self.completed = completed
        self.snapshot = snapshot
        self.run_dir = run_dir
        self._model = list(initial)

    def summary(self) -> None:
        self.inner.summary()

    def _round(self, flower_round: int) -> int:
        return flower_round + self.completed

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.inner.configure_train(self._round(server_round), arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        arrays, metrics = self.inner.aggregate_train(self._round(server_round), replies)
        if arrays is not None:
            self._model = arrays.to_numpy_ndarrays()
        return arrays, metrics

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.inner.configure_evaluate(self._round(server_round), arrays, config, grid)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        metrics = self.inner.aggregate_evaluate(self._round(server_round), replies)
        # Flower calls this last in every round: the round is complete
        save_checkpoint(self.run_dir, self.snapshot(self._round(server_round), self._model))
        return metrics
