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

With ``--shared-actions`` the K random actions are the same on every seed, and ``--fixed-from RUN.json`` (an
earlier such run on other seeds) chooses **one action for every network** there by mean validation accuracy
and reports it here: what a policy that plays the same action whatever it observes can reach.
``--layer-actions S`` adds S per-layer depth points (the env's ``layer_actions``) to each random action.

**Search** picks, per seed and sparsity, the mixture with the best mean validation accuracy (no test image is
read to choose it) and reports that mask's test accuracy; ``search (agent draws)`` does the same among the
draws. It is what an agent with a perfect full-training reward could reach by trying that many actions; its
margin over the best single index (by test mean, as the acceptance tables compare) is the headroom. Test
accuracy is reported at the protocol's training seed (comparable with the sweep's table) and as the mean over
all training seeds (less noisy), and chosen on the other training orders' validation and read on the held-out
order's test (so that a lucky training run cannot flatter it). Run by hand:

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
from panning.episode import PruningEpisode, check_layer_actions
from panning.errors import UsageError
from panning.hashing import masks_digest
from panning.masks import Masks
from panning.policy import run_policy
from panning.pruner import SINGLE_INDEX_METHODS
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
                     data_dir: str | None, mix_seed: int, draws: int = 0, propose: str | None = None,
                     shared: bool = False, layer_actions: int = 0
                     ) -> tuple[list[dict[str, Any]], list[Masks], dict[int, torch.nn.Module], Any, Any]:
    """The masks: the sweep's (``load_sweep(bench)``) methods and agents as its cells prune them, ``mixtures``
    uniformly random actions (the same on every seed if ``shared``, else drawn per seed; with ``layer_actions``
    S per-layer depth points too) and ``draws`` episodes of the ``propose`` agent's stochastic policy."""
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
        # per seed: the same draws whatever the other seeds are; shared: one action list judged on every seed
        rng = np.random.default_rng([mix_seed] if shared else [mix_seed, seed])
        # the per-layer points are drawn once per action and kept over its steps (a layer's standing bias, as
        # AMC's per-layer ratios): drawn anew at every step they would mostly average out; none drawn when S = 0,
        # so runs without them keep their actions
        uniform = [(rng.dirichlet(np.ones(len(indices))), rng.uniform(-1, 1, steps),
                    rng.uniform(-1, 1, layer_actions) if layer_actions else np.zeros(0)) for _ in range(mixtures)]
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
            for j, (w, b, layers) in enumerate(uniform):
                ep = PruningEpisode(s.model, indices, batches, target_sparsity=sparsity, steps=steps,
                                    layer_actions=layer_actions,
                                    input_shape=s.bundle.input_shape, exclude=c.prune.exclude, seed=seed)
                for t in range(steps):
                    ep.step(np.r_[2 * w - 1, b[t], layers])
                masks.append(ep.masks.cpu())
                cands.append({"name": f"{MIX}{j}", "kind": MIX, "draw": j, "seed": seed, "sparsity": sparsity,
                              "weights": [round(float(x), 4) for x in w], "steps": [round(float(x), 4) for x in b],
                              **({"layers": [round(float(x), 4) for x in layers]} if layer_actions else {})})
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
        singles = [n for n in names if n in SINGLE_INDEX_METHODS]
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
            held = {label: held_out_order(rows, seeds, kind, entry["best_single_test_all"])
                    for kind, label in SEARCHES.items() if label in per}
            entry["held_out_order"] = {k: v for k, v in held.items() if v is not None}
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
        found, ref = _seed_search(rows, seed, kind, reference)
        if found and ref:
            per_seed.append((np.array([np.mean(c["val"]) for c in found]),
                             np.array([np.mean(c["test"]) for c in found]), float(np.mean(ref["test"]))))
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


