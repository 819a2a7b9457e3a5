"""Find columns that hold personal data, from column names and a sample of values.

`scan_frame` is advisory: it proposes a `PiiKind` and a `MaskingPolicy` per column for a person to
confirm in the firm's config. It never decides on its own that a column may pass unmasked (the
ingest step fails closed on undeclared columns), so it leans towards flagging.

Evidence strings describe *why* a column was flagged (the column-name hint, the share of sampled
values matching a pattern) and never contain a value.
"""

from __future__ import annotations

import ipaddress
import itertools
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date
from typing import Any

import numpy as np
import pandas as pd
import phonenumbers
from stdnum import luhn
from stdnum.cn import ric
from stdnum.exceptions import ValidationError

from fedcrm.privacy.pii_vocabulary import (
    CN_DATE_RE,
    CN_MOBILE_RE,
    COLUMN_CJK_HINTS,
    COLUMN_TOKEN_HINTS,
    COMMON_SURNAMES,
    COMPOUND_SURNAMES,
    EMAIL_RE,
    HAN,
    NAME_PARTICLES,
    PRC_ID_RE,
    PRC_PROVINCE_CODES,
    STREET_SUFFIXES,
)
from fedcrm.privacy.policies import SUGGESTED_POLICY, MaskingPolicy, PiiKind

__all__ = ["DETECTION_THRESHOLD", "ColumnFinding", "is_prc_resident_id", "scan_frame"]

DETECTION_THRESHOLD = 0.5
"""A column is reported as PII of a kind when that kind scores at least this much."""


@dataclass(frozen=True)
class ColumnFinding:
    """What `scan_frame` concluded about one column.

    ``kind`` is ``None`` when no PII kind reached `DETECTION_THRESHOLD`. ``confidence`` is the
    confidence in the verdict: that the column holds ``kind`` or, for ``kind=None``, that it holds
    no PII. ``evidence`` names hints and match rates, never values.
    """

    column: str
    kind: PiiKind | None
    confidence: float
    suggested_policy: MaskingPolicy | None
    evidence: str

    def to_json(self) -> dict[str, Any]:
        return {
            "column": self.column,
            "kind": None if self.kind is None else self.kind.value,
            "confidence": round(self.confidence, 3),
            "suggested_policy": None if self.suggested_policy is None
            else self.suggested_policy.value,
        }


# --------------------------------------------------------------------------------------------
# Column-name hints
# --------------------------------------------------------------------------------------------

_CAMEL_RE = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")
_SPLIT_RE = re.compile(r"[^A-Za-z0-9]+")


def _name_tokens(column: str) -> set[str]:
    """Lower-case tokens of a column name plus joined neighbours ("Card No" -> card, no, cardno)."""
    words = [w.lower() for w in _SPLIT_RE.split(_CAMEL_RE.sub(" ", column)) if w]
    tokens = set(words)
    tokens.update(a + b for a, b in itertools.pairwise(words))
    tokens.update(a + b + c for a, b, c in zip(words, words[1:], words[2:], strict=False))
    if words:
        tokens.add("".join(words))
    return tokens


def _name_hint(column: str, kind: PiiKind) -> str | None:
    """The part of the column name that suggests ``kind``, if any."""
    for hint in COLUMN_CJK_HINTS[kind]:
        if hint in column:
            return hint
    matched = _name_tokens(column) & COLUMN_TOKEN_HINTS[kind]
    return max(matched, key=len) if matched else None


# --------------------------------------------------------------------------------------------
# Value validators: each takes one stripped text value and returns whether it matches.
# --------------------------------------------------------------------------------------------

_PHONE_SEPARATORS_RE = re.compile(r"[\s().-]")
_PHONE_SHAPE_RE = re.compile(r"[+(\d][\d\s().-]{6,24}")
_NANP_RE = re.compile(r"1?[2-9]\d{2}[2-9]\d{6}")
_MOBILE_TYPES = frozenset(
    {phonenumbers.PhoneNumberType.MOBILE, phonenumbers.PhoneNumberType.FIXED_LINE_OR_MOBILE}
)

