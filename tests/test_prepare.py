from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest
from conftest import customers_columns, make_customers

from fedcrm.data.contract import load_firm_config
from fedcrm.data.prepare import prepare
from fedcrm.data.store import load_store
from fedcrm.privacy.errors import QuarantineThresholdExceeded, SchemaError
from fedcrm.privacy.keys import load_keys


def _all_bytes(root: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file())


def _decrypted_text(cfg_path: Path) -> str:
    cfg = load_firm_config(cfg_path)
    store = load_store(cfg.prepared_dir, keys=load_keys(cfg.firm.keys_dir), use_cache=False)
    frames = [store.customers, store.transactions, store.features]
    return "\n".join(f.to_csv(index=False) for f in frames if f is not None)


def test_prepare_writes_encrypted_store_and_manifest(write_firm: Callable[..., Path]) -> None:
    cfg_path = write_firm()
    result = prepare(load_firm_config(cfg_path))
    m = result.manifest
    assert m["tables"]["customers"]["rows_read"] == 300
    assert m["tables"]["customers"]["rows_quarantined"] == 0
    assert m["tables"]["features"]["rows"] == 300
    policies = {c["source"]: c.get("policy") for c in m["tables"]["customers"]["columns"]}
    assert policies == {
        "cust_id": "pseudonymize",
        "full_name": "pseudonymize",
        "email": "partial",
        "phone": "partial",
        "signup": None,
        "plan": None,
        "tenure": None,
        "monthly": None,
        "churned": None,
        "notes": "drop",
    }
    assert m["key_ids"]["data"].startswith("data-v1-")
    for name in ("customers.fcs", "features.fcs", "manifest.json"):
        assert (result.store_dir / name).exists()


def test_no_raw_pii_in_any_output_byte_nor_in_decrypted_tables(
    write_firm: Callable[..., Path],
) -> None:
    frame = make_customers(200)
    frame.loc[5, "monthly"] = "not-a-number"  # one quarantined row
    cfg_path = write_firm(frame)
    prepare(load_firm_config(cfg_path))
    store_bytes = _all_bytes(cfg_path.parent / "store")
    decrypted = _decrypted_text(cfg_path)
    for _, row in frame.iterrows():
        for col in ("cust_id", "full_name", "email", "phone"):
            raw = str(row[col])
            assert raw.encode() not in store_bytes
            if col != "full_name":  # names repeat as common words across rows; checked below
                assert raw not in decrypted, (col, raw)
    assert "free text" not in decrypted  # dropped column
    assert not any(n in decrypted for n in frame["full_name"].unique())


def test_gbk_input_with_chinese_values_survives(write_firm: Callable[..., Path]) -> None:
    frame = make_customers(120)
    frame["plan"] = frame["plan"].map(
        {"basic": "基础版", "plus": "黄金会员", "premium": "钻石会员"}
    )
    frame.loc[::2, "full_name"] = "张伟"
    cols = customers_columns()
    cols["plan"] = {
        "role": "feature",
        "kind": "categorical",
        "categories": ["基础版", "黄金会员", "钻石会员"],
    }
    cfg_path = write_firm(
        frame,
        columns=cols,
        csv_kwargs={"encoding": "gb18030"},
        source={"kind": "csv", "path": "customers.csv", "encoding": "gb18030"},
    )
    prepare(load_firm_config(cfg_path))
    cfg = load_firm_config(cfg_path)
    store = load_store(cfg.prepared_dir, keys=load_keys(cfg.firm.keys_dir), use_cache=False)
    assert store.customers is not None
    assert set(store.customers["plan"]) == {"基础版", "黄金会员", "钻石会员"}
    assert "张伟" not in store.customers.to_csv()


def test_bad_rows_are_quarantined_with_row_number_and_reason_but_no_values(
    write_firm: Callable[..., Path],
) -> None:
    frame = make_customers(200)
    frame.loc[3, "monthly"] = "abc"
    frame.loc[7, "tenure"] = "500"
    frame.loc[9, "churned"] = ""
    frame.loc[11, "cust_id"] = frame.loc[10, "cust_id"]
    frame.loc[13, "plan"] = "gold"
    frame.loc[15, "signup"] = "31/02/2021"
    cfg_path = write_firm(frame)
    result = prepare(load_firm_config(cfg_path))
    assert result.manifest["tables"]["customers"]["rows_quarantined"] == 6
    q = pd.read_csv(cfg_path.parent / "store" / "quarantine.csv")
    got = {(int(r.row), r.column, r.reason) for r in q.itertuples()}
    assert got == {
        (4, "monthly", "not a number"),
        (8, "tenure", "above declared max 120"),
        (10, "churned", "missing label"),
        (12, "cust_id", "duplicate customer id"),
        (14, "plan", "not one of the declared categories"),
        (16, "signup", "not a date in format ISO 8601 (YYYY-MM-DD)"),
    }
    text = (cfg_path.parent / "store" / "quarantine.csv").read_text()
    for value in ("abc", "gold", "31/02/2021", frame.loc[11, "cust_id"], frame.loc[3, "email"]):
        assert value not in text


