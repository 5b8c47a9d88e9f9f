"""The per-layer observation (version 2) and the set extractor that reads it, against hand computations."""
from __future__ import annotations

import dataclasses
import json
import math
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from panning.episode import (
    GLOBAL_FEATURES,
    INDEX_FEATURES,
    LAYER_FEATURES,
    LAYER_INDEX_FEATURES,
    PruningEpisode,
    feature_names,
    layer_feature_size,
    observation_size,
)
from panning.masks import _topk_mask

ROOT = Path(__file__).resolve().parents[1]
INDICES = ["magnitude", "snip"]


class Three(nn.Module):
    """Three Linear layers; ``reverse`` registers them in the opposite order (same forward, same weights)."""

    def __init__(self, reverse: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        layers = {"a": nn.Linear(12, 20, bias=False), "b": nn.Linear(20, 16, bias=False),
                  "c": nn.Linear(16, 4, bias=False)}
        for name in (reversed(list(layers)) if reverse else layers):
            self.add_module(name, layers[name])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(torch.relu(self.b(torch.relu(self.a(x)))))


def batch() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(16, 12, generator=g), torch.arange(16) % 4)]


def episode(model: nn.Module, **kw) -> PruningEpisode:
    return PruningEpisode(model, INDICES, batch(), target_sparsity=0.95, steps=4, observation="layers",
                          max_layers=kw.pop("max_layers", 5), **kw)


def rows(ep: PruningEpisode, obs: np.ndarray) -> dict[str, dict[str, float]]:
    """Each real layer's row as {feature: value}, keyed by parameter name."""
    names = feature_names(ep.indices, "layers", ep.max_layers)
    f = dict(zip(names, obs.tolist(), strict=True))
    row = list(LAYER_FEATURES) + [f"{x}_{k}" for k in ep.indices for x in LAYER_INDEX_FEATURES]
    out = {}
    for i, name in enumerate(ep.masks):
        assert f[f"layer{i}_present"] == 1.0
        out[name] = {x: f[f"layer{i}_{x}"] for x in row}
    for i in range(len(ep.masks), ep.max_layers):
        assert f[f"layer{i}_present"] == 0.0 and all(f[f"layer{i}_{x}"] == 0.0 for x in row)
    return out


def test_layout_sizes_and_names() -> None:
    K = 3
    assert layer_feature_size(K) == 8 + 5 * K == len(LAYER_FEATURES) + K * len(LAYER_INDEX_FEATURES)
    summary = len(GLOBAL_FEATURES) + K * len(INDEX_FEATURES)
    assert observation_size(K, "layers", 4) == summary + 4 * (8 + 5 * K + 1)
    names = feature_names(["x", "y", "z"], "layers", 4)
    assert len(names) == observation_size(K, "layers", 4) and len(set(names)) == len(names)
    assert names[:summary] == feature_names(["x", "y", "z"])
    assert names[-4:] == [f"layer{i}_present" for i in range(4)]
    with pytest.raises(ValueError, match="unknown observation layout 'grid'"):
        observation_size(K, "grid")


