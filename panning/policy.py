"""Pruning with a trained policy: the episode core driven by deterministic actions.

A :class:`Policy` is what the library needs of a trained agent: a ``predict`` callable (observation
in, action out, deterministic) and the settings the agent was trained with (its indices and their
order, the number of pruning steps, the selection mode and normalisation). :func:`run_policy`
drives :class:`panning.episode.PruningEpisode`, the environment's own episode core, with it, so a
policy applied here prunes exactly as it did in training.

Loading an agent file (a Stable-Baselines3 zip) is the agents layer's job
(:func:`panning.agents.policy.load_policy`); this module never imports Gymnasium or SB3, so any
``predict`` callable works: a hand-written rule, another RL library's policy.
"""
from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

import panning
from panning import indices as _indices
from panning.data import balanced_batch, dataset_labels
from panning.episode import (
    DEFAULT_MAX_LAYERS,
    OBS_VERSIONS,
    PruningEpisode,
    action_mapping,
    action_size,
    check_layer_actions,
    feature_names,
    observation_size,
)
from panning.errors import AgentError
from panning.masks import Masks
from panning.pruner import PruneResult, finish

__all__ = ["FORMAT", "Policy", "Predict", "check_metadata", "check_spaces", "metadata_layout", "policy_metadata",
           "run_policy"]

#: format tag of policy metadata (the ``panning.json`` inside an agent file)
FORMAT = "panning-agent/1"
_REQUIRED = ("format", "obs_version", "observation_size", "feature_names", "action_mapping", "action_size", "indices",
             "pruning_steps", "normalisation", "mode", "exclude", "scoring_per_class")

#: observation (float32 vector) -> action (float vector in [-1, 1]), deterministic
Predict = Callable[[np.ndarray], np.ndarray]


@dataclass
class Policy:
    """A trained pruning policy as the library uses it.

    ``info`` is recorded with the masks it produces (``prune.json``: the agent file's path and
    SHA-256, its observation version, how long it trained); ``info["sha256"]``, when present,
    identifies the policy for sweep resumption.
    """

    predict: Predict
    indices: list[str]
    pruning_steps: int
    mode: str = "global"
    normalisation: str = "mean"
    exclude: list[str] = field(default_factory=list)
    scoring_per_class: int = 10
    info: dict[str, Any] = field(default_factory=dict)
    #: observation layout it reads (:mod:`panning.episode`); a ``layers`` policy must accept any number
    #: of layer rows (a network deeper than ``max_layers`` gets a wider layer axis)
    observation: str = "summary"
    max_layers: int = DEFAULT_MAX_LAYERS
    #: per-layer action terms (depth control points) after the K + 1 (:mod:`panning.episode`)
    layer_actions: int = 0

    @classmethod
    def from_metadata(cls, predict: Predict, meta: Mapping[str, Any], **info: Any) -> Policy:
        """A policy from an agent file's metadata (see :mod:`panning.agents.policy`)."""
        observation, max_layers = metadata_layout(meta)
        return cls(
            predict, list(meta["indices"]), int(meta["pruning_steps"]), str(meta["mode"]),
            str(meta["normalisation"]), list(meta["exclude"]), int(meta["scoring_per_class"]),
            {"obs_version": meta.get("obs_version"), "trained_timesteps": meta.get("trained_timesteps"), **info},
            observation, max_layers, int(meta.get("layer_actions", 0)),
        )


def metadata_layout(meta: Mapping[str, Any]) -> tuple[str, int]:
    """(observation layout, max_layers) of policy metadata; files of version 1 name no layout: ``summary``."""
    observation = str(meta.get("observation", "summary"))
    return observation, int(meta.get("max_layers", DEFAULT_MAX_LAYERS))


