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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from panning._functional import (
    check,
    functional_forward,
    host_route,
    masked_weights,
    one_read,
    other_tensors,
    preserved_modes,
    seeded,
    weight_grad_only_convs,
)

__all__ = [
    "IndexSpec",
    "INDICES",
    "register_index",
    "available_indices",
    "compute_scores",
    "compute_many",
    "LossFn",
    "Batch",
]

Batch = tuple[Tensor, Tensor]
LossFn = Callable[[Tensor, Tensor], Tensor]
Scores = dict[str, Tensor]
IndexFn = Callable[..., Scores]


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


# The order `panning list` shows the shipped indices in. Registration order is not used for them: the indices
# defined in their own modules register in whichever order those modules are first imported.
_SHIPPED_ORDER = ("random", "magnitude", "snip", "force", "grasp", "grasp_abs", "synflow", "synflow_l2", "fts",
                  "ntk_sap", "prospr", "px")


def available_indices() -> list[str]:
    """Names of the registered indices: the shipped ones in a fixed order, then others in registration order."""
    shipped = [n for n in _SHIPPED_ORDER if n in INDICES]
    return shipped + [n for n in INDICES if n not in _SHIPPED_ORDER]


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
    return compute_many([name], model, masks, batches, input_shape=input_shape, seed=seed, loss_fn=loss_fn)[name]


# The indices whose scores come from the loss gradient g and its Hessian product Hg at the same network: one
# gradient (taken with a graph) serves SNIP and GraSP, one Hg serves both GraSP signs.
_GRADIENT_FAMILY = ("snip", "grasp", "grasp_abs")


def compute_many(
    names: Sequence[str],
    model: nn.Module,
    masks: Mapping[str, Tensor],
    batches: Sequence[Batch] | None = None,
    *,
    input_shape: Sequence[int] | None = None,
    seed: int = 0,
    loss_fn: LossFn = F.cross_entropy,
    share: bool = True,
) -> dict[str, dict[str, Tensor]]:
    """Scores of several indices on the same masked network: ``{name: compute_scores(name, ...)}``.

    The same numbers as calling :func:`compute_scores` once per name (bit for bit on the CPU: the shared
    gradient is the one SNIP takes alone), in less time: the masks and batches are checked once, and
    with ``share`` SNIP, GraSP and GraSP-magnitude share their forward pass and loss gradient (SNIP's
    ``g`` is GraSP's first gradient; ``|θ ⊙ Hg|`` is the magnitude of ``θ ⊙ Hg``). Each index runs under
    the same ``seed``, as it would alone. ``batches`` may be ``None`` when no name needs data.
    """
    specs = []
    for name in names:
        spec = INDICES.get(name)
        if spec is None:
            raise ValueError(f"unknown index {name!r}; known indices: {', '.join(available_indices())}")
        specs.append(spec)
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    checked = _check_masks(model, masks)
    device = _device(model, checked)
    needs = [s.name for s in specs if s.needs_data]
    batch_list = _check_batches(batches, needs[0] if needs else names[0] if names else "", required=bool(needs))
    batch_list = [(x.to(device), y.to(device)) for x, y in batch_list] if batch_list else None
    out: dict[str, dict[str, Tensor]] = {}
    family = [n for n in _GRADIENT_FAMILY if n in names]
    if share and len(family) >= 2:
        assert batch_list is not None
        with preserved_modes(model), seeded(seed, device):
            out.update(_gradient_family(model, checked, batch_list, loss_fn, family))
    for spec in specs:
        if spec.name in out:
            continue
        with preserved_modes(model), seeded(seed, device):
            out[spec.name] = spec.fn(model, checked, batch_list, input_shape=input_shape, seed=seed, loss_fn=loss_fn)
    for name in names:
        _check_scores(name, checked, out[name])
    return {name: {k: out[name][k] for k in checked} for name in names}


