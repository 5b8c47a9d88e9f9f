"""Saved agents: SB3's zip with panning's metadata inside, validated loading, and applying a policy.

An agent file is the zip ``PPO.save`` writes plus one extra member, ``panning.json``: the indices
and their order, the observation version and feature names, the action mapping, the number of
pruning steps and the environment settings it was trained with. :func:`load_agent` checks all of
it against the installed code (and, if given, the requested indices) before SB3 ever builds a
network, so a mismatch is a clear message rather than a shape error.

:func:`apply_policy` prunes any ``torch.nn.Module`` with a trained policy: it drives
:class:`envs.episode.PruningEpisode` (the environment's own episode core, hence the same
:meth:`panning.pruner.Pruner.step` calls) with deterministic actions, and returns the same
:class:`panning.pruner.PruneResult` a fixed method does, with the chosen index weights and step
sizes recorded.
"""
from __future__ import annotations

import hashlib
import json
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

import panning
from envs.episode import ACTION_MAPPING, OBS_VERSION, PruningEpisode, feature_names, observation_size
from panning import indices as _indices
from panning.data import balanced_batch, dataset_labels
from panning.pruner import PruneResult, finish

__all__ = ["AgentError", "LoadedAgent", "FORMAT", "META_MEMBER", "agent_metadata", "save_agent", "read_metadata", "check_agent_file",
           "load_agent", "apply_policy"]

FORMAT = "panning-agent/1"
META_MEMBER = "panning.json"


class AgentError(ValueError):
    """An agent file is missing, not a panning agent, or does not fit the installed code or the request."""


