"""Saliency indices for pruning before training.

Every index maps ``{param name: score tensor of the param's shape}`` and follows one convention:
**higher score = more important = kept**. Indices score the *current masked network*: weights are
``θ ⊙ m`` for the mask ``m`` given, so iterative pruning sees its own mask. Scores of pruned weights
are whatever the formula gives there (0 for every gradient index, since ``θ ⊙ m = 0``); the pruner
ignores them, but they are always finite.

Call indices through :func:`compute_scores`, which validates its input, seeds the random number
generators locally (global RNG state is left as it was) and checks the result. An index never
modifies the model: it runs :func:`torch.func.functional_call` on fresh masked weight tensors and
cloned buffers (see :mod:`panning._functional`), so the model's weights, BatchNorm running
statistics, ``requires_grad`` flags and ``.grad`` fields are untouched, and train/eval mode is
restored module by module, also after an error.

Data-dependent indices (``snip``, ``grasp``, ``grasp_abs``, ``fts``) run the model in train mode
(``model.train()``: BatchNorm normalises with batch statistics, dropout is active and seeded) over
every batch given, and average over all samples: a batch of ``n`` samples has weight ``n / N``, so
with a mean-reduced loss the gradient is that of the mean loss over all ``N`` samples. ``fts``
needs per-sample gradients, which train-mode BatchNorm does not define; it holds each batch's
BatchNorm statistics fixed (see :func:`fts`). ``synflow`` is data-free and runs in eval mode.
Gradients are taken with respect to fresh leaf tensors, so a parameter with
``requires_grad=False`` is scored like any other. ``fts`` (and the BatchNorm probe) register
forward hooks for the duration of the call and remove them, also after an error.

Adding an index is one function plus one decorator::

    @register_index("my_index", needs_data=True)
    def my_index(model, masks, batches, *, input_shape, seed, loss_fn):
        \"\"\"Formula, sign, what is kept, paper.\"\"\"
        ...
"""
from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from panning._functional import (
    batch_norm_modules,
    forward_probe,
    functional_forward,
    masked_weights,
    other_tensors,
    output_taps,
    preserved_modes,
)

__all__ = [
    "IndexSpec",
    "INDICES",
    "register_index",
    "available_indices",
    "compute_scores",
    "LossFn",
    "Batch",
]

Batch = tuple[Tensor, Tensor]
LossFn = Callable[[Tensor, Tensor], Tensor]
Scores = dict[str, Tensor]
IndexFn = Callable[..., Scores]

#: Upper bound (bytes) on the per-sample gradients FTS holds at once; samples are processed in
#: chunks that fit (peak memory is about twice this). 512 MiB holds a batch of 128 for ResNet-20
#: (and any batch for all-Linear nets, whose per-sample gradients are never materialised) and
#: 8 samples of VGG-16. Larger chunks are a little faster; lower it on small machines.
FTS_CHUNK_BYTES = 512 * 2**20


@dataclass(frozen=True)
class IndexSpec:
    """A registered saliency index.

    ``fn(model, masks, batches, *, input_shape, seed, loss_fn) -> {name: scores}``; ``needs_data``
    says whether ``batches`` must be non-empty; ``doc`` is the function's docstring.
    """

    name: str
    fn: IndexFn
    needs_data: bool
    doc: str


INDICES: dict[str, IndexSpec] = {}


def register_index(name: str, *, needs_data: bool) -> Callable[[IndexFn], IndexFn]:
    """Decorator registering ``fn`` as index ``name`` (ValueError if the name is taken)."""

    def deco(fn: IndexFn) -> IndexFn:
        if name in INDICES:
            raise ValueError(f"index {name!r} is already registered")
        INDICES[name] = IndexSpec(name, fn, needs_data, inspect.getdoc(fn) or "")
        return fn

    return deco


def available_indices() -> list[str]:
    """Names of the registered indices, in registration order."""
    return list(INDICES)


