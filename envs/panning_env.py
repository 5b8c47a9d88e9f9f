"""``panning/Panning-v0``: one pruning run of the core :class:`panning.pruner.Pruner` as an episode.

At each of ``T = pruning_steps`` steps the agent sees the state of the network under all the
configured saliency indices, chooses how to weight the indices and how far to prune, and the env
calls :meth:`Pruner.step` once (the same code path fixed methods and ``panning prune --policy``
use). After step T the network is at exactly the target sparsity; the reward is the proxy accuracy
of the masked network (:class:`panning.proxy.ProxyEvaluator`: short training on the train split,
accuracy on the **validation** split; the env strips the test split from its data on construction).

Episode
-------
``reset(seed=..., options=None)`` draws an initialisation seed (from a pool of ``init_seeds``
seeds ``init_seed_base + i``, so reference rewards can be cached; ``init_seeds: 0`` draws a fresh
seed every episode), builds a freshly initialised network with it, draws the target sparsity
(``target_sparsity`` if set, else from ``target_range``: uniform in log-density, on a grid of
``target_grid`` log-spaced points when > 0, continuous when 0) and starts dense.
``options={"target_sparsity": s, "init_seed": i}`` fixes either for one episode.

Action and observation
----------------------
A float32 ``Box(-1, 1, (K + 1 + S,))`` action (K index weights, one step size, and with ``layer_actions: S``
(default 0) S per-layer control points over depth) and a fixed-size float32
observation, both defined and documented in :mod:`panning.episode`
(:class:`panning.episode.PruningEpisode`), which ``panning prune --policy`` drives too:
``observation: layers`` (the default, version 2) is ``Box(-5, 5, (13 + 6K + max_layers * (9 + 5K),))``
with a padded per-layer axis; ``observation: summary`` (version 1) the ``13 + 6K`` global features only.

Reward
------
Non-final steps: ``shaping * (phi_t - phi_{t-1})`` with ``phi = -(|loss_ratio| + |grad_norm_ratio|)``
(potential-based shaping, Ng et al. 1999: it telescopes to ``shaping * phi_T`` and cannot change
which policy is best; default ``shaping: 0``). Final step (t = T):
``reward_scale * (acc - ref)`` where ``acc`` is the proxy validation accuracy of the final masks
and ``ref`` is 0 for ``reward: absolute`` and, for ``reward: relative``, the best proxy accuracy of
the single indices pruned on the same initialisation with the default schedule (one-hot action,
``b = 0``), cached per ``(target, init seed)`` in the process. ``reward: relative_loss`` ranks by the
proxy's validation *loss* instead (on MNIST it ranked near-equal masks more steadily than accuracy):
``reward_scale * clip(ln ref_loss - ln loss, -1, 1)``, ``ref_loss`` the lowest proxy loss of the same
single indices, so the reward is positive when the agent's mask ends with the lower loss; a log ratio
because loss levels differ by an order of magnitude between 98 and 99.8% and between data sets, and a
ratio does not. It is bounded to [-1, 1] (``LOSS_GAIN_LIMIT``), as the accuracy rewards are, so a
collapse's ``-collapse_penalty`` is never better than a finished mask, and a diverged run (an infinite or
NaN loss counts as ``LOSS_CAP``) scores -1. Collapse (a layer with no effective
weight, which includes no path from input to output) ends the episode at once with reward
``-collapse_penalty`` when ``terminate_on_collapse`` is set; otherwise the episode goes on and
``collapse_penalty`` is subtracted from the final reward if the network is still collapsed.

info
----
Every step: ``step``, ``target_sparsity``, ``sparsity``, ``effective_sparsity``, ``index_weights``
(dict), ``step_share``, ``keep``, ``removed``, ``layer_density`` (dict), ``collapsed_layers``,
``init_seed``, ``timing`` (seconds: ``score``, ``select``, ``connectivity``, ``signal``, ``features``). Final step
also: ``proxy_accuracy``, ``proxy_loss``, ``proxy_seconds``, ``proxy_cached``, and for relative
rewards ``reference_accuracy`` (``reward: relative``) or ``reference_loss`` (``reward: relative_loss``),
``reference_index``, ``reference_seconds``.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces
from torch import nn
from torch.utils.data import Dataset

from panning import config as _config
from panning import indices as _indices
from panning._functional import deferred_checks
from panning.config import ConfigError
from panning.data import DataBundle, balanced_batch, load_dataset
from panning.episode import (
    DEFAULT_MAX_LAYERS,
    GLOBAL_FEATURES,
    INDEX_FEATURES,
    OBS_LIMIT,
    OBSERVATIONS,
    EpisodeStep,
    PruningEpisode,
    action_size,
    check_layer_actions,
    feature_names,
    observation_size,
    step_observe_many,
)
from panning.masks import Masks
from panning.models import build_model
from panning.proxy import SPARSE_MODELS, ProxyEvaluator, ProxyResult, ProxySettings
from panning.pruner import NORMALISATIONS, Pruner
from panning.schedules import keep_schedule
from panning.train import resolve_device

__all__ = ["PanningEnv", "PanningEnvConfig", "make_config", "GLOBAL_FEATURES", "INDEX_FEATURES", "clear_caches",
           "REWARDS", "RELATIVE_REWARDS", "LOSS_FLOOR", "LOSS_CAP", "LOSS_GAIN_LIMIT", "clamped_loss", "loss_gain"]

REWARDS = ("absolute", "relative", "relative_loss")
#: the rewards measured against the single indices' references (trained once per target and init, cached)
RELATIVE_REWARDS = ("relative", "relative_loss")
#: the clamp on proxy losses in ``reward: relative_loss``: a non-finite loss (a diverged run) counts as the cap
LOSS_FLOOR, LOSS_CAP = 1e-8, 1e3
#: the bound on ``reward: relative_loss``'s log ratio: [-1, 1] as the accuracy rewards, so that a collapse
#: (-collapse_penalty, 1 by default) never scores above a finished mask, however bad its loss
LOSS_GAIN_LIMIT = 1.0


def clamped_loss(loss: float) -> float:
    """``loss`` clamped into [LOSS_FLOOR, LOSS_CAP]; NaN and infinities count as LOSS_CAP."""
    return min(max(loss, LOSS_FLOOR), LOSS_CAP) if math.isfinite(loss) else LOSS_CAP


def loss_gain(reference_loss: float, loss: float) -> float:
    """``ln(reference_loss) - ln(loss)`` of the clamped losses, bounded to [-LOSS_GAIN_LIMIT, LOSS_GAIN_LIMIT]:
    > 0 when ``loss`` is the lower one."""
    g = math.log(clamped_loss(reference_loss)) - math.log(clamped_loss(loss))
    return min(max(g, -LOSS_GAIN_LIMIT), LOSS_GAIN_LIMIT)


@dataclass
class PanningEnvConfig:
    """Settings of ``panning/Panning-v0`` (YAML: ``configs/env/*.yaml``; ``gymnasium.make`` kwargs override)."""

    # network and data
    model: str = "mlp"
    dataset: str = "digits"
    data_dir: str | None = field(default=None, metadata={"path": True})
    val_size: int | float | None = None  # None: the data set's default validation split
    split_seed: int = 0
    init: str = "kaiming_normal"
    device: str = "auto"  # scoring, signals and proxy training; "auto" = CUDA when present
    # pruning
    indices: list[str] = field(default_factory=lambda: ["synflow", "snip", "grasp_abs"])
    normalisation: str = "mean"
    mode: str = "global"
    exclude: list[str] = field(default_factory=list)
    pruning_steps: int = 10  # T
    target_sparsity: float | None = None  # fixed target; None: draw from target_range
    target_range: list[float] = field(default_factory=lambda: [0.8, 0.99])
    target_grid: int = 8  # >0: targets on this many log-density grid points (reference cache hits)
    init_seeds: int = 8  # size of the pool of initialisation seeds; 0 = a fresh seed every episode
    init_seed_base: int = 0  # pool = init_seed_base + 0..init_seeds-1 (use another base for held-out inits)
    scoring_per_class: int = 10  # fixed class-balanced scoring batch from the training split
    batch_seed: int = 0
    # observation layout (panning.episode): "layers" (per-layer rows, padded to max_layers) or "summary"
    observation: str = "layers"
    max_layers: int = DEFAULT_MAX_LAYERS
    # per-layer action terms (panning.episode): 0 = none, S >= 2 = control points over relative depth
    layer_actions: int = 0
    # the reward's short training run (panning.proxy.ProxyEvaluator); YAML: a nested mapping ``proxy:``
    proxy: ProxySettings = field(default_factory=ProxySettings)
    # reward
    reward: str = "relative"  # "absolute" | "relative" (minus the best single index) | "relative_loss" (by loss)
    reward_scale: float = 1.0
    shaping: float = 0.0
    collapse_penalty: float = 1.0
    terminate_on_collapse: bool = True

    def __post_init__(self) -> None:
        def bad(msg: str) -> None:
            raise ConfigError(f"bad Panning env config: {msg}")

        def is_int(v: Any) -> bool:
            return isinstance(v, (int, np.integer)) and not isinstance(v, bool)

        self.indices = list(self.indices)
        if len(self.indices) == 0:
            bad("the index list is empty; give at least one saliency index")
        known = _indices.available_indices()
        for name in self.indices:
            if name not in known:
                bad(f"unknown index {name!r}; known indices: {', '.join(known)}")
        if len(set(self.indices)) != len(self.indices):
            bad(f"indices must be distinct, got {self.indices}")
        if not is_int(self.pruning_steps) or self.pruning_steps < 1:
            bad(f"pruning_steps (T) must be an integer >= 1, got {self.pruning_steps!r}")
        if self.target_sparsity is not None:
            if not (isinstance(self.target_sparsity, (int, float)) and 0.0 <= self.target_sparsity < 1.0):
                bad(f"target_sparsity must be in [0, 1), got {self.target_sparsity!r}")
            self.target_sparsity = float(self.target_sparsity)
        rng = list(self.target_range)
        if len(rng) != 2 or not all(isinstance(v, (int, float)) and 0.0 <= v < 1.0 for v in rng) or rng[0] > rng[1]:
            bad(f"target_range must be [low, high] with 0 <= low <= high < 1, got {self.target_range!r}")
        self.target_range = [float(v) for v in rng]
        for name in ("target_grid", "init_seeds", "scoring_per_class"):
            v = getattr(self, name)
            minimum = 1 if name == "scoring_per_class" else 0
            if not is_int(v) or v < minimum:
                bad(f"{name} must be an integer >= {minimum}, got {v!r}")
        if self.observation not in OBSERVATIONS:
            bad(f"unknown observation {self.observation!r}; known: {', '.join(OBSERVATIONS)}")
        if not is_int(self.max_layers) or self.max_layers < 1:
            bad(f"max_layers must be an integer >= 1, got {self.max_layers!r}")
        try:
            check_layer_actions(self.layer_actions)
        except ValueError as e:
            bad(str(e))
        if self.layer_actions and self.mode != "global":
            bad(f"layer_actions biases how much each layer gives up in the global ranking; with mode {self.mode!r} "
                "each layer's share is fixed, so the terms would do nothing: use mode: global or layer_actions: 0")
        if self.normalisation not in NORMALISATIONS:
            bad(f"unknown normalisation {self.normalisation!r}; known: {', '.join(NORMALISATIONS)}")
        if self.mode not in ("global", "layerwise"):
            bad(f"unknown selection mode {self.mode!r}; use 'global' or 'layerwise'")
        if self.reward not in REWARDS:
            bad(f"reward must be one of {', '.join(REWARDS)}, got {self.reward!r}")
        for name in ("reward_scale", "shaping", "collapse_penalty"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                bad(f"{name} must be a finite number >= 0, got {v!r}")
        if isinstance(self.proxy, Mapping):
            try:
                self.proxy = ProxySettings(**self.proxy)
            except TypeError as e:
                bad(f"proxy: {e}")
        if not isinstance(self.proxy, ProxySettings):
            bad(f"proxy must be the proxy's settings (steps, batch_size, lr, ...), got {self.proxy!r}")
        if self.proxy.sparse and self.model not in SPARSE_MODELS:
            bad(f"proxy sparse: true trains the {' and '.join(SPARSE_MODELS)} models only, not {self.model!r}; "
                "set sparse: false")

    @classmethod
    def normalise_yaml(cls, data: Mapping[str, Any]) -> dict[str, Any]:
        """Accept the flat ``proxy_steps``-style keys of configs and agents written before the proxy
        settings were nested (``proxy_steps: 200`` -> ``proxy: {steps: 200}``)."""
        out = dict(data)
        legacy = {k: out.pop(k) for k in list(out) if k.startswith("proxy_")}
        if legacy:
            nested = dict(out.get("proxy") or {})
            for k, v in legacy.items():
                nested.setdefault(k[len("proxy_"):], v)
            out["proxy"] = nested
        return out


def make_config(config: PanningEnvConfig | Mapping[str, Any] | str | Path | None = None, *,
                where: str | None = None, **overrides: Any) -> PanningEnvConfig:
    """Resolve a config: a dataclass, a mapping or a YAML path (or defaults), then keyword overrides.

    A YAML file goes through :func:`panning.config.load` (its relative paths are relative to the
    file). Overrides replace top-level settings; a ``proxy`` mapping is merged into the proxy's
    settings, so ``proxy={"steps": 50}`` changes only the budget. ``where`` names the settings in error
    messages (default: the YAML path, or "Panning env settings").
    """
    if isinstance(config, (str, Path)):
        base = _config.load(config, PanningEnvConfig)
        data, label = dataclasses.asdict(base), str(config)
    elif isinstance(config, PanningEnvConfig):
        data, label = dataclasses.asdict(config), "Panning env settings"
    else:
        data, label = PanningEnvConfig.normalise_yaml(dict(config or {})), "Panning env settings"
    for key, value in PanningEnvConfig.normalise_yaml(overrides).items():
        if key == "proxy" and isinstance(value, Mapping) and isinstance(data.get("proxy"), Mapping):
            data["proxy"] = {**data["proxy"], **value}
        elif key == "proxy" and isinstance(value, ProxySettings):
            data["proxy"] = dataclasses.asdict(value)
        else:
            data[key] = value
    return _config.from_dict(PanningEnvConfig, data, label if where is None else where)


# ------------------------------------------------------------------------------------------------
# per-process caches: loading MNIST on every reset (or retraining a reference mask) would be slow


class _TestSplitRemoved(Dataset):
    """Stands in for the test split inside the env: any use raises, so no reward can read it."""

    def __len__(self) -> int:
        raise RuntimeError("the Panning environment never reads the test split (rewards use the validation split)")

    def __getitem__(self, i: int) -> Any:
        raise RuntimeError("the Panning environment never reads the test split (rewards use the validation split)")


@functools.lru_cache(maxsize=4)
def _bundle(dataset: str, data_dir: str | None, val_size: int | float | None, split_seed: int) -> DataBundle:
    b = load_dataset(dataset, data_dir, download=False, val_size=val_size, seed=split_seed)
    return dataclasses.replace(b, test=_TestSplitRemoved())


_PROXIES: dict[tuple, ProxyEvaluator] = {}
_REFERENCES: dict[tuple, tuple[float, str, float]] = {}


def clear_caches() -> None:
    """Forget cached data sets, proxy evaluators (and their results) and reference rewards."""
    _bundle.cache_clear()
    _PROXIES.clear()
    _REFERENCES.clear()


class PanningEnv(gym.Env):
    """One pruning run as an episode; see the module docstring for action, observation and reward."""

    metadata = {"render_modes": []}

    def __init__(
        self,
        config: PanningEnvConfig | Mapping[str, Any] | str | Path | None = None,
        *,
        bundle: DataBundle | None = None,
        render_mode: str | None = None,
        **overrides: Any,
    ) -> None:
        super().__init__()
        self.render_mode = render_mode  # nothing to render; accepted because SB3's make_vec_env passes one
        cfg = make_config(config, **overrides)
        self.config = cfg
        self.device = resolve_device(cfg.device)
        custom = bundle is not None
        if bundle is None:
            bundle = _bundle(cfg.dataset, cfg.data_dir, cfg.val_size, cfg.split_seed)
        else:
            bundle = dataclasses.replace(bundle, test=_TestSplitRemoved())
        self.bundle = bundle
        x, y = balanced_batch(bundle.train, cfg.scoring_per_class, bundle.num_classes, seed=cfg.batch_seed)
        self.batches = [(x.to(self.device), y.to(self.device))]
        # Fail at construction, not at the first reset, on a model name that does not fit the data.
        probe = build_model(cfg.model, bundle.num_classes, bundle.input_shape, seed=0, init=cfg.init)
        probe_masks = Masks.ones(probe, exclude=cfg.exclude)
        self.num_prunable = probe_masks.num_total
        if cfg.observation == "layers" and len(probe_masks) > cfg.max_layers:
            raise ConfigError(f"bad Panning env config: {cfg.model} has {len(probe_masks)} prunable layers, more than "
                              f"max_layers={cfg.max_layers}; raise max_layers")
        self.K = len(cfg.indices)
        self.action_space = spaces.Box(-1.0, 1.0, shape=(action_size(self.K, cfg.layer_actions),),
                                       dtype=np.float32)
        size = observation_size(self.K, cfg.observation, cfg.max_layers)
        self.observation_space = spaces.Box(-OBS_LIMIT, OBS_LIMIT, shape=(size,), dtype=np.float32)
        self.feature_names = feature_names(cfg.indices, cfg.observation, cfg.max_layers)
        # A caller's own bundle gets a private evaluator and reference cache: sharing them by object
        # identity could hand one data set's results to another.
        self.proxy = self._make_proxy() if custom else self._shared_proxy()
        self._references = {} if custom else _REFERENCES
        self._fingerprint = json.dumps(dataclasses.asdict(cfg), sort_keys=True, default=str)
        self.episode: PruningEpisode | None = None
        self.model: nn.Module | None = None
        self._done = True

    # -------------------------------------------------------------------------------- plumbing

    def _make_proxy(self) -> ProxyEvaluator:
        cfg = self.config
        return ProxyEvaluator(self.bundle, cfg.model, settings=cfg.proxy, device=self.device)

    def _shared_proxy(self) -> ProxyEvaluator:
        cfg = self.config
        key = (cfg.dataset, cfg.data_dir, cfg.val_size, cfg.split_seed, cfg.model, str(self.device), cfg.proxy)
        if key not in _PROXIES:
            _PROXIES[key] = self._make_proxy()
        return _PROXIES[key]

    @property
    def masks(self) -> Masks:
        """The current masks of the episode."""
        if self.episode is None:
            raise RuntimeError("call reset() first")
        return self.episode.masks

    @property
    def pruner(self) -> Pruner | None:
        """The core pruner of the current episode."""
        return None if self.episode is None else self.episode.pruner

    def _draw_target(self) -> float:
        cfg = self.config
        if cfg.target_sparsity is not None:
            return cfg.target_sparsity
        lo, hi = (math.log(1.0 - s) for s in (cfg.target_range[1], cfg.target_range[0]))  # log-densities
        if cfg.target_grid > 0:
            grid = np.exp(np.linspace(lo, hi, cfg.target_grid)) if cfg.target_grid > 1 else np.exp([lo])
            d = float(grid[int(self.np_random.integers(len(grid)))])
        else:
            d = math.exp(float(self.np_random.uniform(lo, hi)))
        return round(1.0 - d, 6)  # a short float: a clean cache key, and printable

    def _draw_init_seed(self) -> int:
        cfg = self.config
        if cfg.init_seeds == 0:
            return int(self.np_random.integers(0, 2**31 - 1))
        return cfg.init_seed_base + int(self.np_random.integers(cfg.init_seeds))

    # ------------------------------------------------------------------------------- gym API

    @deferred_checks()  # on a GPU the reset's checks are read back once, at the end
    def reset(self, *, seed: int | None = None,
              options: dict[str, Any] | None = None) -> tuple[np.ndarray, dict[str, Any]]:
        self.begin(seed=seed, options=options)
        return self.first_observation()

    def begin(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> None:
        """:meth:`reset` up to, not including, the first observation (which scores the indices): a
        vectorised env scores all its episodes at once in between."""
        super().reset(seed=seed)
        cfg = self.config
        options = dict(options or {})
        unknown = set(options) - {"target_sparsity", "init_seed"}
        if unknown:
            raise ValueError(f"unknown reset options {sorted(unknown)}; known: init_seed, target_sparsity")
        target = self._draw_target()
        init_seed = self._draw_init_seed()
        if options.get("target_sparsity") is not None:
            target = float(options["target_sparsity"])
            if not 0.0 <= target < 1.0:
                raise ValueError(f"target_sparsity must be in [0, 1), got {target}")
        if options.get("init_seed") is not None:
            init_seed = int(options["init_seed"])
        self.target_sparsity = target
        self.init_seed = init_seed
        self.model = build_model(cfg.model, self.bundle.num_classes, self.bundle.input_shape, seed=init_seed,
                                 init=cfg.init).to(self.device)
        self.episode = PruningEpisode(
            self.model, cfg.indices, self.batches, target_sparsity=target, steps=cfg.pruning_steps,
            input_shape=self.bundle.input_shape, exclude=cfg.exclude, mode=cfg.mode,
            normalisation=cfg.normalisation, seed=init_seed, observation=cfg.observation, max_layers=cfg.max_layers,
            layer_actions=cfg.layer_actions,
        )
        self._done = False
        self._phi = 0.0

    def first_observation(self, obs: np.ndarray | None = None) -> tuple[np.ndarray, dict[str, Any]]:
        """The observation and info :meth:`reset` returns, after :meth:`begin` (``obs``: the episode's observation,
        when a vectorised env has made it already, with its other episodes')."""
        ep = self.episode
        assert ep is not None
        obs = ep.observe() if obs is None else obs
        info = {"target_sparsity": self.target_sparsity, "init_seed": self.init_seed, "num_prunable": ep.N,
                "target_keep": ep.final_keep, "sparsity": 0.0, "timing": dict(ep.timing)}
        return obs, info

    @deferred_checks()  # on a GPU the step's checks are read back once, at the end
    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        ep = self.episode
        # a step that does not end the episode: stepped and observed with one read of the device
        together = step_observe_many([ep], [action]) if ep is not None and not self._done else None
        pending = self.advance(action, together[0][0] if together is not None else None)
        # (an episode a collapse ended is observed again, without the index features)
        obs = together[1][0] if together is not None and not pending.terminated else None
        result = reference = None
        if pending.needs_proxy:
            assert self.model is not None
            result = self.proxy.evaluate(self.model, pending.masks)
            if self.config.reward in RELATIVE_REWARDS:
                t0 = time.perf_counter()
                reference = self.reference(self.target_sparsity, self.init_seed)
                pending.info["reference_seconds"] = time.perf_counter() - t0
        return self.conclude(pending, result, reference, obs)

    def advance(self, action: Any, stepped: EpisodeStep | None = None) -> PendingStep:
        """The pruning step of :meth:`step` and its shaping reward; whether the final reward still needs
        the proxy (then :meth:`conclude` takes its result). A vectorised env evaluates the proxies of all
        its finishing episodes at once in between, and may have stepped the episodes itself
        (:func:`panning.episode.step_many`): ``stepped`` is then this episode's step, taken with ``action``."""
        if self.episode is None or self._done:
            raise RuntimeError("the episode is over (or never started): call reset() before step()")
        cfg = self.config
        ep = self.episode
        s = stepped if stepped is not None else ep.step(action)
        terminated = ep.done or (bool(s.collapsed) and cfg.terminate_on_collapse)
        self._done = terminated
        phi = -(abs(s.loss_ratio) + abs(s.grad_ratio))
        reward = cfg.shaping * (phi - self._phi)
        self._phi = phi
        info: dict[str, Any] = {
            "step": s.step,
            "target_sparsity": self.target_sparsity,
            "sparsity": s.masks.sparsity,
            "effective_sparsity": 1.0 - s.effective.num_kept / s.effective.num_total,
            "index_weights": s.weights,
            "step_share": s.share,
            "keep": s.keep,
            "removed": s.removed,
            "layer_density": s.masks.layer_density(),
            "layer_factors": s.layer_factors,
            "collapsed_layers": s.collapsed,
            "init_seed": self.init_seed,
        }
        needs_proxy, penalty = False, 0.0
        if terminated:
            if s.collapsed and cfg.terminate_on_collapse:
                reward -= cfg.collapse_penalty
                info["collapse"] = True
            else:
                needs_proxy = True
                penalty = cfg.collapse_penalty if s.collapsed else 0.0
                info["collapse"] = bool(s.collapsed)
        return PendingStep(s.masks, reward, terminated, needs_proxy, info, penalty)

    def conclude(self, pending: PendingStep, result: ProxyResult | None, reference: tuple[float, str, float] | None,
                 obs: np.ndarray | None = None) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        """Finish :meth:`step`: add the final reward (the proxy ``result`` and, for the relative rewards,
        the ``reference`` of :meth:`reference`) and observe (unless ``obs``, the observation a vectorised env has
        made already, with its other episodes', is given)."""
        cfg, ep, info, reward = self.config, self.episode, pending.info, pending.reward
        assert ep is not None
        if pending.needs_proxy:
            assert result is not None
            info.update(proxy_accuracy=result.accuracy, proxy_loss=result.loss, proxy_seconds=result.seconds,
                        proxy_cached=result.cached)
            gain = result.accuracy
            if cfg.reward in RELATIVE_REWARDS:
                assert reference is not None
                if cfg.reward == "relative":
                    gain = result.accuracy - reference[0]
                    info["reference_accuracy"] = reference[0]
                else:
                    gain = loss_gain(reference[0], result.loss)
                    info["reference_loss"] = reference[0]
                info["reference_index"] = reference[1]
                info.setdefault("reference_seconds", reference[2])
            reward += cfg.reward_scale * gain - pending.penalty
        if obs is None:
            obs = ep.observe(score_indices=not pending.terminated)
        info["timing"] = dict(ep.timing)
        return obs, float(reward), pending.terminated, False, info

    def close(self) -> None:
        self.episode = None
        self.model = None
        self._done = True

    # -------------------------------------------------------------------------------- reward

    def reference_key(self, target_sparsity: float, init_seed: int) -> tuple:
        """The reference cache's key: these settings, the target and the initialisation."""
        return self._fingerprint, float(target_sparsity), int(init_seed)

    def cached_reference(self, target_sparsity: float, init_seed: int) -> tuple[float, str, float] | None:
        """The cached reference of :meth:`reference`, or None."""
        return self._references.get(self.reference_key(target_sparsity, init_seed))

    def reference_masks(self, target_sparsity: float, init_seed: int) -> tuple[nn.Module, list[tuple[str, Masks]]]:
        """(the initialisation, the masks of each single index on it): what :meth:`reference` trains."""
        cfg = self.config
        model = self.model
        if model is None or int(init_seed) != self.init_seed:
            model = build_model(cfg.model, self.bundle.num_classes, self.bundle.input_shape, seed=int(init_seed),
                                init=cfg.init).to(self.device)
        out = []
        for name in cfg.indices:
            p = Pruner(model, [name], self.batches, input_shape=self.bundle.input_shape, exclude=cfg.exclude,
                       mode=cfg.mode, normalisation=cfg.normalisation, seed=int(init_seed))
            for keep in keep_schedule(p.num_total, target_sparsity, cfg.pruning_steps, "exponential"):
                p.step([1.0], keep)
            out.append((name, p.masks))
        return model, out

    def record_reference(self, target_sparsity: float, init_seed: int, results: Sequence[ProxyResult],
                         seconds: float) -> tuple[float, str, float]:
        """Cache and return the reference from the proxy results of :meth:`reference_masks`' masks: the
        highest accuracy (``reward: relative``) or the lowest clamped loss (``relative_loss``); on a tie
        the first index in the config's order."""
        if len(results) != len(self.config.indices):
            raise ValueError(f"expected one proxy result per index ({len(self.config.indices)}), got {len(results)}")
        if self.config.reward == "relative_loss":
            losses = [clamped_loss(r.loss) for r in results]
            k = losses.index(min(losses))
            value = losses[k]
        else:
            accs = [r.accuracy for r in results]
            k = accs.index(max(accs))
            value = accs[k]
        entry = (value, self.config.indices[k], seconds)
        self._references[self.reference_key(target_sparsity, init_seed)] = entry
        return entry

    def reference(self, target_sparsity: float, init_seed: int) -> tuple[float, str, float]:
        """(best proxy accuracy, or lowest loss for ``reward: relative_loss``; its index; seconds it took)
        over the single indices at this target and init.

        Each index prunes the same initialisation with the default exponential schedule over the
        same T steps through the core pruner (what a one-hot action with ``b = 0`` does). Cached per
        process by (settings, target, init seed).
        """
        hit = self.cached_reference(target_sparsity, init_seed)
        if hit is not None:
            return hit
        t0 = time.perf_counter()
        model, masks = self.reference_masks(target_sparsity, init_seed)
        results = [self.proxy.evaluate(model, m) for _, m in masks]
        return self.record_reference(target_sparsity, init_seed, results, time.perf_counter() - t0)


@dataclass
class PendingStep:
    """A step of :meth:`PanningEnv.advance` whose final reward may still wait for the proxy."""

    masks: Masks
    reward: float
    terminated: bool
    needs_proxy: bool
    info: dict[str, Any]
    penalty: float = 0.0  # collapse penalty still to subtract with the final reward
