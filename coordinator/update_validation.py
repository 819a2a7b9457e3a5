"""Checks every firm's update must pass before it reaches aggregation (no Flower in here).

Two bounds on how far an update may move the global model (its L2 distance from it):

* ``max_update_norm``, absolute: a firm's DP update has a predictable size (its step is the
  clipped gradient plus Gaussian noise of public scale), so anything far above it is an error or
  an attack;
* ``max_update_norm_ratio``, relative to the round: an update farther than ``ratio`` times the
  MEDIAN distance of the round's well-formed updates is rejected. With honest firms in the
  majority the median is an honest firm's distance, so an update boosted ×100 (the "model
  replacement" attack of Bagdasaryan et al. 2020, "How To Backdoor Federated Learning") is
  rejected whatever its absolute size, while the honest spread passes. That spread depends on
  the firms' sizes: a firm with fewer customers than the batch size divides the same clipped,
  noised sum by a smaller batch, so its DP update is larger (Telco, 5 firms, ε = 1: the largest
  honest distance in a round was 1.49× the round's median on one split, 4.54× on a split with
  a 66-customer firm; ``benchmarks/results/security_tuning.json``). The default ratio 10 leaves
  twice the worst of these; an update boosted ×100 is still 50× or more. It needs at least
  :data:`MIN_UPDATES_FOR_RATIO` updates (with two, the median is their mean).

Neither catches an update of ordinary size pointing the wrong way (a sign flip, a firm that
trains on flipped labels): that is what the robust strategies (``fedmedian``,
``trimmed_mean``, ``krum``) are for.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

#: The relative bound applies only when the round has at least this many well-formed updates.
MIN_UPDATES_FOR_RATIO = 3


def update_distance(global_arrays: Sequence[np.ndarray], update: Sequence[np.ndarray]) -> float:
    """L2 distance of ``update`` from the global model (float64)."""
    return float(np.sqrt(sum(
        float(np.sum((np.asarray(u, np.float64) - np.asarray(g, np.float64)) ** 2))
        for g, u in zip(global_arrays, update, strict=True)
    )))


def _structure_problem(
    global_arrays: Sequence[np.ndarray], update: Sequence[np.ndarray]
) -> str | None:
    if len(update) != len(global_arrays):
        return f"has {len(update)} arrays, the global model has {len(global_arrays)}"
    for i, (g, u) in enumerate(zip(global_arrays, update, strict=True)):
        if u.shape != g.shape:
            return f"array {i} has shape {u.shape}, expected {g.shape}"
        if u.dtype != g.dtype:
            return f"array {i} has dtype {u.dtype}, expected {g.dtype}"
        if not np.all(np.isfinite(u)):
            return f"array {i} contains NaN or infinite values"
    return None


@dataclass(frozen=True)
class NormBound:
    """The largest distance from the global model an update may have in one round, and why."""

    value: float
    why: str = ""


def round_norm_bound(
    global_arrays: Sequence[np.ndarray],
    updates: Sequence[Sequence[np.ndarray]],
    *,
    max_update_norm: float,
    max_update_norm_ratio: float,
) -> NormBound:
    """The round's bound: ``max_update_norm``, or ``max_update_norm_ratio`` × the median distance
    of the round's well-formed ``updates`` when that is smaller (``ratio`` 0: absolute only)."""
    absolute = NormBound(max_update_norm)
    if max_update_norm_ratio <= 0:
        return absolute
    distances = [update_distance(global_arrays, u) for u in updates
                 if _structure_problem(global_arrays, u) is None]
    if len(distances) < MIN_UPDATES_FOR_RATIO:
        return absolute
    median = float(np.median(distances))
    relative = max_update_norm_ratio * median
    if relative >= max_update_norm:
        return absolute
    return NormBound(
        relative, f" ({max_update_norm_ratio:g} × the round's median update norm {median:.3g})"
    )


def validate_update(
    global_arrays: Sequence[np.ndarray],
    update: Sequence[np.ndarray],
    *,
    max_update_norm: float | NormBound,
) -> str | None:
    """Return why ``update`` must be rejected, or ``None`` when it is acceptable.

    An update is rejected unless it has the global model's number of arrays, each with the same
    shape and dtype, every value finite, and an L2 distance from the global model of at most
    the bound (``max_update_norm``, or the round's :func:`round_norm_bound`).
    """
    bound = max_update_norm if isinstance(max_update_norm, NormBound) else NormBound(
        max_update_norm)
    problem = _structure_problem(global_arrays, update)
    if problem is not None:
        return problem
    norm = update_distance(global_arrays, update)
    if norm > bound.value:
        return f"update norm {norm:.3g} exceeds the bound {bound.value:.3g}{bound.why}"
    return None
