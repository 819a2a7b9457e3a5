"""Signed audit logs: a clean synthetic run verifies; each kind of tampering is caught precisely."""

from __future__ import annotations

import base64
import copy
import functools
import hashlib
import itertools
import json
import os
import random
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dp_accounting
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from dp_accounting.rdp import RdpAccountant

from fedcrm.audit.log import (
    GENESIS,
    AuditLog,
    EntryKind,
    data_prepared_payload,
    public_key_pem,
    raw_public_key,
)
from fedcrm.audit.verify import Failure, FailureKind, verify_log, verify_run
from fedcrm.privacy.errors import AuditError
from fedcrm.privacy.keys import public_key_id

FIRMS = ("acme", "globex")
DELTA = 1e-5
CAP = 4.0
ROUNDS = 3
REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------ reference ε (dp_accounting)

@functools.cache
def _single_epsilon(mechanism: str, nm: float, q: float, steps: int) -> float:
    one = RdpAccountant()
    one.compose(_event(mechanism, nm, q, steps))
    return float(one.get_epsilon(DELTA))


def _event(mechanism: str, nm: float, q: float, steps: int) -> dp_accounting.DpEvent:
    if mechanism == "laplace":
        return dp_accounting.SelfComposedDpEvent(dp_accounting.LaplaceDpEvent(nm), steps)
    base: dp_accounting.DpEvent = dp_accounting.GaussianDpEvent(nm)
    if mechanism == "subsampled_gaussian":
        base = dp_accounting.PoissonSampledDpEvent(q, base)
    return dp_accounting.SelfComposedDpEvent(base, steps)


class Ledger:
    """Test-side ledger: logs dp_release entries with ε from dp_accounting directly."""

    def __init__(self, log: AuditLog, *, cap: float = CAP) -> None:
        self.log, self.cap = log, cap
        self.accountant = RdpAccountant()

    def release(self, *, purpose: str = "churn_training", mechanism: str = "subsampled_gaussian",
                nm: float = 1.1, q: float = 0.02, steps: int = 60,
                epsilon_scale: float = 1.0, cap: float | None = None) -> str:
        self.accountant.compose(_event(mechanism, nm, q, steps))
        entry = self.log.append(EntryKind.DP_RELEASE, {
            "mechanism": mechanism, "noise_multiplier": nm, "sample_rate": q, "steps": steps,
            "delta": DELTA, "epsilon": _single_epsilon(mechanism, nm, q, steps) * epsilon_scale,
            "purpose": purpose, "timestamp": "2024-05-01T00:00:00+00:00",
            "context": {"model": "churn-mlp"}, "ledger_path": "budget/ledger.jsonl",
            "cumulative_epsilon": self.accountant.get_epsilon(DELTA),
            "epsilon_cap": self.cap if cap is None else cap,
        })
        return entry.hash


def _manifest(firm: str) -> dict[str, Any]:
    h = hashlib.sha256(firm.encode()).hexdigest()
    return {
        "firm": firm, "config_sha256": h, "store_hash": h,
        "key_ids": {"pseudonym": "pseudonym-v1-abc", "data": "data-v1-def"},
        "tables": {"customers": {
            "rows_read": 300, "rows_kept": 297, "rows_quarantined": 3, "sha256": h,
            "columns": [
                {"source": "cust_id", "name": "customer_id", "role": "id",
                 "policy": "pseudonymize"},
                {"source": "email", "role": "pii", "pii": "email", "policy": "drop"},
                {"source": "plan", "name": "plan", "role": "feature", "kind": "categorical"},
            ],
        }},
    }


@dataclass
class Run:
    root: Path
    fed_key: Ed25519PrivateKey
    firm_keys: dict[str, Ed25519PrivateKey]
    ledgers: dict[str, Ledger]

    def firm_log(self, firm: str) -> Path:
        return self.root / "firms" / firm / "audit.jsonl"

    @property
    def fed_log(self) -> Path:
        return self.root / "federation" / "audit.jsonl"

    def lines(self, path: Path) -> list[bytes]:
        return path.read_bytes().splitlines(keepends=True)

    def write_lines(self, path: Path, lines: list[bytes]) -> None:
        path.write_bytes(b"".join(lines))


