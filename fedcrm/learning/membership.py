"""Membership inference attacks on a churn model: how much a released model tells about who was
in its training data.

Two attacks, both scored by how well they separate members (training customers) from
non-members (held-out customers):

* **loss threshold** (Yeom, Giacomelli, Fredrikson, Jha, "Privacy Risk in Machine Learning",
  CSF 2018): a customer is called a member when the model's loss on them is low. Needs only the
  model and the candidate's record.
* **LiRA**, the likelihood-ratio attack (Carlini, Chien, Nasr, Song, Terzis, Tramèr, "Membership
  Inference Attacks From First Principles", IEEE S&P 2022), online variant: shadow models are
  trained by the same procedure on random subsets of the population; for every customer the
  model's confidence ``φ = log(p / (1 - p))`` in the true label is modelled as a Gaussian over
  the shadows that trained on them (IN) and over those that did not (OUT), and the score is the
  log-likelihood ratio of the target model's ``φ`` under the two. With few shadows the paper
  recommends one global variance per side ("fixed variance"), which is what this does.

Results are reported as the attack's ROC AUC and its true-positive rate at a 1% false-positive
rate (the paper's point: an attack that is right about a few customers with certainty matters
more than its average).

Only the maths lives here (no data loading, no shadow training): the run folder, the firms'
data and the shadow federation are :mod:`fedcrm.simulations.membership`'s.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from fedcrm.learning.metrics import auc

#: The false-positive rate at which the attacks' true-positive rate is reported.
LOW_FPR = 0.01


@dataclass(frozen=True)
class AttackResult:
    """How well one attack separates members from non-members."""

    attack: str
    auc: float
    tpr_at_low_fpr: float
    low_fpr: float
    members: int
    non_members: int

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def signed_logits(model: nn.Module, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """``φ = log(p / (1 - p))`` with ``p`` the model's probability of the TRUE label: the logit for
    churners, minus the logit for the others (a churn model outputs one logit per customer)."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        logits = model(torch.as_tensor(x, dtype=torch.float32)).reshape(-1).double().numpy()
    model.train(was_training)
    return np.where(np.asarray(y) > 0.5, logits, -logits)


def loss_scores(phi: np.ndarray) -> np.ndarray:
    """Membership scores of the loss-threshold attack: minus the cross-entropy loss,
    ``-softplus(-φ)`` (higher = lower loss = more likely a member)."""
    return -np.logaddexp(0.0, -np.asarray(phi, dtype=np.float64))


def lira_scores(
    target_phi: np.ndarray, shadow_phi: np.ndarray, shadow_in: np.ndarray
) -> np.ndarray:
    """Online LiRA with fixed variance: ``log N(φ; μ_in, σ_in²) - log N(φ; μ_out, σ_out²)``.

    ``shadow_phi[s, i]`` is shadow ``s``'s ``φ`` on customer ``i`` and ``shadow_in[s, i]`` whether
    shadow ``s`` trained on customer ``i``. ``μ_in``/``μ_out`` are per customer (a customer no
    shadow saw IN - or OUT - gets that side's mean over all customers); ``σ_in``/``σ_out`` are the
    spread of the shadows' ``φ`` around their customer's mean, over all customers.
    """
    phi = np.asarray(shadow_phi, dtype=np.float64)
    inside = np.asarray(shadow_in, dtype=bool)
    if phi.shape != inside.shape or phi.ndim != 2 or phi.shape[1] != len(target_phi):
        raise ValueError(
            f"shadow φ {phi.shape} and IN mask {inside.shape} must both be (shadows, customers) "
            f"for {len(target_phi)} customers"
        )

    def side(mask: np.ndarray) -> tuple[np.ndarray, float]:
        count = mask.sum(axis=0)
        total = np.where(mask, phi, 0.0).sum(axis=0)
        overall = float(phi[mask].mean()) if mask.any() else 0.0
        mean = np.where(count > 0, total / np.maximum(count, 1), overall)
        residual = (phi - mean)[mask]
        std = float(residual.std()) if residual.size > 1 else 1.0
        return mean, max(std, 1e-6)

    mu_in, sd_in = side(inside)
    mu_out, sd_out = side(~inside)
    t = np.asarray(target_phi, dtype=np.float64)

    def log_normal(mean: np.ndarray, sd: float) -> np.ndarray:
        return -0.5 * ((t - mean) / sd) ** 2 - np.log(sd)

    return log_normal(mu_in, sd_in) - log_normal(mu_out, sd_out)


def tpr_at_fpr(scores: np.ndarray, member: np.ndarray, fpr: float = LOW_FPR) -> float:
    """The largest true-positive rate of a threshold whose false-positive rate is at most
    ``fpr`` (a customer is called a member when its score is strictly above the threshold)."""
    scores = np.asarray(scores, dtype=np.float64)
    member = np.asarray(member, dtype=bool)
    negatives = np.sort(scores[~member])[::-1]
    positives = scores[member]
    if negatives.size == 0 or positives.size == 0:
        return float("nan")
    allowed = int(np.floor(fpr * negatives.size))  # non-members that may score above it
    threshold = negatives[allowed] if allowed < negatives.size else -np.inf
    return float(np.mean(positives > threshold))


def evaluate_attack(
    attack: str, scores: np.ndarray, member: np.ndarray, *, fpr: float = LOW_FPR
) -> AttackResult:
    member = np.asarray(member, dtype=bool)
    return AttackResult(
        attack=attack,
        auc=auc(scores, member),
        tpr_at_low_fpr=tpr_at_fpr(scores, member, fpr),
        low_fpr=fpr,
        members=int(member.sum()),
        non_members=int((~member).sum()),
    )
