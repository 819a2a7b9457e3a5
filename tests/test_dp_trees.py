"""DP gradient-boosted trees: the maths against brute force, learning without noise, contribution
bounds, the budget (planned up front, charged per release, refused before noise), the model file.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from conftest import make_customers
from sklearn.linear_model import LogisticRegression

from fedcrm.data.contract import load_firm_config
from fedcrm.data.encoding import layout_from_declared
from fedcrm.data.prepare import prepare
from fedcrm.learning import dp_trees
from fedcrm.learning.dp_trees import (
    CELL_SENSITIVITY,
    MAX_LEAF,
    TreeEnsemble,
    TreeGrower,
    TreeSchedule,
    TreeStep,
    best_split,
    digitize,
    load_trees,
    save_trees,
    split_budget,
    step_statistics,
)
from fedcrm.learning.metrics import auc
from fedcrm.learning.settings import (
    TREE_TRAINING,
    ChurnModelKind,
    DpOptimizer,
    TreeSettings,
    TreeSplit,
)
from fedcrm.node import TREES_PURPOSE, FirmNode
from fedcrm.privacy.accounting import calibrate_noise, compose_epsilon
from fedcrm.privacy.errors import ConfigError
from fedcrm.privacy.keys import load_keys
from fedcrm.protocol import ReplyState, RunSpec, TaskKind, TreesReply, TreesRequest
from fedcrm.release import gaussian_query_event, release
from fedcrm.tasks.churn import tree_grid


def _settings(**changes: object) -> TreeSettings:
    base = TreeSettings(rounds=2, trees_per_round=2, depth=2, split=TreeSplit.HISTOGRAM,
                        bins=4, features_per_tree=2, learning_rate=0.5, leaf_share=0.5)
    return base.model_copy(update=changes)


def _tiny(seed: int = 0, n: int = 40) -> tuple[TreeSchedule, np.ndarray, np.ndarray]:
    """5 columns in 3 features (numeric 4 bins, boolean, a categorical with 3 one-hot columns)."""
    rng = np.random.default_rng(seed)
    schedule = TreeSchedule(_settings(), (4, 2, 2, 2, 2), (0, 1, 2, 2, 2), seed)
    category = rng.integers(0, 3, n)
    x = np.column_stack([rng.random(n), rng.integers(0, 2, n), np.eye(3)[category]])
    y = (rng.random(n) < 0.4).astype(np.float64)
    return schedule, digitize(x, np.asarray(schedule.bins)), y


def _grown(schedule: TreeSchedule, xb: np.ndarray, y: np.ndarray, until: int) -> TreeGrower:
    """A grower after the first ``until`` steps (noise-free), for the next step's request."""
    grower = TreeGrower(schedule)
    for _ in range(until):
        grower.request()
        grower.apply(step_statistics(schedule, grower.ensemble, xb, y, grower.step), 0.0)
    if not grower.done:
        grower.request()
    return grower


def _route(ensemble: TreeEnsemble, row: np.ndarray, tree: int, level: int) -> int:
    heap = 0
    for _ in range(level):
        go_right = row[ensemble.features[tree, heap]] >= ensemble.thresholds[tree, heap]
        heap = 2 * heap + (2 if go_right else 1)
    return heap - (2**level - 1)


# ------------------------------------------------------------------------------ the maths


