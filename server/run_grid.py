"""The ServerApp's Grid in a deployment: replies polled often, each attributed to its firm.

Flower's deployment Grid waits 3 s between two polls for replies, so a round's exchange costs up
to 3 s after the last firm answered. And when a firm's node dies, the SuperLink answers in its
place once the node misses its heartbeats: that error reply comes from the SuperLink's own node
id, not the firm's. :class:`RunGrid` wraps the Grid, polls every :data:`POLL_S` and gives every
reply the node id of the firm it answers for (from the request it replies to), so a dead firm is
named, not "node 1".
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.run import Run

#: Seconds between two polls for replies (one local HTTP call to the SuperLink).
POLL_S = 0.2


class RunGrid(Grid):
    """Delegates to ``grid``; see the module docstring for what it changes."""

    def __init__(self, grid: Grid, *, poll_s: float = POLL_S) -> None:
        self.grid = grid
        self.poll_s = poll_s

    def set_run(self, run: Run) -> None:
        self.grid.set_run(run)

    @property
    def run(self) -> Run:
        return self.grid.run

    def create_message(  # pragma: no cover - deprecated in Flower, unused by fedcrm
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return self.grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self.grid.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.grid.pull_messages(message_ids)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        messages = list(messages)
        if not messages:
            return []
        destinations = [m.metadata.dst_node_id for m in messages]
        pending = {
            mid: node
            for mid, node in zip(self.grid.push_messages(messages), destinations, strict=True)
            if mid
        }
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        while pending:
            for reply in self.grid.pull_messages(list(pending)):
                node = pending.pop(reply.metadata.reply_to_message_id, None)
                if node is not None and reply.metadata.src_node_id != node:
                    # the SuperLink answered in the node's place (node unavailable, reply
                    # expired): it is that firm's answer
                    reply.metadata.__dict__["_src_node_id"] = node
                replies.append(reply)
            if not pending or (deadline is not None and time.monotonic() >= deadline):
                break
            time.sleep(self.poll_s)
        return replies
