"""The partner firm's commands: ``keys``, ``scan``, ``prepare``, ``budget``, ``train``, ``score``.

Each decodes its arguments, calls the firm's core and renders the result; heavy imports (pandas,
torch) happen inside the commands so ``fedcrm --help`` stays fast.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from fedcrm.cli.console import err, out, user_errors
from fedcrm.learning.settings import ChurnModelKind
from fedcrm.protocol import TaskKind

keys_app = typer.Typer(help="Create and rotate a firm's secrets.", no_args_is_help=True)

# --------------------------------------------------------------------------- keys


@keys_app.command("init")
@user_errors
def keys_init(
    firm: Annotated[str, typer.Option(help="firm name (letters, digits, - and _)")],
    out_dir: Annotated[Path, typer.Option("--out", help="directory for the key files")],
    force: Annotated[bool, typer.Option(help="overwrite existing keys (destroys them)")] = False,
) -> None:
    """Create a firm's pseudonymization key, data-encryption key and Ed25519 signing key (0600)."""
    from fedcrm.privacy.keys import init_keys

    keys = init_keys(out_dir, firm=firm, force=force)
    out.print(f"created keys for firm {firm} in {out_dir} (files 0600, directory 0700)")
    out.print(f"  pseudonym key id: {keys.pseudonym_key_id}")
    out.print(f"  data key id:      {keys.data_key_id}")
    out.print(
        f"  signing key id:   {keys.signing_key_id()} (public key: {out_dir / 'signing.pub'})"
    )
    out.print("Keep this directory secret and backed up; only signing.pub may be shared.")


@keys_app.command("rotate")
@user_errors
def keys_rotate(
    keys_dir: Annotated[Path, typer.Option("--dir", help="the firm's key directory")],
    kind: Annotated[str, typer.Option(help="pseudonym or data")] = "pseudonym",
) -> None:
    """Create the next version of a key; re-run `fedcrm prepare` to re-tokenize / re-encrypt."""
    from fedcrm.privacy.errors import ConfigError
    from fedcrm.privacy.keys import KeyKind, rotate_key

    try:
        key_kind = KeyKind(kind)
    except ValueError:
        raise ConfigError(f"--kind must be 'pseudonym' or 'data', not {kind!r}") from None
    new_id = rotate_key(keys_dir, key_kind)
    out.print(f"new {kind} key: {new_id}. Run `fedcrm prepare --config FIRM.toml` to re-tokenize.")


@keys_app.command("agreement")
@user_errors
def keys_agreement(
    keys_dir: Annotated[Path, typer.Option("--dir", help="the firm's key directory")],
) -> None:
    """Add the firm's secure-sum key (X25519, 0600) to a key directory made before it existed."""
    from fedcrm.privacy.keys import add_agreement_key, agreement_key_id

    public = add_agreement_key(keys_dir)
    out.print(f"secure-sum key {agreement_key_id(public)} created in {keys_dir} "
              f"(public key: {keys_dir / 'agreement.pub'})")


# --------------------------------------------------------------------------- scan

#: Rows of the read sample whose values are checked per column (the evidence column counts them).
SCAN_VALUES_PER_COLUMN = 2000


