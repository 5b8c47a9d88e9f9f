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

``--seeds N`` grows the sweep to 8 x N cells. Prints a markdown table (wall seconds, cells per minute,
speed-up over ``workers 1`` and over ``serial``). Not a test.

    .venv/bin/python benchmarks/bench_ray.py
    .venv/bin/python benchmarks/bench_ray.py --epochs 200 --seeds 4
"""
from __future__ import annotations

import argparse
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def run(cmd: list[str], env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return time.perf_counter() - t0


def listening(pattern: str = "raylet|gcs_server|ray::|python") -> list[str]:
    out = subprocess.run(["ss", "-ltnp"], capture_output=True, text=True).stdout.splitlines()
    return sorted({line.split()[3] for line in out[1:] if any(p in line for p in pattern.split("|"))})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--seeds", type=int, default=1, help="seeds 0..N-1: 8 cells each (default 1)")
    ap.add_argument("--skip-nodes", action="store_true")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-ray-"))
    seeds = list(range(args.seeds))
    (tmp / "sweep.yaml").write_text(
        f"base: {ROOT / 'configs' / 'digits_mlp.yaml'}\nmethods: [snip, magnitude, random, synflow]\n"
        f"sparsities: [0.9, 0.98]\nseeds: {seeds}\ndense: false\n"
        f"overrides: {{train.epochs: {args.epochs}}}\n")
    cells = 8 * len(seeds)
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": "1"}
    bench = [str(BIN / "panning"), "benchmark", "--config", str(tmp / "sweep.yaml")]
    rows = []
    for label, extra in (("serial (no Ray)", []), ("workers 1", ["--workers", "1"]), ("workers 2", ["--workers", "2"])):
        seconds = run(bench + ["--out", str(tmp / label.replace(" ", "_"))] + extra, env)
        rows.append((label, seconds))
        print(label, f"{seconds:.1f} s", flush=True)
    if len(seeds) >= 2 and len(seeds) % 2 == 0:
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
        rows.append(("2 processes, no Ray (ceiling)", seconds))
        print("2 processes", f"{seconds:.1f} s", flush=True)
    if not args.skip_nodes:
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
            seconds = run(bench + ["--out", str(tmp / "two_nodes"), "--address", address], node_env)
            rows.append((f"2 nodes ({address})", seconds))
            print("2 nodes", f"{seconds:.1f} s; Ray listened on {', '.join(ports)}", flush=True)
        finally:
            subprocess.run([ray, "stop", "--force"], env=node_env, capture_output=True)
    base, serial = dict(rows)["workers 1"], dict(rows)["serial (no Ray)"]
    print(f"\n{cells} cells (digits/mlp, {args.epochs} epochs each)\n")
    print("| run | wall s | cells / min | speed-up over workers 1 | over serial |")
    print("|---|---|---|---|---|")
    for label, seconds in rows:
        print(f"| {label} | {seconds:.1f} | {cells / seconds * 60:.2f} | {base / seconds:.2f}x | "
              f"{serial / seconds:.2f}x |")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
