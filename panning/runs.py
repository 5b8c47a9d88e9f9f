"""Prune -> train -> evaluate runs that write resumable run directories.

Shared by the CLI, the benchmark sweep and the agent's evaluation, so that every path prunes and
trains a network the same way. A run directory holds ``config.yaml`` (resolved), ``masks.pt``,
``prune.json``, ``metrics.json`` and TensorBoard events under ``tb/``.
"""
from __future__ import annotations

import dataclasses
import json
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from panning import config as _config
from panning.config import RunConfig
from panning.data import DataBundle, balanced_batch, load_dataset
from panning.errors import ConfigError, RunDirError
from panning.hashing import state_digest
from panning.io import atomic_path, write_json
from panning.masks import Masks, check_sparsity, largest_sparsity
from panning.models import build_model, reinit_weights
from panning.policy import Policy, run_policy
from panning.pruner import PruneResult, prune
from panning.train import evaluate, resolve_device, train_masked

__all__ = [
    "RESULT_FILES",
    "RunDirError",
    "Setup",
    "cell_config",
    "cell_mismatch",
    "check_sparsity",
    "largest_sparsity",
    "load_checkpoint",
    "save_checkpoint",
    "load_run_masks",
    "prepare_out",
    "prune_model",
    "record_sweep_config",
    "run_cell",
    "save_prune",
    "setup",
    "state_digest",
    "train_and_evaluate",
    "write_json",
]

RESULT_FILES = ("masks.pt", "prune.json", "metrics.json")


def prepare_out(out: str | Path, overwrite: bool = False, results: Iterable[str] = RESULT_FILES) -> Path:
    """Check that ``out`` holds no results (kept unless ``overwrite``); it is created only when written to."""
    p = Path(out)
    if p.exists() and not p.is_dir():
        raise RunDirError(f"--out {p} exists and is not a directory")
    found = [r for r in results if (p / r).exists()]
    if found and not overwrite:
        raise RunDirError(f"{p} already holds results ({', '.join(found)}); pass --overwrite or choose another --out")
    return p


@dataclass
class Setup:
    """A freshly initialised model and its data, ready to prune or train."""

    model: nn.Module
    bundle: DataBundle
    device: torch.device


def setup(cfg: RunConfig, bundle: DataBundle | None = None) -> Setup:
    """Build the data (unless given) and the seeded model on the configured device."""
    device = resolve_device(cfg.device)
    if bundle is None:
        bundle = load_dataset(cfg.dataset, cfg.data_dir, download=cfg.download, seed=cfg.split_seed)
    model = build_model(cfg.model, bundle.num_classes, bundle.input_shape, seed=cfg.seed, init=cfg.init)
    return Setup(model.to(device), bundle, device)




def scoring_batches(cfg: RunConfig, bundle: DataBundle,
                    device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One class-balanced scoring batch from the training split (never validation or test)."""
    x, y = balanced_batch(bundle.train, cfg.prune.scoring_per_class, bundle.num_classes, seed=cfg.seed)
    return [(x.to(device), y.to(device))]


def prune_model(cfg: RunConfig, s: Setup, policy: Policy | None = None) -> PruneResult:
    """Prune the set-up model with the configured fixed method, or with ``policy``: the trained agent
    that ``prune.policy`` names, loaded by the caller (``panning.agents.policy.load_policy``)."""
    p = cfg.prune
    if p.policy and policy is None:
        raise ConfigError(f"prune.policy is {p.policy}: load it (panning.agents.policy.load_policy) and pass policy=")
    if policy is not None:
        return run_policy(
            policy, s.model, p.sparsity, batches=scoring_batches(cfg, s.bundle, s.device),
            input_shape=s.bundle.input_shape, exclude=p.exclude or None, seed=cfg.seed, method=p.method,
        )
    return prune(
        s.model,
        p.method,
        p.sparsity,
        scoring_batches(cfg, s.bundle, s.device),
        iterations=p.iterations,
        schedule=p.schedule,
        input_shape=s.bundle.input_shape,
        exclude=p.exclude,
        mode=p.mode,
        normalisation=p.normalisation,
        min_per_layer=p.min_per_layer,
        seed=cfg.seed,
    )


def save_prune(out: Path, cfg: RunConfig, s: Setup, result: PruneResult,
               extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write config.yaml, masks.pt and prune.json for a finished pruning."""
    out.mkdir(parents=True, exist_ok=True)
    _config.dump(cfg, out / "config.yaml")
    result.masks.cpu().save(out / "masks.pt")
    summary = {"model": cfg.model, "dataset": cfg.dataset, "seed": cfg.seed, **result.summary()}
    summary["init_sha256"] = state_digest(s.model)
    summary.update(extra or {})
    write_json(out / "prune.json", summary)
    return summary


def train_and_evaluate(
    cfg: RunConfig, s: Setup, masks: Masks, out: Path | None, progress: bool | None = None, method: str | None = None
) -> dict[str, Any]:
    """Fully train the masked model, evaluate on validation and test, write metrics.json (if ``out``).

    With ``cfg.reinit`` the weights are drawn afresh first (:func:`panning.models.reinit_weights`).
    """
    if cfg.reinit:
        reinit_weights(s.model, cfg.init, cfg.seed)
    writer = None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(out / "tb"))
    t0 = time.perf_counter()
    try:
        history = train_masked(s.model, masks, s.bundle, cfg.train, device=s.device, seed=cfg.seed, writer=writer,
                               progress=progress)
    finally:
        if writer is not None:
            writer.close()
    seconds = time.perf_counter() - t0
    val = evaluate(s.model, s.bundle.val, s.device, s.bundle.num_classes)
    test = evaluate(s.model, s.bundle.test, s.device, s.bundle.num_classes)
    metrics = {
        "model": cfg.model,
        "dataset": cfg.dataset,
        "method": method or cfg.prune.method,
        "seed": cfg.seed,
        "sparsity": masks.sparsity,
        "test_accuracy": test["accuracy"],
        "test_loss": test["loss"],
        "val_accuracy": val["accuracy"],
        "per_class_recall": test["per_class_recall"],
        "epochs": cfg.train.epochs,
        "reinit": cfg.reinit,
        # every validation sample in one class: training collapsed (a dense net: the recipe does not
        # fit the model; a pruned one: see effective sparsity for layer collapse). Reported, not hidden.
        "single_class": sum(r > 0 for r in val["per_class_recall"]) <= 1,
        "seconds": seconds,
        "history": history.get("epochs", history) if isinstance(history, dict) else history,
    }
    if metrics["single_class"]:
        print(f"warning: the trained {metrics['method']} network predicts a single class (validation accuracy "
              f"{100 * val['accuracy']:.2f}%): training collapsed. Dense: lower train.lr or try another --init; "
              "pruned: check effective sparsity (layer collapse).", file=sys.stderr, flush=True)
    if out is not None:
        save_checkpoint(s.model, out / "model.pt", cfg.model)  # the trained weights (panning prune --checkpoint)
        write_json(out / "metrics.json", metrics)
    return metrics


