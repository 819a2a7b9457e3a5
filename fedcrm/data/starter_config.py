"""Starter partner config written by ``fedcrm scan --write-config``.

It gives every column a role (fail closed: columns the scan cannot classify get
``role = "drop"`` with a ``# REVIEW`` note) so that the firm only has to review, not type:

* the CSV encoding and delimiter as detected, with how sure the detection was;
* the customer id: a column named like one, or else a column whose sampled values are unique
  and non-null (a customer number, or PRC resident ids verified by their checksum);
* the churn label, named in English or Chinese (``churn``, ``是否流失``, ``离网`` ...), with its
  churned side in ``true_values`` (``是``, ``流失``, ``Yes``, ``1`` ...): the words are in
  `fedcrm.data.crm_vocabulary`;
* features. Their ranges and category lists come from the firm's own sample and are marked
  local-only: they stay on the firm's machine, and a federated run uses the run's public schema.

The TOML is written with ``tomlkit``, which keeps the review comments and quotes whatever a
column name holds (quotes, brackets, dots, Chinese) as a valid key.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import tomlkit
from tomlkit.items import Item, Table

from fedcrm.data.crm_vocabulary import (
    CHURN_WORD_RE,
    DATE_COLUMN_RE,
    IDENTIFIER_NAME_RE,
    LABEL_COLUMN_RE,
    label_values,
    normalise_name,
    yes_no_values,
)
from fedcrm.data.csv_format import FormatChoice
from fedcrm.privacy.detection import ColumnFinding, is_prc_resident_id
from fedcrm.privacy.pii_vocabulary import ID_COLUMN_NAME_RE
from fedcrm.privacy.policies import PiiKind

MAX_CATEGORIES = 30
_HEADER = (
    "Starter fedcrm partner config written by `fedcrm scan --write-config`.",
    "REVIEW every column before use: roles, masking policies, ranges and categories.",
    "Secrets never go here: keys live in keys_dir (0600 files) or environment variables.",
    "",
    "LOCAL-ONLY: numeric ranges (the sample's maximum, rounded up, x 1.5) and category lists",
    "marked local-only are derived from this firm's own data. Replace them with documented",
    "public ranges. A federated run uses the run's public schema (configs/schemas/*.toml),",
    "never these.",
)
_ID_NOTE = "pseudonymized with the firm's key"
_LOCAL_RANGE = "local-only: range from this firm's data (replace with a public one); REVIEW"
_LOCAL_CATEGORIES = "local-only: categories seen in this firm's data; REVIEW"
_SHOWN_LABEL_VALUES = 5
# A customer number: letters and digits (C000123, TC00001), or digits under an id-like name.
_CODE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{2,63}")


@dataclass(frozen=True)
class _ColumnEntry:
    """One column's line in the config: its spec and a comment for the reviewer."""

    spec: Mapping[str, Any]
    note: str | None = None


def _num_bounds(values: pd.Series) -> tuple[float, float] | None:
    nums = pd.to_numeric(values.astype("string").str.strip(), errors="coerce")
    non_blank = values.notna() & (values.astype("string").str.strip() != "")
    if non_blank.sum() == 0 or nums[non_blank].isna().mean() > 0.01:
        return None
    lo, hi = float(nums.min()), float(nums.max())
    # Round outward to a "nice" declared range; review it. The 12-digit round trip drops binary
    # noise (0.7500000000000001 -> 0.75) so that the reviewer reads the number that was meant.
    span = max(abs(lo), abs(hi), 1.0)
    step = 10 ** math.floor(math.log10(span))
    low = math.floor(lo / step) * step if lo < 0 else 0.0
    high = math.ceil(hi / step) * step * 1.5
    return float(f"{low:.12g}"), float(f"{high:.12g}")


def _texts(values: pd.Series) -> pd.Series:
    """Stripped, non-blank texts of a column."""
    text = values.dropna().astype(str).str.strip()
    return text[text != ""]


def _distinct(values: pd.Series) -> list[str]:
    return sorted(_texts(values).unique())


# --------------------------------------------------------------------------- the customer id


def _named_id(sample: pd.DataFrame, by_col: Mapping[str, ColumnFinding]) -> str | None:
    """The first column named like a customer id (a detection hint or the id-name pattern)."""
    for column in map(str, sample.columns):
        finding = by_col.get(column)
        kind = finding.kind if finding is not None else None
        if kind is PiiKind.CUSTOMER_ID or (kind is None and ID_COLUMN_NAME_RE.match(column)):
            return column
    return None


def _unique_and_complete(values: pd.Series) -> bool:
    text = values.astype("string").str.strip()
    return len(values) >= 2 and not (text.isna() | (text == "")).any() and text.is_unique


