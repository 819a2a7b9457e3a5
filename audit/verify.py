"""Independent verification of a run's audit logs (read-only: the auditor's tool).

:func:`verify_log` checks one log: canonical form, hash chain, signatures, payload shapes, ε
of every ``dp_release`` recomputed from its parameters (:mod:`fedcrm.audit.epsilon`), the firm's
budget, and that every ``update_sent`` is funded by an earlier ``dp_release``.
:func:`verify_run` checks every log of a run folder and cross-checks them: firm heads recorded by
the coordinator, every accepted update matched by the firm's ``update_sent``, and that the run
finished (a federation log without ``run_finished`` is reported incomplete). It also lists the
updates a firm released for the run that the coordinator never accepted (lost: charged, never
used) and the updates sent twice after a restart (replayed: one release, no second charge).
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from fedcrm.audit.epsilon import (
    REL_TOL,
    CrossCheck,
    PrefixEpsilon,
    ReleaseParams,
    cross_check,
    matches_logged,
)
from fedcrm.audit.log import (
    FEDERATION_DIR,
    FIRMS_DIR,
    GENESIS,
    KEYS_DIR,
    LOG_FILE,
    PUBLIC_KEY_FILE,
    TRUSTED_FILE,
    AuditEntry,
    EntryKind,
    _payload_problem,
    canonical_json,
    load_public_keys,
    sha256_hex,
)
from fedcrm.privacy.errors import AuditError, KeyFileError
from fedcrm.privacy.keys import public_key_id
from fedcrm.privacy.secure_sum import TRAINING_SUM_QUERY


class FailureKind(StrEnum):
    """Why verification failed at one place in one file."""

    MALFORMED = "malformed"  # not JSON, missing fields, not canonical, bad payload
    BROKEN_CHAIN = "broken_chain"  # prev hash or seq does not follow the previous entry
    TRUNCATED_TAIL = "truncated_tail"  # log shorter than a recorded head, or a partial last line
    BAD_SIGNATURE = "bad_signature"
    UNKNOWN_KEY = "unknown_key"  # signed by a key the auditor does not trust
    EPSILON_MISMATCH = "epsilon_mismatch"  # logged ε does not follow from the logged parameters
    BUDGET_EXCEEDED = "budget_exceeded"  # composed ε of a firm's releases above its cap
    HEAD_MISMATCH = "head_mismatch"  # firm log differs from the head the coordinator recorded
    UNCOVERED_UPDATE = "uncovered_update"  # update_sent not funded by an earlier dp_release
    UNMATCHED_UPDATE = "unmatched_update"  # update_accepted without a matching update_sent
    UNCOVERED_ANSWER = "uncovered_answer"  # query_answered not funded by an earlier query release
    UNMATCHED_ANSWER = "unmatched_answer"  # query_result uses an answer no firm log records
    UNCOVERED_OVERLAP = "uncovered_overlap"  # overlap step not funded by its overlap release
    UNMATCHED_OVERLAP = "unmatched_overlap"  # overlap_result uses a set no firm log records
    MISSING_LOG = "missing_log"  # a log or public key the run layout requires is absent
    UNEXPECTED_LOG = "unexpected_log"  # a firm folder of a firm that never took part in the run
    INCOMPLETE = "incomplete"  # the federation log has no run_finished: the run did not finish


# Required payload fields per kind, with the JSON types they must have.
@dataclass(frozen=True)
class Failure:
    """One verification failure: ``line`` is 1-based (0 = the file as a whole)."""

    file: str
    line: int
    kind: FailureKind
    detail: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.kind.value}: {self.detail}"


# --------------------------------------------------------------------------------------------
# Verifying one log


@dataclass
class _Scan:
    """What one pass over a log found (internal; verify_run cross-checks these)."""

    path: Path
    label: str
    line_hashes: list[str] = field(default_factory=list)
    valid: list[tuple[int, AuditEntry]] = field(default_factory=list)  # signature-checked
    failures: list[Failure] = field(default_factory=list)
    releases: list[dict[str, Any]] = field(default_factory=list)
    cross_check: CrossCheck | None = None

    def fail(self, line: int, kind: FailureKind, detail: str) -> None:
        self.failures.append(Failure(self.label, line, kind, detail))


def _verify_signature(entry: AuditEntry, public_key: Ed25519PublicKey) -> bool:
    try:
        sig = base64.b64decode(entry.sig, validate=True)
        if base64.b64encode(sig).decode("ascii") != entry.sig:  # no malleable padding bits
            return False
        public_key.verify(sig, canonical_json(entry.unsigned()))
    except (InvalidSignature, binascii.Error, ValueError):
        return False
    return True


def _scan_log(path: Path, trusted_keys: Mapping[str, Ed25519PublicKey], *,
              label: str | None = None) -> _Scan:
    scan = _Scan(path=path, label=label or str(path))
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        scan.fail(0, FailureKind.MISSING_LOG, f"{path} does not exist")
        return scan
    active: dict[str, Ed25519PublicKey] = dict(trusted_keys)
    lines = data.split(b"\n")
    partial_tail = lines[-1] != b""
    if not partial_tail:
        lines = lines[:-1]
    expected_prev, expected_seq = GENESIS, 1
    for n, raw in enumerate(lines, start=1):
        this_hash = sha256_hex(raw)
        scan.line_hashes.append(this_hash)
        prev_expected, seq_expected = expected_prev, expected_seq
        expected_prev, expected_seq = this_hash, expected_seq + 1
        if partial_tail and n == len(lines):
            scan.fail(n, FailureKind.TRUNCATED_TAIL, "last line has no newline (partial write?)")
            continue
        try:
            obj = json.loads(raw.decode("utf-8"))
            if not isinstance(obj, dict):
                raise ValueError("entry is not a JSON object")
            entry = AuditEntry.from_dict(obj)
        except (ValueError, TypeError) as exc:
            scan.fail(n, FailureKind.MALFORMED, f"unreadable entry ({str(exc)[:120]})")
            continue
        expected_seq = entry.seq + 1
        if entry.canonical() != raw:
            scan.fail(n, FailureKind.MALFORMED, "entry is not in canonical JSON form")
            continue
        if entry.prev != prev_expected:
            scan.fail(n, FailureKind.BROKEN_CHAIN,
                      "prev does not equal the hash of the previous entry "
                      "(an entry was removed, inserted, reordered or changed)")
        elif entry.seq != seq_expected:
            scan.fail(n, FailureKind.BROKEN_CHAIN,
                      f"seq {entry.seq} follows seq {seq_expected - 1}")
        public_key = active.get(entry.signer)
        if public_key is None:
            scan.fail(n, FailureKind.UNKNOWN_KEY,
                      f"signed by {entry.signer[:40]!r}, which is not a trusted key for this log")
            continue
        if not _verify_signature(entry, public_key):
            scan.fail(n, FailureKind.BAD_SIGNATURE, f"signature by {entry.signer} does not verify")
            continue
        problem = _payload_problem(entry.kind, entry.payload)
        if problem:
            scan.fail(n, FailureKind.MALFORMED, problem)
            continue
        scan.valid.append((n, entry))
        if entry.kind is EntryKind.KEY_ROTATED:
            _rotate(scan, n, entry, active)
    _check_semantics(scan)
    return scan


def _rotate(scan: _Scan, n: int, entry: AuditEntry, active: dict[str, Ed25519PublicKey]) -> None:
    try:
        new_key = Ed25519PublicKey.from_public_bytes(
            base64.b64decode(entry.payload["new_public_key"], validate=True))
    except (binascii.Error, ValueError):
        scan.fail(n, FailureKind.MALFORMED, "key_rotated new_public_key is not a raw Ed25519 key")
        return
    if public_key_id(new_key) != entry.payload["new_key_id"]:
        scan.fail(n, FailureKind.MALFORMED, "key_rotated new_key_id does not match new_public_key")
        return
    active.pop(entry.signer, None)  # the rotating key is retired
    active[public_key_id(new_key)] = new_key


def _check_semantics(scan: _Scan) -> None:
    """Per-log checks on signed entries: ε per release, budget, update coverage."""
    by_hash = {e.hash: (n, e) for n, e in scan.valid}
    prefix = PrefixEpsilon()
    accountant_cap: float | None = None
    budget_delta: float | None = None
    funded: dict[str, str] = {}
    blinded: set[str] = set()
    reblinded: set[str] = set()
    last_release_line = 0
    for n, entry in scan.valid:
        p = entry.payload
        if entry.kind is EntryKind.BUDGET_CHANGED:
            accountant_cap, budget_delta = float(p["epsilon_cap"]), float(p["delta"])
        elif entry.kind is EntryKind.DP_RELEASE:
            params = ReleaseParams.from_payload(p)
            logged = float(p["epsilon"])
            ok, ref = matches_logged(logged, params)
            if not ok:
                scan.fail(n, FailureKind.EPSILON_MISMATCH,
                          f"logged ε={logged:.6g} but {params.mechanism.value} with "
                          f"σ={params.noise_multiplier:g}, q={params.sample_rate:g}, "
                          f"steps={params.steps}, δ={params.delta:g} gives ε={ref:.6g}")
            delta = budget_delta if budget_delta is not None else params.delta
            cap = float(p["epsilon_cap"])
            if accountant_cap is not None:
                cap = min(cap, accountant_cap)
            cumulative = prefix.add(params, delta=delta)
            logged_cum = float(p["cumulative_epsilon"])
            if logged_cum > cap or cumulative > cap * (1 + REL_TOL):
                scan.fail(n, FailureKind.BUDGET_EXCEEDED,
                          f"'{str(p['purpose'])[:60]}' brings composed ε to {cumulative:.6g} "
                          f"(logged {logged_cum:.6g}) at δ={delta:g}, above the cap ε={cap:g}")
            elif logged_cum < cumulative * (1 - REL_TOL):
                scan.fail(n, FailureKind.EPSILON_MISMATCH,
                          f"cumulative ε logged as {logged_cum:.6g} but the releases so far "
                          f"compose to {cumulative:.6g} at δ={delta:g} (under-reported)")
            scan.releases.append({
                "line": n, "time": entry.time, "purpose": str(p["purpose"]),
                "mechanism": params.mechanism.value, "epsilon": logged,
                "epsilon_recomputed": ref,
                "cumulative_epsilon": logged_cum, "cumulative_recomputed": cumulative,
                "epsilon_cap": cap, "delta": delta, "hash": entry.hash,
            })
            last_release_line = n
        elif entry.kind is EntryKind.UPDATE_SENT:
            release = str(p["release"])
            target = by_hash.get(release)
            if target is None or target[0] >= n or target[1].kind is not EntryKind.DP_RELEASE:
                scan.fail(n, FailureKind.UNCOVERED_UPDATE,
                          f"round {p['round']} update references no earlier dp_release "
                          f"(release={release[:16]}…)")
            elif funded.setdefault(release, str(p["model_hash"])) != str(p["model_hash"]):
                scan.fail(n, FailureKind.UNCOVERED_UPDATE,
                          f"round {p['round']} update reuses release line {target[0]}, which "
                          "already funded a different model")
        elif entry.kind is EntryKind.QUERY_ANSWERED:
            release = str(p["release"])
            target = by_hash.get(release)
            if (
                target is None or target[0] >= n or target[1].kind is not EntryKind.DP_RELEASE
                or str(target[1].payload["purpose"]) != f"query:{p['query']}"
            ):
                scan.fail(n, FailureKind.UNCOVERED_ANSWER,
                          f"answer to query {str(p['query_id'])[:40]} references no earlier "
                          f"query release (release={release[:16]}…)")
            elif funded.setdefault(release, str(p["answer_hash"])) != str(p["answer_hash"]):
                scan.fail(n, FailureKind.UNCOVERED_ANSWER,
                          f"answer to query {str(p['query_id'])[:40]} reuses release line "
                          f"{target[0]}, which already funded a different release")
        elif entry.kind is EntryKind.OVERLAP_BLINDED:
            release = str(p["release"])
            target = by_hash.get(release)
            oid = str(p["overlap_id"])
            if (
                target is None or target[0] >= n or target[1].kind is not EntryKind.DP_RELEASE
                or str(target[1].payload["purpose"]) != f"overlap:{p['overlap']}"
            ):
                scan.fail(n, FailureKind.UNCOVERED_OVERLAP,
                          f"blinded set of overlap {oid[:40]} references no earlier overlap "
                          f"release (release={release[:16]}…)")
            elif funded.setdefault(release, str(p["sent_hash"])) != str(p["sent_hash"]):
                scan.fail(n, FailureKind.UNCOVERED_OVERLAP,
                          f"blinded set of overlap {oid[:40]} reuses release line {target[0]}, "
                          "which already funded a different release")
            elif oid in blinded:
                scan.fail(n, FailureKind.UNCOVERED_OVERLAP,
                          f"overlap {oid[:40]} was blinded twice")
            blinded.add(oid)
        elif entry.kind is EntryKind.OVERLAP_REBLINDED:
            oid = str(p["overlap_id"])
            if oid not in blinded or oid in reblinded:
                scan.fail(n, FailureKind.UNCOVERED_OVERLAP,
                          f"matches of overlap {oid[:40]} sent without this firm's earlier "
                          "blinded set, or a second time")
            reblinded.add(oid)
        elif entry.kind is EntryKind.UPDATE_RESENT:
            target = by_hash.get(str(p["sent"]))
            if (
                target is None or target[0] >= n or target[1].kind is not EntryKind.UPDATE_SENT
                or any(target[1].payload.get(k) != p[k] for k in ("run_id", "round", "model_hash"))
            ):
                scan.fail(n, FailureKind.UNCOVERED_UPDATE,
                          f"round {p['round']} update resent without an earlier update_sent of the "
                          "same run, round and model (a resend is never a new release)")
    if prefix.releases:
        delta = float(scan.releases[-1]["delta"])
        both = cross_check(prefix.releases, delta=delta)
        scan.cross_check = both
        if not both.agrees:
            scan.fail(last_release_line, FailureKind.EPSILON_MISMATCH,
                      f"the releases compose to ε={both.dp_accounting:.6g} by dp_accounting but "
                      f"ε={both.opacus:.6g} by Opacus's RDP analysis at δ={delta:g}")


def verify_log(path: Path, *, trusted_keys: Mapping[str, Ed25519PublicKey]) -> list[Failure]:
    """Check one log: canonical form, hash chain, signatures by ``trusted_keys`` (key id → key;
    ``key_rotated`` entries signed by a trusted key hand trust to the new key and retire the
    old one), payload shapes, ε of every ``dp_release``, the firm's budget and that every
    ``update_sent`` is funded by an earlier ``dp_release``. Returns failures in file order."""
    return _scan_log(Path(path), trusted_keys).failures


# --------------------------------------------------------------------------------------------
# Verifying a run


@dataclass(frozen=True)
class FirmSummary:
    firm: str
    log_length: int
    head: str
    signers: tuple[str, ...]
    epsilon_cap: float | None
    delta: float | None
    releases: tuple[Mapping[str, Any], ...]
    releases_by_purpose: Mapping[str, Mapping[str, float]]
    masking: Mapping[str, Mapping[str, str]]
    rows: Mapping[str, Mapping[str, int]]
    updates_sent: int
    budget_changes: tuple[Mapping[str, Any], ...] = ()  # every cap change, signed, with why
    queries_answered: int = 0
    overlaps_counted: int = 0

    @property
    def epsilon_spent(self) -> float:
        return float(self.releases[-1]["cumulative_recomputed"]) if self.releases else 0.0


@dataclass(frozen=True)
class RoundSummary:
    round: int
    participants: tuple[str, ...]
    rejected: tuple[Mapping[str, Any], ...]
    model_hash: str | None
    metrics: Mapping[str, Any]


@dataclass(frozen=True)
class UpdateFinding:
    """A firm's update for one round of the run that the auditor points out (not a failure)."""

    firm: str
    round: int
    model_hash: str


