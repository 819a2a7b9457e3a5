"""Every bad input gets one clear line, a non-zero exit, no traceback and no raw PII value."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import customers_columns, make_customers
from typer.testing import CliRunner

from fedcrm.cli import app

RUNNER = CliRunner()


def _run(*args: str) -> tuple[int, str]:
    result = RUNNER.invoke(app, list(args))
    return result.exit_code, result.output


def _assert_clean_failure(code: int, text: str, *, expect: str, pii: list[str]) -> None:
    assert code != 0
    assert "Traceback" not in text
    assert expect in text, text
    for value in pii:
        assert value not in text
    assert text.strip().count("\n") <= 2, text  # one clear line (rich may soft-wrap once)


PII = ["person1@mail.example.com", "C000001"]


def test_empty_file(write_firm: Callable[..., Path]) -> None:
    cfg = write_firm()
    (cfg.parent / "customers.csv").write_text("")
    code, text = _run("prepare", "--config", str(cfg))
    _assert_clean_failure(code, text, expect="is empty", pii=PII)


def test_wrong_delimiter(write_firm: Callable[..., Path]) -> None:
    cfg = write_firm(csv_kwargs={"sep": ";"})
    code, text = _run("prepare", "--config", str(cfg))
    _assert_clean_failure(code, text, expect="delimiter = ';'", pii=PII)


def test_wrong_encoding(write_firm: Callable[..., Path]) -> None:
    frame = make_customers(50)
    frame.loc[3, "full_name"] = "王秀英"
    cfg = write_firm(frame, csv_kwargs={"encoding": "gb18030"})
    code, text = _run("prepare", "--config", str(cfg))
    _assert_clean_failure(code, text, expect="gb18030", pii=[*PII, "王秀英"])


def test_missing_mapped_column(write_firm: Callable[..., Path]) -> None:
    frame = make_customers(50).drop(columns=["plan"])
    cfg = write_firm(frame)
    code, text = _run("prepare", "--config", str(cfg))
    _assert_clean_failure(code, text, expect="mapped column 'plan' is missing", pii=PII)


def test_unmapped_column_fails_closed(write_firm: Callable[..., Path]) -> None:
    frame = make_customers(50)
    frame["secret_note"] = "x"
    cfg = write_firm(frame)
    code, text = _run("prepare", "--config", str(cfg))
    _assert_clean_failure(code, text, expect="'secret_note' has no declared role", pii=PII)


def test_unknown_policy(write_firm: Callable[..., Path]) -> None:
    cols = customers_columns()
    cols["email"] = {"role": "pii", "pii": "email", "policy": "scramble"}
    code, text = _run("prepare", "--config", str(write_firm(columns=cols)))
    _assert_clean_failure(code, text, expect="policy", pii=PII)


@pytest.mark.parametrize(
    ("source", "expect"),
    [
        ({"kind": "sql", "url": "notadb://x/y", "table": "customers"}, "cannot use database URL"),
        (
            {"kind": "sql", "url": "sqlite:////nonexistent/dir/crm.db", "table": "customers"},
            "cannot read from database",
        ),
        (
            {
                "kind": "sql",
                "url": "postgresql+psycopg://alice:hunter2@127.0.0.1:1/crm",
                "table": "customers",
            },
            "database",
        ),
    ],
)
def test_unreadable_database_url(
    write_firm: Callable[..., Path], source: dict[str, Any], expect: str
) -> None:
    code, text = _run("prepare", "--config", str(write_firm(source=source)))
    _assert_clean_failure(code, text, expect=expect, pii=[*PII, "hunter2"])


def test_missing_config_file(tmp_path: Path) -> None:
    code, text = _run("prepare", "--config", str(tmp_path / "nope.toml"))
    _assert_clean_failure(code, text, expect="not found", pii=[])


def test_keys_missing(write_firm: Callable[..., Path]) -> None:
    cfg = write_firm(keys=False)
    code, text = _run("prepare", "--config", str(cfg))
    _assert_clean_failure(code, text, expect="fedcrm keys init", pii=PII)
