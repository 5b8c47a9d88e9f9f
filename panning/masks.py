"""Validated pruning masks: which weights are prunable, top-k selection, enforcement and export.

A :class:`Masks` maps a parameter *name* (``"features.0.weight"``) to a boolean tensor of the
parameter's shape; ``True`` means kept. Only weights of ``Conv1d/2d/3d`` and ``Linear`` modules are
prunable (biases and normalisation layers stay dense), see :func:`prunable_parameters`.

``sparsity`` is always the fraction of prunable weights *removed*; ``density = 1 - sparsity``.
"""
from __future__ import annotations

import fnmatch
import math
import operator
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.utils import prune

from panning._functional import all_finite, check, flat_nonzero, host_route, keep_bits, one_read, zero_pruned
from panning.errors import ConfigError, MaskError

__all__ = [
    "MaskError",
    "MaskHandle",
    "Masks",
    "enforce",
    "enforce_tensors",
    "from_torch_prune",
    "keep_count",
    "order_statistics",
    "order_statistics_np",
    "prunable_parameters",
    "select_topk",
    "to_torch_prune",
]

PRUNABLE_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
_FORMAT = "panning.masks"
_FORMAT_VERSION = 1


# --------------------------------------------------------------------------------------------
# which weights are prunable


def _excluded(module_name: str, param_name: str, patterns: list[str]) -> bool:
    return any(
        module_name == p or param_name == p or fnmatch.fnmatchcase(module_name, p) or fnmatch.fnmatchcase(param_name, p)
        for p in patterns
    )


def _prunable_with_modules(model: nn.Module, exclude: Iterable[str] = ()) -> dict[str, tuple[nn.Module, nn.Parameter]]:
    """{key: (owning module, parameter)}; see :func:`prunable_parameters`."""
    if isinstance(exclude, str):  # a bare string would be iterated character by character
        exclude = [exclude]
    patterns = list(exclude)
    modules = dict(model.named_modules())
    out: dict[str, tuple[nn.Module, nn.Parameter]] = {}
    matched: set[str] = set()
    for name, param in model.named_parameters():
        mod_name, _, leaf = name.rpartition(".")
        module = modules.get(mod_name)
        # "weight_orig": a module already pruned with torch.nn.utils.prune keeps its key "x.weight"
        if not isinstance(module, PRUNABLE_TYPES) or leaf not in ("weight", "weight_orig"):
            continue
        if leaf == "weight_orig" and "weight_mask" not in dict(module.named_buffers(recurse=False)):
            continue
        key = f"{mod_name}.weight" if mod_name else "weight"
        if _excluded(mod_name, key, patterns):
            matched.update(p for p in patterns if _excluded(mod_name, key, [p]))
            continue
        out[key] = (module, param)
    unmatched = [p for p in patterns if p not in matched]
    if unmatched:
        warnings.warn(f"exclude entries matched no prunable layer: {unmatched}", UserWarning, stacklevel=3)
    if not out:
        raise MaskError(
            f"{type(model).__name__} has no prunable parameters (weights of Conv1d/2d/3d or Linear modules"
            + (f" not excluded by {patterns})" if patterns else ")")
        )
    return out


def prunable_parameters(model: nn.Module, exclude: Iterable[str] = ()) -> dict[str, nn.Parameter]:
    """Weights of Conv1d/2d/3d and Linear modules (subclasses too), keyed by full parameter name.

    Order follows ``model.named_parameters()`` (shared parameters appear once). ``exclude`` holds
    module names (``"fc3"``), parameter names (``"fc3.weight"``) or fnmatch patterns
    (``"classifier.*"``); matching layers stay dense. For a module already pruned with
    ``torch.nn.utils.prune`` the key stays ``"<module>.weight"`` and the value is ``weight_orig``.
    Raises :class:`MaskError` if nothing is prunable.
    """
    return {k: p for k, (_, p) in _prunable_with_modules(model, exclude).items()}


def keep_count(total: int, sparsity: float) -> int:
    """Number of weights kept at ``sparsity``: ``round((1 - sparsity) * total)``; needs 0 <= s < 1."""
    if isinstance(total, bool) or int(total) != total or total < 0:
        raise ValueError(f"total must be a non-negative integer, got {total!r}")
    s = float(sparsity)
    if not (0.0 <= s < 1.0):  # also rejects NaN
        raise ConfigError(f"sparsity must be in [0, 1), got {sparsity!r}")
    return int(round((1.0 - s) * int(total)))


# --------------------------------------------------------------------------------------------
# Masks


def _as_bool(key: str, value: Any) -> Tensor:
    if not isinstance(value, Tensor):
        try:
            value = torch.as_tensor(value)
        except (TypeError, ValueError, RuntimeError) as e:
            raise MaskError(f"mask {key!r} is not a tensor ({type(value).__name__})") from e
    value = value.detach()
    if value.dtype == torch.bool:
        return value.clone()
    if value.is_complex() or not bool(((value == 0) | (value == 1)).all()):
        bad = value[(value != 0) & (value != 1)]
        example = bad.reshape(-1)[:3].tolist() if bad.numel() else []
        raise MaskError(f"mask {key!r} is not binary: found values such as {example} (only 0/1 or bool allowed)")
    return value != 0


