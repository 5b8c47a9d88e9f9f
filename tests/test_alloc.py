"""The allocator tuning is safe to call anywhere and only reports success where glibc took it."""
from __future__ import annotations

import ctypes.util
import subprocess
import sys


def test_tune_malloc_is_idempotent_and_reports_glibc() -> None:
    code = (
        "from panning.alloc import tune_malloc; a = tune_malloc(); b = tune_malloc(); "
        "import torch; x = torch.ones(1 << 20).sum(); print(a, b, int(x))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out[0] == out[1] and out[2] == str(1 << 20)
    glibc = sys.platform.startswith("linux") and "libc.so.6" in (ctypes.util.find_library("c") or "")
    if glibc:
        assert out[0] == "True"
