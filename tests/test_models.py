"""Churn models: construction, loss, array exchange, save/load with provenance."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from fedcrm.learning.models import (
    ChurnModelKind,
    arrays_to_model,
    build_churn_model,
    churn_per_sample_loss,
    load_model,
    model_to_arrays,
    predict_proba,
    save_model,
)
from fedcrm.privacy.errors import ConfigError

torch.set_num_threads(1)

#: The churn models that are torch modules (trees are grown by fedcrm.learning.dp_trees).
TORCH_KINDS = [ChurnModelKind.LOGISTIC, ChurnModelKind.MLP]


@pytest.mark.parametrize("kind", TORCH_KINDS)
def test_models_output_one_logit_per_customer(kind: ChurnModelKind) -> None:
    model = build_churn_model(kind, 7)
    assert model(torch.rand(11, 7)).shape == (11, 1)
    proba = predict_proba(model, np.random.default_rng(0).random((11, 7)))
    assert proba.shape == (11,) and np.all((proba >= 0) & (proba <= 1))


def test_logistic_model_is_one_linear_layer_starting_at_zero() -> None:
    model = build_churn_model("logistic", 4)
    assert isinstance(model, nn.Linear)
    assert all(torch.all(p == 0) for p in model.parameters())
    np.testing.assert_allclose(predict_proba(model, np.ones((3, 4))), 0.5)


def test_mlp_initialisation_is_seeded_and_leaves_global_rng_alone() -> None:
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = build_churn_model(ChurnModelKind.MLP, 5, hidden=8, seed=3)
    assert torch.equal(torch.rand(1), before)
    gen = torch.Generator().manual_seed(3)
    b = build_churn_model(ChurnModelKind.MLP, 5, hidden=8, generator=gen)
    c = build_churn_model(ChurnModelKind.MLP, 5, hidden=8, seed=4)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    assert sa["0.weight"].shape == (8, 5)


def test_a_tree_model_is_never_built_as_a_torch_module() -> None:
    with pytest.raises(ConfigError, match="not a torch module"):
        build_churn_model(ChurnModelKind.TREES, 3)


def test_unknown_kind_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="logistic, mlp"):
        build_churn_model("forest", 3)


def test_churn_loss_and_its_closed_form_gradient_match_autograd() -> None:
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(9, 1, generator=gen) * 30).requires_grad_()  # includes saturated logits
    churn = (torch.rand(9, generator=gen) < 0.5).float()
    reference = nn.functional.binary_cross_entropy_with_logits(
        logits.reshape(-1), churn, reduction="none"
    )
    torch.testing.assert_close(churn_per_sample_loss(logits, churn), reference)
    losses, grad = churn_per_sample_loss.output_gradient(logits.detach(), churn)
    torch.testing.assert_close(losses, reference.detach(), atol=1e-5, rtol=1e-5)
    (auto,) = torch.autograd.grad(reference.sum(), logits)
    torch.testing.assert_close(grad, auto)


@pytest.mark.parametrize("kind", TORCH_KINDS)
def test_arrays_round_trip_between_models(kind: ChurnModelKind) -> None:
    source = build_churn_model(kind, 6, seed=1)
    with torch.no_grad():
        for p in source.parameters():
            p.add_(1.0)
    arrays = model_to_arrays(source)
    assert all(isinstance(a, np.ndarray) for a in arrays)
    arrays[0][...] += 0  # copies: editing them must not touch the model
    target = arrays_to_model(build_churn_model(kind, 6, seed=2), arrays)
    x = torch.rand(4, 6)
    torch.testing.assert_close(target(x), source(x))


def test_arrays_from_another_layout_are_refused() -> None:
    arrays = model_to_arrays(build_churn_model("mlp", 6))
    with pytest.raises(ConfigError, match="same feature layout"):
        arrays_to_model(build_churn_model("mlp", 7), arrays)
    with pytest.raises(ConfigError, match="arrays"):
        arrays_to_model(build_churn_model("logistic", 6), arrays)


PROVENANCE = {"kind": "mlp", "input_dim": 6, "hidden": 16, "layout_fingerprint": "ab" * 32,
              "epsilon_spent": 0.8, "rounds": 3}


def test_save_and_load_keep_weights_and_provenance(tmp_path: Path) -> None:
    model = build_churn_model("mlp", 6, hidden=16, seed=5)
    path = save_model(tmp_path / "models" / "churn.pt", model, PROVENANCE)
    loaded, provenance = load_model(path)
    assert provenance == PROVENANCE
    x = torch.rand(3, 6)
    torch.testing.assert_close(loaded(x), model(x))
    assert not loaded.training
    assert [p.name for p in (tmp_path / "models").iterdir()] == ["churn.pt"]  # no temp file left


def test_saved_file_loads_with_weights_only(tmp_path: Path) -> None:
    path = save_model(tmp_path / "m.pt", build_churn_model("logistic", 6),
                      {**PROVENANCE, "kind": "logistic"})
    payload = torch.load(path, weights_only=True)
    assert json.loads(payload["provenance"])["kind"] == "logistic"


@pytest.mark.parametrize(
    "provenance, fragment",
    [
        ({"kind": "mlp", "input_dim": 6}, "layout_fingerprint"),
        ({**PROVENANCE, "input_dim": 5}, "does not match its provenance"),
        ({**PROVENANCE, "when": object()}, "JSON"),
    ],
)
def test_save_refuses_bad_provenance(tmp_path: Path, provenance: dict[str, object],
                                     fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        save_model(tmp_path / "m.pt", build_churn_model("mlp", 6, hidden=16), provenance)


def test_load_refuses_files_that_are_not_fedcrm_models(tmp_path: Path) -> None:
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(2)}, other)
    with pytest.raises(ConfigError, match="not a fedcrm/churn-model/v1"):
        load_model(other)
    with pytest.raises(ConfigError, match="not found"):
        load_model(tmp_path / "missing.pt")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a torch file")
    with pytest.raises(ConfigError, match="not a readable"):
        load_model(garbage)
