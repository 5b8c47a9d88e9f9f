"""Reading device values back to the host: once per call where one read suffices (issue 14, item 5).

On a GPU every ``int()``, ``.tolist()`` or ``.cpu()`` of a device tensor waits for the queued work. These
tests count such reads through a TorchFunctionMode on the CPU (the count is a property of the code) and
pin that gathering them changes no value and no digest.
"""
from __future__ import annotations

import numpy as np
import torch

from panning._functional import HostReads as _Reads
from panning.hashing import _host_arrays, masks_digest, state_digest
from panning.masks import Masks


def _masks(layers: int) -> Masks:
    g = torch.Generator().manual_seed(layers)
    return Masks({f"l{i}.weight": torch.rand(3 + i, 4, generator=g) < 0.5 for i in range(layers)})


def test_mask_counts_read_back_once_however_many_layers() -> None:
    for layers in (1, 7):
        expected = [int(torch.count_nonzero(t)) for t in _masks(layers).values()]
        for what in ("layer_counts", "num_kept", "layer_density"):
            m = _masks(layers)
            with _Reads() as r:
                got = getattr(m, what)
                got = got() if callable(got) else got
            assert r.n == 1, (what, layers, r.n)
            with _Reads() as r:  # the same masks again: counted already, nothing to read
                again = getattr(m, what)
                assert (again() if callable(again) else again) == got
            assert r.n == 0, (what, layers, r.n)
            if what == "layer_counts":
                assert got == expected
            elif what == "num_kept":
                assert got == sum(expected)
            else:
                assert list(got.values()) == [c / t.numel() for c, t in zip(expected, m.values(), strict=True)]


def test_gathered_host_bytes_equal_one_copy_per_tensor() -> None:
    ts = [torch.arange(6, dtype=torch.float32).reshape(2, 3).t(), torch.tensor([True, False]), torch.empty(0),
          torch.tensor(3, dtype=torch.int64), torch.arange(4, dtype=torch.float64)]
    one = _host_arrays(ts, gather=False)
    together = _host_arrays(ts, gather=True)
    assert [a.tobytes() for a in one] == [a.tobytes() for a in together]
    assert [a.dtype for a in together] == [np.uint8] * len(ts)
    with _Reads() as r:
        _host_arrays(ts, gather=True)
    assert r.n == 2  # one .cpu() and one .numpy() for all five tensors


def test_digests_unchanged_by_gathering() -> None:
    """Pinned digests, computed by the per-tensor code before the gathered route existed."""
    st = {"a": torch.arange(6, dtype=torch.float32).reshape(2, 3).t(), "b": torch.tensor([True, False]),
          "c": torch.empty(0), "d": torch.tensor(3, dtype=torch.int64), "e": torch.arange(4, dtype=torch.float64)}
    assert state_digest(st) == "4b34294f2365991489923076c0c7cfa610f537eff1c8970d0b89e5afbd552e0c"
    masks = {"x": torch.tensor([[True, False, True]]), "y": torch.zeros(0, dtype=torch.bool),
             "z": torch.tensor([1.0, 0.0])}
    assert masks_digest(masks) == "9af9b05decbc11f3cbca7753920893ae8236541c33a9a03c9198bb11c888696a"
