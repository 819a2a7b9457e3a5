"""The customer-overlap count between two firms: its spec (``overlap.toml``) and its noise plan.

An overlap file::

    [overlap]
    name = "telco_shared_customers"
    firms = ["firm1", "firm2"]   # the two firms whose shared customers are counted
    key = "phone"                # the kind of match key both firms declare ([overlap] column)
    epsilon = 1.0                # what the count may spend at EACH of the two firms
    delta = 1e-6

**Noise.** Each firm adds ``k = offset + Z`` dummy keys that are sure to match, ``Z`` a discrete
Gaussian of standard deviation ``σ`` (sensitivity 1: adding or removing one of the firm's
customers changes the count by at most one), clamped to ``[-offset, offset]`` so that ``k``
fits the public allowance ``2·offset`` of dummy slots. ``σ`` makes the count ``(ε, δ_G)``-DP for
``δ_G = (1 - TRUNCATION_SHARE)·δ`` from the firm's noise alone; the clamp changes the output only
when ``|Z| > offset``, with probability ``τ ≤ 2·exp(-(offset+1)²/(2σ²))`` (the discrete Gaussian
is σ²-subgaussian, Canonne, Kamath & Steinke 2020), which costs ``(1 + e^ε)·τ`` more δ; ``offset``
is the smallest that keeps that below ``TRUNCATION_SHARE·δ``. The coordinator subtracts both
public offsets; the estimate's noise variance is the sum of both firms' ``σ²``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from fedcrm.privacy.accounting import calibrate_noise
from fedcrm.privacy.errors import ConfigError
from fedcrm.privacy.keys import check_firm_name
from fedcrm.privacy.match_keys import MATCH_KEY_KINDS
from fedcrm.privacy.policies import PiiKind

#: The share of the overlap's δ that pays for clamping the noise to the public allowance.
TRUNCATION_SHARE = 0.1

_FROZEN = ConfigDict(frozen=True, extra="forbid")


class OverlapSpec(BaseModel):
    """``[overlap]``: which two firms, on which kind of key, at what ε and δ per firm."""

    model_config = _FROZEN

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]{0,60}$")
    firms: tuple[str, str]
    key: PiiKind
    epsilon: float = Field(gt=0, le=10, allow_inf_nan=False)
    delta: float = Field(default=1e-6, gt=0, le=1e-3)

    @field_validator("firms")
    @classmethod
    def _two_firms(cls, firms: tuple[str, str]) -> tuple[str, str]:
        for firm in firms:
            try:
                check_firm_name(firm)
            except Exception as exc:
                raise ValueError(str(exc)) from None
        if firms[0] == firms[1]:
            raise ValueError("an overlap is counted between two different firms")
        return firms

    @field_validator("key")
    @classmethod
    def _key_kind(cls, key: PiiKind) -> PiiKind:
        if key not in MATCH_KEY_KINDS:
            raise ValueError(
                f"'{key.value}' cannot be a match key; use one of "
                f"{', '.join(sorted(k.value for k in MATCH_KEY_KINDS))}"
            )
        return key

    def canonical_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))

    def fingerprint(self) -> str:
        return hashlib.sha256(self.canonical_json().encode()).hexdigest()

    def peer_of(self, firm: str) -> str | None:
        """The other firm, or None when ``firm`` is not a party."""
        if firm not in self.firms:
            return None
        return self.firms[1] if firm == self.firms[0] else self.firms[0]

    def noise(self) -> OverlapNoise:
        return overlap_noise(self.epsilon, self.delta)

    @classmethod
    def from_json(cls, text: str) -> OverlapSpec:
        try:
            return cls.model_validate(json.loads(text))
        except (ValueError, ValidationError) as exc:
            raise ConfigError(f"malformed overlap from the coordinator: {exc}") from None


@dataclass(frozen=True)
class OverlapNoise:
    """Each firm's noise for one overlap (see the module docstring); all public."""

    noise_std: float  # σ of each firm's discrete Gaussian (sensitivity 1)
    offset: int  # dummies each firm adds before its noise; subtracted by the coordinator
    allowance: int  # dummy slots each firm pads to: 2·offset
    gaussian_delta: float  # δ the Gaussian is calibrated for
    truncation_delta: float  # (1 + e^ε)·τ, the δ the clamp costs (≤ TRUNCATION_SHARE·δ)


def _truncation_delta(epsilon: float, sigma: float, offset: int) -> float:
    tau = 2.0 * math.exp(-((offset + 1) ** 2) / (2.0 * sigma**2))
    return (1.0 + math.exp(epsilon)) * tau


@functools.lru_cache(maxsize=64)
def overlap_noise(epsilon: float, delta: float) -> OverlapNoise:
    """The noise plan of an overlap at ``(epsilon, delta)`` per firm."""
    gaussian_delta = (1.0 - TRUNCATION_SHARE) * delta
    sigma = calibrate_noise(target_epsilon=epsilon, delta=gaussian_delta, sample_rate=1.0,
                            steps=1)
    budget = TRUNCATION_SHARE * delta
    offset = max(1, math.ceil(sigma * math.sqrt(2.0 * math.log(2.0 * (1.0 + math.exp(epsilon))
                                                               / budget))) - 1)
    while _truncation_delta(epsilon, sigma, offset) > budget:  # pragma: no cover - float edge
        offset += 1
    return OverlapNoise(
        noise_std=sigma, offset=offset, allowance=2 * offset, gaussian_delta=gaussian_delta,
        truncation_delta=_truncation_delta(epsilon, sigma, offset),
    )


def padded_length(public_size: int, noise: OverlapNoise) -> int:
    """How many blinded values a firm sends: its public size plus the dummy allowance."""
    return public_size + noise.allowance
