"""A firm's secrets: creation, loading, rotation.

A firm's key directory holds

* ``pseudonym-v{N}.key`` - 32 random bytes (hex), master secret for pseudonymization,
* ``data-v{N}.key`` - 32 random bytes (hex), the data-encryption key for the prepared store,
* ``signing.key`` / ``signing.pub`` - Ed25519 key pair (PEM) that signs the firm's audit log,
* ``agreement.key`` / ``agreement.pub`` - the firm's long-term X25519 key pair (PEM) for secure
  sums: it is registered with the coordinator signed by the Ed25519 key, and its pairwise
  Diffie-Hellman secrets key the encryption of the firm's secret shares to each peer,
* ``keys.json`` - non-secret metadata: firm name and the current version of each key.

Secret files are created with mode 0600 and refused when group/other can read them. The
secrets can instead come from environment variables ``FEDCRM_PSEUDONYM_KEY`` and
``FEDCRM_DATA_KEY`` (64 hex chars each). Keys are passed around as :class:`FirmKeys` objects,
whose ``repr`` never shows key material. Nothing here logs or serializes a secret.

This module owns every key derived from a firm's secrets, each domain-separated by its HKDF
``info`` (``b"fedcrm/<use>/v1/..."``) so that keys for different uses, firms and versions never
coincide: the pseudonym (HMAC) key per firm and key version (`derive_pseudonym_key`) and the key
of each encrypted store file (`FirmKeys.store_file_key`), and every key of a secure sum
(`derive_secure_sum_key`: pair masks, share encryption, self-masks, per-sum seeds). Key length,
key versions and the firm name are checked once, when a :class:`FirmKeys` is created or loaded
(`check_firm_name` is the one rule for firm names, shared with ``privacy.certs``).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedcrm.privacy.durable import ensure_output_dir, write_atomic, write_private
from fedcrm.privacy.errors import ConfigError, KeyFileError

KEY_BYTES = 32
"""Length of every fedcrm secret (pseudonym master, data key): 64 hex characters in a key file."""
PSEUDONYM_INFO_PREFIX = b"fedcrm/pseudonym/v1/"
"""HKDF ``info`` prefix for pseudonym keys; the firm and key version follow it."""
STORE_INFO_PREFIX = b"fedcrm/store/v1/"
"""HKDF ``info`` prefix for store file keys; the firm and table follow it."""
SECURE_SUM_INFO_PREFIX = b"fedcrm/secure-sum/v1/"
"""HKDF ``info`` prefix for secure-sum keys; the use and the sum's context follow it."""
AGREEMENT_KEY_FILE = "agreement.key"
AGREEMENT_PUB_FILE = "agreement.pub"
OVERLAP_STATE_INFO_PREFIX = b"fedcrm/overlap-state/v1/"
"""HKDF ``info`` prefix for the key that seals a firm's state between two steps of an overlap;
the firm and the overlap id follow it."""
META_FILE = "keys.json"
ENV_PSEUDONYM = "FEDCRM_PSEUDONYM_KEY"
ENV_DATA = "FEDCRM_DATA_KEY"
#: Path of the coordinator's Ed25519 key that signs a run's federation log (never a run config).
ENV_COORDINATOR_KEY = "FEDCRM_COORDINATOR_KEY"


class KeyKind(StrEnum):
    PSEUDONYM = "pseudonym"
    DATA = "data"


def secret_key_id(kind: KeyKind, version: int, key: bytes) -> str:
    """Public identifier of a secret key: kind, version and a short one-way fingerprint."""
    fp = hashlib.sha256(b"fedcrm/key-id/v1/" + kind.value.encode() + b"/" + key).hexdigest()[:10]
    return f"{kind.value}-v{version}-{fp}"


def public_key_id(public_key: Ed25519PublicKey) -> str:
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return "ed25519:" + hashlib.sha256(raw).hexdigest()[:16]


