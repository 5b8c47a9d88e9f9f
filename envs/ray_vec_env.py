"""Environment workers on Ray: an SB3 ``VecEnv`` whose environments live in Ray actors.

:class:`RayVecEnv` is what ``SubprocVecEnv`` is, with Ray actors in place of forked processes: each
actor is created with declared resources (``num_cpus``, ``num_gpus``, fractions allowed), so the
environments of one agent can spread over every core and GPU of a Ray cluster. An actor runs its
env exactly as an ``SubprocVecEnv`` worker does (the same reset with seed and options, the same
auto-reset with ``terminal_observation``), so with the same seeds the episodes are the same.
``vec_env: ray`` in an agent YAML selects it (with ``cpus_per_env``, ``gpus_per_env`` and, for an
existing cluster, ``ray_address``); Ray must be running (``panning.distributed.RayCluster``).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import gymnasium as gym
import numpy as np
from stable_baselines3.common.vec_env.base_vec_env import VecEnv, VecEnvIndices, VecEnvObs, VecEnvStepReturn

__all__ = ["RayVecEnv"]


class _EnvWorker:
    """The body of a Ray actor: one environment, driven as an SubprocVecEnv worker drives it."""

    def __init__(self, env_fn: Callable[[], gym.Env]) -> None:
        self.env = env_fn()

    def spaces(self) -> tuple[gym.Space, gym.Space, dict[str, Any]]:
        return self.env.observation_space, self.env.action_space, dict(getattr(self.env, "metadata", {}))

    def reset(self, seed: int | None, options: dict[str, Any] | None) -> tuple[np.ndarray, dict[str, Any]]:
        return self.env.reset(seed=seed, **({"options": options} if options else {}))

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, dict[str, Any], dict[str, Any]]:
        obs, reward, terminated, truncated, info = self.env.step(action)
        done = terminated or truncated
        info["TimeLimit.truncated"] = truncated and not terminated
        reset_info: dict[str, Any] = {}
        if done:
            info["terminal_observation"] = obs
            obs, reset_info = self.env.reset()
        return obs, float(reward), bool(done), info, reset_info

    def get_attr(self, name: str) -> Any:
        return self.env.get_wrapper_attr(name)

    def set_attr(self, name: str, value: Any) -> None:
        setattr(self.env, name, value)

    def env_method(self, name: str, *args: Any, **kwargs: Any) -> Any:
        return self.env.get_wrapper_attr(name)(*args, **kwargs)

    def is_wrapped(self, wrapper_class: type[gym.Wrapper]) -> bool:
        from stable_baselines3.common.env_util import is_wrapped

        return is_wrapped(self.env, wrapper_class)

    def close(self) -> None:
        self.env.close()


class RayVecEnv(VecEnv):
    """``len(env_fns)`` environments, one per Ray actor with ``num_cpus``/``num_gpus`` declared; see
    the module docstring. The factories must be picklable (they travel to the actors)."""

    def __init__(self, env_fns: Sequence[Callable[[], gym.Env]], *, num_cpus: float = 1.0,
                 num_gpus: float = 0.0) -> None:
        import ray

        if not ray.is_initialized():
            raise RuntimeError("RayVecEnv needs a running Ray (ray.init or panning.distributed.RayCluster)")
        actor = ray.remote(_EnvWorker).options(num_cpus=num_cpus, num_gpus=num_gpus)
        self.workers: list[Any] = [actor.remote(fn) for fn in env_fns]
        obs_space, act_space, metadata = ray.get(self.workers[0].spaces.remote())
        super().__init__(len(env_fns), obs_space, act_space)
        self.metadata = metadata
        self._pending: list[Any] | None = None
        self.closed = False

    def _get(self, refs: list[Any]) -> list[Any]:
        import ray

        return list(ray.get(refs))

    def reset(self) -> VecEnvObs:
        out = self._get([w.reset.remote(self._seeds[i], self._options[i] or None) for i, w in enumerate(self.workers)])
        self._reset_seeds()
        self._reset_options()
        obs = []
        for i, (o, info) in enumerate(out):
            obs.append(o)
            self.reset_infos[i] = info
        return np.stack(obs)

    def step_async(self, actions: np.ndarray) -> None:
        self._pending = [w.step.remote(a) for w, a in zip(self.workers, actions, strict=True)]

    def step_wait(self) -> VecEnvStepReturn:
        assert self._pending is not None, "step_async first"
        results = self._get(self._pending)
        self._pending = None
        obs, rewards, dones, infos, resets = zip(*results, strict=True)
        for i, r in enumerate(resets):
            if dones[i]:
                self.reset_infos[i] = r
        return np.stack(obs), np.stack(rewards), np.stack(dones), list(infos)  # as SubprocVecEnv returns them

    def close(self) -> None:
        if self.closed:
            return
        import ray

        try:
            self._get([w.close.remote() for w in self.workers])
        finally:
            for w in self.workers:
                ray.kill(w)
            self.closed = True

    def get_images(self) -> Sequence[np.ndarray | None]:
        return [None for _ in self.workers]

    def get_attr(self, attr_name: str, indices: VecEnvIndices = None) -> list[Any]:
        return self._get([self.workers[i].get_attr.remote(attr_name) for i in self._get_indices(indices)])

    def set_attr(self, attr_name: str, value: Any, indices: VecEnvIndices = None) -> None:
        self._get([self.workers[i].set_attr.remote(attr_name, value) for i in self._get_indices(indices)])

    def env_method(self, method_name: str, *method_args: Any, indices: VecEnvIndices = None,
                   **method_kwargs: Any) -> list[Any]:
        return self._get([self.workers[i].env_method.remote(method_name, *method_args, **method_kwargs)
                          for i in self._get_indices(indices)])

    def env_is_wrapped(self, wrapper_class: type[gym.Wrapper], indices: VecEnvIndices = None) -> list[bool]:
        return self._get([self.workers[i].is_wrapped.remote(wrapper_class) for i in self._get_indices(indices)])
