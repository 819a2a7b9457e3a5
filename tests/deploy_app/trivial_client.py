"""Trivial ClientApp for the deployment tests: adds 1 to every array, reports num-examples.

Node config: ``firm`` (str) and ``marker-dir`` (str); each train call touches
``<marker-dir>/<firm>.round<N>`` so the test can see which node took part.
"""

from __future__ import annotations

from pathlib import Path

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    arrays = msg.content["arrays"]
    assert isinstance(arrays, ArrayRecord)
    updated = [a + 1.0 for a in arrays.to_numpy_ndarrays()]
    firm = str(context.node_config["firm"])
    server_round = msg.content["config"]["server-round"]
    assert isinstance(server_round, int)
    marker_dir = Path(str(context.node_config["marker-dir"]))
    marker_dir.mkdir(parents=True, exist_ok=True)
    (marker_dir / f"{firm}.round{server_round}").touch()
    content = RecordDict(
        {"arrays": ArrayRecord(updated), "metrics": MetricRecord({"num-examples": 10})}
    )
    return Message(content=content, reply_to=msg)