def fixed_action(chosen_on: list[dict[str, Any]], judged_on: list[dict[str, Any]],
                 sparsities: list[float]) -> list[dict[str, Any]]:
    """One action for every network, as a policy that ignores its observation plays: per sparsity, the random
    action with the best mean validation accuracy over ``chosen_on``'s seeds (ties: the first drawn), judged by
    its test accuracy on ``judged_on``'s seeds against the best single index there. Both runs need
    ``--shared-actions`` (actions are matched by their weights, step sizes and per-layer points). Also:
    Spearman's rho between the actions' validation on the choosing seeds and their test on the judging seeds
    (does an action's quality carry over to other initialisations?) and the best action by the judging seeds'
    test, a ceiling that a choice on other networks cannot be expected to reach (never reported as a
    result)."""
    from scipy.stats import spearmanr

    out = []
    for sp in sparsities:
        pick, judge = _shared_actions(chosen_on, sp), _shared_actions(judged_on, sp)
        common = [k for k in pick if k in judge]
        if not common:
            raise UsageError("no random action is in both runs at the same sparsity: run both with "
                             "--shared-actions and the same --mix-seed, --indices and --pruning-steps")
        chosen = max(common, key=lambda k: (float(np.mean([np.mean(c["val"]) for c in pick[k]])),
                                            -pick[k][0]["draw"]))
        rows = [c for c in judged_on if c["sparsity"] == sp]
        singles = sorted({c["name"] for c in rows if c["kind"] == "method" and c["name"] in SINGLE_INDEX_METHODS})
        per = {n: _figures([c for c in rows if c["name"] == n]) for n in singles}
        fixed = _figures(judge[chosen])
        best = max(singles, key=lambda n: per[n]["test_all"]) if singles else None
        ceiling = max(common, key=lambda k: _figures(judge[k])["test_all"])
        out.append({"sparsity": sp, "action": pick[chosen][0]["name"], "actions": len(common), "fixed": fixed,
                    "best_single": best, "best_single_figures": per.get(best) if best else None,
                    "gain_test_all": fixed["test_all"] - per[best]["test_all"] if best else None,
                    # each figure against its own best single index, as summarise compares
                    "gain_test_protocol": fixed["test_protocol"] - max(v["test_protocol"] for v in per.values())
                    if best else None,
                    "rho": float(spearmanr([np.mean([np.mean(c["val"]) for c in pick[k]]) for k in common],
                                           [_figures(judge[k])["test_all"] for k in common]).statistic)
                    if len(common) > 2 else float("nan"),  # no rank correlation of one or two actions
                    "ceiling_action": judge[ceiling][0]["name"], "ceiling": _figures(judge[ceiling])})
    return out


def _shared_actions(cands: list[dict[str, Any]], sparsity: float, who: str = "a run"
                    ) -> dict[tuple, list[dict[str, Any]]]:
    """The random candidates at ``sparsity`` grouped by their action (weights, step sizes, per-layer points), one
    per seed; a UsageError naming ``who`` when the actions differ from seed to seed (no --shared-actions)."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for c in cands:
        if c["kind"] == MIX and c["sparsity"] == sparsity:
            groups.setdefault((tuple(c["weights"]), tuple(c["steps"]), tuple(c.get("layers", ()))), []).append(c)
    seeds = {c["seed"] for v in groups.values() for c in v}
    if any(len(v) != len(seeds) for v in groups.values()):
        raise UsageError(f"{who}'s random actions differ from seed to seed (it ran without --shared-actions)")
    return groups


def held_out_order(rows: list[dict[str, Any]], seeds: list[int], kind: str, reference: str) -> float | None:
    """The search's gain over ``reference`` when its pick cannot profit from a lucky training run: for each
    training order r, choose by mean validation over the *other* orders and read the test accuracy of order r
    (both the pick's and the reference's), averaged over r and the seeds. None with fewer than 2 orders."""
    gains = []
    for seed in seeds:
        found, ref = _seed_search(rows, seed, kind, reference)
        if not found or ref is None or len(ref["test"]) < 2:
            return None
        for r in range(len(ref["test"])):
            pick = max(found, key=lambda c: (float(np.mean([v for o, v in enumerate(c["val"]) if o != r])),
                                             -c["draw"]))
            gains.append(pick["test"][r] - ref["test"][r])
    return float(np.mean(gains)) if gains else None


def _seed_search(rows: list[dict[str, Any]], seed: int, kind: str, reference: str
                 ) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """A seed's candidates of ``kind`` in the order drawn (ties go to the first) and its ``reference`` cell."""
    found = sorted((c for c in rows if c["seed"] == seed and c["kind"] == kind), key=lambda c: c["draw"])
    return found, next((c for c in rows if c["seed"] == seed and c["name"] == reference), None)



