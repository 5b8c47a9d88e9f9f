"""The gym-free episode core: action mapping and step sizes, worked out from the documented formulas."""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from panning import episode as episode_module
from panning.connectivity import effective_masks
from panning.episode import (
    ACTION_MAPPING,
    GLOBAL_FEATURES,
    INDEX_FEATURES,
    PruningEpisode,
    feature_names,
    map_action,
    observation_size,
)
from panning.indices import INDICES as INDEX_REGISTRY
from panning.indices import IndexSpec
from panning.masks import Masks, keep_count
from panning.schedules import keep_schedule

INDICES = ["synflow", "snip", "grasp_abs"]


def episode(steps: int = 4, target: float = 0.99) -> PruningEpisode:
    """1 000 prunable weights (two 500-weight layers); the target keeps 10 of them."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 50, bias=False), nn.ReLU(), nn.Linear(50, 10, bias=False))
    x = torch.randn(20, 10)
    return PruningEpisode(model, INDICES, [(x, torch.arange(20) % 10)], target_sparsity=target, steps=steps)


def test_map_action_by_hand() -> None:
    w, b, _ = map_action([1.0, -1.0, 0.0, 0.25], INDICES)
    assert w == {"synflow": 1.0, "snip": 0.0, "grasp_abs": 0.5} and b == 0.25
    # out of range values are clipped to [-1, 1] first
    w, b, _ = map_action(np.array([3.0, -7.0, 0.5, 4.0], np.float32), INDICES)
    assert w == {"synflow": 1.0, "snip": 0.0, "grasp_abs": 0.75} and b == 1.0
    w, b, _ = map_action([-2.0, -1.0, -1.0, -3.0], INDICES)
    assert w == {"synflow": 1.0, "snip": 1.0, "grasp_abs": 1.0} and b == -1.0  # all zero -> equal weights
    with pytest.raises(ValueError, match="NaN"):
        map_action([0.0, float("nan"), 0.0, 0.0], INDICES)
    with pytest.raises(ValueError, match=r"shape \(4,\)"):
        map_action([0.0, 0.0, 0.0], INDICES)
    assert "w=(a+1)/2" in ACTION_MAPPING and "share=min(1, 2**(2b)/steps_left)" in ACTION_MAPPING


def test_default_step_size_follows_synflows_exponential_schedule() -> None:
    ep = episode()
    assert (ep.N, ep.final_keep) == (1000, 10)
    kept = []
    while not ep.done:
        kept.append(ep.step([0.0, 0.0, 0.0, 0.0]).keep)
    # density 0.01^(t/4): 316.2, 100, 31.6, 10
    assert kept == [316, 100, 32, 10] == keep_schedule(1000, 0.99, 4, "exponential")
    assert ep.masks.num_kept == 10


def test_step_share_by_hand() -> None:
    """share = min(1, 2^(2b) / steps_left); u <- u + share (1 - u); keep = round(d^u N), within bounds."""
    ep = episode()
    assert ep.planned_keep(0.0) == (0.25, 0.25, 316)
    assert ep.planned_keep(0.5) == (0.5, 0.5, 100)  # 2 / 4
    assert ep.planned_keep(1.0) == (1.0, 1.0, 10)  # the whole budget at once
    share, u, keep = ep.planned_keep(-1.0)
    assert (share, u, keep) == (0.0625, 0.0625, round(0.01 ** 0.0625 * 1000)) and keep == 750
    # cautious steps all the way: the formula step by step, and the last step lands on the target
    u, kept = 0.0, []
    for t in range(1, 4):
        share = min(1.0, 2.0 ** -2.0 / (4 - t + 1))
        u = u + share * (1 - u)
        kept.append(round(0.01 ** u * 1000))
    got = [ep.step([0.0, 0.0, 0.0, -1.0]).keep for _ in range(4)]
    assert got == kept + [10]
    assert ep.done and ep.masks.num_kept == 10
    with pytest.raises(RuntimeError, match="over"):
        ep.step([0.0, 0.0, 0.0, 0.0])


def test_a_step_never_grows_the_network_and_never_passes_the_target() -> None:
    ep = episode(steps=5)
    s = ep.step([0.0, 0.0, 0.0, 1.0])  # b = 1 at step 1: share 4/5
    assert s.keep == round(0.01 ** 0.8 * 1000) and s.share == 0.8
    s = ep.step([0.0, 0.0, 0.0, 1.0])  # share min(1, 4/4) = 1: straight to the target
    assert s.keep == 10 and s.removed == round(0.01 ** 0.8 * 1000) - 10
    s = ep.step([0.0, 0.0, 0.0, -1.0])  # already at the target: nothing more is removed
    assert s.keep == 10 and s.removed == 0


def test_one_hot_weights_reach_the_pruner() -> None:
    ep = episode()
    s = ep.step([-1.0, 1.0, -1.0, 0.0])
    assert s.weights == {"synflow": 0.0, "snip": 1.0, "grasp_abs": 0.0}
    assert ep.pruner.history[-1].weights == s.weights


def test_observation_layout() -> None:
    assert observation_size(3) == len(GLOBAL_FEATURES) + 3 * len(INDEX_FEATURES) == 31
    names = feature_names(["a", "b"])
    assert names[: len(GLOBAL_FEATURES)] == list(GLOBAL_FEATURES)
    assert names[len(GLOBAL_FEATURES):] == [f"{f}_{k}" for k in ("a", "b") for f in INDEX_FEATURES]
    ep = episode()
    obs = dict(zip(feature_names(INDICES), ep.observe(), strict=True))
    assert obs["progress"] == 0.0 and obs["default_share"] == 0.25 and obs["density"] == 1.0
    assert math.isclose(obs["target_density"], 1 + 2 * math.log10(0.01) / 3, rel_tol=1e-6)  # D(0.01) = -1/3
    assert obs["budget_left"] == 1.0 and obs["ineffective"] == 0.0


def test_bad_episode_settings() -> None:
    with pytest.raises(ValueError, match="target_sparsity"):
        episode(target=1.0)
    with pytest.raises(ValueError, match="steps"):
        episode(steps=0)


# --------------------------------------------------------------------------- the observation, by hand

def _D(x: float) -> float:
    """The docstring's density feature D(x) = 1 + 2 log10(x) / 3 (x floored at 1e-12)."""
    return 1.0 + 2.0 * math.log10(max(x, 1e-12)) / 3.0


