"""A deployed run's audit folder, put together from what each party exports (read-only inputs).

In a deployment every party keeps its own signed log on its own host: each firm next to its
ledger, the coordinator in ``<workdir>/runs/<run-id>/federation/``. An auditor verifies a run
only with all of them, laid out as :func:`fedcrm.audit.verify.verify_run` expects::

    federation/audit.jsonl, federation/signing.pub     (the coordinator's)
    firms/<firm>/audit.jsonl, firms/<firm>/signing.pub (each firm's)

* :func:`export_firm_log` - a firm packs its log and public key into a zip (after checking its
  own log verifies with its own key): nothing else, no private key, no data;
* :func:`assemble_run` - the coordinator or the auditor unpacks the firms' zips next to a copy
  of the federation log (and ``summary.json``) into a fresh folder.

The firm's whole log goes out, not a slice of it: the hash chain runs through every entry, and
the coordinator recorded the firm's log heads (length and hash) round by round.
"""

from __future__ import annotations

import json
import re
import shutil
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from fedcrm.audit.log import (
    FEDERATION_DIR,
    FIRMS_DIR,
    LOG_FILE,
    PUBLIC_KEY_FILE,
    AuditEntry,
    EntryKind,
    load_public_keys,
)
from fedcrm.audit.verify import verify_log
from fedcrm.privacy.errors import AuditError

SUMMARY_FILE = "summary.json"
_FIRM = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


@dataclass(frozen=True)
class FirmExport:
    """What a firm exported: the zip, its log's length and this run's update entries."""

    path: Path
    firm: str
    entries: int
    updates_sent: int
    updates_resent: int


def export_firm_log(
    *, firm: str, log: Path, public_key: Path, out: Path, run_id: str | None = None
) -> FirmExport:
    """Zip ``firms/<firm>/audit.jsonl`` and ``signing.pub`` for the auditor of a run.

    The log must verify with the firm's own key first (a broken log is refused: restore it from a
    backup). ``run_id`` only counts that run's ``update_sent`` / ``update_resent`` entries for the
    firm's own check; the whole log is exported.
    """
    if not _FIRM.match(firm):
        raise AuditError(f"firm name {firm!r} cannot name a folder of a run's audit layout")
    keys = load_public_keys(public_key)
    failures = verify_log(log, trusted_keys=keys)
    if failures:
        raise AuditError(
            f"{log} does not verify with {public_key} ({failures[0]}); restore the log from a "
            "backup before exporting it"
        )
    entries = [AuditEntry.from_dict(json.loads(line)) for line in log.read_bytes().splitlines()]
    mine = [e for e in entries if run_id is None or e.payload.get("run_id") == run_id]
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    folder = PurePosixPath(FIRMS_DIR) / firm
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(str(folder / LOG_FILE), log.read_bytes())
        zf.writestr(str(folder / PUBLIC_KEY_FILE), public_key.read_bytes())
    return FirmExport(
        path=out, firm=firm, entries=len(entries),
        updates_sent=sum(e.kind is EntryKind.UPDATE_SENT for e in mine),
        updates_resent=sum(e.kind is EntryKind.UPDATE_RESENT for e in mine),
    )


def _firm_members(archive: zipfile.ZipFile, source: Path) -> dict[str, dict[str, bytes]]:
    """The firm folders in an export; anything else in it is refused."""
    firms: dict[str, dict[str, bytes]] = {}
    for name in archive.namelist():
        if name.endswith("/"):
            continue
        parts = PurePosixPath(name).parts
        if (
            len(parts) != 3 or parts[0] != FIRMS_DIR or not _FIRM.match(parts[1])
            or parts[2] not in (LOG_FILE, PUBLIC_KEY_FILE)
        ):
            raise AuditError(
                f"{source} holds {name!r}; a firm's export holds only "
                f"{FIRMS_DIR}/<firm>/{LOG_FILE} and {PUBLIC_KEY_FILE}"
            )
        data = archive.read(name)
        if b"PRIVATE KEY" in data:
            raise AuditError(f"{source}: {name} holds a private key; it is not imported")
        firms.setdefault(parts[1], {})[parts[2]] = data
    return firms


def assemble_run(*, run_dir: Path, firm_exports: Sequence[Path], out: Path) -> Path:
    """Build ``out`` (a new folder) from the coordinator's run folder and the firms' exports."""
    run_dir, out = Path(run_dir), Path(out)
    federation = run_dir / FEDERATION_DIR
    if not (federation / LOG_FILE).is_file():
        raise AuditError(
            f"{run_dir} has no {FEDERATION_DIR}/{LOG_FILE}; pass the coordinator's run folder "
            "(<workdir>/runs/<run-id>)"
        )
    if out.exists() and any(out.iterdir()):
        raise AuditError(f"{out} already exists and is not empty; choose a new folder")
    firms: dict[str, dict[str, bytes]] = {}
    for export in firm_exports:
        try:
            with zipfile.ZipFile(export) as archive:
                found = _firm_members(archive, Path(export))
        except (OSError, zipfile.BadZipFile) as exc:
            raise AuditError(f"{export} is not a firm's audit export ({exc})") from None
        for firm, files in found.items():
            if firm in firms:
                raise AuditError(f"firm {firm} appears in two exports")
            if set(files) != {LOG_FILE, PUBLIC_KEY_FILE}:
                raise AuditError(f"{export}: firm {firm} lacks its {LOG_FILE} or {PUBLIC_KEY_FILE}")
            firms[firm] = files
    (out / FEDERATION_DIR).mkdir(parents=True, exist_ok=True)
    for name in (LOG_FILE, PUBLIC_KEY_FILE):
        shutil.copyfile(federation / name, out / FEDERATION_DIR / name)
    if (run_dir / SUMMARY_FILE).is_file():
        shutil.copyfile(run_dir / SUMMARY_FILE, out / SUMMARY_FILE)
    for firm, files in sorted(firms.items()):
        folder = out / FIRMS_DIR / firm
        folder.mkdir(parents=True, exist_ok=True)
        for name, data in files.items():
            (folder / name).write_bytes(data)
    return out
