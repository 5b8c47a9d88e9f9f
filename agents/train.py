"""Train the panning agent: Stable-Baselines3 PPO on ``panning/Panning-v0``.

Training reads as the steps of rl-baselines3-zoo's experiment manager, each a method of
:class:`AgentTraining`: :meth:`~AgentTraining.prepare` (check everything, then set up the run
directory), :meth:`~AgentTraining.create_or_load` (a new PPO, or the newest checkpoint when
resuming), :meth:`~AgentTraining.callbacks`, :meth:`~AgentTraining.learn` and
:meth:`~AgentTraining.save`. :func:`train_agent` runs them in that order.

A training run directory holds:

- ``agent.yaml``: the resolved agent config (the env settings inlined, so ``--resume`` needs nothing else);
- ``tb/PPO_1/``: TensorBoard events: SB3's scalars, ``episode/*`` (proxy accuracy, final and
  effective sparsity, reward against the reference; under ``reward: relative_loss`` also ``proxy_loss``,
  ``reference_loss`` and ``loss_gain``), ``policy/*`` (index weights and step share
  chosen at each pruning step) and ``eval/*`` (deterministic evaluation of the policy on held-out
  initialisations, beside the fixed methods at the same targets and seeds);
- ``checkpoints/ppo_<steps>_steps.zip``: periodic checkpoints (and one written on Ctrl-C);
- ``best_agent.zip``: the best policy by deterministic evaluation; ``agent.zip``: the final one.
  Both carry panning's metadata (:mod:`panning.agents.policy`);
- ``eval.json``: every evaluation's numbers; ``train.json``: timesteps, episodes, wall time;
- ``init_agent.json`` (a warm start, ``init_agent``): the agent the policy started from and its sha256.
"""
from __future__ import annotations

import dataclasses
import io
import json
import os
import shutil
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from stable_baselines3 import PPO
from stable_baselines3.common.callbacks import BaseCallback, CallbackList
from stable_baselines3.common.monitor import Monitor
from stable_baselines3.common.policies import ActorCriticPolicy
from stable_baselines3.common.save_util import load_from_zip_file
from stable_baselines3.common.vec_env import DummyVecEnv, SubprocVecEnv, VecEnv, VecMonitor

from panning import config as _config
from panning.agents.callbacks import (
    CKPT_PREFIX,
    CheckpointKeepLast,
    ComparisonEval,
    EpisodeLogger,
    SaveBest,
    checkpoints,
)
from panning.agents.config import (
    AgentConfig,
    load_agent_config,
    parse_schedule,
    policy_kwargs,
    resolve_env_path,
    sb3_schedules,
)
from panning.agents.features import extractor_kwargs
from panning.agents.policy import (
    POLICY_SETTINGS,
    agent_metadata,
    agent_path,
    check_agent_file,
    policy_settings,
    read_metadata,
    save_agent,
)
from panning.distributed import RayCluster
from panning.envs.panning_env import PanningEnv, PanningEnvConfig, make_config
from panning.envs.ray_vec_env import RayVecEnv
from panning.envs.vec_env import BatchedPanningVecEnv, SubprocBatchedVecEnv, setup_env_process
from panning.envs.wrappers import FixedEpisodes
from panning.errors import AgentError, ConfigError, RunDirError
from panning.hashing import bytes_digest
from panning.io import write_json
from panning.models import build_model
from panning.pruner import available_methods, prune

__all__ = ["AGENT_FILE", "BEST_FILE", "AgentTraining", "RunExists", "layer_log_std", "mix_configs",
           "resolve_env_config", "train_agent"]

AGENT_FILE = "agent.zip"
BEST_FILE = "best_agent.zip"
CONFIG_FILE = "agent.yaml"
INIT_FILE = "init_agent.json"  # a warm start's origin (init_agent and its sha256)
TB_NAME = "PPO"
_RUN_FILES = (AGENT_FILE, BEST_FILE, INIT_FILE, "train.json", "eval.json", "eval_best.json", "evaluations.npz",
              "train.log")
