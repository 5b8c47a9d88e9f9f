"""Train the panning agent: Stable-Baselines3 PPO on ``panning/Panning-v0``.

A training run directory holds:

- ``agent.yaml``: the resolved agent config (the env settings inlined, so ``--resume`` needs nothing else);
- ``tb/PPO_1/``: TensorBoard events: SB3's scalars, ``episode/*`` (proxy accuracy, final and
  effective sparsity, reward against the reference), ``policy/*`` (index weights and step share
  chosen at each pruning step) and ``eval/*`` (deterministic evaluation of the policy on held-out
  initialisations, beside the fixed methods at the same targets and seeds);
- ``checkpoints/ppo_<steps>_steps.zip``: periodic checkpoints (and one written on Ctrl-C);
- ``best_agent.zip``: the best policy by deterministic evaluation; ``agent.zip``: the final one.
  Both carry panning's metadata (:mod:`agents.policy`);
- ``eval.json``: every evaluation's numbers; ``train.json``: timesteps, episodes, wall time.
"""
from __future__ import annotations

import dataclasses
import json
import re
import signal
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from panning.agents.config import AgentConfig, load_agent_config, parse_schedule, policy_kwargs, resolve_env_path
from panning.agents.policy import agent_metadata, read_metadata, save_agent
from panning import config as _config
from panning.runs import write_json

__all__ = ["train_agent", "RunExists", "resolve_env_config", "AGENT_FILE", "BEST_FILE"]

AGENT_FILE = "agent.zip"
BEST_FILE = "best_agent.zip"
CONFIG_FILE = "agent.yaml"
CKPT_PREFIX = "ppo"
TB_NAME = "PPO"


class RunExists(ValueError):
    """The output directory already holds an agent run."""


def resolve_env_config(cfg: AgentConfig, config_file: Path | None = None) -> Any:
    """The env settings of ``cfg``: its env YAML with ``env_kwargs`` laid over it."""
    from panning.envs.panning_env import make_config

    return make_config(resolve_env_path(cfg, config_file), **cfg.env_kwargs)


class _EnvFactory:
    """Builds one monitored env in a worker process (picklable, for SubprocVecEnv)."""

    def __init__(self, env_config: Any, threads: int, worker: bool) -> None:
        self.env_config = env_config
        self.threads = threads
        self.worker = worker

    def __call__(self) -> Any:
        from stable_baselines3.common.monitor import Monitor

        from panning.envs.panning_env import PanningEnv

        from panning.alloc import tune_malloc

        torch.set_num_threads(self.threads)
        tune_malloc()  # a worker is a fresh process: tune its allocator as the CLI's
        if self.worker:
            # Ctrl-C goes to the whole process group: let the main process handle it and save.
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        return Monitor(PanningEnv(self.env_config))


def _make_vec_env(cfg: AgentConfig, env_config: Any) -> Any:
    from stable_baselines3.common.vec_env import DummyVecEnv, SubprocVecEnv

    if cfg.vec_env == "subproc" and cfg.n_envs > 1:
        return SubprocVecEnv([_EnvFactory(env_config, cfg.threads, True) for _ in range(cfg.n_envs)])
    return DummyVecEnv([_EnvFactory(env_config, cfg.threads, False) for _ in range(cfg.n_envs)])


# ------------------------------------------------------------------------------------- callbacks