class Masks(Mapping[str, Tensor]):
    """Validated ``{param name: bool tensor}``; ``True`` = weight kept.

    Construct from a mapping of bool or 0/1 tensors (copied; non-binary values raise
    :class:`MaskError`). Behaves as a read-only mapping in the given key order.
    """

    __slots__ = ("_data", "_counts", "_total")
    _total: tuple[tuple | None, int]  # (the tensors' state, their kept count) recorded by their maker

    def __init__(self, masks: Mapping[str, Any]) -> None:
        if isinstance(masks, Masks):
            data = {k: v.clone() for k, v in masks.items()}
        else:
            if not isinstance(masks, Mapping):
                raise MaskError(f"Masks needs a mapping name -> tensor, got {type(masks).__name__}")
            data = {}
            for k, v in masks.items():
                if not isinstance(k, str):
                    raise MaskError(f"mask keys must be parameter names (str), got {k!r}")
                data[k] = _as_bool(k, v)
        if not data:
            raise MaskError("Masks needs at least one entry")
        self._data: dict[str, Tensor] = data

    @classmethod
    def _trusted(cls, data: dict[str, Tensor], kept: int | None = None) -> Masks:
        # internal fast path: tensors already bool and freshly allocated; ``kept``: how many are True, when the
        # maker knows it exactly (an exact top-k), so that counting them never has to read the device
        obj = cls.__new__(cls)
        if not data:
            raise MaskError("Masks needs at least one entry")
        obj._data = data
        if kept is not None:
            obj._total = (obj._state(), kept)
        return obj

    @classmethod
    def ones(cls, model: nn.Module, exclude: Iterable[str] = ()) -> Masks:
        """All-kept masks for every prunable weight of ``model`` (on the weights' devices)."""
        data = {k: torch.ones(p.shape, dtype=torch.bool, device=p.device)
                for k, p in prunable_parameters(model, exclude).items()}
        obj = cls._trusted(data)
        obj._counts = (obj._state(), [t.numel() for t in data.values()])  # every weight kept: nothing to count
        return obj

    # Mapping protocol
    def __getitem__(self, key: str) -> Tensor:
        return self._data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __eq__(self, other: object) -> bool:
        # Mapping.__eq__ would compare tensors with ==, which is ambiguous
        if isinstance(other, Mapping):
            try:
                return self.equal(other)
            except MaskError:
                return False
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Masks({len(self)} tensors, kept {self.num_kept}/{self.num_total}, sparsity {self.sparsity:.4f})"

    # statistics
    def layer_counts(self) -> list[int]:
        """Kept weights per tensor, in key order.

        Counted once per state of the tensors: an episode step asks for them a dozen times (densities,
        kept counts, the observation) and on a GPU each count is a wait for the device. The cache is
        keyed by the tensors' identities and version counters, which every in-place change bumps (edits
        through ``.data`` or a NumPy view bypass them; the tensors are the Masks' own copies, not to be
        edited); a copy's tensors are new ones, so it counts again. Inference tensors have no version
        counter and are counted every time.
        """
        cached = self._cached_counts()
        if cached is not None:
            return list(cached)
        counts = one_read([torch.count_nonzero(t) for t in self._data.values()]).tolist()
        self._counts = (self._state(), counts)
        return list(counts)

    def _cached_counts(self) -> list[int] | None:
        """The layer counts if they are cached and the tensors unchanged since, else None."""
        key = self._state()
        cached = getattr(self, "_counts", None)
        return cached[1] if key is not None and cached is not None and cached[0] == key else None

    def _counted(self) -> bool:
        """Whether :meth:`layer_counts` would read nothing (counted already, tensors unchanged since)."""
        return self._cached_counts() is not None

    def _state(self) -> tuple | None:
        """The tensors' identities and version counters (None for inference tensors, which have none)."""
        try:
            return tuple((id(t), t._version) for t in self._data.values())
        except RuntimeError:  # inference-mode tensors
            return None

    def known_kept(self) -> int | None:
        """The number of kept weights if it is known without counting them (counted already, or recorded by
        the exact top-k that made these masks, and the tensors unchanged since), else None."""
        cached = self._cached_counts()
        if cached is not None:
            return int(sum(cached))
        key = self._state()
        total = getattr(self, "_total", None)
        return int(total[1]) if key is not None and total is not None and total[0] == key else None

    @property
    def num_kept(self) -> int:
        """Number of kept (True) weights."""
        known = self.known_kept()
        return known if known is not None else int(sum(self.layer_counts()))

    @property
    def num_total(self) -> int:
        """Number of weights covered by the masks."""
        return int(sum(m.numel() for m in self._data.values()))

    @property
    def density(self) -> float:
        """Fraction of covered weights kept."""
        total = self.num_total
        return self.num_kept / total if total else 1.0

    @property
    def sparsity(self) -> float:
        """Fraction of covered weights removed (``1 - density``)."""
        return 1.0 - self.density

    def layer_density(self) -> dict[str, float]:
        """Kept fraction per tensor."""
        return {k: (c / m.numel() if m.numel() else 1.0)
                for (k, m), c in zip(self._data.items(), self.layer_counts(), strict=True)}

    def report(self) -> str:
        """Plain-text table: name, shape, kept/total, density per tensor, then the total."""
        rows = [(k, "x".join(map(str, m.shape)) or "scalar", c, m.numel())
                for (k, m), c in zip(self._data.items(), self.layer_counts(), strict=True)]
        w_name = max(len("layer"), max(len(r[0]) for r in rows), len("total"))
        w_shape = max(len("shape"), max(len(r[1]) for r in rows))
        w_num = max(len(f"{r[2]}/{r[3]}") for r in rows + [("", "", self.num_kept, self.num_total)])
        w_num = max(w_num, len("kept/total"))
        lines = [f"{'layer':<{w_name}}  {'shape':<{w_shape}}  {'kept/total':>{w_num}}  density"]
        for name, shape, kept, total in rows:
            d = kept / total if total else 1.0
            lines.append(f"{name:<{w_name}}  {shape:<{w_shape}}  {f'{kept}/{total}':>{w_num}}  {d:7.4f}")
        lines.append(
            f"{'total':<{w_name}}  {'':<{w_shape}}  {f'{self.num_kept}/{self.num_total}':>{w_num}}  {self.density:7.4f}"
            f"  (sparsity {self.sparsity:.4f})"
        )
        return "\n".join(lines)

    # validation against a model
    def check(self, model: nn.Module, exclude: Iterable[str] | None = None) -> None:
        """Raise :class:`MaskError` unless the masks fit ``model``.

        Every key must name a prunable weight of ``model`` (Conv/Linear weight) with the same shape.
        With ``exclude=None`` a subset of the prunable weights is fine (excluded layers stay dense);
        with ``exclude`` given (``()`` included) the keys must be exactly
        ``prunable_parameters(model, exclude)``, so missing keys raise too.
        """
        try:
            params = prunable_parameters(model)
        except MaskError as e:
            raise MaskError(f"masks cannot fit this model: {e}") from None
        extra = [k for k in self._data if k not in params]
        if extra:
            all_names = {n for n, _ in model.named_parameters()}
            not_params = [k for k in extra if k not in all_names]
            not_prunable = [k for k in extra if k in all_names]
            parts = []
            if not_params:
                parts.append(f"not parameters of the model: {not_params}")
            if not_prunable:
                parts.append(f"not prunable (Conv/Linear weight) parameters: {not_prunable}")
            raise MaskError("masks have extra keys " + "; ".join(parts))
        for k, m in self._data.items():
            if tuple(m.shape) != tuple(params[k].shape):
                raise MaskError(f"mask {k!r} has shape {tuple(m.shape)} "
                                f"but the parameter has shape {tuple(params[k].shape)}")
        if exclude is not None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                expected = prunable_parameters(model, exclude)
            missing = [k for k in expected if k not in self._data]
            if missing:
                raise MaskError(f"masks are missing keys for prunable parameters: {missing}")
            excluded_present = [k for k in self._data if k not in expected]
            if excluded_present:
                raise MaskError(f"masks have keys for excluded parameters: {excluded_present}")

    # persistence and devices
    def save(self, path: str | Path) -> None:
        """``torch.save`` a tagged dict of CPU bool tensors (load with :meth:`load`)."""
        payload = {"format": _FORMAT, "version": _FORMAT_VERSION, "masks": {k: v.cpu() for k, v in self._data.items()}}
        torch.save(payload, Path(path))

    @classmethod
    def load(cls, path: str | Path, map_location: str | torch.device | None = "cpu") -> Masks:
        """Load masks written by :meth:`save` (``weights_only=True``: no code runs on load)."""
        try:
            payload = torch.load(Path(path), map_location=map_location, weights_only=True)
        except FileNotFoundError:
            raise
        except Exception as e:  # pickle errors, foreign objects refused by weights_only
            raise MaskError(f"{path} is not a panning masks file: {e}") from e
        if not isinstance(payload, dict) or payload.get("format") != _FORMAT or "masks" not in payload:
            raise MaskError(f"{path} is not a panning masks file (format tag {_FORMAT!r} missing)")
        if payload.get("version", 0) > _FORMAT_VERSION:
            raise MaskError(f"{path} was written by a newer panning (masks format {payload.get('version')})")
        return cls(payload["masks"])

    def to(self, device: str | torch.device) -> Masks:
        """Copy on ``device`` (no copy of tensors already there)."""
        out = Masks._trusted({k: v.to(device) for k, v in self._data.items()}, kept=self.known_kept())
        counts = self._cached_counts()
        if counts is not None:  # the same bits: the counts carry over
            out._counts = (out._state(), list(counts))
        return out

    def cpu(self) -> Masks:
        """Copy on the CPU."""
        return self.to("cpu")

    def equal(self, other: Mapping[str, Tensor]) -> bool:
        """Same key set and identical kept/pruned pattern everywhere (device and key order ignored)."""
        if not isinstance(other, Masks):
            other = Masks(other)
        if set(self._data) != set(other):
            return False
        return all(
            self._data[k].shape == other[k].shape and torch.equal(self._data[k].cpu(), other[k].cpu())
            for k in self._data
        )

    def apply_(self, model: nn.Module) -> nn.Module:
        """Zero the pruned weights of ``model`` in place (after :meth:`check`); returns the model."""
        self.check(model)
        params = prunable_parameters(model)
        with torch.no_grad():
            for k, m in self._data.items():
                p = params[k]
                m = m.to(p.device)
                zero_pruned(p, keep_bits(m, p.dtype), m, inplace=True)
        return model


