"""The privacy ledger: refuses overspending, survives reopen, crashes and concurrent writers."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from fedcrm.privacy.accounting import DpEvent, Mechanism, compose_epsilon, make_event
from fedcrm.privacy.errors import BudgetExhausted, ConfigError, LedgerTampered
from fedcrm.privacy.ledger import (
    Budget,
    PrivacyLedger,
    anchored_budget_files,
    read_ledger_events,
)

DELTA = 1e-5
NOW = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
REPO = Path(__file__).resolve().parents[1]


def gaussian(noise: float = 4.0, *, purpose: str = "query:count", steps: int = 1) -> DpEvent:
    return make_event(mechanism=Mechanism.GAUSSIAN, noise_multiplier=noise, sample_rate=1.0,
                      steps=steps, delta=DELTA, purpose=purpose, context={"task": "t"}, now=NOW)


def sgd(*, purpose: str = "train:churn") -> DpEvent:
    return make_event(mechanism=Mechanism.SUBSAMPLED_GAUSSIAN, noise_multiplier=1.5,
                      sample_rate=0.02, steps=100, delta=DELTA, purpose=purpose,
                      context={"run_id": "r1", "round": 1}, now=NOW)


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "store" / "budget.jsonl"


def open_ledger(path: Path, cap: float = 2.0) -> PrivacyLedger:
    ledger = PrivacyLedger(path, firm="acme")
    ledger.record_budget(Budget(epsilon=cap, delta=DELTA), reason="test budget")
    return ledger


# ------------------------------------------------------------------ spending


def test_empty_ledger_has_spent_nothing(path: Path) -> None:
    ledger = open_ledger(path)
    assert ledger.events == ()
    assert ledger.spent() == 0.0
    assert ledger.remaining() == 2.0
    assert read_ledger_events(path) == []
    status = ledger.status()
    assert (status.n_events, status.last_timestamp, dict(status.by_purpose)) == (0, None, {})


def test_spent_is_the_composition_of_all_events(path: Path) -> None:
    ledger = open_ledger(path, cap=5.0)
    events = [gaussian(), sgd(), gaussian(6.0, purpose="query:sum")]
    for event in events:
        ledger.commit(event)
    expected = compose_epsilon(events, delta=DELTA)
    assert ledger.spent() == pytest.approx(expected)
    assert ledger.spent() < sum(e.epsilon for e in events)  # composed, not summed
    assert ledger.remaining() == pytest.approx(5.0 - expected)
    assert ledger.events == tuple(events)
    by_purpose = ledger.spent_by_purpose()
    assert set(by_purpose) == {"query:count", "train:churn", "query:sum"}
    assert by_purpose["train:churn"] == pytest.approx(sgd().epsilon)
    status = ledger.status()
    assert status.n_events == 3 and status.spent == pytest.approx(expected)
    assert json.loads(json.dumps(status.to_json()))["by_purpose"] == pytest.approx(by_purpose)


def test_refuses_an_event_that_would_exceed_the_cap(path: Path) -> None:
    ledger = open_ledger(path, cap=2.0)
    ledger.commit(gaussian(2.5))
    spent = ledger.spent()
    big = gaussian(1.0, purpose="query:histogram")
    after = compose_epsilon([*ledger.events, big], delta=DELTA)
    assert ledger.would_exceed(big)
    with pytest.raises(BudgetExhausted) as info:
        ledger.check(big)
    with pytest.raises(BudgetExhausted):
        ledger.commit(big)
    exc = info.value
    assert exc.epsilon_spent == pytest.approx(spent)
    assert exc.epsilon_cap == 2.0
    assert exc.epsilon_requested == pytest.approx(after)
    message = str(exc)
    for text in (f"{spent:.4f}", "2.0000", f"{after:.4f}", "query:histogram", str(path)):
        assert text in message
    assert len(ledger.events) == 1  # nothing was written


def test_would_exceed_boundaries(path: Path, tmp_path: Path) -> None:
    first, second = gaussian(3.0), sgd()
    exact = compose_epsilon([first, second], delta=DELTA)
    fits = open_ledger(path, cap=exact)
    fits.commit(first)
    assert not fits.would_exceed(second)  # landing exactly on the cap is allowed
    fits.commit(second)
    assert fits.remaining() == pytest.approx(0.0, abs=1e-9)
    assert fits.would_exceed(gaussian(50.0))  # anything more is not

    tight = open_ledger(tmp_path / "tight.jsonl", cap=exact * (1 - 1e-6))
    tight.commit(first)
    assert tight.would_exceed(second)
    with pytest.raises(BudgetExhausted):
        tight.commit(second)


def test_spending_accumulates_across_reopen_and_purposes(path: Path) -> None:
    open_ledger(path, cap=3.0).commit(gaussian(purpose="query:count"))
    open_ledger(path, cap=3.0).commit(sgd(purpose="train:churn"))
    reopened = PrivacyLedger(path, firm="acme")  # budget read back from the sidecar
    assert reopened.budget == Budget(epsilon=3.0, delta=DELTA)
    assert len(reopened.events) == 2
    assert reopened.spent() == pytest.approx(compose_epsilon([gaussian(), sgd()], delta=DELTA))
    assert set(reopened.spent_by_purpose()) == {"query:count", "train:churn"}
    # A fresh instance sees what another instance committed after it was opened.
    other = open_ledger(path, cap=3.0)
    reopened.commit(gaussian(5.0))
    assert len(other.events) == 3
    assert other.spent() == pytest.approx(reopened.spent())


def _rewrite_lines(path: Path, **fields: object) -> None:
    records = [json.loads(line) for line in path.read_text().splitlines()]
    for record in records:
        record.update(fields)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def test_stored_running_totals_are_never_trusted(path: Path) -> None:
    ledger = open_ledger(path, cap=3.0)
    ledger.commit(gaussian(2.5))
    ledger.commit(gaussian(2.5))
    honest = ledger.spent()
    stored = [json.loads(line)["cumulative_epsilon"] for line in path.read_text().splitlines()]
    assert stored[-1] == pytest.approx(honest)
    _rewrite_lines(path, cumulative_epsilon=0.0, epsilon=0.0)  # bogus totals and event ε
    assert ledger.spent() == pytest.approx(honest)
    assert open_ledger(path, cap=3.0).spent() == pytest.approx(honest)
    assert ledger.would_exceed(gaussian(1.0))


def test_malformed_line_names_file_and_line(path: Path) -> None:
    ledger = open_ledger(path)
    ledger.commit(gaussian())
    with path.open("a") as handle:
        handle.write('{"mechanism": "gaussian", "noise_multi\n')
    with pytest.raises(ConfigError, match=rf"{path}.*line 2"):
        ledger.spent()
    with pytest.raises(ConfigError, match="line 2"):
        read_ledger_events(path)
    with pytest.raises(ConfigError, match="line 2"):
        ledger.commit(gaussian())


def test_lines_of_another_firm_are_refused(path: Path) -> None:
    ledger = open_ledger(path)
    ledger.commit(gaussian())
    _rewrite_lines(path, firm="globex")
    with pytest.raises(ConfigError, match="globex"):
        ledger.spent()


# ------------------------------------------------------------------ budget sidecar


def test_budget_is_required_once_and_changes_are_recorded(path: Path) -> None:
    with pytest.raises(ConfigError, match="no privacy budget recorded"):
        _ = PrivacyLedger(path, firm="acme").budget
    open_ledger(path, cap=1.0)
    open_ledger(path, cap=1.0)  # unchanged: no new history entry
    raised = open_ledger(path, cap=3.0)
    assert raised.budget.epsilon == 3.0
    sidecar = path.with_name(path.name + ".budget.json")
    document = json.loads(sidecar.read_text())
    assert document["firm"] == "acme" and document["epsilon"] == 3.0
    assert [h["epsilon"] for h in document["history"]] == [1.0, 3.0]
    assert document["history"][1]["previous"] == {"epsilon": 1.0, "delta": DELTA}
    assert document["history"][1]["reason"] == "test budget"
    assert all(datetime.fromisoformat(h["timestamp"]).tzinfo for h in document["history"])
    assert PrivacyLedger(path, firm="acme").budget.epsilon == 3.0
    with pytest.raises(ConfigError, match="belongs to firm 'acme'"):
        PrivacyLedger(path, firm="globex")


def test_a_ledger_that_shrinks_while_open_is_refused(path: Path) -> None:
    ledger = open_ledger(path, cap=5.0)
    ledger.commit(gaussian(2.0))
    ledger.commit(gaussian(2.0))
    lines = path.read_text().splitlines()
    path.write_text(lines[0] + "\n")  # the last release "forgotten"
    with pytest.raises(LedgerTampered, match="held 2 a moment ago"):
        ledger.spent()
    path.unlink()  # or the whole file deleted
    with pytest.raises(LedgerTampered, match="deleted, truncated or replaced"):
        ledger.check(gaussian(100.0))


def test_the_budget_files_are_anchored_in_the_key_directory(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    first = anchored_budget_files(keys, firm="acme", ledger=tmp_path / "s1" / "budget.jsonl",
                                  audit_log=tmp_path / "s1" / "audit.jsonl", explicit=False)
    # the store moved: the default paths changed, the recorded budget continues
    moved = anchored_budget_files(keys, firm="acme", ledger=tmp_path / "s2" / "budget.jsonl",
                                  audit_log=tmp_path / "s2" / "audit.jsonl", explicit=False)
    assert moved == first
    # a config naming other files explicitly is refused: it would start a fresh budget
    with pytest.raises(LedgerTampered, match="would not start a new budget"):
        anchored_budget_files(keys, firm="acme", ledger=tmp_path / "fresh.jsonl",
                              audit_log=tmp_path / "fresh-audit.jsonl", explicit=True)
    with pytest.raises(ConfigError, match="belongs to firm 'acme'"):
        anchored_budget_files(keys, firm="globex", ledger=first.ledger,
                              audit_log=first.audit_log, explicit=False)


def test_lowering_the_cap_below_spending_leaves_nothing(path: Path) -> None:
    open_ledger(path, cap=5.0).commit(gaussian(1.0))
    lowered = open_ledger(path, cap=0.5)
    assert lowered.remaining() == 0.0
    assert lowered.would_exceed(gaussian(100.0))


def test_files_are_private(path: Path) -> None:
    ledger = open_ledger(path)
    ledger.commit(gaussian())
    for file in (path, path.with_name(path.name + ".budget.json")):
        assert stat.S_IMODE(file.stat().st_mode) == 0o600


@pytest.mark.parametrize(
    "budget", [(0.0, DELTA), (-1.0, DELTA), (float("inf"), DELTA), (1.0, 0.0), (1.0, 1.0)]
)
def test_invalid_budget_is_rejected(budget: tuple[float, float]) -> None:
    with pytest.raises(ValueError, match="budget"):
        Budget(epsilon=budget[0], delta=budget[1])


# ------------------------------------------------------------------ crash safety, concurrency

_CHILD_PRELUDE = """
import os, sys, time
from datetime import UTC, datetime
from pathlib import Path
from fedcrm.privacy.accounting import Mechanism, make_event
from fedcrm.privacy.errors import BudgetExhausted
from fedcrm.privacy.ledger import PrivacyLedger

