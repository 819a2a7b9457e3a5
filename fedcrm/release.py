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

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Generic, Protocol, TypeVar

from fedcrm.audit.log import AuditEntry, AuditLog, EntryKind, LogHead
from fedcrm.audit.verify import verify_log
from fedcrm.data.contract import FirmConfig
from fedcrm.learning.dp_engine import DpPlan, plan_for_budget
from fedcrm.learning.dp_trees import TreeNoise, TreeSchedule, TreeStep, split_budget
from fedcrm.learning.settings import DpSgdSettings
from fedcrm.privacy.accounting import DpEvent, Mechanism, calibrate_noise, make_event
from fedcrm.privacy.errors import (
    BudgetExhausted,
    BudgetRaiseRequired,
    ConfigError,
    LedgerTampered,
    PlanDoesNotFit,
)
from fedcrm.privacy.keys import FirmKeys, public_key_id
from fedcrm.privacy.ledger import EPSILON_TOLERANCE, Budget, PrivacyLedger

T = TypeVar("T")

#: A firm declines a release when less than this fraction of the ε asked for is left in its budget
#: (the noise needed would make the result useless).
MIN_USEFUL_FRACTION = 0.05


class FirmPrivacy:
    """One firm's budget: its ledger and its signed audit log, which must agree.

    Opening it is where fedcrm fails closed:

    * no signing key - refused (every release is a signed audit entry);
    * the ledger and the audit log are found through the firm's key directory
      (:meth:`FirmConfig.budget_files`), so moving the store continues the same budget;
    * the ledger must hold exactly the releases the signed log records: a ledger that is missing,
      truncated, behind or different is refused (``fedcrm budget rebuild`` restores it from the
      log); releases the log lacks (a crash between commit and audit) are logged now;
    * the cap: the first one is recorded from the config; a config cap above the recorded one is
      refused (``fedcrm budget raise`` is the explicit, signed way); a lower one is recorded;
      δ never changes silently.
    """

    def __init__(
        self, cfg: FirmConfig, keys: FirmKeys, *, reconcile: bool = True, govern: bool = True
    ) -> None:
        self.firm = cfg.firm.name
        signing_key = keys.require_signing_key(cfg.firm.keys_dir)
        self.files = cfg.budget_files()
        self.audit = AuditLog(self.files.audit_log, signing_key=signing_key)
        self.ledger = PrivacyLedger(self.files.ledger, firm=self.firm)
        self._config = str(cfg.config_path or "the firm config")
        if reconcile:
            self._reconcile()
        if govern:
            self._govern(Budget(epsilon=cfg.budget.epsilon, delta=cfg.budget.delta))

    # ------------------------------------------------------------------ the two records agree

    def _logged(self) -> tuple[list[DpEvent], Budget | None]:
        releases: list[DpEvent] = []
        budget: Budget | None = None
        for entry in self.audit.entries():
            if entry.kind is EntryKind.DP_RELEASE:
                releases.append(DpEvent.from_json(entry.payload))
            elif entry.kind is EntryKind.BUDGET_CHANGED:
                budget = Budget(epsilon=entry.payload["epsilon_cap"], delta=entry.payload["delta"])
        return releases, budget

    def _reconcile(self) -> None:
        if not self.files.audit_log.exists() and (
            self.files.ledger.exists() or self.ledger.recorded_budget is not None
        ):
            raise LedgerTampered(
                f"firm '{self.firm}''s signed audit log {self.files.audit_log} is missing while "
                f"its ledger {self.files.ledger} exists: restore the log from a backup; nothing "
                "is released without it"
            )
        logged, logged_budget = self._logged()
        ledgered = list(self.ledger.events)
        rebuild = f"`fedcrm budget rebuild --config {self._config}`"
        for i, (a, b) in enumerate(zip(logged, ledgered, strict=False)):
            if a != b:
                raise LedgerTampered(
                    f"release #{i + 1} of firm '{self.firm}' differs between its ledger "
                    f"{self.files.ledger} and its signed audit log {self.files.audit_log}; the "
                    f"ledger was edited. Rebuild it from the log with {rebuild}"
                )
        if len(logged) > len(ledgered):
            raise LedgerTampered(
                f"firm '{self.firm}''s ledger {self.files.ledger} holds {len(ledgered)} releases "
                f"but its signed audit log records {len(logged)}: the ledger was deleted, "
                f"truncated or replaced. Nothing is released until it is rebuilt with {rebuild}"
            )
        for event in ledgered[len(logged):]:
            # committed, then the process stopped before the audit entry: log it now
            self._log_release(event, self.ledger.spent(), recovered=True)
        recorded = self.ledger.recorded_budget
        if logged_budget is not None and recorded != logged_budget:
            raise LedgerTampered(
                f"firm '{self.firm}''s recorded budget ({_fmt(recorded)}) differs from the last "
                f"signed budget in its audit log ({_fmt(logged_budget)}); rebuild it with {rebuild}"
            )
        if recorded is not None and logged_budget is None and self.audit.head().length:
            self.audit.append(EntryKind.BUDGET_CHANGED, {
                "epsilon_cap": recorded.epsilon, "delta": recorded.delta,
                "reason": "budget recorded before it was logged",
            })

    def _govern(self, configured: Budget) -> None:
        recorded = self.ledger.recorded_budget
        if recorded is None:
            self._set_budget(configured, reason=f"initial budget from {self._config}")
            return
        if configured.delta != recorded.delta:
            raise BudgetRaiseRequired(
                f"{self._config} sets budget.delta={configured.delta:g} but firm '{self.firm}''s "
                f"budget was recorded with δ={recorded.delta:g}; δ is part of every guarantee the "
                "firm has given. Change it only with `fedcrm budget raise --config ... "
                "--delta ... --reason ...`, or restore budget.delta"
            )
        if configured.epsilon > recorded.epsilon:
            raise BudgetRaiseRequired(
                f"{self._config} sets budget.epsilon={configured.epsilon:g}, above firm "
                f"'{self.firm}''s recorded cap ε={recorded.epsilon:g}. Raising a cap is a "
                "governance decision: run `fedcrm budget raise --config "
                f"{self._config} --epsilon {configured.epsilon:g} --reason \"...\"` "
                "(signed and logged), or restore budget.epsilon"
            )
        if configured.epsilon < recorded.epsilon:
            self._set_budget(configured, reason=f"cap lowered in {self._config}")

    def _set_budget(self, budget: Budget, *, reason: str) -> None:
        previous = self.ledger.recorded_budget
        self.ledger.record_budget(budget, reason=reason)
        self.audit.append(EntryKind.BUDGET_CHANGED, {
            "epsilon_cap": budget.epsilon, "delta": budget.delta, "reason": reason,
            "previous": None if previous is None
            else {"epsilon_cap": previous.epsilon, "delta": previous.delta},
        })

    def raise_cap(self, budget: Budget, *, reason: str) -> None:
        """The explicit, signed and logged way to give the firm a larger budget."""
        if not reason.strip():
            raise ConfigError("say why the cap changes: --reason \"board decision of ...\"")
        self._set_budget(budget, reason=f"raised: {reason.strip()}")

    # ------------------------------------------------------------------ queries

    @property
    def cap(self) -> float:
        return self.ledger.budget.epsilon

    @property
    def delta(self) -> float:
        return self.ledger.budget.delta

    def spent(self) -> float:
        return self.ledger.spent()

    def head(self) -> LogHead:
        return self.audit.head()

    def _log_release(self, event: DpEvent, total: float, *, recovered: bool = False) -> AuditEntry:
        payload: dict[str, Any] = {
            **event.to_json(),
            "ledger_path": str(self.ledger.path),
            "cumulative_epsilon": total,
            "epsilon_cap": self.cap,
        }
        if recovered:
            payload["recovered"] = "committed before a crash; logged when the firm reopened"
        return self.audit.append(EntryKind.DP_RELEASE, payload)


