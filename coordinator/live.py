"""The coordinator's live progress display, fed by a run's ``events.jsonl``.

On a terminal it is a live table; without one (``nohup``, systemd, a pipe) it prints one plain
line per event instead, so the progress is in the service's log. User text (firm names,
reasons) is never read as markup.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from fedcrm.coordinator.events import (
    FirmDropped,
    FirmsAdmitted,
    FirmStopped,
    RoundEvaluated,
    RoundStarted,
    RoundTrained,
    RunEvent,
    RunFinished,
    RunResumed,
    RunStarted,
    UpdateAccepted,
    UpdateLost,
    UpdateRejected,
    follow,
)


class RunDisplay:
    """Follows ``events.jsonl`` in a thread and renders round, firms, rejections, metrics, ε."""

    def __init__(self, events: Path, *, console: Console, title: str) -> None:
        self.events = events
        self.console = console
        self.title = title
        self.phase = "starting"
        self.round = 0
        self.rounds = 0
        self.firms: dict[str, dict[str, Any]] = {}
        self.notes: list[str] = []
        self.metrics: dict[str, Any] = {}
        self.rejected = 0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._live: Live | None = None

    def _row(self, firm: str) -> dict[str, Any]:
        return self.firms.setdefault(firm, {"eps": 0.0, "cap": 0.0, "state": "ready", "auc": None})

    def handle(self, event: RunEvent) -> None:
        match event:
            case RunStarted():
                self.rounds = event.rounds
                self.phase = "federating"
            case FirmsAdmitted():
                for firm in event.firms:
                    self._row(firm)
            case RoundStarted():
                self.round = event.round
                for firm in event.firms:
                    self._row(firm)["state"] = "training"
            case RoundTrained():
                for firm, eps in event.epsilon.items():
                    row = self._row(firm)
                    row["eps"] = eps
                    row["cap"] = event.epsilon_cap.get(firm, row["cap"])
                    if row["state"] == "training":
                        row["state"] = "ok"
                for firm in event.dropped:
                    self._row(firm)["state"] = "dropped"
            case UpdateRejected():
                self.rejected += 1
                self.notes.append(
                    f"round {event.round}: rejected update from {event.firm}: {event.reason}"
                )
            case FirmStopped():
                self._row(event.firm)["state"] = "stopped"
                self.notes.append(f"{event.firm} stops participating: {event.detail}")
            case FirmDropped():
                self._row(event.firm)["state"] = "stopped"
                self.notes.append(f"round {event.round}: {event.firm} dropped: {event.reason}")
            case RunResumed():
                self.phase = f"resumed after round {event.completed_round}"
                self.notes.append(f"attempt {event.attempt + 1} resumes after round "
                                  f"{event.completed_round}")
            case UpdateAccepted() if event.replayed:
                self.notes.append(f"round {event.round}: {event.firm} resent its update (no new "
                                  "charge)")
            case UpdateLost():
                self.notes.append(f"round {event.round}: {event.firm} was charged for an update "
                                  "that never arrived")
            case RoundEvaluated():
                self.metrics = dict(event.pooled)
                for firm, m in event.per_firm.items():
                    self._row(firm)["auc"] = m.get("auc")
            case RunFinished():
                self.phase = f"finished ({event.status})"
                if event.reason:
                    self.notes.append(event.reason)
            case _:
                pass

    def render(self) -> Group:
        head = Text.assemble(
            (f"{self.title}  ", "bold"),
            f"round {self.round}/{self.rounds}  ",
            f"firms {sum(1 for r in self.firms.values() if r['state'] in ('ok', 'training'))}"
            f"/{len(self.firms)} reporting  ",
            f"rejected updates {self.rejected}  ",
            (self.phase, "cyan"),
        )
        metric_text = "  ".join(
            f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
            for k, v in self.metrics.items()
            if not isinstance(v, (list, dict))
        )
        table = Table(expand=False)
        for col in ("firm", "state", "ε spent / budget", "AUC (own test)"):
            table.add_column(col)
        for firm, row in sorted(self.firms.items()):
            cap = row["cap"] or 0.0
            bar = f"{row['eps']:.3f} / {cap:.3f}" if cap else f"{row['eps']:.3f}"
            a = row["auc"]
            table.add_row(Text(firm), row["state"], bar, "-" if a is None else f"{a:.4f}")
        notes = Text("\n".join(self.notes[-5:]), style="yellow")  # Text: never markup
        return Group(
            head, Text(metric_text or "metrics: (after the first evaluation)"), table, notes
        )

    def line(self, event: RunEvent) -> str | None:
        """The event as one plain progress line (for a log without a terminal)."""
        match event:
            case RunStarted():
                return f"{self.title}: {event.rounds} rounds, {event.task}, {event.strategy}"
            case FirmsAdmitted():
                return f"firms admitted: {', '.join(sorted(event.firms)) or 'none'}"
            case RoundTrained():
                eps = ", ".join(f"{f} ε={e:.3f}" for f, e in sorted(event.epsilon.items()))
                dropped = f"; dropped {', '.join(event.dropped)}" if event.dropped else ""
                return (f"[ROUND {event.round}/{self.rounds}] trained: {len(event.accepted)} "
                        f"updates{dropped}; {eps}")
            case RoundEvaluated() if event.per_firm:
                return f"round {event.round} evaluated: " + "  ".join(
                    f"{k}={v:.4f}" for k, v in event.pooled.items()
                    if isinstance(v, float)
                )
            case RunFinished():
                return f"finished: {event.status}" + (f" ({event.reason})" if event.reason else "")
            case _:
                pass
        return None

    def _run(self) -> None:
        for ev in follow(self.events, poll=0.25, stop=self._done.is_set):
            notes = len(self.notes)
            self.handle(ev)
            if self._live is not None:
                self._live.update(self.render())
                continue
            line = self.line(ev)
            for text in ([line] if line else []) + self.notes[notes:]:
                self.console.print(Text(text), highlight=False, soft_wrap=True)

    def __enter__(self) -> RunDisplay:
        if self.console.is_terminal:
            self._live = Live(
                self.render(), console=self.console, refresh_per_second=4, transient=False
            )
            self._live.__enter__()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join(timeout=5)
        if self._live is not None:
            self._live.update(self.render())
            self._live.__exit__(None, None, None)


def print_run_summary(console: Console, summary: dict[str, Any], run_dir: Path) -> None:
    """A finished run's ``summary.json`` as a table: ε per firm, pooled metrics, baseline."""
    t = Table(
        title=Text(f"run {summary['run_id']} ({summary['task']}, {summary['strategy']}, "
                   f"{summary.get('rounds_completed', '?')}/{summary['rounds']} rounds, "
                   f"{summary.get('status')})")
    )
    for col in ("firm", "ε spent", "ε budget", "δ", "declared size", "stopped"):
        t.add_column(col)
    for f in summary["firms"]:
        t.add_row(
            Text(f["firm"]),
            f"{f['epsilon']:.4f}",
            f"{f['epsilon_budget']:.4f}",
            f"{f['delta']:g}" if f.get("delta") else "-",
            str(f["num_examples"]),
            Text(f.get("stopped") or ""),
        )
    console.print(t)

    def plain(values: dict[str, Any]) -> str:
        return ", ".join(
            f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
            for k, v in values.items()
            if not isinstance(v, (list, dict))
        )

    pooled = summary.get("metrics", {}).get("pooled", {})
    if pooled:
        console.print("pooled metrics: " + plain(pooled))
    if summary.get("baseline"):
        console.print("baseline: " + plain(summary["baseline"]))
        for key in ("bgnbd", "federated"):
            if isinstance(summary["baseline"].get(key), dict):
                console.print(f"  {key}: " + plain(summary["baseline"][key]))
    for label, key in (("lost (charged, never received)", "lost_updates"),
                       ("resent after a restart (no new charge)", "replayed_updates")):
        if summary.get(key):
            console.print(Text(f"updates {label}: " + ", ".join(
                f"{u['firm']} round {u['round']}" for u in summary[key]
            )), highlight=False)
    if summary.get("stop_reason"):
        console.print(Text(str(summary["stop_reason"]), style="yellow"), highlight=False)
    console.print(Text(f"summary: {run_dir / 'summary.json'}   model: {summary.get('model')}"),
                  highlight=False, soft_wrap=True)
