"""Cost of each saliency index relative to one plain forward+backward pass.

For every model and index, prints the median over repeats of the time of ``compute_scores``
divided by the time of one ordinary training forward+backward pass (``loss.backward()``) on the
same batch of random tensors (best of 3, measured right before each index run so that load drifts
on a shared machine cancel), as a markdown table, plus the machine it ran on.

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
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from panning.indices import available_indices, compute_scores  # noqa: E402

INPUT_SHAPES = {
    "lenet300": (1, 28, 28),  # MNIST
    "lenet5": (1, 28, 28),
    "resnet20": (3, 32, 32),  # CIFAR-10
    "vgg16": (3, 32, 32),
}
TARGETS = {"random": 2.0, "magnitude": 2.0, "snip": 2.0, "synflow": 2.0, "grasp": 5.0, "grasp_abs": 5.0, "fts": 3.0}
NUM_CLASSES = 10


# --------------------------------------------------------------------------- models

try:
    from panning.models import build_model
except ImportError:  # models module not written yet: minimal stand-ins with the same layouts

    class _Block(nn.Module):
        def __init__(self, f_in: int, f_out: int, stride: int) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(f_in, f_out, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(f_out)
            self.conv2 = nn.Conv2d(f_out, f_out, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(f_out)
            proj = stride != 1 or f_in != f_out
            self.shortcut = (
                nn.Sequential(nn.Conv2d(f_in, f_out, 1, stride, bias=False), nn.BatchNorm2d(f_out))
                if proj
                else nn.Identity()
            )

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = F.relu(self.bn1(self.conv1(x)))
            return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))

    def _resnet20(c: int, k: int) -> nn.Module:
        blocks, f_in = [], 16
        for stage, f in enumerate((16, 32, 64)):
            for b in range(3):
                blocks.append(_Block(f_in, f, 2 if stage and not b else 1))
                f_in = f
        return nn.Sequential(
            nn.Conv2d(c, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU(), *blocks,
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, k),
        )

    def _vgg16(c: int, k: int) -> nn.Module:
        plan = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]
        layers: list[nn.Module] = []
        for s in plan:
            if s == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(c, int(s), 3, padding=1), nn.BatchNorm2d(int(s)), nn.ReLU()]
                c = int(s)
        return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, k))

    def build_model(name: str, num_classes: int, input_shape, seed: int = 0, init: str = "kaiming_normal") -> nn.Module:
        torch.manual_seed(seed)
        c = input_shape[0]
        if name == "lenet300":
            flat = int(torch.tensor(input_shape).prod())
            return nn.Sequential(
                nn.Flatten(), nn.Linear(flat, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(), nn.Linear(100, num_classes)
            )
        if name == "lenet5":
            return nn.Sequential(
                nn.Conv2d(c, 20, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(20, 50, 5), nn.ReLU(), nn.MaxPool2d(2),
                nn.Flatten(), nn.Linear(50 * 4 * 4, 500), nn.ReLU(), nn.Linear(500, num_classes),
            )
        if name == "resnet20":
            return _resnet20(c, num_classes)
        if name == "vgg16":
            return _vgg16(c, num_classes)
        raise ValueError(f"unknown model {name!r}")


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
    index_fn: Callable[[], object], base_fn: Callable[[], object], repeats: int, warmup: int = 2
) -> tuple[float, float, float]:
    """Median over repeats of (index time / forward+backward time measured right before it).

    Pairing each index run with a fresh baseline makes the ratio robust to the load drifts of a
    shared machine. Returns (median ratio, median index seconds, median baseline seconds).
    """
    for _ in range(warmup):
        base_fn()
        index_fn()
    ratios, its, bts = [], [], []
    for _ in range(repeats):
        b = min(_timed(base_fn) for _ in range(3))
        t = _timed(index_fn)
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
    p.add_argument("--repeats", type=int, default=5, help="timed repeats per index (median of paired ratios; default 5)")
    p.add_argument("--models", default=",".join(INPUT_SHAPES), help="comma-separated: " + ",".join(INPUT_SHAPES))
    p.add_argument("--indices", default=",".join(available_indices()), help="comma-separated index names")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--quick", action="store_true", help="smoke test: batch 16, 3 repeats")
    args = p.parse_args(argv)
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

    print(f"# Saliency index cost / one forward+backward pass (batch {args.batch}, median of {args.repeats})\n")
    print(machine_info(device) + "\n")
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
            ratio, _, b = paired_ratio(lambda: compute_scores(idx, model, masks, [(x, y)]), fb, args.repeats)
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
