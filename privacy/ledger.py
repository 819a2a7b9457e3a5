"""A firm's persistent privacy-budget ledger.

The ledger is a JSON Lines file (path chosen by the caller, e.g. ``<store>/budget.jsonl``); every
line is one :class:`~privacy.accounting.DpEvent` as written by ``DpEvent.to_json`` plus ``firm``
and an informational ``cumulative_epsilon``. The budget (ε cap, δ) lives beside it in
``<ledger>.budget.json`` with the history of its changes.

The events are the source of truth: ε spent is ALWAYS recomputed by RDP-composing every event at
the budget's δ (:func:`privacy.accounting.compose_epsilon`); ``cumulative_epsilon`` is never read
back. Spending is two steps, as in Google's ``dp_accounting``: :meth:`PrivacyLedger.would_exceed`
/ :meth:`PrivacyLedger.check` before any noise is drawn, then :meth:`PrivacyLedger.commit`, which
re-checks under an exclusive file lock and persists atomically (temp file, fsync, ``os.replace``,
fsync of the directory) before the noisy result may leave the process. A crash leaves either the
old or the new ledger, never a torn line; two processes committing at once cannot overspend.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fedcrm.privacy.accounting import DpEvent, FrozenMapping, compose_epsilon
from fedcrm.privacy.durable import locked, remove_stale_temps, write_private
from fedcrm.privacy.errors import BudgetExhausted, ConfigError, LedgerTampered

EPSILON_TOLERANCE = 1e-9
"""Float slack when comparing composed ε with the cap (an exact fit is allowed)."""

_BUDGET_SUFFIX = ".budget.json"


@dataclass(frozen=True)
class Budget:
    """A firm's total privacy budget: the ε cap over all its releases, at δ."""

    epsilon: float
    delta: float

    def __post_init__(self) -> None:
        eps, delta = self.epsilon, self.delta
        if isinstance(eps, bool) or not isinstance(eps, int | float) or not (
            math.isfinite(eps) and eps > 0
        ):
            raise ValueError(f"budget epsilon must be a finite number > 0, got {eps!r}")
        if isinstance(delta, bool) or not isinstance(delta, int | float) or not 0 < delta < 1:
            raise ValueError(f"budget delta must lie in (0, 1), got {delta!r}")
        object.__setattr__(self, "epsilon", float(eps))
        object.__setattr__(self, "delta", float(delta))


@dataclass(frozen=True)
class LedgerStatus:
    """A snapshot of a ledger: what was spent, on what, and what is left."""

    firm: str
    epsilon_cap: float
    delta: float
    spent: float
    remaining: float
    by_purpose: Mapping[str, float]
    n_events: int
    last_timestamp: str | None

    def to_json(self) -> dict[str, Any]:
        return {
            "firm": self.firm,
            "epsilon_cap": self.epsilon_cap,
            "delta": self.delta,
            "spent": self.spent,
            "remaining": self.remaining,
            "by_purpose": dict(self.by_purpose),
            "n_events": self.n_events,
            "last_timestamp": self.last_timestamp,
        }


# ------------------------------------------------------------------------------ file I/O


def _parse_line(path: Path, lineno: int, line: str, *, firm: str | None) -> DpEvent:
    try:
        record = json.loads(line)
        event = DpEvent.from_json(record)
    except (json.JSONDecodeError, ValueError, TypeError) as exc:
        reason = "not valid JSON" if isinstance(exc, json.JSONDecodeError) else str(exc)
        raise ConfigError(
            f"privacy ledger {path} line {lineno} is malformed ({reason}); restore the ledger "
            "from backup - never delete lines, that would hide spent budget"
        ) from None
    owner = record.get("firm")
    if firm is not None and owner is not None and owner != firm:
        raise ConfigError(
            f"privacy ledger {path} line {lineno} belongs to firm {owner!r}, not {firm!r}; "
            "point the firm's config at its own ledger"
        )
    return event