def rebuild_ledger(cfg: FirmConfig, keys: FirmKeys) -> tuple[int, Budget | None]:
    """Rewrite a firm's ledger from its signed audit log (after a loss or an edit).

    The log's signatures are verified with the firm's own public key first; a log that does not
    verify is refused (restore it from a backup). Returns the number of releases and the budget.
    """
    files = cfg.budget_files()
    public = keys.require_signing_key(cfg.firm.keys_dir).public_key()
    failures = verify_log(files.audit_log, trusted_keys={public_key_id(public): public})
    if failures:
        raise LedgerTampered(
            f"{files.audit_log} does not verify ({failures[0]}); a ledger cannot be rebuilt "
            "from it. Restore the audit log from a backup"
        )
    privacy = FirmPrivacy(cfg, keys, reconcile=False, govern=False)
    releases, budget = privacy._logged()
    if budget is not None:
        privacy.ledger.record_budget(budget, reason="rebuilt from the signed audit log")
    elif releases:
        raise LedgerTampered(f"{files.audit_log} records releases but no budget")
    if files.ledger.exists():
        backup = files.ledger.with_name(files.ledger.name + ".before-rebuild")
        files.ledger.replace(backup)
    privacy.ledger.replace_events(releases)
    return len(releases), budget


def _fmt(budget: Budget | None) -> str:
    return "none" if budget is None else f"ε={budget.epsilon:g}, δ={budget.delta:g}"


