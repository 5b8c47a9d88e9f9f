"""Density schedules for multi-step pruning.

A schedule says how many weights survive after each of T pruning steps. Both kinds end exactly at
the target: the last entry is always ``round(density * N)`` weights.
"""
from __future__ import annotations

from collections.abc import Callable

from panning.errors import ConfigError
from panning.masks import keep_count

SCHEDULES: dict[str, Callable[[float, int, int], float]] = {
    # SynFlow (Tanaka et al., 2020): density d^(t/T), equal *ratios* per step, so later steps
    # remove few weights when the network is already sparse.
    "exponential": lambda d, t, T: d ** (t / T),
    # Equal *amounts* removed per step.
    "linear": lambda d, t, T: 1.0 - (1.0 - d) * t / T,
}


def available_schedules() -> list[str]:
    """Names accepted by :func:`keep_schedule`."""
    return sorted(SCHEDULES)


def keep_schedule(total: int, sparsity: float, steps: int, kind: str = "exponential") -> list[int]:
    """Numbers of weights kept after each of ``steps`` steps, ending at ``keep_count(total, sparsity)``.

    The counts never increase, so iterative masks are monotone.
    """
    if kind not in SCHEDULES:
        raise ConfigError(f"unknown schedule {kind!r}; known schedules: {', '.join(available_schedules())}")
    if not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"the number of pruning steps must be an integer >= 1, got {steps!r}")
    final = keep_count(total, sparsity)
    density = final / total if total else 1.0
    counts: list[int] = []
    previous = total
    for t in range(1, steps + 1):
        k = final if t == steps else round(SCHEDULES[kind](density, t, steps) * total)
        k = max(final, min(previous, k))
        counts.append(k)
        previous = k
    return counts
