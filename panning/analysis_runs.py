"""The analyses of :mod:`panning.analysis` as runs that prune, train and write a folder each.

Every function writes a JSON file, a markdown table and a plot into its output folder and returns
the JSON's content; the ``panning`` command's ``sanity``, ``collapse``, ``recall`` and
``instability`` call them. Sanity checks resume: a finished training (its ``metrics.json``) is not
redone when the same command runs again on the same folder.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import statistics
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from panning import analysis
from panning import config as _config
from panning.config import RunConfig
from panning.connectivity import effective_masks
from panning.data import DataBundle, load_dataset
from panning.errors import RunDirError
from panning.io import atomic_path, write_json, write_text
from panning.masks import Masks
from panning.models import build_model, reinit_weights
from panning.policy import Policy
from panning.pruner import Pruner, get_method, prune
from panning.runs import load_checkpoint, prune_model, scoring_batches, setup, train_and_evaluate
from panning.train import evaluate

__all__ = ["VARIANTS", "collapse_study", "first_step_scores", "instability_study", "recall_study", "sanity_checks"]

VARIANTS = ("original", "shuffled", "reinit", "inverted")


def _mean_std(v: Sequence[float]) -> tuple[float, float]:
    return (statistics.fmean(v), statistics.stdev(v) if len(v) > 1 else 0.0) if v else (float("nan"), float("nan"))


def first_step_scores(cfg: RunConfig, model: nn.Module, batches: list, input_shape: Sequence[int],
                      weights: dict[str, float] | None = None) -> dict[str, torch.Tensor]:
    """The combined scores a method ranks the dense network by at its first step (the method's own
    index weights at sparsity 0, or ``weights``, e.g. a policy's first step): what the inverted
    sanity check ranks by. For one-step methods these are the scores that chose the mask."""
    m = get_method(cfg.prune.method) if weights is None else None
    indices = list(weights) if weights is not None else list(m.indices)  # type: ignore[union-attr]
    w = weights if weights is not None else dict(zip(indices, m.weights(0.0), strict=True))  # type: ignore[union-attr]
    p = Pruner(model, indices, batches, input_shape=input_shape, exclude=cfg.prune.exclude,
               normalisation=cfg.prune.normalisation, seed=cfg.seed)
    return p.combined_scores({k: v for k, v in w.items() if k in indices})


def _bar_chart(summary: dict[str, Any], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    means = [100 * summary[v]["mean"] for v in VARIANTS]
    stds = [100 * summary[v]["std"] for v in VARIANTS]
    ax.bar(VARIANTS, means, yerr=stds, capsize=4, color=["#4c72b0", "#55a868", "#8172b2", "#c44e52"])
    for i, v in enumerate(VARIANTS):
        ax.scatter([i] * len(summary[v]["per_seed"]), [100 * a for a in summary[v]["per_seed"]], color="k", s=10,
                   zorder=3)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title)
    lo = min(m - s for m, s in zip(means, stds, strict=True))
    ax.set_ylim(max(0.0, lo - 5), 100)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120)
    plt.close(fig)


def sanity_checks(cfg: RunConfig, seeds: Sequence[int], out: Path, *, policy: Policy | None = None,
                  masks: Masks | None = None, bundle: DataBundle | None = None,
                  progress: bool | None = False) -> dict[str, Any]:
    """Frankle et al.'s sanity checks of ``cfg``'s method (or ``policy``) at its sparsity, over ``seeds``.

    Per seed the network initialised with that seed is pruned (or ``masks``, from a prune run, are
    taken as they are), then four networks are trained with ``cfg.train``: the ``original`` mask on
    the initial weights; the mask ``shuffled`` within each layer; the original mask on freshly
    ``reinit``-ialised weights; and the ``inverted`` mask (per layer the lowest-scored weights, see
    :func:`first_step_scores`). Writes ``out/sanity.json`` (each variant's per-seed and mean ± std
    test accuracy, and the paired comparison of each with ``original``), ``sanity.md``,
    ``sanity.png``, and the layer statistics of the kept weights (``layers.json``, ``layers.md``,
    ``layers.png``) of every variant, seed by seed; a training's folder is ``out/seed<k>/<variant>``.
    """
    out.mkdir(parents=True, exist_ok=True)
    spec = {"config": _config.to_dict(cfg), "seeds": list(seeds), "policy": (policy.info if policy else None),
            "masks_given": masks is not None}
    spec_path = out / "sanity_config.json"
    if spec_path.is_file() and json.loads(spec_path.read_text()) != json.loads(json.dumps(spec, default=str)):
        raise RunDirError(f"{out} holds sanity checks of another setting; choose another --out")
    write_json(spec_path, json.loads(json.dumps(spec, default=str)))
    bundle = bundle or load_dataset(cfg.dataset, cfg.data_dir, download=cfg.download, seed=cfg.split_seed)
    acc: dict[str, list[float]] = {v: [] for v in VARIANTS}
    layers: dict[str, Any] = {}
    for seed in seeds:
        c = dataclasses.replace(cfg, seed=int(seed))
        s = setup(c, bundle)
        init = {k: v.detach().clone() for k, v in s.model.state_dict().items()}
        if masks is None:
            result = prune_model(c, s, policy)
            original = result.masks
            step1 = result.extra.get("policy", {}).get("steps", [{}])[0].get("weights") if policy else None
        else:
            masks.check(s.model)
            original, step1 = masks.to(s.device), None
        scores = first_step_scores(c, s.model, scoring_batches(c, s.bundle, s.device), s.bundle.input_shape, step1)
        variant_masks = {"original": original, "shuffled": analysis.shuffle_within_layers(original, 10_000 + seed),
                         "reinit": original, "inverted": analysis.invert_within_layers(original, scores)}
        seed_layers: dict[str, Any] = {}
        for v in VARIANTS:
            model = build_model(c.model, bundle.num_classes, bundle.input_shape, seed=c.seed, init=c.init)
            model.load_state_dict(init)
            if v == "reinit":
                reinit_weights(model, c.init, c.seed)
            weights = analysis.prunable_weights(model, variant_masks[v])
            seed_layers[v] = analysis.layer_statistics(weights, variant_masks[v])
            d = out / f"seed{seed}" / v
            if not (d / "metrics.json").is_file():
                model.to(s.device)
                sv = dataclasses.replace(s, model=model)
                # reinit is done above: the training config must not redraw the weights again
                train_and_evaluate(dataclasses.replace(c, reinit=False), sv, variant_masks[v], d, progress=progress,
                                   method=f"{c.prune.method}/{v}")
            acc[v].append(json.loads((d / "metrics.json").read_text())["test_accuracy"])
        layers[f"seed{seed}"] = seed_layers
    summary: dict[str, Any] = {"method": cfg.prune.method, "sparsity": cfg.prune.sparsity, "model": cfg.model,
                               "dataset": cfg.dataset, "seeds": list(seeds)}
    for v in VARIANTS:
        mean, std = _mean_std(acc[v])
        summary[v] = {"per_seed": acc[v], "mean": mean, "std": std}
    summary["comparison"] = {v: analysis.paired_comparison(acc["original"], acc[v]) for v in VARIANTS[1:]}
    write_json(out / "sanity.json", summary)
    write_json(out / "layers.json", layers)
    title = f"{cfg.prune.method} at {100 * cfg.prune.sparsity:g}% ({cfg.dataset}/{cfg.model}, {len(seeds)} seeds)"
    lines = [f"# Sanity checks: {title}", "", "| variant | test accuracy (%) | minus original (points) | paired t |",
             "|---|---|---|---|"]
    for v in VARIANTS:
        cmp = summary["comparison"].get(v)
        diff = "" if cmp is None else f"{100 * cmp['mean_difference']:+.2f} ± {100 * cmp['std_difference']:.2f}"
        t = "" if cmp is None else f"{cmp['t']:.2f}"
        lines.append(f"| {v} | {100 * summary[v]['mean']:.2f} ± {100 * summary[v]['std']:.2f} | {diff} | {t} |")
    lines += ["", layer_table(layers)]
    write_text(out / "sanity.md", "\n".join(lines) + "\n")
    _bar_chart(summary, out / "sanity.png", title)
    _layer_plot(layers, out / "layers.png", title)
    return summary


def layer_table(layers: dict[str, Any]) -> str:
    """Markdown: per layer and variant, density and the kept weights' mean |w| and KS distance (mean over seeds)."""
    seeds = list(layers)
    first = layers[seeds[0]]
    rows = ["| layer | variant | density | mean |w| kept | std kept | KS to the layer's init |",
            "|---|---|---|---|---|---|"]
    for k in first["original"]:
        for v in VARIANTS:
            vals = {f: statistics.fmean(layers[s][v][k][f] for s in seeds)
                    for f in ("density", "mean_abs", "std", "ks")}
            rows.append(f"| {k} | {v} | {vals['density']:.4f} | {vals['mean_abs']:.4f} | {vals['std']:.4f} | "
                        f"{vals['ks']:.3f} |")
    return "\n".join(rows)


def _layer_plot(layers: dict[str, Any], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seeds = list(layers)
    names = list(layers[seeds[0]]["original"])
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for v in VARIANTS:
        ks = [statistics.fmean(layers[s][v][k]["ks"] for s in seeds) for k in names]
        ma = [statistics.fmean(layers[s][v][k]["mean_abs"] for s in seeds) for k in names]
        axes[0].plot(range(len(names)), ks, marker="o", label=v)
        axes[1].plot(range(len(names)), ma, marker="o", label=v)
    for ax, lab in zip(axes, ("KS statistic, kept vs the layer's initial weights", "mean |w| of the kept weights"),
                       strict=True):
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=45, ha="right", fontsize=7)
        ax.set_title(lab, fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------------------------ collapse


def collapse_study(cfgs: Sequence[RunConfig], methods: Sequence[str], sparsities: Sequence[float], out: Path,
                   tol: float = 0.02) -> dict[str, Any]:
    """Per model (one run config each) and method: effective sparsity at each nominal sparsity, and the
    critical sparsity (the largest at which a path from input to output survives; bisection in
    log-density to ``tol``), with the critical compression ``1 / (1 - s)``. Writes collapse.json,
    collapse.md and collapse.png."""
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {}
    for cfg in cfgs:
        bundle = load_dataset(cfg.dataset, cfg.data_dir, download=cfg.download, seed=cfg.split_seed)
        s = setup(cfg, bundle)
        batches = scoring_batches(cfg, bundle, s.device)
        key = f"{cfg.model}/{cfg.dataset}"
        results[key] = {}
        for m in methods:
            eff = functools.partial(_effective, s.model, m, batches, bundle.input_shape, cfg)
            curve = [{"sparsity": sp, "effective_sparsity": eff(sp)} for sp in sparsities]
            crit = analysis.critical_sparsity(functools.partial(_collapses, eff), tol=tol)
            results[key][m] = {"curve": curve, "critical_sparsity": crit, "critical_compression": 1 / (1 - crit)}
    write_json(out / "collapse.json", results)
    lines = ["| model / data | method | critical sparsity | critical compression | effective at "
             + ", ".join(f"{100 * sp:g}%" for sp in sparsities) + " |", "|---|---|---|---|---|"]
    for key, per in results.items():
        for m, r in per.items():
            effs = ", ".join(f"{100 * c['effective_sparsity']:.2f}" for c in r["curve"])
            lines.append(f"| {key} | {m} | {100 * r['critical_sparsity']:.3f}% | {r['critical_compression']:.0f}x | "
                         f"{effs} |")
    write_text(out / "collapse.md", "\n".join(lines) + "\n")
    _collapse_plot(results, out / "collapse.png")
    return results


def _effective(model: nn.Module, method: str, batches: list, input_shape: Sequence[int], cfg: RunConfig,
               sparsity: float) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # collapse is what is measured here
        return prune(model, method, sparsity, batches, input_shape=input_shape, exclude=cfg.prune.exclude,
                     seed=cfg.seed).effective_sparsity


def _collapses(effective: Any, sparsity: float) -> bool:
    return bool(effective(sparsity) >= 1.0)


def _collapse_plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 4), squeeze=False)
    for ax, (key, per) in zip(axes[0], results.items(), strict=True):
        for m, r in per.items():
            xs = [1 - c["sparsity"] for c in r["curve"]]
            ys = [max(1 - c["effective_sparsity"], 1e-7) for c in r["curve"]]
            ax.plot(xs, ys, marker="o", label=f"{m} (critical {100 * r['critical_sparsity']:.2f}%)")
        ax.plot(xs, xs, color="grey", ls="--", lw=1, label="no ineffective weights")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.invert_xaxis()
        ax.set_xlabel("nominal density")
        ax.set_ylabel("effective density (1e-7: collapsed)")
        ax.set_title(key)
        ax.legend(fontsize=6)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120)
    plt.close(fig)


