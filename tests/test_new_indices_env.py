"""The indices of issue #17 (force, synflow_l2, ntk_sap, prospr, px) in the multi-index pruner, in an
agent environment's ``indices``, and in ``panning list`` / the unknown-index errors.

Fast (a few seconds): a hand-built conv net with BatchNorm (so every index's BatchNorm path runs) on
random data for the pruner, the tiny env of ``configs/env/tiny.yaml`` for the episode.
"""
from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from panning.cli import main
from panning.config import ConfigError
from panning.envs.panning_env import PanningEnv, clear_caches
from panning.indices import INDICES, available_indices, compute_scores
from panning.masks import keep_count, select_topk
from panning.pruner import Pruner, available_methods, normalise
from panning.schedules import keep_schedule

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "env" / "tiny.yaml"

NEW = ("force", "synflow_l2", "ntk_sap", "prospr", "px")
NEW_METHODS = ("iter_snip", "force", "synflow_l2", "ntk_sap", "prospr", "px")
#: the new indices beside an old one, in a mixed order, each with its own non-trivial weight
INDICES_UNDER_TEST = ("synflow", "px", "ntk_sap", "prospr", "force", "synflow_l2")
WEIGHTS = {"synflow": 0.5, "px": 1.0, "ntk_sap": 0.25, "prospr": 2.0, "force": 0.75, "synflow_l2": 1.5}


