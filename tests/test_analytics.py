"""Federated DP analytics: the query spec, each firm's bounded statistics, the estimates, and a
firm's answers through its ledger - attacked the way a coordinator or one customer could."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import make_customers

from fedcrm.analytics.estimates import Totals, estimate, kaplan_meier, quantiles_from_histogram
from fedcrm.analytics.spec import QueryKind, QuerySpec
from fedcrm.analytics.statistics import RESOLUTION, firm_statistics, layout
from fedcrm.answering import noise_multiplier
from fedcrm.audit.log import EntryKind
from fedcrm.audit.verify import verify_log
from fedcrm.data.contract import load_firm_config
from fedcrm.data.prepare import prepare
from fedcrm.data.store import PreparedStore
from fedcrm.node import FirmNode
from fedcrm.privacy.errors import ConfigError
from fedcrm.privacy.keys import load_keys, public_key_id
from fedcrm.protocol import QueryAnswer, QueryAnswerRequest, QueryOffer, ReplyState

# ------------------------------------------------------------------------------ specs

CHURN_BY_PLAN = {
    "name": "churn_by_plan", "kind": "churn_rate", "epsilon": 1.0, "min_firms": 1,
    "group_by": {"column": "plan", "keys": ["basic", "plus", "premium"]},
}


def _spec(**kw: object) -> QuerySpec:
    return QuerySpec.model_validate({**CHURN_BY_PLAN, **kw})


@pytest.mark.parametrize("bad, why", [
    ({"kind": "sum"}, r"needs \[query\.value\]"),
    ({"kind": "histogram", "value": {"column": "tenure_months", "lower": 0, "upper": 72}},
     "public bin edges"),
    ({"kind": "histogram", "value": {"column": "x", "lower": 0, "upper": 1},
      "bins": [0, 0.5, 0.4]}, "strictly increasing"),
    ({"kind": "retention", "table": "transactions", "group_by": None}, "as_of"),
    ({"kind": "weekly_trend", "table": "transactions", "as_of": "2020-01-01",
      "group_by": None}, "start"),
    ({"epsilon": 0}, "greater than 0"),
    ({"group_by": {"column": "plan", "keys": ["a", "a"]}}, "distinct"),
    ({"surprise": 1}, "Extra inputs"),
])
def test_query_spec_refuses_incomplete_or_unknown_fields(bad: dict[str, object],
                                                         why: str) -> None:
    with pytest.raises(ValueError, match=why):
        _spec(**bad)


def test_query_spec_from_the_coordinator_is_validated_again() -> None:
    with pytest.raises(ConfigError, match="malformed query"):
        QuerySpec.from_json('{"name": "x", "kind": "sum", "epsilon": 1}')
    spec = _spec()
    assert QuerySpec.from_json(spec.canonical_json()).fingerprint() == spec.fingerprint()


# ------------------------------------------------------------------------------ statistics

def _customers(n: int, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame({
        "customer_id": [f"c{i}" for i in range(n)],
        "plan": rng.choice(["basic", "plus", "premium", "legacy"], n),
        "tenure_months": rng.uniform(-10, 90, n).round(1),
        "churn": (rng.random(n) < 0.3).astype(float),
    })


def _transactions(n_customers: int, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for c in range(n_customers):
        first = pd.Timestamp("2020-01-01") + pd.Timedelta(days=int(rng.integers(0, 120)))
        for _ in range(int(rng.integers(1, 12))):
            day = first + pd.Timedelta(days=int(rng.integers(0, 200)))
            rows.append((f"c{c}", day, float(rng.uniform(-5, 80)),
                         str(rng.choice(["books", "music", "film"]))))
    return pd.DataFrame(rows, columns=["customer_id", "timestamp", "amount", "category"])


def _store(customers: pd.DataFrame | None = None,
           transactions: pd.DataFrame | None = None) -> PreparedStore:
    return PreparedStore(firm="f", store_hash="h", manifest={}, customers=customers,
                         transactions=transactions, features=pd.DataFrame())


CUSTOMER_QUERIES = [
    {"kind": "count"},
    {"kind": "churn_rate"},
    {"kind": "sum", "value": {"column": "tenure_months", "lower": 0, "upper": 72}},
    {"kind": "mean", "value": {"column": "tenure_months", "lower": 0, "upper": 72}},
    {"kind": "histogram", "value": {"column": "tenure_months", "lower": 0, "upper": 72},
     "bins": [0, 12, 24, 48, 72]},
]
TX = {"table": "transactions", "group_by": None, "as_of": "2020-09-01"}
TRANSACTION_QUERIES = [
    {**TX, "kind": "segment_sizes"},
    {**TX, "kind": "retention", "weeks": 20, "inactive_days": 60},
    {**TX, "kind": "retention", "weeks": 10, "cohorts": ["2020-01-01", "2020-02-15"]},
    {**TX, "kind": "weekly_trend", "start": "2020-01-01", "weeks": 30, "max_purchase_days": 2},
    {**TX, "kind": "sum", "value": {"column": "amount", "lower": 0, "upper": 500},
     "group_by": {"column": "category", "keys": ["books", "music", "film"], "max_groups": 2}},
    {**TX, "kind": "count",
     "group_by": {"column": "category", "keys": ["books", "music", "film"], "max_groups": 1}},
]


@pytest.mark.parametrize("secure", [False, True], ids=["plain", "secure"])
@pytest.mark.parametrize("query", CUSTOMER_QUERIES + TRANSACTION_QUERIES,
                         ids=lambda q: f"{q.get('table', 'customers')}-{q['kind']}")
def test_removing_any_one_customer_moves_the_answer_by_at_most_its_declared_sensitivity(
    query: dict[str, object], secure: bool,
) -> None:
    """The attack a DP bound must survive: one customer, added or removed, with extreme values
    (negative, above the clip, many transactions in many groups)."""
    spec = _spec(**{k: v for k, v in query.items()})
    shape = layout(spec, secure=secure)
    customers, tx = _customers(60), _transactions(40)
    full = firm_statistics(spec, _store(customers, tx), secure=secure).vector()
    assert len(full) == shape.length and full.dtype == np.int64
    ids = [f"c{i}" for i in range(40)]
    worst = 0.0
    for cid in ids:
        without = firm_statistics(spec, _store(
            customers[customers.customer_id != cid], tx[tx.customer_id != cid]
        ), secure=secure).vector()
        worst = max(worst, float(np.linalg.norm((full - without).astype(np.float64))))
    assert 0 < worst <= shape.l2_sensitivity + 1e-9


def test_a_customer_listed_twice_in_the_customers_table_counts_once() -> None:
    spec = _spec(kind="count")
    once = _customers(10)
    twice = pd.concat([once, once.iloc[[3, 3, 3]]])
    assert np.array_equal(firm_statistics(spec, _store(once)).vector(),
                          firm_statistics(spec, _store(twice)).vector())


def test_values_outside_the_public_keys_are_not_counted_and_groups_come_from_the_query() -> None:
    customers = _customers(200)
    stats = firm_statistics(_spec(kind="count"), _store(customers))
    expected = [int((customers.plan == k).sum()) for k in ("basic", "plus", "premium")]
    assert stats.values["count"].tolist() == expected  # "legacy" is not a key


def test_sums_are_clipped_then_truncated_onto_the_grid_never_rounded_up() -> None:
    customers = pd.DataFrame({"customer_id": ["a", "b", "c"], "plan": ["basic"] * 3,
                              "tenure_months": [100.0, -3.0, 36.0], "churn": [0.0] * 3})
    spec = _spec(kind="sum", value={"column": "tenure_months", "lower": 0, "upper": 72})
    stats = firm_statistics(spec, _store(customers))
    unit = layout(spec).statistics[1].unit
    assert stats.values["sum"][0] * unit == pytest.approx(72 + 0 + 36, abs=2 * unit)
    assert stats.values["count"][0] == 3 * RESOLUTION


def test_a_query_reading_a_missing_column_or_table_is_refused_with_its_name() -> None:
    with pytest.raises(Exception, match="spend_total"):
        firm_statistics(_spec(kind="sum", value={"column": "spend_total", "lower": 0,
                                                 "upper": 1}), _store(_customers(5)))
    with pytest.raises(Exception, match="no transactions table"):
        firm_statistics(_spec(**TRANSACTION_QUERIES[0]), _store(_customers(5)))


# ------------------------------------------------------------------------------ estimates

def test_estimates_without_noise_are_the_exact_statistics() -> None:
    customers = _customers(500, seed=3)
    spec = _spec()
    exact = firm_statistics(spec, _store(customers)).vector()
    rows = estimate(spec, Totals.from_sum(spec, exact, 0.0), seed=0)
    rates = {e.group: e.estimate for e in rows if e.statistic == "churn_rate"}
    for plan in ("basic", "plus", "premium"):
        truth = customers[customers.plan == plan].churn.mean()
        assert rates[plan] == pytest.approx(truth)


def test_intervals_cover_the_truth_at_about_95_percent() -> None:
    rng = np.random.default_rng(1)
    spec = _spec()
    exact = firm_statistics(spec, _store(_customers(2000, seed=2))).vector()
    truth = estimate(spec, Totals.from_sum(spec, exact, 0.0))
    sd = 40.0
    hits = total = 0
    for trial in range(60):
        noisy = exact + np.rint(rng.normal(0, sd, len(exact))).astype(np.int64)
        for got, want in zip(estimate(spec, Totals.from_sum(spec, noisy, sd**2), seed=trial),
                             truth, strict=True):
            assert got.ci_low is not None and got.ci_high is not None
            hits += got.ci_low <= want.estimate <= got.ci_high  # type: ignore[operator]
            total += 1
    assert 0.88 <= hits / total <= 0.995


def test_small_noisy_groups_are_suppressed_with_no_estimate() -> None:
    spec = _spec(suppress_below=1000)
    exact = firm_statistics(spec, _store(_customers(300))).vector()
    rows = estimate(spec, Totals.from_sum(spec, exact, 1.0))
    assert all(r.suppressed and r.estimate is None and r.ci_low is None for r in rows)


def test_kaplan_meier_and_histogram_quantiles_match_hand_computation() -> None:
    # 10 customers: 2 churn in week 0, 1 censored in week 0, 3 churn in week 1, 4 censored at 2
    survival = kaplan_meier(np.array([2, 3, 0]), np.array([1, 0, 4]))
    assert survival.tolist() == pytest.approx([0.8, 0.8 * (1 - 3 / 7), 0.8 * (1 - 3 / 7)])
    q = quantiles_from_histogram(np.array([10, 10, -3]), [0, 1, 2, 3], [0.5, 0.25])
    assert q.tolist() == pytest.approx([1.0, 0.5])


# ------------------------------------------------------------------------------ a firm's answers

def _node(write_firm: Callable[..., Path], *, cap: float = 3.0,
          federation: dict[str, object] | None = None) -> FirmNode:
    cfg_path = write_firm(make_customers(400), extra={
        "budget": {"epsilon": cap, "delta": 1e-5},
        "federation": {"public_size": 400, **(federation or {})},
    })
    prepare(load_firm_config(cfg_path))
    cfg = load_firm_config(cfg_path)
    return FirmNode(cfg, load_keys(cfg.firm.keys_dir))


def _ask(node: FirmNode, spec: QuerySpec, query_id: str = "q-1", *,
         secure: bool = False) -> QueryAnswer:
    return node.answer_query(QueryAnswerRequest(query_id, spec.canonical_json(), secure))


def test_an_answer_is_a_ledgered_signed_release_with_noise_of_the_stated_size(
    write_firm: Callable[..., Path],
) -> None:
    node = _node(write_firm)
    spec = _spec(epsilon=0.5)
    offer = node.offer_query(QueryOffer("q-1", spec.canonical_json(), False))
    assert offer.state is ReplyState.OK and node.privacy.spent() == 0.0  # offers spend nothing
    got = _ask(node, spec)
    assert got.state is ReplyState.OK, got.detail
    events = [e for e in node.privacy.ledger.events if e.purpose == "query:churn_by_plan"]
    assert len(events) == 1 and events[0].context["query_id"] == "q-1"
    assert got.epsilon_total == pytest.approx(node.privacy.spent())
    assert got.noise_std == pytest.approx(noise_multiplier(0.5, spec.delta) * 1.0)
    exact = firm_statistics(spec, node.store()).vector()
    assert len(got.values) == len(exact) and not np.array_equal(got.values, exact)
    log = node.privacy.audit.path
    kinds = [e.kind for e in node.privacy.audit.entries()]
    assert kinds[-2:] == [EntryKind.DP_RELEASE, EntryKind.QUERY_ANSWERED]
    assert node.keys.signing_key is not None
    key = node.keys.signing_key.public_key()
    assert verify_log(log, trusted_keys={public_key_id(key): key}) == []


def test_a_repeated_query_id_is_refused_so_one_query_never_releases_twice(
    write_firm: Callable[..., Path],
) -> None:
    node = _node(write_firm)
    spec = _spec(epsilon=0.3)
    assert _ask(node, spec).state is ReplyState.OK
    spent = node.privacy.spent()
    again = _ask(node, spec)
    assert again.state is ReplyState.DECLINED and "already answered" in again.detail
    assert again.values == () and node.privacy.spent() == spent


def test_a_query_the_budget_cannot_cover_is_declined_before_any_noise_and_costs_nothing(
    write_firm: Callable[..., Path],
) -> None:
    node = _node(write_firm, cap=1.0)
    spec = _spec(epsilon=1.0)
    assert _ask(node, spec, "q-1").state is ReplyState.OK
    spent = node.privacy.spent()
    offer = node.offer_query(QueryOffer("q-2", spec.canonical_json(), False))
    assert offer.state is ReplyState.BUDGET_EXHAUSTED and "cap" in offer.detail
    refused = _ask(node, spec, "q-2")
    assert refused.state is ReplyState.BUDGET_EXHAUSTED and refused.values == ()
    assert node.privacy.spent() == spent


@pytest.mark.parametrize("federation, spec_kw, why", [
    ({"answer_queries": False}, {}, "answer_queries = false"),
    ({"max_query_epsilon": 0.2}, {"epsilon": 0.5}, "max_query_epsilon"),
    ({}, {"group_by": {"column": "email", "keys": ["x"]}}, "personal data"),
    ({}, {"group_by": {"column": "nonexistent", "keys": ["x"]}}, "declares no column"),
])
def test_a_firm_declines_queries_its_policy_or_contract_forbids(
    write_firm: Callable[..., Path], federation: dict[str, object],
    spec_kw: dict[str, object], why: str,
) -> None:
    node = _node(write_firm, federation=federation)
    spec = _spec(**spec_kw)
    offer = node.offer_query(QueryOffer("q-1", spec.canonical_json(), False))
    assert offer.state is ReplyState.DECLINED and why in offer.detail
    assert _ask(node, spec).state is ReplyState.DECLINED
    assert node.privacy.spent() == 0.0


def test_a_query_offered_for_the_secure_sum_is_never_answered_alone(
    write_firm: Callable[..., Path],
) -> None:
    node = _node(write_firm)
    refused = _ask(node, _spec(min_firms=4), secure=True)
    assert refused.state is ReplyState.DECLINED and "secure sum" in refused.detail
    assert node.privacy.spent() == 0.0


def test_every_built_in_query_file_parses_and_declares_a_simulation() -> None:
    from fedcrm.coordinator.query_run import load_query_file
    from fedcrm.simulations.query import simulation_of

    root = Path(__file__).resolve().parents[1] / "configs" / "queries"
    files = sorted(root.glob("*.toml"))
    kinds = set()
    for path in files:
        cfg = load_query_file(path)
        kinds.add(cfg.query.kind)
        assert simulation_of(cfg).simulation.firms >= cfg.query.min_firms, path.name
        assert cfg.query.epsilon <= 1.0, path.name  # within a firm's default max_query_epsilon
    assert {QueryKind.CHURN_RATE, QueryKind.SEGMENT_SIZES, QueryKind.RETENTION,
            QueryKind.WEEKLY_TREND, QueryKind.HISTOGRAM, QueryKind.QUANTILES} <= kinds


def test_a_query_whose_large_delta_would_cost_more_than_the_firm_allows_is_declined(
    write_firm: Callable[..., Path],
) -> None:
    """max_query_epsilon bounds what the query SPENDS at the firm's δ, not the ε it names."""
    node = _node(write_firm, federation={"max_query_epsilon": 1.0})
    spec = _spec(epsilon=1.0, delta=1e-3)  # cheap at δ=1e-3, more than ε=1 at δ=1e-5
    offer = node.offer_query(QueryOffer("q-1", spec.canonical_json(), False))
    assert offer.state is ReplyState.DECLINED and "max_query_epsilon" in offer.detail
    tiny = node.offer_query(QueryOffer("q-2", _spec(epsilon=1e-9).canonical_json(), False))
    assert tiny.state is ReplyState.DECLINED and "noise" in tiny.detail


@pytest.mark.parametrize("column, why", [
    ("customer_id", "personal data"), ("signup_date", "timestamp"), ("notes", "declares no"),
])
def test_a_query_may_not_group_by_an_id_a_timestamp_or_a_dropped_column(
    write_firm: Callable[..., Path], column: str, why: str,
) -> None:
    node = _node(write_firm)
    spec = _spec(group_by={"column": column, "keys": ["x"]})
    offer = node.offer_query(QueryOffer("q-1", spec.canonical_json(), False))
    assert offer.state is ReplyState.DECLINED and why in offer.detail, offer.detail
