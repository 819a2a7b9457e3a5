"""``fedcrm query`` and ``fedcrm overlap``: a federated DP analytics query or a private count of
the customers two firms share, in a simulation or on a running federation."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table
from rich.text import Text

from fedcrm.cli.console import err, out, user_errors

MAX_ROWS = 30
COORDINATOR_HELP = "the coordinator's deployment config (for a query file without \\[simulation])"


def _run_deployed(coordinator: Path, run_config: Any, *, what: str, run_id: str,
                  timeout: float | None, result_file: str) -> tuple[Path, dict[str, Any]]:
    """Submit a query or overlap run to the coordinator's running SuperLink and read its result
    (the run folder and ``result_file``)."""
    from fedcrm.coordinator.deploy_config import load_coordinator_config
    from fedcrm.coordinator.host import require_running_link, submit_run
    from fedcrm.coordinator.processes import DeploymentError

    cfg = load_coordinator_config(coordinator)
    require_running_link(cfg)
    outcome = submit_run(cfg, run_config, run_id=run_id, timeout_s=timeout)
    path = outcome.run_dir / result_file
    if not outcome.completed or not path.exists():
        raise DeploymentError(
            f"{what} {run_id} (Flower run {outcome.flower_run_id}) ended "
            f"{outcome.status.status_text} without {result_file}; see {outcome.log_path}"
        )
    return outcome.run_dir, json.loads(path.read_text())


def _print_result(result: dict[str, Any], run_dir: Path) -> None:
    status = str(result.get("status", "unknown"))
    answered = result.get("answered_by", [])
    out.print(Text(f"query {result.get('query_id')}: {status}; answered by {len(answered)} "
                   f"firm(s): {', '.join(answered) or 'none'}"), highlight=False)
    for firm, why in dict(result.get("declined", {})).items():
        out.print(Text(f"  {firm} declined: {why}"), highlight=False)
    if result.get("stop_reason"):
        out.print(Text(f"  {result['stop_reason']}"), highlight=False)
    estimates = result.get("estimates", [])
    if len(estimates) > MAX_ROWS:  # long curves: every k-th row here, all of them in result.md
        step = -(-len(estimates) // MAX_ROWS)
        estimates = estimates[::step]
        out.print(Text(f"(every {step}th of {len(result['estimates'])} estimates; all in "
                       f"{run_dir / 'result.md'})"), highlight=False)
    if estimates:
        table = Table(title="estimates (intervals cover the DP noise only)", title_justify="left")
        for column in ("group", "statistic", "estimate", "noise sd", "95% interval"):
            table.add_column(column, justify="left" if column in ("group", "statistic")
                             else "right")

        def fmt(v: Any) -> str:
            return "-" if v is None else f"{float(v):.4g}"

        for e in estimates:
            interval = ("suppressed" if e.get("suppressed") else
                        f"[{fmt(e.get('ci_low'))}, {fmt(e.get('ci_high'))}]")
            table.add_row(Text(str(e["group"])), Text(str(e["statistic"])),
                          fmt(e.get("estimate")), fmt(e.get("noise_std")), interval)
        out.print(table)
    spent = dict(result.get("epsilon", {}))
    if spent:
        totals = dict(result.get("epsilon_total", {}))
        out.print(Text("ε spent by this query per firm: " + ", ".join(
            f"{firm} {eps:.3g}" + (f" (total {totals[firm]:.3g})" if firm in totals else "")
            for firm, eps in sorted(spent.items()))), highlight=False)
    files = dict(result.get("files", {}))
    out.print(Text(f"results in {run_dir}: " + ", ".join(Path(f).name for f in files.values())),
              highlight=False)


@user_errors
def query(
    config: Annotated[Path, typer.Option(
        help="the query file: \\[query], and \\[simulation] to run it on simulated firms "
        "(e.g. configs/queries/telco_churn_by_contract.toml)")],
    coordinator: Annotated[Path, typer.Option(help=COORDINATOR_HELP)] = Path("coordinator.toml"),
    run_id: Annotated[str | None, typer.Option(help="query id (default: generated)")] = None,
    timeout: Annotated[float | None, typer.Option(
        help="seconds to wait for the query on a federation (default: from the file)")] = None,
    verbose: Annotated[bool, typer.Option(
        "--verbose", help="also show Flower's and Ray's log lines (simulation)")] = False,
) -> None:
    """Ask the federation one DP query; each firm answers from its own budget (or declines)."""
    from fedcrm.coordinator.query_run import RESULT_JSON, load_query_file
    from fedcrm.coordinator.runs import new_run_id

    file_cfg = load_query_file(config)
    spec = file_cfg.query
    rid = run_id or new_run_id(spec.name.replace("_", "-"))
    out.print(Text(f"query {spec.name}: {spec.kind.value}, ε {spec.epsilon:g} (δ {spec.delta:g}) "
                   f"per firm, at least {spec.min_firms} firm(s)"), highlight=False)
    if file_cfg.simulation is not None:
        from fedcrm.simulations.query import simulate_query

        def on_firm(name: str, rows: int) -> None:
            err.print(Text(f"  prepared {name}: {rows:,} source rows (validated, masked, "
                           "encrypted)"), highlight=False)

        run_dir, result = simulate_query(file_cfg, run_id=rid, on_firm=on_firm, verbose=verbose)
        _print_result(result, run_dir)
    else:
        run_dir, result = _run_deployed(coordinator, file_cfg.run_config(), what="query",
                                        run_id=rid, timeout=timeout, result_file=RESULT_JSON)
        _print_result(result, run_dir)
    if result.get("status") != "completed":
        raise typer.Exit(1)


def _print_overlap(result: dict[str, Any], run_dir: Path) -> None:
    firms = " and ".join(result.get("firms", []))
    out.print(Text(f"overlap {result.get('overlap_id')} of {firms}: {result.get('status')}"),
              highlight=False)
    for firm, why in dict(result.get("declined", {})).items():
        out.print(Text(f"  {firm} declined: {why}"), highlight=False)
    if result.get("stop_reason"):
        out.print(Text(f"  {result['stop_reason']}"), highlight=False)
    if result.get("estimate") is not None:
        table = Table(title="shared customers (the interval covers the DP noise only)",
                      title_justify="left")
        for column in ("estimate", "noise sd", "95% interval"):
            table.add_column(column, justify="right")
        if "true_overlap" in result:
            table.add_column("truth (simulation only)", justify="right")
        row = [str(result["estimate"]), f"{result['noise_std']:.3g}",
               f"[{result['ci_low']:.1f}, {result['ci_high']:.1f}]"]
        if "true_overlap" in result:
            row.append(str(result["true_overlap"]))
        table.add_row(*row)
        out.print(table)
    spent = dict(result.get("epsilon", {}))
    if spent:
        out.print(Text("ε spent per firm: " + ", ".join(
            f"{firm} {eps:.3g} (total {result['epsilon_total'][firm]:.3g})"
            for firm, eps in sorted(spent.items()))), highlight=False)
    files = dict(result.get("files", {}))
    out.print(Text(f"results in {run_dir}: " + ", ".join(Path(f).name for f in files.values())),
              highlight=False)


@user_errors
def overlap(
    config: Annotated[Path, typer.Option(
        help="the overlap file: \\[overlap], and \\[simulation] to count on two simulated "
        "firms (e.g. configs/overlaps/telco_shared_customers.toml)")],
    coordinator: Annotated[Path, typer.Option(
        help="the coordinator's deployment config (for an overlap file without "
        "\\[simulation])")] = Path("coordinator.toml"),
    run_id: Annotated[str | None, typer.Option(help="overlap id (default: generated)")] = None,
    timeout: Annotated[float | None, typer.Option(
        help="seconds to wait for the count on a federation (default: from the file)")] = None,
) -> None:
    """Count the customers two firms share, privately: each firm blinds its match keys, spends
    its own ε on DP noise, and the coordinator learns only the noisy count."""
    from fedcrm.coordinator.overlap_run import RESULT_JSON, load_overlap_file
    from fedcrm.coordinator.runs import new_run_id

    file_cfg = load_overlap_file(config)
    spec = file_cfg.overlap
    rid = run_id or new_run_id(spec.name.replace("_", "-"))
    out.print(Text(f"overlap {spec.name}: {spec.firms[0]} and {spec.firms[1]} on "
                   f"{spec.key.value}, ε {spec.epsilon:g} (δ {spec.delta:g}) per firm"),
              highlight=False)
    if file_cfg.simulation is not None:

        from fedcrm.simulations.overlap import simulate_overlap

        def on_firm(name: str, rows: int) -> None:
            err.print(Text(f"  built {name}: {rows:,} customers"), highlight=False)

        run_dir, result = simulate_overlap(file_cfg, run_id=rid, on_firm=on_firm)
    else:
        run_dir, result = _run_deployed(coordinator, file_cfg.run_config(), what="overlap",
                                        run_id=rid, timeout=timeout, result_file=RESULT_JSON)
    _print_overlap(result, run_dir)
    if result.get("status") != "completed":
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    app.command("query")(query)
    app.command("overlap")(overlap)