def check_sparsity(model: nn.Module, sparsity: float, exclude: Iterable[str] = ()) -> None:
    """Refuse a sparsity that keeps fewer weights than ``model`` has prunable layers: some layer would
    be emptied, so no input-output path could survive. The message gives the largest sparsity that
    still keeps one weight per layer (keeping that many does not by itself guarantee a path)."""
    layers = Masks.ones(model, exclude=list(exclude))
    check_keep(len(layers), layers.num_total, sparsity)


def check_keep(n: int, total: int, sparsity: float) -> None:
    """Refuse a sparsity that keeps fewer of ``total`` weights than the ``n`` prunable layers (see
    :func:`check_sparsity`)."""
    kept = keep_count(total, sparsity)
    if kept < n:
        raise ConfigError(f"sparsity {sparsity} keeps {kept} of {total} prunable weights, fewer than the {n} "
                          f"prunable layers: no input-output path can survive; the largest sparsity that keeps "
                          f"one weight per layer is {largest_sparsity(total, n):.6f}")


def largest_sparsity(total: int, keep: int, decimals: int = 6) -> float:
    """The largest sparsity with ``decimals`` decimals that keeps at least ``keep`` of ``total`` weights
    (:func:`panning.masks.keep_count` rounds, so it lies a little above ``1 - keep / total``)."""
    step = 10 ** -decimals
    s = math.floor((1 - (keep - 0.5) / total) / step) * step
    while s > 0 and keep_count(total, round(s, decimals)) < keep:
        s -= step
    while s + step < 1 and keep_count(total, round(s + step, decimals)) >= keep:
        s += step
    return round(max(s, 0.0), decimals)


