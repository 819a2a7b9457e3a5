"""DP-SGD engine: fast per-example clipping against brute force, update rule, sampling, plans."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

import fedcrm.learning.dp_engine as engine
from fedcrm.learning.dp_engine import (
    DpOptimizer,
    DpPlan,
    clipped_gradient_sum,
    plan_for_budget,
    poisson_batches,
    train_dp,
    train_non_dp,
)
from fedcrm.learning.models import build_churn_model, churn_per_sample_loss
from fedcrm.privacy.accounting import DpEvent, Mechanism, make_event
from fedcrm.privacy.errors import PlanDoesNotFit
from fedcrm.privacy.noise import SecureRandom

torch.set_num_threads(1)


def autograd_bce(logits: Tensor, target: Tensor) -> Tensor:
    """Same loss as churn_per_sample_loss but without the closed-form gradient (autograd path)."""
    return churn_per_sample_loss(logits, target)


def mse_multi(out: Tensor, target: Tensor) -> Tensor:
    return (out - target).pow(2).sum(1)


def brute_force(model: nn.Module, X: Tensor, y: Tensor, loss: Callable[[Tensor, Tensor], Tensor],
                clip: float) -> tuple[list[Tensor], Tensor]:
    """Per-example loop: gradient of each example alone, clipped, summed."""
    params = [p for p in model.parameters() if p.requires_grad]
    total = [torch.zeros_like(p) for p in params]
    norms = []
    for i in range(X.shape[0]):
        grads = torch.autograd.grad(loss(model(X[i : i + 1]), y[i : i + 1]).sum(), params)
        norm = torch.stack([g.pow(2).sum() for g in grads]).sum().sqrt()
        norms.append(norm)
        factor = min(1.0, clip / (float(norm) + 1e-6))
        for t, g in zip(total, grads, strict=True):
            t += g * factor
    return total, torch.stack(norms)


def randomize(model: nn.Module, seed: int) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    return model


class TwoBranch(nn.Module):
    """Not a Sequential: exercises the torch.func.vmap fallback."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 4)
        self.norm = nn.LayerNorm(4)
        self.b = nn.Linear(4, 1)
        self.skip = nn.Linear(6, 1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.b(torch.tanh(self.norm(self.a(x)))) + self.skip(x)


CASES: dict[str, tuple[Callable[[], nn.Module], Callable[[Tensor, Tensor], Tensor], int]] = {
    "logistic-closed-form": (lambda: build_churn_model("logistic", 6), churn_per_sample_loss, 1),
    "logistic-autograd": (lambda: build_churn_model("logistic", 6), autograd_bce, 1),
    "mlp-closed-form": (lambda: build_churn_model("mlp", 6, hidden=5), churn_per_sample_loss, 1),
    "mlp-autograd": (lambda: build_churn_model("mlp", 6, hidden=5), autograd_bce, 1),
    "deep-tanh-sigmoid": (
        lambda: nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Sequential(nn.Linear(5, 4),
                              nn.Sigmoid()), nn.Linear(4, 1)),
        churn_per_sample_loss, 1),
    "gelu-autograd": (
        lambda: nn.Sequential(nn.Linear(6, 5), nn.GELU(), nn.Linear(5, 1)),
        churn_per_sample_loss, 1),
    "linear-no-bias-multi-output": (lambda: nn.Linear(6, 3, bias=False), mse_multi, 3),
    "linear-multi-output": (lambda: nn.Linear(6, 3), mse_multi, 3),
    "vmap-fallback": (TwoBranch, churn_per_sample_loss, 1),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("clip", [0.3, 1e6])
def test_fast_clipped_gradient_sum_equals_per_example_loop(case: str, clip: float) -> None:
    factory, loss, outputs = CASES[case]
    model = randomize(factory(), seed=3)
    gen = torch.Generator().manual_seed(1)
    X = torch.randn(17, 6, generator=gen)
    y = (torch.rand(17, generator=gen) < 0.5).float() if outputs == 1 else torch.randn(17, 3,
                                                                                     generator=gen)
    fast = clipped_gradient_sum(model, X, y, per_sample_loss=loss, max_grad_norm=clip)
    expected, norms = brute_force(model, X, y, loss, clip)
    torch.testing.assert_close(fast.norms, norms, atol=1e-5, rtol=1e-5)
    for got, want in zip(fast.grads, expected, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    if clip < 1:  # the test really clips
        assert float(norms.max()) > clip


@settings(max_examples=15, deadline=None)
@given(n=st.integers(1, 9), d=st.integers(1, 5), hidden=st.integers(1, 4),
       clip=st.floats(0.01, 10.0), seed=st.integers(0, 10_000))
def test_ghost_clipping_matches_brute_force_for_any_shape(n: int, d: int, hidden: int, clip: float,
                                                          seed: int) -> None:
    model = randomize(build_churn_model("mlp", d, hidden=hidden), seed)
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=gen)
    y = (torch.rand(n, generator=gen) < 0.5).float()
    fast = clipped_gradient_sum(model, X, y, per_sample_loss=churn_per_sample_loss,
                                max_grad_norm=clip)
    expected, _ = brute_force(model, X, y, churn_per_sample_loss, clip)
    for got, want in zip(fast.grads, expected, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    total = math.sqrt(sum(float(g.pow(2).sum()) for g in fast.grads))
    assert total <= n * clip * (1 + 1e-5)


def test_churn_loss_closed_form_gradient_equals_autograd() -> None:
    gen = torch.Generator().manual_seed(3)
    logits = (4 * torch.randn(64, 1, generator=gen)).requires_grad_()
    target = (torch.rand(64, generator=gen) < 0.3).float()
    losses, closed_form = churn_per_sample_loss.output_gradient(logits.detach(), target)
    reference = autograd_bce(logits, target)
    torch.testing.assert_close(losses, reference.detach())
    (grad,) = torch.autograd.grad(reference.sum(), logits)
    torch.testing.assert_close(closed_form, grad)


def test_per_sample_loss_must_return_one_value_per_example() -> None:
    model = build_churn_model("mlp", 4)
    X, y = torch.zeros(5, 4), torch.zeros(5)
    with pytest.raises(ValueError, match="one loss per example"):
        clipped_gradient_sum(model, X, y, per_sample_loss=lambda z, t: autograd_bce(z, t).mean(),
                             max_grad_norm=1.0)


def test_batchnorm_models_are_refused() -> None:
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 1))
    with pytest.raises(ValueError, match="BatchNorm"):
        clipped_gradient_sum(model, torch.zeros(5, 4), torch.zeros(5),
                             per_sample_loss=churn_per_sample_loss, max_grad_norm=1.0)


