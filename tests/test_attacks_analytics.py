"""Attacks on federated DP analytics queries (review of issue 15), each named for the behaviour
that should hold. A failing test here is a finding; a passing one is an attack that is defeated.

Run alone (2 shared cores): ``PYTHONPATH=. python -m pytest -q -p no:cacheprovider
tests/test_attacks_analytics.py``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from conftest import make_customers
from test_analytics_federation import (
    QUERY,
    InProcessGrid,
    _bundle,
    _exact_total,
    _firms,
    _run,
    _spent,
)

from fedcrm.analytics.spec import QuerySpec
from fedcrm.analytics.statistics import firm_statistics, layout
from fedcrm.answering import NOISE_TAIL, QUERY_SUM, answer_bound, noise_multiplier, plan_answer
from fedcrm.audit.log import AuditLog, EntryKind
from fedcrm.audit.verify import verify_run
from fedcrm.data.contract import load_firm_config
from fedcrm.data.prepare import prepare
from fedcrm.data.store import PreparedStore
from fedcrm.node import FirmNode
from fedcrm.privacy.errors import FedcrmError
from fedcrm.privacy.keys import load_keys, load_signing_key
from fedcrm.privacy.secure_sum import (
    FixedPoint,
    SumId,
    SumSpec,
    mask_commitment,
    self_mask,
    shamir_combine,
)
from fedcrm.protocol import (
    QueryAnswerRequest,
    QueryOffer,
    ReplyState,
    SecureSumKeysRequest,
    SecureSumMaskRequest,
    SecureSumQuery,
    SecureSumShareRequest,
    SecureSumUnmaskRequest,
    SumInput,
    Wire,
)

# ------------------------------------------------------------------------------ helpers


class TamperGrid(InProcessGrid):
    """The in-process Grid with a malicious coordinator in the middle: ``tamper(kind, node,
    wire)`` may rewrite any request before the firm's ClientApp sees it."""

    def __init__(self, configs: list[Path], *,
                 tamper: Callable[[str, int, Wire], Wire | None],
                 drop: Callable[[int, str], bool] | None = None) -> None:
        super().__init__(configs, drop=drop)
        self.rewrite = tamper

    def send_and_receive(self, messages: Iterable[Any], *, timeout: float | None = None
                         ) -> Iterable[Any]:
        from flwr.app import Message

        from fedcrm.flower.records import to_records, wire_of

        out = []
        for m in messages:
            kind, node = m.metadata.message_type, m.metadata.dst_node_id
            changed = self.rewrite(kind, node, wire_of(m))
            if changed is not None:
                m = Message(content=to_records(changed), dst_node_id=node, message_type=kind)
            out.append(m)
        return super().send_and_receive(out, timeout=timeout)


