"""Row validation against a firm's declared schema.

Each chunk of source rows is checked column by column (types, declared ranges and categories,
dates, duplicate and orphan ids, missing labels). Rows that fail go to quarantine with their row
number and a reason; nothing is silently dropped or coerced. Reasons never quote a data value:
they name the column and the rule (the declared range, the expected format).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from fedcrm.data.contract import (
    ColumnRole,
    ColumnSpec,
    FeatureKind,
    MissingPolicy,
    TableName,
    TableSpec,
    UnknownCategory,
)
from fedcrm.data.crm_vocabulary import is_label_word
from fedcrm.privacy.errors import SchemaError, UnmaskedColumn

EARLIEST = pd.Timestamp("1900-01-01")
OTHER = "__other__"
_SHOWN_LABEL_WORDS = 5  # a refused label names at most this many of its unknown label words


@dataclass
class IdRegistry:
    """Ids seen so far (as 64-bit hashes of the raw id), for duplicate and orphan checks.

    A sorted ``uint64`` array: 8 bytes per customer (a 10-million-row source needs 80 MB, where
    a dict of Python ints needed over 1 GB) and vectorised lookups instead of a Python loop.
    """

    hashes: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.uint64))

    def __contains__(self, h: int) -> bool:
        return bool(self.contains(np.array([h], dtype=np.uint64))[0])

    def __len__(self) -> int:
        return len(self.hashes)

    def contains(self, hashes: np.ndarray) -> np.ndarray:
        """Boolean mask: which of ``hashes`` were added before."""
        known = self.hashes
        if len(known) == 0:
            return np.zeros(len(hashes), dtype=bool)
        pos = np.searchsorted(known, hashes)
        pos[pos == len(known)] = 0
        return np.asarray(known[pos] == hashes, dtype=bool)

    def add(self, hashes: np.ndarray) -> None:
        """Add hashes that are not yet present (callers pass only new, distinct ones)."""
        new = np.sort(np.asarray(hashes, dtype=np.uint64))
        self.hashes = np.insert(self.hashes, np.searchsorted(self.hashes, new), new)


@dataclass
class LabelTally:
    """A label column's values over a whole table, for refusing a label no model can learn from.

    Counts the churned and not-churned values and the values in neither declared list. Of the
    latter it keeps only the distinct ones that are label words (`fedcrm.data.crm_vocabulary`:
    categories such as 是 or 流失, safe to name), never any other raw value: a stray cell in a
    label column could be personal data.
    """

    column: str
    spec: ColumnSpec
    churned: int = 0
    not_churned: int = 0
    outside: int = 0
    outside_words: set[str] = field(default_factory=set)

    def observe(self, raw: pd.Series, values: pd.Series) -> None:
        """Count one chunk: ``raw`` cells and their parsed 1.0 / 0.0 / NaN ``values``."""
        self.churned += int((values == 1.0).sum())
        self.not_churned += int((values == 0.0).sum())
        outside = (values.isna() & ~_blank(raw)).to_numpy(dtype=bool)
        self.outside += int(outside.sum())
        if outside.any() and len(self.outside_words) < _SHOWN_LABEL_WORDS:
            for word in _text(raw)[outside].unique():
                if len(self.outside_words) < _SHOWN_LABEL_WORDS and is_label_word(str(word)):
                    self.outside_words.add(str(word))

    def check(self, *, where: str, config: str) -> None:
        """Raise :class:`SchemaError` for values outside the declared lists or a single class."""
        lists = (f"true_values = {list(self.spec.true_values)}, "
                 f"false_values = {list(self.spec.false_values)}")
        if self.outside:
            words = ", ".join(repr(w) for w in sorted(self.outside_words))
            among = f", among them {words}" if words else ""
            raise SchemaError(
                f"{where}: label column {self.column!r} has {self.outside:,} values in neither "
                f"true_values nor false_values{among}; add each value to its side in {config} "
                f"(true_values = churned; now {lists}). Nothing was written"
            )
        labelled = self.churned + self.not_churned
        if labelled and (self.churned == 0 or self.not_churned == 0):
            side = "churned (true_values)" if self.not_churned == 0 else (
                "not churned (false_values)"
            )
            raise SchemaError(
                f"{where}: label column {self.column!r} has a single class: all {labelled:,} "
                f"labelled rows are {side}, and a churn model needs both. Check its lists in "
                f"{config} ({lists}). Nothing was written"
            )


@dataclass(frozen=True)
class ValidatedChunk:
    frame: pd.DataFrame  # good rows, canonical column names, parsed types; PII still unmasked
    issues: (
        pd.DataFrame
    )  # columns: row, column, reason, raw_id (raw_id must be masked before writing)
    rows_read: int


def check_columns(
    source_columns: list[str], spec: TableSpec, *, table: TableName, where: str, config: str
) -> None:
    """Fail closed on unmapped source columns; fail on mapped columns the source lacks."""
    declared = set(spec.columns)
    unmapped = [c for c in source_columns if c not in declared]
    if unmapped:
        names = ", ".join(repr(c) for c in unmapped[:5])
        more = f" (+{len(unmapped) - 5} more)" if len(unmapped) > 5 else ""
        raise UnmaskedColumn(
            f"{where}: column {names}{more} has no declared role/policy in {config}; "
            "fedcrm refuses "
            f'unmapped columns. Add it under [tables.{table.value}.columns] (role = "drop" to '
            "discard it), or run `fedcrm scan FILE --write-config` for a starter config"
        )
    missing = [c for c in spec.columns if c not in source_columns]
    if missing:
        names = ", ".join(repr(c) for c in missing[:5])
        raise SchemaError(
            f"{where}: mapped column {names} is missing from the source (found: "
            f"{', '.join(source_columns[:12])}); fix the column name in {config}"
        )


def _blank(s: pd.Series) -> pd.Series:
    if s.dtype == object or pd.api.types.is_string_dtype(s.dtype):
        return s.isna() | (s.astype("string").str.strip() == "")
    return s.isna()


def _text(s: pd.Series) -> pd.Series:
    return s.astype("string").str.strip()


def _parse_numeric(s: pd.Series, spec: ColumnSpec) -> tuple[pd.Series, list[tuple[pd.Series, str]]]:
    blank = _blank(s)
    values = pd.to_numeric(s if pd.api.types.is_numeric_dtype(s) else _text(s), errors="coerce")
    values = values.astype("float64")
    problems: list[tuple[pd.Series, str]] = []
    problems.append((~blank & values.isna(), "not a number"))
    problems.append((~blank & ~np.isfinite(values.fillna(0.0)), "not a finite number"))
    if spec.missing is MissingPolicy.REJECT:
        problems.append((blank, "missing value"))
    if spec.min is not None:
        problems.append((values < spec.min, f"below declared min {spec.min:g}"))
    if spec.max is not None:
        problems.append((values > spec.max, f"above declared max {spec.max:g}"))
    return values, problems


def _parse_categorical(
    s: pd.Series, spec: ColumnSpec
) -> tuple[pd.Series, list[tuple[pd.Series, str]]]:
    blank = _blank(s)
    values = _text(s)
    cats = set(spec.categories or ())
    known = values.isin(cats)
    problems: list[tuple[pd.Series, str]] = []
    if spec.unknown is UnknownCategory.REJECT:
        problems.append((~blank & ~known, "not one of the declared categories"))
    else:
        values = values.where(known | blank, OTHER)
    if spec.missing is MissingPolicy.REJECT:
        problems.append((blank, "missing value"))
    return values.astype(object).where(~blank, None), problems


def _parse_boolean(
    s: pd.Series, spec: ColumnSpec, *, what: str
) -> tuple[pd.Series, list[tuple[pd.Series, str]]]:
    blank = _blank(s)
    text = _text(s).str.lower()
    trues = {v.lower() for v in spec.true_values}
    falses = {v.lower() for v in spec.false_values}
    is_true = text.isin(trues).fillna(False).astype(bool)
    is_false = text.isin(falses).fillna(False).astype(bool)
    values = pd.Series(np.where(is_true, 1.0, np.where(is_false, 0.0, np.nan)), index=s.index)
    problems: list[tuple[pd.Series, str]] = [
        (~blank & ~is_true & ~is_false, f"{what} is not one of the declared true/false values")
    ]
    if spec.missing is MissingPolicy.REJECT or spec.role is ColumnRole.LABEL:
        problems.append((blank, f"missing {what}"))
    return values, problems


def _parse_timestamp(
    s: pd.Series, spec: ColumnSpec, *, today: pd.Timestamp
) -> tuple[pd.Series, list[tuple[pd.Series, str]]]:
    blank = _blank(s)
    if pd.api.types.is_datetime64_any_dtype(s):
        values = pd.to_datetime(s)
        if getattr(values.dt, "tz", None) is not None:
            values = values.dt.tz_convert("UTC").dt.tz_localize(None)
    else:
        fmt = spec.format or "ISO8601"
        values = pd.to_datetime(_text(s), format=fmt, errors="coerce")
    values = values.astype("datetime64[ns]")
    fmt_name = spec.format or "ISO 8601 (YYYY-MM-DD)"
    problems: list[tuple[pd.Series, str]] = [
        (~blank & values.isna(), f"not a date in format {fmt_name}"),
        (values < EARLIEST, "date before 1900-01-01"),
        (values > today + pd.Timedelta(days=1), "date in the future"),
    ]
    if spec.missing is MissingPolicy.REJECT:
        problems.append((blank, "missing date"))
    return values, problems


def validate_chunk(
    frame: pd.DataFrame,
    *,
    table: TableName,
    spec: TableSpec,
    first_row: int,
    ids: IdRegistry,
    known_customers: IdRegistry | None = None,
    today: pd.Timestamp | None = None,
    labels: Mapping[str, LabelTally] | None = None,
) -> ValidatedChunk:
    """Validate one chunk: the good rows (canonical names) and one issue per failed check.

    ``labels`` (by source column) count the chunk's label values.
    """
    today = today if today is not None else pd.Timestamp.now().normalize()
    n = len(frame)
    rows = np.arange(first_row, first_row + n)
    frame = frame.reset_index(drop=True)
    out: dict[str, pd.Series] = {}
    issue_masks: list[tuple[np.ndarray, str, str]] = []
    id_col = next(c for c, s in spec.columns.items() if s.role is ColumnRole.ID)
    raw_ids = _text(frame[id_col])

    for column, cspec in spec.columns.items():
        s = frame[column]
        canonical = cspec.canonical(column, table)
        problems: list[tuple[pd.Series, str]] = []
        if cspec.role is ColumnRole.DROP:
            continue
        if cspec.role is ColumnRole.ID:
            blank = _blank(s)
            problems.append((blank, "missing customer id"))
            # categorize=False: same hashes, without first factorizing (mostly unique) ids.
            hashes = pd.util.hash_array(raw_ids.fillna("").to_numpy(dtype=object), categorize=False)
            if table is TableName.CUSTOMERS:
                dup_within = pd.Series(hashes).duplicated().to_numpy()
                seen_before = ids.contains(hashes)
                dup = (dup_within | seen_before) & ~blank.to_numpy()
                problems.append((pd.Series(dup), "duplicate customer id"))
                ids.add(hashes[~dup & ~blank.to_numpy()])
            elif known_customers is not None:
                orphan = ~known_customers.contains(hashes)
                problems.append(
                    (
                        pd.Series(orphan & ~blank.to_numpy()),
                        "customer id not in the customers table",
                    )
                )
            out[canonical] = raw_ids
        elif cspec.role is ColumnRole.FEATURE:
            if cspec.kind is FeatureKind.NUMERIC:
                values, problems = _parse_numeric(s, cspec)
            elif cspec.kind is FeatureKind.CATEGORICAL:
                values, problems = _parse_categorical(s, cspec)
            else:
                values, problems = _parse_boolean(s, cspec, what="value")
            out[canonical] = values
        elif cspec.role is ColumnRole.LABEL:
            values, problems = _parse_boolean(s, cspec, what="label")
            if labels is not None and column in labels:
                labels[column].observe(s, values)
            out[canonical] = values
        elif cspec.role is ColumnRole.TIMESTAMP:
            values, problems = _parse_timestamp(s, cspec, today=today)
            out[canonical] = values
        elif cspec.role is ColumnRole.PII:
            if pd.api.types.is_datetime64_any_dtype(s):
                out[canonical] = s
            elif isinstance(s.dtype, pd.StringDtype):
                # Stay in Arrow: masking reads the same texts and missing values from it
                # without a round trip through a million Python objects.
                out[canonical] = s.where(~_blank(s))
            else:
                out[canonical] = s.astype(object).where(~_blank(s), None)
        for mask, reason in problems:
            m = np.asarray(mask.fillna(False) if isinstance(mask, pd.Series) else mask, dtype=bool)
            if m.any():
                issue_masks.append((m, column, reason))

    bad = np.zeros(n, dtype=bool)
    issue_frames = []
    for m, column, reason in issue_masks:
        bad |= m
        idx = np.flatnonzero(m)
        issue_frames.append(
            pd.DataFrame(
                {
                    "row": rows[idx],
                    "column": column,
                    "reason": reason,
                    "raw_id": raw_ids.iloc[idx].to_numpy(dtype=object),
                }
            )
        )
    issues = (
        pd.concat(issue_frames, ignore_index=True).sort_values("row", kind="stable")
        if issue_frames
        else pd.DataFrame({"row": [], "column": [], "reason": [], "raw_id": []})
    )
    good = pd.DataFrame(out)
    good = good.loc[~bad].reset_index(drop=True)
    good["_row"] = rows[~bad]
    return ValidatedChunk(frame=good, issues=issues, rows_read=n)


def customer_id_text(ids: pd.Series) -> pd.Series:
    """A customer id as ``prepare`` pseudonymizes it (its text, stripped): anything that joins
    pseudonyms back to a firm's own ids must normalize them the same way."""
    return _text(ids)
