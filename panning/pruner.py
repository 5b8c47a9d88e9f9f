"""Multi-index, multi-step pruning: the one stepping core.

Fixed methods (:func:`prune`), the Gymnasium environment and learned policies all drive
:class:`Pruner.step`, so what an agent learned and what a user applies cannot drift apart.

One step:

1. every index in ``Pruner.indices`` scores the *current masked* network
   (:func:`panning.indices.compute_scores`);
2. each index's scores are normalised over the weights still alive (:func:`normalise`);
3. the normalised scores are combined with non-negative weights, ``c = sum_k w_k * n_k`` (optionally
   biased per layer by a factor ``f``: ``c * f`` where ``c > 0``, ``c / f`` elsewhere);
4. the ``keep`` highest combined scores among the alive weights survive
   (:func:`panning.masks.select_topk`, exact count, deterministic tie-break).
"""
from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from panning import indices as _indices
from panning._functional import all_finite, check, flat_nonzero, host_route
from panning.connectivity import effective_masks
from panning.errors import ConfigError
from panning.masks import Masks, keep_count, prunable_parameters, select_topk
from panning.schedules import keep_schedule

Batches = Sequence[tuple[Tensor, Tensor]]

NORMALISATIONS = ("mean", "zscore", "abs_zscore", "rank", "none")


def normalise(score: Tensor, alive: Tensor, how: str = "mean", *, alive_index: Tensor | None = None) -> Tensor:
    """Put one index's flat scores on a common scale, using statistics of the alive weights only.

    - ``mean`` (default): ``s / mean(|s|)``. Panning divides each index by its global mean; we use
      the mean of absolute values so signed indices (GraSP) keep their sign. It is a positive
      rescaling, so it never changes the index's own ranking: a one-hot weighting reproduces that
      single index's masks exactly, which the environment's tests rely on.
    - ``zscore``: ``(s - mean) / std``; also order-preserving.
    - ``abs_zscore``: ``|s - mean| / std``, Panning's published normalisation taken literally. It is
      *not* order-preserving (weights far below the mean count as important), so it is opt-in.
    - ``rank``: the fraction of alive weights scored at or below each weight, in (0, 1]; robust to
      SynFlow's heavy tails, order-preserving up to ties.
    - ``none``: raw scores.

    Pruned positions get 0; the caller never selects them anyway. ``alive_index`` (``alive.nonzero()[:, 0]``,
    which a caller normalising several indices over the same weights computes once) gives the same result.
    """
    # Everything is computed on the alive entries, gathered by index (the elements of score[alive], in order,
    # ~50x faster on the CPU than boolean indexing), and scattered into zeros: the same numbers as computing
    # on the whole vector and zeroing the pruned positions, at a fraction of the memory traffic.
    idx = flat_nonzero(alive) if alive_index is None else alive_index
    a = score.index_select(0, idx).to(torch.float64)
    if a.numel() == 0 or how == "none":
        v = a
    elif how == "mean":
        scale = a.abs().mean()
        v = torch.where(scale > 0, a / scale, a)  # not ``if scale > 0``: that reads the device's value back
    elif how in ("zscore", "abs_zscore"):
        std = a.std(unbiased=False)
        z = torch.where(std > 0, (a - a.mean()) / std, a - a.mean())
        v = z.abs() if how == "abs_zscore" else z
    elif how == "rank":
        order = torch.sort(a, stable=True).indices
        ranks = torch.empty_like(a)
        ranks[order] = torch.arange(1, a.numel() + 1, dtype=torch.float64, device=a.device)
        v = ranks / a.numel()
    else:
        raise ConfigError(f"unknown normalisation {how!r}; known: {', '.join(NORMALISATIONS)}")
    return torch.zeros(score.shape, dtype=torch.float64, device=score.device).index_copy_(0, idx, v)


