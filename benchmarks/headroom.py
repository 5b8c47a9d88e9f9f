"""How much room does the agent's action space leave above the best single index? Random search, chosen on validation.

The agent acts by weighting the indices and sizing each pruning step. Whether it *can* beat the best single
index by the issue's margin depends on whether masks that much better exist in that space at all. This script
asks the question under a sweep's own protocol (``--bench``, e.g. ``configs/bench/demo.yaml``: its base
recipe, methods, agents, sparsities and seeds), for each seed and sparsity:

- every method and agent of the sweep, pruned exactly as its cell prunes them (``panning.runs.prune_model``
  on ``cell_config``), so their figures at the protocol's training seed are the sweep's cells, digit for digit;
- ``--mixtures`` random points of the agent's action space per seed (the same K actions at every sparsity),
  driven through the env's episode core on the same initialisation and scoring batch: Dirichlet(1) weights
  over the env's indices and a random step size in [-1, 1] at each of ``--pruning-steps`` steps (the agent's
  action without per-layer terms; global selection, mean normalisation, the sweep's ``exclude``);
- with ``--draws K --propose AGENT``, K actions drawn from the agent's own stochastic policy (its Gaussian around
  the deterministic action it plays, step by step) instead of uniformly: a search that starts where the agent is.
- every mask fully trained with the sweep's recipe under ``--train-seeds`` training orders (seed, seed +
  1000, ...; the first is the protocol's own), scored on the validation split carved from the training set.
  Pruning and training run on the CPU, one torch thread a worker: a sweep run on a GPU, or with other thread
  counts, may differ from these figures in the last digits (checked equal on the CPU: the digits MLP and
  MNIST LeNet-300-100 cells of BENCHMARKS.md).

**Search** picks, per seed and sparsity, the mixture with the best mean validation accuracy (no test image is
read to choose it) and reports that mask's test accuracy; ``search (agent draws)`` does the same among the
draws. It is what an agent with a perfect full-training reward could reach by trying that many actions; its
margin over the best single index (by test mean, as the acceptance tables compare) is the headroom. Test
accuracy is reported at the protocol's training seed (comparable with the sweep's table) and as the mean over
all training seeds (less noisy). Run by hand:

    .venv/bin/python benchmarks/headroom.py --bench configs/bench/demo.yaml --mixtures 40 --json out.json
"""
from __future__ import annotations

import copy
import json
import multiprocessing as mp
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from panning import config as _config
from panning.cli import OneLineParser, run_guarded
from panning.config import RunConfig
from panning.data import load_dataset
from panning.episode import PruningEpisode
from panning.errors import UsageError
from panning.hashing import masks_digest
from panning.masks import Masks
from panning.policy import run_policy
from panning.pruner import METHODS
from panning.runs import cell_config, prune_model, scoring_batches, setup
from panning.sweep import DENSE, Cell, SweepConfig, load_sweep
from panning.train import evaluate, resolve_device, train_masked

ROOT = Path(__file__).resolve().parents[1]
MIX = "mix"  # the prefix of a random search candidate's name
DRAW = "draw"  # ... and of an agent-proposed one
SEARCHES = {MIX: "search", DRAW: "search (agent draws)"}

_JOBS: dict[str, Any] = {}  # what forked training workers read: models, masks, data, recipe


def _train_one(job: tuple[int, int]) -> tuple[int, int, float, float]:
    """Fully train candidate ``i`` with training seed ``tseed``: (i, tseed, val accuracy, test accuracy)."""
    i, tseed = job
    torch.set_num_threads(1)
    cand = _JOBS["candidates"][i]
    net = copy.deepcopy(_JOBS["models"][cand["seed"]])
    bundle, device = _JOBS["bundle"], _JOBS["device"]
    train_masked(net, _JOBS["masks"][i], bundle, _JOBS["train"], device=device, seed=tseed, progress=False)
    val = evaluate(net, bundle.val, device, bundle.num_classes)["accuracy"]
    test = evaluate(net, bundle.test, device, bundle.num_classes)["accuracy"]
    return i, tseed, float(val), float(test)


