"""Shared fixtures: small generated firms (no real data), keys in temp dirs."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import tomli_w

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")

PLANS = ("basic", "plus", "premium")


def make_customers(n: int, *, seed: int = 0) -> pd.DataFrame:
    """Synthetic CRM customers export with PII-looking columns (all generated)."""
    rng = np.random.default_rng(seed)
    first = np.array(["Anna", "Ben", "Chloe", "Dmitri", "Elena", "Farid", "Grace", "Hugo"])
    last = np.array(["Meyer", "Okafor", "Rossi", "Tanaka", "Novak", "Silva", "Berg"])
    monthly = rng.uniform(10, 110, n).round(2)
    tenure = rng.integers(1, 72, n)
    churn_p = 1 / (1 + np.exp(-(0.03 * monthly - 0.05 * tenure)))
    return pd.DataFrame(
        {
            "cust_id": [f"C{i:06d}" for i in range(n)],
            "full_name": [
                f"{a} {b}" for a, b in zip(rng.choice(first, n), rng.choice(last, n), strict=True)
            ],
            "email": [f"person{i}@mail.example.com" for i in range(n)],
            "phone": [f"139-{rng.integers(0, 10000):04d}-{i % 10000:04d}" for i in range(n)],
            "signup": (
                pd.Timestamp("2020-01-01") + pd.to_timedelta(rng.integers(0, 1500, n), "D")
            ).strftime("%Y-%m-%d"),
            "plan": rng.choice(PLANS, n),
            "tenure": tenure.astype(str),
            "monthly": [f"{v:.2f}" for v in monthly],
            "churned": np.where(rng.random(n) < churn_p, "Yes", "No"),
            "notes": ["free text"] * n,
        }
    )


def customers_columns() -> dict[str, Any]:
    return {
        "cust_id": {"role": "id"},
        "full_name": {"role": "pii", "pii": "name", "policy": "pseudonymize"},
        "email": {"role": "pii", "pii": "email", "policy": "partial"},
        "phone": {"role": "pii", "pii": "phone", "policy": "partial"},
        "signup": {"role": "timestamp"},
        "plan": {"role": "feature", "kind": "categorical", "categories": list(PLANS)},
        "tenure": {
            "role": "feature",
            "name": "tenure_months",
            "kind": "numeric",
            "min": 0,
            "max": 120,
        },
        "monthly": {
            "role": "feature",
            "name": "monthly_charges",
            "kind": "numeric",
            "min": 0,
            "max": 200,
        },
        "churned": {"role": "label", "true_values": ["Yes"], "false_values": ["No"]},
        "notes": {"role": "drop"},
    }


@pytest.fixture
def write_firm(tmp_path: Path) -> Callable[..., Path]:
    """Write a firm (CSV + TOML config + keys) into tmp_path; returns the config path."""
    from fedcrm.privacy.keys import init_keys

    def _write(
        frame: pd.DataFrame | None = None,
        *,
        firm: str = "acme",
        columns: dict[str, Any] | None = None,
        source: dict[str, Any] | None = None,
        csv_kwargs: dict[str, Any] | None = None,
        extra: dict[str, Any] | None = None,
        keys: bool = True,
    ) -> Path:
        root = tmp_path / firm
        root.mkdir(exist_ok=True)
        frame = make_customers(300) if frame is None else frame
        data = root / "customers.csv"
        frame.to_csv(data, index=False, **(csv_kwargs or {}))
        cfg: dict[str, Any] = {
            "firm": {"name": firm, "keys_dir": "keys", "store_dir": "store"},
            "budget": {"epsilon": 2.0, "delta": 1e-5},
            # a short explicit DP-SGD run: these firms test the budget, the store and the CLI, not
            # the training defaults (tests/test_dp_engine.py and test_starter_config_cn.py do)
            "training": {"epochs": 2, "batch_size": 64},
            "tables": {
                "customers": {
                    "source": source or {"kind": "csv", "path": "customers.csv"},
                    "columns": columns or customers_columns(),
                }
            },
        }
        for k, v in (extra or {}).items():
            cfg[k] = v
        path = root / "firm.toml"
        path.write_text(tomli_w.dumps(cfg), encoding="utf-8")
        if keys and not (root / "keys" / "keys.json").exists():
            init_keys(root / "keys", firm=firm)
        return path

    return _write


def processes_under(root: Path) -> list[str]:
    """Live processes whose environment or command line mentions ``root`` (ours only)."""
    needle = str(root).encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            state = (entry / "stat").read_text().rsplit(")", 1)[-1].split()[0]
            environ = (entry / "environ").read_bytes()
            cmdline = (entry / "cmdline").read_bytes()
        except (OSError, IndexError):
            continue
        if state != "Z" and (needle in environ or needle in cmdline):
            command = cmdline.replace(b"\0", b" ").decode(errors="replace")[:120]
            found.append(f"{entry.name}: {command}")
    return found


def assert_all_gone(root: Path, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while (left := processes_under(root)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left, f"processes left running: {left}"


@pytest.fixture
def coordinator_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The coordinator's signing key in the environment, and the ServerApp's task identity
    (which Flower sets in a real ServerApp process) for the messages it builds."""
    from flwr.supercore.task_identity import TaskIdentity

    from fedcrm.privacy.keys import ENV_COORDINATOR_KEY, write_signing_key

    for name, value in (("_run_id", 1), ("_task_id", 1), ("_node_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)
    key = tmp_path / "coordinator" / "signing.key"
    write_signing_key(key)
    monkeypatch.setenv(ENV_COORDINATOR_KEY, str(key))
    return key