def test_layer_rows_by_hand() -> None:
    """Static columns from the shapes; densities from the masks; per index the layer's share of that index's
    next prune set, computed here from the normalised scores with the pruner's tie-break, and the nearest-rank
    quantiles of each layer's normalised magnitudes."""
    ep = episode(Three())
    ep.step([0.0, 0.0, 0.4])  # part-way: layers of different densities
    obs = ep.observe()
    got = rows(ep, obs)
    # the summary part is the version-1 observation of the same state
    summary = PruningEpisode(Three(), INDICES, batch(), target_sparsity=0.95, steps=4)
    summary.step([0.0, 0.0, 0.4])
    assert np.array_equal(obs[:observation_size(2)], summary.observe())
    alive = ep.pruner.alive_flat()
    idx = alive.nonzero().squeeze(1)
    sizes = [m.numel() for m in ep.masks.values()]
    layer_of = torch.repeat_interleave(torch.arange(3), torch.tensor(sizes))[idx]
    m = ep.masks.num_kept - ep.planned_keep(0.0)[2]
    assert m > 0
    N = sum(sizes)
    for i, (name, mask) in enumerate(ep.masks.items()):
        r = got[name]
        out_f, in_f = mask.shape
        assert r["density"] == pytest.approx(1 + 2 * math.log10(mask.float().mean().item()) / 3, abs=1e-6)
        assert r["effective"] == pytest.approx(
            1 + 2 * math.log10(max(ep.effective[name].float().mean().item(), 1e-12)) / 3, abs=1e-6)
        assert r["size_share"] == pytest.approx(mask.numel() / N, rel=1e-6)
        assert r["log_size"] == pytest.approx(math.log10(mask.numel()) / 7, rel=1e-6)
        assert r["log_fan_in"] == pytest.approx(math.log10(in_f) / 5, rel=1e-6)
        assert r["log_fan_out"] == pytest.approx(math.log10(out_f) / 5, rel=1e-6)
        assert r["depth"] == i / 2 and r["conv"] == 0.0
        here = layer_of == i
        for k in INDICES:
            n = ep.pruner.normalised_scores(k).index_select(0, idx)
            lowest = ~_topk_mask(n, n.numel() - m)
            removed = int((lowest & here).sum())
            assert r[f"remove_layer_{k}"] == pytest.approx(removed / int(here.sum()), rel=1e-6)
            assert r[f"remove_global_{k}"] == pytest.approx(removed / m, rel=1e-6)
            mag = sorted(n[here].abs().tolist())
            for p in (10, 50, 90):
                want = math.log10(mag[round(p / 100 * (len(mag) - 1))] + 1e-12) / 3
                assert r[f"q{p}_{k}"] == pytest.approx(want, abs=1e-6)
    assert sum(got[n][f"remove_global_{k}"] for n in got for k in ["snip"]) == pytest.approx(1.0)


def test_terminal_observation_keeps_the_static_columns_and_zeroes_the_index_ones() -> None:
    ep = episode(Three())
    while not ep.done:
        ep.step([0.0, 0.0, 0.0])
    got = rows(ep, ep.observe())
    for r in got.values():
        assert all(r[f"{x}_{k}"] == 0.0 for k in INDICES for x in LAYER_INDEX_FEATURES)
        assert r["size_share"] > 0 and r["density"] < 1


def test_layer_features_do_not_depend_on_registration_order_beyond_depth() -> None:
    """The same network with its layers registered in reverse order: every layer's row is the same but for
    its depth, and the summary features are the same, at the start and after a step."""
    fwd, rev = episode(Three()), episode(Three(reverse=True))
    assert list(fwd.masks) == ["a.weight", "b.weight", "c.weight"] and list(rev.masks) == ["c.weight", "b.weight",
                                                                                           "a.weight"]
    for _ in range(2):
        of, orv = fwd.observe(), rev.observe()
        summary = observation_size(len(INDICES))
        np.testing.assert_allclose(of[:summary], orv[:summary], rtol=1e-6, atol=1e-7)
        rf, rr = rows(fwd, of), rows(rev, orv)
        for name in rf:
            a, b = dict(rf[name]), dict(rr[name])
            assert a.pop("depth") + b.pop("depth") == 1.0  # positions mirrored
            assert a == pytest.approx(b, rel=1e-6, abs=1e-7)
        fwd.step([0.0, 0.0, 0.3])
        rev.step([0.0, 0.0, 0.3])
        assert fwd.masks["b.weight"].equal(rev.masks["b.weight"])


def test_too_many_layers_for_the_axis_is_refused() -> None:
    with pytest.raises(ValueError, match="3 prunable layers; the observation holds at most max_layers=2"):
        episode(Three(), max_layers=2)


