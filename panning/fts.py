"""Fisher-Taylor Sensitivity (FTS): the ``fts`` index and its per-sample gradient routes.

Registered with :func:`panning.indices.register_index` like every index; it lives in its own module
because forming the empirical Fisher diagonal exactly and fast needs several routes (one batched
backward for plain Linear/Conv2d layers, ``torch.func.vmap`` for everything else), each tested
against an explicit per-sample loop. :mod:`panning.indices` imports this module, so ``fts`` is
registered whenever the indices are.
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from panning._functional import batch_norm_modules, forward_probe, masked_weights, other_tensors, output_taps
from panning.indices import Batch, LossFn, Scores, register_index

__all__ = ["FTS_CHUNK_BYTES", "fts"]


#: Upper bound (bytes) on the per-sample gradients FTS holds at once; samples are processed in
#: chunks that fit (peak memory is about twice this). 512 MiB holds a batch of 128 for ResNet-20
#: (and any batch for all-Linear nets, whose per-sample gradients are never materialised) and
#: 8 samples of VGG-16. Larger chunks are a little faster; lower it on small machines.
FTS_CHUNK_BYTES = 512 * 2**20


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
    the per-sample gradients (VGG on CIFAR), otherwise vmap's grouped convolutions are cheaper.
    When every scored weight is such a Linear or Conv2d layer (MLPs, LeNets, VGGs, ResNets), no
    vmap is needed at all: one ordinary batched backward of ``N * loss_fn`` gives every ``δ_i``
    (``loss_fn`` must be a mean of per-sample losses, as documented for :func:`compute_scores`).
    Other layers (grouped or shared convolutions, custom modules) get their per-sample weight
    gradients from vmap.

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
        for (k, mod), d in zip(lin.items(), ds, strict=True):
            a = inputs[mod].detach()
            if a.dim() == 2:
                _accumulate_outer(sum_g, sum_g2, k, d, a)
            else:
                conv = modules_by_name[mod]
                assert isinstance(conv, nn.Conv2d)  # _tap_layers admits only Linear and Conv2d
                _accumulate_conv(sum_g, sum_g2, k, conv, d, a, workspace)
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
    u = F.unfold(a, conv.kernel_size, dilation=conv.dilation, padding=_padding(conv), stride=conv.stride)  # (n, ckk, P)
    ckk = u.shape[1]
    _accumulate(sum_g, key,
                (d.permute(1, 0, 2).reshape(c_out, -1) @ u.permute(0, 2, 1).reshape(-1, ckk)).reshape(shape))
    p, q = torch.triu_indices(positions, positions, device=d.device)
    twice = torch.where(p == q, 1.0, 2.0).to(d.dtype)
    dd = d[:, :, p] * d[:, :, q] * twice  # (n, C_out, pairs)
    uu = u[:, :, p] * u[:, :, q]  # (n, ckk, pairs)
    _accumulate(sum_g2, key,
                (dd.permute(1, 0, 2).reshape(c_out, -1) @ uu.permute(0, 2, 1).reshape(-1, ckk)).reshape(shape))


def _padding(conv: nn.Conv2d) -> tuple[int, ...]:
    """The numeric padding of a convolution on the unfold route (string paddings never take it: see _tap_layers)."""
    assert not isinstance(conv.padding, str)
    return conv.padding


def _unfold_numel(conv: nn.Conv2d, input_shape: tuple[int, ...]) -> int:
    """Entries of ``unfold(a_i)`` for one sample: ``C_in * kh * kw`` times the output positions."""
    size = 1
    for i, n in enumerate(input_shape[2:]):
        k, s, p, d = conv.kernel_size[i], conv.stride[i], _padding(conv)[i], conv.dilation[i]
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
        u = F.unfold(a[s : s + step], conv.kernel_size, dilation=conv.dilation, padding=_padding(conv),
                     stride=conv.stride)
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
