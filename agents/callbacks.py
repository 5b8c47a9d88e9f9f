"""Stable-Baselines3 callbacks of agent training: logging, checkpoints, evaluation, saving the best.

- :class:`EpisodeLogger` records what each training episode chose and got (``policy/*``,
  ``episode/*`` in TensorBoard) and adds a custom-scalars layout (:data:`CUSTOM_SCALARS`);
- :class:`CheckpointKeepLast` is SB3's ``CheckpointCallback`` keeping only the newest checkpoints;
- :class:`ComparisonEval` is SB3's ``EvalCallback`` on fixed held-out episodes, with the fixed
  methods' proxy accuracies on the same episodes beside the agent's;
- :class:`SaveBest` (called by :class:`ComparisonEval` on a new best) saves the policy with
  panning's metadata.
"""
from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from stable_baselines3.common.callbacks import BaseCallback, CheckpointCallback, EvalCallback
from stable_baselines3.common.logger import Figure, TensorBoardOutputFormat

from panning.agents.policy import save_agent
from panning.envs.panning_env import clamped_loss, loss_gain
from panning.envs.wrappers import FixedEpisodes
from panning.episode import LAYER_FACTOR_BASE
from panning.io import write_json

__all__ = ["CKPT_PREFIX", "CUSTOM_SCALARS", "CheckpointKeepLast", "ComparisonEval", "EpisodeLogger", "SaveBest",
           "checkpoints"]

CKPT_PREFIX = "ppo"

CUSTOM_SCALARS = {
    "panning": {
        "eval: proxy accuracy, agent vs fixed methods": [
            "Multiline", [r"eval/agent_proxy_accuracy", r"eval/fixed_.*_proxy_accuracy"]],
        "eval: agent minus best single index": ["Multiline", [r"eval/agent_minus_best_single", r"eval/mean_reward"]],
        "training episodes: proxy accuracy vs reference": [
            "Multiline", [r"episode/proxy_accuracy", r"episode/reference_accuracy"]],
        "training episodes: proxy loss vs reference (reward: relative_loss)": [
            "Multiline", [r"episode/proxy_loss", r"episode/reference_loss", r"episode/loss_gain"]],
        "index weights (mean over steps)": ["Multiline", [r"policy/weight_.*"]],
        "step share of the remaining budget, by step": ["Multiline", [r"policy/step.._share"]],
        "sparsity": ["Multiline", [r"episode/final_sparsity", r"episode/effective_sparsity"]],
    }
}


