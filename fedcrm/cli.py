"""The ``fedcrm`` command line: a thin adapter over the core.

Commands decode arguments, call the core and render results. User errors (every
``privacy.errors.FedcrmError``) become one red line on stderr and a non-zero exit code, never a
traceback; unexpected errors print only their type (their text could quote data) unless
``FEDCRM_DEBUG=1`` is set.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from privacy.errors import FedcrmError

app = typer.Typer(
    help="fedcrm: privacy-preserving federated analytics for customer data.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
keys_app = typer.Typer(help="Create and rotate a firm's secrets.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")

out = Console()
err = Console(stderr=True)

F = TypeVar("F", bound=Callable[..., Any])


def user_errors(fn: F) -> F:
    """Turn FedcrmError into one line + exit code; hide other exceptions' text (may hold PII)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except FedcrmError as exc:
            err.print(f"[bold red]error:[/] {exc}", highlight=False, markup=True, soft_wrap=True)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            err.print("[yellow]interrupted[/]")
            raise typer.Exit(130) from None
        except (typer.Exit, typer.Abort):
            raise
        except Exception as exc:
            if os.environ.get("FEDCRM_DEBUG") == "1":
                raise
            err.print(
                f"[bold red]internal error:[/] {type(exc).__name__} (details hidden because they "
                "may contain data; rerun with FEDCRM_DEBUG=1 on the firm's machine for a traceback)"
            )
            raise typer.Exit(70) from None

    return wrapper  # type: ignore[return-value]


# --------------------------------------------------------------------------- keys


@keys_app.command("init")
@user_errors
def keys_init(
    firm: Annotated[str, typer.Option(help="firm name (letters, digits, - and _)")],
    out_dir: Annotated[Path, typer.Option("--out", help="directory for the key files")],
    force: Annotated[bool, typer.Option(help="overwrite existing keys (destroys them)")] = False,
) -> None:
    """Create a firm's pseudonymization key, data-encryption key and Ed25519 signing key (0600)."""
    from privacy.keys import init_keys

    keys = init_keys(out_dir, firm=firm, force=force)
    out.print(f"created keys for firm [bold]{firm}[/] in {out_dir} (files 0600, directory 0700)")
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
    from privacy.errors import ConfigError
    from privacy.keys import KeyKind, rotate_key

    try:
        key_kind = KeyKind(kind)
    except ValueError:
        raise ConfigError(f"--kind must be 'pseudonym' or 'data', not {kind!r}") from None
    new_id = rotate_key(keys_dir, key_kind)
    out.print(f"new {kind} key: {new_id}. Run `fedcrm prepare --config FIRM.toml` to re-tokenize.")


# --------------------------------------------------------------------------- scan


@app.command()
@user_errors
def scan(
    file: Annotated[Path, typer.Argument(help="CSV or Parquet file to scan")],
    as_json: Annotated[bool, typer.Option("--json", help="print findings as JSON")] = False,
    write_config: Annotated[
        Path | None, typer.Option(help="write a starter partner config with a policy per column")
    ] = None,
    encoding: Annotated[str, typer.Option(help="CSV encoding, e.g. utf-8 or gb18030")] = "utf-8",
    delimiter: Annotated[
        str | None, typer.Option(help="CSV delimiter (sniffed if omitted)")
    ] = None,
    firm: Annotated[str, typer.Option(help="firm name for --write-config")] = "my-firm",
    table: Annotated[str, typer.Option(help="customers or transactions")] = "customers",
    sample_rows: Annotated[int, typer.Option(help="rows to sample")] = 5000,
) -> None:
    """Detect PII columns by name hints and by values; suggest a masking policy for each."""
    from fedcrm.ingest import read_sample, source_for_file
    from fedcrm.starter_config import render_starter_config
    from privacy.detection import scan_frame
    from privacy.errors import ConfigError

    spec = source_for_file(file, encoding=encoding, delimiter=delimiter)
    sample = read_sample(spec, rows=sample_rows)
    findings = scan_frame(sample)
    if as_json:
        sys.stdout.write(json.dumps([f.to_json() for f in findings], ensure_ascii=False, indent=2))
        sys.stdout.write("\n")
    else:
        t = Table(title=f"PII scan of {file} ({len(sample):,} rows sampled)")
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
    if write_config is not None:
        if table not in ("customers", "transactions"):
            raise ConfigError(f"--table must be customers or transactions, not {table!r}")
        if write_config.exists():
            raise ConfigError(f"{write_config} exists; refusing to overwrite it")
        text = render_starter_config(
            source=file,
            sample=sample,
            findings=findings,
            firm=firm,
            table=table,
            encoding=spec.encoding,
            delimiter=spec.delimiter,
        )
        write_config.write_text(text, encoding="utf-8")
        (err if as_json else out).print(f"wrote starter config {write_config}: review it")