def policy_metadata(env_config: Any, trained_timesteps: int = 0, **extra: Any) -> dict[str, Any]:
    """What a trained policy needs to be applied elsewhere, from the env settings it was trained with
    (a :class:`panning.envs.panning_env.PanningEnvConfig` or its dict): the indices and their order,
    the observation version and layout, the action mapping, the steps and selection settings."""
    is_config = dataclasses.is_dataclass(env_config) and not isinstance(env_config, type)
    env = dataclasses.asdict(env_config) if is_config else dict(env_config)
    idx = list(env["indices"])
    observation, max_layers = str(env.get("observation", "summary")), int(env.get("max_layers", DEFAULT_MAX_LAYERS))
    layer_actions = check_layer_actions(env.get("layer_actions", 0))
    return {
        "format": FORMAT,
        "panning_version": panning.__version__,
        "obs_version": OBS_VERSIONS[observation],
        "observation": observation,
        "max_layers": max_layers,
        "observation_size": observation_size(len(idx), observation, max_layers),
        "feature_names": feature_names(idx, observation, max_layers),
        "action_mapping": action_mapping(layer_actions),
        "action_size": action_size(len(idx), layer_actions),
        "layer_actions": layer_actions,
        "indices": idx,
        "pruning_steps": int(env["pruning_steps"]),
        "normalisation": env["normalisation"],
        "mode": env["mode"],
        "exclude": list(env["exclude"]),
        "scoring_per_class": int(env["scoring_per_class"]),
        "trained_timesteps": int(trained_timesteps),
        "env": env,
        **extra,
    }


def check_metadata(meta: Any, where: str, indices: Sequence[str] | None = None) -> None:
    """Raise :class:`AgentError` unless ``meta`` is policy metadata this panning can apply: the format
    tag, every required key, the observation version, the action mapping, indices it provides and the
    observation layout they imply; and, if ``indices`` is given, exactly those indices in that order.
    ``where`` (a file name) starts every message."""
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise AgentError(f"{where} has agent format {found!r}; this panning reads {FORMAT!r}")
    missing = [k for k in _REQUIRED if k not in meta]
    if missing:
        raise AgentError(f"{where}: its metadata lacks {', '.join(missing)}; the file is damaged")
    observation, max_layers = metadata_layout(meta)
    if observation not in OBS_VERSIONS or meta["obs_version"] != OBS_VERSIONS[observation]:
        known = ", ".join(f"{v} ({k})" for k, v in OBS_VERSIONS.items())
        raise AgentError(f"{where} was trained on observation version {meta['obs_version']} ({observation}); this "
                         f"panning (v{panning.__version__}) builds versions {known}: retrain the agent")
    # files saved before per-layer terms existed name none: 0
    layer_actions = meta.get("layer_actions", 0)
    try:
        layer_actions = check_layer_actions(layer_actions)
    except ValueError as e:
        raise AgentError(f"{where}: {e}; the file is damaged") from None
    if meta["action_mapping"] != action_mapping(layer_actions):
        raise AgentError(f"{where} uses action mapping {meta['action_mapping']!r}; this panning uses "
                         f"{action_mapping(layer_actions)!r}: retrain the agent")
    trained = list(meta["indices"])
    unknown = [n for n in trained if n not in _indices.available_indices()]
    if unknown:
        raise AgentError(f"{where} was trained with indices {unknown} that this panning does not provide "
                         f"(known: {', '.join(_indices.available_indices())})")
    size = observation_size(len(trained), observation, max_layers)
    names = feature_names(trained, observation, max_layers)
    if meta["observation_size"] != size or meta["feature_names"] != names:
        raise AgentError(f"{where}: its observation layout does not match this panning's for indices {trained}; "
                         "retrain the agent")
    if meta["action_size"] != action_size(len(meta["indices"]), layer_actions):
        raise AgentError(f"{where}: its action size {meta['action_size']} does not match its "
                         f"{len(meta['indices'])} indices and {layer_actions} per-layer terms; the file is damaged")
    if indices is not None and list(indices) != trained:
        raise AgentError(f"{where} was trained with indices {trained} (in this order); requested {list(indices)}")


