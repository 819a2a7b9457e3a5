"""A firm's side of the private customer-overlap count (``fedcrm overlap``).

Two firms A and B count the customers they share on a match key each declares (``[overlap]
column``: a phone number, national id or e-mail); the coordinator relays every message and
learns only a noisy count. The protocol, with α and β each firm's fresh secret scalar and
:mod:`fedcrm.privacy.blinding` for every group operation:

1. **offer** (:func:`plan_overlap`): the firm checks its policy, that it declares a key of the
   overlap's kind, that it counts overlaps with that peer, that it has not taken part in this
   overlap id, its size and its budget - and spends nothing;
2. **blind** (:func:`blind`, the firm's one DP release through :func:`fedcrm.release.release`):
   ``X_A = shuffle({[α]H(a)} ∪ {k_A dummies} ∪ {padding})`` of the public length
   ``public_size + allowance``, signed by the firm for its peer, with the public values
   ``[α]·base`` (curve and twist). The noise is drawn only after the ledger's check;
3. **reblind** (:func:`reblind`): given the peer's signed set ``X_B``, the firm returns to the
   coordinator only ``shuffle({[α]y : y ∈ X_B} ∪ {its dummies' matches} ∪ {padding})``.

**Dummies.** A dummy is ``d = [ρ]([α]·base)`` for a fresh random ρ and a base on the curve or the
twist at random (as a hashed key falls on either): among the firm's set it looks like any
blinded key, the peer blinds it into ``[β][α][ρ]·base``, and the firm itself puts the same value
``[ρ]([α]([β]·base))`` into its step-3 list from the peer's public value - so each of its ``k``
dummies is counted once, and only the firm knows ``k``. ``k = offset + Z``, ``Z`` a discrete
Gaussian clamped to the public allowance (:mod:`fedcrm.analytics.overlap`), so each firm's noise
alone makes the count DP for its own customers, whatever the other firm adds.

Between the two steps the firm's secret state (α, the dummies' ρ) is sealed with a key derived
from its data key and removed once step 3 is sent; a repeated step is refused. The match keys
are read from the firm's own source at the time of the overlap (the prepared store holds only
masked values); they are never logged, written or sent.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from cryptography.exceptions import InvalidSignature

from fedcrm.analytics.overlap import OverlapNoise, OverlapSpec, padded_length
from fedcrm.audit.log import EntryKind
from fedcrm.data.contract import FirmConfig, TableName
from fedcrm.data.ingest import iter_chunks
from fedcrm.privacy.accounting import DpEvent
from fedcrm.privacy.blinding import (
    ELEMENT_BYTES,
    BlindingError,
    BlindingKey,
    GroupClass,
    elements_hash,
    hash_keys,
    pack,
    random_elements,
    random_groups,
    shuffled,
    unpack,
)
from fedcrm.privacy.durable import write_private
from fedcrm.privacy.encryption import seal, unseal
from fedcrm.privacy.errors import FedcrmError, KeyFileError
from fedcrm.privacy.keys import FirmKeys, load_public_key
from fedcrm.privacy.match_keys import MatchKeys, normalise_keys
from fedcrm.privacy.noise import SecureRandom, discrete_gaussian
from fedcrm.protocol import BlindedSet
from fedcrm.release import FirmPrivacy, Released, gaussian_query_event, release

log = logging.getLogger(__name__)

#: Purpose prefix of every overlap release in a firm's ledger.
OVERLAP_PURPOSE = "overlap:"
#: Where a firm keeps its sealed state between steps 2 and 3 (beside its ledger).
STATE_DIR = "overlaps"
_OVERLAP_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,100}")


class OverlapDeclined(FedcrmError):
    """The firm's policy, contract, budget or the protocol says no (one line, no data values)."""

    def __init__(self, detail: str, *, budget: bool = False) -> None:
        super().__init__(detail)
        self.budget = budget


@dataclass(frozen=True)
class OverlapPlan:
    """What taking part in one overlap will cost and send at this firm (fixed before noise)."""

    overlap_id: str
    spec: OverlapSpec
    firm: str
    peer: str
    noise: OverlapNoise
    public_size: int
    padded_length: int
    event: DpEvent


def took_part(privacy: FirmPrivacy, overlap_id: str) -> bool:
    """Whether this firm already released its blinded set for ``overlap_id`` (its ledger)."""
    return any(
        e.purpose.startswith(OVERLAP_PURPOSE) and e.context.get("overlap_id") == overlap_id
        for e in privacy.ledger.events
    )