_CARD_RE = re.compile(r"\d{13,19}")
_CARD_SHAPE_RE = re.compile(r"\d[\d -]{11,22}\d")

_HAN_NAME_RE = re.compile(rf"[{HAN}]{{2,4}}(?:·[{HAN}]{{1,6}})?")

_LATIN_ADDRESS_RE = re.compile(
    rf"\b\d{{1,6}}[A-Za-z]?,?\s+(?:[A-Za-z0-9.'-]+\s+){{1,5}}(?:{STREET_SUFFIXES})\b\.?",
    re.IGNORECASE,
)
_CN_ADDRESS_RE = re.compile(
    rf"[{HAN}]{{1,12}}(?:省|市|区|县|镇|乡|自治区|自治州)"
    rf"[{HAN}\dA-Za-z]*(?:路|街|道|巷|弄|胡同|村|号|大厦|小区|室)"
    rf"|[{HAN}]{{1,12}}(?:路|街|大道|巷|弄|胡同)\s*\d+\s*号"
)

_US_ZIP_RE = re.compile(r"\d{5}(?:-\d{4})?")
_UK_POSTCODE_RE = re.compile(r"[A-Z]{1,2}\d[A-Z\d]?\s*\d[A-Z]{2}", re.IGNORECASE)
_CN_POSTCODE_RE = re.compile(r"[1-8]\d{5}")

_DATE_RE = re.compile(r"(\d{4})[-/.](\d{1,2})[-/.](\d{1,2})(?:[ T].*)?|(\d{4})(\d{2})(\d{2})")
_DMY_RE = re.compile(r"(\d{1,2})[-/.](\d{1,2})[-/.](\d{4})")


def _is_email(text: str) -> bool:
    return EMAIL_RE.fullmatch(text) is not None


def _phone_pattern(text: str, *, allow_bare_nanp: bool) -> str | None:
    """Which kind of phone number ``text`` is ("CN mobile", "E.164", "North American"), if any.

    The shape decides how to read the digits (international with ``+``/``00``, a bare mainland
    mobile, a bare North American number); ``phonenumbers`` then decides whether the number is
    valid, i.e. of a possible length and in a range its country has assigned. A bare
    10-digit number only counts with separators or in a text column (``allow_bare_nanp``):
    in a numeric column it is as likely an account number.
    """
    if not _PHONE_SHAPE_RE.fullmatch(text):
        return None
    compact = _PHONE_SEPARATORS_RE.sub("", text)
    if compact.startswith("00"):
        compact = "+" + compact[2:]
    if compact.startswith("+"):
        number = _parse_phone(compact, region=None)
        label = "E.164"
    elif CN_MOBILE_RE.fullmatch(compact):
        number = _parse_phone(compact, region="CN")
        label = "CN mobile"
    elif _NANP_RE.fullmatch(compact) and (allow_bare_nanp or compact != text):
        number = _parse_phone(compact, region="US")
        label = "North American"
    else:
        return None
    if number is None or not phonenumbers.is_valid_number(number):
        return None
    if number.country_code == 86 and phonenumbers.number_type(number) in _MOBILE_TYPES:
        return "CN mobile"
    return label


def _parse_phone(text: str, *, region: str | None) -> phonenumbers.PhoneNumber | None:
    try:
        return phonenumbers.parse(text, region)
    except phonenumbers.NumberParseException:
        return None


def is_prc_resident_id(text: str) -> bool:
    """PRC resident identity number: province, valid birth date, GB 11643-1999 check character.

    ``stdnum.cn.ric`` computes the check character and reads the birth date. Its full
    ``is_valid`` also requires the 6-digit region to have existed in the birth year, which is
    wrong for people registered in a district created after they were born (the code
    is the place of registration when the id was issued), so only the province is checked here.
    """
    if not PRC_ID_RE.fullmatch(text) or int(text[:2]) not in PRC_PROVINCE_CODES:
        return False
    if ric.calc_check_digit(text) != text[17].upper():
        return False
    try:
        born = ric.get_birth_date(text)
    except ValidationError:
        return False
    return 1900 <= born.year <= date.today().year


