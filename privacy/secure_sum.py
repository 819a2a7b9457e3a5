"""Secure sum: firms add up vectors so that the coordinator learns only the total.

The protocol is Bonawitz et al. 2017 ("Practical Secure Aggregation for Privacy-Preserving
Machine Learning", CCS) with the neighbour graphs of Bell et al. 2020 ("Secure Single-Server
Aggregation with (Poly)Logarithmic Overhead", CCS: SecAgg+), on fedcrm's keys. Pure maths and
state, no torch and no Flower: :mod:`fedcrm.protocol` encodes its messages, the firm's node and
the coordinator's Flower adapter drive it. Every primitive comes from ``cryptography`` (X25519,
Ed25519, HKDF, ChaCha20, AES-GCM); every key is derived in :mod:`fedcrm.privacy.keys`; the only
randomness is ``secrets`` (Shamir coefficients) and ``os.urandom`` (AES-GCM nonces).

**Keys.** Each firm has a long-term X25519 key, signed with its Ed25519 audit key
(:class:`AgreementKey`) and registered with the coordinator; every firm checks each peer's
signature against the peer's signing key it holds itself (its ``peer_keys_dir``), so the
coordinator cannot substitute a key. Each sum has its own id - run, round and query
(:class:`SumId`) - and every secret of a sum is derived from the firm's secrets with HKDF over it.

**A sum, in three exchanges** (the coordinator relays everything; firms never talk directly):

1. *share* - firm ``u`` derives two per-sum seeds from its key (HKDF over the sum's id): a key seed
   (its per-sum X25519 key ``e_u``) and a mask seed ``b_u``. It signs ``e_u``'s public key with a
   commitment to ``b_u`` (:class:`EphemeralKey`), splits both seeds t-of-k (Shamir over
   GF(2^255 - 19)) among its neighbours and encrypts each neighbour's two shares with AES-GCM
   under a key from the long-term Diffie-Hellman secret of the pair (HKDF over the sum's id,
   sender and recipient);
2. *mask* - the coordinator sends ``u`` the signed per-sum keys of its neighbours that finished
   step 1 (``U1``); ``u`` checks the signatures and sends
   ``y_u = x_u + PRG(b_u) + sum_{v in N(u) and U1} +-PRG(s_uv)  (mod 2^64)`` where ``s_uv`` is
   HKDF of the X25519 secret of ``e_u`` and ``e_v`` (``+`` when ``u`` comes first among the
   parties) and PRG is the ChaCha20 keystream;
3. *unmask* - the coordinator names the firms whose masked vectors arrived (``U2``) and forwards
   each firm the shares its neighbours sent it; the firm decrypts them and reveals, for each
   neighbour, the share of its mask seed if the neighbour is in ``U2`` and the share of its key
   seed if it dropped after step 1 - never both, and only once per sum.

The coordinator adds the ``y_u`` of ``U2``, removes each survivor's ``PRG(b_u)`` (its seed
recovered from t shares and checked against its commitment) and, for each firm that dropped after
step 1, recomputes its pair masks with its surviving neighbours from its recovered per-sum key
(checked against its signed public key). A firm that dropped before step 1 revealed nothing and
nobody masked with it: it is simply not in the sum. Recovery is only ever of a dropped firm's
per-sum key, never of a long-term key.

**Arithmetic.** Values are integers modulo 2^64 (numpy ``uint64`` wraps). Floats are fixed point
over a declared range ``[lower, upper]`` with ``scale`` steps per unit (:class:`FixedPoint`): each
value becomes ``round((x - lower) * scale)`` in ``[0, L]``, ``L = round((upper - lower) * scale)``;
a value outside the range (or NaN) is an error, never clipped. The sum of ``n`` parties is at most
``n * L``, and :meth:`FixedPoint.check_capacity` refuses a sum whose declared number of parties
could reach 2^64, so the total modulo 2^64 *is* the integer total: overflow is impossible by
construction.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import secrets
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from fedcrm.privacy.errors import (
    ConfigError,
    PeerKeyRefused,
    SecureSumError,
    SumAborted,
    ValueOutOfRange,
)
from fedcrm.privacy.keys import (
    SECURE_SUM_INFO_PREFIX,
    FirmKeys,
    SecureSumKey,
    agreement_statement,
    check_firm_name,
    derive_secure_sum_key,
    raw_agreement_key,
    x25519_exchange,
)

MODULUS_BITS = 64
"""Every value and mask is an integer modulo 2^64 (numpy ``uint64`` arithmetic wraps)."""
FIELD_PRIME = 2**255 - 19
"""The prime field of the Shamir shares (a seed is 248 bits, below it)."""
SEED_BYTES = 31
SHARE_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16
SHARE_PLAINTEXT = 2 * SHARE_BYTES  # key-seed share || mask-seed share
CIPHERTEXT_BYTES = NONCE_BYTES + SHARE_PLAINTEXT + TAG_BYTES
PUBLIC_KEY_BYTES = 32
SIGNATURE_BYTES = 64
COMMITMENT_BYTES = 32
TRAINING_SUM_QUERY = "train"
"""The query id of a training round's secure sum (of the firms' weighted updates)."""
MIN_SURVIVORS = 2
"""A firm reveals nothing for a sum of fewer firms (the 'sum' of one firm is its value)."""
_MAX_LEVELS = 2**53  # fixed-point levels stay exact in float64


# ------------------------------------------------------------------------------ sum identity


@dataclass(frozen=True)
class SumId:
    """Which sum: the run, the round and the query. Every per-sum secret is derived over it."""

    run_id: str
    round: int
    query: str

    def __post_init__(self) -> None:
        if not self.run_id or not self.query or self.round < 0:
            raise ConfigError("a secure sum needs a run id, a round >= 0 and a query id")

    @cached_property
    def context(self) -> bytes:
        """Unambiguous bytes of the id (JSON), the start of every HKDF ``info`` of the sum."""
        return json.dumps([self.run_id, self.round, self.query], separators=(",", ":")).encode()

    def label(self) -> str:
        return f"{self.run_id}/{self.round}/{self.query}"


# ------------------------------------------------------------------------------ fixed point


@dataclass(frozen=True)
class FixedPoint:
    """Floats over a declared range as integers: ``round((x - lower) * scale)``."""

    lower: float
    upper: float
    scale: int

    def __post_init__(self) -> None:
        if not (math.isfinite(self.lower) and math.isfinite(self.upper)
                and self.lower < self.upper):
            raise ConfigError("a secure sum's range needs finite lower < upper")
        if isinstance(self.scale, bool) or not isinstance(self.scale, int) or self.scale < 1:
            raise ConfigError("a secure sum's scale must be a positive integer")
        if self.levels > _MAX_LEVELS:
            raise ConfigError(
                f"range [{self.lower:g}, {self.upper:g}] x scale {self.scale} has more than 2^53 "
                "levels; lower the scale or narrow the range"
            )

    @cached_property
    def levels(self) -> int:
        """The largest encoded value ``L``."""
        return round((self.upper - self.lower) * self.scale)

    def capacity(self) -> int:
        """The most parties whose encoded values always add up below 2^64."""
        return (2**MODULUS_BITS - 1) // self.levels

    def check_capacity(self, parties: int) -> None:
        """Refuse a sum whose total could wrap around 2^64 (see the module doc)."""
        if parties > self.capacity():
            raise ConfigError(
                f"a sum of {parties} firms over [{self.lower:g}, {self.upper:g}] at scale "
                f"{self.scale} could overflow 2^64 (at most {self.capacity()} firms); lower the "
                "scale or narrow the range"
            )

    def encode(self, values: np.ndarray) -> np.ndarray:
        """The values as ``uint64`` in ``[0, L]``; any value outside the range is an error."""
        x = np.asarray(values, dtype=np.float64).ravel()
        outside = ~(np.isfinite(x) & (x >= self.lower) & (x <= self.upper))
        if outside.any():
            # Only counts and positions: the message never shows a value.
            raise ValueOutOfRange(
                f"{int(outside.sum())} of {x.size} values (first at position "
                f"{int(np.argmax(outside))}) are outside the sum's declared range "
                f"[{self.lower:g}, {self.upper:g}] or not finite; values are never clipped"
            )
        return np.rint((x - self.lower) * self.scale).astype(np.uint64)

    def decode_sum(self, total: np.ndarray, parties: int) -> np.ndarray:
        """The float sum of ``parties`` encoded vectors (float64, exact below 2^53)."""
        return np.asarray(total, dtype=np.uint64).astype(np.float64) / self.scale + (
            parties * self.lower
        )


# ------------------------------------------------------------------------------ Shamir


def shamir_split(secret: int, *, threshold: int, xs: Sequence[int]) -> list[int]:
    """Shares ``f(x)`` of a random polynomial of degree ``threshold - 1`` with ``f(0) = secret``
    over GF(:data:`FIELD_PRIME`), one per x in ``xs`` (distinct, non-zero). Coefficients come
    from ``secrets`` (the OS CSPRNG)."""
    if not 1 <= threshold <= len(xs):
        raise ConfigError(f"Shamir threshold {threshold} must be between 1 and {len(xs)}")
    if not 0 <= secret < FIELD_PRIME:
        raise ConfigError("a Shamir secret must be an element of the field")
    coefficients = [secret] + [secrets.randbelow(FIELD_PRIME) for _ in range(threshold - 1)]
    return _evaluate(coefficients, xs)


def _evaluate(coefficients: Sequence[int], xs: Sequence[int]) -> list[int]:
    p = FIELD_PRIME
    out = []
    for x in xs:
        if not 0 < x < p:
            raise ConfigError("Shamir x-coordinates must be non-zero field elements")
        y = 0
        for c in reversed(coefficients):  # Horner
            y = (y * x + c) % p
        out.append(y)
    return out


def lagrange_at_zero(xs: Sequence[int]) -> list[int]:
    """The weights ``l_i`` with ``f(0) = sum l_i f(x_i)`` for any polynomial of degree
    ``< len(xs)``: ``l_i = prod_{j != i} x_j / (x_j - x_i)``."""
    p = FIELD_PRIME
    if len(set(xs)) != len(xs) or any(not 0 < x < p for x in xs):
        raise ConfigError("Lagrange interpolation needs distinct non-zero x-coordinates")
    numerators, denominators = [], []
    for i, xi in enumerate(xs):
        num, den = 1, 1
        for j, xj in enumerate(xs):
            if j != i:
                num = num * xj % p
                den = den * (xj - xi) % p
        numerators.append(num)
        denominators.append(den)
    inverses = _batch_inverse(denominators)
    return [n * d % p for n, d in zip(numerators, inverses, strict=True)]


def _batch_inverse(values: Sequence[int]) -> list[int]:
    """Modular inverses of non-zero field elements with one exponentiation (Montgomery)."""
    p = FIELD_PRIME
    prefix = [1]
    for v in values:
        prefix.append(prefix[-1] * v % p)
    inv = pow(prefix[-1], p - 2, p)
    out = [0] * len(values)
    for i in range(len(values) - 1, -1, -1):
        out[i] = inv * prefix[i] % p
        inv = inv * values[i] % p
    return out


def shamir_combine(xs: Sequence[int], ys: Sequence[int]) -> int:
    """The secret ``f(0)`` from shares ``(x_i, y_i)`` (at least the threshold many)."""
    weights = lagrange_at_zero(xs)
    return sum(w * y for w, y in zip(weights, ys, strict=True)) % FIELD_PRIME


# ------------------------------------------------------------------------------ masks


def mask_stream(key: bytes, length: int) -> np.ndarray:
    """``length`` uniform integers modulo 2^64: the ChaCha20 keystream under ``key`` (a fresh
    HKDF output used for this one stream, so the nonce is fixed)."""
    encryptor = Cipher(algorithms.ChaCha20(key, bytes(16)), mode=None).encryptor()
    return np.frombuffer(encryptor.update(bytes(8 * length)), dtype="<u8").astype(np.uint64)


def _seed_bytes(seed: int) -> bytes:
    return seed.to_bytes(32, "big")


def _names(*firms: str) -> bytes:
    return b"/" + "/".join(firms).encode()


def self_mask(sum_id: SumId, firm: str, mask_seed: int, length: int) -> np.ndarray:
    key = derive_secure_sum_key(
        _seed_bytes(mask_seed), use=SecureSumKey.SELF_MASK, context=sum_id.context + _names(firm)
    )
    return mask_stream(key, length)


def ephemeral_key(sum_id: SumId, firm: str, key_seed: int) -> X25519PrivateKey:
    """A firm's per-sum X25519 key, derived from its (shared) key seed."""
    raw = derive_secure_sum_key(
        _seed_bytes(key_seed), use=SecureSumKey.EPHEMERAL, context=sum_id.context + _names(firm)
    )
    return X25519PrivateKey.from_private_bytes(raw)


