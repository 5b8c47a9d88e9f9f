"""The agents shipped inside the package: found by name, recorded, loadable, and exact."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from panning.agents.policy import (
    SHIPPED_DIR,
    AgentError,
    agent_path,
    apply_policy,
    load_agent,
    load_policy,
    shipped_agents,
)
from panning.data import load_dataset
from panning.masks import keep_count
from panning.models import build_model

pytestmark = pytest.mark.filterwarnings("ignore:layer collapse")


def test_the_shipped_agents_are_default_the_previous_default_and_the_mnist_agent() -> None:
    # `summary` (the default until session 12) stays so that the benchmark configs comparing with it reproduce;
    # `mnist_recipe` (session 18) is the agent trained on the trusted MNIST reward, kept for the same reason
    assert shipped_agents() == ["default", "mnist_recipe", "summary"]


@pytest.mark.parametrize("name", ["default", "summary", "mnist_recipe"])
def test_each_shipped_agent_ships_with_its_training_record(name: str) -> None:
    record = json.loads((SHIPPED_DIR / f"{name}.json").read_text())
    assert record["name"] == name
    for key in ("config", "commit", "env_steps", "wall_seconds", "machine", "torch", "selected_by"):
        assert record[key], key
    assert (SHIPPED_DIR / f"{name}.zip").stat().st_size < 2_000_000  # a small file inside the package
    meta = load_agent(name).metadata
    assert meta["observation"] in ("layers", "summary") and meta["trained_timesteps"] == record["env_steps"]
    # the record's config is the one the file was trained with
    assert meta["agent_config"]["seed"] == record["config"]["seed"]
    assert meta.get("layer_actions", 0) == record["config"]["env_kwargs"].get("layer_actions", 0)


def test_the_other_shipped_agents_prune_to_the_exact_sparsity_and_differ_from_the_default() -> None:
    bundle = load_dataset("digits")
    masks = {name: apply_policy(name, build_model("mlp", 10, bundle.input_shape, seed=5), 0.99, bundle.train).masks
             for name in ("default", "summary", "mnist_recipe")}
    for m in masks.values():
        assert m.num_kept == keep_count(m.num_total, 0.99)
    assert not masks["default"].equal(masks["summary"]) and not masks["default"].equal(masks["mnist_recipe"])


def test_names_and_paths() -> None:
    assert agent_path("default") == agent_path("shipped:default") == SHIPPED_DIR / "default.zip"
    assert agent_path("some/file.zip") == Path("some/file.zip")  # not shipped: a path, reported missing later
    with pytest.raises(AgentError, match="no shipped agent 'nope'; shipped agents: .*default"):
        agent_path("shipped:nope")
    with pytest.raises(AgentError, match="does not exist"):
        load_agent("no_such_agent.zip")


def test_config_files_keep_shipped_names() -> None:
    """A path setting ``shipped:NAME`` is not made relative to the config file."""
    from panning import config as _config
    from panning.sweep import SweepConfig

    sw = _config.load(Path(__file__).resolve().parents[1] / "configs" / "bench" / "demo.yaml", SweepConfig)
    assert sw.agents == {"agent": "shipped:default"}


@pytest.mark.parametrize("sparsity", [0.98, 0.99, 0.995])
def test_the_shipped_agent_prunes_a_fresh_network_to_the_exact_sparsity(sparsity: float) -> None:
    bundle = load_dataset("digits")
    model = build_model("mlp", 10, bundle.input_shape, seed=123)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = apply_policy("default", model, sparsity, bundle.train)
    assert res.masks.num_kept == keep_count(res.masks.num_total, sparsity)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the model is not modified
    again = apply_policy("default", build_model("mlp", 10, bundle.input_shape, seed=123), sparsity, bundle.train)
    assert again.masks.equal(res.masks)  # deterministic


def test_the_shipped_agent_in_its_env_and_applied_give_the_same_masks() -> None:
    """Applying the policy is the env's deterministic episode, bit for bit, on its training env settings."""
    from panning.envs.panning_env import PanningEnv

    agent = load_agent("default")
    env = PanningEnv(agent.metadata["env"], device="cpu")
    obs, _ = env.reset(options={"init_seed": 2024, "target_sparsity": 0.99})
    done = False
    while not done:
        obs, _, done, _, _ = env.step(agent.model.predict(obs, deterministic=True)[0])
    res = apply_policy(load_policy("default"), env.model, 0.99, batches=env.batches, seed=2024)
    assert res.masks.equal(env.masks)


def test_the_shipped_agent_on_a_conv_net_it_never_saw() -> None:
    bundle = load_dataset("digits_image")
    res = apply_policy("default", build_model("resnet20", 10, bundle.input_shape, seed=0), 0.99, bundle.train)
    assert res.masks.num_kept == keep_count(res.masks.num_total, 0.99)
    assert len(res.extra["policy"]["steps"]) == load_policy("default").pruning_steps
    assert np.isfinite([s["share"] for s in res.extra["policy"]["steps"]]).all()


def test_cli_prune_with_the_shipped_agent(tmp_path: Path) -> None:
    from panning.cli import main

    out = tmp_path / "p"
    assert main(["prune", "--policy", "default", "--model", "mlp", "--dataset", "digits", "--sparsity", "0.99",
                 "--out", str(out), "--no-progress"]) == 0
    info = json.loads((out / "prune.json").read_text())
    assert info["method"] == "agent" and info["sparsity"] == pytest.approx(0.99, abs=1e-4)
    assert info["policy"]["path"] == str(SHIPPED_DIR / "default.zip")
    assert main(["prune", "--policy", "shipped:nope", "--sparsity", "0.9", "--out", str(tmp_path / "q")]) == 2
    assert not (tmp_path / "q").exists()