@user_errors
def scan(
    file: Annotated[Path, typer.Argument(help="CSV or Parquet file to scan")],
    as_json: Annotated[bool, typer.Option("--json", help="print findings as JSON")] = False,
    write_config: Annotated[
        Path | None, typer.Option(help="write a starter partner config with a policy per column")
    ] = None,
    encoding: Annotated[
        str | None, typer.Option(help="CSV encoding, e.g. gb18030 (detected if omitted)")
    ] = None,
    delimiter: Annotated[
        str | None, typer.Option(help="CSV delimiter (detected if omitted)")
    ] = None,
    firm: Annotated[str, typer.Option(help="firm name for --write-config")] = "my-firm",
    table: Annotated[str, typer.Option(help="customers or transactions")] = "customers",
    sample_rows: Annotated[
        int, typer.Option(min=1, max=10_000_000, help="rows to read from the start of the file")
    ] = 5000,
) -> None:
    """Detect the CSV encoding and delimiter and the PII columns (by name hints and by values);
    suggest a masking policy for each column, and with --write-config a role."""
    from fedcrm.data.ingest import read_sample, source_for_file
    from fedcrm.data.starter_config import render_starter_config
    from fedcrm.privacy.detection import scan_frame
    from fedcrm.privacy.errors import ConfigError

    if write_config is not None:
        if table not in ("customers", "transactions"):
            raise ConfigError(f"--table must be customers or transactions, not {table!r}")
        if write_config.exists():
            raise ConfigError(f"{write_config} exists; refusing to overwrite it")
    source = source_for_file(file, encoding=encoding, delimiter=delimiter)
    sample = read_sample(source, rows=sample_rows)
    findings = scan_frame(sample, sample_size=SCAN_VALUES_PER_COLUMN)
    report = err if as_json else out
    if as_json:
        document = {
            "source": source.to_json(),
            "rows_sampled": len(sample),
            "columns": [f.to_json() for f in findings],
        }
        sys.stdout.write(json.dumps(document, ensure_ascii=False, indent=2))
        sys.stdout.write("\n")
    else:
        checked = min(len(sample), SCAN_VALUES_PER_COLUMN)
        t = Table(title=(
            f"PII scan of {file} (first {len(sample):,} rows read; {checked:,} of them sampled "
            f"per column; {source.describe()})"
        ))
        for col in ("column", "kind", "confidence", "suggested policy", "evidence"):
            t.add_column(col)
        for f in findings:
            t.add_row(
                f.column,
                f.kind.value if f.kind else "-",
                f"{f.confidence:.2f}",
                f.suggested_policy.value if f.suggested_policy else "-",
                f.evidence,
            )
        out.print(t)
    if not source.sure:
        report.print(
            "REVIEW: the encoding or delimiter detection is unsure; check that the column names "
            "read correctly, else pass --encoding / --delimiter",
            markup=False,
        )
    if write_config is not None:
        text = render_starter_config(
            source=file,
            sample=sample,
            findings=findings,
            firm=firm,
            table=table,
            encoding=source.encoding,
            delimiter=source.delimiter,
        )
        from fedcrm.privacy.durable import write_atomic

        write_atomic(write_config, text.encode("utf-8"), mode=0o644)
        report.print(f"wrote starter config {write_config}: review it", markup=False)


# --------------------------------------------------------------------------- prepare


@user_errors
def prepare(
    config: Annotated[Path, typer.Option(help="the firm's config (TOML)")],
    replace_with_fewer: Annotated[
        bool,
        typer.Option(help="replace the store even if the new one keeps fewer than half its rows"),
    ] = False,
) -> None:
    """Ingest -> validate -> mask -> features, into the firm's encrypted prepared store."""
    from fedcrm.data.contract import load_firm_config
    from fedcrm.data.prepare import prepare as run_prepare

    cfg = load_firm_config(config)
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.fields[rows]:>12,} rows"),
        TimeElapsedColumn(),
        console=err,
        transient=True,
        disable=not err.is_terminal,  # no progress bar (nor its blank line) in logs and pipes
    ) as progress:
        tasks: dict[str, Any] = {}

        def on_progress(table: str, rows: int) -> None:
            if table not in tasks:
                tasks[table] = progress.add_task(f"prepare {table}", total=None, rows=0)
            progress.update(tasks[table], rows=rows)

        result = run_prepare(cfg, on_progress=on_progress, replace_with_fewer=replace_with_fewer)
    t = Table(title=f"prepared store of {cfg.firm.name}: {result.store_dir}")
    for col in ("table", "rows read", "kept", "quarantined", "encrypted"):
        t.add_column(col, justify="right" if col != "table" else "left")
    for r in result.tables:
        size = (result.store_dir / f"{r.table}.fcs").stat().st_size
        t.add_row(
            r.table,
            f"{r.rows_read:,}",
            f"{r.rows_kept:,}",
            f"{r.rows_quarantined:,} ({r.quarantine_fraction:.2%})",
            f"{size / 1e6:.2f} MB",
        )
    feats = result.manifest["tables"]["features"]
    size = (result.store_dir / "features.fcs").stat().st_size
    t.add_row("features", "", f"{feats['rows']:,}", "", f"{size / 1e6:.2f} MB")
    out.print(t)
    if result.quarantine_path is not None:
        out.print(f"quarantined rows (masked): {result.quarantine_path}")
    ids = result.manifest["key_ids"]
    out.print(
        f"manifest: {result.store_dir / 'manifest.json'}  (keys: {ids['pseudonym']}, {ids['data']})"
    )


# --------------------------------------------------------------------------- budget, train, score

budget_app = typer.Typer(help="The firm's privacy budget ledger.", no_args_is_help=True)


