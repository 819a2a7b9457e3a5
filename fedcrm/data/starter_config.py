"""Starter partner config written by ``fedcrm scan --write-config``.

It gives every column a role (fail closed: columns the scan cannot classify get
``role = "drop"`` with a ``# REVIEW`` note) so that the firm only has to review, not type.
Category lists and ranges come from the firm's own sample - they stay on the firm's machine.

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

from fedcrm.privacy.detection import ColumnFinding
from fedcrm.privacy.pii_vocabulary import ID_COLUMN_NAME_RE
from fedcrm.privacy.policies import PiiKind

# Roles of the CRM data contract, not personal data: they stay with the config they propose.
_LABEL_NAMES = re.compile(r"^(churn(ed)?|label|is_churn|attrition|流失)$", re.I)
_DATE_NAMES = re.compile(r"(date|time|timestamp|_at$|日期|时间)", re.I)
MAX_CATEGORIES = 30
_BOOLEAN_WORDS = frozenset({"0", "1", "yes", "no", "true", "false", "y", "n", "t", "f"})
_HEADER = (
    "Starter fedcrm partner config written by `fedcrm scan --write-config`.",
    "REVIEW every column before use: roles, masking policies, ranges and categories.",
    "Secrets never go here: keys live in keys_dir (0600 files) or environment variables.",
)
_ID_NOTE = "pseudonymized with the firm's key"


@dataclass(frozen=True)
class _ColumnEntry:
    """One column's line in the config: its spec, a comment for the reviewer, whether it is
    the customer id."""

    spec: Mapping[str, Any]
    note: str | None = None
    is_id: bool = False


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


def _column_entry(
    name: str, values: pd.Series, finding: ColumnFinding | None, have_id: bool, table: str
) -> _ColumnEntry:
    if finding is not None and finding.kind is not None:
        if finding.kind is PiiKind.CUSTOMER_ID and not have_id:
            return _ColumnEntry({"role": "id"}, _ID_NOTE, is_id=True)
        policy = finding.suggested_policy.value if finding.suggested_policy else "drop"
        return _ColumnEntry(
            {"role": "pii", "pii": finding.kind.value, "policy": policy},
            f"detected {finding.kind.value}, confidence {finding.confidence:.2f}",
        )
    if not have_id and ID_COLUMN_NAME_RE.match(name):
        return _ColumnEntry({"role": "id"}, _ID_NOTE, is_id=True)
    if _LABEL_NAMES.match(name):
        distinct = sorted({str(v).strip() for v in values.dropna().unique()})[:2]
        trues = [v for v in distinct if v.lower() in ("yes", "1", "true", "y", "t")]
        falses = [v for v in distinct if v not in trues]
        return _ColumnEntry(
            {"role": "label", "name": "churn", "true_values": trues, "false_values": falses}
        )
    if _DATE_NAMES.search(name):
        ts_name = "timestamp" if table == "transactions" else "signup_date"
        return _ColumnEntry({"role": "timestamp", "name": ts_name}, "REVIEW: format")
    bounds = _num_bounds(values)
    distinct_values = values.dropna().astype(str).str.strip().unique()
    if bounds is not None and len(distinct_values) > 2:
        return _ColumnEntry(
            {"role": "feature", "kind": "numeric", "min": bounds[0], "max": bounds[1]},
            "REVIEW: declared range",
        )
    if 0 < len(distinct_values) <= 2 and {v.lower() for v in distinct_values} <= _BOOLEAN_WORDS:
        return _ColumnEntry({"role": "feature", "kind": "boolean"})
    if 0 < len(distinct_values) <= MAX_CATEGORIES:
        return _ColumnEntry(
            {"role": "feature", "kind": "categorical",
             "categories": [str(v) for v in sorted(distinct_values)]}
        )
    return _ColumnEntry({"role": "drop"}, "REVIEW: not classified; dropped (fail closed)")


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


def render_starter_config(
    *,
    source: Path,
    sample: pd.DataFrame,
    findings: Sequence[ColumnFinding],
    firm: str,
    table: str = "customers",
    encoding: str = "utf-8",
    delimiter: str = ",",
) -> str:
    """The starter config as TOML text, one reviewed-by-a-human line per column of ``sample``."""
    by_col = {f.column: f for f in findings}
    kind = "parquet" if source.suffix.lower() in (".parquet", ".pq") else "csv"
    doc = tomlkit.document()
    for line in _HEADER:
        doc.add(tomlkit.comment(line))
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
    if kind == "csv":
        source_spec |= {"encoding": encoding, "delimiter": delimiter}
    columns = tomlkit.table()
    have_id = False
    for column in sample.columns:
        entry = _column_entry(
            str(column), sample[column], by_col.get(str(column)), have_id, table
        )
        have_id = have_id or entry.is_id
        spec = tomlkit.inline_table()
        spec.update(entry.spec)
        columns.add(str(column), _noted(spec, entry.note))
    if not have_id:
        columns.add(tomlkit.comment(
            'REVIEW: no customer id column was recognised; mark one with role = "id"'
        ))
    table_doc = tomlkit.table(is_super_table=True)
    table_doc.add("source", _table(source_spec))
    table_doc.add("columns", columns)
    tables = tomlkit.table(is_super_table=True)
    tables.add(table, table_doc)
    doc.add("tables", tables)
    return tomlkit.dumps(doc)
