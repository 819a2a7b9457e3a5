"""Feature encoding fixed by the partner config, never fitted on data.

Every firm encodes its customers with the same :class:`FeatureLayout`, so model inputs line up
column by column without any firm revealing statistics (means, category frequencies, ranges) of its
data. Firms compare :meth:`FeatureLayout.fingerprint` before training together.

Encoding rules (decided here, once):

* **numeric** ``NumericSpec(name, low, high)``: ``(x - low) / (high - low)`` clipped to ``[0, 1]``.
  A missing value (NaN / blank) encodes as ``0.0``; with ``missing_indicator=True`` an extra
  ``<name>__missing`` 0/1 column is appended after it. The default is no indicator: in the CRM
  schema a blank amount almost always means "nothing yet" (e.g. Telco's 11 blank
  ``total_charges`` are all customers with tenure 0), for which 0 is the right value.
  A non-blank value that is not a number is a :class:`~privacy.errors.SchemaError`.
* **categorical** ``CategoricalSpec(name, categories)``: one-hot over the declared categories plus
  a final ``<name>=__other__`` slot that takes unknown AND missing values.
* **boolean** ``BooleanSpec(name)``: 1/0 from the yes/no words of
  :data:`fedcrm.data.crm_vocabulary.YES_NO_PAIRS` (``1/0``, ``true/false``, ``yes/no``, ``是/否``
  ..., case-insensitive) or bools; missing encodes as 0; anything else is a SchemaError.

Errors name the column and a count, never the offending value (it could be PII).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field

from fedcrm.data.crm_vocabulary import BOOLEAN_FALSE, BOOLEAN_TRUE
from fedcrm.privacy.errors import ConfigError, SchemaError

LAYOUT_VERSION = "fedcrm/feature-layout/v1"
OTHER = "__other__"
_TRUE = frozenset(BOOLEAN_TRUE)
_FALSE = frozenset(BOOLEAN_FALSE)


@dataclass(frozen=True)
class NumericSpec:
    """A numeric column scaled by its declared range ``[low, high]``."""

    name: str
    low: float
    high: float
    missing_indicator: bool = False

    def __post_init__(self) -> None:
        if not (np.isfinite(self.low) and np.isfinite(self.high) and self.low < self.high):
            raise ConfigError(
                f"feature '{self.name}': declared range must be finite with low < high, got "
                f"[{self.low}, {self.high}]; fix the range in the partner config"
            )

    @property
    def feature_names(self) -> tuple[str, ...]:
        return (self.name, f"{self.name}__missing") if self.missing_indicator else (self.name,)

    def canonical(self) -> dict[str, Any]:
        return {"kind": "numeric", "name": self.name, "low": float(self.low),
                "high": float(self.high), "missing_indicator": self.missing_indicator}

    def encode(self, column: pd.Series) -> np.ndarray:
        values = _as_numbers(column, self.name)
        missing = np.isnan(values)
        scaled = np.clip((values - self.low) / (self.high - self.low), 0.0, 1.0)
        scaled[missing] = 0.0
        if self.missing_indicator:
            return np.stack([scaled, missing.astype(np.float64)], axis=1)
        return scaled[:, None]


@dataclass(frozen=True)
class CategoricalSpec:
    """A categorical column one-hot encoded over declared categories plus an "other" slot."""

    name: str
    categories: tuple[str, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "categories", tuple(str(c) for c in self.categories))
        if not self.categories or len(set(self.categories)) != len(self.categories):
            raise ConfigError(
                f"feature '{self.name}': declare a non-empty list of distinct categories "
                "in the partner config"
            )
        if OTHER in self.categories:
            raise ConfigError(f"feature '{self.name}': '{OTHER}' is reserved; rename that category")

    @property
    def feature_names(self) -> tuple[str, ...]:
        return tuple(f"{self.name}={c}" for c in (*self.categories, OTHER))

    def canonical(self) -> dict[str, Any]:
        return {"kind": "categorical", "name": self.name, "categories": list(self.categories)}

    def encode(self, column: pd.Series) -> np.ndarray:
        present = column.notna().to_numpy()
        text = column.astype(str).to_numpy()
        out = np.zeros((len(column), len(self.categories) + 1))
        for j, category in enumerate(self.categories):
            out[:, j] = present & (text == category)
        out[:, -1] = out[:, :-1].sum(axis=1) == 0
        return out


@dataclass(frozen=True)
class BooleanSpec:
    """A yes/no column encoded as 0/1."""

    name: str

    @property
    def feature_names(self) -> tuple[str, ...]:
        return (self.name,)

    def canonical(self) -> dict[str, Any]:
        return {"kind": "boolean", "name": self.name}

    def encode(self, column: pd.Series) -> np.ndarray:
        if pd.api.types.is_bool_dtype(column) and not column.isna().any():
            return column.to_numpy(dtype=np.float64)[:, None]
        present = column.notna().to_numpy()
        text = column.astype(str).str.strip().str.lower().to_numpy()
        true = present & np.isin(text, list(_TRUE))
        false = present & np.isin(text, list(_FALSE))
        bad = int((present & ~true & ~false).sum())
        if bad:
            raise SchemaError(
                f"column '{self.name}': {bad} value(s) are not boolean (expected 0/1, true/false, "
                "yes/no or 是/否); fix them in the export or declare the column as categorical"
            )
        return true.astype(np.float64)[:, None]


FeatureSpec = NumericSpec | CategoricalSpec | BooleanSpec


def _as_numbers(column: pd.Series, name: str) -> np.ndarray:
    if pd.api.types.is_numeric_dtype(column) and not pd.api.types.is_bool_dtype(column):
        return column.to_numpy(dtype=np.float64, na_value=np.nan)
    text = column.astype("string").str.strip()
    blank = text.isna() | (text == "")
    numbers = pd.to_numeric(text.mask(blank), errors="coerce")
    bad = int((numbers.isna() & ~blank).sum())
    if bad:
        raise SchemaError(
            f"column '{name}': {bad} value(s) are not numbers; fix them in the export "
            "or declare the column as categorical"
        )
    return numbers.to_numpy(dtype=np.float64, na_value=np.nan)


class FeatureLayout:
    """An ordered list of feature specs: the fixed input layout every firm's model uses."""

    def __init__(self, specs: Iterable[FeatureSpec]) -> None:
        self.specs: tuple[FeatureSpec, ...] = tuple(specs)
        if not self.specs:
            raise ConfigError("the feature layout is empty; declare at least one feature column")
        names = [s.name for s in self.specs]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ConfigError(f"feature column(s) declared twice: {', '.join(duplicates)}")
        self.feature_names: tuple[str, ...] = tuple(
            f for s in self.specs for f in s.feature_names
        )

    @property
    def dim(self) -> int:
        """Number of model input columns."""
        return len(self.feature_names)

    @property
    def columns(self) -> tuple[str, ...]:
        """Source columns the layout reads."""
        return tuple(s.name for s in self.specs)

    def canonical_json(self) -> str:
        """Canonical JSON of the specs (sorted keys, no whitespace): what the fingerprint hashes."""
        return json.dumps(
            {"version": LAYOUT_VERSION, "specs": [s.canonical() for s in self.specs]},
            sort_keys=True,
            separators=(",", ":"),
            ensure_ascii=False,
        )

    def fingerprint(self) -> str:
        """sha256 hex of :meth:`canonical_json`; equal fingerprints mean identical model inputs."""
        return hashlib.sha256(self.canonical_json().encode("utf-8")).hexdigest()

    def encode(self, df: pd.DataFrame) -> np.ndarray:
        """Encode ``df`` into a float32 ``[len(df), dim]`` matrix; extra columns are ignored."""
        missing = [c for c in self.columns if c not in df.columns]
        if missing:
            raise SchemaError(
                f"customer table lacks declared feature column(s) {', '.join(missing)}; "
                "add them to the export or remove them from the partner config"
            )
        if len(df) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        blocks = [s.encode(df[s.name]) for s in self.specs]
        return np.concatenate(blocks, axis=1).astype(np.float32)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, FeatureLayout) and self.specs == other.specs

    def __hash__(self) -> int:
        return hash(self.specs)

    def __repr__(self) -> str:
        return f"FeatureLayout(dim={self.dim}, fingerprint={self.fingerprint()[:12]}…)"

    @classmethod
    def from_json(cls, text: str) -> FeatureLayout:
        """The layout of :meth:`canonical_json` (a run's public schema, as firms receive it)."""
        try:
            data = json.loads(text)
            if data.get("version") != LAYOUT_VERSION:
                raise ValueError(f"version is {data.get('version')!r}, not {LAYOUT_VERSION!r}")
            specs: list[FeatureSpec] = []
            for spec in data["specs"]:
                kind = spec["kind"]
                if kind == "numeric":
                    specs.append(NumericSpec(spec["name"], float(spec["low"]),
                                             float(spec["high"]),
                                             missing_indicator=bool(spec["missing_indicator"])))
                elif kind == "categorical":
                    specs.append(CategoricalSpec(spec["name"], tuple(spec["categories"])))
                elif kind == "boolean":
                    specs.append(BooleanSpec(spec["name"]))
                else:
                    raise ValueError(f"unknown feature kind {kind!r}")
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ConfigError(f"the run's feature schema is malformed ({exc})") from None
        return cls(specs)


