"""Sweeps and agent environments on Ray: a local instance the tests start and stop, on loopback."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from stable_baselines3.common.vec_env import SubprocVecEnv

from panning import config, runs, sweep
from panning.cli import main
from panning.distributed import RayCluster

ray = pytest.importorskip("ray", reason="Ray is an extra: pip install 'panning[ray]' (make installs it)")

ROOT = Path(__file__).resolve().parents[1]
BASE = """\
model: mlp
dataset: digits
prune:
  scoring_per_class: 5
train:
  epochs: 2
  batch_size: 64
  lr: 0.05
  augment: false
"""
SWEEP = """\
base: base.yaml
methods: [magnitude, snip]
sparsities: [0.9]
seeds: [0, 1]
dense: false
"""


def write_sweep(folder: Path, text: str = SWEEP) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "base.yaml").write_text(BASE)
    (folder / "sweep.yaml").write_text(text)
    return folder / "sweep.yaml"


def rows(out: Path) -> list[str]:
    return (out / "results.csv").read_text().splitlines()


def cell_files(out: Path) -> dict[str, float]:
    return {str(p.relative_to(out)): p.stat().st_mtime_ns for p in (out / "cells").rglob("metrics.json")}


def test_a_local_instance_is_started_for_the_run_and_stopped(tmp_path: Path, capsys) -> None:
    assert not ray.is_initialized()
    cfg = write_sweep(tmp_path / "cfg", SWEEP.replace("seeds: [0, 1]", "seeds: [0]").replace(", snip", ""))
    assert main(["benchmark", "--config", str(cfg), "--out", str(tmp_path / "out"), "--workers", "1"]) == 0
    assert not ray.is_initialized() and len(rows(tmp_path / "out")) == 2
    assert "on Ray, 1 at a time" in capsys.readouterr().err


@pytest.fixture(scope="module")
def local_ray():
    """One local instance (2 CPUs, loopback) for the tests below; RayCluster uses it and leaves it running."""
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    assert ray.nodes()[0]["NodeManagerAddress"] == "127.0.0.1"
    yield
    ray.shutdown()


def test_a_sweep_on_ray_writes_the_rows_of_a_serial_run_and_resumes(tmp_path: Path, capsys, local_ray) -> None:
    cfg = write_sweep(tmp_path / "cfg")
    assert main(["benchmark", "--config", str(cfg), "--out", str(tmp_path / "serial")]) == 0
    # the first seed on Ray, then the rest: finished cells are not recomputed
    par = tmp_path / "ray"
    assert main(["benchmark", "--config", str(cfg), "--out", str(par), "--workers", "2", "--seeds", "0"]) == 0
    first = cell_files(par)
    assert len(first) == 2
    assert main(["benchmark", "--config", str(cfg), "--out", str(par), "--workers", "2"]) == 0
    after = cell_files(par)
    assert len(after) == 4 and all(after[k] == v for k, v in first.items())
    # the same rows as the serial sweep; train seconds differ, accuracies are bit-identical (1 thread each)
    strip = lambda lines: [",".join(line.split(",")[:8]) for line in lines]  # noqa: E731
    assert strip(rows(par)) == strip(rows(tmp_path / "serial"))
    err = capsys.readouterr().err
    assert "on Ray, 2 at a time" in err


class KillOnce:
    """A cell runner whose worker process dies the first time it runs ``victim`` (a marker file says so)."""

    def __init__(self, marker: Path, victim: str, attempts: Path) -> None:
        self.marker, self.victim, self.attempts = marker, victim, attempts

    def __call__(self, cfg, cell, out: Path) -> object:
        if cell.key == self.victim:
            with open(self.attempts, "a") as f:
                f.write("attempt\n")
            if self.marker.exists():
                self.marker.unlink()
                os._exit(1)  # the worker process dies mid-cell
        return runs.run_cell(cfg, cell, out, progress=False)


def test_a_cell_whose_worker_dies_is_retried_and_recorded_once(tmp_path: Path, local_ray) -> None:
    import sys

    # the workers cannot import this test module: Ray's pickler sends its classes by value
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    sw, cfg = sweep.load_sweep(write_sweep(tmp_path / "cfg"))
    victim = sweep.Cell("snip", 0.9, 1).key
    (tmp_path / "kill").write_text("")
    fn = KillOnce(tmp_path / "kill", victim, tmp_path / "attempts")
    out = tmp_path / "out"
    with RayCluster(workers=2) as cluster:
        got = sweep.run_sweep(sw, cfg, out, fn, cluster=cluster, log=lambda s: None)
    assert (tmp_path / "attempts").read_text().count("attempt") == 2 and not (tmp_path / "kill").exists()
    assert len(got) == 4 and sorted(r["method"] for r in got) == ["magnitude", "magnitude", "snip", "snip"]
    assert len(rows(out)) == 1 + 4
    assert (out / "cells" / victim / "metrics.json").is_file() and (out / "cells" / victim / "masks.pt").is_file()


@pytest.mark.parametrize("argv, expected", [
    (["--address", "127.0.0.1:1"], "no Ray cluster answers there"),
    (["--workers", "1", "--gpus-per-cell", "1"], "the Ray cluster has 0 GPUs"),
    (["--workers", "0"], "--workers must be >= 1"),
    (["--workers", "1", "--cpus-per-cell", "0"], "--cpus-per-cell must be > 0"),
    # without --workers/--address nothing reads them: refused rather than a silently serial sweep
    (["--cpus-per-cell", "0"], "--cpus-per-cell declares what a cell needs from Ray: add --workers N"),
    (["--gpus-per-cell", "1"], "--gpus-per-cell declares what a cell needs from Ray: add --workers N"),
])
def test_bad_ray_settings_exit_2_and_write_nothing(argv: list[str], expected: str, tmp_path: Path, capsys,
                                                    monkeypatch) -> None:
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    cfg = write_sweep(tmp_path / "cfg")
    out = tmp_path / "out"
    assert main(["benchmark", "--config", str(cfg), "--out", str(out), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expected in err[0], err
    assert not out.exists()


def test_ray_vec_env_contract_and_same_episodes_as_subproc(local_ray) -> None:
    from panning.agents.train import _EnvFactory
    from panning.envs.panning_env import make_config
    from panning.envs.ray_vec_env import RayVecEnv

    env_cfg = make_config(ROOT / "configs" / "env" / "tiny.yaml", device="cpu", target_sparsity=None,
                          target_range=[0.9, 0.98], target_grid=0, reward="absolute")
    fns = [_EnvFactory(env_cfg, 1, False) for _ in range(2)]
    actions = np.random.default_rng(0).uniform(-1, 1, size=(7, 2, 4)).astype(np.float32)

    def episodes(venv) -> list:
        venv.seed(3)
        out = [venv.reset()]
        for a in actions:
            out.append(venv.step(a))
        return out

    sub = SubprocVecEnv(fns)
    try:
        ref = episodes(sub)
    finally:
        sub.close()
    with RayCluster(workers=2):
        venv = RayVecEnv(fns, num_cpus=1)
        got = episodes(venv)
        assert venv.num_envs == 2 and venv.get_attr("target_sparsity") == [
            i for i in venv.env_method("get_wrapper_attr", "target_sparsity")]
        venv.set_attr("marker", 5, indices=[1])
        assert venv.get_attr("marker", indices=[1]) == [5]
        from stable_baselines3.common.monitor import Monitor

        assert venv.env_is_wrapped(Monitor) == [True, True]
        venv.close()
    assert np.array_equal(ref[0], got[0])
    for (o1, r1, d1, i1), (o2, r2, d2, i2) in zip(ref[1:], got[1:], strict=True):
        assert np.array_equal(o1, o2) and np.array_equal(r1, r2) and np.array_equal(d1, d2)
        for a, b in zip(i1, i2, strict=True):
            assert set(a) == set(b) - {"episode"} | set(a) & {"episode"}
            if "terminal_observation" in a:
                assert np.array_equal(a["terminal_observation"], b["terminal_observation"])
                assert a["proxy_accuracy"] == b["proxy_accuracy"]
    assert sum(d.sum() for _, _, d, _ in got[1:]) == 2 * 2  # T = 3: two episodes each in 7 steps


def test_a_tiny_agent_trains_on_ray_actors(tmp_path: Path, local_ray) -> None:
    import dataclasses

    from panning.agents.config import load_agent_config
    from panning.agents.train import train_agent

    cfg = dataclasses.replace(load_agent_config(ROOT / "configs" / "agent" / "tiny.yaml"), vec_env="ray",
                              n_envs=2, n_timesteps=24, eval_freq=0)
    record = train_agent(cfg, tmp_path / "run", log=lambda s: None, progress_bar=False)
    assert record["timesteps"] == 24 and record["finished"] and ray.is_initialized()  # the session's instance
    assert json.loads((tmp_path / "run" / "train.json").read_text())["episodes"] == 8
    assert config.load(tmp_path / "run" / "agent.yaml", type(cfg)).vec_env == "ray"
