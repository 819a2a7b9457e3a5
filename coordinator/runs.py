"""Past runs on the coordinator's disk: ``runs/<run-id>/summary.json`` and the saved model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from fedcrm.coordinator.events import EVENTS, RoundTrained, RunStarted, read_run_events
from fedcrm.coordinator.run_config import RunConfig
from fedcrm.learning.settings import ChurnModelKind
from fedcrm.privacy.durable import write_atomic
from fedcrm.privacy.errors import ConfigError

SUMMARY = "summary.json"
MODEL = "model.pt"
TREES_MODEL = "model.json"  # a tree ensemble (fedcrm.learning.dp_trees), plain JSON


def new_run_id(prefix: str) -> str:
    import secrets
    import time

    return f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"


def write_summary(run_dir: Path, summary: dict[str, Any]) -> Path:
    path = run_dir / SUMMARY
    text = json.dumps(summary, indent=2, sort_keys=False, default=_plain) + "\n"
    write_atomic(path, text.encode(), mode=0o600)  # names firms and their budgets
    return path


def _plain(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


def save_global_model(
    run_dir: Path, cfg: RunConfig, arrays: list[np.ndarray], provenance: dict[str, Any]
) -> Path:
    """Save the global model with provenance (config hash, version, firms, rounds, ε, metrics)."""
    from fedcrm.tasks import task_for  # torch: only when a model is saved

    name = TREES_MODEL if cfg.model is ChurnModelKind.TREES else MODEL
    return task_for(cfg.task).save_model(run_dir / name, arrays, provenance)


def load_summary(run_dir: Path) -> dict[str, Any]:
    path = run_dir / SUMMARY
    if not path.exists():
        raise ConfigError(f"{path} not found: not a finished fedcrm run")
    try:
        data: dict[str, Any] = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ConfigError(f"{path} is damaged (not JSON); the run's other files are intact, "
                          "see its events.jsonl") from None
    if not isinstance(data, dict) or not isinstance(data.get("run_id"), str):
        raise ConfigError(f"{path} is damaged (not an object with a run_id); the run's other "
                          "files are intact, see its events.jsonl")
    return data


def list_runs(root: Path) -> list[dict[str, Any]]:
    """Every run under ``root``: finished ones from their summary, the others (still running,
    or stopped without a summary) from their events, with status ``running or interrupted``."""
    if not root.exists():
        return []
    runs = []
    for d in sorted(p for p in root.iterdir() if p.is_dir()):
        if (d / SUMMARY).exists():
            try:
                runs.append(load_summary(d) | {"_dir": str(d)})
            except (json.JSONDecodeError, ConfigError):
                continue
        elif (d / EVENTS).exists():
            runs.append(_unfinished(d))
    return runs


def _unfinished(run_dir: Path) -> dict[str, Any]:
    events = read_run_events(run_dir / EVENTS)
    started = next((e for e in events if isinstance(e, RunStarted)), None)
    trained = [e.round for e in events if isinstance(e, RoundTrained)]
    return {
        "run_id": run_dir.name,
        "task": started.task if started else "?",
        "strategy": started.strategy if started else "?",
        "rounds": started.rounds if started else "?",
        "rounds_completed": max(trained, default=0),
        "status": "running or interrupted",
        "firms": [],
        "_dir": str(run_dir),
    }


def find_run(root: Path, run_id: str) -> Path:
    direct = root / run_id
    if (direct / SUMMARY).exists():
        return direct
    matches = (
        [d for d in root.glob(f"{run_id}*") if (d / SUMMARY).exists()] if root.exists() else []
    )
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise ConfigError(f"no run '{run_id}' under {root}; see `fedcrm runs list`")
    raise ConfigError(f"'{run_id}' matches {len(matches)} runs under {root}; give more of the id")
