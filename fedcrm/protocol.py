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
| ``train.trees`` | :class:`TreesRequest` | :class:`TreesReply` |
| any, on a firm-side failure | - | :class:`ErrorReply` |

The run's parameters that every firm receives travel as a :class:`RunSpec`, encoded flat by
:func:`flat_encode` - the same codec the coordinator's run config uses for Flower's run config.
What each reply field reveals, and how it is accounted, is listed in ``docs/privacy.md``.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from enum import Enum, StrEnum
from typing import Any, ClassVar, Self

import numpy as np
from pydantic import ValidationError

from fedcrm.learning.settings import ChurnModelKind, DpOptimizer, DpSgdSettings, TreeSettings
from fedcrm.privacy.errors import ConfigError

Scalar = str | int | float | bool
MetricValue = int | float | list[int] | list[float]


class MessageKind(StrEnum):
    """Flower message types of the protocol (``<category>`` or ``<category>.<action>``)."""

    DESCRIBE = "query.describe"
    TRAIN = "train"
    EVALUATE = "evaluate"
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
            )
            spec.dp_sgd()
        except ValidationError as exc:
            first = exc.errors()[0]
            raise ProtocolError(
                f"malformed {what}: {first['loc'][0]} {first['msg']}"
            ) from None
        except ValueError as exc:  # an unknown enum value
            raise ProtocolError(f"malformed {what}: {exc}") from None
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
    exact number of customers.
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

    _CONFIG: ClassVar[tuple[str, ...]] = (
        "firm", "detail", "audit_head_hash", "audit_head_length"
    )
    _METRICS: ClassVar[tuple[str, ...]] = (
        "num_examples", "epsilon_round", "epsilon_total", "epsilon_cap", "delta"
    )

    def encode(self) -> Wire:
        values = asdict(self)
        return Wire(
            config={"state": self.state.value,
                    **flat_encode({k: values[k] for k in self._CONFIG})},
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
        if state is ReplyState.OK and wire.arrays is None:
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


def _arrays(wire: Wire, what: str) -> list[np.ndarray]:
    if wire.arrays is None:
        raise ProtocolError(f"{what} has no model arrays")
    return list(wire.arrays)


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
