"""Evaluation metrics that can be pooled across firms without pooling records.

A firm releases, for its held-out customers, noisy counts of churners and non-churners in each of
a few equal-width score bins (:mod:`fedcrm.tasks.churn`). Summing those histograms over firms
gives the pooled ROC curve up to the bin width and the noise, so the coordinator gets a pooled AUC
without any per-customer score or label leaving a firm.
"""

from __future__ import annotations

import numpy as np

SCORE_BINS = 200


def score_histograms(
    scores: np.ndarray,
    labels: np.ndarray,
    *,
    bins: int = SCORE_BINS,
    edges: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Counts of positives and negatives per score bin: ``bins`` equal-width bins over [0, 1],
    or the bins between ``edges`` (increasing, from 0 to 1)."""
    scores = np.asarray(scores, dtype=np.float64)
    if edges is None:
        index = np.clip((scores * bins).astype(int), 0, bins - 1)
    else:
        bins = len(edges) - 1
        index = np.clip(np.searchsorted(edges, scores, side="right") - 1, 0, bins - 1)
    labels = np.asarray(labels).astype(bool)
    pos = np.bincount(index[labels], minlength=bins).astype(np.float64)
    neg = np.bincount(index[~labels], minlength=bins).astype(np.float64)
    return pos, neg


def auc_from_histograms(pos: np.ndarray, neg: np.ndarray) -> float:
    """AUC from binned scores; ties within a bin count one half (Mann-Whitney)."""
    pos = np.asarray(pos, dtype=np.float64)
    neg = np.asarray(neg, dtype=np.float64)
    n_pos, n_neg = pos.sum(), neg.sum()
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    neg_below = np.concatenate([[0.0], np.cumsum(neg)[:-1]])
    wins = float((pos * neg_below).sum() + 0.5 * (pos * neg).sum())
    return wins / float(n_pos * n_neg)


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """ROC AUC (Mann-Whitney U with average ranks for ties); NaN when only one class is present.

    numpy-only on purpose: it runs in every ClientApp process, where importing scikit-learn
    would add seconds to each start.
    """
    labels = np.asarray(labels).astype(bool)
    scores = np.asarray(scores, dtype=np.float64)
    n_pos = int(labels.sum())
    n_neg = len(labels) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = scores[order]
    ranks = np.empty(len(scores), dtype=np.float64)
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    avg = first + (counts - 1) / 2.0 + 1.0
    ranks[order] = np.repeat(avg, counts)
    u = ranks[labels].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))