# --------------------------------------------------------------------------------------------
# top-k selection


def count_all(masks: Sequence[Masks]) -> None:
    """Count the kept weights of every layer of every one of ``masks`` in one host read (on a GPU one wait for
    the device, not one per Masks), so that their ``layer_counts``, ``num_kept`` and ``layer_density`` read
    nothing after; masks counted already are skipped."""
    todo, counts = counts_begin(masks)
    if counts is not None:
        counts_end(todo, one_read(counts).tolist())


def counts_begin(masks: Sequence[Masks]) -> tuple[list[Masks], list[Tensor] | None]:
    """The device half of :func:`count_all`: the masks not counted yet and their layers' counts (0-d tensors,
    nothing read), for the caller to read back with other values and hand to :func:`counts_end`. If the
    layers lie on more than one device, every one of the masks is counted here, a layer at a time (then ``None``)."""
    todo = [m for m in masks if not m._counted()]
    if not todo:
        return [], None
    counts = [torch.count_nonzero(t) for m in todo for t in m.values()]
    if any(c.device != counts[0].device for c in counts):
        for m in todo:
            m.layer_counts()
        return [], None
    return todo, counts


def counts_end(todo: Sequence[Masks], values: Sequence[float]) -> None:
    """Record the layer counts :func:`counts_begin` queued (``values`` in its order, as numbers)."""
    at = 0
    for m in todo:
        m._counts = (m._state(), [int(v) for v in values[at : at + len(m)]])
        at += len(m)


def _alive_positions(current: Masks, keys: list[str], device: torch.device) -> list[Tensor]:
    """Per key, the flat positions of the kept weights (``m.reshape(-1).nonzero()``), found with one
    ``nonzero`` over all layers: on a GPU each ``nonzero`` waits for the device, so one per layer adds up."""
    parts = [current[k].reshape(-1).to(device) for k in keys]
    # the layers' counts first: usually known (counted with the step that made the masks), they size the
    # positions, so that nonzero needs no read of its own
    counts = dict(zip(current, current.layer_counts(), strict=True))
    if len(parts) == 1:
        return [flat_nonzero(parts[0], count=counts[keys[0]])]
    flat = flat_nonzero(torch.cat(parts), count=sum(counts.values()))
    out, lo, start = [], 0, 0
    for k, p in zip(keys, parts, strict=True):
        c = counts[k]
        out.append(flat[lo : lo + c] - start)
        lo, start = lo + c, start + p.numel()
    return out


