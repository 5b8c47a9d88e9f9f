"""The panning agent: training, TensorBoard scalars, resume, saved metadata, applying a policy."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from panning.agents.config import AgentConfig, load_agent_config, parse_schedule
from panning.agents.policy import META_MEMBER, AgentError, apply_policy, check_agent_file, load_agent
from panning.agents.train import AGENT_FILE, BEST_FILE, AgentTraining, RunExists, train_agent
from panning.config import ConfigError
from panning.envs.panning_env import PanningEnv
from panning.hashing import file_digest
from panning.masks import keep_count

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "agent" / "tiny.yaml"

pytestmark = pytest.mark.filterwarnings("ignore:layer collapse", "ignore:Training and eval env")


def _scalars(run: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    dirs = sorted((run / "tb").glob("PPO_*"))
    assert [d.name for d in dirs] == ["PPO_1"], dirs  # one run folder, also after a resume
    ea = EventAccumulator(str(dirs[0]), size_guidance={"scalars": 0})
    ea.Reload()
    return {t: [(e.step, e.value) for e in ea.Scalars(t)] for t in ea.Tags()["scalars"]}


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("agent") / "run"
    record = train_agent(TINY, out, log=lambda s: None)
    assert record["timesteps"] == 120 and record["finished"]
    return out


def test_tiny_run_writes_a_loadable_agent_and_custom_scalars(trained: Path) -> None:
    for name in (AGENT_FILE, BEST_FILE, "agent.yaml", "train.json", "eval.json"):
        assert (trained / name).is_file(), name
    agent = load_agent(trained / AGENT_FILE)
    assert agent.indices == ["synflow", "snip", "grasp_abs"]
    assert agent.pruning_steps == 3
    assert agent.metadata["trained_timesteps"] == 120
    assert agent.model.num_timesteps == 120
    tags = _scalars(trained)
    for tag in ("rollout/ep_rew_mean", "train/value_loss", "episode/proxy_accuracy", "episode/final_sparsity",
                "episode/effective_sparsity", "policy/step01_weight_synflow", "policy/step03_share",
                "eval/mean_reward", "eval/agent_proxy_accuracy", "eval/fixed_synflow_proxy_accuracy",
                "eval/fixed_panning_proxy_accuracy", "eval/best_single_proxy_accuracy"):
        assert tag in tags, tag
    assert [s for s, _ in tags["eval/agent_proxy_accuracy"]] == [48, 96]
    finals = [v for _, v in tags["episode/final_sparsity"]]
    assert max(finals) == pytest.approx(0.9, abs=1e-3) and min(finals) > 0  # the tiny env's fixed target
    best = load_agent(trained / BEST_FILE)
    assert best.indices == agent.indices and "eval_mean_reward" in best.metadata
    evals = json.loads((trained / "eval.json").read_text())
    assert [e["timesteps"] for e in evals] == [48, 96]
    assert {"agent", "fixed_synflow", "fixed_panning"} <= set(evals[0]["episodes"][0])
    # the per-layer density heat map of each evaluation, beside the curves
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(trained / "tb" / "PPO_1"), size_guidance={"images": 0})
    ea.Reload()
    assert [e.step for e in ea.Images("eval/layer_density")] == [48, 96]


def test_resume_continues_the_step_count(tmp_path: Path) -> None:
    out = tmp_path / "run"

    def interrupt(msg: str) -> None:  # Ctrl-C arriving just after the first evaluation
        if "eval" in msg:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_agent(TINY, out, log=interrupt)
    saved = [p.name for p in (out / "checkpoints").glob("*interrupted*")]
    assert len(saved) == 1
    first = json.loads((out / "train.json").read_text())
    assert not first["finished"] and 48 <= first["timesteps"] < 120
    assert not (out / AGENT_FILE).exists()
    with pytest.raises(RunExists, match="--resume"):
        train_agent(TINY, out, log=lambda s: None)
    logs: list[str] = []
    record = train_agent(None, out, resume=True, log=logs.append)
    assert f"at {first['timesteps']} steps" in logs[0]  # continued from the Ctrl-C checkpoint
    assert record["timesteps"] == 120 and record["finished"] and record["sessions"] == 2
    assert load_agent(out / AGENT_FILE).model.num_timesteps == 120
    steps = [s for s, _ in _scalars(out)["eval/agent_proxy_accuracy"]]
    assert steps == [48, 96]  # one continuous curve, in the same tb/PPO_1
    again = train_agent(None, out, resume=True, log=lambda s: None)  # finished: nothing to do
    assert again["timesteps"] == 120


def _rewrite_meta(src: Path, dst: Path, **changes) -> None:
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for item in zin.namelist():
            data = zin.read(item)
            if item == META_MEMBER:
                meta = json.loads(data)
                meta.update(changes)
                data = json.dumps(meta).encode()
            zout.writestr(item, data)


def test_mismatched_agents_fail_with_a_clear_message(trained: Path, tmp_path: Path) -> None:
    path = trained / AGENT_FILE
    with pytest.raises(AgentError, match=r"trained with indices \['synflow', 'snip', 'grasp_abs'\].*requested"):
        load_agent(path, indices=["snip", "synflow", "grasp_abs"])
    old = tmp_path / "old.zip"
    _rewrite_meta(path, old, obs_version=0)
    with pytest.raises(AgentError, match="observation version 0.*retrain"):
        load_agent(old)
    gone = tmp_path / "gone.zip"
    _rewrite_meta(path, gone, indices=["synflow", "snip", "no_such_index"])
    with pytest.raises(AgentError, match="no_such_index"):
        check_agent_file(gone)
    plain = tmp_path / "plain.zip"
    with zipfile.ZipFile(path) as zin, zipfile.ZipFile(plain, "w") as zout:
        for item in zin.namelist():
            if item != META_MEMBER:
                zout.writestr(item, zin.read(item))
    with pytest.raises(AgentError, match="not an agent saved by"):
        load_agent(plain)
    with pytest.raises(AgentError, match="does not exist"):
        load_agent(tmp_path / "missing.zip")


def test_agents_saved_before_the_packages_moved_still_load(trained: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Agent files of 0.1 pickled their schedules from ``agents.config``, a module that no longer exists."""
    import base64
    import sys
    import types

    # the repository's own agents/ folder must not pass for the old top-level package
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p and Path(p).resolve() != ROOT])

    import cloudpickle
    from stable_baselines3 import PPO
    from stable_baselines3.common.utils import FloatSchedule

    old_module = types.ModuleType("agents.config")
    old_module.__file__ = "/site-packages/agents/config.py"  # an installed module: pickled by reference

    class _Linear:  # what 0.1 pickled, by reference to its module
        def __init__(self, start: float) -> None:
            self.start = start

        def __call__(self, progress_remaining: float) -> float:
            return self.start * progress_remaining

    _Linear.__module__, _Linear.__qualname__ = "agents.config", "_Linear"
    old_module._Linear = _Linear  # type: ignore[attr-defined]
    parent = types.ModuleType("agents")
    parent.__path__, parent.__file__ = [], "/site-packages/agents/__init__.py"  # type: ignore[attr-defined]
    sys.modules["agents"], sys.modules["agents.config"] = parent, old_module
    try:
        stale = {"learning_rate": _Linear(1e-3), "lr_schedule": FloatSchedule(_Linear(1e-3))}
        stale = {k: base64.b64encode(cloudpickle.dumps(v)).decode() for k, v in stale.items()}
    finally:
        del sys.modules["agents.config"], sys.modules["agents"]
    old = tmp_path / "old_agent.zip"
    with zipfile.ZipFile(trained / AGENT_FILE) as zin, zipfile.ZipFile(old, "w") as zout:
        for item in zin.namelist():
            data = zin.read(item)
            if item == "data":
                d = json.loads(data)
                for key, blob in stale.items():
                    d[key] = {":type:": "<class 'agents.config._Linear'>", ":serialized:": blob}
                data = json.dumps(d).encode()
            zout.writestr(item, data)
    with pytest.raises(ModuleNotFoundError, match="agents"):
        PPO.load(old)  # SB3 alone cannot read it
    agent = load_agent(old)
    ref = load_agent(trained / AGENT_FILE)
    obs = np.zeros(ref.model.observation_space.shape, np.float32)
    assert np.array_equal(agent.model.predict(obs, deterministic=True)[0],
                          ref.model.predict(obs, deterministic=True)[0])