@pytest.mark.parametrize("until", range(6))  # every step of 2 rounds of depth 2 (3 steps each)
def test_released_sums_equal_a_brute_force_loop_over_customers(until: int) -> None:
    schedule, xb, y = _tiny()
    grower = _grown(schedule, xb, y, until)
    step, ensemble = grower.step, grower.ensemble
    batch = schedule.batch(step.round)
    # gradients of the finished trees, one customer at a time
    logit = [ensemble.base + sum(ensemble.leaves[t, _route(ensemble, row, t, 2)]
                                 for t in range(batch.start)) for row in xb]
    p = 1 / (1 + np.exp(-np.asarray(logit)))
    g, h = p - y, p * (1 - p)
    expected = np.zeros((schedule.cells(step), 2))
    offset = 0
    for tree in batch:
        columns = list(schedule.columns(tree))
        width = sum(schedule.bins[c] for c in columns)
        for i, row in enumerate(xb):
            node = _route(ensemble, row, tree, step.level)
            if step.level == schedule.depth:  # leaves: one cell per leaf
                expected[offset + node] += (g[i], h[i])
                continue
            for j, column in enumerate(columns):  # one bin per column of the tree
                start = sum(schedule.bins[c] for c in columns[:j])
                expected[offset + node * width + start + row[column]] += (g[i], h[i])
        offset += 2**schedule.depth if step.level == schedule.depth else 2**step.level * width
    np.testing.assert_allclose(step_statistics(schedule, ensemble, xb, y, step), expected,
                               atol=1e-12)


def test_predictions_follow_the_split_rule_of_each_node() -> None:
    schedule, xb, y = _tiny(1)
    ensemble = _grown(schedule, xb, y, len(schedule.steps)).ensemble
    brute = [ensemble.base + sum(ensemble.leaves[t, _route(ensemble, row, t, 2)]
                                 for t in range(ensemble.n_trees)) for row in xb]
    np.testing.assert_allclose(ensemble.logits(xb), brute)


def test_the_chosen_split_has_the_largest_gain_of_every_candidate() -> None:
    rng = np.random.default_rng(3)
    bins = np.array([4, 2, 3])
    cells = np.column_stack([rng.normal(0, 5, bins.sum()), rng.uniform(0, 10, bins.sum())])
    lam = 1.0

    def score(g: float, h: float) -> float:
        return g * g / (max(h, 0.0) + lam)

    gains = {}
    start = 0
    for j, width in enumerate(bins):
        block = cells[start:start + width]
        start += width
        for k in range(1, width):
            left, right = block[:k].sum(axis=0), block[k:].sum(axis=0)
            gains[(j, k)] = score(*left) + score(*right) - score(*block.sum(axis=0))
    assert best_split(cells, bins, lam) == max(gains, key=lambda c: gains[c])


def test_leaves_are_clipped_newton_steps_averaged_over_the_round() -> None:
    settings = _settings(split=TreeSplit.RANDOM, depth=1, trees_per_round=2, rounds=1)
    schedule = TreeSchedule(settings, (2,), (0,), 0)
    grower = TreeGrower(schedule)
    grower.request()
    sums = np.array([[-6.0, 2.0], [3.0, -1.0], [40.0, 1.0], [0.0, 0.0]])
    grower.apply(sums, noise_std=2.0)  # λ = max(1, 2.0 · 2)
    lam = max(dp_trees.MIN_REGULARISER, dp_trees.NOISE_REGULARISER * 2.0)
    raw = [6.0 / (2.0 + lam), -3.0 / (0.0 + lam), -40.0 / (1.0 + lam), 0.0]
    expected = np.clip(raw, -MAX_LEAF, MAX_LEAF) * 0.5 / 2
    np.testing.assert_allclose(grower.ensemble.leaves.ravel(), expected)
    assert grower.done


def test_without_noise_the_trees_learn_xor_where_logistic_regression_cannot() -> None:
    """Test-only: noise-free sums (no production path releases without noise)."""
    rng = np.random.default_rng(0)
    x = rng.random((3000, 2))
    y = ((x[:, 0] > 0.5) ^ (x[:, 1] > 0.5)).astype(np.float64)
    flip = rng.random(len(y)) < 0.1
    y[flip] = 1 - y[flip]
    train, test = slice(0, 2000), slice(2000, None)
    linear = LogisticRegression().fit(x[train], y[train]).predict_proba(x[test])[:, 1]
    assert auc(linear, y[test]) < 0.6
    for split in TreeSplit:
        settings = _settings(split=split, rounds=10, trees_per_round=3, features_per_tree=0,
                             bins=8)
        schedule = TreeSchedule(settings, (8, 8), (0, 1), 0)
        xb = digitize(x[train], np.asarray(schedule.bins))
        grower = TreeGrower(schedule)
        while not grower.done:
            grower.request()
            grower.apply(step_statistics(schedule, grower.ensemble, xb, y[train], grower.step),
                         0.0)
        assert auc(grower.ensemble.predict_proba(x[test]), y[test]) > 0.85, split