def model_hash(firm: str, rnd: int) -> str:
    return hashlib.sha256(f"{firm}/{rnd}".encode()).hexdigest()


def build_run(root: Path) -> Run:
    """Two firms and a coordinator, ROUNDS rounds, one rejected update, real keys and ε."""
    fed_key = Ed25519PrivateKey.generate()
    (root / "federation").mkdir(parents=True)
    (root / "federation" / "signing.pub").write_bytes(public_key_pem(fed_key.public_key()))
    fed = AuditLog(root / "federation" / "audit.jsonl", signing_key=fed_key)
    keys, logs, ledgers = {}, {}, {}
    for firm in FIRMS:
        keys[firm] = Ed25519PrivateKey.generate()
        (root / "firms" / firm).mkdir(parents=True)
        (root / "firms" / firm / "signing.pub").write_bytes(public_key_pem(keys[firm].public_key()))
        logs[firm] = AuditLog(root / "firms" / firm / "audit.jsonl", signing_key=keys[firm])
        ledgers[firm] = Ledger(logs[firm])
        logs[firm].append(EntryKind.DATA_PREPARED, data_prepared_payload(_manifest(firm)))
        logs[firm].append(EntryKind.BUDGET_CHANGED, {"epsilon_cap": CAP, "delta": DELTA,
                                                     "reason": "initial budget"})
    ledgers["acme"].release(purpose="trend_stats", mechanism="gaussian", nm=10.0, q=1.0, steps=2)
    fed.append(EntryKind.RUN_STARTED, {
        "run_id": "run-1", "config_hash": "c" * 64, "strategy": "fedavg", "rounds": ROUNDS,
        "task": "churn", "firms": list(FIRMS)})
    for rnd in range(1, ROUNDS + 1):
        for firm in FIRMS:
            release = ledgers[firm].release()
            logs[firm].append(EntryKind.UPDATE_SENT, {
                "run_id": "run-1", "round": rnd, "task": "churn",
                "model_hash": model_hash(firm, rnd), "release": release})
            if firm == "globex" and rnd == 2:
                fed.append(EntryKind.UPDATE_REJECTED, {
                    "round": rnd, "firm": firm, "node_id": "node-2", "reason": "norm too large"})
            else:
                fed.append(EntryKind.UPDATE_ACCEPTED, {
                    "round": rnd, "firm": firm, "node_id": f"node-{FIRMS.index(firm) + 1}",
                    "update_hash": model_hash(firm, rnd)})
        fed.append(EntryKind.GLOBAL_MODEL, {
            "round": rnd, "model_hash": hashlib.sha256(f"global/{rnd}".encode()).hexdigest(),
            "metrics": {"auc": 0.6 + 0.05 * rnd, "loss": 0.7 - 0.05 * rnd}})
        fed.append(EntryKind.FIRM_HEADS, {
            "round": rnd, "heads": {f: logs[f].head().to_dict() for f in FIRMS}})
    fed.append(EntryKind.RUN_FINISHED, {"rounds_completed": ROUNDS})
    return Run(root=root, fed_key=fed_key, firm_keys=keys, ledgers=ledgers)


@pytest.fixture(scope="session")
def run_template(tmp_path_factory: pytest.TempPathFactory) -> Run:
    return build_run(tmp_path_factory.mktemp("template") / "run")


def copy_run(template: Run, root: Path) -> Run:
    """A private copy of the template run (building one costs seconds of ε computation)."""
    shutil.copytree(template.root, root)
    ledgers = {}
    for firm, ledger in template.ledgers.items():
        twin = Ledger(AuditLog(root / "firms" / firm / "audit.jsonl",
                               signing_key=template.firm_keys[firm]), cap=ledger.cap)
        twin.accountant = copy.deepcopy(ledger.accountant)
        ledgers[firm] = twin
    return Run(root=root, fed_key=template.fed_key, firm_keys=template.firm_keys, ledgers=ledgers)


