"""``panning/Panning-v0``: registration, config, episodes, action mapping, determinism, rewards, vec envs."""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.utils.data import Dataset

from panning import envs
from panning.config import ConfigError
from panning.data import load_dataset
from panning.envs.panning_env import (
    GLOBAL_FEATURES,
    INDEX_FEATURES,
    PanningEnv,
    PanningEnvConfig,
    clear_caches,
    make_config,
)
from panning.masks import keep_count
from panning.models import build_model
from panning.proxy import ProxyEvaluator, ProxySettings
from panning.pruner import prune

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "env" / "tiny.yaml"


def tiny(**overrides) -> PanningEnv:
    return PanningEnv(TINY, **overrides)


def run(env: PanningEnv, actions, seed: int = 0, options=None):
    obs, info = env.reset(seed=seed, options=options)
    out = []
    for a in actions:
        obs, r, term, trunc, info = env.step(a)
        out.append((obs, r, term, trunc, info))
        if term or trunc:
            break
    return out


def one_hot(k: int, K: int, b: float = 0.0) -> np.ndarray:
    a = -np.ones(K + 1, dtype=np.float32)
    a[k] = 1.0
    a[K] = b
    return a


# ------------------------------------------------------------------------------ registration, config


def test_registered_and_made_from_yaml_and_kwargs() -> None:
    assert envs.ENV_ID in gym.registry
    env = gym.make("panning/Panning-v0", config=str(TINY), target_sparsity=0.98)
    cfg = env.unwrapped.config
    assert cfg.target_sparsity == 0.98 and cfg.pruning_steps == 3  # kwarg overrides, the rest from YAML
    env.close()
    env = gym.make("panning/Panning-v0", model="mlp", dataset="digits", target_sparsity=0.98, pruning_steps=2,
                   device="cpu", proxy_steps=5, reward="absolute")
    obs, _ = env.reset(seed=0)
    assert env.observation_space.contains(obs)
    env.close()


@pytest.mark.parametrize("name", ["tiny.yaml", "digits_mlp.yaml", "mnist_lenet300.yaml", "mnist_lenet300_trusted.yaml",
                                  "mnist_lenet300_recipe.yaml"])
def test_shipped_yaml_files_load(name: str) -> None:
    """Every setting the file gives is the config's value; every other one is the documented default."""
    path = ROOT / "configs" / "env" / name
    raw = yaml.safe_load(path.read_text())
    cfg = make_config(path)
    assert isinstance(cfg, PanningEnvConfig)
    default = PanningEnvConfig()
    for f in dataclasses.fields(PanningEnvConfig):
        have = getattr(cfg, f.name)
        if f.name == "proxy":
            given = raw.get("proxy", {})
            for p in dataclasses.fields(ProxySettings):
                assert getattr(have, p.name) == given.get(p.name, getattr(ProxySettings(), p.name)), f"proxy.{p.name}"
        elif f.name in raw:
            assert have == raw[f.name], f.name
        else:
            assert have == getattr(default, f.name), f.name
    assert set(raw) <= {f.name for f in dataclasses.fields(PanningEnvConfig)}


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(target_sparsity=1.0), "target_sparsity"),
        (dict(target_sparsity=-0.1), "target_sparsity"),
        (dict(pruning_steps=0), "pruning_steps"),
        (dict(indices=["snip", "nope"]), "unknown index 'nope'"),
        (dict(indices=[]), "empty"),
        (dict(indices=["snip", "snip"]), "distinct"),
        (dict(target_range=[0.9, 0.8]), "target_range"),
        (dict(target_range=[0.5, 1.0]), "target_range"),
        (dict(reward="accuracy"), "reward"),
        (dict(normalisation="max"), "normalisation"),
        (dict(proxy={"steps": 0}), "proxy: bad proxy settings: steps must be an int >= 1"),
        (dict(proxy_steps=0), "steps must be an int >= 1"),  # the flat spelling of older configs still reads
        (dict(pruning_stepz=3), "unknown key 'pruning_stepz'"),
    ],
)
def test_bad_config_raises_at_construction(overrides, match) -> None:
    with pytest.raises(ValueError, match=match):
        gym.make("panning/Panning-v0", config=str(TINY), **overrides)


def test_bad_yaml_path() -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        PanningEnv("configs/env/missing.yaml")


def test_check_env_passes() -> None:
    import warnings

    from stable_baselines3.common.env_checker import check_env

    env = tiny()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any complaint of SB3's checker fails the test
        check_env(env, warn=True)


# ------------------------------------------------------------------------------------------ episode