def _is_bank_card(text: str) -> bool:
    if not _CARD_SHAPE_RE.fullmatch(text) and not _CARD_RE.fullmatch(text):
        return False
    digits = text.replace(" ", "").replace("-", "")
    return _CARD_RE.fullmatch(digits) is not None and luhn.is_valid(digits)


def _is_ip(text: str) -> bool:
    if not any(c in text for c in ".:"):
        return False
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _is_name_word(word: str) -> bool:
    """A capitalised name word ("Zoë", "O'Neil", "Jean-Baptiste") or an initial ("J.")."""
    if len(word) == 2 and word[0].isupper() and word[1] == ".":
        return True
    rest = word[1:].replace("'", "").replace("’", "").replace("-", "")
    return len(word) >= 2 and word[0].isupper() and rest.isalpha() and not rest.isupper()


def _is_latin_name(text: str) -> bool:
    """Two to four capitalised words, optionally with particles ("Peter van Dyke")."""
    words = text.split()
    if not 2 <= len(words) <= 6 or words[0] in NAME_PARTICLES:
        return False
    proper = [w for w in words if w not in NAME_PARTICLES]
    return 2 <= len(proper) <= 4 and all(_is_name_word(w) for w in proper)


def _is_name(text: str) -> bool:
    if _is_latin_name(text):
        return True
    if _HAN_NAME_RE.fullmatch(text):
        return text[:2] in COMPOUND_SURNAMES or text[0] in COMMON_SURNAMES
    return False


def _is_address(text: str) -> bool:
    return bool(_LATIN_ADDRESS_RE.search(text) or _CN_ADDRESS_RE.search(text))


def _is_postcode(text: str) -> bool:
    return bool(
        _US_ZIP_RE.fullmatch(text) or _UK_POSTCODE_RE.fullmatch(text)
        or _CN_POSTCODE_RE.fullmatch(text)
    )


def _plausible_birth_date(text: str) -> bool:
    m = CN_DATE_RE.fullmatch(text)
    parts: tuple[str, str, str] | None = None
    if m:
        parts = (m.group(1), m.group(2), m.group(3))
    elif m := _DATE_RE.fullmatch(text):
        g = m.groups()
        parts = (g[0], g[1], g[2]) if g[0] else (g[3], g[4], g[5])
    elif m := _DMY_RE.fullmatch(text):
        parts = (m.group(3), m.group(2), m.group(1))
    if parts is None:
        return False
    try:
        born = date(int(parts[0]), int(parts[1]), int(parts[2]))
    except ValueError:
        return False
    today = date.today()
    return date(today.year - 120, 1, 1) <= born <= today


# --------------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Sample:
    texts: list[str]  # stripped text of non-missing sampled values
    numeric: bool  # the column has a numeric dtype
    size: int  # number of rows sampled (missing included)

    @property
    def unique_ratio(self) -> float:
        return len(set(self.texts)) / len(self.texts) if self.texts else 0.0


@dataclass(frozen=True)
class _Score:
    kind: PiiKind
    confidence: float
    evidence: str


def _rate(sample: _Sample, predicate: Callable[[str], bool]) -> float:
    if not sample.texts:
        return 0.0
    return sum(1 for t in sample.texts if predicate(t)) / len(sample.texts)


def _describe(rate: float, sample: _Sample, what: str) -> str:
    return f"{rate:.0%} of {len(sample.texts)} sampled values match {what}"


def _score_strong(
    kind: PiiKind, hint: str | None, rate: float, sample: _Sample, what: str,
    *, min_rate: float = 0.8,
) -> _Score | None:
    """Kinds whose values can be verified (checksums, strict formats)."""
    parts = [f"name hint '{hint}'"] if hint else []
    if sample.texts:
        parts.append(_describe(rate, sample, what))
    evidence = "; ".join(parts)
    if hint and rate >= 0.5:
        return _Score(kind, min(1.0, 0.7 + 0.3 * rate), evidence)
    if rate >= min_rate:
        return _Score(kind, 0.9 * rate, evidence)
    if hint:
        return _hint_only(kind, evidence, sample)
    return None


