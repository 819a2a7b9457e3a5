"""Trivial ServerApp for the deployment tests: 2 FedAvg rounds over a 3-element array.

Run config: ``num-rounds`` (int), ``result-dir`` (str, where ``result.json`` is written) and
``fail`` (bool, raise instead of running, to test clean-up after a failed run).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    if bool(context.run_config.get("fail", False)):
        raise RuntimeError("trivial ServerApp asked to fail")
    num_rounds = int(context.run_config["num-rounds"])
    strategy = FedAvg(fraction_evaluate=0.0, min_train_nodes=2, min_available_nodes=2)
    result = strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord([np.zeros(3, dtype=np.float64)]),
        num_rounds=num_rounds,
        timeout=120,
    )
    final = result.arrays.to_numpy_ndarrays()[0]
    out = Path(str(context.run_config["result-dir"]))
    out.mkdir(parents=True, exist_ok=True)
    payload = {
        "rounds": num_rounds,
        "arrays": final.tolist(),
        "train_metrics": {str(k): dict(v) for k, v in result.train_metrics_clientapp.items()},
    }
    (out / "result.json").write_text(json.dumps(payload))