def test_observation_layout_and_info() -> None:
    env = tiny()
    obs, info = env.reset(seed=0)
    K = len(env.config.indices)
    summary = len(GLOBAL_FEATURES) + len(INDEX_FEATURES) * K
    assert obs.shape == (summary + 32 * (9 + 5 * K),) == env.observation_space.shape  # the default: layers, 32 rows
    assert obs.dtype == np.float32 and len(env.feature_names) == obs.size
    assert tiny(observation="summary").observation_space.shape == (summary,)
    f = dict(zip(env.feature_names, obs, strict=True))
    assert f["progress"] == 0 and f["density"] == 1 and f["budget_left"] == 1
    assert f["loss_ratio"] == 0 and f["grad_norm_ratio"] == 0
    assert f["target_density"] == pytest.approx(1 + 2 * math.log10(0.1) / 3, abs=1e-5)
    assert info["target_sparsity"] == 0.9 and info["sparsity"] == 0.0
    steps = run(env, [np.zeros(K + 1, np.float32)] * 3)
    for t, (obs, _, term, trunc, info) in enumerate(steps, start=1):
        assert env.observation_space.contains(obs)
        for key in ("sparsity", "effective_sparsity", "index_weights", "step_share", "keep", "layer_density",
                    "timing", "collapsed_layers", "target_sparsity"):
            assert key in info, key
        assert info["step"] == t and not trunc
        assert info["index_weights"] == {n: 0.5 for n in env.config.indices}
        assert info["effective_sparsity"] >= info["sparsity"] - 1e-12
        assert term == (t == 3)
    final = steps[-1][4]
    assert {"proxy_accuracy", "proxy_seconds", "proxy_cached"} <= set(final)
    assert steps[-1][1] == pytest.approx(final["proxy_accuracy"])  # absolute reward, no shaping
    assert dict(zip(env.feature_names, steps[-1][0], strict=True))["progress"] == 1


def independent_proxy_accuracy(env: PanningEnv) -> float:
    """The proxy accuracy of the env's current masks, computed apart from the env: the same network
    rebuilt from the episode's init seed, pruned by the masks, trained by a fresh evaluator with the
    env's proxy settings on the same data (no cache)."""
    net = build_model(env.config.model, env.bundle.num_classes, env.bundle.input_shape, seed=env.init_seed,
                      init=env.config.init)
    env.masks.apply_(net)
    evaluator = ProxyEvaluator(env.bundle, settings=env.proxy.settings, device=env.device, cache_size=0)
    return evaluator.evaluate(net, env.masks).accuracy


def test_final_proxy_accuracy_is_the_proxy_of_the_final_masks() -> None:
    clear_caches()
    env = tiny()
    assert env.proxy.settings == ProxySettings(steps=10, batch_size=64)  # configs/env/tiny.yaml
    rng = np.random.default_rng(1)
    steps = run(env, [rng.uniform(-1, 1, env.K + 1).astype(np.float32) for _ in range(3)], seed=2)
    info = steps[-1][4]
    assert not info["proxy_cached"]
    acc = info["proxy_accuracy"]
    assert acc == independent_proxy_accuracy(env)
    n_val = len(env.bundle.val)
    assert n_val == 135 and acc * n_val == pytest.approx(round(acc * n_val), abs=1e-9)  # a count of digits
    assert steps[-1][1] == acc  # reward: absolute, no shaping


def test_a_k_fold_proxy_rewards_through_the_env() -> None:
    """``proxy: {folds: K}`` in the env config: the reward is the K-fold proxy of the final masks, pooled over
    the whole training pool (train and validation splits)."""
    clear_caches()
    env = tiny(proxy={"folds": 3})
    assert env.proxy.settings == ProxySettings(steps=10, batch_size=64, folds=3)
    rng = np.random.default_rng(1)
    steps = run(env, [rng.uniform(-1, 1, env.K + 1).astype(np.float32) for _ in range(3)], seed=2)
    acc = steps[-1][4]["proxy_accuracy"]
    assert acc == independent_proxy_accuracy(env)
    pool = len(env.bundle.train) + len(env.bundle.val)
    assert env.proxy.val_size == pool and acc * pool == pytest.approx(round(acc * pool), abs=1e-9)
    clear_caches()


_ENV_CACHE: dict[str, PanningEnv] = {}


def _shared(name: str, **overrides) -> PanningEnv:
    if name not in _ENV_CACHE:
        _ENV_CACHE[name] = tiny(**overrides)
    return _ENV_CACHE[name]


