"""A vectorised ``panning/Panning-v0``: N episodes of one architecture stepped as one computation.

:class:`BatchedPanningVecEnv` is a Stable-Baselines3 ``VecEnv`` holding N :class:`PanningEnv`
episodes. Each env keeps its own random stream, episode state and observation code, so with the
same seeds and actions it gives the same observations, masks and rewards as N separate
``Panning-v0``; what changes is how the expensive parts run:

- **scoring**: before every observation the indices of all N networks are computed together
  (:func:`panning.batched.prefill_scores`: stacked ``vmap`` routes where they match one-at-a-time
  scoring bit for bit, one network after the other where they would not);
- **pruning steps**: the N steps are taken together (:func:`panning.episode.step_many`): each network's
  selection on its own, then every network's effective masks and loss/gradient signals in one stacked pass;
- **rewards**: every episode that ends at a step is trained by the proxy in one stacked run
  (:meth:`panning.proxy.ProxyEvaluator.evaluate_many`), together with the single-index references
  of the relative reward that are not cached yet.

Every episode has T steps, so the N episodes end together (unless a collapse ends one early, when
that env restarts on its own, as in SB3's ``DummyVecEnv``). Finished episodes restart at once and
their last observation is in ``info["terminal_observation"]``. ``vec_env: batched`` in an agent
YAML selects it for ``panning train-agent``.
"""
from __future__ import annotations

import multiprocessing as mp
import signal
import time
from collections.abc import Sequence
from copy import deepcopy
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from stable_baselines3.common.vec_env.base_vec_env import VecEnv, VecEnvIndices, VecEnvObs, VecEnvStepReturn

from panning._functional import deferred_checks
from panning.batched import prefill_scores
from panning.data import DataBundle
from panning.envs.panning_env import RELATIVE_REWARDS, PanningEnv, PanningEnvConfig, PendingStep
from panning.episode import observe_many, step_many, step_observe_many
from panning.errors import UsageError
from panning.proxy import ProxyResult

__all__ = ["BatchedPanningVecEnv", "SubprocBatchedVecEnv", "setup_env_process"]


