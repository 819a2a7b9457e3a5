"""DP gradient-boosted trees for churn: histograms, split choice, Newton leaves, prediction.

numpy only (no torch): a firm computes gradient/hessian sums, whoever grows the trees (the
coordinator of a federation, or the firm itself for ``fedcrm train``) sums the noisy sums and
chooses; both sides run the functions of this module, so a local model is a federation of one.

The design follows Maddock, Cormode, Wang, Maple & Jha, "Federated Boosted Decision Trees with
Differential Privacy" (ACM CCS 2022):

* **Newton boosting of the logistic loss** (XGBoost's update, Chen & Guestrin 2016): a customer's
  gradient ``g = p - y`` lies in ``[-1, 1]`` and hessian ``h = p(1 - p)`` in ``[0, 1/4]``; both
  are clipped to those bounds anyway, so one customer adds at most ``(1, 1/4)`` to any cell.
  A leaf's value is ``-G / (H + λ)`` from its noisy sums, shrunk by the learning rate.
* **Public split candidates**: every encoded column lies in ``[0, 1]`` (scaled by its declared
  range, or 0/1): a numeric column has ``bins`` equal-width bins, a 0/1 column two. Thresholds
  are bin edges - fixed before any data is seen, never quantiles of the data.
* **Split selection**: ``TreeSplit.RANDOM`` ("TR" in the paper) draws each node's column and
  threshold from public randomness (the run's seed), so only the leaves cost budget; the paper
  finds it often beats noisy split selection at ε ≈ 1. ``TreeSplit.HISTOGRAM`` releases, level
  by level, each node's noisy (G, H) histogram over the tree's columns and chooses the split of
  largest gain (XGBoost's gain) among the candidates.
* **Feature subsampling** (public randomness): each tree splits on ``features_per_tree``
  declared features (all columns of each: a categorical feature's one-hot columns, a numeric
  one's value and missing indicator); a node picks a feature, then one of its columns, so a
  categorical with many categories is not favoured. It keeps a histogram release's
  sensitivity small, and with one feature per tree the ensemble is an additive model of trees
  (the paper's "k = 1" feature interactions), the most robust choice with few customers.
* **Batched boosting**: each round grows ``trees_per_round`` trees on the same gradients and
  averages their leaves, so the noise of one tree's leaves is averaged out by the others.

**Sensitivity.** Per tree a customer falls in one node per level and in one bin per column, so a
level's release over a batch of trees with ``k_t`` columns each changes by at most
``sqrt(Σ_t k_t · (1 + 1/16))`` in L2 when one customer is added or removed; the leaves' release
by ``sqrt(trees_per_round · (1 + 1/16))``. Gaussian noise of standard deviation
``noise_multiplier · sensitivity`` is added to every cell (:func:`privatise`). Every step of a
run is fixed in advance by :class:`TreeSchedule`, so the whole ensemble's budget is planned up
front (:func:`fedcrm.release.plan_trees`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from fedcrm.learning.settings import TreeSettings, TreeSplit
from fedcrm.privacy.durable import write_private
from fedcrm.privacy.errors import ConfigError
from fedcrm.privacy.noise import SecureRandom, gaussian

TREES_FORMAT = "fedcrm/churn-trees/v1"

#: Bounds of one customer's gradient and hessian of the logistic loss (clipped to them).
G_MAX = 1.0
H_MAX = 0.25
#: L2 norm of one customer's (g, h) in one cell at most.
CELL_SENSITIVITY = math.hypot(G_MAX, H_MAX)
#: A leaf's Newton step is clipped to this (post-processing: a leaf whose noisy hessian is near
#: zero would otherwise take an arbitrarily large step).
MAX_LEAF = 2.0
#: The hessian regulariser λ, in units of the noise's standard deviation on one summed cell:
#: a leaf whose hessian is buried in noise is shrunk towards 0 (chosen on development data).
NOISE_REGULARISER = 1.0
#: λ without noise (XGBoost's default), and its floor with noise.
MIN_REGULARISER = 1.0

_STRUCTURE = 0x74726565  # "tree": domain-separates the public randomness of tree structure


def digitize(x: np.ndarray, bins: np.ndarray) -> np.ndarray:
    """Bin index of every value: column ``j`` of ``x`` (in [0, 1]) into ``bins[j]`` equal-width
    bins (``int16 [n, dim]``). A threshold ``k`` sends a customer right when its bin is ``>= k``."""
    x = np.asarray(x, dtype=np.float64)
    b = np.asarray(bins, dtype=np.int64)
    return np.clip(np.floor(x * b), 0, b - 1).astype(np.int16)


# ------------------------------------------------------------------------------ the schedule


@dataclass(frozen=True)
class TreeStep:
    """One release of a run: the histograms of ``level`` for the round's trees, or their leaves
    (``level == depth``)."""

    round: int
    level: int


@dataclass(frozen=True)
class TreeSchedule:
    """Everything about a DP tree run that is public and fixed before any data is seen: the
    settings, the split candidates (``bins`` per encoded column), each tree's columns and, in
    ``RANDOM`` mode, each tree's structure, all from ``seed``; the sequence of releases and each
    release's size and sensitivity."""

    settings: TreeSettings
    bins: tuple[int, ...]
    groups: tuple[int, ...]  # the declared feature each column encodes (one-hot columns share)
    seed: int

    def __post_init__(self) -> None:
        if not self.bins or min(self.bins) < 2:
            raise ConfigError("every column of a tree model needs at least 2 candidate bins")
        if len(self.groups) != len(self.bins):
            raise ConfigError("every column of a tree model needs its feature group")

    @property
    def dim(self) -> int:
        return len(self.bins)

    @property
    def depth(self) -> int:
        return self.settings.depth

    @property
    def per_round(self) -> int:
        return self.settings.trees_per_round

    def batch(self, round: int) -> range:
        """The trees grown in ``round`` (1-based)."""
        return range((round - 1) * self.per_round, round * self.per_round)

    @cached_property
    def _group_ids(self) -> np.ndarray:
        return np.unique(np.asarray(self.groups))

    def features(self, tree: int) -> np.ndarray:
        """The declared features (groups) tree ``tree`` may split on, from public randomness."""
        ids = self._group_ids
        k = self.settings.features_per_tree
        if k <= 0 or k >= len(ids):
            return ids
        rng = np.random.default_rng([self.seed, tree, _STRUCTURE, 0])
        return np.sort(rng.choice(ids, size=k, replace=False))

    def columns(self, tree: int) -> np.ndarray:
        """The columns of the features tree ``tree`` may split on (sorted)."""
        return np.flatnonzero(np.isin(np.asarray(self.groups), self.features(tree)))

    @cached_property
    def steps(self) -> tuple[TreeStep, ...]:
        """Every release of the run, in order."""
        levels = (range(self.depth + 1) if self.settings.split is TreeSplit.HISTOGRAM
                  else (self.depth,))
        return tuple(TreeStep(r, level) for r in range(1, self.settings.rounds + 1)
                     for level in levels)

    @property
    def level_releases(self) -> int:
        return sum(1 for s in self.steps if s.level < self.depth)

    @property
    def leaf_releases(self) -> int:
        return sum(1 for s in self.steps if s.level == self.depth)

    def cells(self, step: TreeStep) -> int:
        """How many (G, H) cells the release of ``step`` has."""
        if step.level == self.depth:
            return self.per_round * 2**self.depth
        return sum(2**step.level * int(np.sum(np.asarray(self.bins)[self.columns(t)]))
                   for t in self.batch(step.round))

    def sensitivity(self, step: TreeStep) -> float:
        """L2 sensitivity of ``step``'s release to adding or removing one customer."""
        if step.level == self.depth:
            touched = self.per_round
        else:
            touched = sum(len(self.columns(t)) for t in self.batch(step.round))
        return CELL_SENSITIVITY * math.sqrt(touched)

    def random_structure(self, tree: int) -> tuple[np.ndarray, np.ndarray]:
        """A totally random tree: each node's feature (among the tree's), column (among the
        feature's) and threshold (``1 .. bins - 1``), from public randomness."""
        rng = np.random.default_rng([self.seed, tree, _STRUCTURE, 1])
        groups = np.asarray(self.groups)
        nodes = 2**self.depth - 1
        chosen = rng.choice(self.features(tree), size=nodes)
        features = np.array(
            [rng.choice(np.flatnonzero(groups == g)) for g in chosen], dtype=np.int32
        )
        bins = np.asarray(self.bins)[features]
        thresholds = (1 + np.floor(rng.random(nodes) * (bins - 1))).astype(np.int32)
        return features, thresholds