def _proposed_id(
    sample: pd.DataFrame, by_col: Mapping[str, ColumnFinding], taken: set[str]
) -> tuple[str, str] | None:
    """A column that can serve as the customer id although no header names one, and why.

    Only a column whose every sampled value is present and unique, in this order: PRC resident
    ids, every one with a valid checksum and birth date; digits under an id-like name (档案号,
    member_no); codes of letters and digits. A column with one duplicate or one blank is never
    proposed: as the id it would send rows to quarantine.
    """
    named_codes: list[str] = []
    national_ids: list[str] = []
    codes: list[str] = []
    for column in map(str, sample.columns):
        finding = by_col.get(column)
        values = sample[column]
        if column in taken or DATE_COLUMN_RE.search(column) or not _unique_and_complete(values):
            continue
        kind = finding.kind if finding is not None else None
        if kind is PiiKind.NATIONAL_ID:
            if _texts(values).map(is_prc_resident_id).all():  # a name hint alone is not enough
                national_ids.append(column)
        elif kind is None:
            text = _texts(values)
            if not text.str.fullmatch(_CODE_RE).all():
                continue
            if text.str.contains(r"[A-Za-z]").all() and text.str.contains(r"\d").all():
                codes.append(column)
            elif IDENTIFIER_NAME_RE.search(column) and text.str.fullmatch(r"\d+").all():
                named_codes.append(column)
    rows = f"{len(sample):,} sampled rows"
    # Checksum-verified resident ids identify a person; a unique number under an id-like name
    # (合同编号 could be a contract's) or a unique code is weaker evidence of a *customer*.
    for found, what in (
        (national_ids, "PRC resident ids, checksums verified"),
        (named_codes, "a customer number"),
        (codes, "codes of letters and digits"),
    ):
        if found:
            return found[0], (
                f"REVIEW: proposed as the id ({what}; unique and non-null in all {rows}); "
                f"{_ID_NOTE}"
            )
    return None


# --------------------------------------------------------------------------- the churn label


def _label_entry(values: pd.Series, *, by_values: bool) -> _ColumnEntry:
    distinct = _distinct(values)
    found = label_values(distinct)
    if found is None:
        shown = ", ".join(distinct) if len(distinct) <= _SHOWN_LABEL_VALUES else (
            f"{len(distinct)} distinct values"
        )
        return _ColumnEntry(
            {"role": "label", "name": "churn", "true_values": [], "false_values": []},
            f"REVIEW: values not recognised ({shown}): put the churned one(s) in true_values, "
            "the others in false_values",
        )
    churned = ", ".join(found.true_values)
    if found.completed:
        note = (f"REVIEW: only one label value in the sample; churned = {churned}; prepare "
                "refuses a label with a single class")
    elif by_values:
        note = f"REVIEW: proposed as the churn label from its values; churned = {churned}"
    else:
        note = f"churned = {churned}"
    return _ColumnEntry(
        {"role": "label", "name": "churn", "true_values": list(found.true_values),
         "false_values": list(found.false_values)},
        note,
    )


def _label_column(
    sample: pd.DataFrame, by_col: Mapping[str, ColumnFinding], taken: set[str]
) -> tuple[str, bool] | None:
    """The churn label: the first column named like one (English or Chinese), else the first
    whose values are churn words (流失/在网, churned/retained); and whether it was by values."""
    free = [c for c in map(str, sample.columns)
            if c not in taken and (by_col.get(c) is None or by_col[c].kind is None)]
    for column in free:
        if LABEL_COLUMN_RE.match(normalise_name(column)):
            return column, False
    for column in free:
        distinct = _distinct(sample[column])
        found = label_values(distinct)
        if found is not None and not found.completed and yes_no_values(distinct) is None:
            return column, True
    return None


# --------------------------------------------------------------------------- other columns


def _column_entry(
    name: str, values: pd.Series, finding: ColumnFinding | None, table: str
) -> _ColumnEntry:
    if finding is not None and finding.kind is not None:
        policy = finding.suggested_policy.value if finding.suggested_policy else "drop"
        return _ColumnEntry(
            {"role": "pii", "pii": finding.kind.value, "policy": policy},
            f"detected {finding.kind.value}, confidence {finding.confidence:.2f}",
        )
    if CHURN_WORD_RE.search(name):
        return _ColumnEntry(
            {"role": "drop"},
            "REVIEW: named after churn but not the label (a churn date or reason is known only "
            "after the customer left); dropped so that it cannot leak the label",
        )
    if DATE_COLUMN_RE.search(name):
        ts_name = "timestamp" if table == "transactions" else "signup_date"
        return _ColumnEntry({"role": "timestamp", "name": ts_name}, "REVIEW: format")
    texts = _texts(values)
    if IDENTIFIER_NAME_RE.search(name) and len(texts) >= 10 and texts.nunique() >= 0.9 * len(texts):
        return _ColumnEntry(
            {"role": "drop"},
            "REVIEW: an identifier (nearly every value distinct), not a feature; dropped",
        )
    bounds = _num_bounds(values)
    distinct = _distinct(values)
    if bounds is not None and len(distinct) > 2:
        spec: dict[str, Any] = {"role": "feature", "kind": "numeric", "min": bounds[0],
                                "max": bounds[1]}
        blanks = len(values) - len(texts)
        if blanks:  # Telco's new customers have no total charges yet: keep them, flagged
            spec["missing"] = "allow"
        note = _LOCAL_RANGE + (f"; {blanks:,} blank in the sample: kept as missing" if blanks
                               else "")
        return _ColumnEntry(spec, note)
    if 0 < len(distinct) <= 2 and yes_no_values(distinct) is not None:
        return _ColumnEntry({"role": "feature", "kind": "boolean"})
    if 0 < len(distinct) <= MAX_CATEGORIES:
        return _ColumnEntry(
            {"role": "feature", "kind": "categorical", "categories": distinct}, _LOCAL_CATEGORIES
        )
    return _ColumnEntry({"role": "drop"}, "REVIEW: not classified; dropped (fail closed)")