def _hint_only(kind: PiiKind, evidence: str, sample: _Sample) -> _Score:
    """The name suggests ``kind`` but the values do not confirm it.

    With no values to check, or many distinct non-matching values, flag for a human with modest
    confidence. A low-cardinality column ("phone_service": Yes/No) is a flag *about* the
    kind, not PII of that kind.
    """
    if not sample.texts:
        return _Score(kind, 0.55, evidence + "; no values to check")
    if _is_categorical(sample):
        return _Score(kind, 0.2, evidence + "; values are a few repeated categories")
    return _Score(kind, 0.55, evidence + "; values do not match")


def _is_categorical(sample: _Sample) -> bool:
    distinct = len(set(sample.texts))
    return distinct <= 10 and distinct <= len(sample.texts) / 2


def _score_hint_required(
    kind: PiiKind, hint: str | None, rate: float, sample: _Sample, what: str
) -> _Score | None:
    """Kinds whose values alone are ambiguous (a date, a 6-digit number): need a name hint."""
    if not hint:
        return None
    evidence = f"name hint '{hint}'"
    if sample.texts:
        evidence += "; " + _describe(rate, sample, what)
    if rate >= 0.5:
        return _Score(kind, 0.6 + 0.35 * rate, evidence)
    return _hint_only(kind, evidence, sample)


def _score_column(column: str, sample: _Sample) -> list[_Score]:
    hints = {kind: _name_hint(column, kind) for kind in PiiKind}
    texts = sample.texts
    scores: list[_Score | None] = []

    # Strongly verifiable kinds.
    scores.append(_score_strong(PiiKind.EMAIL, hints[PiiKind.EMAIL], _rate(sample, _is_email),
                                sample, "an email pattern"))
    phone_kinds = [_phone_pattern(t, allow_bare_nanp=not sample.numeric) for t in texts]
    phone_rate = sum(p is not None for p in phone_kinds) / len(texts) if texts else 0.0
    matched = [p for p in phone_kinds if p is not None]
    phone_what = max(set(matched), key=matched.count) + " pattern" if matched else "a phone pattern"
    scores.append(_score_strong(PiiKind.PHONE, hints[PiiKind.PHONE], phone_rate, sample,
                                phone_what))
    id_rate = _rate(sample, is_prc_resident_id)
    scores.append(_score_strong(PiiKind.NATIONAL_ID, hints[PiiKind.NATIONAL_ID], id_rate, sample,
                                "PRC resident ID (checksum and birth date verified)"))
    card_rate = _rate(sample, _is_bank_card)
    # A valid PRC id is 18 digits and passes Luhn one time in ten: do not call ids cards.
    card_score = _score_strong(PiiKind.BANK_CARD, hints[PiiKind.BANK_CARD], card_rate, sample,
                               "a 13-19 digit Luhn-valid card number")
    if card_score is not None and not (id_rate >= 0.8 and not hints[PiiKind.BANK_CARD]):
        scores.append(card_score)
    scores.append(_score_strong(PiiKind.IP_ADDRESS, hints[PiiKind.IP_ADDRESS],
                                _rate(sample, _is_ip), sample, "an IPv4/IPv6 address"))

    # Names and addresses: patterns are fuzzier, so without a hint also require many distinct
    # values (a categorical column such as "Fiber Optic" repeats a few values).
    if not sample.numeric:
        name_rate = _rate(sample, _is_name)
        if hints[PiiKind.NAME] or (name_rate >= 0.8 and sample.unique_ratio >= 0.5):
            scores.append(_score_strong(PiiKind.NAME, hints[PiiKind.NAME], name_rate, sample,
                                        "a personal-name pattern", min_rate=0.8))
        addr_rate = _rate(sample, _is_address)
        if hints[PiiKind.ADDRESS] or (addr_rate >= 0.6 and sample.unique_ratio >= 0.3):
            scores.append(_score_strong(PiiKind.ADDRESS, hints[PiiKind.ADDRESS], addr_rate,
                                        sample, "a street-address pattern", min_rate=0.6))

    # Hint-required kinds.
    scores.append(_score_hint_required(
        PiiKind.BIRTH_DATE, hints[PiiKind.BIRTH_DATE],
        _rate(sample, _plausible_birth_date) if hints[PiiKind.BIRTH_DATE] else 0.0,
        sample, "a plausible birth date"))
    scores.append(_score_hint_required(
        PiiKind.POSTCODE, hints[PiiKind.POSTCODE],
        _rate(sample, _is_postcode) if hints[PiiKind.POSTCODE] else 0.0,
        sample, "a US/UK/CN postcode pattern"))
    if hints[PiiKind.CUSTOMER_ID]:
        scores.append(_Score(PiiKind.CUSTOMER_ID, 0.85,
                             f"name hint '{hints[PiiKind.CUSTOMER_ID]}'"))
    return [s for s in scores if s is not None]


