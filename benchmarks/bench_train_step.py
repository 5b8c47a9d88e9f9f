"""Cost of keeping pruned weights at zero during training: one SGD step with and without masks.

Times one training step (forward, backward, SGD with momentum and weight decay) of a model under
98% random masks, three ways, interleaved so that load drifts on a shared machine hit all alike:

- ``dense``: no masks at all (the floor);
- ``enforce``: :func:`panning.masks.enforce`, as training uses it (bit-AND zeroing, cached);
- ``masked_fill``: the same guarantees written the plain way (a gradient hook returning
  ``grad.masked_fill(~mask, 0)`` and re-zeroing weights and momentum with ``masked_fill_`` after
  each step), which is what ``enforce`` did before it switched to bit-AND zeroing;
- ``enforce_nhwc`` (networks with convolutions): ``enforce`` on a channels_last model and input,
  which is how :func:`panning.train.train_masked` and the proxy train conv nets on the CPU.

Prints the median milliseconds per step and each variant's overhead over ``dense``.

    python benchmarks/bench_train_step.py --threads 1                 # LeNet-300-100, batch 100
    python benchmarks/bench_train_step.py --model lenet5 --threads 1
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from panning.alloc import tune_malloc
from panning.cli import OneLineParser, run_guarded
from panning.masks import Masks, enforce, prunable_parameters
from panning.models import build_model
from panning.train import cpu_channels_last

SHAPES = {"lenet300": (1, 28, 28), "lenet5": (1, 28, 28), "mlp": (64,), "resnet20": (3, 32, 32), "vgg16": (3, 32, 32)}


def masked_fill_reference(model: torch.nn.Module, masks: Masks, opt: torch.optim.Optimizer) -> list:
    """The plain formulation of :func:`enforce`: masked_fill in a grad hook and after every step."""
    params = prunable_parameters(model)
    pruned = {k: ~masks[k] for k in masks}

    def zero_state() -> None:
        with torch.no_grad():
            for k, p in params.items():
                p.masked_fill_(pruned[k], 0)
                for v in opt.state.get(p, {}).values():
                    if isinstance(v, torch.Tensor) and v.shape == p.shape:
                        v.masked_fill_(pruned[k], 0)

    handles = [p.register_hook(lambda g, m=pruned[k]: g.masked_fill(m, 0)) for k, p in params.items()]
    zero_state()
    handles.append(opt.register_step_post_hook(lambda *_: zero_state()))
    return handles


def main(argv: list[str] | None = None) -> int:
    p = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="lenet300", choices=sorted(SHAPES))
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--steps", type=int, default=200, help="steps per timed block")
    p.add_argument("--rounds", type=int, default=7, help="interleaved rounds (median over them)")
    p.add_argument("--density", type=float, default=0.02)
    p.add_argument("--no-tune-malloc", action="store_true",
                   help="leave glibc's allocator as it is (the panning command tunes it; see panning/alloc.py)")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    tuned = False if args.no_tune_malloc else tune_malloc()
    if args.threads:
        torch.set_num_threads(args.threads)
    shape = SHAPES[args.model]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, *shape, generator=g)
    y = torch.randint(0, 10, (args.batch,), generator=g)

    def setup(variant: str):
        model = build_model(args.model, 10, shape, seed=0)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
        masks = Masks({k: torch.rand(q.shape, generator=torch.Generator().manual_seed(1)) < args.density
                       for k, q in prunable_parameters(model).items()})
        if variant == "enforce_nhwc" and not layouts.enter_context(cpu_channels_last(model, torch.device("cpu"), x)):
            return None  # the library would train this model in NCHW: nothing to compare
        if variant.startswith("enforce"):
            enforce(model, masks, opt)
        elif variant == "masked_fill":
            masked_fill_reference(model, masks, opt)
        return model, opt

    # the same rule and conversion as train_masked, held open for the whole benchmark
    layouts = contextlib.ExitStack()
    setups = {v: setup(v) for v in ["dense", "enforce", "masked_fill"]}
    nhwc = setup("enforce_nhwc")
    has_conv = nhwc is not None
    if nhwc is not None:
        setups["enforce_nhwc"] = nhwc
    variants = list(setups)
    x_nhwc = x.contiguous(memory_format=torch.channels_last) if has_conv else x

    def block(v: str) -> float:
        model, opt = setups[v]
        xb = x_nhwc if v == "enforce_nhwc" else x
        t0 = time.perf_counter()
        for _ in range(args.steps):
            loss = F.cross_entropy(model(xb), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return (time.perf_counter() - t0) / args.steps * 1e3

    for v in variants:  # warm-up
        block(v)
    times: dict[str, list[float]] = {v: [] for v in variants}
    for _ in range(args.rounds):
        for v in variants:
            times[v].append(block(v))
    med = {v: statistics.median(t) for v, t in times.items()}
    print(f"# {args.model}, batch {args.batch}, density {args.density}, torch threads {torch.get_num_threads()}, "
          f"median of {args.rounds} rounds x {args.steps} steps, glibc malloc tuned: {tuned}\n")
    print("| variant | ms/step | over dense |")
    print("|---|---|---|")
    for v in variants:
        print(f"| {v} | {med[v]:.2f} | {med[v] / med['dense']:.2f}x |")
    print(f"\nenforce vs masked_fill: {med['masked_fill'] / med['enforce']:.2f}x faster per step")
    if has_conv:
        print(f"enforce_nhwc (channels_last, as CPU training runs conv nets) vs enforce: "
              f"{med['enforce'] / med['enforce_nhwc']:.2f}x faster per step")
    return 0


if __name__ == "__main__":
    # bad flags or files: one line and exit 2, as the panning command does; a bug keeps its traceback
    raise SystemExit(run_guarded(main, Path(__file__).name))