def _entries(
    sample: pd.DataFrame, findings: Sequence[ColumnFinding], table: str
) -> tuple[dict[str, _ColumnEntry], bool]:
    """Every column's entry, and whether a customer id was found or proposed."""
    by_col = {f.column: f for f in findings}
    entries: dict[str, _ColumnEntry] = {}
    id_column = _named_id(sample, by_col)
    if id_column is not None:
        entries[id_column] = _ColumnEntry({"role": "id"}, _ID_NOTE)
    if table == "customers":
        label = _label_column(sample, by_col, set(entries))
        if label is not None:
            entries[label[0]] = _label_entry(sample[label[0]], by_values=label[1])
        if id_column is None and (proposed := _proposed_id(sample, by_col, set(entries))):
            entries[proposed[0]] = _ColumnEntry({"role": "id"}, proposed[1])
    for column in map(str, sample.columns):
        if column not in entries:
            entries[column] = _column_entry(column, sample[column], by_col.get(column), table)
    order = {str(c): i for i, c in enumerate(sample.columns)}
    found_id = any(e.spec["role"] == "id" for e in entries.values())
    return dict(sorted(entries.items(), key=lambda kv: order[kv[0]])), found_id


# --------------------------------------------------------------------------- rendering


def _noted(item: Item, note: str | None) -> Item:
    if note is not None:
        item.comment(note)
        item.trivia.comment_ws = "  "
    return item


def _table(values: Mapping[str, Any], notes: Mapping[str, str] | None = None) -> Table:
    table = tomlkit.table()
    for key, value in values.items():
        table.add(key, _noted(tomlkit.item(value), (notes or {}).get(key)))
    return table


def _format_note(choice: FormatChoice | None) -> str | None:
    if choice is None:
        return None
    return ("" if choice.sure else "REVIEW: ") + choice.describe()


def render_starter_config(
    *,
    source: Path,
    sample: pd.DataFrame,
    findings: Sequence[ColumnFinding],
    firm: str,
    table: str = "customers",
    encoding: FormatChoice | None = None,
    delimiter: FormatChoice | None = None,
) -> str:
    """The starter config as TOML text, one reviewed-by-a-human line per column of ``sample``.

    ``encoding`` and ``delimiter`` are the CSV settings as chosen for the scan (default UTF-8
    and comma); how each was chosen is written beside it.
    """
    kind = "parquet" if source.suffix.lower() in (".parquet", ".pq") else "csv"
    doc = tomlkit.document()
    for line in _HEADER:
        doc.add(tomlkit.comment(line) if line else tomlkit.nl())
    doc.add(tomlkit.nl())
    doc.add("firm", _table(
        {"name": firm, "keys_dir": f"keys/{firm}", "store_dir": f"stores/{firm}"}
    ))
    doc.add("budget", _table(
        {"epsilon": 3.0, "delta": 1e-5},
        {"epsilon": "total privacy budget of this firm, across all runs"},
    ))
    doc.add("validation", _table({"max_quarantine_fraction": 0.05}))

    source_spec: dict[str, Any] = {"kind": kind, "path": str(source.resolve())}
    source_notes: dict[str, str] = {}
    if kind == "csv":
        source_spec |= {
            "encoding": encoding.value if encoding else "utf-8",
            "delimiter": delimiter.value if delimiter else ",",
        }
        for key, choice in (("encoding", encoding), ("delimiter", delimiter)):
            if (note := _format_note(choice)) is not None:
                source_notes[key] = note
    entries, found_id = _entries(sample, findings, table)
    columns = tomlkit.table()
    for column, entry in entries.items():
        spec = tomlkit.inline_table()
        spec.update(entry.spec)
        columns.add(column, _noted(spec, entry.note))
    if not found_id:
        columns.add(tomlkit.comment(
            'REVIEW: no customer id column was recognised; mark one with role = "id"'
        ))
    table_doc = tomlkit.table(is_super_table=True)
    table_doc.add("source", _table(source_spec, source_notes))
    table_doc.add("columns", columns)
    tables = tomlkit.table(is_super_table=True)
    tables.add(table, table_doc)
    doc.add("tables", tables)
    return tomlkit.dumps(doc)
