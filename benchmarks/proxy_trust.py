"""Can the reward be trusted where the agent decides? The proxy against full training on near-equal masks.

``proxy_correlation.py`` ranks masks of very different quality (random, collapsed, SynFlow), which is
easy. The agent chooses between masks within a point or two of each other at 98-99.5% sparsity. This
script builds such masks on one initialisation of the digits MLP, at each sparsity:

- the best single indices (SynFlow, SNIP, |GraSP|, FTS, magnitude), each over the env's T-step
  exponential schedule (what the relative reward's references are);
- the ``panning`` and ``panning_authors`` methods;
- ``--mixtures`` mixtures: Dirichlet(1) weights over SynFlow/SNIP/|GraSP| and a random step size
  b in [-1, 1] at every step, driven through the env's own episode core;
- the masks of every agent file given with ``--agents`` (applied to the same initialisation).

Ground truth never touches the test split: the training pool (digits: 1 347 images; ``--config``
picks another recipe, e.g. ``configs/mnist_lenet300.yaml`` with 60 000) is split once (stratified,
seed 123) into a **truth split** of ``--truth-size`` images and a study pool; every mask is fully
trained on the study pool (the config's recipe, ``--epochs`` to shorten it, ``--train-seeds``
training orders) and scored on the truth split. The proxy variants carve their validation split (``--val-sizes``)
from the study pool and train on the rest, for each budget in ``--budgets``; both the proxy's
validation accuracy and its (negated) validation loss are ranked.

Reported per sparsity: Spearman's rho between each proxy variant and the truth **among the masks within
3 points of the best mask** there (the issue's measure), and over all masks; and, as the ceiling any
proxy faces, the rho between two halves of the truth's own training seeds, and between the same trainings
read on two halves of the truth split's images (how far the truth's ranking rests on its own images, which
no proxy validating elsewhere can share). ``--folds`` adds K-fold proxies, ``--repeats`` a split's proxy
averaged over training seeds, ``--recipe`` proxies trained with the truth's epochs, batch size, learning
rate, momentum and decay (always cosine), ``--sparse`` a twin of every variant trained by the proxy's
sparse route. ``--truth-from`` reuses an earlier run's truth (the same masks; agents the earlier run had
may be left out) and runs only the proxies, to try new budgets and validation sizes. Run by hand, e.g.

    .venv/bin/python benchmarks/proxy_trust.py --agents shipped:default --json benchmarks/results/proxy_trust.json
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import multiprocessing as mp
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.stats import ConstantInputWarning, spearmanr
from sklearn.model_selection import train_test_split

from panning import config as _config
from panning.cli import OneLineParser, run_guarded
from panning.data import balanced_batch, load_dataset
from panning.episode import PruningEpisode
from panning.errors import UsageError
from panning.hashing import masks_digest
from panning.masks import Masks
from panning.models import build_model
from panning.policy import run_policy
from panning.proxy import SPARSE_MODELS, ProxyEvaluator, ProxySettings
from panning.pruner import Pruner, prune
from panning.schedules import keep_schedule
from panning.train import evaluate, train_masked

ROOT = Path(__file__).resolve().parents[1]
SINGLES = ["synflow", "snip", "grasp_abs", "fts", "magnitude"]
MIXED = ["synflow", "snip", "grasp_abs"]
WINDOW = 0.03  # "within 3 points of the best"

_JOBS: dict[str, Any] = {}  # what forked training workers read: the masks, the init, the data, the recipe


def _train_one(job: tuple[int, int]) -> tuple[int, int, float, float, float]:
    """(mask, seed, accuracy on the truth split, and on each of its two halves)."""
    i, seed = job
    torch.set_num_threads(1)
    net = copy.deepcopy(_JOBS["model"])
    train_masked(net, _JOBS["masks"][i], _JOBS["bundle"], _JOBS["train"], device="cpu", seed=seed, progress=False)
    classes = _JOBS["bundle"].num_classes
    acc = evaluate(net, _JOBS["bundle"].val, "cpu", classes)["accuracy"]
    a, b = (evaluate(net, half, "cpu", classes)["accuracy"] for half in _JOBS["halves"])
    return i, seed, float(acc), float(a), float(b)


def _proxy_one(job: tuple[str, int]) -> tuple[str, int, float, float, float]:
    """One variant's proxy of mask ``i``: its evaluators' accuracies and losses pooled over their validation
    examples (one evaluator, or R training seeds of one split for ``--repeats``; a K-fold proxy is one
    evaluator that pools its folds itself)."""
    key, i = job
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    acc = loss = 0.0
    total = 0
    for ev in _JOBS["evaluators"][key]:
        r = ev.evaluate(_JOBS["model"], _JOBS["masks"][i])
        n = ev.val_size
        acc, loss, total = acc + r.accuracy * n, loss + r.loss * n, total + n
    return key, i, acc / total, loss / total, time.perf_counter() - t0


def make_masks(model: torch.nn.Module, batches: list, input_shape: tuple, sparsities: list[float], steps: int,
               mixtures: int, agents: list[str], seed: int) -> list[tuple[str, float, Masks]]:
    out: list[tuple[str, float, Masks]] = []
    rng = np.random.default_rng(seed)
    policies = []
    if agents:
        from panning.agents.policy import load_policy

        policies = [(a, load_policy(a)) for a in agents]
    for s in sparsities:
        for name in SINGLES:
            p = Pruner(model, [name], batches, input_shape=input_shape, seed=seed)
            for keep in keep_schedule(p.num_total, s, steps, "exponential"):
                p.step([1.0], keep)
            out.append((name, s, p.masks))
        for method in ("panning", "panning_authors"):
            out.append((method, s, prune(model, method, s, batches, input_shape=input_shape, seed=seed).masks))
        for j in range(mixtures):
            ep = PruningEpisode(model, MIXED, batches, target_sparsity=s, steps=steps, input_shape=input_shape,
                                seed=seed)
            w = rng.dirichlet(np.ones(len(MIXED)))
            while not ep.done:
                ep.step(np.r_[2 * w - 1, rng.uniform(-1, 1)])
            out.append((f"mix{j}", s, ep.masks))
        for a, policy in policies:
            out.append((f"agent:{a if a.startswith('shipped:') else Path(a).parent.name}", s,
                        run_policy(policy, model, s, batches=batches, input_shape=input_shape, seed=seed).masks))
    return out


# what the masks and their truth depend on: an earlier study's truth is reused only if all of these agree
_TRUTH_ARGS = ("config", "epochs", "init_seed", "sparsities", "mixtures", "agents", "pruning_steps", "truth_size")


def _truth_source(args: argparse.Namespace, recipe: dict[str, Any]) -> dict[str, Any]:
    path = Path(args.truth_from)
    if not path.is_file():
        raise UsageError(f"--truth-from {path} does not exist; give the --json of an earlier run")
    try:
        prev = json.loads(path.read_text())
        old, masks = prev["args"], prev["masks"]
        if not (isinstance(old, dict) and isinstance(masks, list) and "full_seconds_per_run" in prev
                and all("truth" in m and "mask" in m for m in masks)):
            raise TypeError
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
        raise UsageError(f"--truth-from {path} is not the --json of a proxy_trust.py run") from None
    # fewer agents than the earlier run is fine (an agent file may be gone): their masks are left out
    differ = [f"--{k.replace('_', '-')} {old.get(k)!r} (here {getattr(args, k)!r})" for k in _TRUTH_ARGS
              if _same_path(k, old.get(k)) != _same_path(k, getattr(args, k))
              and not (k == "agents" and set(getattr(args, k)) <= set(old.get(k) or []))]
    if differ:
        raise UsageError(f"--truth-from {path} was run with {'; '.join(differ)}; its truth is not these masks'")
    if "recipe" in prev and prev["recipe"] != recipe:  # studies before the recipe was recorded: by path alone
        raise UsageError(f"--truth-from {path} trained with another recipe ({prev['recipe']}; here {recipe}): "
                         "the config file changed since")
    return prev


def _same_path(key: str, value: Any) -> Any:
    """A config path as the file it names, so a relative and an absolute spelling agree."""
    return str(Path(value).resolve()) if key == "config" and value else value


def rho(a: list[float], b: list[float]) -> float:
    """Spearman's rho; NaN (without scipy's warning) where one side is constant, e.g. one mask near the best."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConstantInputWarning)
        r = spearmanr(a, b).statistic
    return float(r) if np.isfinite(r) else float("nan")