def _env_episode_and_applied(agent: Any, **env_settings: Any) -> tuple[PanningEnv, dict[str, Any], Any]:
    """The agent's deterministic episode in the tiny env at 95% (init seed 7), its last info, and
    apply_policy's result on the same network and scoring batch."""
    env = PanningEnv(ROOT / "configs" / "env" / "tiny.yaml", target_sparsity=0.95, **env_settings)
    obs, _ = env.reset(options={"init_seed": 7})
    done = False
    while not done:
        action, _ = agent.model.predict(obs, deterministic=True)
        obs, _, done, _, info = env.step(action)
    return env, info, apply_policy(agent, env.model, 0.95, batches=env.batches, seed=7)


def test_policy_in_the_env_and_apply_policy_give_the_same_masks(trained: Path) -> None:
    agent = load_agent(trained / AGENT_FILE)
    env, _, result = _env_episode_and_applied(agent)
    assert result.masks.equal(env.masks)
    assert result.masks.num_kept == keep_count(result.masks.num_total, 0.95)
    record = result.extra["policy"]
    assert len(record["steps"]) == 3 and record["indices"] == agent.indices
    assert record["steps"][-1]["keep"] == result.masks.num_kept


class _SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 6, 3, padding=1)
        self.fc1 = nn.Linear(6 * 8 * 8, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(torch.relu(self.conv(x)).flatten(1))))


