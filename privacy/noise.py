"""Randomness for DP releases from cryptographically secure generators (numpy + cryptography).

Two sources, one per kind of noise:

* **Float noise** (DP-SGD's Gaussian noise, Poisson sampling): :class:`SecureRandom`, the keystream
  of ChaCha20 (RFC 8439, ``cryptography``'s ``algorithms.ChaCha20``, i.e. OpenSSL) under a fresh
  256-bit key from ``secrets.token_bytes`` — encrypting zeros yields the keystream, which is the
  random bits. Nothing here is a home-made cipher or generator: the bits are ChaCha20's, and the
  methods only transform them (53-bit uniforms, Box–Muller normals, inverse-CDF exponentials).
* **Integer noise** for counts: :func:`discrete_gaussian`, the exact discrete Gaussian sampler of
  Canonne, Kamath & Steinke ("The Discrete Gaussian for Differential Privacy", NeurIPS 2020) as
  implemented by OpenDP (``opendp.measurements.make_gaussian`` over an integer vector domain),
  with OpenDP's own CSPRNG: the PyPI wheel is built with OpenDP's ``use-openssl`` feature, so its
  ``fill_bytes`` calls OpenSSL's ``RAND_bytes`` (``tests/test_noise.py`` checks the shipped
  library for that code path). OpenDP samples with exact rational arithmetic, so
  the integer noise is not subject to the floating-point attacks below.

What is NOT hardened: the float Gaussian (:meth:`SecureRandom.normal`, :func:`gaussian`) is
computed in IEEE-754 floating point (double, or single for float32 model noise). Its bits are
unpredictable, but the set of representable outputs is irregular, which is the weakness Mironov
("On Significance of the Least Significant Bits for Differential Privacy", CCS 2012) exploits
for the Laplace mechanism; this is not a discretised or snapping mechanism, and a released value
computed with it can in principle reveal more than its nominal ε. Use :func:`discrete_gaussian`
for released counts.

A :class:`SecureRandom` is for one process and one thread: it refuses to draw after a ``fork``
(the child would repeat the parent's stream) and its ``repr`` never shows the key.
"""

from __future__ import annotations

import functools
import math
import os
import secrets
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

KEY_BYTES = 32
"""ChaCha20 key length (256 bits)."""

_NONCE = bytes(16)
"""``cryptography``'s 16-byte ChaCha20 nonce: 4-byte little-endian block counter (starting at 0)
followed by the 96-bit RFC 8439 nonce. Every :class:`SecureRandom` has its own fresh key and one
stream under it, so a (key, nonce) pair is never reused and the nonce need not vary."""

_MAX_STREAM_BYTES = 64 * 2**32
"""RFC 8439 allows 2**32 64-byte blocks per (key, nonce); a source refuses to go past them
rather than rely on how OpenSSL carries its 32-bit block counter."""

_TWO_PI = 2.0 * math.pi
_UNIFORM_SCALE = 2.0**-53


