"""Every shipped config loads and names only models, data sets, inits and methods that exist."""
from __future__ import annotations

from pathlib import Path

import pytest

from panning import config, sweep
from panning.data import available_datasets
from panning.models import INITS, available_models
from panning.pruner import available_methods

ROOT = Path(__file__).resolve().parents[1]
RUN_CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
SWEEPS = sorted((ROOT / "configs" / "bench").glob("*.yaml"))


def test_configs_are_found() -> None:
    assert len(RUN_CONFIGS) >= 5 and len(SWEEPS) >= 6


@pytest.mark.parametrize("path", RUN_CONFIGS, ids=lambda p: p.name)
def test_run_config_is_valid(path: Path) -> None:
    cfg = config.load(path)
    assert cfg.model in available_models()
    assert cfg.dataset in available_datasets()
    assert cfg.init in INITS
    assert cfg.prune.method is None or cfg.prune.method in available_methods()


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.name)
def test_sweep_config_is_valid(path: Path) -> None:
    sw, cfg = sweep.load_sweep(path)
    assert cfg.model in available_models() and cfg.dataset in available_datasets() and cfg.init in INITS
    for m in sw.methods:
        assert m in available_methods() or m in sw.agents, m


ENV_CONFIGS = sorted((ROOT / "configs" / "env").glob("*.yaml"))
AGENT_CONFIGS = sorted((ROOT / "configs" / "agent").glob("*.yaml"))


@pytest.mark.parametrize("path", ENV_CONFIGS, ids=lambda p: p.name)
def test_env_config_is_valid(path: Path) -> None:
    from panning.envs.panning_env import PanningEnvConfig
    from panning.proxy import ProxySettings

    cfg = config.load(path, PanningEnvConfig)
    assert cfg.model in available_models() and cfg.dataset in available_datasets()
    assert isinstance(cfg.proxy, ProxySettings) and cfg.proxy.steps >= 1


@pytest.mark.parametrize("path", AGENT_CONFIGS, ids=lambda p: p.name)
def test_agent_config_is_valid_and_its_env_resolves_next_to_it(path: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from panning.agents.config import load_agent_config
    from panning.agents.train import mix_configs, resolve_env_config

    monkeypatch.chdir(tmp_path)  # relative paths in a YAML file do not depend on the working directory
    cfg = load_agent_config(path)
    assert cfg.env is not None and Path(cfg.env).is_absolute() and Path(cfg.env).is_file()
    assert Path(cfg.env).parent == (ROOT / "configs" / "env")
    env = resolve_env_config(cfg)
    assert env.pruning_steps >= 1
    # every entry of a training mix names a model and data set that exist (checked without loading any data)
    for c in mix_configs(cfg, env):
        assert c.model in available_models() and c.dataset in available_datasets()


def test_relative_paths_are_relative_to_the_yaml_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    d = tmp_path / "deep" / "er"
    d.mkdir(parents=True)
    (tmp_path / "deep" / "base.yaml").write_text("model: mlp\ndata_dir: ../data\nprune:\n  policy: agents/a.zip\n")
    (d / "sweep.yaml").write_text("base: ../base.yaml\nagents: {a: ../../runs/a.zip, b: /abs/b.zip}\n")
    monkeypatch.chdir(tmp_path / "deep" / "er")
    sw, cfg = sweep.load_sweep("sweep.yaml")
    assert sw.base == str(tmp_path / "deep" / "base.yaml")
    assert sw.agents == {"a": str(tmp_path / "runs" / "a.zip"), "b": "/abs/b.zip"}
    assert cfg.data_dir == str(tmp_path / "data")
    assert cfg.prune.policy == str(tmp_path / "deep" / "agents" / "a.zip")
    # written into a run directory and read back elsewhere, the config means the same thing
    config.dump(cfg, tmp_path / "run.yaml")
    monkeypatch.chdir(ROOT)
    assert config.load(tmp_path / "run.yaml") == cfg


def test_every_flag_is_a_declared_setting_and_reaches_it(tmp_path: Path) -> None:
    """Flags are generated from the dataclasses: each one sets the field it names."""
    import argparse

    from panning.cli import _overrides, build_parser

    opts = list(config.cli_options())
    flags = {o.flag for o in opts}
    assert {"--sparsity", "--method", "--exclude", "--mode", "--min-per-layer", "--schedule", "--scoring-per-class",
            "--lr", "--batch-size", "--epochs", "--seed", "--init", "--reinit", "--policy", "--data-dir"} <= flags
    values = {"bool": None, "int": "3", "float": "0.25", "str": "x", "list": ["fc1", "fc2"]}
    argv = ["run", "--out", str(tmp_path)]
    for o in opts:
        v = values[o.kind] if not o.choices else o.choices[-1]
        argv += [o.flag] if o.kind == "bool" else [o.flag, *(v if isinstance(v, list) else [v])]
    args = build_parser().parse_args(argv)
    got = _overrides(args)
    for o in opts:
        expect = True if o.kind == "bool" else (o.choices[-1] if o.choices else
                                               {"int": 3, "float": 0.25, "str": "x", "list": ["fc1", "fc2"]}[o.kind])
        assert got[o.dotted] == expect, o
    # and every dotted name is a real setting of the run config
    cfg = config.override(config.RunConfig(), {k: v for k, v in got.items() if k != "prune.policy"})
    for o in opts:
        if o.dotted != "prune.policy":
            node = cfg
            for part in o.dotted.split("."):
                node = getattr(node, part)
            assert node == got[o.dotted], o.dotted
    assert isinstance(args, argparse.Namespace)