# ------------------------------------------------------------------------------ the ensemble


@dataclass
class TreeEnsemble:
    """Complete binary trees of one depth in heap order (node ``i`` has children ``2i+1`` and
    ``2i+2``; a customer goes right when its bin of the node's column is ``>= threshold``).
    ``features == -1`` marks a node not chosen yet (a tree being grown)."""

    bins: np.ndarray  # int32 [dim]: candidate bins per column
    depth: int
    base: float = 0.0  # the initial logit
    features: np.ndarray = field(default_factory=lambda: np.zeros((0, 1), np.int32))
    thresholds: np.ndarray = field(default_factory=lambda: np.zeros((0, 1), np.int32))
    leaves: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), np.float64))

    @classmethod
    def empty(cls, bins: Sequence[int], depth: int) -> TreeEnsemble:
        nodes = 2**depth - 1
        return cls(np.asarray(bins, dtype=np.int32), depth, 0.0,
                   np.zeros((0, nodes), np.int32), np.zeros((0, nodes), np.int32),
                   np.zeros((0, 2**depth), np.float64))

    @property
    def n_trees(self) -> int:
        return int(self.features.shape[0])

    def first(self, count: int) -> TreeEnsemble:
        """The ensemble of the first ``count`` trees (e.g. those finished before a round)."""
        return TreeEnsemble(self.bins.copy(), self.depth, self.base,
                            self.features[:count].copy(), self.thresholds[:count].copy(),
                            self.leaves[:count].copy())

    def add_trees(self, count: int) -> None:
        """Append ``count`` trees with no node chosen and zero leaves."""
        nodes, leaves = 2**self.depth - 1, 2**self.depth
        self.features = np.vstack([self.features, np.full((count, nodes), -1, np.int32)])
        self.thresholds = np.vstack([self.thresholds, np.zeros((count, nodes), np.int32)])
        self.leaves = np.vstack([self.leaves, np.zeros((count, leaves), np.float64)])

    def nodes(self, xb: np.ndarray, trees: range, level: int) -> np.ndarray:
        """Each customer's node at ``level`` (0 .. 2**level - 1) in each of ``trees``:
        ``int64 [n, len(trees)]``."""
        n = xb.shape[0]
        heap = np.zeros((n, len(trees)), dtype=np.int64)
        if len(trees) == 0:
            return heap
        features = self.features[trees.start:trees.stop]
        thresholds = self.thresholds[trees.start:trees.stop]
        cols = np.arange(len(trees))
        rows = np.arange(n)[:, None]
        for _ in range(level):
            f = features[cols, heap]
            right = xb[rows, f] >= thresholds[cols, heap]
            heap = 2 * heap + 1 + right
        return heap - (2**level - 1)

    def logits(self, xb: np.ndarray, trees: range | None = None) -> np.ndarray:
        """``base`` plus the leaves of ``trees`` (default: all) for binned features ``xb``."""
        trees = range(self.n_trees) if trees is None else trees
        out = np.full(xb.shape[0], self.base, dtype=np.float64)
        if len(trees):
            leaf = self.nodes(xb, trees, self.depth)
            out += self.leaves[trees.start:trees.stop][np.arange(len(trees)), leaf].sum(axis=1)
        return out

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        """Churn probability per row of encoded features ``x`` (float64 ``[n]``)."""
        x = np.asarray(x)
        if x.ndim != 2 or x.shape[1] != len(self.bins):
            raise ConfigError(
                f"the tree model expects {len(self.bins)} feature columns, got "
                f"{x.shape[1] if x.ndim == 2 else x.shape}; use a model trained for this schema"
            )
        return 1.0 / (1.0 + np.exp(-self.logits(digitize(x, self.bins))))

    # -------------------------------------------------------------- arrays (wire and file)

    def to_arrays(self) -> list[np.ndarray]:
        """``[bins, depth+base, features, thresholds, leaves]``: what travels and is saved."""
        return [self.bins.astype(np.int32), np.array([self.depth, self.base], np.float64),
                self.features.astype(np.int32), self.thresholds.astype(np.int32),
                self.leaves.astype(np.float64)]

    @classmethod
    def from_arrays(cls, arrays: Sequence[np.ndarray], *, complete: bool = True) -> TreeEnsemble:
        """The ensemble of :meth:`to_arrays`, validated: shapes agree, every chosen node names a
        column and a threshold inside its candidates, leaves are finite; ``complete`` requires
        every node chosen."""
        if len(arrays) != 5:
            raise ConfigError(f"a tree model has 5 arrays, got {len(arrays)}")
        bins, header, features, thresholds, leaves = (np.asarray(a) for a in arrays)
        if bins.ndim != 1 or header.shape != (2,) or not np.all(np.isfinite(header)):
            raise ConfigError("a tree model's bins or header are malformed")
        depth = int(header[0])
        if depth != header[0] or not 1 <= depth <= 8 or np.any(bins < 2):
            raise ConfigError("a tree model's depth or candidate bins are out of range")
        n = features.shape[0] if features.ndim == 2 else -1
        if (features.shape != (n, 2**depth - 1) or thresholds.shape != features.shape
                or leaves.shape != (n, 2**depth)):
            raise ConfigError("a tree model's node and leaf arrays do not match its depth")
        if not np.all(np.isfinite(leaves)):
            raise ConfigError("a tree model has a non-finite leaf value")
        chosen = features >= 0
        if complete and not chosen.all():
            raise ConfigError("a tree model has nodes without a split")
        if np.any(features >= len(bins)):
            raise ConfigError("a tree model splits on a column outside its layout")
        limit = np.where(chosen, bins[np.where(chosen, features, 0)], 2)
        if np.any(chosen & ((thresholds < 1) | (thresholds >= limit))):
            raise ConfigError("a tree model has a threshold outside its public candidates")
        return cls(bins.astype(np.int32), depth, float(header[1]), features.astype(np.int32),
                   thresholds.astype(np.int32), leaves.astype(np.float64))