class SecureRandom:
    """Random variates from a ChaCha20 keystream (``cryptography``), drawn as numpy vectors.

    ``key`` (32 bytes) exists for reproducible tests only; production code never passes one and
    gets ``secrets.token_bytes(32)``. Every method draws a whole vector from one keystream call, so
    the cost per call is a few microseconds plus the transform: draw in blocks, not per element.
    """

    __slots__ = ("_encryptor", "_pid", "_used")

    def __init__(self, *, key: bytes | None = None) -> None:
        if key is None:
            key = secrets.token_bytes(KEY_BYTES)
        elif not isinstance(key, bytes) or len(key) != KEY_BYTES:
            raise ValueError(
                f"a SecureRandom key must be {KEY_BYTES} bytes; leave key=None outside tests so "
                "that a fresh key comes from the operating system"
            )
        self._encryptor = Cipher(algorithms.ChaCha20(key, _NONCE), mode=None).encryptor()
        self._pid = os.getpid()
        self._used = 0

    def __repr__(self) -> str:
        return "SecureRandom(ChaCha20, key=<hidden>)"

    def __reduce__(self) -> Any:
        raise TypeError("a SecureRandom holds a secret key and is never pickled or copied")

    # -- raw bits -------------------------------------------------------------------------------

    def _keystream(self, n: int) -> bytearray:
        """The next ``n`` keystream bytes: ChaCha20 applied to ``n`` zero bytes, in place (OpenSSL's
        EVP interface allows the output to be the input; no second buffer, no copy)."""
        if n < 0:
            raise ValueError(f"cannot draw a negative number of bytes ({n})")
        if os.getpid() != self._pid:
            raise RuntimeError(
                "this SecureRandom was created before a fork and would repeat the parent's stream; "
                "create a fresh one in the child process"
            )
        if self._used + n > _MAX_STREAM_BYTES:
            raise RuntimeError(
                "this SecureRandom has used up its 256 GiB ChaCha20 stream; create a fresh one"
            )
        self._used += n
        buffer = bytearray(n)
        self._encryptor.update_into(buffer, buffer)
        return buffer

    def random_bytes(self, n: int) -> bytes:
        """The next ``n`` bytes of the keystream."""
        return bytes(self._keystream(n))

    def uint64(self, n: int) -> np.ndarray:
        """``n`` independent uniform 64-bit unsigned integers (a writable array)."""
        return np.frombuffer(self._keystream(8 * n), dtype=np.uint64)

    def _uniform53(self, n: int, *, offset: int) -> np.ndarray:
        words = self.uint64(n)
        words >>= np.uint64(11)
        if offset:
            words += np.uint64(offset)
        out = words.view(np.int64).astype(np.float64)  # < 2**53: exact, and int64 converts faster
        out *= _UNIFORM_SCALE
        return out

    # -- continuous variates ---------------------------------------------------------------------

    def uniform(self, n: int) -> np.ndarray:
        """``n`` uniforms on [0, 1): the top 53 bits of each 64-bit word times 2**-53, so every
        multiple of 2**-53 in [0, 1) is equally likely (the float64 mantissa is filled)."""
        return self._uniform53(n, offset=0)

    def _open_uniform(self, n: int) -> np.ndarray:
        """``n`` uniforms on (0, 1] (``1 - U`` in distribution, multiples of 2**-53): log-safe."""
        return self._uniform53(n, offset=1)

    def normal(self, n: int, *, single: bool = False) -> np.ndarray:
        """``n`` independent standard normals by the Box–Muller transform: float64, or float32
        with ``single=True``.

        Box–Muller (1958) maps two independent uniforms ``V ∈ (0, 1]``, ``W`` to two independent
        standard normals ``R cos Θ, R sin Θ`` with ``R = sqrt(-2 ln V)``, ``Θ = 2π W``: an exact
        transform in real arithmetic, with no rejection step, so every call consumes exactly
        ``16 · ceil(n/2)`` keystream bytes whatever values come out (no data-dependent loop or
        timing) and vectorises in numpy. (Ziggurat and the polar method reject; the inverse CDF
        loses precision in the tails.) Limits: 53-bit uniforms cap ``|z|`` at
        ``sqrt(2·53·ln 2) ≈ 8.57`` (probability beyond ~1e-17), and the transform is rounded
        to floating point — see the module docstring on Mironov (CCS 2012).

        ``single=True`` is for noise that is added to float32 parameters anyway (DP-SGD): ``R``
        is still computed in float64 from 53 bits, so the tail still reaches 8.57, but ``Θ`` is
        rounded to float32 before its cosine and sine (numpy's vectorised float32 trigonometry,
        ~30× faster than float64 here). Rounding ``Θ ∈ (0, 2π]`` moves it by at most 2.4e-7, so a
        float32 draw differs from the float64 transform by at most ``2.4e-7·R`` plus float32
        rounding: below 3e-6 in absolute terms, since ``R ≤ 8.57``.
        """
        dtype = np.float32 if single else np.float64
        if n == 0:
            return np.empty(0, dtype=dtype)
        pairs = (n + 1) // 2
        u = self._open_uniform(2 * pairs)
        radius, theta = u[:pairs], u[pairs:]
        np.log(radius, out=radius)  # in place, on views of one buffer: this runs per DP-SGD block
        radius *= -2.0
        np.sqrt(radius, out=radius)
        theta *= _TWO_PI
        angle = theta.astype(np.float32) if single else theta
        scale = radius.astype(np.float32) if single else radius
        out = np.empty(2 * pairs, dtype=dtype)
        np.cos(angle, out=out[:pairs])
        np.sin(angle, out=out[pairs:])
        np.multiply(out[:pairs], scale, out=out[:pairs])
        np.multiply(out[pairs:], scale, out=out[pairs:])
        return out[:n] if 2 * pairs != n else out

    def exponential(self, n: int) -> np.ndarray:
        """``n`` independent Exp(1) variates, ``-ln V`` with ``V`` uniform on (0, 1] (inverse CDF,
        exact in real arithmetic; 53-bit uniforms cap the value at ``53 ln 2 ≈ 36.7``, probability
        beyond 2**-53). The geometric-gap Bernoulli sampler of DP-SGD's Poisson sampling uses
        them."""
        u = self._open_uniform(n)
        np.log(u, out=u)
        np.negative(u, out=u)
        return u


