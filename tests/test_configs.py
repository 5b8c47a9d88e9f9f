"""Every shipped config loads and names only models, data sets, inits and methods that exist."""
from __future__ import annotations

from pathlib import Path

import pytest

from panning import config, sweep
from panning.data import available_datasets
from panning.models import INITS, available_models
from panning.pruner import available_methods

ROOT = Path(__file__).resolve().parents[1]
RUN_CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
SWEEPS = sorted((ROOT / "configs" / "bench").glob("*.yaml"))


def test_configs_are_found() -> None:
    assert len(RUN_CONFIGS) >= 5 and len(SWEEPS) >= 6


@pytest.mark.parametrize("path", RUN_CONFIGS, ids=lambda p: p.name)
def test_run_config_is_valid(path: Path) -> None:
    cfg = config.load(path)
    assert cfg.model in available_models()
    assert cfg.dataset in available_datasets()
    assert cfg.init in INITS
    assert cfg.prune.method is None or cfg.prune.method in available_methods()


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.name)
def test_sweep_config_is_valid(path: Path) -> None:
    sw, cfg = sweep.load_sweep(path)
    assert cfg.model in available_models() and cfg.dataset in available_datasets() and cfg.init in INITS
    for m in sw.methods:
        assert m in available_methods() or m in sw.agents, m