def pair_mask(
    sum_id: SumId, private_key: X25519PrivateKey, own: str, peer: str, peer_public: bytes,
    length: int,
) -> np.ndarray:
    """The mask ``PRG(s_uv)`` two firms share in this sum (the same from either side)."""
    shared = x25519_exchange(private_key, peer_public)
    first, second = sorted((own, peer))
    key = derive_secure_sum_key(
        shared, use=SecureSumKey.PAIR_MASK, context=sum_id.context + _names(first, second)
    )
    return mask_stream(key, length)


def mask_commitment(sum_id: SumId, firm: str, mask_seed: int) -> bytes:
    """SHA-256 commitment to a firm's mask seed (the seed has 248 random bits)."""
    return hashlib.sha256(
        SECURE_SUM_INFO_PREFIX + b"commitment/" + sum_id.context + _names(firm)
        + _seed_bytes(mask_seed)
    ).digest()


# ------------------------------------------------------------------------------ who sums


@dataclass(frozen=True)
class SumSpec:
    """Everything public about one sum, the same for every firm and the coordinator.

    ``neighbours`` is the number of peers each firm shares its seeds with and masks against:
    0 (or at least ``n - 1``) for every other firm; otherwise a k-regular circulant graph (k
    rounded up to even) over the parties in an order fixed by the sum's id. Each firm's seeds
    are split ``t``-of-``k`` with ``t = k // 2 + 1``: a majority of its neighbours.
    """

    sum_id: SumId
    parties: tuple[str, ...]
    length: int
    fixed_point: FixedPoint
    neighbours: int = 0

    def __post_init__(self) -> None:
        if list(self.parties) != sorted(set(self.parties)):
            raise ConfigError("a sum's parties must be distinct and sorted")
        for firm in self.parties:
            check_firm_name(firm)
        if len(self.parties) < MIN_SURVIVORS:
            raise ConfigError(f"a secure sum needs at least {MIN_SURVIVORS} firms")
        if self.length < 1 or self.neighbours < 0:
            raise ConfigError("a secure sum needs length >= 1 and neighbours >= 0")
        self.fixed_point.check_capacity(len(self.parties))

    @cached_property
    def _index(self) -> dict[str, int]:
        return {f: i for i, f in enumerate(self.parties)}

    def index(self, firm: str) -> int:
        try:
            return self._index[firm]
        except KeyError:
            raise SecureSumError(
                f"firm '{firm}' is not a party to sum {self.sum_id.label()}"
            ) from None

    def x(self, firm: str) -> int:
        """The firm's Shamir x-coordinate (its index among the parties, plus one)."""
        return self.index(firm) + 1

    @cached_property
    def graph(self) -> dict[str, tuple[str, ...]]:
        n = len(self.parties)
        half = (self.neighbours + 1) // 2
        if self.neighbours == 0 or 2 * half >= n - 1:
            return {f: tuple(p for p in self.parties if p != f) for f in self.parties}
        # A public order that depends on the sum's id, not on the firms' names.
        order = sorted(
            self.parties,
            key=lambda f: hashlib.sha256(self.sum_id.context + _names(f)).digest(),
        )
        position = {f: i for i, f in enumerate(order)}
        graph = {}
        for f in self.parties:
            i = position[f]
            peers = {order[(i + d) % n] for d in range(1, half + 1)}
            peers |= {order[(i - d) % n] for d in range(1, half + 1)}
            graph[f] = tuple(sorted(peers, key=self.index))
        return graph

    def neighbours_of(self, firm: str) -> tuple[str, ...]:
        self.index(firm)
        return self.graph[firm]

    def threshold(self, firm: str) -> int:
        return len(self.neighbours_of(firm)) // 2 + 1

    def digest(self) -> str:
        """SHA-256 of the spec: a firm holds the coordinator to one spec per sum."""
        fp = self.fixed_point
        return hashlib.sha256(json.dumps(
            [self.sum_id.run_id, self.sum_id.round, self.sum_id.query, list(self.parties),
             self.length, fp.lower, fp.upper, fp.scale, self.neighbours],
            separators=(",", ":"),
        ).encode()).hexdigest()


