"""One action-driven pruning run: the state, action mapping and observation of ``panning/Panning-v0``.

:class:`PruningEpisode` holds a network, its :class:`panning.pruner.Pruner` and the episode's
progress towards a target sparsity. :meth:`PruningEpisode.step` maps an action onto index weights
and a step size and calls :meth:`Pruner.step` once; :meth:`PruningEpisode.observe` builds the
fixed-size observation. The Gymnasium environment (:mod:`panning.envs.panning_env`) wraps it with a
reward, and :func:`panning.policy.run_policy` drives it with a trained policy on any model, so what
the agent learned and what a user applies cannot drift apart. This module is part of the library:
it imports neither Gymnasium nor Stable-Baselines3. It needs no proxy, no labels beyond the scoring
batch, and no data set object.

Action (float32 ``Box(-1, 1, (K + 1 + S,))`` for K indices, S = ``layer_actions`` (default 0); clipped, NaN raises)
-------------------------------------------------------------------------------------------------------------------
- ``a[0:K]`` -> index weights ``w_k = (a_k + 1) / 2`` in [0, 1] (so ``[1, -1, -1]`` is exactly
  one-hot on the first index); if all are 0, equal weights are used. The pruner combines the
  normalised scores as ``sum_k w_k * n_k``; only the ratios matter.
- ``b = a[K]`` -> this step's share of the remaining *log-density* budget,
  ``share = min(1, 2**(2b) / steps_left)`` with ``steps_left = T - t + 1`` for step t = 1..T. The env
  tracks ``u``, the fraction of the budget used: ``u <- u + share * (1 - u)``; the step keeps
  ``round(d**u * N)`` weights, where ``d = keep_count(N, target) / N``, clamped between the final
  count and the current count. ``b = 0`` reproduces SynFlow's exponential schedule exactly
  (``u_t = t / T``, the counts of ``keep_schedule(N, target, T, "exponential")``); ``b = 1`` prunes
  4x the default share, ``b = -1`` a quarter of it. Step T always keeps exactly
  ``keep_count(N, target)`` whatever ``b`` is.
- Per-layer terms (only with ``layer_actions = S >= 2``; the action is then ``(K + 1 + S,)``):
  ``a[K+1:]`` are S control points ``c_0..c_{S-1}`` spread evenly over relative depth [0, 1]; layer l
  (depth ``l / (L - 1)`` in the masks' order, 0 when L = 1) reads ``m_l`` by linear interpolation
  between them, so one policy applies to any depth. The layer's combined scores ``c`` are scaled by
  ``f_l = 4**m_l`` (the step size's range, ``2**(2b)``) before the global top-k, as ``c * f_l`` where
  ``c > 0`` and ``c / f_l`` elsewhere (a factor above 1 protects the layer whatever the score's sign):
  the layer gives up fewer weights at this step (``m_l = 1``: as if each of its scores were 4 times
  higher) or more (``m_l = -1``: a quarter). All ``c_j = 0`` is the mapping without per-layer terms,
  bit for bit. AMC (He et al., 2018) chooses a ratio per layer; here the global ranking still decides
  within and across layers, biased per layer.

Observation (float32 ``Box(-5, 5, (13 + 6K,))``; every feature is clipped to [-5, 5])
-------------------------------------------------------------------------------------
Its size depends only on K, never on the architecture's depth or width. ``D(x) = 1 + 2 log10(x) / 3``
maps a density x in [0.001, 1] onto [-1, 1].

====  =========================  ===============================================================
 #    name                       definition
====  =========================  ===============================================================
 0    progress                   t / T (steps done over steps in the episode), in [0, 1]
 1    default_share              1 / (T - t): the share of the remaining budget a ``b = 0`` step
                                 removes next (0 once the episode is over)
 2    density                    D(current density)
 3    target_density             D(target density)
 4    budget_left                log(d_now / d_target) / log(1 / d_target) in [0, 1] (0 if the
                                 target is dense)
 5    ineffective                share of the kept weights that lie on no input-output path
 6    layer_density_min          D(min over prunable layers of the layer's density)
 7    layer_density_median       D(median layer density)
 8    layer_density_max          D(max layer density)
 9    layers_near_collapse       share of layers whose density is below 1/10 of the global density
 10   layers_collapsed           share of layers with no effective (connected) weight left
 11   loss_ratio                 log10(L / L0): cross-entropy of the masked network on the fixed
                                 scoring batch over the dense network's at episode start
 12   grad_norm_ratio            log10(G / G0): same for the gradient norm w.r.t. the kept weights
                                 (G >= 1e-30, so a dead network reads -5 after clipping)
 then for each index k in ``indices`` order (6 features; 0 at the terminal step, when no further
 step needs scoring), over the weights still alive, on the scores normalised as the pruner does:
 13+6k   agreement_k             mean over the other indices j of |P_k ∩ P_j| / m, where P_i are
                                 the m weights index i alone would prune next (global top-k, the
                                 pruner's tie-break) at the default (b = 0) step; 1 when K = 1 or m = 0
 14+6k   q10_k                   log10(10th percentile of |n_k| + 1e-12) / 3 (nearest rank; the
                                 ``mean`` normalisation puts mean |n_k| at 1, so 0 = average weight)
 15+6k   q50_k                   median, same scale
 16+6k   q90_k                   90th percentile, same scale
 17+6k   nonpositive_k           share of alive weights scored <= 0 (zero SynFlow flow, negative
                                 GraSP), in [0, 1]
 18+6k   top1_mass_k             share of sum |n_k| held by the top 1% of alive weights, in [0, 1]
                                 (heavy tails -> near 1)
====  =========================  ===============================================================

Per-layer observation (``observation="layers"``, version 2, the default of ``Panning-v0``)
-----------------------------------------------------------------------------------------
The summary above (version 1, ``observation="summary"``), then a padded layer axis of
``max_layers`` rows (default 32) of ``8 + 5K`` features each, then ``max_layers`` presence flags
(1 for a real layer, 0 for padding; real layers come first, in the order the masks list them).
Size ``13 + 6K + max_layers * (9 + 5K)``. A policy that pools over the layer axis
(:class:`panning.agents.features.LayerSetExtractor`) applies to a network of any depth: an episode
whose network has more layers than ``max_layers`` is refused, and :func:`panning.policy.run_policy`
widens the axis for such a network instead. Per layer l (N_l weights, n_l of them alive):

================  ===================================================================================
name              definition
================  ===================================================================================
density           D(layer density)
effective         D(share of the layer's weights that are kept and lie on an input-output path)
size_share        N_l / N (the layer's share of all prunable weights)
log_size          log10(N_l) / 7
log_fan_in        log10(fan-in) / 5 (Linear: in features; Conv: in channels x kernel size)
log_fan_out       log10(fan-out) / 5 (Linear: out features; Conv: out channels x kernel size)
depth             l / (L - 1), the layer's position in the masks' order (0 when L = 1)
conv              1 for a weight of more than 2 dimensions (a convolution), else 0
================  ===================================================================================

then for each index k (0 at the terminal step, as the summary's per-index features), with P_k the
weights index k alone would prune at the next default step (as ``agreement_k``) and m = |P_k|:
``remove_layer_k`` = |P_k in l| / n_l (the share of the layer's alive weights it would remove),
``remove_global_k`` = |P_k in l| / m (the layer's share of that index's next prune set), and
``q10_k``, ``q50_k``, ``q90_k``: the summary's score quantiles over the layer's alive weights only
(0 for a layer with no alive weight). A layer's features depend only on that layer, the global
state and its depth: registering the layers in another order changes nothing else.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad_and_value, vmap

from panning._functional import (
    architecture_key,
    deferred_checks,
    functional_forward,
    host_route,
    masked_weights,
    one_read,
    other_tensors,
    preserved_modes,
    read_together,
    stacked_tensors,
)
from panning.connectivity import PathCounter, PendingEffective
from panning.masks import (
    Masks,
    _topk_mask,
    check_keep,
    count_all,
    counts_begin,
    counts_end,
    keep_count,
    order_statistics,
    order_statistics_np,
)
from panning.pruner import Pruner

__all__ = ["PruningEpisode", "EpisodeStep", "GLOBAL_FEATURES", "INDEX_FEATURES", "LAYER_FEATURES",
           "LAYER_INDEX_FEATURES", "OBSERVATIONS", "OBS_VERSIONS", "DEFAULT_MAX_LAYERS", "OBS_LIMIT", "OBS_VERSION",
           "ACTION_MAPPING", "LAYER_FACTOR_BASE", "action_mapping", "action_size", "check_layer_actions",
           "layer_factors", "observation_size", "feature_names", "layer_feature_size", "map_action", "masked_signals",
           "signals_many", "step_many", "step_observe_many"]

GLOBAL_FEATURES = (
    "progress", "default_share", "density", "target_density", "budget_left", "ineffective",
    "layer_density_min", "layer_density_median", "layer_density_max", "layers_near_collapse",
    "layers_collapsed", "loss_ratio", "grad_norm_ratio",
)
INDEX_FEATURES = ("agreement", "q10", "q50", "q90", "nonpositive", "top1_mass")
LAYER_FEATURES = ("density", "effective", "size_share", "log_size", "log_fan_in", "log_fan_out", "depth", "conv")
LAYER_INDEX_FEATURES = ("remove_layer", "remove_global", "q10", "q50", "q90")
OBS_LIMIT = 5.0
# Bump a layout's version when a feature's definition or order changes: saved agents record it and
# refuse to load otherwise. Each layout keeps its own version, so agents of the older layout still load.
OBS_VERSIONS = {"summary": 1, "layers": 2}
OBSERVATIONS = tuple(OBS_VERSIONS)
OBS_VERSION = OBS_VERSIONS["layers"]  # the default layout's
DEFAULT_MAX_LAYERS = 32
# Recorded in saved agents for the same reason.
ACTION_MAPPING = "w=(a+1)/2 (all 0 -> equal); share=min(1, 2**(2b)/steps_left); v1"
#: the base of the per-layer factor ``f_l = LAYER_FACTOR_BASE ** m_l`` (see the module docstring)
LAYER_FACTOR_BASE = 4.0


def action_mapping(layer_actions: int = 0) -> str:
    """The action mapping's description recorded in saved agents: :data:`ACTION_MAPPING` without
    per-layer terms (so agents saved before they existed still load), extended with them."""
    if layer_actions == 0:
        return ACTION_MAPPING
    return f"{ACTION_MAPPING}; layer f=4**interp(depth, {layer_actions} points), c*f (c>0) else c/f; v1"


def check_layer_actions(layer_actions: Any) -> int:
    """``layer_actions`` as an int: 0 (no per-layer terms) or S >= 2 control points; ValueError otherwise."""
    if isinstance(layer_actions, bool) or not isinstance(layer_actions, (int, np.integer)) or layer_actions < 0 \
            or layer_actions == 1:
        raise ValueError(f"layer_actions must be 0 (no per-layer terms) or an integer >= 2 (control points over "
                         f"depth; one point scales every layer alike, which changes nothing), got {layer_actions!r}")
    return int(layer_actions)


def action_size(num_indices: int, layer_actions: int = 0) -> int:
    """Length of the action vector: K index weights, one step size, ``layer_actions`` depth points."""
    return num_indices + 1 + layer_actions


def layer_factors(points: Sequence[float], num_layers: int) -> list[float]:
    """Per-layer score factors ``4**m_l`` of :func:`map_action`'s depth control points, for ``num_layers``
    layers in order; all points 0 gives exactly 1.0 everywhere."""
    pts = np.asarray(points, dtype=np.float64)
    depth = np.arange(num_layers) / (num_layers - 1) if num_layers > 1 else np.zeros(1)
    m = np.interp(depth, np.linspace(0.0, 1.0, len(pts)), pts)
    return [float(LAYER_FACTOR_BASE ** v) for v in m]


def _check_layout(observation: str) -> None:
    if observation not in OBS_VERSIONS:
        raise ValueError(f"unknown observation layout {observation!r}; known: {', '.join(OBSERVATIONS)}")


def layer_feature_size(num_indices: int) -> int:
    """Features per layer row of the ``layers`` observation (its presence flag not included)."""
    return len(LAYER_FEATURES) + len(LAYER_INDEX_FEATURES) * num_indices


def observation_size(num_indices: int, observation: str = "summary", max_layers: int = DEFAULT_MAX_LAYERS) -> int:
    """Length of the observation vector: independent of the network (``layers``: up to ``max_layers`` layers)."""
    _check_layout(observation)
    summary = len(GLOBAL_FEATURES) + len(INDEX_FEATURES) * num_indices
    if observation == "summary":
        return summary
    return summary + max_layers * (layer_feature_size(num_indices) + 1)


def feature_names(indices: Sequence[str], observation: str = "summary",
                  max_layers: int = DEFAULT_MAX_LAYERS) -> list[str]:
    """Name of every observation feature, in order (``layer3_q50_snip``, ``layer3_present``, ...)."""
    _check_layout(observation)
    names = list(GLOBAL_FEATURES) + [f"{f}_{k}" for k in indices for f in INDEX_FEATURES]
    if observation == "layers":
        row = list(LAYER_FEATURES) + [f"{f}_{k}" for k in indices for f in LAYER_INDEX_FEATURES]
        names += [f"layer{i}_{f}" for i in range(max_layers) for f in row]
        names += [f"layer{i}_present" for i in range(max_layers)]
    return names


#: the per-layer score quantiles of the ``layers`` observation (nearest rank, as the summary's)
LAYER_QUANTILES = (0.1, 0.5, 0.9)


def layer_quantiles(values: Tensor, layer: Tensor, alive: Tensor, ps: Sequence[float],
                    by_selection: bool | None = None) -> list[Tensor]:
    """Per layer and per ``p`` in ``ps``: the k-th smallest of the layer's ``values``, k = round(p (n - 1)) + 1
    (nearest rank; n = ``alive[l]`` entries, layers contiguous and in order along ``values``, as
    ``layer`` says); a layer without entries gives whatever lies at its clamped position (callers mask it).

    Two routes, the same values: on the CPU (``by_selection`` None) one linear-time selection per layer for
    all its ranks (:func:`order_statistics`), several times faster than sorting there; elsewhere one sort
    by value and a stable one by layer, a fixed number of kernel launches whatever the depth.
    """
    L = alive.numel()
    ranks = [torch.round(p * (alive - 1).clamp(min=0).double()).long() for p in ps]
    if by_selection is None:
        by_selection = host_route(values)
    if not by_selection:
        starts = torch.cumsum(alive, 0) - alive
        last = max(values.numel() - 1, 0)
        srt, order = torch.sort(values)
        srt = srt.index_select(0, torch.sort(layer.index_select(0, order), stable=True)[1])
        return [srt.index_select(0, (starts + r).clamp(max=last)) for r in ranks]
    if not ps:
        return []
    rank_cols = torch.stack(ranks, 1).tolist()  # per layer, its rank for each p
    if host_route(values) and values.dtype in (torch.float32, torch.float64):  # no tensor per value
        vals = values.detach().numpy()
        out_np = np.zeros((len(ps), L), dtype=vals.dtype)
        lo = 0
        for i, a in enumerate(alive.tolist()):
            if a:
                out_np[:, i] = order_statistics_np(vals[lo : lo + a], rank_cols[i])
            lo += a
        return list(torch.from_numpy(out_np).unbind(0))
    out = torch.zeros(len(ps), L, dtype=values.dtype)
    lo = 0
    for i, a in enumerate(alive.tolist()):
        if a:
            out[:, i] = torch.stack(order_statistics(values[lo : lo + a], rank_cols[i]))
        lo += a
    return list(out.to(values.device).unbind(0))


def map_action(action: Any, indices: Sequence[str], layer_actions: int = 0
               ) -> tuple[dict[str, float], float, list[float]]:
    """(index weights, step-size value b, the ``layer_actions`` depth control points) of an action;
    clips to [-1, 1], raises on NaN or a wrong shape."""
    K = len(indices)
    a = np.asarray(action, dtype=np.float64).reshape(-1)
    size = action_size(K, layer_actions)
    if a.shape != (size,):
        extra = f" and {layer_actions} per-layer terms" if layer_actions else ""
        raise ValueError(f"expected an action of shape ({size},) for indices {list(indices)}{extra}, "
                         f"got {np.shape(action)}")
    if np.isnan(a).any():
        raise ValueError(f"action contains NaN: {a.tolist()}")
    a = np.clip(a, -1.0, 1.0)
    w = (a[:K] + 1.0) / 2.0
    if not (w > 0).any():
        w = np.ones(K)
    return {name: float(v) for name, v in zip(indices, w, strict=True)}, float(a[K]), [float(v) for v in a[K + 1:]]


def _log_density_feature(d: float) -> float:
    return 1.0 + 2.0 * math.log10(max(d, 1e-12)) / 3.0


@dataclass
class EpisodeStep:
    """What one :meth:`PruningEpisode.step` did."""

    step: int
    weights: dict[str, float]
    share: float
    keep: int
    removed: int
    masks: Masks
    effective: Masks
    collapsed: list[str]
    loss_ratio: float
    grad_ratio: float
    layer_factors: list[float] | None = None  # per layer, in the masks' order (None: no per-layer terms)


@dataclass
class _Selection:
    """What the first half of a step decided (:meth:`PruningEpisode._select`)."""

    weights: dict[str, float]
    share: float
    u: float
    keep: int
    kept_before: int
    masks: Masks
    factors: list[float] | None
    clock: float  # the clock reading that ended the selection


class PruningEpisode:
    """A network pruned to ``target_sparsity`` in ``steps`` action-driven steps of the core pruner.

    ``model`` is never modified (the pruner scores it functionally). ``batches`` is the fixed,
    class-balanced scoring batch; its first batch also gives the loss and gradient-norm signals.

    ``timing`` holds the last step's seconds per stage: ``score``, ``select``, ``connectivity``, ``signal``
    (the first step's includes the signals before it, measured then), ``features``. They are host clock
    readings; on CUDA, where work is queued, a stage's GPU work is charged to whichever later stage waits
    for it, unless :attr:`sync_timing` is set.
    """

    #: Synchronise the CUDA device before every clock reading, so ``timing`` charges GPU work to the
    #: stage that queued it. Off by default because each synchronisation stalls the queue; profiling
    #: and ``benchmarks/bench_env.py --device cuda`` turn it on (the class attribute or one instance's).
    sync_timing: bool = False

    def __init__(
        self,
        model: nn.Module,
        indices: Sequence[str],
        batches: Sequence[tuple[Tensor, Tensor]],
        *,
        target_sparsity: float,
        steps: int,
        input_shape: Sequence[int] | None = None,
        exclude: Sequence[str] = (),
        mode: str = "global",
        normalisation: str = "mean",
        seed: int = 0,
        observation: str = "summary",
        max_layers: int = DEFAULT_MAX_LAYERS,
        layer_actions: int = 0,
    ) -> None:
        _check_layout(observation)
        self.layer_actions = check_layer_actions(layer_actions)
        if not 0.0 <= target_sparsity < 1.0:
            raise ValueError(f"target_sparsity must be in [0, 1), got {target_sparsity}")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"the number of pruning steps must be an integer >= 1, got {steps!r}")
        if not batches or len(batches[0][0]) == 0:
            raise ValueError("a non-empty scoring batch is needed (it also gives the loss and gradient signals)")
        self.model = model
        self._cuda = any(p.is_cuda for p in model.parameters())
        self.indices = list(indices)
        self.K = len(self.indices)
        self.batches = list(batches)
        self.T = steps
        self.pruner = Pruner(model, self.indices, self.batches, input_shape=input_shape, exclude=exclude, mode=mode,
                             normalisation=normalisation, seed=seed)
        self.input_shape = self.pruner.input_shape
        self.N = self.pruner.num_total
        self.target_sparsity = float(target_sparsity)
        check_keep(len(self.pruner.masks), self.N, target_sparsity)  # an emptied layer: no path can survive
        self.observation = observation
        self.num_layers = len(self.pruner.masks)
        if observation == "layers" and self.num_layers > max_layers:
            raise ValueError(f"the network has {self.num_layers} prunable layers; the observation holds at most "
                             f"max_layers={max_layers}: raise max_layers")
        self.max_layers = int(max_layers)
        self._layer_static = self._static_layer_features() if observation == "layers" else None
        self.final_keep = keep_count(self.N, target_sparsity)
        self.target_density = self.final_keep / self.N
        self.t = 0
        self.u = 0.0  # fraction of the log-density budget used so far
        self.timing = self._zero_timing()
        self._masks0 = self.pruner.masks
        self._signals0: tuple[float, float] | None = None  # measured when first needed: step_many measures N at once
        self.effective = self.pruner.masks
        self._paths: PathCounter | None = None
        self.loss_ratio = 0.0
        self.grad_ratio = 0.0

    @property
    def loss0(self) -> float:
        """The loss of the network before the first step (its initial masks), on the scoring batch."""
        return self._initial_signals()[0]

    @property
    def grad0(self) -> float:
        """The gradient norm (w.r.t. the kept weights) before the first step, on the scoring batch."""
        return self._initial_signals()[1]

    def _initial_signals(self) -> tuple[float, float]:
        if self._signals0 is None:
            t0 = self._clock()
            self._signals0 = self.signals(self._masks0)
            self.timing["signal"] += self._clock() - t0
        return self._signals0

    def _clock(self) -> float:
        if self.sync_timing and self._cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    @staticmethod
    def _zero_timing() -> dict[str, float]:
        return {"score": 0.0, "select": 0.0, "connectivity": 0.0, "signal": 0.0, "features": 0.0}

    @property
    def masks(self) -> Masks:
        """The current masks."""
        return self.pruner.masks

    @property
    def done(self) -> bool:
        """True once all T steps have run."""
        return self.t >= self.T

    def planned_keep(self, b: float) -> tuple[float, float, int]:
        """(share, new u, keep count) a step with step-size value ``b`` would use now."""
        T, t = self.T, self.t + 1
        if t >= T:
            return 1.0, 1.0, self.final_keep
        share = min(1.0, 2.0 ** (2.0 * b) / (T - t + 1))
        u = self.u + share * (1.0 - self.u)
        keep = max(self.final_keep, min(self.masks.num_kept, round(self.target_density ** u * self.N)))
        return share, u, keep

    @deferred_checks()  # on a GPU the step's checks are read back once, at the end
    def step(self, action: Any) -> EpisodeStep:
        """One pruning step driven by ``action`` (see the module docstring for the mapping)."""
        begun = _steps_begin([self], [action])  # the first step also measures the signals before it
        return _steps_end([self], begun, read_together(begun.tensors()))[0]

    def path_counter(self) -> PathCounter:
        """The episode's path-counting copy of its network (made at the first step, reused after)."""
        if self._paths is None:
            self._paths = PathCounter(self.model)
        return self._paths

    def _select(self, action: Any) -> _Selection:
        """The first half of :meth:`step`: map the action and prune (timing restarts here)."""
        if self.done:
            raise RuntimeError("the episode is over: all pruning steps have run")
        weights, b, points = map_action(action, self.indices, self.layer_actions)
        # all-zero terms give factors of exactly 1.0, which the pruner leaves out: the plain mapping
        factors = layer_factors(points, self.num_layers) if self.layer_actions else None
        kept_before = self.masks.num_kept
        share, u, keep = self.planned_keep(b)
        self.timing = self._zero_timing()
        t0 = self._clock()
        self.pruner.scores([n for n, wk in weights.items() if wk > 0])  # usually scored at observation time already
        for name, wk in weights.items():
            if wk > 0:
                self.pruner.normalised_scores(name)
        t1 = self._clock()
        masks = self.pruner.step(weights, keep, layer_factors=factors)
        t2 = self._clock()
        self.timing["score"] += t1 - t0
        self.timing["select"] += t2 - t1
        return _Selection(weights, share, u, keep, kept_before, masks, factors, t2)

    def _advance(self, plan: _Selection) -> None:
        """Count the step (what :meth:`planned_keep` and :attr:`done` read): host values only."""
        self.t += 1
        self.u = plan.u

    def _conclude(self, plan: _Selection, eff: Masks, loss: float, grad: float) -> EpisodeStep:
        """The last part of a step, after :meth:`_advance`: what needs the step's device values (the new masks'
        effective masks and signals)."""
        self.effective = eff
        self.loss_ratio, self.grad_ratio = self._ratios(loss, grad)
        if self.done:
            self._paths = None  # the float64 path-counting copy is not needed after the last step
        collapsed = [k for k, c in zip(eff, eff.layer_counts(), strict=True) if c == 0]
        return EpisodeStep(self.t, plan.weights, plan.share, plan.keep, plan.kept_before - plan.keep, plan.masks, eff,
                           collapsed, self.loss_ratio, self.grad_ratio, plan.factors)

    # --------------------------------------------------------------------------- signals

    def signals(self, masks: Masks) -> tuple[float, float]:
        """Loss and gradient norm (w.r.t. the kept weights) of the masked network on the scoring batch."""
        return masked_signals(self.model, masks, self.batches[0])

    def _ratios(self, loss: float, grad: float) -> tuple[float, float]:
        lr = math.log10(max(loss, 1e-30) / max(self.loss0, 1e-30)) if math.isfinite(loss) else OBS_LIMIT
        gr = math.log10(max(grad, 1e-30) / max(self.grad0, 1e-30)) if math.isfinite(grad) else OBS_LIMIT
        return lr, gr

    # ---------------------------------------------------------------------- observation

    @deferred_checks()
    def observe(self, score_indices: bool | None = None) -> np.ndarray:
        """The observation of the current state (float32, clipped to [-5, 5]).

        ``score_indices`` (default: unless the episode is over) computes the per-index features,
        which need the indices scored on the current masks; the terminal observation skips them.
        Every device value it needs comes back in one transfer (:func:`observe_many`: one for N episodes).
        """
        return observe_many([self], [score_indices])[0]

    def _observe_begin(self, score_indices: bool | None) -> _PendingObservation:
        """The device half of :meth:`observe`: scores the indices if asked and queues, as one float64 vector,
        every device value the features need (nothing is read back here)."""
        if score_indices is None:
            score_indices = not self.done
        t_start, score_before = self._clock(), self.timing["score"]
        pend = _PendingObservation(t_start, score_before, self.masks.num_kept)
        if score_indices:
            self._index_features_begin(pend)
            if self.observation == "layers":
                self._layer_index_features_begin(pend)
        if pend.parts:
            pend.payload = torch.cat([p.reshape(-1).double() for p in pend.parts])
            pend.parts = []
        return pend

    def _observe_end(self, pend: _PendingObservation, values: np.ndarray | None) -> np.ndarray:
        """The host half of :meth:`observe`, given the pending payload's values."""
        masks, eff = self.masks, self.effective
        T, t = self.T, self.t
        kept = pend.kept
        d_now = kept / self.N
        g: list[float] = [t / T, 1.0 / (T - t) if t < T else 0.0, _log_density_feature(d_now),
                          _log_density_feature(self.target_density)]
        g.append(math.log(d_now / self.target_density) / math.log(1.0 / self.target_density)
                 if self.target_density < 1.0 else 0.0)
        g.append(1.0 - eff.num_kept / kept if kept else 1.0)
        dens = np.array(list(masks.layer_density().values()), dtype=np.float64)
        g += [_log_density_feature(float(dens.min())), _log_density_feature(float(np.median(dens))),
              _log_density_feature(float(dens.max()))]
        g.append(float(np.mean(dens < 0.1 * d_now)))
        g.append(float(np.mean([c == 0 for c in eff.layer_counts()])))
        g += [self.loss_ratio, self.grad_ratio]
        per_index = [0.0] * (len(INDEX_FEATURES) * self.K)
        per_layer = None
        if pend.summary is not None:
            assert values is not None
            per_index = self._index_features_end(pend, values[: pend.summary_size].tolist())
            if pend.layer_shape is not None:
                per_layer = values[pend.summary_size :].reshape(pend.layer_shape)
        obs = np.asarray(g + per_index, dtype=np.float64)
        if self.observation == "layers":
            obs = np.concatenate([obs, self._layer_block(dens, per_layer)])
        obs = np.nan_to_num(obs, nan=0.0, posinf=OBS_LIMIT, neginf=-OBS_LIMIT)
        return np.clip(obs, -OBS_LIMIT, OBS_LIMIT).astype(np.float32)

    def _index_features_begin(self, pend: _PendingObservation) -> None:
        """Queue the summary's per-index numbers, and keep what the per-layer ones reuse: the alive weights'
        flat positions, each index's normalised scores on them and its next prune set, and m."""
        t0 = self._clock()
        self.pruner.scores(self.indices)  # together: indices that share passes share them
        idx = self.pruner.alive_positions()  # gathering by index: the elements of [alive], far faster on the CPU
        normed = [self.pruner.normalised_scores(name).index_select(0, idx) for name in self.indices]
        self.timing["score"] += self._clock() - t0
        m = pend.kept - self.planned_keep(0.0)[2]  # how many weights a default (b = 0) step would remove next
        lowest = []
        raw: list[Tensor] = []  # per index: the 10/50/90% order statistics, share <= 0, sum, top-1% sum
        at: list[int | None] = []  # where each index's six numbers start in raw
        for n in normed:
            if n.numel() == 0:
                at.append(None)
                continue
            at.append(len(raw))
            if m > 0:
                # the m weights a global top-k on this index alone would drop, with select_topk's tie-break
                # (what a stable descending sort keeps first; found in linear time)
                lowest.append(~_topk_mask(n, n.numel() - m))
            mag = n.abs()
            # nearest-rank quantiles and a top-k: linear-time selections, no full sort
            top = max(1, math.ceil(0.01 * mag.numel()))
            raw += order_statistics(mag, [round(p * (mag.numel() - 1)) for p in (0.1, 0.5, 0.9)])
            raw += [(n <= 0).double().mean(), mag.sum(), torch.topk(mag, top, sorted=False).values.sum()]
        pairs = [(k, j) for k in range(len(lowest)) for j in range(self.K) if j != k] if m > 0 else []
        first_pair = len(raw)
        raw += [(lowest[k] & lowest[j]).sum() for k, j in pairs]
        # float64 holds each of these numbers exactly
        if raw:
            pend.parts.append(torch.stack([v.double() for v in raw]))
        pend.summary = (at, pairs, first_pair, m)
        pend.summary_size = len(raw)
        pend.selected = (idx, normed, lowest, m)

    def _index_features_end(self, pend: _PendingObservation, vals: list[float]) -> list[float]:
        """The summary's per-index features from the values :meth:`_index_features_begin` queued."""
        assert pend.summary is not None
        at, pairs, first_pair, m = pend.summary
        counts = dict(zip(pairs, vals[first_pair:], strict=True))
        out: list[float] = []
        for k, a in enumerate(at):
            if a is None:
                st = [0.0] * 5
            else:
                k10, k50, k90, nonpos, total, topsum = vals[a : a + 6]
                st = [math.log10(q + 1e-12) / 3.0 for q in (k10, k50, k90)]
                st += [nonpos, topsum / total if total > 0 else 0.0]
            if m > 0 and self.K > 1:
                agree = float(np.mean([int(counts[k, j]) / m for j in range(self.K) if j != k]))
            else:
                agree = 1.0
            out += [agree, *st]
        return out

    # ------------------------------------------------------------------- per-layer features

    def _static_layer_features(self) -> np.ndarray:
        """[L, 8] features that never change in an episode (density columns are filled per step)."""
        shapes = [tuple(m.shape) for m in self.pruner.masks.values()]
        L = len(shapes)
        rows = np.zeros((L, len(LAYER_FEATURES)), dtype=np.float64)
        for i, shp in enumerate(shapes):
            size = math.prod(shp)
            if len(shp) >= 2:
                kernel = math.prod(shp[2:])
                fan_in, fan_out = shp[1] * kernel, shp[0] * kernel
            else:
                fan_in = fan_out = size
            rows[i, 2:] = [size / self.N, math.log10(max(size, 1)) / 7.0, math.log10(max(fan_in, 1)) / 5.0,
                           math.log10(max(fan_out, 1)) / 5.0, i / (L - 1) if L > 1 else 0.0,
                           1.0 if len(shp) > 2 else 0.0]
        device = next(iter(self.pruner.masks.values())).device
        sizes = torch.tensor([math.prod(shp) for shp in shapes], device=device)
        # each prunable weight's layer, in the pruner's flat order (layers are contiguous there)
        # (output_size: without it CUDA reads the total back from the device)
        self._layer_of = torch.repeat_interleave(torch.arange(L, device=sizes.device), sizes,
                                                 output_size=sum(math.prod(shp) for shp in shapes))
        return rows

    def _layer_index_features_begin(self, pend: _PendingObservation) -> None:
        """Queue [L, 5K]: per index, the share of each layer (and of the next prune set) it would remove and
        its score quantiles within the layer."""
        assert pend.selected is not None
        idx, normed, lowest, m = pend.selected
        L = self.num_layers
        layer = self._layer_of.index_select(0, idx)  # non-decreasing: idx is sorted
        # counts per layer by index_add_, not bincount or a boolean index: on CUDA those two read the device
        zeros = torch.zeros(L, dtype=torch.long, device=layer.device)
        alive = zeros.clone().index_add_(0, layer, torch.ones_like(layer))
        cols = []
        for k, n in enumerate(normed):
            if m > 0 and n.numel():
                removed = zeros.clone().index_add_(0, layer, lowest[k].long()).double()
                cols += [removed / alive.clamp(min=1), removed / m]
            else:
                cols += [torch.zeros(L, dtype=torch.float64, device=idx.device)] * 2
            if n.numel():
                for q in layer_quantiles(n.abs(), layer, alive, LAYER_QUANTILES):
                    q = torch.log10(q.double() + 1e-12) / 3.0
                    cols.append(torch.where(alive > 0, q, torch.zeros_like(q)))
            else:
                cols += [torch.zeros(L, dtype=torch.float64, device=idx.device)] * 3
        pend.parts.append(torch.stack(cols, 1))
        pend.layer_shape = (L, len(cols))

    def _layer_block(self, density: np.ndarray, per_index: np.ndarray | None) -> np.ndarray:
        """The padded layer rows and presence flags of the ``layers`` observation, flattened; ``density``
        is each layer's density (what the summary's layer features already read)."""
        assert self._layer_static is not None
        L, F_ = self.num_layers, layer_feature_size(self.K)
        rows = np.zeros((self.max_layers, F_), dtype=np.float64)
        rows[:L, :len(LAYER_FEATURES)] = self._layer_static
        effective = self.effective.layer_density().values()
        for i, (d, e) in enumerate(zip(density, effective, strict=True)):
            rows[i, 0], rows[i, 1] = _log_density_feature(float(d)), _log_density_feature(e)
        if per_index is not None:
            rows[:L, len(LAYER_FEATURES):] = per_index
        present = np.zeros(self.max_layers, dtype=np.float64)
        present[:L] = 1.0
        return np.concatenate([rows.reshape(-1), present])


# ------------------------------------------------------------------------------------ N episodes at once


@dataclass
class _PendingObservation:
    """An observation between its device half and its host half (:meth:`PruningEpisode._observe_begin`)."""

    t_start: float
    score_before: float
    kept: int
    parts: list[Tensor] = field(default_factory=list)
    payload: Tensor | None = None  # every device value the features need, one float64 vector
    summary: tuple[list[int | None], list[tuple[int, int]], int, int] | None = None  # at, pairs, first_pair, m
    summary_size: int = 0
    selected: tuple[Tensor, list[Tensor], list[Tensor], int] | None = None  # idx, normed, lowest, m
    layer_shape: tuple[int, int] | None = None


@deferred_checks()
def observe_many(episodes: Sequence[PruningEpisode], score_indices: Sequence[bool | None] | None = None
                 ) -> list[np.ndarray]:
    """``[ep.observe(s) for ep, s in zip(episodes, score_indices)]``, the same observations, with every device
    value of all the episodes read back in one transfer (on a GPU one wait for the device, not one per
    episode), together with the checks deferred so far (:func:`panning._functional.read_together`)."""
    flags = list(score_indices) if score_indices is not None else [None] * len(episodes)
    if len(flags) != len(episodes):
        raise ValueError(f"got {len(episodes)} episodes for {len(flags)} score_indices flags")
    pends = [ep._observe_begin(f) for ep, f in zip(episodes, flags, strict=True)]
    return _observe_end_many(episodes, pends, read_together([p.payload for p in pends if p.payload is not None]))


def _observe_end_many(episodes: Sequence[PruningEpisode], pends: Sequence[_PendingObservation],
                      payloads: Sequence[np.ndarray]) -> list[np.ndarray]:
    """The host half of :func:`observe_many`, given the values of the pending payloads (in order)."""
    parts = iter(payloads)
    values = [next(parts) if p.payload is not None else None for p in pends]
    out = [ep._observe_end(p, v) for ep, p, v in zip(episodes, pends, values, strict=True)]
    if episodes:  # features: the whole call's time less every episode's scoring, shared equally
        elapsed = episodes[-1]._clock() - pends[0].t_start
        scored = sum(ep.timing["score"] - p.score_before for ep, p in zip(episodes, pends, strict=True))
        for ep in episodes:
            ep.timing["features"] += (elapsed - scored) / len(episodes)
    return out


def _signal_tensors(model: nn.Module, masks: Mapping[str, Tensor], batch: tuple[Tensor, Tensor]
                    ) -> tuple[Tensor, list[Tensor]]:
    """(loss, gradients w.r.t. the kept weights θ ⊙ m) of the masked network on ``batch``, in the model's modes."""
    x, y = batch
    with preserved_modes(model):
        ws = masked_weights(model, masks)
        rest = other_tensors(model, ws)
        loss = F.cross_entropy(functional_forward(model, {**rest, **ws}, x), y)
        grads = torch.autograd.grad(loss, list(ws.values()), allow_unused=True, materialize_grads=True)
    return loss.detach(), list(grads)


def _grad_norm(grads: Sequence[Tensor], masks: Mapping[str, Tensor]) -> Tensor:
    sq = torch.zeros((), dtype=torch.float64, device=grads[0].device if grads else None)
    for g, m in zip(grads, masks.values(), strict=True):
        sq += (g.double() * m).pow(2).sum()
    return sq.sqrt()


def masked_signals(model: nn.Module, masks: Mapping[str, Tensor], batch: tuple[Tensor, Tensor]) -> tuple[float, float]:
    """Cross-entropy of the masked network on ``batch`` and the norm of its gradient w.r.t. the kept weights
    (the episode's loss and gradient signals)."""
    return _signals_one_by_one([model], [masks], batch)[0]


def _signals_one_by_one(models: Sequence[nn.Module], masks: Sequence[Mapping[str, Tensor]],
                        batch: tuple[Tensor, Tensor]) -> list[tuple[float, float]]:
    """:func:`masked_signals` of each network computed alone, all values read back together (float64 holds each
    float32 loss exactly)."""
    return _pairs(_signal_rows_one_by_one(models, masks, batch).tolist())


def _signal_rows_one_by_one(models: Sequence[nn.Module], masks: Sequence[Mapping[str, Tensor]],
                            batch: tuple[Tensor, Tensor]) -> Tensor:
    """[2, N] float64, nothing read: each network's loss (row 0) and gradient norm (row 1), computed alone."""
    pairs = [_signal_tensors(m, k, batch) for m, k in zip(models, masks, strict=True)]
    losses = [loss.double() for loss, _ in pairs]
    norms = [_grad_norm(g, k) for (_, g), k in zip(pairs, masks, strict=True)]
    return one_read(losses + norms).reshape(2, len(models))


def _pairs(rows: Sequence[Sequence[float]]) -> list[tuple[float, float]]:
    """(loss, gradient norm) per network from the two rows of a signals tensor."""
    return list(zip(rows[0], rows[1], strict=True))


#: (architecture, batch shapes, device, training modes, N) -> whether the stacked signals matched bit for bit
_SIGNALS_EXACT: dict[tuple, bool] = {}


def _modes(model: nn.Module) -> tuple[bool, ...]:
    return tuple(m.training for m in model.modules())


def signals_many(models: Sequence[nn.Module], masks: Sequence[Masks], batch: tuple[Tensor, Tensor]
                 ) -> list[tuple[float, float]]:
    """``[masked_signals(models[i], masks[i], batch)]``, bit for bit, computed for all networks of one architecture
    at once where that is exact (:func:`signal_rows`), read back in one transfer."""
    return _pairs(signal_rows(models, masks, batch).tolist())


def signal_rows(models: Sequence[nn.Module], masks: Sequence[Masks], batch: tuple[Tensor, Tensor]) -> Tensor:
    """The device half of :func:`signals_many`: [2, N] float64 (losses, then gradient norms), nothing read back
    but the first time an architecture is stacked, when its exactness is checked (float64 holds each float32
    loss exactly).

    Networks of one architecture (module types, state shapes, masked keys and training modes alike; otherwise one
    at a time) are computed as one ``vmap``-ed pass where that is exact. As for the stacked scores
    (:mod:`panning.batched`), whether it is depends on the layers and the device, so the stacked pass is checked
    once per architecture, modes, number of networks, batch shape and device against the first and the last
    network computed alone, and used only where every bit matched; a network the stacked pass cannot run (vmap
    lacks a rule for one of its operations) goes one at a time too."""
    def loop() -> Tensor:
        return _signal_rows_one_by_one(models, masks, batch)

    if len(models) < 2 or any(isinstance(m, nn.modules.dropout._DropoutNd) for m in models[0].modules()):
        return loop()
    key = (*architecture_key("signals", models[0], masks[0], [batch], None), _modes(models[0]), len(models))
    if _SIGNALS_EXACT.get(key) is False or any(
            architecture_key("signals", m, k, [batch], None) != key[:-2] or _modes(m) != key[-2]
            for m, k in zip(models[1:], masks[1:], strict=True)):
        return loop()
    template = models[0]
    x, y = batch
    w, rest = stacked_tensors(models, masks, None, False)

    def loss_of(w_: dict[str, Tensor], r_: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        out = functional_call(template, {**r_, **w_}, (x,), strict=False, tie_weights=True)
        return F.cross_entropy(out, y), out.detach()

    try:
        with preserved_modes(template):
            g, (_, logits) = vmap(grad_and_value(loss_of, has_aux=True), randomness="error")(w, rest)
    except (RuntimeError, ValueError, NotImplementedError):  # no batching rule (or random ops): one at a time
        _SIGNALS_EXACT[key] = False
        return loop()
    # the loss again from each network's own logits: under vmap the batch mean of the cross-entropy can round
    # differently from one network's (seen: 1 ulp), while the logits and gradients match
    loss = torch.stack([F.cross_entropy(logits[i], y) for i in range(len(models))])
    keys = list(masks[0])
    if key not in _SIGNALS_EXACT:
        _SIGNALS_EXACT[key] = True
        for i in (0, len(models) - 1):
            loss_i, grads_i = _signal_tensors(models[i], masks[i], batch)
            _SIGNALS_EXACT[key] &= bool(torch.equal(loss_i, loss[i])) and all(
                torch.equal(a, g[k][i]) and a.dtype == g[k].dtype for a, k in zip(grads_i, keys, strict=True))
        if not _SIGNALS_EXACT[key]:
            return loop()
    norms = [_grad_norm([g[k][i] for k in keys], masks[i]) for i in range(len(models))]
    return torch.stack([loss.double(), torch.stack(norms)])


@dataclass
class _StepsBegun:
    """N steps between their device half and their host half (:func:`_steps_begin`): nothing read back yet."""

    plans: list[_Selection]
    counter: PathCounter
    pending: PendingEffective
    rows: Tensor  # [2, N + fresh] signals: the steps', then the initial ones of first steps
    fresh: list[PruningEpisode]
    todo: list[Masks]  # masks whose layer counts ``counts`` holds
    counts: Tensor
    clocks: tuple[float, float, float]  # before the path counts, after them, after the signals were queued

    def tensors(self) -> list[Tensor]:
        """What the host half needs, in the order :func:`_steps_end` takes it."""
        return [self.pending.finite, self.rows, self.counts]


def _step_values(counter: PathCounter, pending: PendingEffective, todo: Sequence[Masks], values: Sequence[np.ndarray]
                 ) -> tuple[list[Masks], list[tuple[float, float]]]:
    """The effective masks and the signals, given the values a step read back (:meth:`_StepsBegun.tensors`): the
    masks whose unscaled path counts overflowed are redone (and counted) here."""
    finite, rows, cnt = values
    counts_end(todo, cnt.tolist())
    effs = counter.effective_end(pending, (finite != 0).tolist())
    count_all(effs)  # only masks redone by the scaled pass are not counted yet: a read in that rare case alone
    return effs, _pairs(rows.reshape(2, -1).tolist())


def _check_steps(episodes: Sequence[PruningEpisode], actions: Sequence[Any]) -> None:
    """Check every action and that every episode is running, raising before anything moves."""
    if len(episodes) != len(actions):
        raise ValueError(f"got {len(episodes)} episodes for {len(actions)} actions")
    for ep, a in zip(episodes, actions, strict=True):
        if ep.done:
            raise RuntimeError("the episode is over: all pruning steps have run")
        map_action(a, ep.indices, ep.layer_actions)  # raises on a bad action, before anything moves


def _one_group(episodes: Sequence[PruningEpisode]) -> bool:
    """Whether the episodes are one group :func:`step_many` steps at once (two or more, one input shape, model
    type and scoring batch)."""
    if len(episodes) < 2:
        return False
    first = episodes[0]
    if not all(ep.input_shape == first.input_shape and type(ep.model) is type(first.model)
               and ep.batches[0][0].shape == first.batches[0][0].shape
               and ep.batches[0][1].shape == first.batches[0][1].shape for ep in episodes):
        return False
    # the same scoring batch by value, unless it is the same object
    x0, y0 = first.batches[0]
    same = [(ep.batches[0][0] == x0).all() & (ep.batches[0][1] == y0).all() for ep in episodes[1:]
            if ep.batches[0] is not first.batches[0]]
    return not same or bool(one_read(same).all())  # one host read, not two per episode


def _steps_begin(episodes: Sequence[PruningEpisode], actions: Sequence[Any]) -> _StepsBegun:
    """The device half of :func:`step_many` for one group (:func:`_one_group`) or one episode (then the same
    computations as its :meth:`PruningEpisode.step`): every network pruned, its path counts, signals and layer
    counts queued."""
    first = episodes[0]
    plans = [ep._select(a) for ep, a in zip(episodes, actions, strict=True)]
    t0 = plans[-1].clock  # the stages' time follows on from the selections' without a gap
    counter = first.path_counter()
    pending = counter.effective_begin([p.masks for p in plans], first.input_shape)
    t1 = first._clock()
    fresh = [ep for ep in episodes if ep._signals0 is None]  # first steps: the signals before them too
    signals = signal_rows if len(episodes) > 1 else _signal_rows_one_by_one
    rows = signals([ep.model for ep in episodes] + [ep.model for ep in fresh],
                   [p.masks for p in plans] + [ep._masks0 for ep in fresh], first.batches[0])
    todo, queued = counts_begin([p.masks for p in plans] + pending.out)  # what the observations and infos count
    counts = one_read(queued) if queued else torch.zeros(0, dtype=torch.long, device=pending.finite.device)
    return _StepsBegun(plans, counter, pending, rows, fresh, todo, counts, (t0, t1, first._clock()))


def _steps_end(episodes: Sequence[PruningEpisode], begun: _StepsBegun, values: Sequence[np.ndarray],
               advanced: bool = False) -> list[EpisodeStep]:
    """The host half of :func:`step_many`, given :meth:`_StepsBegun.tensors`' values (``advanced``: the
    episodes' step counters were moved on already, by :func:`step_observe_many`)."""
    effs, both = _step_values(begun.counter, begun.pending, begun.todo, values)
    sigs = both[: len(episodes)]
    for ep, s0 in zip(begun.fresh, both[len(episodes) :], strict=True):
        ep._signals0 = s0
    t0, t1, queued = begun.clocks
    t2 = queued if advanced else episodes[0]._clock()  # with step_observe_many's read, the observation's time
    out = []
    for ep, plan, eff, (loss, grad) in zip(episodes, begun.plans, effs, sigs, strict=True):
        ep.timing["connectivity"] += (t1 - t0) / len(episodes)
        ep.timing["signal"] += (t2 - t1) / len(episodes)
        if not advanced:
            ep._advance(plan)
        out.append(ep._conclude(plan, eff, loss, grad))
    return out


@deferred_checks()
def step_many(episodes: Sequence[PruningEpisode], actions: Sequence[Any]) -> list[EpisodeStep]:
    """``[ep.step(a) for ep, a in zip(episodes, actions)]`` for episodes of one architecture (a vectorised env's),
    the same steps bit for bit, with every network's effective masks and loss/gradient signals computed at once:
    :meth:`panning.connectivity.PathCounter.effective_many` and :func:`signals_many`. Episodes that differ in
    architecture, input shape or scoring batch are stepped one after the other. Every action is checked and
    every episode must be running before any network is pruned, so a refusal leaves all of them as they were.
    Each episode's ``timing`` gets an equal share of the two batched stages."""
    _check_steps(episodes, actions)
    if not _one_group(episodes):
        return [ep.step(a) for ep, a in zip(episodes, actions, strict=True)]
    begun = _steps_begin(episodes, actions)
    return _steps_end(episodes, begun, read_together(begun.tensors()))


@deferred_checks()
def step_observe_many(episodes: Sequence[PruningEpisode], actions: Sequence[Any],
                      prefill: Callable[[Sequence[PruningEpisode]], None] | None = None
                      ) -> tuple[list[EpisodeStep], list[np.ndarray]] | None:
    """``step_many(episodes, actions)``, then ``prefill(episodes)`` (scoring the indices on the new masks, as a
    vectorised env does for N networks at once), then ``observe_many(episodes)``: the same steps and
    observations bit for bit, with one host read for all of it (on a GPU one wait for the device a step: the
    values the step's rewards and the observations need, handed over together).

    One episode is stepped as its :meth:`PruningEpisode.step` would (the plain env's route). The indices are
    scored on every new network before the read says whether a step collapsed it, so an index must give
    finite scores on a collapsed network (the shipped ones do: a test; with ``terminate_on_collapse: false``
    the env always scored them). If the scoring or the read fails, the networks stay pruned and the episodes
    do not count the step (what a failed deferred check leaves): they are to be discarded. In ``timing``, the
    step's host half (and on a GPU its wait for the device) counts as ``features``. For steps that leave
    every episode running: ``None``, with nothing done, where a step would end one (its observation would not
    score the indices) or where :func:`step_many` would step the episodes one after the other. (An env that ends
    an episode on a collapse observes that one again, without the index features: :meth:`PruningEpisode.observe`
    with ``score_indices=False`` reads nothing.)"""
    if not episodes or any(ep.t + 1 >= ep.T for ep in episodes):
        return None
    _check_steps(episodes, actions)
    if len(episodes) > 1 and not _one_group(episodes):
        return None
    begun = _steps_begin(episodes, actions)
    before = [(ep.t, ep.u) for ep in episodes]
    for ep, plan in zip(episodes, begun.plans, strict=True):
        ep._advance(plan)  # what the observation's device half needs: the step counter and the budget used
    try:
        if prefill is not None:
            prefill(episodes)
        pends = [ep._observe_begin(None) for ep in episodes]
        head = begun.tensors()
        values = read_together(head + [p.payload for p in pends if p.payload is not None])
        steps = _steps_end(episodes, begun, values[: len(head)], advanced=True)
    except BaseException:  # as when a step's own deferred check fails: the networks pruned, the step not counted
        for ep, (t, u) in zip(episodes, before, strict=True):
            ep.t, ep.u = t, u
        raise
    return steps, _observe_end_many(episodes, pends, values[len(head) :])
