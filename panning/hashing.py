"""SHA-256 digests of files, model states and masks: the one place the project hashes things.

Used to prove a rebuilt model is the one that was pruned (``init_sha256`` in ``prune.json``), to
record which agent file pruned a sweep cell, and as the proxy's cache key.
"""
from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

__all__ = ["bytes_digest", "file_digest", "masks_digest", "pair_digests", "state_digest"]


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
    out: list[np.ndarray] = []
    group: list[Tensor] = []
    size = 0
    for f in [*flat, None]:  # transfers of at most _GATHER_BYTES (or one tensor): a bounded extra copy on each side
        if f is None or (group and size + f.numel() > _GATHER_BYTES):
            host = torch.cat(group).cpu().numpy()
            out += np.split(host, np.cumsum([g.numel() for g in group])[:-1])
            group, size = [], 0
        if f is not None:
            group.append(f)
            size += f.numel()
    return out


#: the most bytes :func:`_host_arrays` gathers into one transfer
_GATHER_BYTES = 1 << 28


def state_digest(model_or_state: nn.Module | Mapping[str, Tensor]) -> str:
    """Hex SHA-256 of a model's parameters and buffers: each name, then the tensor's raw bytes.

    The bytes are those of the contiguous CPU tensor, so the digest does not depend on the device
    or the memory layout; it is the ``init_sha256`` recorded in ``prune.json`` since version 0.1.
    """
    state = _state(model_or_state)
    return _state_hash(state, _host_arrays(list(state.values())))


def masks_digest(masks: Mapping[str, Tensor]) -> str:
    """Hex SHA-256 of mask names, shapes and bits (bit-packed: cheap even for large networks)."""
    return _masks_hash(masks, _host_arrays(_mask_tensors(masks)))


def pair_digests(states: Sequence[nn.Module | Mapping[str, Tensor]], masks: Sequence[Mapping[str, Tensor]]
                 ) -> list[tuple[str, str]]:
    """``[(state_digest(s), masks_digest(m)) for s, m in zip(states, masks)]``, the same digests, with every
    tensor of every pair copied to the host together (on a GPU one transfer, not two per pair)."""
    if len(states) != len(masks):
        raise ValueError(f"got {len(states)} states for {len(masks)} masks")
    unique: dict[int, Mapping[str, Tensor]] = {}  # a model given for several pairs is copied and hashed once
    for s in states:
        unique.setdefault(id(s), _state(s))
    tensors = [t for d in unique.values() for t in d.values()] + [t for m in masks for t in _mask_tensors(m)]
    arrays = iter(_host_arrays(tensors))
    state_hash = {k: _state_hash(d, [next(arrays) for _ in d]) for k, d in unique.items()}
    return [(state_hash[id(s)], _masks_hash(m, [next(arrays) for _ in m])) for s, m in zip(states, masks, strict=True)]


def _state(model_or_state: nn.Module | Mapping[str, Tensor]) -> Mapping[str, Tensor]:
    return model_or_state.state_dict() if isinstance(model_or_state, nn.Module) else model_or_state


def _mask_tensors(masks: Mapping[str, Tensor]) -> list[Tensor]:
    return [m.detach().to(torch.bool) for m in masks.values()]


def _state_hash(state: Mapping[str, Tensor], raws: Sequence[np.ndarray]) -> str:
    h = hashlib.sha256()
    for name, raw in zip(state, raws, strict=True):
        h.update(name.encode())
        if raw.size:
            h.update(raw.tobytes())
    return h.hexdigest()


def _masks_hash(masks: Mapping[str, Tensor], bits: Sequence[np.ndarray]) -> str:
    h = hashlib.sha256()
    for (name, m), raw in zip(masks.items(), bits, strict=True):
        h.update(f"{name}|{tuple(m.shape)}".encode())
        h.update(np.packbits(raw.astype(bool)).tobytes())
    return h.hexdigest()
