"""The partner firm's Flower ClientApp: decode the message, call the core, encode the reply.

Where the firm's data and keys are comes only from the node (``--node-config
"firm-config='/path/FIRM.toml'"``), never from the run config or the app bundle. In a simulation
the harness passes a partition-id -> firm-config mapping instead (still never via the run config).
Replies carry model parameters, counts, ε spent and evaluation statistics - never records.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, cast

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import Mod

from fedcrm.node import FirmNode, RoundSpec, RoundStatus, Task
from fedcrm.privacy.errors import FedcrmError

NODE_CONFIG_KEY = "firm-config"

torch.set_num_threads(1)


def _firm_config_from_node(context: Context) -> str:
    value = context.node_config.get(NODE_CONFIG_KEY)
    if not value:
        raise FedcrmError(
            f"this SuperNode has no '{NODE_CONFIG_KEY}' in its --node-config; start it with "
            "`fedcrm node start --config FIRM.toml`"
        )
    return str(value)


def _spec(msg: Message) -> RoundSpec:
    return RoundSpec.from_config(dict(msg.content["config"]))


def _arrays(msg: Message) -> list[Any]:
    return cast(ArrayRecord, msg.content["arrays"]).to_numpy_ndarrays()


def _status_reply(msg: Message, status: str, detail: str, metrics: dict[str, Any]) -> Message:
    content = RecordDict(
        {
            "status": ConfigRecord({"state": status, "detail": detail}),
            "metrics": MetricRecord(metrics),
        }
    )
    return Message(content=content, reply_to=msg)


def make_client_app(
    firm_configs: Mapping[int, str] | None = None, *, mods: list[Mod] | None = None
) -> ClientApp:
    """A ClientApp; ``firm_configs`` maps simulation partition ids to firm configs."""
    app = ClientApp(mods=mods)

    def node_for(context: Context) -> FirmNode:
        if firm_configs is not None:
            return FirmNode.open(firm_configs[int(context.node_config["partition-id"])])
        return FirmNode.open(_firm_config_from_node(context))

    def guarded(
        handler: Callable[[Message, Context], Message],
    ) -> Callable[[Message, Context], Message]:
        def run(msg: Message, context: Context) -> Message:
            try:
                return handler(msg, context)
            except FedcrmError as exc:
                # A user-facing error (one line, no data values): report it as this firm's status.
                return _status_reply(msg, "error", str(exc), {"num-examples": 0})
            except Exception as exc:
                return _status_reply(
                    msg,
                    "error",
                    f"internal error {type(exc).__name__} on the firm's node (details stay in the "
                    "firm's own logs)",
                    {"num-examples": 0},
                )

        return run

    @app.query()
    @guarded
    def describe(msg: Message, context: Context) -> Message:
        task = Task(str(msg.content["config"]["task"]))
        info: dict[str, Any] = dict(node_for(context).describe(task))
        return Message(content=RecordDict({"describe": ConfigRecord(info)}), reply_to=msg)

    @app.train()
    @guarded
    def train(msg: Message, context: Context) -> Message:
        node = node_for(context)
        outcome = node.train(_spec(msg), _arrays(msg))
        metrics = MetricRecord(
            {
                "num-examples": outcome.num_examples,
                "epsilon-round": outcome.epsilon_round,
                "epsilon-total": outcome.epsilon_total,
                "epsilon-cap": outcome.epsilon_cap,
                "delta": outcome.delta,
                "train-seconds": outcome.seconds,
            }
        )
        status = ConfigRecord(
            {
                "state": outcome.status.value,
                "detail": outcome.message,
                "firm": node.firm,
                "audit-head-hash": outcome.audit_head_hash,
                "audit-head-length": outcome.audit_head_length,
            }
        )
        content = RecordDict({"metrics": metrics, "status": status})
        if outcome.status is RoundStatus.OK and outcome.arrays is not None:
            content["arrays"] = ArrayRecord(outcome.arrays)
        return Message(content=content, reply_to=msg)

    @app.evaluate()
    @guarded
    def evaluate(msg: Message, context: Context) -> Message:
        node = node_for(context)
        outcome = node.evaluate(_spec(msg), _arrays(msg))
        values: dict[str, Any] = {"num-examples": outcome.num_examples}
        values.update(outcome.metrics)
        for name, hist in outcome.histograms.items():
            values[name] = [float(v) for v in hist]
        content = RecordDict(
            {"metrics": MetricRecord(values), "status": ConfigRecord({"firm": node.firm})}
        )
        return Message(content=content, reply_to=msg)

    return app


app = make_client_app()