@dataclass(frozen=True)
class VerificationReport:
    run_dir: str
    failures: tuple[Failure, ...]
    run: Mapping[str, Any]
    firms: Mapping[str, FirmSummary]
    rounds: tuple[RoundSummary, ...]
    final_metrics: Mapping[str, Any]
    queries: tuple[Mapping[str, Any], ...] = ()
    overlaps: tuple[Mapping[str, Any], ...] = ()
    lost_updates: tuple[UpdateFinding, ...] = ()  # sent (charged), never accepted
    replayed_updates: tuple[UpdateFinding, ...] = ()  # one release sent again after a restart

    @property
    def ok(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "run_dir": self.run_dir,
            "failures": [asdict(f) | {"kind": f.kind.value} for f in self.failures],
            "run": dict(self.run),
            "firms": {name: asdict(s) | {"epsilon_spent": s.epsilon_spent}
                      for name, s in self.firms.items()},
            "rounds": [asdict(r) for r in self.rounds],
            "final_metrics": dict(self.final_metrics),
            "lost_updates": [asdict(u) for u in self.lost_updates],
            "replayed_updates": [asdict(u) for u in self.replayed_updates],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True, ensure_ascii=False,
                          default=str)


def _rel(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)


def _log_keys(log_dir: Path, name: str, root: Path, pins: Mapping[str, Sequence[str]] | None,
              failures: list[Failure]) -> dict[str, Ed25519PublicKey]:
    pub = log_dir / PUBLIC_KEY_FILE
    try:
        keys = load_public_keys(pub)
    except KeyFileError as exc:
        failures.append(Failure(_rel(pub, root), 0, FailureKind.MISSING_LOG, str(exc)))
        return {}
    if pins is None:
        return keys
    allowed = set(pins.get(name, ()))
    for kid in sorted(set(keys) - allowed):
        failures.append(Failure(_rel(pub, root), 0, FailureKind.UNKNOWN_KEY,
                                f"{kid} is not pinned for '{name}' in {KEYS_DIR}/{TRUSTED_FILE}"))
    return {k: v for k, v in keys.items() if k in allowed}


