"""``fedcrm prepare``: ingest -> validate -> mask -> features -> encrypted prepared store.

The store (``<store_dir>/prepared/``) holds AES-256-GCM encrypted tables ``customers``,
``transactions`` (when declared) and ``features``, plus ``manifest.json`` (schema, per-column
policy, row and quarantine counts, key ids, content hashes - never values or keys). A new store
is built in ``prepared.partial/`` and swapped in only when everything succeeded, so a failed run
never leaves a half-written store. Quarantined rows go to ``<store_dir>/quarantine.csv`` with row
number, column and reason, identified only by the customer's pseudonym; the file is written beside
the new store and moved into place only with it (a run refused for too many bad rows leaves its
list in ``quarantine.rejected.csv`` and the current store's list untouched).

Nothing is replaced by less: a run that keeps no rows is refused, and so is one that keeps fewer
than half the rows of the store it would replace, unless ``replace_with_fewer`` says the smaller
export is intended.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd

import fedcrm
from fedcrm.audit.log import AuditLog, EntryKind, data_prepared_payload
from fedcrm.data import features as crm_features
from fedcrm.data.contract import ColumnRole, FirmConfig, TableName
from fedcrm.data.ingest import iter_chunks
from fedcrm.data.validation import IdRegistry, LabelTally, check_columns, validate_chunk
from fedcrm.privacy.durable import ensure_output_dir, fsync_dir, write_atomic
from fedcrm.privacy.encryption import EncryptedTableWriter
from fedcrm.privacy.errors import KeyFileError, QuarantineThresholdExceeded, SchemaError
from fedcrm.privacy.keys import FirmKeys, load_keys
from fedcrm.privacy.masking import apply_policy, pseudonymize
from fedcrm.privacy.policies import MaskingPolicy, PiiKind

MANIFEST = "manifest.json"
QUARANTINE = "quarantine.csv"
QUARANTINE_REJECTED = "quarantine.rejected.csv"  # the list of a run refused for too many bad rows
#: A new store keeping fewer than this share of the current store's rows needs
#: ``replace_with_fewer`` (``fedcrm prepare --replace-with-fewer``).
FEWER_ROWS_RATIO = 0.5
TABLE_ORDER = (TableName.CUSTOMERS, TableName.TRANSACTIONS)
FEATURE_COLUMNS_TX = ("customer_id", "timestamp", "quantity", "amount")
FEATURE_SLICE_ROWS = 200_000

ProgressFn = Callable[[str, int], None]


@dataclass(frozen=True)
class TableReport:
    table: str
    rows_read: int
    rows_kept: int
    rows_quarantined: int
    reasons: dict[str, int]

    @property
    def quarantine_fraction(self) -> float:
        return self.rows_quarantined / self.rows_read if self.rows_read else 0.0


@dataclass(frozen=True)
class PrepareResult:
    store_dir: Path
    manifest: dict[str, Any]
    tables: tuple[TableReport, ...]
    quarantine_path: Path | None


def _mask_frame(
    frame: pd.DataFrame, cfg: FirmConfig, table: TableName, keys: FirmKeys, as_of: pd.Timestamp
) -> pd.DataFrame:
    spec = cfg.tables[table]
    key = keys.pseudonym_key()
    out = frame.drop(columns=["_row"])
    out["customer_id"] = pseudonymize(out["customer_id"], key=key, key_id=keys.pseudonym_key_id)
    for column, cspec in spec.columns.items():
        if cspec.role is not ColumnRole.PII:
            continue
        name = cspec.canonical(column, table)
        assert cspec.policy is not None
        params: dict[str, Any] = {}
        if cspec.policy is MaskingPolicy.GENERALIZE:
            if cspec.pii is PiiKind.BIRTH_DATE:
                params["as_of"] = as_of.date()
            if cspec.bins is not None:
                params["bins"] = list(cspec.bins)
            params["prefix_len"] = cspec.prefix_len
        masked = apply_policy(
            out[name],
            policy=cspec.policy,
            kind=cspec.pii,
            key=key,
            key_id=keys.pseudonym_key_id,
            **params,
        )
        if masked is None:
            out = out.drop(columns=[name])
        else:
            out[name] = masked
    return out


def _column_manifest(cfg: FirmConfig, table: TableName) -> list[dict[str, Any]]:
    cols = []
    for column, cspec in cfg.tables[table].columns.items():
        entry: dict[str, Any] = {
            "source": column,
            "name": None if cspec.role is ColumnRole.DROP else cspec.canonical(column, table),
            "role": cspec.role.value,
        }
        if cspec.kind is not None:
            entry["kind"] = cspec.kind.value
        if cspec.role is ColumnRole.ID:
            entry["policy"] = MaskingPolicy.PSEUDONYMIZE.value
        if cspec.role is ColumnRole.PII:
            entry["pii"] = cspec.pii.value if cspec.pii else None
            entry["policy"] = cspec.policy.value if cspec.policy else None
        if cspec.role is ColumnRole.DROP:
            entry["policy"] = MaskingPolicy.DROP.value
        cols.append(entry)
    return cols


def _write_quarantine(writer: Any, table: TableName, issues: pd.DataFrame, keys: FirmKeys) -> None:
    if issues.empty:
        return
    ids = issues["raw_id"].astype(object)
    blank = ids.isna() | (ids.astype(str).str.strip() == "")
    tokens = pseudonymize(
        ids.where(~blank, "<missing>").astype(str),
        key=keys.pseudonym_key(),
        key_id=keys.pseudonym_key_id,
    )
    tokens = tokens.where(~blank, "")
    for row, column, reason, token in zip(
        issues["row"], issues["column"], issues["reason"], tokens, strict=True
    ):
        writer.writerow([table.value, int(row), column, reason, token])


def _as_of(cfg: FirmConfig, tx: pd.DataFrame | None) -> pd.Timestamp:
    if cfg.features.as_of is not None:
        return pd.Timestamp(cfg.features.as_of)
    if tx is not None and len(tx):
        return pd.Timestamp(tx["timestamp"].max()).normalize() + pd.Timedelta(days=1)
    return pd.Timestamp.now().normalize()


def prepare(
    cfg: FirmConfig,
    *,
    keys: FirmKeys | None = None,
    on_progress: ProgressFn | None = None,
    today: pd.Timestamp | None = None,
    replace_with_fewer: bool = False,
) -> PrepareResult:
    """Build the firm's encrypted, masked, validated store; see the module docstring."""
    keys = keys if keys is not None else load_keys(cfg.firm.keys_dir)
    if keys.firm != cfg.firm.name:
        raise KeyFileError(
            f"keys in {cfg.firm.keys_dir} belong to firm '{keys.firm}', config says "
            f"'{cfg.firm.name}'"
        )
    store = ensure_output_dir(cfg.firm.store_dir, what="firm.store_dir", mode=0o700)
    audit = AuditLog(
        cfg.budget_files().audit_log, signing_key=keys.require_signing_key(cfg.firm.keys_dir)
    )
    staging = store / "prepared.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(mode=0o700)
    config_name = str(cfg.config_path or "the firm config")
    quarantine_path = store / QUARANTINE
    quarantine_new = store / f"{QUARANTINE}.partial"
    reports: list[TableReport] = []
    tables_manifest: dict[str, Any] = {}
    kept: dict[TableName, pd.DataFrame] = {}
    customer_ids = IdRegistry()
    feature_as_of: pd.Timestamp | None = (
        pd.Timestamp(cfg.features.as_of) if cfg.features.as_of else None
    )
    try:
        fd = os.open(quarantine_new, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with open(fd, "w", newline="", encoding="utf-8") as qfh:
            qwriter = csv.writer(qfh)
            qwriter.writerow(["table", "row", "column", "reason", "customer"])
            for table in TABLE_ORDER:
                if table not in cfg.tables:
                    continue
                spec = cfg.tables[table]
                where = spec.source.describe()
                registry = customer_ids if table is TableName.CUSTOMERS else IdRegistry()
                known = (
                    customer_ids
                    if table is TableName.TRANSACTIONS and TableName.CUSTOMERS in cfg.tables
                    else None
                )
                label_tallies = {
                    column: LabelTally(column, cspec)
                    for column, cspec in spec.columns.items()
                    if cspec.role is ColumnRole.LABEL
                }
                rows_read = 0
                bad_rows = 0
                reasons: Counter[str] = Counter()
                parts: list[pd.DataFrame] = []
                mask_as_of = feature_as_of or pd.Timestamp.now().normalize()
                with EncryptedTableWriter(
                    staging / f"{table.value}.fcs", keys=keys, table=table.value
                ) as writer:
                    for first_row, chunk in iter_chunks(
                        spec.source, expected_columns=len(spec.columns)
                    ):
                        if first_row == 1:
                            check_columns(
                                [str(c) for c in chunk.columns],
                                spec,
                                table=table,
                                where=where,
                                config=config_name,
                            )
                        result = validate_chunk(
                            chunk,
                            table=table,
                            spec=spec,
                            first_row=first_row,
                            ids=registry,
                            known_customers=known,
                            today=today,
                            labels=label_tallies,
                        )
                        rows_read += result.rows_read
                        bad_rows += result.rows_read - len(result.frame)
                        reasons.update(
                            f"{c}: {r}"
                            for c, r in zip(
                                result.issues["column"], result.issues["reason"], strict=True
                            )
                        )
                        _write_quarantine(qwriter, table, result.issues, keys)
                        masked = _mask_frame(result.frame, cfg, table, keys, mask_as_of)
                        writer.write(masked)
                        keep_cols = [c for c in masked.columns if c not in _pii_names(cfg, table)]
                        if table is TableName.TRANSACTIONS:
                            keep_cols = [c for c in FEATURE_COLUMNS_TX if c in masked.columns]
                        parts.append(masked[keep_cols])
                        if on_progress is not None:
                            on_progress(table.value, rows_read)
                    chunks = writer.chunks
                    # close() returns the sha256 of the bytes it wrote: no second read of the file
                    file_hash = writer.close()
                for tally in label_tallies.values():
                    tally.check(where=where, config=config_name)
                report = TableReport(
                    table.value,
                    rows_read,
                    rows_read - bad_rows,
                    bad_rows,
                    dict(reasons.most_common()),
                )
                reports.append(report)
                kept[table] = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()
                parts.clear()  # the chunks are copied into kept[table]; free them before features
                tables_manifest[table.value] = {
                    "source_kind": spec.source.kind.value,
                    "rows_read": rows_read,
                    "rows_kept": rows_read - bad_rows,
                    "rows_quarantined": bad_rows,
                    "chunks": chunks,
                    "sha256": file_hash,
                    "columns": _column_manifest(cfg, table),
                }
        threshold = cfg.validation.max_quarantine_fraction
        for report in reports:
            if report.quarantine_fraction > threshold:
                top = "; ".join(f"{r} ({n})" for r, n in list(report.reasons.items())[:3])
                rejected = store / QUARANTINE_REJECTED
                os.replace(quarantine_new, rejected)
                raise QuarantineThresholdExceeded(
                    f"{report.table}: {report.rows_quarantined:,} of {report.rows_read:,} rows "
                    f"({report.quarantine_fraction:.1%}) failed validation, above the "
                    f"{threshold:.0%} threshold (validation.max_quarantine_fraction); the store "
                    f"was not changed. Top reasons: {top}. Details: {rejected}"
                )
        _refuse_fewer_rows(cfg, reports, replace_with_fewer=replace_with_fewer)
        customers = kept.get(TableName.CUSTOMERS)
        transactions = kept.get(TableName.TRANSACTIONS)
        as_of = _as_of(cfg, transactions)
        feats = crm_features.build_features(customers, transactions, as_of=as_of)
        if "churn" not in feats.columns and transactions is not None and cfg.features.churn_cutoff:
            labels = crm_features.churn_labels(
                transactions,
                cutoff=pd.Timestamp(cfg.features.churn_cutoff),
                horizon_days=cfg.features.churn_horizon_days,
            )
            feats = (
                feats.join(labels.rename("churn"), on="customer_id")
                if ("customer_id" in feats.columns)
                else feats.join(labels.rename("churn"))
            )
        if "customer_id" not in feats.columns:
            feats = feats.reset_index().rename(columns={"index": "customer_id"})
        with EncryptedTableWriter(staging / "features.fcs", keys=keys, table="features") as fw:
            _write_in_slices(fw, feats)
            features_hash = fw.close()
        tables_manifest["features"] = {
            "rows": len(feats),
            "columns": [str(c) for c in feats.columns],
            "sha256": features_hash,
            "as_of": as_of.date().isoformat(),
        }
        store_hash = hashlib.sha256(
            "".join(v["sha256"] for _, v in sorted(tables_manifest.items())).encode()
        ).hexdigest()
        manifest: dict[str, Any] = {
            "format": 1,
            "firm": cfg.firm.name,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "fedcrm_version": fedcrm.__version__,
            "config_sha256": cfg.config_sha256,
            "key_ids": {
                "pseudonym": keys.pseudonym_key_id,
                "data": keys.data_key_id,
                "signing": keys.signing_key_id(),
            },
            "tables": tables_manifest,
            "quarantine": {
                "file": QUARANTINE,
                "threshold": cfg.validation.max_quarantine_fraction,
                "rows": {r.table: r.rows_quarantined for r in reports},
                "reasons": {r.table: r.reasons for r in reports},
            },
            "store_hash": store_hash,
        }
        write_atomic(
            staging / MANIFEST,
            (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode(),
            mode=0o644,
        )
        _swap_in(staging, cfg.prepared_dir)
        os.replace(quarantine_new, quarantine_path)  # the new store's list, with the new store
        fsync_dir(store)
        audit.append(EntryKind.DATA_PREPARED, data_prepared_payload(manifest))
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        quarantine_new.unlink(missing_ok=True)
        raise
    return PrepareResult(
        store_dir=cfg.prepared_dir,
        manifest=manifest,
        tables=tuple(reports),
        quarantine_path=quarantine_path if any(r.rows_quarantined for r in reports) else None,
    )


def _refuse_fewer_rows(
    cfg: FirmConfig, reports: list[TableReport], *, replace_with_fewer: bool
) -> None:
    """Refuse a store that keeps no rows, or far fewer than the store it would replace."""
    config = cfg.config_path or "FIRM.toml"
    for report in reports:
        if report.rows_kept == 0:
            raise SchemaError(
                f"{report.table}: no row of the {report.rows_read:,} read passed validation; the "
                "store was not changed. Check the export against the config's column rules"
            )
    try:
        previous = read_manifest(cfg.prepared_dir)["tables"]
    except SchemaError:
        return  # no store (or a damaged one) to protect: a fresh prepare is the way to rebuild it
    for report in reports:
        before = previous.get(report.table, {}).get("rows_kept")
        if not isinstance(before, int) or replace_with_fewer:
            continue
        if report.rows_kept < FEWER_ROWS_RATIO * before:
            raise SchemaError(
                f"{report.table}: this export keeps {report.rows_kept:,} rows, the current store "
                f"in {cfg.prepared_dir} has {before:,} (fewer than {FEWER_ROWS_RATIO:.0%}); the "
                "store was not changed. If the smaller export is right, run `fedcrm prepare "
                f"--config {config} --replace-with-fewer`"
            )


def _write_in_slices(writer: EncryptedTableWriter, frame: pd.DataFrame) -> None:
    """Encrypt ``frame`` in slices of ``FEATURE_SLICE_ROWS`` rows.

    Serializing and encrypting a whole million-row table at once holds about four copies of it
    (Arrow table, IPC buffer, bytes, ciphertext); slices bound that to one slice's worth. Reading
    concatenates the chunks, so the decrypted table is the same. Object columns are written
    whole: Arrow infers their type per slice, and an all-missing slice would change it.
    """
    if any(pd.api.types.is_object_dtype(dtype) for dtype in frame.dtypes):
        writer.write(frame)
        return
    for start in range(0, len(frame), FEATURE_SLICE_ROWS):
        writer.write(frame.iloc[start : start + FEATURE_SLICE_ROWS])


def _pii_names(cfg: FirmConfig, table: TableName) -> set[str]:
    return {
        c.canonical(src, table)
        for src, c in cfg.tables[table].columns.items()
        if c.role is ColumnRole.PII
    }


def _swap_in(staging: Path, target: Path) -> None:
    old = target.with_name(target.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        os.replace(target, old)
    os.replace(staging, target)
    shutil.rmtree(old, ignore_errors=True)
    fsync_dir(target.parent)


# every field prepare writes, so that a renamed or dropped field is damage, not a default
_MANIFEST_FIELDS: dict[str, type | tuple[type, ...]] = {
    "format": int, "firm": str, "created": str, "fedcrm_version": str, "config_sha256": str,
    "key_ids": dict, "tables": dict, "quarantine": dict, "store_hash": str,
}


def read_manifest(prepared_dir: Path) -> dict[str, Any]:
    """The store's manifest, checked to have the fields every reader relies on."""
    path = prepared_dir / MANIFEST
    rebuild = "run `fedcrm prepare --config FIRM.toml` to rebuild the store"
    if not path.is_file():
        what = "is not a file" if path.exists() else "not found"
        raise SchemaError(f"{path} {what}; run `fedcrm prepare --config FIRM.toml` first")
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, ValueError):
        raise SchemaError(f"{path} is damaged (not readable JSON); {rebuild}") from None
    tables = data.get("tables") if isinstance(data, dict) else None
    if (
        not isinstance(tables, dict)
        or any(not isinstance(data.get(k), t) for k, t in _MANIFEST_FIELDS.items())
        or data.get("format") != 1
        or not isinstance(data.get("store_hash"), str)
        or not isinstance(tables.get("features"), dict)
        or not all(isinstance(v, dict) for v in tables.values())
    ):
        raise SchemaError(f"{path} is damaged (fields missing or of the wrong type); {rebuild}")
    return data