def build_candidates(bench: str, sweep: SweepConfig, base: RunConfig, mixtures: int, steps: int, indices: list[str],
                     data_dir: str | None, mix_seed: int, draws: int = 0, propose: str | None = None
                     ) -> tuple[list[dict[str, Any]], list[Masks], dict[int, torch.nn.Module], Any, Any]:
    """The masks: the sweep's (``load_sweep(bench)``) methods and agents as its cells prune them, ``mixtures``
    uniformly random actions and ``draws`` episodes of the ``propose`` agent's stochastic policy."""
    if data_dir:
        base = _config.override(base, {"data_dir": data_dir})
    if resolve_device(base.device).type != "cpu":
        print(f"note: {bench} runs on {base.device}; this script prunes and trains on the CPU, so its figures may "
              "differ from that sweep's cells in the last digits")
    base = _config.override(base, {"device": "cpu"})  # the forked training workers cannot share a CUDA context
    if base.reinit:
        raise UsageError(f"{bench}: its base config re-initialises before training (reinit), which this script "
                         "does not follow; use a sweep without it")
    policies: dict[str, Any] = {}
    if sweep.agents:
        from panning.agents.policy import load_policy

        policies = {name: load_policy(path) for name, path in sweep.agents.items()}
    sampler = None
    if draws:
        from panning.agents.policy import as_policy, load_agent

        sampler = as_policy(load_agent(str(propose)), deterministic=False)
    bundle = load_dataset(base.dataset, base.data_dir, download=base.download, seed=base.split_seed)
    paths = {name: str(p.info.get("path", name)) for name, p in policies.items()}
    cands: list[dict[str, Any]] = []
    masks: list[Masks] = []
    models: dict[int, torch.nn.Module] = {}
    for seed in sweep.seeds:
        rng = np.random.default_rng([mix_seed, seed])  # the same draws whatever the other seeds are
        uniform = [(rng.dirichlet(np.ones(len(indices))), rng.uniform(-1, 1, steps)) for _ in range(mixtures)]
        # the seed's network and scoring batch, as every cell of this seed builds them (the sparsity plays no part)
        c = cell_config(base, Cell(sweep.methods[0], sweep.sparsities[0], seed), paths)
        s = setup(c, bundle)
        models[seed] = copy.deepcopy(s.model).cpu()
        batches = scoring_batches(c, s.bundle, s.device)
        for sparsity in sweep.sparsities:
            for method in [m for m in sweep.methods if m != DENSE]:
                cm = cell_config(base, Cell(method, sparsity, seed), paths)
                masks.append(prune_model(cm, setup(cm, bundle), policies.get(method)).masks.cpu())
                cands.append({"name": method, "kind": "method", "seed": seed, "sparsity": sparsity})
            for j, (w, b) in enumerate(uniform):
                ep = PruningEpisode(s.model, indices, batches, target_sparsity=sparsity, steps=steps,
                                    input_shape=s.bundle.input_shape, exclude=c.prune.exclude, seed=seed)
                for t in range(steps):
                    ep.step(np.r_[2 * w - 1, b[t]])
                masks.append(ep.masks.cpu())
                cands.append({"name": f"{MIX}{j}", "kind": MIX, "draw": j, "seed": seed, "sparsity": sparsity,
                              "weights": [round(float(x), 4) for x in w], "steps": [round(float(x), 4) for x in b]})
            for j in range(draws if sampler is not None else 0):
                # SB3 samples with torch's global generator: seeded per draw, so a draw does not depend on the others
                key = [mix_seed, seed, round(sparsity * 1e6), j]
                torch.manual_seed(int(np.random.SeedSequence(key).generate_state(1)[0]))
                result = run_policy(sampler, s.model, sparsity, batches=batches, input_shape=s.bundle.input_shape,
                                    exclude=c.prune.exclude or None, seed=seed, method=f"{DRAW}{j}")
                masks.append(result.masks.cpu())
                cands.append({"name": f"{DRAW}{j}", "kind": DRAW, "draw": j, "seed": seed, "sparsity": sparsity,
                              "actions": [[round(a, 4) for a in st["action"]]
                                          for st in result.extra["policy"]["steps"]]})
    return cands, masks, models, bundle, base.train


def summarise(cands: list[dict[str, Any]], seeds: list[int], sparsities: list[float]) -> list[dict[str, Any]]:
    """Per sparsity: each method's test accuracy (protocol seed and all seeds), the search's pick, the margins."""
    table = []
    for sp in sparsities:
        rows = [c for c in cands if c["sparsity"] == sp]
        names = sorted({c["name"] for c in rows if c["kind"] == "method"})
        per = {n: _figures([c for c in rows if c["name"] == n]) for n in names}
        picked: dict[str, list[str]] = {}
        for kind, label in SEARCHES.items():
            picks = []
            for seed in seeds:
                found = [c for c in rows if c["seed"] == seed and c["kind"] == kind]
                if found:  # the best mean validation accuracy (never test); ties: the first drawn
                    picks.append(max(found, key=lambda c: (float(np.mean(c["val"])), -c["draw"])))
            if picks:
                per[label] = _figures(picks)
                picked[label] = [c["name"] for c in picks]
        singles = [n for n in names if n in _SINGLE_INDICES]
        entry: dict[str, Any] = {"sparsity": sp, "methods": per, "picks": picked}
        for key in ("test_protocol", "test_all"):
            if singles:
                best_single = max(singles, key=lambda n: per[n][key])
                entry[f"best_single_{key}"] = best_single
                entry[f"headroom_{key}"] = {label: per[label][key] - per[best_single][key]
                                            for label in SEARCHES.values() if label in per}
        if singles:
            entry["best_of_k"] = {label: best_of_k(rows, seeds, kind, entry["best_single_test_all"])
                                  for kind, label in SEARCHES.items() if label in per}
        table.append(entry)
    return table