def test_quarantine_threshold_aborts_and_leaves_no_store(write_firm: Callable[..., Path]) -> None:
    frame = make_customers(100)
    frame.loc[:9, "monthly"] = "n/a"  # 10% > 5%
    cfg_path = write_firm(frame)
    with pytest.raises(QuarantineThresholdExceeded, match=r"10 of 100 rows \(10.0%\)"):
        prepare(load_firm_config(cfg_path))
    assert not (cfg_path.parent / "store" / "prepared").exists()
    assert not (cfg_path.parent / "store" / "quarantine.csv").exists()
    assert (cfg_path.parent / "store" / "quarantine.rejected.csv").exists()  # its reasons, apart


def test_failed_reprepare_keeps_the_good_store_and_its_quarantine_list(
    write_firm: Callable[..., Path],
) -> None:
    frame = make_customers(200)
    frame.loc[3, "monthly"] = "n/a"
    cfg_path = write_firm(frame)
    prepare(load_firm_config(cfg_path))
    store = cfg_path.parent / "store"
    before = {p.name: p.read_bytes() for p in [store / "quarantine.csv",
                                                *(store / "prepared").iterdir()]}
    worse = make_customers(200)
    worse.loc[:50, "monthly"] = "n/a"  # 25% > 5%: refused
    write_firm(worse)
    with pytest.raises(QuarantineThresholdExceeded, match=r"quarantine\.rejected\.csv"):
        prepare(load_firm_config(cfg_path))
    after = {p.name: p.read_bytes() for p in [store / "quarantine.csv",
                                               *(store / "prepared").iterdir()]}
    assert after == before
    assert not list(store.glob("*.partial"))


def test_prepare_refuses_to_replace_a_store_with_far_fewer_rows_unless_told(
    write_firm: Callable[..., Path],
) -> None:
    cfg_path = write_firm(make_customers(300))
    prepare(load_firm_config(cfg_path))
    manifest = (cfg_path.parent / "store" / "prepared" / "manifest.json").read_bytes()
    write_firm(make_customers(100))  # a third of the customers: a truncated export?
    with pytest.raises(SchemaError, match=r"keeps 100 rows, the current store .* has 300.*"
                                          r"--replace-with-fewer"):
        prepare(load_firm_config(cfg_path))
    assert (cfg_path.parent / "store" / "prepared" / "manifest.json").read_bytes() == manifest
    result = prepare(load_firm_config(cfg_path), replace_with_fewer=True)
    assert result.tables[0].rows_kept == 100
    write_firm(make_customers(200))  # two thirds of the current store's 100: more, no question
    assert prepare(load_firm_config(cfg_path)).tables[0].rows_kept == 200


def test_a_header_only_export_never_replaces_a_store(write_firm: Callable[..., Path]) -> None:
    cfg_path = write_firm(make_customers(100))
    prepare(load_firm_config(cfg_path))
    manifest = (cfg_path.parent / "store" / "prepared" / "manifest.json").read_bytes()
    write_firm(make_customers(100).iloc[:0])
    with pytest.raises(SchemaError, match="has a header but no data rows"):
        prepare(load_firm_config(cfg_path), replace_with_fewer=True)
    assert (cfg_path.parent / "store" / "prepared" / "manifest.json").read_bytes() == manifest


def test_threshold_is_configurable(write_firm: Callable[..., Path]) -> None:
    frame = make_customers(100)
    frame.loc[:9, "monthly"] = "n/a"
    cfg_path = write_firm(frame, extra={"validation": {"max_quarantine_fraction": 0.2}})
    result = prepare(load_firm_config(cfg_path))
    assert result.tables[0].rows_quarantined == 10


def test_chunked_reading_gives_same_store_as_single_chunk(write_firm: Callable[..., Path]) -> None:
    frame = make_customers(2500)
    frame.loc[2400, "cust_id"] = frame.loc[10, "cust_id"]  # duplicate across chunks
    cfg_path = write_firm(
        frame, source={"kind": "csv", "path": "customers.csv", "chunk_rows": 1000}
    )
    result = prepare(load_firm_config(cfg_path))
    assert (
        result.manifest["tables"]["customers"]["chunks"] == 3
    )  # data chunks (the final marker is not counted)
    assert result.manifest["tables"]["customers"]["rows_quarantined"] == 1


def test_parquet_and_sqlite_sources(write_firm: Callable[..., Path], tmp_path: Path) -> None:
    frame = make_customers(150)
    cfg_path = write_firm(frame)
    frame.to_parquet(cfg_path.parent / "customers.parquet")
    db = cfg_path.parent / "crm.db"
    with sqlite3.connect(db) as conn:
        frame.to_sql("customers", conn, index=False)
    for source in (
        {"kind": "parquet", "path": "customers.parquet"},
        {"kind": "sql", "url": f"sqlite:///{db}", "table": "customers"},
    ):
        cfg_path = write_firm(frame, source=source)
        result = prepare(load_firm_config(cfg_path))
        assert result.manifest["tables"]["customers"]["rows_kept"] == 150