# ------------------------------------------------------------------------------ signed keys


@dataclass(frozen=True)
class AgreementKey:
    """A firm's long-term X25519 public key and its Ed25519 signature over it."""

    firm: str
    public_key: bytes
    signature: bytes

    @classmethod
    def of(cls, keys: FirmKeys) -> AgreementKey:
        return cls(keys.firm, keys.agreement_public_key(), keys.sign_agreement_key())

    def verify(self, signer: Ed25519PublicKey) -> bytes:
        """The raw public key, if ``signer`` (the firm's trusted signing key) signed it."""
        try:
            signer.verify(self.signature, agreement_statement(self.firm, self.public_key))
        except (InvalidSignature, ValueError):
            raise PeerKeyRefused(
                f"firm '{self.firm}''s secure-sum key is not signed by the signing key this firm "
                "holds for it (tampered, substituted or unsigned); the sum is refused"
            ) from None
        return self.public_key


def trusted_peer_keys(
    directory: Mapping[str, AgreementKey], trusted: Mapping[str, Ed25519PublicKey],
    firms: Iterable[str],
) -> dict[str, bytes]:
    """The long-term public keys of ``firms``, each checked against the signing key this firm
    holds for it (never one the coordinator sent)."""
    out = {}
    for firm in firms:
        signer = trusted.get(firm)
        if signer is None:
            raise PeerKeyRefused(
                f"this firm holds no signing key for peer '{firm}' ({firm}.pub in its "
                "[federation] peer_keys_dir): it cannot check that peer's secure-sum key"
            )
        entry = directory.get(firm)
        if entry is None or entry.firm != firm:
            raise PeerKeyRefused(f"the coordinator sent no signed secure-sum key for '{firm}'")
        out[firm] = entry.verify(signer)
    return out


