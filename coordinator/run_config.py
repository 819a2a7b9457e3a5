"""The coordinator's run config (``RUN.toml`` / ``[run]`` of a simulation config).

Parsed once into a frozen model. It travels to the ServerApp as Flower's flat run config
(:meth:`RunConfig.to_flower`), so it holds only plain, non-secret values: no key, no key path,
no firm data location (each firm's node config holds those).
"""

from __future__ import annotations

import hashlib
import json
from enum import StrEnum
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, model_validator

from fedcrm.config_file import BASE_DIR, load_toml, validate
from fedcrm.data.encoding import FeatureSchemaFile
from fedcrm.learning.settings import (
    FEDERATED_ROUND,
    TREE_TRAINING,
    BatchSize,
    ChurnModelKind,
    DpOptimizer,
    Epochs,
    LeafShare,
    LearningRate,
    MaxGradNorm,
    TreeBins,
    TreeDepth,
    TreeFeatures,
    TreeLearningRate,
    TreeSettings,
    TreesPerRound,
    TreeSplit,
)
from fedcrm.privacy.errors import ConfigError
from fedcrm.protocol import RunSpec, TaskKind, flat_decode, flat_encode


class StrategyKind(StrEnum):
    FEDAVG = "fedavg"
    FEDPROX = "fedprox"
    FEDADAM = "fedadam"
    FEDMEDIAN = "fedmedian"
    TRIMMED_MEAN = "trimmed_mean"
    KRUM = "krum"


SECURE_STRATEGIES = frozenset({StrategyKind.FEDAVG, StrategyKind.FEDPROX})
"""Strategies that need only the (weighted) sum of the updates, so secure aggregation can run
them; robust aggregators need each firm's update, and FedAdam is not wired to it."""


class RunConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    task: TaskKind = TaskKind.CHURN
    rounds: int = Field(default=20, ge=1, le=10_000)
    strategy: StrategyKind = StrategyKind.FEDAVG
    model: ChurnModelKind = ChurnModelKind.LOGISTIC
    min_firms: int = Field(default=2, ge=1)
    round_timeout: float = Field(default=120.0, gt=0)
    wait_for_firms: float = Field(default=60.0, ge=0, description="seconds to wait for min_firms")
    expected_firms: int = Field(
        default=0,
        ge=0,
        description="wait (up to wait_for_firms) for this many firms before round 1; "
        "0 = start once min_firms are connected (a simulation sets it to its number of firms)",
    )
    target_epsilon: float = Field(
        default=1.0, gt=0, description="ε each firm may spend on this run"
    )
    # local DP-SGD per round; defaults: fedcrm.learning.settings.FEDERATED_ROUND
    local_epochs: Epochs = FEDERATED_ROUND.epochs
    batch_size: BatchSize = FEDERATED_ROUND.batch_size
    learning_rate: LearningRate = FEDERATED_ROUND.learning_rate
    max_grad_norm: MaxGradNorm = FEDERATED_ROUND.max_grad_norm
    optimizer: DpOptimizer = FEDERATED_ROUND.optimizer
    proximal_mu: float = Field(default=0.01, ge=0, description="FedProx only")
    server_learning_rate: float = Field(default=0.1, gt=0, description="FedAdam only")
    trim_fraction: float = Field(default=0.2, ge=0, lt=0.5, description="trimmed_mean only")
    krum_malicious: int = Field(default=1, ge=0, description="krum only")
    max_update_norm: float = Field(
        default=100.0, gt=0, description="reject updates farther than this from the global model"
    )
    max_update_norm_ratio: float = Field(
        default=10.0,
        ge=0,
        allow_inf_nan=False,
        description="reject updates farther from the global model than this many times the "
        "round's median update distance (0 = off; needs at least 3 updates in the round)",
    )
    evaluate: bool = Field(
        default=True, description="ask firms for a DP evaluation (each firm decides to answer)"
    )
    evaluate_every: int = Field(
        default=0, ge=0, description="evaluate every N rounds; 0 = only in the last round"
    )
    seed: int = 0
    schema_file: Path | None = Field(
        default=None,
        description="churn: the run's public feature schema (TOML, e.g. configs/schemas/"
        "telco.toml), relative to this config file",
    )
    feature_schema: str = Field(
        default="", description="the loaded schema as it travels to firms (set from schema_file)"
    )
    secure_aggregation: bool = Field(
        default=False,
        description="firms add their weighted updates through the secure sum: the coordinator "
        "sees only the sum of the updates and of the weights (fedavg and fedprox only)",
    )
    secure_sum_neighbours: int = Field(
        default=0, ge=0,
        description="secure aggregation: peers each firm shares its seeds with (0 = every other "
        "firm; e.g. 20 for large federations: a k-regular graph as in SecAgg+)",
    )
    # model = "trees": `rounds` boosting rounds of `trees_per_round` trees each; defaults and
    # the one validation of each setting: fedcrm.learning.settings (see tree_settings())
    trees_per_round: TreesPerRound = TREE_TRAINING.trees_per_round
    tree_depth: TreeDepth = TREE_TRAINING.depth
    tree_split: TreeSplit = TREE_TRAINING.split
    tree_bins: TreeBins = TREE_TRAINING.bins
    tree_features: TreeFeatures = TREE_TRAINING.features_per_tree
    tree_learning_rate: TreeLearningRate = TREE_TRAINING.learning_rate
    tree_leaf_share: LeafShare = TREE_TRAINING.leaf_share

    @model_validator(mode="after")
    def _load_schema(self, info: ValidationInfo) -> RunConfig:
        if self.schema_file is None or self.feature_schema:
            return self
        base = Path((info.context or {}).get(BASE_DIR) or Path.cwd())
        path = self.schema_file if self.schema_file.is_absolute() else base / self.schema_file
        layout = load_toml(path, FeatureSchemaFile, what="feature schema").layout()
        # set once while validating (the model is frozen afterwards)
        object.__setattr__(self, "feature_schema", layout.canonical_json())
        return self

    @model_validator(mode="after")
    def _secure_strategy(self) -> RunConfig:
        if self.secure_aggregation and self.strategy not in SECURE_STRATEGIES:
            raise ValueError(
                f"secure_aggregation = true cannot run strategy '{self.strategy.value}': it needs "
                "each firm's update (a median, a trimmed mean or Krum's distances), which the "
                "secure sum hides by design; use strategy = \"fedavg\" or \"fedprox\", or set "
                "secure_aggregation = false"
            )
        return self

    @model_validator(mode="after")
    def _check(self) -> RunConfig:
        if self.strategy is StrategyKind.KRUM and self.min_firms < 2 * self.krum_malicious + 3:
            raise ValueError(
                f"krum with krum_malicious={self.krum_malicious} needs min_firms >= "
                f"{2 * self.krum_malicious + 3}"
            )
        return self

    @model_validator(mode="after")
    def _trees(self) -> RunConfig:
        if self.model is ChurnModelKind.TREES and self.task is not TaskKind.CHURN:
            raise ValueError('model = "trees" is a churn model; set task = "churn"')
        return self

    @property
    def aggregation(self) -> str:
        """How the run combines the firms' releases, as summaries and displays name it: the
        strategy, or ``dp-trees`` for ``model = "trees"`` (which uses no FedAvg-style strategy)."""
        return "dp-trees" if self.model is ChurnModelKind.TREES else self.strategy.value

    def tree_settings(self) -> TreeSettings:
        """A trees run's settings (``rounds`` is the run's number of boosting rounds)."""
        return TreeSettings(
            rounds=self.rounds, trees_per_round=self.trees_per_round, depth=self.tree_depth,
            split=self.tree_split, bins=self.tree_bins, features_per_tree=self.tree_features,
            learning_rate=self.tree_learning_rate, leaf_share=self.tree_leaf_share,
        )

    def evaluation_rounds(self) -> tuple[int, ...]:
        """The rounds in which firms are asked to evaluate the model they trained on."""
        if not self.evaluate:
            return ()
        every = self.evaluate_every or self.rounds
        return tuple(r for r in range(1, self.rounds + 1) if r % every == 0 or r == self.rounds)

    def run_spec(self, run_id: str) -> RunSpec:
        """What every firm receives about this run with each request."""
        if self.task is TaskKind.CHURN and not self.feature_schema:
            raise ConfigError(
                "a churn run needs its public feature schema: set [run] schema_file (e.g. "
                "configs/schemas/telco.toml); every firm maps its columns onto it, so nothing "
                "derived from one firm's data shapes the shared model"
            )
        return RunSpec(
            run_id=run_id,
            task=self.task,
            rounds=self.rounds,
            model=self.model,
            target_epsilon=self.target_epsilon,
            local_epochs=self.local_epochs,
            batch_size=self.batch_size,
            learning_rate=self.learning_rate,
            max_grad_norm=self.max_grad_norm,
            optimizer=self.optimizer,
            proximal_mu=self.proximal_mu if self.strategy is StrategyKind.FEDPROX else 0.0,
            seed=self.seed,
            evaluations=len(self.evaluation_rounds()),
            schema=self.feature_schema if self.task is TaskKind.CHURN else "",
            secure_aggregation=self.secure_aggregation,
        )

    def config_hash(self) -> str:
        return hashlib.sha256(
            self.model_dump_json(exclude={"schema_file"}).encode()
        ).hexdigest()

    def to_flower(self, *, run_id: str, run_dir: Path) -> dict[str, str | int | float | bool]:
        """Flower's flat run config (``flwr run --run-config``): the protocol's flat codec."""
        values = self.model_dump(exclude={"schema_file"})  # a path on the coordinator's disk
        return flat_encode({**values, "run_id": run_id, "run_dir": str(run_dir)})

    @classmethod
    def from_flower(cls, flat: dict[str, Any]) -> tuple[RunConfig, str, Path]:
        values = flat_decode(flat)
        run_id = str(values.pop("run_id", ""))
        run_dir = Path(str(values.pop("run_dir", "runs/unnamed")))
        known = set(cls.model_fields)
        cfg = validate(
            cls, {k: v for k, v in values.items() if k in known}, where="Flower run config"
        )
        return cfg, run_id or run_dir.name, run_dir


def parse_run_config(data: dict[str, Any], *, where: str) -> RunConfig:
    return validate(RunConfig, data, where=where, prefix="run")


def canonical_hash(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()