# ------------------------------------------------------------------------------ firm side


def gradients(ensemble: TreeEnsemble, xb: np.ndarray, y: np.ndarray,
              trees: range) -> tuple[np.ndarray, np.ndarray]:
    """Each customer's clipped gradient and hessian of the logistic loss at the logits of
    ``trees``."""
    p = 1.0 / (1.0 + np.exp(-ensemble.logits(xb, trees)))
    g = np.clip(p - np.asarray(y, dtype=np.float64), -G_MAX, G_MAX)
    h = np.clip(p * (1.0 - p), 0.0, H_MAX)
    return g, h


def step_statistics(schedule: TreeSchedule, ensemble: TreeEnsemble, xb: np.ndarray,
                    y: np.ndarray, step: TreeStep) -> np.ndarray:
    """The exact (G, H) sums a firm releases for ``step`` (``float64 [cells, 2]``), before noise.

    ``ensemble`` holds the finished trees of earlier rounds and this round's trees with the
    levels above ``step.level`` chosen. Gradients come from the finished trees only.
    """
    batch = schedule.batch(step.round)
    g, h = gradients(ensemble, xb, y, range(0, batch.start))
    gh = np.stack([g, h], axis=1)
    if step.level == schedule.depth:
        leaf = ensemble.nodes(xb, batch, schedule.depth)
        index = leaf + 2**schedule.depth * np.arange(len(batch))[None, :]
        return _sums(index, gh, schedule.cells(step))
    node = ensemble.nodes(xb, batch, step.level)
    bins = np.asarray(schedule.bins, dtype=np.int64)
    blocks, offset = [], 0
    for i, tree in enumerate(batch):
        columns = schedule.columns(tree)
        starts = np.concatenate([[0], np.cumsum(bins[columns])[:-1]])
        width = int(bins[columns].sum())
        blocks.append(offset + node[:, i:i + 1] * width + starts[None, :] + xb[:, columns])
        offset += 2**step.level * width
    return _sums(np.concatenate(blocks, axis=1), gh, offset)