def check_spaces(meta: Mapping[str, Any], observation_shape: Any, action_shape: Any, where: str) -> None:
    """Raise :class:`AgentError` unless a loaded policy's observation and action shapes are those its
    metadata states (a mismatch means a damaged or hand-edited file)."""
    obs, act = tuple(int(d) for d in observation_shape), tuple(int(d) for d in action_shape)
    if obs != (meta["observation_size"],) or act != (meta["action_size"],):
        raise AgentError(f"{where}: the policy's spaces {obs}/{act} disagree with its own metadata; "
                         "the file is damaged")


def _batches_from(
    data: Dataset | DataLoader, per_class: int, num_classes: int | None, seed: int
) -> list[tuple[Tensor, Tensor]]:
    dataset = data.dataset if isinstance(data, DataLoader) else data
    if num_classes is None:
        num_classes = int(dataset_labels(dataset).max()) + 1
    return [balanced_batch(dataset, per_class, num_classes, seed=seed)]


def run_policy(
    policy: Policy,
    model: nn.Module,
    sparsity: float,
    data: Dataset | DataLoader | None = None,
    *,
    batches: Sequence[tuple[Tensor, Tensor]] | None = None,
    num_classes: int | None = None,
    input_shape: Sequence[int] | None = None,
    exclude: Sequence[str] | None = None,
    scoring_per_class: int | None = None,
    seed: int = 0,
    method: str = "agent",
) -> PruneResult:
    """Prune ``model`` to ``sparsity`` with ``policy``, deterministically; the model is not modified.

    Scoring data is either ``batches`` (a list of ``(x, y)``) or ``data`` (a labelled Dataset or a
    DataLoader over one), from which a class-balanced batch of ``scoring_per_class`` examples per
    class is drawn with ``seed`` (default: the policy's training setting). The indices, number of
    steps, normalisation and selection mode are the policy's; ``exclude`` defaults to the
    policy's too. Returns the masks with ``extra["policy"]`` holding ``policy.info`` and, per
    step, the index weights and step share chosen.
    """
    if batches is None:
        if data is None:
            raise ValueError("run_policy needs scoring data: pass data= (a Dataset or DataLoader) or batches=")
        batches = _batches_from(data, scoring_per_class or policy.scoring_per_class, num_classes, seed)
    if not batches or len(batches[0][0]) == 0:
        raise ValueError("the scoring batch is empty")
    device = next(model.parameters()).device
    batches = [(x.to(device), y.to(device)) for x, y in batches]
    t0 = time.perf_counter()
    exclude = policy.exclude if exclude is None else exclude
    max_layers = policy.max_layers
    if policy.observation == "layers":  # a deeper network than the policy saw: a wider layer axis
        max_layers = max(max_layers, len(Masks.ones(model, exclude=exclude)))
    ep = PruningEpisode(
        model, policy.indices, batches, target_sparsity=sparsity, steps=policy.pruning_steps,
        input_shape=input_shape, exclude=exclude, mode=policy.mode,
        normalisation=policy.normalisation, seed=seed, observation=policy.observation, max_layers=max_layers,
        layer_actions=policy.layer_actions,
    )
    chosen = []
    while not ep.done:
        action = np.asarray(policy.predict(ep.observe()))
        s = ep.step(action)
        chosen.append({"step": s.step, "weights": s.weights, "share": s.share, "keep": s.keep,
                       "sparsity": s.masks.sparsity, "action": [float(a) for a in action.reshape(-1)],
                       **({"layer_factors": s.layer_factors} if policy.layer_actions else {})})
    result = finish(ep.pruner, method, "policy", time.perf_counter() - t0)
    result.extra["policy"] = {**policy.info, "indices": list(policy.indices),
                              "pruning_steps": policy.pruning_steps, "steps": chosen}
    return result
