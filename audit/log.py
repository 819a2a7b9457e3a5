"""Signed, hash-chained audit logs and their independent verification.

Every party in a run keeps one append-only JSON Lines log: each firm (``firms/<firm>/audit.jsonl``)
and the coordinator (``federation/audit.jsonl``). Every line is one entry::

    {"kind": ..., "payload": {...}, "prev": <64 hex>, "seq": n, "sig": <base64>,
     "signer": "ed25519:<16 hex>", "time": <ISO 8601 UTC>}

written in *canonical* JSON (``sort_keys=True``, separators ``(",", ":")``, ``ensure_ascii=False``,
UTF-8). ``sig`` is an Ed25519 signature over the canonical JSON of the entry without ``sig``;
``prev`` is the SHA-256 of the previous entry's canonical bytes (with its ``sig``), 64 zeros for the
first entry; ``seq`` counts from 1 and equals the line number. The coordinator periodically records
every firm's log head (``firm_heads``), so a firm that later drops or rewrites its tail is caught.

The auditor needs only the logs and the public keys. ε is recomputed here with Google's
``dp_accounting`` (RDP accountant, Mironov 2017; Mironov, Talwar & Zhang 2019 for the subsampled
Gaussian) straight from the logged mechanism parameters, never from the training path's accountant.

Logs hold no raw values and no key material by construction: :meth:`AuditLog.append` refuses
payload keys that name raw data (``value``, ``sample``, ``example``, ``raw``, ...), strings that
look like an e-mail address and anything that looks like a PEM private key.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import fcntl
import functools
import hashlib
import json
import math
import os
import re
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fedcrm.privacy.durable import fsync_dir
from fedcrm.privacy.errors import AuditError, KeyFileError
from fedcrm.privacy.keys import public_key_id

if TYPE_CHECKING:
    import dp_accounting

GENESIS = "0" * 64
"""``prev`` of the first entry of every log."""

REL_TOL = 0.01
"""Relative tolerance between a logged ε and the ε recomputed from its parameters."""

LOG_FILE = "audit.jsonl"
PUBLIC_KEY_FILE = "signing.pub"
TRUSTED_FILE = "trusted.json"
FEDERATION_DIR = "federation"
FIRMS_DIR = "firms"
KEYS_DIR = "keys"

_ENTRY_FIELDS = frozenset({"seq", "time", "kind", "signer", "prev", "payload", "sig"})
_HEX64 = re.compile(r"[0-9a-f]{64}")
_KEY_ID = re.compile(r"ed25519:[0-9a-f]{16}")
_EMAIL = re.compile(r"[^@\s\"']{1,64}@[^@\s\"']{1,253}\.[A-Za-z]{2,24}")  # bounded: linear
_RAW_VALUE_KEYS = frozenset(
    {"value", "values", "raw", "raw_value", "raw_values", "sample", "samples", "example",
     "examples", "preview", "head_rows", "records", "row_values", "plaintext", "secret",
     "private_key", "key_material"}
)


class EntryKind(StrEnum):
    """What an audit entry records. Firm side first, then coordinator side."""

    # firm side
    DATA_PREPARED = "data_prepared"
    DP_RELEASE = "dp_release"
    UPDATE_SENT = "update_sent"
    KEY_ROTATED = "key_rotated"
    BUDGET_CHANGED = "budget_changed"
    # coordinator side
    RUN_STARTED = "run_started"
    UPDATE_ACCEPTED = "update_accepted"
    UPDATE_REJECTED = "update_rejected"
    GLOBAL_MODEL = "global_model"
    FIRM_HEADS = "firm_heads"
    RUN_FINISHED = "run_finished"


class ReleaseMechanism(StrEnum):
    """DP mechanisms a ``dp_release`` entry may name (same values as the training accountant)."""

    SUBSAMPLED_GAUSSIAN = "subsampled_gaussian"
    GAUSSIAN = "gaussian"
    LAPLACE = "laplace"


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
    MISSING_LOG = "missing_log"  # a log or public key the run layout requires is absent


# Required payload fields per kind, with the JSON types they must have.
_NUM = (int, float)
_REQUIRED: Mapping[EntryKind, Mapping[str, tuple[type, ...]]] = {
    EntryKind.DATA_PREPARED: {"tables": (dict,)},
    EntryKind.DP_RELEASE: {
        "mechanism": (str,), "noise_multiplier": _NUM, "sample_rate": _NUM, "steps": (int,),
        "delta": _NUM, "epsilon": _NUM, "purpose": (str,), "ledger_path": (str,),
        "cumulative_epsilon": _NUM, "epsilon_cap": _NUM,
    },
    EntryKind.UPDATE_SENT: {
        "run_id": (str,), "round": (int,), "task": (str,), "model_hash": (str,), "release": (str,),
    },
    EntryKind.KEY_ROTATED: {"new_key_id": (str,), "new_public_key": (str,)},
    EntryKind.BUDGET_CHANGED: {"epsilon_cap": _NUM, "delta": _NUM},
    EntryKind.RUN_STARTED: {
        "run_id": (str,), "config_hash": (str,), "strategy": (str,), "rounds": (int,),
        "task": (str,), "firms": (list, dict),
    },
    EntryKind.UPDATE_ACCEPTED: {
        "round": (int,), "firm": (str,), "node_id": (str, int), "update_hash": (str,),
    },
    EntryKind.UPDATE_REJECTED: {
        "round": (int,), "firm": (str,), "node_id": (str, int), "reason": (str,),
    },
    EntryKind.GLOBAL_MODEL: {"round": (int,), "model_hash": (str,), "metrics": (dict,)},
    EntryKind.FIRM_HEADS: {"round": (int,), "heads": (dict,)},
    EntryKind.RUN_FINISHED: {},
}


# --------------------------------------------------------------------------------------------
# Values


def canonical_json(obj: Any) -> bytes:
    """The one byte form that is hashed and signed (UTF-8, sorted keys, no spaces, no NaN)."""
    return json.dumps(
        obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def key_id(public_key: Ed25519PublicKey) -> str:
    """``"ed25519:"`` + first 16 hex of SHA-256 over the raw 32-byte public key."""
    return public_key_id(public_key)


def raw_public_key(public_key: Ed25519PublicKey) -> bytes:
    return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


@dataclass(frozen=True)
class AuditEntry:
    """One signed entry. ``hash`` is what the next entry's ``prev`` must equal."""

    seq: int
    time: str
    kind: EntryKind
    signer: str
    prev: str
    payload: Mapping[str, Any]
    sig: str

    def unsigned(self) -> dict[str, Any]:
        return {
            "seq": self.seq, "time": self.time, "kind": self.kind.value, "signer": self.signer,
            "prev": self.prev, "payload": dict(self.payload),
        }

    def to_dict(self) -> dict[str, Any]:
        return {**self.unsigned(), "sig": self.sig}

    def canonical(self) -> bytes:
        return canonical_json(self.to_dict())

    @property
    def hash(self) -> str:
        return sha256_hex(self.canonical())

    @classmethod
    def from_dict(cls, obj: Mapping[str, Any]) -> AuditEntry:
        """Parse a decoded line; raises ``ValueError`` naming what is wrong."""
        if set(obj) != _ENTRY_FIELDS:
            missing = sorted(_ENTRY_FIELDS - set(obj))
            extra = sorted(set(obj) - _ENTRY_FIELDS)
            raise ValueError(f"entry fields wrong (missing {missing}, unexpected {extra})")
        seq, kind, payload = obj["seq"], obj["kind"], obj["payload"]
        if not isinstance(seq, int) or isinstance(seq, bool) or seq < 1:
            raise ValueError("seq must be a positive integer")
        for name in ("time", "signer", "prev", "sig", "kind"):
            if not isinstance(obj[name], str):
                raise ValueError(f"{name} must be a string")
        if kind not in EntryKind.__members__.values():
            raise ValueError(f"unknown entry kind {str(kind)[:40]!r}")
        if not isinstance(payload, dict):
            raise ValueError("payload must be an object")
        if not _HEX64.fullmatch(obj["prev"]):
            raise ValueError("prev must be 64 lowercase hex characters")
        return cls(seq=seq, time=obj["time"], kind=EntryKind(kind), signer=obj["signer"],
                   prev=obj["prev"], payload=payload, sig=obj["sig"])


