"""``fedcrm simulate`` and ``fedcrm datasets``: commands of the simulation scenarios."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fedcrm.cli.console import err, out, plain, user_errors

# --------------------------------------------------------------------------- datasets

datasets_app = typer.Typer(help="Public demo data (needs the 'data' extra).", no_args_is_help=True)


@datasets_app.command("export")
@user_errors
def datasets_export(
    out_dir: Annotated[Path, typer.Option("--out", help="directory for the partner files")],
    force: Annotated[
        bool, typer.Option(help="overwrite exported files that were edited since")
    ] = False,
    firms: Annotated[
        int | None,
        typer.Option(help="split IBM Telco into N partner firms, one folder each (default: "
                          "Telco and CDNOW as two firms)", min=1, max=100),
    ] = None,
) -> None:
    """Write public data as partner firms' exports + configs (synthetic PII added)."""
    from fedcrm.simulations.export import export_datasets, export_telco_partners

    if firms is None:
        for firm in export_datasets(out_dir, force=force):
            plain(out, f"{firm.firm}: {firm.rows:,} rows -> {firm.data}; config {firm.config}")
        plain(out, "next: fedcrm keys init --firm telco --out "
                   f"{out_dir / 'keys' / 'telco'} && fedcrm prepare --config "
                   f"{out_dir / 'telco.toml'}")
        return
    exported = export_telco_partners(out_dir, firms=firms)
    for firm in exported:
        plain(out, f"{firm.firm}: {firm.rows:,} rows -> {firm.data}; config {firm.config}")
    first = exported[0]
    plain(out, f"next, in each firm's folder: fedcrm keys init --firm {first.firm} --out "
               f"{first.config.parent / 'keys'} && fedcrm prepare --config {first.config}")


# --------------------------------------------------------------------------- simulate


@user_errors
def simulate(
    config: Annotated[
        Path, typer.Option(help="simulation config, e.g. configs/simulations/telco_5firms.toml")
    ],
    run_id: Annotated[str | None, typer.Option(help="run id (default: generated)")] = None,
    verbose: Annotated[
        bool, typer.Option(help="also show Flower's and Ray's logs here (always in flower.log)")
    ] = False,
) -> None:
    """Run a federated simulation of many firms on real public data, end to end."""
    import logging

    from fedcrm.coordinator.live import RunDisplay, print_run_summary
    from fedcrm.simulations.run import ENGINE_LOG, load_simulation_config
    from fedcrm.simulations.run import simulate as run_sim

    logging.getLogger("absl").setLevel(logging.ERROR)
    cfg = load_simulation_config(config)
    sim = cfg.simulation
    from fedcrm.coordinator.runs import new_run_id

    rid = run_id or new_run_id(sim.name)
    run_dir = (sim.workdir / rid).resolve()
    plain(out, f"{sim.name}: {sim.firms} firms on {sim.dataset.value}, task "
               f"{cfg.run.task.value}, {cfg.run.rounds} rounds, strategy "
               f"{cfg.run.aggregation}, ε budget {sim.epsilon_budget} per firm -> {run_dir}")
    prepared: list[str] = []

    def on_firm(name: str, rows: int) -> None:
        prepared.append(name)
        plain(err, f"  prepared {name}: {rows:,} source rows (validated, masked, encrypted)")

    with RunDisplay(run_dir / "events.jsonl", console=out, title=rid):
        run_dir_final, summary = run_sim(cfg, run_id=rid, on_firm=on_firm, verbose=verbose)
    print_run_summary(out, summary, run_dir_final)
    out.print(f"Flower and Ray log: {run_dir_final / ENGINE_LOG}")


# --------------------------------------------------------------------------- deploy

deploy_app = typer.Typer(help="Real Flower deployments of the fedcrm apps.", no_args_is_help=True)


@deploy_app.command("local")
@user_errors
def deploy_local(
    config: Annotated[
        Path, typer.Option(help="deployment config with \\[deploy] and \\[run] sections")
    ] = Path("configs/deploy/local.toml"),
    firms: Annotated[
        int | None,
        typer.Option(min=1, max=1000, help="number of firms (default: \\[deploy] firms)"),
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
    plain(out, f"{cfg.deploy.name}: {n} firms on {cfg.deploy.dataset.value}, task "
               f"{cfg.run.task.value}, {cfg.run.rounds} rounds, strategy "
               f"{cfg.run.aggregation}, ε budget {cfg.deploy.epsilon_budget} per firm, real "
               f"Flower deployment -> {run_dir}")

    def on_firm(name: str, rows: int) -> None:
        plain(err, f"  prepared {name}: {rows:,} source rows (validated, masked, encrypted)")

    def on_event(event: DeployEvent) -> None:
        plain(err, f"  {event.message}")

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
    plain(out, f"deployment {rid} completed in {done.result.duration_s:.0f}s; summary "
               f"{done.summary_path}")


def register(app: typer.Typer) -> None:
    app.add_typer(datasets_app, name="datasets")
    app.command("simulate")(simulate)
    app.add_typer(deploy_app, name="deploy")
