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

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from panning.data import balanced_batch, dataset_labels
from panning.episode import PruningEpisode
from panning.pruner import PruneResult, finish

__all__ = ["Policy", "Predict", "run_policy"]

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

    @classmethod
    def from_metadata(cls, predict: Predict, meta: Mapping[str, Any], **info: Any) -> Policy:
        """A policy from an agent file's metadata (see :mod:`panning.agents.policy`)."""
        return cls(
            predict, list(meta["indices"]), int(meta["pruning_steps"]), str(meta["mode"]),
            str(meta["normalisation"]), list(meta["exclude"]), int(meta["scoring_per_class"]),
            {"obs_version": meta.get("obs_version"), "trained_timesteps": meta.get("trained_timesteps"), **info},
        )


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
    ep = PruningEpisode(
        model, policy.indices, batches, target_sparsity=sparsity, steps=policy.pruning_steps,
        input_shape=input_shape, exclude=policy.exclude if exclude is None else exclude, mode=policy.mode,
        normalisation=policy.normalisation, seed=seed,
    )
    chosen = []
    while not ep.done:
        action = np.asarray(policy.predict(ep.observe()))
        s = ep.step(action)
        chosen.append({"step": s.step, "weights": s.weights, "share": s.share, "keep": s.keep,
                       "sparsity": s.masks.sparsity, "action": [float(a) for a in action.reshape(-1)]})
    result = finish(ep.pruner, method, "policy", time.perf_counter() - t0)
    result.extra["policy"] = {**policy.info, "indices": list(policy.indices),
                              "pruning_steps": policy.pruning_steps, "steps": chosen}
    return result
