"""Per-layer action terms (``layer_actions: S``): depth control points -> per-layer score factors,
worked out by hand, and carried through the episode, the env, saved-agent metadata and run_policy."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from panning.config import ConfigError
from panning.episode import (
    ACTION_MAPPING,
    PruningEpisode,
    action_mapping,
    action_size,
    check_layer_actions,
    layer_factors,
    map_action,
)
from panning.errors import AgentError
from panning.masks import select_topk
from panning.policy import Policy, check_metadata, policy_metadata, run_policy
from panning.pruner import Pruner

INDICES = ["synflow", "snip", "grasp_abs"]
ROOT = Path(__file__).resolve().parents[1]


def net() -> tuple[nn.Module, list[tuple[torch.Tensor, torch.Tensor]]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 40, bias=False), nn.ReLU(), nn.Linear(40, 30, bias=False), nn.ReLU(),
                          nn.Linear(30, 10, bias=False))
    return model, [(torch.randn(20, 10), torch.arange(20) % 10)]


def test_map_action_splits_and_clips_the_layer_terms() -> None:
    w, b, pts = map_action([1.0, -1.0, 0.0, 0.25, 3.0, -0.5], INDICES, 2)
    assert w == {"synflow": 1.0, "snip": 0.0, "grasp_abs": 0.5} and b == 0.25 and pts == [1.0, -0.5]
    assert map_action([0.0] * 4, INDICES)[2] == []
    with pytest.raises(ValueError, match=r"shape \(6,\) .* and 2 per-layer terms"):
        map_action([0.0] * 4, INDICES, 2)
    assert action_size(3, 0) == 4 and action_size(3, 5) == 9


def test_layer_factors_by_hand() -> None:
    assert layer_factors([-1.0, 0.0, 1.0], 3) == [0.25, 1.0, 4.0]
    # 5 layers at depths 0, 1/4, 1/2, 3/4, 1 between two points -1 and 1: m = -1, -0.5, 0, 0.5, 1
    assert layer_factors([-1.0, 1.0], 5) == [0.25, 0.5, 1.0, 2.0, 4.0]
    # 2 layers read the ends of 3 points; one layer reads the first point
    assert layer_factors([0.5, -1.0, 0.2], 2) == [2.0, 4 ** 0.2]
    assert layer_factors([0.3, 1.0], 1) == [4 ** 0.3]
    assert layer_factors([0.0, 0.0, 0.0], 4) == [1.0] * 4


@pytest.mark.parametrize("bad", [1, -1, True, 2.5, "3"])
def test_check_layer_actions_refuses(bad: object) -> None:
    with pytest.raises(ValueError, match="layer_actions must be 0 .* or an integer >= 2"):
        check_layer_actions(bad)


def test_combined_scores_scale_by_sign() -> None:
    """c * f where c > 0, c / f elsewhere: a factor above 1 protects a layer whatever the score's sign."""
    model, batches = net()
    p = Pruner(model, ["grasp"], batches)
    plain = p.combined_scores([1.0])
    scaled = p.combined_scores([1.0], layer_factors=[4.0, 1.0, 0.5])
    for (k, c), f in zip(plain.items(), [4.0, 1.0, 0.5], strict=True):
        assert (c < 0).any() and (c > 0).any()  # GraSP is signed: both branches are exercised
        assert torch.equal(scaled[k], torch.where(c > 0, c * f, c / f))
    with pytest.raises(ValueError, match="3 positive finite layer factors"):
        p.combined_scores([1.0], layer_factors=[1.0, 0.0, 1.0])
    with pytest.raises(ValueError, match="3 positive finite layer factors"):
        p.combined_scores([1.0], layer_factors=[1.0, 1.0])


def test_a_step_selects_the_top_k_of_the_scaled_scores() -> None:
    model, batches = net()
    p = Pruner(model, INDICES, batches)
    w = [0.5, 0.2, 0.3]
    expected = select_topk(p.combined_scores(w, [10.0, 1.0, 0.1]), 200, current=p.masks)
    plain = select_topk(p.combined_scores(w), 200, current=p.masks)
    masks = p.step(w, 200, layer_factors=[10.0, 1.0, 0.1])
    assert masks.equal(expected) and masks.num_kept == 200
    first, last = list(masks)[0], list(masks)[-1]
    # protecting the first layer and exposing the last moves kept weights from the last to the first
    assert int(masks[first].sum()) > int(plain[first].sum())
    assert int(masks[last].sum()) < int(plain[last].sum())


