"""Effective connectivity of a masked network: which kept weights lie on an input-to-output path.

Method (SynFlow-style path counting, Tanaka et al. 2020; Vysogorets & Kempe 2023 "effective
sparsity"): on a deep copy of the model in float64, every masked weight is replaced by its binary
mask, every other Conv/Linear-style weight by ones, every bias by zero; the input is all ones and
``R = sum(output)``. With everything non-negative, ``R`` counts input-output paths and
``dR/dw > 0`` for a kept weight ``w`` exactly when some path passes through it. The user's model is
never touched.

Because every intermediate value is non-negative, the following substitutions change no sign and
so no answer, while avoiding saturation and gradient routing (applied to module and functional
calls alike through a :class:`torch.overrides.TorchFunctionMode`):

* elementwise activations (ReLU, ReLU6/Hardtanh, LeakyReLU, ELU, GELU, SiLU, tanh, sigmoid, ...)
  become the identity: tanh/ReLU6 would saturate on path counts and kill the gradient;
* max pooling becomes average pooling with the same window: max-pooling sends the gradient to
  one element per window, average pooling to all, and both are positive iff a window holds a path;
* batch/layer/group/instance normalisation and dropout become the identity (positive rescaling).

Limits: a forward that subtracts activations, multiplies them by learned gates whose branch is
pruned (squeeze-excitation: the sigmoid gate becomes 0, not 0.5), takes ``torch.max`` reductions,
or adds non-bias parameters (e.g. positional embeddings, which are set to one) is not modelled
faithfully. Path counts of very deep nets can overflow float64; then the computation is repeated
with each weight tensor scaled by ``1/fan_in``, which changes no sign, and a RuntimeError is raised
if even that is not finite.
"""
from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad_and_value, vmap
from torch.overrides import TorchFunctionMode

from panning._functional import all_finite, architecture_key, one_read, rows_finite
from panning.masks import Masks, _prunable_with_modules

__all__ = ["PathCounter", "collapsed_layers", "effective_masks", "effective_sparsity"]


def _existing(owner: Any, names: Sequence[str]) -> list[Any]:
    return [getattr(owner, n) for n in names if hasattr(owner, n)]


_ACTIVATIONS = frozenset(
    _existing(
        F,
        [
            "relu", "relu_", "relu6", "hardtanh", "hardtanh_", "leaky_relu", "leaky_relu_", "elu", "elu_",
            "selu", "selu_", "celu", "celu_", "gelu", "silu", "mish", "hardswish", "hardsigmoid", "softplus",
            "rrelu", "rrelu_", "sigmoid", "tanh",
        ],
    )
    + _existing(torch, ["relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "selu", "selu_", "celu", "celu_",
                        "rrelu", "rrelu_"])
    + _existing(
        torch.Tensor,
        ["relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_"],
    )
    + _existing(torch._C._nn, ["gelu", "silu", "silu_", "mish", "mish_", "hardswish", "hardswish_", "hardsigmoid",
                               "hardsigmoid_", "softplus", "elu", "elu_", "leaky_relu", "leaky_relu_", "hardtanh",
                               "hardtanh_"])
)
_PRELU = frozenset(_existing(F, ["prelu"]) + _existing(torch, ["prelu"]))
_NORMS_AND_DROPOUT = frozenset(
    _existing(
        F,
        [
            "batch_norm", "instance_norm", "layer_norm", "group_norm", "local_response_norm", "rms_norm",
            "dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout", "feature_alpha_dropout",
        ],
    )
    + _existing(torch, ["batch_norm", "instance_norm", "layer_norm", "group_norm", "dropout", "dropout_"])
)
_MAXPOOL = {}
for _d in (1, 2, 3):
    for _f in _existing(F, [f"max_pool{_d}d", f"_max_pool{_d}d"]) + _existing(torch, [f"max_pool{_d}d"]):
        _MAXPOOL[_f] = _d
_ADAPTIVE_MAXPOOL = {}
for _d in (1, 2, 3):
    for _f in (_existing(F, [f"adaptive_max_pool{_d}d", f"_adaptive_max_pool{_d}d"])
               + _existing(torch, [f"adaptive_max_pool{_d}d"])):
        _ADAPTIVE_MAXPOOL[_f] = _d
# torch.adaptive_max_pool1d always returns (values, indices); the functional forms return values unless asked
_RETURNS_INDICES = frozenset(_existing(torch, ["adaptive_max_pool1d", "adaptive_max_pool2d", "adaptive_max_pool3d"]))
_AVGPOOL = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}
_ADAPTIVE_AVGPOOL = {1: F.adaptive_avg_pool1d, 2: F.adaptive_avg_pool2d, 3: F.adaptive_avg_pool3d}