def check_epsilon(epsilon: float, *, what: str = "--epsilon") -> float:
    """A requested ε must be a finite number > 0 (nan, inf, 0 and negatives are refused)."""
    if (
        isinstance(epsilon, bool)
        or not isinstance(epsilon, int | float)
        or not math.isfinite(epsilon)
        or epsilon <= 0
    ):
        raise ConfigError(f"{what} must be a finite number > 0 (the ε to spend), not {epsilon!r}")
    return float(epsilon)


def plan_dp_sgd(
    privacy: FirmPrivacy,
    *,
    n_examples: int,
    epsilon: float,
    settings: DpSgdSettings,
    rounds: int = 1,
    whole: bool = False,
    also_planned: Sequence[DpEvent] = (),
    hidden_layers: bool = False,
) -> DpPlan:
    """Calibrate DP-SGD so that ``rounds`` rounds add at most ``epsilon`` to the firm's total.

    ``settings`` left unset (epochs, batch size, learning rate: ``fedcrm train``'s defaults) are
    derived by the budget rule of :mod:`fedcrm.learning.settings`; ``hidden_layers``: the model
    has hidden layers (the rule's learning rate differs).

    ``also_planned``: releases the same plan will make besides training (e.g. a run's
    evaluations); the training noise is calibrated so that everything fits together.

    ``whole=True`` (a firm's own request, e.g. ``fedcrm train --epsilon``): the ε asked for must
    fit in what remains, or the request is refused before any work - never silently reduced.
    ``whole=False`` (a federated run's target): the plan fits ``min(cap, spent + epsilon)``,
    provided at least :data:`MIN_USEFUL_FRACTION` of ``epsilon`` is left.

    Raises:
        BudgetExhausted: ``whole`` and ``epsilon`` does not fit.
        PlanDoesNotFit: less than :data:`MIN_USEFUL_FRACTION` of ``epsilon`` is left.
    """
    epsilon = check_epsilon(epsilon, what="the release's ε")
    spent = privacy.spent()
    available = privacy.cap - spent
    if whole and spent + epsilon > privacy.cap + EPSILON_TOLERANCE:
        raise BudgetExhausted(
            epsilon_spent=spent, epsilon_cap=privacy.cap, epsilon_requested=spent + epsilon,
            purpose=f"a release of ε={epsilon:g}", ledger=str(privacy.ledger.path),
        )
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
        prior_events=(*privacy.ledger.events, *also_planned),
        hidden_layers=hidden_layers,
    )


