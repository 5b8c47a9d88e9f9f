"""Path eXclusion (PX): the ``px`` index, a data-driven bound on the NTK trace from network paths.

Registered with :func:`panning.indices.register_index` like every index; :mod:`panning.indices` imports
this module, so ``px`` is registered whenever the indices are. PX evaluates three variants of the
network -- the network itself (to read which ReLUs are on), a "path activation" network and a "path
kernel" network -- which differ from the model only in their tensors and in what a ReLU does. The
tensors are substituted through :func:`panning._functional.functional_forward`; the ReLUs, whether
modules (``nn.ReLU``) or functions (``F.relu``, ``torch.relu``, ``Tensor.relu`` and their in-place
forms), are intercepted by a :class:`torch.overrides.TorchFunctionMode` for the duration of one
forward, so the model needs no special layers.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from panning._functional import as_numbers, batch_norm_modules, functional_forward, masked_weights, other_tensors
from panning.indices import Batch, Scores, register_index

__all__ = ["px", "ReluReplaced"]

_RELU = {F.relu, torch.relu, Tensor.relu}
_RELU_INPLACE = {F.relu_, torch.relu_, Tensor.relu_}


class ReluReplaced(TorchFunctionMode):
    """``with ReluReplaced(fn):`` every ReLU call ``relu(x)`` returns ``fn(x)`` instead (written into ``x``
    for the in-place forms); other functions run as usual. ``fn`` runs with the mode off."""

    def __init__(self, fn: Callable[[Tensor], Tensor]) -> None:
        super().__init__()
        self.fn = fn

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _RELU or func in _RELU_INPLACE:
            x = args[0]
            out = self.fn(x)
            if func in _RELU_INPLACE or kwargs.get("inplace", False):
                return x.copy_(out)
            return out
        return func(*args, **kwargs)


@register_index("px", needs_data=True)
def px(model: nn.Module, masks: Mapping[str, Tensor], batches: list[Batch], **_) -> Scores:
    """PX: ``score = w ⊙ Σ_b (∂R_b/∂w)²``, ``w = (θ ⊙ m)²``, ``R_b = Σ_i z1(x_i) · z2``, highest kept.

    Path eXclusion (Iurada, Ciccone & Tommasi, 2024, "Finding Lottery Tickets in Vision Models via
    Data-driven Spectral Foresight Pruning" (CVPR), github.com/iurada/px-ntk-pruning, ``PX`` in
    ``lib/pruners.py``, which this follows). Writing the network as a sum over input-output paths, the
    NTK trace is bounded by a data term (which paths the data activates) times a path-kernel term
    (products of squared weights along paths); PX keeps the weights that contribute most to the bound:

    - ``z2 = f_pk(1; w)``: the *path kernel* network -- every floating parameter and buffer squared
      (scored weights masked first; BatchNorm running statistics included, used in eval mode), ReLUs
      removed (identity) -- on an all-ones input;
    - ``z1 = f_jvf(x²)``: the *path activation* network on the squared data -- scored weights replaced
      by the mask ``m``, every other parameter by 1 (or by 0 where its name ends in ``bias``: the
      authors set Conv/Linear weights 1, biases 0, BatchNorm weight 1, bias 0), BatchNorm normalising
      with the batch's statistics (their ``track_running_stats=False``), and every ReLU replaced by
      multiplication with the 0/1 pattern (input > 0) of the same ReLU call in the masked network
      ``f(x; θ ⊙ m)`` in eval mode;
    - ``R_b = Σ_i Σ_c z1_ic(x_i) z2_c`` per batch ``b``; the gradient ``∂R_b/∂w`` is taken with respect to
      the squared weights, squared, summed over batches and multiplied by ``w = (θ ⊙ m)²``.

    Sign: non-negative (the paper: the score is always positive, which with iterative pruning avoids
    layer collapse); pruned weights score 0. The sum over batches of *squared* per-batch gradients is
    the authors' (so the split of the data into batches matters, unlike for SNIP); ``batches`` are the
    batches given (their scripts use 2 batches of 128 on CIFAR-10); labels are not used. Default
    iterations (:data:`panning.pruner.METHODS`): 100 on an exponential schedule (their launch scripts,
    ``rounds: 100``, density ``d^(t/T)``). The paper's text was not available to check the formula
    against beyond its abstract; this is the code's.

    Differences from that code: only ReLU is treated as an activation (their models switch their own
    ReLU/LeakyReLU layers); other nonlinearities (max-pooling, as there, but also e.g. tanh) are left
    in all three networks. ``z2`` is computed once on one all-ones input (their batch of identical
    all-ones rows gives the same numbers) and reused for every batch. Everything runs in float64 (theirs
    in float32), so squared gradients of deep networks do not overflow; scores are returned as float64.

    Cost per batch: two no-grad forwards (the masked network and the path activation network) and
    one backward through the path kernel network, whose single-input forward is shared by all batches:
    about 1.5 forward+backward passes per batch.
    """
    model.eval()
    params = dict(model.named_parameters())
    dtype = torch.float64
    device = params[next(iter(masks))].device
    bns = [m for m in batch_norm_modules(model, training_only=False).values()]

    real = {**other_tensors(model, masks), **{k: w.detach() for k, w in masked_weights(model, masks).items()}}
    w2 = {k: w.detach().square().requires_grad_(True)
          for k, w in masked_weights(model, masks, dtype=dtype).items()}
    pk = {k: t.square() if t.is_floating_point() else t for k, t in other_tensors(model, masks, dtype=dtype).items()}
    jvf: dict[str, Tensor] = {}
    for name, p in params.items():
        if name in masks:
            jvf[name] = as_numbers(masks[name], dtype)
        elif p.is_floating_point():
            jvf[name] = (torch.zeros_like if name.endswith("bias") else torch.ones_like)(p, dtype=dtype)
    for name, b in model.named_buffers():
        jvf[name] = (b.detach().to(dtype) if b.is_floating_point() else b.detach()).clone()  # BN updates copies

    # the path kernel network's output on one all-ones input: the same for every batch
    shape = tuple(batches[0][0].shape[1:])
    with ReluReplaced(lambda x: x):
        z2 = functional_forward(model, {**pk, **w2}, torch.ones((1, *shape), dtype=dtype, device=device))[0]

    patterns: list[Tensor] = []

    def record(h: Tensor) -> Tensor:
        patterns.append(h > 0)
        return torch.relu(h)

    def gate(h: Tensor) -> Tensor:
        if not patterns:
            raise RuntimeError("px: the path activation network called ReLU more often than the network")
        return h * patterns.pop(0)

    acc = {k: torch.zeros_like(w) for k, w in w2.items()}
    for bi, batch in enumerate(batches):
        x = batch[0]
        patterns.clear()
        with torch.no_grad():
            with ReluReplaced(record):
                functional_forward(model, real, x)
            flags = [(m, m.training) for m in bns]
            try:
                for m in bns:
                    m.training = True  # batch statistics; the running ones (copies) absorb the update
                with ReluReplaced(gate):
                    z1 = functional_forward(model, jvf, x.to(dtype).square())
            finally:
                for m, flag in flags:
                    m.training = flag
        if patterns:
            raise RuntimeError("px: the path activation network called ReLU less often than the network")
        if not z2.requires_grad:
            continue
        g = torch.autograd.grad(z2, list(w2.values()), grad_outputs=z1.sum(0), retain_graph=bi < len(batches) - 1,
                                allow_unused=True, materialize_grads=True)
        for k, gk in zip(w2, g, strict=True):
            acc[k].add_(gk.square())
    return {k: acc[k].mul_(w.detach()) for k, w in w2.items()}
