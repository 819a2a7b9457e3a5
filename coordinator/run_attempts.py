"""A run followed to its end, across restarts: submitted, retried, resumed, or ended on record.

:func:`run_to_end` submits the run's app bundle to the SuperLink (``flwr run``) and follows it.
If the SuperLink stops answering (it was restarted, or crashed and came back) or the Flower run
fails, it waits for the SuperLink and submits the run again with the same run id and folder: the
new ServerApp resumes after the last completed round (:mod:`fedcrm.coordinator.run_checkpoint`),
and firms resend, without a new charge, updates they had released for the round that was cut.
Each Flower run is one attempt, recorded in ``attempts.json`` in the run's folder.

When the attempts are used up, or the SuperLink does not come back, the run ends *on record*:
``summary.json`` (status ``interrupted``, from the last checkpoint) and a signed ``run_finished``
entry in the federation log, so an auditor never mistakes it for a run still going.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from fedcrm.audit.log import EntryKind
from fedcrm.coordinator.events import EVENTS, EventLog, RunFinished
from fedcrm.coordinator.federation_log import FederationAudit
from fedcrm.coordinator.flower_cli import (
    RunState,
    RunStatus,
    SuperLinkUnreachable,
    follow_run,
    run_app,
    run_status,
    stop_run,
    submit_when_answering,
)
from fedcrm.coordinator.processes import DeploymentError, port_open
from fedcrm.coordinator.run_checkpoint import load_checkpoint
from fedcrm.coordinator.run_config import RunConfig
from fedcrm.coordinator.run_state import summary
from fedcrm.coordinator.runs import SUMMARY, load_summary, write_summary
from fedcrm.privacy.durable import write_private

ATTEMPTS = "attempts.json"
INTERRUPTED = "interrupted"
#: Seconds to wait for a SuperLink that stopped answering to come back.
RESTART_WAIT_S = 300.0
DEFAULT_RETRIES = 3


@dataclass(frozen=True)
class Attempt:
    """One Flower run of a fedcrm run, and how it ended."""

    flower_run_id: int
    ended: str  # Flower's status ("finished:completed" ...) or why following it stopped


@dataclass(frozen=True)
class RunOutcome:
    """How a run ended, after every attempt, and where its results are."""

    run_id: str
    run_dir: Path
    attempts: tuple[Attempt, ...]
    status: RunStatus
    log_path: Path

    @property
    def flower_run_id(self) -> int:
        return self.attempts[-1].flower_run_id if self.attempts else 0

    @property
    def summary_path(self) -> Path:
        return self.run_dir / SUMMARY

    @property
    def summary(self) -> dict[str, Any]:
        return load_summary(self.run_dir) if self.summary_path.exists() else {}

    @property
    def completed(self) -> bool:
        return self.status.completed and self.summary.get("status") == "completed"


def read_attempts(run_dir: Path) -> list[Attempt]:
    path = run_dir / ATTEMPTS
    if not path.exists():
        return []
    return [Attempt(**a) for a in json.loads(path.read_text())]


def _record(run_dir: Path, attempts: Sequence[Attempt]) -> None:
    write_private(run_dir / ATTEMPTS, json.dumps([asdict(a) for a in attempts]).encode())


def wait_for_superlink(control_port: int, timeout_s: float) -> bool:
    """Whether the SuperLink answers on its loopback port within ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if port_open(control_port):
            return True
        time.sleep(0.5)
    return port_open(control_port)


def end_on_record(run_dir: Path, cfg: RunConfig | None, *, run_id: str, reason: str,
                  attempts: int) -> None:
    """Write the summary and the signed ``run_finished`` of a run that could not finish.

    Without a fedcrm run config (another app) there is no fedcrm summary to write.
    """
    if cfg is None:
        return
    checkpoint = load_checkpoint(run_dir)
    record = summary(
        cfg, run_id=run_id, status=INTERRUPTED, stop_reason=reason,
        firms=list(checkpoint.firms) if checkpoint else [],
        rounds=dict(checkpoint.rounds) if checkpoint else {},
        updates=list(checkpoint.updates) if checkpoint else [],
        model_path=None, model_hash="",
        started=checkpoint.started if checkpoint else time.time(), attempts=attempts,
    )
    write_summary(run_dir, record)
    audit = FederationAudit(run_dir)
    audit.append(EntryKind.RUN_FINISHED, {
        "status": INTERRUPTED, "reason": reason,
        "rounds_completed": record["rounds_completed"], "model_hash": "",
    })
    audit.close()
    EventLog(run_dir / EVENTS).emit(RunFinished(status=INTERRUPTED, reason=reason, model=None))