def read_match_keys(cfg: FirmConfig) -> MatchKeys:
    """The firm's distinct normalised match keys, read from its own customers source.

    Only the declared ``[overlap] column`` is kept; blank and invalid values are skipped and
    counted (the count is logged on the firm's machine only).
    """
    kind = cfg.match_key_kind()
    assert cfg.overlap is not None
    table = cfg.tables[TableName.CUSTOMERS]
    column = cfg.overlap.column
    values: list[object] = []
    for _first_row, chunk in iter_chunks(table.source, expected_columns=len(table.columns)):
        if column not in chunk.columns:
            raise OverlapDeclined(
                f"the customers source {table.source.describe()} has no column '{column}' "
                "([overlap] column)"
            )
        values.extend(chunk[column].tolist())
    keys = normalise_keys(values, kind=kind, region=cfg.overlap.region)
    log.info("overlap match keys of firm %s: %d distinct, %d blank or invalid skipped",
             cfg.firm.name, len(keys.keys), keys.skipped)
    return keys


def plan_overlap(
    privacy: FirmPrivacy, cfg: FirmConfig, spec: OverlapSpec, *, overlap_id: str
) -> OverlapPlan:
    """Everything the firm checks before it takes part; raises :class:`OverlapDeclined`.

    Its ``[federation]`` policy (``answer_queries``, ``max_query_epsilon``), its declared match
    key and peers, its public size, that it has not taken part in this overlap id (one answer
    per overlap) and that its budget covers the release - all before any noise is drawn.
    """
    firm = cfg.firm.name
    if not _OVERLAP_ID.fullmatch(overlap_id):
        raise OverlapDeclined("the overlap id must be letters, digits, '.', '_' or '-'")
    peer = spec.peer_of(firm)
    if peer is None:
        raise OverlapDeclined(f"this firm is not a party to overlap {spec.name}")
    policy = cfg.federation
    if not policy.answer_queries:
        raise OverlapDeclined("this firm does not answer analytics queries "
                              "([federation] answer_queries = false)")
    if spec.epsilon > policy.max_query_epsilon + 1e-12:
        raise OverlapDeclined(
            f"the overlap asks ε={spec.epsilon:g}; this firm answers queries of at most "
            f"ε={policy.max_query_epsilon:g} ([federation] max_query_epsilon)"
        )
    if cfg.overlap is None:
        raise OverlapDeclined("this firm declares no match key ([overlap] column)")
    kind = cfg.match_key_kind()
    if kind is not spec.key:
        raise OverlapDeclined(
            f"the overlap matches on {spec.key.value}; this firm's match key is {kind.value}"
        )
    if peer not in cfg.overlap.peers:
        raise OverlapDeclined(
            f"this firm does not count its overlap with firm '{peer}' (add it under [overlap] "
            "peers with that firm's public signing key)"
        )
    if cfg.federation.public_size is None:
        raise OverlapDeclined(
            "this firm declares no [federation] public_size, the public bound its blinded set "
            "is padded to"
        )
    if took_part(privacy, overlap_id):
        raise OverlapDeclined(f"this firm already took part in overlap {overlap_id}")
    noise = spec.noise()
    event = gaussian_query_event(
        noise.noise_std, delta=privacy.delta, purpose=f"{OVERLAP_PURPOSE}{spec.name}",
        context={"overlap_id": overlap_id, "fingerprint": spec.fingerprint(), "peer": peer,
                 "offset": noise.offset, "truncation_delta": noise.truncation_delta},
    )
    if privacy.ledger.would_exceed(event):
        raise OverlapDeclined(
            f"the overlap would bring this firm's ε to {privacy.ledger.total_with(event):.4f}, "
            f"above its cap {privacy.cap:g} (spent {privacy.spent():.4f})", budget=True,
        )
    size = cfg.federation.public_size
    return OverlapPlan(
        overlap_id=overlap_id, spec=spec, firm=firm, peer=peer, noise=noise, public_size=size,
        padded_length=padded_length(size, noise), event=event,
    )


def check_size(plan: OverlapPlan, keys: MatchKeys) -> None:
    """A firm with more distinct keys than its public size refuses (its padded length would
    reveal more than the bound); the reply says so without the count."""
    if len(keys.keys) > plan.public_size:
        raise OverlapDeclined(
            "this firm has more distinct match keys than its [federation] public_size; raise "
            "public_size (a public upper bound on its customers) before counting overlaps"
        )


# ------------------------------------------------------------------------------ sealed state


