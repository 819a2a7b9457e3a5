"""A firm as a party to secure sums: its own checks, one answer per step, a signed record.

:class:`SecureSumParty` wraps the protocol's :class:`~fedcrm.privacy.secure_sum.SumParty` with
what the firm decides on its own machine (the protocol itself is described in
:mod:`fedcrm.privacy.secure_sum`):

* **Keys it trusts.** A peer's secure-sum key counts only if it is signed by the signing key the
  firm holds for that peer in its ``[federation] peer_keys_dir`` (exchanged out of band), never by
  a key the coordinator sent; per-sum keys likewise.
* **One answer per step.** Before anything leaves, each step of a sum is claimed by a file created
  exclusively and fsynced (``<state_dir>/secure-sum/<sum>.<step>.json``). A second request for the
  same step - a replay, a retry, a coordinator fishing for a second masked vector or for both
  shares of one peer - is refused, also after a restart. Steps 2 and 3 must follow the firm's own
  step 1 (and 2) of the same spec, with the same list of firms that shared.
* **A signed record.** Each masked input and each unmask is an entry of the firm's audit log
  (``secure_sum``: the sum's id, its spec hash, vector length, range and scale, and the peers),
  so the auditor can match every firm the coordinator counted in a sum.

No secret is written to disk: the per-sum seeds are derived again from the firm's key at each
step; the claims hold only public values (the spec's hash, the firms, the peers' public keys).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from fedcrm.audit.log import AuditLog, EntryKind, raw_public_key
from fedcrm.privacy.durable import create_exclusive
from fedcrm.privacy.errors import SecureSumError
from fedcrm.privacy.keys import FirmKeys
from fedcrm.privacy.secure_sum import (
    AgreementKey,
    SumParty,
    SumSpec,
    survivors_statement,
    trusted_peer_keys,
)
from fedcrm.protocol import (
    SecureSumConfirmReply,
    SecureSumConfirmRequest,
    SecureSumKeysReply,
    SecureSumKeysRequest,
    SecureSumMaskReply,
    SecureSumMaskRequest,
    SecureSumShareReply,
    SecureSumShareRequest,
    SecureSumUnmaskReply,
    SecureSumUnmaskRequest,
)

STATE_FOLDER = "secure-sum"

TrustedKeys = Callable[[], Mapping[str, Ed25519PublicKey]]


class SecureSumParty:
    """One firm's answers to the secure-sum steps (see the module docstring).

    ``trusted`` returns the peers' signing keys the firm holds (called when a step needs them,
    so a firm without ``peer_keys_dir`` fails only when asked to take part); ``audit`` is the
    firm's signed log; ``state_dir`` holds the claims.
    """

    def __init__(
        self, keys: FirmKeys, *, trusted: TrustedKeys, audit: AuditLog, state_dir: Path
    ) -> None:
        self.keys = keys
        self.firm = keys.firm
        self._trusted = trusted
        self.audit = audit
        self.state_dir = Path(state_dir) / STATE_FOLDER
        # Verified (firm, key, signature, signer) -> key: a signature checked once in this
        # process need not be checked again in the run's later sums.
        self._verified: dict[tuple[str, bytes, bytes, bytes], bytes] = {}

    # ------------------------------------------------------------------ claims

    def _claim_path(self, spec: SumSpec, step: str) -> Path:
        name = hashlib.sha256(spec.sum_id.context).hexdigest()[:40]
        return self.state_dir / f"{name}.{step}.json"

    def _claim(self, spec: SumSpec, step: str, record: dict[str, Any]) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        body = json.dumps({"spec": spec.digest(), **record}, sort_keys=True).encode()
        if not create_exclusive(self._claim_path(spec, step), body):
            raise SecureSumError(
                f"this firm already answered the {step} step of secure sum "
                f"{spec.sum_id.label()}; each step is answered once"
            )

    def _claimed(self, spec: SumSpec, step: str) -> dict[str, Any]:
        path = self._claim_path(spec, step)
        if not path.exists():
            raise SecureSumError(
                f"secure sum {spec.sum_id.label()}: this firm has not answered its {step} step"
            )
        record: dict[str, Any] = json.loads(path.read_text())
        if record.get("spec") != spec.digest():
            raise SecureSumError(
                f"secure sum {spec.sum_id.label()}: the coordinator changed the sum's spec "
                "(firms, length, range or graph) between steps"
            )
        return record

    # ------------------------------------------------------------------ keys

    def _peer_keys(self, directory: Mapping[str, AgreementKey], firms: tuple[str, ...]
                   ) -> dict[str, bytes]:
        trusted = self._trusted()
        out, unchecked = {}, []
        for firm in firms:
            entry, signer = directory.get(firm), trusted.get(firm)
            cached = None if entry is None or signer is None else self._verified.get(
                (firm, entry.public_key, entry.signature, raw_public_key(signer))
            )
            if cached is None:
                unchecked.append(firm)
            else:
                out[firm] = cached
        for firm, key in trusted_peer_keys(directory, trusted, unchecked).items():
            entry = directory[firm]
            self._verified[(firm, entry.public_key, entry.signature,
                            raw_public_key(trusted[firm]))] = key
            out[firm] = key
        return out

    def register(self, request: SecureSumKeysRequest) -> SecureSumKeysReply:
        """The firm's long-term key, signed with its Ed25519 key."""
        return SecureSumKeysReply(AgreementKey.of(self.keys))

    # ------------------------------------------------------------------ the three steps

    def share(self, request: SecureSumShareRequest) -> SecureSumShareReply:
        spec = request.query.spec
        party = SumParty(self.keys, spec)
        peers = self._peer_keys(request.peer_keys, party.neighbours)
        out = party.share(peers)
        self._claim(spec, "share", {"peers": {f: k.hex() for f, k in peers.items()}})
        return SecureSumShareReply(out)

    def mask(self, request: SecureSumMaskRequest,
             values: np.ndarray | Callable[[], np.ndarray]) -> SecureSumMaskReply:
        """Step 2 with the firm's own ``values`` (chosen by the firm, never the coordinator); a
        callable is called only after every check of the step has passed (a DP release then
        happens only for a request the firm will answer)."""
        spec = request.query.spec
        self._claimed(spec, "share")
        party = SumParty(self.keys, spec)
        peers = party.check_shared(request.shared)
        trusted = self._trusted()
        ephemerals = {}
        for v in peers:
            entry = request.ephemerals.get(v)
            if entry is None or entry.firm != v or v not in trusted:
                raise SecureSumError(
                    f"secure sum {spec.sum_id.label()}: no signed per-sum key of neighbour '{v}'"
                )
            ephemerals[v] = entry.verify(spec.sum_id, trusted[v])
        if self._claim_path(spec, "mask").exists():
            raise SecureSumError(
                f"this firm already answered the mask step of secure sum {spec.sum_id.label()}; "
                "each step is answered once"
            )
        vector = values() if callable(values) else values
        masked = party.mask(vector, ephemerals, request.shared)
        self._claim(spec, "mask", {"shared": list(request.shared)})
        self._log(spec, "mask", peers=peers, extra={
            "source": request.query.source.value, "parties": len(spec.parties),
            "threshold": party.threshold,
        })
        return SecureSumMaskReply(self.firm, masked)

    def confirm(self, request: SecureSumConfirmRequest, *,
                min_survivors: int) -> SecureSumConfirmReply:
        """The consistency step: sign the ONE list of survivors this firm accepts for the sum
        (claimed exclusively, so a coordinator can never get it to sign two lists)."""
        spec = request.query.spec
        shared = self._claimed(spec, "mask")["shared"]
        survivors = request.survivors
        if (list(survivors) != sorted(set(survivors)) or not set(survivors) <= set(shared)
                or self.firm not in survivors):
            raise SecureSumError(
                f"secure sum {spec.sum_id.label()}: the survivors must be distinct, sorted, "
                "among the firms that shared, and include this firm"
            )
        if len(survivors) < min_survivors:
            raise SecureSumError(
                f"secure sum {spec.sum_id.label()}: {len(survivors)} survivors, fewer than the "
                f"{min_survivors} this firm accepted; it confirms no such sum"
            )
        self._claim(spec, "confirm", {"survivors": list(survivors)})
        signing = self.keys.signing_key
        if signing is None:  # pragma: no cover - FirmPrivacy refuses a firm without one
            raise SecureSumError("this firm has no signing key")
        return SecureSumConfirmReply(self.firm, signing.sign(survivors_statement(spec, survivors)))

    def _check_confirmations(self, request: SecureSumUnmaskRequest) -> None:
        """Only a list this firm confirmed itself, confirmed by a strict majority of the sum's
        parties (each signs one list per sum, so two different lists can never both carry a
        majority while the signers are honest)."""
        spec = request.query.spec
        mine = self._claimed(spec, "confirm")["survivors"]
        if list(request.survivors) != mine:
            raise SecureSumError(
                f"secure sum {spec.sum_id.label()}: the survivors differ from the list this firm "
                "confirmed; nothing is revealed"
            )
        trusted = dict(self._trusted())
        if self.keys.signing_key is not None:
            trusted[self.firm] = self.keys.signing_key.public_key()
        statement = survivors_statement(spec, request.survivors)
        valid = set()
        for firm, signature in request.confirmations.items():
            key = trusted.get(firm)
            if key is None or firm not in request.survivors:
                continue
            try:
                key.verify(signature, statement)
            except InvalidSignature:
                continue
            valid.add(firm)
        needed = len(spec.parties) // 2 + 1
        if len(valid) < needed:
            raise SecureSumError(
                f"secure sum {spec.sum_id.label()}: {len(valid)} valid confirmations of the "
                f"survivors, fewer than a majority ({needed}) of the {len(spec.parties)} "
                "parties; nothing is revealed"
            )

    def unmask(self, request: SecureSumUnmaskRequest, *,
               confirmed: bool = False) -> SecureSumUnmaskReply:
        """Step 3; with ``confirmed`` (analytics sums) only for the one list of survivors this
        firm and a majority of the parties signed in the consistency step."""
        spec = request.query.spec
        if confirmed:
            self._check_confirmations(request)
        shared_before = self._claimed(spec, "mask")["shared"]
        if list(request.shared) != shared_before:
            raise SecureSumError(
                f"secure sum {spec.sum_id.label()}: the coordinator's list of firms that shared "
                "differs from the one this firm masked with; nothing is revealed"
            )
        peers = {f: bytes.fromhex(k) for f, k in self._claimed(spec, "share")["peers"].items()}
        party = SumParty(self.keys, spec)
        revealed = party.unmask(request.survivors, request.shared, request.ciphertexts, peers)
        self._claim(spec, "unmask", {"survivors": list(request.survivors)})
        self._log(spec, "unmask", peers=sorted({*revealed.mask_shares, *revealed.key_shares}),
                  extra={"mask_shares_for": sorted(revealed.mask_shares),
                         "key_shares_for": sorted(revealed.key_shares),
                         "survivors": len(request.survivors)})
        return SecureSumUnmaskReply(self.firm, revealed)

    def _log(self, spec: SumSpec, step: str, *, peers: list[str],
             extra: dict[str, Any]) -> None:
        fp = spec.fixed_point
        self.audit.append(EntryKind.SECURE_SUM, {
            "run_id": spec.sum_id.run_id, "round": spec.sum_id.round,
            "query": spec.sum_id.query, "step": step, "spec_hash": spec.digest(),
            "length": spec.length, "range": [fp.lower, fp.upper], "scale": fp.scale,
            "peers": list(peers), **extra,
        })