def run_to_end(
    *,
    cfg: RunConfig | None,
    run_id: str,
    run_dir: Path,
    app_dir: Path,
    flwr_home: Path,
    connection: str,
    control_port: int,
    timeout_s: float,
    retries: int = DEFAULT_RETRIES,
    restart_wait_s: float = RESTART_WAIT_S,
    extra_pythonpath: Sequence[Path] = (),
    on_attempt: Callable[[Attempt], None] | None = None,
) -> RunOutcome:
    """Run until the ServerApp writes the summary, or end the run on record; see the module.

    An attempt recorded in ``attempts.json`` whose Flower run is still going is followed, not
    submitted again (``fedcrm run --resume`` after the coordinator's own process restarted).
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    log_path = run_dir / "flower.log"
    attempts = read_attempts(run_dir)
    deadline = time.monotonic() + timeout_s
    following: int | None = None
    if attempts:
        last = attempts[-1].flower_run_id
        try:
            if run_status(flwr_home=flwr_home, connection=connection,
                          run_id=last).state is RunState.UNFINISHED:
                following = last
        except DeploymentError:
            pass
    status = RunStatus(run_id=0, status_text="")
    while True:
        if (run_dir / SUMMARY).exists():
            break  # the ServerApp (or an earlier end on record) wrote how the run ended
        if following is None:
            if len(attempts) > retries:
                end_on_record(
                    run_dir, cfg, run_id=run_id, attempts=len(attempts),
                    reason=f"the run did not finish in {len(attempts)} attempts "
                    f"({'; '.join(a.ended for a in attempts[-2:])})",
                )
                break
            following = submit_when_answering(
                lambda: run_app(app_dir=app_dir, flwr_home=flwr_home, connection=connection,
                                extra_pythonpath=extra_pythonpath),
                control_port=control_port,
            )
            attempts.append(Attempt(following, "running"))
            _record(run_dir, attempts)
            if on_attempt is not None:
                on_attempt(attempts[-1])
        try:
            status = follow_run(
                flwr_home=flwr_home, connection=connection, run_id=following,
                timeout_s=max(deadline - time.monotonic(), 1.0), log_path=log_path,
                control_port=control_port,
            )
            ended = status.status_text
        except SuperLinkUnreachable as exc:
            ended = "the SuperLink restarted"
            status = RunStatus(run_id=following, status_text=ended)
            if not wait_for_superlink(control_port, restart_wait_s):
                attempts[-1] = Attempt(following, ended)
                _record(run_dir, attempts)
                end_on_record(
                    run_dir, cfg, run_id=run_id, attempts=len(attempts),
                    reason=f"{exc}, and it did not answer again within {restart_wait_s:.0f}s",
                )
                break
            try:  # the ServerApp went with the old SuperLink: make sure its run is over
                if run_status(flwr_home=flwr_home, connection=connection,
                              run_id=following).state is RunState.UNFINISHED:
                    stop_run(flwr_home=flwr_home, connection=connection, run_id=following)
            except DeploymentError:
                pass
        except DeploymentError as exc:  # not finished in time: stopped by follow_run
            ended = str(exc)
            status = RunStatus(run_id=following, status_text="finished:stopped")
        attempts[-1] = Attempt(following, ended)
        _record(run_dir, attempts)
        if on_attempt is not None:
            on_attempt(attempts[-1])
        following = None
        if status.state is RunState.COMPLETED:
            break  # the ServerApp returned (fedcrm's wrote summary.json before it did)
        if status.state is RunState.STOPPED or time.monotonic() >= deadline:
            if not (run_dir / SUMMARY).exists():
                end_on_record(run_dir, cfg, run_id=run_id, attempts=len(attempts),
                              reason=f"the run was stopped ({ended})")
            break
    return RunOutcome(run_id=run_id, run_dir=run_dir, attempts=tuple(attempts), status=status,
                      log_path=log_path)