# --------------------------------------------------------------------------------------------
# The one check of each value that goes into a key
# --------------------------------------------------------------------------------------------

_FIRM_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,62}")


def check_firm_name(firm: str) -> str:
    """Return ``firm`` if it can name a firm's keys, node key file and store; else raise.

    One rule everywhere a firm name enters (`init_keys`, `load_keys`, ``privacy.certs``): it
    becomes a file name, part of HKDF ``info`` strings (so no ``/``) and a Flower node id.

    Raises:
        KeyFileError: the name is empty, too long or has other characters.
    """
    if not isinstance(firm, str) or not _FIRM_NAME_RE.fullmatch(firm):
        raise KeyFileError(
            f"firm name {firm!r} must start with a letter or digit and use only letters, digits, "
            "'-' or '_' (at most 63 characters)"
        )
    return firm


def _check_version(version: int, *, kind: KeyKind) -> int:
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ConfigError(
            f"{kind.value} key version must be a positive integer, got {version!r}; "
            "set it to 1, 2, ..."
        )
    return version


def _check_secret(key: bytes, *, kind: KeyKind, version: int) -> bytes:
    if len(key) != KEY_BYTES:
        env = ENV_PSEUDONYM if kind is KeyKind.PSEUDONYM else ENV_DATA
        # Only the length: the message never shows key material.
        raise KeyFileError(
            f"{kind.value} key v{version} is {len(key)} bytes, need {KEY_BYTES} "
            f"({2 * KEY_BYTES} hex characters in {kind.value}-v{version}.key of the firm's key "
            f"directory or in ${env}); restore it from the firm's backup, or create a new "
            f"version with `fedcrm keys rotate --kind {kind.value}`"
        )
    return key


# --------------------------------------------------------------------------------------------
# Derived keys
# --------------------------------------------------------------------------------------------


def _hkdf(master: bytes, *, info: bytes, salt: bytes | None = None) -> bytes:
    """HKDF-SHA256 (RFC 5869) to a 32-byte key with a domain-separating ``info``."""
    return HKDF(algorithm=SHA256(), length=KEY_BYTES, salt=salt, info=info).derive(master)


def _pseudonym_info(firm: str, version: int) -> bytes:
    return PSEUDONYM_INFO_PREFIX + firm.encode("utf-8") + b"/" + str(version).encode("ascii")


def derive_pseudonym_key(master: bytes, *, firm: str, version: int) -> bytes:
    """Derive the 32-byte pseudonym (HMAC) key of ``firm`` at key ``version`` from its master.

    HKDF-SHA256 without salt and with
    ``info = b"fedcrm/pseudonym/v1/" + firm + b"/" + version`` (UTF-8, decimal version), so keys
    for different firms, versions and uses never coincide. For a loaded firm use
    `FirmKeys.pseudonym_key`, which holds this key already derived; this function is for a
    master secret held outside a :class:`FirmKeys` and checks it the same way.

    Raises:
        KeyFileError: the master secret is not 32 bytes, or ``firm`` is not a valid firm name.
        ConfigError: ``version`` is not a positive integer.
    """
    version = _check_version(version, kind=KeyKind.PSEUDONYM)
    _check_secret(master, kind=KeyKind.PSEUDONYM, version=version)
    return _hkdf(master, info=_pseudonym_info(check_firm_name(firm), version))


class SecureSumKey(StrEnum):
    """The uses of secure-sum keys, each its own HKDF ``info``."""

    PAIR_MASK = "pair-mask"  # the ChaCha20 key of one pairwise mask
    SHARE = "share"  # the AES-GCM key of one firm's shares for one peer
    SELF_MASK = "self-mask"  # the ChaCha20 key of a firm's own mask, from its shared seed
    EPHEMERAL = "ephemeral"  # a firm's per-sum X25519 key, from its shared seed
    SEED = "seed"  # a firm's per-sum secret seeds, from its master


