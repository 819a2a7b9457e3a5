"""DP noise from cryptographically secure generators: ChaCha20 keystream, transforms, discrete
Gaussian (OpenDP), and no Mersenne Twister / global RNG left in the production noise path."""

from __future__ import annotations

import inspect
import math
import mmap
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

import fedcrm.learning.dp_engine as engine
from fedcrm.privacy import noise
from fedcrm.privacy.noise import SecureRandom, discrete_gaussian, gaussian

ROOT = Path(__file__).resolve().parents[1]
N = 200_000

# Fixed keys keep the statistical tests deterministic; the tolerances are what a correct transform
# meets with overwhelming probability for ANY key (about 5 standard errors).
KEY_A = bytes(range(32))
KEY_B = bytes(range(1, 33))


def test_keystream_is_chacha20_per_rfc_8439() -> None:
    """RFC 7539/8439 Appendix A.1 test vectors #1 and #2: all-zero key and nonce, blocks 0 and 1."""
    stream = SecureRandom(key=bytes(32)).random_bytes(128)
    assert stream[:64].hex() == (
        "76b8e0ada0f13d90405d6ae55386bd28bdd219b8a08ded1aa836efcc8b770dc7"
        "da41597c5157488d7724e03fb8d84a376a43b8f41518a11cc387b669b2ee6586"
    )
    assert stream[64:].hex() == (
        "9f07e7be5551387a98ba977c732d080dcb0f29a048e3656912c6533e32ee7aed"
        "29b721769ce64e43d57133b074d839d531ed1f28510afb45ace10a1f4b794d6f"
    )


@settings(max_examples=30, deadline=None)
@given(a=st.integers(0, 300), b=st.integers(0, 300))
def test_keystream_is_one_contiguous_stream_however_it_is_cut(a: int, b: int) -> None:
    cut = SecureRandom(key=KEY_A)
    whole = SecureRandom(key=KEY_A).random_bytes(a + b)
    assert cut.random_bytes(a) + cut.random_bytes(b) == whole


def test_injected_key_reproduces_and_different_keys_differ() -> None:
    again = SecureRandom(key=KEY_A).normal(1000)
    assert np.array_equal(SecureRandom(key=KEY_A).normal(1000), again)
    assert not np.array_equal(SecureRandom(key=KEY_A).normal(1000),
                              SecureRandom(key=KEY_B).normal(1000))


def test_two_fresh_sources_produce_different_streams() -> None:
    streams = {SecureRandom().random_bytes(32) for _ in range(20)}
    assert len(streams) == 20
    a, b = SecureRandom(), SecureRandom()
    assert not np.array_equal(a.normal(100), b.normal(100))


def test_consecutive_draws_of_one_source_differ() -> None:
    rng = SecureRandom(key=KEY_A)
    assert not np.array_equal(rng.normal(50), rng.normal(50))


@pytest.mark.parametrize("key", [b"short", bytes(31), bytes(33), "0" * 32])
def test_bad_keys_are_refused(key: object) -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        SecureRandom(key=key)  # type: ignore[arg-type]


def test_key_never_shows_and_source_is_never_pickled() -> None:
    rng = SecureRandom(key=KEY_A)
    assert KEY_A.hex() not in repr(rng) and "hidden" in repr(rng)
    with pytest.raises(TypeError, match="never pickled"):
        pickle.dumps(rng)


