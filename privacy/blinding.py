"""Commutative blinding of match keys on X25519, for the private customer-overlap count.

The overlap count (``fedcrm overlap``, ``docs/analytics.md`` "Customer overlap (PSI)") is a
Diffie-Hellman private set intersection: each firm hashes its normalised match keys onto
X25519 u-coordinates and raises them to a fresh secret scalar; the other firm raises them again.
Because scalar multiplication commutes, ``[β]([α]H(x)) = [α]([β]H(x))``, so a key both firms hold
ends up as the same 32 bytes on both sides, and nothing else does.

Every group operation here is ``cryptography``'s X25519 (``X25519PrivateKey.exchange``, i.e.
OpenSSL's RFC 7748 ladder): ``blind(u) = X25519(k, u)``. No curve arithmetic is written here.

**Hash to u.** ``H(x)`` is SHA-512 of a domain-separated key, cut to 32 bytes with bit 255
cleared (X25519 ignores it). Caveats, stated in ``docs/analytics.md``:

* a uniform u-coordinate is the x of a point on Curve25519 *or* on its quadratic twist (about
  half each); X25519 works on both (Curve25519 is twist-secure: the twist's order is 4 times a
  253-bit prime) and which of the two a point lies on is kept by blinding, so this one bit of a
  random-oracle hash is visible on every blinded value. It says nothing about the key itself, and
  dummies and padding are drawn on both in the same proportion (:class:`GroupClass`), so it
  says nothing about the noise either;
* this is not a hash onto a prime-order group in the sense of RFC 9380 (X25519 offers no such
  map); it is only a map into the set of u-coordinates, which is what the DH-PSI argument needs
  when the hash is modelled as a random oracle;
* clamped scalars (multiples of 8) send every small-subgroup component to zero, and
  ``exchange`` refuses an input whose result is the all-zero value (a low-order point), so a peer
  cannot push a blinded value into a small subgroup.

What a blinded value reveals rests on the decisional Diffie-Hellman assumption on Curve25519 and
its twist; the protocol's threat notes (a malicious coordinator, a colluding peer) are in
``docs/analytics.md``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from enum import IntEnum
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from fedcrm.privacy.errors import FedcrmError
from fedcrm.privacy.noise import SecureRandom

ELEMENT_BYTES = 32
"""Every blinded value (an X25519 u-coordinate) is 32 bytes."""

HASH_DOMAIN = b"fedcrm/overlap/v1/key/"
"""Prefix of every hashed match key; the overlap id and the key kind follow it."""


class GroupClass(IntEnum):
    """Which of the two groups a u-coordinate belongs to: Curve25519 or its quadratic twist."""

    CURVE = 0
    TWIST = 1


BASE: dict[GroupClass, bytes] = {
    # RFC 7748's base point; a random key's public key is [k]·BASE[CURVE].
    GroupClass.CURVE: (9).to_bytes(ELEMENT_BYTES, "little"),
    # u = 2 is the smallest u-coordinate of a point on the twist (tests/test_overlap.py checks
    # it by its Legendre symbol); its order is a multiple of the twist's 253-bit prime.
    GroupClass.TWIST: (2).to_bytes(ELEMENT_BYTES, "little"),
}


class BlindingError(FedcrmError):
    """A value to blind is not a usable u-coordinate (wrong length, or a low-order point)."""


def hash_keys(keys: Iterable[str], *, domain: bytes) -> list[bytes]:
    """Each normalised key hashed to a u-coordinate: ``SHA-512(HASH_DOMAIN ‖ domain ‖ 0 ‖ key)``,
    its first 32 bytes with bit 255 cleared. ``domain`` separates overlaps and key kinds."""
    prefix = HASH_DOMAIN + domain + b"\x00"
    out = []
    for key in keys:
        digest = bytearray(hashlib.sha512(prefix + key.encode("utf-8")).digest()[:ELEMENT_BYTES])
        digest[-1] &= 0x7F
        out.append(bytes(digest))
    return out


class BlindingKey:
    """A firm's secret scalar for one overlap (an X25519 private key); ``repr`` hides it."""

    __slots__ = ("_key",)

    def __init__(self, key: X25519PrivateKey) -> None:
        self._key = key

    @classmethod
    def generate(cls) -> BlindingKey:
        """A fresh key from the operating system's CSPRNG (``cryptography``)."""
        return cls(X25519PrivateKey.generate())

    @classmethod
    def from_secret(cls, secret: bytes) -> BlindingKey:
        if len(secret) != ELEMENT_BYTES:
            raise BlindingError("a blinding key is 32 bytes")
        return cls(X25519PrivateKey.from_private_bytes(secret))

    def secret(self) -> bytes:
        """The raw scalar, only to seal the firm's own state between two steps of an overlap."""
        return self._key.private_bytes_raw()

    def __repr__(self) -> str:
        return "BlindingKey(X25519, key=<hidden>)"

    def __reduce__(self) -> Any:
        raise TypeError("a BlindingKey is secret and is never pickled or copied")

    def blind_one(self, element: bytes) -> bytes:
        """``X25519(k, element)``: the element raised to this key."""
        if len(element) != ELEMENT_BYTES:
            raise BlindingError(f"a blinded value is {ELEMENT_BYTES} bytes")
        try:
            return self._key.exchange(X25519PublicKey.from_public_bytes(element))
        except ValueError:
            raise BlindingError(
                "a value to blind is a low-order point (its blinding would be zero); a correct "
                "peer never sends one"
            ) from None

    def blind(self, elements: Sequence[bytes]) -> list[bytes]:
        """Every element raised to this key, in order."""
        exchange, load = self._key.exchange, X25519PublicKey.from_public_bytes
        try:
            return [exchange(load(e)) for e in elements]
        except ValueError:
            for e in elements:  # name the problem (slow path: only on bad input)
                self.blind_one(e)
            raise

    def public(self, group: GroupClass) -> bytes:
        """``[k]·BASE[group]``: what the peer needs to build this firm's matching dummies."""
        return self.blind_one(BASE[group])


