"""The coordinator's Flower ServerApp: decode the run config (a training run, an analytics query
or a customer-overlap count), call the coordinator, done."""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedcrm.coordinator.overlap_run import OverlapRunConfig
from fedcrm.coordinator.query_run import QueryRunConfig
from fedcrm.coordinator.run_config import RunConfig
from fedcrm.server.analytics import run_query
from fedcrm.server.federation import run_federation
from fedcrm.server.overlap import run_overlap


def make_server_app(
    cfg: RunConfig | QueryRunConfig | OverlapRunConfig | None = None, *, run_id: str = "",
    run_dir: str = "",
) -> ServerApp:
    """A ServerApp; in simulation the harness passes the parsed config directly."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        from pathlib import Path

        if isinstance(cfg, QueryRunConfig):
            run_query(grid, cfg, run_id=run_id, run_dir=Path(run_dir))
            return
        if isinstance(cfg, OverlapRunConfig):
            run_overlap(grid, cfg, run_id=run_id, run_dir=Path(run_dir))
            return
        if cfg is not None:
            run_federation(grid, cfg, run_id=run_id, run_dir=Path(run_dir))
            return
        flat = dict(context.run_config)
        if QueryRunConfig.is_query(flat):
            query, qid, qdir = QueryRunConfig.from_flower(flat)
            run_query(grid, query, run_id=qid, run_dir=qdir)
            return
        if OverlapRunConfig.is_overlap(flat):
            overlap, oid, odir = OverlapRunConfig.from_flower(flat)
            run_overlap(grid, overlap, run_id=oid, run_dir=odir)
            return
        parsed, rid, rdir = RunConfig.from_flower(flat)
        run_federation(grid, parsed, run_id=rid, run_dir=rdir)

    return app


app = make_server_app()