CHECKPOINT_FORMAT = "panning.model/1"


def save_checkpoint(model: nn.Module, path: Path, model_name: str) -> None:
    """The trained weights of a run, with the architecture's name (``panning prune --checkpoint`` reads it)."""
    with atomic_path(path) as tmp:
        torch.save({"format": CHECKPOINT_FORMAT, "model": model_name,
                    "state": {k: v.detach().cpu() for k, v in model.state_dict().items()}}, tmp)


def load_checkpoint(path: Path, model: nn.Module) -> None:
    """Load a :func:`save_checkpoint` file into ``model`` (:class:`RunDirError` if it is not one, or is
    another architecture's)."""
    if not Path(path).is_file():
        raise RunDirError(f"checkpoint {path} does not exist (it is model.pt in a `panning train` run directory)")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a foreign or damaged file
        raise RunDirError(f"{path} is not a panning checkpoint: {str(e).splitlines()[0]}") from None
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise RunDirError(f"{path} is not a panning checkpoint (format tag {CHECKPOINT_FORMAT!r} missing)")
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    have = {k: tuple(v.shape) for k, v in payload["state"].items()}
    if want != have:
        raise RunDirError(f"{path} holds a {payload.get('model')} network, which does not fit this model "
                          f"({len(have)} tensors vs {len(want)} expected, or other shapes)")
    model.load_state_dict(payload["state"])


def load_run_masks(masks_path: str | Path) -> tuple[RunConfig, Masks, dict[str, Any]]:
    """Masks plus the config and prune summary of the run directory they were written into."""
    mp = Path(masks_path)
    if not mp.is_file():
        raise RunDirError(f"masks file {mp} does not exist")
    cfg_path = mp.parent / "config.yaml"
    if not cfg_path.is_file():
        raise RunDirError(f"{cfg_path} is missing: "
                          "--masks must point at masks.pt inside a `panning prune` run directory")
    cfg = _config.load(cfg_path)
    info_path = mp.parent / "prune.json"
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    return cfg, Masks.load(mp), info


#: RunConfig fields that say where a run ran, not what it computed: a sweep may resume elsewhere.
#: An agent is identified by its file's SHA-256 (checked separately), not by where the file lies.
PLACE_FIELDS = ("device", "data_dir", "download", "prune.policy")


def cell_config(cfg: RunConfig, cell: Any, agents: Mapping[str, str] | None = None) -> RunConfig:
    """The resolved run config of sweep cell ``cell`` (:class:`panning.sweep.Cell`) over base ``cfg``;
    ``agents`` maps agent labels to agent file paths."""
    from panning.sweep import DENSE

    method = cell.method
    c = _config.override(cfg, {"seed": cell.seed, "prune.sparsity": cell.sparsity,
                               "prune.method": None if method == DENSE else method})
    # set explicitly (override skips None): a policy in the base config must not leak into fixed-method cells
    return dataclasses.replace(c, prune=dataclasses.replace(c.prune, policy=(agents or {}).get(method)))