@pytest.fixture
def run(run_template: Run, tmp_path: Path) -> Run:
    return copy_run(run_template, tmp_path / "run")


def firm_trusted(run: Run, firm: str) -> dict[str, Any]:
    pub = run.firm_keys[firm].public_key()
    return {public_key_id(pub): pub}


def first(failures: list[Failure] | tuple[Failure, ...], file: str) -> Failure:
    mine = [f for f in failures if f.file == file]
    assert mine, f"no failure in {file}: {failures}"
    return mine[0]


# ------------------------------------------------------------------ the clean run

def test_clean_run_verifies_and_summarises(run: Run) -> None:
    report = verify_run(run.root)
    assert report.ok, [str(f) for f in report.failures]
    acme = report.firms["acme"]
    assert acme.epsilon_cap == CAP
    assert [r["purpose"] for r in acme.releases] == ["trend_stats"] + ["churn_training"] * ROUNDS
    assert acme.releases_by_purpose["churn_training"]["count"] == ROUNDS
    assert acme.masking["customers"] == {"cust_id": "pseudonymize", "email": "drop",
                                         "plan": "feature"}
    assert acme.rows["customers"] == {"rows_read": 300, "rows_kept": 297, "rows_quarantined": 3}
    spent = [r["cumulative_recomputed"] for r in acme.releases]
    assert spent == sorted(spent) and 0 < spent[-1] <= CAP
    assert [r.participants for r in report.rounds] == [("acme", "globex"), ("acme",),
                                                      ("acme", "globex")]
    assert report.rounds[1].rejected[0]["reason"] == "norm too large"
    assert report.final_metrics["auc"] == pytest.approx(0.75)
    as_json = json.loads(report.to_json())
    assert as_json["ok"] is True and as_json["run"]["run_id"] == "run-1"


def test_entries_are_canonical_chained_and_files_private(run: Run) -> None:
    log = AuditLog(run.firm_log("acme"), signing_key=run.firm_keys["acme"])
    entries = log.entries()
    assert entries[0].prev == GENESIS
    assert [e.seq for e in entries] == list(range(1, len(entries) + 1))
    for a, b in itertools.pairwise(entries):
        assert b.prev == a.hash
    assert log.head().hash == entries[-1].hash and log.head().length == len(entries)
    lines = run.firm_log("acme").read_bytes().splitlines()
    assert hashlib.sha256(lines[-1]).hexdigest() == entries[-1].hash
    assert stat.S_IMODE(run.firm_log("acme").stat().st_mode) == 0o600
    assert entries[0].signer == public_key_id(run.firm_keys["acme"].public_key())


# ------------------------------------------------------------------ tampering, byte by byte

def _flip(path: Path, line: int, *, field: str | None = None, offset: int = 0) -> None:
    """Change one byte of one line: at ``offset`` into the value of ``"field":`` (or the line)."""
    lines = path.read_bytes().splitlines(keepends=True)
    raw = bytearray(lines[line - 1])
    if field is None:
        pos = offset
    else:
        start = raw.index(f'"{field}":'.encode()) + len(field) + 3
        pos = start + offset + (1 if raw[start] == ord('"') else 0)
    if field == "prev":  # stay a valid hex digit
        raw[pos] = ord("0") if raw[pos] != ord("0") else ord("1")
    else:
        raw[pos] ^= 0x01
    lines[line - 1] = bytes(raw)
    path.write_bytes(b"".join(lines))


@pytest.mark.parametrize(
    ("who", "line", "field", "offset", "kind"),
    [
        ("acme", 3, "steps", 0, FailureKind.BAD_SIGNATURE),  # a dp_release parameter
        ("acme", 5, "time", 3, FailureKind.BAD_SIGNATURE),
        ("acme", 4, "sig", 10, FailureKind.BAD_SIGNATURE),
        ("acme", 6, "prev", 5, FailureKind.BROKEN_CHAIN),
        ("globex", 2, "signer", 12, FailureKind.UNKNOWN_KEY),
        ("globex", 1, None, 0, FailureKind.MALFORMED),  # the opening brace
        ("federation", 2, "node_id", 2, FailureKind.BAD_SIGNATURE),
        ("federation", 4, "seq", 0, FailureKind.BROKEN_CHAIN),
    ],
)
def test_one_changed_byte_is_caught_at_its_line(run: Run, who: str, line: int, field: str | None,
                                               offset: int, kind: FailureKind) -> None:
    path = run.fed_log if who == "federation" else run.firm_log(who)
    _flip(path, line, field=field, offset=offset)
    report = verify_run(run.root)
    assert not report.ok
    got = first(report.failures, str(path.relative_to(run.root)))
    assert (got.line, got.kind) == (line, kind), str(got)