def _figures(cands: list[dict[str, Any]]) -> dict[str, float]:
    """Mean over ``cands`` (one per seed) of the test accuracy at the protocol's training seed, of the test and of
    the validation accuracy over all training seeds."""
    return {"test_protocol": float(np.mean([c["test"][0] for c in cands])),
            "test_all": float(np.mean([np.mean(c["test"]) for c in cands])),
            "val": float(np.mean([np.mean(c["val"]) for c in cands]))}


def best_of_k(rows: list[dict[str, Any]], seeds: list[int], kind: str, reference: str,
              trials: int = 2000) -> dict[str, float]:
    """What a smaller search would have gained: for K = 1, 2, 5, 10, 20, 40, ... up to the candidates there are,
    the test accuracy (mean over training orders) of the best-by-validation among K candidates drawn at random
    without replacement, minus ``reference``'s, averaged over ``trials`` draws and the seeds (fixed RNG)."""
    rng = np.random.default_rng(0)
    per_seed = []
    for seed in seeds:
        found = sorted((c for c in rows if c["seed"] == seed and c["kind"] == kind), key=lambda c: c["draw"])
        ref = [c for c in rows if c["seed"] == seed and c["name"] == reference]
        if found and ref:
            per_seed.append((np.array([np.mean(c["val"]) for c in found]),
                             np.array([np.mean(c["test"]) for c in found]), float(np.mean(ref[0]["test"]))))
    if not per_seed:
        return {}
    n = min(len(v) for v, _, _ in per_seed)
    out = {}
    for k in [k for k in (1, 2, 5, 10, 20, 40, 80, 160) if k < n] + [n]:
        gains = []
        for val, test, ref_test in per_seed:
            for _ in range(trials if k < len(val) else 1):
                idx = np.sort(rng.choice(len(val), k, replace=False))
                gains.append(test[idx[np.argmax(val[idx])]] - ref_test)  # argmax: the first drawn on ties
        out[str(k)] = float(np.mean(gains))
    return out


# the fixed methods of one index (the sweep may also hold panning's table and agents); random is the baseline,
# not a saliency index the acceptance compares with
_SINGLE_INDICES = frozenset(n for n, m in METHODS.items() if len(m.indices) == 1 and n != "random")


