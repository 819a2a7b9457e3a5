"""Turn the public datasets into partner firms' own files and configs.

The public Telco data has no contact details, so each simulated firm's export gets synthetic,
seeded PII columns (names in Latin and Chinese script, e-mail, mainland-China mobile numbers,
birth dates, postcodes) to exercise detection and masking the way a real CRM export would. They
are generated, not real people. CDNOW already is a transactions table.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import tomli_w

from fedcrm.simulations.datasets import (
    CDNOW_CALIBRATION_END,
    CDNOW_HOLDOUT_END,
    TELCO_BOOLEAN,
    TELCO_CANONICAL,
    TELCO_CATEGORICAL,
    TELCO_NUMERIC,
)

_LATIN_FIRST = (
    "James",
    "Mary",
    "Robert",
    "Linda",
    "David",
    "Sarah",
    "Carlos",
    "Aisha",
    "Wei",
    "Olga",
)
_LATIN_LAST = ("Smith", "Johnson", "Garcia", "Brown", "Miller", "Davis", "Lopez", "Wilson", "Khan")
_CN_SURNAME = ("王", "李", "张", "刘", "陈", "杨", "黄", "赵", "吴", "周")
_CN_GIVEN = ("伟", "芳", "娜", "秀英", "敏", "静", "丽", "强", "磊", "军", "洋", "艳")


def synthetic_contacts(
    n: int, *, rng: np.random.Generator, chinese_share: float = 0.3
) -> pd.DataFrame:
    """Seeded fake contact details for ``n`` customers (no real person)."""
    chinese = rng.random(n) < chinese_share
    latin = [
        f"{_LATIN_FIRST[a]} {_LATIN_LAST[b]}"
        for a, b in zip(
            rng.integers(0, len(_LATIN_FIRST), n), rng.integers(0, len(_LATIN_LAST), n), strict=True
        )
    ]
    han = [
        _CN_SURNAME[a] + _CN_GIVEN[b]
        for a, b in zip(
            rng.integers(0, len(_CN_SURNAME), n), rng.integers(0, len(_CN_GIVEN), n), strict=True
        )
    ]
    names = np.where(chinese, han, latin)
    local = [f"user{k:07d}" for k in rng.integers(0, 10_000_000, n)]
    emails = [
        f"{u}@example.{d}" for u, d in zip(local, rng.choice(["com", "cn", "org"], n), strict=True)
    ]
    prefixes = rng.choice(["138", "139", "150", "186", "177"], n)
    phones = [
        f"{p}-{a:04d}-{b:04d}"
        for p, a, b in zip(
            prefixes, rng.integers(0, 10_000, n), rng.integers(0, 10_000, n), strict=True
        )
    ]
    birth = pd.Timestamp("1940-01-01") + pd.to_timedelta(rng.integers(0, 365 * 60, n), unit="D")
    postcodes = [f"{k:06d}" for k in rng.integers(100_000, 999_999, n)]
    return pd.DataFrame(
        {
            "name": names,
            "email": emails,
            "phone": phones,
            "birth_date": birth.strftime("%Y-%m-%d"),
            "postcode": postcodes,
        }
    )


def telco_export(telco: pd.DataFrame, *, seed: int) -> pd.DataFrame:
    """A firm's CRM export of Telco customers: the real columns plus synthetic contacts."""
    rng = np.random.default_rng(seed)
    contacts = synthetic_contacts(len(telco), rng=rng)
    export = telco.reset_index(drop=True).copy()
    export["total_charges"] = export["total_charges"].map(
        lambda v: "" if pd.isna(v) else f"{v:.2f}"
    )
    return pd.concat([export.iloc[:, :1], contacts, export.iloc[:, 1:]], axis=1)


