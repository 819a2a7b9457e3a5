"""Signed, hash-chained audit logs: the entry format and the one writer.

Every party in a run keeps one append-only JSON Lines log: each firm (``firms/<firm>/audit.jsonl``)
and the coordinator (``federation/audit.jsonl``). Every line is one entry::

    {"kind": ..., "payload": {...}, "prev": <64 hex>, "seq": n, "sig": <base64>,
     "signer": "ed25519:<16 hex>", "time": <ISO 8601 UTC>}

written in *canonical* JSON (``sort_keys=True``, separators ``(",", ":")``, ``ensure_ascii=False``,
UTF-8). ``sig`` is an Ed25519 signature over the canonical JSON of the entry without ``sig``;
``prev`` is the SHA-256 of the previous entry's canonical bytes (with its ``sig``), 64 zeros for the
first entry; ``seq`` counts from 1 and equals the line number. The coordinator periodically records
every firm's log head (``firm_heads``), so a firm that later drops or rewrites its tail is caught.
Verification is in :mod:`fedcrm.audit.verify`, ε recomputation in :mod:`fedcrm.audit.epsilon`.

Logs hold no raw values and no key material by construction: :meth:`AuditLog.append` refuses
payload keys that name raw data (``value``, ``sample``, ``example``, ``raw``, ...), strings that
look like an e-mail address and anything that looks like a PEM private key.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fedcrm.privacy.accounting import Mechanism
from fedcrm.privacy.durable import locked, remove_stale_temps, write_private
from fedcrm.privacy.errors import AuditError, KeyFileError
from fedcrm.privacy.keys import public_key_id

GENESIS = "0" * 64
"""``prev`` of the first entry of every log."""

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
    UPDATE_RESENT = "update_resent"  # the same released update sent again (no new release)
    KEY_ROTATED = "key_rotated"
    BUDGET_CHANGED = "budget_changed"
    QUERY_ANSWERED = "query_answered"
    SECURE_SUM = "secure_sum"  # a firm's step in a secure sum (what it sent, to whom)
    OVERLAP_BLINDED = "overlap_blinded"
    OVERLAP_REBLINDED = "overlap_reblinded"
    # coordinator side
    RUN_STARTED = "run_started"
    RUN_RESUMED = "run_resumed"
    UPDATE_ACCEPTED = "update_accepted"
    UPDATE_REJECTED = "update_rejected"
    UPDATE_LOST = "update_lost"
    GLOBAL_MODEL = "global_model"
    FIRM_HEADS = "firm_heads"
    RUN_FINISHED = "run_finished"
    QUERY_STARTED = "query_started"
    QUERY_RESULT = "query_result"
    SECURE_SUM_RESULT = "secure_sum_result"  # a secure sum's survivors and the hash of its total
    OVERLAP_STARTED = "overlap_started"
    OVERLAP_RESULT = "overlap_result"


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
    EntryKind.UPDATE_RESENT: {
        "run_id": (str,), "round": (int,), "task": (str,), "model_hash": (str,), "sent": (str,),
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
    EntryKind.RUN_RESUMED: {"run_id": (str,), "completed_round": (int,), "attempt": (int,)},
    EntryKind.UPDATE_REJECTED: {
        "round": (int,), "firm": (str,), "node_id": (str, int), "reason": (str,),
    },
    EntryKind.UPDATE_LOST: {
        "round": (int,), "firm": (str,), "node_id": (str, int), "reason": (str,),
    },
    EntryKind.GLOBAL_MODEL: {"round": (int,), "model_hash": (str,), "metrics": (dict,)},
    EntryKind.FIRM_HEADS: {"round": (int,), "heads": (dict,)},
    EntryKind.RUN_FINISHED: {},
    EntryKind.QUERY_ANSWERED: {
        "query_id": (str,), "query": (str,), "fingerprint": (str,), "answer_hash": (str,),
        "length": (int,), "secure": (bool,), "release": (str,),
    },
    EntryKind.QUERY_STARTED: {
        "query_id": (str,), "query": (str,), "fingerprint": (str,), "spec": (str,),
        "firms": (list,),
    },
    EntryKind.QUERY_RESULT: {
        "query_id": (str,), "status": (str,), "answers": (dict,), "sum_hash": (str,),
        "result_hash": (str,),
    },
    EntryKind.SECURE_SUM: {
        "run_id": (str,), "round": (int,), "query": (str,), "step": (str,), "spec_hash": (str,),
        "length": (int,), "range": (list,), "scale": (int,), "peers": (list,),
    },
    EntryKind.SECURE_SUM_RESULT: {
        "run_id": (str,), "round": (int,), "query": (str,), "spec_hash": (str,),
        "firms": (list,), "dropped": (list,), "sum_hash": (str,),
    },
    EntryKind.OVERLAP_BLINDED: {
        "overlap_id": (str,), "overlap": (str,), "fingerprint": (str,), "peer": (str,),
        "padded_length": (int,), "sent_hash": (str,), "release": (str,),
    },
    EntryKind.OVERLAP_REBLINDED: {
        "overlap_id": (str,), "overlap": (str,), "peer": (str,), "received_hash": (str,),
        "length": (int,), "sent_hash": (str,),
    },
    EntryKind.OVERLAP_STARTED: {
        "overlap_id": (str,), "overlap": (str,), "fingerprint": (str,), "spec": (str,),
        "firms": (list,),
    },
    EntryKind.OVERLAP_RESULT: {
        "overlap_id": (str,), "status": (str,), "estimate": (int, float, type(None)),
        "sets": (dict,), "matches": (dict,),
    },
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
        if (isinstance(value, bool) and bool not in types) or not isinstance(value, types):
            return f"{kind.value} payload field '{name}' has the wrong type"
    if kind is EntryKind.DP_RELEASE:
        if payload["mechanism"] not in Mechanism.__members__.values():
            return f"dp_release mechanism {str(payload['mechanism'])[:40]!r} is unknown"
        if not 0.0 < float(payload["sample_rate"]) <= 1.0:
            return "dp_release sample_rate must be in (0, 1]"
        if payload["steps"] < 1 or float(payload["noise_multiplier"]) < 0:
            return "dp_release needs steps >= 1 and noise_multiplier >= 0"
        if not 0.0 <= float(payload["delta"]) < 1.0:
            return "dp_release delta must be in [0, 1)"
        if payload.get("neighbouring", "add_remove") != "add_remove":
            return "dp_release neighbouring relation must be add_remove (the one fedcrm accounts)"
    if kind is EntryKind.UPDATE_SENT and not _HEX64.fullmatch(payload["release"]):
        return "update_sent release must be the 64-hex hash of a dp_release entry"
    if kind is EntryKind.QUERY_ANSWERED and not _HEX64.fullmatch(payload["release"]):
        return "query_answered release must be the 64-hex hash of a dp_release entry"
    if kind is EntryKind.OVERLAP_BLINDED and not _HEX64.fullmatch(payload["release"]):
        return "overlap_blinded release must be the 64-hex hash of a dp_release entry"
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
        self._key_id = public_key_id(signing_key.public_key())
        self._clock = clock

    def __repr__(self) -> str:
        return f"AuditLog({str(self.path)!r}, signer={self._key_id!r})"

    @property
    def signer(self) -> str:
        return self._key_id

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
        with locked(self.path):
            remove_stale_temps(self.path)  # from a crash
            data = self._read()
            head = self._head_of(data)
            unsigned = AuditEntry(
                seq=head.length + 1,
                time=self._clock().astimezone(UTC).isoformat(timespec="microseconds"),
                kind=kind, signer=self._key_id, prev=head.hash, payload=body, sig="",
            ).unsigned()
            sig = base64.b64encode(self._key.sign(canonical_json(unsigned))).decode("ascii")
            entry = AuditEntry.from_dict({**unsigned, "sig": sig})
            write_private(self.path, data + entry.canonical() + b"\n")
        return entry


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
        keys[public_key_id(loaded)] = loaded
    if not keys:
        raise KeyFileError(f"{path} holds no PEM public key")
    return keys


def public_key_pem(public_key: Ed25519PublicKey) -> bytes:
    return public_key.public_bytes(serialization.Encoding.PEM,
                                   serialization.PublicFormat.SubjectPublicKeyInfo)


