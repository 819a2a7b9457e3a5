"""The one protocol between the coordinator and a firm: every message, typed, with its encoding.

Each message kind has a typed request and a typed reply (frozen dataclasses) with one
``encode() -> Wire`` and one ``decode(Wire)``. A :class:`Wire` is the Flower-free shape of a
message's content - a ``config`` record (strings, numbers, flags), a ``metrics`` record (numbers
and number lists) and an ``arrays`` record (numpy arrays) - which the Flower adapters turn into
Flower's ``RecordDict`` and back (:mod:`fedcrm.flower.records`), and nothing else. Field names are
hyphenated (Flower's convention; ``num-examples`` is what Flower's strategies weight by).

| message kind (Flower type) | request | reply |
|---|---|---|
| ``query.describe`` | :class:`DescribeRequest` | :class:`DescribeReply` |
| ``train`` | :class:`TrainRequest` | :class:`TrainReply` |
| ``evaluate`` | :class:`EvaluateRequest` | :class:`EvaluateReply` |
| ``query.offer`` | :class:`QueryOffer` | :class:`QueryOfferReply` |
| ``query.answer`` | :class:`QueryAnswerRequest` | :class:`QueryAnswer` |
| ``query.secure_sum_keys`` | :class:`SecureSumKeysRequest` | :class:`SecureSumKeysReply` |
| ``query.secure_sum_share`` | :class:`SecureSumShareRequest` | :class:`SecureSumShareReply` |
| ``query.secure_sum_mask`` | :class:`SecureSumMaskRequest` | :class:`SecureSumMaskReply` |
| ``query.secure_sum_confirm`` | :class:`SecureSumConfirmRequest` | :class:`SecureSumConfirmReply` |
| ``query.secure_sum_unmask`` | :class:`SecureSumUnmaskRequest` | :class:`SecureSumUnmaskReply` |
| ``query.overlap_offer`` | :class:`OverlapOffer` | :class:`OverlapOfferReply` |
| ``query.overlap_blind`` | :class:`OverlapBlindRequest` | :class:`OverlapBlindReply` |
| ``query.overlap_reblind`` | :class:`OverlapReblindRequest` | :class:`OverlapMatches` |
| ``train.trees`` | :class:`TreesRequest` | :class:`TreesReply` |
| any, on a firm-side failure | - | :class:`ErrorReply` |

The run's parameters that every firm receives travel as a :class:`RunSpec`, encoded flat by
:func:`flat_encode` - the same codec the coordinator's run config uses for Flower's run config.
What each reply field reveals, and how it is accounted, is listed in ``docs/privacy.md``.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from enum import Enum, StrEnum
from typing import Any, ClassVar, Self

import numpy as np
from pydantic import ValidationError

from fedcrm.learning.settings import ChurnModelKind, DpOptimizer, DpSgdSettings, TreeSettings
from fedcrm.privacy.blinding import BlindingError, elements_hash, unpack
from fedcrm.privacy.errors import ConfigError
from fedcrm.privacy.secure_sum import (
    CIPHERTEXT_BYTES,
    COMMITMENT_BYTES,
    PUBLIC_KEY_BYTES,
    SHARE_BYTES,
    SIGNATURE_BYTES,
    AgreementKey,
    EphemeralKey,
    FixedPoint,
    Revealed,
    SharesOut,
    SumId,
    SumSpec,
)

Scalar = str | int | float | bool
MetricValue = int | float | list[int] | list[float]


class MessageKind(StrEnum):
    """Flower message types of the protocol (``<category>`` or ``<category>.<action>``)."""

    DESCRIBE = "query.describe"
    TRAIN = "train"
    EVALUATE = "evaluate"
    QUERY_OFFER = "query.offer"
    QUERY_ANSWER = "query.answer"
    SECURE_SUM_KEYS = "query.secure_sum_keys"
    SECURE_SUM_SHARE = "query.secure_sum_share"
    SECURE_SUM_MASK = "query.secure_sum_mask"
    SECURE_SUM_CONFIRM = "query.secure_sum_confirm"
    SECURE_SUM_UNMASK = "query.secure_sum_unmask"
    OVERLAP_OFFER = "query.overlap_offer"
    OVERLAP_BLIND = "query.overlap_blind"
    OVERLAP_REBLIND = "query.overlap_reblind"
    TREES = "train.trees"  # one release of a DP tree run: histograms of a level, or leaves


class TaskKind(StrEnum):
    """What a federated run trains."""

    CHURN = "churn"
    TREND = "trend"


class ReplyState(StrEnum):
    """How a firm answered."""

    OK = "ok"
    BUDGET_EXHAUSTED = "budget_exhausted"
    DECLINED = "declined"  # the firm's own policy says no (e.g. evaluation turned off)
    ERROR = "error"


class ProtocolError(ConfigError):
    """A message does not have the shape its kind requires."""


#: A run id names files on every firm (its plan, its kept updates): letters, digits, ``._-``.
RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")


@dataclass(frozen=True)
class Wire:
    """A message's content without Flower: one config, one metrics and one arrays record."""

    config: Mapping[str, Scalar] = field(default_factory=dict)
    metrics: Mapping[str, MetricValue] = field(default_factory=dict)
    arrays: Sequence[np.ndarray] | None = None


# ------------------------------------------------------------------------------ flat codec


def flat_encode(values: Mapping[str, Any]) -> dict[str, Scalar]:
    """``snake_case`` keys to Flower's ``hyphen-case``; enums to their values."""
    out: dict[str, Scalar] = {}
    for key, value in values.items():
        if isinstance(value, Enum):
            value = value.value
        if not isinstance(value, str | int | float | bool):
            raise ProtocolError(f"'{key}' has type {type(value).__name__}; only scalars travel")
        out[key.replace("_", "-")] = value
    return out


def flat_decode(flat: Mapping[str, Any]) -> dict[str, Any]:
    """The inverse of :func:`flat_encode` (values untouched; the receiver validates them)."""
    return {str(k).replace("-", "_"): v for k, v in flat.items()}