def _callbacks() -> tuple[type, ...]:
    """Callback classes, defined lazily so importing this module does not import SB3."""
    import gymnasium as gym
    from stable_baselines3.common.callbacks import BaseCallback, CheckpointCallback, EvalCallback

    class EpisodeLogger(BaseCallback):
        """Records, through ``logger.record_mean``, what each training episode chose and got; adds a
        TensorBoard custom-scalars layout that overlays related curves (agent vs fixed methods, ...)."""

        def _on_training_start(self) -> None:
            from stable_baselines3.common.logger import TensorBoardOutputFormat

            for fmt in self.logger.output_formats:
                if isinstance(fmt, TensorBoardOutputFormat):
                    fmt.writer.add_custom_scalars(CUSTOM_SCALARS)

        def _on_step(self) -> bool:
            for info, done in zip(self.locals["infos"], self.locals["dones"]):
                if "index_weights" in info:
                    w = info["index_weights"]
                    total = sum(w.values()) or 1.0
                    step = int(info["step"])
                    for name, v in w.items():
                        self.logger.record_mean(f"policy/step{step:02d}_weight_{name}", v / total)
                        self.logger.record_mean(f"policy/weight_{name}", v / total)
                    self.logger.record_mean(f"policy/step{step:02d}_share", info["step_share"])
                if done and "sparsity" in info:
                    self.logger.record_mean("episode/final_sparsity", info["sparsity"])
                    self.logger.record_mean("episode/effective_sparsity", info["effective_sparsity"])
                    self.logger.record_mean("episode/collapse", float(bool(info.get("collapse"))))
                    if "proxy_accuracy" in info:
                        self.logger.record_mean("episode/proxy_accuracy", info["proxy_accuracy"])
                        self.logger.record_mean("episode/proxy_seconds", info["proxy_seconds"])
                    if "reference_accuracy" in info:
                        self.logger.record_mean("episode/reference_accuracy", info["reference_accuracy"])
                        self.logger.record_mean("episode/minus_reference", info["proxy_accuracy"] - info["reference_accuracy"])
            return True

    class FixedEpisodes(gym.Wrapper):
        """Cycles through a fixed list of (target sparsity, init seed) episodes; ``restart()`` rewinds."""

        def __init__(self, env: Any, episodes: list[tuple[float, int]]) -> None:
            super().__init__(env)
            self.episodes = episodes
            self.i = 0

        def restart(self) -> None:
            self.i = 0

        def reset(self, *, seed: int | None = None, options: dict | None = None) -> Any:
            target, init = self.episodes[self.i % len(self.episodes)]
            self.i += 1
            return self.env.reset(seed=seed, options={"target_sparsity": target, "init_seed": init})

    class CheckpointKeepLast(CheckpointCallback):
        """SB3's CheckpointCallback, deleting all but the newest ``keep`` periodic checkpoints."""

        def __init__(self, *args: Any, keep: int = 3, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.keep = keep

        def _on_step(self) -> bool:
            out = super()._on_step()
            if self.keep:
                for old in _checkpoints(Path(self.save_path))[: -self.keep]:
                    old[1].unlink(missing_ok=True)
            return out

    class SaveBest(BaseCallback):
        """Called by EvalCallback on a new best: saves the policy with panning's metadata."""

        def __init__(self, path: Path, meta: Callable[[], dict[str, Any]], state: Path) -> None:
            super().__init__()
            self.path, self.meta, self.state = path, meta, state

        def _on_step(self) -> bool:
            parent = self.parent
            save_agent(self.model, self.path, self.meta() | {"eval_mean_reward": parent.best_mean_reward})
            write_json(self.state, {"best_mean_reward": float(parent.best_mean_reward), "timesteps": self.num_timesteps})
            return True

    class ComparisonEval(EvalCallback):
        """SB3's EvalCallback (deterministic; keeps the best policy) on fixed held-out episodes, plus
        the policy's proxy accuracy beside the fixed methods' at the same targets and seeds."""

        def __init__(self, eval_env: Any, fixed: Any, baselines: Callable[[float, int], dict[str, float]],
                     record: Path, log: Callable[[str], None], total: int, **kwargs: Any) -> None:
            super().__init__(eval_env, n_eval_episodes=len(fixed.episodes), deterministic=True, **kwargs)
            self.fixed, self.baselines, self.record_path, self.log, self.total = fixed, baselines, record, log, total
            self.finals: list[dict[str, Any]] = []
            self.history: list[dict[str, Any]] = json.loads(record.read_text()) if record.is_file() else []
            self.t0 = time.perf_counter()
            self.start_steps: int | None = None

        def _log_success_callback(self, locals_: dict[str, Any], globals_: dict[str, Any]) -> None:
            super()._log_success_callback(locals_, globals_)
            if locals_["done"]:
                self.finals.append(dict(locals_["info"]))

        def _on_step(self) -> bool:
            if self.start_steps is None:
                self.start_steps = self.num_timesteps
            due = self.eval_freq > 0 and self.n_calls % self.eval_freq == 0
            if due:
                self.fixed.restart()
                self.finals = []
            go_on = super()._on_step()
            if due:
                self._compare()
            return go_on

        def _compare(self) -> None:
            rows = []
            for (target, init), info in zip(self.fixed.episodes, self.finals):
                row = {"target": target, "init_seed": init, "agent": info.get("proxy_accuracy", 0.0),
                       "collapse": bool(info.get("collapse")), "reference": info.get("reference_accuracy")}
                row.update(self.baselines(target, init))
                rows.append(row)
            mean = lambda k: float(np.mean([r[k] for r in rows if r.get(k) is not None]))  # noqa: E731
            self.logger.record("eval/agent_proxy_accuracy", mean("agent"))
            methods = sorted({k for r in rows for k in r if k.startswith("fixed_")})
            for m in methods:
                self.logger.record(f"eval/{m}_proxy_accuracy", mean(m))
            singles = [m for m in methods if m != "fixed_panning"]
            if singles:
                best_single = float(np.mean([max(r[m] for m in singles) for r in rows]))
                self.logger.record("eval/best_single_proxy_accuracy", best_single)
                self.logger.record("eval/agent_minus_best_single", mean("agent") - best_single)
            if any(r["reference"] is not None for r in rows):
                self.logger.record("eval/reference_proxy_accuracy", mean("reference"))
            self.logger.dump(self.num_timesteps)
            self.history.append({"timesteps": self.num_timesteps, "mean_reward": self.last_mean_reward, "episodes": rows})
            write_json(self.record_path, self.history)
            done = self.num_timesteps - (self.start_steps or 0)
            rate = done / max(time.perf_counter() - self.t0, 1e-9)
            left = (self.total - self.num_timesteps) / rate if rate > 0 else float("nan")
            fixed = "  ".join(f"{m[6:]} {100 * mean(m):.2f}" for m in methods)
            self.log(f"[{self.num_timesteps}/{self.total} steps] eval proxy accuracy: agent {100 * mean('agent'):.2f}  "
                     f"{fixed}  (best so far {self.best_mean_reward:+.4f} reward; {rate:.1f} steps/s, ~{left / 60:.0f} min left)")

    return EpisodeLogger, FixedEpisodes, CheckpointKeepLast, SaveBest, ComparisonEval


CUSTOM_SCALARS = {
    "panning": {
        "eval: proxy accuracy, agent vs fixed methods": ["Multiline", [r"eval/agent_proxy_accuracy", r"eval/fixed_.*_proxy_accuracy"]],
        "eval: agent minus best single index": ["Multiline", [r"eval/agent_minus_best_single", r"eval/mean_reward"]],
        "training episodes: proxy accuracy vs reference": ["Multiline", [r"episode/proxy_accuracy", r"episode/reference_accuracy"]],
        "index weights (mean over steps)": ["Multiline", [r"policy/weight_.*"]],
        "step share of the remaining budget, by step": ["Multiline", [r"policy/step.._share"]],
        "sparsity": ["Multiline", [r"episode/final_sparsity", r"episode/effective_sparsity"]],
    }
}


def _checkpoints(folder: Path) -> list[tuple[int, Path]]:
    """Checkpoints in ``folder`` sorted by timesteps (oldest first)."""
    found = []
    for p in folder.glob(f"{CKPT_PREFIX}*_steps.zip"):
        m = re.search(r"_(\d+)_steps\.zip$", p.name)
        if m:
            found.append((int(m.group(1)), p))
    return sorted(found)


def _baseline_fn(env: Any, methods: list[str]) -> Callable[[float, int], dict[str, float]]:
    """Proxy accuracy of fixed methods (each as its paper runs it) on an eval episode; cached."""
    from panning.models import build_model
    from panning.pruner import prune

    cache: dict[tuple[float, int], dict[str, float]] = {}
    cfg = env.config

    def baselines(target: float, init: int) -> dict[str, float]:
        key = (target, init)
        if key not in cache:
            model = build_model(cfg.model, env.bundle.num_classes, env.bundle.input_shape, seed=init, init=cfg.init).to(env.device)
            out = {}
            for m in methods:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", RuntimeWarning)  # collapse is scored (low accuracy), not fatal
                    res = prune(model, m, target, env.batches, input_shape=env.bundle.input_shape, exclude=cfg.exclude,
                                mode=cfg.mode, seed=init)
                out[f"fixed_{m}"] = env.proxy.evaluate(model, res.masks).accuracy
            cache[key] = out
        return cache[key]

    return baselines


# ------------------------------------------------------------------------------------------ train

_RUN_FILES = (AGENT_FILE, BEST_FILE, "train.json", "eval.json", "eval_best.json", "evaluations.npz", "train.log")
_RUN_DIRS = ("checkpoints", "tb")


def _remove_run(out: Path, keep_config: bool = False) -> None:
    """Delete an agent run's own files (and nothing else) from ``out``."""
    import shutil

    for name in _RUN_FILES + (() if keep_config else (CONFIG_FILE,)):
        (out / name).unlink(missing_ok=True)
    for name in _RUN_DIRS:
        shutil.rmtree(out / name, ignore_errors=True)


def _check_eval_settings(cfg: AgentConfig, env_config: Any) -> None:
    from panning.config import ConfigError
    from panning.pruner import available_methods

    for m in cfg.eval_methods:
        if m not in available_methods():
            raise ConfigError(f"bad agent config: unknown eval method {m!r}; known: {', '.join(available_methods())}")
    if env_config.init_seeds > 0:
        pool = range(env_config.init_seed_base, env_config.init_seed_base + env_config.init_seeds)
        shared = sorted(set(cfg.eval_init_seeds) & set(pool))
        if cfg.eval_freq and shared:
            raise ConfigError(f"bad agent config: eval_init_seeds {shared} are also training initialisations "
                              f"({pool.start}..{pool.stop - 1}); evaluate on held-out seeds")


def _print(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def train_agent(
    config: AgentConfig | str | Path | None = None,
    out: str | Path = "runs/agent",
    *,
    config_file: str | Path | None = None,
    resume: bool = False,
    overwrite: bool = False,
    log: Callable[[str], None] = _print,
) -> dict[str, Any]:
    """Train (or, with ``resume``, continue training) a PPO agent; returns the ``train.json`` record.

    ``config`` is an :class:`AgentConfig` or the path of its YAML; ``config_file`` says where a given
    dataclass was read from, so that its relative ``env`` path resolves next to that file.
    """
    from stable_baselines3 import PPO
    from stable_baselines3.common.callbacks import CallbackList
    from stable_baselines3.common.monitor import Monitor
    from stable_baselines3.common.vec_env import DummyVecEnv

    from panning.envs.panning_env import PanningEnv

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise RunExists(f"{out} exists and is not a directory")
    if resume:
        if not (out / CONFIG_FILE).is_file():
            raise RunExists(f"{out} holds no agent run to resume ({CONFIG_FILE} missing); start one with --out")
        cfg = load_agent_config(out / CONFIG_FILE)
        env_config = resolve_env_config(cfg)
    else:
        if isinstance(config, (str, Path)):
            config_file = config
            cfg = load_agent_config(config)
        else:
            cfg = config or AgentConfig()
        env_config = resolve_env_config(cfg, Path(config_file) if config_file else None)
        if out.exists() and any(out.iterdir()):
            if not overwrite:
                raise RunExists(f"{out} already holds files; use --resume {out} to continue that run, or --overwrite")
            if not (out / CONFIG_FILE).is_file():
                # --overwrite replaces an agent run, never an arbitrary folder
                raise RunExists(f"{out} holds files but no agent run ({CONFIG_FILE} missing); choose another --out")
        # inline the env settings: the run directory is self-contained
        cfg = dataclasses.replace(cfg, env=None, env_kwargs=dataclasses.asdict(env_config))
    # check everything before any file is written or process started
    lr, clip = parse_schedule(cfg.learning_rate, "learning_rate"), parse_schedule(cfg.clip_range, "clip_range")
    pk = policy_kwargs(cfg.policy_kwargs)
    _check_eval_settings(cfg, env_config)
    torch.set_num_threads(cfg.threads)
    eval_core = PanningEnv(env_config)  # loads the data and builds the model: fails here, before any write
    if not resume and overwrite and out.exists():
        _remove_run(out)
    out.mkdir(parents=True, exist_ok=True)
    _config.dump(cfg, out / CONFIG_FILE)
    ckpt_dir = out / "checkpoints"
    done_steps = 0
    model = None
    loaded = False
    venv = _make_vec_env(cfg, env_config)
    try:
        if resume:
            # whichever holds the most steps: the final agent or the newest checkpoint (Ctrl-C's included)
            found = _checkpoints(ckpt_dir)
            final = out / AGENT_FILE
            if final.is_file():
                found.append((int(read_metadata(final).get("trained_timesteps", 0)), final))
            if found:
                path = max(found, key=lambda f: f[0])[1]
                model = PPO.load(path, env=venv, device=cfg.device, tensorboard_log=str(out / "tb"))
                # fresh, step-dependent seeds for the rest of the run (SB3 does not save RNG states)
                model.set_random_seed(cfg.seed + model.num_timesteps)
                done_steps = model.num_timesteps
                loaded = True
                log(f"resuming {out} from {path.name} at {done_steps} steps")
            else:
                log(f"{out}: nothing was saved before the interruption; starting over")
                _remove_run(out, keep_config=True)
        if model is None:
            model = PPO(
                cfg.policy, venv, learning_rate=lr, n_steps=cfg.n_steps, batch_size=cfg.batch_size, n_epochs=cfg.n_epochs,
                gamma=cfg.gamma, gae_lambda=cfg.gae_lambda, clip_range=clip, ent_coef=cfg.ent_coef, vf_coef=cfg.vf_coef,
                max_grad_norm=cfg.max_grad_norm, normalize_advantage=cfg.normalize_advantage, target_kl=cfg.target_kl,
                policy_kwargs=pk, tensorboard_log=str(out / "tb"), seed=cfg.seed, device=cfg.device, verbose=0,
            )
        remaining = cfg.n_timesteps - model.num_timesteps
        meta = lambda: agent_metadata(env_config, model.num_timesteps, agent_config=_config.to_dict(cfg))  # noqa: E731
        record = {"timesteps": model.num_timesteps, "n_timesteps": cfg.n_timesteps}
        if remaining <= 0:
            log(f"{out}: already trained for {model.num_timesteps} of {cfg.n_timesteps} steps; nothing to do")
            if not (out / AGENT_FILE).is_file():
                save_agent(model, out / AGENT_FILE, meta())
            return json.loads((out / "train.json").read_text()) if (out / "train.json").is_file() else record

        EpisodeLogger, FixedEpisodes, CheckpointKeepLast, SaveBest, ComparisonEval = _callbacks()
        callbacks: list[Any] = [EpisodeLogger()]
        if cfg.checkpoint_freq:
            callbacks.append(CheckpointKeepLast(max(1, cfg.checkpoint_freq // cfg.n_envs), str(ckpt_dir),
                                                name_prefix=CKPT_PREFIX, keep=cfg.keep_checkpoints))
        if cfg.eval_freq:
            episodes = [(float(t), int(s)) for t in cfg.eval_targets for s in cfg.eval_init_seeds]
            fixed = FixedEpisodes(eval_core, episodes)
            eval_env = DummyVecEnv([lambda: Monitor(fixed)])
            best_state = out / "eval_best.json"
            saver = SaveBest(out / BEST_FILE, meta, best_state)
            evaluator = ComparisonEval(
                eval_env, fixed, _baseline_fn(eval_core, list(cfg.eval_methods)), out / "eval.json", log, cfg.n_timesteps,
                eval_freq=max(1, cfg.eval_freq // cfg.n_envs), callback_on_new_best=saver, verbose=0, warn=False,
            )
            if best_state.is_file():  # resumed: a later evaluation must beat the best already saved
                evaluator.best_mean_reward = json.loads(best_state.read_text())["best_mean_reward"]
            callbacks.append(evaluator)

        log(f"training PPO for {remaining} env steps ({cfg.n_envs} {cfg.vec_env} envs, {cfg.n_steps} steps each per "
            f"update); TensorBoard: tensorboard --logdir {out / 'tb'}")
        t0 = time.perf_counter()
        interrupted = False
        # the eval env is deliberately a DummyVecEnv in this process (its episode infos are read back)
        warnings.filterwarnings("ignore", "Training and eval env are not of the same type")
        try:
            # a fresh run writes tb/PPO_1; a resumed one appends to it (continuous curves)
            model.learn(remaining, callback=CallbackList(callbacks), reset_num_timesteps=not loaded,
                        tb_log_name=TB_NAME)
        except KeyboardInterrupt:
            interrupted = True
        wall = time.perf_counter() - t0
        prev = json.loads((out / "train.json").read_text()) if (out / "train.json").is_file() else {}
        record = {
            "timesteps": int(model.num_timesteps),
            "n_timesteps": cfg.n_timesteps,
            "episodes": int(prev.get("episodes", 0)) + int(model.num_timesteps - done_steps) // env_config.pruning_steps,
            "wall_seconds": float(prev.get("wall_seconds", 0.0)) + wall,
            "sessions": int(prev.get("sessions", 0)) + 1,
            "steps_per_second": (model.num_timesteps - done_steps) / max(wall, 1e-9),
            "finished": not interrupted and model.num_timesteps >= cfg.n_timesteps,
        }
        if interrupted:
            path = ckpt_dir / f"{CKPT_PREFIX}_interrupted_{model.num_timesteps}_steps.zip"
            ckpt_dir.mkdir(parents=True, exist_ok=True)
            model.save(path)
            write_json(out / "train.json", record)
            log(f"interrupted: saved {path}; continue with --resume {out}")
            raise KeyboardInterrupt
        save_agent(model, out / AGENT_FILE, meta())
        write_json(out / "train.json", record)
        log(f"wrote {out / AGENT_FILE}" + (f" and {out / BEST_FILE}" if (out / BEST_FILE).is_file() else "")
            + f" ({record['timesteps']} steps, {wall / 60:.1f} min)")
        return record
    finally:
        try:
            venv.close()
        except (EOFError, BrokenPipeError, ConnectionResetError):
            pass
