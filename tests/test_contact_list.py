"""`fedcrm contact-list`: the risk list joined back to the firm's own customer numbers, locally."""

from __future__ import annotations

import stat
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest
from conftest import make_customers
from typer.testing import CliRunner

from fedcrm.cli import app
from fedcrm.data.contract import load_firm_config
from fedcrm.data.prepare import prepare
from fedcrm.data.store import load_store
from fedcrm.privacy.errors import ConfigError
from fedcrm.privacy.keys import KeyKind, load_keys, rotate_key
from fedcrm.scoring import contact_list

RUNNER = CliRunner()


def _risk_list(cfg_path: Path, path: Path) -> pd.DataFrame:
    """A risk list as `fedcrm score` writes it, over the store's pseudonyms (no model needed)."""
    cfg = load_firm_config(cfg_path)
    ids = load_store(cfg.prepared_dir, keys=load_keys(cfg.firm.keys_dir)).customers["customer_id"]
    risks = pd.DataFrame({"customer_id": ids.to_numpy()})
    risks["churn_probability"] = [round(1 - i / len(risks), 6) for i in range(len(risks))]
    risks["risk_band"] = ["high" if p >= 0.5 else "low" for p in risks["churn_probability"]]
    risks["segment"] = "new"
    risks.to_csv(path, index=False)
    return risks


def test_every_scored_customer_gets_its_own_id_back_in_risk_order(
    write_firm: Callable[..., Path], tmp_path: Path
) -> None:
    frame = make_customers(120)
    frame.loc[5, "cust_id"] = "  C000005  "  # prepare strips ids: the join must too
    cfg_path = write_firm(frame)
    prepare(load_firm_config(cfg_path))
    risks = _risk_list(cfg_path, tmp_path / "risks.csv")
    out = tmp_path / "contacts.csv"
    r = RUNNER.invoke(app, ["contact-list", "--risks", str(tmp_path / "risks.csv"), "--config",
                            str(cfg_path), "--include", "email", "--include", "full_name",
                            "--out", str(out)])
    assert r.exit_code == 0, r.output
    listed = pd.read_csv(out, dtype=str)
    assert list(listed.columns) == ["cust_id", "churn_probability", "risk_band", "segment",
                                    "email", "full_name"]
    assert len(listed) == len(risks) == 120
    assert listed["churn_probability"].astype(float).is_monotonic_decreasing
    by_id = frame.assign(cust_id=frame["cust_id"].str.strip()).set_index("cust_id")
    for _, row in listed.iterrows():  # each pseudonym led back to its own customer's row
        assert by_id.loc[row["cust_id"].strip(), "email"] == row["email"]
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert "C0000" not in r.output and "@" not in r.output  # the terminal shows counts only


def test_band_filter_and_customers_gone_since_scoring(
    write_firm: Callable[..., Path], tmp_path: Path
) -> None:
    cfg_path = write_firm(make_customers(100))
    prepare(load_firm_config(cfg_path))
    risks = _risk_list(cfg_path, tmp_path / "risks.csv")
    write_firm(make_customers(90))  # ten customers left the export since it was scored
    cfg = load_firm_config(cfg_path)
    listed, gone = contact_list(cfg, risks, bands=["high"])
    assert set(listed["risk_band"]) == {"high"}
    assert len(listed) + gone == (risks["risk_band"] == "high").sum()


def test_a_list_scored_under_a_rotated_key_is_refused(
    write_firm: Callable[..., Path], tmp_path: Path
) -> None:
    cfg_path = write_firm(make_customers(60))
    prepare(load_firm_config(cfg_path))
    risks = _risk_list(cfg_path, tmp_path / "risks.csv")
    cfg = load_firm_config(cfg_path)
    rotate_key(cfg.firm.keys_dir, KeyKind.PSEUDONYM)
    with pytest.raises(ConfigError, match="rotated"):
        contact_list(cfg, risks)


@pytest.mark.parametrize(
    ("args", "expect"),
    [
        (["--include", "no_such_column"], "is not a column of the customers table"),
        (["--band", "urgent"], "--band must be one of"),
    ],
)
def test_bad_arguments_are_one_clear_line(
    write_firm: Callable[..., Path], tmp_path: Path, args: list[str], expect: str
) -> None:
    cfg_path = write_firm(make_customers(60))
    prepare(load_firm_config(cfg_path))
    _risk_list(cfg_path, tmp_path / "risks.csv")
    r = RUNNER.invoke(app, ["contact-list", "--risks", str(tmp_path / "risks.csv"),
                            "--config", str(cfg_path), "--out", str(tmp_path / "c.csv"), *args])
    assert r.exit_code != 0 and expect in r.output and "Traceback" not in r.output
    assert not (tmp_path / "c.csv").exists()


def test_a_file_that_is_not_a_risk_list_is_refused(
    write_firm: Callable[..., Path], tmp_path: Path
) -> None:
    cfg_path = write_firm(make_customers(60))
    raw = tmp_path / "raw.csv"
    pd.DataFrame({"customer_id": ["C000001"], "churn_probability": [0.9]}).to_csv(raw, index=False)
    r = RUNNER.invoke(app, ["contact-list", "--risks", str(raw), "--config", str(cfg_path)])
    assert r.exit_code != 0 and "other than fedcrm pseudonyms" in r.output
    assert "C000001" not in r.output
