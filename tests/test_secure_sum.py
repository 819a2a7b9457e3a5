"""The secure sum (privacy/secure_sum.py), a firm's side of it (fedcrm/secure_sum_party.py: one
answer per step, its own key checks, its signed record) and its messages through Flower's records.

The protocol runs in-process here (the coordinator's state and each firm's party exchange the
same values the Flower messages carry); ``test_secure_aggregation_simulation`` runs it through
real Flower.
"""

from __future__ import annotations

import os
import re
import secrets
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from fedcrm.audit.log import AuditLog, EntryKind
from fedcrm.flower.records import from_records, to_records
from fedcrm.privacy import secure_sum as ss
from fedcrm.privacy.errors import (
    ConfigError,
    PeerKeyRefused,
    SecureSumError,
    SumAborted,
    ValueOutOfRange,
)
from fedcrm.privacy.keys import FirmKeys
from fedcrm.privacy.secure_sum import (
    FIELD_PRIME,
    AgreementKey,
    EphemeralKey,
    FixedPoint,
    Revealed,
    SumCoordinator,
    SumId,
    SumParty,
    SumSpec,
    lagrange_at_zero,
    shamir_combine,
    shamir_split,
    trusted_peer_keys,
)
from fedcrm.protocol import (
    SecureSumKeysReply,
    SecureSumKeysRequest,
    SecureSumMaskReply,
    SecureSumMaskRequest,
    SecureSumQuery,
    SecureSumShareRequest,
    SecureSumUnmaskReply,
    SecureSumUnmaskRequest,
    SumInput,
)
from fedcrm.secure_sum_party import SecureSumParty

ROOT = Path(__file__).resolve().parents[1]


def firm_keys(name: str) -> FirmKeys:
    return FirmKeys(
        firm=name, pseudonym_version=1, pseudonym_master=secrets.token_bytes(32),
        data_version=1, data_key=secrets.token_bytes(32),
        signing_key=Ed25519PrivateKey.generate(), agreement_key=X25519PrivateKey.generate(),
    )


class Federation:
    """n firms with keys, each trusting the others' signing keys; runs sums in-process."""

    def __init__(self, n: int) -> None:
        width = len(str(n))
        self.keys = {f"firm{i:0{width}d}": firm_keys(f"firm{i:0{width}d}") for i in range(n)}
        self.trusted: dict[str, Ed25519PublicKey] = {
            f: k.signing_key.public_key() for f, k in self.keys.items()  # type: ignore[union-attr]
        }
        self.directory = {f: AgreementKey.of(k) for f, k in self.keys.items()}

    @property
    def firms(self) -> tuple[str, ...]:
        return tuple(sorted(self.keys))

    def spec(self, *, length: int = 10, fp: FixedPoint | None = None, neighbours: int = 0,
             query: str = "q", firms: tuple[str, ...] | None = None) -> SumSpec:
        return SumSpec(SumId("run-1", 1, query), firms or self.firms, length,
                       fp or FixedPoint(-10.0, 10.0, 2**20), neighbours)

    def run(
        self, spec: SumSpec, values: Mapping[str, np.ndarray], *,
        drop_before_share: set[str] = frozenset(),  # type: ignore[assignment]
        drop_before_mask: set[str] = frozenset(),  # type: ignore[assignment]
        drop_before_unmask: set[str] = frozenset(),  # type: ignore[assignment]
    ) -> tuple[ss.SumResult, SumCoordinator]:
        coordinator = SumCoordinator(spec)
        parties = {f: SumParty(self.keys[f], spec) for f in spec.parties}
        for f, party in parties.items():
            if f not in drop_before_share:
                peers = trusted_peer_keys(self.directory, self.trusted, party.neighbours)
                coordinator.receive_shares(f, party.share(peers))
        for f in coordinator.shared:
            if f not in drop_before_mask:
                ephemerals = {v: e.verify(spec.sum_id, self.trusted[v])
                              for v, e in coordinator.ephemerals_for(f).items()}
                coordinator.receive_masked(
                    f, parties[f].mask(values[f], ephemerals, coordinator.shared)
                )
        for f in coordinator.survivors:
            if f not in drop_before_unmask:
                peers = trusted_peer_keys(self.directory, self.trusted, parties[f].neighbours)
                coordinator.receive_revealed(f, parties[f].unmask(
                    coordinator.survivors, coordinator.shared, coordinator.ciphertexts_for(f),
                    peers,
                ))
        return coordinator.finish(), coordinator