def agent_metadata(env_config: Any, trained_timesteps: int = 0, **extra: Any) -> dict[str, Any]:
    """What a saved agent needs to be used elsewhere, from the env settings it was trained with."""
    import dataclasses

    env = dataclasses.asdict(env_config) if dataclasses.is_dataclass(env_config) else dict(env_config)
    idx = list(env["indices"])
    return {
        "format": FORMAT,
        "panning_version": panning.__version__,
        "algorithm": "PPO",
        "obs_version": OBS_VERSION,
        "observation_size": observation_size(len(idx)),
        "feature_names": feature_names(idx),
        "action_mapping": ACTION_MAPPING,
        "action_size": len(idx) + 1,
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


def save_agent(model: Any, path: str | Path, metadata: dict[str, Any]) -> Path:
    """``model.save(path)`` then add ``panning.json`` to the zip; written to a temporary file first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.zip")
    model.save(tmp)
    with zipfile.ZipFile(tmp, "a") as zf:
        zf.writestr(META_MEMBER, json.dumps(metadata, indent=2, default=str))
    tmp.replace(path)
    return path


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The ``panning.json`` of an agent file (AgentError if absent or unreadable)."""
    p = Path(path)
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


_REQUIRED = ("format", "obs_version", "observation_size", "feature_names", "action_mapping", "action_size", "indices",
             "pruning_steps", "normalisation", "mode", "exclude", "scoring_per_class")


def _check(meta: dict[str, Any], path: Path, indices: Sequence[str] | None) -> None:
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise AgentError(f"{path} has agent format {found!r}; this panning reads {FORMAT!r}")
    missing = [k for k in _REQUIRED if k not in meta]
    if missing:
        raise AgentError(f"{path}: its {META_MEMBER} lacks {', '.join(missing)}; the file is damaged")
    if meta.get("obs_version") != OBS_VERSION:
        raise AgentError(
            f"{path} was trained on observation version {meta.get('obs_version')}; this panning "
            f"(v{panning.__version__}) builds version {OBS_VERSION}: retrain the agent"
        )
    if meta.get("action_mapping") != ACTION_MAPPING:
        raise AgentError(f"{path} uses action mapping {meta.get('action_mapping')!r}; this panning uses "
                         f"{ACTION_MAPPING!r}: retrain the agent")
    trained = list(meta.get("indices", []))
    unknown = [n for n in trained if n not in _indices.available_indices()]
    if unknown:
        raise AgentError(f"{path} was trained with indices {unknown} that this panning does not provide "
                         f"(known: {', '.join(_indices.available_indices())})")
    if meta.get("observation_size") != observation_size(len(trained)) or meta.get("feature_names") != feature_names(trained):
        raise AgentError(f"{path}: its observation layout does not match this panning's for indices {trained}; retrain the agent")
    if indices is not None and list(indices) != trained:
        raise AgentError(f"{path} was trained with indices {trained} (in this order); requested {list(indices)}")


def check_agent_file(path: str | Path, indices: Sequence[str] | None = None) -> dict[str, Any]:
    """Validate an agent file's metadata against the installed code without loading the policy."""
    meta = read_metadata(path)
    _check(meta, Path(path), indices)
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
    """Load and validate an agent file; ``indices`` (optional) must equal the trained ones, in order."""
    from stable_baselines3 import PPO

    p = Path(path)
    meta = check_agent_file(p, indices)
    model = PPO.load(p, device=device)
    n_obs, n_act = model.observation_space.shape, model.action_space.shape
    if n_obs != (meta["observation_size"],) or n_act != (meta["action_size"],):
        raise AgentError(f"{p}: the policy's spaces {n_obs}/{n_act} disagree with its own metadata; the file is damaged")
    return LoadedAgent(model, meta, p, hashlib.sha256(p.read_bytes()).hexdigest())


def _batches_from(data: Dataset | DataLoader, per_class: int, num_classes: int | None, seed: int) -> list[tuple[Tensor, Tensor]]:
    dataset = data.dataset if isinstance(data, DataLoader) else data
    if num_classes is None:
        num_classes = int(dataset_labels(dataset).max()) + 1
    return [balanced_batch(dataset, per_class, num_classes, seed=seed)]


def apply_policy(
    agent: LoadedAgent | str | Path,
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
    """Prune ``model`` to ``sparsity`` with a trained policy, deterministically; the model is not modified.

    Scoring data is either ``batches`` (list of ``(x, y)``) or ``data`` (a labelled Dataset or a
    DataLoader over one), from which a class-balanced batch of ``scoring_per_class`` examples per
    class is drawn with ``seed`` (default: the agent's training setting). The policy's indices,
    number of steps, normalisation and selection mode come from the agent's metadata; ``exclude``
    defaults to the agent's too. Returns the masks with ``extra["policy"]`` holding the per-step
    index weights and step shares.
    """
    loaded = agent if isinstance(agent, LoadedAgent) else load_agent(agent)
    meta = loaded.metadata
    if batches is None:
        if data is None:
            raise ValueError("apply_policy needs scoring data: pass data= (a Dataset or DataLoader) or batches=")
        batches = _batches_from(data, scoring_per_class or meta["scoring_per_class"], num_classes, seed)
    if not batches or len(batches[0][0]) == 0:
        raise ValueError("the scoring batch is empty")
    device = next(model.parameters()).device
    batches = [(x.to(device), y.to(device)) for x, y in batches]
    t0 = time.perf_counter()
    ep = PruningEpisode(
        model, loaded.indices, batches, target_sparsity=sparsity, steps=loaded.pruning_steps,
        input_shape=input_shape, exclude=meta["exclude"] if exclude is None else exclude, mode=meta["mode"],
        normalisation=meta["normalisation"], seed=seed,
    )
    chosen = []
    while not ep.done:
        action, _ = loaded.model.predict(ep.observe(), deterministic=True)
        s = ep.step(action)
        chosen.append({"step": s.step, "weights": s.weights, "share": s.share, "keep": s.keep,
                       "sparsity": s.masks.sparsity, "action": [float(a) for a in action]})
    result = finish(ep.pruner, method, "policy", time.perf_counter() - t0)
    result.extra["policy"] = {
        "path": str(loaded.path),
        "sha256": loaded.sha256,
        "indices": loaded.indices,
        "pruning_steps": loaded.pruning_steps,
        "obs_version": meta["obs_version"],
        "trained_timesteps": meta.get("trained_timesteps"),
        "steps": chosen,
    }
    return result