class TinyConvNet(nn.Module):
    """Conv -> BatchNorm -> ReLU module -> max-pool -> Linear -> F.relu -> Linear: 924 prunable weights."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.act = nn.ReLU()
        self.fc1 = nn.Linear(4 * 4 * 4, 12)
        self.fc2 = nn.Linear(12, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.max_pool2d(self.act(self.bn(self.conv(x))), 2)
        return self.fc2(F.relu(self.fc1(h.flatten(1))))


def tiny_net() -> nn.Module:
    torch.manual_seed(0)
    net = TinyConvNet()
    with torch.no_grad():  # non-trivial BatchNorm state, so a model left unchanged is a real check
        net.bn.running_mean.uniform_(-0.1, 0.1)
        net.bn.running_var.uniform_(0.9, 1.1)
        net.bn.weight.uniform_(0.8, 1.2)
    return net


def scoring_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(20, 1, 8, 8, generator=gen)
    y = torch.arange(20) % 10
    return [(x[:12], y[:12]), (x[12:], y[12:])]  # two batches of different sizes


def snapshot(model: nn.Module) -> dict:
    return {
        "state": copy.deepcopy(model.state_dict()),
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "grad": {n: p.grad for n, p in model.named_parameters()},
        "training": {n: m.training for n, m in model.named_modules()},
    }


def assert_unchanged(model: nn.Module, before: dict) -> None:
    after = snapshot(model)
    assert after["state"].keys() == before["state"].keys()
    for k, v in before["state"].items():
        assert torch.equal(after["state"][k], v), f"{k} changed"
    assert after["requires_grad"] == before["requires_grad"]
    assert all(g is None for g in after["grad"].values())
    assert after["training"] == before["training"]


def prune_steps(model: nn.Module, seed: int) -> tuple[Pruner, list]:
    p = Pruner(model, list(INDICES_UNDER_TEST), scoring_batches(), seed=seed)
    keeps = keep_schedule(p.num_total, 0.9, 3)
    history = []
    for keep in keeps:
        previous = p.masks
        masks = p.step(WEIGHTS, keep)
        assert masks.num_kept == keep  # exact count
        assert all(bool((m <= previous[k]).all()) for k, m in masks.items())  # no weight comes back
        history.append(masks)
    return p, history


# ------------------------------------------------------------------------------------ multi-index pruner


def test_new_indices_are_registered() -> None:
    assert set(NEW) <= set(available_indices()) and set(NEW_METHODS) <= set(available_methods())
    assert {n for n in NEW if INDICES[n].needs_data} == {"force", "prospr", "px"}  # ntk_sap, synflow_l2: data-free


def test_multi_index_pruner_combines_the_new_indices_exactly() -> None:
    """Each index's scores in the pruner are compute_scores' (same data, shape and seed), bit for bit; the
    step keeps exactly the top ``keep`` of the weighted sum of their normalised scores."""
    model = tiny_net().train()
    batches = scoring_batches()
    p = Pruner(model, list(INDICES_UNDER_TEST), batches, seed=7)
    scores = p.scores()
    alive = p.alive_flat()
    total = None
    for name in INDICES_UNDER_TEST:
        ref = compute_scores(name, model, p.masks, batches if INDICES[name].needs_data else None,
                             input_shape=p.input_shape, seed=p.score_seed())
        assert list(scores[name]) == list(ref) == list(p.masks)
        for k in ref:
            assert torch.equal(scores[name][k], ref[k]), (name, k)
        flat = torch.cat([s.reshape(-1) for s in ref.values()])
        assert bool(torch.isfinite(flat).all()) and bool((flat >= 0).all()), name  # all five are magnitudes
        assert float(flat.abs().sum()) > 0, f"{name} scores every weight 0"
        part = WEIGHTS[name] * normalise(flat, alive, "mean")
        total = part if total is None else total + part
    keep = keep_count(p.num_total, 0.6)
    combined, offset = {}, 0
    for k, m in p.masks.items():
        combined[k] = total[offset: offset + m.numel()].view(m.shape)
        offset += m.numel()
    expected = select_topk(combined, keep, current=p.masks)
    assert p.step(WEIGHTS, keep).equal(expected)


def test_multi_index_steps_exact_counts_model_unchanged_and_deterministic() -> None:
    model = tiny_net().train()
    before = snapshot(model)
    _, first = prune_steps(model, seed=3)
    assert_unchanged(model, before)
    _, again = prune_steps(model, seed=3)  # same seed: same masks, bit for bit
    assert all(a.equal(b) for a, b in zip(first, again, strict=True))
    assert_unchanged(model, before)
    model.eval()  # eval mode is restored too
    before = snapshot(model)
    Pruner(model, list(INDICES_UNDER_TEST), scoring_batches(), seed=3).step(WEIGHTS, first[0].num_kept)
    assert_unchanged(model, before)


def test_each_new_index_alone_in_a_pruner() -> None:
    """One-hot weights: a step of the multi-index pruner is the single index's own top-k, and FORCE's
    regrow pruner selects among all weights (pruned ones included) with exact counts."""
    model = tiny_net()
    batches = scoring_batches()
    for name in NEW:
        p = Pruner(model, list(INDICES_UNDER_TEST), batches, seed=5)
        keep = keep_count(p.num_total, 0.8)
        single = Pruner(model, [name], batches, seed=5)
        assert p.step({name: 1.0}, keep).equal(single.step([1.0], keep)), name
    p = Pruner(model, ["force", "snip"], batches, seed=5, regrow=True)
    for keep in (500, 300, 400):  # with regrow the count may even go up
        assert p.step([1.0, 0.5], keep).num_kept == keep


# ------------------------------------------------------------------------------------------- environment


def test_env_lists_the_new_indices_and_runs_an_episode_to_the_end() -> None:
    clear_caches()
    env = PanningEnv(TINY, indices=list(INDICES_UNDER_TEST), reward="absolute")
    K = len(INDICES_UNDER_TEST)
    assert env.K == K and env.config.indices == list(INDICES_UNDER_TEST)
    for name in INDICES_UNDER_TEST:
        assert f"agreement_{name}" in env.feature_names
    rng = np.random.default_rng(0)
    actions = [rng.uniform(-1, 1, K + 1).astype(np.float32) for _ in range(3)]

    def episode() -> list:
        obs, info = env.reset(seed=1)
        out = [(obs, None, False, False, info)]
        for a in actions:
            out.append(env.step(a))
            if out[-1][2] or out[-1][3]:
                break
        return out

    steps = episode()
    assert len(steps) == 4 and steps[-1][2] and not steps[-1][3]  # terminated at the 3rd step
    for obs, *_ in steps:
        assert env.observation_space.contains(obs) and bool(np.isfinite(obs).all())
    for _, _, _, _, info in steps[1:]:
        assert set(info["index_weights"]) == set(INDICES_UNDER_TEST)
        assert not info["collapsed_layers"]
    final = steps[-1][4]
    assert env.masks.num_kept == keep_count(env.masks.num_total, 0.9) == final["keep"]
    assert math.isfinite(steps[-1][1]) and steps[-1][1] == pytest.approx(final["proxy_accuracy"])
    masks = env.masks
    again = episode()  # same seed and actions: the same episode
    assert env.masks.equal(masks)
    for a, b in zip(steps, again, strict=True):
        np.testing.assert_array_equal(a[0], b[0])
    assert again[-1][1] == steps[-1][1]


def test_env_one_hot_episodes_are_the_single_new_index() -> None:
    """An episode that puts all weight on one new index (default schedule) prunes exactly as a pruner of
    that index alone on the episode's network, data, input shape and seed: the env feeds each new index
    what the library does."""
    env = PanningEnv(TINY, indices=list(NEW), reward="absolute", proxy={"steps": 1})
    K = len(NEW)
    for k, name in enumerate(NEW):
        action = -np.ones(K + 1, dtype=np.float32)
        action[k] = 1.0
        action[K] = 0.0  # the default step share
        env.reset(seed=k)
        keeps = []
        for _ in range(3):
            *_, info = env.step(action)
            keeps.append(info["keep"])
        assert info["index_weights"][name] == 1.0 and sum(info["index_weights"].values()) == 1.0
        ref = Pruner(env.model, [name], env.batches, input_shape=env.bundle.input_shape, seed=env.init_seed)
        for keep in keeps:
            ref.step([1.0], keep)
        assert env.masks.equal(ref.masks), name


# ------------------------------------------------------------------------- panning list, unknown names


def test_panning_list_shows_every_index_and_method(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list"]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    listed = {}
    for line in out.strip().splitlines():
        label, _, names = line.partition(":")
        listed[label.strip()] = names.strip().split(", ")
    assert listed["indices"] == available_indices() and set(NEW) <= set(listed["indices"])
    assert listed["methods"] == available_methods() and set(NEW_METHODS) <= set(listed["methods"])


def _lists_all_indices(message: str) -> None:
    for name in available_indices():
        assert name in message, f"{name} missing from: {message}"


def test_unknown_index_lists_every_known_one(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # library entry points
    with pytest.raises(ValueError, match="unknown index 'nope'") as e:
        compute_scores("nope", tiny_net(), {"fc2.weight": torch.ones(10, 12, dtype=torch.bool)})
    _lists_all_indices(str(e.value))
    with pytest.raises(ConfigError, match="unknown index 'nope'") as e:
        Pruner(tiny_net(), ["px", "nope"], scoring_batches())
    _lists_all_indices(str(e.value))
    # an env config
    with pytest.raises(ConfigError, match="unknown index 'nope'") as e:
        PanningEnv(TINY, indices=["ntk_sap", "nope"])
    _lists_all_indices(str(e.value))
    # the command line: an agent config whose env lists an unknown index is refused in one line, exit 2
    cfg = tmp_path / "agent.yaml"
    cfg.write_text(f"env: {TINY}\nenv_kwargs: {{indices: [prospr, nope]}}\nn_timesteps: 12\nn_envs: 1\n"
                   "vec_env: dummy\n")
    out_dir = tmp_path / "run"
    assert main(["train-agent", "--config", str(cfg), "--out", str(out_dir), "--no-progress"]) == 2
    _, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "unknown index 'nope'" in lines[0] and "Traceback" not in err
    _lists_all_indices(lines[0])
    assert not out_dir.exists()
    # and an unknown method lists every method, the new ones included
    assert main(["prune", "--method", "nope", "--out", str(tmp_path / "p")]) == 2
    _, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "unknown method 'nope'" in lines[0]
    for name in available_methods():
        assert name in lines[0]
