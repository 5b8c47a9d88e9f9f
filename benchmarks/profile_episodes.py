"""Where a vectorised episode's time goes: a cProfile of ``BatchedPanningVecEnv`` stepping random actions.

Issue 14 asks, where its episode target is missed, where the time goes. This steps N episodes of one env
config with random actions, untimed for ``--warmup`` episodes (so that the references are cached, as in
``bench_batched.py``'s steady phase), then profiles ``--episodes`` more and prints the env step's stages
(cumulative seconds and share of the step: what a vectorised step calls, from ``envs/vec_env.py`` down) and
the functions with the most time of their own. One process: run it beside nothing else.

    PANNING_DATA=../shared/data .venv/bin/python benchmarks/profile_episodes.py [--config configs/env/digits_mlp.yaml]
        [--model M --dataset D] [--n 16] [--warmup 384] [--episodes 128] [--sparse] [--threads 1] [--top 15]
        [--json PATH]
"""
from __future__ import annotations

import cProfile
import json
import pstats
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from panning.alloc import tune_malloc
from panning.cli import OneLineParser, run_guarded
from panning.errors import UsageError

ROOT = Path(__file__).resolve().parents[1]

#: (stage, file the function is in, function name, depth): the depth-0 functions never call one another (a step
#: takes either route: step_observe_many in the middle of the episodes, step_many at their end), so their times
#: add up to at most the env step's; depth 1 is what the depth-0 one above spends on
STAGES = [
    ("pruning: scoring and selection (_select)", "panning/episode.py", "_select", 0),
    ("pruning: connectivity (effective_begin)", "panning/connectivity.py", "effective_begin", 0),
    ("pruning: loss/gradient signals (signal_rows)", "panning/episode.py", "signal_rows", 0),
    ("pruning: the host half (_step_values)", "panning/episode.py", "_step_values", 0),
    ("rewards: the proxy (_rewards)", "envs/vec_env.py", "_rewards", 0),
    ("scoring for the observation (_prefill)", "envs/vec_env.py", "_prefill", 0),
    ("observation: device half (_observe_begin)", "panning/episode.py", "_observe_begin", 0),
    ("of which: per-index features", "panning/episode.py", "_index_features_begin", 1),
    ("of which: per-layer features", "panning/episode.py", "_layer_index_features_begin", 1),
    ("observation: host half (_observe_end)", "panning/episode.py", "_observe_end", 0),
    ("the step's host reads (read_together)", "panning/_functional.py", "read_together", 0),
]


def _cumulative(stats: pstats.Stats, path: str, name: str) -> float:
    """Cumulative seconds of every function called ``name`` in a file ending with ``path`` (the installed layout
    puts envs/ under panning/, so the file's last two parts are compared)."""
    tail = path.split("/")[-2:]
    total = 0.0
    for (filename, _, func), (_, _, _, ct, _) in stats.stats.items():  # type: ignore[attr-defined]
        if func == name and Path(filename).parts[-2:] == tuple(tail):
            total += ct
    return total


def profile(config: str | Path, n: int, warmup: int, episodes: int, overrides: dict[str, Any], top: int
            ) -> dict[str, Any]:
    """Step ``warmup`` then ``episodes`` random-action episodes of ``n`` at once, profiling the second part;
    the stages' cumulative seconds, the profiled wall time and rate, and the top functions by own time."""
    from panning.envs.panning_env import make_config
    from panning.envs.vec_env import BatchedPanningVecEnv

    venv = BatchedPanningVecEnv(make_config(config, **overrides), n)
    rng = np.random.default_rng(0)
    venv.seed(0)
    venv.reset()

    def run(count: int) -> int:
        done = 0
        while done < count:
            _, _, dones, _ = venv.step(rng.uniform(-1, 1, (n, venv.action_space.shape[0])).astype(np.float32))
            done += int(dones.sum())
        return done

    run(warmup)
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    done = run(episodes)
    prof.disable()
    wall = time.perf_counter() - t0
    venv.close()
    stats = pstats.Stats(prof)
    step = _cumulative(stats, "envs/vec_env.py", "step_wait")
    stages = [{"stage": label, "depth": depth, "seconds": _cumulative(stats, path, name)}
              for label, path, name, depth in STAGES]
    own = sorted(stats.stats.items(), key=lambda kv: -kv[1][2])[:top]  # type: ignore[attr-defined]
    return {"n": n, "episodes": done, "wall_s": wall, "episodes_per_s": done / wall, "step_s": step,
            "stages": stages,
            "own_time": [{"function": func if fn == "~" else f"{Path(fn).name}:{line}({func})", "seconds": tt}
                         for (fn, line, func), (_, _, tt, _, _) in own]}


def main(argv: list[str] | None = None) -> None:
    ap = OneLineParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "env" / "digits_mlp.yaml"))
    ap.add_argument("--model", default=None)
    ap.add_argument("--dataset", default=None)
    ap.add_argument("--n", type=int, default=16, help="episodes stepped together")
    ap.add_argument("--warmup", type=int, default=384, help="episodes run untimed first (references cached)")
    ap.add_argument("--episodes", type=int, default=128, help="episodes profiled")
    ap.add_argument("--sparse", action="store_true", help="the proxy's sparse route (mlp and lenet300)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: one of bench_batched's two processes)")
    ap.add_argument("--top", type=int, default=15, help="functions listed by their own time")
    ap.add_argument("--json", default=None, help="also write the figures to this file")
    args = ap.parse_args(argv)
    for flag, value, low in (("--n", args.n, 1), ("--episodes", args.episodes, 1), ("--warmup", args.warmup, 0),
                             ("--threads", args.threads, 1), ("--top", args.top, 0)):
        if value < low:
            raise UsageError(f"{flag} must be >= {low}, got {value}")
    if args.json and not Path(args.json).resolve().parent.is_dir():  # found now, not after the profile's minutes
        raise UsageError(f"--json {args.json}: its folder does not exist; create it or choose another path")
    overrides: dict[str, Any] = {"device": "cpu"}  # the data folder: the config's, else $PANNING_DATA
    if args.model:
        overrides["model"] = args.model
    if args.dataset:
        overrides["dataset"] = args.dataset
    if args.sparse:
        overrides["proxy"] = {"sparse": True}
    tune_malloc()
    torch.set_num_threads(args.threads)
    out = profile(args.config, args.n, args.warmup, args.episodes, overrides, args.top)
    print(f"{out['episodes']} episodes, N = {args.n}, {args.threads} thread(s), after {args.warmup} warm-up "
          f"episodes: {out['wall_s']:.2f} s profiled ({out['episodes_per_s']:.2f} episodes/s under the profiler)\n")
    print("| stage | seconds | share of the env step |\n|---|---|---|")
    print(f"| env step (step_wait) | {out['step_s']:.2f} | 100% |")
    for s in out["stages"]:
        share = s["seconds"] / out["step_s"] if out["step_s"] else 0.0
        print(f"| {s['stage']} | {s['seconds']:.2f} | {share:.0%} |")
    if out["own_time"]:
        print("\n| function (own time) | seconds |\n|---|---|")
        for f in out["own_time"]:
            print(f"| {f['function']} | {f['seconds']:.2f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({**vars(args), **out}, indent=1) + "\n")


if __name__ == "__main__":
    # bad flags or files: one line and exit 2, as the panning command does; a bug keeps its traceback
    raise SystemExit(run_guarded(main, Path(__file__).name))