def layout_from_declared(
    categorical: Mapping[str, Sequence[str]],
    boolean: Sequence[str],
    numeric: Mapping[str, tuple[float, float]],
    *,
    missing_indicators: bool = False,
) -> FeatureLayout:
    """Layout from declared columns (e.g. ``simulations.datasets.TELCO_*``).

    Order is canonical so that two firms declaring the same columns in a different order get the
    same layout and fingerprint: numeric, then boolean, then categorical, each sorted by name;
    categories keep their declared order (it is part of the declaration).
    """
    specs: list[FeatureSpec] = [
        NumericSpec(name, float(low), float(high), missing_indicator=missing_indicators)
        for name, (low, high) in sorted(numeric.items())
    ]
    specs += [BooleanSpec(name) for name in sorted(boolean)]
    specs += [CategoricalSpec(name, tuple(cats)) for name, cats in sorted(categorical.items())]
    return FeatureLayout(specs)


class SchemaFeature(BaseModel):
    """One feature of a public schema file (``configs/schemas/*.toml``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(min_length=1, max_length=200)
    kind: Literal["numeric", "categorical", "boolean"]
    min: float | None = Field(default=None, allow_inf_nan=False)
    max: float | None = Field(default=None, allow_inf_nan=False)
    missing_indicator: bool = False
    categories: list[str] | None = None

    def spec(self) -> FeatureSpec:
        if self.kind == "numeric":
            if self.min is None or self.max is None:
                raise ConfigError(f"schema feature '{self.name}': a numeric feature needs min "
                                  "and max (its public, documented range)")
            return NumericSpec(self.name, self.min, self.max,
                               missing_indicator=self.missing_indicator)
        if self.kind == "categorical":
            return CategoricalSpec(self.name, tuple(self.categories or ()))
        return BooleanSpec(self.name)


class FeatureSchemaFile(BaseModel):
    """A federation's public feature schema: every feature that shapes the shared model, with its
    kind and its public range or categories. Firms map their own columns onto these names."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    features: list[SchemaFeature] = Field(min_length=1)

    def layout(self) -> FeatureLayout:
        """In canonical order (numeric, boolean, categorical; each by name), like a firm's."""
        specs = [f.spec() for f in self.features]
        order = {NumericSpec: 0, BooleanSpec: 1, CategoricalSpec: 2}
        return FeatureLayout(sorted(specs, key=lambda s: (order[type(s)], s.name)))