# ------------------------------------------------------------------------------ bounds


@pytest.mark.parametrize("split", list(TreeSplit))
def test_one_customer_changes_each_release_by_at_most_its_sensitivity(split: TreeSplit) -> None:
    schedule, xb, _ = _tiny(2, n=30)
    schedule = replace(schedule, settings=schedule.settings.model_copy(update={"split": split}))
    y = np.ones(len(xb))  # with a strongly negative base every customer's |g| is near 1
    for until in range(len(schedule.steps)):
        grower = _grown(schedule, xb, y, until)
        grower.ensemble.base = -30.0
        step = grower.step
        full = step_statistics(schedule, grower.ensemble, xb, y, step)
        worst = 0.0
        for i in range(len(xb)):
            keep = np.arange(len(xb)) != i
            without = step_statistics(schedule, grower.ensemble, xb[keep], y[keep], step)
            worst = max(worst, float(np.linalg.norm(full - without)))
        assert worst <= schedule.sensitivity(step) + 1e-9
        touched = (schedule.per_round if step.level == schedule.depth
                   else sum(len(schedule.columns(t)) for t in schedule.batch(step.round)))
        assert worst > 0.9 * math.sqrt(touched)  # the bound is the real worst case, not slack
    assert schedule.sensitivity(schedule.steps[-1]) == pytest.approx(
        CELL_SENSITIVITY * math.sqrt(schedule.per_round))


def test_split_candidates_come_from_the_declared_layout_only() -> None:
    layout = layout_from_declared({"plan": ("a", "b")}, ["vip"], {"tenure": (0.0, 72.0)})
    assert tree_grid(layout, 16) == ((16, 2, 2, 2, 2), (0, 1, 2, 2, 2))


def test_the_budget_split_composes_to_exactly_the_uniform_plan() -> None:
    schedule = TreeSchedule(_settings(rounds=3, leaf_share=0.3), (4, 2, 2, 2, 2),
                            (0, 1, 2, 2, 2), 0)
    uniform = calibrate_noise(target_epsilon=1.0, delta=1e-5, sample_rate=1.0,
                              steps=len(schedule.steps))
    noise = split_budget(schedule, uniform)
    assert noise.leaf != noise.level
    events = [gaussian_query_event(noise.multiplier(schedule, s), delta=1e-5, purpose="t")
              for s in schedule.steps]
    uniform_events = [gaussian_query_event(uniform, delta=1e-5, purpose="t")] * len(events)
    assert compose_epsilon(events, delta=1e-5) == pytest.approx(
        compose_epsilon(uniform_events, delta=1e-5), rel=1e-9)
    assert compose_epsilon(events, delta=1e-5) <= 1.0 + 1e-9


# ------------------------------------------------------------------------------ the model file


def test_a_tree_model_file_round_trips_and_refuses_tampering(tmp_path: Path) -> None:
    schedule, xb, y = _tiny(4)
    ensemble = _grown(schedule, xb, y, len(schedule.steps)).ensemble
    path = save_trees(tmp_path / "m.json", ensemble, {"kind": "trees", "epsilon": 1.0})
    loaded, provenance = load_trees(path)
    assert provenance == {"kind": "trees", "epsilon": 1.0}
    x = np.random.default_rng(0).random((50, 5))
    np.testing.assert_array_equal(loaded.predict_proba(x), ensemble.predict_proba(x))
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    text = path.read_text().replace('"thresholds": [[', '"thresholds": [[9, ', 1)
    path.write_text(text)
    with pytest.raises(ConfigError):
        load_trees(path)
    path.write_bytes(b"\x80 not json")
    with pytest.raises(ConfigError, match="not a readable"):
        load_trees(path)