def survivors_statement(spec: SumSpec, survivors: Sequence[str]) -> bytes:
    """What a firm signs in the consistency step: the sum's spec and the one list of survivors it
    accepts for it (Bonawitz et al.'s consistency check against an active coordinator)."""
    return (SECURE_SUM_INFO_PREFIX + b"survivors/" + spec.digest().encode() + b"/"
            + json.dumps(list(survivors), separators=(",", ":")).encode())


def ephemeral_statement(sum_id: SumId, firm: str, public_key: bytes, commitment: bytes) -> bytes:
    return (SECURE_SUM_INFO_PREFIX + b"ephemeral/" + sum_id.context + _names(firm) + b"/"
            + public_key + commitment)


@dataclass(frozen=True)
class EphemeralKey:
    """A firm's per-sum X25519 public key and mask-seed commitment, signed with its Ed25519 key."""

    firm: str
    public_key: bytes
    commitment: bytes
    signature: bytes

    def verify(self, sum_id: SumId, signer: Ed25519PublicKey) -> bytes:
        try:
            signer.verify(
                self.signature,
                ephemeral_statement(sum_id, self.firm, self.public_key, self.commitment),
            )
        except (InvalidSignature, ValueError):
            raise PeerKeyRefused(
                f"firm '{self.firm}''s key for sum {sum_id.label()} is not signed by the signing "
                "key this firm holds for it; the sum is refused"
            ) from None
        return self.public_key


