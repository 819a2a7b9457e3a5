"""A query through the real ServerApp flow and the real ClientApp, over an in-process Grid.

Flower's simulation engine (Ray) is exercised once, by tests/test_federation_simulation.py; here
the same coordinator code (:func:`fedcrm.server.analytics.run_query`) talks to the same ClientApp
(:func:`fedcrm.clients.client_app.make_client_app`) through Flower ``Message`` objects, minus the
transport (:class:`fedcrm.simulations.in_process.InProcessGrid`). The auditor then checks the
coordinator's and the firms' signed logs together.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from conftest import make_customers

from fedcrm.audit.log import AuditLog, EntryKind
from fedcrm.audit.verify import FailureKind, verify_run
from fedcrm.coordinator.query_run import QueryCoordination, QueryRunConfig
from fedcrm.data.contract import load_firm_config
from fedcrm.data.prepare import prepare
from fedcrm.privacy.keys import load_signing_key
from fedcrm.release import FirmPrivacy, gaussian_query_event, release
from fedcrm.simulations.in_process import InProcessGrid


def _firms(write_firm: Callable[..., Path], caps: list[float]) -> list[Path]:
    """Firms with prepared stores, each holding its peers' signing keys (as exchanged out of band
    for secure sums)."""
    configs = []
    peers = None
    for i, cap in enumerate(caps):
        frame = make_customers(500, seed=i)
        path = write_firm(frame, firm=f"firm{i + 1}", extra={
            "budget": {"epsilon": cap, "delta": 1e-5},
            "federation": {"public_size": 500, "peer_keys_dir": "../peer-keys"},
        })
        peers = path.parent.parent / "peer-keys"
        peers.mkdir(exist_ok=True)
        shutil.copy(path.parent / "keys" / "signing.pub", peers / f"firm{i + 1}.pub")
        prepare(load_firm_config(path))
        configs.append(path)
    return configs


QUERY = {
    "name": "churn_by_plan", "kind": "churn_rate", "epsilon": 1.0, "min_firms": 2,
    "group_by": {"column": "plan", "keys": ["basic", "plus", "premium"]},
}


def _run(grid: InProcessGrid, run_dir: Path, *, secure: bool = False,
         **query: Any) -> dict[str, Any]:
    from fedcrm.server.analytics import run_query

    cfg = QueryRunConfig.model_validate({
        "query": {**QUERY, **query},
        "coordinator": QueryCoordination(wait_for_firms=0, seed=0, secure_sum=secure,
                                         timeout=600).model_dump(),
    })
    return run_query(grid, cfg, run_id=run_dir.name, run_dir=run_dir)  # type: ignore[arg-type]


def _bundle(run_dir: Path, configs: list[Path]) -> None:
    """Put each firm's signed log and public key where the auditor looks (as a simulation does)."""
    for path in configs:
        cfg = load_firm_config(path)
        target = run_dir / "firms" / cfg.firm.name
        target.mkdir(parents=True, exist_ok=True)
        shutil.copy(cfg.audit_path, target / "audit.jsonl")
        shutil.copy(cfg.firm.keys_dir / "signing.pub", target / "signing.pub")


def _spent(path: Path) -> float:
    from fedcrm.privacy.keys import load_keys

    cfg = load_firm_config(path)
    return FirmPrivacy(cfg, load_keys(cfg.firm.keys_dir)).spent()


def test_a_query_is_answered_by_every_firm_verified_by_the_auditor_and_close_to_the_truth(
    write_firm: Callable[..., Path], tmp_path: Path, coordinator_key: Path,
) -> None:
    configs = _firms(write_firm, [3.0, 3.0, 3.0])
    grid = InProcessGrid(configs)
    run_dir = tmp_path / "runs" / "q-telco"
    result = _run(grid, run_dir)
    assert result["status"] == "completed", result["stop_reason"]
    assert result["answered_by"] == ["firm1", "firm2", "firm3"]
    pooled = pd.concat([make_customers(500, seed=i) for i in range(3)])
    for e in result["estimates"]:
        if e["statistic"] != "churn_rate":
            continue
        truth = (pooled[pooled.plan == e["group"]].churned == "Yes").mean()
        assert abs(e["estimate"] - truth) < 5 * e["noise_std"] + 1e-3
        assert e["ci_low"] < e["estimate"] < e["ci_high"]
    for name in ("result.json", "result.md", "churn_rate.png", "events.jsonl"):
        assert (run_dir / name).exists(), name
    assert "churn_rate" in (run_dir / "result.md").read_text()
    # each firm spent exactly what it reported, from its own ledger
    for path in configs:
        firm = load_firm_config(path).firm.name
        assert _spent(path) == pytest.approx(result["epsilon_total"][firm])
    _bundle(run_dir, configs)
    report = verify_run(run_dir)
    assert report.ok, [str(f) for f in report.failures]
    assert report.queries[0]["answered_by"] == ["firm1", "firm2", "firm3"]
    assert all(s.queries_answered == 1 for s in report.firms.values())

    # The coordinator claims an answer from a firm that never gave one: the auditor objects.
    fed = AuditLog(run_dir / "federation" / "audit.jsonl",
                   signing_key=load_signing_key(coordinator_key))
    fed.append(EntryKind.QUERY_RESULT, {
        "query_id": "q-telco", "status": "completed", "answers": {"firm1": "0" * 64},
        "sum_hash": "", "result_hash": "",
    })
    kinds = {f.kind for f in verify_run(run_dir).failures}
    assert FailureKind.UNMATCHED_ANSWER in kinds


