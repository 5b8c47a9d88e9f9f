"""Gymnasium wrappers around ``panning/Panning-v0``."""
from __future__ import annotations

from typing import Any

import gymnasium as gym

__all__ = ["FixedEpisodes"]


class FixedEpisodes(gym.Wrapper):
    """Cycles through a fixed list of ``(target sparsity, init seed)`` episodes; :meth:`restart` rewinds.

    Evaluation of an agent uses it so that every evaluation sees the same held-out episodes, and the
    fixed methods can be scored on exactly those.
    """

    def __init__(self, env: gym.Env, episodes: list[tuple[float, int]]) -> None:
        super().__init__(env)
        self.episodes = list(episodes)
        self.i = 0

    def restart(self) -> None:
        """Start again from the first episode."""
        self.i = 0

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> Any:
        target, init = self.episodes[self.i % len(self.episodes)]
        self.i += 1
        return self.env.reset(seed=seed, options={"target_sparsity": target, "init_seed": init})
