"""Write the public datasets out as partner firms' own files, ready for `fedcrm prepare`.

``fedcrm datasets export --out DIR`` writes::

    DIR/telco_customers.csv    IBM Telco customers + synthetic contact PII (UTF-8)
    DIR/telco.toml             the Telco firm's config (keys DIR/keys/telco, store DIR/stores/telco)
    DIR/cdnow_transactions.csv CDNOW purchases in the original column names
    DIR/cdnow.toml             the CDNOW firm's config

Each firm keeps its own audit log next to its store. Running the export again rewrites nothing
that a user changed: a file that differs from what the export would write (an edited config, a
cleaned CSV) is refused unless ``force``; identical files are left as they are.
``fedcrm datasets export --out DIR --firms N`` instead splits IBM Telco into N partner firms, one
folder each (as N hosts would hold them)::

    DIR/firm<i>/customers.csv  that firm's customers + synthetic contact PII (mode 0600)
    DIR/firm<i>/firm.toml      its config (keys in keys/, store in store/, next to it)

Raw exports hold (synthetic) personal data: they are written readable by their owner only.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import tomli_w

from fedcrm.privacy.durable import ensure_output_dir, write_atomic
from fedcrm.privacy.errors import ConfigError
from fedcrm.simulations.datasets import load_cdnow, load_telco
from fedcrm.simulations.partners import (
    cdnow_export,
    cdnow_firm_config,
    public_size,
    telco_export,
    telco_firm_config,
    write_toml,
)


@dataclass(frozen=True)
class ExportedFirm:
    firm: str
    data: Path
    config: Path
    rows: int


def export_datasets(
    out: Path, *, seed: int = 7, epsilon: float = 3.0, delta: float = 1e-5, force: bool = False
) -> list[ExportedFirm]:
    out = ensure_output_dir(Path(out), what="--out")
    telco = telco_export(load_telco(), seed=seed)
    cdnow = cdnow_export(load_cdnow())
    files = {
        out / "telco_customers.csv": telco.to_csv(index=False).encode("utf-8"),
        out / "telco.toml": tomli_w.dumps(telco_firm_config(
            firm="telco",
            csv_path=Path("telco_customers.csv"),
            keys_dir=Path("keys/telco"),
            store_dir=Path("stores/telco"),
            epsilon=epsilon,
            delta=delta,
            public_size=public_size(len(telco)),
            audit_log=None,  # each firm its own log, next to its store
        )).encode("utf-8"),
        out / "cdnow_transactions.csv": cdnow.to_csv(index=False).encode("utf-8"),
        out / "cdnow.toml": tomli_w.dumps(cdnow_firm_config(
            firm="cdnow",
            csv_path=Path("cdnow_transactions.csv"),
            keys_dir=Path("keys/cdnow"),
            store_dir=Path("stores/cdnow"),
            epsilon=epsilon,
            delta=delta,
            public_size=public_size(int(cdnow.iloc[:, 0].nunique())),
            audit_log=None,
        )).encode("utf-8"),
    }
    changed = [path for path, data in files.items() if _differs(path, data)]
    edited = [path for path in changed if path.exists()]
    if edited and not force:
        names = ", ".join(str(p) for p in edited)
        verb = "exists and differs" if len(edited) == 1 else "exist and differ"
        raise ConfigError(
            f"{names} already {verb} from the demo export (edited?); nothing was written. Keep "
            "them, export to another --out folder, or overwrite them with --force"
        )
    for path in changed:  # raw exports hold (synthetic) personal data: owner-only
        write_atomic(path, files[path], mode=0o600 if path.suffix == ".csv" else 0o644)
    return [
        ExportedFirm("telco", out / "telco_customers.csv", out / "telco.toml", len(telco)),
        ExportedFirm("cdnow", out / "cdnow_transactions.csv", out / "cdnow.toml", len(cdnow)),
    ]


def _differs(path: Path, data: bytes) -> bool:
    if path.is_dir():
        raise ConfigError(f"{path} is a folder; the export writes a file there. Move it away "
                          "or export to another --out folder")
    return not path.exists() or path.read_bytes() != data


def export_telco_partners(
    out: Path, *, firms: int, seed: int = 7, epsilon: float = 3.0, delta: float = 1e-5
) -> list[ExportedFirm]:
    """Split IBM Telco into ``firms`` partner firms (by contract type, Dirichlet(0.5) shares, as
    the simulations do), each in its own folder with its export and config."""
    from fedcrm.simulations.run import SimulationSection, split_telco

    parts = split_telco(load_telco(), SimulationSection(firms=firms, seed=seed))
    exported = []
    for i, part in enumerate(parts):
        name = f"firm{i + 1:03d}" if firms > 9 else f"firm{i + 1}"
        folder = out / name
        folder.mkdir(parents=True, exist_ok=True)
        csv = folder / "customers.csv"
        telco_export(part, seed=seed * 1000 + i).to_csv(csv, index=False)
        os.chmod(csv, 0o600)
        config = write_toml(
            folder / "firm.toml",
            telco_firm_config(
                firm=name, csv_path=Path("customers.csv"), keys_dir=Path("keys"),
                store_dir=Path("store"), epsilon=epsilon, delta=delta,
                public_size=public_size(len(part)),
            ),
        )
        exported.append(ExportedFirm(name, csv, config, len(part)))
    return exported