def derive_secure_sum_key(secret: bytes, *, use: SecureSumKey, context: bytes) -> bytes:
    """A 32-byte key for one use in one secure sum: HKDF-SHA256 of ``secret`` with
    ``info = b"fedcrm/secure-sum/v1/" + use + b"/" + context`` (``context`` names the sum - run,
    round and query - and the firms the key is for), so no two uses, sums or pairs share a key.
    """
    if len(secret) != KEY_BYTES:
        raise KeyFileError(f"a secure-sum secret must be {KEY_BYTES} bytes, got {len(secret)}")
    return _hkdf(secret, info=SECURE_SUM_INFO_PREFIX + use.value.encode() + b"/" + context)


def agreement_key_id(public_key: bytes) -> str:
    """Public identifier of a firm's X25519 key (its raw bytes' SHA-256, shortened)."""
    return "x25519:" + hashlib.sha256(public_key).hexdigest()[:16]


def raw_agreement_key(public_key: X25519PublicKey) -> bytes:
    return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def agreement_statement(firm: str, public_key: bytes) -> bytes:
    """What a firm's Ed25519 signature over its X25519 public key covers."""
    return SECURE_SUM_INFO_PREFIX + b"agreement-key/" + check_firm_name(firm).encode() + b"/" + (
        public_key
    )


def x25519_exchange(private_key: X25519PrivateKey, peer: bytes) -> bytes:
    """X25519 with a peer's raw public key; refuses malformed and low-order keys (whose shared
    secret would be all zeros, i.e. known to anyone)."""
    try:
        shared = private_key.exchange(X25519PublicKey.from_public_bytes(peer))
    except ValueError:
        raise KeyFileError("a peer's secure-sum public key is malformed or of low order") from None
    if not any(shared):
        raise KeyFileError("a peer's secure-sum public key is of low order")
    return shared


def _write_agreement_key(keys_dir: Path, key: X25519PrivateKey, *, force: bool) -> None:
    _write_secret(
        keys_dir / AGREEMENT_KEY_FILE,
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
        force=force,
    )
    write_atomic(
        keys_dir / AGREEMENT_PUB_FILE,
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ),
        mode=_PUBLIC_MODE,
    )