@dataclass(frozen=True)
class RunPlan:
    """A firm's whole plan for one federated run, fixed at its first round and persisted.

    The run contract: the firm trains at most ``training.rounds`` rounds, answers at most
    ``evaluations`` evaluations, each at ``evaluation_noise`` (noise std / L2 sensitivity), and
    only for the run spec it planned for (``spec_fingerprint``); together these compose to at
    most ``min(cap, spent at planning + the run's target ε)``.
    """

    spec_fingerprint: str
    training: DpPlan
    evaluations: int
    evaluation_noise: float

    def evaluation_event(self, *, delta: float, purpose: str,
                         context: Mapping[str, Any] | None = None) -> DpEvent:
        return gaussian_query_event(
            self.evaluation_noise, delta=delta, purpose=purpose, context=context
        )

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "training": asdict(self.training)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RunPlan:
        return cls(
            spec_fingerprint=str(data["spec_fingerprint"]),
            training=DpPlan(**data["training"]),
            evaluations=int(data["evaluations"]),
            evaluation_noise=float(data["evaluation_noise"]),
        )


def plan_run(
    privacy: FirmPrivacy,
    *,
    spec_fingerprint: str,
    n_examples: int,
    epsilon: float,
    settings: DpSgdSettings,
    rounds: int,
    evaluations: int,
    evaluation_share: float,
) -> RunPlan:
    """Plan a federated run: ``evaluations`` Gaussian evaluations get about
    ``evaluation_share`` of the run's ε, DP-SGD the rest (calibrated with them, so the whole
    plan fits ``min(cap, spent + epsilon)``)."""
    evaluation_noise = 0.0
    planned: list[DpEvent] = []
    if evaluations > 0:
        available = max(min(epsilon, privacy.cap - privacy.spent()), 0.0)
        if available <= 0:
            raise PlanDoesNotFit(
                f"firm '{privacy.firm}' has no ε left for a run (spent {privacy.spent():.4f} of "
                f"{privacy.cap:g})"
            )
        evaluation_noise = calibrate_noise(
            target_epsilon=evaluation_share * available, delta=privacy.delta, sample_rate=1.0,
            steps=evaluations,
        )
        planned = [
            gaussian_query_event(evaluation_noise, delta=privacy.delta, purpose="evaluate")
            for _ in range(evaluations)
        ]
    training = plan_dp_sgd(
        privacy, n_examples=n_examples, epsilon=epsilon, settings=settings, rounds=rounds,
        also_planned=planned,
    )
    return RunPlan(spec_fingerprint, training, evaluations, evaluation_noise)


def gaussian_query_event(
    noise_multiplier: float, *, delta: float, purpose: str,
    context: Mapping[str, Any] | None = None,
) -> DpEvent:
    """One Gaussian query over the firm's whole table (e.g. noisy evaluation counts).

    Discrete Gaussian noise on counts is accounted as this continuous Gaussian: at the same
    scale its Rényi divergence is no larger (Canonne, Kamath & Steinke 2020, Thm. 4).
    """
    return make_event(
        mechanism=Mechanism.GAUSSIAN, noise_multiplier=noise_multiplier, sample_rate=1.0,
        steps=1, delta=delta, purpose=purpose, context=context,
    )


@dataclass(frozen=True)
class Released(Generic[T]):
    """A committed, audited release: the value, its event, the firm's new total and log head."""

    value: T
    event: DpEvent
    epsilon_total: float
    audit_head: LogHead


Funded = tuple[EntryKind, Mapping[str, Any]]
"""What a release funded, for the audit log: an entry kind and payload (``release`` is added)."""


class Staged(Protocol):
    """A result written where it will go, published only after the release is committed."""

    def publish(self) -> None: ...

    def discard(self) -> None: ...