def _masked_loss_and_grad_norm(model: nn.Module, masks, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """Cross-entropy of a masked copy of ``model`` and the norm of its gradient over the kept weights."""
    net = copy.deepcopy(model)
    params = dict(net.named_parameters())
    with torch.no_grad():
        for k, m in masks.items():
            params[k].mul_(m)
    net.zero_grad()
    loss = F.cross_entropy(net(x), y)
    loss.backward()
    sq = sum(float(((params[k].grad.double() * m) ** 2).sum()) for k, m in masks.items())
    return float(loss.detach()), math.sqrt(sq)


def _default_removal(ep: PruningEpisode) -> int:
    """How many weights a b = 0 step would remove next, from the documented schedule."""
    kept, t = ep.masks.num_kept, ep.t + 1
    if t >= ep.T:
        return kept - ep.final_keep
    share = min(1.0, 1.0 / (ep.T - t + 1))
    u = ep.u + share * (1.0 - ep.u)
    return kept - max(ep.final_keep, min(kept, round(ep.target_density ** u * ep.N)))


def _index_reference(ep: PruningEpisode) -> list[float]:
    """The six per-index features of every index, with explicit loops over the alive weights."""
    alive = ep.pruner.alive_flat()
    normed = {k: [float(v) for v in ep.pruner.normalised_scores(k)[alive]] for k in ep.indices}
    m = _default_removal(ep)
    lowest = {}
    for k, n in normed.items():  # stable descending order: equal scores keep their index order
        order = sorted(range(len(n)), key=lambda i: (-n[i], i))
        lowest[k] = set(order[len(n) - m:]) if m > 0 else set()
    out = []
    for k, n in normed.items():
        others = [j for j in ep.indices if j != k]
        agree = sum(len(lowest[k] & lowest[j]) / m for j in others) / len(others) if m > 0 and others else 1.0
        mag = sorted(abs(v) for v in n)
        qs = [math.log10(mag[round(p * (len(mag) - 1))] + 1e-12) / 3.0 for p in (0.1, 0.5, 0.9)]
        nonpos = sum(v <= 0 for v in n) / len(n)
        total = sum(mag)
        top = max(1, math.ceil(0.01 * len(mag)))
        top1 = sum(sorted(mag, reverse=True)[:top]) / total if total > 0 else 0.0
        out += [agree, *qs, nonpos, top1]
    return out


def _reference_observation(ep: PruningEpisode, score_indices: bool) -> np.ndarray:
    masks = ep.masks
    eff = effective_masks(ep.model, masks, ep.input_shape)
    T, t, N = ep.T, ep.t, ep.N
    kept = masks.num_kept
    d_now, d_target = kept / N, keep_count(N, ep.target_sparsity) / N
    dens = [int(m.sum()) / m.numel() for m in masks.values()]
    x, y = ep.batches[0]
    loss, grad = _masked_loss_and_grad_norm(ep.model, masks, x, y)
    loss0, grad0 = _masked_loss_and_grad_norm(ep.model, {k: torch.ones_like(m) for k, m in masks.items()}, x, y)
    g = [
        t / T,
        1.0 / (T - t) if t < T else 0.0,
        _D(d_now),
        _D(d_target),
        math.log(d_now / d_target) / math.log(1.0 / d_target) if d_target < 1 else 0.0,
        1.0 - eff.num_kept / kept,
        _D(min(dens)),
        _D(float(np.median(dens))),
        _D(max(dens)),
        sum(d < 0.1 * d_now for d in dens) / len(dens),
        sum(not bool(m.any()) for m in eff.values()) / len(eff),
        math.log10(max(loss, 1e-30) / max(loss0, 1e-30)) if t else 0.0,
        math.log10(max(grad, 1e-30) / max(grad0, 1e-30)) if t else 0.0,
    ]
    per_index = _index_reference(ep) if score_indices else [0.0] * (6 * ep.K)
    return np.clip(np.array(g + per_index), -5.0, 5.0)


def _register(monkeypatch, name: str, score) -> None:
    """A data-free test index: ``score(key, shape) -> tensor``, whatever the masks."""

    def fn(model, masks, batches, **_):
        return {k: score(k, tuple(m.shape)) for k, m in masks.items()}

    monkeypatch.setitem(INDEX_REGISTRY, name, IndexSpec(name, fn, False, ""))


def _tied_scores(seed: int):
    """Integer scores in [-2, 5]: many ties, zeros and negatives."""

    def score(key: str, shape: tuple[int, ...]) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed + len(key) * 7 + shape[0])
        return torch.randint(-2, 6, shape, generator=g).float()

    return score