def _read(path: Path, *, firm: str | None = None) -> tuple[list[str], list[DpEvent]]:
    """The ledger's non-blank lines (verbatim) and their parsed events; none if it is missing."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return [], []
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read privacy ledger {path}: {exc}; check the path") from None
    lines: list[str] = []
    events: list[DpEvent] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        events.append(_parse_line(path, lineno, line, firm=firm))
        lines.append(line)
    return lines, events


def read_ledger_events(path: Path | str) -> list[DpEvent]:
    """Parse a ledger file; a missing file holds no events.

    Raises:
        ConfigError: naming the file and line number of a malformed line.
    """
    return _read(Path(path))[1]


def _now() -> str:
    return datetime.now(UTC).isoformat()


# ------------------------------------------------------------------------------ ledger


class PrivacyLedger:
    """One firm's privacy budget: its cap, its committed DP events and what they add up to.

    Args:
        path: the JSON Lines ledger (created on first commit; missing means nothing spent).
        firm: the firm that owns it; lines or a budget file naming another firm are refused.
        budget: the firm's current cap from its config. If it differs from the recorded one, the
            change is appended to the budget file's history. ``None`` reads the recorded budget.

    Raises:
        ConfigError: no budget given and none recorded, the files belong to another firm, or a
            file is unreadable.
    """

    def __init__(self, path: Path | str, *, firm: str) -> None:
        if not isinstance(firm, str) or not firm.strip():
            raise ValueError(f"firm must be a non-empty string, got {firm!r}")
        self._path = Path(path)
        self._firm = firm
        self._budget_path = self._path.with_name(self._path.name + _BUDGET_SUFFIX)
        recorded = self._read_budget_file()
        self._budget: Budget | None = None if recorded is None else recorded[0]
        self._seen = 0  # events this object has seen: the ledger may only grow

    # -------------------------------------------------------------- properties

    @property
    def path(self) -> Path:
        return self._path

    @property
    def firm(self) -> str:
        return self._firm

    @property
    def budget(self) -> Budget:
        """The recorded budget (ε cap, δ)."""
        if self._budget is None:
            raise ConfigError(
                f"no privacy budget recorded for ledger {self._path} (expected "
                f"{self._budget_path}); open the firm's node or run a firm command once with its "
                "config, which records the [budget] section"
            )
        return self._budget

    @property
    def recorded_budget(self) -> Budget | None:
        return self._budget

    @property
    def budget_history(self) -> list[dict[str, Any]]:
        recorded = self._read_budget_file()
        return [] if recorded is None else recorded[1]

    def _read_events(self) -> tuple[list[str], list[DpEvent]]:
        lines, events = _read(self._path, firm=self._firm)
        if len(events) < self._seen:
            raise LedgerTampered(
                f"privacy ledger {self._path} now holds {len(events)} releases but held "
                f"{self._seen} a moment ago: it was deleted, truncated or replaced while in use. "
                "Nothing was released. Rebuild it from the firm's signed audit log with "
                "`fedcrm budget rebuild --config FIRM.toml`"
            )
        self._seen = len(events)
        return lines, events

    @property
    def events(self) -> tuple[DpEvent, ...]:
        """All committed events, re-read from disk (never fewer than this object saw before)."""
        return tuple(self._read_events()[1])

    # -------------------------------------------------------------- budget file

    def _read_budget_file(self) -> tuple[Budget, list[dict[str, Any]]] | None:
        try:
            raw = json.loads(self._budget_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ConfigError(
                f"privacy budget file {self._budget_path} is unreadable ({exc}); restore it "
                "from backup or reopen the ledger with the firm's budget"
            ) from None
        try:
            if raw["firm"] != self._firm:
                raise ConfigError(
                    f"privacy budget file {self._budget_path} belongs to firm {raw['firm']!r}, "
                    f"not {self._firm!r}; point the firm's config at its own ledger"
                )
            budget = Budget(epsilon=raw["epsilon"], delta=raw["delta"])
            history = list(raw.get("history", []))
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(
                f"privacy budget file {self._budget_path} is invalid ({exc}); restore it from "
                "backup or reopen the ledger with the firm's budget"
            ) from None
        return budget, history

    def record_budget(self, budget: Budget, *, reason: str) -> None:
        """Record a new budget (with why) in the budget file's history; no-op if unchanged.

        Only the firm's governance paths call this (``fedcrm.release.FirmPrivacy``): the first
        budget, a lowered cap, an explicit ``fedcrm budget raise``, a rebuild from the audit log.
        """
        self._path.parent.mkdir(parents=True, exist_ok=True)
        with locked(self._path):
            recorded = self._read_budget_file()
            if recorded is not None and recorded[0] == budget:
                self._budget = budget
                return
            history = [] if recorded is None else recorded[1]
            history.append(
                {
                    "epsilon": budget.epsilon,
                    "delta": budget.delta,
                    "timestamp": _now(),
                    "reason": reason,
                    "previous": None
                    if recorded is None
                    else {"epsilon": recorded[0].epsilon, "delta": recorded[0].delta},
                }
            )
            document = {
                "firm": self._firm,
                "epsilon": budget.epsilon,
                "delta": budget.delta,
                "history": history,
            }
            write_private(self._budget_path, (json.dumps(document, indent=2) + "\n").encode())
            self._budget = budget

    def replace_events(self, events: Sequence[DpEvent]) -> None:
        """Rewrite the ledger as ``events`` (rebuilding it from the signed audit log only)."""
        with locked(self._path):
            remove_stale_temps(self._path)
            lines = []
            for i, event in enumerate(events):
                record = {
                    **event.to_json(),
                    "firm": self._firm,
                    "cumulative_epsilon": self._compose(events[: i + 1]),
                }
                lines.append(json.dumps(record, sort_keys=True, ensure_ascii=False))
            write_private(self._path, ("\n".join(lines) + "\n" if lines else "").encode())
            self._seen = len(events)

    # -------------------------------------------------------------- locking

    # -------------------------------------------------------------- queries

    def _compose(self, events: Sequence[DpEvent]) -> float:
        return compose_epsilon(events, delta=self.budget.delta)

    def spent(self) -> float:
        """ε spent so far: every committed event RDP-composed at the budget's δ."""
        return self._compose(self.events)

    def remaining(self) -> float:
        """ε left under the cap (never negative)."""
        return max(0.0, self.budget.epsilon - self.spent())

    def spent_by_purpose(self) -> dict[str, float]:
        """ε of each purpose's events composed on their own (these do not add up to the total)."""
        groups: dict[str, list[DpEvent]] = {}
        for event in self.events:
            groups.setdefault(event.purpose, []).append(event)
        return {purpose: self._compose(group) for purpose, group in groups.items()}

    def _total_with(self, events: Sequence[DpEvent], event: DpEvent) -> float:
        return self._compose([*events, event])

    def _exceeds(self, total: float) -> bool:
        return not total <= self.budget.epsilon + EPSILON_TOLERANCE

    def total_with(self, event: DpEvent) -> float:
        """What ε spent would be if ``event`` were committed now."""
        return self._total_with(self.events, event)

    def would_exceed(self, event: DpEvent) -> bool:
        """Whether committing ``event`` would bring the composed total above the cap."""
        return self._exceeds(self._total_with(self.events, event))

    def _refuse_if_exceeds(self, events: Sequence[DpEvent], event: DpEvent) -> None:
        total = self._total_with(events, event)
        if self._exceeds(total):
            raise BudgetExhausted(
                epsilon_spent=self._compose(events),
                epsilon_cap=self.budget.epsilon,
                epsilon_requested=total,
                purpose=event.purpose,
                ledger=str(self._path),
            )

    def check(self, event: DpEvent) -> None:
        """Refuse ``event`` before any noise is drawn.

        Raises:
            BudgetExhausted: with the ε spent, the cap and the total ``event`` would bring.
        """
        self._refuse_if_exceeds(self.events, event)

    # -------------------------------------------------------------- commit

    def commit(self, event: DpEvent) -> float:
        """Record ``event`` durably; only after this returns may its noisy result be released.

        Under an exclusive lock the ledger is re-read and the budget re-checked, then the full
        new ledger is written to a temp file in the same directory, fsynced, renamed over the
        old one and the directory fsynced.

        Returns:
            ε spent after the commit (every committed event composed at the budget's δ).

        Raises:
            BudgetExhausted: if the event no longer fits (e.g. another process spent meanwhile).
        """
        with locked(self._path):
            remove_stale_temps(self._path)
            lines, events = self._read_events()
            self._refuse_if_exceeds(events, event)
            total = self._total_with(events, event)
            record = {
                **event.to_json(),
                "firm": self._firm,
                "cumulative_epsilon": total,
            }
            lines.append(json.dumps(record, sort_keys=True, ensure_ascii=False))
            write_private(self._path, ("\n".join(lines) + "\n").encode())
            self._seen = len(events) + 1
        return total

    def status(self) -> LedgerStatus:
        """A snapshot: cap, δ, ε spent (recomputed), remaining, ε per purpose, count, last time."""
        events = self.events
        spent = self._compose(events)
        groups: dict[str, list[DpEvent]] = {}
        for event in events:
            groups.setdefault(event.purpose, []).append(event)
        return LedgerStatus(
            firm=self._firm,
            epsilon_cap=self.budget.epsilon,
            delta=self.budget.delta,
            spent=spent,
            remaining=max(0.0, self.budget.epsilon - spent),
            by_purpose=FrozenMapping(
                {purpose: self._compose(group) for purpose, group in groups.items()}
            ),
            n_events=len(events),
            last_timestamp=events[-1].timestamp if events else None,
        )