def release(
    privacy: FirmPrivacy,
    event: DpEvent,
    compute: Callable[[], T],
    *,
    funded: Callable[[T], Funded] | None = None,
    stage: Callable[[T], Staged] | None = None,
) -> Released[T]:
    """Check, compute, commit, audit, in that order (see the module docstring).

    ``compute`` draws the noise and returns the result; it runs only after the check. ``stage``
    writes the result next to its destination (e.g. a :class:`fedcrm.privacy.durable.StagedFile`);
    it is published after the commit and the audit, and discarded if the commit fails.
    ``funded`` describes what the release paid for (e.g. a model update and its hash) for the
    audit log.

    Raises:
        BudgetExhausted: before ``compute`` runs, or at commit if another process spent meanwhile
            (then nothing is published or returned).
    """
    privacy.ledger.check(event)
    value = compute()
    staged = stage(value) if stage is not None else None
    try:
        total = privacy.ledger.commit(event)  # fsynced: from here the result may leave the process
    except BaseException:
        if staged is not None:
            staged.discard()
        raise
    entry = privacy._log_release(event, total)
    if funded is not None:
        kind, payload = funded(value)
        privacy.audit.append(kind, {**payload, "release": entry.hash})
    if staged is not None:
        staged.publish()
    return Released(value=value, event=event, epsilon_total=total, audit_head=privacy.head())


def resend(privacy: FirmPrivacy, *, run_id: str, server_round: int, model_hash: str) -> LogHead:
    """Record that an update released before is sent again, unchanged: no new release, no charge.

    The update must be the one the firm's signed log records as sent (``update_sent``) for this
    run and round; the ``update_resent`` entry points at that entry, so an auditor sees one
    release, sent twice.

    Raises:
        LedgerTampered: the log records no such update, or another one.
    """
    sent = next(
        (e for e in reversed(privacy.audit.entries())
         if e.kind is EntryKind.UPDATE_SENT and e.payload.get("run_id") == run_id
         and e.payload.get("round") == server_round),
        None,
    )
    if sent is None or sent.payload.get("model_hash") != model_hash:
        raise LedgerTampered(
            f"firm '{privacy.firm}' kept an update for round {server_round} of run {run_id} that "
            f"its signed audit log {privacy.files.audit_log} does not record as sent; it is not "
            "sent again"
        )
    privacy.audit.append(EntryKind.UPDATE_RESENT, {
        "run_id": run_id, "round": server_round, "task": str(sent.payload.get("task", "")),
        "model_hash": model_hash, "sent": sent.hash,
    })
    return privacy.head()


# ------------------------------------------------------------------------------ DP trees


@dataclass(frozen=True)
class TreesPlan:
    """A firm's whole plan for a DP tree run (local or federated), fixed before the first release.

    Every step of ``schedule`` is one Gaussian release: its histograms or leaves, with noise
    ``noise.level`` or ``noise.leaf`` times its sensitivity. ``uniform`` is the one multiplier
    at which all ``releases`` would compose to the same ε (Gaussian RDP is additive in 1/σ²),
    ``evaluations`` Gaussian evaluations at ``evaluation_noise`` are planned with them. The
    fingerprints bind the plan to the run's parameters and tree settings.
    """

    spec_fingerprint: str
    settings_fingerprint: str
    releases: int
    uniform: float
    noise: TreeNoise
    evaluations: int = 0
    evaluation_noise: float = 0.0

    def event(self, schedule: TreeSchedule, step: TreeStep, *, delta: float, purpose: str,
              context: Mapping[str, Any] | None = None) -> DpEvent:
        """The ledger event of one step's release; its context records the budget split."""
        return gaussian_query_event(
            self.noise.multiplier(schedule, step), delta=delta, purpose=purpose,
            context={
                **(context or {}),
                "round": step.round, "level": step.level,
                "release": "leaves" if step.level == schedule.depth else "histograms",
                "sensitivity": schedule.sensitivity(step),
                "releases_planned": self.releases,
                "level_noise": self.noise.level, "leaf_noise": self.noise.leaf,
            },
        )

    def whole_event(self, schedule: TreeSchedule, *, delta: float, purpose: str,
                    context: Mapping[str, Any] | None = None) -> DpEvent:
        """All releases of the schedule as one event (local training, where none leaves the
        process before the model): ``releases`` Gaussian steps at ``uniform`` compose to exactly
        the ε of the level and leaf releases at their own noise."""
        return make_event(
            mechanism=Mechanism.GAUSSIAN, noise_multiplier=self.uniform, sample_rate=1.0,
            steps=self.releases, delta=delta, purpose=purpose,
            context={
                **(context or {}),
                "trees": schedule.settings.trees, "depth": schedule.depth,
                "split": schedule.settings.split.value,
                "level_releases": schedule.level_releases, "level_noise": self.noise.level,
                "leaf_releases": schedule.leaf_releases, "leaf_noise": self.noise.leaf,
                "leaf_share": (schedule.settings.leaf_share if schedule.level_releases else 1.0),
            },
        )

    def evaluation_event(self, *, delta: float, purpose: str,
                         context: Mapping[str, Any] | None = None) -> DpEvent:
        return gaussian_query_event(
            self.evaluation_noise, delta=delta, purpose=purpose, context=context
        )

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "noise": asdict(self.noise)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> TreesPlan:
        return cls(
            spec_fingerprint=str(data["spec_fingerprint"]),
            settings_fingerprint=str(data["settings_fingerprint"]),
            releases=int(data["releases"]),
            uniform=float(data["uniform"]),
            noise=TreeNoise(**data["noise"]),
            evaluations=int(data["evaluations"]),
            evaluation_noise=float(data["evaluation_noise"]),
        )