def test_zero_layer_terms_are_the_plain_mapping_bit_for_bit() -> None:
    actions = [[0.2, -0.3, 0.6, 0.1], [1.0, 0.0, -1.0, -0.4], [-0.5, 0.5, 0.5, 0.7], [0.0, 0.0, 0.0, 0.0]]
    eps = []
    for S in (0, 3):
        model, batches = net()
        ep = PruningEpisode(model, INDICES, batches, target_sparsity=0.97, steps=4, layer_actions=S)
        for a in actions:
            s = ep.step(a + [0.0] * S)
        eps.append((ep, s))
    (a, sa), (b, sb) = eps
    assert a.masks.equal(b.masks) and sa.layer_factors is None and sb.layer_factors == [1.0, 1.0, 1.0]
    assert np.array_equal(a.observe(), b.observe())


def test_episode_applies_the_interpolated_factors() -> None:
    model, batches = net()
    ep = PruningEpisode(model, INDICES, batches, target_sparsity=0.97, steps=2, layer_actions=2)
    twin = Pruner(model, INDICES, batches)
    s = ep.step([0.0, 0.0, 0.0, 0.0, 1.0, -0.5])
    assert s.layer_factors == layer_factors([1.0, -0.5], 3) == [4.0, 4 ** 0.25, 0.5]
    assert s.masks.equal(twin.step([0.5, 0.5, 0.5], s.keep, layer_factors=s.layer_factors))


def test_env_action_space_info_and_bad_setting() -> None:
    from panning.envs.panning_env import PanningEnv

    env = PanningEnv(ROOT / "configs" / "env" / "digits_mlp.yaml", layer_actions=3, observation="summary",
                     target_sparsity=0.9, pruning_steps=2, init_seeds=1)
    assert env.action_space.shape == (7,)
    env.reset(seed=0)
    _, _, _, _, info = env.step(np.array([0, 0, 0, 0, 1, 0, -1], np.float32))
    assert info["layer_factors"] == [4.0, 1.0, 0.25]
    with pytest.raises(ConfigError, match="bad Panning env config: layer_actions must be 0"):
        PanningEnv(ROOT / "configs" / "env" / "digits_mlp.yaml", layer_actions=1)
    # in layerwise mode each layer's share is fixed: the terms would be inert, so they are refused
    with pytest.raises(ConfigError, match="with mode 'layerwise' each layer's share is fixed"):
        PanningEnv(ROOT / "configs" / "env" / "digits_mlp.yaml", layer_actions=2, mode="layerwise")


def test_metadata_records_the_layer_terms_and_old_files_still_load() -> None:
    env = {"indices": INDICES, "pruning_steps": 4, "normalisation": "mean", "mode": "global", "exclude": [],
           "scoring_per_class": 2, "observation": "summary"}
    m = policy_metadata({**env, "layer_actions": 3})
    assert m["layer_actions"] == 3 and m["action_size"] == 7 and m["action_mapping"] == action_mapping(3)
    assert action_mapping(3).startswith(ACTION_MAPPING) and action_mapping(0) == ACTION_MAPPING
    check_metadata(m, "a.zip")
    old = policy_metadata(env)
    del old["layer_actions"]  # as written before per-layer terms existed
    check_metadata(old, "old.zip")
    assert Policy.from_metadata(lambda o: o, old).layer_actions == 0
    with pytest.raises(AgentError, match="action mapping"):
        check_metadata({**m, "layer_actions": 2, "action_size": 6}, "b.zip")
    with pytest.raises(AgentError, match=r"^c.zip: its action size 4 does not match its 3 indices and 3 per-layer"):
        check_metadata({**m, "action_size": 4}, "c.zip")
    with pytest.raises(AgentError, match=r"^d.zip: layer_actions must be 0"):
        check_metadata({**m, "layer_actions": 1}, "d.zip")
    with pytest.raises(ValueError, match="layer_actions must be 0"):
        policy_metadata({**env, "layer_actions": 2.7})


def test_run_policy_is_the_episode_driven_by_the_same_actions() -> None:
    env = {"indices": INDICES, "pruning_steps": 3, "normalisation": "mean", "mode": "global", "exclude": [],
           "scoring_per_class": 2, "observation": "summary", "layer_actions": 2}
    rng = np.random.default_rng(1)
    actions = [rng.uniform(-1, 1, 6) * 0.5 for _ in range(3)]
    it = iter(actions)
    model, batches = net()
    r = run_policy(Policy.from_metadata(lambda o: next(it), policy_metadata(env)), model, 0.95, batches=batches)
    ep = PruningEpisode(model, INDICES, batches, target_sparsity=0.95, steps=3, layer_actions=2)
    for a in actions:
        s = ep.step(a)
    assert r.masks.equal(ep.masks) and r.masks.num_kept == round(0.05 * 1900)
    assert r.extra["policy"]["steps"][-1]["layer_factors"] == s.layer_factors
