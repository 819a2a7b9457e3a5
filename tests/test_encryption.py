from __future__ import annotations

import json
import struct
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedcrm.privacy.encryption import MAGIC, EncryptedTableWriter, read_encrypted_table
from fedcrm.privacy.errors import DecryptionError
from fedcrm.privacy.keys import FirmKeys, init_keys


def _frames() -> list[pd.DataFrame]:
    return [
        pd.DataFrame(
            {
                "customer_id": [f"t{i}" for i in range(k, k + 50)],
                "x": range(k, k + 50),
                "plan": ["黄金会员"] * 50,
            }
        )
        for k in (0, 50, 100)
    ]


@pytest.fixture
def keys(tmp_path: Path) -> FirmKeys:
    return init_keys(tmp_path / "keys", firm="acme")


def _write(path: Path, keys: FirmKeys) -> None:
    with EncryptedTableWriter(path, keys=keys, table="customers") as w:
        for f in _frames():
            w.write(f)


def _chunk_offsets(path: Path) -> list[tuple[int, int]]:
    data = path.read_bytes()
    pos = len(MAGIC)
    (hlen,) = struct.unpack(">I", data[pos : pos + 4])
    pos += 4 + hlen
    spans = []
    while pos < len(data):
        (clen,) = struct.unpack(">I", data[pos : pos + 4])
        spans.append((pos, pos + 4 + clen))
        pos += 4 + clen
    return spans


def test_round_trip_preserves_rows_and_chinese_text(tmp_path: Path, keys: FirmKeys) -> None:
    path = tmp_path / "customers.fcs"
    _write(path, keys)
    back = read_encrypted_table(path, keys=keys, table="customers")
    pd.testing.assert_frame_equal(back, pd.concat(_frames(), ignore_index=True))
    assert "黄金会员".encode() not in path.read_bytes()


def test_wrong_key_gives_clear_error(tmp_path: Path, keys: FirmKeys) -> None:
    path = tmp_path / "customers.fcs"
    _write(path, keys)
    other = init_keys(tmp_path / "other", firm="acme")
    with pytest.raises(DecryptionError, match="encrypted with data key"):
        read_encrypted_table(path, keys=other, table="customers")


def test_flipped_byte_fails_authentication(tmp_path: Path, keys: FirmKeys) -> None:
    path = tmp_path / "customers.fcs"
    _write(path, keys)
    start, end = _chunk_offsets(path)[1]
    data = bytearray(path.read_bytes())
    data[(start + end) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(DecryptionError, match="chunk 1 failed authentication"):
        read_encrypted_table(path, keys=keys, table="customers")


def test_swapped_chunks_fail(tmp_path: Path, keys: FirmKeys) -> None:
    path = tmp_path / "customers.fcs"
    _write(path, keys)
    spans = _chunk_offsets(path)
    data = path.read_bytes()
    (a0, a1), (b0, b1) = spans[0], spans[1]
    path.write_bytes(data[:a0] + data[b0:b1] + data[a0:a1] + data[b1:])
    with pytest.raises(DecryptionError, match="chunk 0 failed authentication"):
        read_encrypted_table(path, keys=keys, table="customers")


@pytest.mark.parametrize("cut", ["final_chunk", "mid_chunk"])
def test_truncation_is_detected(tmp_path: Path, keys: FirmKeys, cut: str) -> None:
    path = tmp_path / "customers.fcs"
    _write(path, keys)
    spans = _chunk_offsets(path)
    data = path.read_bytes()
    end = spans[-1][0] if cut == "final_chunk" else spans[1][0] + 10
    path.write_bytes(data[:end])
    with pytest.raises(DecryptionError, match="truncated"):
        read_encrypted_table(path, keys=keys, table="customers")


def test_file_of_another_table_is_refused(tmp_path: Path, keys: FirmKeys) -> None:
    path = tmp_path / "customers.fcs"
    _write(path, keys)
    with pytest.raises(DecryptionError, match="expected 'features'"):
        read_encrypted_table(path, keys=keys, table="features")


def test_the_file_key_is_derived_once_per_file_not_per_chunk(
    tmp_path: Path, keys: FirmKeys, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []
    derive = FirmKeys.store_file_key

    def counting(self: FirmKeys, *, table: str, salt: bytes) -> bytes:
        calls.append(table)
        return derive(self, table=table, salt=salt)

    monkeypatch.setattr(FirmKeys, "store_file_key", counting)
    path = tmp_path / "customers.fcs"
    _write(path, keys)  # three data chunks and the final chunk
    assert calls == ["customers"]
    read_encrypted_table(path, keys=keys, table="customers")
    assert calls == ["customers", "customers"]


def test_store_format_decrypts_with_an_independent_implementation(
    tmp_path: Path, keys: FirmKeys
) -> None:
    """The documented format: HKDF(data_key, header salt, "fedcrm/store/v1/<firm>/<table>"),
    AES-256-GCM with ``header || "|<index>|<final>"`` as associated data."""
    path = tmp_path / "customers.fcs"
    _write(path, keys)
    data = path.read_bytes()
    pos = len(MAGIC)
    (hlen,) = struct.unpack(">I", data[pos : pos + 4])
    header = data[pos + 4 : pos + 4 + hlen]
    salt = bytes.fromhex(json.loads(header)["salt"])
    file_key = HKDF(
        algorithm=hashes.SHA256(), length=32, salt=salt, info=b"fedcrm/store/v1/acme/customers"
    ).derive(keys.data_key)
    start, end = _chunk_offsets(path)[0]
    body = data[start + 4 : end]
    plaintext = AESGCM(file_key).decrypt(body[:12], body[12:], header + b"|0|0")
    first = pa.ipc.open_stream(pa.BufferReader(plaintext)).read_all().to_pandas()
    pd.testing.assert_frame_equal(first, _frames()[0])