def public_size(customers: int) -> int:
    """A firm's declared public size for ``customers``: rounded up to two significant digits
    (a firm reveals roughly how big it is, never its exact count)."""
    if customers < 1:
        return 1
    scale = 10 ** max(len(str(customers)) - 2, 0)
    return -(-customers // scale) * scale


def _firm_section(
    firm: str, keys_dir: Path, store_dir: Path, audit_log: str | None
) -> dict[str, Any]:
    section: dict[str, Any] = {
        "name": firm, "keys_dir": str(keys_dir), "store_dir": str(store_dir)
    }
    if audit_log is not None:
        section["audit_log"] = audit_log
    return section


def _federation_section(size: int | None) -> dict[str, Any]:
    return {} if size is None else {"federation": {"public_size": size}}


def telco_firm_config(
    *,
    firm: str,
    csv_path: Path,
    keys_dir: Path,
    store_dir: Path,
    epsilon: float,
    delta: float,
    encoding: str = "utf-8",
    training: dict[str, Any] | None = None,
    public_size: int | None = None,
    audit_log: str | None = "audit.jsonl",
) -> dict[str, Any]:
    columns: dict[str, Any] = {
        "customer_id": {"role": "id"},
        "name": {"role": "pii", "pii": "name", "policy": "pseudonymize"},
        "email": {"role": "pii", "pii": "email", "policy": "partial"},
        "phone": {"role": "pii", "pii": "phone", "policy": "partial"},
        "birth_date": {"role": "pii", "pii": "birth_date", "policy": "generalize"},
        "postcode": {"role": "pii", "pii": "postcode", "policy": "generalize", "prefix_len": 3},
        "churn": {"role": "label", "true_values": ["Yes"], "false_values": ["No"]},
    }
    for name in TELCO_BOOLEAN:
        columns[name] = {"role": "feature", "kind": "boolean"}
    for name, (low, high) in TELCO_NUMERIC.items():
        columns[name] = {"role": "feature", "kind": "numeric", "min": low, "max": high}
    for name, canonical in TELCO_CANONICAL.items():  # canonical names, used by CRM features
        columns[name]["name"] = canonical
    for name, cats in TELCO_CATEGORICAL.items():
        columns[name] = {"role": "feature", "kind": "categorical", "categories": list(cats)}
    cfg: dict[str, Any] = {
        "firm": _firm_section(firm, keys_dir, store_dir, audit_log),
        "budget": {"epsilon": epsilon, "delta": delta},
        **_federation_section(public_size),
        "validation": {"max_quarantine_fraction": 0.05},
        "tables": {
            "customers": {
                "source": {"kind": "csv", "path": str(csv_path), "encoding": encoding},
                "columns": columns,
            }
        },
    }
    if training:
        cfg["training"] = training
    return cfg


def cdnow_firm_config(
    *,
    firm: str,
    csv_path: Path,
    keys_dir: Path,
    store_dir: Path,
    epsilon: float,
    delta: float,
    training: dict[str, Any] | None = None,
    public_size: int | None = None,
    audit_log: str | None = "audit.jsonl",
) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "firm": _firm_section(firm, keys_dir, store_dir, audit_log),
        "budget": {"epsilon": epsilon, "delta": delta},
        **_federation_section(public_size),
        "features": {
            "as_of": CDNOW_CALIBRATION_END.date().isoformat(),
            "holdout_end": CDNOW_HOLDOUT_END.date().isoformat(),
            "churn_cutoff": "1997-06-30",
            "churn_horizon_days": 90,
        },
        "tables": {
            "transactions": {
                "source": {"kind": "csv", "path": str(csv_path)},
                "columns": {
                    "customer_id": {"role": "id"},
                    "date": {"role": "timestamp", "format": "%Y%m%d"},
                    "number_of_cds": {
                        "role": "feature",
                        "name": "quantity",
                        "kind": "numeric",
                        "min": 0,
                        "max": 1000,
                    },
                    "dollar_value": {
                        "role": "feature",
                        "name": "amount",
                        "kind": "numeric",
                        "min": 0,
                        "max": 10000,
                    },
                },
            }
        },
    }
    # Trend-model settings from benchmarks/trend.py (DP, ε = 1, chosen on its validation window
    # inside the calibration period): large batches, 20 epochs, C = 5.
    cfg["training"] = training or {
        "epochs": 20, "batch_size": 4096, "learning_rate": 0.1, "max_grad_norm": 5.0,
        "optimizer": "adam",
    }
    return cfg


def cdnow_export(tx: pd.DataFrame) -> pd.DataFrame:
    """CDNOW transactions in the original file's column names and date format."""
    return pd.DataFrame(
        {
            "customer_id": tx["customer_id"],
            "date": tx["timestamp"].dt.strftime("%Y%m%d"),
            "number_of_cds": tx["quantity"].astype(int),
            "dollar_value": tx["amount"].map(lambda v: f"{v:.2f}"),
        }
    )


def write_toml(path: Path, data: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(tomli_w.dumps(data), encoding="utf-8")
    return path
