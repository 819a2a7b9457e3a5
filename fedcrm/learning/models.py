"""Churn models: logistic regression and a small MLP, both emitting one logit per customer.

Every firm builds the same architecture from ``(kind, input_dim, hidden)`` so that federated
averaging can exchange plain arrays (:func:`model_to_arrays` / :func:`arrays_to_model`, in
``state_dict`` order). A saved model carries JSON provenance (kind, input dim, feature layout
fingerprint, ...) and loads with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from fedcrm.learning.dp_trees import is_tree_model, load_trees
from fedcrm.learning.settings import ChurnModelKind
from fedcrm.privacy.durable import write_private
from fedcrm.privacy.errors import ConfigError

MODEL_FORMAT = "fedcrm/churn-model/v1"


def _linear(in_features: int, out_features: int) -> nn.Linear:
    """An uninitialised Linear: ``nn.Linear()`` would draw from torch's global RNG."""
    layer: nn.Linear = nn.utils.skip_init(nn.Linear, in_features, out_features)
    return layer


def _init_linear(layer: nn.Linear, generator: torch.Generator, *, zero: bool = False) -> None:
    with torch.no_grad():
        if zero:
            layer.weight.zero_()
            if layer.bias is not None:
                layer.bias.zero_()
            return
        bound = 1.0 / math.sqrt(layer.in_features)
        nn.init.uniform_(layer.weight, -bound, bound, generator=generator)
        if layer.bias is not None:
            nn.init.uniform_(layer.bias, -bound, bound, generator=generator)


def build_churn_model(
    kind: ChurnModelKind | str,
    input_dim: int,
    *,
    hidden: int = 32,
    generator: torch.Generator | None = None,
    seed: int | None = None,
) -> nn.Module:
    """A churn model mapping ``[n, input_dim]`` features to ``[n, 1]`` logits.

    * ``LOGISTIC``: one ``nn.Linear(input_dim, 1)``, initialised at zero (convex problem, and a
      zero start makes every firm's first round identical).
    * ``MLP``: ``Linear(input_dim, hidden) → ReLU → Linear(hidden, 1)``, initialised uniformly in
      ``±1/sqrt(fan_in)`` from ``generator`` (or ``torch.Generator().manual_seed(seed)``; seed 0
      when neither is given), so initialisation never touches torch's global RNG.
    """
    try:
        kind = ChurnModelKind(kind)
    except ValueError as exc:
        raise ConfigError(
            f"unknown churn model kind {kind!r}; use one of "
            f"{', '.join(k.value for k in ChurnModelKind)}"
        ) from exc
    if kind is ChurnModelKind.TREES:
        raise ConfigError(
            "a tree model is not a torch module; it is grown by fedcrm.learning.dp_trees"
        )
    if input_dim < 1 or hidden < 1:
        raise ConfigError(
            f"churn model needs input_dim ≥ 1 and hidden ≥ 1, got {input_dim}, {hidden}"
        )
    if generator is None:
        generator = torch.Generator().manual_seed(0 if seed is None else seed)
    if kind is ChurnModelKind.LOGISTIC:
        linear = _linear(input_dim, 1)
        _init_linear(linear, generator, zero=True)
        return linear
    first, last = _linear(input_dim, hidden), _linear(hidden, 1)
    _init_linear(first, generator)
    _init_linear(last, generator)
    return nn.Sequential(first, nn.ReLU(), last)


class BinaryCrossEntropy:
    """Binary cross-entropy per customer on logits: ``logits`` ``[n, 1]`` or ``[n]``, 0/1 targets.

    Also gives its closed-form output gradient ``sigmoid(z) − t`` so that DP-SGD's ghost-clipping
    path can skip autograd (see :class:`fedcrm.dp_engine.OutputGradientLoss`).
    """

    def __call__(self, logits: Tensor, churn: Tensor) -> Tensor:
        return nn.functional.binary_cross_entropy_with_logits(
            logits.reshape(-1), churn.reshape(-1).to(logits.dtype), reduction="none"
        )

    def output_gradient(self, logits: Tensor, churn: Tensor) -> tuple[Tensor, Tensor]:
        """``(loss[n], d loss / d logits)``; ``softplus(z) − t·z`` is the BCE on logits."""
        target = churn.reshape(logits.shape).to(logits.dtype)
        losses = nn.functional.softplus(logits) - target * logits
        return losses.reshape(-1), torch.sigmoid(logits) - target


#: The churn models' per-customer training loss.
churn_per_sample_loss = BinaryCrossEntropy()


def predict_proba(model: nn.Module, X: Tensor | np.ndarray) -> np.ndarray:
    """Churn probability per row, as a float64 numpy array of shape ``[n]``."""
    features = torch.as_tensor(X, dtype=torch.float32)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        proba = torch.sigmoid(model(features).reshape(-1))
    model.train(was_training)
    return proba.double().numpy()


