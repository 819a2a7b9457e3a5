"""A partner firm's config (TOML), parsed once at the edge into frozen pydantic models.

The config maps the firm's own column names onto fedcrm's two canonical tables and gives every
column exactly one role. It never holds a secret: keys live in the firm's key directory (or in
environment variables) and a database URL with a password should come from ``url_env``.
See ``configs/firm.example.toml`` and ``docs/data-contract.md``.
"""

from __future__ import annotations

import hashlib
import os
from datetime import date
from enum import StrEnum
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from fedcrm.config_file import read_toml, validate
from fedcrm.learning.settings import (
    LOCAL_TRAINING,
    BatchSize,
    ChurnModelKind,
    DpOptimizer,
    DpSgdSettings,
    Epochs,
    LearningRate,
    MaxGradNorm,
)
from fedcrm.privacy.errors import ConfigError
from fedcrm.privacy.ledger import BudgetFiles, anchored_budget_files
from fedcrm.privacy.policies import MaskingPolicy, PiiKind


class ColumnRole(StrEnum):
    ID = "id"
    FEATURE = "feature"
    LABEL = "label"
    TIMESTAMP = "timestamp"
    PII = "pii"
    DROP = "drop"


class FeatureKind(StrEnum):
    NUMERIC = "numeric"
    CATEGORICAL = "categorical"
    BOOLEAN = "boolean"


class MissingPolicy(StrEnum):
    REJECT = "reject"  # a blank value sends the row to quarantine
    ALLOW = "allow"  # a blank value is kept as missing (numeric: encoded as 0 + missing flag)


class UnknownCategory(StrEnum):
    REJECT = "reject"
    OTHER = "other"


class SourceKind(StrEnum):
    CSV = "csv"
    PARQUET = "parquet"
    SQL = "sql"


class TableName(StrEnum):
    CUSTOMERS = "customers"
    TRANSACTIONS = "transactions"


_FROZEN = ConfigDict(frozen=True, extra="forbid", use_enum_values=False)

DEFAULT_TRUE = ("1", "true", "yes", "y", "t")
DEFAULT_FALSE = ("0", "false", "no", "n", "f")


class ColumnSpec(BaseModel):
    """One source column: its role and, per role, how to read and protect it."""

    model_config = _FROZEN

    role: ColumnRole
    name: str | None = Field(default=None, description="canonical name; defaults per role")
    kind: FeatureKind | None = None
    min: float | None = None
    max: float | None = None
    categories: tuple[str, ...] | None = None
    unknown: UnknownCategory = UnknownCategory.REJECT
    true_values: tuple[str, ...] = DEFAULT_TRUE
    false_values: tuple[str, ...] = DEFAULT_FALSE
    missing: MissingPolicy = MissingPolicy.REJECT
    format: str | None = Field(default=None, description="strftime format for timestamps")
    pii: PiiKind | None = None
    policy: MaskingPolicy | None = None
    bins: tuple[float, ...] | None = None
    prefix_len: int = 3

    @model_validator(mode="after")
    def _role_fields(self) -> ColumnSpec:
        if self.role is ColumnRole.PII:
            if self.policy is None:
                raise ValueError(
                    "a PII column needs a masking policy: pseudonymize, partial, generalize or drop"
                )
            if self.pii is None:
                raise ValueError('a PII column needs its kind, e.g. pii = "phone"')
        elif self.policy is not None:
            raise ValueError(f"'policy' only applies to role = \"pii\", not {self.role.value!r}")
        if self.role is ColumnRole.FEATURE:
            if self.kind is None:
                raise ValueError("a feature column needs kind = numeric | categorical | boolean")
            if self.kind is FeatureKind.NUMERIC and (self.min is None or self.max is None):
                raise ValueError(
                    "a numeric feature needs a declared range (min, max): fixed ranges keep every "
                    "firm's model input identical without sharing data"
                )
            if self.kind is FeatureKind.CATEGORICAL and not self.categories:
                raise ValueError("a categorical feature needs its list of categories")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min ({self.min}) is greater than max ({self.max})")
        return self

    def canonical(self, source: str, table: TableName) -> str:
        if self.role is ColumnRole.ID:
            return "customer_id"
        if self.role is ColumnRole.LABEL:
            return self.name or "churn"
        if self.role is ColumnRole.TIMESTAMP:
            default = "timestamp" if table is TableName.TRANSACTIONS else "signup_date"
            return self.name or default
        return self.name or source