@pytest.mark.parametrize("seed", range(6))
def test_any_changed_byte_anywhere_is_caught_at_its_line(run: Run, seed: int) -> None:
    rng = random.Random(seed)
    path = rng.choice([run.fed_log, run.firm_log("acme"), run.firm_log("globex")])
    lines = run.lines(path)
    line = rng.randrange(1, len(lines) + 1)
    _flip(path, line, offset=rng.randrange(0, len(lines[line - 1]) - 1))
    got = first(verify_run(run.root).failures, str(path.relative_to(run.root)))
    assert got.line == line, str(got)
    assert got.kind in {FailureKind.MALFORMED, FailureKind.BAD_SIGNATURE,
                        FailureKind.BROKEN_CHAIN, FailureKind.UNKNOWN_KEY}


def test_removed_entry_breaks_the_chain_where_it_was(run: Run) -> None:
    path = run.firm_log("globex")
    lines = run.lines(path)
    del lines[3]
    run.write_lines(path, lines)
    got = first(verify_run(run.root).failures, "firms/globex/audit.jsonl")
    assert (got.line, got.kind) == (4, FailureKind.BROKEN_CHAIN)


def test_reordered_pair_breaks_the_chain(run: Run) -> None:
    path = run.fed_log
    lines = run.lines(path)
    lines[2], lines[3] = lines[3], lines[2]
    run.write_lines(path, lines)
    failures = verify_log(path, trusted_keys={public_key_id(run.fed_key.public_key()):
                                              run.fed_key.public_key()})
    assert (failures[0].line, failures[0].kind) == (3, FailureKind.BROKEN_CHAIN)


def test_firm_dropping_its_tail_after_the_head_was_recorded_is_caught(run: Run) -> None:
    path = run.firm_log("acme")
    lines = run.lines(path)
    run.write_lines(path, lines[:-2])  # the last update_sent and its release vanish
    assert verify_log(path, trusted_keys=firm_trusted(run, "acme")) == []  # alone it looks fine
    report = verify_run(run.root)
    got = first(report.failures, "firms/acme/audit.jsonl")
    assert (got.line, got.kind) == (len(lines) - 1, FailureKind.TRUNCATED_TAIL)
    assert any(f.kind is FailureKind.UNMATCHED_UPDATE and f.file == "federation/audit.jsonl"
               for f in report.failures)


def test_firm_rewriting_its_tail_shows_up_as_head_mismatch(run: Run) -> None:
    path = run.firm_log("acme")
    lines = run.lines(path)
    run.write_lines(path, lines[:-2])
    ledger = Ledger(AuditLog(path, signing_key=run.firm_keys["acme"]))
    ledger.accountant.compose(_event("gaussian", 10.0, 1.0, 2))
    for _ in range(ROUNDS - 1):
        ledger.accountant.compose(_event("subsampled_gaussian", 1.1, 0.02, 60))
    rewritten = ledger.release(nm=5.0)  # a cheaper release than the one really spent
    AuditLog(path, signing_key=run.firm_keys["acme"]).append(EntryKind.UPDATE_SENT, {
        "run_id": "run-1", "round": ROUNDS, "task": "churn", "model_hash": "e" * 64,
        "release": rewritten})
    assert verify_log(path, trusted_keys=firm_trusted(run, "acme")) == []
    got = first(verify_run(run.root).failures, "firms/acme/audit.jsonl")
    assert (got.line, got.kind) == (len(lines), FailureKind.HEAD_MISMATCH)