def order_statistics(values: Tensor, ranks: Sequence[int]) -> list[Tensor]:
    """The ``r``-th smallest entry (0-based) of the 1-D ``values`` for each ``r`` in ``ranks``, as 0-d tensors.

    On the CPU, for float32/float64, one single-rank ``numpy.partition`` per distinct rank, largest first, each
    on the part below the previous one (numpy selects a single rank with SIMD code where the CPU has it: on an
    AVX-512 machine 2.5-6x faster than ``torch.topk``/``torch.kthvalue`` at 15 000-50 000 float64 values, and
    several times faster than numpy's own several-rank partition);
    elsewhere ``torch.kthvalue``, which stays on the device. Order statistics are exact, so every route gives
    the same values (NaN counts as the largest, as in torch).
    """
    n = values.numel()
    if any(not 0 <= r < n for r in ranks):
        raise ValueError(f"ranks must lie in [0, {n}) for {n} values, got {list(ranks)}")
    if not ranks:
        return []
    if not host_route(values) or values.dtype not in (torch.float32, torch.float64):
        return [torch.kthvalue(values.reshape(-1), r + 1).values for r in ranks]
    picked = order_statistics_np(values.detach().reshape(-1).numpy(), ranks)
    return list(torch.from_numpy(picked).unbind(0))


def order_statistics_np(values: np.ndarray, ranks: Sequence[int]) -> np.ndarray:
    """:func:`order_statistics` of a 1-D numpy array, as an array (ranks assumed in range): one single-rank
    partition per distinct rank, largest first, each on the part below the previous one."""
    arr = values.copy()
    picked = {}
    hi = arr.size
    for r in sorted(set(ranks), reverse=True):
        # after partitioning at r, arr[:r] holds the r smallest: every lower rank is found there
        part = arr[:hi]
        part.partition(r)
        picked[r] = arr[r]
        hi = r
    return np.array([picked[r] for r in ranks], dtype=values.dtype)


def _topk_mask(flat: Tensor, k: int) -> Tensor:
    """Boolean mask of the ``k`` largest entries; ties go to the lowest index.

    Same result as taking the first ``k`` of ``torch.sort(flat, descending=True, stable=True)``,
    but via the k-th largest value and a cumulative count of ties: O(n) and ~6x faster than a
    full sort on 15M weights.
    """
    n = flat.numel()
    if k <= 0:
        return torch.zeros(n, dtype=torch.bool, device=flat.device)
    if k >= n:
        return torch.ones(n, dtype=torch.bool, device=flat.device)
    if not host_route(flat):
        return _topk_mask_on_device(flat, k)
    if flat.dtype in (torch.float32, torch.float64):
        threshold = order_statistics(flat, [n - k])[0]  # the k-th largest, by one linear-time selection
    else:
        threshold = torch.topk(flat, k, sorted=False).values.min()
    chosen = flat > threshold
    need = k - int(torch.count_nonzero(chosen))
    ties = flat == threshold
    if int(torch.count_nonzero(ties)) == need:
        return chosen | ties
    chosen[ties.nonzero().reshape(-1)[:need]] = True
    return chosen


def _topk_mask_on_device(flat: Tensor, k: int) -> Tensor:
    """:func:`_topk_mask` for 0 < k < n without reading a count back to the host (on a GPU each such read
    waits for the device): the first ``need`` ties by position, through a cumulative count. On the CPU the
    reads cost nothing and the cumulative pass would, so :func:`_topk_mask` keeps its own route there."""
    threshold = torch.topk(flat, k, sorted=False).values.min()
    chosen = flat > threshold
    ties = flat == threshold
    return chosen | (ties & (ties.cumsum(0) <= k - chosen.sum()))


def _apportion(keep: int, weights: list[int], lower: list[int], upper: list[int]) -> list[int]:
    """Integer quotas summing to ``keep``, proportional to ``weights``, within [lower, upper].

    Water-filling: the real shares are ``clamp(t * w_l, lower_l, upper_l)`` with ``t`` found by
    bisection so that they sum to ``keep`` (``t = keep / sum(w)`` when no bound binds); then floors
    plus one for the largest remainders (earlier layer first on ties).
    Needs sum(lower) <= keep <= sum(upper).
    """
    n = len(weights)

    def shares(t: float) -> list[float]:
        return [min(float(upper[i]), max(float(lower[i]), t * weights[i])) for i in range(n)]

    lo, hi = 0.0, 1.0
    while sum(shares(hi)) < keep and hi < 1e300:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if sum(shares(mid)) < keep:
            lo = mid
        else:
            hi = mid
    ideal = shares(hi)
    if sum(weights) and all(lower[i] <= keep * weights[i] / sum(weights) <= upper[i] for i in range(n)):
        ideal = [keep * w / sum(weights) for w in weights]  # exact when no bound binds
    quota = [min(upper[i], max(lower[i], math.floor(ideal[i]))) for i in range(n)]
    order = sorted(range(n), key=lambda i: (-(ideal[i] - math.floor(ideal[i])), i))
    left = keep - sum(quota)
    # one pass normally settles it; the loops only absorb floating-point slack
    while left > 0:
        step = [i for i in order if quota[i] < upper[i]][:left]
        if not step:
            raise AssertionError("apportion: keep exceeds the upper bounds")  # excluded by the caller
        for i in step:
            quota[i] += 1
        left -= len(step)
    while left < 0:
        step = [i for i in reversed(order) if quota[i] > lower[i]][:-left]
        if not step:
            raise AssertionError("apportion: keep below the lower bounds")  # excluded by the caller
        for i in step:
            quota[i] -= 1
        left += len(step)
    return quota