def compute_scores(
    name: str,
    model: nn.Module,
    masks: Mapping[str, Tensor],
    batches: Sequence[Batch] | None = None,
    *,
    input_shape: Sequence[int] | None = None,
    seed: int = 0,
    loss_fn: LossFn = F.cross_entropy,
) -> dict[str, Tensor]:
    """Scores of index ``name`` for every key of ``masks``, on the masked network ``θ ⊙ m``.

    Args:
        name: a registered index (see :func:`available_indices`).
        model: the network; left exactly as found (weights, buffers, modes, requires_grad, grads).
        masks: ``{param name: bool (or 0/1) tensor}`` for the parameters to score.
        batches: ``(inputs, targets)`` pairs; required by data indices, all of them are used.
        input_shape: input shape without batch dimension, for ``synflow`` (default: taken from
            ``batches[0][0]``).
        seed: seeds ``random`` and, locally, any randomness in the forward pass (dropout).
        loss_fn: ``loss_fn(outputs, targets) -> scalar`` (mean-reduced), for data indices.

    Returns:
        ``{name: scores}`` in ``masks`` order, each of the parameter's shape, on its device;
        float32 (float64 for ``synflow``). Higher = kept.

    Raises:
        ValueError: unknown index, missing/empty batches for a data index, mask keys that are not
            parameters of the model or whose shape differs, non-binary masks, non-finite scores.
    """
    spec = INDICES.get(name)
    if spec is None:
        raise ValueError(f"unknown index {name!r}; known indices: {', '.join(available_indices())}")
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    checked = _check_masks(model, masks)
    batch_list = _check_batches(batches, name, required=spec.needs_data)
    device = _device(model, checked)
    batch_list = [(x.to(device), y.to(device)) for x, y in batch_list] if batch_list else None
    with preserved_modes(model), _seeded(seed, device):
        scores = spec.fn(
            model, checked, batch_list, input_shape=input_shape, seed=seed, loss_fn=loss_fn
        )
    _check_scores(name, checked, scores)
    return {k: scores[k] for k in checked}


# --------------------------------------------------------------------------- validation


def _check_masks(model: nn.Module, masks: Mapping[str, Tensor]) -> dict[str, Tensor]:
    if not isinstance(masks, Mapping):
        raise ValueError(f"masks must be a mapping {{param name: tensor}}, got {type(masks).__name__}")
    if len(masks) == 0:
        raise ValueError("masks is empty: nothing to score")
    params = dict(model.named_parameters())
    unknown = [k for k in masks if k not in params]
    if unknown:
        raise ValueError(f"mask keys are not parameters of the model: {unknown}")
    out: dict[str, Tensor] = {}
    for k, m in masks.items():
        if not isinstance(m, Tensor):
            raise ValueError(f"mask {k!r} is not a tensor ({type(m).__name__})")
        if tuple(m.shape) != tuple(params[k].shape):
            raise ValueError(
                f"mask {k!r} has shape {tuple(m.shape)}, parameter has {tuple(params[k].shape)}"
            )
        if m.dtype != torch.bool:
            if not bool(((m == 0) | (m == 1)).all()):
                raise ValueError(f"mask {k!r} is not binary")
            m = m != 0
        out[k] = m.to(params[k].device)
    return out


def _check_batches(batches: Sequence[Batch] | None, name: str, *, required: bool) -> list[Batch] | None:
    if batches is None:
        if required:
            raise ValueError(f"index {name!r} needs data: pass a non-empty list of (inputs, targets)")
        return None
    if isinstance(batches, Tensor) or (
        isinstance(batches, tuple) and len(batches) == 2 and all(isinstance(b, Tensor) for b in batches)
    ):
        raise ValueError("batches must be a sequence of (inputs, targets) pairs; wrap one batch in a list")
    out = list(batches)
    if required and not out:
        raise ValueError(f"index {name!r} needs data: batches is empty")
    for i, b in enumerate(out):
        if not (isinstance(b, (tuple, list)) and len(b) == 2 and all(isinstance(t, Tensor) for t in b)):
            raise ValueError(f"batch {i} is not an (inputs, targets) pair of tensors")
        if b[0].dim() == 0 or b[1].dim() == 0 or b[0].shape[0] != b[1].shape[0] or b[0].shape[0] == 0:
            raise ValueError(
                f"batch {i}: inputs and targets must hold the same, non-zero number of samples "
                f"(shapes {tuple(b[0].shape)} and {tuple(b[1].shape)})"
            )
    return [(b[0], b[1]) for b in out]


def _check_scores(name: str, masks: Mapping[str, Tensor], scores: Mapping[str, Tensor]) -> None:
    bad = [k for k in masks if k not in scores or scores[k].shape != masks[k].shape]
    if bad:
        raise RuntimeError(f"index {name!r} returned no or misshapen scores for {bad}")
    # one reduction per tensor: any NaN/inf makes the sum non-finite; only then look closer
    # (a finite tensor whose sum overflows passes the exact check below)
    sums = torch.stack([scores[k].sum().to(torch.float64).cpu() for k in masks])
    if bool(torch.isfinite(sums).all()):
        return
    nonfinite = [k for k in masks if not bool(torch.isfinite(scores[k]).all())]
    if nonfinite:
        raise ValueError(
            f"index {name!r} produced non-finite scores for {nonfinite} "
            "(non-finite inputs or weights, or a loss that overflows?)"
        )