def test_a_conv_layer_row() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))
    x = torch.randn(6, 1, 6, 6)
    ep = PruningEpisode(model, INDICES, [(x, torch.arange(6) % 3)], target_sparsity=0.5, steps=2,
                        observation="layers", max_layers=2)
    r = rows(ep, ep.observe())["0.weight"]
    assert r["conv"] == 1.0
    assert r["log_fan_in"] == pytest.approx(math.log10(1 * 9) / 5) and r["log_fan_out"] == pytest.approx(
        math.log10(4 * 9) / 5)


# --------------------------------------------------------------------------- the set extractor

def _extractor(K: int = 2, hidden: int = 8):
    import gymnasium as gym

    from panning.agents.features import LayerSetExtractor

    torch.manual_seed(0)
    G = len(GLOBAL_FEATURES) + K * len(INDEX_FEATURES)
    space = gym.spaces.Box(-5, 5, (observation_size(K, "layers", 4),), np.float32)
    return LayerSetExtractor(space, G, layer_feature_size(K), hidden), G, layer_feature_size(K)


def _obs(G: int, F: int, layers: np.ndarray, pad: int, g: np.ndarray) -> torch.Tensor:
    L = len(layers)
    rows_ = np.concatenate([layers, np.zeros((pad, F))]).reshape(-1)
    present = np.r_[np.ones(L), np.zeros(pad)]
    return torch.as_tensor(np.r_[g, rows_, present], dtype=torch.float32)[None]


def test_extractor_output_does_not_change_with_more_padding() -> None:
    ext, G, F = _extractor()
    rng = np.random.default_rng(0)
    g, layers = rng.uniform(-1, 1, G), rng.uniform(-1, 1, (3, F))
    with torch.no_grad():
        base = ext(_obs(G, F, layers, 1, g))
        for pad in (0, 5, 29, 100):
            assert torch.equal(ext(_obs(G, F, layers, pad, g)), base), pad
        # a batch of two networks of different depths: each row is what it is alone, up to float rounding
        both = ext(torch.cat([_obs(G, F, layers, 3, g), _obs(G, F, layers[:1], 5, g)]))
        torch.testing.assert_close(both[0], base[0])
        torch.testing.assert_close(both[1], ext(_obs(G, F, layers[:1], 0, g))[0])
        # the layer rows matter, and their order does not
        assert not torch.equal(ext(_obs(G, F, layers[:2], 1, g)), base)
        torch.testing.assert_close(ext(_obs(G, F, layers[::-1].copy(), 1, g)), base)


def test_extractor_refuses_an_observation_of_another_layout() -> None:
    ext, G, F = _extractor()
    with pytest.raises(ValueError, match="not a layers observation"):
        ext(torch.zeros(1, G + F + 3))


# --------------------------------------------------------------------------- agents of both layouts

def _untrained_agent(tmp_path: Path, observation: str, max_layers: int = 3):
    """An untrained PPO on the tiny env (what matters here is the file and the layout, not the skill)."""
    from stable_baselines3 import PPO

    from panning.agents.features import extractor_kwargs
    from panning.agents.policy import agent_metadata, save_agent
    from panning.envs.panning_env import PanningEnv

    env = PanningEnv(ROOT / "configs" / "env" / "tiny.yaml", observation=observation, max_layers=max_layers)
    kw = extractor_kwargs(dataclasses.asdict(env.config), {})
    model = PPO("MlpPolicy", env, n_steps=8, batch_size=8, seed=0, device="cpu",
                policy_kwargs={"net_arch": [8], "log_std_init": -0.5, **kw})
    path = save_agent(model, tmp_path / f"{observation}.zip", agent_metadata(env.config))
    return env, path


def _env_masks(env, path: Path, init_seed: int):
    """The masks of the env's episode driven by the agent in ``path`` deterministically, at 95%."""
    from panning.agents.policy import load_agent

    agent = load_agent(path)
    obs, _ = env.reset(options={"init_seed": init_seed, "target_sparsity": 0.95})
    done = False
    while not done:
        obs, _, done, _, _ = env.step(agent.model.predict(obs, deterministic=True)[0])
    return env.masks