def test_partial_last_line_is_a_truncated_tail(run: Run) -> None:
    path = run.firm_log("globex")
    data = path.read_bytes()
    path.write_bytes(data[:-40])
    failures = verify_log(path, trusted_keys=firm_trusted(run, "globex"))
    assert (failures[0].line, failures[0].kind) == (len(data.splitlines()),
                                                    FailureKind.TRUNCATED_TAIL)


# ------------------------------------------------------------------ keys

def test_entry_signed_by_an_unregistered_key_is_unknown_key(run: Run) -> None:
    path = run.firm_log("globex")
    rogue = AuditLog(path, signing_key=Ed25519PrivateKey.generate())
    rogue.append(EntryKind.BUDGET_CHANGED, {"epsilon_cap": 100.0, "delta": DELTA})
    got = first(verify_run(run.root).failures, "firms/globex/audit.jsonl")
    assert (got.line, got.kind) == (len(run.lines(path)), FailureKind.UNKNOWN_KEY)


def test_key_rotation_hands_trust_to_the_new_key_and_retires_the_old(run: Run) -> None:
    path = run.firm_log("acme")
    old, new = run.firm_keys["acme"], Ed25519PrivateKey.generate()
    AuditLog(path, signing_key=old).append(EntryKind.KEY_ROTATED, {
        "new_key_id": public_key_id(new.public_key()),
        "new_public_key": base64.b64encode(raw_public_key(new.public_key())).decode()})
    AuditLog(path, signing_key=new).append(EntryKind.BUDGET_CHANGED,
                                           {"epsilon_cap": CAP, "delta": DELTA})
    assert verify_log(path, trusted_keys=firm_trusted(run, "acme")) == []
    AuditLog(path, signing_key=old).append(EntryKind.BUDGET_CHANGED,
                                           {"epsilon_cap": CAP, "delta": DELTA})
    failures = verify_log(path, trusted_keys=firm_trusted(run, "acme"))
    assert [(f.line, f.kind) for f in failures] == [(len(run.lines(path)), FailureKind.UNKNOWN_KEY)]


def test_pinned_keys_reject_a_swapped_public_key(run: Run) -> None:
    (run.root / "keys").mkdir()
    pins = {"federation": public_key_id(run.fed_key.public_key()),
            **{f: [public_key_id(k.public_key())] for f, k in run.firm_keys.items()}}
    (run.root / "keys" / "trusted.json").write_text(json.dumps(pins))
    assert verify_run(run.root).ok
    impostor = Ed25519PrivateKey.generate()
    (run.root / "firms" / "globex" / "signing.pub").write_bytes(
        public_key_pem(impostor.public_key()))
    report = verify_run(run.root)
    assert report.failures[0].file == "firms/globex/signing.pub"
    assert report.failures[0].kind is FailureKind.UNKNOWN_KEY


# ------------------------------------------------------------------ privacy semantics

def test_epsilon_that_does_not_follow_from_its_parameters_is_caught(run: Run) -> None:
    path = run.firm_log("globex")
    run.ledgers["globex"].release(epsilon_scale=0.5)  # claims half the ε the parameters give
    got = first(verify_run(run.root).failures, "firms/globex/audit.jsonl")
    assert (got.line, got.kind) == (len(run.lines(path)), FailureKind.EPSILON_MISMATCH)


def test_under_reported_cumulative_epsilon_is_caught(run: Run) -> None:
    path = run.firm_log("globex")
    ledger = Ledger(AuditLog(path, signing_key=run.firm_keys["globex"]))  # forgets past releases
    ledger.release()
    got = first(verify_run(run.root).failures, "firms/globex/audit.jsonl")
    assert (got.line, got.kind) == (len(run.lines(path)), FailureKind.EPSILON_MISMATCH)


def test_firm_over_its_budget_is_caught(run: Run) -> None:
    path = run.firm_log("acme")
    run.ledgers["acme"].release(nm=0.7, q=0.05, steps=400)  # far beyond ε = 4
    got = first(verify_run(run.root).failures, "firms/acme/audit.jsonl")
    assert (got.line, got.kind) == (len(run.lines(path)), FailureKind.BUDGET_EXCEEDED)