@dataclass(frozen=True)
class LogHead:
    """Hash of the last entry and the number of entries (``GENESIS``, 0 for an empty log)."""

    hash: str
    length: int

    def to_dict(self) -> dict[str, Any]:
        return {"hash": self.hash, "length": self.length}


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
# Writing


def _check_no_raw_values(obj: Any, where: str = "payload") -> None:
    """Refuse payload parts that would put raw customer values or key material into a log."""
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            if not isinstance(k, str):
                raise AuditError(f"audit {where}: keys must be strings")
            if k.lower() in _RAW_VALUE_KEYS:
                raise AuditError(
                    f"audit {where}.{k}: a key named '{k}' suggests raw values or secrets; audit "
                    "logs hold only counts, hashes, key ids and policies. Log a hash or a count."
                )
            _check_no_raw_values(v, f"{where}.{k}")
    elif isinstance(obj, list | tuple):
        for i, v in enumerate(obj):
            _check_no_raw_values(v, f"{where}[{i}]")
    elif isinstance(obj, str):
        if "PRIVATE KEY" in obj:
            raise AuditError(f"audit {where}: looks like a private key; never log key material")
        if "@" in obj and _EMAIL.search(obj):
            raise AuditError(
                f"audit {where}: looks like an e-mail address (raw PII); log a pseudonym or a hash"
            )
    elif isinstance(obj, float) and not math.isfinite(obj):
        raise AuditError(f"audit {where}: NaN/inf is not valid in an audit log")
    elif obj is not None and not isinstance(obj, bool | int | float):
        raise AuditError(f"audit {where}: {type(obj).__name__} is not a JSON value")