def _sums(index: np.ndarray, gh: np.ndarray, cells: int) -> np.ndarray:
    """Σ over customers of ``gh`` into each of the ``index`` cells (``[n, m]``, one row each)."""
    flat = index.ravel()
    reps = index.shape[1]
    return np.stack([
        np.bincount(flat, weights=np.repeat(gh[:, j], reps), minlength=cells) for j in (0, 1)
    ], axis=1)


def privatise(sums: np.ndarray, noise_std: float, *, rng: SecureRandom | None = None
              ) -> np.ndarray:
    """``sums`` plus independent ``N(0, noise_std²)`` on every cell, from the CSPRNG."""
    return sums + gaussian(sums.size, noise_std, rng=rng).reshape(sums.shape)


# ------------------------------------------------------------------------------ growing side


class TreeGrower:
    """Grows the ensemble from summed noisy statistics: chooses splits and leaf values.

    The coordinator of a federated run (or a firm training alone) asks for :attr:`step` with
    :meth:`request`, sums what the firms release and hands the sum to :meth:`apply` with the
    standard deviation of the summed noise (public: each firm states its own).
    """

    def __init__(self, schedule: TreeSchedule) -> None:
        self.schedule = schedule
        self.ensemble = TreeEnsemble.empty(schedule.bins, schedule.depth)
        self._next = 0

    @property
    def done(self) -> bool:
        return self._next >= len(self.schedule.steps)

    @property
    def step(self) -> TreeStep:
        return self.schedule.steps[self._next]

    def request(self) -> list[np.ndarray]:
        """The ensemble the firms need for the next step (this round's trees started)."""
        step = self.step
        batch = self.schedule.batch(step.round)
        if self.ensemble.n_trees < batch.stop:
            self.ensemble.add_trees(batch.stop - self.ensemble.n_trees)
            if self.schedule.settings.split is TreeSplit.RANDOM:
                for tree in batch:
                    f, t = self.schedule.random_structure(tree)
                    self.ensemble.features[tree], self.ensemble.thresholds[tree] = f, t
        return self.ensemble.to_arrays()

    def apply(self, sums: np.ndarray, noise_std: float) -> None:
        """Use the summed noisy statistics of the current step and move to the next one."""
        step = self.step
        expected = (self.schedule.cells(step), 2)
        if sums.shape != expected:
            raise ConfigError(f"tree statistics have shape {sums.shape}, expected {expected}")
        regulariser = max(MIN_REGULARISER, NOISE_REGULARISER * noise_std)
        if step.level == self.schedule.depth:
            self._leaves(step, sums, regulariser)
        else:
            self._splits(step, sums, regulariser)
        self._next += 1

    def _leaves(self, step: TreeStep, sums: np.ndarray, regulariser: float) -> None:
        settings = self.schedule.settings
        g = sums[:, 0].reshape(self.schedule.per_round, -1)
        h = sums[:, 1].reshape(self.schedule.per_round, -1)
        values = np.clip(-g / (np.maximum(h, 0.0) + regulariser), -MAX_LEAF, MAX_LEAF)
        batch = self.schedule.batch(step.round)
        self.ensemble.leaves[batch.start:batch.stop] = (
            values * settings.learning_rate / self.schedule.per_round
        )

    def _splits(self, step: TreeStep, sums: np.ndarray, regulariser: float) -> None:
        bins = np.asarray(self.schedule.bins)
        offset = 0
        for tree in self.schedule.batch(step.round):
            columns = self.schedule.columns(tree)
            width = int(bins[columns].sum())
            for node in range(2**step.level):
                cells = sums[offset:offset + width]
                offset += width
                column, threshold = best_split(cells, bins[columns], regulariser)
                heap = 2**step.level - 1 + node
                self.ensemble.features[tree, heap] = columns[column]
                self.ensemble.thresholds[tree, heap] = threshold