def _load_agreement_key(keys_dir: Path) -> X25519PrivateKey | None:
    path = keys_dir / AGREEMENT_KEY_FILE
    if not path.exists():
        return None
    try:
        loaded = serialization.load_pem_private_key(_read_secret(path), password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise KeyFileError(f"{path} is not a PEM private key") from None
    if not isinstance(loaded, X25519PrivateKey):
        raise KeyFileError(f"{path} is not an X25519 key")
    return loaded


def add_agreement_key(keys_dir: Path) -> bytes:
    """Give an existing key directory its secure-sum key (once); returns the raw public key.

    Refuses to replace one: peers and the coordinator know the firm by it within a run.
    """
    keys_dir = Path(keys_dir)
    _meta(keys_dir)  # a fedcrm key directory
    if (keys_dir / AGREEMENT_KEY_FILE).exists():
        raise KeyFileError(
            f"{keys_dir / AGREEMENT_KEY_FILE} already exists; a firm keeps one secure-sum key"
        )
    key = X25519PrivateKey.generate()
    _write_agreement_key(keys_dir, key, force=False)
    meta = _meta(keys_dir)  # record its id: load_keys checks the key file against it
    ids = meta["key_ids"]
    if isinstance(ids, dict):  # always, once _meta has checked the file
        ids["agreement"] = agreement_key_id(raw_agreement_key(key.public_key()))
    _write_meta(keys_dir, meta)
    return raw_agreement_key(key.public_key())


@dataclass(frozen=True)
class FirmKeys:
    """The secrets of one firm, checked once on creation. ``repr`` hides the key material.

    Raises (on construction):
        KeyFileError: a secret is not 32 bytes, or ``firm`` is not a valid firm name.
        ConfigError: a key version is not a positive integer.
    """

    firm: str
    pseudonym_version: int
    pseudonym_master: bytes = field(repr=False)
    data_version: int
    data_key: bytes = field(repr=False)
    signing_key: Ed25519PrivateKey | None = field(default=None, repr=False)
    agreement_key: X25519PrivateKey | None = field(default=None, repr=False)
    # Derived once here: prepare asks for it for every chunk it masks.
    _pseudonym_key: bytes = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        check_firm_name(self.firm)
        _check_version(self.pseudonym_version, kind=KeyKind.PSEUDONYM)
        _check_version(self.data_version, kind=KeyKind.DATA)
        _check_secret(self.pseudonym_master, kind=KeyKind.PSEUDONYM,
                      version=self.pseudonym_version)
        _check_secret(self.data_key, kind=KeyKind.DATA, version=self.data_version)
        derived = _hkdf(
            self.pseudonym_master, info=_pseudonym_info(self.firm, self.pseudonym_version)
        )
        object.__setattr__(self, "_pseudonym_key", derived)

    @property
    def pseudonym_key_id(self) -> str:
        return secret_key_id(KeyKind.PSEUDONYM, self.pseudonym_version, self.pseudonym_master)

    @property
    def data_key_id(self) -> str:
        return secret_key_id(KeyKind.DATA, self.data_version, self.data_key)

    def pseudonym_key(self) -> bytes:
        """The HMAC key for pseudonyms, derived per firm and version (never the master itself);
        the same bytes as `derive_pseudonym_key` gives for this firm's master and version."""
        return self._pseudonym_key

    def store_file_key(self, *, table: str, salt: bytes) -> bytes:
        """The AES-256 key of one encrypted store file (derive it once per file).

        ``HKDF-SHA256(data_key, salt=salt, info=b"fedcrm/store/v1/<firm>/<table>")``, ``salt``
        being the file's random 16-byte salt from its header.
        """
        info = STORE_INFO_PREFIX + f"{self.firm}/{table}".encode()
        return _hkdf(self.data_key, info=info, salt=salt)

    def overlap_state_key(self, *, overlap_id: str) -> bytes:
        """The AES-256 key that seals this firm's secret state of one customer-overlap count
        between its two steps: ``HKDF-SHA256(data_key, info=b"fedcrm/overlap-state/v1/<firm>/
        <overlap id>")``."""
        info = OVERLAP_STATE_INFO_PREFIX + f"{self.firm}/{overlap_id}".encode()
        return _hkdf(self.data_key, info=info)

    def signing_key_id(self) -> str | None:
        return None if self.signing_key is None else public_key_id(self.signing_key.public_key())

    # ---------------------------------------------------------------- secure sums

    def require_agreement_key(self) -> X25519PrivateKey:
        """The firm's long-term X25519 key; without it the firm cannot take part in a secure
        sum."""
        if self.agreement_key is None:
            raise KeyFileError(
                f"firm '{self.firm}' has no secure-sum key ({AGREEMENT_KEY_FILE} in its key "
                "directory); create it with `fedcrm keys agreement --dir KEYS_DIR`"
            )
        return self.agreement_key

    def agreement_public_key(self) -> bytes:
        """The raw 32 bytes of the firm's X25519 public key."""
        return raw_agreement_key(self.require_agreement_key().public_key())

    def sign_agreement_key(self) -> bytes:
        """The firm's Ed25519 signature over its X25519 public key (`agreement_statement`):
        what peers check, against the firm's signing key they hold, before they trust it."""
        signing = self.signing_key
        if signing is None:
            raise KeyFileError(
                f"firm '{self.firm}' has no signing key: its secure-sum key cannot be signed. "
                "Restore signing.key from the key directory's backup"
            )
        return signing.sign(agreement_statement(self.firm, self.agreement_public_key()))

    def sign_secure_sum(self, statement: bytes) -> bytes:
        """Sign a secure-sum statement (a per-sum public key and commitment) with the firm's
        Ed25519 key. ``statement`` must start with the secure-sum prefix, so this key never
        signs anything else through here."""
        if not statement.startswith(SECURE_SUM_INFO_PREFIX) or self.signing_key is None:
            raise KeyFileError(
                f"firm '{self.firm}' signs only secure-sum statements here, with its signing key"
            )
        return self.signing_key.sign(statement)

    def pair_secret(self, peer: bytes) -> bytes:
        """The X25519 shared secret with a peer's raw public key (never used as a key itself:
        `derive_secure_sum_key` derives each use from it)."""
        return x25519_exchange(self.require_agreement_key(), peer)

    def secure_sum_master(self) -> bytes:
        """The firm's secret from which its per-sum seeds are derived (HKDF of its X25519 key
        with a use of its own; revealing a per-sum seed reveals neither this nor the key)."""
        raw = self.require_agreement_key().private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )
        return _hkdf(raw, info=SECURE_SUM_INFO_PREFIX + b"master/" + self.firm.encode())

    def require_signing_key(self, keys_dir: Path) -> Ed25519PrivateKey:
        """The firm's signing key; without it no firm command runs (every release and every
        prepared store is recorded in the firm's signed audit log)."""
        if self.signing_key is None:
            raise KeyFileError(
                f"firm '{self.firm}' has no signing key ({Path(keys_dir) / 'signing.key'}): "
                "every release is recorded in a signed audit log, so nothing runs without it. "
                "Restore signing.key from the key directory's backup (or create new keys with "
                "`fedcrm keys init`, which is a new firm identity)"
            )
        return self.signing_key


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
    """Decode a hex key; its length is checked where it becomes part of a :class:`FirmKeys`."""
    try:
        return bytes.fromhex(text.strip())
    except ValueError:
        raise KeyFileError(
            f"{where} is not hex-encoded; expected {2 * KEY_BYTES} hex characters"
        ) from None