def test_logged_cap_above_the_governed_budget_does_not_help(run: Run) -> None:
    # the entry claims a cap of 1000, but the firm's budget_changed entry still says 4
    run.ledgers["acme"].release(nm=0.7, q=0.05, steps=400, cap=1000.0)
    got = first(verify_run(run.root).failures, "firms/acme/audit.jsonl")
    assert got.kind is FailureKind.BUDGET_EXCEEDED


@pytest.mark.parametrize("reference", ["random", "not_a_release", "another_update"])
def test_update_without_a_covering_release_is_caught(run: Run, reference: str) -> None:
    path = run.firm_log("globex")
    log = AuditLog(path, signing_key=run.firm_keys["globex"])
    if reference == "random":
        release = "ab" * 32
    elif reference == "not_a_release":
        release = log.entries()[0].hash  # the data_prepared entry
    else:
        release = next(e for e in log.entries() if e.kind is EntryKind.UPDATE_SENT).hash
    log.append(EntryKind.UPDATE_SENT, {"run_id": "run-1", "round": ROUNDS + 1, "task": "churn",
                                       "model_hash": "f" * 64, "release": release})
    got = first(verify_run(run.root).failures, "firms/globex/audit.jsonl")
    assert (got.line, got.kind) == (len(run.lines(path)), FailureKind.UNCOVERED_UPDATE)


def test_one_release_cannot_fund_two_different_models(run: Run) -> None:
    path = run.firm_log("globex")
    log = AuditLog(path, signing_key=run.firm_keys["globex"])
    last_release = [e for e in log.entries() if e.kind is EntryKind.DP_RELEASE][-1].hash
    log.append(EntryKind.UPDATE_SENT, {"run_id": "run-1", "round": ROUNDS, "task": "churn",
                                       "model_hash": "9" * 64, "release": last_release})
    got = first(verify_run(run.root).failures, "firms/globex/audit.jsonl")
    assert (got.line, got.kind) == (len(run.lines(path)), FailureKind.UNCOVERED_UPDATE)


def test_accepted_update_the_firm_never_sent_is_caught(run: Run) -> None:
    fed = AuditLog(run.fed_log, signing_key=run.fed_key)
    fed.append(EntryKind.UPDATE_ACCEPTED, {"round": 1, "firm": "globex", "node_id": "node-9",
                                           "update_hash": "7" * 64})
    got = first(verify_run(run.root).failures, "federation/audit.jsonl")
    assert (got.line, got.kind) == (len(run.lines(run.fed_log)), FailureKind.UNMATCHED_UPDATE)


def test_missing_firm_log_is_reported(run: Run) -> None:
    run.firm_log("globex").unlink()
    kinds = {f.kind for f in verify_run(run.root).failures}
    assert FailureKind.MISSING_LOG in kinds


def test_a_federation_log_without_run_finished_is_reported_incomplete(run: Run) -> None:
    """A run cut short (restart, crash) must not pass as a verified run."""
    run.write_lines(run.fed_log, run.lines(run.fed_log)[:-1])
    report = verify_run(run.root)
    assert [f.kind for f in report.failures] == [FailureKind.INCOMPLETE]
    assert report.failures[0].file == "federation/audit.jsonl"


def _resend(run: Run, firm: str, rnd: int, *, sent: str | None = None) -> None:
    log = AuditLog(run.firm_log(firm), signing_key=run.firm_keys[firm])
    update = [e for e in log.entries() if e.kind is EntryKind.UPDATE_SENT
              and e.payload["round"] == rnd][-1]
    log.append(EntryKind.UPDATE_RESENT, {
        "run_id": "run-1", "round": rnd, "task": "churn",
        "model_hash": update.payload["model_hash"], "sent": sent or update.hash})


