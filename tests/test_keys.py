from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from fedcrm.privacy.errors import KeyFileError
from fedcrm.privacy.keys import KeyKind, init_keys, load_keys, rotate_key


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