def _arg(args: tuple, kwargs: dict, i: int, name: str, default: Any) -> Any:
    if len(args) > i:
        return args[i]
    return kwargs.get(name, default)


class _PathCountMode(TorchFunctionMode):
    """Replaces sign-preserving non-linearities by linear stand-ins; see the module docstring."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _ACTIVATIONS or func in _NORMS_AND_DROPOUT:
            return args[0] if args else next(iter(kwargs.values()))
        if func in _PRELU:
            return args[0] if args else kwargs["input"]
        if func in _MAXPOOL:
            x = _arg(args, kwargs, 0, "input", None)
            kernel = _arg(args, kwargs, 1, "kernel_size", None)
            stride = _arg(args, kwargs, 2, "stride", None)
            padding = _arg(args, kwargs, 3, "padding", 0)
            dilation = _arg(args, kwargs, 4, "dilation", 1)
            ceil_mode = _arg(args, kwargs, 5, "ceil_mode", False)
            return_indices = _arg(args, kwargs, 6, "return_indices", False)
            dil = dilation if isinstance(dilation, (tuple, list)) else (dilation,)
            if not return_indices and all(int(d) == 1 for d in dil):
                if stride is None or (isinstance(stride, (tuple, list)) and len(stride) == 0):
                    stride = None
                return _AVGPOOL[_MAXPOOL[func]](x, kernel, stride, padding, ceil_mode, True)
        if func in _ADAPTIVE_MAXPOOL:
            x = _arg(args, kwargs, 0, "input", None)
            size = _arg(args, kwargs, 1, "output_size", None)
            if func in _RETURNS_INDICES:
                return _ADAPTIVE_AVGPOOL[_ADAPTIVE_MAXPOOL[func]](x, size), func(*args, **kwargs)[1]
            if not _arg(args, kwargs, 2, "return_indices", False):
                return _ADAPTIVE_AVGPOOL[_ADAPTIVE_MAXPOOL[func]](x, size)
        return func(*args, **kwargs)


def _tensor_leaves(obj: Any) -> list[Tensor]:
    if isinstance(obj, Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in _tensor_leaves(v)]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in _tensor_leaves(v)]
    return []


def _fan_in(p: Tensor) -> float:
    return float(p[0].numel()) if p.dim() >= 2 and p.shape[0] > 0 and p[0].numel() > 0 else 1.0


def _derived_tensor_memo(model: nn.Module) -> dict[int, Any]:
    """deepcopy memo replacing non-leaf tensors stored on modules by detached copies.

    ``torch.nn.utils.prune`` (and weight_norm) keep ``weight`` as a computed, non-leaf tensor,
    which ``copy.deepcopy`` refuses; the copy's forward pre-hook recomputes it anyway.
    """
    memo: dict[int, Any] = {}
    for mod in model.modules():
        for v in vars(mod).values():
            if isinstance(v, Tensor) and not isinstance(v, nn.Parameter) and v.grad_fn is not None:
                memo[id(v)] = v.detach().clone()
    return memo


def _check_input_shape(input_shape: Sequence[int]) -> None:
    if any(int(d) <= 0 for d in input_shape):
        raise ValueError("input_shape must hold positive sizes (without the batch dimension), "
                         f"got {tuple(input_shape)}")


#: architecture -> whether :meth:`PathCounter.effective_many`'s stacked pass can run it (absent: not tried yet)
_STACKABLE: dict[tuple, bool] = {}


class PathCounter:
    """The path-counting copy of ``model`` (see the module docstring), made once and reused for any number of
    masks: :meth:`effective` is :func:`effective_masks` without the deep copy each call makes, which costs
    as much as the counting itself on a small network. Every parameter of the copy is overwritten at each
    call, so the model's weights may change in between; its structure and buffers are taken once, here.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        net = copy.deepcopy(model, _derived_tensor_memo(model))
        net.eval()
        net.double()
        with torch.no_grad():
            for mod in net.modules():
                # torch.nn.utils.prune layout: weight = weight_orig * weight_mask; put the mask in weight_orig
                wm = dict(mod.named_buffers(recurse=False)).get("weight_mask")
                if wm is not None and wm.is_floating_point():
                    wm.fill_(1.0)
        self._net = net
        self._found = _prunable_with_modules(net)
        self._key = architecture_key("paths", model, {k: p for k, (_, p) in self._found.items()}, None, None)

    @property
    def _stackable(self) -> bool:
        """False once a stacked pass failed for this architecture (:meth:`effective_many`)."""
        return _STACKABLE.get(self._key, True)

    def _fill(self, masks: Masks, scaled: bool) -> None:
        """Masked weights <- their masks, other weights <- 1 (or ``1/fan_in`` when ``scaled``), biases <- 0."""
        found = self._found
        masked = {id(found[k][1]): k for k in masks}
        with torch.no_grad():
            for name, p in self._net.named_parameters():
                scale = 1.0 / _fan_in(p) if scaled else 1.0
                if id(p) in masked:
                    k = masked[id(p)]
                    p.copy_(masks[k].to(device=p.device, dtype=p.dtype) * scale)
                elif not p.is_floating_point():
                    continue
                elif name.rpartition(".")[2].endswith("bias"):
                    p.zero_()
                else:
                    p.fill_(scale)

    def _ones(self, input_shape: Sequence[int]) -> Tensor:
        device = next(iter(self._found.values()))[1].device if self._found else torch.device("cpu")
        return torch.ones((1, *map(int, input_shape)), dtype=torch.float64, device=device)

    def _count(self, out: Any) -> Tensor:
        """R, the sum of every floating-point output."""
        leaves = [t for t in _tensor_leaves(out) if t.is_floating_point()]
        if not leaves:
            raise ValueError(f"{type(self.model).__name__} returned no floating-point tensor; cannot count paths")
        return torch.stack([t.sum() for t in leaves]).sum()

    def _path_grads(self, masks: Masks, input_shape: Sequence[int], scaled: bool) -> tuple[dict[str, Tensor], Tensor]:
        """dR/d(mask) for every key of ``masks`` on the path-counting copy; also R (0-d, left on the device)."""
        net, found = self._net, self._found
        self._fill(masks, scaled)
        params = [found[k][1] for k in masks]
        for p in params:
            p.requires_grad_(True)
        with torch.enable_grad(), _PathCountMode():
            r = self._count(net(self._ones(input_shape)))
        if not r.requires_grad:  # output does not depend on any masked weight
            return {k: torch.zeros_like(masks[k], dtype=torch.float64) for k in masks}, r.detach()
        grads = torch.autograd.grad(r, params, allow_unused=True)
        return {
            k: (g.detach() if g is not None else torch.zeros_like(p, dtype=torch.float64))
            for k, p, g in zip(masks, params, grads, strict=True)
        }, r.detach()

    def effective(self, masks: Masks, input_shape: Sequence[int]) -> Masks:
        """Kept weights of ``masks`` that lie on at least one input-output path (:func:`effective_masks`)."""
        if not isinstance(masks, Masks):
            masks = Masks(masks)
        masks.check(self.model)
        _check_input_shape(input_shape)
        grads = None
        for scaled in (False, True):
            grads, r = self._path_grads(masks, input_shape, scaled)
            # R and every gradient finite, in one read
            if bool(one_read([torch.isfinite(r).reshape(())] + [all_finite(g) for g in grads.values()]).all()):
                break
        else:
            raise RuntimeError("path counts overflow float64 even with 1/fan_in scaling; cannot compute effective "
                               "masks")
        return Masks._trusted(
            {k: (masks[k] & (grads[k] > 0).to(masks[k].device)).clone() for k in masks}
        )

    def effective_many(self, masks: Sequence[Masks], input_shape: Sequence[int]) -> list[Masks]:
        """``[self.effective(m, input_shape) for m in masks]``, with the path counts of all the masks computed as
        one ``vmap``-ed pass where the network allows it (:meth:`effective_begin`, one host read, then
        :meth:`effective_end`)."""
        pending = self.effective_begin(masks, input_shape)
        ok = pending.finite.tolist()  # one host read for all the masks
        return self.effective_end(pending, ok)

    def effective_begin(self, masks: Sequence[Masks], input_shape: Sequence[int]) -> PendingEffective:
        """The device half of :meth:`effective_many`: effective masks from the unscaled path counts and, per mask,
        whether those counts were finite (a boolean vector left on the device, for the caller to read back with
        other values and hand to :meth:`effective_end`, which redoes the masks whose counts overflowed).

        The answer is the same whichever way the counts are summed: every term is a non-negative path count
        (>= 1 where positive, unscaled), so a sum is positive exactly when one of its terms is. A mask whose
        counts overflow float64, or a network the stacked pass cannot run (vmap lacks a rule for one of its
        operations; remembered per architecture), goes through :meth:`effective`, which retries with the
        ``1/fan_in`` scaling. (A count within rounding of float64's limit could overflow in one summation order
        and not the other, and so be decided by the scaled pass on one route only; no network here comes near.)
        """
        masks = [m if isinstance(m, Masks) else Masks(m) for m in masks]
        for m in masks:
            m.check(self.model)
        _check_input_shape(input_shape)
        keys = list(masks[0]) if masks else []
        if len(masks) < 2 or not self._stackable or not keys or any(list(m) != keys for m in masks):
            return self._begin_one_by_one(masks, input_shape)
        net = self._net
        names = {id(p): n for n, p in net.named_parameters()}
        pnames = [names[id(self._found[k][1])] for k in keys]
        self._fill(masks[0], scaled=False)  # the constants; the masked weights come from the stack below
        stack = {n: torch.stack([m[k] for m in masks]).to(self._found[k][1]) for n, k in zip(pnames, keys, strict=True)}
        x = self._ones(input_shape)

        def count(ws: dict[str, Tensor]) -> Tensor:
            return self._count(functional_call(net, ws, (x,), strict=False, tie_weights=True))

        try:
            with torch.enable_grad(), _PathCountMode():
                grads, r = vmap(grad_and_value(count), randomness="error")(stack)
        except (RuntimeError, ValueError, NotImplementedError):  # no batching rule: the one-at-a-time route
            _STACKABLE[self._key] = False
            return self._begin_one_by_one(masks, input_shape)
        finite = torch.stack([torch.isfinite(r)] + [rows_finite(grads[n]) for n in pnames])
        out = [Masks._trusted({k: m[k] & (grads[n][i] > 0).to(m[k].device) for n, k in zip(pnames, keys, strict=True)})
               for i, m in enumerate(masks)]
        return PendingEffective(masks, input_shape, out, finite.all(0))

    def _begin_one_by_one(self, masks: list[Masks], input_shape: Sequence[int]) -> PendingEffective:
        """:meth:`effective_begin` for one mask at a time: each mask's unscaled pass and its finiteness flag."""
        out, flags = [], []
        for m in masks:
            grads, r = self._path_grads(m, input_shape, scaled=False)
            flags.append(torch.stack([torch.isfinite(r).reshape(())] + [all_finite(g) for g in grads.values()]).all())
            out.append(Masks._trusted({k: (m[k] & (grads[k] > 0).to(m[k].device)).clone() for k in m}))
        finite = one_read(flags) if flags else torch.ones(0, dtype=torch.bool)
        return PendingEffective(masks, input_shape, out, finite)

    def effective_end(self, pending: PendingEffective, finite: Sequence[float | bool]) -> list[Masks]:
        """The effective masks of :meth:`effective_begin`, given its ``finite`` flags as read back: a mask whose
        unscaled counts overflowed goes through :meth:`effective` (the ``1/fan_in`` retry)."""
        return [eff if ok else self.effective(m, pending.input_shape)
                for m, eff, ok in zip(pending.masks, pending.out, finite, strict=True)]


