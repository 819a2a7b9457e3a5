from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

import fedcrm.privacy.masking as masking
from fedcrm.privacy.certs import generate_node_auth_key
from fedcrm.privacy.errors import ConfigError, KeyFileError
from fedcrm.privacy.keys import (
    FirmKeys,
    KeyKind,
    derive_pseudonym_key,
    init_keys,
    load_keys,
    rotate_key,
)


def test_init_creates_0600_secret_files_and_loads_back(tmp_path: Path) -> None:
    keys = init_keys(tmp_path / "k", firm="acme")
    for name in ("pseudonym-v1.key", "data-v1.key", "signing.key"):
        mode = stat.S_IMODE((tmp_path / "k" / name).stat().st_mode)
        assert mode == 0o600, (name, oct(mode))
    loaded = load_keys(tmp_path / "k")
    assert loaded.data_key == keys.data_key
    assert loaded.pseudonym_key_id == keys.pseudonym_key_id
    assert loaded.signing_key_id() == keys.signing_key_id()


def test_repr_and_metadata_never_show_key_material(tmp_path: Path) -> None:
    keys = init_keys(tmp_path / "k", firm="acme")
    text = repr(keys) + (tmp_path / "k" / "keys.json").read_text()
    assert keys.data_key.hex() not in text
    assert keys.pseudonym_master.hex() not in text


def test_world_readable_key_file_is_refused(tmp_path: Path) -> None:
    init_keys(tmp_path / "k", firm="acme")
    os.chmod(tmp_path / "k" / "data-v1.key", 0o644)
    with pytest.raises(KeyFileError, match="chmod 600"):
        load_keys(tmp_path / "k")


def test_init_refuses_to_overwrite_existing_keys(tmp_path: Path) -> None:
    init_keys(tmp_path / "k", firm="acme")
    with pytest.raises(KeyFileError, match="refusing to overwrite"):
        init_keys(tmp_path / "k", firm="acme")


def test_pseudonym_keys_differ_across_firms_and_versions(tmp_path: Path) -> None:
    a = init_keys(tmp_path / "a", firm="a")
    b = init_keys(tmp_path / "b", firm="b")
    assert a.pseudonym_key() != b.pseudonym_key()
    new_id = rotate_key(tmp_path / "a", KeyKind.PSEUDONYM)
    rotated = load_keys(tmp_path / "a")
    assert rotated.pseudonym_version == 2
    assert rotated.pseudonym_key_id == new_id != a.pseudonym_key_id
    assert rotated.pseudonym_key() != a.pseudonym_key()


def test_environment_variable_overrides_key_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    init_keys(tmp_path / "k", firm="acme")
    monkeypatch.setenv("FEDCRM_DATA_KEY", "11" * 32)
    assert load_keys(tmp_path / "k").data_key == bytes([0x11]) * 32
    monkeypatch.setenv("FEDCRM_DATA_KEY", "zz")
    with pytest.raises(KeyFileError, match="not hex"):
        load_keys(tmp_path / "k")


# ---------------------------------------------------------------------------------------------
# Derived keys: privacy.keys owns every HKDF derivation; the infos are part of the store format
# ---------------------------------------------------------------------------------------------

MASTER = bytes(range(32))


def _independent_hkdf(master: bytes, info: bytes, salt: bytes | None = None) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=info).derive(master)


def test_derived_key_matches_independent_hkdf_with_documented_info() -> None:
    expected = _independent_hkdf(MASTER, b"fedcrm/pseudonym/v1/acme/1")
    assert derive_pseudonym_key(MASTER, firm="acme", version=1) == expected


def test_firm_keys_hold_the_same_pseudonym_key_as_the_free_function(tmp_path: Path) -> None:
    keys = init_keys(tmp_path / "k", firm="acme")
    loaded = load_keys(tmp_path / "k")
    expected = _independent_hkdf(keys.pseudonym_master, b"fedcrm/pseudonym/v1/acme/1")
    assert keys.pseudonym_key() == loaded.pseudonym_key() == expected
    assert keys.pseudonym_key() == derive_pseudonym_key(
        keys.pseudonym_master, firm="acme", version=1
    )


def test_store_file_key_matches_independent_hkdf_with_documented_info(tmp_path: Path) -> None:
    keys = init_keys(tmp_path / "k", firm="acme")
    salt = bytes(range(16))
    expected = _independent_hkdf(keys.data_key, b"fedcrm/store/v1/acme/customers", salt)
    assert keys.store_file_key(table="customers", salt=salt) == expected
    assert keys.store_file_key(table="features", salt=salt) != expected