def random_values(fed: Federation, length: int, *, seed: int = 0, bound: float = 10.0
                  ) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)  # test data only; no mask, seed or share comes from here
    return {f: rng.uniform(-bound, bound, length) for f in fed.firms}


# ------------------------------------------------------------------------------ Shamir


@settings(max_examples=40, deadline=None)
@given(
    secret=st.integers(min_value=0, max_value=FIELD_PRIME - 1),
    n=st.integers(min_value=1, max_value=12),
    data=st.data(),
)
def test_any_threshold_many_shares_recover_the_secret(secret: int, n: int, data) -> None:
    t = data.draw(st.integers(min_value=1, max_value=n))
    xs = list(range(1, n + 1))
    shares = shamir_split(secret, threshold=t, xs=xs)
    subset = data.draw(st.permutations(range(n)))[:t]
    assert shamir_combine([xs[i] for i in subset], [shares[i] for i in subset]) == secret


def test_lagrange_weights_match_a_direct_vandermonde_solve() -> None:
    # Reference: solve V c = y for the polynomial's coefficients with sympy, mod p.
    import sympy

    xs, coefficients = [3, 7, 11, 20], [secrets.randbelow(FIELD_PRIME) for _ in range(4)]
    ys = [sum(c * x**k for k, c in enumerate(coefficients)) % FIELD_PRIME for x in xs]
    vandermonde = sympy.Matrix([[x**k for k in range(4)] for x in xs])
    solved = (vandermonde.inv_mod(FIELD_PRIME) * sympy.Matrix(ys)).applyfunc(
        lambda v: v % FIELD_PRIME
    )
    assert int(solved[0]) == coefficients[0]
    weights = lagrange_at_zero(xs)
    assert sum(w * y for w, y in zip(weights, ys, strict=True)) % FIELD_PRIME == coefficients[0]


def test_fewer_than_threshold_shares_look_the_same_whatever_the_secret() -> None:
    # t - 1 shares of the secret 0 and of the secret p - 1 are both uniform field elements:
    # two-sample KS on each of the first two shares (t = 3) over 1500 splits.
    t, xs = 3, [1, 2, 3, 4]
    for position in (0, 1):
        a = [shamir_split(0, threshold=t, xs=xs)[position] / FIELD_PRIME for _ in range(1500)]
        b = [shamir_split(FIELD_PRIME - 1, threshold=t, xs=xs)[position] / FIELD_PRIME
             for _ in range(1500)]
        assert stats.ks_2samp(a, b).pvalue > 1e-4
        assert stats.kstest(a, "uniform").pvalue > 1e-4


def test_shamir_refuses_bad_thresholds_and_repeated_points() -> None:
    with pytest.raises(ConfigError):
        shamir_split(1, threshold=0, xs=[1, 2])
    with pytest.raises(ConfigError):
        shamir_split(1, threshold=3, xs=[1, 2])
    with pytest.raises(ConfigError):
        lagrange_at_zero([1, 1, 2])
    with pytest.raises(ConfigError):
        shamir_split(FIELD_PRIME, threshold=1, xs=[1])


# ------------------------------------------------------------------------------ fixed point


def test_out_of_range_or_nan_values_are_errors_never_clipped() -> None:
    fp = FixedPoint(-1.0, 1.0, 1000)
    assert list(fp.encode(np.array([-1.0, 0.0, 1.0]))) == [0, 1000, 2000]
    for bad in ([1.0001], [-2.0], [float("nan")], [float("inf")]):
        with pytest.raises(ValueOutOfRange) as info:
            fp.encode(np.array([0.5, *bad]))
        assert "position 1" in str(info.value) and "never clipped" in str(info.value)
        assert "1.0001" not in str(info.value)  # no value in the message


def test_a_sum_that_could_overflow_is_refused_and_one_at_capacity_is_exact() -> None:
    fp = FixedPoint(0.0, 1.0, 2**52)  # levels 2^52: at most 4095 parties below 2^64
    assert fp.capacity() == (2**64 - 1) // 2**52
    with pytest.raises(ConfigError, match="overflow"):
        fp.check_capacity(fp.capacity() + 1)
    fp.check_capacity(fp.capacity())
    # every party at the top of the range: the total modulo 2^64 is the true total
    encoded = fp.encode(np.ones(3))
    total = np.zeros(3, dtype=np.uint64)
    for _ in range(fp.capacity()):
        total += encoded
    assert int(total[0]) == fp.capacity() * 2**52 < 2**64
    too_many = tuple(sorted(f"f{i:05d}" for i in range(fp.capacity() + 1)))
    with pytest.raises(ConfigError, match="overflow"):
        SumSpec(SumId("r", 1, "q"), too_many, 1, fp)
    with pytest.raises(ConfigError, match="2\\^53"):
        FixedPoint(0.0, 2.0**31, 2**32)