@dataclass(frozen=True)
class _State:
    """What the firm keeps between its two steps: secret, sealed on disk, removed after step 3."""

    alpha: bytes
    dummies: tuple[tuple[GroupClass, bytes], ...]  # (group, ρ) per dummy
    peer: str
    fingerprint: str

    def to_bytes(self) -> bytes:
        return json.dumps({
            "alpha": self.alpha.hex(), "peer": self.peer, "fingerprint": self.fingerprint,
            "dummies": [[int(g), rho.hex()] for g, rho in self.dummies],
        }).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> _State:
        obj = json.loads(data)
        return cls(alpha=bytes.fromhex(obj["alpha"]), peer=str(obj["peer"]),
                   fingerprint=str(obj["fingerprint"]),
                   dummies=tuple((GroupClass(g), bytes.fromhex(r)) for g, r in obj["dummies"]))


def _state_path(privacy: FirmPrivacy, overlap_id: str) -> Path:
    return privacy.files.ledger.parent / STATE_DIR / f"{overlap_id}.state"


def _aad(firm: str, overlap_id: str) -> bytes:
    return f"fedcrm/overlap-state/v1/{firm}/{overlap_id}".encode()


def _write_state(privacy: FirmPrivacy, keys: FirmKeys, overlap_id: str, state: _State) -> None:
    path = _state_path(privacy, overlap_id)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    blob = seal(keys.overlap_state_key(overlap_id=overlap_id), state.to_bytes(),
                aad=_aad(privacy.firm, overlap_id))
    write_private(path, blob)


def _read_state(privacy: FirmPrivacy, keys: FirmKeys, overlap_id: str) -> _State:
    path = _state_path(privacy, overlap_id)
    if not path.exists():
        raise OverlapDeclined(
            f"this firm has no open state for overlap {overlap_id}: it already sent its matches "
            "(each overlap is answered once) or never blinded its set"
        )
    data = unseal(keys.overlap_state_key(overlap_id=overlap_id), path.read_bytes(),
                  aad=_aad(privacy.firm, overlap_id), what=str(path))
    return _State.from_bytes(data)


# ------------------------------------------------------------------------------ step 2: blind


def dummy_count(noise: OverlapNoise) -> int:
    """``offset + Z``, ``Z`` a discrete Gaussian of the plan's σ clamped to ``[-offset, offset]``
    (so the count fits the public allowance; :mod:`fedcrm.analytics.overlap` accounts the clamp).
    Drawn only inside the release, after the ledger's check."""
    z = int(discrete_gaussian(1, noise.noise_std)[0])
    return min(max(noise.offset + z, 0), noise.allowance)


@dataclass(frozen=True)
class _Blinded:
    sent: BlindedSet
    state: _State


def blind(
    privacy: FirmPrivacy, cfg: FirmConfig, keys: FirmKeys, plan: OverlapPlan,
    match_keys: MatchKeys,
) -> Released[BlindedSet]:
    """Step 2: the firm's blinded, padded, shuffled and signed set - its one DP release.

    The keys are hashed before the release (an error there spends nothing); the noise, the
    secret scalar, the dummies and the padding are drawn inside it, after the ledger's check.
    The sealed state is written before the set may leave.
    """
    check_size(plan, match_keys)
    signing_key = keys.require_signing_key(cfg.firm.keys_dir)
    hashed = hash_keys(sorted(match_keys.keys),
                       domain=f"{plan.overlap_id}/{plan.spec.key.value}".encode())
    noise = plan.noise

    def compute() -> _Blinded:
        rng = SecureRandom()
        k = dummy_count(noise)
        alpha = BlindingKey.generate()
        publics = {g: alpha.public(g) for g in GroupClass}
        rhos = [BlindingKey.generate() for _ in range(k)]
        groups = random_groups(k, rng)
        dummies = [rho.blind_one(publics[g]) for rho, g in zip(rhos, groups, strict=True)]
        pads = alpha.blind(random_elements(plan.padded_length - len(hashed) - k, rng))
        elements = pack(shuffled(alpha.blind(hashed) + dummies + pads, rng))
        unsigned = BlindedSet(
            sender=plan.firm, recipient=plan.peer, overlap_id=plan.overlap_id,
            fingerprint=plan.spec.fingerprint(), elements=elements,
            public_curve=publics[GroupClass.CURVE].hex(),
            public_twist=publics[GroupClass.TWIST].hex(),
        )
        signature = signing_key.sign(unsigned.signed_message()).hex()
        sent = dataclasses.replace(unsigned, signature=signature)
        state = _State(alpha=alpha.secret(), peer=plan.peer, fingerprint=plan.spec.fingerprint(),
                       dummies=tuple((g, rho.secret()) for g, rho in
                                     zip(groups, rhos, strict=True)))
        return _Blinded(sent=sent, state=state)

    released = release(
        privacy, plan.event, compute,
        funded=lambda b: (EntryKind.OVERLAP_BLINDED, {
            "overlap_id": plan.overlap_id, "overlap": plan.spec.name,
            "fingerprint": plan.spec.fingerprint(), "peer": plan.peer,
            "padded_length": plan.padded_length, "sent_hash": elements_hash(b.sent.elements),
        }),
    )
    _write_state(privacy, keys, plan.overlap_id, released.value.state)
    return Released(value=released.value.sent, event=released.event,
                    epsilon_total=released.epsilon_total, audit_head=released.audit_head)


