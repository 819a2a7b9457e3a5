"""The protocol's :class:`~fedcrm.protocol.Wire` as Flower's ``RecordDict``, and back.

The only place that maps fedcrm's messages onto Flower's record vocabulary: one ``ConfigRecord``
named ``config``, one ``MetricRecord`` named ``metrics`` and one ``ArrayRecord`` named ``arrays``.
Both Flower adapters (the firm's ClientApp, the coordinator's ServerApp) use it; neither builds
records by hand.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, cast

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fedcrm.protocol import ProtocolError, Scalar, Wire

CONFIG, METRICS, ARRAYS = "config", "metrics", "arrays"


def config_record(values: Mapping[str, Scalar]) -> ConfigRecord:
    """A protocol config mapping as Flower's ``ConfigRecord``."""
    return ConfigRecord(dict[str, Any](values))


def to_records(wire: Wire) -> RecordDict:
    records: dict[str, Any] = {}
    if wire.config:
        records[CONFIG] = config_record(wire.config)
    if wire.metrics:
        records[METRICS] = MetricRecord(dict(wire.metrics))
    if wire.arrays is not None:
        records[ARRAYS] = ArrayRecord(list(wire.arrays))
    return RecordDict(records)


def from_records(content: RecordDict) -> Wire:
    try:
        config = (
            cast(dict[str, Scalar], dict(cast(ConfigRecord, content[CONFIG])))
            if CONFIG in content else {}
        )
        metrics = dict(cast(MetricRecord, content[METRICS])) if METRICS in content else {}
        arrays = (
            cast(ArrayRecord, content[ARRAYS]).to_numpy_ndarrays() if ARRAYS in content else None
        )
    except (TypeError, ValueError) as exc:
        raise ProtocolError(f"message records have the wrong types ({exc})") from None
    return Wire(config=config, metrics=metrics, arrays=arrays)


def wire_of(message: Message) -> Wire:
    """The content of a received message (a reply or a request) as a Wire."""
    return from_records(message.content)


def reply(to: Message, wire: Wire) -> Message:
    """A reply to ``to`` carrying ``wire``."""
    return Message(content=to_records(wire), reply_to=to)