def _load_pins(root: Path, failures: list[Failure]) -> dict[str, list[str]] | None:
    path = root / KEYS_DIR / TRUSTED_FILE
    if not path.exists():
        return None
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(raw, dict):
            raise ValueError("not an object")
        return {str(k): [v] if isinstance(v, str) else [str(x) for x in v] for k, v in raw.items()}
    except (ValueError, TypeError):
        failures.append(Failure(_rel(path, root), 0, FailureKind.MALFORMED,
                                'expected {"federation": "ed25519:…", "<firm>": ["ed25519:…"]}'))
        return {}


def _firm_summary(firm: str, scan: _Scan) -> FirmSummary:
    cap: float | None = None
    delta: float | None = None
    by_purpose: dict[str, dict[str, float]] = {}
    for rel in scan.releases:
        cap, delta = float(rel["epsilon_cap"]), float(rel["delta"])
        slot = by_purpose.setdefault(rel["purpose"], {"count": 0, "epsilon": 0.0})
        slot["count"] += 1
        slot["epsilon"] += float(rel["epsilon"])
    masking: dict[str, dict[str, str]] = {}
    rows: dict[str, dict[str, int]] = {}
    budget_changes: list[dict[str, Any]] = []
    updates = queries = overlaps = 0
    for _, entry in scan.valid:
        if entry.kind is EntryKind.BUDGET_CHANGED:
            budget_changes.append({
                "time": entry.time, "epsilon_cap": float(entry.payload["epsilon_cap"]),
                "delta": float(entry.payload["delta"]),
                "reason": str(entry.payload.get("reason", "")),
            })
            if cap is None:
                cap, delta = float(entry.payload["epsilon_cap"]), float(entry.payload["delta"])
        if entry.kind is EntryKind.UPDATE_SENT:
            updates += 1
        if entry.kind is EntryKind.QUERY_ANSWERED:
            queries += 1
        if entry.kind is EntryKind.OVERLAP_BLINDED:
            overlaps += 1
        if entry.kind is not EntryKind.DATA_PREPARED:
            continue
        for table, spec in dict(entry.payload["tables"]).items():
            if not isinstance(spec, dict):
                continue
            policies: dict[str, str] = {}
            for col in spec.get("columns", []):
                if isinstance(col, dict):
                    label = str(col.get("source") or col.get("name") or "?")
                    policies[label] = str(col.get("policy") or col.get("role") or "kept")
            masking[str(table)] = policies
            rows[str(table)] = {k: int(v) for k, v in spec.items()
                                if k.startswith("rows") and isinstance(v, int)}
    return FirmSummary(
        firm=firm, log_length=len(scan.line_hashes),
        head=scan.line_hashes[-1] if scan.line_hashes else GENESIS,
        signers=tuple(sorted({e.signer for _, e in scan.valid})),
        epsilon_cap=cap, delta=delta, releases=tuple(scan.releases),
        releases_by_purpose=by_purpose, masking=masking, rows=rows, updates_sent=updates,
        budget_changes=tuple(budget_changes), queries_answered=queries,
        overlaps_counted=overlaps,
    )


