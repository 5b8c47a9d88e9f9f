"""Process-wide tuning of glibc's allocator for PyTorch on the CPU.

PyTorch's CPU tensors come straight from ``malloc``. glibc serves blocks above its mmap threshold
(128 KiB, raised dynamically up to 32 MiB) with fresh ``mmap`` calls and returns them to the OS on
``free``, so a training step or a saliency index that allocates new megabyte-sized gradients,
masked copies or per-sample products pays for page-faulting them in again every time. On the
2-core CPU machine that was a third to half of a saliency index's time on LeNet-300-100
(BENCHMARKS.md). Keeping such blocks in the heap removes the faults, at the price of holding on to
freed memory (up to the trim threshold) instead of handing it back; PyTorch's CPU performance
guide recommends jemalloc or tcmalloc for the same reason.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import sys

__all__ = ["tune_malloc"]

# mallopt parameters from glibc's <malloc.h>
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

_done: bool | None = None


def tune_malloc(mmap_threshold: int = 64 * 2**20, trim_threshold: int = 256 * 2**20) -> bool:
    """Serve blocks below ``mmap_threshold`` bytes from the heap and keep up to ``trim_threshold``
    bytes of freed heap memory. Returns True when glibc accepted both settings; a no-op returning
    False elsewhere (macOS, Windows, musl). Idempotent. Called by the ``panning`` command, the
    environment's workers and the benchmarks; library users opt in by calling it themselves.
    """
    global _done
    if _done is not None:
        return _done
    _done = False
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    _done = (bool(mallopt(_M_MMAP_THRESHOLD, int(mmap_threshold)))
             and bool(mallopt(_M_TRIM_THRESHOLD, int(trim_threshold))))
    return _done