# ------------------------------------------------------------------------------ the sum


def test_the_sum_is_exact() -> None:
    fed = Federation(5)
    # integers (scale 1): the decoded sum equals the integer sum exactly
    spec = fed.spec(length=50, fp=FixedPoint(-1000.0, 1000.0, 1))
    rng = np.random.default_rng(1)
    values = {f: rng.integers(-1000, 1001, 50).astype(float) for f in fed.firms}
    result, _ = fed.run(spec, values)
    assert np.array_equal(result.values, sum(values.values()))
    # floats: the total is exactly the sum of the fixed-point encodings
    spec = fed.spec(length=50, query="floats")
    values = random_values(fed, 50)
    result, _ = fed.run(spec, values)
    encoded = sum((spec.fixed_point.encode(v) for v in values.values()),
                  np.zeros(50, dtype=np.uint64))
    assert np.array_equal(result.total, encoded)
    assert np.abs(result.values - sum(values.values())).max() <= 5 * 0.5 / 2**20 + 1e-9
    assert result.survivors == fed.firms and result.dropped == ()


def test_one_of_five_dropping_mid_protocol_gives_the_exact_sum_of_the_survivors() -> None:
    fed = Federation(5)
    spec = fed.spec(length=20, fp=FixedPoint(-100.0, 100.0, 1))
    rng = np.random.default_rng(2)
    values = {f: rng.integers(-100, 101, 20).astype(float) for f in fed.firms}
    # firm2 shared its seeds, then dropped before sending its masked vector
    result, _ = fed.run(spec, values, drop_before_mask={"firm2"})
    assert result.dropped == ("firm2",)
    assert np.array_equal(result.values, sum(values[f] for f in fed.firms if f != "firm2"))


def test_twenty_percent_of_100_firms_dropping_mid_protocol_gives_the_exact_survivor_sum() -> None:
    fed = Federation(100)
    spec = fed.spec(length=30, fp=FixedPoint(-50.0, 50.0, 1), neighbours=20)
    rng = np.random.default_rng(3)
    values = {f: rng.integers(-50, 51, 30).astype(float) for f in fed.firms}
    firms = list(fed.firms)
    # 20 firms drop at different points: 7 before sharing, 7 after sharing, 6 after masking
    early, middle, late = set(firms[0:70:10]), set(firms[3:73:10]), set(firms[6:66:10])
    result, _ = fed.run(spec, values, drop_before_share=early, drop_before_mask=middle,
                        drop_before_unmask=late)
    survivors = [f for f in firms if f not in early | middle]
    assert list(result.survivors) == survivors  # late droppers' vectors count
    assert set(result.dropped) == middle
    assert np.array_equal(result.values, sum(values[f] for f in survivors))


def test_a_firm_that_drops_before_revealing_anything_is_excluded_cleanly() -> None:
    fed = Federation(4)
    spec = fed.spec(length=8, fp=FixedPoint(-5.0, 5.0, 1))
    rng = np.random.default_rng(4)
    values = {f: rng.integers(-5, 6, 8).astype(float) for f in fed.firms}
    result, coordinator = fed.run(spec, values, drop_before_share={"firm0"})
    assert "firm0" not in coordinator.shared and result.dropped == ()
    # nobody masked with it and nothing of it is recovered: no share of it was ever sent
    assert all("firm0" not in coordinator.ephemerals_for(f) for f in coordinator.shared)
    for revealed in coordinator.revealed.values():
        assert "firm0" not in revealed.mask_shares and "firm0" not in revealed.key_shares
    assert np.array_equal(result.values, sum(values[f] for f in fed.firms if f != "firm0"))


def test_recovery_is_only_for_firms_that_dropped() -> None:
    fed = Federation(6)
    spec = fed.spec(length=4)
    result, coordinator = fed.run(spec, random_values(fed, 4), drop_before_mask={"firm3"})
    for revealed in coordinator.revealed.values():
        # key seeds (which remove pair masks) only of the dropped firm; mask seeds only of
        # survivors: the coordinator never holds both for one firm
        assert set(revealed.key_shares) <= {"firm3"}
        assert "firm3" not in revealed.mask_shares
    assert result.dropped == ("firm3",)


