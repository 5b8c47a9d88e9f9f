"""Does the proxy rank masks the way full training does?

Builds masks with several indices at several sparsities on one initialisation (single indices and
the equal-weight mix of the environment's default indices, each over the same T-step exponential
schedule the environment's reference uses), then for every mask:

- fully trains it (``panning.train.train_masked`` with the run config's ``train`` settings, averaged
  over ``--train-seeds`` training orders) and reads the **test** accuracy;
- runs the proxy (``panning.proxy.ProxyEvaluator``) at several budgets and reads its **validation**
  accuracy.

Prints Spearman's rho between proxy accuracy and final test accuracy per budget, over all masks and
averaged within each sparsity (ranking masks of equal sparsity is what the relative reward needs),
and the proxy's seconds per mask. Not a test: run it by hand, e.g.

    .venv/bin/python benchmarks/proxy_correlation.py                     # mlp / digits, ~2 min on 1 core
    .venv/bin/python benchmarks/proxy_correlation.py --budgets 50 100 200 --train-seeds 3
"""
from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

from panning import config as _config
from panning.cli import OneLineParser, run_guarded
from panning.config import RunConfig
from panning.data import balanced_batch, load_dataset
from panning.errors import UsageError
from panning.masks import Masks
from panning.models import build_model
from panning.proxy import ProxyEvaluator
from panning.pruner import Pruner
from panning.schedules import keep_schedule
from panning.train import evaluate, train_masked

MIX = "mix"


def make_masks(model, indices, mix, sparsities, batches, input_shape, steps, seed) -> dict[tuple[str, float], Masks]:
    out = {}
    for s in sparsities:
        for name in list(indices) + ([MIX] if mix else []):
            used = list(mix) if name == MIX else [name]
            p = Pruner(model, used, batches, input_shape=input_shape, seed=seed)
            for keep in keep_schedule(p.num_total, s, steps, "exponential"):
                p.step([1.0] * len(used), keep)
            out[(name, s)] = p.masks
    return out


