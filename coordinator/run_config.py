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
    BatchSize,
    ChurnModelKind,
    DpOptimizer,
    Epochs,
    LearningRate,
    MaxGradNorm,
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


class RunConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

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
    def _check(self) -> RunConfig:
        if self.strategy is StrategyKind.KRUM and self.min_firms < 2 * self.krum_malicious + 3:
            raise ValueError(
                f"krum with krum_malicious={self.krum_malicious} needs min_firms >= "
                f"{2 * self.krum_malicious + 3}"
            )
        return self

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