def toy_data(n: int = 64, d: int = 5, seed: int = 0) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    X = torch.rand(n, d, generator=gen)
    y = (X[:, 0] + 0.3 * torch.randn(n, generator=gen) > 0.5).float()
    return X, y


def exact_plan(steps: int, lr: float, *, noise: float = 0.0, clip: float = 1e6,
               rate: float = 1.0) -> DpPlan:
    return DpPlan(steps=steps, sample_rate=rate, noise_multiplier=noise, max_grad_norm=clip,
                  learning_rate=lr, delta=1e-5, epochs=float(steps))


@pytest.mark.parametrize("kind", ["logistic", "mlp"])
@pytest.mark.parametrize("opt", [DpOptimizer.SGD, DpOptimizer.ADAM])
def test_without_noise_and_clipping_dp_update_equals_plain_full_batch_training(
    kind: str, opt: DpOptimizer
) -> None:
    X, y = toy_data()
    dp_model = build_churn_model(kind, 5, seed=4)
    ref = build_churn_model(kind, 5, seed=4)
    train_dp(dp_model, X, y, per_sample_loss=churn_per_sample_loss, plan=exact_plan(4, 0.1),
             generator=torch.Generator().manual_seed(0), optimizer=opt)
    torch_opt: torch.optim.Optimizer = (
        torch.optim.Adam(ref.parameters(), lr=0.1) if opt is DpOptimizer.ADAM
        else torch.optim.SGD(ref.parameters(), lr=0.1)
    )
    for _ in range(4):
        torch_opt.zero_grad()
        churn_per_sample_loss(ref(X), y).mean().backward()
        torch_opt.step()
    for a, b in zip(dp_model.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_proximal_term_pulls_towards_the_global_model() -> None:
    X, y = toy_data()
    model = build_churn_model("logistic", 5)
    ref = build_churn_model("logistic", 5)
    anchors = [torch.full_like(p, 0.5) for p in model.parameters()]
    train_dp(model, X, y, per_sample_loss=churn_per_sample_loss, plan=exact_plan(3, 0.2),
             generator=torch.Generator().manual_seed(0), optimizer="sgd",
             proximal=(anchors, 0.7))
    opt = torch.optim.SGD(ref.parameters(), lr=0.2)
    for _ in range(3):
        opt.zero_grad()
        prox = sum((p - a).pow(2).sum() for p, a in zip(ref.parameters(), anchors, strict=True))
        (churn_per_sample_loss(ref(X), y).mean() + 0.35 * prox).backward()
        opt.step()
    for a, b in zip(model.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_dp_update_divides_by_expected_batch_size_not_realised_one() -> None:
    """One SGD step with lr=1, no noise: Δw = −Σ_batch g_i / (n q)."""
    X, y = toy_data(n=40)
    model = build_churn_model("logistic", 5)
    plan = exact_plan(1, 1.0, rate=0.25)
    gen = torch.Generator().manual_seed(9)
    train_dp(model, X, y, per_sample_loss=churn_per_sample_loss, plan=plan, generator=gen,
             optimizer="sgd")
    idx = next(poisson_batches(40, 0.25, 1, torch.Generator().manual_seed(9)))
    ref = build_churn_model("logistic", 5)
    grads = torch.autograd.grad(churn_per_sample_loss(ref(X[idx]), y[idx]).sum(),
                                list(ref.parameters()))
    for p, g in zip(model.parameters(), grads, strict=True):
        torch.testing.assert_close(p.detach(), -g / (40 * 0.25), atol=1e-6, rtol=1e-5)


def test_empty_poisson_batches_are_noise_only_steps_and_still_counted() -> None:
    X, y = toy_data(n=5)
    model = build_churn_model("logistic", 5)
    plan = exact_plan(3, 0.1, noise=1.0, clip=1.0, rate=1e-6)
    stats = train_dp(model, X, y, per_sample_loss=churn_per_sample_loss, plan=plan,
                     generator=torch.Generator().manual_seed(0), optimizer="sgd")
    assert stats.steps == 3 and stats.empty_steps == 3 and stats.examples_processed == 0
    moved = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    assert torch.all(moved != 0)  # noise still applied
    silent = build_churn_model("logistic", 5)
    train_dp(silent, X, y, per_sample_loss=churn_per_sample_loss,
             plan=exact_plan(3, 0.1, rate=1e-6), generator=torch.Generator().manual_seed(0),
             optimizer="sgd")
    assert all(torch.all(p == 0) for p in silent.parameters())


@pytest.mark.parametrize("kind", ["logistic", "mlp"])
def test_fifty_customer_firm_trains_within_its_budget(kind: str) -> None:
    X, y = toy_data(n=50)
    plan = plan_for_budget(n_examples=50, target_epsilon=1.0, delta=1e-5, epochs=5,
                           batch_size=256, max_grad_norm=1.0, learning_rate=0.05)
    assert plan.sample_rate == 1.0 and plan.steps == 5
    assert plan.epsilon() <= 1.0
    model = build_churn_model(kind, 5)
    stats = train_dp(model, X, y, per_sample_loss=churn_per_sample_loss, plan=plan,
                     generator=torch.Generator().manual_seed(0))
    assert stats.steps == 5 and stats.examples_processed == 250
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_plan_fits_the_cap_by_construction_over_all_rounds() -> None:
    one = plan_for_budget(n_examples=5000, target_epsilon=1.0, delta=1e-5, epochs=2,
                          batch_size=250, max_grad_norm=1.0, learning_rate=0.1)
    assert one.sample_rate == pytest.approx(0.05) and one.steps == 40
    assert 0.95 <= one.epsilon() <= 1.0
    three = plan_for_budget(n_examples=5000, target_epsilon=1.0, delta=1e-5, epochs=2,
                            batch_size=250, max_grad_norm=1.0, learning_rate=0.1, rounds=3)
    assert three.steps == 40 and three.total_steps == 120
    assert three.noise_multiplier > one.noise_multiplier
    assert 0.95 <= three.epsilon() <= 1.0


def test_plan_accounts_for_earlier_releases_and_round_events_compose() -> None:
    prior = make_event(mechanism=Mechanism.SUBSAMPLED_GAUSSIAN, noise_multiplier=2.0,
                       sample_rate=0.05, steps=50, delta=1e-5, purpose="earlier churn model")
    assert prior.epsilon < 1.5
    plan = plan_for_budget(n_examples=5000, target_epsilon=2.0, delta=1e-5, epochs=1,
                           batch_size=250, max_grad_norm=1.0, learning_rate=0.1, rounds=2,
                           prior_events=[prior])
    assert 1.9 <= plan.epsilon(prior_events=[prior]) <= 2.0
    assert plan.epsilon() < plan.epsilon(prior_events=[prior])
    event = plan.round_event(purpose="churn round 1")
    assert isinstance(event, DpEvent)
    assert event.steps == plan.steps and event.noise_multiplier == plan.noise_multiplier


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"target_epsilon": 1e-4, "epochs": 500, "batch_size": 100}, "cannot fit"),
        ({"delta": 0.01}, "1/n"),
        ({"batch_size": 0}, "batch_size"),
        ({"epochs": 0}, "epochs"),
        ({"target_epsilon": 0.0}, "ε"),
    ],
)
def test_plan_refuses_impossible_budgets_with_the_numbers(kwargs: dict[str, float],
                                                          fragment: str) -> None:
    args: dict[str, float] = {"n_examples": 100, "target_epsilon": 1.0, "delta": 1e-5,
                              "epochs": 1, "batch_size": 10, "max_grad_norm": 1.0,
                              "learning_rate": 0.1}
    args.update(kwargs)
    with pytest.raises(PlanDoesNotFit, match=fragment):
        plan_for_budget(**args)  # type: ignore[arg-type]


