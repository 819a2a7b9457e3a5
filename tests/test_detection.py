"""Tests for privacy.detection.scan_frame: positive and negative examples per PII kind."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import date, timedelta

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedcrm.privacy.detection import DETECTION_THRESHOLD, ColumnFinding, scan_frame
from fedcrm.privacy.policies import SUGGESTED_POLICY, MaskingPolicy, PiiKind

N = 60
RNG_SEED = 7

_ID_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)


def prc_id(region: str, born: date, seq: int) -> str:
    """An 18-character PRC resident id with a correct GB 11643 check character."""
    body = f"{region}{born:%Y%m%d}{seq:03d}"
    check = "10X98765432"[sum(int(c) * w for c, w in zip(body, _ID_WEIGHTS, strict=True)) % 11]
    return body + check


def luhn_complete(prefix: str) -> str:
    """Append the Luhn check digit to ``prefix``."""
    total = 0
    for i, ch in enumerate(reversed(prefix + "0")):
        d = int(ch)
        if i % 2 == 1:
            d = d * 2 - 9 if d * 2 > 9 else d * 2
        total += d
    return prefix + str((10 - total % 10) % 10)


def _rng() -> np.random.Generator:
    return np.random.default_rng(RNG_SEED)


def _ids(n: int = N) -> list[str]:
    rng = _rng()
    regions = ["110105", "310101", "440305", "510107"]
    return [
        prc_id(str(rng.choice(regions)), date(1950, 1, 1) + timedelta(days=int(d)), int(s))
        for d, s in zip(rng.integers(0, 20000, n), rng.integers(0, 1000, n), strict=True)
    ]


def _cards(n: int = N) -> list[str]:
    rng = _rng()
    return [luhn_complete("4" + "".join(map(str, rng.integers(0, 10, 14)))) for _ in range(n)]


# Prefixes that mainland operators have long assigned to mobile service. Detection validates
# numbers with phonenumbers, which knows the assigned ranges: an 11-digit "1[3-9]x" number under
# an unassigned prefix (154, 160, 174, 194, ...) is not a phone number (see
# test_numbers_in_unassigned_mobile_ranges_are_not_phones_by_value).
CN_MOBILE_PREFIXES = (
    *(f"13{d}" for d in range(10)), "150", "151", "152", "153", "155", "156", "157", "158", "159",
    "166", "170", "171", "173", "175", "176", "177", "178",
    *(f"18{d}" for d in range(10)), "198", "199",
)


def _cn_mobiles(n: int = N) -> list[str]:
    rng = _rng()
    formats = ["{a}{b}{c}", "{a}-{b}-{c}", "{a} {b} {c}", "+86 {a} {b} {c}", "0086{a}{b}{c}",
               "+86-{a}-{b}-{c}"]
    out = []
    for i in range(n):
        a = str(rng.choice(CN_MOBILE_PREFIXES))
        b, c = f"{rng.integers(0, 10**4):04d}", f"{rng.integers(0, 10**4):04d}"
        out.append(formats[i % len(formats)].format(a=a, b=b, c=c))
    return out


def _finding(df: pd.DataFrame, column: str) -> ColumnFinding:
    (found,) = [f for f in scan_frame(df) if f.column == column]
    return found


def _kind(values: Sequence[object], column: str = "col") -> PiiKind | None:
    return _finding(pd.DataFrame({column: values}), column).kind


# ---------------------------------------------------------------------------------------------
# Positive examples, by value and by name hint
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "kind"),
    [
        (_cn_mobiles(), PiiKind.PHONE),
        ([f"+1 (415) 555-{i:04d}" for i in range(N)], PiiKind.PHONE),
        ([f"+4420718{i:05d}" for i in range(N)], PiiKind.PHONE),
        ([f"user{i}@example.com" for i in range(N)], PiiKind.EMAIL),
        (_ids(), PiiKind.NATIONAL_ID),
        (_cards(), PiiKind.BANK_CARD),
        ([f"{c[:4]} {c[4:8]} {c[8:12]} {c[12:]}" for c in _cards()], PiiKind.BANK_CARD),
        ([f"10.0.{i}.{i + 1}" for i in range(N)] + ["2001:db8::1"], PiiKind.IP_ADDRESS),
        ([f"{i + 1} Main Street" for i in range(N)], PiiKind.ADDRESS),
        ([f"北京市朝阳区建国路{i + 1}号" for i in range(N)], PiiKind.ADDRESS),
    ],
    ids=["cn-mobile", "nanp", "e164", "email", "prc-id", "card", "card-spaced", "ip", "street",
         "cn-street"],
)
def test_values_alone_identify_the_kind(values: list[str], kind: PiiKind) -> None:
    found = _finding(pd.DataFrame({"col": values}), "col")
    assert found.kind is kind
    assert found.confidence >= DETECTION_THRESHOLD
    assert found.suggested_policy is SUGGESTED_POLICY[kind]


def test_latin_and_chinese_names_are_found_by_value() -> None:
    first = ["Jane", "John", "Mary Ann", "Peter", "Li", "Ana", "O'Neil", "Zoë"]
    last = ["Smith", "Doe", "Lee", "van Dyke", "Wei", "Silva", "Jean-Baptiste"]
    latin = [f"{a} {b}" for a in first for b in last]
    chinese = ["张伟", "王芳", "李娜", "刘洋", "欧阳娜娜", "陈静", "杨磊", "赵敏"]
    assert _kind(latin) is PiiKind.NAME
    assert _kind(chinese) is PiiKind.NAME


def test_names_with_han_characters_outside_the_basic_block_are_names() -> None:
    # Extension A (U+3400-U+4DBF) and B (U+20000-) characters occur in registered names.
    names = ["张㛃", "王\U000201d4", "李㐨华", "陈\U00020b9f", "刘㑇", "赵㒿明", "欧阳㐱",
             "周\U00021a1a"]
    assert _kind(names) is PiiKind.NAME
    assert _kind([f"北京市朝阳区㐱路{i + 1}号" for i in range(N)]) is PiiKind.ADDRESS


def test_mobiles_stored_as_integers_are_phones() -> None:
    values = pd.Series([13800000000 + i * 7919 for i in range(N)], dtype="int64")
    assert _finding(pd.DataFrame({"x": values}), "x").kind is PiiKind.PHONE


@pytest.mark.parametrize(
    ("column", "values", "kind"),
    [
        ("出生日期", ["1990-03-07", "1985年5月1日", "19700101", "2001/12/31"], PiiKind.BIRTH_DATE),
        ("date_of_birth", ["1990-03-07", "1985-05-01"], PiiKind.BIRTH_DATE),
        ("dob", pd.to_datetime(["1990-03-07", "1985-05-01"]), PiiKind.BIRTH_DATE),
        ("zip", ["10001", "94105-1234", "02139"], PiiKind.POSTCODE),
        ("Postcode", ["SW1A 1AA", "EC1A 1BB", "M1 1AE"], PiiKind.POSTCODE),
        ("邮编", ["100020", "200030", "510000"], PiiKind.POSTCODE),
        ("customer_id", ["TC00001", "TC00002", "TC00001"], PiiKind.CUSTOMER_ID),
        ("客户编号", ["A1", "A2"], PiiKind.CUSTOMER_ID),
        ("姓名", ["张伟", "王芳"], PiiKind.NAME),
        ("手机", ["138-1234-5678", "13912345678"], PiiKind.PHONE),
        ("联系电话", ["n/a", "unknown"], PiiKind.PHONE),
        ("身份证号", _ids(3), PiiKind.NATIONAL_ID),
        ("邮箱", ["a@b.cn", "c@d.com"], PiiKind.EMAIL),
        ("家庭地址", ["北京市朝阳区建国路88号", "上海市浦东新区世纪大道100号"], PiiKind.ADDRESS),
        ("银行卡号", _cards(3), PiiKind.BANK_CARD),
        ("ClientIP", ["10.1.2.3", "10.1.2.4"], PiiKind.IP_ADDRESS),
    ],
)
def test_name_hints_in_english_and_chinese(column: str, values: list[object],
                                           kind: PiiKind) -> None:
    found = _finding(pd.DataFrame({column: values}), column)
    assert found.kind is kind
    assert found.evidence.startswith("name hint")


def test_dates_without_a_birth_hint_are_not_birth_dates() -> None:
    assert _kind(["1990-03-07", "1985-05-01", "2001-12-31"], column="signup_date") is None


def test_six_digit_numbers_without_a_hint_are_not_postcodes() -> None:
    assert _kind(["100020", "200030", "510000", "300000"], column="order_ref") is None


# ---------------------------------------------------------------------------------------------
# Negative examples
# ---------------------------------------------------------------------------------------------


def test_ids_with_a_wrong_check_character_are_not_national_ids() -> None:
    def corrupt(x: str) -> str:
        return x[:17] + ("0" if x[17] != "0" else "1")

    assert _kind([corrupt(x) for x in _ids()]) is None


def test_ids_with_an_impossible_birth_date_are_not_national_ids() -> None:
    # Valid check character but born on the 31st of February.
    fake = [prc_id("110105", date(1990, 1, 1), i).replace("19900101", "19900231") for i in range(N)]
    assert _kind(fake) is not PiiKind.NATIONAL_ID


def test_non_luhn_numbers_are_not_cards() -> None:
    def spoil(card: str) -> str:
        return card[:-1] + str((int(card[-1]) + 1) % 10)

    assert _kind([spoil(c) for c in _cards()]) is None


def test_numbers_in_unassigned_mobile_ranges_are_not_phones_by_value() -> None:
    rng = _rng()
    unassigned = [f"{p}{rng.integers(0, 10**8):08d}" for p in ("154", "160", "174", "194")
                  for _ in range(15)]
    assert _kind(unassigned) is None
    # With a phone hint in the name the column is still flagged for a human to look at.
    assert _kind(unassigned, column="mobile") is PiiKind.PHONE


def test_international_numbers_are_checked_against_their_country() -> None:
    # Plus-prefixed digits of an impossible length for their country code are not phones ...
    assert _kind([f"+1{i:07d}" for i in range(N)]) is None
    # ... while a valid number written with the 00 international prefix is one.
    assert _kind([f"0044 20 7180 {i:04d}" for i in range(N)]) is PiiKind.PHONE


def test_amount_columns_are_not_pii() -> None:
    rng = _rng()
    frame = pd.DataFrame(
        {
            "amount": np.round(rng.gamma(2.0, 80.0, 500), 2),
            "total_charges": rng.uniform(18, 9000, 500),
            "quantity": rng.integers(1, 20, 500),
            "big_ints": rng.integers(10**12, 10**16, 500),
            "monthly_charges": rng.uniform(18, 120, 500).round(2).astype(str),
        }
    )
    for found in scan_frame(frame):
        assert found.kind is None, found.column
        assert found.suggested_policy is None
        assert found.confidence >= DETECTION_THRESHOLD


def test_yes_no_and_categorical_columns_are_not_pii() -> None:
    frame = pd.DataFrame(
        {
            "partner": ["Yes", "No"] * 30,
            "internet_service": ["Fiber optic", "DSL", "No"] * 20,
            "plan": ["Premium Plan", "Basic Plan", "Family Plan"] * 20,
            "城市": ["北京", "上海", "广州"] * 20,
            "churn": [0, 1, 0] * 20,
            "flag": [True, False] * 30,
        }
    )
    assert [f.kind for f in scan_frame(frame)] == [None] * 6


def test_a_pii_word_in_the_name_of_a_yes_no_column_is_not_pii() -> None:
    frame = pd.DataFrame({"phone_service": ["Yes", "No"] * 30, "PaperlessBilling": ["Yes"] * 60,
                          "email_opt_in": [0, 1] * 30})
    findings = scan_frame(frame)
    assert [f.kind for f in findings] == [None, None, None]
    assert "repeated categories" in findings[0].evidence


def test_random_short_chinese_text_is_not_a_name_without_surnames() -> None:
    assert _kind(["北京", "上海", "广州", "深圳", "成都", "南京"] * 5 + ["春天来了"]) is None


def test_empty_and_all_missing_columns_are_reported_without_crashing() -> None:
    frame = pd.DataFrame({"notes": [None, None], "phone": [np.nan, np.nan]})
    notes, phone = scan_frame(frame)
    assert notes.kind is None and notes.evidence == "no name hint; no values sampled"
    assert phone.kind is PiiKind.PHONE  # the name alone is enough to ask a human


# ---------------------------------------------------------------------------------------------
# Output contract
# ---------------------------------------------------------------------------------------------


def test_to_json_format() -> None:
    frame = pd.DataFrame({"email": ["a@b.com", "c@d.org"], "amount": [1.5, 2.5]})
    email, amount = (f.to_json() for f in scan_frame(frame))
    assert set(email) == {"column", "kind", "confidence", "suggested_policy"}
    assert email["column"] == "email"
    assert email["kind"] == "email"
    assert email["suggested_policy"] == MaskingPolicy.DROP.value
    assert amount == {"column": "amount", "kind": None, "confidence": amount["confidence"],
                      "suggested_policy": None}
    assert 0.0 <= amount["confidence"] <= 1.0
    json.dumps([email, amount])  # plain JSON types only


def test_findings_are_frozen_and_in_column_order() -> None:
    frame = pd.DataFrame({"b": [1], "a": ["x@y.com"], "c": ["z"]})
    findings = scan_frame(frame)
    assert [f.column for f in findings] == ["b", "a", "c"]
    with pytest.raises(AttributeError):
        findings[0].confidence = 0.0  # type: ignore[misc]


def test_evidence_never_contains_values() -> None:
    secret_values = {
        "email": ["secret.person@example.com"] * 3,
        "phone": ["13899998888"] * 3,
        "id": [_ids(1)[0]] * 3,
        "姓名": ["诸葛亮"] * 3,
    }
    findings = scan_frame(pd.DataFrame(secret_values))
    for found in findings:
        for value in secret_values[found.column]:
            assert value not in found.evidence
            assert value not in repr(found)


def test_sampling_is_reproducible_and_bounded() -> None:
    frame = pd.DataFrame({"phone": _cn_mobiles(5000)})
    a = scan_frame(frame, sample_size=100, rng=np.random.default_rng(1))
    b = scan_frame(frame, sample_size=100, rng=np.random.default_rng(1))
    assert a == b
    assert "of 100 sampled values" in a[0].evidence


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(min_value=0, max_value=1e7, allow_nan=False), min_size=5, max_size=50))
def test_float_amounts_are_never_flagged(values: list[float]) -> None:
    assert _kind([round(v, 2) for v in values], column="amount") is None


@settings(max_examples=40, deadline=None)
@given(st.lists(st.sampled_from(["Yes", "No", "Maybe", "N/A"]), min_size=1, max_size=50))
def test_categorical_answers_are_never_flagged(values: list[str]) -> None:
    assert _kind(values, column="answer") is None


@pytest.mark.data
def test_telco_dataset_flags_only_the_customer_id() -> None:
    from fedcrm.simulations.datasets import load_telco

    try:
        frame = load_telco()
    except Exception as exc:  # dataset package or download unavailable
        pytest.skip(f"telco data unavailable: {type(exc).__name__}")
    flagged = {f.column: f.kind for f in scan_frame(frame) if f.kind is not None}
    assert flagged == {"customer_id": PiiKind.CUSTOMER_ID}
