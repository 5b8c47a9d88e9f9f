"""Shared pytest fixtures."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Ray (tests/test_ray.py) runs as one node on loopback, without usage reporting: read when ray is imported
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def shared_data_dir() -> Path | None:
    """Folder with real MNIST/Fashion-MNIST raw files, from PANNING_DATA or ../shared/data."""
    env = os.environ.get("PANNING_DATA")
    candidates = [Path(env)] if env else []
    candidates.append(Path(__file__).resolve().parents[2] / "shared" / "data")
    for c in candidates:
        if (c / "MNIST" / "raw").is_dir():
            return c
    return None


#: set by .ci/run: where the real data is expected, a missing folder fails the data tests instead of skipping them
REQUIRE_DATA = os.environ.get("PANNING_REQUIRE_DATA") == "1"


def require_data(found: Path | None) -> Path:
    """``found``, or skip the test (fail it where PANNING_REQUIRE_DATA=1: CI expects the data)."""
    if found is None:
        why = "real MNIST files not found: set PANNING_DATA to a folder holding MNIST/raw"
        if REQUIRE_DATA:
            pytest.fail(f"{why} (PANNING_REQUIRE_DATA=1: this run expects the data)")
        pytest.skip(why)
    return found


@pytest.fixture
def nan_magnitude(monkeypatch: pytest.MonkeyPatch) -> None:
    """The registered ``magnitude`` index, made to return a NaN score for one weight of its first layer."""
    import dataclasses

    from panning import indices

    spec = indices.INDICES["magnitude"]

    def fn(model, masks, batches, **kw):
        out = spec.fn(model, masks, batches, **kw)
        first = next(iter(out))
        out[first] = out[first].clone()
        out[first].view(-1)[3] = float("nan")
        return out

    monkeypatch.setitem(indices.INDICES, "magnitude", dataclasses.replace(spec, fn=fn))


@pytest.fixture
def data_dir() -> Path:
    return require_data(shared_data_dir())


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``cuda`` skip, saying why, on a machine without a GPU."""
    if torch.cuda.is_available():
        return
    hidden = os.environ.get("CUDA_VISIBLE_DEVICES") == ""  # make test hides a GPU: its tests are the CPU's
    why = "none visible: make test runs on the CPU" if hidden else "none here"
    skip = pytest.mark.skip(reason=f"needs a CUDA GPU ({why}); `make gpu-check` runs it on a GPU machine")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _one_thread():
    # Small matrices on a shared 2-core machine: a second intra-op thread mostly adds synchronisation
    # (and stalls whenever the other core is busy).
    torch.set_num_threads(1)
    yield