_RUN_DIRS = ("checkpoints", "tb")


class RunExists(RunDirError):
    """The output directory already holds an agent run."""


def resolve_env_config(cfg: AgentConfig) -> PanningEnvConfig:
    """The env settings of ``cfg``: its env YAML with ``env_kwargs`` laid over it. A bad setting is reported
    against the file it is written in: the env YAML's own, or the agent config's ``env_kwargs``."""
    path = resolve_env_path(cfg)
    base = make_config(path)
    return make_config(base, where=f"env_kwargs (over {path or 'the defaults'})", **cfg.env_kwargs)


def _plain(value: Any) -> Any:
    """``value`` as JSON would give it back (tuples as lists), so a saved setting compares equal to a live one."""
    return json.loads(json.dumps(value, default=str))


def mix_configs(cfg: AgentConfig, env_config: PanningEnvConfig) -> list[PanningEnvConfig]:
    """The env settings of each of the ``n_envs`` training envs: ``env_mix`` entries laid over ``env_config``
    in turn (all ``env_config`` without a mix). Raises ConfigError when an entry changes a policy setting."""
    if not cfg.env_mix:
        return [env_config] * cfg.n_envs
    mix = []
    for i, entry in enumerate(cfg.env_mix):
        try:
            c = make_config(env_config, **entry)
        except ConfigError as e:
            raise ConfigError(f"env_mix[{i}]: {e}") from None
        changed = [k for k in POLICY_SETTINGS if getattr(c, k) != getattr(env_config, k)]
        if changed:
            raise ConfigError(f"bad agent config: env_mix[{i}] changes {', '.join(changed)}; one policy needs the same "
                              "value in every env (set it in env_kwargs instead)")
        mix.append(c)
    return [mix[i % len(mix)] for i in range(cfg.n_envs)]


def layer_log_std(model: PPO, layer_actions: int, value: float) -> None:
    """Set the initial log std of the last ``layer_actions`` action entries (the per-layer terms) of a new
    policy to ``value``. SB3 starts every entry at one ``log_std_init``; a smaller noise on the layer terms
    starts the policy close to scaling no layer (all terms 0) while it learns the index weights."""
    with torch.no_grad():
        model.policy.log_std[-layer_actions:] = value


class _EnvFactory:
    """Builds one monitored env in a worker process (picklable, for SubprocVecEnv)."""

    def __init__(self, env_config: PanningEnvConfig, threads: int, worker: bool) -> None:
        self.env_config = env_config
        self.threads = threads
        self.worker = worker

    def __call__(self) -> Monitor:
        setup_env_process(self.threads, self.worker)
        return Monitor(PanningEnv(self.env_config))


def _make_vec_env(cfg: AgentConfig, env_config: PanningEnvConfig) -> VecEnv:
    configs = mix_configs(cfg, env_config)
    if cfg.vec_env == "ray":  # Ray must be running: AgentTraining.create_or_load enters a RayCluster first
        return RayVecEnv([_EnvFactory(c, cfg.threads, False) for c in configs],
                         num_cpus=cfg.cpus_per_env, num_gpus=cfg.gpus_per_env)
    if cfg.vec_env == "batched":
        # N episodes stepped as one computation (in this process, or split over worker processes);
        # VecMonitor records the episode returns
        if cfg.batched_workers > 1:
            return VecMonitor(SubprocBatchedVecEnv(env_config, cfg.n_envs, cfg.batched_workers, cfg.threads))
        return VecMonitor(BatchedPanningVecEnv(env_config, cfg.n_envs))
    if cfg.vec_env == "subproc" and cfg.n_envs > 1:
        return SubprocVecEnv([_EnvFactory(c, cfg.threads, True) for c in configs])
    return DummyVecEnv([_EnvFactory(c, cfg.threads, False) for c in configs])