def test_plan_refuses_when_earlier_releases_used_the_cap() -> None:
    prior = make_event(mechanism=Mechanism.SUBSAMPLED_GAUSSIAN, noise_multiplier=0.5,
                       sample_rate=0.5, steps=100, delta=1e-5, purpose="big release")
    with pytest.raises(PlanDoesNotFit, match="spent"):
        plan_for_budget(n_examples=1000, target_epsilon=1.0, delta=1e-5, epochs=1,
                        batch_size=100, max_grad_norm=1.0, learning_rate=0.1,
                        prior_events=[prior])


@pytest.mark.parametrize("kind", ["logistic", "mlp"])
def test_same_generator_seed_gives_identical_models(kind: str) -> None:
    X, y = toy_data(n=300)
    plan = plan_for_budget(n_examples=300, target_epsilon=2.0, delta=1e-4, epochs=2,
                           batch_size=32, max_grad_norm=1.0, learning_rate=0.05)

    def run(seed: int) -> list[Tensor]:
        model = build_churn_model(kind, 5, seed=1)
        train_dp(model, X, y, per_sample_loss=churn_per_sample_loss, plan=plan,
                 generator=torch.Generator().manual_seed(seed))
        return [p.detach().clone() for p in model.parameters()]

    first, again, other = run(7), run(7), run(8)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(first, other, strict=True))