def _gradient_family(
    model: nn.Module, masks: Mapping[str, Tensor], batches: list[Batch], loss_fn: LossFn, names: Sequence[str]
) -> dict[str, Scores]:
    """SNIP and/or GraSP (either sign) from one gradient and one Hessian-gradient product (train mode)."""
    model.train()
    ws = masked_weights(model, masks)
    rest = other_tensors(model, masks)
    hg: list[Tensor] | None = None
    if not {"grasp", "grasp_abs"} & set(names):
        g = _mean_gradient(model, ws, rest, batches, loss_fn)  # no graph: SNIP needs no second derivative
    elif len(batches) == 1:
        # one batch: g comes from the same forward whose graph is differentiated twice
        gf = _gradient_with_graph(model, {**rest, **ws}, batches[0], loss_fn, ws)
        g = [t.detach() for t in gf]
        hg = _grads(_dot(gf, g), ws)
    else:
        g = _mean_gradient(model, ws, rest, batches, loss_fn)
        hg = _hessian_gradient(model, ws, rest, batches, loss_fn, g)
    out: dict[str, Scores] = {}
    if "snip" in names:
        out["snip"] = {k: (w.detach() * gk).abs_() for (k, w), gk in zip(ws.items(), g, strict=True)}
    if hg is not None:
        signed = {k: w.detach() * h for (k, w), h in zip(ws.items(), hg, strict=True)}
        if "grasp_abs" in names:
            out["grasp_abs"] = {k: v.abs() for k, v in signed.items()}
        if "grasp" in names:
            out["grasp"] = signed
    return out


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

    def error() -> ValueError:
        nonfinite = [k for k in masks if not bool(torch.isfinite(scores[k]).all())]
        return ValueError(f"index {name!r} produced non-finite scores for {nonfinite} "
                          "(non-finite inputs or weights, or a loss that overflows?)")

    first = scores[next(iter(masks))]
    if not host_route(first):  # an exact flag, read back with the step's other checks (deferred_checks)
        check(one_read([torch.isfinite(scores[k]).all() for k in masks]).all(), error)
        return
    # one reduction per tensor: any NaN/inf makes the sum non-finite; only then look closer
    # (a finite tensor whose sum overflows passes the exact check)
    sums = one_read([scores[k].sum().to(torch.float64) for k in masks])
    if not bool(torch.isfinite(sums).all()) and any(not bool(torch.isfinite(scores[k]).all()) for k in masks):
        raise error()


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


def _gradient_with_graph(
    model: nn.Module, tensors: Mapping[str, Tensor], batch: Batch, loss_fn: LossFn, ws: Mapping[str, Tensor]
) -> list[Tensor]:
    """``∇L`` of one batch with its graph kept, to be differentiated again; first-layer convolutions skip
    the input gradient the second backward would otherwise compute (see :func:`weight_grad_only_convs`)."""
    with weight_grad_only_convs():
        return _grads(_batch_loss(model, tensors, batch, loss_fn), ws, create_graph=True)


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
            for a, gi in zip(acc, g, strict=True):
                a.add_(gi, alpha=frac)
    assert acc is not None  # batches were checked to be non-empty
    return acc


def _hessian_gradient(
    model: nn.Module, ws: Mapping[str, Tensor], rest: Mapping[str, Tensor], batches: list[Batch], loss_fn: LossFn,
    g: list[Tensor],
) -> list[Tensor]:
    """``H g`` of the mean loss over several batches, by double backward: ``z = Σ stop(g)·∇L_b`` per batch,
    ``Hg = Σ_b (n_b / N) ∇z_b``, ``g`` the mean gradient (one batch: :func:`_gradient_family` reuses its graph)."""
    tensors = {**rest, **ws}
    total = sum(x.shape[0] for x, _ in batches)
    hg = [torch.zeros_like(w) for w in ws.values()]
    for batch in batches:
        gf = _gradient_with_graph(model, tensors, batch, loss_fn, ws)
        frac = batch[0].shape[0] / total
        for a, h in zip(hg, _grads(_dot(gf, g), ws), strict=True):
            a.add_(h, alpha=frac)
    return hg


def _dot(a: list[Tensor], b: list[Tensor]) -> Tensor:
    return torch.stack([(x * y).sum() for x, y in zip(a, b, strict=True)]).sum()


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
    return _gradient_family(model, masks, batches, loss_fn, ("snip",))["snip"]


@register_index("force", needs_data=True)
def force(model: nn.Module, masks: Mapping[str, Tensor], batches: list[Batch], *, loss_fn: LossFn, **_) -> Scores:
    """FORCE connection sensitivity: ``score = |θ ⊙ ∂L/∂(θ ⊙ m)|``, highest kept.

    The gradient is taken at the pruned network ``θ ⊙ m`` (train mode, mean loss over all batches, as
    :func:`snip`), for every weight, pruned ones included, and multiplied by the *dense* weight ``θ``:
    a pruned weight whose return would change the loss of the pruned network scores high. With
    ``m = 1`` it is SNIP. de Jorge et al., 2021, "Progressive Skeletonization: Trimming more fat from a
    network at initialization" (ICLR): the ``force`` method selects among all weights at each of its
    steps, so pruned weights can come back (their code: prune_method 3, saliency on the original
    weights, the network rebuilt from the dense one at every step). Their code keeps every weight
    whose saliency reaches the ``int(N * density)``-th largest (ties may keep more); this project
    keeps exactly ``round(N * density)`` with its deterministic tie-break.
    """
    model.train()
    ws = masked_weights(model, masks)
    rest = other_tensors(model, masks)
    g = _mean_gradient(model, ws, rest, batches, loss_fn)
    params = dict(model.named_parameters())
    return {k: (params[k].detach() * gk).abs_() for k, gk in zip(ws, g, strict=True)}


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
    return _gradient_family(model, masks, batches, loss_fn, ("grasp",))["grasp"]


