"""Fast DP-SGD for the small tabular models fedcrm trains on each firm's customers.

The engine implements DP-SGD (Abadi et al., "Deep Learning with Differential Privacy", CCS 2016)
with Poisson subsampling, the setting the RDP accountant in :mod:`privacy.accounting` analyses
(Mironov, Talwar, Zhang, "Rényi Differential Privacy of the Sampled Gaussian Mechanism", 2019).

One step:

1. every example joins the batch independently with probability ``q = plan.sample_rate``
   (an empty batch is a valid, counted, noise-only step);
2. each example's gradient is clipped to L2 norm ``C = plan.max_grad_norm``;
3. ``N(0, (σ·C)²)`` noise, ``σ = plan.noise_multiplier``, is added to the SUM of clipped gradients;
4. the sum is divided by the EXPECTED batch size ``n·q`` (not the realised one, whose size would
   itself leak), and the optimizer (SGD or Adam, both post-processing) takes a step.

The noise is calibrated before training by :func:`plan_for_budget` from the firm's total ε cap and
the whole plan (rounds × local steps at sampling rate ``q``), so a plan fits by construction and
nothing here computes ε inside the training loop.

Per-example clipping never loops over examples:

* a model that is a single ``nn.Linear`` (logistic regression) uses the closed form
  ``g_i = dL_i/dz_i ⊗ [x_i, 1]`` with ``‖g_i‖ = ‖dL_i/dz_i‖·sqrt(‖x_i‖² + 1)``;
* a ``Sequential`` of ``nn.Linear`` and element-wise activations uses ghost norms
  (Goodfellow 2015; Li et al. 2022, "Large Language Models Can Be Strong Differentially Private
  Learners"; Opacus' ``GradSampleModuleFastGradientClipping``): one forward, one backward to the
  layer outputs, ``‖∇W_i‖² = ‖a_i‖²·‖g_i‖²`` per layer, then the clipped sum
  ``Σ_i c_i g_i a_iᵀ`` as one matrix product per layer (the "book-keeping" trick of Bu et al. 2023,
  which needs no second backward pass);
* anything else falls back to ``torch.func.vmap`` per-example gradients.

All randomness of a DP run (Poisson sampling and Gaussian noise) comes from one injected
:class:`NoiseSource`. In production it is :func:`noise_generator`'s :class:`SecureNoise`: the
ChaCha20 keystream of :class:`fedcrm.privacy.noise.SecureRandom` (``cryptography``/OpenSSL, a
fresh 256-bit key from the OS per training round), so the noise cannot be predicted or replayed
from earlier outputs, as it could from a Mersenne Twister. Tests and benchmarks that need
reproducible runs inject :class:`SeededNoise` (or a plain seeded ``torch.Generator``, which
:func:`train_dp` wraps in one); that is torch's Mersenne Twister and never the production path.
Noise is drawn in blocks of several steps (one keystream call per block), not per step or element.

Still NOT hardened: the Gaussian noise is floating-point. Normals come from the Box–Muller
transform of 53-bit uniforms (radius in float64; angle and result in float32 for float32
parameters) and are added to float gradients. This is not a discretised or snapping mechanism,
so the attacks of Mironov ("On Significance of the Least Significant Bits for Differential
Privacy", CCS 2012) on the irregular set of floating-point outputs are not ruled out: the
guarantee is that of the ideal Gaussian mechanism, to the extent that float rounding does not
break it. (Integer releases such as counts should use
:func:`fedcrm.privacy.noise.discrete_gaussian`, which is exact.)
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from fedcrm.learning.settings import (
    BUDGET_SCHEDULE,
    LOCAL_TRAINING,
    BudgetSchedule,
    DpOptimizer,
)
from fedcrm.privacy.accounting import (
    ContextValue,
    DpEvent,
    Mechanism,
    calibrate_noise,
    epsilon_for,
    make_event,
)
from fedcrm.privacy.errors import PlanDoesNotFit
from fedcrm.privacy.noise import SecureRandom

PerSampleLoss = Callable[[Tensor, Tensor], Tensor]
"""``(model_output[B, ...], targets[B, ...]) -> loss[B]``: one loss per example, no reduction."""

#: Parameter-free modules that act on each example independently (safe for ghost clipping).
_ELEMENTWISE: tuple[type[nn.Module], ...] = (
    nn.ReLU,
    nn.LeakyReLU,
    nn.ELU,
    nn.GELU,
    nn.SiLU,
    nn.Tanh,
    nn.Sigmoid,
    nn.Softplus,
    nn.Identity,
)


# Defaults: the local-training profile, declared once in fedcrm.learning.settings (its epochs,
# batch size and learning rate are unset: plan_for_budget derives them by BUDGET_SCHEDULE).
DEFAULT_MAX_GRAD_NORM = LOCAL_TRAINING.max_grad_norm
DEFAULT_OPTIMIZER = LOCAL_TRAINING.optimizer


@dataclass(frozen=True)
class DpPlan:
    """Everything one firm's DP-SGD run will do, fixed before it starts.

    ``steps`` and ``epochs`` are LOCAL, per training round; the noise multiplier was calibrated for
    ``rounds × steps`` steps at ``sample_rate``, composed with the firm's earlier releases.
    """

    steps: int
    sample_rate: float
    noise_multiplier: float
    max_grad_norm: float
    learning_rate: float
    delta: float
    epochs: float
    rounds: int = 1
    #: What the noisy gradient sum is divided by: ``n_examples · sample_rate`` for the size the
    #: plan was made for (a federated firm's declared public size), so the released update's
    #: scale never depends on the exact number of customers. ``None``: the data's own ``n · q``.
    expected_batch: float | None = None

    @property
    def total_steps(self) -> int:
        """DP-SGD steps over all rounds (what the noise was calibrated for)."""
        return self.steps * self.rounds

    def epsilon(self, *, prior_events: Sequence[DpEvent] = ()) -> float:
        """ε of the whole plan (all rounds) composed with ``prior_events``, at ``self.delta``."""
        return epsilon_for(
            noise_multiplier=self.noise_multiplier,
            sample_rate=self.sample_rate,
            steps=self.total_steps,
            delta=self.delta,
            prior_events=tuple(prior_events),
        )

    def round_event(self, *, purpose: str,
                    context: Mapping[str, ContextValue] | None = None) -> DpEvent:
        """The privacy event of ONE round of this plan, for the firm's ledger (check, then
        commit)."""
        return make_event(
            mechanism=Mechanism.SUBSAMPLED_GAUSSIAN,
            noise_multiplier=self.noise_multiplier,
            sample_rate=self.sample_rate,
            steps=self.steps,
            delta=self.delta,
            purpose=purpose,
            context=context,
        )


@dataclass(frozen=True)
class TrainStats:
    """What a local training run did.

    ``mean_loss`` and ``examples_processed`` are computed on the firm's private data and are NOT
    privatised: keep them local (logs on the firm's own machine), never send them to the server.
    """

    steps: int
    empty_steps: int
    examples_processed: int
    mean_loss: float
    seconds: float


@runtime_checkable
class NoiseSource(Protocol):
    """Where one DP-SGD run takes ALL its randomness: Gaussian noise and Poisson sampling.

    Each call returns a whole vector; :func:`train_dp` asks for blocks covering several steps.
    """

    def normal(self, n: int, *, dtype: torch.dtype) -> Tensor:
        """``n`` independent standard normals, as a 1-D tensor of ``dtype``."""
        ...

    def exponential(self, n: int) -> Tensor:
        """``n`` independent Exp(1) variates, float64 (the Poisson sampler's geometric gaps)."""
        ...


class SecureNoise:
    """Production noise: the ChaCha20 keystream of :class:`fedcrm.privacy.noise.SecureRandom`.

    ``rng`` is for tests with an injected key; production calls :func:`noise_generator`, which
    gives every training round a fresh key from the OS.
    """

    __slots__ = ("_rng",)

    def __init__(self, rng: SecureRandom | None = None) -> None:
        self._rng = rng if rng is not None else SecureRandom()

    def __repr__(self) -> str:
        return f"SecureNoise({self._rng!r})"

    def normal(self, n: int, *, dtype: torch.dtype) -> Tensor:
        single = dtype == torch.float32  # float32 parameters: float32 Box–Muller, 4× faster
        return torch.from_numpy(self._rng.normal(n, single=single)).to(dtype)

    def exponential(self, n: int) -> Tensor:
        return torch.from_numpy(self._rng.exponential(n))


class SeededNoise:
    """Reproducible noise from a seeded ``torch.Generator`` (Mersenne Twister, NOT a CSPRNG):
    for tests and benchmarks only, never for a release."""

    __slots__ = ("generator",)

    def __init__(self, generator: torch.Generator) -> None:
        self.generator = generator

    def normal(self, n: int, *, dtype: torch.dtype) -> Tensor:
        return torch.randn(n, generator=self.generator, dtype=dtype)

    def exponential(self, n: int) -> Tensor:
        # -log(1 - U), U uniform on [0, 1) with 53 bits: the inverse CDF, vectorised (3x faster
        # than ``Tensor.exponential_``, which takes a scalar log per draw).
        u = torch.rand(n, dtype=torch.float64, generator=self.generator)
        return u.neg_().log1p_().neg_()


def noise_generator() -> SecureNoise:
    """The production noise source for one training round: a ChaCha20 keystream under a fresh
    256-bit key from the OS (never a fixed seed). Pass it as ``train_dp(..., generator=...)``."""
    return SecureNoise()


def as_noise_source(generator: NoiseSource | torch.Generator) -> NoiseSource:
    """``generator`` as a :class:`NoiseSource`; a seeded ``torch.Generator`` (tests,
    benchmarks) is wrapped in :class:`SeededNoise`.

    Fails closed: only the two sources above are accepted, since anything with ``normal`` and
    ``exponential`` methods (a numpy ``Generator``, say) would satisfy the protocol.
    """
    if isinstance(generator, torch.Generator):
        return SeededNoise(generator)
    if not isinstance(generator, (SecureNoise, SeededNoise)):
        raise TypeError(
            f"DP-SGD takes its noise from a NoiseSource: noise_generator() in production, a seeded "
            f"torch.Generator in tests; got {type(generator).__name__}"
        )
    return generator


#: Sampling rate at which :func:`schedule_sample_rate` reads the accountant's noise per unit rate.
_REFERENCE_RATE = 0.5


def schedule_sample_rate(
    *,
    target_epsilon: float,
    delta: float,
    steps: int,
    noise_multiplier: float = BUDGET_SCHEDULE.noise_multiplier,
    prior_events: Sequence[DpEvent] = (),
) -> float:
    """The budget rule's sampling rate: ``q = noise_multiplier / s``, ``s`` the noise multiplier
    per unit rate that fits ``target_epsilon`` at ``q = 0.5`` over ``steps`` steps.

    Under Poisson sampling ``σ/q`` (the noise on the averaged gradient, times ``n/C``) falls as
    ``q`` grows and is flat once ``σ`` is about 3, so this is the smallest rate whose noise is
    within a few percent of the least ``target_epsilon`` allows at ``steps`` steps
    (``fedcrm.learning.settings``, rule step 2). At most 1.
    """
    per_rate = calibrate_noise(
        target_epsilon=target_epsilon, delta=delta, sample_rate=_REFERENCE_RATE, steps=steps,
        prior_events=tuple(prior_events),
    ) / _REFERENCE_RATE
    return min(1.0, noise_multiplier / per_rate)


def plan_for_budget(
    *,
    n_examples: int,
    target_epsilon: float,
    delta: float,
    epochs: float | None = None,
    batch_size: int | None = None,
    max_grad_norm: float = DEFAULT_MAX_GRAD_NORM,
    learning_rate: float | None = None,
    rounds: int = 1,
    prior_events: Sequence[DpEvent] = (),
    hidden_layers: bool = False,
    schedule: BudgetSchedule = BUDGET_SCHEDULE,
) -> DpPlan:
    """Calibrate the noise of a whole DP-SGD plan so that it fits ``target_epsilon`` by design.

    ``target_epsilon`` is the firm's TOTAL cap: ``prior_events`` (what the firm already spent) are
    composed with ``rounds`` rounds of ``ceil(epochs / q)`` local steps each, ``q = min(1,
    batch_size / n_examples)``.

    Left unset (``None``, the local-training default), the budget rule ``schedule`` sizes the run
    (``fedcrm.learning.settings``): ``schedule.steps`` steps unless both ``epochs`` and
    ``batch_size`` are given; ``q`` from :func:`schedule_sample_rate` unless ``batch_size`` is
    given (or ``epochs`` alone is: then ``q = epochs / steps``); learning rate
    ``schedule.travel / steps``, or ``schedule.hidden_travel / steps`` for a model with
    ``hidden_layers`` (the MLP).

    Raises :class:`PlanDoesNotFit` naming the numbers when the inputs are unusable or no noise
    level fits.
    """
    if n_examples < 1:
        raise PlanDoesNotFit(
            f"DP training plan needs at least 1 customer, got n={n_examples}; "
            "check the firm's prepared store"
        )
    if (batch_size is not None and batch_size < 1) or (epochs is not None and not epochs > 0) \
            or rounds < 1:
        raise PlanDoesNotFit(
            f"DP training plan needs batch_size ≥ 1, epochs > 0 and rounds ≥ 1; got "
            f"batch_size={batch_size}, epochs={epochs}, rounds={rounds}; fix the training config"
        )
    if not max_grad_norm > 0 or (learning_rate is not None and not learning_rate > 0):
        raise PlanDoesNotFit(
            f"DP training plan needs max_grad_norm > 0 and learning_rate > 0; got "
            f"max_grad_norm={max_grad_norm}, learning_rate={learning_rate}; fix the training config"
        )
    if not target_epsilon > 0:
        raise PlanDoesNotFit(
            f"DP training plan needs a positive ε cap, got ε={target_epsilon}; "
            "raise the firm's epsilon budget in its config"
        )
    if not 0 < delta < 1.0 / n_examples:
        raise PlanDoesNotFit(
            f"δ={delta:g} must lie in (0, 1/n) = (0, {1.0 / n_examples:.3g}) for n={n_examples} "
            "customers; a δ that large would allow leaking whole records. Lower delta in the config"
        )
    if batch_size is not None:
        sample_rate = min(1.0, batch_size / n_examples)
    elif epochs is not None:
        sample_rate = min(1.0, epochs / schedule.steps)
    else:
        sample_rate = schedule_sample_rate(
            target_epsilon=target_epsilon, delta=delta, steps=schedule.steps * rounds,
            noise_multiplier=schedule.noise_multiplier, prior_events=prior_events,
        )
    if epochs is not None:
        steps = max(1, math.ceil(epochs / sample_rate - 1e-9))
    else:
        steps = schedule.steps
    noise_multiplier = calibrate_noise(
        target_epsilon=target_epsilon,
        delta=delta,
        sample_rate=sample_rate,
        steps=steps * rounds,
        prior_events=tuple(prior_events),
    )
    return DpPlan(
        steps=steps,
        sample_rate=sample_rate,
        noise_multiplier=float(noise_multiplier),
        max_grad_norm=float(max_grad_norm),
        learning_rate=float(learning_rate if learning_rate is not None
                            else schedule.learning_rate(steps, hidden_layers=hidden_layers)),
        delta=float(delta),
        epochs=float(epochs if epochs is not None else steps * sample_rate),
        rounds=int(rounds),
        expected_batch=float(n_examples * sample_rate),
    )


# ---------------------------------------------------------------------------------------------
# Per-example clipped gradient sums
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClippedGradients:
    """Sum over a batch of per-example gradients clipped to ``max_grad_norm``.

    ``grads`` align with ``trainable_parameters(model)``; ``norms`` are the per-example gradient
    norms BEFORE clipping; ``loss_sum`` is the (private, unreleased) summed batch loss.
    """

    grads: list[Tensor]
    norms: Tensor
    loss_sum: Tensor


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters DP-SGD updates, in ``model.parameters()`` order."""
    return [p for p in model.parameters() if p.requires_grad]


def _flat_layers(module: nn.Module) -> list[nn.Module] | None:
    """Layers of a (nested) Sequential of Linear + element-wise modules, else ``None``."""
    if isinstance(module, nn.Sequential):
        out: list[nn.Module] = []
        for child in module:
            sub = _flat_layers(child)
            if sub is None:
                return None
            out.extend(sub)
        return out
    if isinstance(module, nn.Linear) or (
        isinstance(module, _ELEMENTWISE) and not any(True for _ in module.parameters())
    ):
        return [module]
    return None


def _check_losses(losses: Tensor, batch: int) -> Tensor:
    if losses.shape != (batch,):
        raise ValueError(
            f"per_sample_loss must return one loss per example, shape ({batch},), got "
            f"{tuple(losses.shape)}; use reduction='none' and squeeze the output dimension"
        )
    return losses


def _clip_factors(norms: Tensor, max_grad_norm: float) -> Tensor:
    return (max_grad_norm / (norms + 1e-6)).clamp(max=1.0)


@runtime_checkable
class OutputGradientLoss(Protocol):
    """A per-example loss that also knows its gradient with respect to the model output.

    Optional: with it, the ghost-clipping path runs forward and backward by hand, without autograd
    (``fedcrm.models.churn_per_sample_loss`` is one).
    """

    def __call__(self, output: Tensor, target: Tensor) -> Tensor: ...

    def output_gradient(self, output: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        """``(loss[B], d loss_i / d output_i)`` with the gradient shaped like ``output``."""
        ...


#: Modules that couple the examples of a batch (per-example gradients are then meaningless).
_BATCH_COUPLED: tuple[type[nn.Module], ...] = (
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm,
)

#: Activations whose backward pass the manual path knows (others go through autograd).
_MANUAL_BACKWARD: tuple[type[nn.Module], ...] = (nn.ReLU, nn.Tanh, nn.Sigmoid, nn.Identity)


def _activation_backward(module: nn.Module, out: Tensor, grad: Tensor) -> Tensor:
    if isinstance(module, nn.ReLU):
        # autograd's own ReLU backward: one fused pass, 3-4x faster than ``grad * (out > 0)``
        # (which builds a bool mask and promotes it) on a [4096, 128] batch.
        return torch.ops.aten.threshold_backward(grad, out, 0.0)
    if isinstance(module, nn.Tanh):
        return grad * (1.0 - out * out)
    if isinstance(module, nn.Sigmoid):
        return grad * (out * (1.0 - out))
    return grad


def _row_sq_norms(t: Tensor) -> Tensor:
    """``‖t_i‖²`` per row of a 2-D tensor: one fused reduction, no ``t²`` temporary."""
    return torch.linalg.vector_norm(t, dim=1).square_()


class _GhostClipper:
    """Clipped gradient sums for a Sequential of Linear + element-wise layers (or one Linear).

    Per example ``i`` and Linear layer with input ``a_i`` and output gradient ``g_i`` (non-sequence
    inputs), the weight gradient is ``g_i a_iᵀ`` with norm ``‖g_i‖·‖a_i‖`` and the bias gradient is
    ``g_i``; summing ``‖g_i‖²(‖a_i‖² + 1)`` over layers gives the per-example norm without ever
    forming per-example gradients, and the clipped sum is ``Σ_i c_i g_i a_iᵀ = (c ⊙ G)ᵀ A``.
    """

    def __init__(self, model: nn.Module, layers: list[nn.Module], per_sample_loss: PerSampleLoss,
                 max_grad_norm: float) -> None:
        self.layers = layers
        self.loss = per_sample_loss
        self.max_grad_norm = max_grad_norm
        self.linears = [m for m in layers if isinstance(m, nn.Linear)]
        params = trainable_parameters(model)
        self.index = {id(p): i for i, p in enumerate(params)}
        self.shapes = [p.shape for p in params]
        first = next(i for i, m in enumerate(layers) if isinstance(m, nn.Linear))
        manual = isinstance(per_sample_loss, OutputGradientLoss) and all(
            isinstance(m, (nn.Linear, *_MANUAL_BACKWARD)) for m in layers[first:]
        )
        # Looked up once: a runtime-checkable Protocol's isinstance costs ~20 µs per step.
        self.output_gradient = (
            per_sample_loss.output_gradient
            if manual and isinstance(per_sample_loss, OutputGradientLoss) else None
        )
        self.manual = self.output_gradient is not None

    def input_factor(self, X: Tensor) -> Tensor | None:
        """``‖x_i‖² (+1 with a bias)`` for the first layer, when it reads ``X`` directly: computed
        once per run (one fused pass, no ``X²`` copy) and gathered per batch."""
        first = self.layers[0]
        if not isinstance(first, nn.Linear):
            return None
        sq = _row_sq_norms(X)
        return sq.add_(1.0) if first.bias is not None else sq

    def _manual(self, X: Tensor, y: Tensor) -> tuple[list[Tensor], list[Tensor], Tensor]:
        assert self.output_gradient is not None
        inputs: list[Tensor] = []
        trace: list[tuple[nn.Module, Tensor]] = []
        with torch.no_grad():
            h = X
            fresh = False  # whether ``h`` is this step's own temporary (safe to overwrite)
            for m in self.layers:
                if isinstance(m, nn.Linear):
                    inputs.append(h)
                    h = torch.nn.functional.linear(h, m.weight, m.bias)
                    fresh = True
                elif fresh and isinstance(m, nn.ReLU):
                    h = h.relu_()  # the Linear output it overwrites is not needed backward
                else:
                    h = m(h)
                    fresh = True
                trace.append((m, h))
            losses, g = self.output_gradient(h, y)
            backprops: list[Tensor] = []
            remaining = len(self.linears)
            for m, out in reversed(trace):
                if isinstance(m, nn.Linear):
                    backprops.append(g)
                    remaining -= 1
                    if remaining == 0:
                        break
                    g = g @ m.weight
                else:
                    g = _activation_backward(m, out, g)
        backprops.reverse()
        return inputs, backprops, losses

    def _autograd(self, X: Tensor, y: Tensor) -> tuple[list[Tensor], list[Tensor], Tensor]:
        inputs: list[Tensor] = []
        outputs: list[Tensor] = []
        h = X
        for m in self.layers:
            if isinstance(m, nn.Linear):
                inputs.append(h.detach())
                bias = m.bias.detach() if m.bias is not None else None
                z = torch.nn.functional.linear(h, m.weight.detach(), bias)
                if not z.requires_grad:
                    z.requires_grad_(True)
                outputs.append(z)
                h = z
            else:
                h = m(h)
        losses = self.loss(h, y)
        _check_losses(losses, X.shape[0])
        backprops = list(torch.autograd.grad(losses.sum(), outputs))
        return inputs, backprops, losses.detach()

    def __call__(self, X: Tensor, y: Tensor, x_factor: Tensor | None = None) -> ClippedGradients:
        inputs, backprops, losses = self._manual(X, y) if self.manual else self._autograd(X, y)
        _check_losses(losses, X.shape[0])
        sq: Tensor | None = None
        for k, (m, a, g) in enumerate(zip(self.linears, inputs, backprops, strict=True)):
            g_sq = _row_sq_norms(g)
            if k == 0 and x_factor is not None:
                a_sq = x_factor
            else:
                a_sq = _row_sq_norms(a)
                if m.bias is not None:
                    a_sq = a_sq.add_(1.0)
            term = g_sq.mul_(a_sq)
            sq = term if sq is None else sq.add_(term)
        assert sq is not None
        norms = sq.sqrt_()
        c = _clip_factors(norms, self.max_grad_norm)

        grads: list[Tensor | None] = [None] * len(self.shapes)
        for m, a, g in zip(self.linears, inputs, backprops, strict=True):
            if m.weight.requires_grad:
                # Σ_i c_i g_i a_iᵀ: scale the narrower of the two factors (fewer multiplies).
                if g.shape[1] <= a.shape[1]:
                    grads[self.index[id(m.weight)]] = (g * c.unsqueeze(1)).T @ a
                else:
                    grads[self.index[id(m.weight)]] = g.T @ (a * c.unsqueeze(1))
            if m.bias is not None and m.bias.requires_grad:
                grads[self.index[id(m.bias)]] = c @ g  # Σ_i c_i g_i as one matrix-vector product
        return ClippedGradients(
            grads=[g if g is not None else torch.zeros(s)
                   for g, s in zip(grads, self.shapes, strict=True)],
            norms=norms,
            loss_sum=losses.sum(),
        )


class _VmapClipper:
    """Fallback for arbitrary modules: per-example gradients with ``torch.func.vmap``."""

    def __init__(self, model: nn.Module, per_sample_loss: PerSampleLoss,
                 max_grad_norm: float) -> None:
        from torch.func import functional_call, grad, vmap

        self.model = model
        self.max_grad_norm = max_grad_norm
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        self.loss = per_sample_loss

        def one_loss(params: dict[str, Tensor], buffers: dict[str, Tensor], x: Tensor,
                     t: Tensor) -> Tensor:
            out = functional_call(model, (params, buffers), (x.unsqueeze(0),))
            return per_sample_loss(out, t.unsqueeze(0)).sum()

        self._per_example = vmap(grad(one_loss), in_dims=(None, None, 0, 0))
        self._one_loss = one_loss

    def __call__(self, X: Tensor, y: Tensor, x_factor: Tensor | None = None) -> ClippedGradients:
        params = {n: p.detach() for n, p in self.model.named_parameters() if p.requires_grad}
        buffers = {n: b.detach() for n, b in self.model.named_buffers()}
        with torch.no_grad():
            losses = _check_losses(self.loss(self.model(X), y), X.shape[0])
        per_example = self._per_example(params, buffers, X, y)
        flat = [per_example[n].reshape(X.shape[0], -1) for n in self.names]
        norms = torch.stack([f.pow(2).sum(1) for f in flat]).sum(0).sqrt()
        c = _clip_factors(norms, self.max_grad_norm)
        grads = [torch.tensordot(c, per_example[n], dims=1) for n in self.names]
        return ClippedGradients(grads=grads, norms=norms, loss_sum=losses.sum())


def _clipper(model: nn.Module, per_sample_loss: PerSampleLoss,
             max_grad_norm: float) -> _GhostClipper | _VmapClipper:
    if any(isinstance(m, _BATCH_COUPLED) for m in model.modules()):
        raise ValueError(
            "DP-SGD needs each customer's loss to depend on that customer alone; BatchNorm mixes "
            "examples within a batch. Use LayerNorm or GroupNorm instead"
        )
    layers = _flat_layers(model)
    if layers is not None and any(isinstance(m, nn.Linear) for m in layers):
        return _GhostClipper(model, layers, per_sample_loss, max_grad_norm)
    return _VmapClipper(model, per_sample_loss, max_grad_norm)


def clipped_gradient_sum(model: nn.Module, X: Tensor, y: Tensor, *, per_sample_loss: PerSampleLoss,
                         max_grad_norm: float) -> ClippedGradients:
    """Sum of per-example gradients of ``per_sample_loss(model(X), y)``, each clipped to
    ``max_grad_norm``, computed without materialising per-example gradients where possible."""
    return _clipper(model, per_sample_loss, max_grad_norm)(X, y)


def _input_factor(clipper: _GhostClipper | _VmapClipper, X: Tensor) -> Tensor | None:
    return clipper.input_factor(X) if isinstance(clipper, _GhostClipper) else None


# ---------------------------------------------------------------------------------------------
# Poisson sampling, optimizers, training loops
# ---------------------------------------------------------------------------------------------


#: About how many sampled indices one block of steps draws at once (bounds memory).
_SAMPLING_BLOCK = 2**22

#: About how many Gaussian noise values one draw covers (whole steps; bounds memory).
_NOISE_BLOCK = 2**16


def _bernoulli_successes(length: int, sample_rate: float, source: NoiseSource) -> Tensor:
    """Sorted positions of the successes among ``length`` i.i.d. Bernoulli(``sample_rate``) trials.

    Exact and O(length·q) instead of O(length): the gaps between successive successes are i.i.d.
    Geometric(q) on {1, 2, ...}, drawn as ``floor(E / λ) + 1`` with ``E ~ Exp(1)`` and
    ``λ = -log(1-q)``, since ``P(floor(E/λ) ≥ k) = e^{-kλ} = (1-q)^k``. Float64 throughout:
    positions are exact integers below 2**53.
    """
    rate = -math.log1p(-sample_rate)
    expected = length * sample_rate
    chunk = int(expected + 6.0 * math.sqrt(expected) + 16)
    pieces: list[Tensor] = []
    last = -1.0
    while True:
        gaps = source.exponential(chunk)
        positions = gaps.div_(rate).floor_().add_(1.0).cumsum_(0).add_(last)
        if positions[-1] >= length:
            pieces.append(positions[: int(torch.searchsorted(positions, float(length)))])
            break
        pieces.append(positions)
        last = float(positions[-1])
    return (pieces[0] if len(pieces) == 1 else torch.cat(pieces)).long()


def poisson_batches(n: int, sample_rate: float, steps: int,
                    generator: NoiseSource | torch.Generator) -> Iterator[Tensor]:
    """Index tensors of ``steps`` Poisson-sampled batches: in every step each of the ``n`` examples
    joins independently with probability ``sample_rate`` (batches may be empty).

    The ``steps × n`` inclusion decisions are one long i.i.d. Bernoulli sequence, so they are drawn
    together, in blocks of steps, by :func:`_bernoulli_successes`; position ``p`` is example
    ``p mod n`` of step ``p // n``. The exponential gaps come from ``generator``.
    """
    source = as_noise_source(generator)
    if sample_rate >= 1.0:
        for _ in range(steps):
            yield torch.arange(n)
        return
    if sample_rate <= 0.0 or n == 0:
        for _ in range(steps):
            yield torch.empty(0, dtype=torch.long)
        return
    block = max(1, min(steps, int(_SAMPLING_BLOCK / max(1.0, n * sample_rate))))
    done = 0
    while done < steps:
        k = min(block, steps - done)
        positions = _bernoulli_successes(k * n, sample_rate, source)
        # Sorted, so each step's positions are one slice: find the k boundaries and shift each
        # slice in place (no division or modulo over the whole block).
        ends = torch.searchsorted(positions, torch.arange(1, k + 1) * n).tolist()
        start = 0
        for step, end in enumerate(ends):
            batch = positions[start:end]
            yield batch.sub_(step * n) if step else batch
            start = end
        done += k


def _step_noise(source: NoiseSource, total: int, steps: int,
                dtype: torch.dtype) -> Iterator[Tensor]:
    """``steps`` flat noise vectors of ``total`` standard normals each, drawn lazily in blocks of
    whole steps (about ``_NOISE_BLOCK`` values per draw): the per-call cost of a source, a
    keystream call plus a numpy transform for :class:`SecureNoise`, is paid once per block."""
    per_block = max(1, min(steps, _NOISE_BLOCK // max(total, 1)))
    done = 0
    while done < steps:
        k = min(per_block, steps - done)
        yield from source.normal(k * total, dtype=dtype).view(k, total).unbind(0)
        done += k


class _Sgd:
    """Plain SGD, ``w ← w − lr·g``, on explicit gradient lists (no ``.grad``, no hooks)."""

    def __init__(self, params: list[nn.Parameter], learning_rate: float) -> None:
        self.params: list[Tensor] = list(params)
        self.lr = learning_rate

    def step(self, grads: list[Tensor]) -> None:
        with torch.no_grad():
            torch._foreach_add_(self.params, grads, alpha=-self.lr)


class _Adam:
    """Adam (Kingma & Ba 2015) with the same update as ``torch.optim.Adam`` defaults
    (β = (0.9, 0.999), ε = 1e-8, no weight decay), on explicit gradient lists.

    ``torch.optim`` spends ~10× more time per step than the arithmetic on these small models; this
    keeps the per-step cost of both DP and non-DP training down to the tensor operations.
    """

    def __init__(self, params: list[nn.Parameter], learning_rate: float,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> None:
        self.params: list[Tensor] = list(params)
        self.lr = learning_rate
        self.b1, self.b2 = betas
        self.eps = eps
        self.t = 0
        self.m = [torch.zeros_like(p) for p in params]
        self.v = [torch.zeros_like(p) for p in params]

    def step(self, grads: list[Tensor]) -> None:
        self.t += 1
        bc1 = 1.0 - self.b1**self.t
        bc2_sqrt = math.sqrt(1.0 - self.b2**self.t)
        with torch.no_grad():
            torch._foreach_mul_(self.m, self.b1)
            torch._foreach_add_(self.m, grads, alpha=1.0 - self.b1)
            torch._foreach_mul_(self.v, self.b2)
            torch._foreach_addcmul_(self.v, grads, grads, value=1.0 - self.b2)
            denom = torch._foreach_sqrt(self.v)
            torch._foreach_div_(denom, bc2_sqrt)
            torch._foreach_add_(denom, self.eps)
            torch._foreach_addcdiv_(self.params, self.m, denom, value=-self.lr / bc1)


def _make_optimizer(kind: DpOptimizer | str, params: list[nn.Parameter],
                    learning_rate: float) -> _Sgd | _Adam:
    if DpOptimizer(kind) is DpOptimizer.ADAM:
        return _Adam(params, learning_rate)
    return _Sgd(params, learning_rate)


def _check_data(X: Tensor, y: Tensor) -> None:
    if X.ndim < 2 or X.shape[0] != y.shape[0]:
        raise ValueError(
            f"features must be [n, d] with one target per row; got X {tuple(X.shape)}, "
            f"y {tuple(y.shape)}"
        )
    if X.shape[0] == 0:
        raise ValueError("cannot train on an empty customer table (0 rows)")


def _proximal_anchors(
    params: list[nn.Parameter], proximal: tuple[Sequence[Tensor], float] | None
) -> tuple[list[Tensor], float]:
    if proximal is None or proximal[1] == 0:
        return [], 0.0
    anchors, mu = proximal
    if len(anchors) != len(params) or any(
        a.shape != p.shape for a, p in zip(anchors, params, strict=False)
    ):
        raise ValueError(
            f"proximal anchors must match the {len(params)} trainable parameters in order and shape"
        )
    return [torch.as_tensor(a, dtype=p.dtype).detach() for a, p in zip(anchors, params,
                                                                       strict=True)], float(mu)


def _add_proximal(grads: list[Tensor], params: list[nn.Parameter], anchors: list[Tensor],
                  mu: float) -> None:
    """FedProx term ``μ/2·‖w − w_global‖²``: data-independent, added after privatisation."""
    if not anchors:
        return
    with torch.no_grad():
        for g, p, w0 in zip(grads, params, anchors, strict=True):
            g.add_(p - w0, alpha=mu)


def train_dp(
    model: nn.Module,
    X: Tensor,
    y: Tensor,
    *,
    per_sample_loss: PerSampleLoss,
    plan: DpPlan,
    generator: NoiseSource | torch.Generator,
    optimizer: DpOptimizer | str = DEFAULT_OPTIMIZER,
    average_tail: float = 0.0,
    proximal: tuple[Sequence[Tensor], float] | None = None,
) -> TrainStats:
    """Run ONE round of ``plan`` (``plan.steps`` DP-SGD steps) on ``(X, y)``, in place on ``model``.

    ``generator`` is where all the run's randomness comes from: :func:`noise_generator` (ChaCha20,
    a fresh key) in production; a seeded ``torch.Generator`` or :class:`SeededNoise` only in tests
    and benchmarks that must be reproducible.

    ``average_tail``: the model left in ``model`` is the mean of the iterates after each of the
    last ``ceil(average_tail · plan.steps)`` steps (0: the last iterate). Like the optimizer it only
    post-processes the privatised gradients, so it costs no privacy; ``fedcrm train`` averages
    the second half (:data:`fedcrm.learning.settings.LOCAL_TRAINING`).

    ``proximal=(global_weights, mu)`` adds the FedProx pull ``mu·(w − w_global)`` to the
    privatised gradient (it does not touch the data, so it costs no privacy); ``global_weights``
    align with the trainable parameters in ``model.parameters()`` order.
    The privacy guarantee is the plan's; recording the round's event in the firm's ledger (check,
    then commit, before the update leaves the firm) is the caller's job: see
    :meth:`DpPlan.round_event`.
    """
    _check_data(X, y)
    if not 0.0 <= average_tail < 1.0:
        raise ValueError(f"average_tail must lie in [0, 1), got {average_tail}")
    start = time.perf_counter()
    n = X.shape[0]
    q = plan.sample_rate
    expected_batch = plan.expected_batch if plan.expected_batch is not None else n * q
    noise_std = plan.noise_multiplier * plan.max_grad_norm
    params = trainable_parameters(model)
    sizes = [p.numel() for p in params]
    shapes = [p.shape for p in params]
    total = sum(sizes)
    opt = _make_optimizer(optimizer, params, plan.learning_rate)
    anchors, mu = _proximal_anchors(params, proximal)
    clipper = _clipper(model, per_sample_loss, plan.max_grad_norm)
    # ‖x_i‖² once per run pays off when the run reads each customer about twice or more; below
    # that (one epoch over a large table) the clipper takes it from each gathered batch instead.
    x_sq = _input_factor(clipper, X) if plan.steps * q >= 2.0 else None
    source = as_noise_source(generator)
    model.train()

    empty = 0
    seen = 0
    loss_total = torch.zeros(())
    average_from = plan.steps - math.ceil(average_tail * plan.steps)
    averaged: list[Tensor] = []
    current = [p.detach() for p in params]  # views: always the latest iterate
    # zip takes each step's batch before its noise: a block of sampling, then a block of noise.
    for step, (idx, flat_noise) in enumerate(zip(
            poisson_batches(n, q, plan.steps, source),
            _step_noise(source, total, plan.steps, params[0].dtype),
            strict=True)):
        batch = int(idx.numel())
        if batch == 0:
            empty += 1
            grads = [torch.zeros_like(p) for p in params]
        else:
            if batch == n:
                clipped = clipper(X, y, x_sq)
            else:
                clipped = clipper(X.index_select(0, idx), y.index_select(0, idx),
                                  None if x_sq is None else x_sq.index_select(0, idx))
            grads = clipped.grads
            loss_total += clipped.loss_sum
            seen += batch
        noise = [z.view(shape) for z, shape in zip(flat_noise.split(sizes), shapes, strict=True)]
        torch._foreach_add_(grads, noise, alpha=noise_std)
        torch._foreach_div_(grads, expected_batch)
        _add_proximal(grads, params, anchors, mu)
        opt.step(grads)
        if step >= average_from:
            with torch.no_grad():
                if not averaged:
                    averaged = [p.detach().clone() for p in params]
                else:  # running mean: a += (p - a) / count
                    torch._foreach_lerp_(averaged, current, 1.0 / (step - average_from + 1))
    if averaged:
        with torch.no_grad():
            torch._foreach_copy_(current, averaged)

    return TrainStats(
        steps=plan.steps,
        empty_steps=empty,
        examples_processed=seen,
        mean_loss=float(loss_total) / max(seen, 1),
        seconds=time.perf_counter() - start,
    )


def train_non_dp(
    model: nn.Module,
    X: Tensor,
    y: Tensor,
    *,
    per_sample_loss: PerSampleLoss,
    epochs: float,
    batch_size: int,
    learning_rate: float,
    generator: torch.Generator,
    optimizer: DpOptimizer | str = DEFAULT_OPTIMIZER,
    proximal: tuple[Sequence[Tensor], float] | None = None,
) -> TrainStats:
    """Plain minibatch training (shuffled each epoch, no privacy): the baseline DP-SGD is compared
    with. Runs ``ceil(epochs · n / batch_size)`` steps on the mean per-example loss, with the same
    optimizers as :func:`train_dp`. No default schedule: a baseline states what it ran.
    """
    _check_data(X, y)
    start = time.perf_counter()
    n = X.shape[0]
    batch_size = max(1, min(batch_size, n))
    steps = max(1, math.ceil(epochs * n / batch_size - 1e-9))
    params = trainable_parameters(model)
    opt = _make_optimizer(optimizer, params, learning_rate)
    anchors, mu = _proximal_anchors(params, proximal)
    model.train()
    loss_total = torch.zeros(())
    seen = 0
    batches: list[Tensor] = []
    for _ in range(steps):
        if not batches:
            batches = list(torch.randperm(n, generator=generator).split(batch_size))[::-1]
        idx = batches.pop()
        xb, yb = X.index_select(0, idx), y.index_select(0, idx)
        losses = _check_losses(per_sample_loss(model(xb), yb), xb.shape[0])
        grads = list(torch.autograd.grad(losses.mean(), params))
        _add_proximal(grads, params, anchors, mu)
        opt.step(grads)
        loss_total += losses.detach().sum()
        seen += xb.shape[0]
    return TrainStats(
        steps=steps,
        empty_steps=0,
        examples_processed=seen,
        mean_loss=float(loss_total) / max(seen, 1),
        seconds=time.perf_counter() - start,
    )
