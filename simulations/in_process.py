"""The coordinator's code and the firms' ClientApp in one process, without a transport.

:class:`InProcessGrid` is just enough of Flower's ``Grid`` for the coordinator's functions
(:func:`fedcrm.server.analytics.run_query`, :func:`fedcrm.server.overlap.run_overlap`): node ids,
and ``send_and_receive`` that hands each Flower ``Message`` to the real ClientApp of the
addressed firm. Tests use it to drive whole protocols (and to tamper with messages, as a
malicious coordinator would); ``benchmarks/overlap.py`` uses it to time each party. Flower's
simulation engine (Ray) and a real deployment add the transport; the messages are the same.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass
class PartyCost:
    """What one firm's node spent answering: CPU and wall seconds, bytes in and out (payload:
    arrays as serialised by Flower, plus config and metric keys and values; no framing)."""

    cpu_seconds: float = 0.0
    wall_seconds: float = 0.0
    bytes_in: int = 0
    bytes_out: int = 0
    messages: int = 0


def payload_bytes(message: Any) -> int:
    """The size of a Flower message's content: array bytes plus config and metric entries."""
    total = 0
    content = message.content
    for name in content:
        record = content[name]
        if hasattr(record, "to_numpy_ndarrays"):
            total += sum(len(array.data) for array in record.values())
        else:
            total += sum(len(str(k)) + len(str(v)) for k, v in record.items())
    return total


@contextlib.contextmanager
def server_identity() -> Iterator[None]:
    """The ServerApp's task identity, which Flower sets in a real ServerApp process and its
    ``Message`` constructor reads; restored afterwards."""
    from flwr.supercore.task_identity import TaskIdentity

    names = ("_run_id", "_task_id", "_node_id")
    saved = {name: getattr(TaskIdentity, name) for name in names}
    for name in names:
        setattr(TaskIdentity, name, 1)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(TaskIdentity, name, value)


class InProcessGrid:
    """Nodes ``100 + i`` for the firm configs ``configs[i]``, answered by the real ClientApp.

    ``drop(node, message_type)`` loses a reply; ``tamper(message)`` replaces a request before the
    firm sees it (a misbehaving coordinator). ``sent`` and ``received`` keep every request and
    reply; ``costs`` what each node spent, ``step_costs`` the same per (node, message type).
    """

    def __init__(
        self,
        configs: list[Path],
        *,
        drop: Callable[[int, str], bool] | None = None,
        tamper: Callable[[Any], Any] | None = None,
    ) -> None:
        from flwr.app import Context, RecordDict

        from fedcrm.clients.client_app import make_client_app

        self.app = make_client_app({i: str(p) for i, p in enumerate(configs)})
        self.contexts = {
            100 + i: Context(run_id=1, node_id=100 + i, node_config={"partition-id": i},
                             state=RecordDict(), run_config={})
            for i in range(len(configs))
        }
        self.drop = drop or (lambda _node, _kind: False)
        self.tamper = tamper
        self.sent: list[Any] = []
        self.received: list[Any] = []
        self.costs: dict[int, PartyCost] = {node: PartyCost() for node in self.contexts}
        self.step_costs: dict[tuple[int, str], PartyCost] = {}

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def send_and_receive(self, messages: Iterable[Any], *, timeout: float | None = None
                         ) -> Iterable[Any]:
        replies = []
        for message in messages:
            if self.tamper is not None:
                message = self.tamper(message)
            node = message.metadata.dst_node_id
            self.sent.append(message)
            kind = message.metadata.message_type
            wall, cpu = time.perf_counter(), time.thread_time()
            reply = self.app(message, self.contexts[node])
            cpu, wall = time.thread_time() - cpu, time.perf_counter() - wall
            for cost in (self.costs[node], self.step_costs.setdefault((node, kind), PartyCost())):
                cost.cpu_seconds += cpu
                cost.wall_seconds += wall
                cost.bytes_in += payload_bytes(message)
                cost.bytes_out += payload_bytes(reply)
                cost.messages += 1
            if not self.drop(node, message.metadata.message_type):
                replies.append(reply)
                self.received.append(reply)
        return replies