def event(noise):
    return make_event(mechanism=Mechanism.GAUSSIAN, noise_multiplier=noise, sample_rate=1.0,
                      steps=1, delta=1e-5, purpose="child", now=datetime.now(UTC))
"""

_CRASH_CHILD = _CHILD_PRELUDE + """
path, stage, ready = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
ledger = PrivacyLedger(path, firm="acme")
real_fsync, real_replace = os.fsync, os.replace
fsyncs = 0

def hang():
    ready.touch()
    time.sleep(60)

def fsync(fd):
    global fsyncs
    fsyncs += 1
    if (stage, fsyncs) in {("fsync-file", 1), ("fsync-dir", 2)}:
        hang()
    real_fsync(fd)

def replace(src, dst):
    if stage == "replace":
        hang()
    real_replace(src, dst)

os.fsync, os.replace = fsync, replace
ledger.commit(event(5.0))
"""

_RACE_CHILD = _CHILD_PRELUDE + """
path, go = Path(sys.argv[1]), Path(sys.argv[2])
ledger = PrivacyLedger(path, firm="acme")
event(5.0)  # warm the accountant's cache before the race starts
Path(sys.argv[4]).touch()
while not go.exists():
    time.sleep(0.001)
ok = 0
for _ in range(int(sys.argv[3])):
    try:
        ledger.commit(event(5.0))
        ok += 1
    except BudgetExhausted:
        pass
