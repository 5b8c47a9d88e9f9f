"""Saved agents: SB3's zip with panning's metadata inside, validated loading, and applying a policy.

An agent file is the zip ``PPO.save`` writes plus one extra member, ``panning.json``: the policy
metadata of :func:`panning.policy.policy_metadata` (the indices and their order, the observation
version and feature names, the action mapping, the number of pruning steps and the environment
settings it was trained with). :func:`load_agent` checks all of it against the installed code
(:func:`panning.policy.check_metadata`; and, if given, the requested indices) before SB3 ever builds
a network, so a mismatch is a clear message rather than a shape error.

:func:`load_policy` turns an agent file into the library's :class:`panning.policy.Policy`, and
:func:`apply_policy` prunes any ``torch.nn.Module`` with it through
:func:`panning.policy.run_policy` (the environment's own episode core, hence the same
:meth:`panning.pruner.Pruner.step` calls), returning the same :class:`panning.pruner.PruneResult`
a fixed method does, with the chosen index weights and step sizes recorded.
"""
from __future__ import annotations

import json
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from panning.agents.config import sb3_schedules
from panning.config import SHIPPED_PREFIX
from panning.errors import AgentError
from panning.hashing import file_digest
from panning.io import atomic_path
from panning.policy import (
    FORMAT,
    Policy,
    check_metadata,
    check_spaces,
    metadata_layout,
    policy_metadata,
    run_policy,
)
from panning.pruner import PruneResult

__all__ = [
    "FORMAT",
    "META_MEMBER",
    "POLICY_SETTINGS",
    "SHIPPED_DIR",
    "agent_path",
    "shipped_agents",
    "AgentError",
    "LoadedAgent",
    "agent_metadata",
    "apply_policy",
    "as_policy",
    "check_agent_file",
    "load_agent",
    "load_policy",
    "policy_settings",
    "read_metadata",
    "save_agent",
]

META_MEMBER = "panning.json"
#: agents that ship inside the package (``<name>.zip`` and ``<name>.json``, how it was trained)
SHIPPED_DIR = Path(__file__).resolve().parent / "shipped"


#: env settings a policy's spaces and the meaning of its observations depend on: every env it acts in,
#: and every env of a training mix, must have the values it was trained with
POLICY_SETTINGS = ("indices", "pruning_steps", "observation", "max_layers", "layer_actions", "normalisation", "mode",
                   "exclude", "scoring_per_class")


def policy_settings(meta: dict[str, Any]) -> dict[str, Any]:
    """The :data:`POLICY_SETTINGS` an agent was trained with, from its metadata (files from before the
    per-layer observation or per-layer terms name neither: their defaults, ``summary`` and 0)."""
    observation, max_layers = metadata_layout(meta)
    out = {k: meta[k] for k in POLICY_SETTINGS if k in meta}
    out.update(observation=observation, max_layers=max_layers, layer_actions=meta.get("layer_actions", 0))
    return out


def shipped_agents() -> list[str]:
    """Names of the agents shipped with the package (``panning prune --policy default`` uses one)."""
    return sorted(p.stem for p in SHIPPED_DIR.glob("*.zip"))


def agent_path(agent: str | Path) -> Path:
    """The file an agent reference names: an existing path, or a shipped agent's name (``default`` or
    ``shipped:default``; the prefix is what config files use, where a bare name would read as a path)."""
    text = str(agent)
    name = text[len(SHIPPED_PREFIX):] if text.startswith(SHIPPED_PREFIX) else None
    if name is None:
        if Path(text).exists() or text not in shipped_agents():
            return Path(text)
        name = text
    path = SHIPPED_DIR / f"{name}.zip"
    if not path.is_file():
        raise AgentError(f"no shipped agent {name!r}; shipped agents: {', '.join(shipped_agents()) or 'none'}")
    return path


def agent_metadata(env_config: Any, trained_timesteps: int = 0, **extra: Any) -> dict[str, Any]:
    """What a saved PPO agent needs to be used elsewhere (:func:`panning.policy.policy_metadata`)."""
    return policy_metadata(env_config, trained_timesteps, algorithm="PPO", **extra)