def main(argv: list[str] | None = None) -> None:
    ap = OneLineParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bench", default=str(ROOT / "configs" / "bench" / "demo.yaml"),
                    help="the sweep whose protocol to follow (its base recipe, methods, agents, sparsities, seeds)")
    ap.add_argument("--mixtures", type=int, default=40,
                    help="random actions tried per seed (the same at every sparsity)")
    ap.add_argument("--pruning-steps", type=int, default=10, help="steps of each random action (the env's T)")
    ap.add_argument("--layer-actions", type=int, default=0,
                    help="add S >= 2 per-layer depth points to each random action (the env's layer_actions), drawn "
                         "once per action in [-1, 1]")
    ap.add_argument("--indices", nargs="+", default=["synflow", "snip", "grasp_abs"],
                    help="the indices the random actions weight (the env's)")
    ap.add_argument("--train-seeds", type=int, default=3,
                    help="training orders per mask: seed, seed + 1000, ... (the first is the sweep's own)")
    ap.add_argument("--draws", type=int, default=0,
                    help="also search among this many episodes of --propose's stochastic policy per seed and sparsity")
    ap.add_argument("--propose", default=None, help="the agent (file or shipped name) whose policy --draws samples")
    ap.add_argument("--shared-actions", action="store_true",
                    help="try the same random actions on every seed (else each seed draws its own), so that "
                         "--fixed-from can judge one action across networks")
    ap.add_argument("--fixed-from", default=None,
                    help="an earlier --shared-actions run's --json on other seeds: choose one action there by "
                         "validation and report it on this run's seeds (what a fixed policy would reach)")
    ap.add_argument("--mix-seed", type=int, default=0, help="seed of the random actions and draws")
    ap.add_argument("--workers", type=int, default=2, help="processes for the full trainings (1 thread each)")
    ap.add_argument("--data-dir", default=None, help="where the data set's files are (default: $PANNING_DATA)")
    ap.add_argument("--json", help="write every number to this file")
    ap.add_argument("--from-json", default=None,
                    help="summarise an earlier run's --json again (table, best-of-K curves); nothing is trained")
    args = ap.parse_args(argv)
    chooser = None
    earlier = _load_run(args.from_json, "--from-json") if args.from_json else None
    if args.fixed_from:
        chooser, chooser_args = _load_run(args.fixed_from, "--fixed-from")
        _check_chooser(chooser, chooser_args, earlier[1] if earlier else vars(args))
    if earlier:
        return _from_json(args.from_json, earlier[0], chooser)
    for flag in ("mixtures", "draws", "pruning_steps", "train_seeds", "workers"):
        least = 0 if flag in ("mixtures", "draws") else 1
        if getattr(args, flag) < least:
            raise UsageError(f"--{flag.replace('_', '-')} must be at least {least}")
    if args.layer_actions:
        try:
            check_layer_actions(args.layer_actions)
        except ValueError as e:
            raise UsageError(f"--layer-actions: {e}") from None
    if args.fixed_from and not args.shared_actions:
        raise UsageError("--fixed-from judges one action on every seed: add --shared-actions")
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
                                                               args.mix_seed, args.draws, args.propose,
                                                               args.shared_actions, args.layer_actions)
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
    out = {"args": vars(args), "recipe": _config.to_dict(train_cfg),
           "seconds_per_run": seconds * args.workers / max(1, len(jobs)), "candidates": cands, "table": table}
    if args.json:  # written before the fixed-action report, so that nothing trained is lost to it
        Path(args.json).write_text(json.dumps(out, indent=2))
    if chooser:
        out["fixed"] = _report_fixed(chooser, cands, list(sweep.sparsities))
        if args.json:
            Path(args.json).write_text(json.dumps(out, indent=2))


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
        for label, gain in e.get("held_out_order", {}).items():
            print(f"  {label} chosen on the other training orders' validation, test of the held-out order, "
                  f"gain over {e['best_single_test_all']}: {100 * gain:+.2f} points")
        for label, curve in e.get("best_of_k", {}).items():
            print(f"  {label} among K random candidates, expected gain over {e['best_single_test_all']} (all train "
                  "seeds): " + ", ".join(f"K={k} {100 * g:+.2f}" for k, g in curve.items()))