class BatchedPanningVecEnv(VecEnv):
    """N ``panning/Panning-v0`` episodes in lock-step; see the module docstring.

    ``config`` is what :class:`PanningEnv` takes (a config, a mapping or a YAML path); every env gets
    the same settings and shares one proxy evaluator and reference cache.
    """

    def __init__(self, config: PanningEnvConfig | dict[str, Any] | str | Path | None, n_envs: int, *,
                 bundle: DataBundle | None = None, **overrides: Any) -> None:
        if n_envs < 1:
            raise UsageError(f"n_envs must be >= 1, got {n_envs}")
        first = PanningEnv(config, bundle=bundle, **overrides)
        self.envs = [first] + [PanningEnv(first.config, bundle=bundle) for _ in range(n_envs - 1)]
        if bundle is not None:  # a caller's own data: one private evaluator and reference cache for all
            for env in self.envs[1:]:
                env.proxy, env._references = first.proxy, first._references
        (x0, y0), = first.batches
        for env in self.envs[1:]:  # one scoring batch object, so the stepping need not compare N copies each step
            (x, y), = env.batches
            if x.shape == x0.shape and y.shape == y0.shape and torch.equal(x, x0) and torch.equal(y, y0):
                env.batches = first.batches
        super().__init__(n_envs, first.observation_space, first.action_space)
        self.proxy = first.proxy
        self.indices = list(first.config.indices)
        self.actions: np.ndarray | None = None
        self.metadata = first.metadata
        self.timing: dict[str, float] = {}

    # -------------------------------------------------------------------------------- stepping

    def _prefill(self, envs: Sequence[PanningEnv]) -> None:
        t0 = time.perf_counter()
        prefill_scores([e.episode.pruner for e in envs if e.episode is not None and not e.episode.done], self.indices)
        self.timing["score"] = self.timing.get("score", 0.0) + time.perf_counter() - t0

    @deferred_checks()  # on a GPU the checks of all N episodes are read back once, at the end
    def reset(self) -> VecEnvObs:
        for i, env in enumerate(self.envs):
            options = self._options[i] or None
            env.begin(seed=self._seeds[i], options=options)
        self._reset_seeds()
        self._reset_options()
        self._prefill(self.envs)
        obs = []
        for i, (env, o) in enumerate(zip(self.envs, self._observe(self.envs), strict=True)):
            o, self.reset_infos[i] = env.first_observation(o)
            obs.append(o)
        return np.stack(obs)

    @staticmethod
    def _observe(envs: Sequence[PanningEnv], score_indices: Sequence[bool] | None = None) -> list[np.ndarray]:
        """The envs' observations, their device values read back in one transfer (:func:`observe_many`)."""
        return observe_many([env.episode for env in envs], score_indices)  # type: ignore[misc]

    def step_async(self, actions: np.ndarray) -> None:
        self.actions = np.asarray(actions)

    @deferred_checks()  # on a GPU the checks of all N episodes are read back once, at the end
    def step_wait(self) -> VecEnvStepReturn:
        assert self.actions is not None, "step_async first"
        self.timing = {}
        # every env is mid-episode here (finished ones restarted at once): their steps are taken together
        if any(env.episode is None or env._done for env in self.envs):
            raise RuntimeError("an env's episode is over (or never started): call reset() before step()")
        t0 = time.perf_counter()
        episodes = [env.episode for env in self.envs]
        # a step that ends no episode: stepped, scored and observed with one read of the device (one group)
        together = step_observe_many(episodes, list(self.actions), lambda _: self._prefill(self.envs))  # type: ignore[arg-type]
        steps = together[0] if together is not None else step_many(episodes, list(self.actions))  # type: ignore[arg-type]
        # (the scoring for the observations, inside step_observe_many, is kept apart: timing["score"])
        self.timing["step"] = time.perf_counter() - t0 - self.timing.get("score", 0.0)
        pending: list[PendingStep] = [env.advance(a, s) for env, a, s in zip(self.envs, self.actions, steps,
                                                                            strict=True)]
        results, references = self._rewards(pending)
        if together is not None:  # an episode ended by a collapse is observed again, without the index features
            observed = [env.episode.observe(score_indices=False) if p.terminated else o  # type: ignore[union-attr]
                        for env, p, o in zip(self.envs, pending, together[1], strict=True)]
        else:
            # observations after the step need the indices scored on the new masks (not for finished episodes)
            self._prefill([e for e, p in zip(self.envs, pending, strict=True) if not p.terminated])
            observed = self._observe(self.envs, [not p.terminated for p in pending])
        obs_list, rewards, dones, infos = [], np.zeros(self.num_envs, np.float32), np.zeros(self.num_envs, bool), []
        finished = []
        for i, (env, p) in enumerate(zip(self.envs, pending, strict=True)):
            o, r, terminated, truncated, info = env.conclude(p, results.get(i), references.get(i), observed[i])
            rewards[i], dones[i] = r, terminated or truncated
            info["TimeLimit.truncated"] = truncated and not terminated
            if dones[i]:
                info["terminal_observation"] = o
                finished.append(i)
            obs_list.append(o)
            infos.append(info)
        if finished:  # auto-reset, as SB3's VecEnvs do
            for i in finished:
                self.envs[i].begin()
            self._prefill([self.envs[i] for i in finished])
            for i, o in zip(finished, self._observe([self.envs[i] for i in finished]), strict=True):
                obs_list[i], self.reset_infos[i] = self.envs[i].first_observation(o)
        self.actions = None
        return np.stack(obs_list), rewards, dones, deepcopy(infos)

    def _rewards(self, pending: Sequence[PendingStep]
                 ) -> tuple[dict[int, ProxyResult], dict[int, tuple[float, str, float]]]:
        """Proxy results of the finishing episodes and the references they need, in one stacked run."""
        finishing = [i for i, p in enumerate(pending) if p.needs_proxy]
        if not finishing:
            return {}, {}
        t0 = time.perf_counter()
        inits: list[Any] = []
        masks: list[Any] = []
        for i in finishing:
            inits.append(self.envs[i].model)
            masks.append(pending[i].masks)
        # references not cached yet: one per (target, init), each index's masks on that initialisation
        ref_jobs: dict[tuple, tuple[int, int, int]] = {}  # key -> (env, first candidate, count)
        relative = self.envs[0].config.reward in RELATIVE_REWARDS
        if relative:
            for i in finishing:
                env = self.envs[i]
                key = env.reference_key(env.target_sparsity, env.init_seed)
                if key in ref_jobs or env.cached_reference(env.target_sparsity, env.init_seed) is not None:
                    continue
                model, ms = env.reference_masks(env.target_sparsity, env.init_seed)
                ref_jobs[key] = (i, len(inits), len(ms))
                inits += [model] * len(ms)
                masks += [m for _, m in ms]
        out = self.proxy.evaluate_many(inits, masks)
        seconds = time.perf_counter() - t0
        results = {i: out[k] for k, i in enumerate(finishing)}
        references: dict[int, tuple[float, str, float]] = {}
        if relative:
            for i, first, count in ref_jobs.values():
                env = self.envs[i]
                env.record_reference(env.target_sparsity, env.init_seed, out[first:first + count], seconds)
            for i in finishing:
                env = self.envs[i]
                ref = env.cached_reference(env.target_sparsity, env.init_seed)
                assert ref is not None  # recorded above or cached before
                references[i] = ref
                pending[i].info["reference_seconds"] = seconds if env.reference_key(
                    env.target_sparsity, env.init_seed) in ref_jobs else 0.0
        self.timing["proxy"] = seconds
        return results, references

    # ----------------------------------------------------------------------------- VecEnv API

    def close(self) -> None:
        for env in self.envs:
            env.close()

    def get_images(self) -> Sequence[np.ndarray | None]:
        return [None for _ in self.envs]

    def get_attr(self, attr_name: str, indices: VecEnvIndices = None) -> list[Any]:
        return [getattr(self.envs[i], attr_name) for i in self._get_indices(indices)]

    def set_attr(self, attr_name: str, value: Any, indices: VecEnvIndices = None) -> None:
        for i in self._get_indices(indices):
            setattr(self.envs[i], attr_name, value)

    def env_method(self, method_name: str, *method_args: Any, indices: VecEnvIndices = None,
                   **method_kwargs: Any) -> list[Any]:
        return [getattr(self.envs[i], method_name)(*method_args, **method_kwargs) for i in self._get_indices(indices)]

    def env_is_wrapped(self, wrapper_class: type[gym.Wrapper], indices: VecEnvIndices = None) -> list[bool]:
        return [isinstance(self.envs[i], wrapper_class) for i in self._get_indices(indices)]