def main(argv: list[str] | None = None) -> None:
    ap = OneLineParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sparsities", nargs="+", type=float, default=[0.98, 0.99, 0.995])
    ap.add_argument("--mixtures", type=int, default=8)
    ap.add_argument("--agents", nargs="*", default=[], help="agent files or shipped names whose masks join the set")
    ap.add_argument("--pruning-steps", type=int, default=10)
    ap.add_argument("--truth-size", type=int, default=400)
    ap.add_argument("--train-seeds", type=int, default=4)
    ap.add_argument("--val-sizes", nargs="+", type=int, default=[95, 250, 450])
    ap.add_argument("--budgets", nargs="+", type=int, default=[100, 200, 400, 800])
    ap.add_argument("--folds", nargs="*", type=int, default=[],
                    help="also K-fold proxies (ProxySettings.folds): K short trainings, each validating on one fold "
                         "of the study pool and training on the rest, pooled over all of it")
    ap.add_argument("--repeats", nargs="*", type=int, default=[],
                    help="also each validation split's proxy averaged over R training seeds (R times the cost, "
                         "the same validation images): what K folds cost, without their extra images")
    ap.add_argument("--recipe", action="store_true",
                    help="also proxies that train with the truth's epochs, batch size, learning rate, momentum and "
                         "decay (with a cosine schedule, whatever the recipe's) on the proxy's training split")
    ap.add_argument("--skip-changed", action="store_true",
                    help="with --truth-from: leave out the masks this run does not build bit for bit as the earlier "
                         "one did (another machine's rounding can flip a near tie), instead of refusing")
    ap.add_argument("--sparse", action="store_true",
                    help="also every proxy variant by the proxy's sparse route (ProxySettings.sparse; mlp and "
                         "lenet300), named with +sp")
    ap.add_argument("--init-seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=2, help="processes for the full trainings (1 thread each)")
    ap.add_argument("--epochs", type=int, default=None,
                    help="full-training epochs (default: the recipe's); a step schedule's milestones scale with them")
    ap.add_argument("--config", default=str(ROOT / "configs" / "digits_mlp.yaml"),
                    help="the model, data set and full-training recipe (default: the digits MLP)")
    ap.add_argument("--data-dir", default=None, help="where the data set's files are (default: $PANNING_DATA)")
    ap.add_argument("--json", help="write every number to this file")
    ap.add_argument("--truth-from", default=None,
                    help="take the full-training truth from this earlier --json run of the same masks (same config, "
                         "epochs, init seed, sparsities, mixtures, agents, steps, truth size) and only run the "
                         "proxies: new budgets and validation sizes against a truth that cost hours")
    args = ap.parse_args(argv)
    if any(k < 2 for k in args.folds) or any(r < 2 for r in args.repeats):
        raise UsageError(f"--folds and --repeats take counts >= 2, got {args.folds} and {args.repeats}")
    if args.skip_changed and not args.truth_from:
        raise UsageError("--skip-changed leaves out masks of a --truth-from run; give --truth-from too")
    torch.set_num_threads(1)

    cfg = _config.load(args.config)
    if args.sparse and cfg.model not in SPARSE_MODELS:  # before minutes of mask building, not after
        raise UsageError(f"--sparse: the proxy's sparse route trains {' and '.join(SPARSE_MODELS)} only, "
                         f"not {cfg.model}")
    if args.epochs is not None:
        changes: dict[str, Any] = {"train.epochs": args.epochs}
        if cfg.train.schedule == "step":
            changes["train.milestones"] = sorted({max(1, round(m * args.epochs / cfg.train.epochs))
                                                  for m in cfg.train.milestones})
        cfg = _config.override(cfg, changes)
    print(f"{cfg.model} on {cfg.dataset}: {cfg.train.epochs} epochs, schedule {cfg.train.schedule} "
          f"{list(cfg.train.milestones) if cfg.train.schedule == 'step' else ''}", flush=True)
    pool = load_dataset(cfg.dataset, data_dir=args.data_dir, val_size=0).train
    y = pool.y.numpy()
    study_idx, truth_idx = train_test_split(np.arange(len(y)), test_size=args.truth_size, stratify=y, random_state=123)
    study_idx, truth_idx = np.sort(study_idx), np.sort(truth_idx)
    study, truth = pool.subset(study_idx), pool.subset(truth_idx)
    # two stratified halves of the truth split: how far its ranking of the masks rests on its own images
    half_a, half_b = train_test_split(np.arange(len(truth_idx)), test_size=0.5, stratify=y[truth_idx], random_state=1)
    halves = (truth.subset(np.sort(half_a)), truth.subset(np.sort(half_b)))
    base = load_dataset(cfg.dataset, data_dir=args.data_dir)
    classes = base.num_classes
    full = dataclasses.replace(base, train=study, val=truth, test=truth)
    model = build_model(cfg.model, classes, base.input_shape, seed=args.init_seed, init=cfg.init)
    batches = [balanced_batch(study, cfg.prune.scoring_per_class, classes, seed=args.init_seed)]
    recipe = _config.to_dict(cfg.train)  # the full training the truth is; compared by --truth-from
    prev = _truth_source(args, recipe) if args.truth_from else None
    t0 = time.perf_counter()
    masks = make_masks(model, batches, base.input_shape, args.sparsities, args.pruning_steps, args.mixtures,
                       args.agents, args.init_seed)
    print(f"{len(masks)} masks in {time.perf_counter() - t0:.0f} s; study pool {len(study)}, truth split {len(truth)} "
          f"({100 / len(truth):.2f} points an image)", flush=True)

    digests = [masks_digest(m) for _, _, m in masks]
    # a variant is a list of evaluators whose validation results are pooled (_proxy_one)
    evaluators: dict[str, list[ProxyEvaluator]] = {}

    def proxy(pb: Any, steps: int | str, seed: int = 0, folds: int = 1, sparse: bool = False) -> ProxyEvaluator:
        if steps == "recipe":  # the truth's epochs, batch, lr, momentum and decay (cosine) on the proxy's split
            t = cfg.train
            return ProxyEvaluator(pb, cfg.model, epochs=t.epochs, batch_size=t.batch_size, lr=t.lr, momentum=t.momentum,
                                  weight_decay=t.weight_decay, seed=seed, folds=folds, device="cpu", cache_size=0,
                                  sparse=sparse)
        return ProxyEvaluator(pb, cfg.model, settings=ProxySettings(steps=int(steps), seed=seed, folds=folds,
                                                                    sparse=sparse), device="cpu", cache_size=0)

    budgets = [*args.budgets, *(["recipe"] if args.recipe else [])]
    splits = []  # each validation size's split, its data copied once for the dense variants and their +sp twins
    for v in args.val_sizes:
        tr, va = train_test_split(np.arange(len(study_idx)), test_size=v, stratify=y[study_idx], random_state=0)
        splits.append((v, dataclasses.replace(base, train=study.subset(np.sort(tr)), val=study.subset(np.sort(va)),
                                              test=truth)))
    for sp, tag in [(False, "")] + ([(True, "+sp")] if args.sparse else []):
        for n, (v, pb) in enumerate(splits):
            for b in budgets:
                evaluators[f"val{v}@{b}{tag}"] = [proxy(pb, b, sparse=sp)]
                for r in args.repeats:
                    evaluators[f"val{v}@{b}x{r}{tag}"] = [proxy(pb, b, seed=j, sparse=sp) for j in range(r)]
                if n == 0:  # the library's K-fold proxy pools this split's train and val again: the whole study pool
                    for k in args.folds:
                        evaluators[f"cv{k}@{b}{tag}"] = [proxy(pb, b, folds=k, sparse=sp)]
    skipped: list[str] = []  # masks of --truth-from left out by --skip-changed
    if prev is not None:
        by_name = {(m["mask"], m["sparsity"]): m for m in prev["masks"]}
        # studies written before the digests were recorded are matched by name alone
        kept = [by_name.get((n, s)) for n, s, _ in masks]
        same = [m is not None and m.get("digest", d) == d for m, d in zip(kept, digests, strict=True)]
        bad = [f"{n} at {s}" for (n, s, _), ok in zip(masks, same, strict=True) if not ok]
        if bad and not args.skip_changed:
            raise UsageError(f"--truth-from {args.truth_from}: its masks are not this run's ({len(bad)} differ in name "
                             f"or bits, e.g. {bad[0]}: the code that builds them changed, or another machine's "
                             "rounding?); run the full study, or leave them out with --skip-changed")
        if bad:  # built differently here: no truth for them
            skipped = bad
            print(f"  --skip-changed: left out {', '.join(bad)} (not built bit for bit as in --truth-from)", flush=True)
            keep = [i for i, ok in enumerate(same) if ok]
            masks, digests, kept = [masks[i] for i in keep], [digests[i] for i in keep], [kept[i] for i in keep]
            empty = [s for s in args.sparsities if not any(ms == s for _, ms, _ in masks)]
            if empty:
                raise UsageError(f"--skip-changed left no mask at sparsity {empty[0]}: nothing to rank there")
        if len(kept) < len(prev["masks"]):
            print(f"  --truth-from: {len(prev['masks']) - len(kept)} of its masks left out (agents not given here"
                  f"{', or built differently' if bad else ''})", flush=True)
        prev = {**prev, "masks": kept}
        truth_acc = np.array([m["truth"] for m in prev["masks"]], dtype=float)
        args.train_seeds = truth_acc.shape[1]
        # studies written before the halves were recorded have no image-half ceiling
        halves_acc = np.array([m.get("truth_halves", np.full((args.train_seeds, 2), np.nan).tolist())
                               for m in prev["masks"]], dtype=float)
        jobs: list[tuple[int, int]] = []  # the truth is known: no full training
    else:
        truth_acc = np.zeros((len(masks), args.train_seeds))
        halves_acc = np.zeros((len(masks), args.train_seeds, 2))
        jobs = [(i, s) for i in range(len(masks)) for s in range(args.train_seeds)]
    _JOBS.update(model=model, masks=[m for _, _, m in masks], bundle=full, train=cfg.train, evaluators=evaluators,
                 halves=halves)
    # The proxies go first: they are cheap, and the table's columns exist before the long trainings.
    proxy_jobs = [(k, i) for k in evaluators for i in range(len(masks))]
    proxies: dict[str, list[float]] = {f"{what} {k}": [0.0] * len(masks)
                                       for k in evaluators for what in ("acc", "loss")}
    spent: dict[str, float] = dict.fromkeys(evaluators, 0.0)
    with mp.get_context("fork").Pool(args.workers) as pool_:
        t0 = time.perf_counter()
        for k, i, acc, loss, sec in pool_.imap_unordered(_proxy_one, proxy_jobs):
            proxies[f"acc {k}"][i], proxies[f"loss {k}"][i] = acc, -loss
            spent[k] += sec
        print(f"  {len(proxy_jobs)} proxy runs in {time.perf_counter() - t0:.0f} s", flush=True)
        t0 = time.perf_counter()
        for n, (i, s, acc, a, b) in enumerate(pool_.imap_unordered(_train_one, jobs), 1):
            truth_acc[i, s] = acc
            halves_acc[i, s] = a, b
            if n % 20 == 0:
                print(f"  full training {n}/{len(jobs)} ({time.perf_counter() - t0:.0f} s)", flush=True)
    full_seconds = (time.perf_counter() - t0) * args.workers / len(jobs) if jobs else prev["full_seconds_per_run"]
    proxy_seconds = {k: v / len(masks) for k, v in spent.items()}

    mean = truth_acc.mean(1)
    half = args.train_seeds // 2
    table = []
    for s in args.sparsities:
        rows = [i for i, (_, sp, _) in enumerate(masks) if sp == s]
        best = max(mean[i] for i in rows)
        near = [i for i in rows if mean[i] >= best - WINDOW]
        entry: dict[str, Any] = {"sparsity": s, "masks": len(rows), "near": len(near),
                                 "near_names": [masks[i][0] for i in near], "best": float(best)}
        if half:
            entry["ceiling_near"] = rho(list(truth_acc[near, :half].mean(1)), list(truth_acc[near, half:].mean(1)))
        # the same trainings read on two disjoint halves of the truth's images: a proxy validating on other
        # images cannot agree with the truth much better than the truth agrees with itself here
        entry["image_ceiling_near"] = rho(list(halves_acc[near, :, 0].mean(1)), list(halves_acc[near, :, 1].mean(1)))
        entry["rho_near"] = {k: rho([p[i] for i in near], [mean[i] for i in near]) for k, p in proxies.items()}
        entry["rho_all"] = {k: rho([p[i] for i in rows], [mean[i] for i in rows]) for k, p in proxies.items()}
        table.append(entry)

    print(f"\nfull training: {full_seconds:.1f} s a run; truth = mean of {args.train_seeds} seeds on the truth split")
    for e in table:
        print(f"\nsparsity {e['sparsity']}: {e['near']} of {e['masks']} masks within 3 points of the best "
              f"({100 * e['best']:.2f}); seed-half ceiling rho {e.get('ceiling_near', float('nan')):.2f}, "
              f"image-half {e['image_ceiling_near']:.2f}")
        print("  " + ", ".join(f"{masks_name}" for masks_name in e["near_names"]))
    keys = list(proxies)
    width = max(18, *(len(k) for k in proxies))
    print(f"\n{'proxy':<{width}} {'s/mask':>7} " + " ".join(f"{'near@' + str(e['sparsity']):>11}" for e in table)
          + " " + " ".join(f"{'all@' + str(e['sparsity']):>10}" for e in table) + f" {'near mean':>9}")
    for k in keys:
        near = [e["rho_near"][k] for e in table]
        # too few near masks at every sparsity gives no rho at all: say nan, not numpy's empty-slice warning
        near_mean = float(np.nanmean(near)) if any(r == r for r in near) else float("nan")
        print(f"{k:<{width}} {proxy_seconds[k.split(' ')[1]]:>7.2f} " + " ".join(f"{r:>11.2f}" for r in near) + " "
              + " ".join(f"{e['rho_all'][k]:>10.2f}" for e in table) + f" {near_mean:>9.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "args": vars(args), "recipe": recipe, "full_seconds_per_run": full_seconds,
            "proxy_seconds_per_mask": proxy_seconds,
            "masks": [{"mask": n, "sparsity": s, "digest": digests[i], "truth": truth_acc[i].tolist(),
                       "truth_halves": halves_acc[i].tolist(),
                       "proxy": {k: p[i] for k, p in proxies.items()}} for i, (n, s, _) in enumerate(masks)],
            "table": table, "skipped": skipped,
        }, indent=2))


if __name__ == "__main__":
    # bad flags or files: one line and exit 2, as the panning command does; a bug keeps its traceback
    raise SystemExit(run_guarded(main, Path(__file__).name))