@given(
    actions=st.lists(
        st.lists(st.floats(-3.0, 3.0, allow_nan=False, width=32) | st.sampled_from([-1.0, 1.0, math.inf, -math.inf]),
                 min_size=4, max_size=4),
        min_size=3, max_size=3,
    ),
    seed=st.integers(0, 50),
)
@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_episode_ends_exactly_at_target_whatever_the_actions(actions, seed) -> None:
    env = _shared("ranged", target_sparsity=None, target_range=[0.5, 0.99], target_grid=0, terminate_on_collapse=False)
    steps = run(env, [np.asarray(a, dtype=np.float32) for a in actions], seed=seed)
    assert len(steps) == 3 and steps[-1][2]
    target = steps[-1][4]["target_sparsity"]
    assert 0.5 - 1e-9 <= target <= 0.99 + 1e-9
    assert env.masks.num_kept == keep_count(env.masks.num_total, target)
    kept = [s[4]["keep"] for s in steps]
    assert all(a >= b for a, b in zip(kept, kept[1:], strict=False))  # monotone


@pytest.mark.filterwarnings("ignore:layer collapse")  # magnitude disconnects this MLP at 97%
def test_one_hot_default_schedule_reproduces_single_index_pruning() -> None:
    env = tiny(target_sparsity=0.97, pruning_steps=4, indices=["synflow", "snip", "grasp_abs", "magnitude"],
               terminate_on_collapse=False)
    K = len(env.config.indices)
    for k, name in enumerate(env.config.indices):
        steps = run(env, [one_hot(k, K)] * 4, seed=k)
        ref = prune(env.model, name, 0.97, env.batches, iterations=4, schedule="exponential",
                    input_shape=env.bundle.input_shape, seed=env.init_seed)
        assert [s[4]["keep"] for s in steps] == [h.keep for h in ref.history]
        assert env.masks.equal(ref.masks), name


def test_weights_are_scale_free_and_zero_means_equal() -> None:
    env = tiny()
    K = len(env.config.indices)
    run(env, [np.r_[np.full(K, -1.0), 0.0].astype(np.float32)] * 3, seed=4)  # all index weights 0 -> equal
    m_zero = env.masks
    run(env, [np.zeros(K + 1, np.float32)] * 3, seed=4)  # all weights 0.5
    assert env.masks.equal(m_zero)


def test_step_share_mapping() -> None:
    env = tiny(target_sparsity=0.99, pruning_steps=4)
    K = len(env.config.indices)
    N, final = env.num_prunable, keep_count(env.num_prunable, 0.99)
    d = final / N
    for b, share in [(0.0, 1 / 4), (-1.0, 1 / 16), (0.5, 2 / 4), (1.0, 1.0)]:
        env.reset(seed=0)
        _, _, _, _, info = env.step(np.r_[np.zeros(K), b].astype(np.float32))
        assert info["step_share"] == pytest.approx(share)
        assert info["keep"] == max(final, round(d ** share * N))
    # the last step lands on the target even when b asks for almost nothing
    steps = run(env, [np.r_[np.zeros(K), -1.0].astype(np.float32)] * 4, seed=0)
    assert [s[4]["keep"] for s in steps][-1] == final
    assert steps[-1][4]["removed"] > steps[0][4]["removed"]


def test_actions_out_of_range_are_clipped_and_nan_raises() -> None:
    env = tiny()
    K = len(env.config.indices)
    wild = np.array([7.0, -3.0, 0.2, 2.5], np.float32)
    run(env, [wild] * 3, seed=1)
    m_wild = env.masks
    run(env, [np.clip(wild, -1, 1)] * 3, seed=1)
    assert env.masks.equal(m_wild)
    env.reset(seed=0)
    with pytest.raises(ValueError, match="NaN"):
        env.step(np.array([0.0, np.nan, 0.0, 0.0], np.float32))
    with pytest.raises(ValueError, match="shape"):
        env.step(np.zeros(K, np.float32))


def test_step_outside_an_episode_raises() -> None:
    env = tiny()
    K = len(env.config.indices)
    with pytest.raises(RuntimeError, match="reset"):
        env.step(np.zeros(K + 1, np.float32))
    run(env, [np.zeros(K + 1, np.float32)] * 3)
    with pytest.raises(RuntimeError, match="reset"):
        env.step(np.zeros(K + 1, np.float32))