def _cross_check(fed: _Scan, firm_scans: Mapping[str, _Scan],
                 failures: list[Failure]) -> None:
    seen: set[tuple[str, int, FailureKind]] = set()

    def add(f: Failure) -> None:
        if (f.file, f.line, f.kind) not in seen:
            seen.add((f.file, f.line, f.kind))
            failures.append(f)

    run_id: str | None = None
    for n, entry in fed.valid:
        p = entry.payload
        if entry.kind is EntryKind.RUN_STARTED:
            run_id = str(p["run_id"])
        elif entry.kind is EntryKind.FIRM_HEADS:
            for firm, head in p["heads"].items():
                scan = firm_scans.get(firm)
                if scan is None:
                    add(Failure(fed.label, n, FailureKind.MISSING_LOG,
                                f"heads recorded for firm {firm!r}, but its log is not in the run"))
                    continue
                length, want = int(head["length"]), str(head["hash"])
                have = len(scan.line_hashes)
                if length > have:
                    add(Failure(scan.label, have + 1, FailureKind.TRUNCATED_TAIL,
                                f"{fed.label}:{n} recorded {length} entries (round "
                                f"{p['round']}), the log has only {have}"))
                elif (scan.line_hashes[length - 1] if length else GENESIS) != want:
                    add(Failure(scan.label, length, FailureKind.HEAD_MISMATCH,
                                f"entry {length} differs from the head {want[:16]}… recorded at "
                                f"{fed.label}:{n} (round {p['round']}); the log was rewritten"))
        elif entry.kind is EntryKind.UPDATE_ACCEPTED:
            firm, rnd, uh = str(p["firm"]), int(p["round"]), str(p["update_hash"])
            scan = firm_scans.get(firm)
            match = scan is not None and any(
                e.kind is EntryKind.UPDATE_SENT and int(e.payload["round"]) == rnd
                and e.payload["model_hash"] == uh
                and (run_id is None or e.payload["run_id"] == run_id)
                for _, e in scan.valid
            )
            if not match:
                add(Failure(fed.label, n, FailureKind.UNMATCHED_UPDATE,
                            f"round {rnd} update {uh[:16]}… accepted from {firm!r} has no "
                            "matching update_sent in that firm's log"))
        elif entry.kind is EntryKind.QUERY_RESULT:
            _cross_check_query(fed, n, p, firm_scans, add)
        elif entry.kind is EntryKind.SECURE_SUM_RESULT:
            # Every firm counted in a secure sum logged (signed) that it sent its masked input
            # for exactly that sum.
            for firm in p["firms"]:
                scan = firm_scans.get(str(firm))
                match = scan is not None and any(
                    e.kind is EntryKind.SECURE_SUM and e.payload["step"] == "mask"
                    and e.payload["spec_hash"] == p["spec_hash"]
                    for _, e in scan.valid
                )
                if not match:
                    add(Failure(fed.label, n, FailureKind.UNMATCHED_UPDATE,
                                f"secure sum {p['query']!r} of round {p['round']} counts "
                                f"{firm!r}, whose log has no masked input for it"))
        elif entry.kind is EntryKind.OVERLAP_RESULT:
            _cross_check_overlap(fed, n, p, firm_scans, add)


