"""``fedcrm simulate`` and ``fedcrm datasets``: commands of the simulation scenarios."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from fedcrm.cli import err, out, user_errors

# --------------------------------------------------------------------------- datasets

datasets_app = typer.Typer(help="Public demo data (needs the 'data' extra).", no_args_is_help=True)


@datasets_app.command("export")
@user_errors
def datasets_export(
    out_dir: Annotated[Path, typer.Option("--out", help="directory for the partner files")],
) -> None:
    """Write IBM Telco and CDNOW as two partner firms' exports + configs (synthetic PII added)."""
    from simulations.export import export_datasets

    for firm in export_datasets(out_dir):
        out.print(f"{firm.firm}: {firm.rows:,} rows -> {firm.data}; config {firm.config}")
    out.print(
        "next: fedcrm keys init --firm telco --out "
        f"{out_dir / 'keys' / 'telco'} && fedcrm prepare --config {out_dir / 'telco.toml'}"
    )


# --------------------------------------------------------------------------- simulate


def _print_summary(summary: dict[str, Any], run_dir: Path) -> None:
    t = Table(title=f"run {summary['run_id']} ({summary['task']}, {summary['strategy']}, "
                    f"{summary.get('rounds_completed', '?')}/{summary['rounds']} rounds, "
                    f"{summary.get('status')})")
    for col in ("firm", "ε spent", "ε budget", "δ", "customers (train)", "stopped"):
        t.add_column(col)
    for f in summary["firms"]:
        t.add_row(f["firm"], f"{f['epsilon']:.4f}", f"{f['epsilon_budget']:.4f}",
                  f"{f['delta']:g}" if f.get("delta") else "-", str(f["num_examples"]),
                  f.get("stopped") or "")
    out.print(t)
    pooled = summary.get("metrics", {}).get("pooled", {})
    if pooled:
        out.print("pooled metrics: " + ", ".join(
            f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in pooled.items()
            if not isinstance(v, (list, dict))))
    base = summary.get("baseline", {})
    if base:
        out.print("baseline: " + ", ".join(
            f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in base.items()
            if not isinstance(v, (dict, list))))
    if summary.get("stop_reason"):
        out.print(f"[yellow]{summary['stop_reason']}[/]")
    out.print(f"summary: {run_dir / 'summary.json'}   model: {summary.get('model')}")


@user_errors
def simulate(
    config: Annotated[Path, typer.Option(help="simulation config, e.g. configs/simulations/telco_5firms.toml")],
    run_id: Annotated[str | None, typer.Option(help="run id (default: generated)")] = None,
) -> None:
    """Run a federated simulation of many firms on real public data, end to end."""
    from fedcrm.live import RunDisplay
    from simulations.run import load_simulation_config
    from simulations.run import simulate as run_sim

    cfg = load_simulation_config(config)
    sim = cfg.simulation
    from fedcrm.runs import new_run_id

    rid = run_id or new_run_id(sim.name)
    run_dir = (sim.workdir / rid).resolve()
    out.print(f"[bold]{sim.name}[/]: {sim.firms} firms on {sim.dataset.value}, task "
              f"{cfg.run.task.value}, {cfg.run.rounds} rounds, strategy {cfg.run.strategy.value}, "
              f"ε budget {sim.epsilon_budget} per firm -> {run_dir}")
    prepared: list[str] = []

    def on_firm(name: str, rows: int) -> None:
        prepared.append(name)
        err.print(f"  prepared {name}: {rows:,} source rows (validated, masked, encrypted)")

    with RunDisplay(run_dir / "events.jsonl", console=out, title=rid):
        run_dir_final, summary = run_sim(cfg, run_id=rid, on_firm=on_firm)
    _print_summary(summary, run_dir_final)




def register(app: typer.Typer) -> None:
    app.add_typer(datasets_app, name="datasets")
    app.command("simulate")(simulate)