# ------------------------------------------------------------------------------ share encryption


def _share_aad(sum_id: SumId, sender: str, recipient: str) -> bytes:
    return SECURE_SUM_INFO_PREFIX + b"shares/" + sum_id.context + _names(sender, recipient)


def _share_key(keys: FirmKeys, peer_public: bytes, sum_id: SumId, sender: str,
               recipient: str) -> bytes:
    return derive_secure_sum_key(
        keys.pair_secret(peer_public), use=SecureSumKey.SHARE,
        context=sum_id.context + _names(sender, recipient),
    )


# ------------------------------------------------------------------------------ a firm's side


@dataclass(frozen=True)
class SharesOut:
    """Step 1's answer: the signed per-sum key and one ciphertext per neighbour (in the order
    of :meth:`SumSpec.neighbours_of`)."""

    ephemeral: EphemeralKey
    ciphertexts: tuple[bytes, ...]


@dataclass(frozen=True)
class Revealed:
    """Step 3's answer: shares of survivors' mask seeds and of dropped firms' key seeds."""

    mask_shares: Mapping[str, int] = field(default_factory=dict)
    key_shares: Mapping[str, int] = field(default_factory=dict)


class SumParty:
    """One firm's side of one sum. Stateless between steps: its per-sum seeds are derived again
    from its key each time; holding it to one answer per step is the caller's job (see
    :mod:`fedcrm.secure_sum_party`)."""

    def __init__(self, keys: FirmKeys, spec: SumSpec) -> None:
        self.keys = keys
        self.spec = spec
        self.firm = keys.firm
        spec.index(self.firm)
        self.neighbours = spec.neighbours_of(self.firm)
        self.threshold = spec.threshold(self.firm)

    def _seeds(self) -> tuple[int, int]:
        base = derive_secure_sum_key(
            self.keys.secure_sum_master(), use=SecureSumKey.SEED,
            context=self.spec.sum_id.context + _names(self.firm),
        )
        key_seed = int.from_bytes(
            derive_secure_sum_key(base, use=SecureSumKey.SEED, context=b"key")[:SEED_BYTES], "big"
        )
        mask_seed = int.from_bytes(
            derive_secure_sum_key(base, use=SecureSumKey.SEED, context=b"mask")[:SEED_BYTES], "big"
        )
        return key_seed, mask_seed

    def share(self, peer_keys: Mapping[str, bytes]) -> SharesOut:
        """Step 1. ``peer_keys``: the neighbours' long-term keys, already checked
        (:func:`trusted_peer_keys`)."""
        sum_id = self.spec.sum_id
        key_seed, mask_seed = self._seeds()
        public = raw_agreement_key(ephemeral_key(sum_id, self.firm, key_seed).public_key())
        commitment = mask_commitment(sum_id, self.firm, mask_seed)
        signature = self.keys.sign_secure_sum(
            ephemeral_statement(sum_id, self.firm, public, commitment)
        )
        xs = [self.spec.x(v) for v in self.neighbours]
        key_shares = shamir_split(key_seed, threshold=self.threshold, xs=xs)
        mask_shares = shamir_split(mask_seed, threshold=self.threshold, xs=xs)
        ciphertexts = []
        for v, ks, ms in zip(self.neighbours, key_shares, mask_shares, strict=True):
            aead = AESGCM(_share_key(self.keys, peer_keys[v], sum_id, self.firm, v))
            nonce = os.urandom(NONCE_BYTES)
            plaintext = ks.to_bytes(SHARE_BYTES, "big") + ms.to_bytes(SHARE_BYTES, "big")
            ciphertexts.append(
                nonce + aead.encrypt(nonce, plaintext, _share_aad(sum_id, self.firm, v))
            )
        return SharesOut(EphemeralKey(self.firm, public, commitment, signature), tuple(ciphertexts))

    def check_shared(self, shared: Iterable[str]) -> list[str]:
        """The neighbours in ``U1``; refuses to mask when fewer than the threshold hold this
        firm's shares (its mask could not be removed if it dropped)."""
        shared = set(shared)
        if self.firm not in shared or not shared <= set(self.spec.parties):
            raise SecureSumError(
                f"sum {self.spec.sum_id.label()}: the coordinator's list of firms that shared "
                "their seeds is inconsistent with this firm's"
            )
        peers = [v for v in self.neighbours if v in shared]
        if len(peers) < self.threshold:
            raise SumAborted(
                f"sum {self.spec.sum_id.label()}: only {len(peers)} of this firm's neighbours "
                f"hold its shares, fewer than the threshold {self.threshold}"
            )
        return peers

    def mask(
        self, values: np.ndarray, ephemerals: Mapping[str, bytes], shared: Iterable[str]
    ) -> np.ndarray:
        """Step 2: the masked vector. ``ephemerals``: the per-sum public keys of the neighbours
        in ``U1``, already checked (:meth:`EphemeralKey.verify`)."""
        spec = self.spec
        if np.asarray(values).size != spec.length:
            raise ValueOutOfRange(
                f"sum {spec.sum_id.label()} declares {spec.length} values; this firm has "
                f"{np.asarray(values).size}"
            )
        masked = spec.fixed_point.encode(values)
        key_seed, mask_seed = self._seeds()
        masked += self_mask(spec.sum_id, self.firm, mask_seed, spec.length)
        private = ephemeral_key(spec.sum_id, self.firm, key_seed)
        me = spec.index(self.firm)
        for v in self.check_shared(shared):
            m = pair_mask(spec.sum_id, private, self.firm, v, ephemerals[v], spec.length)
            if me < spec.index(v):
                masked += m
            else:
                masked -= m
        return masked

    def unmask(
        self, survivors: Iterable[str], shared: Iterable[str], ciphertexts: Mapping[str, bytes],
        peer_keys: Mapping[str, bytes],
    ) -> Revealed:
        """Step 3: for each neighbour that sent this firm shares, the share of its mask seed
        when it survived, of its key seed when it dropped after step 1."""
        spec = self.spec
        survivors, shared = set(survivors), set(shared)
        if not survivors <= shared <= set(spec.parties) or self.firm not in survivors:
            raise SecureSumError(
                f"sum {spec.sum_id.label()}: the coordinator's survivors are not a subset of the "
                "firms that shared their seeds, or leave this firm out"
            )
        if len(survivors) < max(MIN_SURVIVORS, self.threshold):
            raise SumAborted(
                f"sum {spec.sum_id.label()}: only {len(survivors)} firms survived; this firm "
                "reveals nothing for so small a sum"
            )
        mask_shares: dict[str, int] = {}
        key_shares: dict[str, int] = {}
        for u, blob in ciphertexts.items():
            if u not in self.neighbours or u not in shared:
                raise SecureSumError(
                    f"sum {spec.sum_id.label()}: shares forwarded from '{u}', which is not a "
                    "neighbour that shared its seeds"
                )
            aead = AESGCM(_share_key(self.keys, peer_keys[u], spec.sum_id, u, self.firm))
            try:
                plaintext = aead.decrypt(
                    blob[:NONCE_BYTES], blob[NONCE_BYTES:], _share_aad(spec.sum_id, u, self.firm)
                )
            except InvalidTag:
                raise SecureSumError(
                    f"sum {spec.sum_id.label()}: the shares forwarded from '{u}' do not decrypt "
                    "(tampered or not for this firm)"
                ) from None
            if u in survivors:
                mask_shares[u] = int.from_bytes(plaintext[SHARE_BYTES:], "big")
            else:
                key_shares[u] = int.from_bytes(plaintext[:SHARE_BYTES], "big")
        return Revealed(mask_shares, key_shares)