def _cross_check_query(fed: _Scan, n: int, p: Mapping[str, Any],
                       firm_scans: Mapping[str, _Scan], add: Any) -> None:
    """A query's result is tied to the query it logged and to the firms' own answers: every
    answer it names is a ``query_answered`` of the same query id and fingerprint in that firm's
    log; a completed result has one ``query_started``, at least min_firms such answers, is the
    only result of its query, and - when its answers were summed securely - matches a logged
    secure sum of exactly those firms with its hash."""
    qid = str(p["query_id"])
    started = [e.payload for _, e in fed.valid
               if e.kind is EntryKind.QUERY_STARTED and e.payload["query_id"] == qid]
    spec = _spec_of(str(started[0]["spec"])) if started else {}
    fingerprint = str(started[0]["fingerprint"]) if started else None

    def fail(detail: str) -> None:
        add(Failure(fed.label, n, FailureKind.UNMATCHED_ANSWER, f"query {qid[:40]}: {detail}"))

    answers = {str(f): str(h) for f, h in dict(p["answers"]).items()}
    for firm, want in answers.items():
        scan = firm_scans.get(firm)
        # a secure answer is recorded without a hash: the coordinator never saw it alone
        match = scan is not None and any(
            e.kind is EntryKind.QUERY_ANSWERED and e.payload["query_id"] == qid
            and (not want or e.payload["answer_hash"] == want)
            and (fingerprint is None or e.payload["fingerprint"] == fingerprint)
            for _, e in scan.valid
        )
        if not match:
            fail(f"used an answer from {firm!r} that has no matching query_answered (same "
                 "query id and fingerprint) in that firm's log")
    if p["status"] != "completed":
        return
    if not started:
        fail("a completed result without a query_started entry")
        return
    results = [e for _, e in fed.valid
               if e.kind is EntryKind.QUERY_RESULT and e.payload["query_id"] == qid]
    if len(results) > 1:
        fail(f"{len(results)} results logged for one query")
    min_firms = int(spec.get("min_firms", 1))
    if len(answers) < min_firms:
        fail(f"a completed result of {len(answers)} answer(s), fewer than min_firms={min_firms}")
    if any(not h for h in answers.values()):
        sums = [e.payload for _, e in fed.valid if e.kind is EntryKind.SECURE_SUM_RESULT
                and e.payload["run_id"] == qid and e.payload["sum_hash"] == p["sum_hash"]]
        if not sums or sorted(map(str, sums[0]["firms"])) != sorted(answers):
            fail("a secure result that matches no logged secure sum of exactly its firms")


