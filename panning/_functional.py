"""Evaluate a module on substitute tensors without touching its own state.

The saliency indices score the *masked* network and must hand the model back exactly as they
found it. Rather than masking weights in place and undoing it afterwards (fragile under errors
and exact only up to rounding), every index builds fresh tensors -- masked weight leaves,
detached copies of the other parameters, cloned buffers -- and runs the model through
:func:`torch.func.functional_call`. The model's parameters, buffers, ``requires_grad`` flags and
``.grad`` fields are never written; the only state an index changes is train/eval mode, which
:func:`preserved_modes` restores module by module.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.overrides import TorchFunctionMode

__all__ = [
    "seeded",
    "architecture_key",
    "all_finite",
    "check",
    "deferred_checks",
    "device_routes",
    "flat_nonzero",
    "host_route",
    "one_read",
    "rows_finite",
    "stacked_tensors",
    "HOST_READS",
    "HostReads",
    "keep_bits",
    "as_numbers",
    "zero_pruned",
    "preserved_modes",
    "masked_weights",
    "other_tensors",
    "functional_forward",
    "batch_norm_modules",
    "forward_probe",
    "output_taps",
    "weight_grad_only_convs",
]


@contextmanager
def seeded(seed: int, device: torch.device | None = None) -> Iterator[None]:
    """Run the block with the CPU generator (and ``device``'s, when it is a GPU) seeded by ``seed``,
    restoring exactly those generators afterwards: the caller's random streams are left as they were.

    ``torch.manual_seed`` would reseed every CUDA generator while ``fork_rng`` restores only the ones
    it is given, leaving the others (a PPO policy's on the GPU, say) reseeded for good.
    """
    idx = None
    if device is not None and device.type == "cuda":
        idx = device.index if device.index is not None else torch.cuda.current_device()
    with torch.random.fork_rng(devices=[idx] if idx is not None else []):
        torch.random.default_generator.manual_seed(seed)
        if idx is not None:
            with torch.cuda.device(idx):
                torch.cuda.manual_seed(seed)
        yield


#: whether CPU tensors take the routes written for accelerators (:func:`device_routes`); per thread and context
_DEVICE_ROUTES: ContextVar[bool] = ContextVar("panning_device_routes", default=False)


@contextmanager
def device_routes(on: bool = True) -> Iterator[None]:
    """Within the block, CPU tensors take the routes written for accelerators (torch kernels instead of numpy,
    sorts instead of per-layer selections, no host read where a GPU would wait for one). Their results are the
    same; this lets a machine without a GPU test those routes and count their host reads
    (``benchmarks/host_syncs.py``). The switch holds for the calling thread (a context variable)."""
    token = _DEVICE_ROUTES.set(on)
    try:
        yield
    finally:
        _DEVICE_ROUTES.reset(token)


def host_route(t: Tensor) -> bool:
    """Whether ``t`` takes the CPU's routes: it is on the CPU, and :func:`device_routes` is not active."""
    return t.device.type == "cpu" and not _DEVICE_ROUTES.get()


def flat_nonzero(mask: Tensor, count: int | None = None) -> Tensor:
    """``mask.reshape(-1).nonzero().squeeze(1)``: the positions of the True entries of a boolean tensor, in order.
    On the CPU by numpy (4-5x faster than torch's nonzero for the masks of a small network); elsewhere torch's.

    ``count``, when the caller knows how many entries are True (a mask from an exact top-k), lets the accelerator
    route size its result without reading that number back (``torch.nonzero_static``). The count is checked
    (:func:`check`: within :func:`deferred_checks` at the block's end), and a wrong one pads with position 0,
    which indexes safely until the check refuses it (a -1 would trip a device-side assert on CUDA first)."""
    flat = mask.reshape(-1)
    if host_route(flat) and flat.dtype == torch.bool:
        return torch.from_numpy(np.flatnonzero(flat.numpy()))
    if count is not None and flat.device.type not in _NO_NONZERO_STATIC:
        try:
            pos = torch.nonzero_static(flat, size=count, fill_value=0).squeeze(1)
        except NotImplementedError:  # no kernel for this device: the reading route, remembered
            _NO_NONZERO_STATIC.add(flat.device.type)
        else:
            check(torch.count_nonzero(flat) == count,
                  lambda: RuntimeError(f"a mask's recorded kept count ({count}) is not what it holds: were its "
                                       "tensors written without a version bump (through .data or a NumPy view)?"))
            return pos
    return flat.nonzero().squeeze(1)


#: device types without a ``torch.nonzero_static`` kernel (found at the first call)
_NO_NONZERO_STATIC: set[str] = set()


#: the checks of the current :func:`deferred_checks` block: (0-d boolean flag, the error it raises when False);
#: per thread and context, so that threads stepping their own envs keep their own checks
_PENDING: ContextVar[list[tuple[Tensor, Callable[[], Exception]]] | None] = ContextVar("panning_pending_checks",
                                                                                        default=None)


def check(ok: Tensor, error: Callable[[], Exception]) -> None:
    """Raise ``error()`` unless the 0-d boolean ``ok`` is True. On the CPU at once; for a device tensor within
    :func:`deferred_checks`, at the end of that block or with the next :func:`read_together`, whichever comes
    first, so that a GPU step does not wait for the device once per check (``error`` may read the device to say
    what went wrong: it only runs when a check failed)."""
    pending = _PENDING.get()
    if pending is not None and not host_route(ok):
        pending.append((ok, error))
    elif not bool(ok):
        raise _made(error)


@contextmanager
def deferred_checks() -> Iterator[None]:
    """Collect the device-side :func:`check` flags of the block and read them back in one transfer at its end (or
    earlier, with the values of a :func:`read_together`), raising the first failed check's error in the order
    made. If the block raises, a failed earlier check is raised instead (what ran after it ran on values the
    check would have refused). Nested blocks join the outermost one.

    A deferred check fails after the work before the read that takes it (:func:`read_together`, or the block's
    end): on an accelerator, a step whose scores were not finite has pruned its network before it raises (its
    pruner moved, its episode did not count the step), so that episode is to be discarded, not stepped again."""
    if _PENDING.get() is not None:
        yield
        return
    pending: list[tuple[Tensor, Callable[[], Exception]]] = []
    token = _PENDING.set(pending)
    try:
        yield
    except Exception as exc:
        _PENDING.reset(token)
        failed = _first_failed(pending)
        if failed is not None:
            raise failed from exc
        raise
    except BaseException:  # an interrupt: no device read on the way out
        _PENDING.reset(token)
        raise
    _PENDING.reset(token)
    failed = _first_failed(pending)
    if failed is not None:
        raise failed


def read_together(values: Sequence[Tensor]) -> list[np.ndarray]:
    """Each of ``values`` as a flat float64 array, read back in one transfer together with the flags of the
    :func:`check` calls deferred so far in the current :func:`deferred_checks` block (on a GPU one wait for the
    device where there would be one per tensor and one for the checks). Those checks are done then: the first
    failed one raises here, before any value is returned, and the block's end does not read them again. When
    the tensors (or the checks' flags) are not all on one device, each is read on its own. float64 holds exactly
    every float32 value and every integer up to 2**53 (counts, positions). With no values nothing is read: the
    checks wait for the next read or the block's end."""
    if not values:
        return []
    pending = _PENDING.get() or []
    flags = [flag.reshape(1).double() for flag, _ in pending]
    flat = [v.detach().reshape(-1).double() for v in values] + flags
    sizes = [t.numel() for t in flat]
    if all(t.device == flat[0].device for t in flat):
        host = np.asarray(torch.cat(flat).tolist(), dtype=np.float64)
        parts = np.split(host, np.cumsum(sizes)[:-1])
    else:
        parts = [np.asarray(t.tolist(), dtype=np.float64) for t in flat]
    if pending:
        ok = np.concatenate(parts[len(values):]) != 0
        checks = list(pending)
        pending.clear()  # read now: the block's end has nothing left to read
        for good, (_, error) in zip(ok.tolist(), checks, strict=True):
            if not good:
                raise _made(error)
    return list(parts[: len(values)])


def _made(error: Callable[[], Exception]) -> Exception:
    exc = error()
    if not isinstance(exc, Exception):
        raise TypeError(f"a check's error callback returned {exc!r}, not an exception")
    return exc


def _first_failed(pending: list[tuple[Tensor, Callable[[], Exception]]]) -> Exception | None:
    if not pending:
        return None
    ok = one_read([flag.reshape(()).to(torch.bool) for flag, _ in pending]).tolist()
    for good, (_, error) in zip(ok, pending, strict=True):
        if not good:
            return _made(error)
    return None


def all_finite(t: Tensor) -> Tensor:
    """0-d boolean tensor: whether every entry of ``t`` is finite. On the CPU by numpy for float32/float64 (several
    times faster than ``torch.isfinite(t).all()`` there); elsewhere torch's, left on the device."""
    if host_route(t) and t.dtype in (torch.float32, torch.float64):
        return torch.tensor(bool(np.isfinite(t.detach().numpy()).all()))
    return torch.isfinite(t).all()


def rows_finite(t: Tensor) -> Tensor:
    """``[N]`` boolean tensor: whether every entry of ``t[i]`` is finite, for each ``i`` of ``t``'s first dimension. On
    the CPU by numpy for float32/float64 (about 10x faster than ``torch.isfinite(t).flatten(1).all(1)`` there on a
    stack of 16 digits-MLP layers); elsewhere torch's, left on the device."""
    if host_route(t) and t.dtype in (torch.float32, torch.float64):
        n = t.shape[0]
        return torch.from_numpy(np.isfinite(t.detach().numpy().reshape(n, t.numel() // n if n else 0)).all(1))
    return torch.isfinite(t).flatten(1).all(1)


def one_read(values: Sequence[Tensor]) -> Tensor:
    """0-d tensors stacked into one, on their device when they all share it, else on the CPU: reading the
    result back (``.tolist()``, ``bool(...)``) is one device-to-host transfer, not one per value, which on a
    GPU is one wait for the queued work instead of many."""
    same = all(v.device == values[0].device for v in values)
    return torch.stack(list(values) if same else [v.cpu() for v in values])


#: Tensor calls that copy a device value to the host; on a GPU each waits for the queued work.
HOST_READS = frozenset({
    torch.Tensor.item, torch.Tensor.__bool__, torch.Tensor.__float__, torch.Tensor.__int__, torch.Tensor.__index__,
    torch.Tensor.tolist, torch.Tensor.numpy, torch.Tensor.cpu, torch.Tensor.nonzero, torch.nonzero,
    torch.masked_select, torch.Tensor.masked_select, torch.unique,
})


class HostReads(TorchFunctionMode):
    """Counts the :data:`HOST_READS` calls made while it is active and :attr:`on`, by kind (``kinds``) and in
    all (``n``). The count is a property of the code, so it can be taken on the CPU; subclasses may override
    :meth:`record` to say where the reads are made (``benchmarks/host_syncs.py`` does)."""

    def __init__(self) -> None:
        super().__init__()
        self.n = 0
        self.kinds: dict[str, int] = {}
        self.on = True

    def record(self, func: object) -> None:
        """Called once per host read."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if self.on and (func in HOST_READS or _reads_inside(func, args, kwargs or {})):
            self.n += 1
            self.kinds[func.__name__] = self.kinds.get(func.__name__, 0) + 1
            self.record(func)
        return func(*args, **(kwargs or {}))


def _reads_inside(func: object, args: tuple, kwargs: dict) -> bool:
    """Calls that read the device inside their CUDA kernels to size their output: ``bincount`` (the largest
    value), ``repeat_interleave`` by a tensor without ``output_size``, and indexing by a boolean tensor (a
    ``nonzero`` inside)."""
    if func in (torch.bincount, torch.Tensor.bincount):
        return True
    if func in (torch.repeat_interleave, torch.Tensor.repeat_interleave):
        repeats = args[1] if len(args) > 1 else kwargs.get("repeats")
        return isinstance(repeats, Tensor) and repeats.numel() > 1 and kwargs.get("output_size") is None
    if func is torch.Tensor.__getitem__ and len(args) > 1:
        index = args[1] if isinstance(args[1], tuple) else (args[1],)
        return any(isinstance(i, Tensor) and i.dtype == torch.bool and i.dim() > 0 for i in index)
    return False


# Signed integer types of the same width as a float type, to AND its bit patterns with a mask.
_INT_OF_WIDTH = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def keep_bits(mask: Tensor, dtype: torch.dtype) -> Tensor | None:
    """``mask`` as an integer tensor of ``dtype``'s width: every bit set where kept, 0 where pruned.

    ANDing a float tensor's bits with it (:func:`zero_pruned`) zeroes pruned entries exactly, NaN and
    inf included, and leaves kept entries bit for bit; on CPU it costs as little as a multiply, where
    ``masked_fill`` or ``tensor * bool_mask`` take 6-12 times longer (LeNet-300-100's first layer:
    33 us vs 410 us for ``masked_fill_``, measured on the 2-core CPU machine). None for a
    dtype it cannot serve (non-float or complex); callers then fall back to ``masked_fill``.
    """
    if not dtype.is_floating_point:
        return None
    itype = _INT_OF_WIDTH.get(torch.empty((), dtype=dtype).element_size())
    if itype is None:
        return None
    return as_numbers(mask, itype).neg_()  # True -> 1 -> -1, i.e. all bits set


def as_numbers(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """A bool mask as 0/1 in ``dtype``. Through a uint8 view: on CPU a bool->float conversion
    is about 10x slower than uint8->float (375 vs 32 us for 235k entries, 2-core CPU machine)."""
    if mask.dtype == torch.bool:
        return mask.view(torch.uint8).to(dtype)
    return mask.to(dtype)


def zero_pruned(t: Tensor, bits: Tensor | None, mask: Tensor, *, inplace: bool = False) -> Tensor:
    """``t`` with its pruned entries set to exactly +0 (``bits`` from :func:`keep_bits` of ``mask``).

    ``inplace=True`` writes into ``t``'s storage outside autograd (for parameters and optimiser
    state, like ``p.data`` edits). Out of place, a tensor that requires grad goes through
    differentiable ``masked_fill``, as does any ``t`` that ``bits`` does not fit (None, other width
    or device).
    """
    if (bits is not None and bits.device == t.device and t.is_floating_point()
            and t.element_size() == bits.element_size()):
        if inplace:
            t.detach().view(bits.dtype).bitwise_and_(bits)
            return t
        if not t.requires_grad:
            return t.view(bits.dtype).bitwise_and(bits).view(t.dtype)
    pruned = ~mask.to(t.device)
    if inplace:
        with torch.no_grad():
            t.masked_fill_(pruned, 0)
        return t
    return t.masked_fill(pruned, 0)


@contextmanager
def preserved_modes(model: nn.Module) -> Iterator[None]:
    """Restore every submodule's ``training`` flag on exit, even after an error.

    Flags are restored per module (not with ``model.train(flag)``) so mixed states, e.g. a
    model that keeps its BatchNorm layers frozen in eval mode while training, come back intact.
    """
    flags = [(m, m.training) for m in model.modules()]
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


def masked_weights(
    model: nn.Module,
    masks: Mapping[str, Tensor],
    *,
    dtype: torch.dtype | None = None,
    absolute: bool = False,
) -> dict[str, Tensor]:
    """Fresh leaf tensors ``θ ⊙ m`` (optionally ``|θ ⊙ m|``, cast to ``dtype``) requiring grad.

    They share no storage with the model, so gradients taken with respect to them never reach
    the model's parameters or their ``.grad``.
    """
    params = dict(model.named_parameters())
    return {name: _masked(params[name].detach(), mask, dtype, absolute).requires_grad_(True)
            for name, mask in masks.items()}


def _masked(p: Tensor, mask: Tensor, dtype: torch.dtype | None, absolute: bool) -> Tensor:
    """``p ⊙ mask`` (optionally absolute, cast to ``dtype``), elementwise: one network's weights or a stack of them
    (:func:`stacked_tensors`), which then get the same bits."""
    w = p * as_numbers(mask.to(p.device), p.dtype)
    if absolute:
        w = w.abs()
    return w.to(dtype) if dtype is not None else w


def other_tensors(
    model: nn.Module,
    exclude: Sequence[str] | Mapping[str, Tensor],
    *,
    dtype: torch.dtype | None = None,
    absolute: bool = False,
) -> dict[str, Tensor]:
    """Detached non-masked parameters and *cloned* buffers, keyed by name.

    Buffers are cloned because train-mode BatchNorm updates its running statistics in place:
    the update then lands on the clone, not on the model. Only floating tensors are cast or
    made absolute (``num_batches_tracked`` stays an integer).
    """
    skip = set(exclude)
    out: dict[str, Tensor] = {}
    for name, p in model.named_parameters():
        if name in skip:
            continue
        out[name] = _convert(p.detach(), dtype, absolute, clone=False)
    for name, b in model.named_buffers():
        out[name] = _convert(b.detach(), dtype, absolute, clone=True)
    return out


def _convert(t: Tensor, dtype: torch.dtype | None, absolute: bool, clone: bool) -> Tensor:
    if t.is_floating_point():
        if absolute:
            t = t.abs()  # a new tensor: no clone needed
            clone = False
        if dtype is not None and t.dtype != dtype:
            t = t.to(dtype)
            clone = False
    return t.clone() if clone else t


def functional_forward(model: nn.Module, tensors: Mapping[str, Tensor], x: Tensor) -> Tensor:
    """``model(x)`` with the model's parameters and buffers replaced by ``tensors``."""
    return functional_call(model, dict(tensors), (x,), strict=False, tie_weights=True)


def batch_norm_modules(model: nn.Module, *, training_only: bool = True) -> dict[str, nn.Module]:
    """BatchNorm layers (any ``_BatchNorm`` subclass) by name; by default only those in train mode."""
    return {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and (m.training or not training_only)
    }


def forward_probe(
    model: nn.Module,
    tensors: Mapping[str, Tensor],
    x: Tensor,
    bn_names: Sequence[str] = (),
    linear_names: Sequence[str] = (),
) -> tuple[dict[str, Tensor], dict[str, list[tuple[int, ...]]]]:
    """One no-grad forward of the functional model on ``x``, observing some layers' inputs.

    Returns ``(stats, linear_inputs)``:

    - ``stats``: for each named BatchNorm layer, the batch mean and biased variance of its input
      as ``{"<bn>.running_mean": mean, "<bn>.running_var": var}``. In train mode these are exactly
      the statistics the layer normalises with, so passing them as buffers to an eval-mode call
      reproduces the train-mode forward sample by sample.
    - ``linear_inputs``: for each named module, the shape of its input at every call (a
      Linear layer called once on a 2-D input has one row per sample).
    """
    modules = dict(model.named_modules())
    stats: dict[str, Tensor] = {}
    calls: dict[str, list[tuple[int, ...]]] = {n: [] for n in linear_names}
    handles = []

    def bn_hook(name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            inp = args[0].detach()
            dims = [d for d in range(inp.dim()) if d != 1]
            stats[f"{name}.running_mean"] = inp.mean(dim=dims)
            stats[f"{name}.running_var"] = inp.var(dim=dims, unbiased=False)

        return hook

    def lin_hook(name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            calls[name].append(tuple(args[0].shape))

        return hook

    try:
        for name in bn_names:
            handles.append(modules[name].register_forward_pre_hook(bn_hook(name)))
        for name in linear_names:
            handles.append(modules[name].register_forward_pre_hook(lin_hook(name)))
        with torch.no_grad():
            functional_forward(model, tensors, x)
    finally:
        for h in handles:
            h.remove()
    return stats, calls


@contextmanager
def output_taps(model: nn.Module, names: Sequence[str]) -> Iterator[dict]:
    """Forward hooks that, while ``tap["eps"]`` is set (a dict), record each named module's input in
    ``tap["inputs"]`` (and its output in ``tap["outputs"]`` when that is a dict) and add
    ``tap["eps"][name]``, if present, to its output.

    Differentiating the loss with respect to a zero ``eps`` gives the gradient with respect to
    the module's output; together with the recorded input this yields per-sample weight
    gradients of a Linear layer (``δ_i a_iᵀ``) without materialising them. Hooks are removed on
    exit, even after an error.
    """
    tap: dict = {"eps": None, "inputs": None, "outputs": None}
    modules = dict(model.named_modules())

    def hook_for(name: str):
        def hook(module: nn.Module, args: tuple, output: Tensor) -> Tensor | None:
            if tap["eps"] is None:
                return None
            tap["inputs"][name] = args[0]
            if tap["outputs"] is not None:
                tap["outputs"][name] = output
            eps = tap["eps"].get(name)
            return None if eps is None else output + eps

        return hook

    handles = []
    try:
        for name in names:
            handles.append(modules[name].register_forward_hook(hook_for(name)))
        yield tap
    finally:
        for h in handles:
            h.remove()


# --------------------------------------------------------------------------- double backward of first convolutions

_CONVS = {torch.conv1d: 1, torch.conv2d: 2, torch.conv3d: 3}
_CONV_OF_DIM = {n: f for f, n in _CONVS.items()}


def _tuple(v: int | Sequence[int], n: int) -> list[int] | None:
    """``v`` as ``n`` ints (one int or a one-entry sequence stands for all, as PyTorch reads them); None if not."""
    vals = [v] if isinstance(v, int) else list(v)
    if len(vals) == 1:
        vals = vals * n
    return [int(i) for i in vals] if len(vals) == n else None


class _WeightGrad(torch.autograd.Function):
    """``∂L/∂W`` of a convolution from its output gradient ``gO``, differentiable in ``gO`` only."""

    @staticmethod
    def forward(ctx, g_out: Tensor, x: Tensor, w: Tensor, params: tuple) -> Tensor:
        stride, padding, dilation, groups = params
        ctx.save_for_backward(x)
        ctx.params = params
        n = len(stride)
        return torch.ops.aten.convolution_backward(
            g_out, x, w, None, stride, padding, dilation, False, [0] * n, groups, [False, True, False])[1]

    @staticmethod
    def backward(ctx, gg_w: Tensor) -> tuple[Tensor, None, None, None]:
        (x,) = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.params
        conv = _CONV_OF_DIM[len(stride)]
        if gg_w.is_cuda:  # PyTorch's own double backward makes it contiguous there (cuDNN picks its layout by it)
            gg_w = gg_w.contiguous()
        # the same term PyTorch's own double backward computes for gO (its input-gradient term is the waste)
        return conv(x, gg_w, None, stride, padding, dilation, groups), None, None, None


class _InputFreeConv(torch.autograd.Function):
    """A convolution whose input needs no gradient: backward gives ``∂L/∂W`` through :class:`_WeightGrad`."""

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, bias: Tensor | None, params: tuple) -> Tensor:
        stride, padding, dilation, groups = params
        ctx.save_for_backward(x, w)
        ctx.params = params
        conv = _CONV_OF_DIM[len(stride)]
        return conv(x, w, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, g_out: Tensor) -> tuple[None, Tensor, None, None]:
        x, w = ctx.saved_tensors
        return None, _WeightGrad.apply(g_out, x, w, ctx.params), None, None


class _WeightGradOnlyConvs(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        n = _CONVS.get(func)
        if n is not None and torch.is_grad_enabled() and not torch._C._are_functorch_transforms_active():
            names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
            a = dict(zip(names, args, strict=False)) | kwargs
            x, w, bias = a.get("input"), a.get("weight"), a.get("bias")
            padding = a.get("padding", 0)
            if (type(x) is Tensor and type(w) is Tensor and x.dim() == n + 2 and not x.requires_grad
                    and w.requires_grad and (bias is None or not bias.requires_grad)
                    and not isinstance(padding, str) and not torch.is_autocast_enabled(x.device.type)):
                stride, pad, dilation = (_tuple(a.get("stride", 1), n), _tuple(padding, n),
                                         _tuple(a.get("dilation", 1), n))
                if stride is not None and pad is not None and dilation is not None:
                    return _InputFreeConv.apply(x, w, bias, (stride, pad, dilation, int(a.get("groups", 1))))
        return func(*args, **kwargs)


@contextmanager
def weight_grad_only_convs() -> Iterator[None]:
    """Record convolutions whose input needs no gradient (a network's first layer) so that a second
    backward through their weight gradient skips the input gradient.

    PyTorch's double backward of a convolution computes a transposed convolution for the gradient of
    the layer's input even when that input is data (LeNet-5-Caffe, batch 100: 12.7 ms of an 88 ms
    GraSP Hessian-gradient pass on the 2-core CPU machine). Inside this context such a convolution
    runs the same kernels for its output, weight gradient and the output-gradient term of the second
    backward, so every number is bit for bit what the plain graph gives (tested), without the unused
    term. Everything else runs as usual, as do convolutions with string padding, unbatched inputs, tensor
    subclasses, under autocast or inside torch.func transforms.
    """
    with _WeightGradOnlyConvs():
        yield


def architecture_key(name: str, model: nn.Module, masks: Mapping[str, Tensor],
                     batches: Sequence[tuple[Tensor, Tensor]] | None, input_shape: Sequence[int] | None) -> tuple:
    """What decides whether a stacked computation named ``name`` matches one network's bit for bit: the
    device, the module types, the state's names, shapes and dtypes, the masked keys and the batch shapes."""
    state = tuple((k, type(v).__name__, tuple(v.shape), str(v.dtype)) for k, v in model.state_dict().items())
    mods = tuple(type(m).__name__ for m in model.modules())
    shapes = tuple((tuple(x.shape), tuple(y.shape)) for x, y in batches or ())
    device = str(next(model.parameters(), torch.empty(0)).device)
    return name, device, mods, state, tuple(masks), shapes, tuple(input_shape or ())


def stacked_tensors(models: Sequence[nn.Module], masks: Sequence[Mapping[str, Tensor]], dtype: torch.dtype | None,
                    absolute: bool) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """(stacked ``θ ⊙ m`` of the masked weights, stacked other parameters and cloned buffers) of networks of one
    architecture, along a new leading axis: what :func:`masked_weights` and :func:`other_tensors` make for each
    (detached: the stacks are the leaves of a stacked computation)."""
    keys = list(masks[0])
    # stacked first, then masked and converted: the same elementwise operations as each network's own
    # (so the same bits), a few on [N, ...] instead of several per network
    params = [dict(m.named_parameters()) for m in models]
    w_stack = {}
    for k in keys:
        p = torch.stack([ps[k].detach() for ps in params])
        w_stack[k] = _masked(p, torch.stack([mk[k].to(p.device) for mk in masks]), dtype, absolute)
    skip = set(keys)
    rest: dict[str, Tensor] = {}
    for name, _ in models[0].named_parameters():
        if name not in skip:  # stacking copies: nothing to clone
            rest[name] = _convert(torch.stack([ps[name].detach() for ps in params]), dtype, absolute, clone=False)
    buffers = [dict(m.named_buffers()) for m in models]
    for name in buffers[0]:
        rest[name] = _convert(torch.stack([b[name].detach() for b in buffers]), dtype, absolute, clone=False)
    return w_stack, rest