def density_heatmap(runs: list[list[dict[str, float]]], episodes: list[tuple[float, int]]) -> Any:
    """A matplotlib figure: per evaluation episode, log10 of each layer's density (rows) after each pruning
    step (columns), the policy's per-layer schedule at a glance."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(runs)
    fig, axes = plt.subplots(1, n, figsize=(3.2 * n + 1, 3.2), squeeze=False)
    image = None
    for ax, run, (target, seed) in zip(axes[0], runs, episodes, strict=False):
        layers = list(run[0]) if run else []
        grid = np.array([[max(step[k], 1e-6) for step in run] for k in layers]) if run else np.zeros((1, 1))
        image = ax.imshow(np.log10(grid), aspect="auto", cmap="viridis", vmin=-3, vmax=0, interpolation="nearest")
        ax.set_title(f"target {100 * target:g}%, init {seed}", fontsize=8)
        ax.set_xlabel("pruning step", fontsize=8)
        ax.set_xticks(range(grid.shape[1]), [str(i + 1) for i in range(grid.shape[1])], fontsize=6)
        ax.set_yticks(range(len(layers)), layers, fontsize=6)
    if image is not None:
        fig.colorbar(image, ax=axes[0].tolist(), label="log10 layer density")
    return fig


def checkpoints(folder: Path) -> list[tuple[int, Path]]:
    """Checkpoints in ``folder`` sorted by timesteps (oldest first)."""
    found = []
    for p in folder.glob(f"{CKPT_PREFIX}*_steps.zip"):
        m = re.search(r"_(\d+)_steps\.zip$", p.name)
        if m:
            found.append((int(m.group(1)), p))
    return sorted(found)


class EpisodeLogger(BaseCallback):
    """Records, through ``logger.record_mean``, what each training episode chose and got; adds a
    TensorBoard custom-scalars layout that overlays related curves (agent vs fixed methods, ...)."""

    def _on_training_start(self) -> None:
        for fmt in self.logger.output_formats:
            if isinstance(fmt, TensorBoardOutputFormat):
                fmt.writer.add_custom_scalars(CUSTOM_SCALARS)

    def _on_step(self) -> bool:
        for info, done in zip(self.locals["infos"], self.locals["dones"], strict=True):
            if "index_weights" in info:
                w = info["index_weights"]
                total = sum(w.values()) or 1.0
                step = int(info["step"])
                for name, v in w.items():
                    self.logger.record_mean(f"policy/step{step:02d}_weight_{name}", v / total)
                    self.logger.record_mean(f"policy/weight_{name}", v / total)
                self.logger.record_mean(f"policy/step{step:02d}_share", info["step_share"])
                for layer, f in enumerate(info.get("layer_factors") or ()):
                    # the layer's interpolated action term m_l in [-1, 1] (its factor is LAYER_FACTOR_BASE**m_l)
                    self.logger.record_mean(f"policy/layer{layer:02d}_term", math.log(f, LAYER_FACTOR_BASE))
            if done and "sparsity" in info:
                self.logger.record_mean("episode/final_sparsity", info["sparsity"])
                self.logger.record_mean("episode/effective_sparsity", info["effective_sparsity"])
                self.logger.record_mean("episode/collapse", float(bool(info.get("collapse"))))
                if "proxy_accuracy" in info:
                    self.logger.record_mean("episode/proxy_accuracy", info["proxy_accuracy"])
                    self.logger.record_mean("episode/proxy_seconds", info["proxy_seconds"])
                if "reference_accuracy" in info:
                    self.logger.record_mean("episode/reference_accuracy", info["reference_accuracy"])
                    self.logger.record_mean("episode/minus_reference",
                                            info["proxy_accuracy"] - info["reference_accuracy"])
                if "reference_loss" in info:  # the clamped loss: one diverged run would make a window's mean inf
                    self.logger.record_mean("episode/proxy_loss", clamped_loss(info["proxy_loss"]))
                    self.logger.record_mean("episode/reference_loss", info["reference_loss"])
                    self.logger.record_mean("episode/loss_gain", loss_gain(info["reference_loss"], info["proxy_loss"]))
        return True


class CheckpointKeepLast(CheckpointCallback):
    """SB3's CheckpointCallback, deleting all but the newest ``keep`` periodic checkpoints."""

    def __init__(self, *args: Any, keep: int = 3, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.keep = keep

    def _on_step(self) -> bool:
        out = super()._on_step()
        if self.keep:
            for old in checkpoints(Path(self.save_path))[: -self.keep]:
                old[1].unlink(missing_ok=True)
        return out


class SaveBest(BaseCallback):
    """Called by an EvalCallback on a new best: saves the policy with panning's metadata."""

    def __init__(self, path: Path, meta: Callable[[], dict[str, Any]], state: Path) -> None:
        super().__init__()
        self.path, self.meta, self.state = path, meta, state

    def _on_step(self) -> bool:
        best = float(self.parent.best_mean_reward)  # type: ignore[union-attr]
        save_agent(self.model, self.path, self.meta() | {"eval_mean_reward": best})
        write_json(self.state, {"best_mean_reward": best, "timesteps": self.num_timesteps})
        return True


class ComparisonEval(EvalCallback):
    """SB3's EvalCallback (deterministic; keeps the best policy) on fixed held-out episodes, plus
    the policy's proxy accuracy beside the fixed methods' at the same targets and seeds."""

    def __init__(self, eval_env: Any, fixed: FixedEpisodes, baselines: Callable[[float, int], dict[str, float]],
                 record: Path, log: Callable[[str], None], total: int, **kwargs: Any) -> None:
        super().__init__(eval_env, n_eval_episodes=len(fixed.episodes), deterministic=True, **kwargs)
        self.fixed, self.baselines, self.record_path, self.log, self.total = fixed, baselines, record, log, total
        self.finals: list[dict[str, Any]] = []
        self.densities: list[list[dict[str, float]]] = []  # per eval episode, per step: {layer: density}
        self._episode: list[dict[str, float]] = []
        self.history: list[dict[str, Any]] = json.loads(record.read_text()) if record.is_file() else []
        self.t0 = time.perf_counter()
        self.start_steps: int | None = None

    def _log_success_callback(self, locals_: dict[str, Any], globals_: dict[str, Any]) -> None:
        super()._log_success_callback(locals_, globals_)
        info = locals_["info"]
        if "layer_density" in info:
            self._episode.append(dict(info["layer_density"]))
        if locals_["done"]:
            self.finals.append(dict(info))
            self.densities.append(self._episode)
            self._episode = []

    def _on_step(self) -> bool:
        if self.start_steps is None:
            self.start_steps = self.num_timesteps
        due = self.eval_freq > 0 and self.n_calls % self.eval_freq == 0
        if due:
            self.fixed.restart()
            self.finals, self.densities, self._episode = [], [], []
        go_on = super()._on_step()
        if due:
            self._compare()
        return go_on

    def _compare(self) -> None:
        rows = []
        for (target, init), info in zip(self.fixed.episodes, self.finals, strict=False):
            row = {"target": target, "init_seed": init, "agent": info.get("proxy_accuracy", 0.0),
                   "collapse": bool(info.get("collapse")), "reference": info.get("reference_accuracy")}
            if "reference_loss" in info:  # reward: relative_loss; what rebuilds each episode's reward
                row.update(agent_loss=info["proxy_loss"], reference_loss=info["reference_loss"])
            row.update(self.baselines(target, init))
            rows.append(row)

        def mean(k: str) -> float:
            return float(np.mean([r[k] for r in rows if r.get(k) is not None]))

        self.logger.record("eval/agent_proxy_accuracy", mean("agent"))
        methods = sorted({k for r in rows for k in r if k.startswith("fixed_")})
        for m in methods:
            self.logger.record(f"eval/{m}_proxy_accuracy", mean(m))
        singles = [m for m in methods if m != "fixed_panning"]
        if singles:
            best_single = float(np.mean([max(r[m] for m in singles) for r in rows]))
            self.logger.record("eval/best_single_proxy_accuracy", best_single)
            self.logger.record("eval/agent_minus_best_single", mean("agent") - best_single)
        if any(r["reference"] is not None for r in rows):
            self.logger.record("eval/reference_proxy_accuracy", mean("reference"))
        if self.densities:
            self.logger.record("eval/layer_density", Figure(density_heatmap(self.densities, self.fixed.episodes),
                                                            close=True), exclude=("stdout", "log", "json", "csv"))
        self.logger.dump(self.num_timesteps)
        self.history.append({"timesteps": self.num_timesteps, "mean_reward": self.last_mean_reward, "episodes": rows})
        write_json(self.record_path, self.history)
        done = self.num_timesteps - (self.start_steps or 0)
        rate = done / max(time.perf_counter() - self.t0, 1e-9)
        left = (self.total - self.num_timesteps) / rate if rate > 0 else float("nan")
        fixed = "  ".join(f"{m[6:]} {100 * mean(m):.2f}" for m in methods)
        self.log(f"[{self.num_timesteps}/{self.total} steps] eval proxy accuracy: agent {100 * mean('agent'):.2f}  "
                 f"{fixed}  (best so far {self.best_mean_reward:+.4f} reward; {rate:.1f} steps/s, "
                 f"~{left / 60:.0f} min left)")