def test_too_many_dropouts_abort_the_sum_without_revealing_an_input() -> None:
    fed = Federation(5)
    spec = fed.spec(length=4)
    with pytest.raises(SumAborted):
        fed.run(spec, random_values(fed, 4), drop_before_unmask={"firm0", "firm1", "firm2"})
    # and a firm refuses to unmask a 'sum' of fewer than two firms
    with pytest.raises(SumAborted):
        fed.run(spec, random_values(fed, 4),
                drop_before_mask={"firm0", "firm1", "firm2", "firm3"})


def test_k_regular_graph_is_symmetric_with_the_declared_degree() -> None:
    fed = Federation(30)
    spec = fed.spec(neighbours=6)
    for firm, peers in spec.graph.items():
        assert len(peers) == 6 and firm not in peers
        assert all(firm in spec.graph[p] for p in peers)
        assert spec.threshold(firm) == 4
    assert all(len(p) == 29 for p in fed.spec(neighbours=0).graph.values())


# ------------------------------------------------------------------------------ keys


def test_a_tampered_substituted_or_unsigned_peer_key_is_refused() -> None:
    fed = Federation(3)
    good = fed.directory["firm1"]
    tampered = AgreementKey("firm1", bytes([good.public_key[0] ^ 1]) + good.public_key[1:],
                            good.signature)
    mallory = firm_keys("firm1")  # the coordinator's own key under firm1's name
    substituted = AgreementKey.of(mallory)
    unsigned = AgreementKey("firm1", good.public_key, bytes(64))
    for bad in (tampered, substituted, unsigned):
        with pytest.raises(PeerKeyRefused, match="firm1"):
            trusted_peer_keys({**fed.directory, "firm1": bad}, fed.trusted, ["firm1"])
    with pytest.raises(PeerKeyRefused, match="peer_keys_dir"):
        trusted_peer_keys(fed.directory, {"firm0": fed.trusted["firm0"]}, ["firm1"])
    with pytest.raises(PeerKeyRefused, match="no signed"):
        trusted_peer_keys({}, fed.trusted, ["firm1"])


def test_a_tampered_per_sum_key_is_refused() -> None:
    fed = Federation(3)
    spec = fed.spec()
    party = SumParty(fed.keys["firm1"], spec)
    out = party.share(trusted_peer_keys(fed.directory, fed.trusted, party.neighbours))
    e = out.ephemeral
    e.verify(spec.sum_id, fed.trusted["firm1"])
    for bad in (
        EphemeralKey("firm1", bytes(32), e.commitment, e.signature),
        EphemeralKey("firm1", e.public_key, bytes(32), e.signature),
    ):
        with pytest.raises(PeerKeyRefused):
            bad.verify(spec.sum_id, fed.trusted["firm1"])
    with pytest.raises(PeerKeyRefused):  # the same key replayed into another sum
        e.verify(SumId("run-1", 2, "q"), fed.trusted["firm1"])


# ---------------------------------------------------------------------- the coordinator's view


def test_a_single_firms_masked_vector_is_indistinguishable_from_uniform() -> None:
    """Everything the coordinator holds of one firm before unmasking - its masked vector - is
    uniform modulo 2^64 whatever the input: the all-lowest and all-highest inputs give masked
    values that pass a chi-square test of uniformity (top byte) and cannot be told apart
    (two-sample Kolmogorov-Smirnov), over 80 sums of 100 values."""
    fed = Federation(3)
    fp = FixedPoint(0.0, 1.0, 2**16)
    samples: dict[float, list[np.ndarray]] = {0.0: [], 1.0: []}
    for i in range(80):
        for level in samples:
            spec = fed.spec(length=100, fp=fp, query=f"q{i}-{level}")
            coordinator = SumCoordinator(spec)
            parties = {f: SumParty(fed.keys[f], spec) for f in spec.parties}
            for f, p in parties.items():
                coordinator.receive_shares(
                    f, p.share(trusted_peer_keys(fed.directory, fed.trusted, p.neighbours))
                )
            eph = {v: e.verify(spec.sum_id, fed.trusted[v])
                   for v, e in coordinator.ephemerals_for("firm0").items()}
            masked = parties["firm0"].mask(np.full(100, level), eph, coordinator.shared)
            samples[level].append(masked)
    low = np.concatenate(samples[0.0])
    high = np.concatenate(samples[1.0])
    for data in (low, high):
        top = (data >> np.uint64(56)).astype(np.int64)
        counts = np.bincount(top, minlength=256)
        assert stats.chisquare(counts).pvalue > 1e-4
        # and the low bits, where the encoded input lives
        bottom = (data & np.uint64(0xFF)).astype(np.int64)
        assert stats.chisquare(np.bincount(bottom, minlength=256)).pvalue > 1e-4
    as_unit = lambda a: a.astype(np.float64) / 2.0**64  # noqa: E731
    assert stats.kstest(as_unit(low), "uniform").pvalue > 1e-4
    assert stats.ks_2samp(as_unit(low), as_unit(high)).pvalue > 1e-4