def best_split(cells: np.ndarray, bins: np.ndarray, regulariser: float) -> tuple[int, int]:
    """The (column position, threshold) of largest gain in one node's histograms.

    ``cells``: the node's (G, H) per bin, column after column (``bins[j]`` bins for column ``j``).
    XGBoost's gain ``G_L²/(H_L+λ) + G_R²/(H_R+λ) - G²/(H+λ)``, with noisy hessians clipped at 0;
    ties go to the first candidate.
    """
    best, choice, start = -np.inf, (0, 1), 0
    for j, width in enumerate(bins):
        g, h = cells[start:start + width, 0], cells[start:start + width, 1]
        start += width
        gl, hl = np.cumsum(g)[:-1], np.maximum(np.cumsum(h)[:-1], 0.0)
        gt, ht = g.sum(), max(h.sum(), 0.0)
        gr, hr = gt - gl, np.maximum(ht - np.cumsum(h)[:-1], 0.0)
        gain = gl**2 / (hl + regulariser) + gr**2 / (hr + regulariser) - gt**2 / (ht + regulariser)
        k = int(np.argmax(gain))
        if gain[k] > best:
            best, choice = float(gain[k]), (j, k + 1)
    return choice


# ------------------------------------------------------------------------------ the noise plan


@dataclass(frozen=True)
class TreeNoise:
    """Noise multipliers (noise std / sensitivity) of a run's level and leaf releases."""

    level: float
    leaf: float

    def multiplier(self, schedule: TreeSchedule, step: TreeStep) -> float:
        return self.leaf if step.level == schedule.depth else self.level

    def noise_std(self, schedule: TreeSchedule, step: TreeStep) -> float:
        return self.multiplier(schedule, step) * schedule.sensitivity(step)