def _meta(keys_dir: Path) -> dict[str, object]:
    path = keys_dir / META_FILE
    if not path.exists():
        raise KeyFileError(
            f"{path} not found: {keys_dir} is not a fedcrm key directory; "
            "create one with `fedcrm keys init --firm NAME --out DIR`"
        )
    try:
        meta = json.loads(path.read_bytes().decode("utf-8"))
    except json.JSONDecodeError as exc:
        raise KeyFileError(f"{path} is not valid JSON (line {exc.lineno}); restore it from the "
                           "backup of the key directory") from None
    except UnicodeDecodeError:
        raise KeyFileError(f"{path} is not UTF-8 JSON (damaged?); restore it from the backup of "
                           "the key directory") from None
    if not isinstance(meta, dict):
        raise KeyFileError(f"{path} must hold a JSON object")
    ids = meta.get("key_ids")
    if (
        not isinstance(meta.get("firm"), str) or not meta["firm"]
        or not all(f in meta for f in ("data_version", "pseudonym_version"))
        or not isinstance(ids, dict)
        or not all(isinstance(ids.get(k), list) for k in ("data", "pseudonym"))
    ):
        # a renamed or dropped field must not turn a check off (the key ids guard the key files)
        raise KeyFileError(f"{path} is damaged (firm, key versions or key ids missing or of the "
                           "wrong type); restore it from the backup of the key directory")
    return meta


def _meta_version(meta: dict[str, object], field_name: str, keys_dir: Path) -> int:
    try:
        return int(str(meta.get(field_name, 1)))
    except ValueError:
        raise KeyFileError(
            f"{keys_dir / META_FILE}: {field_name} must be an integer; restore the file from "
            "your backup of the key directory"
        ) from None


_PUBLIC_MODE = 0o644