@dataclass
class StepRecord:
    """What one pruning step did."""

    step: int
    weights: dict[str, float]
    keep: int
    sparsity: float
    score_seconds: float
    select_seconds: float


class Pruner:
    """Holds a network, its scoring data and its current masks, and prunes it step by step.

    The model itself is never modified: indices score the masked network functionally, and masks
    are returned, not applied. Call :meth:`step` T times, or use :func:`prune` for a fixed method.
    """

    def __init__(
        self,
        model: nn.Module,
        indices: Sequence[str],
        batches: Batches | None = None,
        *,
        input_shape: Sequence[int] | None = None,
        exclude: Sequence[str] = (),
        mode: str = "global",
        normalisation: str = "mean",
        min_per_layer: int = 0,
        seed: int = 0,
        masks: Masks | None = None,
        regrow: bool = False,
        dense_indices: Sequence[str] = (),
        temperatures: Mapping[str, float] | None = None,
        share_passes: bool = True,
    ) -> None:
        if len(indices) == 0:
            raise ValueError("at least one saliency index is needed")
        known = _indices.available_indices()
        for name in indices:
            if name not in known:
                raise ConfigError(f"unknown index {name!r}; known indices: {', '.join(known)}")
        if len(set(indices)) != len(indices):
            raise ConfigError(f"indices must be distinct, got {list(indices)}")
        temperatures = dict(temperatures or {})
        for name in [*dense_indices, *temperatures]:
            if name not in indices:
                raise ConfigError(f"dense_indices and temperatures name indices of this pruner {list(indices)}; "
                                  f"got {name!r}")
        for name, t in temperatures.items():
            if not (t > 0 and t < float("inf")):
                raise ConfigError(f"the logit temperature of {name!r} must be positive and finite, got {t}")
        if normalisation not in NORMALISATIONS:
            raise ConfigError(f"unknown normalisation {normalisation!r}; known: {', '.join(NORMALISATIONS)}")
        if mode not in ("global", "layerwise"):
            raise ConfigError(f"unknown selection mode {mode!r}; use 'global' or 'layerwise'")
        needs_data = [n for n in indices if _indices.INDICES[n].needs_data]
        if needs_data and (batches is None or len(batches) == 0 or any(len(x) == 0 for x, _ in batches)):
            raise ValueError(f"indices {needs_data} need a non-empty scoring batch")
        if input_shape is None:
            if not batches:
                raise ValueError("give input_shape (without the batch dimension) or scoring batches")
            input_shape = tuple(batches[0][0].shape[1:])
        self.model = model
        self.indices = list(indices)
        self.batches = list(batches) if batches is not None else None
        self.input_shape = tuple(int(d) for d in input_shape)
        self.mode = mode
        self.normalisation = normalisation
        self.min_per_layer = int(min_per_layer)
        self.seed = int(seed)
        self.exclude = tuple(exclude)
        self.regrow = bool(regrow)
        self.dense_indices = tuple(dense_indices)
        self.temperatures = temperatures
        self.share_passes = bool(share_passes)
        if masks is None:
            masks = Masks.ones(model, exclude=exclude)
        else:
            masks.check(model)
        device = next(iter(prunable_parameters(model, exclude).values())).device
        self.masks = masks.to(device)
        self.num_total = self.masks.num_total
        self.history: list[StepRecord] = []
        self._scores: dict[str, dict[str, Tensor]] | None = None
        self._normalised: dict[str, Tensor] = {}
        self._alive: Tensor | None = None
        self._alive_positions: Tensor | None = None
        self._dense_scores: dict[str, dict[str, Tensor]] = {}  # scores of the unpruned network: computed once

    @property
    def steps_done(self) -> int:
        """Number of :meth:`step` calls so far."""
        return len(self.history)

    def scores(self, names: Sequence[str] | None = None) -> dict[str, dict[str, Tensor]]:
        """Raw scores of each index on the current masked network (on the unpruned one for
        ``dense_indices``), cached until the next step (for ``dense_indices``, for good).

        The missing indices are computed together (:func:`panning.indices.compute_many`), so with
        ``share_passes`` SNIP and GraSP share one forward pass and gradient; indices with their own logit
        temperature are computed in a group of their own, with ``cross_entropy(logits / T, y)``."""
        wanted = list(names) if names is not None else self.indices
        if self._scores is None:
            self._scores = {}
        for name in wanted:
            if name in self.dense_indices and name in self._dense_scores:
                self._scores[name] = self._dense_scores[name]
        groups: dict[tuple[bool, float | None], list[str]] = {}
        for name in wanted:
            if name not in self._scores:
                groups.setdefault((name in self.dense_indices, self.temperatures.get(name)), []).append(name)
        for (dense, temperature), group in groups.items():
            # the unpruned network does not change between steps: score it once, with the first step's seed
            masks = {k: torch.ones_like(m) for k, m in self.masks.items()} if dense else self.masks
            computed = _indices.compute_many(
                group, self.model, masks, self.batches,
                input_shape=self.input_shape,
                seed=self.seed * 100_003 if dense else self.score_seed(),
                loss_fn=_tempered_cross_entropy(temperature) if temperature is not None else F.cross_entropy,
                share=self.share_passes,
            )
            self._scores.update(computed)
            if dense:
                self._dense_scores.update(computed)
        return {n: self._scores[n] for n in wanted}

    def needs_scores(self, name: str) -> bool:
        """True if index ``name`` has not been scored on the current masks yet (never for ``dense_indices``:
        the pruner scores the unpruned network itself)."""
        if name in self.dense_indices:
            return False
        return self._scores is None or name not in self._scores

    def provide_scores(self, name: str, scores: Mapping[str, Tensor]) -> None:
        """Use ``scores`` as index ``name``'s scores of the current masks (a vectorised caller computed
        them for many pruners at once); they must be what :meth:`scores` would compute."""
        if name not in self.indices:
            raise ValueError(f"index {name!r} is not one of this pruner's {self.indices}")
        if name in self.dense_indices:
            raise ValueError(f"index {name!r} scores the unpruned network here; the pruner computes it itself")
        if list(scores) != list(self.masks) or any(scores[k].shape != m.shape for k, m in self.masks.items()):
            raise ValueError(f"scores for {name!r} do not have the masks' keys and shapes")
        if self._scores is None:
            self._scores = {}
        self._scores[name] = dict(scores)
        self._normalised.pop(name, None)

    def score_seed(self) -> int:
        """The seed :meth:`scores` gives the indices at this step."""
        return self.seed * 100_003 + self.steps_done

    def alive_flat(self) -> Tensor:
        """The current masks as one flat boolean vector, in key order (cached until the next step)."""
        if self._alive is None:
            self._alive = torch.cat([m.reshape(-1) for m in self.masks.values()])
        return self._alive

    def alive_positions(self) -> Tensor:
        """The flat positions of the alive weights, in key order (cached until the next step; on a GPU found
        without a host read when the masks' kept count is known, as it is after every step)."""
        if self._alive_positions is None:
            self._alive_positions = flat_nonzero(self.alive_flat(), count=self.masks.known_kept())
        return self._alive_positions

    def normalised_scores(self, name: str) -> Tensor:
        """One index's scores, flattened in key order and normalised over the alive weights (cached until
        the next step: a step and the observation after it read each index several times)."""
        if name in self._normalised:
            return self._normalised[name]
        flat = torch.cat([s.reshape(-1) for s in self.scores([name])[name].values()])
        # with regrow every weight competes, pruned ones included: normalise over all of them
        alive = torch.ones_like(self.alive_flat()) if self.regrow else self.alive_flat()
        # the positions normalisation runs over: all of them with regrow
        index = torch.arange(alive.numel(), device=alive.device) if self.regrow else self.alive_positions()
        if not (host_route(flat) and bool(all_finite(flat))):  # on the CPU, the common case costs one fast check
            check(torch.isfinite(flat.index_select(0, index)).all(),
                  lambda: ValueError(f"index {name!r} produced NaN or infinite scores for unpruned weights"))
        self._normalised[name] = normalise(flat, alive, self.normalisation, alive_index=index)
        return self._normalised[name]

    def weights_dict(self, weights: Sequence[float] | Mapping[str, float]) -> dict[str, float]:
        """Validate index weights: one non-negative finite value per index, not all zero."""
        if isinstance(weights, Mapping):
            unknown = set(weights) - set(self.indices)
            if unknown:
                raise ValueError(f"weights given for indices not in this pruner: {sorted(unknown)}")
            w = {n: float(weights.get(n, 0.0)) for n in self.indices}
        else:
            values = list(weights)
            if len(values) != len(self.indices):
                raise ValueError(f"expected {len(self.indices)} index weights for {self.indices}, got {len(values)}")
            w = {n: float(v) for n, v in zip(self.indices, values, strict=True)}
        for n, v in w.items():
            if not (v >= 0.0 and v < float("inf")):
                raise ValueError(f"index weights must be finite and non-negative; {n} got {v}")
        if sum(w.values()) <= 0.0:
            raise ValueError("index weights are all zero; at least one index needs a positive weight")
        return w

    def combined_scores(self, weights: Sequence[float] | Mapping[str, float],
                        layer_factors: Sequence[float] | None = None) -> dict[str, Tensor]:
        """Weighted sum of normalised index scores, reshaped per parameter; ``layer_factors`` (one positive
        finite factor per masked parameter, in key order) scales each layer's scores as ``c * f`` where
        ``c > 0`` and ``c / f`` elsewhere, so a factor above 1 protects the layer whatever the sign."""
        w = self.weights_dict(weights)
        if layer_factors is not None:
            layer_factors = [float(f) for f in layer_factors]
            if len(layer_factors) != len(self.masks) or not all(0.0 < f < float("inf") for f in layer_factors):
                raise ValueError(f"expected {len(self.masks)} positive finite layer factors, got {layer_factors}")
        self.scores([n for n, wk in w.items() if wk != 0.0])  # together: indices that share passes share them
        total: Tensor | None = None
        for name, wk in w.items():
            if wk == 0.0:
                continue  # indices with no weight are not even computed
            part = wk * self.normalised_scores(name)
            total = part if total is None else total + part
        assert total is not None
        out: dict[str, Tensor] = {}
        offset = 0
        for i, (key, m) in enumerate(self.masks.items()):
            c = total[offset : offset + m.numel()].view(m.shape)
            if layer_factors is not None and layer_factors[i] != 1.0:
                f = layer_factors[i]
                c = torch.where(c > 0, c * f, c / f)
            out[key] = c
            offset += m.numel()
        return out

    def step(self, weights: Sequence[float] | Mapping[str, float], keep: int,
             layer_factors: Sequence[float] | None = None) -> Masks:
        """Prune to exactly ``keep`` weights with the given index weights (and per-layer factors, see
        :meth:`combined_scores`); returns the new masks."""
        keep = int(keep)
        limit = self.num_total if self.regrow else self.masks.num_kept
        if keep < 0 or keep > limit:
            raise ValueError(f"keep must be between 0 and the {limit} weights that can be kept, got {keep}")
        w = self.weights_dict(weights)
        t0 = time.perf_counter()
        combined = self.combined_scores(w, layer_factors)
        t1 = time.perf_counter()
        masks = select_topk(combined, keep, current=None if self.regrow else self.masks, mode=self.mode,
                            min_per_layer=self.min_per_layer)
        t2 = time.perf_counter()
        self.masks = masks
        self._scores = None
        self._normalised, self._alive, self._alive_positions = {}, None, None
        # select_topk keeps exactly ``keep``: the sparsity follows without counting the masks again
        sparsity = 1.0 - keep / self.num_total if self.num_total else 0.0
        self.history.append(StepRecord(self.steps_done + 1, w, keep, sparsity, t1 - t0, t2 - t1))
        return masks

    def step_to_sparsity(self, weights: Sequence[float] | Mapping[str, float], sparsity: float) -> Masks:
        """:meth:`step` with the target given as a sparsity over prunable weights."""
        return self.step(weights, keep_count(self.num_total, sparsity))