def split_budget(schedule: TreeSchedule, uniform: float) -> TreeNoise:
    """Share one budget between a run's level and leaf releases.

    ``uniform`` is the noise multiplier that lets all ``R`` releases of the schedule fit the
    budget at one noise level. A Gaussian release of multiplier σ has Rényi divergence
    ``α / (2σ²)`` at every order α, so any multipliers with ``Σ 1/σ_i² = R / uniform²`` compose to
    exactly the same ε. The leaf releases get ``leaf_share`` of that sum, the level releases the
    rest; in ``RANDOM`` mode the leaves get all of it.
    """
    total = len(schedule.steps)
    levels, leaves = schedule.level_releases, schedule.leaf_releases
    if levels == 0:
        return TreeNoise(level=0.0, leaf=uniform)
    share = schedule.settings.leaf_share
    return TreeNoise(level=uniform * math.sqrt(levels / (total * (1 - share))),
                     leaf=uniform * math.sqrt(leaves / (total * share)))


def grow_alone(schedule: TreeSchedule, xb: np.ndarray, y: np.ndarray, noise: TreeNoise, *,
               rng: SecureRandom | None = None) -> TreeEnsemble:
    """Every step of ``schedule`` on one firm's binned customers: a federation of one (the
    firm's own noisy sums are the whole sum), as ``fedcrm train --model trees`` runs it."""
    grower = TreeGrower(schedule)
    while not grower.done:
        step = grower.step
        grower.request()
        sums = step_statistics(schedule, grower.ensemble, xb, y, step)
        std = noise.noise_std(schedule, step)
        grower.apply(privatise(sums, std, rng=rng), std)
    return grower.ensemble