def test_masking_reexports_the_one_derivation() -> None:
    assert masking.derive_pseudonym_key is derive_pseudonym_key
    assert masking.PSEUDONYM_INFO_PREFIX == b"fedcrm/pseudonym/v1/"


def test_derived_keys_differ_by_firm_and_version() -> None:
    keys = {
        derive_pseudonym_key(MASTER, firm=f, version=v) for f in ("acme", "beta") for v in (1, 2)
    }
    assert len(keys) == 4


def test_short_master_key_is_rejected_without_echoing_it() -> None:
    with pytest.raises(KeyFileError) as exc:
        derive_pseudonym_key(b"secretsecret", firm="acme", version=1)
    assert "secretsecret" not in str(exc.value)


@pytest.mark.parametrize("version", [0, -1, True])
def test_bad_key_version_is_a_config_error(version: int) -> None:
    with pytest.raises(ConfigError):
        derive_pseudonym_key(MASTER, firm="acme", version=version)


# ---------------------------------------------------------------------------------------------
# Checked once, where keys enter
# ---------------------------------------------------------------------------------------------


def test_a_short_key_is_refused_on_load_without_echoing_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    init_keys(tmp_path / "k", firm="acme")
    monkeypatch.setenv("FEDCRM_PSEUDONYM_KEY", "ab" * 20)
    with pytest.raises(KeyFileError, match="20 bytes, need 32") as exc:
        load_keys(tmp_path / "k")
    assert "ab" * 20 not in str(exc.value)
    assert "FEDCRM_PSEUDONYM_KEY" in str(exc.value)


def test_firm_keys_cannot_be_built_from_a_short_secret() -> None:
    with pytest.raises(KeyFileError, match="data key v1 is 16 bytes"):
        FirmKeys(firm="acme", pseudonym_version=1, pseudonym_master=MASTER, data_version=1,
                 data_key=bytes(16))


@pytest.mark.parametrize("firm", ["", "_acme", "a/b", "acme corp", "客户", "x" * 64])
def test_one_firm_name_rule_for_keys_and_node_keys(tmp_path: Path, firm: str) -> None:
    with pytest.raises(KeyFileError, match="letters, digits"):
        init_keys(tmp_path / "k", firm=firm)
    assert not (tmp_path / "k").exists()  # refused before anything was written
    with pytest.raises(KeyFileError, match="letters, digits"):
        generate_node_auth_key(tmp_path / "n", firm=firm)
    with pytest.raises(KeyFileError, match="letters, digits"):
        derive_pseudonym_key(MASTER, firm=firm, version=1)


def test_a_non_integer_version_in_keys_json_is_a_key_file_error(tmp_path: Path) -> None:
    init_keys(tmp_path / "k", firm="acme")
    meta_path = tmp_path / "k" / "keys.json"
    meta = json.loads(meta_path.read_text())
    meta["data_version"] = "two"
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(KeyFileError, match="data_version must be an integer"):
        load_keys(tmp_path / "k")


@pytest.mark.parametrize("name", ["pseudonym-v1.key", "data-v1.key"])
def test_a_key_file_that_no_longer_matches_its_recorded_id_is_refused(
    tmp_path: Path, name: str
) -> None:
    init_keys(tmp_path / "k", firm="acme")
    path = tmp_path / "k" / name
    text = path.read_text()
    path.write_text(("1" if text[0] != "1" else "2") + text[1:])  # one changed hex digit
    with pytest.raises(KeyFileError, match=r"is not the .* key recorded in .*keys\.json"):
        load_keys(tmp_path / "k")


@pytest.mark.parametrize("name", ["signing.key", "agreement.key"])
def test_a_changed_key_that_still_parses_is_refused(tmp_path: Path, name: str) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    init_keys(tmp_path / "k", firm="acme")
    other = Ed25519PrivateKey.generate() if name == "signing.key" else X25519PrivateKey.generate()
    path = tmp_path / "k" / name
    path.write_bytes(other.private_bytes(serialization.Encoding.PEM,
                                         serialization.PrivateFormat.PKCS8,
                                         serialization.NoEncryption()))
    with pytest.raises(KeyFileError, match="not the key recorded"):
        load_keys(tmp_path / "k")
