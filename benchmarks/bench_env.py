"""Speed of ``panning/Panning-v0``: env steps per second and seconds per episode, split by stage.

Runs a few episodes with seeded random actions on each given env config (on the CPU unless
``--device`` says otherwise) and reports, per episode:

- ``score``: the saliency indices on the current masked network (observation time; the step reuses them),
- ``select``: combining normalised scores and top-k selection (``Pruner.step``),
- ``connectivity``: effective masks / collapse check,
- ``signal``: loss and gradient norm of the masked network on the scoring batch,
- ``features``: the rest of the observation (index agreement and score statistics, layer densities),
- ``proxy``: the proxy training + validation at the final step,
- ``reference``: the single-index references of a relative reward (paid once per target and init, then cached),
- ``reset``: building the network, dense signals and the first scoring.

``steps/s`` counts pruning steps over wall time without proxy and reference; ``s/episode`` is the
whole episode. Not a test: run it by hand, e.g.

    .venv/bin/python benchmarks/bench_env.py                           # mlp/digits and lenet300/mnist
    .venv/bin/python benchmarks/bench_env.py --configs configs/env/digits_mlp.yaml --episodes 5
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import torch

from panning.cli import OneLineParser, run_guarded
from panning.envs.panning_env import PanningEnv
from panning.episode import PruningEpisode

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("reset", "score", "select", "connectivity", "signal", "features", "proxy", "reference")


def shared_data_dir() -> str | None:
    for c in (([os.environ["PANNING_DATA"]] if os.environ.get("PANNING_DATA") else [])
              + [str(ROOT.parent / "shared" / "data")]):
        if (Path(c) / "MNIST" / "raw").is_dir():
            return c
    return None


def bench(config: str, episodes: int, device: str, reward: str | None, seed: int) -> dict[str, float]:
    overrides: dict = {"device": device}
    if reward:
        overrides["reward"] = reward
    if "mnist" in Path(config).name and shared_data_dir():
        overrides["data_dir"] = shared_data_dir()
    t0 = time.perf_counter()
    env = PanningEnv(config, **overrides)
    setup = time.perf_counter() - t0
    rng = np.random.default_rng(seed)
    totals = dict.fromkeys(STAGES, 0.0)
    wall = 0.0
    steps = 0
    # a warm-up episode (first optimiser / autograd use imports and JITs things), not counted
    env.reset(seed=10_000)
    done = False
    while not done:
        done = env.step(np.zeros(env.action_space.shape, np.float32))[2]
    for ep in range(episodes):
        t0 = time.perf_counter()
        _, info = env.reset(seed=seed + ep)
        totals["reset"] += time.perf_counter() - t0
        done = False
        while not done:
            a = rng.uniform(-1, 1, env.action_space.shape).astype(np.float32)
            _, _, done, _, info = env.step(a)
            steps += 1
            for k in ("score", "select", "connectivity", "signal", "features"):
                totals[k] += info["timing"][k]
        totals["proxy"] += info.get("proxy_seconds", 0.0)
        totals["reference"] += info.get("reference_seconds", 0.0)
        wall += time.perf_counter() - t0
    prune_wall = wall - totals["proxy"] - totals["reference"]
    return {
        "config": config, "model": env.config.model, "dataset": env.config.dataset, "T": env.config.pruning_steps,
        "prunable": env.num_prunable, "proxy_steps": env.config.proxy_steps, "setup_s": setup,
        "steps_per_s": steps / prune_wall, "s_per_episode": wall / episodes,
        **{f"{k}_s": v / episodes for k, v in totals.items()},
        "other_s": (wall - sum(totals.values())) / episodes,
    }


def main(argv: list[str] | None = None) -> None:
    ap = OneLineParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--configs", nargs="+", default=[str(ROOT / "configs/env/digits_mlp.yaml"),
                                                     str(ROOT / "configs/env/mnist_lenet300.yaml")])
    ap.add_argument("--episodes", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--reward", choices=["absolute", "relative", "relative_loss"], default=None,
                    help="override the configs' reward (the relative ones add the one-off reference cost)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    # queued CUDA work would otherwise be charged to whichever later stage waits for it
    PruningEpisode.sync_timing = args.device != "cpu"
    rows = []
    for c in args.configs:
        if "mnist" in Path(c).name and not shared_data_dir() and not os.environ.get("PANNING_DATA"):
            print(f"skipping {c}: MNIST files not found (set PANNING_DATA)")
            continue
        rows.append(bench(c, args.episodes, args.device, args.reward, args.seed))
    print(f"device {args.device}, {args.threads} thread(s), {args.episodes} episodes each, random actions\n")
    cols = ["steps_per_s", "s_per_episode"] + [f"{k}_s" for k in STAGES] + ["other_s"]
    print(f"{'model/data':<18} {'T':>3} {'weights':>8} {'proxy':>6} "
          + " ".join(f"{c[:-2] if c.endswith('_s') else c:>12}" for c in cols))
    for r in rows:
        print(f"{r['model'] + '/' + r['dataset']:<18} {r['T']:>3} {r['prunable']:>8} {r['proxy_steps']:>6} "
              + " ".join(f"{r[c]:>12.3f}" for c in cols))


if __name__ == "__main__":
    # bad flags or files: one line and exit 2, as the panning command does; a bug keeps its traceback
    raise SystemExit(run_guarded(main, Path(__file__).name))