def _field(record: Mapping[str, Any], key: str, kind: type, what: str) -> Any:
    try:
        value = record[key]
    except KeyError:
        raise ProtocolError(f"{what} lacks '{key}'") from None
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ProtocolError(f"{what} field '{key}' must be {kind.__name__}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ProtocolError(f"{what} field '{key}' must be finite")
    return value


def arrays_hash(arrays: Sequence[np.ndarray]) -> str:
    """sha256 over dtype, shape and bytes of each array: the identity of a model or an update.

    Firms log it in ``update_sent``, the coordinator in ``update_accepted``; an auditor matches
    the two.
    """
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(str(a.dtype).encode() + str(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()


# ------------------------------------------------------------------------------ run spec


@dataclass(frozen=True)
class RunSpec:
    """The run's parameters every firm receives with each train/evaluate request."""

    run_id: str
    task: TaskKind
    rounds: int
    model: ChurnModelKind
    target_epsilon: float
    local_epochs: float
    batch_size: int
    learning_rate: float
    max_grad_norm: float
    optimizer: DpOptimizer
    proximal_mu: float
    seed: int
    evaluations: int = 0  # evaluation requests the coordinator will send in this run
    schema: str = ""  # the run's public feature schema (JSON), "" when the task fixes the layout
    secure_aggregation: bool = False  # updates are summed by the secure sum, never sent alone

    def to_config(self) -> dict[str, Scalar]:
        return flat_encode(asdict(self))

    def dp_sgd(self) -> DpSgdSettings:
        """The run's local DP-SGD settings (validated when the spec is decoded)."""
        return DpSgdSettings(
            epochs=self.local_epochs, batch_size=self.batch_size,
            learning_rate=self.learning_rate, max_grad_norm=self.max_grad_norm,
            optimizer=self.optimizer,
        )

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> RunSpec:
        values = flat_decode(config)
        what = "run spec from the coordinator"
        try:
            spec = cls(
                run_id=_field(values, "run_id", str, what),
                task=TaskKind(_field(values, "task", str, what)),
                rounds=_field(values, "rounds", int, what),
                model=ChurnModelKind(_field(values, "model", str, what)),
                target_epsilon=_field(values, "target_epsilon", float, what),
                local_epochs=_field(values, "local_epochs", float, what),
                batch_size=_field(values, "batch_size", int, what),
                learning_rate=_field(values, "learning_rate", float, what),
                max_grad_norm=_field(values, "max_grad_norm", float, what),
                optimizer=DpOptimizer(_field(values, "optimizer", str, what)),
                proximal_mu=_field(values, "proximal_mu", float, what),
                seed=_field(values, "seed", int, what),
                evaluations=_field(values, "evaluations", int, what),
                schema=_field(values, "schema", str, what),
                secure_aggregation=_field(values, "secure_aggregation", bool, what),
            )
            spec.dp_sgd()
        except ValidationError as exc:
            first = exc.errors()[0]
            raise ProtocolError(
                f"malformed {what}: {first['loc'][0]} {first['msg']}"
            ) from None
        except ValueError as exc:  # an unknown enum value
            raise ProtocolError(f"malformed {what}: {exc}") from None
        if not RUN_ID.match(spec.run_id) or ".." in spec.run_id:
            raise ProtocolError(
                f"malformed {what}: run-id must be letters, digits, '.', '_' or '-' (at most 100)"
            )
        if (
            spec.rounds < 1 or not spec.target_epsilon > 0 or spec.proximal_mu < 0
            or not 0 <= spec.evaluations <= spec.rounds
        ):
            raise ProtocolError(
                f"malformed {what}: rounds must be >= 1, target-epsilon > 0, proximal-mu >= 0, "
                "0 <= evaluations <= rounds"
            )
        return spec


# ------------------------------------------------------------------------------ messages


@dataclass(frozen=True)
class DescribeRequest:
    kind: ClassVar[MessageKind] = MessageKind.DESCRIBE
    task: TaskKind
    schema: str = ""

    def encode(self) -> Wire:
        return Wire(config={"task": self.task.value, "schema": self.schema})

    @classmethod
    def decode(cls, wire: Wire) -> Self:
        what = "describe request"
        try:
            return cls(task=TaskKind(_field(wire.config, "task", str, what)),
                       schema=_field(wire.config, "schema", str, what))
        except ValueError as exc:
            raise ProtocolError(f"malformed describe request: {exc}") from None


@dataclass(frozen=True)
class DescribeReply:
    """A firm's public description of its side of a task: the model layout it can train (fixed
    by the run's public schema or the task), its declared public size and, for the trend task,
    how many weeks its holdout spans (fixed by its declared calibration date)."""

    firm: str
    layout: str
    input_dim: int
    public_size: int
    holdout_weeks: int = 0

    def encode(self) -> Wire:
        return Wire(config={"state": ReplyState.OK.value, **flat_encode(asdict(self))})

    @classmethod
    def decode(cls, wire: Wire) -> Self:
        c, what = flat_decode(wire.config), "describe reply"
        return cls(
            firm=_field(c, "firm", str, what),
            layout=_field(c, "layout", str, what),
            input_dim=_field(c, "input_dim", int, what),
            public_size=_field(c, "public_size", int, what),
            holdout_weeks=_field(c, "holdout_weeks", int, what),
        )


@dataclass(frozen=True)
class TrainRequest:
    kind: ClassVar[MessageKind] = MessageKind.TRAIN
    spec: RunSpec
    server_round: int
    arrays: Sequence[np.ndarray]

    def encode(self) -> Wire:
        return Wire(config={**self.spec.to_config(), "server-round": self.server_round},
                    arrays=list(self.arrays))

    @classmethod
    def decode(cls, wire: Wire) -> Self:
        return cls(
            spec=RunSpec.from_config(wire.config),
            server_round=_field(wire.config, "server-round", int, "train request"),
            arrays=_arrays(wire, "train request"),
        )


@dataclass(frozen=True)
class TrainReply:
    """A firm's answer to a training round: its DP update (when ``state`` is OK) and budget.

    ``num_examples`` is the firm's declared public size (what FedAvg weights by), never its
    exact number of customers. With secure aggregation (``secure_sum``) the update stays on the
    firm, which adds it to the round's secure sum; the reply then carries no arrays.
    exact number of customers. ``replayed``: ``arrays`` is the update the firm released for this
    round of this run before (a restart lost the reply), sent again unchanged with no new charge
    (``epsilon_round`` is 0). ``rounds_released``: every round of this run the firm has released
    an update for, so the coordinator learns of an update it was charged for but never received.
    """

    firm: str
    state: ReplyState
    detail: str
    arrays: Sequence[np.ndarray] | None
    num_examples: int
    epsilon_round: float
    epsilon_total: float
    epsilon_cap: float
    delta: float
    audit_head_hash: str = ""
    audit_head_length: int = 0
    secure_sum: bool = False
    replayed: bool = False
    rounds_released: tuple[int, ...] = ()

    _CONFIG: ClassVar[tuple[str, ...]] = (
        "firm", "detail", "audit_head_hash", "audit_head_length", "secure_sum", "replayed"
    )
    _METRICS: ClassVar[tuple[str, ...]] = (
        "num_examples", "epsilon_round", "epsilon_total", "epsilon_cap", "delta"
    )

    def encode(self) -> Wire:
        values = asdict(self)
        return Wire(
            config={"state": self.state.value,
                    **flat_encode({k: values[k] for k in self._CONFIG}),
                    # in the config record: the strategy averages the metrics record
                    "rounds-released": ",".join(str(r) for r in self.rounds_released)},
            metrics={k.replace("_", "-"): values[k] for k in self._METRICS},
            arrays=None if self.arrays is None else list(self.arrays),
        )

    @classmethod
    def decode(cls, wire: Wire) -> Self:
        c, m, what = flat_decode(wire.config), flat_decode(wire.metrics), "train reply"
        try:
            state = ReplyState(_field(c, "state", str, what))
        except ValueError as exc:
            raise ProtocolError(f"malformed {what}: {exc}") from None
        secure_sum = _field(c, "secure_sum", bool, what)
        if state is ReplyState.OK and wire.arrays is None and not secure_sum:
            raise ProtocolError("train reply has no model arrays")
        return cls(
            firm=_field(c, "firm", str, what),
            state=state,
            detail=_field(c, "detail", str, what),
            arrays=None if wire.arrays is None else list(wire.arrays),
            num_examples=_field(m, "num_examples", int, what),
            epsilon_round=_field(m, "epsilon_round", float, what),
            epsilon_total=_field(m, "epsilon_total", float, what),
            epsilon_cap=_field(m, "epsilon_cap", float, what),
            delta=_field(m, "delta", float, what),
            audit_head_hash=_field(c, "audit_head_hash", str, what),
            audit_head_length=_field(c, "audit_head_length", int, what),
            secure_sum=secure_sum,
            replayed=_field(c, "replayed", bool, what),
            rounds_released=_rounds(_field(c, "rounds_released", str, what), what),
        )


@dataclass(frozen=True)
class EvaluateRequest:
    kind: ClassVar[MessageKind] = MessageKind.EVALUATE
    spec: RunSpec
    server_round: int
    arrays: Sequence[np.ndarray]

    def encode(self) -> Wire:
        return Wire(config={**self.spec.to_config(), "server-round": self.server_round},
                    arrays=list(self.arrays))

    @classmethod
    def decode(cls, wire: Wire) -> Self:
        return cls(
            spec=RunSpec.from_config(wire.config),
            server_round=_field(wire.config, "server-round", int, "evaluate request"),
            arrays=_arrays(wire, "evaluate request"),
        )


@dataclass(frozen=True)
class EvaluateReply:
    """A firm's DP evaluation of the model it trained on this round: noisy statistics only.

    ``statistics`` are noisy counts or sums with each customer's contribution bounded (see the
    task); ``noise_std`` is the noise's standard deviation per value (public: it follows from the
    firm's plan), ``epsilon`` what this evaluation cost alone and ``epsilon_total`` the firm's
    composed total after it. ``state`` is DECLINED when the firm's own policy says no.
    """

    firm: str
    state: ReplyState
    detail: str
    statistics: Mapping[str, Sequence[float]]
    noise_std: float
    epsilon: float
    epsilon_total: float

    def encode(self) -> Wire:
        metrics: dict[str, MetricValue] = {
            "noise-std": self.noise_std, "epsilon": self.epsilon,
            "epsilon-total": self.epsilon_total,
        }
        metrics.update({k: [float(x) for x in v] for k, v in self.statistics.items()})
        return Wire(
            config={"state": self.state.value, "firm": self.firm, "detail": self.detail},
            metrics=metrics,
        )

    @classmethod
    def decode(cls, wire: Wire) -> Self:
        what = "evaluate reply"
        try:
            state = ReplyState(_field(wire.config, "state", str, what))
        except ValueError as exc:
            raise ProtocolError(f"malformed {what}: {exc}") from None
        statistics = {
            k: tuple(float(x) for x in v) for k, v in wire.metrics.items() if isinstance(v, list)
        }
        return cls(
            firm=_field(wire.config, "firm", str, what),
            state=state,
            detail=_field(wire.config, "detail", str, what),
            statistics=statistics,
            noise_std=_field(wire.metrics, "noise-std", float, what),
            epsilon=_field(wire.metrics, "epsilon", float, what),
            epsilon_total=_field(wire.metrics, "epsilon-total", float, what),
        )


@dataclass(frozen=True)
class ErrorReply:
    """A firm could not answer: one line, no data values (details stay in the firm's logs)."""

    firm: str
    detail: str

    def encode(self) -> Wire:
        return Wire(
            config={"state": ReplyState.ERROR.value, "firm": self.firm, "detail": self.detail}
        )

    @classmethod
    def decode(cls, wire: Wire) -> Self | None:
        """The error a reply carries, or None when the reply is not an error."""
        if wire.config.get("state") != ReplyState.ERROR.value:
            return None
        return cls(firm=str(wire.config.get("firm", "")), detail=str(wire.config.get("detail", "")))


def _rounds(text: str, what: str) -> tuple[int, ...]:
    try:
        return tuple(int(r) for r in text.split(",") if r)
    except ValueError:
        raise ProtocolError(f"{what} field 'rounds-released' must be round numbers") from None


@dataclass(frozen=True)
class QueryOffer:
    """A federated DP query offered to a firm: it says whether it will answer, spending nothing.

    ``spec`` is the query's canonical JSON (:class:`fedcrm.analytics.spec.QuerySpec`);
    ``secure`` says whether the answers will be summed by the secure sum (then each firm adds
    only its share of the noise, see ``docs/analytics.md``).
    """

    kind: ClassVar[MessageKind] = MessageKind.QUERY_OFFER
    query_id: str
    spec: str
    secure: bool

    def encode(self) -> Wire:
        return Wire(config=flat_encode(
            {"query_id": self.query_id, "spec": self.spec, "secure": self.secure}
        ))

    @classmethod
    def decode(cls, wire: Wire) -> Self:
        c, what = flat_decode(wire.config), "query offer"
        return cls(query_id=_field(c, "query_id", str, what), spec=_field(c, "spec", str, what),
                   secure=_field(c, "secure", bool, what))


@dataclass(frozen=True)
class QueryOfferReply:
    """Whether a firm will answer a query (``state`` OK) or why not; its budget, no data."""

    firm: str
    state: ReplyState
    detail: str
    epsilon_total: float
    epsilon_cap: float
    public_size: int = 0  # the firm's declared public size (secure sums size their range by it)

    def encode(self) -> Wire:
        return Wire(
            config={"state": self.state.value, "firm": self.firm, "detail": self.detail},
            metrics={"epsilon-total": self.epsilon_total, "epsilon-cap": self.epsilon_cap,
                     "public-size": self.public_size},
        )

    @classmethod
    def decode(cls, wire: Wire) -> Self:
        what = "query offer reply"
        try:
            state = ReplyState(_field(wire.config, "state", str, what))
        except ValueError as exc:
            raise ProtocolError(f"malformed {what}: {exc}") from None
        return cls(
            firm=_field(wire.config, "firm", str, what), state=state,
            detail=_field(wire.config, "detail", str, what),
            epsilon_total=_field(wire.metrics, "epsilon-total", float, what),
            epsilon_cap=_field(wire.metrics, "epsilon-cap", float, what),
            public_size=_field(wire.metrics, "public-size", int, what),
        )


@dataclass(frozen=True)
class QueryAnswerRequest:
    """Answer the query now (plain mode: the coordinator sees each firm's noisy vector)."""

    kind: ClassVar[MessageKind] = MessageKind.QUERY_ANSWER
    query_id: str
    spec: str
    secure: bool

    def encode(self) -> Wire:
        return QueryOffer(self.query_id, self.spec, self.secure).encode()

    @classmethod
    def decode(cls, wire: Wire) -> Self:
        offer = QueryOffer.decode(wire)
        return cls(query_id=offer.query_id, spec=offer.spec, secure=offer.secure)


@dataclass(frozen=True)
class QueryAnswer:
    """A firm's DP answer: its noisy integer vector in the query's public layout.

    ``values`` are integers on the query's grid (:func:`fedcrm.analytics.statistics.layout`) with
    discrete Gaussian noise of standard deviation ``noise_std`` (grid units) added; ``epsilon`` is
    what the answer cost at the firm's δ, ``epsilon_total`` its composed total after it.
    """

    firm: str
    state: ReplyState
    detail: str
    values: Sequence[int]
    noise_std: float
    epsilon: float
    epsilon_total: float

    def encode(self) -> Wire:
        return Wire(
            config={"state": self.state.value, "firm": self.firm, "detail": self.detail},
            metrics={"noise-std": self.noise_std, "epsilon": self.epsilon,
                     "epsilon-total": self.epsilon_total},
            arrays=[np.asarray(self.values, dtype=np.int64)] if self.values else None,
        )

    @classmethod
    def decode(cls, wire: Wire) -> Self:
        what = "query answer"
        try:
            state = ReplyState(_field(wire.config, "state", str, what))
        except ValueError as exc:
            raise ProtocolError(f"malformed {what}: {exc}") from None
        values: tuple[int, ...] = ()
        if wire.arrays:
            array = np.asarray(wire.arrays[0])
            if len(wire.arrays) != 1 or array.dtype != np.int64 or array.ndim != 1:
                raise ProtocolError(f"{what} must carry one int64 vector")
            values = tuple(int(v) for v in array)
        if state is ReplyState.OK and not values:
            raise ProtocolError(f"{what} has no values")
        return cls(
            firm=_field(wire.config, "firm", str, what), state=state,
            detail=_field(wire.config, "detail", str, what), values=values,
            noise_std=_field(wire.metrics, "noise-std", float, what),
            epsilon=_field(wire.metrics, "epsilon", float, what),
            epsilon_total=_field(wire.metrics, "epsilon-total", float, what),
        )


# ------------------------------------------------------------------------------ customer overlap

#: What a firm's signature over its blinded set starts with (never an audit entry's form).
BLINDED_SET_DOMAIN = "fedcrm/overlap/v1/blinded-set"


def _state(wire: Wire, what: str) -> ReplyState:
    try:
        return ReplyState(_field(wire.config, "state", str, what))
    except ValueError as exc:
        raise ProtocolError(f"malformed {what}: {exc}") from None


def _elements(wire: Wire, what: str) -> np.ndarray | None:
    """The one packed ``uint8 (n, 32)`` array of blinded values a message carries, if any."""
    if not wire.arrays:
        return None
    if len(wire.arrays) != 1:
        raise ProtocolError(f"{what} must carry one array of blinded values")
    array = np.asarray(wire.arrays[0])
    try:
        unpack(array[:1])
    except BlindingError as exc:
        raise ProtocolError(f"malformed {what}: {exc}") from None
    return array


@dataclass(frozen=True)
class OverlapOffer:
    """A customer-overlap count offered to a firm: it says whether it will take part, spending
    nothing. ``spec`` is the canonical JSON of :class:`fedcrm.analytics.overlap.OverlapSpec`."""

    kind: ClassVar[MessageKind] = MessageKind.OVERLAP_OFFER
    overlap_id: str
    spec: str

    def encode(self) -> Wire:
        return Wire(config=flat_encode({"overlap_id": self.overlap_id, "spec": self.spec}))

    @classmethod
    def decode(cls, wire: Wire) -> Self:
        c, what = flat_decode(wire.config), "overlap offer"
        return cls(overlap_id=_field(c, "overlap_id", str, what),
                   spec=_field(c, "spec", str, what))


@dataclass(frozen=True)
class OverlapOfferReply:
    """Whether a firm takes part (``state`` OK) or why not; its budget and the public length
    of the set it will send (its declared public size plus the noise allowance)."""

    firm: str
    state: ReplyState
    detail: str
    epsilon_total: float
    epsilon_cap: float
    padded_length: int

    def encode(self) -> Wire:
        return Wire(
            config={"state": self.state.value, "firm": self.firm, "detail": self.detail},
            metrics={"epsilon-total": self.epsilon_total, "epsilon-cap": self.epsilon_cap,
                     "padded-length": self.padded_length},
        )

    @classmethod
    def decode(cls, wire: Wire) -> Self:
        what = "overlap offer reply"
        return cls(
            firm=_field(wire.config, "firm", str, what), state=_state(wire, what),
            detail=_field(wire.config, "detail", str, what),
            epsilon_total=_field(wire.metrics, "epsilon-total", float, what),
            epsilon_cap=_field(wire.metrics, "epsilon-cap", float, what),
            padded_length=_field(wire.metrics, "padded-length", int, what),
        )


@dataclass(frozen=True)
class OverlapBlindRequest:
    """Blind your match keys for the overlap (step 1): this is the firm's DP release."""

    kind: ClassVar[MessageKind] = MessageKind.OVERLAP_BLIND
    overlap_id: str
    spec: str

    def encode(self) -> Wire:
        return OverlapOffer(self.overlap_id, self.spec).encode()

    @classmethod
    def decode(cls, wire: Wire) -> Self:
        offer = OverlapOffer.decode(wire)
        return cls(overlap_id=offer.overlap_id, spec=offer.spec)


@dataclass(frozen=True)
class BlindedSet:
    """One firm's blinded, padded and shuffled keys for its peer, with its two public values
    (``[α]·base`` on the curve and on the twist, which the peer's dummies need) and the firm's
    Ed25519 signature over :meth:`signed_message`; the coordinator relays it unchanged."""

    sender: str
    recipient: str
    overlap_id: str
    fingerprint: str
    elements: np.ndarray
    public_curve: str  # hex
    public_twist: str  # hex
    signature: str = ""  # hex

    def signed_message(self) -> bytes:
        """The bytes the sender signs: everything above but the signature, domain-separated."""
        return json.dumps({
            "domain": BLINDED_SET_DOMAIN, "overlap_id": self.overlap_id,
            "fingerprint": self.fingerprint, "sender": self.sender, "recipient": self.recipient,
            "length": len(self.elements), "elements_sha256": elements_hash(self.elements),
            "public_curve": self.public_curve, "public_twist": self.public_twist,
        }, sort_keys=True, separators=(",", ":")).encode()

    def config(self) -> dict[str, Scalar]:
        return flat_encode({
            "sender": self.sender, "recipient": self.recipient, "overlap_id": self.overlap_id,
            "fingerprint": self.fingerprint, "public_curve": self.public_curve,
            "public_twist": self.public_twist, "signature": self.signature,
        })

    @classmethod
    def from_wire(cls, wire: Wire, what: str) -> Self:
        c = flat_decode(wire.config)
        elements = _elements(wire, what)
        if elements is None:
            raise ProtocolError(f"{what} carries no blinded values")
        return cls(
            sender=_field(c, "sender", str, what), recipient=_field(c, "recipient", str, what),
            overlap_id=_field(c, "overlap_id", str, what),
            fingerprint=_field(c, "fingerprint", str, what), elements=elements,
            public_curve=_field(c, "public_curve", str, what),
            public_twist=_field(c, "public_twist", str, what),
            signature=_field(c, "signature", str, what),
        )


@dataclass(frozen=True)
class OverlapBlindReply:
    """A firm's step 1: its signed :class:`BlindedSet` (when ``state`` is OK), the standard
    deviation of its noise (public: a function of the spec), what the release cost alone and
    the firm's composed total after it."""

    firm: str
    state: ReplyState
    detail: str
    blinded: BlindedSet | None
    noise_std: float
    epsilon: float
    epsilon_total: float

    def encode(self) -> Wire:
        config: dict[str, Scalar] = {"state": self.state.value, "firm": self.firm,
                                     "detail": self.detail}
        if self.blinded is not None:
            config.update(self.blinded.config())
        return Wire(
            config=config,
            metrics={"noise-std": self.noise_std, "epsilon": self.epsilon,
                     "epsilon-total": self.epsilon_total},
            arrays=None if self.blinded is None else [self.blinded.elements],
        )

    @classmethod
    def decode(cls, wire: Wire) -> Self:
        what = "overlap blind reply"
        state = _state(wire, what)
        blinded = BlindedSet.from_wire(wire, what) if state is ReplyState.OK else None
        return cls(
            firm=_field(wire.config, "firm", str, what), state=state,
            detail=_field(wire.config, "detail", str, what), blinded=blinded,
            noise_std=_field(wire.metrics, "noise-std", float, what),
            epsilon=_field(wire.metrics, "epsilon", float, what),
            epsilon_total=_field(wire.metrics, "epsilon-total", float, what),
        )


@dataclass(frozen=True)
class OverlapReblindRequest:
    """Step 2: blind the peer's signed set again and add your matching dummies."""

    kind: ClassVar[MessageKind] = MessageKind.OVERLAP_REBLIND
    overlap_id: str
    spec: str
    peer_set: BlindedSet

    def encode(self) -> Wire:
        return Wire(config={**self.peer_set.config(), "spec": self.spec},
                    arrays=[self.peer_set.elements])

    @classmethod
    def decode(cls, wire: Wire) -> Self:
        what = "overlap reblind request"
        peer_set = BlindedSet.from_wire(wire, what)
        return cls(overlap_id=peer_set.overlap_id, spec=_field(wire.config, "spec", str, what),
                   peer_set=peer_set)


@dataclass(frozen=True)
class OverlapMatches:
    """A firm's step 2, for the coordinator only: the peer's values blinded again with the
    firm's own dummies and padding, shuffled (``elements``, when ``state`` is OK)."""

    firm: str
    state: ReplyState
    detail: str
    elements: np.ndarray | None

    def encode(self) -> Wire:
        return Wire(config={"state": self.state.value, "firm": self.firm, "detail": self.detail},
                    arrays=None if self.elements is None else [self.elements])

    @classmethod
    def decode(cls, wire: Wire) -> Self:
        what = "overlap matches"
        state = _state(wire, what)
        elements = _elements(wire, what)
        if state is ReplyState.OK and elements is None:
            raise ProtocolError(f"{what} carries no values")
        return cls(firm=_field(wire.config, "firm", str, what), state=state,
                   detail=_field(wire.config, "detail", str, what), elements=elements)


def _arrays(wire: Wire, what: str) -> list[np.ndarray]:
    if wire.arrays is None:
        raise ProtocolError(f"{what} has no model arrays")
    return list(wire.arrays)



# ------------------------------------------------------------------------------ secure sums


class SumInput(StrEnum):
    """What a firm adds to a secure sum (the firm decides the values, never the coordinator)."""

    TRAINING_UPDATE = "training_update"  # its round's DP update, weighted by its public size
    QUERY_ANSWER = "query_answer"  # its DP answer to an analytics query, with its noise share


def _names(text: str) -> tuple[str, ...]:
    names = tuple(n for n in text.split(",") if n)
    if len(set(names)) != len(names):
        raise ProtocolError("a list of firms names a firm twice")
    return names


def _rows(blobs: Sequence[bytes], width: int) -> np.ndarray:
    return np.frombuffer(b"".join(blobs), dtype=np.uint8).reshape(len(blobs), width)


def _blobs(wire: Wire, index: int, width: int, count: int, what: str) -> list[bytes]:
    if wire.arrays is None or len(wire.arrays) <= index:
        raise ProtocolError(f"{what} lacks array {index}")
    a = np.asarray(wire.arrays[index])
    if a.dtype != np.uint8 or a.shape != (count, width):
        raise ProtocolError(f"{what} array {index} must be {count} x {width} bytes")
    return [bytes(row) for row in a]


def _hex(record: Mapping[str, Any], key: str, size: int, what: str) -> bytes:
    try:
        value = bytes.fromhex(_field(record, key, str, what))
    except ValueError:
        raise ProtocolError(f"{what} field '{key}' must be hex") from None
    if len(value) != size:
        raise ProtocolError(f"{what} field '{key}' must be {size} bytes")
    return value


@dataclass(frozen=True)
class SecureSumQuery:
    """What every request of a secure sum carries: the sum's public spec and what to add.

    ``weight_norm`` (training): the sum of the parties' public sizes; a firm adds its update times
    ``public_size / weight_norm`` and that weight, so the total holds the weighted sum and the sum
    of the weights. ``query_spec`` (analytics): the query's canonical JSON; the sum's run id is
    the query id.
    """

    spec: SumSpec
    source: SumInput
    weight_norm: int = 0
    query_spec: str = ""

    def to_config(self) -> dict[str, Scalar]:
        s, fp = self.spec, self.spec.fixed_point
        return {
            "sum-run": s.sum_id.run_id, "sum-round": s.sum_id.round, "sum-query": s.sum_id.query,
            "parties": ",".join(s.parties), "length": s.length, "lower": fp.lower,
            "upper": fp.upper, "scale": fp.scale, "neighbours": s.neighbours,
            "source": self.source.value, "weight-norm": self.weight_norm,
            "query-spec": self.query_spec,
        }

    @classmethod
    def from_config(cls, c: Mapping[str, Any]) -> SecureSumQuery:
        what = "secure-sum request"
        try:
            spec = SumSpec(
                sum_id=SumId(_field(c, "sum-run", str, what), _field(c, "sum-round", int, what),
                             _field(c, "sum-query", str, what)),
                parties=_names(_field(c, "parties", str, what)),
                length=_field(c, "length", int, what),
                fixed_point=FixedPoint(_field(c, "lower", float, what),
                                       _field(c, "upper", float, what),
                                       _field(c, "scale", int, what)),
                neighbours=_field(c, "neighbours", int, what),
            )
            return cls(spec, SumInput(_field(c, "source", str, what)),
                       _field(c, "weight-norm", int, what), str(c.get("query-spec", "")))
        except ValueError as exc:
            raise ProtocolError(f"malformed {what}: {exc}") from None
        except ConfigError as exc:
            raise ProtocolError(f"malformed {what}: {exc}") from None


def _ok(firm: str) -> dict[str, Scalar]:
    return {"state": ReplyState.OK.value, "firm": firm}


@dataclass(frozen=True)
class SecureSumKeysRequest:
    """Register the firms' long-term secure-sum keys for a run."""

    kind: ClassVar[MessageKind] = MessageKind.SECURE_SUM_KEYS
    run_id: str

    def encode(self) -> Wire:
        return Wire(config={"run-id": self.run_id})

    @classmethod
    def decode(cls, wire: Wire) -> Self:
        return cls(run_id=_field(wire.config, "run-id", str, "secure-sum keys request"))


@dataclass(frozen=True)
class SecureSumKeysReply:
    """A firm's long-term X25519 public key, signed with its Ed25519 audit key."""

    key: AgreementKey

    def encode(self) -> Wire:
        return Wire(config={**_ok(self.key.firm), "public-key": self.key.public_key.hex(),
                            "signature": self.key.signature.hex()})

    @classmethod
    def decode(cls, wire: Wire) -> Self:
        c, what = wire.config, "secure-sum keys reply"
        return cls(AgreementKey(
            firm=_field(c, "firm", str, what),
            public_key=_hex(c, "public-key", PUBLIC_KEY_BYTES, what),
            signature=_hex(c, "signature", SIGNATURE_BYTES, what),
        ))


@dataclass(frozen=True)
class SecureSumShareRequest:
    """Step 1: the sum, and the signed long-term keys of the recipient's neighbours."""

    kind: ClassVar[MessageKind] = MessageKind.SECURE_SUM_SHARE
    query: SecureSumQuery
    peer_keys: Mapping[str, AgreementKey]

    def encode(self) -> Wire:
        firms = sorted(self.peer_keys)
        keys = [self.peer_keys[f] for f in firms]
        return Wire(
            config={**self.query.to_config(), "key-firms": ",".join(firms)},
            arrays=[_rows([k.public_key for k in keys], PUBLIC_KEY_BYTES),
                    _rows([k.signature for k in keys], SIGNATURE_BYTES)],
        )

    @classmethod
    def decode(cls, wire: Wire) -> Self:
        what = "secure-sum share request"
        firms = _names(_field(wire.config, "key-firms", str, what))
        publics = _blobs(wire, 0, PUBLIC_KEY_BYTES, len(firms), what)
        signatures = _blobs(wire, 1, SIGNATURE_BYTES, len(firms), what)
        return cls(
            SecureSumQuery.from_config(wire.config),
            {f: AgreementKey(f, p, s) for f, p, s in zip(firms, publics, signatures, strict=True)},
        )


@dataclass(frozen=True)
class SecureSumShareReply:
    """Step 1's answer: the firm's signed per-sum key and its encrypted shares, one per
    neighbour."""

    shares: SharesOut

    def encode(self) -> Wire:
        e = self.shares.ephemeral
        return Wire(
            config={**_ok(e.firm), "public-key": e.public_key.hex(),
                    "commitment": e.commitment.hex(), "signature": e.signature.hex()},
            arrays=[_rows(list(self.shares.ciphertexts), CIPHERTEXT_BYTES)],
        )

    @classmethod
    def decode(cls, wire: Wire) -> Self:
        c, what = wire.config, "secure-sum share reply"
        if wire.arrays is None or len(wire.arrays) != 1:
            raise ProtocolError(f"{what} must hold one array of ciphertexts")
        count = int(np.asarray(wire.arrays[0]).shape[0])
        return cls(SharesOut(
            EphemeralKey(
                firm=_field(c, "firm", str, what),
                public_key=_hex(c, "public-key", PUBLIC_KEY_BYTES, what),
                commitment=_hex(c, "commitment", COMMITMENT_BYTES, what),
                signature=_hex(c, "signature", SIGNATURE_BYTES, what),
            ),
            tuple(_blobs(wire, 0, CIPHERTEXT_BYTES, count, what)),
        ))


@dataclass(frozen=True)
class SecureSumMaskRequest:
    """Step 2: who shared (``U1``) and the signed per-sum keys of the recipient's neighbours
    among them."""

    kind: ClassVar[MessageKind] = MessageKind.SECURE_SUM_MASK
    query: SecureSumQuery
    shared: tuple[str, ...]
    ephemerals: Mapping[str, EphemeralKey]

    def encode(self) -> Wire:
        firms = sorted(self.ephemerals)
        keys = [self.ephemerals[f] for f in firms]
        return Wire(
            config={**self.query.to_config(), "shared": ",".join(self.shared),
                    "key-firms": ",".join(firms)},
            arrays=[_rows([k.public_key for k in keys], PUBLIC_KEY_BYTES),
                    _rows([k.commitment for k in keys], COMMITMENT_BYTES),
                    _rows([k.signature for k in keys], SIGNATURE_BYTES)],
        )

    @classmethod
    def decode(cls, wire: Wire) -> Self:
        what = "secure-sum mask request"
        firms = _names(_field(wire.config, "key-firms", str, what))
        publics = _blobs(wire, 0, PUBLIC_KEY_BYTES, len(firms), what)
        commitments = _blobs(wire, 1, COMMITMENT_BYTES, len(firms), what)
        signatures = _blobs(wire, 2, SIGNATURE_BYTES, len(firms), what)
        return cls(
            SecureSumQuery.from_config(wire.config),
            _names(_field(wire.config, "shared", str, what)),
            {f: EphemeralKey(f, p, c, s)
             for f, p, c, s in zip(firms, publics, commitments, signatures, strict=True)},
        )


@dataclass(frozen=True)
class SecureSumMaskReply:
    """Step 2's answer: the firm's masked vector (uniform modulo 2^64 to the coordinator)."""

    firm: str
    masked: np.ndarray

    def encode(self) -> Wire:
        return Wire(config=_ok(self.firm), arrays=[np.asarray(self.masked, dtype=np.uint64)])

    @classmethod
    def decode(cls, wire: Wire) -> Self:
        what = "secure-sum mask reply"
        if wire.arrays is None or len(wire.arrays) != 1:
            raise ProtocolError(f"{what} must hold one masked vector")
        masked = np.asarray(wire.arrays[0])
        if masked.dtype != np.uint64 or masked.ndim != 1:
            raise ProtocolError(f"{what}: the masked vector must be uint64")
        return cls(_field(wire.config, "firm", str, what), masked)


@dataclass(frozen=True)
class SecureSumConfirmRequest:
    """The consistency step (analytics sums): the survivors the coordinator will unmask."""

    kind: ClassVar[MessageKind] = MessageKind.SECURE_SUM_CONFIRM
    query: SecureSumQuery
    survivors: tuple[str, ...]

    def encode(self) -> Wire:
        return Wire(config={**self.query.to_config(), "survivors": ",".join(self.survivors)})

    @classmethod
    def decode(cls, wire: Wire) -> Self:
        what = "secure-sum confirm request"
        return cls(SecureSumQuery.from_config(wire.config),
                   _names(_field(wire.config, "survivors", str, what)))


@dataclass(frozen=True)
class SecureSumConfirmReply:
    """The firm's Ed25519 signature over the sum's spec and the survivors it accepts (once)."""

    firm: str
    signature: bytes

    def encode(self) -> Wire:
        return Wire(config={**_ok(self.firm), "signature": self.signature.hex()})

    @classmethod
    def decode(cls, wire: Wire) -> Self:
        what = "secure-sum confirm reply"
        return cls(_field(wire.config, "firm", str, what),
                   _hex(wire.config, "signature", SIGNATURE_BYTES, what))


@dataclass(frozen=True)
class SecureSumUnmaskRequest:
    """Step 3: who shared (``U1``), who survived (``U2``), the shares the recipient's
    neighbours encrypted for it and, for analytics sums, the survivors' signed confirmations of
    that one list."""

    kind: ClassVar[MessageKind] = MessageKind.SECURE_SUM_UNMASK
    query: SecureSumQuery
    shared: tuple[str, ...]
    survivors: tuple[str, ...]
    ciphertexts: Mapping[str, bytes]
    confirmations: Mapping[str, bytes] = field(default_factory=dict)

    def encode(self) -> Wire:
        senders = sorted(self.ciphertexts)
        confirmed = sorted(self.confirmations)
        arrays = [_rows([self.ciphertexts[f] for f in senders], CIPHERTEXT_BYTES)]
        if confirmed:
            arrays.append(_rows([self.confirmations[f] for f in confirmed], SIGNATURE_BYTES))
        return Wire(
            config={**self.query.to_config(), "shared": ",".join(self.shared),
                    "survivors": ",".join(self.survivors), "share-senders": ",".join(senders),
                    "confirmed-by": ",".join(confirmed)},
            arrays=arrays,
        )

    @classmethod
    def decode(cls, wire: Wire) -> Self:
        what = "secure-sum unmask request"
        senders = _names(_field(wire.config, "share-senders", str, what))
        blobs = _blobs(wire, 0, CIPHERTEXT_BYTES, len(senders), what)
        confirmed = _names(str(wire.config.get("confirmed-by", "")))
        signatures = _blobs(wire, 1, SIGNATURE_BYTES, len(confirmed), what) if confirmed else []
        return cls(
            SecureSumQuery.from_config(wire.config),
            _names(_field(wire.config, "shared", str, what)),
            _names(_field(wire.config, "survivors", str, what)),
            dict(zip(senders, blobs, strict=True)),
            dict(zip(confirmed, signatures, strict=True)),
        )


@dataclass(frozen=True)
class SecureSumUnmaskReply:
    """Step 3's answer: Shamir shares of survivors' mask seeds and of dropped firms' per-sum
    key seeds (each share alone is a uniform field element)."""

    firm: str
    revealed: Revealed

    def encode(self) -> Wire:
        m, k = self.revealed.mask_shares, self.revealed.key_shares
        mask_owners, key_owners = sorted(m), sorted(k)
        return Wire(
            config={**_ok(self.firm), "mask-share-owners": ",".join(mask_owners),
                    "key-share-owners": ",".join(key_owners)},
            arrays=[_rows([m[f].to_bytes(SHARE_BYTES, "big") for f in mask_owners], SHARE_BYTES),
                    _rows([k[f].to_bytes(SHARE_BYTES, "big") for f in key_owners], SHARE_BYTES)],
        )

    @classmethod
    def decode(cls, wire: Wire) -> Self:
        c, what = wire.config, "secure-sum unmask reply"
        mask_owners = _names(_field(c, "mask-share-owners", str, what))
        key_owners = _names(_field(c, "key-share-owners", str, what))
        mask = _blobs(wire, 0, SHARE_BYTES, len(mask_owners), what)
        key = _blobs(wire, 1, SHARE_BYTES, len(key_owners), what)
        return cls(_field(c, "firm", str, what), Revealed(
            {f: int.from_bytes(b, "big") for f, b in zip(mask_owners, mask, strict=True)},
            {f: int.from_bytes(b, "big") for f, b in zip(key_owners, key, strict=True)},
        ))
# ------------------------------------------------------------------------------ DP trees

_TREE_PREFIX = "tree_"


def _tree_settings(config: Mapping[str, Any], what: str) -> TreeSettings:
    values = {k[len(_TREE_PREFIX):]: v for k, v in flat_decode(config).items()
              if k.startswith(_TREE_PREFIX)}
    try:
        return TreeSettings(**values)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise ProtocolError(f"malformed {what}: tree {first['loc'][0]} {first['msg']}") from None


@dataclass(frozen=True)
class TreesRequest:
    """One step of a DP tree run: the firm releases the (G, H) histograms of ``level`` for the
    round's trees, or their leaves (``level == settings.depth``). ``arrays`` is the ensemble so
    far (:meth:`fedcrm.learning.dp_trees.TreeEnsemble.to_arrays`): the finished trees of earlier
    rounds and this round's trees with the levels above ``level`` chosen."""

    kind: ClassVar[MessageKind] = MessageKind.TREES
    spec: RunSpec
    settings: TreeSettings
    server_round: int
    level: int
    arrays: Sequence[np.ndarray]

    def encode(self) -> Wire:
        settings = {f"{_TREE_PREFIX}{k}": v for k, v in self.settings.model_dump().items()}
        return Wire(config={**self.spec.to_config(), **flat_encode(settings),
                            "server-round": self.server_round, "level": self.level},
                    arrays=list(self.arrays))

    @classmethod
    def decode(cls, wire: Wire) -> Self:
        what = "trees request"
        return cls(
            spec=RunSpec.from_config(wire.config),
            settings=_tree_settings(wire.config, what),
            server_round=_field(wire.config, "server-round", int, what),
            level=_field(wire.config, "level", int, what),
            arrays=_arrays(wire, what),
        )


@dataclass(frozen=True)
class TreesReply:
    """A firm's release for one step of a DP tree run: ``sums`` are the noisy (G, H) cells
    (``[cells, 2]``, empty when ``state`` is not OK), ``noise_std`` the noise's standard deviation
    on each (public: it follows from the firm's plan), ``epsilon`` this release's own ε;
    ``num_examples`` is the firm's declared public size, as in :class:`TrainReply`."""

    firm: str
    state: ReplyState
    detail: str
    sums: np.ndarray
    num_examples: int
    noise_std: float
    epsilon: float
    epsilon_total: float
    epsilon_cap: float
    delta: float
    audit_head_hash: str = ""
    audit_head_length: int = 0

    def encode(self) -> Wire:
        return Wire(
            config={"state": self.state.value, "firm": self.firm, "detail": self.detail,
                    "audit-head-hash": self.audit_head_hash,
                    "audit-head-length": self.audit_head_length},
            metrics={"tree-sums": [float(v) for v in np.asarray(self.sums).ravel()],
                     "num-examples": self.num_examples, "noise-std": self.noise_std,
                     "epsilon": self.epsilon, "epsilon-total": self.epsilon_total,
                     "epsilon-cap": self.epsilon_cap, "delta": self.delta},
        )

    @classmethod
    def decode(cls, wire: Wire) -> Self:
        c, m, what = wire.config, wire.metrics, "trees reply"
        try:
            state = ReplyState(_field(c, "state", str, what))
        except ValueError as exc:
            raise ProtocolError(f"malformed {what}: {exc}") from None
        sums = m.get("tree-sums", [])
        if not isinstance(sums, list) or len(sums) % 2 or not all(
            isinstance(v, int | float) and math.isfinite(v) for v in sums
        ):
            raise ProtocolError(f"{what} field 'tree-sums' must be finite (G, H) pairs")
        return cls(
            firm=_field(c, "firm", str, what),
            state=state,
            detail=_field(c, "detail", str, what),
            sums=np.asarray(sums, dtype=np.float64).reshape(-1, 2),
            num_examples=_field(m, "num-examples", int, what),
            noise_std=_field(m, "noise-std", float, what),
            epsilon=_field(m, "epsilon", float, what),
            epsilon_total=_field(m, "epsilon-total", float, what),
            epsilon_cap=_field(m, "epsilon-cap", float, what),
            delta=_field(m, "delta", float, what),
            audit_head_hash=_field(c, "audit-head-hash", str, what),
            audit_head_length=_field(c, "audit-head-length", int, what),
        )