@budget_app.command("status")
@user_errors
def budget_status(
    config: Annotated[
        Path | None, typer.Option(help="the firm's config (finds its ledger through its keys)")
    ] = None,
    ledger: Annotated[
        Path | None, typer.Option(help="a ledger file (JSON Lines), e.g. a copy to inspect")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """ε spent and remaining, per purpose and in total (recomputed from every event)."""
    from fedcrm.privacy.errors import ConfigError
    from fedcrm.privacy.ledger import PrivacyLedger

    if (config is None) == (ledger is None):
        raise ConfigError("give either --config FIRM.toml or --ledger LEDGER.jsonl")
    if config is not None:
        from fedcrm.data.contract import load_firm_config
        from fedcrm.privacy.keys import load_keys
        from fedcrm.release import FirmPrivacy

        cfg = load_firm_config(config)
        book = FirmPrivacy(cfg, load_keys(cfg.firm.keys_dir, firm=cfg.firm.name)).ledger
    else:
        assert ledger is not None
        sidecar = ledger.with_name(ledger.name + ".budget.json")
        if not ledger.exists() and not sidecar.exists():
            raise ConfigError(f"ledger {ledger} not found")
        try:
            firm = str(json.loads(sidecar.read_text()).get("firm", ""))
        except (OSError, json.JSONDecodeError):
            raise ConfigError(
                f"{sidecar} (the ledger's budget file) is missing or unreadable"
            ) from None
        book = PrivacyLedger(ledger, firm=firm)
    status = book.status()
    data = status.to_json()
    if as_json:
        sys.stdout.write(json.dumps(data, indent=2) + "\n")
        return
    t = Table(title=f"privacy budget of {status.firm} ({book.path})")
    t.add_column("purpose")
    t.add_column("ε spent", justify="right")
    for purpose, eps in sorted(status.by_purpose.items()):
        t.add_row(purpose, f"{eps:.4f}")
    t.add_row("total (composed)", f"{status.spent:.4f}", style="bold")
    out.print(t)
    out.print(
        f"cap ε={status.epsilon_cap:g}, δ={status.delta:g}; remaining ε={status.remaining:.4f}; "
        f"{status.n_events} releases, last {status.last_timestamp or '-'}",
    )


@budget_app.command("raise")
@user_errors
def budget_raise(
    config: Annotated[Path, typer.Option(help="the firm's config")],
    epsilon: Annotated[float, typer.Option(help="the new ε cap (finite, > 0)")],
    reason: Annotated[str, typer.Option(help="why (recorded, signed, shown to auditors)")],
    delta: Annotated[
        float | None, typer.Option(help="a new δ (default: keep the recorded one)")
    ] = None,
) -> None:
    """Change the firm's cap: an explicit, signed and logged governance decision."""
    from fedcrm.data.contract import load_firm_config
    from fedcrm.privacy.keys import load_keys
    from fedcrm.release import FirmPrivacy

    cfg = load_firm_config(config)
    privacy = FirmPrivacy(cfg, load_keys(cfg.firm.keys_dir, firm=cfg.firm.name), govern=False)
    old = privacy.ledger.budget
    new = _budget_argument(epsilon, old.delta if delta is None else delta)
    privacy.raise_cap(new, reason=reason)
    out.print(
        f"firm {cfg.firm.name}: cap ε={old.epsilon:g} -> {new.epsilon:g}, δ={new.delta:g} "
        f"(signed in {privacy.files.audit_log}). Set budget.epsilon = {new.epsilon:g} in "
        f"{config} to match.",
    )


@budget_app.command("rebuild")
@user_errors
def budget_rebuild(config: Annotated[Path, typer.Option(help="the firm's config")]) -> None:
    """Rebuild the firm's ledger from its signed audit log (after it was lost or edited)."""
    from fedcrm.data.contract import load_firm_config
    from fedcrm.privacy.keys import load_keys
    from fedcrm.release import rebuild_ledger

    cfg = load_firm_config(config)
    releases, budget = rebuild_ledger(cfg, load_keys(cfg.firm.keys_dir, firm=cfg.firm.name))
    cap = "no budget recorded yet" if budget is None else f"cap ε={budget.epsilon:g}"
    out.print(
        f"rebuilt {cfg.budget_files().ledger} from the signed audit log: {releases} releases, "
        f"{cap}",
    )


def _budget_argument(epsilon: float, delta: float) -> Any:
    from fedcrm.privacy.errors import ConfigError
    from fedcrm.privacy.ledger import Budget

    try:
        return Budget(epsilon=epsilon, delta=delta)
    except ValueError as exc:
        raise ConfigError(f"--epsilon/--delta: {exc}") from None


@user_errors
def train(
    config: Annotated[Path, typer.Option(help="the firm's config (TOML)")],
    out_path: Annotated[Path, typer.Option("--out", help="where to save the model")],
    epsilon: Annotated[
        float, typer.Option(help="ε to spend on this training (within the cap)")
    ] = 1.0,
    task: Annotated[TaskKind, typer.Option(help="what to train")] = TaskKind.CHURN,
    model: Annotated[
        ChurnModelKind | None, typer.Option(help="churn model (default: the config's)")
    ] = None,
) -> None:
    """Centralized DP training on this firm's own prepared store, within its budget."""
    started = time.perf_counter()
    from fedcrm.data.contract import load_firm_config
    from fedcrm.local_training import train_local

    cfg = load_firm_config(config)
    r = train_local(cfg, out=out_path, epsilon=epsilon, task=task, model_kind=model)
    metrics = ", ".join(f"{k}={v:.4f}" for k, v in r.metrics.items())
    out.print(
        f"trained {task.value} model -> {r.model_path} in {time.perf_counter() - started:.1f}s; "
        f"added ε={r.epsilon_added:.4f} to the firm's total (this release alone: "
        f"ε={r.epsilon_release:.4f}, noise multiplier {r.noise_multiplier:.3f}); firm total "
        f"ε={r.epsilon_total:.4f} of {r.epsilon_cap:g}; held-out {metrics}",
    )


@user_errors
def score(
    model: Annotated[Path, typer.Option(help="a churn model (.pt)")],
    config: Annotated[Path, typer.Option(help="the firm's config (TOML)")],
    out_path: Annotated[Path, typer.Option("--out", help="CSV to write")] = Path("risks.csv"),
) -> None:
    """Churn early-warning list for the firm's own customers (pseudonymous ids), by risk."""
    from fedcrm.data.contract import load_firm_config
    from fedcrm.privacy.durable import check_output_file, write_private
    from fedcrm.scoring import score_customers

    check_output_file(out_path, what="--out CSV")
    cfg = load_firm_config(config)
    risks = score_customers(cfg, model_path=model)
    # 0600: the list ranks the firm's own customers; it stays on the firm's machine
    write_private(out_path, risks.to_csv(index=False).encode("utf-8"))
    counts = risks["risk_band"].value_counts().to_dict()
    out.print(
        f"scored {len(risks):,} customers -> {out_path} (high {counts.get('high', 0):,}, "
        f"medium {counts.get('medium', 0):,}, low {counts.get('low', 0):,})"
    )


@user_errors
def contact_list(
    risks: Annotated[Path, typer.Option(help="the risk list `fedcrm score` wrote")],
    config: Annotated[Path, typer.Option(help="the firm's config (TOML)")],
    out_path: Annotated[Path, typer.Option("--out", help="CSV to write (0600)")] = Path(
        "contact_list.csv"
    ),
    include: Annotated[
        list[str] | None,
        typer.Option(help="a column of the firm's export to add, e.g. name or phone (repeatable)"),
    ] = None,
    band: Annotated[
        list[str] | None, typer.Option(help="keep only this risk band: high, medium, low "
                                            "(repeatable)")
    ] = None,
) -> None:
    """The risk list with the firm's own customer numbers: joined locally with its own key."""
    from fedcrm.data.contract import load_firm_config
    from fedcrm.privacy.durable import check_output_file, write_private
    from fedcrm.privacy.errors import ConfigError
    from fedcrm.scoring import RISK_BANDS, read_risk_list
    from fedcrm.scoring import contact_list as join_contacts

    names = {name for _, name in RISK_BANDS}
    for b in band or []:
        if b not in names:
            raise ConfigError(f"--band must be one of {', '.join(sorted(names))}, not {b!r}")
    check_output_file(out_path, what="--out CSV")
    if out_path.resolve() == risks.resolve():
        raise ConfigError(f"--out {out_path} is the risk list itself; write the contact list "
                          "to another file")
    cfg = load_firm_config(config)
    listed, gone = join_contacts(cfg, read_risk_list(risks), include=include or [],
                                 bands=band or [])
    # 0600: customer numbers (and any contact columns chosen) next to churn risk
    write_private(out_path, listed.to_csv(index=False).encode("utf-8"))
    note = f"; {gone:,} listed customers are no longer in the export" if gone else ""
    out.print(f"wrote {len(listed):,} customers with their own ids -> {out_path} (0600; keep it "
              f"on the firm's machine){note}")


def register(app: typer.Typer) -> None:
    app.add_typer(keys_app, name="keys")
    app.command()(scan)
    app.command()(prepare)
    app.add_typer(budget_app, name="budget")
    app.command()(train)
    app.command()(score)
    app.command("contact-list")(contact_list)