def select_topk(
    scores: Mapping[str, Tensor],
    keep: int,
    *,
    current: Masks | None = None,
    mode: str = "global",
    min_per_layer: int = 0,
) -> Masks:
    """Keep exactly ``keep`` weights with the highest scores, among weights alive in ``current``.

    Ties are broken deterministically as a stable descending sort over the concatenation of the
    flattened scores in key order would: earlier key, then lower flat index, wins. Weights pruned in
    ``current`` are never selected again, so repeated calls give monotone (nested) masks.

    ``mode="global"`` ranks all weights together; ``mode="layerwise"`` gives each layer
    ``round(keep * n_l / N)`` weights (largest-remainder rounding so the total is exactly ``keep``;
    a layer's share is capped at its alive count and the excess goes to the other layers).
    ``min_per_layer`` guarantees every layer at least ``min(min_per_layer, alive in layer)`` weights
    (taken first, by score, within each layer; the rest is then filled by ``mode``).

    Raises ValueError (:class:`MaskError` for key/shape problems) if an alive weight's score is
    NaN/inf, ``keep`` is negative or above the alive count, or the guarantees exceed ``keep``.
    """
    if mode not in ("global", "layerwise"):
        raise ConfigError(f"mode must be 'global' or 'layerwise', got {mode!r}")
    try:
        if isinstance(keep, bool):
            raise TypeError
        keep = operator.index(keep)
    except TypeError:
        raise ValueError(f"keep must be an integer, got {keep!r}") from None
    if isinstance(min_per_layer, bool) or int(min_per_layer) != min_per_layer or min_per_layer < 0:
        raise ConfigError(f"min_per_layer must be a non-negative integer, got {min_per_layer!r}")
    min_per_layer = int(min_per_layer)
    if not isinstance(scores, Mapping) or not scores:
        raise ValueError("scores must be a non-empty mapping name -> tensor")
    keys = list(scores)
    for k in keys:
        if not isinstance(scores[k], Tensor):
            raise ValueError(f"score {k!r} is not a tensor ({type(scores[k]).__name__})")
        if scores[k].is_complex():
            raise ValueError(f"score {k!r} is complex")
    device = scores[keys[0]].device
    if current is not None:
        if not isinstance(current, Masks):
            current = Masks(current)
        if set(current) != set(keys):
            missing = [k for k in current if k not in scores]
            extra = [k for k in keys if k not in current]
            raise MaskError(f"scores and current masks disagree on keys: missing scores {missing}, "
                            f"extra scores {extra}")
        for k in keys:
            if tuple(scores[k].shape) != tuple(current[k].shape):
                raise MaskError(f"score {k!r} has shape {tuple(scores[k].shape)} "
                                f"but its mask has {tuple(current[k].shape)}")

    dtype = scores[keys[0]].dtype
    for k in keys[1:]:
        dtype = torch.promote_types(dtype, scores[k].dtype)
    if not dtype.is_floating_point:
        dtype = torch.float64
    with torch.no_grad():
        # work on the alive weights only: pruning schedules spend most steps at high sparsity. Gathering by
        # the alive positions keeps index order, so the tie-break is unchanged (and on the CPU it is far
        # faster than boolean indexing)
        per_key = [scores[k].detach().reshape(-1).to(device=device, dtype=dtype) for k in keys]
        per_layer = mode != "global" or bool(min_per_layer)  # whether each layer's alive count is needed
        alive_idx: list[Tensor] | None = None
        positions: Tensor | None = None
        if current is None:
            n_alive = [v.numel() for v in per_key]
            flat = torch.cat(per_key)
        elif per_layer:
            alive_idx = _alive_positions(current, keys, device)
            vals = [v.index_select(0, i) for v, i in zip(per_key, alive_idx, strict=True)]
            n_alive = [v.numel() for v in vals]
            flat = torch.cat(vals)
        else:
            # one gather over all layers, sized by the known kept count where there is one: nothing to read back
            positions = flat_nonzero(torch.cat([current[k].reshape(-1).to(device) for k in keys]),
                                     count=current.known_kept())
            flat = torch.cat(per_key).index_select(0, positions)
            n_alive = [flat.numel()]  # the layers' own counts are not needed in this mode

        def non_finite() -> ValueError:
            alive = [current[k].reshape(-1).to(device) if current is not None else None for k in keys]
            counts = [int(torch.count_nonzero(~torch.isfinite(v) & (a if a is not None else True)))
                      for v, a in zip(per_key, alive, strict=True)]
            where = {k: c for k, c in zip(keys, counts, strict=True) if c}
            return ValueError(f"non-finite (NaN/inf) scores for kept weights: {where}")

        check(all_finite(flat), non_finite)
        total_alive = sum(n_alive)
        if keep < 0 or keep > total_alive:
            raise ValueError(f"keep must be between 0 and the {total_alive} weights still alive, got {keep}")
        lower = [min(min_per_layer, a) for a in n_alive]
        if sum(lower) > keep:
            raise ValueError(
                f"min_per_layer={min_per_layer} needs {sum(lower)} weights over {len(keys)} layers, "
                f"more than keep={keep}"
            )
        offsets = [0]
        for a in n_alive:
            offsets.append(offsets[-1] + a)

        chosen = torch.zeros(total_alive, dtype=torch.bool, device=device)
        if mode == "global":
            if min_per_layer:
                for i in range(len(keys)):
                    if lower[i]:
                        seg = slice(offsets[i], offsets[i + 1])
                        chosen[seg] = _topk_mask(flat[seg], lower[i])
            rest = keep - int(torch.count_nonzero(chosen)) if min_per_layer else keep
            if rest:
                # weights already taken rank below every (finite) score
                pool = flat.masked_fill(chosen, float("-inf")) if min_per_layer else flat
                chosen |= _topk_mask(pool, rest)
        else:
            quota = _apportion(keep, [scores[k].numel() for k in keys], lower, n_alive)
            for i in range(len(keys)):
                seg = slice(offsets[i], offsets[i + 1])
                chosen[seg] = _topk_mask(flat[seg], quota[i])

        out: dict[str, Tensor] = {}
        if positions is not None:
            numels = [scores[k].numel() for k in keys]
            whole = torch.zeros(sum(numels), dtype=torch.bool, device=device).index_copy_(0, positions, chosen)
            for k, part in zip(keys, whole.split(numels), strict=True):
                out[k] = part.reshape(scores[k].shape).clone()  # each mask its own tensor, as everywhere else
        else:
            for i, k in enumerate(keys):
                part = chosen[offsets[i] : offsets[i + 1]]
                if alive_idx is None:
                    full = part.clone()
                else:
                    full = torch.zeros(scores[k].numel(), dtype=torch.bool, device=device).index_copy_(
                        0, alive_idx[i], part)
                out[k] = full.reshape(scores[k].shape)
    masks = Masks._trusted(out, kept=keep)  # exactly ``keep`` chosen: counting them needs no read
    if mode != "global":  # nor do the layers' counts: each layer kept exactly its quota
        masks._counts = (masks._state(), [int(q) for q in quota])
    return masks


