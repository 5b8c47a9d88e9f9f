"""N masked MLPs trained as sparse matrices: the proxy's sparse route (``ProxySettings.sparse``).

At the sparsities the agent works at (98-99.8%) a masked MLP's dense matrix products multiply
mostly zeros. Here each layer of N stacked :class:`panning.models.MLP` networks is one
block-diagonal CSR matrix holding only the kept weights (the first layer's blocks share the input
columns, since every candidate sees the same batch), activations are feature-major ``[N * width,
batch]``, and SGD updates the kept values alone, so pruned weights are exactly zero by
construction. The arithmetic is the dense network's; only the order of each sum differs, so
results agree with the dense route up to float rounding. On the CPU (MKL's sparse products, as
tested) every output row sums its own kept weights in column order whatever N is, so a candidate
trained alone or among others comes out the same, bit for bit; cuSPARSE does not promise that.
"""
from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["SPARSE_MODELS", "SparseMLPStack", "supports"]

#: the registered model names whose networks :func:`supports` (both build :class:`panning.models.MLP`)
SPARSE_MODELS = ("mlp", "lenet300")

# torch says so on the first CSR tensor of a process; the CSR operations used here are checked in tests/test_sparse.py
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta", category=UserWarning)


def supports(net: nn.Module) -> bool:
    """Whether the sparse route can train ``net``: panning's own MLP (``mlp``, ``lenet300``), whose forward
    is known to be Linear-ReLU-...-Linear."""
    from panning.models import MLP

    return type(net) is MLP


class _CSRMatmul(torch.autograd.Function):
    """``S @ h`` for a CSR matrix ``S`` of fixed pattern and trainable ``values``; gradients for both."""

    @staticmethod
    def forward(ctx, values: Tensor, h: Tensor, layer: _Layer) -> Tensor:
        ctx.save_for_backward(values, h)
        ctx.layer = layer
        return torch.sparse.mm(layer.matrix(values), h)

    @staticmethod
    def backward(ctx, dy: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        values, h = ctx.saved_tensors
        layer: _Layer = ctx.layer
        dv = dh = None
        dy = dy.contiguous()
        if ctx.needs_input_grad[0]:
            # d loss / d S[r, c] = dy[r] . h[c], wanted only where S keeps a weight
            dv = torch.sparse.sampled_addmm(layer.matrix(torch.zeros_like(values)), dy, h.t(), beta=0.0).values()
        if ctx.needs_input_grad[1]:
            dh = torch.sparse.mm(layer.transposed(values), dy)
        return dv, dh, None


class _Layer:
    """The kept-weight pattern of one layer of N networks as a block-diagonal CSR matrix (and its transpose)."""

    def __init__(self, mask: Tensor, shared_input: bool) -> None:
        n, rows, cols = mask.shape
        nz_n, nz_r, nz_c = mask.nonzero(as_tuple=True)  # row-major order: CSR order
        row = nz_n * rows + nz_r
        col = nz_c if shared_input else nz_n * cols + nz_c
        self.shape = (n * rows, cols if shared_input else n * cols)
        self.index = (nz_n, nz_r, nz_c)
        counts = torch.bincount(row, minlength=self.shape[0])
        self.crow = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
        self.col = col
        self.t_perm = torch.argsort(col * self.shape[0] + row, stable=True)
        t_counts = torch.bincount(col, minlength=self.shape[1])
        self.t_crow = torch.cat([t_counts.new_zeros(1), t_counts.cumsum(0)])
        self.t_col = row[self.t_perm]

    def matrix(self, values: Tensor) -> Tensor:
        return torch.sparse_csr_tensor(self.crow, self.col, values, self.shape, check_invariants=False)

    def transposed(self, values: Tensor) -> Tensor:
        return torch.sparse_csr_tensor(self.t_crow, self.t_col, values[self.t_perm], self.shape[::-1],
                                       check_invariants=False)


class SparseMLPStack:
    """N MLPs of one shape under fixed masks: trainable ``params`` (each layer's kept values, flat, and its
    biases ``[N, width]``), a forward to ``[N, batch, classes]`` logits, and the dense weights back."""

    def __init__(self, nets: Sequence[nn.Module], masks: Sequence[Mapping[str, Tensor]], device: torch.device) -> None:
        if not nets or not all(supports(n) for n in nets):
            raise ValueError(f"the sparse proxy route trains panning's MLP ({', '.join(SPARSE_MODELS)}) only")
        layers = sum(1 for _ in nets[0].children())  # fc1..fcK, nothing else (supports())
        self.names = [f"fc{i}" for i in range(1, layers + 1)]
        self.layers: list[_Layer] = []
        self.params: dict[str, Tensor] = {}
        for j, name in enumerate(self.names):
            w = torch.stack([getattr(n, name).weight.detach() for n in nets]).to(device)
            key = f"{name}.weight"  # a layer left out of the masks keeps every weight
            m = torch.stack([(mk[key] if key in mk else torch.ones(w.shape[1:], dtype=torch.bool)).to(device)
                             for mk in masks])
            layer = _Layer(m, shared_input=j == 0)
            self.layers.append(layer)
            self.params[f"{name}.values"] = w[layer.index].clone().requires_grad_(True)
            bias = torch.stack([getattr(n, name).bias.detach() for n in nets]).to(device)
            self.params[f"{name}.bias"] = bias.clone().requires_grad_(True)
        self.n = len(nets)
        self.shapes = [tuple(getattr(nets[0], name).weight.shape) for name in self.names]

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``[N, batch, classes]`` of every network on the shared batch ``x``."""
        h = x.flatten(1).t().contiguous()  # feature-major: each CSR row meets contiguous batch rows
        last = len(self.layers) - 1
        for j, (name, layer) in enumerate(zip(self.names, self.layers, strict=True)):
            h = _CSRMatmul.apply(self.params[f"{name}.values"], h, layer) + self.params[f"{name}.bias"].reshape(-1, 1)
            if j < last:
                h = F.relu(h)
        return h.view(self.n, -1, h.shape[1]).transpose(1, 2)

    def dense_state(self, i: int) -> dict[str, Tensor]:
        """Network ``i``'s parameters as a dense state dict (pruned weights exactly zero)."""
        out = {}
        for name, layer, shape in zip(self.names, self.layers, self.shapes, strict=True):
            nz_n, nz_r, nz_c = layer.index
            sel = nz_n == i
            w = torch.zeros(shape, dtype=self.params[f"{name}.values"].dtype, device=nz_n.device)
            w[nz_r[sel], nz_c[sel]] = self.params[f"{name}.values"].detach()[sel]
            out[f"{name}.weight"] = w
            out[f"{name}.bias"] = self.params[f"{name}.bias"].detach()[i].clone()
        return out