def random_elements(n: int, rng: SecureRandom) -> list[bytes]:
    """``n`` uniformly random u-coordinates (bit 255 clear, like every hashed key)."""
    data = np.frombuffer(rng.random_bytes(n * ELEMENT_BYTES), dtype=np.uint8).reshape(
        n, ELEMENT_BYTES
    ).copy()
    data[:, -1] &= 0x7F
    return unpack(data)


def random_groups(n: int, rng: SecureRandom) -> list[GroupClass]:
    """``n`` independent fair choices between the curve and the twist."""
    return [GroupClass(int(b)) for b in (rng.uint64(n) & np.uint64(1))]


def shuffled(elements: Sequence[bytes], rng: SecureRandom) -> list[bytes]:
    """A uniformly random permutation (sorting by independent 64-bit CSPRNG keys; a tie has
    probability below n²/2⁶⁵)."""
    order = np.argsort(rng.uint64(len(elements)), kind="stable")
    return [elements[i] for i in order]


def pack(elements: Sequence[bytes]) -> np.ndarray:
    """Blinded values as one ``uint8`` array of shape ``(n, 32)`` (what a message carries)."""
    if not elements:
        return np.empty((0, ELEMENT_BYTES), dtype=np.uint8)
    return np.frombuffer(b"".join(elements), dtype=np.uint8).reshape(-1, ELEMENT_BYTES)


def unpack(array: np.ndarray) -> list[bytes]:
    """The inverse of :func:`pack`; refuses anything but a ``uint8`` array of shape ``(n, 32)``."""
    array = np.asarray(array)
    if array.dtype != np.uint8 or array.ndim != 2 or array.shape[1] != ELEMENT_BYTES:
        raise BlindingError(f"blinded values must be a uint8 array of shape (n, {ELEMENT_BYTES})")
    data = np.ascontiguousarray(array).tobytes()
    return [data[i:i + ELEMENT_BYTES] for i in range(0, len(data), ELEMENT_BYTES)]


def elements_hash(array: np.ndarray) -> str:
    """sha256 of a packed array's bytes: what each firm signs into its audit log and the
    coordinator records on receipt, so an auditor can match the two."""
    return hashlib.sha256(np.ascontiguousarray(array, dtype=np.uint8).tobytes()).hexdigest()


def count_common(first: np.ndarray, second: np.ndarray) -> int:
    """How many distinct values two packed arrays share (the coordinator's count)."""
    return len(set(unpack(first)).intersection(unpack(second)))
