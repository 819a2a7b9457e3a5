"""Encryption at rest for a firm's prepared store: chunked AES-256-GCM over Arrow IPC.

File layout (``<table>.fcs``)::

    MAGIC | u32 header_len | header JSON | { u32 len | nonce(12) | ciphertext+tag }* | final chunk

* The per-file key is ``HKDF(data_key, salt=header.salt, info="fedcrm/store/v1/<firm>/<table>")``
  (`privacy.keys.FirmKeys.store_file_key`), derived once per file, not per chunk.
* Each chunk's associated data is ``header || "|<index>|<final>"``: the header (firm, table, key id,
  salt) is authenticated by every chunk, chunks cannot be swapped or reordered (index), and the
  explicit, empty *final* chunk makes truncation at a chunk boundary detectable.
* Every chunk gets a fresh random 96-bit nonce under a per-file key.

A wrong key, a tampered byte, swapped chunks, or a truncated file raise
:class:`privacy.errors.DecryptionError` naming the file and the chunk - never garbage data.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import struct
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

import pandas as pd
import pyarrow as pa
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from fedcrm.privacy.errors import DecryptionError
from fedcrm.privacy.keys import FirmKeys

MAGIC = b"FEDCRM-STORE-1\n"
NONCE_BYTES = 12
_U32 = struct.Struct(">I")


def _aad(header: bytes, index: int, final: bool) -> bytes:
    return header + f"|{index}|{int(final)}".encode()


def _frame_to_ipc(frame: pd.DataFrame) -> bytes:
    table = pa.Table.from_pandas(frame, preserve_index=False)
    sink = pa.BufferOutputStream()
    # Compressed before encryption (zstd): a prepared store is written once and read locally, so
    # the length side channel of compress-then-encrypt does not apply here.
    options = pa.ipc.IpcWriteOptions(compression="zstd")
    with pa.ipc.new_stream(sink, table.schema, options=options) as writer:
        writer.write_table(table)
    return bytes(sink.getvalue().to_pybytes())


class EncryptedTableWriter:
    """Streams DataFrame chunks into an encrypted table file (write to temp, rename on close)."""

    def __init__(self, path: Path, *, keys: FirmKeys, table: str) -> None:
        self.path = path
        self._tmp = path.with_name(path.name + ".partial")
        self._salt = secrets.token_bytes(16)
        header = {
            "format": 1,
            "firm": keys.firm,
            "table": table,
            "key_id": keys.data_key_id,
            "salt": self._salt.hex(),
            "cipher": "AES-256-GCM",
            "payload": "arrow-ipc-stream+zstd",
        }
        self._header = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
        self._aead = AESGCM(keys.store_file_key(table=table, salt=self._salt))
        self._index = 0
        self.rows = 0
        self._hash = hashlib.sha256()
        fd = os.open(self._tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        self._fh: BinaryIO = os.fdopen(fd, "wb")
        self._emit(MAGIC + _U32.pack(len(self._header)) + self._header)

    def _emit(self, data: bytes) -> None:
        self._fh.write(data)
        self._hash.update(data)

    def _write_chunk(self, plaintext: bytes, *, final: bool) -> None:
        nonce = secrets.token_bytes(NONCE_BYTES)
        ct = self._aead.encrypt(nonce, plaintext, _aad(self._header, self._index, final))
        self._emit(_U32.pack(NONCE_BYTES + len(ct)) + nonce + ct)
        self._index += 1

    def write(self, frame: pd.DataFrame) -> None:
        if len(frame) == 0:
            return
        self._write_chunk(_frame_to_ipc(frame), final=False)
        self.rows += len(frame)

    def close(self) -> str:
        """Write the final chunk, fsync and move into place; returns the file's sha256."""
        if self._fh.closed:
            return self._hash.hexdigest()
        self._write_chunk(b"", final=True)
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()
        os.replace(self._tmp, self.path)
        return self._hash.hexdigest()

    @property
    def chunks(self) -> int:
        return self._index

    def abort(self) -> None:
        if not self._fh.closed:
            self._fh.close()
        self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> EncryptedTableWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def _read_exact(fh: BinaryIO, n: int) -> bytes | None:
    data = fh.read(n)
    if len(data) == 0:
        return None
    return data


def read_header(path: Path) -> dict[str, object]:
    with path.open("rb") as fh:
        return _read_header(fh, path)[0]


