"""N networks of one architecture scored and pruned at once, with the masks N separate pruners give.

:func:`score_networks` computes one index for N networks (an initialisation and masks each) as one
stacked computation where the index allows it: ``torch.func.vmap`` over the networks' parameters and
buffers stacked along a leading axis (SNIP, GraSP and its absolute value, SynFlow in float64,
magnitude). The result must be what :func:`panning.indices.compute_scores` gives for each network
alone, bit for bit, so that the masks are too; whether the stacked kernels are exact depends on the
layers, the device and even the route (on the CPU: SynFlow's and the shared SNIP+GraSP pass's stacked
LeNet-300-100 match, SNIP's alone does not, in some last digits; convolutions under ``vmap`` do not).
So each route is checked once per (index, architecture, batch shape, device, number of networks) against
the one-at-a-time computation of the first and the last network, and used only where both matched;
elsewhere, and for indices without a stacked route (random, FTS), the networks are scored one after the
other. :func:`select_topk_rows` is :func:`panning.masks.select_topk` (global mode, same tie-break:
earlier key, then lower index) over an ``[N, P]`` tensor.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from panning._functional import architecture_key, preserved_modes, seeded, stacked_tensors
from panning.indices import INDICES, LossFn, compute_many, compute_scores
from panning.pruner import Pruner

__all__ = ["STACKED_ROUTES", "may_stack", "prefill_scores", "score_networks", "select_topk_rows"]

Batch = tuple[Tensor, Tensor]
Scores = dict[str, Tensor]
#: indices with a stacked (vmap) route
STACKED_ROUTES = ("magnitude", "snip", "grasp", "grasp_abs", "synflow")
#: stacked routes that give two indices from one pass (SNIP's gradient is GraSP's first), as one network's
#: scoring shares it (:func:`panning.indices.compute_many`)
SHARED_ROUTES = ("snip+grasp", "snip+grasp_abs")
#: (index, device, architecture, batch shapes, N) -> whether the stacked route matched one-at-a-time scoring bit for bit
_EXACT: dict[tuple, bool] = {}


def _dot(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> Tensor:
    return torch.stack([(a[k] * b[k]).sum() for k in a]).sum()


def _stacked(name: str, template: nn.Module, models: Sequence[nn.Module], masks: Sequence[Mapping[str, Tensor]],
             batches: Sequence[Batch] | None, input_shape: Sequence[int] | None, loss_fn: LossFn) -> list[Scores]:
    """The stacked route of index ``name``: the formulas of :mod:`panning.indices`, one network's worth
    written with ``torch.func`` and vmapped over the stack."""

    def fwd(tensors: Mapping[str, Tensor], x: Tensor) -> Tensor:
        return functional_call(template, dict(tensors), (x,), strict=False, tie_weights=True)

    fn: Callable[[dict[str, Tensor], dict[str, Tensor]], Scores]
    if name == "magnitude":
        w, _ = stacked_tensors(models, masks, None, False)
        return [{k: v[i].abs() for k, v in w.items()} for i in range(len(models))]
    if name == "synflow":
        template.eval()
        w, rest = stacked_tensors(models, masks, torch.float64, True)
        shape = tuple(int(s) for s in (input_shape or batches[0][0].shape[1:]))  # type: ignore[index]
        x1 = torch.ones((1, *shape), dtype=torch.float64, device=next(iter(w.values())).device)

        def fn(w: dict[str, Tensor], rest: dict[str, Tensor]) -> Scores:
            g = grad(lambda w_: fwd({**rest, **w_}, x1).sum())(w)
            return {k: (w[k] * g[k]).abs() for k in w}
    else:
        template.train()
        w, rest = stacked_tensors(models, masks, None, False)
        assert batches is not None and len(batches) == 1  # the one-batch form of the formulas below
        x, y = batches[0]

        def loss_of(w_: dict[str, Tensor], rest: dict[str, Tensor]) -> Tensor:
            return loss_fn(fwd({**rest, **w_}, x), y).reshape(())

        if name == "snip":
            def fn(w: dict[str, Tensor], rest: dict[str, Tensor]) -> Scores:
                g = grad(loss_of)(w, rest)
                return {k: (w[k] * g[k]).abs() for k in w}
        else:  # grasp, grasp_abs (with snip, "snip+grasp..."): θ ⊙ Hg by double backward, Hg = ∇(Σ stop(g)·∇L)
            grasp_name = name.removeprefix("snip+")

            def z_of(w_: dict[str, Tensor], r: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
                # one gradient with its graph serves as both g (detached: stop(g)) and ∇L, as the one-network
                # route's _gradient_family does: a forward and a backward fewer than computing g apart
                gf = grad(loss_of)(w_, r)
                g_ = {k: v.detach() for k, v in gf.items()}
                return _dot(gf, g_), g_

            def fn(w: dict[str, Tensor], rest: dict[str, Tensor]) -> Scores:
                hg, g = grad(z_of, has_aux=True)(w, rest)
                s = {k: w[k] * hg[k] for k in w}
                out = {k: v.abs() for k, v in s.items()} if grasp_name == "grasp_abs" else s
                if name.startswith("snip+"):  # SNIP's |θ ⊙ g| from the gradient GraSP needs anyway
                    out.update({f"snip:{k}": (w[k] * g[k]).abs() for k in w})
                return out
    out = vmap(fn, randomness="error")(w, rest)
    return [{k: v[i] for k, v in out.items()} for i in range(len(models))]



def _score_shared(route: str, pruners: Sequence[Pruner]) -> bool:
    """Score SNIP and a GraSP variant of ``pruners`` in one stacked pass (``route`` in :data:`SHARED_ROUTES`)
    and hand each pruner both, where that pass is exact: checked once per architecture, batch shape, device and
    number of networks against the first and the last network's one-at-a-time scores of both. False where it is
    not (nothing handed over)."""
    first = pruners[0]
    models, masks = [p.model for p in pruners], [p.masks for p in pruners]
    key = _stack_key(route, models, masks, first.batches, first.input_shape)
    if key is None or first.batches is None:
        return False
    device = next(models[0].parameters()).device
    batches = [(x.to(device), y.to(device)) for x, y in first.batches]
    seeds = [p.score_seed() for p in pruners]
    with preserved_modes(models[0]), seeded(seeds[0]):
        stacked = _stacked(route, models[0], models, masks, batches, first.input_shape, F.cross_entropy)
    grasp_name = route.removeprefix("snip+")
    split = [({k: s[k].detach() for k in m}, {k: s[f"snip:{k}"].detach() for k in m}) for s, m in zip(stacked, masks,
                                                                                              strict=True)]
    if key not in _EXACT:  # the first and the last network alone against their slices of the stack
        _EXACT[key] = True
        for i in (0, len(models) - 1):
            alone = compute_many(["snip", grasp_name], models[i], masks[i], batches, input_shape=first.input_shape,
                                 seed=seeds[i])
            gi, si = split[i]
            _EXACT[key] &= all(torch.equal(alone[grasp_name][k], gi[k]) and torch.equal(alone["snip"][k], si[k])
                               and alone["snip"][k].dtype == si[k].dtype and alone[grasp_name][k].dtype == gi[k].dtype
                               for k in masks[i])
        if not _EXACT[key]:
            return False
    for p, (g, s) in zip(pruners, split, strict=True):
        p.provide_scores(grasp_name, g)
        p.provide_scores("snip", s)
    return True


def _stack_key(name: str, models: Sequence[nn.Module], masks: Sequence[Mapping[str, Tensor]],
               batches: Sequence[Batch] | None, input_shape: Sequence[int] | None) -> tuple | None:
    """The exactness key (:data:`_EXACT`) of the stacked route :func:`score_networks` would try for these
    networks, or None where it would score them one after the other."""
    data_route = name in ("snip", "grasp", "grasp_abs", *SHARED_ROUTES)
    if (len(models) < 2 or name not in (*STACKED_ROUTES, *SHARED_ROUTES)
            or (data_route and (not batches or len(batches) != 1))
            or any(isinstance(m, nn.modules.dropout._DropoutNd) for m in models[0].modules())):
        return None
    # the number of networks too: a device's batched kernels may be chosen by the batch size (cuBLAS picks its
    # kernel by shape), so exactness found at one N says nothing of another
    key = (*architecture_key(name, models[0], masks[0], batches, input_shape), len(models))
    return None if _EXACT.get(key) is False else key


def may_stack(name: str, models: Sequence[nn.Module], masks: Sequence[Mapping[str, Tensor]],
              batches: Sequence[Batch] | None = None, input_shape: Sequence[int] | None = None) -> bool:
    """Whether :func:`score_networks` would try the stacked route of ``name`` for these networks: there is
    one, there are two networks or more, and it has not been found inexact for this architecture, batch
    shape, device and number of networks (on the CPU, SNIP's and GraSP's stacked gradients of a Linear layer are batched
    matrix products that round differently from one network's: the last digit of some scores)."""
    return _stack_key(name, models, masks, batches, input_shape) is not None


def score_networks(
    name: str,
    models: Sequence[nn.Module],
    masks: Sequence[Mapping[str, Tensor]],
    batches: Sequence[Batch] | None = None,
    *,
    input_shape: Sequence[int] | None = None,
    seeds: Sequence[int] | None = None,
    loss_fn: LossFn = F.cross_entropy,
) -> list[Scores]:
    """``[compute_scores(name, models[i], masks[i], batches, input_shape=..., seed=seeds[i])]``, bit for
    bit, computed for all networks at once where that is exact (see the module docstring). The models
    are not modified."""
    n = len(models)
    if n != len(masks):
        raise ValueError(f"got {n} models for {len(masks)} masks")
    seeds = list(seeds) if seeds is not None else [0] * n

    def one(i: int) -> Scores:
        return compute_scores(name, models[i], masks[i], batches, input_shape=input_shape, seed=seeds[i],
                              loss_fn=loss_fn)

    key = _stack_key(name, models, masks, batches, input_shape)
    if key is None:
        return [one(i) for i in range(n)]
    device = next(models[0].parameters()).device
    dev_batches = [(x.to(device), y.to(device)) for x, y in batches] if batches else None
    with preserved_modes(models[0]), seeded(seeds[0]):
        stacked = _stacked(name, models[0], models, masks, dev_batches, input_shape, loss_fn)
    if key not in _EXACT:  # the first and the last network alone against their slices of the stack
        first, last = one(0), one(n - 1)
        _EXACT[key] = all(torch.equal(alone[k], stacked[i][k]) and alone[k].dtype == stacked[i][k].dtype
                          for i, alone in ((0, first), (n - 1, last)) for k in alone)
        if not _EXACT[key]:
            return [first] + [one(i) for i in range(1, n - 1)] + [last]
    return [{k: s[k].detach() for k in masks[i]} for i, s in enumerate(stacked)]


def select_topk_rows(scores: Tensor, keep: Sequence[int], alive: Tensor | None = None) -> Tensor:
    """Boolean ``[N, P]``: in each row the ``keep[i]`` highest scores among the ``alive`` entries, ties
    to the lowest index, exactly as :func:`panning.masks.select_topk` (global mode) does for one
    network whose weights are concatenated in key order."""
    n, p = scores.shape
    k = torch.as_tensor(list(keep), dtype=torch.long, device=scores.device)
    if k.shape != (n,) or bool((k < 0).any()):
        raise ValueError(f"keep must give one count >= 0 per row, got {list(keep)}")
    vals = scores.to(torch.float64) if not scores.dtype.is_floating_point else scores
    if alive is not None:
        if bool((k > alive.sum(1)).any()):
            raise ValueError("keep exceeds the alive weights of a row")
        vals = vals.masked_fill(~alive, float("-inf"))
    elif bool((k > p).any()):
        raise ValueError("keep exceeds the weights of a row")
    kmax = int(k.max()) if n else 0
    if kmax == 0:
        return torch.zeros(n, p, dtype=torch.bool, device=scores.device)
    top = torch.topk(vals, kmax, dim=1, sorted=True).values  # descending per row
    thr = top.gather(1, (k - 1).clamp(min=0).unsqueeze(1))  # the k-th largest of each row
    chosen = vals > thr
    ties = vals == thr
    if alive is not None:
        ties &= alive
        chosen &= alive
    need = (k - chosen.sum(1)).unsqueeze(1)
    chosen |= ties & (ties.cumsum(1) <= need)
    chosen[k == 0] = False
    return chosen


def prefill_scores(pruners: Sequence[Pruner], indices: Sequence[str] | None = None) -> None:
    """Score ``indices`` (default: each pruner's own) on the current masks of every pruner that has not
    scored them yet, all networks at once (:func:`score_networks`), and hand each pruner its scores:
    its next :meth:`panning.pruner.Pruner.step` or observation then uses them as if it had computed
    them itself. Indices that would be scored one network after the other anyway (:func:`may_stack`) are
    left to the pruners, which compute them when read, together with the other indices they need. The
    pruners must share one architecture and scoring batch."""
    if not pruners:
        return
    wanted = list(indices if indices is not None else pruners[0].indices)
    for route in SHARED_ROUTES:
        grasp_name = route.removeprefix("snip+")
        if "snip" in wanted and grasp_name in wanted:
            todo = [p for p in pruners if {"snip", grasp_name} <= set(p.indices) and p.needs_scores("snip")
                    and p.needs_scores(grasp_name) and p.share_passes and not p.temperatures.get("snip")
                    and not p.temperatures.get(grasp_name)]
            if len(todo) > 1 and all(may_stack(n, [p.model for p in todo], [p.masks for p in todo], todo[0].batches,
                                               todo[0].input_shape) for n in ("snip", grasp_name)):
                _score_shared(route, todo)
    for name in wanted:
        # an index with its own logit temperature is left to its pruner, whose loss divides the logits by it
        todo = [p for p in pruners if name in p.indices and p.needs_scores(name) and not p.temperatures.get(name)]
        if not todo:
            continue
        first = todo[0]
        needs_data = INDICES[name].needs_data
        models, masks = [p.model for p in todo], [p.masks for p in todo]
        batches = first.batches if needs_data else None
        if not may_stack(name, models, masks, batches, first.input_shape):
            # one network after the other either way: left to each pruner, which scores the indices it
            # needs together (SNIP and GraSP share their gradient there) when it reads them
            continue
        scores = score_networks(name, models, masks, batches, input_shape=first.input_shape,
                                seeds=[p.score_seed() for p in todo])
        for p, s in zip(todo, scores, strict=True):
            p.provide_scores(name, s)