# -------------------------------------------------------------------------------------------- recall


def recall_study(sweep_dir: Path, out: Path) -> dict[str, Any]:
    """Recall distortion over a finished sweep: every pruned cell against the dense cell of its seed
    (:func:`panning.analysis.recall_distortion`); per method and sparsity the mean intensification
    ratio and Spearman rho over seeds. Writes recall.json, recall.md and recall.png."""
    cells = sorted((sweep_dir / "cells").glob("*/metrics.json"))
    if not cells:
        raise RunDirError(f"{sweep_dir} holds no finished sweep cells (cells/*/metrics.json)")
    metrics = [json.loads(p.read_text()) for p in cells]
    dense = {m["seed"]: m for m in metrics if m["method"] == "dense"}
    if not dense:
        raise RunDirError(f"{sweep_dir} has no dense cells: recall distortion compares with the dense network")
    groups: dict[tuple[str, float], list[dict[str, Any]]] = {}
    for m in metrics:
        if m["method"] == "dense" or m["seed"] not in dense:
            continue
        d = dense[m["seed"]]
        r = analysis.recall_distortion(d["per_class_recall"], d["test_accuracy"], m["per_class_recall"],
                                       m["test_accuracy"])
        groups.setdefault((m["method"], round(float(m["sparsity"]), 4)), []).append({"seed": m["seed"], **r})
    summary: list[dict[str, Any]] = []
    for (method, sp), rs in sorted(groups.items()):
        ratios = [r["intensification_ratio"] for r in rs if not math.isnan(r["intensification_ratio"])]
        rhos = [r["rho"] for r in rs if not math.isnan(r["rho"])]
        summary.append({"method": method, "sparsity": sp, "n": len(rs),
                        "intensification_ratio": statistics.fmean(ratios) if ratios else float("nan"),
                        "rho": statistics.fmean(rhos) if rhos else float("nan"),
                        "relative_accuracy_change": statistics.fmean(r["relative_accuracy_change"] for r in rs),
                        "per_seed": rs})
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "recall.json", summary)
    lines = ["| method | sparsity | seeds | accuracy change (relative) | intensification ratio | Spearman rho |",
             "|---|---|---|---|---|---|"]
    for s in summary:
        lines.append(f"| {s['method']} | {100 * s['sparsity']:g}% | {s['n']} | "
                     f"{100 * s['relative_accuracy_change']:+.2f}% | {s['intensification_ratio']:.2f} | "
                     f"{s['rho']:+.2f} |")
    write_text(out / "recall.md", "\n".join(lines) + "\n")
    _recall_plot(summary, out / "recall.png")
    return {"groups": summary}