def test_reset_options_and_seeded_draws() -> None:
    env = tiny(target_sparsity=None, target_range=[0.8, 0.99], target_grid=4, init_seeds=3, init_seed_base=10)
    grid = {round(1 - d, 6) for d in np.exp(np.linspace(math.log(0.01), math.log(0.2), 4))}
    seen = set()
    for s in range(12):
        _, info = env.reset(seed=s)
        assert info["target_sparsity"] in grid and 10 <= info["init_seed"] < 13
        seen.add(info["target_sparsity"])
    assert len(seen) > 1
    _, a = env.reset(seed=5)
    _, b = env.reset(seed=5)
    assert (a["target_sparsity"], a["init_seed"]) == (b["target_sparsity"], b["init_seed"])
    _, info = env.reset(seed=0, options={"target_sparsity": 0.95, "init_seed": 77})
    assert info["target_sparsity"] == 0.95 and info["init_seed"] == 77
    with pytest.raises(ValueError, match="unknown reset options"):
        env.reset(options={"sparsity": 0.5})


# -------------------------------------------------------------------------------- determinism, reward


def test_same_seed_and_actions_give_same_masks_and_reward() -> None:
    rng = np.random.default_rng(0)
    actions = [rng.uniform(-1, 1, 4).astype(np.float32) for _ in range(3)]
    clear_caches()
    env_a = tiny()
    a = run(env_a, actions, seed=3)
    clear_caches()  # no cached proxy result: the reward is recomputed from scratch
    env_b = tiny()
    b = run(env_b, actions, seed=3)
    assert env_a.masks.equal(env_b.masks)
    assert not a[-1][4]["proxy_cached"] and not b[-1][4]["proxy_cached"]
    assert [s[1] for s in a] == [s[1] for s in b]
    for (oa, *_), (ob, *_) in zip(a, b, strict=True):
        np.testing.assert_array_equal(oa, ob)


class Poisoned(Dataset):
    def __len__(self) -> int:
        raise AssertionError("the test split was read")

    def __getitem__(self, i: int):
        raise AssertionError("the test split was read")


def test_reward_never_touches_the_test_split() -> None:
    bundle = dataclasses.replace(load_dataset("digits"), test=Poisoned())
    env = PanningEnv(TINY, bundle=bundle, reward="relative")
    K = len(env.config.indices)
    steps = run(env, [np.zeros(K + 1, np.float32)] * 3, seed=0)
    assert "reference_accuracy" in steps[-1][4]
    with pytest.raises(RuntimeError, match="test split"):
        len(env.bundle.test)
    # the default (cached) bundle has its test split removed too
    with pytest.raises(RuntimeError, match="test split"):
        len(tiny().bundle.test)


def test_relative_reward_is_zero_for_the_best_single_index() -> None:
    env = tiny(reward="relative", target_sparsity=0.95)
    K = len(env.config.indices)
    rewards = {}
    for k, name in enumerate(env.config.indices):
        steps = run(env, [one_hot(k, K)] * 3, seed=0)
        info = steps[-1][4]
        rewards[name] = steps[-1][1]
        assert rewards[name] == pytest.approx(info["proxy_accuracy"] - info["reference_accuracy"])
    ref_index = info["reference_index"]
    assert rewards[ref_index] == 0.0  # same masks as the reference: the proxy result is reused
    assert max(rewards.values()) == 0.0
    assert info["proxy_cached"]  # the reference pass already trained these masks


def test_loss_reward_is_the_log_loss_ratio_to_the_best_single_index() -> None:
    """reward: relative_loss = ln(lowest single-index proxy loss) - ln(the agent's proxy loss)."""
    env = tiny(reward="relative_loss", target_sparsity=0.95, reward_scale=2.0)
    K = len(env.config.indices)
    rewards, losses = {}, {}
    for k, name in enumerate(env.config.indices):
        steps = run(env, [one_hot(k, K)] * 3, seed=0)
        info = steps[-1][4]
        rewards[name], losses[name] = steps[-1][1], info["proxy_loss"]
        assert "reference_accuracy" not in info
        ratio = math.log(info["reference_loss"]) - math.log(info["proxy_loss"])
        assert rewards[name] == pytest.approx(2.0 * min(max(ratio, -1.0), 1.0))
    best = min(losses, key=losses.__getitem__)
    assert info["reference_index"] == best and info["reference_loss"] == losses[best]
    assert rewards[best] == 0.0 and max(rewards.values()) == 0.0
    # a mixed action is rewarded by its own loss against the same cached reference
    steps = run(env, [np.full(K + 1, 0.3, np.float32)] * 3, seed=0)
    info = steps[-1][4]
    assert info["reference_loss"] == losses[best]
    assert (steps[-1][1] > 0) == (info["proxy_loss"] < losses[best])