# ------------------------------------------------------------------------------ randomness


def _code_without_docs(path: Path) -> str:
    """The module's code as Python sees it: no comments, no docstrings."""
    import ast

    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):  # docstrings: bare string statements anywhere
        body = getattr(node, "body", None)
        if isinstance(body, list):
            body[:] = [b for b in body if not (isinstance(b, ast.Expr)
                                               and isinstance(b.value, ast.Constant))]
    return ast.unparse(tree)


MODULES = [ROOT / "privacy" / "secure_sum.py", ROOT / "fedcrm" / "secure_sum_party.py",
           ROOT / "server" / "secure_sum.py"]


def test_no_mask_seed_or_share_uses_non_cryptographic_randomness(monkeypatch) -> None:
    banned = re.compile(
        r"^\s*(import random|from random)|np\.random|numpy\.random|RandomState|default_rng"
        r"|\btorch\b|manual_seed|random\.seed",
        re.MULTILINE,
    )
    for path in MODULES:
        code = _code_without_docs(path)
        assert not banned.search(code), f"{path.name}: {banned.search(code)}"
    # The generators: masks are ChaCha20's keystream (checked against cryptography directly),
    # Shamir coefficients come from `secrets`, AES-GCM nonces from os.urandom.
    key = secrets.token_bytes(32)
    stream = Cipher(algorithms.ChaCha20(key, bytes(16)), mode=None).encryptor().update(bytes(80))
    assert np.array_equal(ss.mask_stream(key, 10), np.frombuffer(stream, dtype="<u8"))
    assert ss.secrets is secrets and ss.os is os
    calls = {"randbelow": 0, "urandom": 0}
    real_randbelow, real_urandom = secrets.randbelow, os.urandom

    def counting_randbelow(n: int) -> int:
        calls["randbelow"] += 1
        return real_randbelow(n)

    def counting_urandom(n: int) -> bytes:
        calls["urandom"] += 1
        return real_urandom(n)

    monkeypatch.setattr(ss.secrets, "randbelow", counting_randbelow)
    monkeypatch.setattr(ss.os, "urandom", counting_urandom)
    fed = Federation(5)
    spec = fed.spec()
    party = SumParty(fed.keys["firm0"], spec)
    party.share(trusted_peer_keys(fed.directory, fed.trusted, party.neighbours))
    t, k = party.threshold, len(party.neighbours)
    assert calls == {"randbelow": 2 * (t - 1), "urandom": k}  # two seeds, one nonce per peer


# ------------------------------------------------------------------------------ a firm's side


def _parties(fed: Federation, tmp_path: Path) -> dict[str, SecureSumParty]:
    return {
        f: SecureSumParty(
            k, trusted=lambda: fed.trusted,
            audit=AuditLog(tmp_path / f / "audit.jsonl", signing_key=k.signing_key),
            state_dir=tmp_path / f,
        )
        for f, k in fed.keys.items()
    }


def _through_flower(message):  # encode -> Flower RecordDict -> decode, as on the wire
    return type(message).decode(from_records(to_records(message.encode())))


