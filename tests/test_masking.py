"""Tests for privacy.masking: pseudonyms, partial masks, generalization, policy dispatch."""

from __future__ import annotations

import hmac
import math
from datetime import date

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fedcrm.privacy.masking as masking
from fedcrm.privacy.errors import ConfigError
from fedcrm.privacy.keys import derive_pseudonym_key
from fedcrm.privacy.masking import (
    apply_policy,
    generalize,
    partial_mask,
    plan_rotation,
    pseudonymize,
    token_key_id,
)
from fedcrm.privacy.policies import MaskingPolicy, PiiKind

MASTER = bytes(range(32))
KEY_A = derive_pseudonym_key(MASTER, firm="acme", version=1)
KEY_B = derive_pseudonym_key(MASTER, firm="acme", version=2)

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

texts = st.text(
    alphabet=st.characters(exclude_categories=["Cs"]), min_size=1, max_size=40
)
text_lists = st.lists(texts, min_size=1, max_size=30)


def _reference_token(key: bytes, key_id: str, value: str) -> str:
    return f"{key_id}:{hmac.new(key, value.encode(), 'sha256').hexdigest()[:24]}"


def _phones(n: int, seed: int = 0) -> pd.Series:
    rng = np.random.default_rng(seed)
    second = rng.integers(3, 10, n)
    rest = rng.integers(0, 10**9, n)
    return pd.Series([f"1{a}{b:09d}" for a, b in zip(second, rest, strict=True)], name="phone")


# ---------------------------------------------------------------------------------------------
# Pseudonymize
# ---------------------------------------------------------------------------------------------


def test_pseudonym_equals_reference_hmac_sha256() -> None:
    values = pd.Series(["13812345678", "张伟", "jane@example.com", ""], name="customer_id")
    out = pseudonymize(values, key=KEY_A, key_id="pseudonym-v1-abc")
    assert out.tolist() == [_reference_token(KEY_A, "pseudonym-v1-abc", v) for v in values]
    assert out.name == "customer_id"
    assert out.index.equals(values.index)


def test_long_keys_are_hashed_first_like_rfc_2104() -> None:
    key = bytes(range(100))
    out = pseudonymize(pd.Series(["x"]), key=key, key_id="k1")
    assert out.iloc[0] == _reference_token(key, "k1", "x")


def test_missing_values_stay_missing_and_do_not_shift_tokens() -> None:
    values = pd.Series(["a", None, "b", np.nan], index=[10, 11, 12, 13])
    out = pseudonymize(values, key=KEY_A, key_id="k1")
    assert out.isna().tolist() == [False, True, False, True]
    assert out[10] == _reference_token(KEY_A, "k1", "a")
    assert out[12] == _reference_token(KEY_A, "k1", "b")


def test_numbers_are_hashed_as_their_text_and_whole_floats_as_integers() -> None:
    ints = pseudonymize(pd.Series([12345, 678]), key=KEY_A, key_id="k1")
    floats = pseudonymize(pd.Series([12345.0, np.nan, 678.0]), key=KEY_A, key_id="k1")
    assert ints.iloc[0] == floats.iloc[0] == _reference_token(KEY_A, "k1", "12345")
    assert ints.iloc[1] == floats.iloc[2]
    assert pd.isna(floats.iloc[1])


@FAST
@given(text_lists)
def test_pseudonyms_are_stable_for_the_same_key(values: list[str]) -> None:
    series = pd.Series(values)
    first = pseudonymize(series, key=KEY_A, key_id="k1")
    second = pseudonymize(series.copy(), key=KEY_A, key_id="k1")
    assert first.tolist() == second.tolist()


@FAST
@given(text_lists)
def test_pseudonyms_differ_across_keys(values: list[str]) -> None:
    series = pd.Series(values)
    a = pseudonymize(series, key=KEY_A, key_id="k1")
    b = pseudonymize(series, key=KEY_B, key_id="k1")
    # Same key id on purpose: only the digest part may tell them apart.
    assert all(x != y for x, y in zip(a, b, strict=True))


@FAST
@given(st.lists(texts, min_size=1, max_size=60, unique=True))
def test_pseudonyms_are_injective_on_distinct_values(values: list[str]) -> None:
    out = pseudonymize(pd.Series(values), key=KEY_A, key_id="k1")
    assert out.nunique() == len(values)


@FAST
@given(text_lists)
def test_pseudonyms_never_contain_the_raw_value(values: list[str]) -> None:
    out = pseudonymize(pd.Series(values), key=KEY_A, key_id="k1")
    _assert_no_raw_value(values, out)


def _assert_no_raw_value(values: list[str], out: pd.Series) -> None:
    blob = "\n".join(x for x in out.tolist() if isinstance(x, str)).encode()
    for v in values:
        if len(v) >= 4:
            assert v.encode() not in blob