def _baseline_fn(env: PanningEnv, methods: list[str]) -> Callable[[float, int], dict[str, float]]:
    """Proxy accuracy of fixed methods (each as its paper runs it) on an eval episode; cached."""
    cache: dict[tuple[float, int], dict[str, float]] = {}
    cfg = env.config

    def baselines(target: float, init: int) -> dict[str, float]:
        key = (target, init)
        if key not in cache:
            model = build_model(cfg.model, env.bundle.num_classes, env.bundle.input_shape, seed=init,
                                init=cfg.init).to(env.device)
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


def _print(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class AgentTraining:
    """One agent training run, as named steps; see the module docstring.

    Nothing is written and no process is started before :meth:`prepare` has checked the config,
    the env settings and the run directory.
    """

    def __init__(self, cfg: AgentConfig, env_config: PanningEnvConfig, out: Path, *, resume: bool,
                 overwrite: bool = False, log: Callable[[str], None] = _print,
                 progress_bar: bool | None = None) -> None:
        self.cfg, self.env_config, self.out = cfg, env_config, out
        self.resume, self.overwrite, self.log = resume, overwrite, log
        self.progress_bar = sys.stderr.isatty() if progress_bar is None else progress_bar
        self.model: PPO | None = None
        self.venv: VecEnv | None = None
        self.eval_core: PanningEnv | None = None
        self.ray: RayCluster | None = None
        self.resumed_from: int | None = None  # timesteps of the checkpoint a resumed run started from
        self.init_digest: str | None = None  # sha256 of the init_agent file a new run started from
        # that file's tensors (policy, optimiser state), read once by the check in prepare()
        self._init_params: dict[str, Any] | None = None
        self.wall = 0.0
        self.interrupted = False

    # ------------------------------------------------------------------------------- step 1

    @classmethod
    def from_config(cls, config: AgentConfig | str | Path | None, out: str | Path, *, overwrite: bool = False,
                    **kwargs: Any) -> AgentTraining:
        """A new run of ``config`` (an :class:`AgentConfig` or its YAML file) into ``out``."""
        cfg = load_agent_config(config) if isinstance(config, (str, Path)) else (config or AgentConfig())
        env_config = resolve_env_config(cfg)
        # inline the env settings: the run directory is self-contained (and a relative init_agent given in
        # code is made absolute, or --resume would look for it beside agent.yaml)
        init = cfg.init_agent
        if init is not None and not os.path.isabs(init) and Path(init).exists():
            init = str(Path(init).resolve())
        cfg = dataclasses.replace(cfg, env=None, env_kwargs=dataclasses.asdict(env_config), init_agent=init)
        return cls(cfg, env_config, Path(out), resume=False, overwrite=overwrite, **kwargs)

    @classmethod
    def from_run(cls, out: str | Path, **kwargs: Any) -> AgentTraining:
        """Continue the run in ``out`` with the config saved there."""
        out = Path(out)
        if not (out / CONFIG_FILE).is_file():
            raise RunExists(f"{out} holds no agent run to resume ({CONFIG_FILE} missing); start one with --out")
        cfg = load_agent_config(out / CONFIG_FILE)
        if cfg.env is None and "observation" not in cfg.env_kwargs:
            # a run written before the per-layer observation (0.3) trained on the summary layout
            cfg = dataclasses.replace(cfg, env_kwargs={**cfg.env_kwargs, "observation": "summary"})
        return cls(cfg, resolve_env_config(cfg), out, resume=True, **kwargs)

    def prepare(self) -> None:
        """Check the run directory, the schedules, the evaluation settings and the env (it loads its
        data and builds its model here, so a bad setting fails before anything is written); then
        write ``agent.yaml``."""
        out, cfg = self.out, self.cfg
        if out.exists() and not out.is_dir():
            raise RunExists(f"{out} exists and is not a directory")
        if not self.resume and out.exists() and any(out.iterdir()):
            if not self.overwrite:
                raise RunExists(f"{out} already holds files; use --resume {out} to continue that run, or --overwrite")
            if not (out / CONFIG_FILE).is_file():
                # --overwrite replaces an agent run, never an arbitrary folder
                raise RunExists(f"{out} holds files but no agent run ({CONFIG_FILE} missing); choose another --out")
        parse_schedule(cfg.learning_rate, "learning_rate")
        parse_schedule(cfg.clip_range, "clip_range")
        policy_kwargs(cfg.policy_kwargs)
        extractor_kwargs(dataclasses.asdict(self.env_config), cfg.policy_kwargs)
        if "layer_log_std_init" in cfg.policy_kwargs and not self.env_config.layer_actions:
            raise ConfigError("bad agent config: policy_kwargs.layer_log_std_init sets the noise of the per-layer "
                              "action terms, but the env has none (set layer_actions >= 2 in env_kwargs, or drop it)")
        # each mixed env loads its data and builds its model now, not in a worker (the first len(env_mix)
        # configs are the entries, in order)
        for i, c in enumerate(mix_configs(cfg, self.env_config)[:len(cfg.env_mix)]):
            try:
                PanningEnv(c)
            except ConfigError as e:
                raise ConfigError(f"env_mix[{i}]: {e}") from None
        self._check_eval_settings()
        torch.set_num_threads(cfg.threads)
        self.eval_core = PanningEnv(self.env_config)
        self._check_init_agent()
        if not self.resume and self.overwrite and out.exists():
            self._remove_run()
        out.mkdir(parents=True, exist_ok=True)
        _config.dump(cfg, out / CONFIG_FILE)

    def _check_eval_settings(self) -> None:
        cfg, env = self.cfg, self.env_config
        for m in cfg.eval_methods:
            if m not in available_methods():
                raise ConfigError(f"bad agent config: unknown eval method {m!r}; "
                                  f"known: {', '.join(available_methods())}")
        if env.init_seeds > 0:
            pool = range(env.init_seed_base, env.init_seed_base + env.init_seeds)
            shared = sorted(set(cfg.eval_init_seeds) & set(pool))
            if cfg.eval_freq and shared:
                raise ConfigError(f"bad agent config: eval_init_seeds {shared} are also training initialisations "
                                  f"({pool.start}..{pool.stop - 1}); evaluate on held-out seeds")

    def _check_init_agent(self) -> None:
        """A warm start's agent must fit this run: the same indices, policy settings and network (compared
        by the shapes of every saved tensor, and the activation). Its bytes are read here, once: the weights
        loaded later and the sha256 recorded are those of one file, even if --overwrite or a live run
        replaces it meanwhile."""
        cfg = self.cfg
        if cfg.init_agent is None or (self.resume and self._saved_models()):
            return
        where = f"bad agent config: init_agent {cfg.init_agent}"
        try:
            meta = check_agent_file(cfg.init_agent, self.env_config.indices)
            path = agent_path(cfg.init_agent)
        except AgentError as e:
            raise ConfigError(f"{where}: {e}") from None
        theirs = policy_settings(meta)
        env = _plain(dataclasses.asdict(self.env_config))
        changed = [f"{k} {theirs[k]!r} (here {env[k]!r})" for k in POLICY_SETTINGS if _plain(theirs[k]) != env[k]]
        if changed:
            raise ConfigError(f"{where} was trained with {'; '.join(changed)}; a warm start needs the same policy "
                              "settings in env_kwargs")
        data = path.read_bytes()
        _, loaded, _ = load_from_zip_file(io.BytesIO(data), device="cpu", print_system_info=False)
        params: dict[str, Any] = loaded or {}  # SB3's hint says tensors; each entry is a state dict
        assert self.eval_core is not None
        mine = ActorCriticPolicy(self.eval_core.observation_space, self.eval_core.action_space, lambda _: 0.0,
                                 **self._policy_kwargs())
        want = {k: tuple(v.shape) for k, v in mine.state_dict().items()}
        have = {k: tuple(v.shape) for k, v in params.get("policy", {}).items()}
        if have != want:
            diff = sorted(set(want) ^ set(have)) or [k for k in want if want[k] != have[k]]
            raise ConfigError(f"{where} has a different network (first difference: {diff[0]}, {have.get(diff[0])} "
                              f"in the agent, {want.get(diff[0])} here); set policy_kwargs as it was trained")
        act = ((meta.get("agent_config") or {}).get("policy_kwargs") or {}).get("activation_fn", "tanh")
        here = cfg.policy_kwargs.get("activation_fn", "tanh")  # SB3's PPO default is tanh
        if act != here:
            raise ConfigError(f"{where} has activation_fn {act!r} (here {here!r}); set policy_kwargs as it was trained")
        self._init_params, self.init_digest = params, bytes_digest(data)

    def _policy_kwargs(self) -> dict[str, Any]:
        """SB3's policy_kwargs of this run (the network and its features extractor)."""
        return {**policy_kwargs(self.cfg.policy_kwargs),
                **extractor_kwargs(dataclasses.asdict(self.env_config), self.cfg.policy_kwargs)}

    def _saved_models(self) -> list[tuple[int, Path]]:
        """What a resumed run can continue from: its checkpoints and final agent, with their step counts."""
        found = checkpoints(self.out / "checkpoints")
        final = self.out / AGENT_FILE
        if final.is_file():
            found.append((int(read_metadata(final).get("trained_timesteps", 0)), final))
        return found

    def _remove_run(self, keep_config: bool = False) -> None:
        """Delete an agent run's own files (and nothing else) from the run directory."""
        for name in _RUN_FILES + (() if keep_config else (CONFIG_FILE,)):
            (self.out / name).unlink(missing_ok=True)
        for name in _RUN_DIRS:
            shutil.rmtree(self.out / name, ignore_errors=True)

    # ------------------------------------------------------------------------------- step 2

    def create_or_load(self) -> PPO:
        """A new PPO model on the training envs, or, when resuming, whichever saved model holds the
        most steps (the final agent or the newest checkpoint, Ctrl-C's included)."""
        cfg, out = self.cfg, self.out
        if cfg.vec_env == "ray":
            self.ray = RayCluster(cfg.n_envs, cfg.ray_address, cfg.cpus_per_env, cfg.gpus_per_env,
                                  names=("n_envs", "cpus_per_env", "gpus_per_env")).__enter__()
        self.venv = _make_vec_env(cfg, self.env_config)
        if self.resume:
            found = self._saved_models()
            if found:
                path = max(found, key=lambda f: f[0])[1]
                model = PPO.load(path, env=self.venv, device=cfg.device, tensorboard_log=str(out / "tb"),
                                 custom_objects=sb3_schedules(cfg))
                # fresh, step-dependent seeds for the rest of the run (SB3 does not save RNG states)
                model.set_random_seed(cfg.seed + model.num_timesteps)
                self.resumed_from = model.num_timesteps
                if (out / INIT_FILE).is_file():  # a warm start's origin, kept across sessions
                    self.init_digest = json.loads((out / INIT_FILE).read_text())["sha256"]
                self.log(f"resuming {out} from {path.name} at {model.num_timesteps} steps")
                self.model = model
                return model
            self.log(f"{out}: nothing was saved before the interruption; starting over")
            self._remove_run(keep_config=True)
        self.model = PPO(
            cfg.policy, self.venv, learning_rate=parse_schedule(cfg.learning_rate, "learning_rate"),
            n_steps=cfg.n_steps, batch_size=cfg.batch_size, n_epochs=cfg.n_epochs, gamma=cfg.gamma,
            gae_lambda=cfg.gae_lambda, clip_range=parse_schedule(cfg.clip_range, "clip_range"), ent_coef=cfg.ent_coef,
            vf_coef=cfg.vf_coef, max_grad_norm=cfg.max_grad_norm, normalize_advantage=cfg.normalize_advantage,
            target_kl=cfg.target_kl, tensorboard_log=str(out / "tb"),
            policy_kwargs=self._policy_kwargs(), seed=cfg.seed, device=cfg.device, verbose=0,
        )
        if self._init_params is not None:
            # every weight, the log std and the optimiser state of the saved agent replace the new ones
            self.model.set_parameters(self._init_params, exact_match=True, device=cfg.device)
            write_json(out / INIT_FILE, {"init_agent": cfg.init_agent, "sha256": self.init_digest})
            self.log(f"the policy starts from {cfg.init_agent} (sha256 {str(self.init_digest)[:12]})")
        elif "layer_log_std_init" in cfg.policy_kwargs:
            layer_log_std(self.model, self.env_config.layer_actions, float(cfg.policy_kwargs["layer_log_std_init"]))
        return self.model

    def metadata(self) -> dict[str, Any]:
        """panning's metadata for the agent files of this run, at the model's current step count."""
        assert self.model is not None
        extra = {} if self.init_digest is None else {"init_agent_sha256": self.init_digest}
        return agent_metadata(self.env_config, self.model.num_timesteps, agent_config=_config.to_dict(self.cfg),
                              **extra)

    # ------------------------------------------------------------------------------- step 3

    def callbacks(self) -> CallbackList:
        """Episode logging, checkpoints and (if ``eval_freq``) the comparison evaluation."""
        cfg, out = self.cfg, self.out
        assert self.eval_core is not None
        callbacks: list[BaseCallback] = [EpisodeLogger()]
        if cfg.checkpoint_freq:
            callbacks.append(CheckpointKeepLast(max(1, cfg.checkpoint_freq // cfg.n_envs), str(out / "checkpoints"),
                                                name_prefix=CKPT_PREFIX, keep=cfg.keep_checkpoints))
        if cfg.eval_freq:
            episodes = [(float(t), int(s)) for t in cfg.eval_targets for s in cfg.eval_init_seeds]
            fixed = FixedEpisodes(self.eval_core, episodes)
            # deliberately a DummyVecEnv in this process: its episode infos are read back
            eval_env = DummyVecEnv([lambda: Monitor(fixed)])
            best_state = out / "eval_best.json"
            evaluator = ComparisonEval(
                eval_env, fixed, _baseline_fn(self.eval_core, list(cfg.eval_methods)), out / "eval.json", self.log,
                cfg.n_timesteps, eval_freq=max(1, cfg.eval_freq // cfg.n_envs),
                callback_on_new_best=SaveBest(out / BEST_FILE, self.metadata, best_state), verbose=0, warn=False,
            )
            if best_state.is_file():  # resumed: a later evaluation must beat the best already saved
                evaluator.best_mean_reward = json.loads(best_state.read_text())["best_mean_reward"]
            callbacks.append(evaluator)
        return CallbackList(callbacks)

    # ------------------------------------------------------------------------------- step 4

    def learn(self, remaining: int) -> None:
        """PPO's ``learn`` for ``remaining`` env steps; Ctrl-C stops it and is remembered for :meth:`save`."""
        cfg, model = self.cfg, self.model
        assert model is not None
        self.log(f"training PPO for {remaining} env steps ({cfg.n_envs} {cfg.vec_env} envs, {cfg.n_steps} steps each "
                 f"per update); TensorBoard: tensorboard --logdir {self.out / 'tb'}")
        t0 = time.perf_counter()
        try:
            with warnings.catch_warnings():
                # the eval env is a DummyVecEnv on purpose (see callbacks()); SB3 warns about the mismatch
                warnings.filterwarnings("ignore", "Training and eval env are not of the same type")
                # a fresh run writes tb/PPO_1; a resumed one appends to it (continuous curves)
                model.learn(remaining, callback=self.callbacks(), reset_num_timesteps=self.resumed_from is None,
                            tb_log_name=TB_NAME, progress_bar=self.progress_bar)
        except KeyboardInterrupt:
            self.interrupted = True
        self.wall = time.perf_counter() - t0

    # ------------------------------------------------------------------------------- step 5

    def save(self) -> dict[str, Any]:
        """Write ``agent.zip`` (or, after Ctrl-C, a checkpoint) and ``train.json``; returns the record."""
        cfg, out, model = self.cfg, self.out, self.model
        assert model is not None
        start = self.resumed_from or 0
        prev = json.loads((out / "train.json").read_text()) if (out / "train.json").is_file() else {}
        record = {
            "timesteps": int(model.num_timesteps),
            "n_timesteps": cfg.n_timesteps,
            "episodes": int(prev.get("episodes", 0))
            + int(model.num_timesteps - start) // self.env_config.pruning_steps,
            "wall_seconds": float(prev.get("wall_seconds", 0.0)) + self.wall,
            "sessions": int(prev.get("sessions", 0)) + 1,
            "steps_per_second": (model.num_timesteps - start) / max(self.wall, 1e-9),
            "finished": not self.interrupted and model.num_timesteps >= cfg.n_timesteps,
        }
        if self.interrupted:
            path = out / "checkpoints" / f"{CKPT_PREFIX}_interrupted_{model.num_timesteps}_steps.zip"
            path.parent.mkdir(parents=True, exist_ok=True)
            model.save(path)
            write_json(out / "train.json", record)
            self.log(f"interrupted: saved {path}; continue with --resume {out}")
            return record
        save_agent(model, out / AGENT_FILE, self.metadata())
        write_json(out / "train.json", record)
        self.log(f"wrote {out / AGENT_FILE}" + (f" and {out / BEST_FILE}" if (out / BEST_FILE).is_file() else "")
                 + f" ({record['timesteps']} steps, {self.wall / 60:.1f} min)")
        return record

    def close(self) -> None:
        """Stop the worker processes."""
        if self.venv is not None:
            try:
                self.venv.close()
            except (EOFError, BrokenPipeError, ConnectionResetError):
                pass
        if self.ray is not None:
            self.ray.__exit__()
            self.ray = None


def train_agent(
    config: AgentConfig | str | Path | None = None,
    out: str | Path = "runs/agent",
    *,
    resume: bool = False,
    overwrite: bool = False,
    log: Callable[[str], None] = _print,
    progress_bar: bool | None = None,
) -> dict[str, Any]:
    """Train (or, with ``resume``, continue training) a PPO agent; returns the ``train.json`` record.

    ``config`` is an :class:`AgentConfig` or the path of its YAML (ignored when resuming: the run's
    own ``agent.yaml`` is used). ``progress_bar`` (default: when stderr is a terminal) shows SB3's
    progress bar with the time left. Ctrl-C saves a checkpoint and raises ``KeyboardInterrupt``.
    """
    if resume:
        run = AgentTraining.from_run(out, log=log, progress_bar=progress_bar)
    else:
        run = AgentTraining.from_config(config, out, overwrite=overwrite, log=log, progress_bar=progress_bar)
    run.prepare()
    try:
        model = run.create_or_load()
        remaining = run.cfg.n_timesteps - model.num_timesteps
        if remaining <= 0:
            log(f"{run.out}: already trained for {model.num_timesteps} of {run.cfg.n_timesteps} steps; nothing to do")
            if not (run.out / AGENT_FILE).is_file():
                save_agent(model, run.out / AGENT_FILE, run.metadata())
            train_json = run.out / "train.json"
            return json.loads(train_json.read_text()) if train_json.is_file() else {
                "timesteps": model.num_timesteps, "n_timesteps": run.cfg.n_timesteps}
        run.learn(remaining)
        record = run.save()
        if run.interrupted:
            raise KeyboardInterrupt
        return record
    finally:
        run.close()