@pytest.mark.parametrize("sparsity", [0.5, 0.9, 0.97])
def test_apply_policy_on_any_module_gives_exactly_the_requested_sparsity(trained: Path, sparsity: float) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 1, 8, 8, generator=g)
    y = torch.arange(200) % 10
    loader = DataLoader(TensorDataset(x, y), batch_size=32)
    model = _SmallCNN()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = apply_policy(trained / AGENT_FILE, model, sparsity, loader, scoring_per_class=4)
    assert result.masks.num_kept == keep_count(result.masks.num_total, sparsity)
    assert set(result.masks) == {"conv.weight", "fc1.weight", "fc2.weight"}
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # model untouched
    again = apply_policy(trained / AGENT_FILE, model, sparsity, loader, scoring_per_class=4)
    assert again.masks.equal(result.masks) and len(again.history) == 3  # deterministic
    with pytest.raises(ValueError, match="scoring data"):
        apply_policy(trained / AGENT_FILE, model, sparsity)


def test_cli_prune_with_policy_and_bad_agents(trained: Path, tmp_path: Path) -> None:
    from panning.cli import main

    out = tmp_path / "p"
    assert main(["prune", "--policy", str(trained / AGENT_FILE), "--model", "mlp", "--dataset", "digits",
                 "--sparsity", "0.96", "--out", str(out), "--no-progress"]) == 0
    info = json.loads((out / "prune.json").read_text())
    assert info["method"] == "agent" and info["sparsity"] == pytest.approx(0.96, abs=1e-4)
    assert len(info["policy"]["steps"]) == 3
    bad = tmp_path / "bad.zip"
    _rewrite_meta(trained / AGENT_FILE, bad, obs_version=99)
    r = subprocess.run([sys.executable, "-m", "panning.cli", "prune", "--policy", str(bad), "--sparsity", "0.9",
                        "--out", str(tmp_path / "q")], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "retrain" in r.stderr
    assert not (tmp_path / "q").exists()


def test_cli_train_agent_usage_errors(trained: Path, tmp_path: Path, capsys) -> None:
    from panning.cli import main

    def fails(*argv: str, match: str) -> None:
        assert main(list(argv)) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and match in err[0], err

    fails("train-agent", "--config", str(TINY), match="--out DIR")  # neither --out nor --resume
    fails("train-agent", "--config", str(TINY), "--out", str(trained), match="--resume")  # would overwrite
    fails("train-agent", "--resume", str(tmp_path / "nothing"), match="no agent run")
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("n_timestep: 100\n")
    fails("train-agent", "--config", str(cfg), "--out", str(tmp_path / "x"), match="n_timestep")
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    fails("train-agent", "--config", str(TINY), "--out", str(other), "--overwrite", match="no agent run")
    assert (other / "notes.txt").read_text() == "keep me"  # --overwrite never empties a foreign folder
    missing = tmp_path / "mnist.yaml"
    missing.write_text(f"env: {ROOT / 'configs' / 'env' / 'tiny.yaml'}\n"
                       f"env_kwargs: {{dataset: mnist, data_dir: {tmp_path / 'nodata'}}}\n")
    fails("train-agent", "--config", str(missing), "--out", str(tmp_path / "y"), match="nodata")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()  # nothing written


def test_cli_train_agent_then_resume_with_more_steps(tmp_path: Path, capsys) -> None:
    import yaml

    from panning.cli import main

    out = tmp_path / "run"
    # 24 steps = one rollout of the tiny config (2 envs x 12 steps): no evaluation or checkpoint yet
    assert main(["train-agent", "--config", str(TINY), "--out", str(out), "--timesteps", "24", "--seed", "5",
                 "--no-progress"]) == 0
    assert "trained 24 steps" in capsys.readouterr().out
    record = json.loads((out / "train.json").read_text())
    assert record["timesteps"] == record["n_timesteps"] == 24 and record["finished"] and record["sessions"] == 1
    assert (out / AGENT_FILE).is_file()
    assert load_agent(out / AGENT_FILE).metadata["trained_timesteps"] == 24
    saved = yaml.safe_load((out / "agent.yaml").read_text())
    assert saved["n_timesteps"] == 24 and saved["seed"] == 5  # the overrides are what the run directory records
    assert main(["train-agent", "--resume", str(out), "--seed", "1"]) == 2  # a resumed run keeps its seed
    assert main(["train-agent", "--config", str(TINY), "--out", str(tmp_path / "neg"), "--seed", "-1"]) == 2
    capsys.readouterr()

    saved["n_timesteps"] = 48
    (out / "agent.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
    assert main(["train-agent", "--resume", str(out), "--no-progress"]) == 0
    assert "trained 48 steps" in capsys.readouterr().out
    record = json.loads((out / "train.json").read_text())
    assert record["timesteps"] == record["n_timesteps"] == 48 and record["finished"] and record["sessions"] == 2
    assert record["episodes"] == 48 // 3  # the tiny env's episodes are 3 steps long
    agent = load_agent(out / AGENT_FILE)
    assert agent.model.num_timesteps == 48 and agent.metadata["trained_timesteps"] == 48
    assert [d.name for d in (out / "tb").iterdir()] == ["PPO_1"]  # the resumed session appended to the same run
    # SB3 logs once per 24-step rollout, at the step count it ended on: one curve over both sessions
    assert [step for step, _ in _scalars(out)["rollout/ep_rew_mean"]] == [24, 48]


def test_sweep_with_an_agent(trained: Path, tmp_path: Path) -> None:
    from panning.cli import main

    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(
        f"base: {ROOT / 'configs' / 'digits_mlp.yaml'}\nmethods: [snip, agent]\n"
        f"agents: {{agent: {trained / AGENT_FILE}}}\nsparsities: [0.9]\nseeds: [0]\ndense: false\n"
        "overrides: {train.epochs: 1}\n"
    )
    assert main(["benchmark", "--config", str(sweep), "--out", str(tmp_path / "b")]) == 0
    rows = (tmp_path / "b" / "results.csv").read_text().splitlines()
    assert len(rows) == 3 and any(r.split(",")[2] == "agent" for r in rows[1:])


def test_subproc_training_and_overwrite(tmp_path: Path) -> None:
    cfg = dataclasses.replace(load_agent_config(TINY), vec_env="subproc", n_timesteps=24, eval_freq=0,
                              checkpoint_freq=0, env=str(ROOT / "configs" / "env" / "tiny.yaml"))
    out = tmp_path / "run"
    assert train_agent(cfg, out, log=lambda s: None)["timesteps"] == 24
    (out / "keep.txt").write_text("mine")
    assert train_agent(cfg, out, overwrite=True, log=lambda s: None)["timesteps"] == 24
    assert (out / "keep.txt").read_text() == "mine"  # only the run's own files were replaced
    assert json.loads((out / "train.json").read_text())["sessions"] == 1


def test_loss_reward_trains_and_logs_its_scalars(tmp_path: Path) -> None:
    """reward: relative_loss through train-agent: the loss reward's own episode scalars in TensorBoard."""
    cfg = dataclasses.replace(load_agent_config(TINY), n_timesteps=24, eval_freq=0, checkpoint_freq=0,
                              env=str(ROOT / "configs" / "env" / "tiny.yaml"), env_kwargs={"reward": "relative_loss"})
    out = tmp_path / "run"
    assert train_agent(cfg, out, log=lambda s: None)["timesteps"] == 24
    tags = _scalars(out)
    for tag in ("episode/proxy_loss", "episode/reference_loss", "episode/loss_gain"):
        assert tag in tags, tag
    assert "episode/reference_accuracy" not in tags
    assert load_agent(out / AGENT_FILE).metadata["agent_config"]["env_kwargs"]["reward"] == "relative_loss"


def test_training_on_a_mix_of_networks(tmp_path: Path) -> None:
    """env_mix: env 0 prunes the MLP on flat digits, env 1 a ResNet-8 with BatchNorm on digits images, with
    fresh initialisations; one policy (the set extractor) learns from both, and applies to either."""
    from panning.agents.train import mix_configs, resolve_env_config
    from panning.data import load_dataset
    from panning.models import build_model

    cfg = dataclasses.replace(load_agent_config(TINY), n_timesteps=24, eval_freq=0, checkpoint_freq=0,
                              env=str(ROOT / "configs" / "env" / "tiny.yaml"),
                              env_kwargs={"init_seeds": 0, "target_range": [0.98, 0.998], "target_sparsity": None},
                              env_mix=[{"model": "mlp"}, {"model": "resnet8", "dataset": "digits_image"}])
    envs = mix_configs(cfg, resolve_env_config(cfg))
    assert [(c.model, c.dataset) for c in envs] == [("mlp", "digits"), ("resnet8", "digits_image")]
    out = tmp_path / "mix"
    assert train_agent(cfg, out, log=lambda s: None)["timesteps"] == 24
    agent = load_agent(out / AGENT_FILE)
    assert agent.metadata["agent_config"]["env_mix"][1]["model"] == "resnet8"
    images = load_dataset("digits_image")
    net = build_model("resnet8", 10, images.input_shape, seed=5)
    res = apply_policy(agent, net, 0.99, images.train)
    assert res.masks.num_kept == keep_count(res.masks.num_total, 0.99)
    for bad, match in [([{"indices": ["snip"]}], r"env_mix\[0\] changes indices"),
                       ([{"max_layers": 8}], "changes max_layers"), ([{"layer_actions": 2}], "changes layer_actions"),
                       ([{"modle": "mlp"}], "modle"),
                       ([{"model": "resnet8"}], r"env_mix\[0\]: resnet8 needs an image input_shape")]:
        with pytest.raises(ConfigError, match=match):
            train_agent(dataclasses.replace(cfg, env_mix=bad), tmp_path / "bad", log=lambda s: None)
    assert not (tmp_path / "bad").exists()
    with pytest.raises(ConfigError, match="batched steps one architecture"):
        dataclasses.replace(cfg, vec_env="batched")
    with pytest.raises(ConfigError, match="every entry needs an env"):
        dataclasses.replace(cfg, n_envs=1, n_steps=24, batch_size=12)


def test_agent_config_validation(tmp_path: Path) -> None:
    assert parse_schedule("lin_1e-3")(0.5) == pytest.approx(5e-4)
    assert parse_schedule(0.2) == 0.2
    assert parse_schedule("3e-4") == pytest.approx(3e-4)  # YAML reads 3e-4 as a string
    zoo = tmp_path / "zoo.yaml"
    zoo.write_text("n_timesteps: !!float 1e4\nlearning_rate: 3e-4\nent_coef: 1e-3\n")
    z = load_agent_config(zoo)
    assert z.n_timesteps == 10_000 and z.ent_coef == pytest.approx(1e-3)
    for bad, match in [({"learning_rate": "exp_1"}, "lin_"), ({"n_steps": 10, "batch_size": 7}, "divide"),
                       ({"vec_env": "gpu"}, "vec_env"),
                       ({"policy_kwargs": {"activation_fn": "gelu2"}}, "activation_fn"),
                       ({"policy_kwargs": {"layer_log_std_init": "low"}}, "layer_log_std_init must be a finite"),
                       ({"policy_kwargs": {"layer_log_std_init": float("nan")}}, "layer_log_std_init must be a finite"),
                       ({"eval_targets": [1.0]}, "eval_targets")]:
        with pytest.raises(ConfigError, match=match):
            AgentConfig(**bad)
    shipped = load_agent_config(ROOT / "configs" / "agent" / "digits_mlp.yaml")
    assert shipped.n_envs * shipped.n_steps % shipped.batch_size == 0
    unknown = tmp_path / "u.yaml"
    unknown.write_text("n_timestep: 3\n")
    with pytest.raises(ConfigError, match="n_timestep"):
        load_agent_config(unknown)


def test_a_bad_env_setting_is_reported_where_it_is_written(tmp_path: Path) -> None:
    """An unknown index in the agent file's env_kwargs names env_kwargs, not the env YAML it is laid over;
    one in the env YAML names that file."""
    from panning.agents.train import resolve_env_config

    env = ROOT / "configs" / "env" / "tiny.yaml"
    with pytest.raises(ConfigError, match=r"^env_kwargs \(over .*tiny\.yaml\): .*unknown index 'bogus'"):
        resolve_env_config(AgentConfig(env=str(env), env_kwargs={"indices": ["snip", "bogus"]}))
    bad_env = tmp_path / "env.yaml"
    bad_env.write_text(env.read_text() + "\nindices: [bogus]\n")
    with pytest.raises(ConfigError, match=r"env\.yaml.*unknown index 'bogus'") as info:
        resolve_env_config(AgentConfig(env=str(bad_env), env_kwargs={"pruning_steps": 2}))
    assert "env_kwargs" not in str(info.value)


def test_policy_flags_that_the_agent_decides_are_refused(trained: Path, tmp_path: Path, capsys) -> None:
    from panning.cli import main

    out = tmp_path / "p"
    assert main(["prune", "--policy", str(trained / AGENT_FILE), "--sparsity", "0.9", "--iterations", "5",
                 "--out", str(out)]) == 2
    assert "--iterations cannot be combined with --policy" in capsys.readouterr().err
    assert not out.exists()


def test_sweep_refuses_an_agent_named_like_a_method(trained: Path, tmp_path: Path, capsys) -> None:
    from panning.cli import main

    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(f"base: {ROOT / 'configs' / 'digits_mlp.yaml'}\nmethods: [snip]\n"
                     f"agents: {{snip: {trained / AGENT_FILE}}}\nsparsities: [0.9]\n")
    assert main(["benchmark", "--config", str(sweep), "--out", str(tmp_path / "b")]) == 2
    assert "also a fixed method" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


def test_evaluation_on_training_initialisations_is_refused(tmp_path: Path) -> None:
    cfg = dataclasses.replace(load_agent_config(TINY), env=str(ROOT / "configs" / "env" / "tiny.yaml"),
                              eval_init_seeds=[1])  # the tiny env trains on inits 0 and 1
    with pytest.raises(ConfigError, match="held-out"):
        train_agent(cfg, tmp_path / "r", log=lambda s: None)
    bad_method = dataclasses.replace(cfg, eval_init_seeds=[1000], eval_methods=["nope"])
    with pytest.raises(ConfigError, match="unknown eval method"):
        train_agent(bad_method, tmp_path / "r", log=lambda s: None)
    assert not (tmp_path / "r").exists()


def test_an_agent_with_per_layer_actions_trains_loads_and_applies_as_in_its_env(tmp_path: Path) -> None:
    tiny = load_agent_config(TINY)
    cfg = dataclasses.replace(tiny, n_timesteps=24, eval_freq=0, checkpoint_freq=0,
                              env_kwargs={**tiny.env_kwargs, "layer_actions": 2},
                              policy_kwargs={**tiny.policy_kwargs, "log_std_init": -0.5, "layer_log_std_init": -2.0})
    training = AgentTraining.from_config(cfg, tmp_path / "fresh", log=lambda s: None)
    training.prepare()
    try:
        log_std = training.create_or_load().policy.log_std.detach()
    finally:
        training.close()
    # the new policy's noise: -0.5 on the index weights and the step size, -2 on the two layer terms
    assert log_std.tolist() == pytest.approx([-0.5] * (len(training.env_config.indices) + 1) + [-2.0] * 2)
    out = tmp_path / "run"
    assert train_agent(cfg, out, log=lambda s: None)["timesteps"] == 24
    agent = load_agent(out / AGENT_FILE)
    assert agent.metadata["layer_actions"] == 2 and agent.model.action_space.shape == (len(agent.indices) + 3,)
    with pytest.raises(ConfigError, match="layer_log_std_init sets the noise of the per-layer"):
        train_agent(dataclasses.replace(cfg, env_kwargs=tiny.env_kwargs), tmp_path / "bad", log=lambda s: None)
    assert not (tmp_path / "bad").exists()
    assert any(t.startswith("policy/layer00_term") for t in _scalars(out))
    env, info, result = _env_episode_and_applied(agent, layer_actions=2)
    assert result.masks.equal(env.masks) and result.masks.num_kept == keep_count(result.masks.num_total, 0.95)
    assert result.extra["policy"]["steps"][-1]["layer_factors"] == info["layer_factors"]


def test_a_warm_start_begins_from_the_saved_agent_and_refuses_one_that_does_not_fit(trained: Path,
                                                                                     tmp_path: Path) -> None:
    """init_agent: the new run's policy is the saved agent's, weight for weight, before it learns; an agent
    trained with other policy settings or another network is refused before anything is written."""
    src = trained / AGENT_FILE
    cfg = dataclasses.replace(load_agent_config(TINY), init_agent=str(src), n_timesteps=48, eval_freq=0)
    run = AgentTraining.from_config(cfg, tmp_path / "warm", log=lambda s: None)
    run.prepare()
    try:
        model = run.create_or_load()
        saved = load_agent(src).model.policy.state_dict()
        for name, value in model.policy.state_dict().items():
            assert torch.equal(value, saved[name]), name
        run.learn(24)  # half the run, then a later session resumes it: the origin stays recorded
        run.save()
    finally:
        run.close()
    assert check_agent_file(tmp_path / "warm" / AGENT_FILE)["init_agent_sha256"] == file_digest(src)
    assert train_agent(None, tmp_path / "warm", resume=True, log=lambda s: None)["timesteps"] == 48
    meta = check_agent_file(tmp_path / "warm" / AGENT_FILE)
    assert meta["trained_timesteps"] == 48 and meta["init_agent_sha256"] == file_digest(src)
    assert meta["agent_config"]["init_agent"] == str(src)
    cold = AgentTraining.from_config(dataclasses.replace(cfg, init_agent=None), tmp_path / "cold", log=lambda s: None)
    cold.prepare()
    try:
        assert not torch.equal(cold.create_or_load().policy.action_net.weight, saved["action_net.weight"])
    finally:
        cold.close()
    for change, match in [({"env_kwargs": {"observation": "summary"}}, r"observation 'layers' \(here 'summary'\)"),
                          ({"env_kwargs": {"pruning_steps": 4}}, r"pruning_steps 3 \(here 4\)"),
                          ({"policy_kwargs": {"net_arch": [8, 8], "activation_fn": "tanh"}},
                           r"different network \(first difference: .*\(16, 192\) in the agent, \(8, 192\) here"),
                          ({"policy_kwargs": {"net_arch": [16, 16], "activation_fn": "relu"}},
                           "activation_fn 'tanh' \\(here 'relu'\\)"),
                          ({"init_agent": str(tmp_path / "none.zip")}, "does not exist")]:
        out = tmp_path / "refused"
        with pytest.raises(ConfigError, match=r"^bad agent config: init_agent .*" + match):
            AgentTraining.from_config(dataclasses.replace(cfg, **change), out, log=lambda s: None).prepare()
        assert not out.exists()


def test_a_warm_start_reads_its_agent_once_and_accepts_older_files(trained: Path, tmp_path: Path) -> None:
    """--overwrite of the run that holds the init agent still starts from that agent (its bytes were read
    before the run's files went); a shipped agent saved before per-layer terms existed (no layer_actions in
    its metadata) fits a run with none."""
    out = tmp_path / "run"
    import shutil

    shutil.copytree(trained, out)
    digest = file_digest(out / BEST_FILE)
    cfg = dataclasses.replace(load_agent_config(TINY), init_agent=str(out / BEST_FILE), n_timesteps=24, eval_freq=0)
    train_agent(cfg, out, overwrite=True, log=lambda s: None)
    assert not (out / BEST_FILE).exists()  # the old run's files are gone; the new agent remembers its origin
    assert check_agent_file(out / AGENT_FILE)["init_agent_sha256"] == digest
    assert json.loads((out / "init_agent.json").read_text())["sha256"] == digest
    summary = AgentConfig(env=str(ROOT / "configs" / "env" / "digits_mlp.yaml"), init_agent="shipped:summary",
                          env_kwargs={"observation": "summary", "init_seeds": 0},
                          policy_kwargs={"net_arch": [64, 64], "activation_fn": "tanh",
                                         "features_extractor": "flatten"}, eval_freq=0)
    run = AgentTraining.from_config(summary, tmp_path / "summary", log=lambda s: None)
    run.prepare()
    assert run.init_digest == file_digest(ROOT / "agents" / "shipped" / "summary.zip")
