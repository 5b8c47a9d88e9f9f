"""Agent hyperparameters: YAML in the style of rl-baselines3-zoo, mapped onto a typed dataclass.

A file in ``configs/agent/`` names the environment settings (``env``: a ``configs/env/*.yaml`` file,
relative to the agent file like every path in a YAML file, with ``env_kwargs`` laid over it) and
PPO's hyperparameters by their SB3 names. ``learning_rate`` and ``clip_range`` accept a number or a
zoo-style linear schedule ``"lin_3e-4"`` (decays linearly to 0 over training). Unknown keys are
errors that name the key and the file.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from panning import config as _config
from panning.errors import ConfigError

__all__ = ["AgentConfig", "load_agent_config", "parse_schedule", "policy_kwargs", "sb3_schedules"]


@dataclass
class AgentConfig:
    """Everything ``panning train-agent`` needs; the defaults are sized for ``mlp`` on ``digits``."""

    # env YAML; in a YAML file relative to that file (the one loader's rule), in code relative to the cwd
    env: str | None = field(default="configs/env/digits_mlp.yaml", metadata={"path": True})
    env_kwargs: dict = field(default_factory=dict)  # laid over the env YAML (PanningEnvConfig fields)
    # Training on many networks: env i of the n_envs trains on env_mix[i % len(env_mix)] laid over the env
    # settings above (say model, dataset, data_dir, proxy). Every entry must keep what the policy's spaces
    # and metadata depend on (indices, pruning_steps, observation, max_layers, ...); evaluation uses the
    # env settings without any entry. Empty: every env trains on the env settings.
    env_mix: list[dict] = field(default_factory=list)
    n_timesteps: int = 12_000  # total env steps (pruning steps, not episodes)
    n_envs: int = 2
    # "subproc" (one process per env), "dummy" (all in this process, one after the other), "batched"
    # (all in this process as one stacked computation: panning.envs.vec_env.BatchedPanningVecEnv) or
    # "ray" (one Ray actor per env)
    vec_env: str = "subproc"
    # vec_env: batched: processes the n_envs episodes are split over, each stepping its share as one
    # computation with `threads` torch threads (panning.envs.vec_env.SubprocBatchedVecEnv); 1: this process
    batched_workers: int = 1
    # vec_env: ray (panning.envs.ray_vec_env.RayVecEnv): resources each env's actor declares, and the
    # Ray cluster to use (None: a local instance started for the run, bound to 127.0.0.1)
    cpus_per_env: float = 1.0
    gpus_per_env: float = 0.0
    ray_address: str | None = None
    seed: int = 0
    # start the policy (and value) network from a saved agent instead of at random: an agent file or a
    # shipped agent ("shipped:default"). Its indices, observation layout, action mapping and network must be
    # this run's; its log std comes with it (policy_kwargs' log_std_init / layer_log_std_init then do nothing).
    # Ignored by --resume, whose checkpoint holds the weights.
    init_agent: str | None = field(default=None, metadata={"path": True})
    policy: str = "MlpPolicy"
    # PPO, by SB3's names. One env step costs a pruning step (and a proxy training at episode end),
    # so rollouts are short: n_steps * n_envs env steps per update, not SB3's 2048.
    n_steps: int = 50
    batch_size: int = 50
    n_epochs: int = 10
    learning_rate: float | str = 3e-4
    gamma: float = 0.99
    gae_lambda: float = 0.95
    clip_range: float | str = 0.2
    ent_coef: float = 0.0
    vf_coef: float = 0.5
    max_grad_norm: float = 0.5
    normalize_advantage: bool = True
    target_kl: float | None = None
    # net_arch, activation_fn ("tanh"/"relu"), log_std_init, ortho_init
    policy_kwargs: dict = field(default_factory=dict)
    device: str = "cpu"  # the policy network: an MLP this small runs best on the CPU; envs use env.device
    # evaluation, checkpoints
    eval_freq: int = 1_000  # env steps between deterministic evaluations (0: none)
    eval_targets: list[float] = field(default_factory=lambda: [0.98, 0.99])
    eval_init_seeds: list[int] = field(default_factory=lambda: [1000, 1001])  # held out from training's pool
    # fixed methods (each as its paper runs it) evaluated by the proxy beside the agent;
    # "best single" = best non-panning one
    eval_methods: list[str] = field(default_factory=lambda: ["synflow", "snip", "grasp_abs", "fts", "panning"])
    checkpoint_freq: int = 1_000  # env steps between checkpoints
    keep_checkpoints: int = 3  # older periodic checkpoints are deleted
    threads: int = 1  # torch threads per process

    @staticmethod
    def normalise_yaml(data: dict[str, Any]) -> dict[str, Any]:
        """rl-baselines3-zoo's number spellings (see :func:`normalise_zoo_numbers`), for the loader."""
        return normalise_zoo_numbers(data)

    def __post_init__(self) -> None:
        def bad(msg: str) -> None:
            raise ConfigError(f"bad agent config: {msg}")

        for name in ("n_timesteps", "n_envs", "n_steps", "batch_size", "n_epochs", "threads", "batched_workers"):
            if getattr(self, name) < 1:
                bad(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("eval_freq", "checkpoint_freq", "keep_checkpoints"):
            if getattr(self, name) < 0:
                bad(f"{name} must be >= 0, got {getattr(self, name)}")
        if not self.cpus_per_env > 0 or self.gpus_per_env < 0:
            bad(f"cpus_per_env must be > 0 and gpus_per_env >= 0, got {self.cpus_per_env}, {self.gpus_per_env}")
        if self.vec_env not in VEC_ENVS:
            bad(f"vec_env must be one of {', '.join(VEC_ENVS)}, got {self.vec_env!r}")
        for i, entry in enumerate(self.env_mix):
            if not isinstance(entry, dict) or not entry:
                bad(f"env_mix[{i}] must be a non-empty mapping of env settings, got {entry!r}")
        if len(self.env_mix) > self.n_envs:
            bad(f"env_mix has {len(self.env_mix)} entries but n_envs is {self.n_envs}: every entry needs an env")
        if self.batched_workers > 1 and self.vec_env != "batched":
            bad(f"batched_workers splits vec_env: batched over processes; vec_env is {self.vec_env!r}")
        if self.batched_workers > self.n_envs:
            bad(f"batched_workers ({self.batched_workers}) must not exceed n_envs ({self.n_envs})")
        if self.env_mix and self.vec_env == "batched":
            bad("vec_env: batched steps one architecture; train an env_mix with subproc, dummy or ray")
        if self.policy != "MlpPolicy":
            bad(f"policy must be 'MlpPolicy' (observations are flat vectors), got {self.policy!r}")
        if (self.n_steps * self.n_envs) % self.batch_size:
            # SB3 only warns and then drops a truncated mini-batch; say it up front instead
            bad(f"batch_size ({self.batch_size}) must divide n_steps * n_envs ({self.n_steps * self.n_envs})")
        parse_schedule(self.learning_rate, "learning_rate")
        parse_schedule(self.clip_range, "clip_range")
        if not 0 < self.gamma <= 1 or not 0 < self.gae_lambda <= 1:
            bad("gamma and gae_lambda must lie in (0, 1]")
        for s in self.eval_targets:
            if not 0 <= s < 1:
                bad(f"eval_targets must lie in [0, 1), got {s}")
        if self.eval_freq and (not self.eval_targets or not self.eval_init_seeds):
            bad("evaluation needs at least one eval_targets value and one eval_init_seeds value (or eval_freq: 0)")
        policy_kwargs(self.policy_kwargs)


def parse_schedule(value: float | str, name: str = "value") -> float | Callable[[float], float]:
    """A constant, or ``"lin_X"``: X * progress_remaining (SB3 passes 1 -> 0 over training)."""
    if isinstance(value, str) and not value.startswith("lin_"):
        try:
            value = float(value)  # PyYAML reads "3e-4" (no dot) as a string
        except ValueError:
            raise ConfigError(f"bad agent config: {name} must be a number or 'lin_<number>', got {value!r}") from None
    if isinstance(value, str):
        try:
            start = float(value[4:])
        except ValueError:
            raise ConfigError(f"bad agent config: {name}: cannot read a number in {value!r}") from None
        if not (start > 0 and math.isfinite(start)):
            raise ConfigError(f"bad agent config: {name} must be positive, got {value!r}")
        return _Linear(start)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or not math.isfinite(value):
        raise ConfigError(f"bad agent config: {name} must be a positive number, got {value!r}")
    return float(value)


def sb3_schedules(cfg: AgentConfig | None = None) -> dict[str, Any]:
    """``custom_objects`` for SB3's ``PPO.load``: the schedules, built from ``cfg`` instead of unpickled.

    An agent file pickles its schedules by reference to the class that made them; files written
    before 0.2 name ``agents.config._Linear``, a module that is now ``panning.agents.config``. SB3
    rebuilds ``lr_schedule`` from ``learning_rate`` on load, so giving these three keys loads any
    agent file whatever its schedules were pickled from: with ``cfg`` exactly (to resume training),
    without it with constants (enough to predict).
    """
    if cfg is None:
        return {"learning_rate": 0.0, "clip_range": 0.0, "lr_schedule": None}
    return {"learning_rate": parse_schedule(cfg.learning_rate, "learning_rate"),
            "clip_range": parse_schedule(cfg.clip_range, "clip_range"), "lr_schedule": None}


class _Linear:
    """Picklable linear schedule (SB3 saves schedules inside the agent's zip)."""

    def __init__(self, start: float) -> None:
        self.start = start

    def __call__(self, progress_remaining: float) -> float:
        return self.start * progress_remaining

    def __repr__(self) -> str:
        return f"lin_{self.start:g}"


_ACTIVATIONS = ("tanh", "relu", "elu", "leaky_relu")
VEC_ENVS = ("subproc", "dummy", "batched", "ray")
_POLICY_KEYS = ("net_arch", "activation_fn", "log_std_init", "ortho_init", "squash_output")
# read by panning.agents.features.extractor_kwargs, which needs the env settings too
_EXTRACTOR_KEYS = ("features_extractor", "extractor_hidden")
# applied to the new policy by panning.agents.train (layer_log_std): SB3 has one log_std_init for every action entry
_PANNING_POLICY_KEYS = ("layer_log_std_init",)


def policy_kwargs(raw: dict[str, Any]) -> dict[str, Any]:
    """SB3 ``policy_kwargs`` from plain YAML (activation given by name rather than by Python object)."""
    import torch.nn as nn

    unknown = set(raw) - set(_POLICY_KEYS) - set(_EXTRACTOR_KEYS) - set(_PANNING_POLICY_KEYS)
    if unknown:
        raise ConfigError(f"bad agent config: unknown policy_kwargs {sorted(unknown)}; "
                          f"known: {', '.join(_POLICY_KEYS + _EXTRACTOR_KEYS + _PANNING_POLICY_KEYS)}")
    if "layer_log_std_init" in raw:
        v = raw["layer_log_std_init"]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ConfigError(f"bad agent config: policy_kwargs.layer_log_std_init must be a finite number "
                              f"(the initial log std of the per-layer action terms), got {v!r}")
    out = {k: v for k, v in raw.items() if k not in _EXTRACTOR_KEYS + _PANNING_POLICY_KEYS}
    if "activation_fn" in out:
        name = out["activation_fn"]
        if name not in _ACTIVATIONS:
            raise ConfigError(f"bad agent config: activation_fn must be one of {', '.join(_ACTIVATIONS)}, got {name!r}")
        out["activation_fn"] = {"tanh": nn.Tanh, "relu": nn.ReLU, "elu": nn.ELU, "leaky_relu": nn.LeakyReLU}[name]
    return out


def resolve_env_path(cfg: AgentConfig) -> Path | None:
    """The env YAML of ``cfg`` (None when the env settings are inlined in ``env_kwargs``)."""
    if cfg.env is None:
        return None
    p = Path(cfg.env)
    if not p.is_file():
        raise ConfigError(f"env config {p} not found")
    return p


_INT_FIELDS = ("n_timesteps", "n_envs", "seed", "n_steps", "batch_size", "n_epochs", "eval_freq", "checkpoint_freq",
               "keep_checkpoints", "threads", "batched_workers")
_FLOAT_FIELDS = ("gamma", "gae_lambda", "ent_coef", "vf_coef", "max_grad_norm", "target_kl")


def normalise_zoo_numbers(data: dict[str, Any]) -> dict[str, Any]:
    """rl-baselines3-zoo's spellings: whole numbers written as floats (``n_timesteps: !!float 1e4``)
    and numbers in exponent notation without a dot (``3e-4``, which YAML reads as a string)."""
    data = dict(data)
    for key in _INT_FIELDS:
        v = data.get(key)
        if isinstance(v, str):
            try:
                v = float(v)
            except ValueError:
                continue  # left for the typed check to report
        if isinstance(v, float) and v.is_integer():
            data[key] = int(v)
    for key in _FLOAT_FIELDS:
        if isinstance(data.get(key), str):
            try:
                data[key] = float(data[key])
            except ValueError:
                pass
    return data


def load_agent_config(path: str | Path) -> AgentConfig:
    """Read ``configs/agent/*.yaml`` into :class:`AgentConfig` (unknown keys name the key and the file)."""
    return _config.load(path, AgentConfig)