def test_a_resent_update_is_one_release_and_is_reported_as_replayed(run: Run) -> None:
    _resend(run, "acme", ROUNDS)
    lines = run.lines(run.fed_log)  # the resumed attempt accepts the resend before it finishes
    fed = AuditLog(run.fed_log, signing_key=run.fed_key)
    run.write_lines(run.fed_log, lines[:-1])
    fed.append(EntryKind.RUN_RESUMED, {"run_id": "run-1", "completed_round": ROUNDS - 1,
                                       "attempt": 1})
    fed.append(EntryKind.UPDATE_ACCEPTED, {"round": ROUNDS, "firm": "acme", "node_id": "node-1",
                                           "update_hash": model_hash("acme", ROUNDS),
                                           "replayed": True})
    fed.append(EntryKind.FIRM_HEADS, {"round": ROUNDS, "heads": {
        f: AuditLog(run.firm_log(f), signing_key=run.firm_keys[f]).head().to_dict()
        for f in FIRMS}})
    fed.append(EntryKind.RUN_FINISHED, {"rounds_completed": ROUNDS})
    report = verify_run(run.root)
    assert report.ok, [str(f) for f in report.failures]
    assert [(u.firm, u.round) for u in report.replayed_updates] == [("acme", ROUNDS)]
    assert report.run["resumed"][0]["completed_round"] == ROUNDS - 1
    assert report.firms["acme"].updates_sent == ROUNDS  # sent once, resent once: one release


def test_a_resend_of_an_update_never_sent_is_caught(run: Run) -> None:
    _resend(run, "acme", 1, sent="f" * 64)
    got = first(verify_run(run.root).failures, "firms/acme/audit.jsonl")
    assert got.kind is FailureKind.UNCOVERED_UPDATE and "resent" in got.detail


def test_an_update_sent_but_never_accepted_is_reported_lost_not_rejected(run: Run) -> None:
    """globex's round-2 update was rejected (on its merits); acme's extra one never arrived."""
    log = AuditLog(run.firm_log("acme"), signing_key=run.firm_keys["acme"])
    release = run.ledgers["acme"].release()
    log.append(EntryKind.UPDATE_SENT, {"run_id": "run-1", "round": ROUNDS, "task": "churn",
                                       "model_hash": "5" * 64, "release": release})
    report = verify_run(run.root)
    assert [(u.firm, u.round, u.model_hash) for u in report.lost_updates] == [
        ("acme", ROUNDS, "5" * 64)
    ]


def test_a_deployed_runs_folder_is_assembled_from_each_partys_export(
    run: Run, tmp_path: Path
) -> None:
    from fedcrm.audit.assemble import assemble_run, export_firm_log

    coordinator = tmp_path / "coordinator-run"
    (coordinator / "federation").mkdir(parents=True)
    for name in ("audit.jsonl", "signing.pub"):
        shutil.copy(run.root / "federation" / name, coordinator / "federation" / name)
    exports = []
    for firm in FIRMS:
        export = export_firm_log(
            firm=firm, log=run.firm_log(firm), public_key=run.root / "firms" / firm / "signing.pub",
            out=tmp_path / f"{firm}.zip", run_id="run-1")
        assert export.updates_sent == ROUNDS and export.updates_resent == 0
        exports.append(export.path)
    assert not verify_run(coordinator).ok  # the coordinator's folder alone lacks the firms' logs
    folder = assemble_run(run_dir=coordinator, firm_exports=exports, out=tmp_path / "audit")
    assert verify_run(folder).ok
    with pytest.raises(AuditError, match="not empty"):
        assemble_run(run_dir=coordinator, firm_exports=exports, out=folder)


def test_an_export_with_anything_but_a_firms_log_and_key_is_refused(
    run: Run, tmp_path: Path
) -> None:
    import zipfile

    from fedcrm.audit.assemble import assemble_run, export_firm_log

    forged = tmp_path / "forged.zip"
    with zipfile.ZipFile(forged, "w") as zf:
        zf.writestr("firms/acme/audit.jsonl", run.firm_log("acme").read_bytes())
        zf.writestr("firms/acme/../../federation/audit.jsonl", b"{}")
    with pytest.raises(AuditError, match="holds only"):
        assemble_run(run_dir=run.root, firm_exports=[forged], out=tmp_path / "out")
    broken = tmp_path / "broken.jsonl"
    broken.write_bytes(run.firm_log("acme").read_bytes().replace(b'"round":1', b'"round":7', 1))
    with pytest.raises(AuditError, match="does not verify"):
        export_firm_log(firm="acme", log=broken, public_key=run.root / "firms/acme/signing.pub",
                        out=tmp_path / "acme.zip")


