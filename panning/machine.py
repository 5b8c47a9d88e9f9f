"""What machine a figure came from: the CPU model, cores and GPU, in words (benchmarks and shipped agents)."""
from __future__ import annotations

import os
import platform
from pathlib import Path

__all__ = ["cpu_model", "describe"]


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux; the platform's processor string elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe() -> str:
    """CPU model, logical cores, OS and the CUDA GPU if one is visible."""
    import torch

    text = f"{cpu_model()}, {os.cpu_count()} cores, {platform.system()}"
    if torch.cuda.is_available():
        text += f", {torch.cuda.get_device_name()}"
    return text
