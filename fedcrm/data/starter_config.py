"""Starter partner config written by ``fedcrm scan --write-config``.

It gives every column a role (fail closed: columns the scan cannot classify get
``role = "drop"`` with a ``# REVIEW`` note) so that the firm only has to review, not type.
Category lists and ranges come from the firm's own sample - they stay on the firm's machine.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from fedcrm.privacy.detection import ColumnFinding
from fedcrm.privacy.policies import PiiKind

_ID_NAMES = re.compile(
    r"^(customer_?id|cust_?id|client_?id|member_?id|user_?id|id|客户(编号|id|ID)?)$", re.I
)
_LABEL_NAMES = re.compile(r"^(churn(ed)?|label|is_churn|attrition|流失)$", re.I)
_DATE_NAMES = re.compile(r"(date|time|timestamp|_at$|日期|时间)", re.I)
MAX_CATEGORIES = 30


def _q(s: str) -> str:
    return json.dumps(s, ensure_ascii=False)


def _key(name: str) -> str:
    return name if re.fullmatch(r"[A-Za-z0-9_-]+", name) else _q(name)


def _num_bounds(values: pd.Series) -> tuple[float, float] | None:
    nums = pd.to_numeric(values.astype("string").str.strip(), errors="coerce")
    non_blank = values.notna() & (values.astype("string").str.strip() != "")
    if non_blank.sum() == 0 or nums[non_blank].isna().mean() > 0.01:
        return None
    lo, hi = float(nums.min()), float(nums.max())
    # Round outward to a "nice" declared range; review it.
    span = max(abs(lo), abs(hi), 1.0)
    step = 10 ** math.floor(math.log10(span))
    return (math.floor(lo / step) * step if lo < 0 else 0.0, math.ceil(hi / step) * step * 1.5)


def _column_line(
    name: str, values: pd.Series, finding: ColumnFinding | None, have_id: bool, table: str
) -> tuple[str, bool]:
    key = _key(name)
    if finding is not None and finding.kind is not None:
        if finding.kind is PiiKind.CUSTOMER_ID and not have_id:
            return f'{key} = {{ role = "id" }}  # pseudonymized with the firm\'s key', True
        policy = finding.suggested_policy.value if finding.suggested_policy else "drop"
        return (
            f'{key} = {{ role = "pii", pii = "{finding.kind.value}", policy = "{policy}" }}'
            f"  # detected {finding.kind.value}, confidence {finding.confidence:.2f}",
            False,
        )
    if not have_id and _ID_NAMES.match(name):
        return f'{key} = {{ role = "id" }}  # pseudonymized with the firm\'s key', True
    if _LABEL_NAMES.match(name):
        distinct = sorted({str(v).strip() for v in values.dropna().unique()})[:2]
        trues = [v for v in distinct if v.lower() in ("yes", "1", "true", "y", "t")]
        falses = [v for v in distinct if v not in trues]
        return (
            f'{key} = {{ role = "label", name = "churn", true_values = {json.dumps(trues)}, '
            f"false_values = {json.dumps(falses, ensure_ascii=False)} }}",
            False,
        )
    if _DATE_NAMES.search(name):
        ts_name = "timestamp" if table == "transactions" else "signup_date"
        return f'{key} = {{ role = "timestamp", name = "{ts_name}" }}  # REVIEW: format', False
    bounds = _num_bounds(values)
    distinct_values = values.dropna().astype(str).str.strip().unique()
    if bounds is not None and len(distinct_values) > 2:
        return (
            f'{key} = {{ role = "feature", kind = "numeric", min = {bounds[0]:g}, '
            f"max = {bounds[1]:g} }}  # REVIEW: declared range",
            False,
        )
    if 0 < len(distinct_values) <= 2 and {v.lower() for v in distinct_values} <= {
        "0",
        "1",
        "yes",
        "no",
        "true",
        "false",
        "y",
        "n",
        "t",
        "f",
    }:
        return f'{key} = {{ role = "feature", kind = "boolean" }}', False
    if 0 < len(distinct_values) <= MAX_CATEGORIES:
        cats = ", ".join(_q(str(v)) for v in sorted(distinct_values))
        return (
            f'{key} = {{ role = "feature", kind = "categorical", categories = [{cats}] }}',
            False,
        )
    return f'{key} = {{ role = "drop" }}  # REVIEW: not classified; dropped (fail closed)', False


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
    by_col = {f.column: f for f in findings}
    kind = "parquet" if source.suffix.lower() in (".parquet", ".pq") else "csv"
    lines = [
        "# Starter fedcrm partner config written by `fedcrm scan --write-config`.",
        "# REVIEW every column before use: roles, masking policies, ranges and categories.",
        "# Secrets never go here: keys live in keys_dir (0600 files) or environment variables.",
        "",
        "[firm]",
        f"name = {_q(firm)}",
        f"keys_dir = {_q('keys/' + firm)}",
        f"store_dir = {_q('stores/' + firm)}",
        "",
        "[budget]",
        "epsilon = 3.0      # total privacy budget of this firm, across all runs",
        "delta = 1e-5",
        "",
        "[validation]",
        "max_quarantine_fraction = 0.05",
        "",
        f"[tables.{table}.source]",
        f'kind = "{kind}"',
        f"path = {_q(str(source.resolve()))}",
    ]
    if kind == "csv":
        lines += [f"encoding = {_q(encoding)}", f"delimiter = {_q(delimiter)}"]
    lines += ["", f"[tables.{table}.columns]"]
    have_id = False
    for column in sample.columns:
        line, is_id = _column_line(
            str(column), sample[column], by_col.get(str(column)), have_id, table
        )
        have_id = have_id or is_id
        lines.append(line)
    if not have_id:
        lines.append('# REVIEW: no customer id column was recognised; mark one with role = "id"')
    return "\n".join(lines) + "\n"