# ------------------------------------------------------------------------------ the budget


SCHEMA = layout_from_declared(
    {"plan": ("basic", "plus", "premium")}, [],
    {"tenure_months": (0.0, 72.0), "monthly_charges": (0.0, 150.0)},
).canonical_json()


def _node(write_firm: Callable[..., Path], *, cap: float = 2.0) -> FirmNode:
    cfg_path = write_firm(make_customers(800), extra={
        "budget": {"epsilon": cap, "delta": 1e-5},
        "federation": {"public_size": 800, "evaluate": False},
    })
    prepare(load_firm_config(cfg_path))
    cfg = load_firm_config(cfg_path)
    return FirmNode(cfg, load_keys(cfg.firm.keys_dir))


def _run(run_id: str = "trees-1", *, rounds: int = 2, target: float = 1.0) -> RunSpec:
    return RunSpec(
        run_id=run_id, task=TaskKind.CHURN, rounds=rounds, model=ChurnModelKind.TREES,
        target_epsilon=target, local_epochs=1.0, batch_size=128, learning_rate=0.5,
        max_grad_norm=1.0, optimizer=DpOptimizer.SGD, proximal_mu=0.0, seed=0,
        evaluations=0, schema=SCHEMA,
    )


def _coordinate(node: FirmNode, spec: RunSpec, settings: TreeSettings,
                steps: int | None = None) -> tuple[TreeGrower, list[TreesReply]]:
    """Play the coordinator for one firm: request each step, apply its noisy sums."""
    data = node.task_data(TaskKind.CHURN, SCHEMA)
    grower = TreeGrower(data.tree_schedule(settings, seed=spec.seed))  # type: ignore[attr-defined]
    replies = []
    for _ in range(steps if steps is not None else len(grower.schedule.steps)):
        step, arrays = grower.step, grower.request()
        reply = node.grow_trees(TreesRequest(spec=spec, settings=settings,
                                             server_round=step.round, level=step.level,
                                             arrays=arrays))
        replies.append(reply)
        assert reply.state is ReplyState.OK, reply.detail
        grower.apply(reply.sums, reply.noise_std)
    return grower, replies


def test_a_firm_plans_the_whole_tree_run_and_charges_each_release(
    write_firm: Callable[..., Path],
) -> None:
    node = _node(write_firm, cap=5.0)
    spec = _run(rounds=2, target=1.0)
    settings = _settings(rounds=2, features_per_tree=1)
    grower, replies = _coordinate(node, spec, settings)
    events = node.privacy.ledger.events
    assert [e.purpose for e in events] == [TREES_PURPOSE] * len(grower.schedule.steps) == (
        [TREES_PURPOSE] * 6)
    assert node.privacy.spent() <= 1.0 + 1e-9
    assert node.privacy.spent() > 0.97  # the plan uses its budget, it is not just capped
    levels = {e.context["release"]: e.noise_multiplier for e in events}
    assert set(levels) == {"histograms", "leaves"} and levels["histograms"] != levels["leaves"]
    assert all(e.context["releases_planned"] == 6 for e in events)
    for reply, step in zip(replies, grower.schedule.steps, strict=True):
        plan_std = next(e for e in events if (e.context["round"], e.context["level"]) == (
            step.round, step.level))
        assert reply.noise_std == pytest.approx(
            plan_std.noise_multiplier * grower.schedule.sensitivity(step))
    # the coordinator keeps asking: every step again or beyond the plan is refused, for free
    spent = node.privacy.spent()
    for step in (TreeStep(1, 0), TreeStep(2, 2), TreeStep(3, 0), TreeStep(1, 5)):
        again = node.grow_trees(TreesRequest(spec=spec, settings=settings,
                                             server_round=step.round, level=step.level,
                                             arrays=grower.ensemble.to_arrays()))
        assert again.state is ReplyState.DECLINED and again.sums.size == 0
        assert "already released" in again.detail or "outside" in again.detail
    changed = node.grow_trees(TreesRequest(spec=spec, settings=settings.model_copy(
        update={"depth": 3}), server_round=1, level=0, arrays=grower.ensemble.to_arrays()))
    assert changed.state is ReplyState.DECLINED and "changed" in changed.detail
    assert node.privacy.spent() == spent and len(node.privacy.ledger.events) == 6