# ------------------------------------------------------------------------ over several processes


def setup_env_process(threads: int, worker: bool) -> None:
    """What a process that steps envs sets first: ``threads`` torch threads and the CLI's allocator tuning;
    a ``worker`` process (a fresh one) also leaves Ctrl-C, which goes to the whole process group, to the
    main process, which handles it and saves."""
    import torch

    from panning.alloc import tune_malloc

    torch.set_num_threads(threads)
    tune_malloc()
    if worker:
        signal.signal(signal.SIGINT, signal.SIG_IGN)


@dataclass
class _BatchedFactory:
    """Builds one worker's :class:`BatchedPanningVecEnv` in its own process (picklable)."""

    config: PanningEnvConfig
    n_envs: int
    threads: int

    def __call__(self) -> BatchedPanningVecEnv:
        setup_env_process(self.threads, worker=True)
        return BatchedPanningVecEnv(self.config, self.n_envs)


def _batched_worker(remote: Connection, parent_remote: Connection, factory: _BatchedFactory) -> None:
    parent_remote.close()
    venv = factory()
    while True:
        cmd, data = remote.recv()
        if cmd == "step":
            remote.send(venv.step(data))
        elif cmd == "reset":
            venv._seeds, venv._options = data
            obs = venv.reset()
            remote.send((obs, venv.reset_infos))
        elif cmd == "spaces":
            remote.send((venv.observation_space, venv.action_space, venv.metadata))
        elif cmd == "get_attr":
            remote.send(venv.get_attr(*data))
        elif cmd == "set_attr":
            venv.set_attr(*data)
            remote.send([None] * len(data[2]))
        elif cmd == "env_method":
            name, args, kwargs, indices = data
            remote.send(venv.env_method(name, *args, indices=indices, **kwargs))
        elif cmd == "is_wrapped":
            remote.send(venv.env_is_wrapped(*data))
        elif cmd == "close":
            venv.close()
            remote.close()
            return


