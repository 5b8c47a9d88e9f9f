"""Gymnasium environments for panning.

``import panning.envs`` registers ``panning/Panning-v0`` (:class:`panning.envs.panning_env.PanningEnv`), so
``gymnasium.make("panning/Panning-v0", model="mlp", dataset="digits", target_sparsity=0.98)`` works;
``config="configs/env/digits_mlp.yaml"`` loads settings from YAML and other keywords override them.
"""
from __future__ import annotations

import gymnasium

ENV_ID = "panning/Panning-v0"

if ENV_ID not in gymnasium.registry:
    # The env ends itself after T pruning steps: no TimeLimit wrapper is needed.
    gymnasium.register(id=ENV_ID, entry_point="panning.envs.panning_env:PanningEnv")

from panning.envs.panning_env import PanningEnv, PanningEnvConfig, make_config  # noqa: E402

__all__ = ["ENV_ID", "PanningEnv", "PanningEnvConfig", "make_config"]
