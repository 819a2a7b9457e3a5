from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import roc_auc_score

from fedcrm.learning.metrics import auc, auc_from_histograms, score_histograms


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 20), st.booleans()), min_size=2, max_size=200))
def test_auc_matches_scikit_learn_including_ties(pairs: list[tuple[int, bool]]) -> None:
    scores = np.array([p[0] / 20 for p in pairs])
    labels = np.array([p[1] for p in pairs])
    if labels.all() or not labels.any():
        assert np.isnan(auc(scores, labels))
    else:
        assert abs(auc(scores, labels) - roc_auc_score(labels, scores)) < 1e-12


def test_pooled_histogram_auc_is_close_to_exact_pooled_auc() -> None:
    rng = np.random.default_rng(0)
    parts = []
    for shift in (0.0, 0.3, -0.2):
        y = rng.random(800) < 0.3
        s = 1 / (1 + np.exp(-(rng.normal(size=800) + 1.5 * y + shift)))
        parts.append((s, y))
    hists = [score_histograms(s, y) for s, y in parts]
    pos = sum(h[0] for h in hists)
    neg = sum(h[1] for h in hists)
    exact = auc(np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))
    assert abs(auc_from_histograms(pos, neg) - exact) < 0.003