def _run(fed: Federation, parties: dict[str, SecureSumParty], query: SecureSumQuery,
         values: dict[str, np.ndarray], drop: set[str] = frozenset()):  # type: ignore[assignment]
    spec = query.spec
    state = SumCoordinator(spec)
    requests = {}
    for f in spec.parties:
        if f in drop:
            continue
        request = _through_flower(SecureSumShareRequest(
            query, {v: fed.directory[v] for v in spec.neighbours_of(f)}
        ))
        reply = _through_flower(parties[f].share(request))
        state.receive_shares(f, reply.shares)
    for f in state.shared:
        requests[f] = _through_flower(
            SecureSumMaskRequest(query, state.shared, state.ephemerals_for(f))
        )
        reply = _through_flower(parties[f].mask(requests[f], values[f]))
        state.receive_masked(f, reply.masked)
    for f in state.survivors:
        request = _through_flower(SecureSumUnmaskRequest(
            query, state.shared, state.survivors, state.ciphertexts_for(f)
        ))
        state.receive_revealed(f, _through_flower(parties[f].unmask(request)).revealed)
    return state.finish(), requests


def _query(fed: Federation, query: str = "q") -> SecureSumQuery:
    spec = SumSpec(SumId("run-7", 3, query), fed.firms, 6, FixedPoint(-1.0, 1.0, 2**16))
    return SecureSumQuery(spec, SumInput.TRAINING_UPDATE, weight_norm=100)


def test_the_sum_runs_through_flower_records_and_each_masked_input_is_signed(
    tmp_path: Path,
) -> None:
    fed = Federation(4)
    parties = _parties(fed, tmp_path)
    rng = np.random.default_rng(0)
    values = {f: rng.uniform(-1, 1, 6) for f in fed.firms}
    result, _ = _run(fed, parties, _query(fed), values, drop={"firm3"})
    assert np.allclose(result.values, sum(values[f] for f in ("firm0", "firm1", "firm2")),
                       atol=3 * 2**-16)
    entries = [e for e in AuditLog(tmp_path / "firm0" / "audit.jsonl",
                                   signing_key=fed.keys["firm0"].signing_key).entries()
               if e.kind is EntryKind.SECURE_SUM]
    steps = {e.payload["step"]: e.payload for e in entries}
    assert set(steps) == {"mask", "unmask"}
    mask = steps["mask"]
    assert (mask["query"], mask["round"], mask["length"], mask["range"]) == ("q", 3, 6, [-1.0, 1.0])
    assert mask["peers"] == ["firm1", "firm2"] and mask["spec_hash"] == _query(fed).spec.digest()
    assert steps["unmask"]["mask_shares_for"] == ["firm1", "firm2"]


def test_each_step_is_answered_once_even_after_a_restart(tmp_path: Path) -> None:
    fed = Federation(3)
    parties = _parties(fed, tmp_path)
    rng = np.random.default_rng(1)
    values = {f: rng.uniform(-1, 1, 6) for f in fed.firms}
    query = _query(fed)
    _, requests = _run(fed, parties, query, values)
    restarted = _parties(fed, tmp_path)["firm0"]  # a new process, same state folder
    with pytest.raises(SecureSumError, match="already answered the mask step"):
        restarted.mask(requests["firm0"], values["firm0"] * 0)  # a second input, same masks
    with pytest.raises(SecureSumError, match="already answered the share step"):
        restarted.share(SecureSumShareRequest(
            query, {v: fed.directory[v] for v in query.spec.neighbours_of("firm0")}
        ))


def test_a_firm_holds_the_coordinator_to_one_spec_and_one_list_of_firms(tmp_path: Path) -> None:
    fed = Federation(4)
    parties = _parties(fed, tmp_path)
    query = _query(fed)
    spec = query.spec
    state = SumCoordinator(spec)
    for f in spec.parties:
        state.receive_shares(f, parties[f].share(SecureSumShareRequest(
            query, {v: fed.directory[v] for v in spec.neighbours_of(f)}
        )).shares)
    # masking without having shared for this spec (another length) is refused
    other = SecureSumQuery(SumSpec(spec.sum_id, spec.parties, 7, spec.fixed_point),
                           query.source, query.weight_norm)
    with pytest.raises(SecureSumError, match="changed the sum's spec"):
        parties["firm0"].mask(SecureSumMaskRequest(other, state.shared,
                                                   state.ephemerals_for("firm0")), np.zeros(7))
    for f in spec.parties:
        state.receive_masked(f, parties[f].mask(
            SecureSumMaskRequest(query, state.shared, state.ephemerals_for(f)), np.zeros(6)
        ).masked)
    # unmask with a different list of firms that shared: refused, nothing revealed
    fewer = tuple(f for f in state.shared if f != "firm3")
    with pytest.raises(SecureSumError, match="differs"):
        parties["firm0"].unmask(SecureSumUnmaskRequest(
            query, fewer, fewer, {u: c for u, c in state.ciphertexts_for("firm0").items()
                                  if u != "firm3"}
        ))