def test_loss_gain_is_bounded_and_clamps_diverged_losses() -> None:
    from panning.envs.panning_env import clamped_loss, loss_gain

    assert loss_gain(2.0, 1.0) == pytest.approx(math.log(2.0))
    assert loss_gain(1.0, 1.1) == pytest.approx(-math.log(1.1))
    assert loss_gain(10.0, 1.0) == 1.0 and loss_gain(1.0, 10.0) == -1.0  # bounded as the accuracy rewards
    for bad in (float("nan"), float("inf"), 1e9):
        assert loss_gain(0.5, bad) == -1.0 and clamped_loss(bad) == 1e3
    assert loss_gain(float("nan"), float("inf")) == 0.0
    assert loss_gain(1.0, 0.0) == 1.0 and loss_gain(0.0, 1.0) == -1.0 and clamped_loss(0.0) == 1e-8
    # a collapse (-collapse_penalty, 1 by default) never scores above a finished mask
    assert min(loss_gain(0.01, x) for x in (0.5, 3.0, 1e9, float("nan"))) >= -1.0
    with pytest.raises(ConfigError, match="reward must be one of absolute, relative, relative_loss"):
        tiny(reward="loss")


def test_collapse_ends_the_episode_with_a_penalty() -> None:
    env = tiny(indices=["random"], target_sparsity=0.9995, pruning_steps=2, collapse_penalty=0.7)
    steps = run(env, [np.array([1.0, 1.0], np.float32)] * 2, seed=0)
    obs, r, term, trunc, info = steps[-1]
    assert term and info["collapse"] and info["collapsed_layers"]
    assert r == pytest.approx(-0.7)
    assert "proxy_accuracy" not in info  # a collapsed network is not trained
    assert dict(zip(env.feature_names, obs, strict=True))["layers_collapsed"] > 0


def test_potential_based_shaping_telescopes() -> None:
    env = tiny(shaping=0.5)
    K = len(env.config.indices)
    steps = run(env, [np.array([1.0, -1.0, 0.0, 0.3], np.float32)] * 3, seed=2)
    obs = dict(zip(env.feature_names, steps[-1][0], strict=True))
    phi = -(abs(float(obs["loss_ratio"])) + abs(float(obs["grad_norm_ratio"])))
    total = sum(s[1] for s in steps)
    assert total == pytest.approx(steps[-1][4]["proxy_accuracy"] + 0.5 * phi, abs=1e-5)
    assert K == 3


# ------------------------------------------------------------------------------------------ vec envs


def test_runs_under_dummy_vec_env() -> None:
    from stable_baselines3.common.env_util import make_vec_env
    from stable_baselines3.common.vec_env import DummyVecEnv

    venv = make_vec_env("panning/Panning-v0", n_envs=2, seed=0, vec_env_cls=DummyVecEnv,
                        env_kwargs=dict(config=str(TINY), render_mode=None))
    obs = venv.reset()
    assert obs.shape == (2, venv.observation_space.shape[0])
    for _ in range(3):
        obs, rewards, dones, infos = venv.step(np.stack([venv.action_space.sample() for _ in range(2)]))
    assert dones.all() and all("proxy_accuracy" in i for i in infos)
    assert all("terminal_observation" in i for i in infos)
    venv.close()


@pytest.mark.parametrize("start_method", ["fork", pytest.param("forkserver", marks=pytest.mark.slow)])
def test_runs_under_subproc_vec_env(start_method: str) -> None:
    from stable_baselines3.common.env_util import make_vec_env
    from stable_baselines3.common.vec_env import SubprocVecEnv

    # "panning.envs:" makes gymnasium import the registering module inside each fresh worker process.
    venv = make_vec_env("panning.envs:panning/Panning-v0", n_envs=2, seed=0, vec_env_cls=SubprocVecEnv,
                        vec_env_kwargs=dict(start_method=start_method),
                        env_kwargs=dict(config=str(TINY), render_mode=None))
    try:
        venv.reset()
        for _ in range(3):
            obs, rewards, dones, infos = venv.step(np.zeros((2, venv.action_space.shape[0]), np.float32))
        assert dones.all() and obs.shape == (2, venv.observation_space.shape[0])
    finally:
        venv.close()
    # the workers' rewards are those of the same episodes played here (target fixed, zero actions: the
    # masks depend on the initialisation alone), and those are the proxy of the final masks
    env = tiny()
    for info in infos:
        steps = run(env, [np.zeros(env.K + 1, np.float32)] * 3, options={"init_seed": info["init_seed"]})
        assert steps[-1][4]["proxy_accuracy"] == info["proxy_accuracy"]
        assert info["proxy_accuracy"] == independent_proxy_accuracy(env)


def test_observation_size_does_not_depend_on_the_architecture(data_dir) -> None:
    small = tiny()
    big = PanningEnv(TINY, model="lenet300", dataset="mnist", data_dir=str(data_dir))
    assert small.observation_space == big.observation_space
    assert small.action_space == big.action_space