# --------------------------------------------------------------------------------------------------
# Fixed methods


WeightFn = Callable[[float], Sequence[float]]

PANNING_TABLE: tuple[tuple[float, tuple[float, float, float]], ...] = (
    # (upper bound of current sparsity, weights for synflow, snip, grasp_abs)
    (0.80, (0.2, 0.5, 0.3)),
    (0.90, (0.2, 0.4, 0.4)),
    (0.98, (0.2, 0.3, 0.5)),
    (0.99, (0.4, 0.2, 0.4)),
    (float("inf"), (0.5, 0.0, 0.5)),
)


def _tempered_cross_entropy(temperature: float) -> Callable[[Tensor, Tensor], Tensor]:
    """``cross_entropy(logits / T, y)``: GraSP's original code divides the logits by ``T = 200``."""
    def loss(out: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(out / temperature, y)
    return loss


def panning_weights(sparsity: float) -> tuple[float, float, float]:
    """Panning's published fixed weight table (Kang et al., 2022) for (synflow, snip, grasp_abs).

    Chosen by the network's *current* sparsity before the step: below 80% (0.2, 0.5, 0.3),
    80-90% (0.2, 0.4, 0.4), 90-98% (0.2, 0.3, 0.5), 98-99% (0.4, 0.2, 0.4), from 99% (0.5, 0, 0.5).
    """
    for bound, w in PANNING_TABLE:
        if sparsity < bound:
            return w
    raise AssertionError("unreachable")


@dataclass(frozen=True)
class Method:
    """A fixed pruning method: which indices, how to weight them, and how its paper scheduled it."""

    name: str
    indices: tuple[str, ...]
    weights: WeightFn
    iterations: int = 1
    schedule: str = "exponential"
    doc: str = ""
    regrow: bool = False  # every step selects among all weights, so pruned ones can return (FORCE)
    # the options that reproduce Panning's reference code (see METHODS["panning_authors"])
    weights_by: str = "current"  # the table row follows the network's "current" or the step's "target" sparsity
    dense_indices: tuple[str, ...] = ()  # indices scored on the unpruned network at every step
    temperatures: tuple[tuple[str, float], ...] = ()  # (index, T): its loss is cross_entropy(logits / T, y)
    normalisation: str | None = None  # the method's own normalisation (None: the caller's, default "mean")


def _single(name: str, iterations: int = 1) -> Method:
    return Method(name, (name,), lambda s: (1.0,), iterations, "exponential", f"the {name} index alone")


METHODS: dict[str, Method] = {
    "random": _single("random"),
    "magnitude": _single("magnitude"),
    "snip": _single("snip"),
    "grasp": _single("grasp"),
    "grasp_abs": _single("grasp_abs"),
    "fts": _single("fts"),
    # SynFlow is defined as an iterative method: 100 steps on an exponential schedule.
    "synflow": _single("synflow", iterations=100),
    # de Jorge et al., 2021 (Progressive Skeletonization): 60 exponential steps, as their code's examples
    "iter_snip": Method("iter_snip", ("snip",), lambda s: (1.0,), 60, "exponential",
                        "Iterative SNIP: SNIP of the pruned network, 60 exponential steps (de Jorge et al., 2021)"),
    "force": Method("force", ("force",), lambda s: (1.0,), 60, "exponential",
                    "FORCE: the force index over 60 exponential steps, selecting among all weights each step, so "
                    "pruned weights can return (de Jorge et al., 2021)", regrow=True),
    # Iurada et al., 2024 (PX): their code prunes every pruning-at-initialisation method in `rounds` steps of density
    # d^(t/T); their launch scripts set rounds: 100
    "synflow_l2": Method("synflow_l2", ("synflow_l2",), lambda s: (1.0,), 100, "exponential",
                         "SynFlow with squared weights, 100 exponential steps (PX authors' code, Iurada et al., 2024)"),
    "px": Method("px", ("px",), lambda s: (1.0,), 100, "exponential",
                 "PX (Path eXclusion): the px index over 100 exponential steps (Iurada et al., 2024)"),
    # Alizadeh et al., 2022: ProsPr prunes in a single shot
    "prospr": _single("prospr"),
    # Wang et al., 2023: NTK-SAP is iterative, 20 exponential steps (the authors' example script, --prune-epochs 20)
    "ntk_sap": Method("ntk_sap", ("ntk_sap",), lambda s: (1.0,), 20, "exponential",
                      "NTK-SAP: the ntk_sap index over 20 exponential steps (Wang et al., 2023)"),
    "panning": Method(
        "panning",
        ("synflow", "snip", "grasp_abs"),
        panning_weights,
        iterations=100,
        schedule="exponential",
        doc="Panning's non-RL mode: SynFlow, SNIP, |GraSP| weighted by a fixed sparsity-dependent table",
    ),
    # Panning as its authors' reference code runs it. Differences from "panning" above (every index scored on
    # the masked network, selection among the alive weights, the row chosen by the current sparsity, s / mean|s|):
    #  1. SNIP and |GraSP| score the *dense* network at every step (computed once here: it does not change);
    #     SynFlow scores the masked one;
    #  2. every step selects among all weights, so pruned weights can return (regrow);
    #  3. the weight-table row is chosen by the step's *target* sparsity, not the network's current one;
    #  4. each index is normalised as the absolute z-score of s / mean(s) over all weights, which equals the
    #     absolute z-score of s (a z-score ignores scaling; the sign of mean(s) is removed by the absolute value)
    #     whenever mean(s) != 0: normalisation "abs_zscore";
    #  5. GraSP's loss divides the logits by T = 200 (as GraSP's original code).
    # Steps: 100 on the exponential schedule, as "panning".
    "panning_authors": Method(
        "panning_authors",
        ("synflow", "snip", "grasp_abs"),
        panning_weights,
        iterations=100,
        schedule="exponential",
        doc="Panning as its authors' code runs it: SNIP and |GraSP| (logits / 200) on the dense network, SynFlow on "
            "the masked one, absolute z-scores, the table row by the step's target sparsity, pruned weights can "
            "return",
        regrow=True,
        weights_by="target",
        dense_indices=("snip", "grasp_abs"),
        temperatures=(("grasp_abs", 200.0),),
        normalisation="abs_zscore",
    ),
}

#: the fixed methods of one saliency index, what "the best single index" is chosen among; random is the
#: baseline, not an index (the multi-index methods, panning's tables and agents are not single indices)
SINGLE_INDEX_METHODS = frozenset(n for n, m in METHODS.items() if len(m.indices) == 1 and n != "random")


def available_methods() -> list[str]:
    """Names accepted by :func:`prune`."""
    return sorted(METHODS)


def get_method(name: str) -> Method:
    """Look up a fixed method, with an error that lists the known ones."""
    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r}; known methods: {', '.join(available_methods())}")
    return METHODS[name]