def plan_trees(
    privacy: FirmPrivacy,
    *,
    schedule: TreeSchedule,
    epsilon: float,
    whole: bool = False,
    spec_fingerprint: str = "",
    settings_fingerprint: str = "",
    evaluations: int = 0,
    evaluation_share: float = 0.2,
) -> TreesPlan:
    """Calibrate a DP tree run so that all its releases (and ``evaluations``) add at most
    ``epsilon``: ``whole`` as in :func:`plan_dp_sgd` (a firm's own request must fit whole; a
    federated run fits ``min(cap, spent + epsilon)`` when at least :data:`MIN_USEFUL_FRACTION`
    of it is left). The noise is split between histogram and leaf releases by
    :func:`fedcrm.learning.dp_trees.split_budget`.

    Raises:
        BudgetExhausted: ``whole`` and ``epsilon`` does not fit.
        PlanDoesNotFit: too little is left for a useful run.
    """
    epsilon = check_epsilon(epsilon, what="the release's ε")
    spent = privacy.spent()
    available = privacy.cap - spent
    if whole and spent + epsilon > privacy.cap + EPSILON_TOLERANCE:
        raise BudgetExhausted(
            epsilon_spent=spent, epsilon_cap=privacy.cap, epsilon_requested=spent + epsilon,
            purpose=f"a release of ε={epsilon:g}", ledger=str(privacy.ledger.path),
        )
    if available < MIN_USEFUL_FRACTION * epsilon:
        raise PlanDoesNotFit(
            f"firm '{privacy.firm}' has spent ε={spent:.4f} of its cap ε={privacy.cap:g}; the "
            f"remaining ε={max(available, 0):.4f} cannot fund a useful tree model (at least "
            f"{MIN_USEFUL_FRACTION:.0%} of the ε={epsilon:g} asked for)"
        )
    target = min(privacy.cap, spent + epsilon)
    evaluation_noise = 0.0
    planned: list[DpEvent] = []
    if evaluations > 0:
        evaluation_noise = calibrate_noise(
            target_epsilon=evaluation_share * min(epsilon, available), delta=privacy.delta,
            sample_rate=1.0, steps=evaluations,
        )
        planned = [gaussian_query_event(evaluation_noise, delta=privacy.delta, purpose="evaluate")
                   for _ in range(evaluations)]
    releases = len(schedule.steps)
    uniform = calibrate_noise(
        target_epsilon=target, delta=privacy.delta, sample_rate=1.0, steps=releases,
        prior_events=(*privacy.ledger.events, *planned),
    )
    return TreesPlan(
        spec_fingerprint=spec_fingerprint, settings_fingerprint=settings_fingerprint,
        releases=releases, uniform=uniform, noise=split_budget(schedule, uniform),
        evaluations=evaluations, evaluation_noise=evaluation_noise,
    )