def test_a_tree_step_is_refused_before_any_noise_when_the_budget_is_spent(
    write_firm: Callable[..., Path], monkeypatch: pytest.MonkeyPatch,
) -> None:
    node = _node(write_firm, cap=1.0)
    spec = _run(rounds=2, target=0.6)
    settings = _settings(rounds=2, split=TreeSplit.RANDOM)
    grower, _ = _coordinate(node, spec, settings, steps=1)
    # another analysis spends almost all of the rest between two steps
    ledger = node.privacy.ledger
    sigma = calibrate_noise(target_epsilon=0.99, delta=1e-5, sample_rate=1.0, steps=1,
                            prior_events=ledger.events)
    release(node.privacy, gaussian_query_event(sigma, delta=1e-5, purpose="analytics"),
            lambda: None)
    before = len(ledger.events)

    def no_noise(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("noise was drawn for a refused release")

    monkeypatch.setattr("fedcrm.node.privatise", no_noise)
    step = grower.step
    reply = node.grow_trees(TreesRequest(spec=spec, settings=settings, server_round=step.round,
                                         level=step.level, arrays=grower.request()))
    assert reply.state is ReplyState.BUDGET_EXHAUSTED and "budget exhausted" in reply.detail
    assert len(ledger.events) == before and ledger.spent() <= 1.0


def test_a_firm_refuses_trees_that_do_not_fit_the_runs_schedule(
    write_firm: Callable[..., Path],
) -> None:
    node = _node(write_firm)
    spec, settings = _run(), _settings(rounds=2, split=TreeSplit.RANDOM)
    data = node.task_data(TaskKind.CHURN, SCHEMA)
    grower = TreeGrower(data.tree_schedule(settings, seed=0))  # type: ignore[attr-defined]
    arrays = grower.request()
    wrong_bins = [np.full_like(arrays[0], 3), *arrays[1:]]
    unfinished = [a.copy() for a in arrays]
    unfinished[2][:, 0] = -1
    for bad in (wrong_bins, unfinished, [a[:1] if a.ndim == 2 else a for a in arrays]):
        reply = node.grow_trees(TreesRequest(spec=spec, settings=settings, server_round=1,
                                             level=settings.depth, arrays=bad))
        assert reply.state is ReplyState.DECLINED and "refused the trees" in reply.detail
    assert not node.privacy.ledger.events


def test_the_trees_messages_survive_their_wire_form() -> None:
    spec, settings = _run(), TREE_TRAINING.model_copy(update={"rounds": 2})
    request = TreesRequest(spec=spec, settings=settings, server_round=2, level=3,
                           arrays=TreeEnsemble.empty((16, 2), 3).to_arrays())
    decoded = TreesRequest.decode(request.encode())
    assert decoded.settings == settings and decoded.spec == spec
    assert (decoded.server_round, decoded.level) == (2, 3)
    reply = TreesReply(firm="a", state=ReplyState.OK, detail="", sums=np.arange(6.0).reshape(3, 2),
                       num_examples=10, noise_std=1.5, epsilon=0.1, epsilon_total=0.2,
                       epsilon_cap=1.0, delta=1e-5, audit_head_hash="h", audit_head_length=3)
    back = TreesReply.decode(reply.encode())
    np.testing.assert_array_equal(back.sums, reply.sums)
    assert back.noise_std == 1.5 and back.num_examples == 10