@pytest.fixture
def tied(monkeypatch):
    """Three test indices "a", "b", "c" with tied integer scores."""
    for i, name in enumerate("abc"):
        _register(monkeypatch, name, _tied_scores(10 * i))
    return ["a", "b", "c"]


def binary_episode(indices, steps: int = 4, target: float = 0.9, **kw) -> PruningEpisode:
    """600 prunable weights (500 + 100), two classes: the dense loss is below 1, as is its gradient norm."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 50, bias=False), nn.ReLU(), nn.Linear(50, 2, bias=False))
    x = torch.randn(16, 10)
    return PruningEpisode(model, indices, [(x, torch.arange(16) % 2)], target_sparsity=target, steps=steps, **kw)


def _check(ep: PruningEpisode, score_indices: bool | None = None) -> np.ndarray:
    obs = ep.observe() if score_indices is None else ep.observe(score_indices)
    expected = _reference_observation(ep, (not ep.done) if score_indices is None else score_indices)
    assert obs.dtype == np.float32 and obs.shape == (observation_size(ep.K),)
    np.testing.assert_allclose(obs, expected.astype(np.float32), rtol=1e-5, atol=1e-5)
    return obs


def test_observation_matches_the_documented_features_through_an_episode(tied) -> None:
    """Every feature, computed from its definition, at the start, mid-episode and at the end (where the
    per-index features are 0 unless asked for)."""
    ep = binary_episode(tied)
    obs = _check(ep)
    assert ep.loss_ratio == 0.0 and ep.grad_ratio == 0.0
    assert obs[11] == 0.0 and obs[12] == 0.0  # no step yet: the signal ratios are 0
    assert obs[13:].any()  # the per-index features are computed by default before the end
    ep.step([0.5, -0.5, 0.0, 0.3])
    _check(ep)
    ep.step([-1.0, 1.0, 1.0, -0.7])
    _check(ep)
    _check(ep, score_indices=False)
    while not ep.done:
        ep.step([0.0, 0.0, 1.0, 0.0])
    obs = _check(ep)
    assert obs[1] == 0.0 and not obs[13:].any()
    _check(ep, score_indices=True)


@pytest.mark.parametrize("k", [1, 2])
def test_observation_with_one_or_two_indices(tied, k) -> None:
    """Agreement is 1 for a single index and the mean overlap with the other index for two."""
    ep = binary_episode(tied[:k])
    _check(ep)
    ep.step([0.2] * k + [0.0])
    obs = _check(ep)
    if k == 1:
        assert obs[13] == 1.0


def test_observation_when_the_default_step_would_remove_nothing_or_one_weight(tied) -> None:
    """m = 0 (the target is reached before the last step): agreement 1; m = 1: overlaps of single weights."""
    ep = binary_episode(tied, steps=3)
    ep.step([0.0, 0.0, 0.0, 1.0])  # share min(1, 4/3): straight to the target
    assert ep.masks.num_kept == ep.final_keep and not ep.done
    obs = _check(ep)
    assert (obs[13::6] == 1.0).all()
    one = binary_episode(tied, steps=1, target=1 / 600)  # the only step removes one weight
    assert one.final_keep == 599
    _check(one)


def test_observation_with_a_single_weight_left(tied) -> None:
    """With one alive weight the quantiles are its |score| and the top 1% holds all the mass. (One weight
    in a network with two prunable layers is refused, so the second layer is left dense.)"""
    ep = binary_episode(tied, steps=1, target=1 - 1 / 500, exclude=["2"])
    ep.step([1.0, -1.0, -1.0, 0.0])
    assert ep.masks.num_kept == 1
    obs = _check(ep, score_indices=True)
    assert obs[18] == 1.0  # index "a" kept it: its score is not 0


def test_observation_of_an_index_scoring_zero_everywhere(monkeypatch, tied) -> None:
    """An index with all scores 0: quantiles at log10(1e-12)/3, every weight non-positive, top-1% mass 0."""
    _register(monkeypatch, "zero", lambda key, shape: torch.zeros(shape))
    ep = binary_episode(["zero", "a"])
    obs = _check(ep)
    assert obs[13 + 1: 13 + 6].tolist() == pytest.approx([-4.0, -4.0, -4.0, 1.0, 0.0])


def test_observation_of_a_dense_target(tied) -> None:
    """target_sparsity 0 is allowed: target density D(1) = 1 and no budget left to use."""
    ep = binary_episode(tied, target=0.0)
    obs = _check(ep)
    assert obs[3] == 1.0 and obs[4] == 0.0
    ep.step([0.0, 0.0, 0.0, 0.0])
    _check(ep)


def test_observation_of_a_disconnected_network(monkeypatch) -> None:
    """Pruning the last layer away: every layer collapsed, nothing effective, and the gradient signal of
    a dead network reads -5 after clipping (as does D of an empty layer)."""
    _register(monkeypatch, "first", lambda key, shape: torch.full(shape, 2.0 if key == "0.weight" else 1.0))
    ep = binary_episode(["first"], steps=2, target=0.5)
    ep.step([0.0, 1.0])  # keeps 300 weights, all in the first layer
    assert not ep.masks["2.weight"].any()
    obs = _check(ep)
    assert obs[5] == 1.0 and obs[6] == -5.0 and obs[9] == 0.5 and obs[10] == 1.0 and obs[12] == -5.0


def test_step_record_by_hand(tied) -> None:
    """EpisodeStep: step number, the effective masks, no collapsed layer, the signals it observed."""
    ep = binary_episode(tied)
    s = ep.step([1.0, 0.0, -1.0, 0.0])
    assert s.step == 1 and ep.t == 1
    assert s.weights == {"a": 1.0, "b": 0.5, "c": 0.0}
    assert s.share == 0.25 and s.keep == ep.masks.num_kept and s.masks.equal(ep.masks)
    assert s.effective.equal(effective_masks(ep.model, ep.masks, ep.input_shape))
    assert s.collapsed == []
    x, y = ep.batches[0]
    loss, grad = _masked_loss_and_grad_norm(ep.model, ep.masks, x, y)
    loss0, grad0 = _masked_loss_and_grad_norm(ep.model, Masks.ones(ep.model), x, y)
    assert s.loss_ratio == ep.loss_ratio == pytest.approx(math.log10(loss / loss0), rel=1e-5)
    assert s.grad_ratio == ep.grad_ratio == pytest.approx(math.log10(grad / grad0), rel=1e-5)
    assert ep.step([0.0, 0.0, 0.0, 0.0]).step == 2


def test_step_records_collapsed_layers(monkeypatch) -> None:
    """A step that disconnects the network lists every layer with no effective weight."""
    _register(monkeypatch, "first", lambda key, shape: torch.full(shape, 2.0 if key == "0.weight" else 1.0))
    ep = binary_episode(["first"], steps=2, target=0.5)
    assert ep.step([0.0, 1.0]).collapsed == ["0.weight", "2.weight"]


def test_signal_ratios_of_non_finite_values_read_the_limit() -> None:
    """A non-finite loss or gradient norm reads +5 (the observation limit), not inf or NaN."""
    ep = episode()
    assert ep._ratios(float("inf"), float("nan")) == (5.0, 5.0)
    assert ep._ratios(float("nan"), float("inf")) == (5.0, 5.0)


def test_signals_with_a_masked_layer_the_forward_never_uses(tied) -> None:
    """A prunable layer outside the forward has no gradient: it adds 0 to the gradient norm."""

    class Spare(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(nn.Linear(10, 50, bias=False), nn.ReLU(), nn.Linear(50, 2, bias=False))
            self.spare = nn.Linear(3, 3, bias=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.body(x)

    torch.manual_seed(0)
    model = Spare()
    x, y = torch.randn(16, 10), torch.arange(16) % 2
    ep = PruningEpisode(model, tied, [(x, y)], target_sparsity=0.5, steps=2)
    masks = Masks.ones(model)
    loss, grad = _masked_loss_and_grad_norm(model, {k: m for k, m in masks.items() if k != "spare.weight"}, x, y)
    assert (ep.loss0, ep.grad0) == pytest.approx((loss, grad), rel=1e-5)


def test_map_action_flattens_and_computes_in_float64() -> None:
    """A batched (1, K+1) action is flattened; float32 actions are mapped with float64 arithmetic."""
    a = np.array([[0.1, -0.3, 0.7, 0.2]], np.float32)
    w, b, _ = map_action(a, INDICES)
    exact = [(float(np.float32(v)) + 1.0) / 2.0 for v in (0.1, -0.3, 0.7)]
    assert list(w.values()) == exact and b == float(np.float32(0.2))
    with pytest.raises(ValueError, match=r"^expected an action of shape \(4,\) for indices "
                                         r"\['synflow', 'snip', 'grasp_abs'\], got \(2, 3\)$"):
        map_action(np.zeros((2, 3)), INDICES)


def test_episode_settings_reach_the_pruner(tied) -> None:
    """input_shape, exclude, mode, normalisation and seed are passed on; the default seed is 0."""
    ep = binary_episode(tied, input_shape=(2, 5), exclude=["2"], mode="layerwise", normalisation="rank", seed=3)
    assert ep.input_shape == ep.pruner.input_shape == (2, 5)
    assert list(ep.masks) == ["0.weight"] and ep.N == 500
    assert (ep.pruner.mode, ep.pruner.normalisation, ep.pruner.seed) == ("layerwise", "rank", 3)
    assert binary_episode(tied).pruner.seed == 0
    assert ep.target_sparsity == 0.9 and isinstance(ep.target_sparsity, float)


def test_episode_settings_validation() -> None:
    """Targets in [0, 1), integer step counts >= 1 (not bools or floats), a non-empty first batch."""
    assert episode(steps=1, target=0.0).T == 1
    for steps in (True, 2.0, 0):
        with pytest.raises(ValueError, match=r"^the number of pruning steps must be an integer >= 1, got "):
            episode(steps=steps)
    model = nn.Sequential(nn.Linear(10, 2))
    msg = r"^a non-empty scoring batch is needed \(it also gives the loss and gradient signals\)$"
    for batches in ([], [(torch.zeros(0, 10), torch.zeros(0, dtype=torch.long))]):
        with pytest.raises(ValueError, match=msg):
            PruningEpisode(model, ["magnitude"], batches, target_sparsity=0.5, steps=2)
    one = PruningEpisode(model, ["magnitude"], [(torch.ones(1, 10), torch.zeros(1, dtype=torch.long))],
                         target_sparsity=0.5, steps=2)
    assert one.N == 20


def test_last_step_plans_the_whole_remaining_budget() -> None:
    """At the last step the share and u are 1 whatever b is; a large b never takes more than the budget."""
    ep = episode(steps=3)
    assert ep.planned_keep(1.0) == (1.0, 1.0, 10)  # min(1, 4/3)
    ep.step([0.0, 0.0, 0.0, -1.0])
    ep.step([0.0, 0.0, 0.0, -1.0])
    assert ep.planned_keep(-1.0) == (1.0, 1.0, 10)
    s = ep.step([0.0, 0.0, 0.0, -1.0])
    assert (s.share, ep.u, s.keep) == (1.0, 1.0, 10)
    with pytest.raises(RuntimeError, match=r"^the episode is over: all pruning steps have run$"):
        ep.step([0.0, 0.0, 0.0, 0.0])


class _Clock:
    """A stand-in for the time module whose perf_counter advances one second per read."""

    def __init__(self) -> None:
        self.now = 1000.0

    def perf_counter(self) -> float:
        self.now += 1.0
        return self.now


def test_timing_accounts_for_each_phase(monkeypatch, tied) -> None:
    """timing holds non-negative seconds per phase: construction measures nothing (the signals before the first
    step are measured with the first step's, so that a vectorised env measures N at once); a step resets it
    and charges score, select, connectivity and signal (together the step's duration); each observation
    adds its duration minus its scoring time to features."""
    clock = _Clock()
    monkeypatch.setattr(episode_module, "time", clock)
    ep = binary_episode(tied)
    assert ep.timing == {"score": 0.0, "select": 0.0, "connectivity": 0.0, "signal": 0.0, "features": 0.0}
    before = clock.now
    ep.step([0.0, 0.0, 0.0, 0.0])
    span = clock.now - before - 1.0  # from the first to the last clock read of the step
    timing = dict(ep.timing)
    assert timing["features"] == 0.0
    assert all(timing[k] >= 1.0 for k in ("score", "select", "connectivity", "signal"))
    assert sum(timing.values()) == span
    total = 0.0
    for _ in range(2):
        score_before, before = ep.timing["score"], clock.now
        ep.observe()
        scored = ep.timing["score"] - score_before
        assert 1.0 <= scored <= clock.now - before
        total += clock.now - before - 1.0 - scored
        assert ep.timing["features"] == total
    assert ep.timing["select"] == timing["select"] and ep.timing["signal"] == timing["signal"]


@pytest.mark.parametrize("sync", [False, True])
def test_sync_timing_synchronises_cuda_before_every_clock_read(monkeypatch, tied, sync) -> None:
    """With sync_timing on a CUDA episode, every clock read waits for the device first (so queued GPU work
    is charged to the stage that queued it); off, or on a CPU model, the episode never synchronises."""
    calls: list[int] = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: calls.append(1))
    clock = _Clock()
    monkeypatch.setattr(episode_module, "time", clock)
    ep = binary_episode(tied)
    ep.step([0.0, 0.0, 0.0, 0.0])
    assert calls == []  # a CPU model: never, whatever sync_timing says
    monkeypatch.setattr(episode_module.PruningEpisode, "sync_timing", sync)
    ep._cuda = True  # what a model on the GPU sets; this machine may have none
    reads = clock.now
    ep.step([0.0, 0.0, 0.0, 0.0])
    ep.observe()
    assert len(calls) == (clock.now - reads if sync else 0)


def test_layer_at_exactly_a_tenth_of_the_global_density_is_not_near_collapse(monkeypatch) -> None:
    """layers_near_collapse counts layers strictly below 1/10 of the global density: 5/100 at 300/600 is not."""

    def score(key: str, shape: tuple[int, ...]) -> torch.Tensor:
        s = torch.zeros(shape).reshape(-1)
        s[: 5 if key == "2.weight" else 295] = 10.0 if key == "2.weight" else 5.0
        return s.reshape(shape)

    _register(monkeypatch, "shaped", score)
    ep = binary_episode(["shaped"], steps=2, target=0.5)
    ep.step([1.0, 1.0])
    assert ep.masks.layer_density() == {"0.weight": 295 / 500, "2.weight": 5 / 100}
    assert _check(ep)[9] == 0.0


def _confident_episode(monkeypatch, weight: torch.Tensor) -> PruningEpisode:
    """Linear(2, 2) with the given weights on the two unit inputs; the only step keeps the off-diagonal."""
    _register(monkeypatch, "offdiag", lambda key, shape: 1.0 - torch.eye(2))
    model = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        model.weight.copy_(weight)
    ep = PruningEpisode(model, ["offdiag"], [(torch.eye(2), torch.arange(2))], target_sparsity=0.5, steps=1)
    ep.step([1.0, 0.0])
    return ep


def test_loss_ratio_beyond_the_limit_is_clipped(monkeypatch) -> None:
    """A dense network that is sure and right (loss ~1e-44, floored at 1e-30) pruned to chance: log10 of the
    ratio is ~29.8, which the observation clips to +5."""
    ep = _confident_episode(monkeypatch, 100.0 * torch.eye(2))
    assert ep.loss_ratio == pytest.approx(math.log10(math.log(2.0) / 1e-30), rel=1e-6)
    assert ep.observe()[11] == 5.0



def test_a_step_scores_only_the_weighted_indices_and_charges_that_to_score(monkeypatch) -> None:
    """Without an observation before it, a step scores the indices it weights (an index with weight 0 is not
    scored at all), and that scoring time counts as "score", not "select"."""
    clock = _Clock()
    monkeypatch.setattr(episode_module, "time", clock)
    calls = {"a": 0, "b": 0}

    def make(name):
        def fn(model, masks, batches, **_):
            calls[name] += 1
            clock.now += 100.0  # scoring is slow
            return {k: torch.arange(float(m.numel())).reshape(m.shape) for k, m in masks.items()}

        monkeypatch.setitem(INDEX_REGISTRY, name, IndexSpec(name, fn, False, ""))

    make("a")
    make("b")
    ep = binary_episode(["a", "b"])
    ep.step([1.0, -1.0, 0.0])  # weights a = 1, b = 0
    assert calls == {"a": 1, "b": 0}
    assert ep.timing["score"] >= 100.0 and ep.timing["select"] < 100.0


def test_gradient_norm_signal_is_accumulated_in_float64() -> None:
    """signals() by hand on a zero-weight Linear(2, 2) and one sample x = (1e-25, 0) of class 0: softmax is
    (1/2, 1/2), so the loss is log 2 and dL/dW = (p - y) x^T = [[-0.5e-25, 0], [0.5e-25, 0]], whose norm
    sqrt(0.5) * 1e-25 is representable in float64 only (its square underflows float32)."""
    model = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        model.weight.zero_()
    x, y = torch.tensor([[1e-25, 0.0]]), torch.tensor([0])
    ep = PruningEpisode(model, ["magnitude"], [(x, y)], target_sparsity=0.5, steps=2)
    loss, grad = ep.signals(Masks.ones(model))
    assert loss == pytest.approx(math.log(2.0), rel=1e-6)
    assert grad * 1e25 == pytest.approx(math.sqrt(0.5), rel=1e-5)  # (approx's absolute tolerance would hide 0)


def test_a_target_that_empties_a_layer_is_refused_before_anything_runs() -> None:
    """4 + 2 weights in two layers at 90% keeps round(0.6) = 1 < 2 layers; 50% keeps 3."""
    from panning.errors import ConfigError

    model = nn.Sequential(nn.Linear(2, 2, bias=False), nn.ReLU(), nn.Linear(2, 1, bias=False))
    batch = [(torch.ones(2, 2), torch.zeros(2, dtype=torch.long))]
    with pytest.raises(ConfigError, match="fewer than the 2 prunable layers.*one weight per layer is 0.75"):
        PruningEpisode(model, ["magnitude"], batch, target_sparsity=0.9, steps=2)
    ep = PruningEpisode(model, ["magnitude"], batch, target_sparsity=0.5, steps=2)
    assert ep.final_keep == 3


# ------------------------------------------------------------------------------- N episodes at once


def _nets(kind: str, n: int) -> tuple[list[nn.Module], tuple[torch.Tensor, torch.Tensor]]:
    torch.manual_seed(0)
    if kind == "mlp":
        make = lambda: nn.Sequential(nn.Linear(10, 40), nn.ReLU(), nn.Linear(40, 10))  # noqa: E731
        x = torch.randn(30, 10)
    else:
        make = lambda: nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),  # noqa: E731
                                     nn.Linear(4 * 6 * 6, 10))
        x = torch.randn(30, 1, 8, 8)
    return [make() for _ in range(n)], (x, torch.arange(30) % 10)


@pytest.mark.parametrize("kind", ["mlp", "conv"])
def test_signals_many_equal_each_network_alone(kind: str) -> None:
    """Stacked (where exact on this machine) or not, every network's loss and gradient norm are masked_signals'
    bit for bit, BatchNorm in training mode included; the models' statistics are not touched."""
    from panning.episode import masked_signals, signals_many

    models, batch = _nets(kind, 5)
    gen = torch.Generator().manual_seed(3)
    masks = [Masks({k: torch.rand(p.shape, generator=gen) < d for k, p in m.named_parameters() if p.dim() > 1})
             for m, d in zip(models, (1.0, 0.5, 0.2, 0.05, 0.01), strict=True)]
    before = [copy.deepcopy(m.state_dict()) for m in models]
    got = signals_many(models, masks, batch)
    assert got == [masked_signals(m, k, batch) for m, k in zip(models, masks, strict=True)]
    if kind == "mlp":  # the stacked pass ran and matched (this CPU's batched products equal one network's)
        from panning._functional import architecture_key

        key = (*architecture_key("signals", models[0], masks[0], [batch], None),
               tuple(m.training for m in models[0].modules()), len(models))
        assert episode_module._SIGNALS_EXACT[key] is True
    assert len(set(got)) == len(got)  # five different networks: a broadcast of one result would fail above
    assert all(torch.equal(v, b[k]) for m, b in zip(models, before, strict=True) for k, v in m.state_dict().items())


def test_step_many_takes_the_steps_each_episode_takes_alone() -> None:
    """step_many (shared connectivity and signals) against ep.step on twin episodes, with collapse-prone actions:
    the same masks, effective masks, signals, records and observations at every step."""
    from panning.episode import step_many

    def twins(seed: int) -> list[PruningEpisode]:
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(10, 50), nn.ReLU(), nn.Linear(50, 30), nn.ReLU(), nn.Linear(30, 10))
        x = torch.randn(20, 10)
        return [PruningEpisode(copy.deepcopy(model), INDICES, [(x, torch.arange(20) % 10)], target_sparsity=t,
                               steps=4, observation="layers", layer_actions=2, seed=seed)
                for t in (0.9, 0.99, 0.995)]

    together, alone = twins(0), twins(0)
    rng = np.random.default_rng(0)
    for t in range(4):
        actions = [rng.uniform(-1, 1, 6) for _ in together]
        many = step_many(together, actions)
        if t < 3:  # the stacked route: only the first episode's path counter counts, for all three
            assert together[0]._paths is not None and all(ep._paths is None for ep in together[1:])
        one = [ep.step(a) for ep, a in zip(alone, actions, strict=True)]
        for a, b, ea, eb in zip(many, one, together, alone, strict=True):
            assert a.masks.equal(b.masks) and a.effective.equal(b.effective)
            assert (a.step, a.keep, a.removed, a.collapsed, a.loss_ratio, a.grad_ratio, a.weights, a.share,
                    a.layer_factors) == (b.step, b.keep, b.removed, b.collapsed, b.loss_ratio, b.grad_ratio, b.weights,
                                         b.share, b.layer_factors)
            assert np.array_equal(ea.observe(), eb.observe())
    assert any(s.effective.num_kept < s.masks.num_kept for s in many)  # connectivity did some work
    assert all(ep._paths is None for ep in together)  # dropped after the last step
    with pytest.raises(RuntimeError, match="episode is over"):
        step_many(together, [np.zeros(6)] * 3)
    fresh = twins(1)
    with pytest.raises(ValueError, match="NaN"):  # a bad action anywhere: refused before any network moves
        step_many(fresh, [np.zeros(6), np.zeros(6), np.full(6, np.nan)])
    assert all(ep.t == 0 and ep.pruner.steps_done == 0 and ep.masks.num_kept == ep.N for ep in fresh)


def test_signals_many_fall_back_where_vmap_cannot_run() -> None:
    """A network with data-dependent control flow: no stacked pass, the same signals one network at a time."""
    from panning.episode import masked_signals, signals_many

    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(10, 8), nn.Linear(8, 10)

        def forward(self, x):
            h = self.a(x)
            return self.b(h) if bool(h.sum() > 0) else self.b(-h)

    torch.manual_seed(0)
    models = [Branchy() for _ in range(3)]
    batch = (torch.randn(12, 10), torch.arange(12) % 10)
    masks = [Masks({k: torch.rand(p.shape) < 0.5 for k, p in m.named_parameters() if p.dim() > 1}) for m in models]
    assert signals_many(models, masks, batch) == [masked_signals(m, k, batch) for m, k in zip(models, masks,
                                                                                              strict=True)]


def test_a_step_whose_path_counts_overflow_gets_the_effective_masks_of_the_scaled_pass() -> None:
    """A deep chain's unscaled path counts overflow float64 and meet pruned weights (inf * 0: NaN); the step reads
    the finiteness flags with its other values and redoes those masks with the scaled pass, one episode alone or
    N at once, and counts them."""
    from panning.episode import step_many

    def chain(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return nn.Sequential(*[nn.Linear(32, 32) for _ in range(260)], nn.Linear(32, 10))  # 32**260 > 2**1024

    g = torch.Generator().manual_seed(0)
    batch = (torch.randn(8, 32, generator=g), torch.arange(8) % 10)
    eps = [PruningEpisode(chain(s), ["magnitude"], [batch], target_sparsity=0.3, steps=2) for s in range(3)]
    steps = step_many(eps[:2], [[0.0, 0.0]] * 2) + [eps[2].step([0.0, 0.0])]
    for ep, st in zip(eps, steps, strict=True):
        assert st.effective.equal(effective_masks(ep.model, st.masks, (32,)))
        from panning.connectivity import PathCounter

        assert not PathCounter(ep.model).effective_begin([st.masks], (32,)).finite.any()  # the fallback ran
        for m in (st.masks, st.effective):
            assert m._counted() and m.layer_counts() == [int(t.sum()) for t in m.values()]
