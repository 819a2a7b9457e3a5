"""A firm's secrets: creation, loading, rotation.

A firm's key directory holds

* ``pseudonym-v{N}.key`` - 32 random bytes (hex), master secret for pseudonymization,
* ``data-v{N}.key`` - 32 random bytes (hex), the data-encryption key for the prepared store,
* ``signing.key`` / ``signing.pub`` - Ed25519 key pair (PEM) that signs the firm's audit log,
* ``keys.json`` - non-secret metadata: firm name and the current version of each key.

Secret files are created with mode 0600 and refused when group/other can read them. The
secrets can instead come from environment variables ``FEDCRM_PSEUDONYM_KEY`` and
``FEDCRM_DATA_KEY`` (64 hex chars each). Keys are passed around as :class:`FirmKeys` objects,
whose ``repr`` never shows key material. Nothing here logs or serializes a secret.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedcrm.privacy.durable import write_private
from fedcrm.privacy.errors import KeyFileError
from fedcrm.privacy.masking import derive_pseudonym_key

KEY_BYTES = 32
META_FILE = "keys.json"
ENV_PSEUDONYM = "FEDCRM_PSEUDONYM_KEY"
ENV_DATA = "FEDCRM_DATA_KEY"
#: Path of the coordinator's Ed25519 key that signs a run's federation log (never a run config).
ENV_COORDINATOR_KEY = "FEDCRM_COORDINATOR_KEY"


class KeyKind(StrEnum):
    PSEUDONYM = "pseudonym"
    DATA = "data"


def key_id(kind: KeyKind, version: int, key: bytes) -> str:
    """Public identifier of a secret key: kind, version and a short one-way fingerprint."""
    fp = hashlib.sha256(b"fedcrm/key-id/v1/" + kind.value.encode() + b"/" + key).hexdigest()[:10]
    return f"{kind.value}-v{version}-{fp}"


def public_key_id(public_key: Ed25519PublicKey) -> str:
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return "ed25519:" + hashlib.sha256(raw).hexdigest()[:16]


def hkdf(
    master: bytes, *, info: bytes, length: int = KEY_BYTES, salt: bytes | None = None
) -> bytes:
    """HKDF-SHA256 with a domain-separating ``info`` (``b"fedcrm/<use>/v1..."``)."""
    return HKDF(algorithm=SHA256(), length=length, salt=salt, info=info).derive(master)


@dataclass(frozen=True)
class FirmKeys:
    """The secrets of one firm. ``repr`` hides the key material."""

    firm: str
    pseudonym_version: int
    pseudonym_master: bytes = field(repr=False)
    data_version: int
    data_key: bytes = field(repr=False)
    signing_key: Ed25519PrivateKey | None = field(default=None, repr=False)

    @property
    def pseudonym_key_id(self) -> str:
        return key_id(KeyKind.PSEUDONYM, self.pseudonym_version, self.pseudonym_master)

    @property
    def data_key_id(self) -> str:
        return key_id(KeyKind.DATA, self.data_version, self.data_key)

    def pseudonym_key(self) -> bytes:
        """The HMAC key for pseudonyms, derived per firm and version (never the master itself)."""
        return derive_pseudonym_key(
            self.pseudonym_master, firm=self.firm, version=self.pseudonym_version
        )

    def signing_key_id(self) -> str | None:
        return None if self.signing_key is None else public_key_id(self.signing_key.public_key())


def _write_secret(path: Path, data: bytes, *, force: bool) -> None:
    if path.exists() and not force:
        raise KeyFileError(f"{path} already exists; refusing to overwrite a secret (use --force)")
    write_private(path, data)


def _read_secret(path: Path) -> bytes:
    if not path.exists():
        raise KeyFileError(
            f"key file {path} not found; create the firm's keys with `fedcrm keys init`"
        )
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        raise KeyFileError(
            f"key file {path} is readable by others (mode {mode:04o}); run `chmod 600 {path}`"
        )
    return path.read_bytes()


def _hex_key(text: str, where: str) -> bytes:
    try:
        key = bytes.fromhex(text.strip())
    except ValueError:
        raise KeyFileError(
            f"{where} is not hex-encoded; expected {2 * KEY_BYTES} hex characters"
        ) from None
    if len(key) != KEY_BYTES:
        raise KeyFileError(f"{where} has {len(key)} bytes; expected {KEY_BYTES}")
    return key


def _meta(keys_dir: Path) -> dict[str, object]:
    path = keys_dir / META_FILE
    if not path.exists():
        raise KeyFileError(
            f"{path} not found: {keys_dir} is not a fedcrm key directory; "
            "create one with `fedcrm keys init --firm NAME --out DIR`"
        )
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise KeyFileError(f"{path} is not valid JSON (line {exc.lineno})") from None
    if not isinstance(meta, dict):
        raise KeyFileError(f"{path} must hold a JSON object")
    return meta


def _write_meta(keys_dir: Path, meta: dict[str, object]) -> None:
    tmp = keys_dir / (META_FILE + ".tmp")
    tmp.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, keys_dir / META_FILE)


def init_keys(keys_dir: Path, *, firm: str, force: bool = False) -> FirmKeys:
    """Create a firm's secrets in ``keys_dir`` (0700 directory, 0600 files)."""
    if not firm or not firm.replace("-", "").replace("_", "").isalnum():
        raise KeyFileError(f"firm name {firm!r} must be letters, digits, '-' or '_'")
    keys_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(keys_dir, 0o700)
    if (keys_dir / META_FILE).exists() and not force:
        raise KeyFileError(f"{keys_dir} already holds keys; refusing to overwrite (use --force)")
    pseudonym = secrets.token_bytes(KEY_BYTES)
    data = secrets.token_bytes(KEY_BYTES)
    signing = Ed25519PrivateKey.generate()
    _write_secret(keys_dir / "pseudonym-v1.key", pseudonym.hex().encode() + b"\n", force=force)
    _write_secret(keys_dir / "data-v1.key", data.hex().encode() + b"\n", force=force)
    _write_secret(
        keys_dir / "signing.key",
        signing.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
        force=force,
    )
    (keys_dir / "signing.pub").write_bytes(
        signing.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    keys = FirmKeys(
        firm=firm,
        pseudonym_version=1,
        pseudonym_master=pseudonym,
        data_version=1,
        data_key=data,
        signing_key=signing,
    )
    _write_meta(
        keys_dir,
        {
            "firm": firm,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "pseudonym_version": 1,
            "data_version": 1,
            "key_ids": {
                "pseudonym": [keys.pseudonym_key_id],
                "data": [keys.data_key_id],
                "signing": keys.signing_key_id(),
            },
        },
    )
    return keys


def load_keys(keys_dir: Path, *, data_version: int | None = None) -> FirmKeys:
    """Load a firm's keys from its key directory; environment variables override the files."""
    meta = _meta(keys_dir)
    firm = str(meta.get("firm", ""))
    p_ver = int(str(meta.get("pseudonym_version", 1)))
    d_ver = data_version if data_version is not None else int(str(meta.get("data_version", 1)))
    if ENV_PSEUDONYM in os.environ:
        pseudonym = _hex_key(os.environ[ENV_PSEUDONYM], f"${ENV_PSEUDONYM}")
    else:
        path = keys_dir / f"pseudonym-v{p_ver}.key"
        pseudonym = _hex_key(_read_secret(path).decode("ascii", "replace"), str(path))
    if ENV_DATA in os.environ and data_version is None:
        data = _hex_key(os.environ[ENV_DATA], f"${ENV_DATA}")
    else:
        path = keys_dir / f"data-v{d_ver}.key"
        data = _hex_key(_read_secret(path).decode("ascii", "replace"), str(path))
    signing: Ed25519PrivateKey | None = None
    sign_path = keys_dir / "signing.key"
    if sign_path.exists():
        try:
            loaded = serialization.load_pem_private_key(_read_secret(sign_path), password=None)
        except ValueError:
            raise KeyFileError(f"{sign_path} is not a PEM private key") from None
        if not isinstance(loaded, Ed25519PrivateKey):
            raise KeyFileError(f"{sign_path} is not an Ed25519 key")
        signing = loaded
    return FirmKeys(
        firm=firm,
        pseudonym_version=p_ver,
        pseudonym_master=pseudonym,
        data_version=d_ver,
        data_key=data,
        signing_key=signing,
    )


def rotate_key(keys_dir: Path, kind: KeyKind) -> str:
    """Create the next version of a pseudonym or data key; returns the new key id.

    Old versions stay on disk (stores encrypted with them must remain readable until they are
    re-prepared). Pseudonyms from the new version differ from the old: re-run ``fedcrm prepare``
    to re-tokenize, and the new key id is recorded in the manifest.
    """
    meta = _meta(keys_dir)
    field_name = f"{kind.value}_version"
    version = int(str(meta.get(field_name, 1))) + 1
    key = secrets.token_bytes(KEY_BYTES)
    _write_secret(
        keys_dir / f"{kind.value}-v{version}.key", key.hex().encode() + b"\n", force=False
    )
    new_id = key_id(kind, version, key)
    meta[field_name] = version
    ids = meta.setdefault("key_ids", {})
    if isinstance(ids, dict):
        history = ids.setdefault(kind.value, [])
        if isinstance(history, list):
            history.append(new_id)
    meta.setdefault("rotations", [])
    rotations = meta["rotations"]
    if isinstance(rotations, list):
        rotations.append(
            {
                "kind": kind.value,
                "key_id": new_id,
                "time": datetime.now(UTC).isoformat(timespec="seconds"),
            }
        )
    _write_meta(keys_dir, meta)
    return new_id


def load_signing_key(path: Path) -> Ed25519PrivateKey:
    """An Ed25519 private key from a 0600 PEM file (e.g. the coordinator's signing key)."""
    try:
        loaded = serialization.load_pem_private_key(_read_secret(path), password=None)
    except ValueError:
        raise KeyFileError(f"{path} is not a PEM private key") from None
    if not isinstance(loaded, Ed25519PrivateKey):
        raise KeyFileError(f"{path} is not an Ed25519 key")
    return loaded


def write_signing_key(path: Path, *, force: bool = False) -> Ed25519PrivateKey:
    """Create an Ed25519 signing key (0600 PEM) and its public key beside it (``.pub``)."""
    key = Ed25519PrivateKey.generate()
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_secret(
        path,
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
        force=force,
    )
    path.with_suffix(".pub").write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    try:
        loaded = serialization.load_pem_public_key(path.read_bytes())
    except (OSError, ValueError):
        raise KeyFileError(f"{path} is not a readable PEM public key") from None
    if not isinstance(loaded, Ed25519PublicKey):
        raise KeyFileError(f"{path} is not an Ed25519 public key")
    return loaded