def _payload_problem(kind: EntryKind, payload: Mapping[str, Any]) -> str | None:
    """Why a payload does not fit its kind, or None."""
    for name, types in _REQUIRED[kind].items():
        if name not in payload:
            return f"{kind.value} payload lacks '{name}'"
        value = payload[name]
        if isinstance(value, bool) or not isinstance(value, types):
            return f"{kind.value} payload field '{name}' has the wrong type"
    if kind is EntryKind.DP_RELEASE:
        if payload["mechanism"] not in ReleaseMechanism.__members__.values():
            return f"dp_release mechanism {str(payload['mechanism'])[:40]!r} is unknown"
        if not 0.0 < float(payload["sample_rate"]) <= 1.0:
            return "dp_release sample_rate must be in (0, 1]"
        if payload["steps"] < 1 or float(payload["noise_multiplier"]) < 0:
            return "dp_release needs steps >= 1 and noise_multiplier >= 0"
        if not 0.0 <= float(payload["delta"]) < 1.0:
            return "dp_release delta must be in [0, 1)"
    if kind is EntryKind.UPDATE_SENT and not _HEX64.fullmatch(payload["release"]):
        return "update_sent release must be the 64-hex hash of a dp_release entry"
    if kind is EntryKind.KEY_ROTATED and not _KEY_ID.fullmatch(payload["new_key_id"]):
        return "key_rotated new_key_id must look like 'ed25519:<16 hex>'"
    if kind is EntryKind.FIRM_HEADS:
        for firm, head in payload["heads"].items():
            if not (isinstance(head, dict) and isinstance(head.get("hash"), str)
                    and isinstance(head.get("length"), int) and head["length"] >= 0):
                return f"firm_heads entry for {firm!r} must be {{'hash': str, 'length': int}}"
    return None


def _utc_now() -> datetime:
    return datetime.now(UTC)


def _last_line(data: bytes) -> bytes | None:
    body = data[:-1] if data.endswith(b"\n") else data
    if not body:
        return None
    return body.rsplit(b"\n", 1)[-1]


