"""The literature's analyses of pruning at initialisation, as functions (the ``panning`` command runs them).

- **Sanity checks** (Frankle et al., 2021, "Pruning Neural Networks at Initialization: Why are We
  Missing the Mark?"; Su et al., 2020): :func:`shuffle_within_layers` (the same count per layer,
  positions drawn at random) and :func:`invert_within_layers` (per layer, the lowest-scored weights
  at the same counts); re-initialisation is :func:`panning.models.reinit_weights`.
- **Layer statistics of the kept weights** (Singh & Liu, 2021, "Why is Pruning at Initialization
  Immune to Reinitializing and Shuffling?"): :func:`layer_statistics`, with the two-sample
  Kolmogorov-Smirnov statistic (:func:`ks_statistic`) between a layer's kept weights and all of
  its initial weights.
- **Layer collapse and critical compression** (Tanaka et al., 2020): :func:`critical_sparsity`, the
  largest sparsity at which a method still leaves a path from input to output, by bisection.
- **Recall distortion** (Good et al., 2022): :func:`recall_distortion`, per class the recall change
  relative to the dense network's, and whether classes the dense network recalls worse than its
  accuracy lose relatively more (intensification).
- **Pruning instability** (Bartoldson et al., 2020): the accuracy drop right after pruning a
  trained network, before any retraining (``panning instability``).
"""
from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from panning.masks import Masks, _topk_mask

__all__ = [
    "critical_sparsity",
    "invert_within_layers",
    "ks_statistic",
    "layer_statistics",
    "paired_comparison",
    "recall_distortion",
    "shuffle_within_layers",
]