def test_token_key_id_round_trips_and_rejects_non_tokens_without_echo() -> None:
    token = pseudonymize(pd.Series(["x"]), key=KEY_A, key_id="pseudonym-v7-0a1b").iloc[0]
    assert token_key_id(token) == "pseudonym-v7-0a1b"
    with pytest.raises(ConfigError) as exc:
        token_key_id("13812345678")
    assert "13812345678" not in str(exc.value)


@pytest.mark.parametrize("key_id", ["", "has:colon", "has space", "x" * 49])
def test_malformed_key_id_is_rejected(key_id: str) -> None:
    with pytest.raises(ConfigError):
        pseudonymize(pd.Series(["x"]), key=KEY_A, key_id=key_id)


def test_worker_processes_give_the_same_tokens_as_one_process(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Lower the pool threshold so a small input exercises the forked path.
    monkeypatch.setattr(masking, "_PARALLEL_MIN_VALUES", 200)
    values = _phones(3000)
    values.iloc[[5, 1500, 2999]] = None
    serial = pseudonymize(values, key=KEY_A, key_id="k1", workers=1)
    parallel = pseudonymize(values, key=KEY_A, key_id="k1", workers=3)
    assert masking._worker_count(3, 2997) == 3
    pd.testing.assert_series_equal(serial, parallel)
    assert serial.iloc[1] == _reference_token(KEY_A, "k1", values.iloc[1])


def test_small_inputs_never_start_a_pool() -> None:
    assert masking._worker_count(None, 10_000) == 1
    assert masking._worker_count(8, 10_000) == 1


def test_workers_below_one_is_a_config_error() -> None:
    with pytest.raises(ConfigError):
        pseudonymize(pd.Series(["x"]), key=KEY_A, key_id="k1", workers=0)


def test_rotation_plan_lists_stale_key_ids() -> None:
    old = pseudonymize(pd.Series(["a", "b"]), key=KEY_A, key_id="pseudonym-v1-aa")
    new = pseudonymize(pd.Series(["c"]), key=KEY_B, key_id="pseudonym-v2-bb")
    column = pd.concat([old, new, pd.Series([None])], ignore_index=True).rename("customer_id")
    plan = plan_rotation(column, current_key_id="pseudonym-v2-bb")
    assert plan.stale_key_ids == ("pseudonym-v1-aa",)
    assert (plan.stale_rows, plan.total_rows) == (2, 3)
    assert not plan.up_to_date
    assert "re-run prepare" in plan.describe()
    assert plan_rotation(new, current_key_id="pseudonym-v2-bb").up_to_date


# ---------------------------------------------------------------------------------------------
# Partial masking
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "raw", "masked"),
    [
        (PiiKind.PHONE, "13812345678", "138****5678"),
        (PiiKind.PHONE, "+86 138-1234-5678", "138****5678"),
        (PiiKind.PHONE, "0086 138 1234 5678", "138****5678"),
        (PiiKind.PHONE, "(212) 555-1234", "212***1234"),
        (PiiKind.PHONE, "12345", "***45"),
        (PiiKind.EMAIL, "jane.doe@example.com", "j***@example.com"),
        (PiiKind.NATIONAL_ID, "11010519491231002X", "110105************"),
        (PiiKind.BANK_CARD, "4111 1111 1111 1111", "************1111"),
        (PiiKind.NAME, "张伟", "张**"),
        (PiiKind.NAME, "欧阳娜娜", "欧阳**"),
        (PiiKind.NAME, "王\U000201d4", "王**"),  # Han beyond the basic block (Extension B)
        (PiiKind.NAME, "Jane Smith", "J*** S***"),
        (PiiKind.ADDRESS, "221B Baker Street", "2***t"),
        (None, "ab", "**"),
    ],
)
def test_partial_mask_examples(kind: PiiKind | None, raw: str, masked: str) -> None:
    assert partial_mask(pd.Series([raw]), kind=kind).tolist() == [masked]


def test_partial_mask_keeps_missing_and_index() -> None:
    values = pd.Series(["13812345678", None], index=["a", "b"], name="phone")
    out = partial_mask(values, kind=PiiKind.PHONE)
    assert out["a"] == "138****5678"
    assert pd.isna(out["b"])
    assert out.name == "phone"


@FAST
@given(text_lists, st.sampled_from([*PiiKind, None]))
def test_partial_mask_never_returns_a_raw_value(values: list[str], kind: PiiKind | None) -> None:
    out = partial_mask(pd.Series(values), kind=kind)
    _assert_no_raw_value(values, out)


# ---------------------------------------------------------------------------------------------
# Generalize
# ---------------------------------------------------------------------------------------------


def test_birth_dates_become_age_bands_as_of_a_given_day() -> None:
    values = pd.Series(["1990-03-07", "1990年3月8日", "19500101", "2030-01-01", None, "garbage"])
    out = generalize(values, kind=PiiKind.BIRTH_DATE, as_of=date(2024, 3, 7))
    assert out.tolist()[:3] == ["30-39", "30-39", "70-79"]
    assert out.iloc[3:].isna().all()