# ------------------------------------------------------------------------------ a firm's checks


def check_request(schedule: TreeSchedule, ensemble: TreeEnsemble, step: TreeStep) -> None:
    """Refuse an ensemble that does not fit ``step`` of the firm's own schedule: other split
    candidates or depth, another number of trees, earlier trees unfinished, or this round's
    trees missing a split above ``step.level`` (a firm computes nothing for such a request)."""
    batch = schedule.batch(step.round)
    if tuple(int(b) for b in ensemble.bins) != schedule.bins or ensemble.depth != schedule.depth:
        raise ConfigError(
            "the trees sent have other split candidates or another depth than the run's "
            "public schema and settings give"
        )
    if ensemble.n_trees != batch.stop:
        raise ConfigError(
            f"round {step.round} needs {batch.stop} trees (finished and growing), got "
            f"{ensemble.n_trees}"
        )
    if np.any(ensemble.features[:batch.start] < 0):
        raise ConfigError(f"the trees of rounds before round {step.round} are not finished")
    chosen = 2**step.level - 1
    if np.any(ensemble.features[batch.start:, :chosen] < 0):
        raise ConfigError(f"the trees of round {step.round} lack splits above level {step.level}")


# ------------------------------------------------------------------------------ model file


def save_trees(path: Path, ensemble: TreeEnsemble, provenance: Mapping[str, Any]) -> Path:
    """Write a finished ensemble and its JSON provenance as one JSON file, atomically (0600).

    Plain JSON (numbers and lists, no pickle): floats are written in their shortest exact form,
    so the file loads back to the same ensemble bit for bit.
    """
    TreeEnsemble.from_arrays(ensemble.to_arrays())  # a finished, valid ensemble only
    payload = {
        "format": TREES_FORMAT,
        "provenance": dict(provenance),
        "bins": ensemble.bins.tolist(),
        "depth": ensemble.depth,
        "base": ensemble.base,
        "features": ensemble.features.tolist(),
        "thresholds": ensemble.thresholds.tolist(),
        "leaves": ensemble.leaves.tolist(),
    }
    try:
        text = json.dumps(payload, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"tree model provenance for {path} is not JSON-serialisable: {exc}"
                          ) from exc
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_private(path, text.encode("utf-8"))
    return path


def is_tree_model(path: Path) -> bool:
    """Whether ``path`` holds a tree model (a JSON file) rather than a torch one."""
    try:
        with Path(path).open("rb") as fh:
            return fh.read(1) == b"{"
    except OSError:
        return False


def load_trees(path: Path) -> tuple[TreeEnsemble, dict[str, Any]]:
    """Load a model written by :func:`save_trees`: ``(ensemble, provenance)``, validated."""
    path = Path(path)
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ConfigError(f"model file {path} not found; train or fetch the model first") from exc
    except (OSError, ValueError) as exc:
        raise ConfigError(f"model file {path} is not a readable fedcrm tree model "
                          f"({type(exc).__name__})") from exc
    if not isinstance(payload, dict) or payload.get("format") != TREES_FORMAT:
        raise ConfigError(f"model file {path} is not a {TREES_FORMAT} file; retrain it")
    try:
        ensemble = TreeEnsemble.from_arrays([
            np.asarray(payload["bins"], dtype=np.int64),
            np.asarray([payload["depth"], payload["base"]], dtype=np.float64),
            np.asarray(payload["features"], dtype=np.int64).reshape(-1, 2**payload["depth"] - 1),
            np.asarray(payload["thresholds"], dtype=np.int64).reshape(
                -1, 2**payload["depth"] - 1),
            np.asarray(payload["leaves"], dtype=np.float64).reshape(-1, 2**payload["depth"]),
        ])
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"model file {path} has a malformed ensemble ({type(exc).__name__}); "
                          "retrain it") from exc
    provenance = payload.get("provenance")
    if not isinstance(provenance, dict):
        raise ConfigError(f"model file {path} has damaged provenance; retrain it")
    return ensemble, dict(provenance)