def test_a_source_refuses_to_draw_after_a_fork(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    rng = SecureRandom()
    real = os.getpid()
    monkeypatch.setattr(noise.os, "getpid", lambda: real + 1)
    with pytest.raises(RuntimeError, match="fork"):
        rng.normal(3)


def test_a_source_refuses_to_run_past_its_stream(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = SecureRandom()
    monkeypatch.setattr(noise, "_MAX_STREAM_BYTES", 100)
    rng.random_bytes(96)
    with pytest.raises(RuntimeError, match="used up"):
        rng.random_bytes(8)


# -- uniform bits ---------------------------------------------------------------------------------


def test_keystream_bytes_are_uniform() -> None:
    data = np.frombuffer(SecureRandom(key=KEY_A).random_bytes(2**20), dtype=np.uint8)
    counts = np.bincount(data, minlength=256)
    assert stats.chisquare(counts).pvalue > 1e-4


def test_uniforms_fill_53_bits_each_half_the_time() -> None:
    u = SecureRandom(key=KEY_A).uniform(N)
    assert u.min() >= 0.0 and u.max() < 1.0
    ints = u * 2.0**53
    assert np.array_equal(ints, np.floor(ints))  # multiples of 2**-53
    words = ints.astype(np.uint64)
    bits = (words[:, None] >> np.arange(53, dtype=np.uint64)) & np.uint64(1)
    freq = bits.mean(0)
    assert np.abs(freq - 0.5).max() < 5 * 0.5 / math.sqrt(N)  # every bit, including the lowest
    assert stats.kstest(u, "uniform").pvalue > 1e-4


# -- continuous variates --------------------------------------------------------------------------


def test_normal_mean_variance_and_shape() -> None:
    z = SecureRandom(key=KEY_A).normal(N)
    assert z.shape == (N,) and z.dtype == np.float64
    assert abs(z.mean()) < 5 / math.sqrt(N)
    assert abs(z.var() - 1.0) < 5 * math.sqrt(2 / N)
    assert abs(stats.skew(z)) < 5 * math.sqrt(6 / N)
    assert abs(stats.kurtosis(z)) < 5 * math.sqrt(24 / N)
    # the two Box–Muller halves are independent of each other
    assert abs(np.corrcoef(z[: N // 2], z[N // 2 :])[0, 1]) < 5 / math.sqrt(N // 2)


def test_normal_passes_a_ks_test_that_a_five_percent_scale_error_fails() -> None:
    z = SecureRandom(key=KEY_B).normal(N)
    assert stats.kstest(z, "norm").pvalue > 1e-4
    assert stats.kstest(1.05 * z, "norm").pvalue < 1e-6  # the test has the power to fail


def test_single_precision_normals_follow_the_float64_transform() -> None:
    """float32 output (DP-SGD's): same keystream, same draws up to the float32 angle rounding."""
    single = SecureRandom(key=KEY_A).normal(N + 1, single=True)
    double = SecureRandom(key=KEY_A).normal(N + 1)
    assert single.dtype == np.float32 and single.shape == (N + 1,)
    assert float(np.abs(single - double).max()) < 3e-6
    assert abs(single.var() - 1.0) < 5 * math.sqrt(2 / N)
    assert stats.kstest(single, "norm").pvalue > 1e-4


@settings(max_examples=40, deadline=None)
@given(n=st.integers(0, 257), single=st.booleans())
def test_normal_returns_exactly_n_finite_values(n: int, single: bool) -> None:
    z = SecureRandom(key=KEY_A).normal(n, single=single)
    assert z.shape == (n,) and np.isfinite(z).all()
    assert z.dtype == (np.float32 if single else np.float64)


def test_exponential_matches_exp_1() -> None:
    e = SecureRandom(key=KEY_A).exponential(N)
    assert e.min() >= 0.0
    assert abs(e.mean() - 1.0) < 5 / math.sqrt(N)
    assert abs(e.var() - 1.0) < 5 * math.sqrt(8 / N)  # Var of the sample variance of Exp(1)
    assert stats.kstest(e, "expon").pvalue > 1e-4


def test_float_gaussian_has_the_requested_scale() -> None:
    x = gaussian(N, 3.0, rng=SecureRandom(key=KEY_A))
    assert abs(x.std() - 3.0) < 5 * 3.0 / math.sqrt(2 * N)
    assert stats.kstest(x / 3.0, "norm").pvalue > 1e-4


def test_bernoulli_success_rate_of_the_geometric_gap_sampler() -> None:
    source = engine.SecureNoise(SecureRandom(key=KEY_A))
    length, q = 2_000_000, 0.03
    pos = engine._bernoulli_successes(length, q, source)
    assert torch.all(pos[1:] > pos[:-1]) and int(pos.min()) >= 0 and int(pos.max()) < length
    sd = math.sqrt(length * q * (1 - q))
    assert abs(pos.numel() - length * q) < 5 * sd
    # inclusion is uniform along the sequence: successes per tenth of it
    per_tenth = torch.bincount(pos // (length // 10), minlength=10).double()
    expected = length / 10 * q
    assert float((per_tenth - expected).abs().max()) < 5 * math.sqrt(expected)


def test_poisson_batches_from_the_secure_source_include_each_example_at_the_rate() -> None:
    n, rate, steps = 300, 0.1, 1500
    counts = torch.zeros(n)
    for idx in engine.poisson_batches(n, rate, steps, engine.noise_generator()):
        counts[idx] += 1
    per_example = counts / steps
    assert float(per_example.mean()) == pytest.approx(rate, abs=5 * math.sqrt(rate / (n * steps)))
    assert float((per_example - rate).abs().max()) < 5 * math.sqrt(rate * (1 - rate) / steps)


# -- discrete Gaussian (OpenDP) -------------------------------------------------------------------


def discrete_gaussian_pmf(sigma: float) -> tuple[np.ndarray, np.ndarray]:
    """Independent reference: the pmf of N_Z(0, σ²) by direct summation over ±(12σ + 10)."""
    support = np.arange(-int(12 * sigma) - 10, int(12 * sigma) + 11)
    weights = np.exp(-(support.astype(np.float64) ** 2) / (2 * sigma**2))
    return support, weights / weights.sum()


@pytest.mark.parametrize("sigma", [0.5, 2.0, 10.0])
def test_discrete_gaussian_is_integer_centred_with_the_right_variance_and_pmf(sigma: float) -> None:
    n = 60_000
    x = discrete_gaussian(n, sigma)
    assert x.dtype == np.int64 and x.shape == (n,)
    support, pmf = discrete_gaussian_pmf(sigma)
    variance = float((pmf * support**2).sum())
    assert variance <= sigma**2 * (1 + 1e-12)  # never above σ²
    if sigma >= 2:
        assert variance == pytest.approx(sigma**2, rel=1e-6)
    else:
        assert variance == pytest.approx(0.2150, abs=1e-4)  # well below σ² = 0.25
    assert abs(x.mean()) < 5 * math.sqrt(variance / n)
    fourth = float((pmf * support**4).sum())
    assert abs(x.var() - variance) < 5 * math.sqrt((fourth - variance**2) / n)
    # symmetric: as many positive as negative draws
    pos, neg = int((x > 0).sum()), int((x < 0).sum())
    assert stats.binomtest(pos, pos + neg, 0.5).pvalue > 1e-4
    # the whole pmf (cells with expected count ≥ 5, tails pooled)
    keep = pmf * n >= 5
    lo, hi = support[keep][0], support[keep][-1]
    observed = np.bincount(np.clip(x, lo, hi) - lo, minlength=hi - lo + 1)
    expected = pmf[keep].copy()
    expected[0] += pmf[support < lo].sum()
    expected[-1] += pmf[support > hi].sum()
    assert stats.chisquare(observed, expected * n).pvalue > 1e-4


def test_discrete_gaussian_fresh_draws_differ() -> None:
    assert not np.array_equal(discrete_gaussian(400, 5.0), discrete_gaussian(400, 5.0))


@pytest.mark.parametrize("size, sigma", [(-1, 1.0), (3, 0.0), (3, -2.0), (3, float("nan")),
                                          (3, float("inf"))])
def test_noise_arguments_are_checked(size: int, sigma: float) -> None:
    with pytest.raises(ValueError, match=r"size|sigma"):
        discrete_gaussian(size, sigma)
    with pytest.raises(ValueError, match=r"size|sigma"):
        gaussian(size, sigma)


def test_empty_requests_return_empty_arrays() -> None:
    assert discrete_gaussian(0, 1.0).shape == (0,)
    assert SecureRandom().normal(0).shape == (0,)


# -- no Mersenne Twister or global RNG in the production noise path -------------------------------

#: np.random, the stdlib random module, torch's RNG functions and torch/numpy generators.
BANNED = {
    "np.random": re.compile(r"\bnp\.random\b|\bnumpy\.random\b"),
    "stdlib random": re.compile(r"^\s*(import random\b|from random import)|(?<![\w.])random\.\w",
                                re.MULTILINE),
    "torch.randn": re.compile(r"\btorch\.(randn|rand|randint|randperm|normal|bernoulli|poisson)\("),
    "torch.Generator()": re.compile(r"\btorch\.Generator\(|manual_seed\("),
    "in-place torch sampling": re.compile(r"\.(exponential_|normal_|uniform_|bernoulli_)\("),
}


def _violations(text: str) -> list[str]:
    return [name for name, pattern in BANNED.items() if pattern.search(text)]


def test_the_banned_patterns_catch_what_they_should() -> None:
    for sample in ("np.random.default_rng(0)", "import random", "random.random()",
                   "torch.randn(3, generator=g)", "torch.Generator().manual_seed(1)",
                   "x.exponential_(generator=g)"):
        assert _violations(sample), sample
    assert not _violations("SecureRandom(); self.random_bytes(8)")


def test_noise_module_uses_no_other_generator() -> None:
    assert _violations((ROOT / "privacy" / "noise.py").read_text()) == []


def test_dp_engine_production_noise_path_uses_no_other_generator() -> None:
    production = [engine.SecureNoise, engine.noise_generator, engine._step_noise,
                  engine._bernoulli_successes, engine.poisson_batches, engine.train_dp]
    for obj in production:
        assert _violations(inspect.getsource(obj)) == [], obj.__name__
    # the seeded wrapper is where torch's generator lives, and nowhere else on this path
    assert "torch.randn" in _violations(inspect.getsource(engine.SeededNoise))


def test_noise_generator_is_a_chacha20_source_not_a_torch_or_numpy_generator() -> None:
    source = engine.noise_generator()
    assert isinstance(source, engine.SecureNoise) and isinstance(source, engine.NoiseSource)
    assert not isinstance(source, (torch.Generator, np.random.Generator, np.random.RandomState))
    assert isinstance(source._rng, SecureRandom)
    assert engine.as_noise_source(source) is source
    assert isinstance(engine.as_noise_source(torch.Generator()), engine.SeededNoise)
    with pytest.raises(TypeError, match="NoiseSource"):
        engine.as_noise_source(np.random.default_rng(0))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="NoiseSource"):
        engine.train_dp(torch.nn.Linear(2, 1), torch.zeros(4, 2), torch.zeros(4),
                        per_sample_loss=lambda o, t: o.sum(1) * 0.0,
                        plan=engine.DpPlan(steps=1, sample_rate=0.5, noise_multiplier=1.0,
                                           max_grad_norm=1.0, learning_rate=0.1, delta=1e-5,
                                           epochs=0.5),
                        generator=np.random.default_rng(0))  # type: ignore[arg-type]


def test_opendp_library_draws_from_openssl_not_rand() -> None:
    """OpenDP's ``fill_bytes`` is OpenSSL's ``RAND_bytes`` only when built with ``use-openssl``;
    otherwise it falls back to the ``rand`` crate with the error text "Rand error"."""
    import importlib.util

    spec = importlib.util.find_spec("opendp")
    assert spec is not None and spec.submodule_search_locations
    libs = [p for loc in spec.submodule_search_locations for p in (Path(loc) / "lib").glob("*")
            if p.suffix in (".so", ".dylib", ".dll")]
    assert libs, "OpenDP's native library not found"
    for lib in libs:  # ~270 MB: searched through a memory map, not read into memory
        with lib.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as binary:
            assert binary.find(b"OpenSSL error") >= 0 and binary.find(b"Rand error") < 0