class AuditLog:
    """Append-only signed log at ``path``; one writer at a time (``fcntl`` lock on ``<path>.lock``).

    Each append rewrites the whole file to a temporary file in the same directory, fsyncs it,
    ``os.replace``-s it over the log and fsyncs the directory, so a crash at any point leaves
    either the old or the new log, never a partial line. Files are created 0600.
    """

    def __init__(self, path: Path, *, signing_key: Ed25519PrivateKey,
                 clock: Callable[[], datetime] = _utc_now) -> None:
        self.path = Path(path)
        self._key = signing_key
        self._key_id = key_id(signing_key.public_key())
        self._clock = clock

    def __repr__(self) -> str:
        return f"AuditLog({str(self.path)!r}, signer={self._key_id!r})"

    @property
    def signer(self) -> str:
        return self._key_id

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock_path = self.path.with_name(self.path.name + ".lock")
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def _read(self) -> bytes:
        try:
            return self.path.read_bytes()
        except FileNotFoundError:
            return b""

    def _head_of(self, data: bytes) -> LogHead:
        if data and not data.endswith(b"\n"):
            raise AuditError(f"{self.path}: last line is incomplete; run `fedcrm audit verify`")
        last = _last_line(data)
        if last is None:
            return LogHead(GENESIS, 0)
        try:
            entry = AuditEntry.from_dict(json.loads(last))
        except (ValueError, TypeError) as exc:
            raise AuditError(
                f"{self.path}: last entry is unreadable ({exc}); refusing to append to a damaged "
                "log. Run `fedcrm audit verify` and restore the log from a backup."
            ) from None
        return LogHead(sha256_hex(last), entry.seq)

    def head(self) -> LogHead:
        return self._head_of(self._read())

    def entries(self) -> list[AuditEntry]:
        """All entries as written (no verification; use :func:`verify_log` for that)."""
        out = []
        for n, line in enumerate(self._read().splitlines(), start=1):
            try:
                out.append(AuditEntry.from_dict(json.loads(line)))
            except (ValueError, TypeError) as exc:
                raise AuditError(f"{self.path}:{n}: unreadable audit entry ({exc})") from None
        return out

    def append(self, kind: EntryKind | str, payload: Mapping[str, Any]) -> AuditEntry:
        """Sign and durably append one entry; returns it (its ``hash`` is the new head)."""
        try:
            kind = EntryKind(kind)
        except ValueError:
            raise AuditError(f"unknown audit entry kind {str(kind)[:40]!r}") from None
        body = json.loads(canonical_json(dict(payload)))  # plain JSON values only
        _check_no_raw_values(body)
        problem = _payload_problem(kind, body)
        if problem:
            raise AuditError(f"{self.path}: {problem}")
        with self._locked():
            for stale in self.path.parent.glob(f".{self.path.name}.*.tmp"):  # from a crash
                stale.unlink(missing_ok=True)
            data = self._read()
            head = self._head_of(data)
            unsigned = AuditEntry(
                seq=head.length + 1,
                time=self._clock().astimezone(UTC).isoformat(timespec="microseconds"),
                kind=kind, signer=self._key_id, prev=head.hash, payload=body, sig="",
            ).unsigned()
            sig = base64.b64encode(self._key.sign(canonical_json(unsigned))).decode("ascii")
            entry = AuditEntry.from_dict({**unsigned, "sig": sig})
            self._write_atomically(data + entry.canonical() + b"\n")
        return entry

    def _write_atomically(self, data: bytes) -> None:
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.",
                                   suffix=".tmp")
        try:
            os.fchmod(fd, 0o600)
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        fsync_dir(self.path.parent)


def data_prepared_payload(manifest: Mapping[str, Any]) -> dict[str, Any]:
    """The auditable part of a prepared-store manifest (``fedcrm.prepare``): schema, policy per
    column, row and quarantine counts, key ids and content hashes. Nothing else is copied."""
    tables: dict[str, Any] = {}
    for name, table in dict(manifest.get("tables", {})).items():
        cols = table.get("columns", [])
        columns = []
        for col in cols:
            if isinstance(col, Mapping):
                columns.append({k: col.get(k) for k in ("source", "name", "role", "kind", "pii",
                                                         "policy") if col.get(k) is not None})
            else:
                columns.append({"name": str(col)})
        tables[str(name)] = {
            k: table[k] for k in ("rows_read", "rows_kept", "rows_quarantined", "rows", "sha256")
            if k in table
        } | {"columns": columns}
    return {
        "firm": manifest.get("firm"),
        "config_sha256": manifest.get("config_sha256"),
        "store_hash": manifest.get("store_hash"),
        "key_ids": dict(manifest.get("key_ids", {})),
        "tables": tables,
    }


# --------------------------------------------------------------------------------------------
# ε recomputation (independent of the training path)