# --------------------------------------------------------------------------------------------
# enforcing masks during training


class _DeviceMask:
    """A mask, and its bit form (:func:`panning._functional.keep_bits`), cached per device, dtype and
    strides, so hooks keep working after ``model.to(device)`` or a change of memory layout and pay
    each conversion once."""

    def __init__(self, mask: Tensor) -> None:
        self._by_device: dict[torch.device, Tensor] = {mask.device: mask}
        self._bits: dict[tuple[torch.device, torch.dtype, tuple[int, ...]], Tensor | None] = {}

    def on(self, device: torch.device) -> Tensor:
        m = self._by_device.get(device)
        if m is None:
            m = next(iter(self._by_device.values())).to(device)
            self._by_device[device] = m
        return m

    def zero(self, t: Tensor, inplace: bool = False) -> Tensor:
        """``t`` with pruned entries exactly 0 (NaN/inf included)."""
        key = (t.device, t.dtype, t.stride())
        if key not in self._bits:
            bits = keep_bits(self.on(t.device), t.dtype)
            # laid out like t (channels_last weights in CPU training): a strided AND is slower
            self._bits[key] = (bits if bits is None or bits.stride() == t.stride()
                               else torch.empty_like(t, dtype=bits.dtype).copy_(bits))
        return zero_pruned(t, self._bits[key], self.on(t.device), inplace=inplace)