def test_a_firm_short_of_budget_declines_and_the_query_goes_on_with_the_rest(
    write_firm: Callable[..., Path], tmp_path: Path, coordinator_key: Path,
) -> None:
    configs = _firms(write_firm, [3.0, 3.0, 0.5])
    result = _run(InProcessGrid(configs), tmp_path / "runs" / "q-1")
    assert result["status"] == "completed"
    assert result["answered_by"] == ["firm1", "firm2"]
    assert "cap" in result["declined"]["firm3"]
    assert _spent(configs[2]) == 0.0


def test_too_few_willing_firms_means_no_firm_is_asked_to_answer_and_nothing_is_spent(
    write_firm: Callable[..., Path], tmp_path: Path, coordinator_key: Path,
) -> None:
    configs = _firms(write_firm, [3.0, 0.5, 0.5])
    result = _run(InProcessGrid(configs), tmp_path / "runs" / "q-1")
    assert result["status"] == "not_enough_firms" and result["estimates"] == []
    assert [_spent(p) for p in configs] == [0.0, 0.0, 0.0]
    assert not (tmp_path / "runs" / "q-1" / "churn_rate.png").exists()


def test_answers_lost_below_min_firms_publish_no_result(
    write_firm: Callable[..., Path], tmp_path: Path, coordinator_key: Path,
) -> None:
    configs = _firms(write_firm, [3.0, 3.0])
    grid = InProcessGrid(configs, drop=lambda node, kind: node == 101 and kind == "query.answer")
    result = _run(grid, tmp_path / "runs" / "q-1")
    assert result["status"] == "not_enough_answers" and result["estimates"] == []
    events = [json.loads(x) for x in (tmp_path / "runs" / "q-1" / "events.jsonl")
              .read_text().splitlines()]
    assert any(e["kind"] == "firm_dropped" and "no reply" in e["reason"] for e in events)


def test_every_query_reply_field_is_documented_as_dp_or_public(
    write_firm: Callable[..., Path], tmp_path: Path, coordinator_key: Path,
) -> None:
    from test_federation_simulation import _documented_reply_fields

    from fedcrm.flower.records import wire_of

    configs = _firms(write_firm, [3.0, 3.0, 0.5])
    grid = InProcessGrid(configs)
    _run(grid, tmp_path / "runs" / "q-1")
    documented = _documented_reply_fields()
    seen: set[tuple[str, str, str]] = set()
    for reply in grid.received:
        wire = wire_of(reply)
        message = ("error" if wire.config.get("state") == "error"
                   else reply.metadata.message_type)
        seen.update((message, "config", k) for k in wire.config)
        seen.update((message, "metrics", k) for k in wire.metrics)
        if wire.arrays is not None:
            seen.add((message, "arrays", "(answer)"))
            assert all(np.asarray(a).dtype == np.int64 for a in wire.arrays)
    assert ("query.answer", "arrays", "(answer)") in seen
    undocumented = sorted(seen - documented)
    assert not undocumented, f"reply fields missing from docs/privacy.md: {undocumented}"


def test_an_earlier_release_counts_against_the_query_so_a_full_budget_declines(
    write_firm: Callable[..., Path], tmp_path: Path, coordinator_key: Path,
) -> None:
    from fedcrm.privacy.keys import load_keys

    configs = _firms(write_firm, [1.0, 1.0])
    cfg = load_firm_config(configs[0])
    privacy = FirmPrivacy(cfg, load_keys(cfg.firm.keys_dir))
    release(privacy, gaussian_query_event(6.0, delta=1e-5, purpose="analytics:earlier"),
            lambda: None)
    result = _run(InProcessGrid(configs), tmp_path / "runs" / "q-1", min_firms=1)
    assert result["answered_by"] == ["firm2"] and "firm1" in result["declined"]


# ------------------------------------------------------------------------------ secure sum


def _exact_total(configs: list[Path], spec_json: str) -> np.ndarray:
    from fedcrm.analytics.spec import QuerySpec
    from fedcrm.analytics.statistics import firm_statistics
    from fedcrm.data.store import load_store
    from fedcrm.privacy.keys import load_keys

    spec = QuerySpec.from_json(spec_json)
    total = 0
    for path in configs:
        cfg = load_firm_config(path)
        store = load_store(cfg.prepared_dir, keys=load_keys(cfg.firm.keys_dir))
        total = total + firm_statistics(spec, store, secure=True).vector()
    return np.asarray(total)