print(ok)
"""


def _spawn(script: str, *args: object) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(script), *map(str, args)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def _wait_for(marker: Path, proc: subprocess.Popen[str], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not marker.exists():
        if proc.poll() is not None:
            pytest.fail(f"child exited early: {proc.stderr.read() if proc.stderr else ''}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("child never reached the commit stage")
        time.sleep(0.01)


@pytest.mark.parametrize(
    ("stage", "committed"), [("fsync-file", False), ("replace", False), ("fsync-dir", True)]
)
def test_sigkill_mid_commit_leaves_a_whole_ledger(
    path: Path, tmp_path: Path, stage: str, committed: bool
) -> None:
    ledger = open_ledger(path, cap=5.0)
    ledger.commit(gaussian(3.0))
    ledger.commit(gaussian(3.0))
    before = path.read_bytes()
    ready = tmp_path / "ready"
    proc = _spawn(_CRASH_CHILD, path, stage, ready)
    _wait_for(ready, proc)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL

    text = path.read_text()
    assert text.endswith("\n")
    events = read_ledger_events(path)  # every line parses
    assert len(events) == (3 if committed else 2)
    if not committed:
        assert path.read_bytes() == before
    # The dead writer's lock is gone and its temp file is swept by the next commit.
    ledger.commit(gaussian(3.0))
    assert len(ledger.events) == len(events) + 1
    assert not list(path.parent.glob(".*.tmp"))


def test_concurrent_commits_never_exceed_the_cap(path: Path, tmp_path: Path) -> None:
    fits = 6
    cap = compose_epsilon([gaussian(5.0)] * fits, delta=DELTA) * (1 + 1e-7)
    open_ledger(path, cap=cap)
    go = tmp_path / "go"
    ready = [tmp_path / f"ready{k}" for k in range(2)]
    children = [_spawn(_RACE_CHILD, path, go, 8, marker) for marker in ready]
    for marker, child in zip(ready, children, strict=True):
        _wait_for(marker, child)
    go.touch()
    outputs = [child.communicate(timeout=60) for child in children]
    assert all(child.returncode == 0 for child in children), [err for _, err in outputs]
    successes = sum(int(out.strip()) for out, _ in outputs)
    ledger = PrivacyLedger(path, firm="acme")
    assert successes == fits
    assert len(ledger.events) == fits  # no lost update
    assert ledger.spent() <= cap
