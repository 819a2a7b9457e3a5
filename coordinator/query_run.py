"""A coordinator's analytics query run: ``query.toml``, its Flower run config, its results.

``query.toml`` holds one ``[query]`` (:class:`fedcrm.analytics.spec.QuerySpec`) and either a
``[simulation]`` (public data split into partner firms, run in Flower's simulation engine) or
nothing more (the query goes to the running federation of ``--coordinator``). An optional
``[coordinator]`` section sets how long to wait for firms.

Results land in ``runs/<query-id>/``: ``result.json`` (every estimate with its noise standard
deviation and 95% interval, the firms that answered and what each spent), ``result.md`` (the same
as a table), figures (``retention.png``, ``weekly_trend.png``, bar charts with interval whiskers
for grouped queries), ``events.jsonl`` and the signed federation log.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from fedcrm.analytics.estimates import Estimate
from fedcrm.analytics.spec import QueryKind, QuerySpec
from fedcrm.config_file import load_toml, validate
from fedcrm.privacy.durable import write_atomic
from fedcrm.protocol import flat_decode, flat_encode

RESULT_JSON = "result.json"
SUMMARY = "summary.json"  # the name fedcrm.coordinator.runs lists runs by
RESULT_TABLE = "result.md"


class QueryCoordination(BaseModel):
    """``[coordinator]`` of a query file: how the coordinator runs the query."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    wait_for_firms: float = Field(default=60.0, ge=0, description="seconds to wait for firms")
    expected_firms: int = Field(
        default=0, ge=0, description="wait (up to wait_for_firms) for this many firms; 0 = "
        "start once min_firms are connected (a simulation sets its number of firms)"
    )
    timeout: float = Field(default=120.0, gt=0, description="seconds to wait for answers")
    secure_sum: bool = Field(
        default=False,
        description="sum the firms' answers with the secure sum (each firm adds its share of "
        "the noise; the coordinator sees only the total)",
    )
    secure_sum_neighbours: int = Field(
        default=0, ge=0, description="secure sum: peers each firm masks against (0: all; e.g. "
        "20 for 100+ firms)",
    )
    seed: int | None = Field(default=None, description="seed of the bootstrap intervals")

    @property
    def min_firms(self) -> int:  # for the shared wait-for-nodes helper
        return 1


class QueryRunConfig(BaseModel):
    """What the ServerApp receives for a query: the query and how to coordinate it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    query: QuerySpec
    coordinator: QueryCoordination = QueryCoordination()

    @model_validator(mode="after")
    def _secure_needs_two(self) -> QueryRunConfig:
        if self.coordinator.secure_sum and self.query.min_firms < 2:
            raise ValueError("a secure-sum query needs min_firms >= 2 (the sum of one firm is "
                             "its answer)")
        return self

    def to_flower(self, *, run_id: str, run_dir: Path) -> dict[str, str | int | float | bool]:
        values: dict[str, Any] = {
            "query_spec": self.query.canonical_json(),
            "query_coordinator": self.coordinator.model_dump_json(),
            "run_id": run_id, "run_dir": str(run_dir),
        }
        return flat_encode(values)

    @staticmethod
    def is_query(flat: dict[str, Any]) -> bool:
        return "query-spec" in flat

    @classmethod
    def from_flower(cls, flat: dict[str, Any]) -> tuple[QueryRunConfig, str, Path]:
        values = flat_decode(flat)
        run_dir = Path(str(values.get("run_dir", "runs/unnamed-query")))
        cfg = validate(cls, {
            "query": json.loads(str(values["query_spec"])),
            "coordinator": json.loads(str(values.get("query_coordinator", "{}"))),
        }, where="Flower run config")
        return cfg, str(values.get("run_id") or run_dir.name), run_dir


class QueryFileConfig(BaseModel):
    """``query.toml``: ``[query]``, optional ``[coordinator]`` and optional ``[simulation]``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    query: QuerySpec
    coordinator: QueryCoordination = QueryCoordination()
    simulation: dict[str, Any] | None = None  # parsed by the simulation harness

    @model_validator(mode="after")
    def _secure_needs_two(self) -> QueryFileConfig:
        self.run_config()
        return self

    def run_config(self) -> QueryRunConfig:
        return QueryRunConfig(query=self.query, coordinator=self.coordinator)


def load_query_file(path: Path) -> QueryFileConfig:
    return load_toml(Path(path), QueryFileConfig, what="query file")


# ------------------------------------------------------------------------------ results


def result_hash(estimates: list[Estimate]) -> str:
    data = json.dumps([e.to_json() for e in estimates], sort_keys=True).encode()
    return hashlib.sha256(data).hexdigest()


def _fmt(value: float | None, digits: int = 4) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}g}"