def _report_fixed(chooser: list[dict[str, Any]], cands: list[dict[str, Any]],
                  sparsities: list[float]) -> list[dict[str, Any]]:
    """Print and return :func:`fixed_action` with actions chosen on ``chooser``'s seeds, judged on ``cands``'."""
    rows = fixed_action(chooser, cands, sparsities)
    seeds = sorted({c["seed"] for c in chooser})
    if set(seeds) & {c["seed"] for c in cands}:
        print(f"note: the action is chosen on seeds {seeds}, some of which it is judged on: its figures are biased up")
    for e in rows:
        f, b = e["fixed"], e["best_single_figures"]
        print(f"\nsparsity {e['sparsity']}: one action for every network, chosen by validation on seeds {seeds} "
              f"among {e['actions']} ({e['action']}): test {100 * f['test_protocol']:.2f} (protocol seed), "
              f"{100 * f['test_all']:.2f} (all train seeds)"
              + (f"; best single index {e['best_single']} {100 * b['test_protocol']:.2f} / {100 * b['test_all']:.2f}"
                 f"; gain {100 * e['gain_test_protocol']:+.2f} / {100 * e['gain_test_all']:+.2f} points" if b else ""))
        print(f"  rho(validation on the choosing seeds, test here) over the actions: {e['rho']:.2f}; the best "
              f"action by test here ({e['ceiling_action']}, a ceiling, not a result): "
              f"{100 * e['ceiling']['test_all']:.2f}")
    return rows


def _load_run(path: str, flag: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The trained candidates of an earlier run's ``--json`` and the arguments it ran with."""
    p = Path(path)
    try:
        data = json.loads(p.read_text())
        cands, args = list(data["candidates"]), dict(data.get("args") or {})
        for c in cands:
            if not {"seed", "sparsity", "kind", "name", "val", "test"} <= c.keys() or \
                    c["kind"] == MIX and not {"weights", "steps", "draw"} <= c.keys():
                raise ValueError("a candidate lacks the keys the summaries read")
            c["seed"], c["sparsity"] = int(c["seed"]), float(c["sparsity"])
            [float(v) for v in c["val"] + c["test"]]
        if not cands:
            raise ValueError("no candidate")
        return cands, args
    except FileNotFoundError:
        raise UsageError(f"{flag} {p} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError, KeyError, TypeError, ValueError):
        raise UsageError(f"{flag} {p} is not the --json of a headroom.py run") from None


def _check_chooser(chooser: list[dict[str, Any]], chooser_args: dict[str, Any], mine: dict[str, Any]) -> None:
    """Refuse a ``--fixed-from`` run whose actions cannot be this run's, before anything is trained: actions
    drawn per seed, or another index set, step count or per-layer setting (same numbers, other meanings)."""
    for sp in {c["sparsity"] for c in chooser}:
        _shared_actions(chooser, sp, "--fixed-from: that run")
    for key in ("indices", "pruning_steps", "layer_actions"):
        default = 0 if key == "layer_actions" else None  # runs before --layer-actions had none
        theirs, ours = chooser_args.get(key, default), mine.get(key, default)
        if theirs is not None and ours is not None and theirs != ours:
            raise UsageError(f"--fixed-from: that run has {key.replace('_', '-')} {theirs}, this one {ours}; "
                             "its actions would mean something else here")


def _from_json(path: str, cands: list[dict[str, Any]], chooser: list[dict[str, Any]] | None = None) -> None:
    """Summarise the candidates of the earlier run at ``path`` again (and the fixed action, given a chooser)."""
    seeds = sorted({c["seed"] for c in cands})
    sparsities = sorted({c["sparsity"] for c in cands})
    try:
        table = summarise(cands, seeds, sparsities)
    except (KeyError, TypeError, ValueError):
        raise UsageError(f"--from-json {path} is not the --json of a headroom.py run") from None
    print(f"{path}: {len(cands)} trained masks, summarised again (nothing trained)")
    report(table, seeds)
    if chooser:
        _report_fixed(chooser, cands, sparsities)


if __name__ == "__main__":
    # bad flags or files: one line and exit 2, as the panning command does; a bug keeps its traceback
    raise SystemExit(run_guarded(main, Path(__file__).name))