class SubprocBatchedVecEnv(VecEnv):
    """N ``panning/Panning-v0`` episodes split over ``workers`` processes, each stepping its share as one
    :class:`BatchedPanningVecEnv` with ``threads`` torch threads.

    On a CPU one process leaves cores idle while it runs the episodes' per-network bookkeeping
    (observation features, selection, connectivity), which does not batch; two processes of N/2 episodes
    each keep both cores of a 2-core machine busy and still train each half's rewards as one stacked
    computation (BENCHMARKS.md). Env ``i`` gets the seed and options one :class:`BatchedPanningVecEnv`
    would give it, so the episodes are the same; each process keeps its own reference and proxy caches.
    """

    def __init__(self, config: PanningEnvConfig | dict[str, Any] | str | Path | None, n_envs: int, workers: int,
                 threads: int = 1, **overrides: Any) -> None:
        from panning.envs.panning_env import make_config

        if not 1 <= workers <= n_envs:
            raise ValueError(f"workers must be between 1 and n_envs ({n_envs}), got {workers}")
        cfg = make_config(config, **overrides)
        sizes = [len(part) for part in np.array_split(np.arange(n_envs), workers)]
        starts = np.cumsum([0, *sizes[:-1]]).tolist()
        self._slices = [slice(lo, lo + s) for lo, s in zip(starts, sizes, strict=True)]
        methods = mp.get_all_start_methods()
        ctx: Any = mp.get_context("forkserver" if "forkserver" in methods else "spawn")
        self.remotes: list[Connection] = []
        self.processes = []
        for s in sizes:
            remote, work_remote = ctx.Pipe()
            proc = ctx.Process(target=_batched_worker, args=(work_remote, remote, _BatchedFactory(cfg, s, threads)),
                               daemon=True)  # if the main process crashes, the workers go too
            proc.start()
            work_remote.close()
            self.remotes.append(remote)
            self.processes.append(proc)
        self.closed = False
        self.remotes[0].send(("spaces", None))
        obs_space, action_space, self.metadata = self.remotes[0].recv()
        super().__init__(n_envs, obs_space, action_space)

    def reset(self) -> VecEnvObs:
        for remote, sl in zip(self.remotes, self._slices, strict=True):
            remote.send(("reset", (self._seeds[sl], self._options[sl])))
        obs = []
        for remote, sl in zip(self.remotes, self._slices, strict=True):
            o, infos = remote.recv()
            obs.append(o)
            self.reset_infos[sl] = infos
        self._reset_seeds()
        self._reset_options()
        return np.concatenate(obs)

    def step_async(self, actions: np.ndarray) -> None:
        actions = np.asarray(actions)
        for remote, sl in zip(self.remotes, self._slices, strict=True):
            remote.send(("step", actions[sl]))

    @deferred_checks()  # on a GPU the checks of all N episodes are read back once, at the end
    def step_wait(self) -> VecEnvStepReturn:
        obs, rewards, dones, infos = zip(*[remote.recv() for remote in self.remotes], strict=True)
        return (np.concatenate(obs), np.concatenate(rewards), np.concatenate(dones),
                [info for part in infos for info in part])

    def close(self) -> None:
        if self.closed:
            return
        for remote in self.remotes:
            remote.send(("close", None))
        for proc in self.processes:
            proc.join()
        self.closed = True

    def get_images(self) -> Sequence[np.ndarray | None]:
        return [None] * self.num_envs

    def _ask(self, cmd: str, make: Any, indices: VecEnvIndices) -> list[Any]:
        """Each worker's answer for its envs among ``indices`` (``make(local indices)`` is the request),
        back in the order asked."""
        local: dict[int, list[int]] = {}
        where = []
        for i in self._get_indices(indices):
            w = next(k for k, sl in enumerate(self._slices) if sl.start <= i < sl.stop)
            local.setdefault(w, []).append(i - self._slices[w].start)
            where.append((w, len(local[w]) - 1))
        for w, envs in local.items():
            self.remotes[w].send((cmd, make(envs)))
        answers = {w: self.remotes[w].recv() for w in local}
        return [answers[w][k] for w, k in where]

    def get_attr(self, attr_name: str, indices: VecEnvIndices = None) -> list[Any]:
        return self._ask("get_attr", lambda envs: (attr_name, envs), indices)

    def set_attr(self, attr_name: str, value: Any, indices: VecEnvIndices = None) -> None:
        self._ask("set_attr", lambda envs: (attr_name, value, envs), indices)

    def env_method(self, method_name: str, *method_args: Any, indices: VecEnvIndices = None,
                   **method_kwargs: Any) -> list[Any]:
        return self._ask("env_method", lambda envs: (method_name, method_args, method_kwargs, envs), indices)

    def env_is_wrapped(self, wrapper_class: type[gym.Wrapper], indices: VecEnvIndices = None) -> list[bool]:
        return self._ask("is_wrapped", lambda envs: (wrapper_class, envs), indices)