@pytest.fixture
def opened_sums(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Every secure sum the coordinator managed to open (what a malicious coordinator keeps,
    whatever the honest code then publishes)."""
    import fedcrm.server.analytics as server_analytics

    opened: list[Any] = []
    real = server_analytics.secure_sum

    def capture(*args: Any, **kwargs: Any) -> Any:
        result = real(*args, **kwargs)
        opened.append(result)
        return result

    monkeypatch.setattr(server_analytics, "secure_sum", capture)
    return opened


def _node(path: Path) -> FirmNode:
    cfg = load_firm_config(path)
    return FirmNode(cfg, load_keys(cfg.firm.keys_dir))


def _events(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in (run_dir / "events.jsonl").read_text().splitlines()]


# ============================================================================== FINDINGS
# ------------------------------------------------------------------------------ secure mode:
# min_firms at the unmask step


def test_a_firm_never_helps_open_a_secure_sum_whose_survivor_list_repeats_a_firm(
    write_firm: Callable[..., Path], tmp_path: Path, coordinator_key: Path,
    opened_sums: list[Any],
) -> None:
    """min_firms=4, one firm's masked vector is 'lost'; the coordinator repeats a survivor so
    the firms' `len(request.survivors) >= min_firms` check passes (node.py:554) while the
    protocol unmasks the set of 3. The 3-firm total carries only 3/4 of the noise variance."""
    configs = _firms(write_firm, [3.0, 3.0, 3.0, 3.0])

    def tamper(kind: str, node: int, wire: Wire) -> Wire | None:
        if kind == "query.secure_sum_unmask":
            survivors = str(wire.config["survivors"]).split(",")
            return dataclasses.replace(wire, config={
                **wire.config, "survivors": ",".join([survivors[0], *survivors])})
        return None

    grid = TamperGrid(configs, tamper=tamper,
                      drop=lambda node, kind: node == 103 and kind == "query.secure_sum_mask")
    _run(grid, tmp_path / "runs" / "q-dup", secure=True, min_firms=4)
    assert opened_sums == [], (
        f"the coordinator opened a sum of {len(opened_sums[0].survivors)} firms "
        f"({opened_sums[0].survivors}) although min_firms=4"
    )


def test_a_firm_holds_the_unmask_step_to_the_min_firms_it_masked_with(
    write_firm: Callable[..., Path], tmp_path: Path, coordinator_key: Path,
    opened_sums: list[Any],
) -> None:
    """The firms mask with 1/4 of the noise variance (min_firms=4); at the unmask step the
    coordinator sends the same SumSpec but a query_spec with min_firms=3. The query_spec is not
    part of the SumSpec digest the firm holds the coordinator to (secure_sum_party.py:97), and
    secure_sum_unmask re-reads min_firms from the unmask request (node.py:553)."""
    configs = _firms(write_firm, [3.0, 3.0, 3.0, 3.0])

    def tamper(kind: str, node: int, wire: Wire) -> Wire | None:
        if kind == "query.secure_sum_unmask":
            spec = json.loads(str(wire.config["query-spec"]))
            return dataclasses.replace(wire, config={
                **wire.config, "query-spec": QuerySpec.model_validate(
                    {**spec, "min_firms": 3}).canonical_json()})
        return None

    grid = TamperGrid(configs, tamper=tamper,
                      drop=lambda node, kind: node == 103 and kind == "query.secure_sum_mask")
    _run(grid, tmp_path / "runs" / "q-lowered", secure=True, min_firms=4)
    assert opened_sums == [], (
        f"the coordinator opened a sum of {len(opened_sums[0].survivors)} firms whose inputs "
        "each carry 1/4 of the noise variance"
    )


# ------------------------------------------------------------------------------ secure mode:
# parties the firm cannot authenticate


def _ring_key(sum_id: SumId, firm: str) -> bytes:
    # SumSpec.graph's public order (privacy/secure_sum.py)
    return hashlib.sha256(sum_id.context + b"/" + firm.encode()).digest()


def _ghosts_between(sum_id: SumId, low: bytes, high: bytes, count: int, tag: str) -> list[str]:
    """``count`` made-up firm names whose ring position lies on the arc (low, high)."""
    out = []
    for i in range(100_000):
        name = f"ghost{tag}{i:05d}"
        k = _ring_key(sum_id, name)
        inside = (low < k < high) if low < high else (k > low or k < high)
        if inside:
            out.append(name)
            if len(out) == count:
                return out
    raise AssertionError("no ghost names found")


def test_a_firm_counts_toward_min_firms_only_parties_it_can_authenticate(
    write_firm: Callable[..., Path], tmp_path: Path,
) -> None:
    """A SumSpec whose parties are 3 real firms and 5 made-up names, with a ring graph
    (neighbours=2) that gives the middle real firm only real neighbours: the firm checks keys of
    its neighbours only (secure_sum_party.py:135), so it accepts a sum 'of 8 firms' with
    min_firms=8 and adds 1/8 of the noise variance. It should refuse: a party it holds no
    signing key for cannot count as a firm whose noise is in the sum."""
    configs = _firms(write_firm, [3.0, 3.0, 3.0])
    nodes = [_node(p) for p in configs]
    real = ["firm1", "firm2", "firm3"]
    sum_id = SumId("q-ghosts", 0, QUERY_SUM)
    order = sorted(real, key=lambda f: _ring_key(sum_id, f))
    middle = order[1]
    ghosts = _ghosts_between(sum_id, _ring_key(sum_id, order[2]), _ring_key(sum_id, order[0]),
                             5, "a")
    spec = QuerySpec.model_validate({**QUERY, "min_firms": 8})
    node = nodes[real.index(middle)]
    plan = plan_answer(node.privacy, node.cfg, spec, query_id="q-ghosts", secure=True)
    bound = float(np.ceil(answer_bound(plan, 500)))
    sum_spec = SumSpec(sum_id, tuple(sorted(real + ghosts)), plan.layout.length,
                       FixedPoint(-bound, bound, 1), neighbours=2)
    assert set(sum_spec.neighbours_of(middle)) <= set(real)  # only real neighbours
    query = SecureSumQuery(sum_spec, SumInput.QUERY_ANSWER, query_spec=spec.canonical_json())
    keys = {f: n.secure_sum_keys(SecureSumKeysRequest("q-ghosts")).key
            for f, n in zip(real, nodes, strict=True)}
    with pytest.raises(FedcrmError):
        node.secure_sum_share(SecureSumShareRequest(
            query, {v: keys[v] for v in sum_spec.neighbours_of(middle)}))


def test_a_coordinator_cannot_open_a_secure_sum_of_three_firms_by_padding_it_with_ghosts(
    write_firm: Callable[..., Path], tmp_path: Path,
) -> None:
    """The full attack: min_firms=8, only 3 real firms. Each firm gets its own view of the sum
    (same sum id, different made-up parties, chosen so that its two ring neighbours are the
    other two real firms). Nothing binds the views together (the firms sign their per-sum keys
    over the sum id only), every per-firm check passes, and the coordinator recovers the sum of
    the three answers, each carrying 1/8 of the noise variance: 3/8 of the accounted noise."""
    configs = _firms(write_firm, [3.0, 3.0, 3.0])
    nodes = dict(zip(["firm1", "firm2", "firm3"], (_node(p) for p in configs), strict=True))
    real = list(nodes)
    qid = "q-views"
    sum_id = SumId(qid, 0, QUERY_SUM)
    spec = QuerySpec.model_validate({**QUERY, "min_firms": 8})
    node0 = nodes["firm1"]
    plan = plan_answer(node0.privacy, node0.cfg, spec, query_id=qid, secure=True)
    bound = float(np.ceil(answer_bound(plan, 500)))
    fp = FixedPoint(-bound, bound, 1)
    order = sorted(real, key=lambda f: _ring_key(sum_id, f))
    views: dict[str, SumSpec] = {}
    for i, firm in enumerate(order):
        # ghosts on the arc between the other two (the one not touching this firm)
        after, before = order[(i + 1) % 3], order[(i + 2) % 3]
        ghosts = _ghosts_between(sum_id, _ring_key(sum_id, after), _ring_key(sum_id, before),
                                 5, firm)
        views[firm] = SumSpec(sum_id, tuple(sorted(real + ghosts)), plan.layout.length, fp,
                              neighbours=2)
        assert set(views[firm].neighbours_of(firm)) == set(real) - {firm}
    query_of = {f: SecureSumQuery(views[f], SumInput.QUERY_ANSWER,
                                  query_spec=spec.canonical_json()) for f in real}
    keys = {f: n.secure_sum_keys(SecureSumKeysRequest(qid)).key for f, n in nodes.items()}

    def attack() -> np.ndarray:
        shares = {f: nodes[f].secure_sum_share(SecureSumShareRequest(
            query_of[f], {v: keys[v] for v in views[f].neighbours_of(f)})).shares for f in real}
        masked = {}
        for f in real:
            eph = {v: shares[v].ephemeral for v in views[f].neighbours_of(f)}
            masked[f] = nodes[f].secure_sum_mask(SecureSumMaskRequest(
                query_of[f], views[f].parties, eph)).masked
        revealed = {}
        for f in real:
            cts = {u: shares[u].ciphertexts[views[u].neighbours_of(u).index(f)]
                   for u in views[f].neighbours_of(f)}
            revealed[f] = nodes[f].secure_sum_unmask(SecureSumUnmaskRequest(
                query_of[f], views[f].parties, views[f].parties, cts)).revealed
        total = np.zeros(plan.layout.length, dtype=np.uint64)
        for f in real:
            holders = views[f].neighbours_of(f)  # in f's own view: its Shamir x-coordinates
            seed = shamir_combine([views[f].x(h) for h in holders],
                                  [revealed[h].mask_shares[f] for h in holders])
            assert mask_commitment(sum_id, f, seed) == shares[f].ephemeral.commitment
            total += masked[f] - self_mask(sum_id, f, seed, plan.layout.length)
        return fp.decode_sum(total, 3)

    try:
        opened = attack()
    except FedcrmError:
        return  # a firm refused: the attack is defeated
    exact = _exact_total(configs, spec.canonical_json())
    sigma_full = noise_multiplier(spec.epsilon, spec.delta) * layout(spec, secure=True
                                                                    ).l2_sensitivity
    error = np.asarray(opened) - exact
    pytest.fail(
        f"the coordinator opened the sum of 3 firms with min_firms=8: error {error.tolist()} "
        f"grid units, expected std {sigma_full * np.sqrt(3 / 8):.0f}, accounted std "
        f"{sigma_full:.0f}"
    )


@pytest.mark.parametrize("n, neighbours, min_firms", [(4, 0, 2), (8, 2, 6)],
                         ids=["4-firms-full-graph-min2", "8-firms-ring-min6"])
def test_a_coordinator_cannot_unmask_one_firms_answer_by_telling_each_firm_other_survivors(
    write_firm: Callable[..., Path], tmp_path: Path, n: int, neighbours: int, min_firms: int,
) -> None:
    """One consistent SumSpec, only real firms, every firm masks. At the unmask step the
    coordinator tells each firm w a different survivor list: w itself, the target X if X is
    w's neighbour, padded to >= min_firms with firms that are not w's neighbours (revealing
    nothing about them). So every neighbour of X reveals X's mask-seed share, and every other
    neighbour of each v in N(X) reveals v's KEY-seed share: the coordinator rebuilds b_X and
    every pair mask of X and reads X's answer alone - with 1/min_firms of the noise variance.
    Each firm's check (node.py:554, secure_sum.py:605-614) passes; nothing makes the firms
    agree on one survivor list (Bonawitz et al.'s consistency round for an active server)."""
    from fedcrm.privacy.secure_sum import ephemeral_key, pair_mask

    configs = _firms(write_firm, [3.0] * n)
    names = [f"firm{i + 1}" for i in range(n)]
    nodes = dict(zip(names, (_node(p) for p in configs), strict=True))
    qid = "q-isolate"
    sum_id = SumId(qid, 0, QUERY_SUM)
    spec = QuerySpec.model_validate({**QUERY, "min_firms": min_firms})
    plan = plan_answer(nodes["firm1"].privacy, nodes["firm1"].cfg, spec, query_id=qid,
                       secure=True)
    bound = float(np.ceil(answer_bound(plan, 500)))
    fp = FixedPoint(-bound, bound, 1)
    sum_spec = SumSpec(sum_id, tuple(names), plan.layout.length, fp, neighbours=neighbours)
    query = SecureSumQuery(sum_spec, SumInput.QUERY_ANSWER, query_spec=spec.canonical_json())
    keys = {f: nd.secure_sum_keys(SecureSumKeysRequest(qid)).key for f, nd in nodes.items()}
    target = "firm1"
    length = plan.layout.length

    def attack() -> np.ndarray:
        shares = {f: nodes[f].secure_sum_share(SecureSumShareRequest(
            query, {v: keys[v] for v in sum_spec.neighbours_of(f)})).shares for f in names}
        shared = tuple(names)
        masked = {f: nodes[f].secure_sum_mask(SecureSumMaskRequest(
            query, shared, {v: shares[v].ephemeral for v in sum_spec.neighbours_of(f)})).masked
            for f in names}
        revealed = {}
        for w in names:
            nbrs = set(sum_spec.neighbours_of(w))
            survivors = {w} | ({target} if target in nbrs else set()) | (
                set(names) - nbrs - {w})
            if len(survivors) < min_firms:
                assert w == target  # the target's own unmask is optional
                continue
            cts = {u: shares[u].ciphertexts[sum_spec.neighbours_of(u).index(w)]
                   for u in sum_spec.neighbours_of(w)}
            revealed[w] = nodes[w].secure_sum_unmask(SecureSumUnmaskRequest(
                query, shared, tuple(f for f in names if f in survivors), cts)).revealed

        def seed(owner: str, kind: str) -> int:
            t = sum_spec.threshold(owner)
            points = [(sum_spec.x(h), (r.mask_shares if kind == "mask" else r.key_shares)[owner])
                      for h, r in revealed.items() if owner in
                      (r.mask_shares if kind == "mask" else r.key_shares)][:t]
            assert len(points) == t, (owner, kind, len(points), t)
            return shamir_combine([x for x, _ in points], [y for _, y in points])

        b = seed(target, "mask")
        assert mask_commitment(sum_id, target, b) == shares[target].ephemeral.commitment
        alone = masked[target] - self_mask(sum_id, target, b, length)
        for v in sum_spec.neighbours_of(target):
            private = ephemeral_key(sum_id, v, seed(v, "key"))
            m = pair_mask(sum_id, private, v, target, shares[target].ephemeral.public_key,
                          length)
            alone = alone - m if sum_spec.index(target) < sum_spec.index(v) else alone + m
        return fp.decode_sum(alone, 1)

    try:
        answer = attack()
    except FedcrmError:
        return  # a firm refused: defeated
    store_exact = firm_statistics(spec, nodes[target].store(), secure=True).vector()
    sigma_full = noise_multiplier(spec.epsilon, spec.delta) * layout(
        spec, secure=True).l2_sensitivity
    error = np.asarray(answer) - store_exact
    pytest.fail(
        f"the coordinator read {target}'s answer alone (min_firms={min_firms}): error "
        f"{error.tolist()} grid units; its noise std is {sigma_full / np.sqrt(min_firms):.0f}, "
        f"the accounted one {sigma_full:.0f}"
    )


# ------------------------------------------------------------------------------ a careless firm


def test_a_firm_whose_customers_exceed_its_public_size_never_fails_a_secure_sum_after_spending(
    write_firm: Callable[..., Path], tmp_path: Path, coordinator_key: Path,
) -> None:
    """firm3 declares public_size=100 but holds 2,500 customers. The secure sum's range is sized
    by public sizes; at the mask step firm3 releases (charges its ledger), then its answer does
    not fit the range and FixedPoint.encode's ValueOutOfRange reaches the coordinator with the
    number and position of the out-of-range coordinates - a data-dependent, unaccounted
    signal (docs/analytics.md: "an out-of-range failure can never depend on its data")."""
    import shutil

    configs = _firms(write_firm, [3.0, 3.0])
    path = write_firm(make_customers(2500, seed=7), firm="firm3", extra={
        "budget": {"epsilon": 3.0, "delta": 1e-5},
        "federation": {"public_size": 100, "peer_keys_dir": "../peer-keys"},
    })
    shutil.copy(path.parent / "keys" / "signing.pub", path.parent.parent / "peer-keys" /
                "firm3.pub")
    prepare(load_firm_config(path))
    configs.append(path)
    run_dir = tmp_path / "runs" / "q-careless"
    # the sum's range is sized by the largest public size (500): 2,500 customers overflow it
    result = _run(InProcessGrid(configs), run_dir, secure=True, min_firms=2,
                  kind="count", group_by=None)
    leaked = [e for e in _events(run_dir) if "outside the sum's declared range" in json.dumps(e)]
    assert _spent(path) == 0.0 or "firm3" in result["answered_by"], (
        f"firm3 spent ε={_spent(path):.3g} and its answer is not in the result"
    )
    assert not leaked, leaked[0]


# ------------------------------------------------------------------------------ secure mode:
# spending before the checks that can still fail


def _two_secure_firms(write_firm: Callable[..., Path], qid: str
                      ) -> tuple[list[Path], dict[str, FirmNode], SecureSumQuery, dict[str, Any]]:
    configs = _firms(write_firm, [3.0, 3.0])
    nodes = {f: _node(p) for f, p in zip(["firm1", "firm2"], configs, strict=True)}
    spec = QuerySpec.model_validate({**QUERY, "min_firms": 2})
    plan = plan_answer(nodes["firm1"].privacy, nodes["firm1"].cfg, spec, query_id=qid,
                       secure=True)
    bound = float(np.ceil(answer_bound(plan, 500)))
    sum_spec = SumSpec(SumId(qid, 0, QUERY_SUM), ("firm1", "firm2"), plan.layout.length,
                       FixedPoint(-bound, bound, 1))
    query = SecureSumQuery(sum_spec, SumInput.QUERY_ANSWER, query_spec=spec.canonical_json())
    keys = {f: n.secure_sum_keys(SecureSumKeysRequest(qid)).key for f, n in nodes.items()}
    shares = {f: nodes[f].secure_sum_share(SecureSumShareRequest(
        query, {v: keys[v] for v in sum_spec.neighbours_of(f)})).shares for f in nodes}
    return configs, nodes, query, shares


def test_a_mask_request_the_firm_will_refuse_costs_it_nothing(
    write_firm: Callable[..., Path],
) -> None:
    """The coordinator leaves out the neighbour's signed per-sum key from the mask request. The
    firm releases its answer first (node.py:548 computes _sum_input before SecureSumParty.mask
    checks the keys), then refuses: ε spent, nothing sent, and the query id is burnt."""
    configs, nodes, query, _shares = _two_secure_firms(write_firm, "q-burn")
    with pytest.raises(FedcrmError, match="per-sum key"):
        nodes["firm1"].secure_sum_mask(SecureSumMaskRequest(query, ("firm1", "firm2"), {}))
    assert _spent(configs[0]) == 0.0


# ------------------------------------------------------------------------------ plain mode:
# one answer per query id


def test_one_query_id_is_released_at_most_once_even_when_two_requests_race(
    write_firm: Callable[..., Path], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`answered()` (answering.py:105) is checked in plan_answer, outside the ledger's lock;
    two concurrent requests for one query id both pass it and both release."""
    import fedcrm.answering as answering

    configs = _firms(write_firm, [3.0])
    node = _node(configs[0])
    barrier = threading.Barrier(2, timeout=60)
    real = answering.firm_statistics

    def slow(*args: Any, **kwargs: Any) -> Any:
        barrier.wait()
        return real(*args, **kwargs)

    monkeypatch.setattr(answering, "firm_statistics", slow)
    spec = QuerySpec.model_validate({**QUERY, "min_firms": 1})
    replies: list[Any] = []

    def ask() -> None:
        replies.append(node.answer_query(QueryAnswerRequest("q-race", spec.canonical_json(),
                                                            False)))

    threads = [threading.Thread(target=ask) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    answered = [e for e in node.privacy.audit.entries() if e.kind is EntryKind.QUERY_ANSWERED
                and e.payload["query_id"] == "q-race"]
    charged = [e for e in node.privacy.ledger.events if e.context.get("query_id") == "q-race"]
    assert sum(r.state is ReplyState.OK for r in replies) <= 1 and len(answered) <= 1, (
        f"{len(answered)} answers released for one query id ({len(charged)} ledger charges)"
    )


# ------------------------------------------------------------------------------ the auditor


def _completed_plain_run(write_firm: Callable[..., Path], tmp_path: Path
                         ) -> tuple[list[Path], Path]:
    configs = _firms(write_firm, [3.0, 3.0, 3.0])
    run_dir = tmp_path / "runs" / "q-audit"
    result = _run(InProcessGrid(configs), run_dir, min_firms=3)
    assert result["status"] == "completed"
    return configs, run_dir


def test_audit_refuses_a_completed_query_result_with_fewer_answers_than_min_firms(
    write_firm: Callable[..., Path], tmp_path: Path, coordinator_key: Path,
) -> None:
    """The coordinator logs a query (min_firms=3) and a 'completed' result that names no
    answer at all: audit verify checks only the answers a result names (verify.py:472)."""
    configs, run_dir = _completed_plain_run(write_firm, tmp_path)
    fed = AuditLog(run_dir / "federation" / "audit.jsonl",
                   signing_key=load_signing_key(coordinator_key))
    spec = QuerySpec.model_validate({**QUERY, "min_firms": 3})
    fed.append(EntryKind.QUERY_STARTED, {
        "query_id": "q-forged", "query": spec.name, "fingerprint": spec.fingerprint(),
        "spec": spec.canonical_json(), "firms": ["firm1", "firm2", "firm3"],
    })
    fed.append(EntryKind.QUERY_RESULT, {
        "query_id": "q-forged", "status": "completed", "answers": {},
        "sum_hash": "0" * 64, "result_hash": "1" * 64,
    })
    _bundle(run_dir, configs)
    report = verify_run(run_dir)
    assert not report.ok, "verify accepts a completed result that no firm answered"


def test_audit_refuses_a_result_whose_firms_answered_a_different_query_than_the_one_logged(
    write_firm: Callable[..., Path], tmp_path: Path, coordinator_key: Path,
) -> None:
    """The coordinator logs an innocuous spec (fingerprint A) in query_started, but asks the
    firms a different one (B: other groups, larger ε); each firm's query_answered records
    fingerprint B. verify matches answers by query id and hash only."""
    configs, run_dir = _completed_plain_run(write_firm, tmp_path)
    logged = QuerySpec.model_validate({**QUERY, "min_firms": 3, "epsilon": 0.1})
    asked = QuerySpec.model_validate({**QUERY, "min_firms": 3, "epsilon": 1.0,
                                      "group_by": {"column": "plan", "keys": ["premium"]}})
    from fedcrm.answering import answer_hash

    hashes = {}
    for path in configs:
        got = _node(path).answer_query(QueryAnswerRequest("q-swap", asked.canonical_json(),
                                                          False))
        assert got.state is ReplyState.OK, got.detail
        hashes[got.firm] = answer_hash(np.asarray(got.values, dtype=np.int64))
    fed = AuditLog(run_dir / "federation" / "audit.jsonl",
                   signing_key=load_signing_key(coordinator_key))
    fed.append(EntryKind.QUERY_STARTED, {
        "query_id": "q-swap", "query": logged.name, "fingerprint": logged.fingerprint(),
        "spec": logged.canonical_json(), "firms": sorted(hashes),
    })
    fed.append(EntryKind.QUERY_RESULT, {
        "query_id": "q-swap", "status": "completed", "answers": hashes,
        "sum_hash": "0" * 64, "result_hash": "1" * 64,
    })
    _bundle(run_dir, configs)
    report = verify_run(run_dir)
    assert not report.ok, "verify accepts answers to a spec other than the one logged"


def test_audit_ties_a_secure_query_result_to_a_secure_sum_of_at_least_min_firms(
    write_firm: Callable[..., Path], tmp_path: Path, coordinator_key: Path,
) -> None:
    """After an honest secure query (3 firms, min_firms=3) the coordinator logs a second
    secure sum of only two of them (each did mask for that sum id) and a completed result built
    from it. verify checks each firm named in a secure_sum_result masked, and each firm named in
    a query_result answered, but not that the result's sum has min_firms firms, nor that the
    result's sum_hash is a logged secure sum's."""
    configs = _firms(write_firm, [3.0, 3.0, 3.0])
    run_dir = tmp_path / "runs" / "q-sec"
    result = _run(InProcessGrid(configs), run_dir, secure=True, min_firms=3)
    assert result["status"] == "completed"
    fed = AuditLog(run_dir / "federation" / "audit.jsonl",
                   signing_key=load_signing_key(coordinator_key))
    sums = [e.payload for e in fed.entries() if e.kind is EntryKind.SECURE_SUM_RESULT]
    fed.append(EntryKind.SECURE_SUM_RESULT, {
        **sums[0], "firms": ["firm1", "firm2"], "dropped": ["firm3"], "sum_hash": "2" * 64,
    })
    fed.append(EntryKind.QUERY_RESULT, {
        "query_id": "q-sec", "status": "completed", "answers": {"firm1": "", "firm2": ""},
        "sum_hash": "3" * 64, "result_hash": "4" * 64,
    })
    _bundle(run_dir, configs)
    report = verify_run(run_dir)
    assert not report.ok, "verify accepts a secure result of 2 firms for a min_firms=3 query"


# ============================================================================== ATTACKS THAT HOLD


def _extreme(seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Customers listed twice, NaN/±inf/huge values, keys outside the public set, and customers
    with up to 30 transactions over two years in many groups."""
    rng = np.random.default_rng(seed)
    n = 25
    customers = pd.DataFrame({
        "customer_id": [f"c{i % 20}" for i in range(n)],
        "plan": rng.choice(["basic", "plus", None, "legacy"], n),
        "tenure_months": rng.choice([np.nan, np.inf, -np.inf, -1e308, 1e308, 5.0, -3.0, 100.0],
                                    n),
        "churn": rng.choice([0.0, 1.0, np.nan, 0.7, -5.0], n),
    })
    rows = []
    for c in range(20):
        for _ in range(int(rng.integers(0, 30))):
            day = pd.Timestamp("2019-06-01") + pd.Timedelta(days=int(rng.integers(0, 700)))
            rows.append((f"c{c}", day,
                         float(rng.choice([np.nan, 1e308, -1e308, 3.0, -7.0, 1e6])),
                         rng.choice(["a", "b", "c", "d", None])))
    return customers, pd.DataFrame(rows, columns=["customer_id", "timestamp", "amount",
                                                  "category"])


_G = {"column": "category", "keys": ["a", "b", "c"], "max_groups": 2}
_EXTREME_QUERIES = [
    {"kind": "count"},
    {"kind": "churn_rate"},
    {"kind": "sum", "value": {"column": "tenure_months", "lower": -10, "upper": 72}},
    {"kind": "mean", "value": {"column": "tenure_months", "lower": 5, "upper": 72}},
    {"kind": "histogram", "value": {"column": "tenure_months", "lower": 0, "upper": 72},
     "bins": [-5, 12, 24, 200]},
    {"table": "transactions", "group_by": _G, "kind": "count"},
    {"table": "transactions", "group_by": _G, "kind": "sum",
     "value": {"column": "amount", "lower": -1, "upper": 10}},
    {"table": "transactions", "group_by": _G, "kind": "histogram",
     "value": {"column": "amount", "lower": -1, "upper": 10}, "bins": [-1, 0, 5, 10]},
    {"table": "transactions", "group_by": None, "kind": "segment_sizes", "as_of": "2020-03-01"},
    {"table": "transactions", "group_by": None, "kind": "retention", "as_of": "2020-03-01",
     "weeks": 8, "inactive_days": 30, "cohorts": ["2019-05-01", "2019-09-01", "2020-01-01"]},
    {"table": "transactions", "group_by": None, "kind": "weekly_trend", "as_of": "2020-03-01",
     "start": "2019-12-01", "weeks": 15, "max_purchase_days": 1.5},
]


@pytest.mark.parametrize("secure", [False, True], ids=["plain", "secure"])
@pytest.mark.parametrize("query", _EXTREME_QUERIES,
                         ids=lambda q: f"{q.get('table', 'customers')}-{q['kind']}")
def test_held_one_extreme_customer_moves_any_answer_by_at_most_the_declared_sensitivity(
    query: dict[str, Any], secure: bool,
) -> None:
    spec = QuerySpec.model_validate({
        "name": "q", "epsilon": 1.0,
        "group_by": {"column": "plan", "keys": ["basic", "plus"]}, **query})
    bound = layout(spec, secure=secure).l2_sensitivity
    for seed in range(2):
        customers, tx = _extreme(seed)

        def stats(c: pd.DataFrame, t: pd.DataFrame) -> np.ndarray:
            store = PreparedStore(firm="f", store_hash="h", manifest={}, customers=c,
                                  transactions=t, features=pd.DataFrame())
            return firm_statistics(spec, store, secure=secure).vector()

        full = stats(customers, tx)
        for i in range(20):
            cid = f"c{i}"
            without = stats(customers[customers.customer_id != cid], tx[tx.customer_id != cid])
            moved = float(np.linalg.norm((full - without).astype(np.float64)))
            assert moved <= bound + 1e-9, (cid, moved, bound)


def test_held_the_ledger_is_checked_before_any_noise_is_drawn(
    write_firm: Callable[..., Path], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A firm whose budget is nearly spent: the answer is declined and the noise sampler is
    never called."""
    import fedcrm.answering as answering

    configs = _firms(write_firm, [1.0])
    node = _node(configs[0])
    spec = QuerySpec.model_validate({**QUERY, "min_firms": 1, "epsilon": 0.9})
    assert node.answer_query(QueryAnswerRequest("q-1", spec.canonical_json(), False)
                             ).state is ReplyState.OK
    spent = node.privacy.spent()

    def never(*_a: Any, **_k: Any) -> Any:
        raise AssertionError("noise drawn before the ledger check")

    monkeypatch.setattr(answering, "discrete_gaussian", never)
    refused = node.answer_query(QueryAnswerRequest("q-2", spec.canonical_json(), False))
    assert refused.state is ReplyState.BUDGET_EXHAUSTED and refused.values == ()
    assert node.privacy.spent() == spent


def test_held_a_secure_query_id_is_released_once_even_after_a_failed_mask_step(
    write_firm: Callable[..., Path],
) -> None:
    """A mask request the firm refuses costs nothing; the retry releases once; a further mask
    request and a plain answer to the same query id are both refused, nothing more spent."""
    configs, nodes, query, shares = _two_secure_firms(write_firm, "q-retry")
    with pytest.raises(FedcrmError):
        nodes["firm1"].secure_sum_mask(SecureSumMaskRequest(query, ("firm1", "firm2"), {}))
    assert _spent(configs[0]) == 0.0
    nodes["firm1"].secure_sum_mask(SecureSumMaskRequest(
        query, ("firm1", "firm2"), {"firm2": shares["firm2"].ephemeral}))
    spent = _spent(configs[0])
    assert spent > 0
    with pytest.raises(FedcrmError):
        nodes["firm1"].secure_sum_mask(SecureSumMaskRequest(
            query, ("firm1", "firm2"), {"firm2": shares["firm2"].ephemeral}))
    plain = nodes["firm1"].answer_query(QueryAnswerRequest("q-retry", query.query_spec, False))
    assert plain.state is not ReplyState.OK and _spent(configs[0]) == spent
    answered = [e for e in nodes["firm1"].privacy.audit.entries()
                if e.kind is EntryKind.QUERY_ANSWERED]
    assert len(answered) == 1


def test_held_a_firm_sends_its_masked_answer_once_per_query_id(
    write_firm: Callable[..., Path],
) -> None:
    """A replayed mask request (same sum) is refused; only one release is charged."""
    configs, nodes, query, shares = _two_secure_firms(write_firm, "q-replay")
    request = SecureSumMaskRequest(query, ("firm1", "firm2"),
                                   {"firm2": shares["firm2"].ephemeral})
    nodes["firm1"].secure_sum_mask(request)
    spent = _spent(configs[0])
    with pytest.raises(FedcrmError):
        nodes["firm1"].secure_sum_mask(request)
    assert _spent(configs[0]) == spent


def test_held_a_secure_sum_over_a_firm_that_declined_costs_that_firm_nothing(
    write_firm: Callable[..., Path],
) -> None:
    """The coordinator puts a firm that declined the offer (budget too small) into the secure
    sum anyway: the firm re-checks everything at the share step and refuses, spending nothing."""
    configs = _firms(write_firm, [3.0, 0.3])
    nodes = {f: _node(p) for f, p in zip(["firm1", "firm2"], configs, strict=True)}
    spec = QuerySpec.model_validate({**QUERY, "min_firms": 2})
    offer = nodes["firm2"].offer_query(QueryOffer("q-x", spec.canonical_json(), True))
    assert offer.state is ReplyState.BUDGET_EXHAUSTED
    plan = plan_answer(nodes["firm1"].privacy, nodes["firm1"].cfg, spec, query_id="q-x",
                       secure=True)
    bound = float(np.ceil(answer_bound(plan, 500)))
    sum_spec = SumSpec(SumId("q-x", 0, QUERY_SUM), ("firm1", "firm2"), plan.layout.length,
                       FixedPoint(-bound, bound, 1))
    query = SecureSumQuery(sum_spec, SumInput.QUERY_ANSWER, query_spec=spec.canonical_json())
    keys = {f: n.secure_sum_keys(SecureSumKeysRequest("q-x")).key for f, n in nodes.items()}
    with pytest.raises(FedcrmError):
        nodes["firm2"].secure_sum_share(SecureSumShareRequest(query, {"firm1": keys["firm1"]}))
    assert _spent(configs[1]) == 0.0


def test_held_a_firm_without_a_public_size_declines_a_secure_query_at_the_offer(
    write_firm: Callable[..., Path],
) -> None:
    path = write_firm(make_customers(200), firm="nosize", extra={
        "budget": {"epsilon": 3.0, "delta": 1e-5}})
    prepare(load_firm_config(path))
    spec = QuerySpec.model_validate({**QUERY, "min_firms": 2})
    reply = _node(path).offer_query(QueryOffer("q-1", spec.canonical_json(), True))
    assert reply.state is ReplyState.DECLINED and "public_size" in reply.detail
    assert reply.public_size == 0 and _spent(path) == 0.0


def test_held_a_spec_swapped_between_offer_and_answer_is_checked_again(
    write_firm: Callable[..., Path],
) -> None:
    """Offer a cheap query, then ask for an answer to one over the firm's max_query_epsilon or
    grouped by a PII column: the answer step re-checks and declines, spending nothing."""
    path = write_firm(make_customers(300), firm="firm1", extra={
        "budget": {"epsilon": 5.0, "delta": 1e-5},
        "federation": {"public_size": 300, "max_query_epsilon": 1.0}})
    prepare(load_firm_config(path))
    node = _node(path)
    cheap = QuerySpec.model_validate({**QUERY, "min_firms": 1, "epsilon": 0.5})
    assert node.offer_query(QueryOffer("q-1", cheap.canonical_json(), False)
                            ).state is ReplyState.OK
    for swapped in (
        QuerySpec.model_validate({**QUERY, "min_firms": 1, "epsilon": 5.0}),
        QuerySpec.model_validate({**QUERY, "min_firms": 1,
                                  "group_by": {"column": "email", "keys": ["x"]}}),
    ):
        got = node.answer_query(QueryAnswerRequest("q-1", swapped.canonical_json(), False))
        assert got.state is ReplyState.DECLINED and got.values == ()
    assert _spent(path) == 0.0


def test_held_the_secure_range_never_depends_on_data_for_an_honest_public_size(
    write_firm: Callable[..., Path],
) -> None:
    """With customers <= public_size, every coordinate of the exact statistics lies within
    resolution x public_size, so the range check the firm makes at the share step is the only
    one that can fail."""
    configs = _firms(write_firm, [3.0])
    node = _node(configs[0])
    for query in ({"kind": "count"}, {"kind": "churn_rate"},
                  {"kind": "sum", "value": {"column": "monthly_charges", "lower": -50,
                                            "upper": 200}}):
        spec = QuerySpec.model_validate({**QUERY, "min_firms": 2, **query})
        plan = plan_answer(node.privacy, node.cfg, spec, query_id="q", secure=True)
        exact = firm_statistics(spec, node.store(), secure=True).vector()
        assert np.abs(exact).max() + NOISE_TAIL * plan.noise_std <= answer_bound(plan, 500)