def test_age_band_edges_and_top_code() -> None:
    values = pd.Series(pd.to_datetime(["2014-03-08", "2014-03-07", "1930-01-01"]))
    out = generalize(values, kind=PiiKind.BIRTH_DATE, as_of=date(2024, 3, 7))
    assert out.tolist() == ["0-9", "10-19", "90+"]


def test_postcodes_keep_a_prefix() -> None:
    out = generalize(pd.Series(["100020", "94105", "SW1A 1AA", "123"]), kind=PiiKind.POSTCODE)
    assert out.tolist() == ["100*", "941*", "SW1*", "1*"]


def test_ip_addresses_become_networks() -> None:
    out = generalize(pd.Series(["192.168.1.77", "2001:db8:1:2::1"]), kind=PiiKind.IP_ADDRESS)
    assert out.tolist() == ["192.168.1.0/24", "2001:db8:1::/48"]


def test_amounts_become_half_open_bins() -> None:
    values = pd.Series([50.0, 100.0, 199.99, 200.0, 1e6, math.nan])
    out = generalize(values, kind=None, bins=[100, 200, 500])
    assert out.tolist()[:5] == ["< 100", "[100, 200)", "[100, 200)", "[200, 500)", ">= 500"]
    assert pd.isna(out.iloc[5])


@pytest.mark.parametrize("bins", [[1], [1, 1], [3, 2]])
def test_bad_bins_are_config_errors(bins: list[float]) -> None:
    with pytest.raises(ConfigError):
        generalize(pd.Series([1.0]), kind=None, bins=bins)


def test_generalize_without_a_rule_names_the_column_not_the_values() -> None:
    with pytest.raises(ConfigError) as exc:
        generalize(pd.Series(["jane@example.com"], name="email"), kind=PiiKind.EMAIL)
    assert "'email'" in str(exc.value)
    assert "jane@example.com" not in str(exc.value)


@FAST
@given(st.lists(st.text(alphabet="0123456789ABCDEFGH -", min_size=4, max_size=10), min_size=1))
def test_generalized_postcodes_never_contain_the_raw_value(values: list[str]) -> None:
    out = generalize(pd.Series(values), kind=PiiKind.POSTCODE)
    _assert_no_raw_value(values, out)


@FAST
@given(st.lists(st.dates(min_value=date(1900, 1, 1), max_value=date(2024, 1, 1)), min_size=1))
def test_generalized_birth_dates_never_contain_the_raw_value(values: list[date]) -> None:
    raw = [d.isoformat() for d in values]
    out = generalize(pd.Series(raw), kind=PiiKind.BIRTH_DATE, as_of=date(2024, 6, 1))
    _assert_no_raw_value(raw, out)
    assert out.notna().all()


# ---------------------------------------------------------------------------------------------
# apply_policy
# ---------------------------------------------------------------------------------------------


def test_drop_returns_none() -> None:
    assert apply_policy(pd.Series(["x"]), policy=MaskingPolicy.DROP, kind=PiiKind.NAME) is None


def test_pseudonymize_without_a_key_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="pseudonym key"):
        apply_policy(
            pd.Series(["x"], name="customer_id"),
            policy=MaskingPolicy.PSEUDONYMIZE,
            kind=PiiKind.CUSTOMER_ID,
        )


def test_apply_policy_dispatches_to_each_masking_function() -> None:
    phones = pd.Series(["13812345678"], name="phone")
    token = apply_policy(
        phones, policy=MaskingPolicy.PSEUDONYMIZE, kind=PiiKind.PHONE, key=KEY_A, key_id="k1"
    )
    assert token is not None and token.iloc[0] == _reference_token(KEY_A, "k1", "13812345678")
    partial = apply_policy(phones, policy=MaskingPolicy.PARTIAL, kind=PiiKind.PHONE)
    assert partial is not None and partial.iloc[0] == "138****5678"
    band = apply_policy(
        pd.Series(["1990-01-01"]), policy=MaskingPolicy.GENERALIZE, kind=PiiKind.BIRTH_DATE,
        as_of=date(2024, 1, 1),
    )
    assert band is not None and band.iloc[0] == "30-39"


def test_apply_policy_rejects_parameters_the_policy_does_not_take() -> None:
    with pytest.raises(ConfigError, match="bins"):
        apply_policy(pd.Series(["x"]), policy=MaskingPolicy.PARTIAL, kind=None, bins=[1, 2])


def test_policy_strings_are_parsed_into_the_enum() -> None:
    with pytest.raises(ValueError):
        apply_policy(pd.Series(["x"]), policy="pseudonymise", kind=None)  # type: ignore[arg-type]