class MaskHandle:
    """Hooks installed by :func:`enforce`; :meth:`remove` detaches them (also as a context manager)."""

    def __init__(self, masks: Masks, params: dict[str, Tensor], handles: list[Any]) -> None:
        self.masks = masks
        self._params = params
        self._handles = handles

    @property
    def active(self) -> bool:
        """True until :meth:`remove` is called."""
        return bool(self._handles)

    def remove(self) -> None:
        """Detach all hooks; weights keep their current values."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self) -> MaskHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def enforce(model: nn.Module, masks: Masks, optimizer: torch.optim.Optimizer | None = None) -> MaskHandle:
    """Keep pruned weights at exactly zero during training.

    Zeros pruned weights now; gradient hooks make their ``.grad`` exactly 0 (so SGD weight decay,
    momentum and Adam moments never move them); with ``optimizer`` a step post-hook also re-zeros
    the weights and every optimizer state tensor of the weight's shape (``momentum_buffer``,
    ``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``, ...) after each step, which guards against
    anything that bypasses the gradient. Returns a :class:`MaskHandle`; call ``.remove()`` to stop.
    """
    if not isinstance(masks, Masks):
        masks = Masks(masks)
    masks.check(model)
    all_params = prunable_parameters(model)
    params = {k: all_params[k] for k in masks}
    handle = enforce_tensors(params, dict(masks.items()), optimizer)
    handle.masks = masks
    return handle


def enforce_tensors(params: Mapping[str, Tensor], masks: Mapping[str, Tensor],
                    optimizer: torch.optim.Optimizer | None = None) -> MaskHandle:
    """:func:`enforce` on bare tensors: ``masks[k]`` (bool, the shape of ``params[k]``) for each masked
    leaf tensor, e.g. the weights of N networks stacked along a leading axis (the batched proxy).
    Without ``optimizer`` only the weights are zeroed now and the gradients from then on."""
    params = dict(params)
    dev_masks = {k: _DeviceMask(masks[k].to(params[k].device)) for k in masks}
    handles: list[Any] = []

    def make_grad_hook(dm: _DeviceMask) -> Callable[[Tensor], Tensor]:
        def hook(grad: Tensor) -> Tensor:
            # exact zeros even for a NaN/inf gradient (a multiply by 0 would leave NaN)
            return dm.zero(grad)

        return hook

    def zero_state() -> None:
        with torch.no_grad():
            for k, dm in dev_masks.items():
                p = params[k]
                dm.zero(p, inplace=True)
                if optimizer is not None:
                    for v in optimizer.state.get(p, {}).values():
                        if isinstance(v, Tensor) and v.shape == p.shape:
                            dm.zero(v, inplace=True)

    for k in dev_masks:
        if params[k].requires_grad:
            handles.append(params[k].register_hook(make_grad_hook(dev_masks[k])))
    zero_state()
    if optimizer is not None:
        handles.append(optimizer.register_step_post_hook(lambda opt, args, kwargs: zero_state()))
    return MaskHandle(Masks._trusted({k: masks[k] for k in dev_masks}), {k: params[k] for k in dev_masks}, handles)


# --------------------------------------------------------------------------------------------
# torch.nn.utils.prune interop


def to_torch_prune(model: nn.Module, masks: Masks) -> None:
    """Export to ``torch.nn.utils.prune.custom_from_mask`` (``weight_orig`` + ``weight_mask`` buffers).

    A module already pruned by ``torch.nn.utils.prune`` gets its ``weight_mask`` *replaced* (not
    combined with the old one), so exporting twice leaves exactly ``masks`` in place.
    """
    if not isinstance(masks, Masks):
        masks = Masks(masks)
    masks.check(model)
    found = _prunable_with_modules(model)
    for k, m in masks.items():
        module, param = found[k]
        mask = m.to(device=param.device, dtype=param.dtype)
        orig, old_mask = getattr(module, "weight_orig", None), getattr(module, "weight_mask", None)
        if isinstance(orig, Tensor) and isinstance(old_mask, Tensor):
            with torch.no_grad():
                old_mask.copy_(mask)
            # the pre-forward hook recomputes weight on the next call; refresh it now for direct reads
            module.weight = orig * old_mask
        else:
            prune.custom_from_mask(module, name="weight", mask=mask)


def from_torch_prune(model: nn.Module, remove: bool = False) -> Masks:
    """Read ``weight_mask`` buffers of Conv/Linear modules pruned by ``torch.nn.utils.prune``.

    With ``remove=True`` the pruning is made permanent (``prune.remove``: ``weight`` becomes a
    plain parameter again, zero where pruned). Raises :class:`MaskError` if no module is pruned
    or a mask is not binary.
    """
    out: dict[str, Tensor] = {}
    pruned_modules: list[nn.Module] = []
    for name, module in model.named_modules():
        if not isinstance(module, PRUNABLE_TYPES):
            continue
        buf = dict(module.named_buffers(recurse=False)).get("weight_mask")
        if buf is None or "weight_orig" not in dict(module.named_parameters(recurse=False)):
            continue
        key = f"{name}.weight" if name else "weight"
        out[key] = _as_bool(key, buf)
        pruned_modules.append(module)
    if not out:
        raise MaskError("no Conv/Linear weight pruned with torch.nn.utils.prune found in the model")
    masks = Masks._trusted(out)
    if remove:
        for module in pruned_modules:
            prune.remove(module, "weight")
    return masks