# ------------------------------------------------------------------ the writer

@pytest.mark.parametrize(
    "payload",
    [
        {"tables": {"customers": {"columns": [{"source": "email", "sample": "x"}]}}},
        {"tables": {"customers": {"note": "contact anna.meyer@mail.example.com"}}},
        {"tables": {}, "values": [1, 2, 3]},
        {"tables": {}, "key": "-----BEGIN PRIVATE KEY-----"},
        {"schema": {}},  # lacks tables
    ],
)
def test_writer_refuses_raw_values_keys_and_bad_payloads(tmp_path: Path,
                                                         payload: dict[str, Any]) -> None:
    log = AuditLog(tmp_path / "audit.jsonl", signing_key=Ed25519PrivateKey.generate())
    with pytest.raises(AuditError):
        log.append(EntryKind.DATA_PREPARED, payload)
    assert not (tmp_path / "audit.jsonl").exists()


def test_writer_refuses_unknown_kind_and_damaged_log(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit.jsonl", signing_key=Ed25519PrivateKey.generate())
    with pytest.raises(AuditError, match="unknown audit entry kind"):
        log.append("data_prepped", {"tables": {}})
    log.append(EntryKind.RUN_FINISHED, {})
    (tmp_path / "audit.jsonl").write_bytes(b'{"broken":\n')
    with pytest.raises(AuditError, match="damaged"):
        log.append(EntryKind.RUN_FINISHED, {})


_WRITER = textwrap.dedent("""
    import sys
    from pathlib import Path
    from cryptography.hazmat.primitives import serialization
    from fedcrm.audit.log import AuditLog, EntryKind
    key = serialization.load_pem_private_key(Path(sys.argv[2]).read_bytes(), password=None)
    log = AuditLog(Path(sys.argv[1]), signing_key=key)
    filler = "x" * 20000  # large entries make each rewrite take a while
    i = 0
    while True:
        i += 1
        log.append(EntryKind.GLOBAL_MODEL, {"round": i, "model_hash": "a" * 64,
                                            "metrics": {"note": filler}})
        print(i, flush=True)
""")


def test_sigkilled_writer_mid_append_leaves_a_valid_log(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization

    key = Ed25519PrivateKey.generate()
    key_file = tmp_path / "signing.key"
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    path = tmp_path / "audit.jsonl"
    trusted = {public_key_id(key.public_key()): key.public_key()}
    rng = random.Random(7)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for _ in range(3):  # each writer start costs seconds of imports on a busy machine
        proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(path), str(key_file)],
                                stdout=subprocess.PIPE, env=env)
        assert proc.stdout is not None
        proc.stdout.readline()  # at least one append done
        time.sleep(rng.uniform(0.0, 0.3))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
        assert verify_log(path, trusted_keys=trusted) == []
    n = AuditLog(path, signing_key=key).head().length
    AuditLog(path, signing_key=key).append(EntryKind.RUN_FINISHED, {})
    assert verify_log(path, trusted_keys=trusted) == []
    assert AuditLog(path, signing_key=key).head().length == n + 1


def test_auditor_flags_a_composition_the_second_implementation_disagrees_with(
    run: Run, monkeypatch: pytest.MonkeyPatch
) -> None:
    import fedcrm.audit.epsilon as epsilon

    assert verify_log(run.firm_log("acme"), trusted_keys=firm_trusted(run, "acme")) == []
    real = epsilon._opacus_curve.__wrapped__
    monkeypatch.setattr(epsilon, "_opacus_curve", lambda p: tuple(2 * x for x in real(p)))
    failures = verify_log(run.firm_log("acme"), trusted_keys=firm_trusted(run, "acme"))
    assert any(
        f.kind is FailureKind.EPSILON_MISMATCH and "Opacus" in f.detail for f in failures
    ), failures