# ------------------------------------------------------------------------------ step 3: reblind


def _peer_key_check(cfg: FirmConfig, peer_set: BlindedSet, peer: str) -> None:
    assert cfg.overlap is not None
    path = cfg.overlap.peers.get(peer)
    if path is None:
        raise OverlapDeclined(f"this firm declares no public key for firm '{peer}'")
    try:
        public = load_public_key(path)
    except KeyFileError as exc:
        raise OverlapDeclined(f"firm '{peer}''s public key ([overlap] peers): {exc}") from None
    try:
        public.verify(bytes.fromhex(peer_set.signature), peer_set.signed_message())
    except (InvalidSignature, ValueError):
        raise OverlapDeclined(
            f"the set relayed as firm '{peer}''s does not carry that firm's signature for this "
            "overlap; this firm blinds only what its declared peer signed"
        ) from None


def _public_value(text: str) -> bytes:
    try:
        value = bytes.fromhex(text)
    except ValueError:
        value = b""
    if len(value) != ELEMENT_BYTES:
        raise OverlapDeclined("the peer's public values are not 32-byte hex")
    return value


def reblind(
    privacy: FirmPrivacy, cfg: FirmConfig, keys: FirmKeys, spec: OverlapSpec,
    peer_set: BlindedSet,
) -> np.ndarray:
    """Step 3: the peer's signed set blinded again, with this firm's dummies' matches and its
    padding, shuffled; for the coordinator only. Refused unless the set is the declared peer's,
    signed by it for this firm, this overlap id and this spec, and only once per overlap."""
    firm = cfg.firm.name
    overlap_id = peer_set.overlap_id
    peer = spec.peer_of(firm)
    if peer is None:
        raise OverlapDeclined(f"this firm is not a party to overlap {spec.name}")
    if peer_set.sender == firm:
        raise OverlapDeclined("the set relayed to this firm is its own; it blinds only its "
                              "peer's set")
    if (peer_set.sender != peer or peer_set.recipient != firm
            or peer_set.fingerprint != spec.fingerprint()):
        raise OverlapDeclined(
            f"the set relayed for overlap {overlap_id} is not one firm '{peer}' addressed to "
            "this firm for this overlap"
        )
    if cfg.overlap is None:
        raise OverlapDeclined("this firm declares no match key ([overlap] column)")
    _peer_key_check(cfg, peer_set, peer)
    if not took_part(privacy, overlap_id):
        raise OverlapDeclined(f"this firm has not blinded its own set for overlap {overlap_id}")
    state = _read_state(privacy, keys, overlap_id)
    if state.peer != peer or state.fingerprint != spec.fingerprint():
        raise OverlapDeclined(f"overlap {overlap_id} was blinded for another peer or spec")
    noise = spec.noise()
    alpha = BlindingKey.from_secret(state.alpha)
    rng = SecureRandom()
    try:
        received = unpack(peer_set.elements)
        matched_bases = {
            GroupClass.CURVE: alpha.blind_one(_public_value(peer_set.public_curve)),
            GroupClass.TWIST: alpha.blind_one(_public_value(peer_set.public_twist)),
        }
        reblinded = alpha.blind(received)
    except BlindingError as exc:
        raise OverlapDeclined(f"the peer's set is malformed: {exc}") from None
    dummies = [BlindingKey.from_secret(rho).blind_one(matched_bases[g])
               for g, rho in state.dummies]
    pads = alpha.blind(random_elements(noise.allowance - len(dummies), rng))
    out = pack(shuffled(reblinded + dummies + pads, rng))
    privacy.audit.append(EntryKind.OVERLAP_REBLINDED, {
        "overlap_id": overlap_id, "overlap": spec.name, "peer": peer,
        "received_hash": elements_hash(peer_set.elements), "length": len(out),
        "sent_hash": elements_hash(out),
    })
    _state_path(privacy, overlap_id).unlink()
    return out