@dataclass
class PruneResult:
    """Masks plus what it took to get them."""

    masks: Masks
    method: str
    sparsity: float
    effective_sparsity: float
    collapsed: list[str]  # layers with no kept weight on any input-output path
    empty: list[str]  # layers with no kept weight at all (a subset of ``collapsed``)
    iterations: int
    schedule: str
    seconds: float
    history: list[StepRecord] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)  # method-specific record, e.g. a policy's choices

    def summary(self) -> dict[str, Any]:
        """JSON-ready description (the body of ``prune.json``)."""
        return {
            "method": self.method,
            "sparsity": self.sparsity,
            "effective_sparsity": self.effective_sparsity,
            "collapsed_layers": self.collapsed,
            "empty_layers": self.empty,
            "kept": self.masks.num_kept,
            "prunable": self.masks.num_total,
            "iterations": self.iterations,
            "schedule": self.schedule,
            "seconds": self.seconds,
            "layers": self.masks.layer_density(),
            "steps": [
                {"step": r.step, "weights": r.weights, "keep": r.keep, "sparsity": r.sparsity}
                for r in self.history
            ],
            **self.extra,
        }


def finish(pruner: Pruner, method: str, schedule: str, seconds: float) -> PruneResult:
    """Wrap a pruner's final masks with effective sparsity and a collapse check."""
    masks = pruner.masks
    eff = effective_masks(pruner.model, masks, pruner.input_shape)
    dead = [k for k, m in eff.items() if not m.any()]
    empty = [k for k, m in masks.items() if not m.any()]
    if dead:
        # DESIGN: never hand back a disconnected network silently.
        where = f"fully pruned: {empty}" if empty else "no path from input to output"
        warnings.warn(f"layer collapse in {dead} ({where})", RuntimeWarning, stacklevel=3)
    return PruneResult(
        masks, method, masks.sparsity, 1.0 - eff.num_kept / eff.num_total, dead, empty, pruner.steps_done, schedule,
        seconds, pruner.history
    )