def test_a_secure_query_shows_the_coordinator_only_masked_answers_and_their_noisy_total(
    write_firm: Callable[..., Path], tmp_path: Path, coordinator_key: Path,
) -> None:
    from fedcrm.answering import noise_multiplier
    from fedcrm.flower.records import wire_of

    configs = _firms(write_firm, [3.0, 3.0, 3.0])
    grid = InProcessGrid(configs)
    run_dir = tmp_path / "runs" / "q-secure"
    result = _run(grid, run_dir, secure=True, min_firms=3)
    assert result["status"] == "completed", result["stop_reason"]
    assert result["answered_by"] == ["firm1", "firm2", "firm3"] and result["mode"] == "secure_sum"
    # each firm added a third of the noise variance: the total carries one full share
    sigma = noise_multiplier(1.0, 1e-6) * 65536
    assert all(v == pytest.approx(sigma / np.sqrt(3)) for v in
               result["noise_std_grid_units"].values())
    # no reply to the coordinator carries a query answer: only masked vectors and shares
    kinds = {r.metadata.message_type for r in grid.received}
    assert "query.answer" not in kinds and "query.secure_sum_mask" in kinds
    from test_federation_simulation import _documented_reply_fields

    documented = _documented_reply_fields()
    seen: set[tuple[str, str, str]] = set()
    for reply in grid.received:
        wire = wire_of(reply)
        kind = reply.metadata.message_type
        message = kind.removeprefix("query.") if "secure_sum" in kind else kind
        seen.update((message, "config", k) for k in wire.config)
        seen.update((message, "metrics", k) for k in wire.metrics)
        if wire.arrays is not None and message.startswith("secure_sum"):
            seen.add((message, "arrays", "(arrays)"))
    assert not sorted(seen - documented), sorted(seen - documented)
    # each firm charged the worst case it accepted (the query's ε at its δ), once
    for path in configs:
        assert 0 < _spent(path) <= 1.0
    # estimates: the churn rates are within the stated noise of the exact pooled values
    pooled = pd.concat([make_customers(500, seed=i) for i in range(3)])
    for e in result["estimates"]:
        if e["statistic"] == "churn_rate":
            truth = (pooled[pooled.plan == e["group"]].churned == "Yes").mean()
            assert abs(e["estimate"] - truth) < 6 * e["noise_std"] + 1e-3
    _bundle(run_dir, configs)
    report = verify_run(run_dir)
    assert report.ok, [str(f) for f in report.failures]


def test_a_secure_query_is_not_opened_when_fewer_than_min_firms_remain(
    write_firm: Callable[..., Path], tmp_path: Path, coordinator_key: Path,
) -> None:
    """One firm drops after masking: the others refuse to open a sum that would carry less
    than the full noise, so the coordinator learns nothing."""
    configs = _firms(write_firm, [3.0, 3.0, 3.0, 3.0])
    grid = InProcessGrid(
        configs, drop=lambda node, kind: node == 103 and kind == "query.secure_sum_mask")
    result = _run(grid, tmp_path / "runs" / "q-1", secure=True, min_firms=4)
    assert result["status"] == "not_enough_answers" and result["estimates"] == []
    events = [json.loads(x) for x in (tmp_path / "runs" / "q-1" / "events.jsonl")
              .read_text().splitlines()]
    refusals = [e for e in events if e["kind"] in ("firm_dropped", "firm_stopped")
                and "min_firms" in json.dumps(e)]
    assert refusals, events


def test_a_firm_refuses_a_secure_sum_whose_range_cannot_hold_its_answer(
    write_firm: Callable[..., Path], tmp_path: Path,
) -> None:
    """A coordinator shrinks the sum's range to learn from a firm's failure: refused at the
    share step, before anything is released."""
    from fedcrm.analytics.spec import QuerySpec
    from fedcrm.answering import QUERY_SUM
    from fedcrm.node import FirmNode
    from fedcrm.privacy.errors import SecureSumError
    from fedcrm.privacy.keys import load_keys
    from fedcrm.privacy.secure_sum import FixedPoint, SumId, SumSpec
    from fedcrm.protocol import SecureSumQuery, SumInput

    configs = _firms(write_firm, [3.0, 3.0])
    cfg = load_firm_config(configs[0])
    node = FirmNode(cfg, load_keys(cfg.firm.keys_dir))
    spec = QuerySpec.model_validate({**QUERY, "min_firms": 2})
    sum_spec = SumSpec(SumId("q-1", 0, QUERY_SUM), ("firm1", "firm2"), 6,
                       FixedPoint(-100.0, 100.0, 1))
    query = SecureSumQuery(sum_spec, SumInput.QUERY_ANSWER, query_spec=spec.canonical_json())
    with pytest.raises(SecureSumError, match="do not fit"):
        node._sum_input(query, release_now=False)
    assert _spent(configs[0]) == 0.0