def _write_meta(keys_dir: Path, meta: dict[str, object]) -> None:
    text = json.dumps(meta, indent=2, sort_keys=True) + "\n"
    write_atomic(keys_dir / META_FILE, text.encode(), mode=0o600)  # in a 0700 directory anyway


def init_keys(keys_dir: Path, *, firm: str, force: bool = False) -> FirmKeys:
    """Create a firm's secrets in ``keys_dir`` (0700 directory, 0600 files)."""
    pseudonym = secrets.token_bytes(KEY_BYTES)
    data = secrets.token_bytes(KEY_BYTES)
    signing = Ed25519PrivateKey.generate()
    agreement = X25519PrivateKey.generate()
    # Built (and so checked, firm name included) before anything touches the disk.
    keys = FirmKeys(
        firm=firm,
        pseudonym_version=1,
        pseudonym_master=pseudonym,
        data_version=1,
        data_key=data,
        signing_key=signing,
    )
    if (keys_dir / META_FILE).exists() and not force:
        raise KeyFileError(f"{keys_dir} already holds keys; refusing to overwrite (use --force)")
    ensure_output_dir(keys_dir, what="key folder", mode=0o700)
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
    write_atomic(
        keys_dir / "signing.pub",
        signing.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ),
        mode=_PUBLIC_MODE,
    )
    _write_agreement_key(keys_dir, agreement, force=force)
    keys = FirmKeys(
        firm=firm,
        pseudonym_version=1,
        pseudonym_master=pseudonym,
        data_version=1,
        data_key=data,
        signing_key=signing,
        agreement_key=agreement,
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
                "agreement": agreement_key_id(keys.agreement_public_key()),
            },
        },
    )
    return keys


def load_keys(
    keys_dir: Path, *, data_version: int | None = None, firm: str | None = None
) -> FirmKeys:
    """Load a firm's keys from its key directory; environment variables override the files.

    ``firm``: the firm the caller's config names; keys made for another firm are refused."""
    meta = _meta(keys_dir)
    owner = str(meta.get("firm", ""))
    if firm is not None and owner != firm:
        raise KeyFileError(
            f"the keys in {keys_dir} belong to firm '{owner}', but the config names another "
            "firm; point [firm] keys_dir at this firm's own key folder"
        )
    firm = owner
    p_ver = _meta_version(meta, "pseudonym_version", keys_dir)
    d_ver = data_version if data_version is not None else _meta_version(
        meta, "data_version", keys_dir
    )
    if ENV_PSEUDONYM in os.environ:
        pseudonym_from = f"${ENV_PSEUDONYM}"
        pseudonym = _hex_key(os.environ[ENV_PSEUDONYM], pseudonym_from)
    else:
        path = keys_dir / f"pseudonym-v{p_ver}.key"
        pseudonym_from = str(path)
        pseudonym = _hex_key(_read_secret(path).decode("ascii", "replace"), str(path))
    if ENV_DATA in os.environ and data_version is None:
        data_from = f"${ENV_DATA}"
        data = _hex_key(os.environ[ENV_DATA], data_from)
    else:
        path = keys_dir / f"data-v{d_ver}.key"
        data_from = str(path)
        data = _hex_key(_read_secret(path).decode("ascii", "replace"), str(path))
    # A key file that no longer matches the id recorded when it was made (a changed byte, a file
    # copied from another firm) would silently give other pseudonyms or fail to decrypt later.
    # (A key given in the environment is the operator's explicit override: not checked.)
    recorded = meta.get("key_ids")
    for kind, version, secret, source in ((KeyKind.PSEUDONYM, p_ver, pseudonym, pseudonym_from),
                                          (KeyKind.DATA, d_ver, data, data_from)):
        if source.startswith("$"):
            continue
        ids = recorded.get(kind.value) if isinstance(recorded, dict) else None
        key_id = secret_key_id(kind, version, secret)
        if isinstance(ids, list) and ids and key_id not in ids:
            raise KeyFileError(
                f"{source} is not the {kind.value} key recorded in {keys_dir / META_FILE} "
                f"(its id {key_id} is not among {', '.join(map(str, ids))}): it was changed or "
                "damaged; restore the firm's key folder from its backup"
            )
    signing: Ed25519PrivateKey | None = None
    sign_path = keys_dir / "signing.key"
    if sign_path.exists():
        try:
            loaded = serialization.load_pem_private_key(_read_secret(sign_path), password=None)
        except (ValueError, TypeError, UnsupportedAlgorithm):
            raise KeyFileError(f"{sign_path} is not a PEM private key") from None
        if not isinstance(loaded, Ed25519PrivateKey):
            raise KeyFileError(f"{sign_path} is not an Ed25519 key")
        signing = loaded
    agreement = _load_agreement_key(keys_dir)
    # Any 32 bytes are a valid Ed25519 or X25519 key, so a changed byte in a key file can still
    # parse: the ids recorded when the keys were made tell a changed key from the real one.
    if isinstance(recorded, dict):
        for path, found, want in (
            (sign_path, signing and public_key_id(signing.public_key()), recorded.get("signing")),
            (keys_dir / AGREEMENT_KEY_FILE,
             agreement and agreement_key_id(raw_agreement_key(agreement.public_key())),
             recorded.get("agreement")),
        ):
            if found and isinstance(want, str) and found != want:
                raise KeyFileError(
                    f"{path} is not the key recorded in {keys_dir / META_FILE} (its id {found}, "
                    f"recorded {want}): it was changed or damaged; restore the firm's key folder "
                    "from its backup"
                )
    return FirmKeys(
        firm=firm,
        pseudonym_version=p_ver,
        pseudonym_master=pseudonym,
        data_version=d_ver,
        data_key=data,
        signing_key=signing,
        agreement_key=agreement,
    )


