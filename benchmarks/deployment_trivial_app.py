"""The trivial Flower app ``benchmarks/deployment.py`` measures fedcrm's rounds against.

The same message pattern as a fedcrm round - a train and an evaluate exchange with every firm,
over the same Grid wrapper (:class:`fedcrm.server.run_grid.RunGrid`) - but the ClientApp does no
work: it returns the model it got. Each round's start time (when ``configure_train`` is called,
where fedcrm's ``round_started`` event is emitted) goes to the run config's ``timing-file``.

Imported as the top-level module ``deployment_trivial_app`` (``benchmarks/`` on the path): a
third-party wheel owns the name ``benchmarks``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from fedcrm.server.run_grid import RunGrid

client_app = ClientApp()


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    arrays = msg.content["arrays"]
    return Message(RecordDict({"arrays": arrays, "metrics": MetricRecord({"num-examples": 1})}),
                   reply_to=msg)


@client_app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return Message(RecordDict({"metrics": MetricRecord({"num-examples": 1, "loss": 0.0})}),
                   reply_to=msg)


class TimedFedAvg(FedAvg):
    """FedAvg that records when each round starts."""

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.started: list[float] = []

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self.started.append(time.time())
        return super().configure_train(server_round, arrays, config, grid)


server_app = ServerApp()


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    rounds = int(context.run_config["num-rounds"])
    firms = int(context.run_config["firms"])
    deadline = time.monotonic() + 120
    while len(list(grid.get_node_ids())) < firms and time.monotonic() < deadline:
        time.sleep(0.2)
    strategy = TimedFedAvg(fraction_train=1.0, fraction_evaluate=1.0, min_train_nodes=firms,
                           min_evaluate_nodes=firms, min_available_nodes=firms)
    strategy.start(grid=RunGrid(grid), initial_arrays=ArrayRecord([np.zeros(16, np.float32)]),
                   num_rounds=rounds, timeout=120)
    finished = time.time()
    Path(str(context.run_config["timing-file"])).write_text(
        json.dumps({"round_started": strategy.started, "finished": finished})
    )
