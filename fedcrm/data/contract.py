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
from fedcrm.data.crm_vocabulary import BOOLEAN_FALSE, BOOLEAN_TRUE
from fedcrm.learning.settings import (
    LOCAL_TRAINING,
    TREE_TRAINING,
    BatchSize,
    ChurnModelKind,
    DpOptimizer,
    DpSgdSettings,
    Epochs,
    LearningRate,
    MaxGradNorm,
    TreeSettings,
)
from fedcrm.privacy.errors import ConfigError
from fedcrm.privacy.keys import check_firm_name
from fedcrm.privacy.ledger import BudgetFiles, anchored_budget_files
from fedcrm.privacy.match_keys import MATCH_KEY_KINDS, check_region
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


_FROZEN = ConfigDict(frozen=True, extra="forbid", use_enum_values=False, allow_inf_nan=False)

# A boolean column (or a label) that lists no values reads the generic yes/no words, English and
# Chinese (是/否, 有/无, ...): fedcrm.data.crm_vocabulary.
DEFAULT_TRUE = BOOLEAN_TRUE
DEFAULT_FALSE = BOOLEAN_FALSE


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
        if self.role is ColumnRole.LABEL and not (self.true_values and self.false_values):
            raise ValueError(
                "a label needs true_values (the churned side, e.g. [\"是\"]) and false_values "
                "(the other side, e.g. [\"否\"]), neither empty"
            )
        both = {v.strip().lower() for v in self.true_values} & {
            v.strip().lower() for v in self.false_values
        }
        if both:
            raise ValueError(f"true_values and false_values both hold {sorted(both)}")
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

    name: str = Field(pattern=r"^[A-Za-z0-9_-]+$", max_length=63)
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
    answer_queries: bool = Field(
        default=True, description="answer the coordinator's federated DP analytics queries"
    )
    max_query_epsilon: float = Field(
        default=1.0, gt=0, le=10, allow_inf_nan=False,
        description="the most ε one analytics query may spend (each query also counts against "
        "the firm's total cap)",
    )
    peer_keys_dir: Path | None = Field(
        default=None,
        description="secure sums: a folder of the peer firms' Ed25519 signing keys "
        "(<firm>.pub, exchanged out of band); a peer's secure-sum key counts only if the key "
        "held here signed it, so the coordinator cannot substitute one",
    )


class OverlapSection(BaseModel):
    """``[overlap]``: the firm's match key for private customer-overlap counts (``fedcrm
    overlap``) and the partner firms it will count its overlap with.

    The key is read from the firm's own source, normalised and blinded on its machine; it never
    leaves in any other form (``docs/analytics.md``, "Customer overlap (PSI)").
    """

    model_config = _FROZEN

    column: str = Field(
        description="source column of the customers table holding the key; it must be declared "
        'there with role = "pii" and pii = "phone", "national_id" or "email"'
    )
    region: str = Field(
        default="CN", description="region of phone numbers written without a country code"
    )
    peers: dict[str, Path] = Field(
        default_factory=dict,
        description="partner firm -> that firm's public signing key (its keys/signing.pub, "
        "exchanged out of band); the firm counts its overlap only with these firms and only "
        "blinds a set that firm signed",
    )

    @field_validator("region")
    @classmethod
    def _region(cls, region: str) -> str:
        try:
            return check_region(region)
        except ConfigError as exc:
            raise ValueError(str(exc)) from None

    @field_validator("peers")
    @classmethod
    def _peer_names(cls, peers: dict[str, Path]) -> dict[str, Path]:
        for name in peers:
            try:
                check_firm_name(name)
            except Exception as exc:
                raise ValueError(str(exc)) from None
        return peers


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
    trees: TreeSettings = Field(
        default=TREE_TRAINING, description="[training.trees]: how model = \"trees\" trains"
    )

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
    overlap: OverlapSection | None = None
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

    @model_validator(mode="after")
    def _overlap_key_declared(self) -> FirmConfig:
        if self.overlap is not None:
            self.match_key_kind()  # raises when the column is not a declared key
        return self

    def match_key_kind(self) -> PiiKind:
        """The PII kind of the declared ``[overlap] column`` (a phone, national id or e-mail)."""
        if self.overlap is None:
            raise ConfigError(
                f"{self.config_path or 'the firm config'} declares no [overlap] column: name the "
                "customers column that holds the match key (a phone, national id or e-mail)"
            )
        table = self.tables.get(TableName.CUSTOMERS)
        column = table.columns.get(self.overlap.column) if table is not None else None
        if column is None:
            raise ValueError(
                f"[overlap] column '{self.overlap.column}' is not a column of the customers table"
            )
        if column.role is not ColumnRole.PII or column.pii not in MATCH_KEY_KINDS:
            raise ValueError(
                f"[overlap] column '{self.overlap.column}' must be declared with role = \"pii\" "
                "and pii = \"phone\", \"national_id\" or \"email\""
            )
        assert column.pii is not None
        return column.pii

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
    federation = cfg.federation.model_copy(
        update={"peer_keys_dir": _resolve(base, cfg.federation.peer_keys_dir)}
    )
    overlap = None if cfg.overlap is None else cfg.overlap.model_copy(update={
        "peers": {name: _resolve(base, path) for name, path in cfg.overlap.peers.items()}
    })
    tables = {
        name: spec.model_copy(
            update={
                "source": spec.source.model_copy(update={"path": _resolve(base, spec.source.path)})
            }
        )
        for name, spec in cfg.tables.items()
    }
    return cfg.model_copy(
        update={"firm": firm, "budget": budget, "federation": federation, "tables": tables,
                "config_path": path, "overlap": overlap}
    )


def load_firm_config(path: Path) -> FirmConfig:
    data, raw = read_toml(Path(path), what="firm config")
    cfg = parse_firm_config(data, path=Path(path))
    return cfg.model_copy(update={"config_sha256": hashlib.sha256(raw).hexdigest()})
