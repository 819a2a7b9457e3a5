"""The auditor's ε: recomputed from the signed log's release parameters, by two implementations.

* **Primary:** Google's ``dp_accounting`` RDP accountant, fed with the parameters each firm logged
  in its ``dp_release`` entries (never with the firm's ledger or its arithmetic).
* **Cross-check:** Opacus's RDP analysis (``opacus/accountants/analysis/rdp.py``; Mironov, Talwar &
  Zhang 2019, the same analysis written independently). Its module needs only numpy and scipy, so it
  is loaded from its file without importing the rest of Opacus (which would pull in torch): the
  auditor's process never loads a training stack.

The two must agree within :data:`CROSS_CHECK_RTOL` wherever ε ≤ :data:`CROSS_CHECK_RANGE`; beyond
it ``dp_accounting`` leaves out fractional orders whose series does not converge in 1000 terms,
which can only make its ε larger. The per-release prefix totals use Opacus's curves, which it
returns through its public API and which add up across releases (RDP composition, Mironov 2017,
Prop. 1); each firm's final total comes from both and is compared.
"""

from __future__ import annotations

import functools
import importlib.util
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np

from fedcrm.privacy.accounting import DpEvent, Mechanism, compose_epsilon

REL_TOL = 0.01
"""Relative tolerance between a logged ε and the ε recomputed from its parameters."""

CROSS_CHECK_RTOL = 0.01
"""Relative tolerance between ``dp_accounting`` and Opacus on the same composition."""

CROSS_CHECK_RANGE = 15.0
"""Up to this ε the two implementations agree within :data:`CROSS_CHECK_RTOL`. Above it (noise so
small that the fractional-order series stops converging) ``dp_accounting`` leaves orders out and
reports a larger ε than Opacus - never a smaller one, which is the direction that matters."""

#: The RDP orders both implementations evaluate (``dp_accounting``'s default grid).
ORDERS: tuple[float, ...] = tuple(
    [1.0 + x / 10.0 for x in range(1, 100)]
    + [float(a) for a in range(11, 64)]
    + [128.0, 256.0, 512.0, 1024.0]
)


@dataclass(frozen=True)
class ReleaseParams:
    """The DP parameters of one ``dp_release`` entry."""

    mechanism: Mechanism
    noise_multiplier: float
    sample_rate: float
    steps: int
    delta: float

    @classmethod
    def from_payload(cls, payload: Mapping[str, Any]) -> ReleaseParams:
        return cls(
            mechanism=Mechanism(payload["mechanism"]),
            noise_multiplier=float(payload["noise_multiplier"]),
            sample_rate=float(payload["sample_rate"]),
            steps=int(payload["steps"]),
            delta=float(payload["delta"]),
        )

    def event(self) -> DpEvent:
        """As a privacy event (validated: a zero noise multiplier or a bad rate is refused)."""
        return DpEvent(
            mechanism=self.mechanism, noise_multiplier=self.noise_multiplier,
            sample_rate=self.sample_rate, steps=self.steps, delta=self.delta, epsilon=0.0,
            purpose="audit", timestamp="1970-01-01T00:00:00+00:00",
        )


@functools.cache
def opacus_rdp() -> ModuleType:
    """Opacus's RDP analysis module, loaded from its file (numpy/scipy only; no torch)."""
    spec = importlib.util.find_spec("opacus")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("opacus is not installed; the auditor's ε cross-check needs it")
    path = f"{next(iter(spec.submodule_search_locations))}/accountants/analysis/rdp.py"
    module_spec = importlib.util.spec_from_file_location("_fedcrm_opacus_rdp", path)
    if module_spec is None or module_spec.loader is None:
        raise ImportError(f"cannot load Opacus's RDP analysis from {path}")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


@functools.lru_cache(maxsize=1024)
def _opacus_curve(params: ReleaseParams) -> tuple[float, ...]:
    """RDP ε(α) of one release at :data:`ORDERS` by Opacus (cached: runs repeat parameters)."""
    q = 1.0 if params.mechanism is Mechanism.GAUSSIAN else params.sample_rate
    curve = opacus_rdp().compute_rdp(
        q=q, noise_multiplier=params.noise_multiplier, steps=params.steps, orders=list(ORDERS)
    )
    return tuple(float(x) for x in np.atleast_1d(curve))


def _opacus_epsilon(curve: np.ndarray, delta: float) -> float:
    if not np.any(curve):
        return 0.0
    eps, _ = opacus_rdp().get_privacy_spent(orders=list(ORDERS), rdp=curve, delta=delta)
    return float(eps)


def release_epsilon(params: ReleaseParams) -> float:
    """ε of one release alone at its own δ (``dp_accounting``)."""
    return compose_epsilon([params.event()], delta=params.delta)


def matches_logged(logged: float, params: ReleaseParams) -> tuple[bool, float]:
    """Whether a logged per-release ε follows from the logged parameters; and the recomputed ε."""
    ref = release_epsilon(params)
    return abs(logged - ref) <= REL_TOL * max(ref, 1e-12), ref


class PrefixEpsilon:
    """Cumulative ε after each release of one log, as the scan goes (Opacus curves, summed)."""

    def __init__(self) -> None:
        self._curve = np.zeros(len(ORDERS))
        self.releases: list[ReleaseParams] = []

    def add(self, params: ReleaseParams, *, delta: float) -> float:
        self.releases.append(params)
        self._curve = self._curve + np.asarray(_opacus_curve(params))
        return _opacus_epsilon(self._curve, delta)


@dataclass(frozen=True)
class CrossCheck:
    """One firm's total ε by both implementations."""

    dp_accounting: float
    opacus: float

    @property
    def agrees(self) -> bool:
        """dp_accounting never below Opacus; above it by at most the tolerance (ε ≤ 15)."""
        a, b = self.dp_accounting, self.opacus
        if math.isinf(a) or math.isinf(b):
            return math.isinf(a)
        not_lower = a >= b * (1 - CROSS_CHECK_RTOL)
        return not_lower and (a <= b * (1 + CROSS_CHECK_RTOL) or b > CROSS_CHECK_RANGE)


def cross_check(releases: Sequence[ReleaseParams], *, delta: float) -> CrossCheck:
    """The composed ε of ``releases`` at ``delta`` by ``dp_accounting`` and by Opacus."""
    curve = np.zeros(len(ORDERS))
    for params in releases:
        curve = curve + np.asarray(_opacus_curve(params))
    return CrossCheck(
        dp_accounting=compose_epsilon([r.event() for r in releases], delta=delta),
        opacus=_opacus_epsilon(curve, delta),
    )