def _cross_check_overlap(fed: _Scan, n: int, p: Mapping[str, Any],
                         firm_scans: Mapping[str, _Scan], add: Any) -> None:
    """Every set and list the coordinator counted is one the firm signed as sent, and each firm
    received its peer's set unchanged."""
    oid = str(p["overlap_id"])
    sets = {str(k): str(v) for k, v in dict(p["sets"]).items()}

    def signed(firm: str, kind: EntryKind, field_name: str, want: str) -> list[AuditEntry]:
        scan = firm_scans.get(firm)
        return [] if scan is None else [
            e for _, e in scan.valid
            if e.kind is kind and e.payload["overlap_id"] == oid
            and e.payload[field_name] == want
        ]

    for firm, want in sets.items():
        if not signed(firm, EntryKind.OVERLAP_BLINDED, "sent_hash", want):
            add(Failure(fed.label, n, FailureKind.UNMATCHED_OVERLAP,
                        f"overlap {oid[:40]} relayed a blinded set from {firm!r} that has no "
                        "matching overlap_blinded in that firm's log"))
    for firm, want in dict(p["matches"]).items():
        firm = str(firm)
        entries = signed(firm, EntryKind.OVERLAP_REBLINDED, "sent_hash", str(want))
        if not entries:
            add(Failure(fed.label, n, FailureKind.UNMATCHED_OVERLAP,
                        f"overlap {oid[:40]} counted matches from {firm!r} that have no "
                        "matching overlap_reblinded in that firm's log"))
            continue
        peer_sets = [h for f, h in sets.items() if f != firm]
        if peer_sets and entries[0].payload["received_hash"] not in peer_sets:
            add(Failure(fed.label, n, FailureKind.UNMATCHED_OVERLAP,
                        f"overlap {oid[:40]}: {firm!r} blinded a set other than the one its "
                        "peer sent (the coordinator changed it in transit)"))


def _update_findings(
    fed: _Scan, firm_scans: Mapping[str, _Scan]
) -> tuple[tuple[UpdateFinding, ...], tuple[UpdateFinding, ...]]:
    """The run's updates each firm sent that the coordinator never accepted, and the resends."""
    run_id = next((str(e.payload["run_id"]) for _, e in fed.valid
                   if e.kind is EntryKind.RUN_STARTED), None)
    if run_id is None:
        return (), ()
    accepted = {
        (str(e.payload["firm"]), int(e.payload["round"]), str(e.payload["update_hash"]))
        for _, e in fed.valid if e.kind is EntryKind.UPDATE_ACCEPTED
    }
    rejected = {  # received, and refused on its merits: not lost
        (str(e.payload["firm"]), int(e.payload["round"]))
        for _, e in fed.valid if e.kind is EntryKind.UPDATE_REJECTED
    }
    lost: list[UpdateFinding] = []
    replayed: list[UpdateFinding] = []
    for firm, scan in sorted(firm_scans.items()):
        for _, e in scan.valid:
            if e.payload.get("run_id") != run_id:
                continue
            finding = UpdateFinding(firm, int(e.payload["round"]), str(e.payload["model_hash"]))
            if (
                e.kind is EntryKind.UPDATE_SENT
                and (firm, finding.round, finding.model_hash) not in accepted
                and (firm, finding.round) not in rejected
            ):
                lost.append(finding)
            elif e.kind is EntryKind.UPDATE_RESENT:
                replayed.append(finding)
    return tuple(lost), tuple(replayed)


