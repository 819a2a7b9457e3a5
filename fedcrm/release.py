"""The one release path: every DP release a firm makes goes through :func:`release`.

A firm's privacy state is a :class:`FirmPrivacy`: its budget (ε cap and δ from its config), its
persistent ledger of DP events and its signed audit log. Releasing a DP result is always the same
five steps, for a federated training round, local training, and any later query:

1. **plan** - the caller calibrates the release's event from what the firm has spent and what it
   may spend (:func:`plan_dp_sgd` for DP-SGD, with the one "useful fraction" rule);
2. **check** - ``ledger.check(event)`` refuses a release over the cap *before any noise is drawn*;
3. **compute** - the caller's function draws the noise and produces the result (and may stage it,
   e.g. write a file next to its destination);
4. **commit** - the event is appended to the ledger, fsynced, under a lock that re-checks the cap;
5. **audit** - the release (and what it funded, e.g. the model update's hash) is signed into the
   firm's audit log; only then is a staged result published and the value returned to the
   caller, which may let it leave the process.

Callers never touch the ledger's ``check``/``commit`` themselves.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from fedcrm.audit.log import AuditLog, EntryKind, LogHead
from fedcrm.data.contract import FirmConfig
from fedcrm.learning.dp_engine import DpPlan, plan_for_budget
from fedcrm.learning.settings import DpSgdSettings
from fedcrm.privacy.accounting import DpEvent
from fedcrm.privacy.errors import PlanDoesNotFit
from fedcrm.privacy.keys import FirmKeys
from fedcrm.privacy.ledger import Budget, PrivacyLedger

T = TypeVar("T")

#: A firm declines a release when less than this fraction of the ε asked for is left in its budget
#: (the noise needed would make the result useless).
MIN_USEFUL_FRACTION = 0.05


class FirmPrivacy:
    """One firm's budget, ledger and signed audit log."""

    def __init__(self, cfg: FirmConfig, keys: FirmKeys) -> None:
        self.firm = cfg.firm.name
        self.cap = cfg.budget.epsilon
        self.delta = cfg.budget.delta
        self.ledger = PrivacyLedger(
            cfg.ledger_path, firm=self.firm, budget=Budget(epsilon=self.cap, delta=self.delta)
        )
        self.audit: AuditLog | None = (
            None if keys.signing_key is None
            else AuditLog(cfg.audit_path, signing_key=keys.signing_key)
        )
        self._log_budget()

    def _log_budget(self) -> None:
        """Record the firm's budget in its audit log when it is new or changed."""
        if self.audit is None:
            return
        last = next(
            (e for e in reversed(self.audit.entries()) if e.kind is EntryKind.BUDGET_CHANGED),
            None,
        )
        if last is None or (last.payload["epsilon_cap"], last.payload["delta"]) != (
            self.cap, self.delta
        ):
            self.audit.append(
                EntryKind.BUDGET_CHANGED, {"epsilon_cap": self.cap, "delta": self.delta}
            )

    def spent(self) -> float:
        return self.ledger.spent()

    def head(self) -> LogHead | None:
        return self.audit.head() if self.audit is not None else None


def plan_dp_sgd(
    privacy: FirmPrivacy,
    *,
    n_examples: int,
    epsilon: float,
    settings: DpSgdSettings,
    rounds: int = 1,
) -> DpPlan:
    """Calibrate DP-SGD so that ``rounds`` rounds add at most ``epsilon`` to the firm's total.

    The plan's noise fits ``min(cap, spent + epsilon)`` composed with everything already spent.

    Raises:
        PlanDoesNotFit: less than :data:`MIN_USEFUL_FRACTION` of ``epsilon`` is left.
    """
    spent = privacy.spent()
    available = privacy.cap - spent
    if available < MIN_USEFUL_FRACTION * epsilon:
        raise PlanDoesNotFit(
            f"firm '{privacy.firm}' has spent ε={spent:.4f} of its cap ε={privacy.cap:g}; the "
            f"remaining ε={max(available, 0):.4f} cannot fund a useful release (at least "
            f"{MIN_USEFUL_FRACTION:.0%} of the ε={epsilon:g} asked for). Raising the cap is a "
            "governance decision for the firm"
        )
    return plan_for_budget(
        n_examples=n_examples,
        target_epsilon=min(privacy.cap, spent + epsilon),
        delta=privacy.delta,
        epochs=settings.epochs,
        batch_size=settings.batch_size,
        max_grad_norm=settings.max_grad_norm,
        learning_rate=settings.learning_rate,
        rounds=rounds,
        prior_events=privacy.ledger.events,
    )


@dataclass(frozen=True)
class Released(Generic[T]):
    """A committed, audited release: the value, its event, the firm's new total and log head."""

    value: T
    event: DpEvent
    epsilon_total: float
    audit_head: LogHead | None


Funded = tuple[EntryKind, Mapping[str, Any]]
"""What a release funded, for the audit log: an entry kind and payload (``release`` is added)."""


def release(
    privacy: FirmPrivacy,
    event: DpEvent,
    compute: Callable[[], T],
    *,
    funded: Callable[[T], Funded] | None = None,
    stage: Callable[[T], Callable[[], None]] | None = None,
) -> Released[T]:
    """Check, compute, commit, audit, in that order (see the module docstring).

    ``compute`` draws the noise and returns the result; it runs only after the check. ``stage``
    may prepare the result's destination (it returns the function that publishes it, called
    after the commit and the audit). ``funded`` describes what the release paid for (e.g. a model
    update and its hash) for the audit log.

    Raises:
        BudgetExhausted: before ``compute`` runs, or at commit if another process spent meanwhile
            (then nothing is published or returned).
    """
    privacy.ledger.check(event)
    value = compute()
    publish = stage(value) if stage is not None else None
    total = privacy.ledger.commit(event)  # fsynced: from here the result may leave the process
    if privacy.audit is not None:
        entry = privacy.audit.append(
            EntryKind.DP_RELEASE,
            {
                **event.to_json(),
                "ledger_path": str(privacy.ledger.path),
                "cumulative_epsilon": total,
                "epsilon_cap": privacy.cap,
            },
        )
        if funded is not None:
            kind, payload = funded(value)
            privacy.audit.append(kind, {**payload, "release": entry.hash})
    if publish is not None:
        publish()
    return Released(value=value, event=event, epsilon_total=total, audit_head=privacy.head())