def main(argv: list[str] | None = None) -> None:
    ap = OneLineParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bench", default=str(ROOT / "configs" / "bench" / "demo.yaml"),
                    help="the sweep whose protocol to follow (its base recipe, methods, agents, sparsities, seeds)")
    ap.add_argument("--mixtures", type=int, default=40,
                    help="random actions tried per seed (the same at every sparsity)")
    ap.add_argument("--pruning-steps", type=int, default=10, help="steps of each random action (the env's T)")
    ap.add_argument("--indices", nargs="+", default=["synflow", "snip", "grasp_abs"],
                    help="the indices the random actions weight (the env's)")
    ap.add_argument("--train-seeds", type=int, default=3,
                    help="training orders per mask: seed, seed + 1000, ... (the first is the sweep's own)")
    ap.add_argument("--draws", type=int, default=0,
                    help="also search among this many episodes of --propose's stochastic policy per seed and sparsity")
    ap.add_argument("--propose", default=None, help="the agent (file or shipped name) whose policy --draws samples")
    ap.add_argument("--mix-seed", type=int, default=0, help="seed of the random actions and draws")
    ap.add_argument("--workers", type=int, default=2, help="processes for the full trainings (1 thread each)")
    ap.add_argument("--data-dir", default=None, help="where the data set's files are (default: $PANNING_DATA)")
    ap.add_argument("--json", help="write every number to this file")
    ap.add_argument("--from-json", default=None,
                    help="summarise an earlier run's --json again (table, best-of-K curves); nothing is trained")
    args = ap.parse_args(argv)
    if args.from_json:
        return _from_json(args.from_json)
    for flag in ("mixtures", "draws", "pruning_steps", "train_seeds", "workers"):
        least = 0 if flag in ("mixtures", "draws") else 1
        if getattr(args, flag) < least:
            raise UsageError(f"--{flag.replace('_', '-')} must be at least {least}")
    if args.draws and not args.propose:
        raise UsageError("--draws needs --propose AGENT: the agent whose stochastic policy proposes the actions")
    if args.json and Path(args.json).exists():
        raise UsageError(f"--json {args.json} exists; choose another path or remove it")
    if args.json and not Path(args.json).resolve().parent.is_dir():
        raise UsageError(f"--json {args.json}: its folder does not exist")
    torch.set_num_threads(1)
    sweep, base = load_sweep(args.bench)

    t0 = time.perf_counter()
    cands, masks, models, bundle, train_cfg = build_candidates(args.bench, sweep, base, args.mixtures,
                                                               args.pruning_steps, args.indices, args.data_dir,
                                                               args.mix_seed, args.draws, args.propose)
    for c, m in zip(cands, masks, strict=True):
        c["digest"] = masks_digest(m)
    print(f"{len(cands)} masks in {time.perf_counter() - t0:.0f} s; validation {len(bundle.val)} images "
          f"({100 / len(bundle.val):.2f} points each), test {len(bundle.test)}", flush=True)
    train_seeds = [1000 * j for j in range(args.train_seeds)]  # offsets from the cell's seed
    _JOBS.update(candidates=cands, masks=masks, models=models, bundle=bundle, train=train_cfg, device="cpu")
    jobs = [(i, c["seed"] + off) for i, c in enumerate(cands) for off in train_seeds]
    results: dict[tuple[int, int], tuple[float, float]] = {}
    t0 = time.perf_counter()
    with mp.get_context("fork").Pool(args.workers) as pool:
        for n, (i, tseed, val, test) in enumerate(pool.imap_unordered(_train_one, jobs), 1):
            results[(i, tseed)] = (val, test)
            if n % 50 == 0:
                print(f"  full training {n}/{len(jobs)} ({time.perf_counter() - t0:.0f} s)", flush=True)
    seconds = time.perf_counter() - t0
    for i, c in enumerate(cands):
        c["val"] = [results[(i, c["seed"] + off)][0] for off in train_seeds]
        c["test"] = [results[(i, c["seed"] + off)][1] for off in train_seeds]
    table = summarise(cands, list(sweep.seeds), list(sweep.sparsities))

    print(f"\n{len(jobs)} full trainings in {seconds:.0f} s ({seconds * args.workers / max(1, len(jobs)):.2f} s a run "
          f"on one core); a search picks per seed the best of its candidates ({args.mixtures} uniformly random "
          f"actions; {args.draws} draws of {args.propose or 'no agent'}) by mean validation accuracy over "
          f"{args.train_seeds} training seeds")
    report(table, list(sweep.seeds))
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "recipe": _config.to_dict(train_cfg),
                                               "seconds_per_run": seconds * args.workers / max(1, len(jobs)),
                                               "candidates": cands, "table": table}, indent=2))


def report(table: list[dict[str, Any]], seeds: list[int]) -> None:
    """Print the summary: per sparsity, every method's and search's test accuracy and the margins."""
    for e in table:
        print(f"\nsparsity {e['sparsity']}: test accuracy (%), mean over seeds {seeds}; picked: "
              + "; ".join(f"{label} {', '.join(names)}" for label, names in e["picks"].items()))
        print(f"  {'method':<22} {'test (protocol seed)':>21} {'test (all train seeds)':>23} {'validation':>11}")
        for n, v in sorted(e["methods"].items(), key=lambda kv: -kv[1]["test_protocol"]):
            print(f"  {n:<22} {100 * v['test_protocol']:>21.2f} {100 * v['test_all']:>23.2f} {100 * v['val']:>11.2f}")
        for key in ("test_protocol", "test_all"):
            for label, gain in e.get(f"headroom_{key}", {}).items():
                print(f"  {label} - best single index ({e[f'best_single_{key}']}), {key.replace('_', ' ')}: "
                      f"{100 * gain:+.2f} points")
        for label, curve in e.get("best_of_k", {}).items():
            print(f"  {label} among K random candidates, expected gain over {e['best_single_test_all']} (all train "
                  "seeds): " + ", ".join(f"K={k} {100 * g:+.2f}" for k, g in curve.items()))


def _from_json(path: str) -> None:
    p = Path(path)
    try:
        cands = json.loads(p.read_text())["candidates"]
        seeds = sorted({int(c["seed"]) for c in cands})
        sparsities = sorted({float(c["sparsity"]) for c in cands})
        table = summarise(cands, seeds, sparsities)
    except FileNotFoundError:
        raise UsageError(f"--from-json {p} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError):
        raise UsageError(f"--from-json {p} is not the --json of a headroom.py run") from None
    print(f"{p}: {len(cands)} trained masks, summarised again (nothing trained)")
    report(table, seeds)


if __name__ == "__main__":
    # bad flags or files: one line and exit 2, as the panning command does; a bug keeps its traceback
    raise SystemExit(run_guarded(main, Path(__file__).name))