def _rounds(fed: _Scan) -> tuple[dict[str, Any], tuple[RoundSummary, ...], dict[str, Any]]:
    run: dict[str, Any] = {}
    rounds: dict[int, dict[str, Any]] = {}

    def slot(r: int) -> dict[str, Any]:
        return rounds.setdefault(r, {"participants": [], "rejected": [], "model_hash": None,
                                     "metrics": {}})

    final: dict[str, Any] = {}
    for _, entry in fed.valid:
        p = entry.payload
        if entry.kind is EntryKind.RUN_STARTED:
            run = {k: p[k] for k in
                   ("run_id", "config_hash", "strategy", "rounds", "task", "firms")}
            run["started"] = entry.time
        elif entry.kind is EntryKind.RUN_RESUMED:
            run.setdefault("resumed", []).append(
                {"time": entry.time, "completed_round": int(p["completed_round"]),
                 "attempt": int(p["attempt"])}
            )
        elif entry.kind is EntryKind.RUN_FINISHED:
            run["finished"] = entry.time
            run["finish"] = dict(p)
        elif entry.kind is EntryKind.UPDATE_ACCEPTED:
            participants = slot(int(p["round"]))["participants"]
            if str(p["firm"]) not in participants:  # a resumed run may accept a resend again
                participants.append(str(p["firm"]))
        elif entry.kind is EntryKind.SECURE_SUM_RESULT and p["query"] == TRAINING_SUM_QUERY:
            slot(int(p["round"]))["participants"].extend(str(f) for f in p["firms"])
        elif entry.kind is EntryKind.UPDATE_REJECTED:
            slot(int(p["round"]))["rejected"].append(
                {"firm": str(p["firm"]), "node_id": str(p["node_id"]), "reason": str(p["reason"])})
        elif entry.kind is EntryKind.GLOBAL_MODEL:
            s = slot(int(p["round"]))
            s["model_hash"], s["metrics"] = str(p["model_hash"]), dict(p["metrics"])
            final = dict(p["metrics"])
    summaries = tuple(
        RoundSummary(round=r, participants=tuple(s["participants"]),
                     rejected=tuple(s["rejected"]), model_hash=s["model_hash"],
                     metrics=s["metrics"])
        for r, s in sorted(rounds.items())
    )
    return run, summaries, final


def _spec_of(text: str) -> dict[str, Any]:
    try:
        spec = json.loads(text)
    except json.JSONDecodeError:
        return {}
    return spec if isinstance(spec, dict) else {}


def _queries(fed: _Scan) -> tuple[dict[str, Any], ...]:
    """The analytics queries of the federation log: what was asked, of whom, and the result."""
    queries: dict[str, dict[str, Any]] = {}
    for _, entry in fed.valid:
        p = entry.payload
        if entry.kind is EntryKind.QUERY_STARTED:
            queries[str(p["query_id"])] = {
                "query_id": str(p["query_id"]), "query": str(p["query"]),
                "fingerprint": str(p["fingerprint"]), "spec": _spec_of(str(p["spec"])),
                "offered_to": list(p["firms"]), "started": entry.time,
            }
        elif entry.kind is EntryKind.QUERY_RESULT:
            slot = queries.setdefault(str(p["query_id"]), {"query_id": str(p["query_id"])})
            slot.update({"status": str(p["status"]), "answered_by": sorted(dict(p["answers"])),
                         "sum_hash": str(p["sum_hash"]), "result_hash": str(p["result_hash"]),
                         "finished": entry.time})
    return tuple(queries.values())


def _overlaps(fed: _Scan) -> tuple[dict[str, Any], ...]:
    """The customer-overlap counts of the federation log: which firms, and the result."""
    overlaps: dict[str, dict[str, Any]] = {}
    for _, entry in fed.valid:
        p = entry.payload
        if entry.kind is EntryKind.OVERLAP_STARTED:
            overlaps[str(p["overlap_id"])] = {
                "overlap_id": str(p["overlap_id"]), "overlap": str(p["overlap"]),
                "fingerprint": str(p["fingerprint"]), "spec": _spec_of(str(p["spec"])),
                "firms": list(p["firms"]), "started": entry.time,
            }
        elif entry.kind is EntryKind.OVERLAP_RESULT:
            slot = overlaps.setdefault(str(p["overlap_id"]), {"overlap_id": str(p["overlap_id"])})
            slot.update({"status": str(p["status"]), "estimate": p["estimate"],
                         "counted_from": sorted(dict(p["matches"])), "finished": entry.time})
    return tuple(overlaps.values())


def is_run_folder(path: Path) -> bool:
    """Whether ``path`` has a run's layout (``federation/`` or ``firms/``), damaged or not."""
    return (path / FEDERATION_DIR).is_dir() or (path / FIRMS_DIR).is_dir()


def require_run_folder(path: Path) -> Path:
    """``path`` if it is a run folder or unpacked bundle; otherwise one clear AuditError."""
    path = Path(path)
    if not path.exists():
        raise AuditError(f"{path} does not exist; give a run folder (runs/<run-id>) or an "
                         "unpacked audit bundle")
    if not path.is_dir() or not is_run_folder(path):
        raise AuditError(
            f"{path} is not a fedcrm run folder (it has no {FEDERATION_DIR}/ or {FIRMS_DIR}/); "
            "give runs/<run-id> or an unpacked audit bundle. A firm's own log is verified with "
            "`fedcrm audit verify STORE_DIR/audit.jsonl --key KEYS_DIR/signing.pub`"
        )
    return path