@contextmanager
def _seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Seed CPU (and the model's CUDA device) for the index, restoring the global RNG after."""
    cuda = device.type == "cuda"
    idx = (device.index if device.index is not None else torch.cuda.current_device()) if cuda else None
    with torch.random.fork_rng(devices=[idx] if cuda else []):
        torch.random.default_generator.manual_seed(seed)
        if cuda:
            with torch.cuda.device(idx):
                torch.cuda.manual_seed(seed)
        yield


# --------------------------------------------------------------------------- shared pieces


def _device(model: nn.Module, masks: Mapping[str, Tensor]) -> torch.device:
    return dict(model.named_parameters())[next(iter(masks))].device


def _batch_loss(model: nn.Module, tensors: Mapping[str, Tensor], batch: Batch, loss_fn: LossFn) -> Tensor:
    x, y = batch
    loss = loss_fn(functional_forward(model, tensors, x), y)
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        raise ValueError("loss_fn must return a scalar tensor (use a mean-reduced loss)")
    return loss.reshape(())


def _grads(out: Tensor, ws: Mapping[str, Tensor], *, create_graph: bool = False) -> list[Tensor]:
    if not out.requires_grad:  # output independent of the scored weights
        return [torch.zeros_like(w) for w in ws.values()]
    return list(
        torch.autograd.grad(out, list(ws.values()), create_graph=create_graph, materialize_grads=True)
    )


def _mean_gradient(
    model: nn.Module, ws: Mapping[str, Tensor], rest: Mapping[str, Tensor], batches: list[Batch], loss_fn: LossFn
) -> list[Tensor]:
    """Gradient of the mean loss over all samples of all batches (batch weights n_b / N)."""
    total = sum(x.shape[0] for x, _ in batches)
    tensors = {**rest, **ws}
    acc: list[Tensor] | None = None
    for batch in batches:
        g = _grads(_batch_loss(model, tensors, batch, loss_fn), ws)
        frac = batch[0].shape[0] / total
        if acc is None:  # the gradients are fresh tensors: scale the first in place, no zero-filled sum
            acc = [gi.mul_(frac) for gi in g] if frac != 1 else list(g)
        else:
            for a, gi in zip(acc, g):
                a.add_(gi, alpha=frac)
    assert acc is not None  # batches were checked to be non-empty
    return acc


def _hessian_gradient(
    model: nn.Module, ws: Mapping[str, Tensor], rest: Mapping[str, Tensor], batches: list[Batch], loss_fn: LossFn
) -> list[Tensor]:
    """``H g`` of the mean loss, by double backward: ``z = Σ stop(g)·∇L``, ``Hg = ∇z``."""
    tensors = {**rest, **ws}
    total = sum(x.shape[0] for x, _ in batches)
    if len(batches) == 1:
        # one batch: g comes from the same forward whose graph we differentiate twice,
        # saving the separate gradient pass
        gf = _grads(_batch_loss(model, tensors, batches[0], loss_fn), ws, create_graph=True)
        return _grads(_dot(gf, [g.detach() for g in gf]), ws)
    g = _mean_gradient(model, ws, rest, batches, loss_fn)
    hg = [torch.zeros_like(w) for w in ws.values()]
    for batch in batches:
        gf = _grads(_batch_loss(model, tensors, batch, loss_fn), ws, create_graph=True)
        frac = batch[0].shape[0] / total
        for a, h in zip(hg, _grads(_dot(gf, g), ws)):
            a.add_(h, alpha=frac)
    return hg


def _dot(a: list[Tensor], b: list[Tensor]) -> Tensor:
    return torch.stack([(x * y).sum() for x, y in zip(a, b)]).sum()


# --------------------------------------------------------------------------- indices


@register_index("random", needs_data=False)
def random_scores(
    model: nn.Module, masks: Mapping[str, Tensor], batches: list[Batch] | None = None, *, seed: int = 0, **_
) -> Scores:
    """Random: ``score ~ U[0, 1)`` i.i.d. per weight, from a generator seeded with ``seed``.

    Sign: irrelevant (all positive); the highest draws are kept, i.e. a uniformly random subset of
    the alive weights. The baseline every pruning-at-initialisation paper compares against; see
    Liu et al., 2022, "The unreasonable effectiveness of random pruning" (ICLR).
    Draws are made on the CPU in ``masks`` order, then moved, so they are identical on any device.
    """
    gen = torch.Generator().manual_seed(seed)
    params = dict(model.named_parameters())
    return {k: torch.rand(m.shape, generator=gen).to(params[k].device) for k, m in masks.items()}


@register_index("magnitude", needs_data=False)
def magnitude(model: nn.Module, masks: Mapping[str, Tensor], batches: list[Batch] | None = None, **_) -> Scores:
    """Magnitude: ``score = |θ ⊙ m|``.

    Sign: non-negative; the largest weights are kept (Han et al., 2015, "Learning both weights and
    connections for efficient neural networks", applied here at initialisation).
    """
    return {k: w.detach().abs() for k, w in masked_weights(model, masks).items()}


@register_index("snip", needs_data=True)
def snip(model: nn.Module, masks: Mapping[str, Tensor], batches: list[Batch], *, loss_fn: LossFn, **_) -> Scores:
    """SNIP connection sensitivity: ``score = |θ ⊙ ∂L/∂θ|`` at ``θ ⊙ m``.

    ``L`` is the mean loss over all samples of all batches, model in train mode. Sign:
    non-negative; the weights whose removal changes the loss most (to first order) are kept.
    Lee, Ajanthan & Torr, 2019, "SNIP: Single-shot network pruning based on connection
    sensitivity" (ICLR). The paper normalises by the sum of scores, which does not change the
    ranking; it is left to the pruner.
    """
    model.train()
    ws = masked_weights(model, masks)
    rest = other_tensors(model, masks)
    g = _mean_gradient(model, ws, rest, batches, loss_fn)
    return {k: (w.detach() * gk).abs_() for (k, w), gk in zip(ws.items(), g)}


@register_index("grasp", needs_data=True)
def grasp(model: nn.Module, masks: Mapping[str, Tensor], batches: list[Batch], *, loss_fn: LossFn, **_) -> Scores:
    """GraSP, original convention: ``score = θ ⊙ (H g)`` (signed), highest kept.

    ``g = ∂L/∂θ`` (detached) and ``H`` the Hessian of the mean loss ``L`` over all batches (train
    mode), at ``θ ⊙ m``; ``Hg`` by double backward (``z = Σ g·∇L`` with ``create_graph``,
    ``Hg = ∇z``). Wang, Zhang & Grosse, 2020, "Picking winning tickets before training by
    preserving gradient flow" (ICLR): their code computes ``S = -θ ⊙ Hg`` and *removes* the weights
    with the highest ``S``, i.e. keeps the lowest ``-θ ⊙ Hg`` = the highest ``θ ⊙ Hg`` -- which is
    this score under our higher-is-kept convention. Removing weight ``q`` changes ``‖g‖²`` by
    about ``-2 θ_q (Hg)_q``, so the kept weights are those whose removal would reduce gradient
    flow the most. The score is signed: negative values are legitimate and ranked below zero.
    The original divides logits by a temperature ``T = 200``; pass
    ``loss_fn=lambda out, y: F.cross_entropy(out / 200, y)`` to reproduce that.
    """
    model.train()
    ws = masked_weights(model, masks)
    rest = other_tensors(model, masks)
    hg = _hessian_gradient(model, ws, rest, batches, loss_fn)
    return {k: w.detach() * h for (k, w), h in zip(ws.items(), hg)}


@register_index("grasp_abs", needs_data=True)
def grasp_abs(model: nn.Module, masks: Mapping[str, Tensor], batches: list[Batch], *, loss_fn: LossFn, **_) -> Scores:
    """GraSP magnitude: ``score = |θ ⊙ (H g)|``, highest kept (as :func:`grasp`, without the sign).

    The variant used by Panning (Kang et al., 2022, arXiv:2209.13378), after Lubana & Dick, 2021
    ("A gradient flow framework for analyzing network pruning"), who argue that weights changing
    gradient flow in either direction are important.
    """
    return {k: s.abs() for k, s in grasp(model, masks, batches, loss_fn=loss_fn).items()}


@register_index("synflow", needs_data=False)
def synflow(
    model: nn.Module,
    masks: Mapping[str, Tensor],
    batches: list[Batch] | None = None,
    *,
    input_shape: Sequence[int] | None = None,
    **_,
) -> Scores:
    """SynFlow (data-free): ``score = |θ ⊙ ∂R/∂θ|``, ``R = Σ f(1; |θ ⊙ m|)``, highest kept.

    Every floating parameter and buffer is replaced by its absolute value (prunable weights
    masked first), as SynFlow's code does with ``abs_()`` on the whole state dict; the network is
    evaluated on one all-ones input of ``input_shape`` (default ``batches[0][0].shape[1:]``) in
    eval mode, so BatchNorm uses its (absolute) running statistics. Computed in float64 so deep
    networks neither underflow nor overflow; scores are returned as float64. Tanaka, Kunin,
    Yamins & Ganguli, 2020, "Pruning neural networks without any data by iteratively conserving
    synaptic flow" (NeurIPS).
    """
    if input_shape is None:
        if not batches:
            raise ValueError("synflow needs input_shape (or batches to take it from)")
        input_shape = tuple(batches[0][0].shape[1:])
    shape = tuple(int(s) for s in input_shape)
    model.eval()
    ws = masked_weights(model, masks, dtype=torch.float64, absolute=True)
    rest = other_tensors(model, masks, dtype=torch.float64, absolute=True)
    x = torch.ones((1, *shape), dtype=torch.float64, device=_device(model, masks))
    r = functional_forward(model, {**rest, **ws}, x).sum()
    g = _grads(r, ws)
    return {k: (w.detach() * gk).abs_() for (k, w), gk in zip(ws.items(), g)}


def _tap_layers(model: nn.Module, names: Sequence[str]) -> dict[str, tuple[str, int]]:
    """``{param name: (module name, input ndim)}`` for masked weights whose per-sample gradients can
    be formed from the layer's input and output gradient: plain ``nn.Linear`` (``δ_i a_iᵀ``, on a
    2-D input) and plain ``nn.Conv2d`` (``δ_i unfold(a_i)ᵀ``, on a 4-D input; zero padding given
    as numbers, one group). A probe forward must confirm that each is called once with that input
    ndim. Layers with hooks, shared weights or other forwards are left to vmap."""
    owners: dict[int, int] = {}
    for m in model.modules():
        for p in m.parameters(recurse=False):
            owners[id(p)] = owners.get(id(p), 0) + 1
    out: dict[str, tuple[str, int]] = {}
    for k in names:
        mod_name, _, attr = k.rpartition(".")
        m = model.get_submodule(mod_name)
        if attr != "weight" or m._forward_hooks or m._forward_pre_hooks or owners.get(id(m.weight), 0) != 1:
            continue
        if isinstance(m, nn.Linear) and type(m).forward is nn.Linear.forward:
            out[k] = (mod_name, 2)
        elif (
            isinstance(m, nn.Conv2d)
            and type(m).forward is nn.Conv2d.forward
            and m.groups == 1
            and m.padding_mode == "zeros"
            and not isinstance(m.padding, str)
        ):
            out[k] = (mod_name, 4)
    return out


@register_index("fts", needs_data=True)
def fts(model: nn.Module, masks: Mapping[str, Tensor], batches: list[Batch], *, loss_fn: LossFn, **_) -> Scores:
    """Fisher-Taylor Sensitivity: ``score = |θ ⊙ ḡ + ½ θ² ⊙ F̂|`` at ``θ ⊙ m``, highest kept.

    Second-order Taylor estimate of the loss change when a weight is removed, with the Hessian
    diagonal replaced by the empirical Fisher diagonal: ``ḡ = mean_i g_i`` and
    ``F̂ = mean_i g_i²`` over the per-sample gradients ``g_i = ∂ℓ(x_i, y_i)/∂θ`` of all samples
    of all batches. Gollini Navarrete et al., 2025 (Fisher-Taylor Sensitivity, FTS, for pruning
    at initialisation).

    Per-sample gradients come from one ``torch.func.vmap(grad(...))`` pass per chunk of samples
    (chunks bounded by :data:`FTS_CHUNK_BYTES`). For a plain ``nn.Linear`` layer applied once to
    a 2-D input, ``g_i = δ_i a_iᵀ`` (output gradient times input), so the vmap pass returns ``δ_i``
    and ``a_i`` and the sums ``Σ g_i = δᵀa`` and ``Σ g_i² = (δ²)ᵀ(a²)`` are two matrix products:
    the same numbers without materialising a per-sample copy of the layer's weights. For a plain
    ``nn.Conv2d`` (one group, zero padding) ``G_i = δ_i unfold(a_i)ᵀ``, one batched matmul per
    chunk of samples, or, with at most six output positions, ``Σ G_i²`` from position pairs
    without forming any ``G_i``; this route is taken when the unfolded inputs are smaller than
    the per-sample gradients (VGG on CIFAR), otherwise vmap's grouped convolutions are cheaper. When every scored weight is such a Linear or Conv2d layer (MLPs, LeNets,
    VGGs, ResNets), no vmap is needed at all: one ordinary batched backward of ``N * loss_fn``
    gives every ``δ_i`` (``loss_fn`` must be a mean of per-sample losses, as documented for
    :func:`compute_scores`). Other layers (grouped or shared convolutions, custom modules) get
    their per-sample weight gradients from vmap.

    Model in train mode. BatchNorm: a per-sample gradient through train-mode BatchNorm is
    ill-defined (every sample's output depends on the whole batch). Each train-mode BatchNorm
    layer therefore normalises with its batch's statistics (mean and biased variance, measured
    in one extra no-grad forward pass of the batch) held constant: the forward values are exactly
    those of the train-mode network, and ``g_i`` omits only the cross-sample term through the
    statistics. Without BatchNorm, ``ḡ`` is exactly the gradient of the mean loss.
    """
    model.train()
    w_all = {k: w.detach() for k, w in masked_weights(model, masks).items()}
    rest = other_tensors(model, masks)
    bns = batch_norm_modules(model)  # train-mode BatchNorm layers only
    total = sum(x.shape[0] for x, _ in batches)
    candidates = _tap_layers(model, list(w_all))
    modules_by_name = dict(model.named_modules())

    # the probe of the first batch settles which layers take the input x output-gradient route
    x0 = batches[0][0]
    stats0, calls = forward_probe(
        model, {**rest, **w_all}, x0 if bns else x0[:2], list(bns), [mod for mod, _ in candidates.values()]
    )
    tapped = {k: mod for k, (mod, ndim) in candidates.items() if len(calls[mod]) == 1 and len(calls[mod][0]) == ndim}
    # One batched backward serves when every scored weight is tapped; otherwise vmap, where only
    # the Linear layers keep their outer-product shortcut. Convolutions whose unfolded inputs
    # outweigh their per-sample gradients (wide images, few channels: ResNet-20's first stage) are
    # cheaper through vmap's grouped convolutions, so the unfold route is taken only when the
    # unfolded inputs are smaller than the per-sample gradients, summed over the network.
    unfold_elems = sum(_unfold_numel(modules_by_name[mod], calls[mod][0]) for k, mod in tapped.items()
                       if candidates[k][1] == 4)
    grad_elems = sum(w_all[k].numel() for k, mod in tapped.items() if candidates[k][1] == 4)
    batched = len(tapped) == len(w_all) and unfold_elems <= grad_elems
    lin = tapped if batched else {k: mod for k, mod in tapped.items() if candidates[k][1] == 2}
    # batched: the tapped weights need a graph for the output gradients (only those are computed)
    w_fixed = {k: w.requires_grad_(batched) for k, w in w_all.items() if k in lin}
    w_vmap = {k: w for k, w in w_all.items() if k not in lin}

    def frozen_batches() -> Iterator[tuple[Tensor, Tensor, dict[str, Tensor]]]:
        """Each batch with the tensors held fixed for it: buffers, tapped weights and, under
        train-mode BatchNorm, that batch's statistics (the first batch's come from the probe)."""
        for b, (x, y) in enumerate(batches):
            fixed = {**rest, **w_fixed}
            if bns:
                if b == 0:
                    stats = stats0
                else:
                    for m in bns.values():
                        m.training = True
                    stats, _ = forward_probe(model, {**rest, **w_all}, x, list(bns))
                for m in bns.values():
                    m.training = False
                fixed.update(stats)
            yield x, y, fixed

    with output_taps(model, list(lin.values())) as tap:
        if batched:
            sum_g, sum_g2 = _fts_sums_batched(model, loss_fn, frozen_batches(), tap, lin, modules_by_name)
        else:
            sum_g, sum_g2 = _fts_sums_vmap(model, loss_fn, frozen_batches(), tap, lin, w_vmap, w_fixed)
    # |θ ⊙ Σg/N + ½ θ² ⊙ Σg²/N| = |θ ⊙ (Σg + ½ θ ⊙ Σg²)| / N, in four passes
    return {
        k: torch.addcmul(sum_g[k], w.detach(), sum_g2[k], value=0.5).mul_(w.detach()).abs_().div_(total)
        for k, w in w_all.items()
    }


def _fts_sums_batched(
    model: nn.Module,
    loss_fn: LossFn,
    frozen: Iterator[tuple[Tensor, Tensor, dict[str, Tensor]]],
    tap: dict,
    lin: Mapping[str, str],
    modules_by_name: Mapping[str, nn.Module],
) -> tuple[Scores, Scores]:
    """``Σ_i g_i`` and ``Σ_i g_i²`` of every weight in ``lin`` (all Linear/Conv2d, tapped) from one
    batched backward per batch. Samples do not interact (train-mode BatchNorm runs on frozen batch
    statistics), so the backward of the summed loss yields every sample's output gradient ``δ_i``
    at each tapped layer exactly."""
    sum_g: Scores = {}
    sum_g2: Scores = {}
    workspace: dict[str, Tensor] = {}
    for x, y, fixed in frozen:
        tap["eps"], tap["inputs"], tap["outputs"] = {}, {}, {}
        try:
            out = functional_call(model, fixed, (x,), strict=False, tie_weights=True)
            inputs, outputs = tap["inputs"], tap["outputs"]
        finally:
            tap["eps"], tap["inputs"], tap["outputs"] = None, None, None
        # loss_fn is a mean over samples, so n * loss_fn is the sum of the per-sample losses
        ds = torch.autograd.grad(loss_fn(out, y) * x.shape[0], [outputs[mod] for mod in lin.values()])
        for (k, mod), d in zip(lin.items(), ds):
            a = inputs[mod].detach()
            if a.dim() == 2:
                _accumulate_outer(sum_g, sum_g2, k, d, a)
            else:
                _accumulate_conv(sum_g, sum_g2, k, modules_by_name[mod], d, a, workspace)
        del out, inputs, outputs, ds
    return sum_g, sum_g2


def _fts_sums_vmap(
    model: nn.Module,
    loss_fn: LossFn,
    frozen: Iterator[tuple[Tensor, Tensor, dict[str, Tensor]]],
    tap: dict,
    lin: Mapping[str, str],
    w_vmap: Mapping[str, Tensor],
    w_fixed: Mapping[str, Tensor],
) -> tuple[Scores, Scores]:
    """``Σ_i g_i`` and ``Σ_i g_i²`` from per-sample gradients by ``vmap(grad(...))`` over chunks of
    samples (bounded by :data:`FTS_CHUNK_BYTES`); the tapped Linear layers in ``lin`` return their
    output gradients through zero ``eps`` offsets and are summed as outer products."""

    def sample_loss(w: dict, e: dict, fixed: dict, x: Tensor, y: Tensor) -> tuple[Tensor, dict]:
        tap["eps"], tap["inputs"] = e, {}
        try:
            out = functional_call(model, {**fixed, **w}, (x.unsqueeze(0),), strict=False, tie_weights=True)
            inputs = tap["inputs"]
        finally:
            tap["eps"], tap["inputs"] = None, None
        return loss_fn(out, y.unsqueeze(0)).reshape(()), inputs

    per_sample = vmap(
        grad(sample_loss, argnums=(0, 1), has_aux=True), in_dims=(None, None, None, 0, 0), randomness="different"
    )
    eps = {mod: w_fixed[k].new_zeros(1, w_fixed[k].shape[0]) for k, mod in lin.items()}
    per_sample_bytes = sum(w.numel() * w.element_size() for w in w_vmap.values()) + sum(
        (w.shape[0] + w.shape[1]) * w.element_size() for w in w_fixed.values()
    )
    chunk = max(1, FTS_CHUNK_BYTES // max(1, per_sample_bytes))
    sum_g: Scores = {}
    sum_g2: Scores = {}
    for x, y, fixed in frozen:
        for start in range(0, x.shape[0], chunk):
            xc, yc = x[start : start + chunk], y[start : start + chunk]
            (gw, geps), inputs = per_sample(dict(w_vmap), eps, fixed, xc, yc)
            for k, g in gw.items():
                _accumulate(sum_g, k, g.sum(0))
                _accumulate(sum_g2, k, g.square_().sum(0))  # g is ours: square in place
            for k, mod in lin.items():
                _accumulate_outer(sum_g, sum_g2, k, geps[mod].reshape(xc.shape[0], -1),
                                  inputs[mod].reshape(xc.shape[0], -1))
            del gw, geps, inputs
    return sum_g, sum_g2


def _accumulate_outer(sum_g: dict[str, Tensor], sum_g2: dict[str, Tensor], key: str, d: Tensor, a: Tensor) -> None:
    """Add ``Σ_i δ_i a_iᵀ`` and ``Σ_i (δ_i a_iᵀ)² = (δ²)ᵀ(a²)`` of a Linear layer (rows = samples)."""
    _accumulate(sum_g, key, d.T @ a)
    _accumulate(sum_g2, key, d.square().T @ a.square())


# Up to this many output positions P, Σ_i G_i² is formed from position pairs (P(P+1)/2 matrix
# products) instead of materialising every G_i: cheaper while P(P+1)/2 stays below about P + 20.
_PAIRS_MAX_POSITIONS = 6


def _accumulate_conv_pairs(
    sum_g: dict[str, Tensor], sum_g2: dict[str, Tensor], key: str, conv: nn.Conv2d, d: Tensor, a: Tensor
) -> None:
    """``Σ_i G_i`` and ``Σ_i G_i²`` of a Conv2d with few output positions, without forming any G_i.

    With ``G_i = Σ_p δ_ip u_ipᵀ`` (``u = unfold(a)``),
    ``Σ_i G_i² = Σ_{p,q} Σ_i (δ_ip ∘ δ_iq)(u_ip ∘ u_iq)ᵀ``: one matrix product over the stacked
    (sample, position pair) rows, off-diagonal pairs counted twice.
    """
    n, c_out, positions = d.shape
    shape = conv.weight.shape
    u = F.unfold(a, conv.kernel_size, dilation=conv.dilation, padding=conv.padding, stride=conv.stride)  # (n, ckk, P)
    ckk = u.shape[1]
    _accumulate(sum_g, key, (d.permute(1, 0, 2).reshape(c_out, -1) @ u.permute(0, 2, 1).reshape(-1, ckk)).reshape(shape))
    p, q = torch.triu_indices(positions, positions, device=d.device)
    twice = torch.where(p == q, 1.0, 2.0).to(d.dtype)
    dd = d[:, :, p] * d[:, :, q] * twice  # (n, C_out, pairs)
    uu = u[:, :, p] * u[:, :, q]  # (n, ckk, pairs)
    _accumulate(sum_g2, key, (dd.permute(1, 0, 2).reshape(c_out, -1) @ uu.permute(0, 2, 1).reshape(-1, ckk)).reshape(shape))


def _unfold_numel(conv: nn.Conv2d, input_shape: tuple[int, ...]) -> int:
    """Entries of ``unfold(a_i)`` for one sample: ``C_in * kh * kw`` times the output positions."""
    size = 1
    for i, n in enumerate(input_shape[2:]):
        k, s, p, d = conv.kernel_size[i], conv.stride[i], conv.padding[i], conv.dilation[i]
        size *= (n + 2 * p - d * (k - 1) - 1) // s + 1
    return conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1] * size


def _accumulate_conv(
    sum_g: dict[str, Tensor], sum_g2: dict[str, Tensor], key: str, conv: nn.Conv2d, d: Tensor, a: Tensor,
    workspace: dict[str, Tensor],
) -> None:
    """Add ``Σ_i G_i`` and ``Σ_i G_i²`` of a Conv2d, ``G_i = δ_i unfold(a_i)ᵀ`` the per-sample weight
    gradient (one batched matmul per chunk of samples, chunks bounded by :data:`FTS_CHUNK_BYTES`).

    The per-sample gradients of a chunk go into one ``workspace`` buffer reused across chunks and
    layers: a fresh allocation of that size per chunk costs more in page faults than the squaring
    (VGG-16 on the CPU machine).
    """
    n, c_out = d.shape[0], d.shape[1]
    shape = conv.weight.shape
    d = d.reshape(n, c_out, -1)
    positions = d.shape[2]
    if positions <= _PAIRS_MAX_POSITIONS:
        _accumulate_conv_pairs(sum_g, sum_g2, key, conv, d, a)
        return
    per_sample = (conv.weight.numel() + shape[1] * shape[2] * shape[3] * d.shape[2]) * d.element_size()
    step = min(n, max(1, FTS_CHUNK_BYTES // max(1, per_sample)))
    need = step * conv.weight.numel()
    buf = workspace.get("g")
    if buf is None or buf.numel() < need or buf.dtype != d.dtype or buf.device != d.device:
        buf = workspace["g"] = d.new_empty(need)
    for s in range(0, n, step):
        u = F.unfold(a[s : s + step], conv.kernel_size, dilation=conv.dilation, padding=conv.padding, stride=conv.stride)
        m = u.shape[0]
        g = buf[: m * conv.weight.numel()].view(m, c_out, -1)
        torch.bmm(d[s : s + step], u.transpose(1, 2), out=g)  # (chunk, C_out, C_in * kh * kw)
        _accumulate(sum_g, key, g.sum(0).reshape(shape))
        _accumulate(sum_g2, key, g.square_().sum(0).reshape(shape))


def _accumulate(acc: dict[str, Tensor], key: str, value: Tensor) -> None:
    if key in acc:
        acc[key].add_(value)
    else:
        acc[key] = value
