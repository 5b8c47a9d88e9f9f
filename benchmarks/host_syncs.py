"""Host reads of device values per episode step: the calls that, on a GPU, wait for the device.

Issue 14 asks that a step stay on the device except for handing SB3 its arrays. Every ``.item()``,
``int()``, ``float()``, ``bool()``, ``.tolist()``, ``.cpu()``, ``.numpy()`` and ``nonzero()`` of a tensor
is such a read on CUDA (it blocks until the queued work is done). This counts them through a
:class:`torch.overrides.TorchFunctionMode` while a ``BatchedPanningVecEnv`` steps random actions, and
names the library lines that make them. It runs on the CPU: the count is a property of the code, not of
the device. The whole run takes the routes written for accelerators (``panning._functional.device_routes``:
torch kernels where the CPU uses numpy, sorts where it selects per layer), so their reads are counted, not
assumed. The one exception is the digests' copy (the proxy's cache key): on the CPU it copies tensor by
tensor, on a GPU all of a digest's tensors in one transfer, so each digest counts as the 2 reads it makes
there.

    .venv/bin/python benchmarks/host_syncs.py [--model mlp --dataset digits] [--n 4] [--steps 20]
"""
from __future__ import annotations

import collections
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import torch

from panning import hashing
from panning._functional import HostReads, device_routes
from panning.cli import OneLineParser, run_guarded
from panning.envs.vec_env import BatchedPanningVecEnv

# the digests' copy per tensor: on a GPU one transfer per digest (2 reads: .cpu() and .numpy())
CPU_ONLY = ("_host_arrays",)


class WhereRead(HostReads):
    """The library's host-read counter, also tallying the innermost library line of each read."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: collections.Counter[str] = collections.Counter()
        self.cpu_only = 0
        self.on = False

    def record(self, func: object) -> None:
        lib = [f for f in traceback.extract_stack()[:-2] if "/panning/" in f.filename]
        self.cpu_only += any(f.name in CPU_ONLY for f in lib)
        if lib:
            f = lib[-1]
            self.lines[f"{f.filename.rsplit('/panning/', 1)[-1]}:{f.lineno} {f.name}"] += 1


def main(argv: list[str] | None = None) -> None:
    ap = OneLineParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/env/digits_mlp.yaml")
    ap.add_argument("--model", default=None)
    ap.add_argument("--dataset", default=None)
    ap.add_argument("--n", type=int, default=4, help="episodes stepped together")
    ap.add_argument("--steps", type=int, default=20, help="env steps counted (10 pruning steps an episode)")
    ap.add_argument("--top", type=int, default=15)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    overrides: dict[str, Any] = {"init_seeds": 0, "target_grid": 0, "target_range": [0.98, 0.998], "layer_actions": 3,
                                 "observation": "layers"}
    if args.model:
        overrides["model"] = args.model
    if args.dataset:
        overrides["dataset"] = args.dataset
    env = BatchedPanningVecEnv(args.config, args.n, **overrides)
    env.seed(0)
    env.reset()
    rng = np.random.default_rng(0)
    reads = WhereRead()
    digests = [0]
    gather = getattr(hashing, "_host_arrays", None)  # absent before the digests gathered their copies

    def counted(*a: Any, **k: Any) -> Any:
        digests[0] += 1
        return gather(*a, **k)  # type: ignore[misc]

    if gather is not None:  # a GPU copies each digest's tensors at once
        hashing._host_arrays = counted  # type: ignore[assignment]
    try:
        with reads, device_routes():
            for _ in range(args.steps):
                actions = rng.uniform(-1, 1, (args.n, *env.action_space.shape)).astype(np.float32)
                reads.on = True
                env.step(actions)
                reads.on = False
    finally:
        if gather is not None:
            hashing._host_arrays = gather  # type: ignore[assignment]
    per = args.n * args.steps
    total = reads.n
    cpu_only = reads.cpu_only - 2 * digests[0]  # on a GPU: one .cpu() and one .numpy() a digest
    layers = len(env.envs[0].episode.masks)
    print(f"{env.envs[0].config.model} / {env.envs[0].config.dataset}, {layers} prunable layers, N = {args.n}, "
          f"{args.steps} env steps (rewards and references included)")
    print(f"host reads per episode step on a GPU's routes: {(total - cpu_only) / per:.1f}, "
          f"per step of all {args.n} episodes {(total - cpu_only) / args.steps:.1f} "
          f"(digests counted as one transfer each; {total / per:.1f} per episode step with their CPU copies)")
    print("by kind: " + ", ".join(f"{k} {v / per:.1f}" for k, v in sorted(reads.kinds.items(), key=lambda kv: -kv[1])))
    for line, v in reads.lines.most_common(args.top):
        print(f"{v / per:8.1f}  {line}")


if __name__ == "__main__":
    # bad flags or files: one line and exit 2, as the panning command does; a bug keeps its traceback
    raise SystemExit(run_guarded(main, Path(__file__).name))
