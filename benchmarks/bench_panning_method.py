"""Time of the ``panning`` method (and its authors' variant) on LeNet-5-Caffe, MNIST, 99%, 100 steps.

The setting of issue #17's item 6: 100 scoring samples (10 per class, from the MNIST training split when
``--data`` or ``$PANNING_DATA`` has it, else random tensors of MNIST's shape), 1 thread by default. Prints,
for each method and for ``share_passes`` off and on, the median wall time over ``--repeats`` runs, the
per-step split into scoring and selection from the pruner's history, and a SHA-256 of the masks, so two
runs (or two versions of the code, run one after the other) can be compared on the same masks.

    python benchmarks/bench_panning_method.py --repeats 3
    python benchmarks/bench_panning_method.py --methods panning --json out.json
"""
from __future__ import annotations

import hashlib
import inspect
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from panning.cli import OneLineParser, run_guarded
from panning.models import build_model
from panning.pruner import prune


def scoring_batch(data: str | None, per_class: int = 10) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``per_class`` MNIST training images of each class (the first ones), or random tensors without data."""
    if data and (Path(data) / "MNIST" / "raw").is_dir():
        from panning.data import load_dataset

        bundle = load_dataset("mnist", data, seed=0)
        xs, ys, counts = [], [], [0] * 10
        for x, y in bundle.train:
            c = int(y)
            if counts[c] < per_class:
                xs.append(x)
                ys.append(c)
                counts[c] += 1
            if sum(counts) == 10 * per_class:
                break
        return [(torch.stack(xs), torch.tensor(ys))]
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(10 * per_class, 1, 28, 28, generator=g), torch.arange(10 * per_class) % 10)]


def masks_sha(masks) -> str:
    h = hashlib.sha256()
    for k, m in masks.items():
        h.update(k.encode())
        h.update(m.cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def main() -> None:
    ap = OneLineParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default="panning,panning_authors")
    ap.add_argument("--model", default="lenet5")
    ap.add_argument("--sparsity", type=float, default=0.99)
    ap.add_argument("--iterations", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--data", default=os.environ.get("PANNING_DATA"))
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    batches = scoring_batch(args.data)
    net = build_model(args.model, 10, (1, 28, 28), seed=0)
    # before share_passes existed, prune() had no such argument: time it as it was
    sharing = [False, True] if "share_passes" in inspect.signature(prune).parameters else [None]
    rows = []
    for method in args.methods.split(","):
        for share in sharing:
            kw = {} if share is None else {"share_passes": share}
            times, score_ms, select_ms, sha = [], [], [], set()
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                r = prune(net, method, args.sparsity, batches, iterations=args.iterations, **kw)
                times.append(time.perf_counter() - t0)
                score_ms.append(1000 * statistics.mean(h.score_seconds for h in r.history))
                select_ms.append(1000 * statistics.mean(h.select_seconds for h in r.history))
                sha.add(masks_sha(r.masks))
            assert len(sha) == 1, f"{method}: masks differ between repeats"
            rows.append({"method": method, "share_passes": share, "seconds": statistics.median(times),
                         "score_ms_per_step": statistics.median(score_ms),
                         "select_ms_per_step": statistics.median(select_ms), "masks_sha256": sha.pop()})
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {args.threads} thread(s)"
    print(f"# {args.model}, {args.sparsity:.0%}, {args.iterations} steps, {batches[0][0].shape[0]} scoring samples; "
          f"{machine}; torch {torch.__version__}; median of {args.repeats}")
    print("| method | share_passes | seconds | scoring ms/step | selection ms/step | masks |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['share_passes']} | {r['seconds']:.2f} | {r['score_ms_per_step']:.1f} | "
              f"{r['select_ms_per_step']:.1f} | {r['masks_sha256']} |")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "rows": rows}, indent=2))


if __name__ == "__main__":
    # bad flags or files: one line and exit 2, as the panning command does; a bug keeps its traceback
    raise SystemExit(run_guarded(main, Path(__file__).name))
