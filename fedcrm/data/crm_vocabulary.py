"""The words of a CRM export that mark a column's role: churn labels, yes/no values, dates.

English and Chinese, one copy for the starter config (`fedcrm.data.starter_config`), the data
contract's default boolean values (`fedcrm.data.contract`) and the label check of ``prepare``
(`fedcrm.data.validation`). The words that mark *personal data* live in
`fedcrm.privacy.pii_vocabulary`; these are categories of the CRM schema, not personal data, so
a message may name them (a raw cell value it may not).

Values are compared stripped and lower-cased (``"Yes"`` is ``"yes"``); Chinese has no case.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = [
    "BOOLEAN_FALSE",
    "BOOLEAN_TRUE",
    "CHURN_PAIRS",
    "CHURN_WORD_RE",
    "DATE_COLUMN_RE",
    "IDENTIFIER_NAME_RE",
    "LABEL_COLUMN_RE",
    "YES_NO_PAIRS",
    "LabelValues",
    "is_label_word",
    "label_values",
    "normalise_name",
    "yes_no_values",
]

YES_NO_PAIRS: tuple[tuple[str, str], ...] = (
    ("1", "0"),
    ("1.0", "0.0"),
    ("true", "false"),
    ("yes", "no"),
    ("y", "n"),
    ("t", "f"),
    ("是", "否"),
    ("有", "无"),
    ("真", "假"),
    ("对", "错"),
)
"""Generic booleans as ``(yes, no)`` pairs: what a boolean feature or a churn label may hold.
For a label the *yes* side is churned (``true_values``)."""

CHURN_PAIRS: tuple[tuple[str, str], ...] = (
    ("churned", "retained"),
    ("churned", "active"),
    ("churned", "stayed"),
    ("churn", "no churn"),
    ("left", "stayed"),
    ("attrited", "existing"),
    ("流失", "未流失"),
    ("已流失", "未流失"),
    ("流失", "留存"),
    ("流失", "在网"),
    ("离网", "在网"),
    ("已离网", "在网"),
    ("退网", "在网"),
    ("退订", "未退订"),
    ("已退订", "未退订"),
    ("退订", "订阅"),
    ("销户", "正常"),
    ("已销户", "正常"),
    ("注销", "正常"),
)
"""Churn-specific ``(churned, not churned)`` pairs: only a label column holds these."""

BOOLEAN_TRUE: tuple[str, ...] = tuple(dict.fromkeys(yes for yes, _ in YES_NO_PAIRS))
"""The contract's default ``true_values`` of a boolean column (and of a label that lists none)."""
BOOLEAN_FALSE: tuple[str, ...] = tuple(dict.fromkeys(no for _, no in YES_NO_PAIRS))
"""The contract's default ``false_values``."""

_CHURNED = frozenset(yes for yes, _ in (*YES_NO_PAIRS, *CHURN_PAIRS))
_NOT_CHURNED = frozenset(no for _, no in (*YES_NO_PAIRS, *CHURN_PAIRS))
if _CHURNED & _NOT_CHURNED:  # a word on both sides would make a label's meaning a coin toss
    raise AssertionError(f"label words on both sides: {sorted(_CHURNED & _NOT_CHURNED)}")

LABEL_COLUMN_RE = re.compile(
    r"^(?:(?:is_|has_)?churn(?:ed)?(?:_(?:flag|label|status|indicator))?|label|attrition"
    r"(?:_flag)?|attrited|exited"
    r"|(?:是否)?(?:已)?(?:流失|离网|退网|退订|销户|注销)(?:标记|标志|标签|状态)?)$",
    re.IGNORECASE,
)
"""Whole column names (after :func:`normalise_name`) of a churn label: ``churn``, ``Churned``,
``is_churn``, ``churn_flag``, ``attrition``, ``exited``, ``是否流失``, ``流失``, ``流失标记``,
``已流失``, ``离网``, ``退订`` ..."""

CHURN_WORD_RE = re.compile(r"churn|attrition|attrited|流失|离网|退网|退订|销户|注销", re.IGNORECASE)
"""A column name that merely *mentions* churn (``churn_reason``, ``流失日期``): beside the label
such a column is usually known only after the customer left, and would leak the label."""

DATE_COLUMN_RE = re.compile(r"(date|time|timestamp|_at$|日期|时间)", re.IGNORECASE)
"""A column name that suggests a date (searched, not matched whole)."""

IDENTIFIER_NAME_RE = re.compile(
    r"(?:^|[^a-z])(?:id|no|nr|num|number|code|key)(?:$|[^a-z])|编号|编码|代码|账号|号码|号$",
    re.IGNORECASE,
)
"""A column name that suggests an identifier (``member_no``, ``档案号``, ``合同编号``), searched:
an all-digit column needs such a name before the starter config proposes it as the customer id,
and a nearly-unique one under such a name is not a feature. Names that mark a *customer* id as
personal data are `fedcrm.privacy.pii_vocabulary.ID_COLUMN_NAME_RE` and its hints."""


def normalise_name(column: str) -> str:
    """A column name as :data:`LABEL_COLUMN_RE` reads it: stripped, spaces and dashes as ``_``."""
    return re.sub(r"[\s\-]+", "_", column.strip())


def _key(value: str) -> str:
    return value.strip().lower()


def is_label_word(value: str) -> bool:
    """Whether ``value`` is one of the label words above (a category, safe to name in a message)."""
    return _key(value) in _CHURNED or _key(value) in _NOT_CHURNED


@dataclass(frozen=True)
class LabelValues:
    """A churn label's values split into the churned side and the other, as found in the data.

    ``completed`` is true when the data showed only one side and the other side's word was
    filled in from its pair (``否`` alone gives ``true_values = ["是"]``).
    """

    true_values: tuple[str, ...]
    false_values: tuple[str, ...]
    completed: bool = False


def _split(distinct: Iterable[str], pairs: tuple[tuple[str, str], ...]) -> LabelValues | None:
    yes_words = {yes for yes, _ in pairs}
    no_words = {no for _, no in pairs}
    values = sorted({v.strip() for v in distinct if v.strip()})
    trues = tuple(v for v in values if _key(v) in yes_words)
    falses = tuple(v for v in values if _key(v) in no_words)
    if not values or len(trues) + len(falses) != len(values):
        return None
    if trues and falses:
        return LabelValues(trues, falses)
    # One side only: complete it with the partner word of every value seen (first pair wins).
    partner = {yes: no for yes, no in reversed(pairs)} | {no: yes for yes, no in reversed(pairs)}
    other = tuple(dict.fromkeys(partner[_key(v)] for v in values))
    return LabelValues(trues, other, True) if trues else LabelValues(other, falses, True)


def yes_no_values(distinct: Iterable[str]) -> LabelValues | None:
    """``distinct`` as generic booleans (:data:`YES_NO_PAIRS`), or ``None`` if any is not one."""
    return _split(distinct, YES_NO_PAIRS)


def label_values(distinct: Iterable[str]) -> LabelValues | None:
    """``distinct`` as a churn label: churned side and other side (generic booleans or
    :data:`CHURN_PAIRS`), or ``None`` when some value is neither."""
    return _split(distinct, (*YES_NO_PAIRS, *CHURN_PAIRS))
