"""`fedcrm scan`: JSON findings per column, and a starter config that fails closed."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
from conftest import make_customers
from typer.testing import CliRunner

from fedcrm.cli import app
from fedcrm.data.contract import ColumnRole, TableName, load_firm_config
from fedcrm.data.starter_config import render_starter_config
from fedcrm.privacy.detection import scan_frame

RUNNER = CliRunner()


def test_scan_json_lists_every_column_with_kind_confidence_and_policy(tmp_path: Path) -> None:
    frame = make_customers(400)
    frame["id_card"] = "11010519491231002X"
    path = tmp_path / "customers.csv"
    frame.to_csv(path, index=False)
    r = RUNNER.invoke(app, ["scan", str(path), "--json"])
    assert r.exit_code == 0, r.output
    document = json.loads(r.stdout)
    assert document["rows_sampled"] == 400
    assert document["source"]["encoding"] == {
        "value": "utf-8", "provenance": "detected", "sure": True, "evidence": "plain ASCII"
    }
    assert document["source"]["delimiter"]["value"] == ","
    findings = document["columns"]
    assert [f["column"] for f in findings] == list(frame.columns)
    for f in findings:
        assert set(f) == {"column", "kind", "confidence", "suggested_policy"}
    kinds = {f["column"]: f["kind"] for f in findings}
    assert kinds["email"] == "email"
    assert kinds["phone"] == "phone"
    assert kinds["full_name"] == "name"
    assert kinds["id_card"] == "national_id"
    assert kinds["plan"] is None and kinds["monthly"] is None
    assert "person1@mail.example.com" not in r.output  # findings never echo values


def test_write_config_gives_every_column_a_role_and_prepares(tmp_path: Path) -> None:
    frame = make_customers(400)
    path = tmp_path / "customers.csv"
    frame.to_csv(path, index=False)
    cfg_path = tmp_path / "firm.toml"
    r = RUNNER.invoke(app, ["scan", str(path), "--write-config", str(cfg_path), "--firm", "acme"])
    assert r.exit_code == 0, r.output
    cfg = load_firm_config(cfg_path)
    columns = cfg.tables[TableName.CUSTOMERS].columns
    assert set(columns) == set(frame.columns)
    for name in ("email", "phone", "full_name"):
        assert columns[name].role is ColumnRole.PII and columns[name].policy is not None
    assert columns["cust_id"].role is ColumnRole.ID
    text = cfg_path.read_text()
    assert "person1@mail.example.com" not in text and "C000001" not in text
    # the starter config is usable as written (after keys exist)
    r = RUNNER.invoke(app, ["keys", "init", "--firm", "acme", "--out", str(cfg.firm.keys_dir)])
    assert r.exit_code == 0, r.output
    r = RUNNER.invoke(app, ["prepare", "--config", str(cfg_path)])
    assert r.exit_code == 0, r.output
    # refuses to overwrite
    r = RUNNER.invoke(app, ["scan", str(path), "--write-config", str(cfg_path)])
    assert r.exit_code != 0 and "refusing to overwrite" in r.output


def test_starter_config_keeps_any_column_name_and_the_review_comments(tmp_path: Path) -> None:
    names = ['say "hi"', "[tables.x]", "a.b = 1", "back\\slash", "客户 等级", "tab\tand\nnewline",
             "# not a comment", "plain_name"]
    sample = pd.DataFrame({name: ["x", "y", "z"] * 10 for name in names})
    source = tmp_path / "customers.csv"
    sample.to_csv(source, index=False)

    def render(frame: pd.DataFrame) -> str:
        return render_starter_config(
            source=source, sample=frame, findings=scan_frame(frame), firm="acme"
        )

    without_id = render(sample)
    assert without_id.startswith("# Starter fedcrm partner config")
    assert "epsilon = 3.0  # total privacy budget" in without_id
    assert '# REVIEW: no customer id column was recognised; mark one with role = "id"' in without_id
    # "客户" (customer) alone is taken for the id column.
    text = render(sample.assign(客户=[f"c{i}" for i in range(30)]))
    assert "\"客户\" = {role = \"id\"}  # pseudonymized with the firm's key" in text
    cfg_path = tmp_path / "firm.toml"
    cfg_path.write_text(text, encoding="utf-8")
    columns = load_firm_config(cfg_path).tables[TableName.CUSTOMERS].columns
    assert list(columns) == [*names, "客户"]
    assert all(columns[name].categories == ("x", "y", "z") for name in names)
    assert columns["客户"].role is ColumnRole.ID