def shuffle_within_layers(masks: Masks, seed: int) -> Masks:
    """The same number of kept weights in every layer, at positions drawn uniformly at random
    (a seeded permutation of each layer's mask)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, m in masks.items():
        flat = m.reshape(-1).cpu()
        out[k] = flat[torch.randperm(flat.numel(), generator=g)].reshape(m.shape).to(m.device)
    return Masks(out)


def invert_within_layers(masks: Masks, scores: Mapping[str, Tensor]) -> Masks:
    """Per layer, keep as many weights as ``masks`` keeps there, but the *lowest*-scored ones (ties to
    the lowest index, as the pruner breaks ties the other way round)."""
    out = {}
    for k, m in masks.items():
        s = scores[k].reshape(-1).to(torch.float64)
        if not bool(torch.isfinite(s).all()):
            raise ValueError(f"scores of {k!r} are not finite")
        out[k] = _topk_mask(-s, int(m.sum())).reshape(m.shape).to(m.device)
    return Masks(out)


def ks_statistic(a: Tensor, b: Tensor) -> float:
    """Two-sample Kolmogorov-Smirnov statistic: the largest distance between the empirical CDFs of
    ``a`` and ``b`` (0 for one distribution, 1 for disjoint supports); NaN if either is empty."""
    a, b = a.reshape(-1).double().sort().values, b.reshape(-1).double().sort().values
    if a.numel() == 0 or b.numel() == 0:
        return float("nan")
    both = torch.cat([a, b])
    cdf_a = torch.searchsorted(a, both, right=True).double() / a.numel()
    cdf_b = torch.searchsorted(b, both, right=True).double() / b.numel()
    return float((cdf_a - cdf_b).abs().max())


def layer_statistics(weights: Mapping[str, Tensor], masks: Masks,
                     reference: Mapping[str, Tensor] | None = None) -> dict[str, dict[str, float]]:
    """Per layer: density, and the mean, standard deviation and mean absolute value of the kept weights
    of ``weights``; ``ks``: :func:`ks_statistic` between the kept weights and every weight of the layer
    in ``reference`` (default: ``weights`` themselves, i.e. the layer's full initial distribution)."""
    out: dict[str, dict[str, float]] = {}
    for k, m in masks.items():
        w = weights[k].detach().reshape(-1).double().cpu()
        kept = w[m.reshape(-1).cpu()]
        full = (reference[k] if reference is not None else weights[k]).detach().reshape(-1).double().cpu()
        n = kept.numel()
        out[k] = {
            "density": n / m.numel(),
            "mean": float(kept.mean()) if n else float("nan"),
            "std": float(kept.std(unbiased=False)) if n else float("nan"),
            "mean_abs": float(kept.abs().mean()) if n else float("nan"),
            "ks": ks_statistic(kept, full),
        }
    return out


def paired_comparison(base: Sequence[float], other: Sequence[float]) -> dict[str, float]:
    """``other - base`` seed by seed: mean and standard deviation of the differences and the paired t
    statistic ``mean / (sd / sqrt(n))`` (NaN for fewer than two seeds or equal differences)."""
    diffs = [o - b for b, o in zip(base, other, strict=True)]
    mean = statistics.fmean(diffs) if diffs else float("nan")
    sd = statistics.stdev(diffs) if len(diffs) > 1 else float("nan")
    t = mean / (sd / math.sqrt(len(diffs))) if len(diffs) > 1 and sd > 0 else float("nan")
    return {"mean_difference": mean, "std_difference": sd, "t": t, "n": len(diffs)}


def critical_sparsity(collapses: Callable[[float], bool], lo: float = 0.0, hi: float = 0.9999,
                      tol: float = 1e-4) -> float:
    """The largest sparsity in ``[lo, hi]`` (to ``tol`` in log-density) at which ``collapses(s)`` is
    False, by bisection on the log of the density (collapse is assumed monotone in sparsity). Returns
    ``hi`` if nothing up to ``hi`` collapses and ``lo`` if already ``lo`` does; the critical
    compression ratio is ``1 / (1 - result)``."""
    if collapses(lo):
        return lo
    if not collapses(hi):
        return hi
    a, b = math.log(1 - lo), math.log(1 - hi)  # log-densities, a > b
    while a - b > tol:
        mid = 0.5 * (a + b)
        if collapses(1 - math.exp(mid)):
            b = mid
        else:
            a = mid
    return 1 - math.exp(a)


def recall_distortion(dense_recall: Sequence[float], dense_accuracy: float, pruned_recall: Sequence[float],
                      pruned_accuracy: float) -> dict[str, Any]:
    """Per class, the recall change relative to the dense network's, ``r_c = R'_c / R_c - 1``, against
    the accuracy's, ``a = A' / A - 1``; the distortion ``d_c = r_c - a``.

    Intensification (Good et al., 2022) says pruning hurts, relatively, the classes the dense network
    recalls worse than its accuracy (``R_c < A``: ``d_c < 0``) and spares the others (``d_c > 0``).
    ``intensification_ratio`` is the share of classes (with ``R_c != A`` and ``d_c != 0``) whose
    distortion has that sign: above 0.5 intensification, below 0.5 de-intensification. (The paper
    defines a model-level ratio from the same comparison; its text was not at hand here, so this is
    the stated equivalent.) ``rho`` is Spearman's correlation of ``R_c`` and ``d_c`` (positive:
    intensification).
    """
    if len(dense_recall) != len(pruned_recall):
        raise ValueError("dense and pruned recalls must list the same classes")
    a = pruned_accuracy / dense_accuracy - 1.0
    rows, votes = [], []
    for c, (r0, r1) in enumerate(zip(dense_recall, pruned_recall, strict=True)):
        if not (r0 > 0 and math.isfinite(r0) and math.isfinite(r1)):
            continue
        rel = r1 / r0 - 1.0
        d = rel - a
        rows.append({"class": c, "dense_recall": r0, "pruned_recall": r1, "relative_change": rel, "distortion": d})
        if r0 != dense_accuracy and d != 0:
            votes.append((r0 < dense_accuracy) == (d < 0))
    ratio = sum(votes) / len(votes) if votes else float("nan")
    return {"classes": rows, "relative_accuracy_change": a, "intensification_ratio": ratio,
            "rho": _spearman([r["dense_recall"] for r in rows], [r["distortion"] for r in rows])}


def _ranks(v: Sequence[float]) -> list[float]:
    order = sorted(range(len(v)), key=lambda i: v[i])
    ranks = [0.0] * len(v)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and v[order[j + 1]] == v[order[i]]:
            j += 1
        for k in range(i, j + 1):  # ties share their mean rank
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def _spearman(x: Sequence[float], y: Sequence[float]) -> float:
    if len(x) < 2:
        return float("nan")
    rx, ry = _ranks(x), _ranks(y)
    mx, my = statistics.fmean(rx), statistics.fmean(ry)
    num = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    den = math.sqrt(sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry))
    return num / den if den > 0 else float("nan")


def prunable_weights(model: nn.Module, masks: Masks) -> dict[str, Tensor]:
    """The model's weights of the masked parameters, detached."""
    params = dict(model.named_parameters())
    return {k: params[k].detach().clone() for k in masks}