def prune(
    model: nn.Module,
    method: str,
    sparsity: float,
    batches: Batches | None = None,
    *,
    iterations: int | None = None,
    schedule: str | None = None,
    input_shape: Sequence[int] | None = None,
    exclude: Sequence[str] = (),
    mode: str = "global",
    normalisation: str = "mean",
    min_per_layer: int = 0,
    seed: int = 0,
    share_passes: bool = True,
) -> PruneResult:
    """Prune ``model`` to ``sparsity`` with a fixed method, as its paper did unless told otherwise.

    ``iterations`` and ``schedule`` override the method's own (1 step for SNIP, GraSP, FTS,
    magnitude and random; 100 exponential steps for SynFlow and Panning). The model is not
    modified; apply the returned masks with :func:`panning.masks.enforce` or ``Masks.apply_``.
    A method with its own normalisation (``panning_authors``) uses it; asking it for another than the
    default ``"mean"`` is refused. ``share_passes=False`` computes every index on its own (same masks,
    slower: for comparisons).
    """
    m = get_method(method)
    if m.normalisation is not None and normalisation not in ("mean", m.normalisation):
        raise ConfigError(f"method {method!r} normalises by {m.normalisation!r} as part of its definition; "
                          f"leave the normalisation at its default (got {normalisation!r})")
    keep_count(1, sparsity)  # validates the range before any work
    steps = m.iterations if iterations is None else iterations
    kind = m.schedule if schedule is None else schedule
    t0 = time.perf_counter()
    pruner = Pruner(
        model,
        m.indices,
        batches,
        input_shape=input_shape,
        exclude=exclude,
        mode=mode,
        normalisation=m.normalisation or normalisation,
        min_per_layer=min_per_layer,
        seed=seed,
        regrow=m.regrow,
        dense_indices=m.dense_indices,
        temperatures=dict(m.temperatures),
        share_passes=share_passes,
    )
    for keep in keep_schedule(pruner.num_total, sparsity, steps, kind):
        at = 1.0 - keep / pruner.num_total if m.weights_by == "target" else pruner.masks.sparsity
        pruner.step(m.weights(at), keep)
    return finish(pruner, method, kind, time.perf_counter() - t0)