@register_index("grasp_abs", needs_data=True)
def grasp_abs(model: nn.Module, masks: Mapping[str, Tensor], batches: list[Batch], *, loss_fn: LossFn, **_) -> Scores:
    """GraSP magnitude: ``score = |θ ⊙ (H g)|``, highest kept (as :func:`grasp`, without the sign).

    The variant used by Panning (Kang et al., 2022, arXiv:2209.13378), after Lubana & Dick, 2021
    ("A gradient flow framework for analyzing network pruning"), who argue that weights changing
    gradient flow in either direction are important.
    """
    return _gradient_family(model, masks, batches, loss_fn, ("grasp_abs",))["grasp_abs"]


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
    shape = _input_shape("synflow", input_shape, batches)
    model.eval()
    ws = masked_weights(model, masks, dtype=torch.float64, absolute=True)
    rest = other_tensors(model, masks, dtype=torch.float64, absolute=True)
    x = torch.ones((1, *shape), dtype=torch.float64, device=_device(model, masks))
    r = functional_forward(model, {**rest, **ws}, x).sum()
    g = _grads(r, ws)
    return {k: (w.detach() * gk).abs_() for (k, w), gk in zip(ws.items(), g, strict=True)}


@register_index("synflow_l2", needs_data=False)
def synflow_l2(
    model: nn.Module,
    masks: Mapping[str, Tensor],
    batches: list[Batch] | None = None,
    *,
    input_shape: Sequence[int] | None = None,
    **_,
) -> Scores:
    """SynFlow-L2 (data-free): ``score = |θ ⊙ m| ⊙ |∂R/∂w|``, ``R = Σ f(1; w)``, ``w = (θ ⊙ m)²``, highest kept.

    SynFlow with squared instead of absolute weights in the synaptic-flow product, as the PX authors'
    code does it (Iurada, Ciccone & Tommasi, 2024, "Finding Lottery Tickets in Vision Models via
    Data-driven Spectral Foresight Pruning" (CVPR), github.com/iurada/px-ntk-pruning, ``SynFlowL2`` in
    ``lib/pruners.py``): every floating parameter and buffer of the network is squared (prunable weights
    masked first, BatchNorm running statistics included), the network is evaluated in eval mode on one
    all-ones input of ``input_shape`` (default ``batches[0][0].shape[1:]``), and the gradient of the
    summed output with respect to the *squared* weights is multiplied by the weight's magnitude
    ``|θ|`` (not by ``θ²``). By the chain rule the score is ``½ |∂R/∂θ|``, one factor of ``|θ|``
    fewer than SynFlow's conserved ``w ⊙ ∂R/∂w``: this follows the authors' code; the paper gives no
    separate formula for this baseline. Sign: non-negative; pruned weights score 0. Default
    iterations (:data:`panning.pruner.METHODS`): 100 on an exponential schedule, as the authors' code
    prunes every pruning-at-initialisation method (``rounds`` steps of density ``d^(t/T)``; their
    launch scripts set ``rounds: 100``).

    Differences from that code: activations are left in place (the squared network is non-negative
    up to BatchNorm's mean subtraction, so ReLU acts as the identity, as there), and the computation
    runs in float64 like :func:`synflow` (theirs in float32) so deep networks do not overflow; scores
    are returned as float64. Cost: one forward and one backward of a single input.
    """
    shape = _input_shape("synflow_l2", input_shape, batches)
    model.eval()
    theta = {k: w.detach() for k, w in masked_weights(model, masks, dtype=torch.float64).items()}  # θ ⊙ m
    ws = {k: t.square().requires_grad_(True) for k, t in theta.items()}
    rest = {k: t.square() if t.is_floating_point() else t
            for k, t in other_tensors(model, masks, dtype=torch.float64).items()}
    x = torch.ones((1, *shape), dtype=torch.float64, device=_device(model, masks))
    r = functional_forward(model, {**rest, **ws}, x).sum()
    g = _grads(r, ws)
    return {k: theta[k].abs().mul_(gk.abs()) for k, gk in zip(ws, g, strict=True)}


def _input_shape(name: str, input_shape: Sequence[int] | None, batches: list[Batch] | None) -> tuple[int, ...]:
    """``input_shape`` as ints, or the shape of the first batch's inputs without the batch dimension."""
    if input_shape is None:
        if not batches:
            raise ValueError(f"{name} needs input_shape (or batches to take it from)")
        input_shape = tuple(batches[0][0].shape[1:])
    return tuple(int(s) for s in input_shape)


# FTS lives in its own module (several exact per-sample gradient routes); importing it registers "fts".
from panning import fts as _fts  # noqa: E402,F401

# Pruning-at-initialisation indices from later papers, each in its own module; importing registers them.
from panning import ntk_sap as _ntk_sap  # noqa: E402,F401
from panning import prospr as _prospr  # noqa: E402,F401
from panning import px as _px  # noqa: E402,F401
