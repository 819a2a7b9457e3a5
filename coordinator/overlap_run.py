"""A coordinator's customer-overlap count: ``overlap.toml``, its Flower run config, its result.

``overlap.toml`` holds one ``[overlap]`` (:class:`fedcrm.analytics.overlap.OverlapSpec`), an
optional ``[coordinator]`` (how long to wait for firms and answers) and either a
``[simulation]`` (two simulated firms that share a known number of customers, run in Flower's
simulation engine) or nothing more (the count runs on the federation of ``--coordinator``).

Results land in ``runs/<overlap-id>/``: ``result.json`` (the noisy count, its noise standard
deviation and 95% interval, what each firm spent, the sizes and hashes of what each sent),
``result.md``, ``events.jsonl`` and the signed federation log.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from fedcrm.analytics.overlap import OverlapSpec
from fedcrm.config_file import load_toml, validate
from fedcrm.privacy.durable import write_atomic
from fedcrm.protocol import flat_decode, flat_encode

RESULT_JSON = "result.json"
SUMMARY = "summary.json"  # the name fedcrm.coordinator.runs lists runs by
RESULT_TABLE = "result.md"
#: z of a two-sided 95% interval of the (Gaussian) noise.
Z95 = 1.959963984540054


class OverlapCoordination(BaseModel):
    """``[coordinator]`` of an overlap file."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    wait_for_firms: float = Field(default=60.0, ge=0, description="seconds to wait for firms")
    expected_firms: int = Field(
        default=0, ge=0, description="wait (up to wait_for_firms) for this many connected "
        "firms; 0 = start once two are connected"
    )
    timeout: float = Field(default=600.0, gt=0, description="seconds to wait for each step")


class OverlapRunConfig(BaseModel):
    """What the ServerApp receives for an overlap: the spec and how to coordinate it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    overlap: OverlapSpec
    coordinator: OverlapCoordination = OverlapCoordination()

    def to_flower(self, *, run_id: str, run_dir: Path) -> dict[str, str | int | float | bool]:
        return flat_encode({
            "overlap_spec": self.overlap.canonical_json(),
            "overlap_coordinator": self.coordinator.model_dump_json(),
            "run_id": run_id, "run_dir": str(run_dir),
        })

    @staticmethod
    def is_overlap(flat: dict[str, Any]) -> bool:
        return "overlap-spec" in flat

    @classmethod
    def from_flower(cls, flat: dict[str, Any]) -> tuple[OverlapRunConfig, str, Path]:
        values = flat_decode(flat)
        run_dir = Path(str(values.get("run_dir", "runs/unnamed-overlap")))
        cfg = validate(cls, {
            "overlap": json.loads(str(values["overlap_spec"])),
            "coordinator": json.loads(str(values.get("overlap_coordinator", "{}"))),
        }, where="Flower run config")
        return cfg, str(values.get("run_id") or run_dir.name), run_dir


class OverlapFileConfig(BaseModel):
    """``overlap.toml``: ``[overlap]``, optional ``[coordinator]`` and ``[simulation]``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    overlap: OverlapSpec
    coordinator: OverlapCoordination = OverlapCoordination()
    simulation: dict[str, Any] | None = None  # parsed by the simulation harness

    def run_config(self) -> OverlapRunConfig:
        return OverlapRunConfig(overlap=self.overlap, coordinator=self.coordinator)


def load_overlap_file(path: Path) -> OverlapFileConfig:
    return load_toml(Path(path), OverlapFileConfig, what="overlap file")


def result_table(result: dict[str, Any]) -> str:
    """A Markdown table of the count (what ``fedcrm overlap`` prints and ``result.md`` holds)."""
    lines = ["| firms | estimate | noise sd | 95% interval |", "|---|---|---|---|"]
    if result.get("estimate") is not None:
        lines.append(
            f"| {' & '.join(result['firms'])} | {result['estimate']} | "
            f"{result['noise_std']:.3g} | [{result['ci_low']:.1f}, {result['ci_high']:.1f}] |"
        )
    return "\n".join(lines) + "\n"


def write_result(run_dir: Path, result: dict[str, Any]) -> dict[str, str]:
    """Write result.json (and summary.json, so ``fedcrm runs list`` shows it) and result.md."""
    run_dir.mkdir(parents=True, exist_ok=True)
    files = {"json": str(run_dir / RESULT_JSON), "table": str(run_dir / RESULT_TABLE)}
    text = (json.dumps({**result, "files": files}, indent=2) + "\n").encode()
    write_atomic(run_dir / RESULT_JSON, text, mode=0o644)
    write_atomic(run_dir / SUMMARY, text, mode=0o644)
    spec = result["overlap"]
    header = (f"# Overlap {spec['name']} ({spec['key']}), ε = {spec['epsilon']:g} per firm\n\n"
              f"Status {result.get('status')}. The interval covers the DP noise only.\n\n")
    write_atomic(run_dir / RESULT_TABLE, (header + result_table(result)).encode(), mode=0o644)
    return files