# --------------------------------------------------------------------------- prepare


@app.command()
@user_errors
def prepare(
    config: Annotated[Path, typer.Option(help="the firm's config (TOML)")],
) -> None:
    """Ingest -> validate -> mask -> features, into the firm's encrypted prepared store."""
    from fedcrm.config import load_firm_config
    from fedcrm.prepare import prepare as run_prepare

    cfg = load_firm_config(config)
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.fields[rows]:>12,} rows"),
        TimeElapsedColumn(),
        console=err,
        transient=True,
    ) as progress:
        tasks: dict[str, Any] = {}

        def on_progress(table: str, rows: int) -> None:
            if table not in tasks:
                tasks[table] = progress.add_task(f"prepare {table}", total=None, rows=0)
            progress.update(tasks[table], rows=rows)

        result = run_prepare(cfg, on_progress=on_progress)
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
app.add_typer(budget_app, name="budget")


@budget_app.command("status")
@user_errors
def budget_status(
    ledger: Annotated[Path, typer.Option(help="the firm's ledger (JSON Lines)")],
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """ε spent and remaining, per purpose and in total (recomputed from every event)."""
    from privacy.errors import ConfigError
    from privacy.ledger import PrivacyLedger

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
    t = Table(title=f"privacy budget of {status.firm} ({ledger})")
    t.add_column("purpose")
    t.add_column("ε spent", justify="right")
    for purpose, eps in sorted(status.by_purpose.items()):
        t.add_row(purpose, f"{eps:.4f}")
    t.add_row("[bold]total (composed)[/]", f"[bold]{status.spent:.4f}[/]")
    out.print(t)
    out.print(
        f"cap ε={status.epsilon_cap:g}, δ={status.delta:g}; remaining ε={status.remaining:.4f}; "
        f"{status.n_events} releases, last {status.last_timestamp or '-'}"
    )


@app.command()
@user_errors
def train(
    config: Annotated[Path, typer.Option(help="the firm's config (TOML)")],
    out_path: Annotated[Path, typer.Option("--out", help="where to save the model")],
    epsilon: Annotated[
        float, typer.Option(help="ε to spend on this training (within the cap)")
    ] = 1.0,
    task: Annotated[str, typer.Option(help="churn or trend")] = "churn",
    model: Annotated[str | None, typer.Option(help="logistic or mlp (churn)")] = None,
) -> None:
    """Centralized DP training on this firm's own prepared store, within its budget."""
    from fedcrm.config import load_firm_config
    from fedcrm.federation import Task
    from fedcrm.scoring import train_local
    from privacy.errors import ConfigError

    try:
        task_kind = Task(task)
    except ValueError:
        raise ConfigError(f"--task must be churn or trend, not {task!r}") from None
    cfg = load_firm_config(config)
    r = train_local(cfg, out=out_path, epsilon=epsilon, task=task_kind, model_kind=model)
    metrics = ", ".join(f"{k}={v:.4f}" for k, v in r.metrics.items())
    out.print(
        f"trained {task} model -> {r.model_path} in {r.seconds:.1f}s; this release ε="
        f"{r.epsilon_spent:.4f} (noise multiplier {r.noise_multiplier:.3f}); firm total "
        f"ε={r.epsilon_total:.4f} of {r.epsilon_cap:g}; held-out {metrics}"
    )


@app.command()
@user_errors
def score(
    model: Annotated[Path, typer.Option(help="a churn model (.pt)")],
    config: Annotated[Path, typer.Option(help="the firm's config (TOML)")],
    out_path: Annotated[Path, typer.Option("--out", help="CSV to write")] = Path("risks.csv"),
) -> None:
    """Churn early-warning list for the firm's own customers (pseudonymous ids), by risk."""
    from fedcrm.config import load_firm_config
    from fedcrm.scoring import score_customers

    cfg = load_firm_config(config)
    risks = score_customers(cfg, model_path=model)
    risks.to_csv(out_path, index=False)
    counts = risks["risk_band"].value_counts().to_dict()
    out.print(
        f"scored {len(risks):,} customers -> {out_path} (high {counts.get('high', 0):,}, "
        f"medium {counts.get('medium', 0):,}, low {counts.get('low', 0):,})"
    )


# --------------------------------------------------------------------------- audit

audit_app = typer.Typer(
    help="Auditor's tools: verify, report, export (read-only).", no_args_is_help=True
)
app.add_typer(audit_app, name="audit")


def _quiet_accounting_logs() -> None:
    import logging

    logging.getLogger("absl").setLevel(logging.ERROR)


@audit_app.command("verify")
@user_errors
def audit_verify(
    run_dir: Annotated[Path, typer.Argument(help="run directory or unpacked audit bundle")],
    as_json: Annotated[bool, typer.Option("--json", help="print the verification as JSON")] = False,
) -> None:
    """Verify every signature, chain and head, and recompute each firm's ε independently."""
    from privacy.audit import verify_run
    from privacy.errors import AuditError

    _quiet_accounting_logs()
    report = verify_run(run_dir)
    if as_json:
        sys.stdout.write(json.dumps(report.to_dict(), indent=2, default=str) + "\n")
    elif report.ok:
        out.print(
            f"[bold green]PASS[/] {run_dir}: every chain, signature and firm head verified; "
            "recomputed ε within every budget; every update covered by a DP release"
        )
        for firm, summary in sorted(report.to_dict().get("firms", {}).items()):
            out.print(
                f"  {firm}: ε spent {summary.get('epsilon_spent', 0):.4f} of "
                f"{summary.get('epsilon_cap')}"
            )
    else:
        for failure in report.failures:
            err.print(f"[red]FAIL[/] {failure}", highlight=False)
    if not report.ok:
        raise typer.Exit(AuditError.exit_code)


@audit_app.command("report")
@user_errors
def audit_report(
    run_dir: Annotated[Path, typer.Argument(help="run directory or unpacked audit bundle")],
    out_path: Annotated[Path, typer.Option("--out", help="HTML file to write")] = Path(
        "report.html"
    ),
) -> None:
    """One self-contained HTML report (verdict first, figures embedded) for offline reading."""
    from privacy.audit_report import render_report

    _quiet_accounting_logs()
    path = render_report(run_dir, out_path)
    out.print(f"wrote {path}")


@audit_app.command("export")
@user_errors
def audit_export(
    run_dir: Annotated[Path, typer.Argument(help="run directory")],
    out_path: Annotated[Path, typer.Option("--out", help="zip file to write")] = Path("bundle.zip"),
) -> None:
    """Logs, public keys and the report in one zip, for an outside auditor."""
    from privacy.audit_report import export_bundle

    _quiet_accounting_logs()
    path = export_bundle(run_dir, out_path)
    out.print(f"wrote {path} (logs, public keys, summary, report; no private key, no data)")


# --------------------------------------------------------------------------- plug-in commands

PLUGIN_GROUP = "fedcrm.commands"


def load_plugins() -> None:
    """Add the commands of packages layered above ``fedcrm`` (server, clients, simulations).

    They register through the ``fedcrm.commands`` entry-point group (see pyproject.toml), so this
    core package never imports the Flower-facing packages: the layering contract holds.
    """
    from importlib.metadata import entry_points

    for ep in sorted(entry_points(group=PLUGIN_GROUP), key=lambda e: e.name):
        register = ep.load()
        register(app)


def main() -> None:  # pragma: no cover - console entry point
    load_plugins()
    app()


# --------------------------------------------------------------------------- runs

runs_app = typer.Typer(help="Past runs (summaries under runs/).", no_args_is_help=True)
app.add_typer(runs_app, name="runs")


@runs_app.command("list")
@user_errors
def runs_list(
    root: Annotated[Path, typer.Option(help="directory holding run directories")] = Path("runs"),
) -> None:
    """One line per finished run: id, task, strategy, rounds, status, main metric."""
    from fedcrm.runs import list_runs

    runs = list_runs(root)
    if not runs:
        out.print(f"no finished runs under {root}")
        return
    t = Table(title=f"runs under {root}")
    t.add_column("run id", no_wrap=True)
    for col in ("task", "strategy", "rounds", "status", "firms", "metric"):
        t.add_column(col)
    for r in runs:
        pooled = r.get("metrics", {}).get("pooled", {})
        metric = (
            f"auc={pooled['auc']:.4f}" if "auc" in pooled
            else f"cum.err={pooled['cumulative_error']:.1f}" if "cumulative_error" in pooled
            else "-"
        )
        t.add_row(r["run_id"], r["task"], r["strategy"],
                  f"{r.get('rounds_completed', '?')}/{r['rounds']}", str(r.get("status", "")),
                  str(len(r.get("firms", []))), metric)
    out.print(t)


@runs_app.command("show")
@user_errors
def runs_show(
    run_id: Annotated[str, typer.Argument(help="run id (or a unique prefix)")],
    root: Annotated[Path, typer.Option(help="directory holding run directories")] = Path("runs"),
    as_json: Annotated[bool, typer.Option("--json", help="print the whole summary")] = False,
) -> None:
    """A past run's summary: firms' ε against budget, metrics, baseline, model and provenance."""
    from fedcrm.runs import find_run, load_summary

    run_dir = find_run(root, run_id)
    summary = load_summary(run_dir)
    if as_json:
        sys.stdout.write(json.dumps(summary, indent=2) + "\n")
        return
    from fedcrm.live import print_run_summary

    print_run_summary(out, summary, run_dir)