def gaussian(size: int, sigma: float, *, rng: SecureRandom | None = None) -> np.ndarray:
    """``size`` float64 draws from ``N(0, sigma²)`` from a :class:`SecureRandom` (a fresh one
    unless ``rng`` is injected). Floating-point noise: see the module docstring; use
    :func:`discrete_gaussian` for counts."""
    _check_noise_args(size, sigma)
    return (rng if rng is not None else SecureRandom()).normal(size) * sigma


@functools.lru_cache(maxsize=64)
def _opendp_integer_gaussian(sigma: float) -> Any:
    # Only the modules needed: ``opendp.prelude`` also imports its scikit-learn extras (seconds).
    from opendp.domains import atom_domain, vector_domain
    from opendp.measurements import make_gaussian
    from opendp.metrics import l2_distance
    from opendp.mod import enable_features

    enable_features("contrib")  # OpenDP's documented opt-in for make_gaussian
    return make_gaussian(vector_domain(atom_domain(T="i64")), l2_distance(T="i64"), scale=sigma)


def discrete_gaussian(size: int, sigma: float) -> np.ndarray:
    """``size`` independent draws from the discrete Gaussian ``N_Z(0, sigma²)``, int64.

    ``P[X = x] ∝ exp(-x²/(2 sigma²))`` on the integers (Canonne, Kamath & Steinke 2020): the
    integer-valued noise for counts. Its variance is slightly below ``sigma²`` for small sigma
    (0.215 for sigma = 0.5) and within ``1e-8`` of it for ``sigma ≥ 2``; its zCDP guarantee at
    L2-sensitivity Δ is ``Δ²/(2 sigma²)``, as for the continuous Gaussian. Sampled exactly by
    OpenDP's ``make_gaussian`` (rational arithmetic, OpenSSL's CSPRNG), which is why it takes no
    injected generator; about 10 ms for 400 counts.
    """
    _check_noise_args(size, sigma)
    if size == 0:
        return np.empty(0, dtype=np.int64)
    measurement = _opendp_integer_gaussian(float(sigma))
    return np.asarray(measurement([0] * size), dtype=np.int64)


def _check_noise_args(size: int, sigma: float) -> None:
    if size < 0:
        raise ValueError(f"noise size must be ≥ 0, got {size}")
    if not (math.isfinite(sigma) and sigma > 0):
        raise ValueError(f"noise scale sigma must be a positive finite number, got {sigma}")
