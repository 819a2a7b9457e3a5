"""Checks every firm's update must pass before it reaches aggregation (no Flower in here)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def validate_update(
    global_arrays: Sequence[np.ndarray],
    update: Sequence[np.ndarray],
    *,
    max_update_norm: float,
) -> str | None:
    """Return why ``update`` must be rejected, or ``None`` when it is acceptable.

    An update is rejected unless it has the global model's number of arrays, each with the same
    shape and dtype, every value finite, and an L2 distance from the global model of at most
    ``max_update_norm``.
    """
    if len(update) != len(global_arrays):
        return f"has {len(update)} arrays, the global model has {len(global_arrays)}"
    sq = 0.0
    for i, (g, u) in enumerate(zip(global_arrays, update, strict=True)):
        if u.shape != g.shape:
            return f"array {i} has shape {u.shape}, expected {g.shape}"
        if u.dtype != g.dtype:
            return f"array {i} has dtype {u.dtype}, expected {g.dtype}"
        if not np.all(np.isfinite(u)):
            return f"array {i} contains NaN or infinite values"
        sq += float(np.sum((u.astype(np.float64) - g.astype(np.float64)) ** 2))
    norm = float(np.sqrt(sq))
    if norm > max_update_norm:
        return f"update norm {norm:.3g} exceeds the bound {max_update_norm:g}"
    return None