def test_a_layers_policy_applies_to_a_network_deeper_than_its_axis(tmp_path: Path) -> None:
    from panning.agents.policy import apply_policy, load_policy

    env, path = _untrained_agent(tmp_path, "layers", max_layers=3)
    policy = load_policy(path)
    assert (policy.observation, policy.max_layers) == ("layers", 3)
    torch.manual_seed(0)
    deep = nn.Sequential(*[m for _ in range(5) for m in (nn.Linear(64, 64), nn.ReLU())], nn.Linear(64, 10))
    res = apply_policy(policy, deep, 0.95, batches=env.batches)
    assert res.masks.sparsity == pytest.approx(0.95, abs=1e-4) and len(res.masks) == 6
    # and on its own depth it is the env's deterministic episode, bit for bit
    masks = _env_masks(env, path, 3)
    assert apply_policy(policy, env.model, 0.95, batches=env.batches, seed=3).masks.equal(masks)


def test_an_agent_file_written_before_the_layers_observation_still_loads(tmp_path: Path) -> None:
    """A version-1 file names no layout (no ``observation``/``max_layers`` keys): it is read as the summary
    layout and applies exactly as its env (``observation: summary``) ran it."""
    from panning.agents.policy import apply_policy, load_policy

    env, path = _untrained_agent(tmp_path, "summary")
    old = tmp_path / "v1.zip"
    with zipfile.ZipFile(path) as zin, zipfile.ZipFile(old, "w") as zout:
        for item in zin.namelist():
            data = zin.read(item)
            if item == "panning.json":
                meta = json.loads(data)
                assert meta["obs_version"] == 1
                for key in ("observation", "max_layers"):
                    del meta[key], meta["env"][key]
                data = json.dumps(meta).encode()
            zout.writestr(item, data)
    policy = load_policy(old)
    assert policy.observation == "summary" and policy.info["obs_version"] == 1
    masks = _env_masks(env, old, 4)
    assert apply_policy(policy, env.model, 0.95, batches=env.batches, seed=4).masks.equal(masks)


@pytest.mark.parametrize("by_selection", [True, False])
def test_layer_quantiles_are_each_layers_nearest_rank_by_either_route(by_selection: bool) -> None:
    from panning.episode import layer_quantiles

    g = torch.Generator().manual_seed(3)
    sizes = [7, 0, 1, 40, 2]  # an empty layer, a one-weight layer, ties below
    values = torch.randint(0, 5, (sum(sizes),), generator=g).float() * torch.rand(sum(sizes), generator=g).round()
    layer = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    alive = torch.tensor(sizes)
    ps = (0.1, 0.5, 0.9)
    got = layer_quantiles(values, layer, alive, ps, by_selection=by_selection)
    lo = 0
    for i, n in enumerate(sizes):
        seg = sorted(values[lo:lo + n].tolist())
        lo += n
        if n:
            assert [float(q[i]) for q in got] == [seg[round(p * (n - 1))] for p in ps]


def test_order_statistics_match_kthvalue_with_ties_nan_and_any_rank_order() -> None:
    from panning.episode import order_statistics

    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        for n in (1, 2, 7, 300):
            x = (torch.randint(0, 6, (n,), generator=g) * torch.rand(n, generator=g)).to(dtype)
            if n > 2:
                x[1] = float("nan")  # last in either route
            ranks = [n - 1, 0, n // 2, n // 2]  # unsorted, repeated
            got = order_statistics(x, ranks)
            want = [torch.kthvalue(x, r + 1).values for r in ranks]
            assert all(a.dtype == dtype and torch.equal(a, b) or (a.isnan() and b.isnan())
                       for a, b in zip(got, want, strict=True))
    assert order_statistics(torch.ones(3), []) == []
    with pytest.raises(ValueError, match="ranks must lie in"):
        order_statistics(torch.ones(3), [3])
    with pytest.raises(ValueError, match="ranks must lie in"):
        order_statistics(torch.ones(3), [-1])
