"""The partner firm's Flower ClientApp: decode the request, call the node, encode the reply.

Where the firm's data and keys are comes only from the node (``--node-config
"firm-config='/path/FIRM.toml'"``), never from the run config or the app bundle. In a simulation
the harness passes a partition-id -> firm-config mapping instead (still never via the run config).
Every message is a typed request and reply of :mod:`fedcrm.protocol`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import Mod

from fedcrm.clients.node import NODE_CONFIG_KEY
from fedcrm.flower.records import reply, wire_of
from fedcrm.node import FirmNode
from fedcrm.privacy.errors import FedcrmError
from fedcrm.protocol import (
    DescribeReply,
    DescribeRequest,
    ErrorReply,
    EvaluateReply,
    EvaluateRequest,
    MessageKind,
    OverlapBlindReply,
    OverlapBlindRequest,
    OverlapMatches,
    OverlapOffer,
    OverlapOfferReply,
    OverlapReblindRequest,
    QueryAnswer,
    QueryAnswerRequest,
    QueryOffer,
    QueryOfferReply,
    SecureSumConfirmReply,
    SecureSumConfirmRequest,
    SecureSumKeysReply,
    SecureSumKeysRequest,
    SecureSumMaskReply,
    SecureSumMaskRequest,
    SecureSumShareReply,
    SecureSumShareRequest,
    SecureSumUnmaskReply,
    SecureSumUnmaskRequest,
    TrainReply,
    TrainRequest,
    TreesReply,
    TreesRequest,
)

torch.set_num_threads(1)

Reply = (
    DescribeReply | TrainReply | EvaluateReply | QueryOfferReply | QueryAnswer
    | SecureSumKeysReply | SecureSumShareReply | SecureSumMaskReply | SecureSumConfirmReply
    | SecureSumUnmaskReply
    | OverlapOfferReply | OverlapBlindReply | OverlapMatches | TreesReply
)
Handler = Callable[[FirmNode, Message], Reply]


def _firm_config_from_node(context: Context) -> str:
    value = context.node_config.get(NODE_CONFIG_KEY)
    if not value:
        raise FedcrmError(
            f"this SuperNode has no '{NODE_CONFIG_KEY}' in its --node-config; start it with "
            "`fedcrm node start --config FIRM.toml`"
        )
    return str(value)


def _describe(node: FirmNode, msg: Message) -> Reply:
    return node.describe(DescribeRequest.decode(wire_of(msg)))


def _train(node: FirmNode, msg: Message) -> Reply:
    return node.train(TrainRequest.decode(wire_of(msg)))


def _evaluate(node: FirmNode, msg: Message) -> Reply:
    return node.evaluate(EvaluateRequest.decode(wire_of(msg)))


def _offer(node: FirmNode, msg: Message) -> Reply:
    return node.offer_query(QueryOffer.decode(wire_of(msg)))


def _answer(node: FirmNode, msg: Message) -> Reply:
    return node.answer_query(QueryAnswerRequest.decode(wire_of(msg)))


def _secure_sum_keys(node: FirmNode, msg: Message) -> Reply:
    return node.secure_sum_keys(SecureSumKeysRequest.decode(wire_of(msg)))


def _secure_sum_share(node: FirmNode, msg: Message) -> Reply:
    return node.secure_sum_share(SecureSumShareRequest.decode(wire_of(msg)))


def _secure_sum_mask(node: FirmNode, msg: Message) -> Reply:
    return node.secure_sum_mask(SecureSumMaskRequest.decode(wire_of(msg)))


def _secure_sum_confirm(node: FirmNode, msg: Message) -> Reply:
    return node.secure_sum_confirm(SecureSumConfirmRequest.decode(wire_of(msg)))


def _secure_sum_unmask(node: FirmNode, msg: Message) -> Reply:
    return node.secure_sum_unmask(SecureSumUnmaskRequest.decode(wire_of(msg)))


def _overlap_offer(node: FirmNode, msg: Message) -> Reply:
    return node.offer_overlap(OverlapOffer.decode(wire_of(msg)))


def _overlap_blind(node: FirmNode, msg: Message) -> Reply:
    return node.blind_overlap(OverlapBlindRequest.decode(wire_of(msg)))


def _overlap_reblind(node: FirmNode, msg: Message) -> Reply:
    return node.reblind_overlap(OverlapReblindRequest.decode(wire_of(msg)))


def _grow_trees(node: FirmNode, msg: Message) -> Reply:
    return node.grow_trees(TreesRequest.decode(wire_of(msg)))


def make_client_app(
    firm_configs: Mapping[int, str] | None = None, *, mods: list[Mod] | None = None
) -> ClientApp:
    """A ClientApp; ``firm_configs`` maps simulation partition ids to firm configs."""
    app = ClientApp(mods=mods)

    def node_for(context: Context) -> FirmNode:
        if firm_configs is not None:
            return FirmNode.open(firm_configs[int(context.node_config["partition-id"])])
        return FirmNode.open(_firm_config_from_node(context))

    def serve(handler: Handler) -> Callable[[Message, Context], Message]:
        def run(msg: Message, context: Context) -> Message:
            firm = ""
            try:
                node = node_for(context)
                firm = node.firm
                return reply(msg, handler(node, msg).encode())
            except FedcrmError as exc:
                # A user-facing error (one line, no data values): this firm's status.
                return reply(msg, ErrorReply(firm=firm, detail=str(exc)).encode())
            except Exception as exc:
                detail = (
                    f"internal error {type(exc).__name__} on the firm's node (details stay in "
                    "the firm's own logs)"
                )
                return reply(msg, ErrorReply(firm=firm, detail=detail).encode())

        return run

    app.query(MessageKind.DESCRIBE.value.split(".")[1])(serve(_describe))
    app.query(MessageKind.QUERY_OFFER.value.split(".")[1])(serve(_offer))
    app.query(MessageKind.QUERY_ANSWER.value.split(".")[1])(serve(_answer))
    app.query(MessageKind.OVERLAP_OFFER.value.split(".")[1])(serve(_overlap_offer))
    app.query(MessageKind.OVERLAP_BLIND.value.split(".")[1])(serve(_overlap_blind))
    app.query(MessageKind.OVERLAP_REBLIND.value.split(".")[1])(serve(_overlap_reblind))
    app.train()(serve(_train))
    app.evaluate()(serve(_evaluate))
    for kind, handler in (
        (MessageKind.SECURE_SUM_KEYS, _secure_sum_keys),
        (MessageKind.SECURE_SUM_SHARE, _secure_sum_share),
        (MessageKind.SECURE_SUM_MASK, _secure_sum_mask),
        (MessageKind.SECURE_SUM_CONFIRM, _secure_sum_confirm),
        (MessageKind.SECURE_SUM_UNMASK, _secure_sum_unmask),
    ):
        app.query(kind.value.split(".")[1])(serve(handler))
    app.train(MessageKind.TREES.value.split(".")[1])(serve(_grow_trees))
    return app


app = make_client_app()