@dataclass(frozen=True)
class ReleaseParams:
    """The DP parameters of one ``dp_release`` entry."""

    mechanism: ReleaseMechanism
    noise_multiplier: float
    sample_rate: float
    steps: int
    delta: float

    @classmethod
    def from_payload(cls, payload: Mapping[str, Any]) -> ReleaseParams:
        return cls(
            mechanism=ReleaseMechanism(payload["mechanism"]),
            noise_multiplier=float(payload["noise_multiplier"]),
            sample_rate=float(payload["sample_rate"]),
            steps=int(payload["steps"]),
            delta=float(payload["delta"]),
        )

    def dp_event(self) -> dp_accounting.DpEvent:
        import dp_accounting  # deferred: importing it takes seconds, writers never need it

        if self.mechanism is ReleaseMechanism.LAPLACE:
            base: dp_accounting.DpEvent = dp_accounting.LaplaceDpEvent(self.noise_multiplier)
        else:
            base = dp_accounting.GaussianDpEvent(self.noise_multiplier)
            if self.mechanism is ReleaseMechanism.SUBSAMPLED_GAUSSIAN and self.sample_rate < 1.0:
                base = dp_accounting.PoissonSampledDpEvent(self.sample_rate, base)
        return dp_accounting.SelfComposedDpEvent(base, self.steps)

    def pure_epsilon(self) -> float | None:
        """Pure-DP ε by basic composition (Laplace only, Dwork et al. 2006)."""
        if self.mechanism is not ReleaseMechanism.LAPLACE:
            return None
        return math.inf if self.noise_multiplier == 0 else self.steps / self.noise_multiplier


@functools.cache
def _orders() -> tuple[float, ...]:
    from dp_accounting.rdp import rdp_privacy_accountant

    return tuple(float(a) for a in rdp_privacy_accountant.DEFAULT_RDP_ORDERS)


@functools.lru_cache(maxsize=256)
def _rdp_curve(params: ReleaseParams) -> tuple[float, ...]:
    """RDP ε(α) of one release at ``_ORDERS``, from ``dp_accounting``.

    Cached: runs repeat the same release parameters every round, and the subsampled-Gaussian
    curve takes ~0.5 s to compute. RDP composes by adding curves (Mironov 2017, Prop. 1).
    """
    from dp_accounting.rdp import RdpAccountant

    accountant = RdpAccountant(orders=list(_orders()))
    accountant.compose(params.dp_event())
    return tuple(float(x) for x in accountant._rdp)  # dp_accounting keeps the curve here


def _rdp_epsilon(events: Sequence[ReleaseParams], *, delta: float) -> float:
    if any(e.noise_multiplier == 0 for e in events) or delta <= 0:
        return math.inf  # no noise, or δ = 0: RDP gives no finite ε (only pure DP does)
    from dp_accounting.rdp import rdp_privacy_accountant

    total = np.zeros(len(_orders()))
    for e in events:
        total += np.asarray(_rdp_curve(e))
    eps, _ = rdp_privacy_accountant.compute_epsilon(np.asarray(_orders()), total, delta)
    return float(eps)


def release_epsilon(params: ReleaseParams) -> float:
    """ε of one release at its own δ, recomputed with ``dp_accounting``'s RDP accountant.

    For Laplace releases the smaller of the RDP bound and the pure-DP bound ``steps / b`` is used
    (both are valid guarantees; a ledger may log either).
    """
    eps = _rdp_epsilon([params], delta=params.delta)
    pure = params.pure_epsilon()
    return eps if pure is None else min(eps, pure)


def _matches_reference(logged: float, params: ReleaseParams) -> tuple[bool, float]:
    refs = [_rdp_epsilon([params], delta=params.delta)]
    pure = params.pure_epsilon()
    if pure is not None:
        refs.append(pure)
    for ref in refs:
        if math.isinf(ref) and math.isinf(logged):
            return True, ref
        if math.isfinite(ref) and abs(logged - ref) <= REL_TOL * max(ref, 1e-12):
            return True, ref
    return False, min(refs)


def composed_epsilon(releases: Sequence[ReleaseParams], *, delta: float) -> float:
    """ε of all ``releases`` composed (RDP) at ``delta``; for all-Laplace, at most Σ pure ε."""
    if not releases:
        return 0.0
    eps = _rdp_epsilon(releases, delta=delta)
    pures = [r.pure_epsilon() for r in releases]
    if all(p is not None for p in pures):
        eps = min(eps, sum(p for p in pures if p is not None))
    return eps


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
    if key_id(new_key) != entry.payload["new_key_id"]:
        scan.fail(n, FailureKind.MALFORMED, "key_rotated new_key_id does not match new_public_key")
        return
    active.pop(entry.signer, None)  # the rotating key is retired
    active[key_id(new_key)] = new_key