def test_pseudonyms_are_stable_across_runs_and_change_after_rotation(
    write_firm: Callable[..., Path],
) -> None:
    from fedcrm.privacy.keys import KeyKind, rotate_key

    cfg_path = write_firm()
    cfg = load_firm_config(cfg_path)
    first = prepare(cfg)
    ids1 = load_store(cfg.prepared_dir, keys=load_keys(cfg.firm.keys_dir), use_cache=False)
    prepare(cfg)
    ids2 = load_store(cfg.prepared_dir, keys=load_keys(cfg.firm.keys_dir), use_cache=False)
    assert ids1.customers is not None and ids2.customers is not None
    assert list(ids1.customers["customer_id"]) == list(ids2.customers["customer_id"])
    new_id = rotate_key(cfg.firm.keys_dir, KeyKind.PSEUDONYM)
    rotated = prepare(cfg)
    assert (
        rotated.manifest["key_ids"]["pseudonym"] == new_id != first.manifest["key_ids"]["pseudonym"]
    )
    ids3 = load_store(cfg.prepared_dir, keys=load_keys(cfg.firm.keys_dir), use_cache=False)
    assert ids3.customers is not None
    assert set(ids3.customers["customer_id"]).isdisjoint(set(ids1.customers["customer_id"]))


def _store_files(store: Path) -> dict[str, bytes]:
    return {str(p.relative_to(store)): p.read_bytes() for p in sorted(store.rglob("*"))
            if p.is_file()}


def _refused_without_change(
    write_firm: Callable[..., Path], frame: pd.DataFrame, columns: dict[str, object]
) -> str:
    """Prepare a good store, then ``frame`` with ``columns``: refused, the old store intact."""
    cfg_path = write_firm(make_customers(200))
    prepare(load_firm_config(cfg_path))
    store = cfg_path.parent / "store"
    before = _store_files(store)
    cfg_path = write_firm(frame, columns=columns)
    with pytest.raises(SchemaError) as refused:
        prepare(load_firm_config(cfg_path))
    after = _store_files(store)
    after.pop("audit.jsonl", None), before.pop("audit.jsonl", None)  # appended only on success
    assert after == before
    return str(refused.value)


def test_a_label_with_a_single_class_is_refused_and_the_old_store_kept(
    write_firm: Callable[..., Path],
) -> None:
    frame = make_customers(200).assign(churned="No")
    message = _refused_without_change(write_firm, frame, customers_columns())
    assert "label column 'churned' has a single class" in message
    assert "all 200 labelled rows are not churned (false_values)" in message
    assert "Nothing was written" in message


def test_a_label_listing_both_answers_as_not_churned_is_refused(
    write_firm: Callable[..., Path],
) -> None:
    # What the old starter config wrote for 是否流失: every customer's label became 0.
    columns = customers_columns()
    columns["churned"] = {"role": "label", "true_values": ["Y"], "false_values": ["Yes", "No"]}
    frame = make_customers(200)
    message = _refused_without_change(write_firm, frame, columns)
    assert "single class" in message and "false_values = ['Yes', 'No']" in message


def test_label_values_outside_the_lists_are_refused_naming_only_label_words(
    write_firm: Callable[..., Path],
) -> None:
    frame = make_customers(200)
    frame.loc[:4, "churned"] = "是"  # a label word the config does not list
    frame.loc[5:6, "churned"] = "Anna Meyer, 139-0000-1234"  # a stray cell: never echoed
    message = _refused_without_change(write_firm, frame, customers_columns())
    assert "label column 'churned' has 7 values in neither true_values nor false_values" in message
    assert "'是'" in message
    assert "Anna" not in message and "139" not in message


def test_label_refusal_is_one_line_from_the_cli(write_firm: Callable[..., Path]) -> None:
    from typer.testing import CliRunner

    from fedcrm.cli import app

    cfg_path = write_firm(make_customers(100).assign(churned="No"))
    r = CliRunner().invoke(app, ["prepare", "--config", str(cfg_path)])
    assert r.exit_code == SchemaError.exit_code
    assert "Traceback" not in r.output and "single class" in r.output
    assert not (cfg_path.parent / "store" / "prepared").exists()


def test_an_empty_label_list_is_a_config_error(write_firm: Callable[..., Path]) -> None:
    from fedcrm.privacy.errors import ConfigError

    columns = customers_columns()
    columns["churned"] = {"role": "label", "true_values": [], "false_values": ["No", "Yes"]}
    with pytest.raises(ConfigError, match="a label needs true_values"):
        load_firm_config(write_firm(columns=columns))