def _read_header(fh: BinaryIO, path: Path) -> tuple[dict[str, object], bytes]:
    if fh.read(len(MAGIC)) != MAGIC:
        raise DecryptionError(f"{path} is not a fedcrm encrypted store file (bad magic)")
    raw_len = fh.read(4)
    if len(raw_len) != 4:
        raise DecryptionError(f"{path} is truncated inside its header")
    (hlen,) = _U32.unpack(raw_len)
    header_bytes = fh.read(hlen)
    if len(header_bytes) != hlen:
        raise DecryptionError(f"{path} is truncated inside its header")
    try:
        header = json.loads(header_bytes)
    except ValueError:  # not JSON, or not UTF-8 (UnicodeDecodeError)
        raise DecryptionError(f"{path} has a corrupt header") from None
    if not isinstance(header, dict):
        raise DecryptionError(f"{path} has a corrupt header")
    return header, header_bytes


def iter_encrypted_table(path: Path, *, keys: FirmKeys, table: str) -> Iterator[pd.DataFrame]:
    """Decrypt and yield the chunks of one table, verifying order, integrity and completeness."""
    if not path.exists():
        raise DecryptionError(f"{path} not found; run `fedcrm prepare` first")
    with path.open("rb") as fh:
        header, header_bytes = _read_header(fh, path)
        if header.get("table") != table or header.get("firm") != keys.firm:
            raise DecryptionError(
                f"{path} holds table '{header.get('table')}' of firm '{header.get('firm')}', "
                f"expected '{table}' of '{keys.firm}': files were swapped or the wrong keys loaded"
            )
        if header.get("key_id") != keys.data_key_id:
            raise DecryptionError(
                f"{path} was encrypted with data key {header.get('key_id')} but the loaded key is "
                f"{keys.data_key_id}: load the matching key version (or FEDCRM_DATA_KEY) for this "
                "store"
            )
        try:
            salt = bytes.fromhex(str(header["salt"]))
        except (KeyError, ValueError):
            raise DecryptionError(f"{path} has a corrupt header (its salt)") from None
        aead = AESGCM(keys.store_file_key(table=table, salt=salt))
        index = 0
        while True:
            raw_len = _read_exact(fh, 4)
            if raw_len is None:
                raise DecryptionError(
                    f"{path} is truncated after chunk {index}: the final chunk is missing"
                )
            if len(raw_len) != 4:
                raise DecryptionError(f"{path} is truncated inside chunk {index}")
            (clen,) = _U32.unpack(raw_len)
            body = fh.read(clen)
            if len(body) != clen or clen < NONCE_BYTES + 16:
                raise DecryptionError(f"{path} is truncated inside chunk {index}")
            nonce, ct = body[:NONCE_BYTES], body[NONCE_BYTES:]
            plaintext: bytes | None = None
            final = False
            for is_final in (False, True):
                try:
                    plaintext = aead.decrypt(nonce, ct, _aad(header_bytes, index, is_final))
                    final = is_final
                    break
                except InvalidTag:
                    continue
            if plaintext is None:
                raise DecryptionError(
                    f"{path}: chunk {index} failed authentication - the file was modified, "
                    "chunks were reordered, or it belongs to another store"
                )
            if final:
                if fh.read(1):
                    raise DecryptionError(f"{path} has unexpected data after its final chunk")
                return
            reader = pa.ipc.open_stream(pa.BufferReader(plaintext))
            yield reader.read_all().to_pandas()
            index += 1


def read_encrypted_table(path: Path, *, keys: FirmKeys, table: str) -> pd.DataFrame:
    frames = list(iter_encrypted_table(path, keys=keys, table=table))
    if not frames:
        return pd.DataFrame()
    return pd.concat(frames, ignore_index=True)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def seal(key: bytes, plaintext: bytes, *, aad: bytes) -> bytes:
    """AES-256-GCM of a small secret blob (e.g. a firm's state between two protocol steps):
    ``nonce(12) | ciphertext+tag``, a fresh random nonce each time, ``aad`` authenticated."""
    nonce = secrets.token_bytes(NONCE_BYTES)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, aad)


def unseal(key: bytes, blob: bytes, *, aad: bytes, what: str) -> bytes:
    """The inverse of :func:`seal`; a wrong key, ``aad`` or a changed byte raise
    :class:`DecryptionError` naming ``what``."""
    try:
        return AESGCM(key).decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:], aad)
    except (InvalidTag, ValueError):
        raise DecryptionError(
            f"{what} does not decrypt with this firm's key (wrong key, or the file was changed)"
        ) from None
