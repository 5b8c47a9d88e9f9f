"""Prospect Pruning (ProsPr): the ``prospr`` index, a meta-gradient through a few SGD steps.

Registered with :func:`panning.indices.register_index` like every index; :mod:`panning.indices` imports
this module, so ``prospr`` is registered whenever the indices are. :func:`prospr_meta_gradient` is the
signed meta-gradient the index takes the magnitude of; the tests check it against finite differences
through explicitly rerun inner steps.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from panning._functional import as_numbers, functional_forward
from panning.indices import Batch, LossFn, Scores, register_index

__all__ = ["PROSPR_STEPS", "PROSPR_LR", "PROSPR_MOMENTUM", "prospr", "prospr_meta_gradient"]

#: Inner SGD steps (the authors' ``--inner-steps`` default).
PROSPR_STEPS = 3
#: Inner learning rate (the authors' ``--inner-lr`` default).
PROSPR_LR = 0.1
#: Inner SGD momentum (the authors' ``--inner-momentum`` default: none).
PROSPR_MOMENTUM = 0.0


@register_index("prospr", needs_data=True)
def prospr(model: nn.Module, masks: Mapping[str, Tensor], batches: list[Batch], *, loss_fn: LossFn, **_) -> Scores:
    """ProsPr: ``score = |∂L(θ_K)/∂c|`` at ``c = m``, the meta-gradient through ``K`` SGD steps, highest kept.

    The mask is a multiplicative variable ``c`` on the initial weights, ``θ_0 = θ ⊙ c``; the masked
    network is trained for ``K`` steps of SGD on all its parameters (scored weights, biases, BatchNorm
    affine parameters), ``θ_{k+1} = θ_k - α ∇L(θ_k)``, each step a forward through ``θ_k ⊙ m`` so pruned
    weights stay out; ``L(θ_K)`` is the loss after the steps, and the score is the magnitude of its
    derivative with respect to ``c`` (``|meta-gradient|``, as the authors define it), differentiated
    *through* the inner steps (second-order terms included: every inner gradient is taken with
    ``create_graph``). Sign: non-negative; the weights whose mask entry changes the loss after training
    most are kept. Pruned weights score 0 (their ``c`` never reaches the forward). ``L`` is the mean loss
    over all samples of all batches, model in train mode; every inner step and the final loss use the
    same batches. Alizadeh et al., 2022, "Prospect Pruning: Finding Trainable Weights at Initialization
    using Meta-Gradients" (ICLR), github.com/mil-ad/prospr.

    Defaults: ``K = 3`` inner steps, learning rate ``α = 0.1``, no momentum (:data:`PROSPR_STEPS`,
    :data:`PROSPR_LR`, :data:`PROSPR_MOMENTUM`): the defaults of the authors' ``cli.py``; their README's
    package example uses ``lr 0.5, momentum 0.9`` (set the constants to reproduce it). Momentum follows
    their functional SGD, the buffer starting at the first gradient, except that their code detaches
    that first buffer, dropping its second-order terms from the meta-gradient; here it is not detached.
    The same batch serves every inner step and the outer loss, as their ``--new-data-in-inner``
    default. One shot (the paper: "in a single shot"): the ``prospr`` method in
    :data:`panning.pruner.METHODS` takes 1 step. The authors' code applies the mask only to the initial
    weights of a dense network (``c = 1``); with ``c = 1`` this index computes the same quantity, and for
    an already pruned mask it trains the masked network (their inner steps would let pruned weights
    grow back from 0). Their "first_order" mode is not provided; their default, "full", is. The
    paper's text was not available to check the defaults against; they are the code's.

    Cost: ``K + 1`` forward passes and ``K`` double-backward passes over every batch with the graphs of
    all steps kept (memory about ``K + 1`` times one training step's), then one backward through all
    of it: about ``3K + 2`` forward+backward passes (about 11 for ``K = 3``).
    """
    model.train()
    meta = prospr_meta_gradient(model, masks, batches, loss_fn, steps=PROSPR_STEPS, lr=PROSPR_LR,
                                momentum=PROSPR_MOMENTUM)
    return {k: g.abs() for k, g in meta.items()}


def prospr_meta_gradient(
    model: nn.Module,
    masks: Mapping[str, Tensor],
    batches: list[Batch],
    loss_fn: LossFn,
    *,
    steps: int = PROSPR_STEPS,
    lr: float = PROSPR_LR,
    momentum: float = PROSPR_MOMENTUM,
) -> dict[str, Tensor]:
    """Signed ``∂L(θ_K)/∂c`` at ``c = m`` (see :func:`prospr`), on the model's current train/eval mode.

    The model is not modified: the trajectory lives in fresh tensors passed through
    :func:`panning._functional.functional_forward`, and buffers (BatchNorm running statistics, which a
    train-mode forward updates) are clones.
    """
    if steps < 0:
        raise ValueError(f"ProsPr needs steps >= 0, got {steps}")
    params = dict(model.named_parameters())
    c = {k: as_numbers(m, params[k].dtype).requires_grad_(True) for k, m in masks.items()}
    keep = {k: as_numbers(m, params[k].dtype) for k, m in masks.items()}
    fast: dict[str, Tensor] = {}
    for name, p in params.items():
        fast[name] = p.detach() * c[name] if name in c else p.detach().clone().requires_grad_(True)
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    total = sum(x.shape[0] for x, _ in batches)

    def mean_loss(weights: Mapping[str, Tensor]) -> Tensor:
        tensors = {**buffers, **{k: w * keep[k] if k in keep else w for k, w in weights.items()}}
        out: Tensor | None = None
        for x, y in batches:
            loss = loss_fn(functional_forward(model, tensors, x), y)
            if not isinstance(loss, Tensor) or loss.numel() != 1:
                raise ValueError("loss_fn must return a scalar tensor (use a mean-reduced loss)")
            part = loss.reshape(()) * (x.shape[0] / total)
            out = part if out is None else out + part
        assert out is not None  # batches were checked to be non-empty
        return out

    names = list(fast)
    velocity: list[Tensor | None] = [None] * len(names)
    for _ in range(steps):
        loss = mean_loss(fast)
        if not loss.requires_grad:  # nothing trainable reaches the loss: the trajectory stands still
            break
        grads = torch.autograd.grad(loss, [fast[n] for n in names], create_graph=True, allow_unused=True,
                                    materialize_grads=True)
        for i, (n, g) in enumerate(zip(names, grads, strict=True)):
            if momentum != 0:
                v = velocity[i]
                g = g if v is None else v * momentum + g
                velocity[i] = g
            fast[n] = fast[n] - lr * g
    final = mean_loss(fast)
    if not final.requires_grad:
        return {k: torch.zeros_like(v) for k, v in c.items()}
    meta = torch.autograd.grad(final, list(c.values()), allow_unused=True, materialize_grads=True)
    return {k: g.detach() for k, g in zip(c, meta, strict=True)}