class SourceSpec(BaseModel):
    model_config = _FROZEN

    kind: SourceKind
    path: Path | None = None
    encoding: str = "utf-8"
    delimiter: str = ","
    url: str | None = Field(default=None, description="SQLAlchemy URL (no passwords: use url_env)")
    url_env: str | None = Field(default=None, description="environment variable holding the URL")
    query: str | None = None
    table: str | None = None
    chunk_rows: int = Field(default=200_000, ge=1_000)

    @model_validator(mode="after")
    def _kind_fields(self) -> SourceSpec:
        if self.kind in (SourceKind.CSV, SourceKind.PARQUET) and self.path is None:
            raise ValueError(f"a {self.kind.value} source needs 'path'")
        if self.kind is SourceKind.SQL:
            if (self.url is None) == (self.url_env is None):
                raise ValueError("a sql source needs exactly one of 'url' or 'url_env'")
            if (self.query is None) == (self.table is None):
                raise ValueError("a sql source needs exactly one of 'query' or 'table'")
        if len(self.delimiter) != 1:
            raise ValueError("delimiter must be a single character")
        try:
            "x".encode(self.encoding)
        except LookupError:
            raise ValueError(f"unknown encoding {self.encoding!r} (try utf-8 or gb18030)") from None
        return self

    def database_url(self) -> str:
        if self.url is not None:
            return self.url
        assert self.url_env is not None
        value = os.environ.get(self.url_env)
        if not value:
            raise ConfigError(f"environment variable {self.url_env} (the database URL) is not set")
        return value

    def describe(self) -> str:
        if self.path is not None:
            return str(self.path)
        return f"sql:{self.table or 'query'}"


class TableSpec(BaseModel):
    model_config = _FROZEN

    source: SourceSpec
    columns: dict[str, ColumnSpec]

    @model_validator(mode="after")
    def _one_id(self) -> TableSpec:
        ids = [c for c, s in self.columns.items() if s.role is ColumnRole.ID]
        if len(ids) != 1:
            raise ValueError(f'exactly one column must have role = "id" (found {len(ids)})')
        return self


class FirmSection(BaseModel):
    model_config = _FROZEN

    name: str = Field(pattern=r"^[A-Za-z0-9_-]+$")
    keys_dir: Path
    store_dir: Path
    audit_log: Path | None = Field(default=None, description="default: <store_dir>/audit.jsonl")


class BudgetSection(BaseModel):
    model_config = _FROZEN

    epsilon: float = Field(gt=0, le=100)
    delta: float = Field(default=1e-5, gt=0, lt=1e-2)
    ledger: Path | None = None


class FederationSection(BaseModel):
    """The firm's own policy for federated runs (the coordinator cannot change it)."""

    model_config = _FROZEN

    public_size: int | None = Field(
        default=None,
        ge=1,
        le=1_000_000_000,
        description="a public upper bound on the firm's number of customers: federated runs "
        "sample and weight by it, so the exact count never leaves the firm",
    )
    evaluate: bool = Field(
        default=True, description="answer the coordinator's DP evaluation of the global model"
    )
    evaluation_share: float = Field(
        default=0.2, gt=0, lt=1, allow_inf_nan=False,
        description="share of each run's ε spent on evaluating the global model",
    )
    max_evaluations: int = Field(
        default=4, ge=1, le=1000, description="evaluations the firm answers per run at most"
    )


class ValidationSection(BaseModel):
    model_config = _FROZEN

    max_quarantine_fraction: float = Field(default=0.05, ge=0, le=1)


class FeatureSection(BaseModel):
    model_config = _FROZEN

    as_of: date | None = Field(default=None, description="reference date for RFM and ages")
    holdout_end: date | None = Field(
        default=None,
        description="trend task: the end of the holdout that follows as_of (declared, public)",
    )
    churn_cutoff: date | None = None
    churn_horizon_days: int = Field(default=90, ge=1)