def _check_semantics(scan: _Scan) -> None:
    """Per-log checks on signed entries: ε per release, budget, update coverage."""
    by_hash = {e.hash: (n, e) for n, e in scan.valid}
    releases: list[ReleaseParams] = []
    accountant_cap: float | None = None
    budget_delta: float | None = None
    funded: dict[str, str] = {}
    for n, entry in scan.valid:
        p = entry.payload
        if entry.kind is EntryKind.BUDGET_CHANGED:
            accountant_cap, budget_delta = float(p["epsilon_cap"]), float(p["delta"])
        elif entry.kind is EntryKind.DP_RELEASE:
            params = ReleaseParams.from_payload(p)
            logged = float(p["epsilon"])
            ok, ref = _matches_reference(logged, params)
            if not ok:
                scan.fail(n, FailureKind.EPSILON_MISMATCH,
                          f"logged ε={logged:.6g} but {params.mechanism.value} with "
                          f"σ={params.noise_multiplier:g}, q={params.sample_rate:g}, "
                          f"steps={params.steps}, δ={params.delta:g} gives ε={ref:.6g}")
            releases.append(params)
            delta = budget_delta if budget_delta is not None else params.delta
            cap = float(p["epsilon_cap"])
            if accountant_cap is not None:
                cap = min(cap, accountant_cap)
            cumulative = composed_epsilon(releases, delta=delta)
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
                "epsilon_recomputed": release_epsilon(params),
                "cumulative_epsilon": logged_cum, "cumulative_recomputed": cumulative,
                "epsilon_cap": cap, "delta": delta, "hash": entry.hash,
            })
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
class VerificationReport:
    run_dir: str
    failures: tuple[Failure, ...]
    run: Mapping[str, Any]
    firms: Mapping[str, FirmSummary]
    rounds: tuple[RoundSummary, ...]
    final_metrics: Mapping[str, Any]

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
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True, ensure_ascii=False,
                          default=str)


def load_public_keys(path: Path) -> dict[str, Ed25519PublicKey]:
    """All Ed25519 public keys in a PEM file (one or more blocks), by key id."""
    try:
        text = path.read_bytes()
    except OSError:
        raise KeyFileError(f"public key file {path} is missing or unreadable") from None
    keys: dict[str, Ed25519PublicKey] = {}
    for block in re.findall(rb"-----BEGIN PUBLIC KEY-----.*?-----END PUBLIC KEY-----", text,
                            flags=re.S):
        try:
            loaded = serialization.load_pem_public_key(block)
        except ValueError:
            raise KeyFileError(f"{path} holds a PEM block that is not a public key") from None
        if not isinstance(loaded, Ed25519PublicKey):
            raise KeyFileError(f"{path} holds a key that is not Ed25519")
        keys[key_id(loaded)] = loaded
    if not keys:
        raise KeyFileError(f"{path} holds no PEM public key")
    return keys


def public_key_pem(public_key: Ed25519PublicKey) -> bytes:
    return public_key.public_bytes(serialization.Encoding.PEM,
                                   serialization.PublicFormat.SubjectPublicKeyInfo)


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
    updates = 0
    for _, entry in scan.valid:
        if entry.kind is EntryKind.BUDGET_CHANGED and cap is None:
            cap, delta = float(entry.payload["epsilon_cap"]), float(entry.payload["delta"])
        if entry.kind is EntryKind.UPDATE_SENT:
            updates += 1
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
        elif entry.kind is EntryKind.RUN_FINISHED:
            run["finished"] = entry.time
            run["finish"] = dict(p)
        elif entry.kind is EntryKind.UPDATE_ACCEPTED:
            slot(int(p["round"]))["participants"].append(str(p["firm"]))
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


def verify_run(run_dir: Path) -> VerificationReport:
    """Verify every log of a run directory and cross-check them.

    Layout: ``federation/{audit.jsonl,signing.pub}``, ``firms/<firm>/{audit.jsonl,signing.pub}``
    and optionally ``keys/trusted.json`` (``{"federation": key_id, "<firm>": [key_id, ...]}``)
    pinning which bundled public keys the auditor accepts. Without it, the keys in the bundle are
    trusted, each only for its own log.
    """
    root = Path(run_dir)
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
    run, rounds, final = _rounds(fed)
    return VerificationReport(
        run_dir=str(root),
        failures=tuple(failures),
        run=run,
        firms={firm: _firm_summary(firm, scan) for firm, scan in firm_scans.items()},
        rounds=rounds,
        final_metrics=final,
    )