# ------------------------------------------------------------------------------ the coordinator


@dataclass(frozen=True)
class SumResult:
    """What the coordinator learns: the total over the survivors, and who they are."""

    sum_id: SumId
    survivors: tuple[str, ...]
    dropped: tuple[str, ...]
    total: np.ndarray  # uint64: the integer sum of the encoded vectors
    values: np.ndarray  # float64: the decoded sum

    @cached_property
    def sum_hash(self) -> str:
        """SHA-256 over the sum's id, its survivors and its integer total (what is logged)."""
        h = hashlib.sha256(self.sum_id.context)
        h.update(json.dumps(list(self.survivors)).encode())
        h.update(np.ascontiguousarray(self.total, dtype="<u8").tobytes())
        return h.hexdigest()


class SumCoordinator:
    """The coordinator's side of one sum: relays, then removes the masks. It sees the signed
    per-sum public keys, ciphertexts it cannot read, masked vectors and the revealed shares."""

    def __init__(self, spec: SumSpec) -> None:
        self.spec = spec
        self.shares: dict[str, SharesOut] = {}
        self.masked: dict[str, np.ndarray] = {}
        self.revealed: dict[str, Revealed] = {}
        self._weights: dict[tuple[int, ...], list[int]] = {}

    # step 1
    def receive_shares(self, firm: str, out: SharesOut) -> None:
        neighbours = self.spec.neighbours_of(firm)
        if out.ephemeral.firm != firm or len(out.ciphertexts) != len(neighbours) or any(
            len(c) != CIPHERTEXT_BYTES for c in out.ciphertexts
        ):
            raise SecureSumError(
                f"firm '{firm}''s shares do not fit sum {self.spec.sum_id.label()}"
            )
        self.shares[firm] = out

    @property
    def shared(self) -> tuple[str, ...]:
        """``U1``: the firms whose step 1 arrived, in the parties' order."""
        return tuple(f for f in self.spec.parties if f in self.shares)

    def ephemerals_for(self, firm: str) -> dict[str, EphemeralKey]:
        """Step 2's request to ``firm``: the signed per-sum keys of its neighbours in ``U1``."""
        return {v: self.shares[v].ephemeral for v in self.spec.neighbours_of(firm)
                if v in self.shares}

    # step 2
    def receive_masked(self, firm: str, masked: np.ndarray) -> None:
        if firm not in self.shares:
            raise SecureSumError(f"firm '{firm}' sent a masked vector without sharing its seeds")
        masked = np.asarray(masked)
        if masked.dtype != np.uint64 or masked.shape != (self.spec.length,):
            raise SecureSumError(
                f"firm '{firm}''s masked vector is not {self.spec.length} uint64 values"
            )
        self.masked[firm] = masked

    @property
    def survivors(self) -> tuple[str, ...]:
        """``U2``: the firms whose masked vectors arrived."""
        return tuple(f for f in self.spec.parties if f in self.masked)

    def ciphertexts_for(self, firm: str) -> dict[str, bytes]:
        """Step 3's request to ``firm``: the shares each of its neighbours in ``U1`` sent it."""
        out = {}
        for u in self.spec.neighbours_of(firm):
            if u in self.shares:
                position = self.spec.neighbours_of(u).index(firm)
                out[u] = self.shares[u].ciphertexts[position]
        return out

    # step 3
    def receive_revealed(self, firm: str, revealed: Revealed) -> None:
        if firm not in self.masked:
            raise SecureSumError(f"firm '{firm}' revealed shares without a masked vector")
        self.revealed[firm] = revealed

    def _recover(self, owner: str, kind: str) -> int:
        """A seed of ``owner`` from its neighbours' revealed shares (the first t by index)."""
        threshold = self.spec.threshold(owner)
        points = []
        for holder in self.spec.neighbours_of(owner):
            r = self.revealed.get(holder)
            if r is None:
                continue
            shares = r.mask_shares if kind == "mask" else r.key_shares
            if owner in shares:
                points.append((self.spec.x(holder), shares[owner]))
            if len(points) == threshold:
                break
        if len(points) < threshold:
            raise SumAborted(
                f"sum {self.spec.sum_id.label()}: only {len(points)} of the {threshold} shares "
                f"needed to remove firm '{owner}''s mask arrived; too many firms dropped"
            )
        xs = tuple(x for x, _ in points)
        weights = self._weights.get(xs)
        if weights is None:
            weights = self._weights[xs] = lagrange_at_zero(xs)
        return sum(w * y for w, (_, y) in zip(weights, points, strict=True)) % FIELD_PRIME

    def finish(self) -> SumResult:
        spec, sum_id = self.spec, self.spec.sum_id
        survivors = self.survivors
        if len(survivors) < MIN_SURVIVORS:
            raise SumAborted(f"sum {sum_id.label()}: fewer than {MIN_SURVIVORS} firms survived")
        total = np.zeros(spec.length, dtype=np.uint64)
        for firm in survivors:
            total += self.masked[firm]
        for firm in survivors:
            seed = self._recover(firm, "mask")
            if mask_commitment(sum_id, firm, seed) != self.shares[firm].ephemeral.commitment:
                raise SumAborted(
                    f"sum {sum_id.label()}: firm '{firm}''s recovered mask seed does not match "
                    "its commitment (a neighbour revealed a wrong share)"
                )
            total -= self_mask(sum_id, firm, seed, spec.length)
        dropped = tuple(f for f in self.shared if f not in self.masked)
        alive = set(survivors)
        for firm in dropped:
            private = ephemeral_key(sum_id, firm, self._recover(firm, "key"))
            if raw_agreement_key(private.public_key()) != self.shares[firm].ephemeral.public_key:
                raise SumAborted(
                    f"sum {sum_id.label()}: firm '{firm}''s recovered key does not match its "
                    "signed key (a neighbour revealed a wrong share)"
                )
            me = spec.index(firm)
            for v in spec.neighbours_of(firm):
                if v not in alive:
                    continue
                m = pair_mask(sum_id, private, firm, v, self.shares[v].ephemeral.public_key,
                              spec.length)
                # y_v holds +m when v comes first, -m otherwise: take it out again.
                if spec.index(v) < me:
                    total -= m
                else:
                    total += m
        return SumResult(
            sum_id=sum_id, survivors=survivors, dropped=dropped, total=total,
            values=spec.fixed_point.decode_sum(total, len(survivors)),
        )


__all__ = [
    "AgreementKey", "EphemeralKey", "FixedPoint", "Revealed", "SharesOut",
    "SumCoordinator", "SumId", "SumParty", "SumResult", "SumSpec", "lagrange_at_zero",
    "mask_stream", "shamir_combine", "shamir_split", "trusted_peer_keys",
]
