"""Episodes per second of K ``SubprocVecEnv`` workers (one thread each) of ``panning/Panning-v0``, random actions.

This is the "2 workers" side of ``bench_batched.py``'s episode rows, alone and written against the few names
every version of the project has had (``make_config``, ``PanningEnv``, the agents' ``_EnvFactory``), so that it
also runs on an old commit's code: issue 14 sets its episode target against the two workers of the day it was
filed, and the workers have grown faster since, with the rest of the code. To measure commit C:

    git worktree add /tmp/old C && ln -s ../envs /tmp/old/panning/envs && ln -s ../agents /tmp/old/panning/agents
    PYTHONPATH=/tmp/old .venv/bin/python benchmarks/workers_rate.py --config configs/env/digits_mlp.yaml

(the symbolic links give the checkout the installed layout, ``envs/`` as ``panning.envs``; the config is read by
that code, so it must know every key of the YAML). Phases as in ``bench_batched.py``: ``cold`` from a fresh start,
``warm`` after ``--warmup`` more untimed episodes, then ``--rounds`` steady rounds (the last is the steady rate).
Prints one JSON object and, with ``--json PATH``, writes it there. Not a test: run it alone on the machine.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def episode_rates(venv: Any, episodes: int, n: int, warmup: int, rounds: int = 0
                  ) -> tuple[float, float | None, list[float]]:
    """Episodes per second of ``venv`` (``n`` envs, random actions, seed 0) from a cold start (references computed
    as they come), and, with ``warmup``, again after that many more untimed episodes, and in each of ``rounds``
    more rounds after that (their last: the steady rate, every reference cached)."""
    rng = np.random.default_rng(0)
    venv.seed(0)
    venv.reset()

    def run(count: int) -> float:
        done = 0
        t0 = time.perf_counter()
        while done < count:
            _, _, dones, _ = venv.step(rng.uniform(-1, 1, size=(n, venv.action_space.shape[0])).astype(np.float32))
            done += int(dones.sum())
        return done / (time.perf_counter() - t0)

    cold = run(episodes)
    if not warmup:
        return cold, None, []
    run(warmup)
    return cold, run(episodes), [run(episodes) for _ in range(rounds)]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line and exit 2, as the project's commands do
        print(f"workers_rate.py: {message}", file=sys.stderr)
        raise SystemExit(2)


def main(argv: list[str] | None = None) -> None:
    ap = _Parser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--config", default=str(ROOT / "configs/env/digits_mlp.yaml"), help="env YAML")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--episodes", type=int, default=128, help="episodes per timed phase")
    ap.add_argument("--warmup", type=int, default=128, help="untimed episodes between cold and warm")
    ap.add_argument("--rounds", type=int, default=5, help="steady rounds after the warm phase")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = ap.parse_args(argv)
    if args.workers < 1 or args.episodes < 1 or args.warmup < 0 or args.rounds < 0:
        ap.error("--workers and --episodes must be >= 1, --warmup and --rounds >= 0")
    if args.rounds and not args.warmup:
        ap.error("--rounds needs --warmup > 0")
    if not Path(args.config).is_file():
        ap.error(f"no env config at {args.config}")
    if args.json is not None and not args.json.parent.is_dir():
        ap.error(f"the folder of --json {args.json} does not exist")

    from stable_baselines3.common.vec_env import SubprocVecEnv

    import panning
    from panning.agents.train import _EnvFactory
    from panning.envs.panning_env import make_config

    env_cfg = make_config(args.config, device="cpu", data_dir=os.environ.get("PANNING_DATA"))
    venv = SubprocVecEnv([_EnvFactory(env_cfg, 1, True) for _ in range(args.workers)])
    try:
        cold, warm, rounds = episode_rates(venv, args.episodes, args.workers, args.warmup, args.rounds)
    finally:
        venv.close()
    out = {"code": str(Path(panning.__file__).resolve().parents[1]), "config": str(args.config),
           "workers": args.workers, "episodes": args.episodes, "warmup": args.warmup, "cold": cold, "warm": warm,
           "rounds": rounds, "steady": rounds[-1] if rounds else None}
    print(json.dumps(out))
    if args.json is not None:
        args.json.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