def result_table(spec: QuerySpec, estimates: list[Estimate]) -> str:
    """A Markdown table of the estimates (what ``fedcrm query`` prints and ``result.md`` holds)."""
    lines = [
        "| group | statistic | estimate | noise sd | 95% interval |",
        "|---|---|---|---|---|",
    ]
    for e in estimates:
        interval = ("suppressed" if e.suppressed
                    else f"[{_fmt(e.ci_low)}, {_fmt(e.ci_high)}]" if e.ci_low is not None else "-")
        lines.append(f"| {e.group} | {e.statistic} | {_fmt(e.estimate)} | {_fmt(e.noise_std)} "
                     f"| {interval} |")
    return "\n".join(lines) + "\n"


def write_result(run_dir: Path, result: dict[str, Any], spec: QuerySpec,
                 estimates: list[Estimate]) -> dict[str, str]:
    """Write result.json, result.md and the figures; returns the files written."""
    run_dir.mkdir(parents=True, exist_ok=True)
    files = {"json": str(run_dir / RESULT_JSON), "table": str(run_dir / RESULT_TABLE)}
    figures = write_figures(run_dir, spec, estimates) if estimates else {}
    files.update(figures)
    text = (json.dumps({**result, "files": files}, indent=2) + "\n").encode()
    write_atomic(run_dir / RESULT_JSON, text, mode=0o644)
    write_atomic(run_dir / SUMMARY, text, mode=0o644)  # so `fedcrm runs list` shows queries
    header = (f"# Query {spec.name} ({spec.kind.value}), ε = {spec.epsilon:g} per firm\n\n"
              f"Answered by {len(result.get('answered_by', []))} firm(s); status "
              f"{result.get('status')}. Intervals cover the DP noise only.\n\n")
    write_atomic(run_dir / RESULT_TABLE, (header + result_table(spec, estimates)).encode(),
                 mode=0o644)
    return files


def write_figures(run_dir: Path, spec: QuerySpec, estimates: list[Estimate]) -> dict[str, str]:
    """matplotlib figures with 95% interval bands / whiskers (suppressed groups left out)."""
    from matplotlib.figure import Figure

    shown = [e for e in estimates if not e.suppressed and e.estimate is not None]
    if not shown:
        return {}
    fig = Figure(figsize=(7.5, 3.6))
    ax = fig.add_subplot()
    if spec.kind in (QueryKind.RETENTION, QueryKind.WEEKLY_TREND):
        name = "retention" if spec.kind is QueryKind.RETENTION else "weekly_trend"
        curves: dict[str, list[Estimate]] = {}
        for e in shown:
            cohort, _, _week = e.group.rpartition("week ")
            curves.setdefault(cohort.rstrip(", "), []).append(e)
        colors = ["#1f5fbf", "#c0392b", "#27ae60", "#8e44ad", "#d35400", "#16a085"]
        for i, (label, points) in enumerate(curves.items()):
            color = colors[i % len(colors)]
            weeks = [int(e.group.rpartition("week ")[2]) for e in points]
            ax.fill_between(weeks, [e.ci_low if e.ci_low is not None else np.nan for e in points],
                            [e.ci_high if e.ci_high is not None else np.nan for e in points],
                            alpha=0.2, color=color)
            ax.plot(weeks, [float(e.estimate or 0.0) for e in points], marker="o",
                    markersize=2, color=color, label=label or "estimate (band: 95% interval)")
        if len(curves) > 1 or next(iter(curves)):
            ax.legend(fontsize=7)
        ax.set_xlabel("week of customer lifetime" if name == "retention" else "week")
        ax.set_ylabel("share still active" if name == "retention" else "purchase days")
        if name == "retention":
            ax.set_ylim(0, 1.02)
    else:
        name = f"{spec.kind.value}"
        primary = _primary_statistic(spec, shown)
        picked = [e for e in shown if e.statistic == primary] or shown
        labels = [f"{e.group}\n{e.statistic}" if primary is None else e.group for e in picked]
        heights = np.asarray([float(e.estimate or 0.0) for e in picked], dtype=np.float64)
        lows = np.asarray([e.ci_low if e.ci_low is not None else np.nan for e in picked])
        highs = np.asarray([e.ci_high if e.ci_high is not None else np.nan for e in picked])
        err = np.nan_to_num(np.stack([heights - lows, highs - heights]), nan=0.0)
        ax.bar(range(len(picked)), heights, yerr=np.maximum(err, 0), capsize=3, color="#1f5fbf",
               alpha=0.8)
        ax.set_xticks(range(len(picked)), labels, fontsize=7, rotation=30 if len(picked) > 4
                      else 0)
        ax.set_ylabel(primary or "estimate")
    ax.set_title(f"{spec.name} (ε = {spec.epsilon:g} per firm; 95% intervals of the DP noise)",
                 fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = run_dir / f"{name}.png"
    fig.savefig(path, dpi=110)
    return {"figure": str(path)}


def _primary_statistic(spec: QuerySpec, shown: list[Estimate]) -> str | None:
    wanted = {
        QueryKind.CHURN_RATE: "churn_rate", QueryKind.MEAN: "mean", QueryKind.SUM: "sum",
        QueryKind.COUNT: "count", QueryKind.SEGMENT_SIZES: "customers",
    }.get(spec.kind)
    if wanted is not None:
        return wanted
    return None
