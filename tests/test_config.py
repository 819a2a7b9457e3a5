from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import customers_columns

from fedcrm.data.contract import load_firm_config
from fedcrm.privacy.errors import ConfigError


def test_valid_config_resolves_paths_relative_to_the_file(write_firm: Callable[..., Path]) -> None:
    path = write_firm()
    cfg = load_firm_config(path)
    assert cfg.firm.keys_dir == path.parent / "keys"
    assert cfg.ledger_path == path.parent / "store" / "budget.jsonl"
    assert len(cfg.config_sha256) == 64


def test_unknown_policy_is_rejected_with_the_field_path(write_firm: Callable[..., Path]) -> None:
    cols = customers_columns()
    cols["email"] = {"role": "pii", "pii": "email", "policy": "hash"}
    with pytest.raises(ConfigError) as exc:
        load_firm_config(write_firm(columns=cols))
    assert "tables.customers.columns.email.policy" in str(exc.value)
    assert "pseudonymize" in str(exc.value)


def test_pii_column_without_policy_fails_closed(write_firm: Callable[..., Path]) -> None:
    cols = customers_columns()
    cols["phone"] = {"role": "pii", "pii": "phone"}
    with pytest.raises(ConfigError, match="needs a masking policy"):
        load_firm_config(write_firm(columns=cols))


def test_numeric_feature_needs_declared_range(write_firm: Callable[..., Path]) -> None:
    cols = customers_columns()
    cols["monthly"] = {"role": "feature", "kind": "numeric"}
    with pytest.raises(ConfigError, match="declared range"):
        load_firm_config(write_firm(columns=cols))


def test_secret_like_extra_keys_are_not_accepted(write_firm: Callable[..., Path]) -> None:
    with pytest.raises(ConfigError, match=r"firm\.hmac_key: unknown key"):
        load_firm_config(
            write_firm(
                extra={
                    "firm": {"name": "acme", "keys_dir": "k", "store_dir": "s", "hmac_key": "00ff"}
                }
            )
        )


def test_toml_syntax_error_is_one_clear_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[firm\nname = 1\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_firm_config(bad)
