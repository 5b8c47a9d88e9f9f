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

__all__ = ["bytes_digest", "file_digest", "masks_digest", "state_digest"]


def bytes_digest(data: bytes) -> str:
    """Hex SHA-256 of bytes already in memory (a file read once: what was hashed is what was used)."""
    return hashlib.sha256(data).hexdigest()


def file_digest(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes, read in blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _host_arrays(tensors: list[Tensor], gather: bool | None = None) -> list[np.ndarray]:
    """Each tensor's raw bytes (contiguous, flattened) as a CPU uint8 array.

    Tensors that share one accelerator are copied to the host in one transfer (``gather``; by default
    whenever they are not on the CPU): one copy per tensor would make the host wait for the device once
    per tensor. The bytes are the same either way.
    """
    flat = [t.detach().contiguous().reshape(-1).view(torch.uint8) for t in tensors]
    if gather is None:
        gather = bool(flat) and flat[0].device.type != "cpu" and all(f.device == flat[0].device for f in flat)
    if not gather or not flat:
        return [f.cpu().numpy() for f in flat]
    host = torch.cat(flat).cpu().numpy()
    ends = np.cumsum([f.numel() for f in flat])
    return list(np.split(host, ends[:-1]))


def state_digest(model_or_state: nn.Module | Mapping[str, Tensor]) -> str:
    """Hex SHA-256 of a model's parameters and buffers: each name, then the tensor's raw bytes.

    The bytes are those of the contiguous CPU tensor, so the digest does not depend on the device
    or the memory layout; it is the ``init_sha256`` recorded in ``prune.json`` since version 0.1.
    """
    state = model_or_state.state_dict() if isinstance(model_or_state, nn.Module) else model_or_state
    h = hashlib.sha256()
    for name, raw in zip(state, _host_arrays(list(state.values())), strict=True):
        h.update(name.encode())
        if raw.size:
            h.update(raw.tobytes())
    return h.hexdigest()


def masks_digest(masks: Mapping[str, Tensor]) -> str:
    """Hex SHA-256 of mask names, shapes and bits (bit-packed: cheap even for large networks)."""
    h = hashlib.sha256()
    bits = _host_arrays([m.detach().to(torch.bool) for m in masks.values()])
    for (name, m), raw in zip(masks.items(), bits, strict=True):
        h.update(f"{name}|{tuple(m.shape)}".encode())
        h.update(np.packbits(raw.astype(bool)).tobytes())
    return h.hexdigest()