def save_agent(model: Any, path: str | Path, metadata: dict[str, Any]) -> Path:
    """``model.save(path)`` then add ``panning.json`` to the zip; written to a temporary file first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        model.save(tmp)
        with zipfile.ZipFile(tmp, "a") as zf:
            zf.writestr(META_MEMBER, json.dumps(metadata, indent=2, default=str))
    return path


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The ``panning.json`` of an agent file or shipped agent (AgentError if absent or unreadable)."""
    p = agent_path(path)
    if not p.is_file():
        raise AgentError(f"agent file {p} does not exist")
    try:
        with zipfile.ZipFile(p) as zf:
            if META_MEMBER not in zf.namelist():
                raise AgentError(f"{p} has no {META_MEMBER}: not an agent saved by `panning train-agent`")
            return json.loads(zf.read(META_MEMBER))
    except zipfile.BadZipFile:
        raise AgentError(f"{p} is not an agent file (not a zip archive)") from None
    except json.JSONDecodeError as e:
        raise AgentError(f"{p}: unreadable {META_MEMBER} ({e})") from None


def check_agent_file(path: str | Path, indices: Sequence[str] | None = None) -> dict[str, Any]:
    """Validate an agent file's metadata against the installed code without loading the policy."""
    meta = read_metadata(path)
    check_metadata(meta, str(path), indices)
    return meta


@dataclass
class LoadedAgent:
    """A validated agent: the SB3 model, its metadata, where it came from."""

    model: Any
    metadata: dict[str, Any]
    path: Path
    sha256: str

    @property
    def indices(self) -> list[str]:
        return list(self.metadata["indices"])

    @property
    def pruning_steps(self) -> int:
        return int(self.metadata["pruning_steps"])


def load_agent(path: str | Path, indices: Sequence[str] | None = None, device: str = "cpu") -> LoadedAgent:
    """Load and validate an agent file (or a shipped agent, by name); ``indices`` (optional) must equal the
    trained ones, in order."""
    from stable_baselines3 import PPO

    p = agent_path(path)
    meta = check_agent_file(p, indices)
    model = PPO.load(p, device=device, custom_objects=sb3_schedules())  # predicting needs no schedule
    check_spaces(meta, model.observation_space.shape, model.action_space.shape, str(p))
    return LoadedAgent(model, meta, p, file_digest(p))


class _Actions:
    """``observation -> action`` of an SB3 model (picklable, unlike a lambda): the deterministic action, or with
    ``deterministic=False`` one drawn from the policy's distribution with torch's global generator."""

    def __init__(self, model: Any, deterministic: bool = True) -> None:
        self.model = model
        self.deterministic = deterministic

    def __call__(self, observation: np.ndarray) -> np.ndarray:
        space = self.model.observation_space
        if np.shape(observation) == space.shape:
            action, _ = self.model.predict(observation, deterministic=self.deterministic)
            return np.asarray(action)
        # A layers observation of a network deeper than the policy's max_layers: SB3's predict checks the
        # shape against the training space, but the set extractor reads any number of rows. The same steps
        # as predict: the action, clipped to the action space.
        import torch

        policy = self.model.policy
        obs = torch.as_tensor(np.asarray(observation, dtype=np.float32), device=policy.device).reshape(1, -1)
        with torch.no_grad():
            action = policy._predict(obs, deterministic=self.deterministic).cpu().numpy().reshape(
                self.model.action_space.shape)
        return np.clip(action, self.model.action_space.low, self.model.action_space.high)


def as_policy(agent: LoadedAgent, deterministic: bool = True) -> Policy:
    """The library's :class:`panning.policy.Policy` of a loaded agent (its metadata and deterministic actions;
    ``deterministic=False`` samples them instead, for searches over the agent's own proposals)."""
    return Policy.from_metadata(_Actions(agent.model, deterministic), agent.metadata, path=str(agent.path),
                                sha256=agent.sha256)


def load_policy(path: str | Path, indices: Sequence[str] | None = None, device: str = "cpu") -> Policy:
    """:func:`load_agent`, as a :class:`panning.policy.Policy` ready for :func:`panning.policy.run_policy`."""
    return as_policy(load_agent(path, indices, device))


def apply_policy(
    agent: Policy | LoadedAgent | str | Path,
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
    """Prune ``model`` to ``sparsity`` with a trained agent (a file, a shipped agent's name such as
    ``"default"``, a loaded agent or a policy),
    deterministically; the model is not modified. See :func:`panning.policy.run_policy` for the
    arguments: scoring data is ``batches`` or ``data``, the rest defaults to the agent's settings."""
    if isinstance(agent, (str, Path)):
        policy = load_policy(agent)
    elif isinstance(agent, LoadedAgent):
        policy = as_policy(agent)
    else:
        policy = agent
    return run_policy(policy, model, sparsity, data, batches=batches, num_classes=num_classes, input_shape=input_shape,
                      exclude=exclude, scoring_per_class=scoring_per_class, seed=seed, method=method)
