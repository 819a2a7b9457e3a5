"""Reading a firm's prepared, encrypted store back (only on the firm's own machine)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from fedcrm.data.prepare import MANIFEST, read_manifest
from fedcrm.privacy.encryption import read_encrypted_table
from fedcrm.privacy.errors import DecryptionError
from fedcrm.privacy.keys import FirmKeys


@dataclass(frozen=True)
class PreparedStore:
    """Decrypted tables of one firm's store, identified by the manifest's ``store_hash``."""

    firm: str
    store_hash: str
    manifest: dict[str, Any]
    customers: pd.DataFrame | None
    transactions: pd.DataFrame | None
    features: pd.DataFrame


_CACHE: dict[tuple[str, str], PreparedStore] = {}


def load_store(prepared_dir: Path, *, keys: FirmKeys, use_cache: bool = True) -> PreparedStore:
    """Decrypt the prepared store; cached per process by (directory, store hash).

    The cache avoids re-reading, re-decrypting and re-featurizing an unchanged store every
    training round when the same process serves several rounds (Flower simulation).
    """
    manifest = read_manifest(prepared_dir)
    if manifest.get("firm") != keys.firm:
        raise DecryptionError(
            f"{prepared_dir / MANIFEST} belongs to firm '{manifest.get('firm')}', "
            f"but the loaded keys are '{keys.firm}'"
        )
    cache_key = (str(prepared_dir.resolve()), str(manifest["store_hash"]))
    if use_cache and cache_key in _CACHE:
        return _CACHE[cache_key]
    tables = manifest["tables"]

    def table(name: str) -> pd.DataFrame | None:
        if name not in tables:
            return None
        return read_encrypted_table(prepared_dir / f"{name}.fcs", keys=keys, table=name)

    features = table("features")
    assert features is not None
    store = PreparedStore(
        firm=keys.firm,
        store_hash=str(manifest["store_hash"]),
        manifest=manifest,
        customers=table("customers"),
        transactions=table("transactions"),
        features=features,
    )
    if use_cache:
        _CACHE[cache_key] = store
    return store


def clear_cache() -> None:
    _CACHE.clear()