def main(argv: list[str] | None = None) -> None:
    ap = OneLineParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", help="RunConfig YAML for the full training (default: mlp on digits, --epochs)")
    ap.add_argument("--epochs", type=int, default=40, help="full-training epochs when no --config is given")
    ap.add_argument("--indices", nargs="+", default=["synflow", "snip", "grasp_abs", "magnitude", "random"])
    ap.add_argument("--mix", nargs="*", default=["synflow", "snip", "grasp_abs"],
                    help="indices of the equal-weight mix added at each sparsity (none: no mix)")
    ap.add_argument("--sparsities", nargs="+", type=float, default=[0.9, 0.95, 0.98, 0.99])
    ap.add_argument("--pruning-steps", type=int, default=10)
    ap.add_argument("--budgets", nargs="+", type=int, default=[25, 50, 100, 200, 400], help="proxy SGD steps")
    ap.add_argument("--proxy-batch-size", type=int, default=128)
    ap.add_argument("--proxy-lr", type=float, default=0.1)
    ap.add_argument("--val-size", type=float, default=None, help="validation fraction (default: the data set's)")
    ap.add_argument("--train-seeds", type=int, default=2)
    ap.add_argument("--init-seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", help="write all numbers to this file")
    ap.add_argument("--truth-from", help="reuse the full-training test accuracies of an earlier --json (same masks, "
                    "same training settings and split) instead of retraining")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    if args.config:
        cfg = _config.load(args.config)
    else:
        cfg = _config.override(RunConfig(), {"train.epochs": args.epochs})
    device = torch.device("cpu")
    bundle = load_dataset(cfg.dataset, cfg.data_dir, val_size=args.val_size, seed=cfg.split_seed)
    model = build_model(cfg.model, bundle.num_classes, bundle.input_shape, seed=args.init_seed, init=cfg.init)
    x, y = balanced_batch(bundle.train, cfg.prune.scoring_per_class, bundle.num_classes, seed=args.init_seed)
    print(f"{cfg.model} on {bundle.summary()}; full training: {cfg.train.epochs} epochs, batch {cfg.train.batch_size}, "
          f"lr {cfg.train.lr} {cfg.train.schedule}, {args.train_seeds} seeds; threads {args.threads}")

    t0 = time.perf_counter()
    masks = make_masks(model, args.indices, args.mix, args.sparsities, [(x, y)], bundle.input_shape,
                       args.pruning_steps, args.init_seed)
    print(f"{len(masks)} masks in {time.perf_counter() - t0:.1f} s")

    t0 = time.perf_counter()
    test_acc: dict[tuple[str, float], float] = {}
    full_seconds = float("nan")
    if args.truth_from:
        old = json.loads(Path(args.truth_from).read_text())
        test_acc = {(r["mask"], r["sparsity"]): r["test_accuracy"] for r in old["masks"]}
        full_seconds = old["full_seconds_per_run"]
        missing = [k for k in masks if k not in test_acc]
        if missing:
            raise UsageError(f"--truth-from {args.truth_from} lacks masks {missing}")
    for key, m in masks.items():
        if key in test_acc:
            continue
        accs = []
        for seed in range(args.train_seeds):
            net = copy.deepcopy(model)
            train_masked(net, m, bundle, cfg.train, device=device, seed=seed, progress=False)
            accs.append(evaluate(net, bundle.test, device, bundle.num_classes)["accuracy"])
        test_acc[key] = float(np.mean(accs))
    if not args.truth_from:
        full_seconds = (time.perf_counter() - t0) / (len(masks) * args.train_seeds)
    print(f"full training: {full_seconds:.2f} s per run")

    proxy_acc: dict[int, dict[tuple[str, float], float]] = {}
    proxy_sec: dict[int, float] = {}
    for budget in args.budgets:
        ev = ProxyEvaluator(bundle, steps=budget, batch_size=args.proxy_batch_size, lr=args.proxy_lr, device=device)
        ev.evaluate(model, next(iter(masks.values())))  # warm-up (first optimiser import) not timed
        ev.clear_cache()
        t0 = time.perf_counter()
        proxy_acc[budget] = {key: ev.evaluate(model, m).accuracy for key, m in masks.items()}
        proxy_sec[budget] = (time.perf_counter() - t0) / len(masks)

    keys = list(masks)
    header = f"{'mask':<12} {'sparsity':>8} {'test acc':>8} " + " ".join(f"{f'proxy@{b}':>10}" for b in args.budgets)
    print("\n" + header)
    for key in keys:
        print(f"{key[0]:<12} {key[1]:>8.3f} {test_acc[key]:>8.4f} "
              + " ".join(f"{proxy_acc[b][key]:>10.4f}" for b in args.budgets))

    results = []
    print(f"\n{'budget':>6} {'rho (all)':>9} {'rho within sparsity (mean)':>27} {'s/mask':>7}")
    truth = [test_acc[k] for k in keys]
    for b in args.budgets:
        rho_all = spearmanr([proxy_acc[b][k] for k in keys], truth).statistic
        within = []
        for s in args.sparsities:
            ks = [k for k in keys if k[1] == s]
            r = spearmanr([proxy_acc[b][k] for k in ks], [test_acc[k] for k in ks]).statistic
            if np.isfinite(r):
                within.append(float(r))
        rho_within = float(np.mean(within)) if within else float("nan")
        results.append({"budget": b, "rho_all": float(rho_all), "rho_within": rho_within,
                        "within_per_sparsity": within, "seconds_per_mask": proxy_sec[b]})
        print(f"{b:>6} {rho_all:>9.3f} {rho_within:>27.3f} {proxy_sec[b]:>7.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "args": vars(args), "full_seconds_per_run": full_seconds,
            "masks": [{"mask": k[0], "sparsity": k[1], "test_accuracy": test_acc[k],
                       "proxy": {str(b): proxy_acc[b][k] for b in args.budgets}} for k in keys],
            "rho": results,
        }, indent=2))


if __name__ == "__main__":
    # bad flags or files: one line and exit 2, as the panning command does; a bug keeps its traceback
    raise SystemExit(run_guarded(main, Path(__file__).name))