# --------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------


def _text_of(value: object) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, pd.Timestamp | date):
        return value.strftime("%Y-%m-%d")
    return str(value).strip()


def _sample_column(series: pd.Series, rows: np.ndarray | None) -> _Sample:
    picked = series if rows is None else series.iloc[rows]
    numeric = pd.api.types.is_numeric_dtype(series.dtype) and not pd.api.types.is_bool_dtype(
        series.dtype
    )
    present = picked.dropna()
    texts = [t for t in (_text_of(v) for v in present.tolist()) if t]
    return _Sample(texts=texts, numeric=numeric, size=len(picked))


def scan_frame(
    df: pd.DataFrame, *, sample_size: int = 2000, rng: np.random.Generator | None = None
) -> list[ColumnFinding]:
    """Propose a PII kind and masking policy for every column of ``df``, in column order.

    Detection combines column-name hints (English and Chinese) with pattern checks on up to
    ``sample_size`` rows sampled without replacement using ``rng`` (default: a fixed seed, so
    scans are reproducible). Strongly verifiable kinds (email, phone, PRC id with checksum,
    Luhn-valid card, IP address) are found from values alone; names and addresses need many
    distinct matching values or a hint; birth dates, postcodes and customer ids need a hint.
    """
    if sample_size < 1:
        raise ValueError("sample_size must be >= 1")
    generator = rng if rng is not None else np.random.default_rng(0)
    rows = None
    if len(df) > sample_size:
        rows = np.sort(generator.choice(len(df), size=sample_size, replace=False))
    findings: list[ColumnFinding] = []
    for position, column in enumerate(df.columns):
        name = str(column)
        sample = _sample_column(df.iloc[:, position], rows)
        scores = _score_column(name, sample)
        best = max(scores, key=lambda s: s.confidence, default=None)
        if best is not None and best.confidence >= DETECTION_THRESHOLD:
            findings.append(ColumnFinding(
                column=name, kind=best.kind, confidence=_clip(best.confidence),
                suggested_policy=SUGGESTED_POLICY[best.kind], evidence=best.evidence,
            ))
            continue
        if best is None:
            evidence = (
                f"no name hint; no PII pattern matches most of {len(sample.texts)} sampled values"
                if sample.texts else "no name hint; no values sampled"
            )
            confidence = 0.95 if sample.texts else 0.6
        else:
            evidence = f"below threshold for {best.kind.value}: {best.evidence}"
            confidence = 1.0 - best.confidence
        findings.append(ColumnFinding(
            column=name, kind=None, confidence=_clip(confidence), suggested_policy=None,
            evidence=evidence,
        ))
    return findings


def _clip(x: float) -> float:
    return 0.0 if math.isnan(x) else min(1.0, max(0.0, x))
