"""Cost of each saliency index relative to one plain forward+backward pass.

For every model and index, prints the median over repeats of the time of ``compute_scores``
divided by the time of one ordinary training forward+backward pass (``loss.backward()``) on the
same batch of random tensors, as a markdown table, plus the machine it ran on. Each repeat times the
pass and then the index, each as the best of ``--inner`` runs (the same number for both, so noise
on a shared machine does not favour either side), and takes their ratio.

Targets (CPU): magnitude, SNIP, SynFlow <= 2x; GraSP <= 5x; FTS <= 3x.

    python benchmarks/bench_indices.py                     # batch 128, 5 repeats, all models
    python benchmarks/bench_indices.py --quick             # batch 16, 3 repeats: smoke test
    python benchmarks/bench_indices.py --models lenet5,resnet20 --batch 64 --repeats 3
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from panning.alloc import tune_malloc
from panning.indices import available_indices, compute_scores
from panning.models import build_model

INPUT_SHAPES = {
    "lenet300": (1, 28, 28),  # MNIST
    "lenet5": (1, 28, 28),
    "resnet20": (3, 32, 32),  # CIFAR-10
    "vgg16": (3, 32, 32),
}
TARGETS = {"random": 2.0, "magnitude": 2.0, "snip": 2.0, "synflow": 2.0, "grasp": 5.0, "grasp_abs": 5.0, "fts": 3.0}
NUM_CLASSES = 10


def prunable_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """Dense bool masks over Conv/Linear weights (the prunable set of panning.masks)."""
    return {
        f"{n}.weight": torch.ones_like(m.weight, dtype=torch.bool)
        for n, m in model.named_modules()
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear))
    }


# --------------------------------------------------------------------------- timing


def _timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def paired_ratio(
    index_fn: Callable[[], object], base_fn: Callable[[], object], repeats: int, warmup: int = 2, inner: int = 3
) -> tuple[float, float, float]:
    """Median over repeats of (index time / forward+backward time measured right before it).

    Pairing each index run with a fresh baseline makes the ratio robust to the load drifts of a
    shared machine; both sides are the best of ``inner`` runs. Returns (median ratio, median index
    seconds, median baseline seconds).
    """
    for _ in range(warmup):
        base_fn()
        index_fn()
    ratios, its, bts = [], [], []
    for _ in range(repeats):
        b = min(_timed(base_fn) for _ in range(inner))
        t = min(_timed(index_fn) for _ in range(inner))
        ratios.append(t / b)
        its.append(t)
        bts.append(b)
    return statistics.median(ratios), statistics.median(its), statistics.median(bts)


def forward_backward(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    def run() -> None:
        model.train()
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()

    return run


def machine_info(device: torch.device) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = (
        f"python {platform.python_version()}, torch {torch.__version__}, {platform.system()} "
        f"{platform.release()}; CPU: {cpu} ({os.cpu_count()} logical cores, "
        f"torch threads {torch.get_num_threads()}); device: {device}"
    )
    if device.type == "cuda":
        info += f" ({torch.cuda.get_device_name(device)})"
    return info


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=128, help="samples per batch (default 128)")
    p.add_argument("--repeats", type=int, default=5,
                   help="timed repeats per index (median of paired ratios; default 5)")
    p.add_argument("--inner", type=int, default=3, help="runs per timing, best taken, for both sides (default 3)")
    p.add_argument("--models", default=",".join(INPUT_SHAPES), help="comma-separated: " + ",".join(INPUT_SHAPES))
    p.add_argument("--indices", default=",".join(available_indices()), help="comma-separated index names")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--no-tune-malloc", action="store_true",
                   help="leave glibc's allocator as it is (the panning command tunes it; see panning/alloc.py)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--quick", action="store_true", help="smoke test: batch 16, 3 repeats")
    args = p.parse_args(argv)
    tuned = False if args.no_tune_malloc else tune_malloc()
    if args.quick:
        args.batch, args.repeats = 16, 3
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    indices = [i.strip() for i in args.indices.split(",") if i.strip()]
    unknown = [m for m in models if m not in INPUT_SHAPES]
    if unknown:
        p.error(f"unknown models {unknown}; choose from {list(INPUT_SHAPES)}")

    print(f"# Saliency index cost / one forward+backward pass (batch {args.batch}, median of {args.repeats} "
          f"paired ratios, each side best of {args.inner})\n")
    print(machine_info(device) + f"; glibc malloc tuned: {tuned}\n")
    header = "| model | params | fwd+bwd (ms) | " + " | ".join(f"{i} (≤{TARGETS.get(i, 0):g}x)" for i in indices) + " |"
    print(header)
    print("|" + "---|" * (3 + len(indices)))
    missed = []
    for name in models:
        shape = INPUT_SHAPES[name]
        model = build_model(name, NUM_CLASSES, shape, seed=0).to(device)
        gen = torch.Generator().manual_seed(0)
        x = torch.randn((args.batch, *shape), generator=gen).to(device)
        y = torch.randint(0, NUM_CLASSES, (args.batch,), generator=gen).to(device)
        masks = prunable_masks(model)
        n_params = sum(m.numel() for m in masks.values())
        fb = forward_backward(model, x, y)
        cells, bases = [], []
        for idx in indices:
            ratio, _, b = paired_ratio(
                lambda idx=idx, model=model, masks=masks, x=x, y=y: compute_scores(idx, model, masks, [(x, y)]),
                fb, args.repeats, inner=args.inner
            )
            bases.append(b)
            ok = ratio <= TARGETS.get(idx, float("inf"))
            if not ok:
                missed.append(f"{name}/{idx}: {ratio:.2f}x")
            cells.append(f"{ratio:.2f}x{'' if ok else ' ✗'}")
        base = statistics.median(bases)
        model.zero_grad(set_to_none=True)
        print(f"| {name} | {n_params / 1e6:.2f}M | {base * 1e3:.1f} | " + " | ".join(cells) + " |", flush=True)
    print()
    print("targets missed: " + (", ".join(missed) if missed else "none"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