def test_a_per_sum_key_signed_by_another_firm_is_refused_at_the_mask_step(
    tmp_path: Path,
) -> None:
    fed = Federation(3)
    parties = _parties(fed, tmp_path)
    query = _query(fed)
    state = SumCoordinator(query.spec)
    for f in query.spec.parties:
        state.receive_shares(f, parties[f].share(SecureSumShareRequest(
            query, {v: fed.directory[v] for v in query.spec.neighbours_of(f)}
        )).shares)
    ephemerals = dict(state.ephemerals_for("firm0"))
    ephemerals["firm1"] = ephemerals["firm2"].__class__(
        "firm1", ephemerals["firm2"].public_key, ephemerals["firm2"].commitment,
        ephemerals["firm2"].signature,
    )
    with pytest.raises(PeerKeyRefused, match="firm1"):
        parties["firm0"].mask(SecureSumMaskRequest(query, state.shared, ephemerals), np.zeros(6))


def test_secure_sum_messages_survive_flower_records() -> None:
    fed = Federation(3)
    reply = SecureSumKeysReply(fed.directory["firm1"])
    assert _through_flower(reply) == reply
    assert _through_flower(SecureSumKeysRequest("run-1")).run_id == "run-1"
    query = _query(fed)
    decoded = _through_flower(SecureSumShareRequest(query, dict(fed.directory)))
    assert decoded.query == query and decoded.peer_keys == fed.directory
    masked = SecureSumMaskReply("firm0", np.arange(6, dtype=np.uint64))
    assert np.array_equal(_through_flower(masked).masked, masked.masked)
    only_keys = SecureSumUnmaskReply("firm0", Revealed({}, {"firm2": 5}))
    decoded_reply = _through_flower(only_keys)
    assert decoded_reply.revealed.key_shares == {"firm2": 5}
    assert decoded_reply.revealed.mask_shares == {}


# ------------------------------------------------------------------------------ keys and config


def test_the_secure_sum_key_is_a_0600_file_of_the_firms_key_directory(tmp_path: Path) -> None:
    from fedcrm.privacy.errors import KeyFileError
    from fedcrm.privacy.keys import add_agreement_key, init_keys, load_keys

    keys = init_keys(tmp_path / "k", firm="acme")
    assert (tmp_path / "k" / "agreement.key").stat().st_mode & 0o777 == 0o600
    assert load_keys(tmp_path / "k").agreement_public_key() == keys.agreement_public_key()
    with pytest.raises(KeyFileError, match="already exists"):
        add_agreement_key(tmp_path / "k")
    (tmp_path / "k" / "agreement.key").unlink()
    without = load_keys(tmp_path / "k")
    with pytest.raises(KeyFileError, match="fedcrm keys agreement"):
        without.agreement_public_key()
    assert add_agreement_key(tmp_path / "k") == load_keys(tmp_path / "k").agreement_public_key()


def test_every_secure_sum_key_use_is_domain_separated() -> None:
    from fedcrm.privacy.keys import SecureSumKey, derive_secure_sum_key

    secret = secrets.token_bytes(32)
    derived = {derive_secure_sum_key(secret, use=use, context=b"[run,1,q]/a/b")
               for use in SecureSumKey}
    assert len(derived) == len(SecureSumKey)
    assert derive_secure_sum_key(secret, use=SecureSumKey.SHARE, context=b"[run,1,q]/a/b") != (
        derive_secure_sum_key(secret, use=SecureSumKey.SHARE, context=b"[run,1,q]/b/a")
    )


@pytest.mark.parametrize("strategy", ["fedmedian", "trimmed_mean", "krum", "fedadam"])
def test_strategies_that_need_each_update_are_refused_with_secure_aggregation(
    strategy: str,
) -> None:
    from fedcrm.coordinator.run_config import parse_run_config

    with pytest.raises(ConfigError, match="secure_aggregation") as info:
        parse_run_config({"strategy": strategy, "secure_aggregation": True, "min_firms": 5},
                         where="run.toml")
    assert "fedavg" in str(info.value)
    for ok in ("fedavg", "fedprox"):
        cfg = parse_run_config({"task": "trend", "strategy": ok, "secure_aggregation": True},
                               where="run.toml")
        assert cfg.run_spec("r").secure_aggregation
