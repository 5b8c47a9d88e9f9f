"""N candidates at once against one at a time: proxy evaluations and whole episodes per second.

Rows (without ``--model``: all of them):

- ``proxy``: proxy evaluations per second, :meth:`ProxyEvaluator.evaluate_many` (N candidates as one
  stacked computation) against N calls of :meth:`ProxyEvaluator.evaluate`, same masks (SNIP at 95%
  of N initialisations), caches off, for mlp/digits, lenet300/mnist, lenet5/mnist and resnet20 on
  CIFAR-shaped random data (3x32x32, 10 classes; CIFAR is not on this machine). The largest
  accuracy difference between the two is reported.
- ``episodes``: whole episodes per second of ``panning/Panning-v0`` (the env YAML of the row, random
  actions), :class:`BatchedPanningVecEnv` with N episodes in this process (all cores) against today's
  two ``SubprocVecEnv`` workers (one thread each), on mlp/digits and lenet300/mnist; ``cold`` from a
  fresh start (the single-index references of the relative reward computed as they come), ``warm``
  after ``--warmup`` more untimed episodes (some references cached: each process keeps its own cache, so
  the two workers compute many twice), and with ``--steady-rounds R`` a ``steady`` phase: the last of R
  more rounds of ``--episodes`` each, when every process has cached its references (most of an agent's
  training; the rate stops rising: each round's rate is kept in the row's ``rounds``).
- ``episodes_2proc``: the same, the N episodes split over two processes of N/2 stacked episodes each
  (:class:`SubprocBatchedVecEnv`, one thread each), against the same two ``SubprocVecEnv`` workers.
- ``proxy_sparse`` (``--sparse``, mlp and lenet300): the batched side trains by the proxy's sparse route
  (``ProxySettings.sparse``) against today's dense one-at-a-time proxy; ``--sparsity`` sets the masks' sparsity
  (default 95%). With ``--sparse`` the episode rows' vectorised sides use it too (``episodes_sparse``).

Prints a markdown table; ``--json PATH`` writes one row per measurement with the keys ``model,
dataset, n, device, sequential_per_s, batched_per_s, speedup, max_abs_accuracy_diff`` (plus
``kind``, ``steps``, ``device_name``, and ``phase`` for episodes). Proxy rows of Linear-only networks also
carry the work done per second (``sequential_gflops``, ``batched_gflops``: the layers' multiply-adds, a lower
bound) beside ``peak_gflops``, what one large float32 matrix product reaches on the device: how close a
stacked proxy already is to the roof, which bounds the speed-up any batching can give. Not a test: run it by hand, e.g.

    .venv/bin/python benchmarks/bench_batched.py --model mlp --dataset digits --n 1,8,32
    .venv/bin/python benchmarks/bench_batched.py --device cuda --json benchmarks/results/gpu_batched.json
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import torch
from workers_rate import episode_rates  # this folder: the script's own, first on sys.path

from panning.alloc import tune_malloc
from panning.cli import OneLineParser, run_guarded
from panning.data import DataBundle, InMemoryDataset, balanced_batch, load_dataset
from panning.errors import UsageError
from panning.models import build_model
from panning.proxy import SPARSE_MODELS, ProxyEvaluator
from panning.pruner import prune
from panning.train import resolve_device

ROOT = Path(__file__).resolve().parents[1]
PROXY_ROWS = [("mlp", "digits", 200), ("lenet300", "mnist", 50), ("lenet5", "mnist", 50),
              ("resnet20", "cifar_random", 5)]
EPISODE_ROWS = [("mlp", "digits", ROOT / "configs/env/digits_mlp.yaml"),
                ("lenet300", "mnist", ROOT / "configs/env/mnist_lenet300.yaml")]


def data_dir() -> str | None:
    env = [os.environ["PANNING_DATA"]] if os.environ.get("PANNING_DATA") else []
    for c in env + [str(ROOT.parent / "shared" / "data")]:
        if Path(c, "MNIST", "raw").is_dir():
            return c
    return None


def bundle(name: str) -> DataBundle:
    if name == "cifar_random":
        g = torch.Generator().manual_seed(0)
        def make(n: int) -> InMemoryDataset:
            return InMemoryDataset(torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g))

        return DataBundle("cifar_random", make(2000), make(500), make(500), 10, (3, 32, 32), False)
    b = load_dataset(name, data_dir(), val_size=None)
    if name == "mnist":  # a 2 000-image validation split is plenty for throughput
        import dataclasses

        b = dataclasses.replace(b, val=b.val.subset(torch.arange(2000)))  # type: ignore[attr-defined]
    return b


def linear_flops(net: torch.nn.Module, train_samples: int, eval_samples: int) -> float | None:
    """Floating-point operations of a proxy run of a network of Linear layers only (None otherwise): 2 per
    multiply-add; per training sample the forward (``in * out`` a layer) and the backward (the weight's
    gradient, and the input's for every layer but the first, whose input needs none); per evaluated sample the
    forward. Biases, activations and the optimizer are left out (a lower bound on the work)."""
    if any(isinstance(m, (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)) for m in net.modules()):
        return None
    macs = [m.in_features * m.out_features for m in net.modules() if isinstance(m, torch.nn.Linear)]
    if not macs:
        return None
    return 2.0 * ((3 * sum(macs) - macs[0]) * train_samples + sum(macs) * eval_samples)


PEAK_SIZE = 2048  # the square float32 matrix product whose speed is the roof


def peak_gflops(device: torch.device, size: int = PEAK_SIZE, repeats: int = 5) -> float:
    """What this device's matrix product reaches (the roof a compute-bound proxy can approach): the median
    GFLOP/s of ``repeats`` float32 ``size x size`` products, with this process's thread count."""
    a, b = torch.randn(size, size, device=device), torch.randn(size, size, device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    a @ b
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        a @ b
        sync()
        times.append(time.perf_counter() - t0)
    return 2.0 * size**3 / float(np.median(times)) / 1e9


def profile_stacked(model: str, ds: str, steps: int, n: int, device: torch.device, sparsity: float = 0.95,
                    sparse: bool = False) -> str:
    """torch.profiler's table (operators by own time) of one stacked evaluation of ``n`` candidates: where a
    batched proxy's time goes."""
    from torch.profiler import ProfilerActivity, profile

    _, inits, masks, ev = _candidates(model, ds, steps, n, device, sparsity, sparse)
    ev.evaluate_many(inits[:2], masks[:2])  # warm-up
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        ev.evaluate_many(inits, masks)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return str(prof.key_averages().table(sort_by=key, row_limit=15))


def _candidates(model: str, ds: str, steps: int, n: int, device: torch.device, sparsity: float = 0.95,
                sparse: bool = False) -> tuple[DataBundle, list[torch.nn.Module], list, ProxyEvaluator]:
    """The data, ``n`` initialisations, their SNIP masks at ``sparsity`` and a stacking proxy evaluator
    (the sparse route with ``sparse``), caches off."""
    b = bundle(ds)
    inits = [build_model(model, b.num_classes, b.input_shape, seed=s).to(device) for s in range(n)]
    x, y = balanced_batch(b.train, 5, b.num_classes, seed=0)
    masks = [prune(m, "snip", sparsity, [(x.to(device), y.to(device))]).masks for m in inits]
    return b, inits, masks, ProxyEvaluator(b, steps=steps, cache_size=0, device=device, max_candidates=n,
                                           stacked=True, sparse=sparse)


def proxy_row(model: str, ds: str, steps: int, n: int, device: torch.device, sparsity: float = 0.95,
              sparse: bool = False, sequential_at_most: int | None = None) -> dict:
    """One proxy row: ``n`` candidates batched against one at a time. ``sequential_at_most``: time the one-at-a-time
    side on that many of the candidates only (each evaluation runs alone, so its rate does not depend on N;
    the accuracies are compared on those)."""
    b, inits, masks, ev = _candidates(model, ds, steps, n, device, sparsity, sparse)
    # one at a time is always today's dense route: the sparse rows measure the sparse route against it
    one_ev = ProxyEvaluator(b, steps=steps, cache_size=0, device=device) if sparse else ev
    one_ev.evaluate(inits[0], masks[0])  # warm-up (allocator, kernels) of both routes: vmap's first use costs too
    ev.evaluate_many(inits[:1], masks[:1])
    n_seq = n if sequential_at_most is None else min(n, sequential_at_most)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    one = [one_ev.evaluate(m, k) for m, k in zip(inits[:n_seq], masks[:n_seq], strict=True)]
    sync()
    t1 = time.perf_counter()
    many = ev.evaluate_many(inits, masks)
    sync()
    t2 = time.perf_counter()
    seq, bat = n_seq / (t1 - t0), n / (t2 - t1)
    # the dense count would overstate a sparse route's work (it skips the pruned weights)
    flops = None if sparse else linear_flops(inits[0], steps * ev.settings.batch_size, len(b.val))
    return {"kind": "proxy_sparse" if sparse else "proxy", "model": model, "dataset": ds, "n": n, "steps": steps,
            "sparsity": sparsity, "sequential_per_s": seq,
            "batched_per_s": bat, "speedup": bat / seq,
            "sequential_gflops": None if flops is None else seq * flops / 1e9,
            "batched_gflops": None if flops is None else bat * flops / 1e9,
            "sequential_timed": n_seq,
            "max_abs_accuracy_diff": max(abs(a.accuracy - c.accuracy) for a, c in zip(one, many[:n_seq], strict=True))}


def episode_rows(model: str, ds: str, cfg: Path, n: int, episodes: int, warmup: int,
                 device: torch.device, sparse: bool = False, rounds: int = 0) -> list[dict]:
    from stable_baselines3.common.vec_env import SubprocVecEnv

    from panning.agents.train import _EnvFactory
    from panning.envs.panning_env import make_config
    from panning.envs.vec_env import BatchedPanningVecEnv, SubprocBatchedVecEnv

    env_cfg = make_config(cfg, device=str(device), data_dir=data_dir())
    sub = SubprocVecEnv([_EnvFactory(env_cfg, 1, True) for _ in range(2)])
    try:
        seq = episode_rates(sub, episodes, 2, warmup, rounds)
    finally:
        sub.close()
    if sparse:  # the vectorised sides train their proxies by the sparse route; the two workers stay dense
        env_cfg = make_config(env_cfg, proxy={"sparse": True})
    # this process's threads: all cores
    bat = episode_rates(BatchedPanningVecEnv(env_cfg, n), episodes, n, warmup, rounds)
    two = SubprocBatchedVecEnv(env_cfg, n, 2, threads=1)  # N/2 stacked episodes in each of two processes
    try:
        bat2 = episode_rates(two, episodes, n, warmup, rounds)
    finally:
        two.close()
    rows = []
    for kind, b_rates in (("episodes" + "_sparse" * sparse, bat), ("episodes_2proc" + "_sparse" * sparse, bat2)):
        phases = [("cold", seq[0], b_rates[0]), ("warm", seq[1], b_rates[1])]
        if seq[2] and b_rates[2]:
            phases.append(("steady", seq[2][-1], b_rates[2][-1]))
        for phase, s, b in phases:
            if s is not None and b is not None:
                row = {"kind": kind, "phase": phase, "model": model, "dataset": ds, "n": n,
                       "steps": env_cfg.proxy.steps, "sequential_per_s": s, "batched_per_s": b,
                       "speedup": b / s, "max_abs_accuracy_diff": None}
                if phase == "steady":
                    row["rounds"] = {"sequential": seq[2], "batched": b_rates[2]}
                rows.append(row)
    return rows


def main() -> None:
    ap = OneLineParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model")
    ap.add_argument("--dataset")
    ap.add_argument("--n", default=None, help="comma-separated candidate counts (default 1,8,32; and 128 on CUDA)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--episodes", type=int, default=64, help="episodes per episode-row measurement")
    ap.add_argument("--warmup", type=int, default=128,
                    help="untimed episodes between the cold and the warm episode rows (0: cold rows only)")
    ap.add_argument("--steady-rounds", type=int, default=0,
                    help="after the warm rows, this many more rounds of --episodes; the last is the steady row")
    ap.add_argument("--skip-episodes", action="store_true")
    ap.add_argument("--skip-proxy", action="store_true")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                    help="torch threads of this process, for both sides of the proxy rows (default: all cores)")
    ap.add_argument("--sequential-at-most", type=int, default=None,
                    help="proxy rows: time the one-at-a-time side on at most this many of the N candidates (its rate "
                         "does not depend on N; accuracies compared on those); default all N")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--profile", action="store_true",
                    help="after the proxy rows, profile one stacked evaluation at the largest N of each proxy row")
    ap.add_argument("--sparse", action="store_true",
                    help="the batched side trains by the proxy's sparse route (ProxySettings.sparse; mlp and lenet300 "
                         "only), against today's dense one-at-a-time proxy and dense workers")
    ap.add_argument("--sparsity", type=float, default=0.95,
                    help="sparsity of the proxy rows' SNIP masks (default 0.95)")
    args = ap.parse_args()
    if args.sequential_at_most is not None and args.sequential_at_most < 1:
        raise UsageError(f"--sequential-at-most must be >= 1, got {args.sequential_at_most}")
    if not 0 <= args.sparsity < 1:
        raise UsageError(f"--sparsity must be in [0, 1), got {args.sparsity}")
    if args.steady_rounds < 0 or (args.steady_rounds and not args.warmup):
        raise UsageError(f"--steady-rounds must be >= 0 and needs --warmup > 0, got {args.steady_rounds} "
                         f"with --warmup {args.warmup}")
    if args.sparse and args.model not in SPARSE_MODELS:
        raise UsageError(f"--sparse measures the sparse route, which trains {' and '.join(SPARSE_MODELS)} only: add "
                         + " or ".join(f"--model {m}" for m in SPARSE_MODELS))
    tune_malloc()
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    ns = [int(v) for v in args.n.split(",")] if args.n else [1, 8, 32] + ([64, 128] if device.type == "cuda" else [])
    rows: list[dict] = []

    def keep(row: dict) -> None:
        # written after every row, so a crash or a time limit keeps what was measured (a GPU lease is short)
        row["device"], row["device_name"] = device.type, name
        rows.append(row)
        print(row, flush=True)
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(rows, indent=2) + "\n")

    proxy = [r for r in PROXY_ROWS if args.model in (None, r[0]) and args.dataset in (None, r[1])
             and not args.skip_proxy]
    episodes = [r for r in EPISODE_ROWS if args.model in (None, r[0]) and args.dataset in (None, r[1])
                and not args.skip_episodes]
    if not proxy and not episodes:
        rows_ = [f"{r[0]}/{r[1]} ({kind})" for kind, table in (("proxy", PROXY_ROWS), ("episodes", EPISODE_ROWS))
                 for r in table]
        raise UsageError(f"nothing to measure for --model {args.model} --dataset {args.dataset} with the --skip "
                         f"flags given; rows: {', '.join(rows_)}")
    peak = peak_gflops(device) if proxy else None
    for model, ds, steps in proxy:
        for n in ns:
            keep({**proxy_row(model, ds, steps, n, device, args.sparsity, args.sparse, args.sequential_at_most),
                  "peak_gflops": peak})
    for model, ds, steps in proxy if args.profile else []:
        print(f"\nprofile: one stacked evaluation, {model} / {ds}, N = {max(ns)}, {steps} steps\n"
              + profile_stacked(model, ds, steps, max(ns), device, args.sparsity, args.sparse), flush=True)
    for model, ds, cfg in episodes:
        for row in episode_rows(model, ds, cfg, max(ns), args.episodes, args.warmup, device, args.sparse,
                                args.steady_rounds):
            keep(row)
    print(f"\ndevice: {name}\n")
    print("| what | model / data | N | steps | one at a time /s | batched /s | speedup | max acc. diff |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        diff = "" if r["max_abs_accuracy_diff"] is None else f"{r['max_abs_accuracy_diff']:.4f}"
        seq_label = "2 workers" if r["kind"].startswith("episodes") else ""
        kind = f"{r['kind']} ({r['phase']})" if "phase" in r else f"{r['kind']} at {100 * r['sparsity']:g}%"
        print(f"| {kind} | {r['model']} / {r['dataset']} | {r['n']} | {r['steps']} | "
              f"{r['sequential_per_s']:.2f} {seq_label} | {r['batched_per_s']:.2f} | {r['speedup']:.2f}x | {diff} |")
    roof = [r for r in rows if r.get("sequential_gflops") is not None]
    if roof:
        print(f"\nLinear-layer work done per second (GFLOP/s, a lower bound: biases, activations and the optimizer "
              f"left out) against a {PEAK_SIZE}x{PEAK_SIZE} float32 matrix product's {peak:.0f} GFLOP/s on this "
              "device:")
        for r in roof:
            print(f"  proxy {r['model']} / {r['dataset']}, N = {r['n']}: one at a time {r['sequential_gflops']:.1f} "
                  f"({100 * r['sequential_gflops'] / peak:.0f}% of it), batched {r['batched_gflops']:.1f} "
                  f"({100 * r['batched_gflops'] / peak:.0f}%)")


if __name__ == "__main__":
    # bad flags or files: one line and exit 2, as the panning command does; a bug keeps its traceback
    raise SystemExit(run_guarded(main, Path(__file__).name))
