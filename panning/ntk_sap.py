"""NTK-SAP: the ``ntk_sap`` index, the mask gradient of a finite-difference NTK-trace estimate.

Registered with :func:`panning.indices.register_index` like every index; :mod:`panning.indices` imports
this module, so ``ntk_sap`` is registered whenever the indices are. The index is split in two so the
estimator can be checked on its own: :func:`ntk_sap_draws` makes the random weights, inputs and
perturbations from the seed, and :func:`ntk_sap_gradient` differentiates the estimate for given draws.
"""
from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from panning._functional import (
    as_numbers,
    batch_norm_modules,
    forward_probe,
    functional_forward,
    other_tensors,
)
from panning.indices import Batch, Scores, _input_shape, register_index

__all__ = [
    "NTKSAP_EPSILON",
    "NTKSAP_ROUNDS",
    "NTKSAP_SAMPLES_PER_CLASS",
    "NTKSAP_BATCH",
    "NTKDraw",
    "ntk_sap",
    "ntk_sap_draws",
    "ntk_sap_gradient",
]

#: Perturbation size ε of the finite difference (the authors' ``--ntksap_epsilon`` default).
NTKSAP_EPSILON = 0.01
#: Sampling rounds R of random weights (the authors' example script, ``scripts/run.sh``: ``--ntksap_R 5``).
NTKSAP_ROUNDS = 5
#: Noise inputs per output unit (class) in each round (the authors' ``--prune-dataset-ratio`` default, 10).
NTKSAP_SAMPLES_PER_CLASS = 10
#: Most noise inputs sharing one weight draw (the authors' ``--prune-batch-size`` default, 256).
NTKSAP_BATCH = 256


@dataclass(frozen=True)
class NTKDraw:
    """One sample of NTK-SAP's estimate: fresh weights for the scored parameters (unmasked), a batch of
    noise inputs, and the weight perturbation ``δ`` (one tensor per scored parameter)."""

    weights: dict[str, Tensor]
    inputs: Tensor
    delta: dict[str, Tensor]


@register_index("ntk_sap", needs_data=False)
def ntk_sap(
    model: nn.Module,
    masks: Mapping[str, Tensor],
    batches: list[Batch] | None = None,
    *,
    input_shape: Sequence[int] | None = None,
    seed: int = 0,
    **_,
) -> Scores:
    """NTK-SAP (data- and weight-free): ``score = m ⊙ |∂/∂m Σ_r Σ_i ‖f(x_ri; θ_r ⊙ m) - f(x_ri; (θ_r + ε δ_r) ⊙ m)‖²|``.

    The squared output change under a random weight perturbation estimates the trace of the pruned
    network's neural tangent kernel: ``E_δ ‖f((θ + εδ) ⊙ m) - f(θ ⊙ m)‖² ≈ ε² Σ_i ‖∂f(x_i; θ ⊙ m)/∂θ‖²_F
    = ε² Tr Θ(m)`` (its eigenvalues summed, the nuclear norm of a positive semi-definite kernel). The
    score is the magnitude of the estimate's gradient with respect to the mask, at the current mask.
    Sign: non-negative; the weights whose removal would change the NTK spectrum (its trace) most are
    kept; pruned weights score 0 (the authors multiply by ``m != 0``). Wang, Li & Sun, 2023, "NTK-SAP:
    Improving neural network pruning by aligning training dynamics" (ICLR), github.com/YiteWang/NTK-SAP
    (``NTKSAP`` in ``Pruners/pruners.py``; the PX authors' ``lib/pruners.py`` holds the same code).

    Random-weight multi-sampling, as their code: in each of ``R`` rounds, for each batch of noise
    inputs, the scored weights are drawn afresh (``θ_r``: Kaiming normal, ``N(0, 2/fan_in)``, the
    ``_initialize_weights`` of their models and this project's default init), the inputs are i.i.d.
    ``N(0, 1)`` of ``input_shape`` and ``δ_r`` is i.i.d. ``N(0, 1)``; the model's own weights are never
    used (weight-agnostic), nor is any data (``batches`` only lends the input shape when
    ``input_shape`` is missing). Mask gradients of all draws are summed before the magnitude is taken.
    Per round their code draws noise shaped like its pruning loader's batches: 10 samples per class
    (``--prune-dataset-ratio``) in batches of at most 256, one weight draw per batch; here the number
    of classes is the network's number of outputs. BatchNorm: each draw normalises with the batch
    statistics of the unperturbed network (a no-grad forward with BatchNorm in train mode, held
    constant in both forwards and not differentiated), as their momentum-1 running statistics do, but
    with the biased variance train-mode BatchNorm normalises with (theirs the unbiased running
    estimate); both forwards then run in eval mode (no dropout). Other parameters (biases, BatchNorm
    affine) keep the model's values (their code resets BatchNorm to weight 1, bias 0, the values this
    project's initialisations give). Scored parameters with fewer than 2 dimensions have no fan-in;
    their draws are the model's own values.

    Defaults: ``ε = 0.01`` (:data:`NTKSAP_EPSILON`, their default) and ``R = 5`` rounds
    (:data:`NTKSAP_ROUNDS`, their example script; the argument's default is 1); the paper's text was
    not available to check them against. Iterative, as the paper: the ``ntk_sap`` method in
    :data:`panning.pruner.METHODS` takes 20 steps on an exponential schedule (their example script's
    ``--prune-epochs 20``). Draws come from a CPU generator seeded with ``seed`` and are then moved, so
    they are the same on any device.

    Cost: per draw, one no-grad forward (only with BatchNorm), two forwards and one backward through
    both; ``R · ⌈10 C / 256⌉`` draws of ``min(10 C, 256)`` noise inputs (5 draws of 100 for 10 classes),
    i.e. about ``R`` times two forward+backward passes of a batch of ``10 C``.
    """
    shape = _input_shape("ntk_sap", input_shape, batches)
    model.eval()
    draws = ntk_sap_draws(model, masks, shape, seed)
    grads = ntk_sap_gradient(model, masks, draws, NTKSAP_EPSILON)
    return {k: g.abs_().mul_(as_numbers(masks[k], g.dtype)) for k, g in grads.items()}


