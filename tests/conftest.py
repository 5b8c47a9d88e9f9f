"""Shared pytest fixtures."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch


def shared_data_dir() -> Path | None:
    """Folder with real MNIST/Fashion-MNIST raw files, from PANNING_DATA or ../shared/data."""
    env = os.environ.get("PANNING_DATA")
    candidates = [Path(env)] if env else []
    candidates.append(Path(__file__).resolve().parents[2] / "shared" / "data")
    for c in candidates:
        if (c / "MNIST" / "raw").is_dir():
            return c
    return None


@pytest.fixture
def data_dir() -> Path:
    d = shared_data_dir()
    if d is None:
        pytest.skip("real MNIST files not found: set PANNING_DATA to a folder holding MNIST/raw")
    return d


@pytest.fixture(autouse=True)
def _one_thread():
    # Small matrices on a shared 2-core machine: a second intra-op thread mostly adds synchronisation
    # (and stalls whenever the other core is busy).
    torch.set_num_threads(1)
    yield
