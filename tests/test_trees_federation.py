"""A real Flower simulation of a DP tree run (``model = "trees"``) between two generated firms.

Histogram splits, so both kinds of release travel (every level's histograms, then the leaves),
and a DP evaluation in the last round. Checks the run's outcome, its saved model, the auditor's
verification of the signed logs, and that every field of every ``train.trees`` reply is in
``docs/privacy.md``'s table.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import make_customers
from test_federation_simulation import _documented_reply_fields

from fedcrm.coordinator.run_config import RunConfig
from fedcrm.coordinator.runs import load_summary
from fedcrm.data.contract import load_firm_config
from fedcrm.data.prepare import prepare
from fedcrm.learning.dp_trees import load_trees
from fedcrm.learning.settings import ChurnModelKind, TreeSplit
from fedcrm.simulations.baselines import churn_baselines
from fedcrm.simulations.run import (
    SimFirm,
    SimulationConfig,
    SimulationSection,
    run_flower_simulation,
    start_engine,
    stop_engine,
)
from fedcrm.tasks.churn import layout_from_config

pytestmark = [pytest.mark.slow, pytest.mark.extended]

ROUNDS, DEPTH = 2, 2


def _capture(dump: Path) -> list[Any]:
    from flwr.app import ArrayRecord

    def mod(msg: Any, context: Any, call_next: Any) -> Any:
        reply = call_next(msg, context)
        kind = msg.metadata.message_type
        record: dict[str, Any] = {"type": kind}
        for name, content in reply.content.items():
            record[name] = (["(arrays)"] if isinstance(content, ArrayRecord)
                            else {k: str(v) for k, v in content.items()})
        part = context.node_config["partition-id"]
        (dump / f"{kind}-{part}-{msg.metadata.message_id}.json").write_text(json.dumps(record))
        return reply

    return [mod]


def test_a_federated_tree_run_grows_saves_evaluates_and_verifies(
    write_firm: Callable[..., Path], tmp_path: Path,
) -> None:
    firms = []
    for i in (1, 2):
        config = write_firm(make_customers(700, seed=i), firm=f"firm{i}", extra={
            "budget": {"epsilon": 1.0, "delta": 1e-5},
            "federation": {"public_size": 700},
        })
        prepare(load_firm_config(config))
        firms.append(SimFirm(f"firm{i}", config, 700))
    schema = layout_from_config(load_firm_config(firms[0].config)).canonical_json()
    cfg = SimulationConfig(
        simulation=SimulationSection(name="trees", firms=2, workdir=tmp_path / "runs", actors=2),
        run=RunConfig(task="churn", model=ChurnModelKind.TREES, rounds=ROUNDS, min_firms=2,
                      target_epsilon=1.0, trees_per_round=2, tree_depth=DEPTH,
                      tree_split=TreeSplit.HISTOGRAM, tree_features=2, feature_schema=schema,
                      round_timeout=60),
    )
    run_dir = tmp_path / "runs" / "trees-run"
    dump = tmp_path / "replies"
    dump.mkdir()
    try:
        start_engine(cfg.simulation)
        run_flower_simulation(cfg, firms, run_id="trees-run", run_dir=run_dir,
                              client_mods=_capture(dump))
    finally:
        stop_engine()
    summary = load_summary(run_dir)

    assert summary["status"] == "completed", summary["stop_reason"]
    assert summary["rounds_completed"] == ROUNDS
    assert [r["accepted"] for r in summary["rounds_detail"]] == [["firm1", "firm2"]] * ROUNDS
    steps = ROUNDS * (DEPTH + 1)
    assert len(summary["updates"]) == 2 * steps
    for firm in summary["firms"]:
        assert 0.9 < firm["epsilon"] <= firm["epsilon_budget"] + 1e-9
        assert firm["rounds_trained"] == ROUNDS and firm["num_examples"] == 700
    pooled = summary["metrics"]["pooled"]
    assert pooled["firms_evaluated"] == 2 and 0.0 <= pooled["auc"] <= 1.0

    ensemble, provenance = load_trees(Path(summary["model"]))
    assert ensemble.n_trees == ROUNDS * 2 and provenance["kind"] == "trees"
    assert provenance["trees"]["split"] == "histogram"
    baseline = churn_baselines(firms, Path(summary["model"]))
    assert baseline["federated_auc_exact"] > 0.6  # the generated churn depends on the features

    import shutil

    from fedcrm.audit.verify import verify_run

    for firm in firms:  # the auditor's bundle: each firm's signed log and public key
        bundle = run_dir / "firms" / firm.name
        bundle.mkdir(parents=True)
        shutil.copy(load_firm_config(firm.config).audit_path, bundle / "audit.jsonl")
        shutil.copy(firm.config.parent / "keys" / "signing.pub", bundle / "signing.pub")
    verification = verify_run(run_dir)
    assert verification.ok, [str(f) for f in verification.failures]

    documented = _documented_reply_fields()
    seen = set()
    for path in dump.iterdir():
        reply = json.loads(path.read_text())
        message = {"query.describe": "describe", "train.trees": "train.trees",
                   "evaluate": "evaluate"}[reply["type"]]
        if reply.get("config", {}).get("state") == "error":
            message = "error"
        for record in ("config", "metrics"):
            seen.update((message, record, field) for field in reply.get(record, {}))
        assert "arrays" not in reply
    assert ("train.trees", "metrics", "tree-sums") in seen
    undocumented = sorted(seen - documented)
    assert not undocumented, f"reply fields missing from docs/privacy.md: {undocumented}"
