"""Sweep cells on Ray: a local Ray instance started for the run, or an existing cluster.

The driver (the ``panning benchmark`` process) alone writes the sweep directory. A cell runs as a
Ray task with declared resources (``num_cpus``, ``num_gpus``; fractional GPUs allowed) in a
temporary folder of whatever node Ray places it on, and returns every file it wrote; the driver
puts them into ``cells/<key>/``, ``metrics.json`` last, so a cell is finished exactly when its
``metrics.json`` exists, and is written once. A task whose worker process dies is retried by Ray
(``max_retries``); an exception inside a cell is a bug or bad input and is not retried.

Ray's traffic stays where it is pointed: a local instance runs as a single node bound to 127.0.0.1
(Ray otherwise rewrites 127.0.0.1 to the machine's address), with the dashboard and usage reporting
off. Ray 2.52+ authenticates the processes of a cluster with a token
(``RAY_AUTH_MODE=token``, ``RAY_AUTH_TOKEN``); a local instance makes its own, and for a cluster
started by hand the same variables are given to every ``ray start`` and to the driver (README).
"""
from __future__ import annotations

import logging
import os
import socket
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from panning.errors import PanningError, UsageError
from panning.io import atomic_path

__all__ = ["RayCluster", "pack_folder", "unpack_folder"]

#: ``(run config, cell, folder) -> None``: computes a cell into ``folder`` (``panning.runs.run_cell``)
CellFn = Callable[[Any, Any, Path], object]


def pack_folder(folder: Path) -> dict[str, bytes]:
    """Every file below ``folder``, by relative path."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def unpack_folder(files: dict[str, bytes], folder: Path, last: str = "metrics.json") -> None:
    """Write ``files`` below ``folder`` atomically, ``last`` after all the others."""
    for rel in sorted(files, key=lambda r: r == last):
        path = folder / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            tmp.write_bytes(files[rel])


def _run_cell(cfg: Any, cell: Any, cell_fn: CellFn, threads: int) -> tuple[dict[str, bytes], float]:
    """The body of a Ray task: one cell in a temporary folder of the worker; its files and seconds."""
    import torch

    from panning.alloc import tune_malloc

    tune_malloc()
    torch.set_num_threads(threads)  # what the task declared: comparable with a serial run of that many threads
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="panning-cell-") as tmp:
        cell_fn(cfg, cell, Path(tmp))
        return pack_folder(Path(tmp)), time.perf_counter() - t0


def _check_reachable(address: str, timeout: float = 3.0) -> None:
    """A clear error, fast, when nothing listens at ``host:port`` (ray.init would wait much longer)."""
    if address in ("auto", "local") or address.startswith("ray://"):
        return
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise UsageError(f"--address {address!r} is not host:port (e.g. 127.0.0.1:6379)")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            pass
    except OSError as e:
        raise UsageError(f"--address {address}: no Ray cluster answers there ({e.strerror or e}); start one with "
                         "`ray start --head` or leave --address out for a local one") from None


@dataclass
class RayCluster:
    """Where sweep cells run: ``address`` (an existing cluster; also ``RAY_ADDRESS``) or, without it, a
    local instance with room for ``workers`` cells at a time. Use as a context manager: the Ray
    instance it started is stopped at the end (a cluster it joined keeps running)."""

    workers: int | None = None
    address: str | None = None
    cpus_per_cell: float = 1.0
    gpus_per_cell: float = 0.0
    max_retries: int = 3
    names: tuple[str, str, str] = ("--workers", "--cpus-per-cell", "--gpus-per-cell")  # for messages

    def __post_init__(self) -> None:
        workers, cpus, gpus = self.names
        if self.workers is not None and self.workers < 1:
            raise UsageError(f"{workers} must be >= 1, got {self.workers}")
        if not self.cpus_per_cell > 0:
            raise UsageError(f"{cpus} must be > 0, got {self.cpus_per_cell}")
        if self.gpus_per_cell < 0:
            raise UsageError(f"{gpus} must be >= 0, got {self.gpus_per_cell}")
        self._started = False  # this object started a local instance
        self._joined = False  # ... or connected this process to a cluster: undone on exit

    def __enter__(self) -> RayCluster:
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        address = self.address or os.environ.get("RAY_ADDRESS")
        if not address:
            # Ray rewrites 127.0.0.1 to the machine's address unless it runs as a single node, which this
            # switch (read when ray is imported) selects: a local instance then listens on loopback only.
            os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        try:
            import ray
        except ImportError:
            raise UsageError("Ray is not installed: `pip install 'panning[ray]'` (make installs it)") from None
        if address:
            _check_reachable(address)
        if ray.is_initialized():
            pass  # this process is connected already (a notebook, a test session): use that, and leave it running
        elif address:
            ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
            self._joined = True
        else:
            workers = self.workers or 1
            gpus = None
            if self.gpus_per_cell:
                import torch

                gpus = torch.cuda.device_count()
            ray.init(num_cpus=max(1, round(workers * self.cpus_per_cell)), num_gpus=gpus, include_dashboard=False,
                     _node_ip_address="127.0.0.1", log_to_driver=False, logging_level=logging.WARNING)
            self._started = self._joined = True
        have = ray.cluster_resources()
        if self.gpus_per_cell > have.get("GPU", 0):
            self.__exit__()
            raise UsageError(f"{self.names[2]} {self.gpus_per_cell:g}: the Ray cluster has {have.get('GPU', 0):g} "
                             "GPUs; ask for fewer or use another cluster")
        if self.cpus_per_cell > have.get("CPU", 0):
            self.__exit__()
            raise UsageError(f"{self.names[1]} {self.cpus_per_cell:g}: the Ray cluster has {have.get('CPU', 0):g} "
                             "CPUs")
        return self

    def __exit__(self, *exc: object) -> None:
        import ray

        if self._joined and ray.is_initialized():
            ray.shutdown()
        self._joined = self._started = False

    def slots(self) -> int:
        """How many cells the cluster can run at once with the declared resources."""
        import ray

        have = ray.cluster_resources()
        n = int(have.get("CPU", 0) // self.cpus_per_cell)
        if self.gpus_per_cell:
            n = min(n, int(have.get("GPU", 0) // self.gpus_per_cell))
        return max(1, n)

    def run(self, cfg: Any, cells: Sequence[Any], cell_fn: CellFn) -> Iterator[tuple[Any, dict[str, bytes], float]]:
        """Run ``cells`` as Ray tasks; yield ``(cell, its files, seconds)`` as each finishes."""
        import ray

        task = ray.remote(_run_cell).options(num_cpus=self.cpus_per_cell, num_gpus=self.gpus_per_cell,
                                             max_retries=self.max_retries, retry_exceptions=False)
        threads = max(1, int(self.cpus_per_cell))
        refs = {task.remote(cfg, c, cell_fn, threads): c for c in cells}
        pending = list(refs)
        try:
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                try:
                    files, seconds = ray.get(done[0])
                except ray.exceptions.RayTaskError as e:
                    cause = getattr(e, "cause", None)
                    if isinstance(cause, PanningError):  # bad input met on a worker: one line, as locally
                        raise cause from None
                    raise
                yield refs[done[0]], files, seconds
        finally:
            for ref in pending:  # stopped early (an error, Ctrl-C): finished cells are kept, the rest cancelled
                ray.cancel(ref, force=True)
