"""The gym-free episode core: action mapping and step sizes, worked out from the documented formulas."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from panning.episode import (
    ACTION_MAPPING,
    GLOBAL_FEATURES,
    INDEX_FEATURES,
    PruningEpisode,
    feature_names,
    map_action,
    observation_size,
)
from panning.schedules import keep_schedule

INDICES = ["synflow", "snip", "grasp_abs"]


def episode(steps: int = 4, target: float = 0.99) -> PruningEpisode:
    """1 000 prunable weights (two 500-weight layers); the target keeps 10 of them."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 50, bias=False), nn.ReLU(), nn.Linear(50, 10, bias=False))
    x = torch.randn(20, 10)
    return PruningEpisode(model, INDICES, [(x, torch.arange(20) % 10)], target_sparsity=target, steps=steps)


def test_map_action_by_hand() -> None:
    w, b = map_action([1.0, -1.0, 0.0, 0.25], INDICES)
    assert w == {"synflow": 1.0, "snip": 0.0, "grasp_abs": 0.5} and b == 0.25
    # out of range values are clipped to [-1, 1] first
    w, b = map_action(np.array([3.0, -7.0, 0.5, 4.0], np.float32), INDICES)
    assert w == {"synflow": 1.0, "snip": 0.0, "grasp_abs": 0.75} and b == 1.0
    w, b = map_action([-2.0, -1.0, -1.0, -3.0], INDICES)
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
