"""Host reads of device values per episode step: the calls that, on a GPU, wait for the device.

Issue 14 asks that a step stay on the device except for handing SB3 its arrays. Every ``.item()``,
``int()``, ``float()``, ``bool()``, ``.tolist()``, ``.cpu()``, ``.numpy()`` and ``nonzero()`` of a tensor
is such a read on CUDA (it blocks until the queued work is done). This counts them through a
:class:`torch.overrides.TorchFunctionMode` while a ``BatchedPanningVecEnv`` steps random actions, and
names the library lines that make them. It runs on the CPU: the count is a property of the code, not of
the device. CPU-only routes (the per-layer ``kthvalue`` loop, the digests' copy per tensor) are counted
apart: on a GPU the first sorts instead and the second copies all tensors in one transfer.

    .venv/bin/python benchmarks/host_syncs.py [--model mlp --dataset digits] [--n 4] [--steps 20]
"""
from __future__ import annotations

import collections
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import torch

from panning import episode as episode_mod
from panning import hashing
from panning import masks as masks_mod
from panning._functional import HostReads
from panning.cli import OneLineParser, run_guarded
from panning.envs.vec_env import BatchedPanningVecEnv

# CPU-only routes: layer_quantiles' per-layer loop (CUDA sorts instead), order_statistics' numpy selection
# (torch.kthvalue off the CPU, which reads nothing), _host_arrays' copy per tensor
# (tensors on one GPU are copied in one transfer: 2 reads a digest there) and _topk_mask's tie handling
# (off the CPU it hands over to _topk_mask_on_device, which reads nothing: checked with --device-topk), and
# all_finite's numpy check (off the CPU torch.isfinite().all(), left on the device; its caller's read is counted)
CPU_ONLY = ("layer_quantiles", "order_statistics", "_host_arrays", "_topk_mask", "all_finite")


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
    ap.add_argument("--device-topk", action="store_true",
                    help="take _topk_mask's GPU route on the CPU too, to count its reads rather than assume them")
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
    topk = masks_mod._topk_mask
    if args.device_topk:  # the masks module's selections and the episode's features (it imports the function)
        def device_topk(flat: torch.Tensor, k: int) -> torch.Tensor:
            return topk(flat, k) if k <= 0 or k >= flat.numel() else masks_mod._topk_mask_on_device(flat, k)

        masks_mod._topk_mask = episode_mod._topk_mask = device_topk  # type: ignore[assignment]
    try:
        with reads:
            for _ in range(args.steps):
                actions = rng.uniform(-1, 1, (args.n, *env.action_space.shape)).astype(np.float32)
                reads.on = True
                env.step(actions)
                reads.on = False
    finally:
        if gather is not None:
            hashing._host_arrays = gather  # type: ignore[assignment]
        masks_mod._topk_mask = episode_mod._topk_mask = topk  # type: ignore[assignment]
    per = args.n * args.steps
    total = reads.n
    cpu_only = reads.cpu_only - 2 * digests[0]  # on a GPU: one .cpu() and one .numpy() a digest
    layers = len(env.envs[0].episode.masks)
    print(f"{env.envs[0].config.model} / {env.envs[0].config.dataset}, {layers} prunable layers, N = {args.n}, "
          f"{args.steps} env steps (rewards and references included)")
    print(f"host reads per episode step: {total / per:.1f} ({(total - cpu_only) / per:.1f} on a GPU's route; "
          f"{cpu_only / per:.1f} on CPU-only routes)")
    print("by kind: " + ", ".join(f"{k} {v / per:.1f}" for k, v in sorted(reads.kinds.items(), key=lambda kv: -kv[1])))
    for line, v in reads.lines.most_common(args.top):
        print(f"{v / per:8.1f}  {line}")


if __name__ == "__main__":
    # bad flags or files: one line and exit 2, as the panning command does; a bug keeps its traceback
    raise SystemExit(run_guarded(main, Path(__file__).name))