def model_to_arrays(model: nn.Module) -> list[np.ndarray]:
    """The model's ``state_dict`` values as numpy copies, in ``state_dict`` order."""
    return [t.detach().cpu().numpy().copy() for t in model.state_dict().values()]


def arrays_to_model(model: nn.Module, arrays: Sequence[np.ndarray]) -> nn.Module:
    """Load ``arrays`` (from :func:`model_to_arrays` of the same architecture) into ``model``."""
    state = model.state_dict()
    if len(arrays) != len(state):
        raise ConfigError(
            f"model update has {len(arrays)} arrays but the local churn model has {len(state)}; "
            "every firm must use the same model kind and feature layout (compare fingerprints)"
        )
    new_state: dict[str, Tensor] = {}
    for (name, current), array in zip(state.items(), arrays, strict=True):
        if tuple(array.shape) != tuple(current.shape):
            raise ConfigError(
                f"model update array '{name}' has shape {tuple(array.shape)}, local model expects "
                f"{tuple(current.shape)}; every firm must use the same feature layout "
                "(compare fingerprints)"
            )
        new_state[name] = torch.as_tensor(np.asarray(array), dtype=current.dtype).clone()
    model.load_state_dict(new_state, strict=True)
    return model


_REQUIRED_PROVENANCE = ("kind", "input_dim", "layout_fingerprint")


def save_model(path: str | Path, model: nn.Module, provenance: Mapping[str, Any]) -> Path:
    """Write ``model`` with JSON ``provenance`` atomically (temp file, fsync, rename).

    ``provenance`` must name ``kind``, ``input_dim`` and ``layout_fingerprint`` (``hidden`` too for
    an MLP, default 32) and be JSON-serialisable; anything else (ε spent, rounds, date) is kept.
    """
    path = Path(path)
    missing = [k for k in _REQUIRED_PROVENANCE if k not in provenance]
    if missing:
        raise ConfigError(f"model provenance for {path} lacks {', '.join(missing)}; add them")
    try:
        provenance_json = json.dumps(dict(provenance), sort_keys=True)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"model provenance for {path} is not JSON-serialisable: {exc}") from exc
    reference = _build_from_provenance(json.loads(provenance_json), path)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if shapes != {k: tuple(v.shape) for k, v in reference.state_dict().items()}:
        raise ConfigError(
            f"model saved to {path} does not match its provenance (kind/input_dim/hidden); "
            "pass the provenance of the model actually trained"
        )
    payload = {
        "format": MODEL_FORMAT,
        "provenance": provenance_json,
        "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
    }
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_private(path, buffer.getvalue())
    return path


def _build_from_provenance(provenance: Mapping[str, Any], path: Path) -> nn.Module:
    try:
        return build_churn_model(
            provenance["kind"],
            int(provenance["input_dim"]),
            hidden=int(provenance.get("hidden", 32)),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"model file {path} has unusable provenance ({exc}); retrain it") from exc


def load_model(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """Load a model written by :func:`save_model`: ``(model in eval mode, provenance)``."""
    path = Path(path)
    try:
        payload = torch.load(path, weights_only=True, map_location="cpu")
    except FileNotFoundError as exc:
        raise ConfigError(f"model file {path} not found; train or fetch the model first") from exc
    except Exception as exc:
        raise ConfigError(f"model file {path} is not a readable fedcrm model ({type(exc).__name__})"
                          ) from exc
    if not isinstance(payload, dict) or payload.get("format") != MODEL_FORMAT:
        raise ConfigError(
            f"model file {path} is not a {MODEL_FORMAT} file; retrain or re-export it"
        )
    try:
        provenance: dict[str, Any] = json.loads(payload["provenance"])
    except (KeyError, TypeError, ValueError):  # ValueError: JSONDecodeError, UnicodeDecodeError
        raise ConfigError(f"model file {path} has damaged provenance; retrain or re-fetch it"
                          ) from None
    if not isinstance(provenance, dict):
        raise ConfigError(f"model file {path} has damaged provenance; retrain or re-fetch it")
    model = _build_from_provenance(provenance, path)
    try:
        model.load_state_dict(payload["state_dict"], strict=True)
    except (RuntimeError, KeyError, TypeError, AttributeError) as exc:
        raise ConfigError(f"model file {path} weights do not match its provenance; retrain it"
                          ) from exc
    model.eval()
    return model, provenance


def load_churn_predictor(
    path: str | Path,
) -> tuple[Callable[[np.ndarray], np.ndarray], dict[str, Any]]:
    """Any saved churn model (torch or trees) as ``(encoded features -> churn probability,
    provenance)``."""
    if is_tree_model(Path(path)):
        ensemble, provenance = load_trees(Path(path))
        return ensemble.predict_proba, provenance
    model, provenance = load_model(path)
    return (lambda x: predict_proba(model, x)), provenance