def _participants(fed: _Scan) -> set[str] | None:
    """Firms the coordinator's log names (admitted at the start, heads, updates); None if the
    log has no run_started entry to judge by."""
    names: set[str] | None = None
    for _, entry in fed.valid:
        p = entry.payload
        if entry.kind is EntryKind.RUN_STARTED:
            names = (names or set()) | {str(f) for f in p["firms"]}
        elif entry.kind is EntryKind.FIRM_HEADS and names is not None:
            names |= {str(f) for f in p["heads"]}
        elif entry.kind in (EntryKind.UPDATE_ACCEPTED, EntryKind.UPDATE_REJECTED) and names:
            names.add(str(p["firm"]))
    return names


def verify_firm_log(log: Path, public_key: Path) -> VerificationReport:
    """Verify one firm's own audit log (``<store_dir>/audit.jsonl``) against its public key:
    chain, signatures, ε of every release and the firm's budget. For a firm that has not taken
    part in a run (``fedcrm prepare``, ``train``, ``budget``); runs use :func:`verify_run`."""
    log, public_key = Path(log), Path(public_key)
    if log.is_dir():
        log = log / LOG_FILE
    if not log.is_file():
        raise AuditError(f"{log} is not a firm's audit log; give <store_dir>/audit.jsonl")
    try:
        keys = load_public_keys(public_key)
    except KeyFileError as exc:
        raise AuditError(f"{exc}; give the firm's signing.pub with --key") from None
    scan = _scan_log(log, keys, label=str(log))
    firm = next((str(e.payload["firm"]) for _, e in scan.valid
                 if e.kind is EntryKind.DATA_PREPARED and e.payload.get("firm")), log.parent.name)
    return VerificationReport(run_dir=str(log), failures=tuple(scan.failures), run={},
                              firms={firm: _firm_summary(firm, scan)}, rounds=(),
                              final_metrics={})


def verify_run(run_dir: Path) -> VerificationReport:
    """Verify every log of a run directory and cross-check them.

    Layout: ``federation/{audit.jsonl,signing.pub}``, ``firms/<firm>/{audit.jsonl,signing.pub}``
    and optionally ``keys/trusted.json`` (``{"federation": key_id, "<firm>": [key_id, ...]}``)
    pinning which bundled public keys the auditor accepts. Without it, the keys in the bundle are
    trusted, each only for its own log. A folder without that layout is refused
    (:class:`AuditError`); a firm folder of a firm the run never named is a failure.
    """
    root = require_run_folder(Path(run_dir))
    failures: list[Failure] = []
    pins = _load_pins(root, failures)
    fed_dir = root / FEDERATION_DIR
    fed_keys = _log_keys(fed_dir, "federation", root, pins, failures)
    fed = _scan_log(fed_dir / LOG_FILE, fed_keys, label=_rel(fed_dir / LOG_FILE, root))
    failures.extend(fed.failures)
    firm_scans: dict[str, _Scan] = {}
    firms_dir = root / FIRMS_DIR
    for firm_dir in sorted(p for p in firms_dir.glob("*") if p.is_dir()):
        firm = firm_dir.name
        keys = _log_keys(firm_dir, firm, root, pins, failures)
        scan = _scan_log(firm_dir / LOG_FILE, keys, label=_rel(firm_dir / LOG_FILE, root))
        failures.extend(scan.failures)
        firm_scans[firm] = scan
    _cross_check(fed, firm_scans, failures)
    participants = _participants(fed)
    if participants is not None:
        for firm in sorted(set(firm_scans) - participants):
            failures.append(Failure(
                _rel(firms_dir / firm, root), 0, FailureKind.UNEXPECTED_LOG,
                f"firm {firm!r} never took part in this run (not admitted, no head or update "
                "recorded by the coordinator); remove its folder from the run or bundle"))
            del firm_scans[firm]
    run, rounds, final = _rounds(fed)
    ended = "finished" in run or any(  # a query or an overlap ends with its result
        e.kind in (EntryKind.QUERY_RESULT, EntryKind.OVERLAP_RESULT) for _, e in fed.valid
    )
    if fed.line_hashes and not ended:
        failures.append(Failure(
            fed.label, 0, FailureKind.INCOMPLETE,
            "no run_finished entry: the run did not finish (still running, or stopped without "
            "recording how it ended); a partial run is not a verified run",
        ))
    lost, replayed = _update_findings(fed, firm_scans)
    return VerificationReport(
        queries=_queries(fed),
        overlaps=_overlaps(fed),
        run_dir=str(root),
        failures=tuple(failures),
        run=run,
        firms={firm: _firm_summary(firm, scan) for firm, scan in firm_scans.items()},
        rounds=rounds,
        final_metrics=final,
        lost_updates=lost,
        replayed_updates=replayed,
    )