def _batch_sizes(model: nn.Module, masks: Mapping[str, Tensor], shape: tuple[int, ...]) -> list[int]:
    """Noise inputs of each weight draw in one round: ``10 C`` in batches of at most 256."""
    params = dict(model.named_parameters())
    first = params[next(iter(masks))]
    probe = torch.zeros((1, *shape), dtype=first.dtype, device=first.device)
    # one sample: train-mode BatchNorm could not take it; in eval mode the forward changes no state
    with _modes(list(model.modules()), training=False), torch.no_grad():
        out = functional_forward(model, other_tensors(model, ()), probe)
    total = NTKSAP_SAMPLES_PER_CLASS * max(1, out[0].numel())
    return [min(NTKSAP_BATCH, total - start) for start in range(0, total, NTKSAP_BATCH)]


def ntk_sap_draws(
    model: nn.Module, masks: Mapping[str, Tensor], input_shape: Sequence[int], seed: int
) -> list[NTKDraw]:
    """The random weights, noise inputs and perturbations of :func:`ntk_sap`, from a CPU generator seeded
    with ``seed``: per round (:data:`NTKSAP_ROUNDS`) and batch, the scored weights in ``masks`` order,
    the inputs, then ``δ`` in ``masks`` order. Tensors are in each parameter's dtype, on its device."""
    shape = tuple(int(s) for s in input_shape)
    params = dict(model.named_parameters())
    first = params[next(iter(masks))]
    gen = torch.Generator().manual_seed(seed)
    sizes = _batch_sizes(model, masks, shape)
    draws: list[NTKDraw] = []
    for _ in range(NTKSAP_ROUNDS):
        for n in sizes:
            weights: dict[str, Tensor] = {}
            for k in masks:
                p = params[k]
                if p.dim() >= 2:
                    std = math.sqrt(2.0 / (p[0].numel()))  # Kaiming normal, fan_in, ReLU gain
                    w = torch.randn(p.shape, generator=gen, dtype=p.dtype) * std
                    weights[k] = w.to(p.device)
                else:
                    weights[k] = p.detach().clone()
            x = torch.randn((n, *shape), generator=gen, dtype=first.dtype).to(first.device)
            delta = {k: torch.randn(params[k].shape, generator=gen, dtype=params[k].dtype).to(params[k].device)
                     for k in masks}
            draws.append(NTKDraw(weights, x, delta))
    return draws


def ntk_sap_gradient(
    model: nn.Module, masks: Mapping[str, Tensor], draws: Sequence[NTKDraw], epsilon: float
) -> dict[str, Tensor]:
    """``Σ_draws ∂/∂m Σ_i ‖f(x_i; θ ⊙ m) - f(x_i; (θ + ε δ) ⊙ m)‖²`` at the current mask (signed).

    Both forwards run in the model's current mode except BatchNorm, which normalises with the batch
    statistics of the unperturbed network (measured in a no-grad forward with the BatchNorm layers in
    train mode) held constant. The model is not modified.
    """
    params = dict(model.named_parameters())
    m_var = {k: as_numbers(m, params[k].dtype).requires_grad_(True) for k, m in masks.items()}
    rest = other_tensors(model, masks)
    bns = list(batch_norm_modules(model, training_only=False).items())
    acc = {k: torch.zeros_like(v) for k, v in m_var.items()}
    for draw in draws:
        plain = {k: draw.weights[k] * m_var[k] for k in masks}
        moved = {k: (draw.weights[k] + epsilon * draw.delta[k]) * m_var[k] for k in masks}
        tensors = dict(rest)
        if bns:
            with _modes([m for _, m in bns], training=True):
                stats, _ = forward_probe(model, {**rest, **{k: w.detach() for k, w in plain.items()}},
                                         draw.inputs, [n for n, _ in bns])
            tensors.update(stats)
        # eval-mode BatchNorm normalises with the measured statistics, passed as the running ones
        with _modes([m for _, m in bns], training=False):
            gap = functional_forward(model, {**tensors, **plain}, draw.inputs) \
                - functional_forward(model, {**tensors, **moved}, draw.inputs)
        total = gap.square().sum()
        if not total.requires_grad:
            continue
        grads = torch.autograd.grad(total, list(m_var.values()), allow_unused=True, materialize_grads=True)
        for k, g in zip(m_var, grads, strict=True):
            acc[k].add_(g)
    return acc


@contextmanager
def _modes(modules: Sequence[nn.Module], *, training: bool) -> Iterator[None]:
    """Set ``modules`` to train (or eval) mode, restoring each one's flag on exit, also after an error."""
    flags = [(m, m.training) for m in modules]
    try:
        for m in modules:
            m.training = training
        yield
    finally:
        for m, flag in flags:
            m.training = flag