def config_diff(have: RunConfig, want: RunConfig, ignore: tuple[str, ...] = PLACE_FIELDS) -> list[tuple[str, Any, Any]]:
    """``(dotted key, have, want)`` for every field where two run configs differ, ``ignore``d keys
    and their sub-keys left out."""
    a, b = _config.to_dict(have), _config.to_dict(want)
    keys = [k for k in _flat_diff(a, b) if not any(k == i or k.startswith(i + ".") for i in ignore)]
    return [(k, _dig(a, k), _dig(b, k)) for k in keys]


def _describe(diff: list[tuple[str, Any, Any]]) -> str:
    k, have, want = diff[0]
    return f"{k} was {have!r}, this run asks for {want!r}" + (f" (+{len(diff) - 1} more)" if len(diff) > 1 else "")


def cell_mismatch(cfg: RunConfig, cell: Any, d: Path, agents: Mapping[str, Policy] | None = None) -> str | None:
    """Why finished cell folder ``d`` does not hold what this sweep would compute for ``cell`` (None if
    it does): its config differs beyond :data:`PLACE_FIELDS`, or its agent has changed since
    (``agents``: label -> loaded policy, whose ``info`` holds the file's path and SHA-256)."""
    from panning.sweep import DENSE

    want = cell_config(cfg, cell, _agent_paths(agents))
    have_path = d / "config.yaml"
    if not have_path.is_file():
        return "it has no config.yaml"
    # nothing is pruned in a dense cell: the base's pruning settings do not reach its result
    diff = config_diff(_config.load(have_path), want, PLACE_FIELDS + (("prune",) if cell.method == DENSE else ()))
    if diff:
        return _describe(diff)
    policy = want.prune.policy
    recorded = json.loads((d / "prune.json").read_text()).get("policy_sha256") if (d / "prune.json").is_file() else None
    # cells written before hashes were recorded cannot be checked; they are trusted
    sha = (agents or {})[cell.method].info.get("sha256") if policy else None
    if policy and recorded and sha and recorded != sha:
        return f"agent file {policy} is not the one this cell was pruned with (its SHA-256 differs)"
    return None


def record_sweep_config(out: Path, cfg: RunConfig) -> None:
    """Write ``out/run_config.yaml`` (the resolved base config of a sweep) if absent, else check that
    ``cfg`` computes the same: a sweep resumed with other flags would otherwise finish cells of
    another setting. Raises :class:`RunDirError` on a difference."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "run_config.yaml"
    if not path.is_file():
        _config.dump(cfg, path)
    diff = config_diff(_config.load(path), cfg)
    if diff:
        raise RunDirError(f"{out} is a sweep started with another config: {_describe(diff)}; use another --out")


def _flat_diff(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(a) | set(b)):
        x, y = a.get(k), b.get(k)
        if isinstance(x, dict) and isinstance(y, dict):
            out += _flat_diff(x, y, f"{prefix}{k}.")
        elif x != y:
            out.append(prefix + k)
    return out


def _dig(d: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        d = d.get(part) if isinstance(d, dict) else None
    return d


def _agent_paths(agents: Mapping[str, Policy] | None) -> dict[str, str]:
    return {name: str(p.info.get("path", name)) for name, p in (agents or {}).items()}


def run_cell(cfg: RunConfig, cell: Any, out: Path, bundle: DataBundle | None = None, progress: bool | None = False,
             agents: Mapping[str, Policy] | None = None) -> dict[str, Any]:
    """One sweep cell (:class:`panning.sweep.Cell`): prune with its method, or the trained agent of that
    name in ``agents`` (label -> loaded policy), or keep dense; then train and evaluate."""
    from panning.sweep import DENSE

    method = cell.method
    c = cell_config(cfg, cell, _agent_paths(agents))
    s = setup(c, bundle)
    t0 = time.perf_counter()
    if method == DENSE:
        masks = Masks.ones(s.model, exclude=c.prune.exclude)
        summary = {"model": c.model, "dataset": c.dataset, "seed": c.seed, "method": DENSE, "sparsity": 0.0,
                   "effective_sparsity": 0.0, "seconds": time.perf_counter() - t0, "layers": masks.layer_density()}
        _config.dump(c, out / "config.yaml")
        masks.save(out / "masks.pt")
        write_json(out / "prune.json", {**summary, "target_sparsity": 0.0})
    else:
        policy = (agents or {}).get(method)
        result = prune_model(c, s, policy)
        masks = result.masks
        extra: dict[str, Any] = {"target_sparsity": cell.sparsity}
        if policy is not None and policy.info.get("sha256"):
            extra["policy_sha256"] = policy.info["sha256"]
        save_prune(out, c, s, result, extra=extra)
    return train_and_evaluate(c, s, masks, out, progress=progress, method=method)