def rotate_key(keys_dir: Path, kind: KeyKind) -> str:
    """Create the next version of a pseudonym or data key; returns the new key id.

    Old versions stay on disk (stores encrypted with them must remain readable until they are
    re-prepared). Pseudonyms from the new version differ from the old: re-run ``fedcrm prepare``
    to re-tokenize, and the new key id is recorded in the manifest.
    """
    meta = _meta(keys_dir)
    field_name = f"{kind.value}_version"
    version = _meta_version(meta, field_name, keys_dir) + 1
    key = secrets.token_bytes(KEY_BYTES)
    _write_secret(
        keys_dir / f"{kind.value}-v{version}.key", key.hex().encode() + b"\n", force=False
    )
    new_id = secret_key_id(kind, version, key)
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
    except (ValueError, TypeError, UnsupportedAlgorithm):
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
    write_atomic(
        path.with_suffix(".pub"),
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ),
        mode=_PUBLIC_MODE,
    )
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    try:
        loaded = serialization.load_pem_public_key(path.read_bytes())
    except (OSError, ValueError, TypeError, UnsupportedAlgorithm):
        raise KeyFileError(f"{path} is not a readable PEM public key") from None
    if not isinstance(loaded, Ed25519PublicKey):
        raise KeyFileError(f"{path} is not an Ed25519 public key")
    return loaded


def load_peer_signing_keys(peer_keys_dir: Path) -> dict[str, Ed25519PublicKey]:
    """The peers' Ed25519 signing keys a firm holds: ``<firm>.pub`` files (PEM, as each firm's
    ``signing.pub``), exchanged out of band. Only these can vouch for a peer's secure-sum key."""
    folder = Path(peer_keys_dir)
    if not folder.is_dir():
        raise KeyFileError(
            f"peer_keys_dir {folder} is not a folder; put each peer firm's signing.pub there as "
            "<firm>.pub (received out of band, e.g. with its fingerprint checked by phone)"
        )
    keys = {}
    for path in sorted(folder.glob("*.pub")):
        keys[check_firm_name(path.stem)] = load_public_key(path)
    return keys