# ------------------------------------------------------------------------------ where it lives

ANCHOR_FILE = "budget.anchor.json"
"""In the firm's key directory: where the firm's ledger and audit log are."""


@dataclass(frozen=True)
class BudgetFiles:
    """A firm's budget files: the ledger and the signed audit log that must agree with it."""

    ledger: Path
    audit_log: Path


def anchored_budget_files(
    keys_dir: Path, *, firm: str, ledger: Path, audit_log: Path, explicit: bool
) -> BudgetFiles:
    """Where this firm's budget lives: recorded in its key directory at first use.

    The budget belongs to the firm's keys, not to a path. When the firm's store moves (its
    default ledger and log paths change), the recorded files are used and the budget continues.
    When the config names other files explicitly (``budget.ledger``, ``firm.audit_log``), it is
    refused: pointing a firm at a fresh ledger must not start a fresh budget.
    """
    anchor = Path(keys_dir) / ANCHOR_FILE
    wanted = BudgetFiles(Path(ledger).resolve(), Path(audit_log).resolve())
    try:
        raw = json.loads(anchor.read_text(encoding="utf-8"))
    except FileNotFoundError:
        anchor.parent.mkdir(parents=True, exist_ok=True)
        document = {"firm": firm, "ledger": str(wanted.ledger),
                    "audit_log": str(wanted.audit_log), "created": _now()}
        write_private(anchor, (json.dumps(document, indent=2) + "\n").encode())
        return wanted
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LedgerTampered(
            f"{anchor} is unreadable ({exc}); it records where firm '{firm}''s budget lives. "
            "Restore it from a backup of the key directory"
        ) from None
    try:
        recorded = BudgetFiles(Path(raw["ledger"]), Path(raw["audit_log"]))
        owner = str(raw["firm"])
    except (KeyError, TypeError) as exc:
        raise LedgerTampered(f"{anchor} is invalid ({exc}); restore it from a backup") from None
    if owner != firm:
        raise ConfigError(
            f"{anchor} belongs to firm {owner!r}, not {firm!r}; point the config at the firm's "
            "own key directory"
        )
    if recorded != wanted and explicit:
        raise LedgerTampered(
            f"firm '{firm}''s budget is recorded at {recorded.ledger} and {recorded.audit_log} "
            f"({anchor}); the config names {wanted.ledger} and {wanted.audit_log}. A new ledger "
            "would not start a new budget: point budget.ledger and firm.audit_log at the recorded "
            "files (or remove them from the config to use the recorded ones)"
        )
    return recorded
