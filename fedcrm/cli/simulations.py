"""``fedcrm simulate`` and ``fedcrm datasets``: commands of the simulation scenarios."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fedcrm.cli.console import err, out, user_errors

# --------------------------------------------------------------------------- datasets

datasets_app = typer.Typer(help="Public demo data (needs the 'data' extra).", no_args_is_help=True)


@datasets_app.command("export")
@user_errors
def datasets_export(
    out_dir: Annotated[Path, typer.Option("--out", help="directory for the partner files")],
) -> None:
    """Write IBM Telco and CDNOW as two partner firms' exports + configs (synthetic PII added)."""
    from fedcrm.simulations.export import export_datasets

    for firm in export_datasets(out_dir):
        out.print(f"{firm.firm}: {firm.rows:,} rows -> {firm.data}; config {firm.config}")
    out.print(
        "next: fedcrm keys init --firm telco --out "
        f"{out_dir / 'keys' / 'telco'} && fedcrm prepare --config {out_dir / 'telco.toml'}"
    )


# --------------------------------------------------------------------------- simulate


@user_errors
def simulate(
    config: Annotated[
        Path, typer.Option(help="simulation config, e.g. configs/simulations/telco_5firms.toml")
    ],
    run_id: Annotated[str | None, typer.Option(help="run id (default: generated)")] = None,
) -> None:
    """Run a federated simulation of many firms on real public data, end to end."""
    import logging

    from fedcrm.coordinator.live import RunDisplay, print_run_summary
    from fedcrm.simulations.run import load_simulation_config
    from fedcrm.simulations.run import simulate as run_sim

    for name in ("flwr", "absl", "ray"):
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger("absl").setLevel(logging.ERROR)
    cfg = load_simulation_config(config)
    sim = cfg.simulation
    from fedcrm.coordinator.runs import new_run_id

    rid = run_id or new_run_id(sim.name)
    run_dir = (sim.workdir / rid).resolve()
    out.print(f"[bold]{sim.name}[/]: {sim.firms} firms on {sim.dataset.value}, task "
              f"{cfg.run.task.value}, {cfg.run.rounds} rounds, strategy {cfg.run.aggregation}, "
              f"ε budget {sim.epsilon_budget} per firm -> {run_dir}")
    prepared: list[str] = []

    def on_firm(name: str, rows: int) -> None:
        prepared.append(name)
        err.print(f"  prepared {name}: {rows:,} source rows (validated, masked, encrypted)")

    with RunDisplay(run_dir / "events.jsonl", console=out, title=rid):
        run_dir_final, summary = run_sim(cfg, run_id=rid, on_firm=on_firm)
    print_run_summary(out, summary, run_dir_final)


# --------------------------------------------------------------------------- deploy

deploy_app = typer.Typer(help="Real Flower deployments of the fedcrm apps.", no_args_is_help=True)


@deploy_app.command("local")
@user_errors
def deploy_local(
    config: Annotated[
        Path, typer.Option(help="deployment config with [deploy] and [run] sections")
    ] = Path("configs/deploy/local.toml"),
    firms: Annotated[
        int | None, typer.Option(help="number of firms (default: [deploy] firms)")
    ] = None,
    run_id: Annotated[str | None, typer.Option(help="run id (default: generated)")] = None,
) -> None:
    """Deploy N firms + a coordinator on this machine (TLS, node auth) and run the federation."""
    from fedcrm.coordinator.live import RunDisplay, print_run_summary
    from fedcrm.coordinator.local_deployment import DeployEvent
    from fedcrm.coordinator.processes import DeploymentError
    from fedcrm.coordinator.runs import new_run_id
    from fedcrm.simulations.deploy_local import load_local_deploy_config, run_local_deployment

    cfg = load_local_deploy_config(config)
    n = cfg.deploy.firms if firms is None else firms
    rid = run_id or new_run_id(cfg.deploy.name)
    run_dir = (cfg.deploy.workdir / rid).resolve()
    out.print(f"[bold]{cfg.deploy.name}[/]: {n} firms on {cfg.deploy.dataset.value}, task "
              f"{cfg.run.task.value}, {cfg.run.rounds} rounds, strategy {cfg.run.aggregation}, "
              f"ε budget {cfg.deploy.epsilon_budget} per firm, real Flower deployment -> {run_dir}")

    def on_firm(name: str, rows: int) -> None:
        err.print(f"  prepared {name}: {rows:,} source rows (validated, masked, encrypted)")

    def on_event(event: DeployEvent) -> None:
        err.print(f"  {event.message}", highlight=False, markup=False)

    with RunDisplay(run_dir / "events.jsonl", console=out, title=rid):
        done = run_local_deployment(cfg, firms=n, run_id=rid, on_firm=on_firm, on_event=on_event)
    if done.summary:
        print_run_summary(out, done.summary, done.run_dir)
    if not done.completed:
        raise DeploymentError(
            f"run {rid} ended {done.result.status.status_text} (fedcrm status "
            f"{done.summary.get('status', 'unknown: no summary.json')}); logs under "
            f"{done.run_dir / 'federation'}"
        )
    out.print(f"deployment {rid} completed in {done.result.duration_s:.0f}s; summary "
              f"{done.summary_path}")


def register(app: typer.Typer) -> None:
    app.add_typer(datasets_app, name="datasets")
    app.command("simulate")(simulate)
    app.add_typer(deploy_app, name="deploy")
