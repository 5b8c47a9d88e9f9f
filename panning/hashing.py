"""SHA-256 digests of files, model states and masks: the one place the project hashes things.

Used to prove a rebuilt model is the one that was pruned (``init_sha256`` in ``prune.json``), to
record which agent file pruned a sweep cell, and as the proxy's cache key.
"""
from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

__all__ = ["file_digest", "masks_digest", "state_digest"]


def file_digest(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes, read in blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def state_digest(model_or_state: nn.Module | Mapping[str, Tensor]) -> str:
    """Hex SHA-256 of a model's parameters and buffers: each name, then the tensor's raw bytes.

    The bytes are those of the contiguous CPU tensor, so the digest does not depend on the device
    or the memory layout; it is the ``init_sha256`` recorded in ``prune.json`` since version 0.1.
    """
    state = model_or_state.state_dict() if isinstance(model_or_state, nn.Module) else model_or_state
    h = hashlib.sha256()
    for name, t in state.items():
        h.update(name.encode())
        t = t.detach().cpu().contiguous()
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def masks_digest(masks: Mapping[str, Tensor]) -> str:
    """Hex SHA-256 of mask names, shapes and bits (bit-packed: cheap even for large networks)."""
    h = hashlib.sha256()
    for name, m in masks.items():
        h.update(f"{name}|{tuple(m.shape)}".encode())
        h.update(np.packbits(m.detach().cpu().reshape(-1).numpy().astype(bool)).tobytes())
    return h.hexdigest()