class TrainingSection(BaseModel):
    """``fedcrm train`` settings; defaults: :data:`fedcrm.learning.settings.LOCAL_TRAINING`
    (epochs, batch size and learning rate unset: derived from the firm's size and ε by the
    budget rule; a value given here replaces its part of the rule)."""

    model_config = _FROZEN

    model: ChurnModelKind = ChurnModelKind.LOGISTIC
    epochs: Epochs | None = LOCAL_TRAINING.epochs
    batch_size: BatchSize | None = LOCAL_TRAINING.batch_size
    learning_rate: LearningRate | None = LOCAL_TRAINING.learning_rate
    max_grad_norm: MaxGradNorm = LOCAL_TRAINING.max_grad_norm
    optimizer: DpOptimizer = LOCAL_TRAINING.optimizer
    seed: int = 0

    @property
    def dp_sgd(self) -> DpSgdSettings:
        return DpSgdSettings(
            epochs=self.epochs, batch_size=self.batch_size, learning_rate=self.learning_rate,
            max_grad_norm=self.max_grad_norm, optimizer=self.optimizer,
            average_tail=LOCAL_TRAINING.average_tail,
        )


class FirmConfig(BaseModel):
    model_config = _FROZEN

    firm: FirmSection
    budget: BudgetSection
    federation: FederationSection = FederationSection()
    validation: ValidationSection = ValidationSection()
    features: FeatureSection = FeatureSection()
    training: TrainingSection = TrainingSection()
    tables: dict[TableName, TableSpec]
    config_path: Path | None = Field(default=None, exclude=True)
    config_sha256: str = Field(default="", exclude=True)

    @field_validator("tables")
    @classmethod
    def _some_table(cls, v: dict[TableName, TableSpec]) -> dict[TableName, TableSpec]:
        if not v:
            raise ValueError(
                "declare at least one table: [tables.customers] or [tables.transactions]"
            )
        return v

    @property
    def ledger_path(self) -> Path:
        return self.budget.ledger or self.firm.store_dir / "budget.jsonl"

    @property
    def audit_path(self) -> Path:
        return self.firm.audit_log or self.firm.store_dir / "audit.jsonl"

    @property
    def prepared_dir(self) -> Path:
        return self.firm.store_dir / "prepared"

    def budget_files(self) -> BudgetFiles:
        """Where this firm's ledger and signed audit log are: recorded in its key directory at
        first use, so the budget follows the firm's keys (see
        :func:`fedcrm.privacy.ledger.anchored_budget_files`)."""
        return anchored_budget_files(
            self.firm.keys_dir,
            firm=self.firm.name,
            ledger=self.ledger_path,
            audit_log=self.audit_path,
            explicit=self.budget.ledger is not None or self.firm.audit_log is not None,
        )


def _resolve(base: Path, p: Path | None) -> Path | None:
    if p is None:
        return None
    p = p.expanduser()
    return p if p.is_absolute() else (base / p)


def parse_firm_config(data: dict[str, Any], *, path: Path) -> FirmConfig:
    """Validate a parsed TOML document; relative paths are resolved against the file's folder."""
    cfg = validate(FirmConfig, data, where=str(path))
    base = path.parent
    firm = cfg.firm.model_copy(
        update={
            "keys_dir": _resolve(base, cfg.firm.keys_dir),
            "store_dir": _resolve(base, cfg.firm.store_dir),
            "audit_log": _resolve(base, cfg.firm.audit_log),
        }
    )
    budget = cfg.budget.model_copy(update={"ledger": _resolve(base, cfg.budget.ledger)})
    tables = {
        name: spec.model_copy(
            update={
                "source": spec.source.model_copy(update={"path": _resolve(base, spec.source.path)})
            }
        )
        for name, spec in cfg.tables.items()
    }
    return cfg.model_copy(
        update={"firm": firm, "budget": budget, "tables": tables, "config_path": path}
    )


def load_firm_config(path: Path) -> FirmConfig:
    data, raw = read_toml(Path(path), what="firm config")
    cfg = parse_firm_config(data, path=Path(path))
    return cfg.model_copy(update={"config_sha256": hashlib.sha256(raw).hexdigest()})
