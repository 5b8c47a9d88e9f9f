"""Sweep throughput on Ray: cells per minute serially, with 1 and 2 workers, and on two Ray nodes.

A digits/mlp sweep of ``--cells`` cells (SNIP, magnitude, random and SynFlow at 90/98%, seed 0, 30
epochs) runs four times from scratch through the ``panning`` command:

- ``serial``: no Ray, one cell after the other in the command's process;
- ``workers 1`` / ``workers 2``: ``--workers N``, a local Ray instance (one node on 127.0.0.1);
- ``2 nodes``: ``ray start --head`` plus a second ``ray start --address``, one CPU each, started
  here with a token made for the run (``RAY_AUTH_MODE=token``), and ``--address``. Ray does not
  let two nodes share 127.0.0.1 (it rewrites it to the machine's own address), so these two
  nodes use this machine's address; the script prints the addresses and ports Ray listened on.

- ``2 processes, no Ray`` (the ceiling): the same cells split by seed between two serial ``panning
  benchmark --seeds S`` processes started together (needs an even ``--seeds``, so both get the same
  number of cells): what two cores give this workload without any scheduler, against ``serial``.

``--seeds N`` grows the sweep to 8 x N cells; ``--rows`` picks the runs (``workers1`` always runs: it is
the reference). Prints a markdown table: wall seconds split into start (imports and Ray's start-up,
until the sweep logs that its cells are about to run), cells and end (final reports, Ray's shutdown),
cells per minute, and speed-ups over ``workers 1`` and ``serial``. Not a test.

    .venv/bin/python benchmarks/bench_ray.py
    .venv/bin/python benchmarks/bench_ray.py --epochs 200 --seeds 4
    .venv/bin/python benchmarks/bench_ray.py --epochs 200 --seeds 8 --rows workers1,workers2
"""
from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from panning.cli import OneLineParser, run_guarded

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def run(cmd: list[str], env: dict[str, str]) -> tuple[float, float, float]:
    """Wall seconds of ``cmd``, and when (seconds from its start) the sweep's progress log said the cells
    were about to run (after Ray's start-up, when it has one) and that the last cell had finished."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    start = last = float("nan")
    tail = []
    for line in proc.stderr:
        now = time.perf_counter() - t0
        if " to run" in line and "cells already finished" in line:
            start = now
        elif line.startswith("["):
            last = now
        tail = (tail + [line])[-20:]
    if proc.wait() != 0:
        raise SystemExit("".join(tail))
    return time.perf_counter() - t0, start, last


def listening(pattern: str = "raylet|gcs_server|ray::|python") -> list[str]:
    out = subprocess.run(["ss", "-ltnp"], capture_output=True, text=True).stdout.splitlines()
    return sorted({line.split()[3] for line in out[1:] if any(p in line for p in pattern.split("|"))})


def main() -> None:
    ap = OneLineParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--seeds", type=int, default=1, help="seeds 0..N-1: 8 cells each (default 1)")
    ap.add_argument("--skip-nodes", action="store_true")
    ap.add_argument("--rows", default="serial,workers1,workers2,ceiling,nodes",
                    help="which runs, comma-separated (default: all; workers1 is the reference)")
    args = ap.parse_args()
    want = set(args.rows.split(","))
    if args.skip_nodes:
        want.discard("nodes")
    tmp = Path(tempfile.mkdtemp(prefix="bench-ray-"))
    seeds = list(range(args.seeds))
    (tmp / "sweep.yaml").write_text(
        f"base: {ROOT / 'configs' / 'digits_mlp.yaml'}\nmethods: [snip, magnitude, random, synflow]\n"
        f"sparsities: [0.9, 0.98]\nseeds: {seeds}\ndense: false\n"
        f"overrides: {{train.epochs: {args.epochs}}}\n")
    cells = 8 * len(seeds)
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": "1"}
    bench = [str(BIN / "panning"), "benchmark", "--config", str(tmp / "sweep.yaml")]
    rows: list[tuple[str, float, float, float]] = []
    for key, label, extra in (("serial", "serial (no Ray)", []), ("workers1", "workers 1", ["--workers", "1"]),
                              ("workers2", "workers 2", ["--workers", "2"])):
        if key in want or key == "workers1":
            seconds, start, last = run(bench + ["--out", str(tmp / label.replace(" ", "_"))] + extra, env)
            rows.append((label, seconds, start, last))
            print(label, f"{seconds:.1f} s", flush=True)
    if "ceiling" in want and len(seeds) >= 2 and len(seeds) % 2 == 0:
        # the ceiling: the seeds split evenly between two plain serial processes started together
        halves = [[str(s) for s in seeds[0::2]], [str(s) for s in seeds[1::2]]]
        t0 = time.perf_counter()
        procs = [subprocess.Popen(bench + ["--out", str(tmp / f"process_{i}"), "--seeds", *half], env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for i, half in enumerate(halves)]
        for proc in procs:
            _, err = proc.communicate()
            if proc.returncode != 0:
                raise SystemExit(err.decode()[-2000:])
        seconds = time.perf_counter() - t0
        rows.append(("2 processes, no Ray (ceiling)", seconds, float("nan"), float("nan")))
        print("2 processes", f"{seconds:.1f} s", flush=True)
    if "nodes" in want:
        ray = str(BIN / "ray")
        node_env = {**env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
        node_env.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)
        subprocess.run([ray, "start", "--head", "--port", "46379", "--num-cpus", "1", "--include-dashboard", "false",
                        "--disable-usage-stats"], env=node_env, check=True, capture_output=True)
        try:
            # the address Ray gave the head node: this machine's own (it rewrites 127.0.0.1 to it)
            probe = "import ray._private.services as s; print(s.get_node_ip_address())"
            ip = subprocess.run([sys.executable, "-c", probe], env=node_env, capture_output=True, text=True,
                                check=True).stdout.strip()
            address = f"{ip}:46379"
            subprocess.run([ray, "start", "--address", address, "--num-cpus", "1"], env=node_env, check=True,
                           capture_output=True)
            ports = listening("raylet|gcs_server")
            seconds, start, last = run(bench + ["--out", str(tmp / "two_nodes"), "--address", address], node_env)
            rows.append((f"2 nodes ({address})", seconds, start, last))
            print("2 nodes", f"{seconds:.1f} s; Ray listened on {', '.join(ports)}", flush=True)
        finally:
            subprocess.run([ray, "stop", "--force"], env=node_env, capture_output=True)
    wall = {label: seconds for label, seconds, _, _ in rows}
    base, serial = wall["workers 1"], wall.get("serial (no Ray)", float("nan"))
    print(f"\n{cells} cells (digits/mlp, {args.epochs} epochs each). Start: until the sweep logged its cells were "
          "about to run (the command's imports, and Ray's start-up or connection); cells: from then until the "
          "last cell was recorded; end: the rest (final reports, Ray's shutdown).\n")
    print("| run | wall s | start s | cells s | end s | cells / min | speed-up over workers 1 | over serial | "
          "cells-phase speed-up over workers 1 |")
    print("|---|---|---|---|---|---|---|---|---|")
    base_cells = {label: last - start for label, _, start, last in rows}["workers 1"]

    def x(v: float) -> str:
        return f"{v:.2f}x" if v == v else "-"

    for label, seconds, start, last in rows:
        print(f"| {label} | {seconds:.1f} | {start:.1f} | {last - start:.1f} | {seconds - last:.1f} | "
              f"{cells / seconds * 60:.2f} | {x(base / seconds)} | {x(serial / seconds)} | "
              f"{x(base_cells / (last - start))} |")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    # bad flags or files: one line and exit 2, as the panning command does; a bug keeps its traceback
    raise SystemExit(run_guarded(main, Path(__file__).name))