def zero_loss(out: Tensor, target: Tensor) -> Tensor:
    return out.sum(1) * 0.0


def test_noise_std_is_noise_multiplier_times_clip_over_expected_batch() -> None:
    """With zero data gradients, one SGD step (lr=1) moves each weight by N(0, (σC/(nq))²)."""
    n, rate, sigma, clip = 1000, 0.1, 1.5, 2.0
    model = nn.Linear(400, 5)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    plan = DpPlan(steps=1, sample_rate=rate, noise_multiplier=sigma, max_grad_norm=clip,
                  learning_rate=1.0, delta=1e-5, epochs=0.1)
    train_dp(model, torch.rand(n, 400), torch.zeros(n), per_sample_loss=zero_loss, plan=plan,
             generator=torch.Generator().manual_seed(0), optimizer="sgd")
    moved = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    expected = sigma * clip / (n * rate)
    assert float(moved.std()) == pytest.approx(expected, rel=0.1)
    assert abs(float(moved.mean())) < 4 * expected / math.sqrt(moved.numel())


def test_poisson_batches_include_each_example_with_the_sample_rate(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(engine, "_SAMPLING_BLOCK", 1000)  # force many sampling blocks
    n, rate, steps = 200, 0.1, 2000
    counts = torch.zeros(n)
    sizes = []
    batches = list(poisson_batches(n, rate, steps, torch.Generator().manual_seed(0)))
    assert len(batches) == steps
    for idx in batches:
        assert idx.dtype == torch.long
        if idx.numel():
            assert int(idx.min()) >= 0 and int(idx.max()) < n
            assert torch.all(idx[1:] > idx[:-1])  # sorted, no duplicates
        counts[idx] += 1
        sizes.append(idx.numel())
    size = torch.tensor(sizes, dtype=torch.float64)
    mean, var = n * rate, n * rate * (1 - rate)
    assert float(size.mean()) == pytest.approx(mean, abs=5 * math.sqrt(var / steps))
    assert float(size.var()) == pytest.approx(var, rel=0.15)
    per_example = counts / steps
    assert float(per_example.mean()) == pytest.approx(rate, rel=0.02)
    assert float((per_example - rate).abs().max()) < 5 * math.sqrt(rate * (1 - rate) / steps)


def test_poisson_batches_edge_rates() -> None:
    gen = torch.Generator().manual_seed(0)
    assert all(torch.equal(b, torch.arange(7)) for b in poisson_batches(7, 1.0, 3, gen))
    assert all(b.numel() == 0 for b in poisson_batches(7, 0.0, 3, gen))
    tiny = list(poisson_batches(3, 1e-9, 4, gen))
    assert len(tiny) == 4 and all(b.numel() == 0 for b in tiny)


def mean_loss(model: nn.Module, X: Tensor, y: Tensor) -> float:
    with torch.no_grad():
        return float(churn_per_sample_loss(model(X), y).mean())


def test_non_dp_training_learns_and_is_deterministic() -> None:
    X, y = toy_data(n=400)

    def run() -> tuple[float, list[Tensor]]:
        model = build_churn_model("mlp", 5, seed=2)
        stats = train_non_dp(model, X, y, per_sample_loss=churn_per_sample_loss, epochs=20,
                             batch_size=32, learning_rate=0.05,
                             generator=torch.Generator().manual_seed(3))
        assert stats.steps == math.ceil(20 * 400 / 32)
        return stats.mean_loss, [p.detach().clone() for p in model.parameters()]

    loss, params = run()
    _, again = run()
    assert all(torch.equal(a, b) for a, b in zip(params, again, strict=True))
    start = mean_loss(build_churn_model("mlp", 5, seed=2), X, y)
    assert loss < start


def test_dp_training_improves_the_loss_on_a_learnable_problem() -> None:
    X, y = toy_data(n=2000)
    plan = plan_for_budget(n_examples=2000, target_epsilon=2.0, delta=1e-5, epochs=5,
                           batch_size=200, max_grad_norm=1.0, learning_rate=0.1)
    model = build_churn_model("logistic", 5)
    before = mean_loss(model, X, y)
    train_dp(model, X, y, per_sample_loss=churn_per_sample_loss, plan=plan,
             generator=torch.Generator().manual_seed(0))
    after = mean_loss(model, X, y)
    assert after < before - 0.05


def test_rejects_mismatched_data() -> None:
    model = build_churn_model("logistic", 3)
    with pytest.raises(ValueError, match="one target per row"):
        train_dp(model, torch.zeros(4, 3), torch.zeros(5), per_sample_loss=churn_per_sample_loss,
                 plan=exact_plan(1, 0.1), generator=torch.Generator())
    with pytest.raises(ValueError, match="empty"):
        train_non_dp(model, torch.zeros(0, 3), torch.zeros(0),
                     per_sample_loss=churn_per_sample_loss, epochs=1, batch_size=2,
                     learning_rate=0.1, generator=torch.Generator())


# -- the production noise source (ChaCha20) -------------------------------------------------------


def one_noisy_step(generator: engine.NoiseSource | torch.Generator, *, n: int = 1000,
                   rate: float = 0.1, sigma: float = 1.5, clip: float = 2.0,
                   steps: int = 1) -> Tensor:
    """Weights after ``steps`` SGD steps (lr=1) on zero data gradients: pure noise."""
    model = nn.Linear(400, 5)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    plan = DpPlan(steps=steps, sample_rate=rate, noise_multiplier=sigma, max_grad_norm=clip,
                  learning_rate=1.0, delta=1e-5, epochs=0.1 * steps)
    train_dp(model, torch.rand(n, 400, generator=torch.Generator().manual_seed(1)),
             torch.zeros(n), per_sample_loss=zero_loss, plan=plan, generator=generator,
             optimizer="sgd")
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def test_secure_noise_std_is_noise_multiplier_times_clip_over_expected_batch() -> None:
    moved = one_noisy_step(engine.noise_generator())
    expected = 1.5 * 2.0 / (1000 * 0.1)
    assert float(moved.std()) == pytest.approx(expected, rel=0.1)
    assert abs(float(moved.mean())) < 4 * expected / math.sqrt(moved.numel())


def test_secure_noise_with_an_injected_key_reproduces_and_fresh_sources_differ() -> None:
    def keyed() -> engine.SecureNoise:
        return engine.SecureNoise(SecureRandom(key=bytes(range(32))))

    assert torch.equal(one_noisy_step(keyed(), steps=3), one_noisy_step(keyed(), steps=3))
    assert not torch.equal(one_noisy_step(engine.noise_generator()),
                           one_noisy_step(engine.noise_generator()))


def test_production_training_never_touches_torch_or_numpy_random(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def banned(*args: object, **kwargs: object) -> None:
        raise AssertionError("the production DP path used torch's Mersenne Twister")

    X, y = toy_data(n=300)
    plan = plan_for_budget(n_examples=300, target_epsilon=2.0, delta=1e-4, epochs=2,
                           batch_size=32, max_grad_norm=1.0, learning_rate=0.05)
    model = build_churn_model("mlp", 5, seed=1)
    torch_state, numpy_state = torch.get_rng_state(), np.random.get_state()
    for name in ("randn", "rand", "randint", "randperm", "normal", "bernoulli"):
        monkeypatch.setattr(torch, name, banned)
    for name in ("exponential_", "normal_", "uniform_", "bernoulli_"):
        monkeypatch.setattr(torch.Tensor, name, banned)
    stats = train_dp(model, X, y, per_sample_loss=churn_per_sample_loss, plan=plan,
                     generator=engine.noise_generator())
    assert stats.steps == plan.steps and stats.examples_processed > 0
    monkeypatch.undo()
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert all(np.array_equal(a, b) for a, b in zip(np.random.get_state(), numpy_state,
                                                     strict=True))


@pytest.mark.parametrize("block", [1, 7, 2**16])
def test_noise_blocks_give_every_step_its_own_full_noise_vector(
    monkeypatch: pytest.MonkeyPatch, block: int
) -> None:
    monkeypatch.setattr(engine, "_NOISE_BLOCK", block)
    source = engine.SecureNoise(SecureRandom(key=bytes(32)))
    vectors = list(engine._step_noise(source, 5, 23, torch.float32))
    assert len(vectors) == 23 and all(v.shape == (5,) and v.dtype == torch.float32
                                      for v in vectors)
    assert len({tuple(v.tolist()) for v in vectors}) == 23  # no step reuses another's noise
    # blocks only cut the stream; they never skip or repeat values of it
    whole = engine.SecureNoise(SecureRandom(key=bytes(32))).normal(5 * 23, dtype=torch.float32)
    if block >= 5 * 23:
        torch.testing.assert_close(torch.cat(vectors), whole, rtol=0, atol=0)


def test_secure_noise_over_many_blocked_steps_keeps_its_scale(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(engine, "_NOISE_BLOCK", 1000)  # force several blocks
    moved = one_noisy_step(engine.noise_generator(), steps=8)
    # 8 independent steps: the sum of 8 draws, std √8 σC/(nq)
    expected = math.sqrt(8) * 1.5 * 2.0 / (1000 * 0.1)
    assert float(moved.std()) == pytest.approx(expected, rel=0.1)


# --- the budget rule (fedcrm train's defaults) and tail averaging ---------------------------


def test_budget_rule_sizes_a_run_from_n_and_epsilon_alone() -> None:
    from fedcrm.learning.settings import BUDGET_SCHEDULE as rule

    small = plan_for_budget(n_examples=2_000, target_epsilon=1.0, delta=1e-5)
    large = plan_for_budget(n_examples=20_000, target_epsilon=1.0, delta=1e-5)
    loose = plan_for_budget(n_examples=2_000, target_epsilon=4.0, delta=1e-5)
    for plan in (small, large, loose):
        assert plan.steps == rule.steps
        assert plan.learning_rate == pytest.approx(rule.travel / rule.steps)
        assert plan.epsilon() <= 1.0 + 1e-9 or plan is loose
        # the sampling rate puts σ at about the rule's target, where σ/q has flattened out
        assert plan.noise_multiplier == pytest.approx(rule.noise_multiplier, rel=0.15)
        assert plan.epochs == pytest.approx(plan.steps * plan.sample_rate)
    assert loose.epsilon() <= 4.0 + 1e-9
    # the same rate whatever the firm's size: the batch grows with n, the steps do not
    assert large.sample_rate == pytest.approx(small.sample_rate)
    assert large.expected_batch == pytest.approx(10 * small.expected_batch)
    # a looser budget buys a larger batch at the same noise multiplier
    assert loose.sample_rate > 2 * small.sample_rate
    mlp = plan_for_budget(n_examples=2_000, target_epsilon=1.0, delta=1e-5, hidden_layers=True)
    assert mlp.learning_rate == pytest.approx(rule.hidden_travel / rule.steps)


def test_noise_on_the_averaged_gradient_is_near_its_floor_at_the_rule_rate() -> None:
    from fedcrm.learning.dp_engine import schedule_sample_rate
    from fedcrm.privacy.accounting import calibrate_noise

    steps = 1000
    q = schedule_sample_rate(target_epsilon=1.0, delta=1e-5, steps=steps)
    at_rule = calibrate_noise(target_epsilon=1.0, delta=1e-5, sample_rate=q, steps=steps) / q
    floor = calibrate_noise(target_epsilon=1.0, delta=1e-5, sample_rate=0.9, steps=steps) / 0.9
    assert floor <= at_rule <= 1.15 * floor


def test_settings_given_replace_their_part_of_the_rule() -> None:
    from fedcrm.learning.settings import BUDGET_SCHEDULE as rule

    batch = plan_for_budget(n_examples=5_000, target_epsilon=1.0, delta=1e-5, batch_size=500)
    assert batch.sample_rate == pytest.approx(0.1) and batch.steps == rule.steps
    epochs = plan_for_budget(n_examples=5_000, target_epsilon=1.0, delta=1e-5, epochs=30)
    assert epochs.steps == rule.steps and epochs.sample_rate == pytest.approx(30 / rule.steps)
    both = plan_for_budget(n_examples=5_000, target_epsilon=1.0, delta=1e-5, epochs=2,
                           batch_size=250, learning_rate=0.3)
    assert both.steps == 40 and both.learning_rate == 0.3
    assert both.learning_rate != plan_for_budget(
        n_examples=5_000, target_epsilon=1.0, delta=1e-5, epochs=2, batch_size=250).learning_rate


def test_fedcrm_train_defaults_leave_the_schedule_to_the_rule() -> None:
    from fedcrm.data.contract import TrainingSection
    from fedcrm.learning.settings import FEDERATED_ROUND, LOCAL_TRAINING

    default = TrainingSection().dp_sgd
    assert default == LOCAL_TRAINING
    assert default.epochs is None and default.batch_size is None
    assert default.learning_rate is None and default.average_tail > 0
    assert TrainingSection(batch_size=128).dp_sgd.batch_size == 128
    # the federated round is fixed by the run config, never derived, never averaged
    assert FEDERATED_ROUND.epochs is not None and FEDERATED_ROUND.average_tail == 0.0


@pytest.mark.parametrize("tail, averaged_steps", [(0.5, 3), (0.25, 2), (0.0, 0)])
def test_average_tail_releases_the_mean_of_the_last_iterates(
    monkeypatch: pytest.MonkeyPatch, tail: float, averaged_steps: int
) -> None:
    X, y = toy_data()
    iterates: list[list[Tensor]] = []
    plain_step = engine._Sgd.step

    def recording_step(self: engine._Sgd, grads: list[Tensor]) -> None:
        plain_step(self, grads)
        iterates.append([p.detach().clone() for p in self.params])

    monkeypatch.setattr(engine._Sgd, "step", recording_step)
    model = build_churn_model("mlp", 5, seed=1)
    train_dp(model, X, y, per_sample_loss=churn_per_sample_loss,
             plan=exact_plan(6, 0.5, noise=1.0, clip=1.0, rate=0.5),
             generator=torch.Generator().manual_seed(0), optimizer="sgd", average_tail=tail)
    assert len(iterates) == 6
    tail_iterates = iterates[6 - averaged_steps:] if averaged_steps else iterates[-1:]
    expected = [torch.stack(ps).mean(0) for ps in zip(*tail_iterates, strict=True)]
    for p, e in zip(model.parameters(), expected, strict=True):
        torch.testing.assert_close(p.detach(), e, atol=1e-6, rtol=1e-5)


def test_average_tail_outside_zero_to_one_is_refused() -> None:
    X, y = toy_data()
    with pytest.raises(ValueError, match="average_tail"):
        train_dp(build_churn_model("logistic", 5), X, y, per_sample_loss=churn_per_sample_loss,
                 plan=exact_plan(2, 0.1), generator=torch.Generator(), average_tail=1.0)


def test_poisson_batches_are_the_same_draws_as_one_bernoulli_sequence() -> None:
    """Step ``s``'s batch is the successes in positions ``[s·n, (s+1)·n)`` of one long
    sequence, shifted to example numbers (the block's per-step slicing)."""
    n, rate, steps = 50, 0.2, 30
    batches = list(poisson_batches(n, rate, steps, torch.Generator().manual_seed(5)))
    positions = engine._bernoulli_successes(
        n * steps, rate, engine.SeededNoise(torch.Generator().manual_seed(5)))
    for s, idx in enumerate(batches):
        in_step = positions[(positions >= s * n) & (positions < (s + 1) * n)] - s * n
        assert torch.equal(idx, in_step)