@dataclass
class PendingEffective:
    """Effective masks between :meth:`PathCounter.effective_begin` and :meth:`PathCounter.effective_end`."""

    masks: list[Masks]
    input_shape: Sequence[int]
    out: list[Masks]  # from the unscaled counts; valid where ``finite`` is True
    finite: Tensor  # [len(masks)] booleans, on the device


def effective_masks(model: nn.Module, masks: Masks, input_shape: Sequence[int]) -> Masks:
    """Kept weights that lie on at least one path from the input to the output.

    ``input_shape`` excludes the batch dimension, e.g. ``(64,)`` or ``(1, 28, 28)``. The model is
    deep-copied and never modified (:class:`PathCounter` keeps the copy for repeated calls). See the
    module docstring for the method and its limits.
    """
    if not isinstance(masks, Masks):
        masks = Masks(masks)
    masks.check(model)
    return PathCounter(model).effective(masks, input_shape)


def effective_sparsity(model: nn.Module, masks: Masks, input_shape: Sequence[int]) -> float:
    """Fraction of the masked weights that are pruned *or* lie on no input-output path."""
    eff = effective_masks(model, masks, input_shape)
    return 1.0 - eff.num_kept / eff.num_total if eff.num_total else 0.0


def collapsed_layers(model: nn.Module, masks: Masks, input_shape: Sequence[int]) -> list[str]:
    """Names of masked parameters with no effective kept weight (layer collapse)."""
    eff = effective_masks(model, masks, input_shape)
    return [k for k, m in eff.items() if not bool(m.any())]