def _recall_plot(summary: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sps = sorted({s["sparsity"] for s in summary})
    fig, axes = plt.subplots(1, len(sps), figsize=(4.5 * len(sps), 4), squeeze=False)
    for ax, sp in zip(axes[0], sps, strict=True):
        for s in [s for s in summary if s["sparsity"] == sp]:
            xs = [c["dense_recall"] for r in s["per_seed"] for c in r["classes"]]
            ys = [100 * c["relative_change"] for r in s["per_seed"] for c in r["classes"]]
            ax.scatter(xs, ys, s=8, label=s["method"])
        ax.axhline(0, color="grey", lw=1)
        ax.set_xlabel("dense recall of the class")
        ax.set_ylabel("recall change, relative to dense (%)")
        ax.set_title(f"{100 * sp:g}% sparsity")
        ax.legend(fontsize=6)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120)
    plt.close(fig)


def instability_study(cfg: RunConfig, checkpoint: Path, methods: Sequence[str], sparsities: Sequence[float],
                      out: Path) -> dict[str, Any]:
    """Pruning instability (Bartoldson et al., 2020): the test-accuracy drop right after pruning the
    trained network of ``checkpoint`` with each method at each sparsity, before any retraining (the
    indices score the trained weights). Writes instability.json, instability.md and instability.png."""
    out.mkdir(parents=True, exist_ok=True)
    bundle = load_dataset(cfg.dataset, cfg.data_dir, download=cfg.download, seed=cfg.split_seed)
    s = setup(cfg, bundle)
    load_checkpoint(checkpoint, s.model)
    s.model.to(s.device)
    base = evaluate(s.model, bundle.test, s.device, bundle.num_classes)["accuracy"]
    batches = scoring_batches(cfg, bundle, s.device)
    rows = []
    for m in methods:
        for sp in sparsities:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                r = prune(s.model, m, sp, batches, input_shape=bundle.input_shape, exclude=cfg.prune.exclude,
                          seed=cfg.seed)
            pruned = build_model(cfg.model, bundle.num_classes, bundle.input_shape, seed=cfg.seed, init=cfg.init)
            pruned.load_state_dict(s.model.state_dict())
            r.masks.apply_(pruned)
            acc = evaluate(pruned.to(s.device), bundle.test, s.device, bundle.num_classes)["accuracy"]
            eff = effective_masks(pruned, r.masks, bundle.input_shape)
            rows.append({"method": m, "sparsity": sp, "test_accuracy_before": base, "test_accuracy_after": acc,
                         "instability": base - acc, "effective_sparsity": 1 - eff.num_kept / eff.num_total})
    result = {"checkpoint": str(checkpoint), "model": cfg.model, "dataset": cfg.dataset, "dense_test_accuracy": base,
              "rows": rows}
    write_json(out / "instability.json", result)
    lines = [f"Trained network: {100 * base:.2f}% test accuracy ({checkpoint}).", "",
             "| method | " + " | ".join(f"{100 * sp:g}%" for sp in sparsities) + " |",
             "|---|" + "---|" * len(sparsities)]
    for m in methods:
        cells = [next(r for r in rows if r["method"] == m and r["sparsity"] == sp) for sp in sparsities]
        lines.append(f"| {m} | " + " | ".join(f"{100 * c['instability']:.2f} ({100 * c['test_accuracy_after']:.1f}%)"
                                              for c in cells) + " |")
    write_text(out / "instability.md", "Instability: test-accuracy points lost right after pruning "
               "(accuracy after pruning in brackets).\n\n" + "\n".join(lines) + "\n")
    _instability_plot(result, methods, sparsities, out / "instability.png")
    return result


def _instability_plot(result: dict[str, Any], methods: Sequence[str], sparsities: Sequence[float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for m in methods:
        ys = [100 * next(r for r in result["rows"] if r["method"] == m and r["sparsity"] == sp)["instability"]
              for sp in sparsities]
        ax.plot([100 * sp for sp in sparsities], ys, marker="o", label=m)
    ax.set_xlabel("sparsity (%)")
    ax.set_ylabel("instability (test-accuracy points lost)")
    ax.set_title(f"{result['model']}/{result['dataset']}: pruning the trained network")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120)
    plt.close(fig)
