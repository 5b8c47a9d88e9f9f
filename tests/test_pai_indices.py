"""Tests for the later pruning-at-initialisation indices: synflow_l2, prospr, ntk_sap, px.

Each index against a hand-worked value or an independent reference (finite differences through explicitly
rerun SGD steps for ProsPr, an explicit per-sample loop and ``torch.func.jacrev`` NTK traces for NTK-SAP),
then, for all four: the model is left exactly as found, the fixed methods keep exact counts and reproduce
bit for bit, and every index works in the multi-index Pruner and in the environment.
"""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, jacrev, jvp

from panning import ntk_sap as ntk_sap_module
from panning import prospr as prospr_module
from panning.indices import INDICES, available_indices, compute_scores
from panning.masks import keep_count
from panning.ntk_sap import NTKDraw, ntk_sap_draws, ntk_sap_gradient
from panning.prospr import prospr_meta_gradient
from panning.pruner import METHODS, Pruner, prune
from panning.schedules import keep_schedule

NEW = ["synflow_l2", "prospr", "ntk_sap", "px"]
DATA = {"prospr", "px"}


# --------------------------------------------------------------------------- helpers


def tiny_linear() -> nn.Sequential:
    """3 -> 2 -> 2, no bias, hand-set weights (as tests/test_indices.py)."""
    net = nn.Sequential(nn.Linear(3, 2, bias=False), nn.Linear(2, 2, bias=False))
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[1.0, -2.0, 0.5], [0.0, 3.0, -1.0]]))
        net[1].weight.copy_(torch.tensor([[2.0, -1.0], [-0.5, 1.0]]))
    return net


def ones_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    return {f"{n}.weight": torch.ones_like(m.weight, dtype=torch.bool)
            for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}


def random_masks(model: nn.Module, density: float, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.rand(m.shape, generator=gen) < density for k, m in ones_masks(model).items()}


class ConvBN(nn.Module):
    """Conv + BatchNorm + residual + dropout + in-place ReLU module + functional ReLU: every state an index
    could disturb, and both ReLU forms PX intercepts."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(4)
        self.act = nn.ReLU(inplace=True)
        self.drop = nn.Dropout(0.3)
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.bn1(self.conv1(x)))
        h = F.relu(self.bn2(self.conv2(h)) + h)
        return self.fc(self.drop(F.adaptive_avg_pool2d(h, 1).flatten(1)))


def conv_bn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return ConvBN()


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, 8), nn.ReLU(), nn.Linear(8, 4))


def batches_for(shape: tuple[int, ...], seed: int = 0, sizes: tuple[int, ...] = (6, 4)):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn((n, *shape), generator=gen), torch.randint(0, 4, (n,), generator=gen)) for n in sizes]


def snapshot(model: nn.Module) -> dict:
    return {
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "modes": [m.training for m in model.modules()],
        "requires_grad": [p.requires_grad for p in model.parameters()],
        "grads": [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        "grad_ids": [id(p.grad) for p in model.parameters()],
        "param_ids": [id(p) for p in model.parameters()],
        "hooks": [(len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks)) for m in model.modules()],
    }


def assert_same(model: nn.Module, snap: dict) -> None:
    now = snapshot(model)
    assert now["state"].keys() == snap["state"].keys()
    for k, v in snap["state"].items():
        assert now["state"][k].dtype == v.dtype and torch.equal(now["state"][k], v), k
    for key in ("modes", "requires_grad", "param_ids", "grad_ids", "hooks"):
        assert now[key] == snap[key], key
    for a, b in zip(now["grads"], snap["grads"], strict=True):
        assert (a is None and b is None) or torch.equal(a, b)


# --------------------------------------------------------------------------- registry, docs, methods


def test_registered_with_data_needs_and_documented() -> None:
    for name in NEW:
        assert name in available_indices()
        spec = INDICES[name]
        assert spec.needs_data == (name in DATA)
        doc = spec.doc
        # formula, sign convention, what is kept, defaults, paper (year) and the authors' code
        for word in ("score", "kept", "Sign", "20", "github.com", "Default", "Cost"):
            assert word in doc, (name, word)


def test_methods_iterations_and_schedules() -> None:
    assert (METHODS["synflow_l2"].indices, METHODS["synflow_l2"].iterations, METHODS["synflow_l2"].schedule) == (
        ("synflow_l2",), 100, "exponential")
    assert (METHODS["px"].indices, METHODS["px"].iterations, METHODS["px"].schedule) == (("px",), 100, "exponential")
    assert (METHODS["ntk_sap"].indices, METHODS["ntk_sap"].iterations, METHODS["ntk_sap"].schedule) == (
        ("ntk_sap",), 20, "exponential")
    assert (METHODS["prospr"].indices, METHODS["prospr"].iterations) == (("prospr",), 1)
    assert not any(METHODS[n].regrow for n in NEW)


# --------------------------------------------------------------------------- synflow_l2


def test_synflow_l2_by_hand() -> None:
    # W1² = [[1, 4, .25], [0, 9, 1]], W2² = [[4, 1], [.25, 1]]; R = 1ᵀ W2² W1² 1
    # ∂R/∂W1²_jk = Σ_o W2²_oj = (4.25, 2) by row; ∂R/∂W2²_oj = (W1² 1)_j = (5.25, 10); score = |W| ⊙ ∂R/∂W²
    net = tiny_linear()
    s = compute_scores("synflow_l2", net, ones_masks(net), input_shape=(3,))
    assert s["0.weight"].dtype == torch.float64
    assert torch.allclose(s["0.weight"], torch.tensor([[4.25, 8.5, 2.125], [0.0, 6.0, 2.0]], dtype=torch.float64))
    assert torch.allclose(s["1.weight"], torch.tensor([[10.5, 10.0], [2.625, 10.0]], dtype=torch.float64))
    # pruning W1[1, 1] (3.0): W1² 1 = (5.25, 1), ∂R/∂W1² unchanged, the pruned weight scores 0
    masks = ones_masks(net)
    masks["0.weight"][1, 1] = False
    s = compute_scores("synflow_l2", net, masks, input_shape=(3,))
    assert torch.allclose(s["0.weight"], torch.tensor([[4.25, 8.5, 2.125], [0.0, 0.0, 2.0]], dtype=torch.float64))
    assert torch.allclose(s["1.weight"], torch.tensor([[10.5, 1.0], [2.625, 1.0]], dtype=torch.float64))


def test_synflow_l2_is_half_the_gradient_of_the_squared_network() -> None:
    """score = |θ| |∂R/∂θ²| = ½ |∂R/∂θ| for R = Σ f(1; (θ ⊙ m)², every other tensor squared), eval mode."""
    model = conv_bn()
    model.bn1.running_mean.fill_(0.3)  # non-trivial statistics: they are squared too
    model.bn1.running_var.fill_(2.0)
    masks = random_masks(model, 0.6)
    s = compute_scores("synflow_l2", model, masks, input_shape=(3, 5, 5))
    theta = {k: p.detach().double().requires_grad_(True) for k, p in model.named_parameters() if k in masks}
    tensors = {k: v.detach().double().square() if v.is_floating_point() else v for k, v in model.state_dict().items()}
    model.eval()
    out = functional_call(model, {**tensors, **{k: (t * masks[k]).square() for k, t in theta.items()}},
                          (torch.ones(1, 3, 5, 5, dtype=torch.float64),))
    g = torch.autograd.grad(out.sum(), list(theta.values()))
    model.train()
    for (k, _), gk in zip(theta.items(), g, strict=True):
        assert torch.allclose(s[k], 0.5 * gk.abs(), rtol=1e-10, atol=1e-12), k


# --------------------------------------------------------------------------- px


def test_px_by_hand_on_a_linear_network() -> None:
    # x = (1, 0, 2): x² = (1, 0, 4); path activation net (all-ones weights): z1 = (10, 10)
    # path kernel net: W1² 1 = (5.25, 10), z2 = W2² (5.25, 10) = (31, 11.3125); R = z1 · z2
    # ∂R/∂W1²_jk = Σ_o z1_o W2²_oj = (42.5, 20) by row; ∂R/∂W2²_oj = z1_o (5.25, 10)_j
    net = tiny_linear()
    x = torch.tensor([[1.0, 0.0, 2.0]])
    s = compute_scores("px", net, ones_masks(net), [(x, torch.tensor([0]))])
    w1sq = torch.tensor([[1.0, 4.0, 0.25], [0.0, 9.0, 1.0]], dtype=torch.float64)
    w2sq = torch.tensor([[4.0, 1.0], [0.25, 1.0]], dtype=torch.float64)
    g1 = torch.tensor([[42.5] * 3, [20.0] * 3], dtype=torch.float64)
    g2 = torch.tensor([[52.5, 100.0], [52.5, 100.0]], dtype=torch.float64)
    assert s["0.weight"].dtype == torch.float64
    assert torch.allclose(s["0.weight"], w1sq * g1**2) and torch.allclose(s["1.weight"], w2sq * g2**2)

    # a second batch x = (0, 1, 0): z1 = (2, 2); its gradients 8.5/4 (W1 rows) and (10.5, 20) (W2 columns) are
    # squared on their own and added: the authors' sum over batches of squared per-batch gradients
    x2 = torch.tensor([[0.0, 1.0, 0.0]])
    two = compute_scores("px", net, ones_masks(net), [(x, torch.tensor([0])), (x2, torch.tensor([0]))])
    assert torch.allclose(two["0.weight"], w1sq * (g1**2 + torch.tensor([[8.5] * 3, [4.0] * 3]) ** 2))
    assert torch.allclose(two["1.weight"], w2sq * (g2**2 + torch.tensor([[10.5, 20.0], [10.5, 20.0]]) ** 2))
    # one batch holding both samples squares the summed gradient instead
    one = compute_scores("px", net, ones_masks(net), [(torch.cat([x, x2]), torch.tensor([0, 0]))])
    assert torch.allclose(one["0.weight"], w1sq * (g1 + torch.tensor([[8.5] * 3, [4.0] * 3])) ** 2)


class _FnRelu(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "F.relu":
            return F.relu(x)
        if self.kind == "torch.relu":
            return torch.relu(x)
        if self.kind == "Tensor.relu":
            return x.relu()
        return F.relu_(x.clone())


@pytest.mark.parametrize("relu", ["module", "module_inplace", "F.relu", "torch.relu", "Tensor.relu", "F.relu_"])
def test_px_gates_paths_with_the_relu_pattern_by_hand(relu: str) -> None:
    # W1 = [[1, -1], [2, 1]], W2 = [[3, -2]], x = (1, 2): pre-activations (-1, 4), pattern (0, 1)
    # path activation net on x² = (1, 4): hidden (5, 5) gated to (0, 5), z1 = 5 (10 without the gate)
    # path kernel net (ReLU removed): W1² 1 = (2, 5), z2 = 9·2 + 4·5 = 38
    # ∂R/∂W2² = z1 (2, 5) = (10, 25); ∂R/∂W1²_jk = z1 W2²_j = (45, 20) by row
    act = {"module": nn.ReLU(), "module_inplace": nn.ReLU(inplace=True)}.get(relu) or _FnRelu(relu)
    net = nn.Sequential(nn.Linear(2, 2, bias=False), act, nn.Linear(2, 1, bias=False))
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[1.0, -1.0], [2.0, 1.0]]))
        net[2].weight.copy_(torch.tensor([[3.0, -2.0]]))
    s = compute_scores("px", net, ones_masks(net), [(torch.tensor([[1.0, 2.0]]), torch.tensor([0]))])
    assert torch.allclose(s["0.weight"], torch.tensor([[2025.0, 2025.0], [1600.0, 400.0]], dtype=torch.float64))
    assert torch.allclose(s["2.weight"], torch.tensor([[900.0, 2500.0]], dtype=torch.float64))


def test_px_pruned_weights_leave_their_paths() -> None:
    """Pruning W1[1, 1] removes it from both auxiliary networks: by hand as above, with the mask as weights."""
    net = tiny_linear()
    masks = ones_masks(net)
    masks["0.weight"][1, 1] = False
    s = compute_scores("px", net, masks, [(torch.tensor([[1.0, 1.0, 2.0]]), torch.tensor([0]))])
    # x² = (1, 1, 4): path activation hidden (6, 5) (6, 6 unpruned) -> z1 = (11, 11); W1² 1 = (5.25, 1)
    # ∂R/∂W1² rows: 11·4.25 = 46.75, 11·2 = 22; ∂R/∂W2²_oj = 11 · (5.25, 1)_j
    w1sq = torch.tensor([[1.0, 4.0, 0.25], [0.0, 0.0, 1.0]], dtype=torch.float64)
    assert torch.allclose(s["0.weight"], w1sq * torch.tensor([[46.75] * 3, [22.0] * 3]) ** 2)
    w2sq = torch.tensor([[4.0, 1.0], [0.25, 1.0]], dtype=torch.float64)
    assert torch.allclose(s["1.weight"], w2sq * torch.tensor([[57.75, 11.0], [57.75, 11.0]]) ** 2)


# --------------------------------------------------------------------------- prospr


def _prospr_net() -> nn.Module:
    torch.manual_seed(3)
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 3)).double()
    return net


def _loss_after_steps(model: nn.Module, masks, c: dict[str, torch.Tensor], batch, steps: int, lr: float,
                      momentum: float) -> float:
    """Reference: a copy of the model with weight = (θ ⊙ c) ⊙ m through torch.nn.utils.prune, trained for
    ``steps`` steps of torch.optim.SGD, then the loss (all explicit, no meta-gradient machinery)."""
    net = copy.deepcopy(model).train()
    with torch.no_grad():
        for k, ck in c.items():
            net.get_parameter(k).mul_(ck)
    for k, m in masks.items():
        mod_name = k.rpartition(".")[0]
        torch.nn.utils.prune.custom_from_mask(net.get_submodule(mod_name), "weight", m.double())
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=momentum)
    x, y = batch
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()
    with torch.no_grad():
        return float(F.cross_entropy(net(x), y))


@pytest.mark.parametrize("lr, momentum", [(0.1, 0.0), (0.5, 0.9)])
def test_prospr_meta_gradient_matches_finite_differences_through_the_inner_steps(lr: float, momentum: float) -> None:
    model = _prospr_net()
    masks = {"0.weight": torch.tensor([[1, 1, 0], [1, 1, 1], [0, 1, 1], [1, 1, 1]], dtype=torch.bool),
             "3.weight": torch.ones(3, 4, dtype=torch.bool)}
    masks["3.weight"][1, 2] = False
    gen = torch.Generator().manual_seed(0)
    batch = (torch.randn(6, 3, generator=gen, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1, 2]))
    model.train()
    meta = prospr_meta_gradient(model, masks, [batch], F.cross_entropy, steps=3, lr=lr, momentum=momentum)
    base = {k: m.double() for k, m in masks.items()}
    h = 1e-6
    checked = 0
    for k, m in masks.items():
        for idx in [tuple(i) for i in m.nonzero().tolist()][::2]:
            up = {kk: v.clone() for kk, v in base.items()}
            down = {kk: v.clone() for kk, v in base.items()}
            up[k][idx] += h
            down[k][idx] -= h
            fd = (_loss_after_steps(model, masks, up, batch, 3, lr, momentum)
                  - _loss_after_steps(model, masks, down, batch, 3, lr, momentum)) / (2 * h)
            assert math.isclose(float(meta[k][idx]), fd, rel_tol=1e-5, abs_tol=1e-9), (k, idx)
            checked += 1
        assert torch.all(meta[k][~m] == 0), "pruned mask entries never reach the forward"
    assert checked >= 8


def test_prospr_index_is_the_magnitude_of_the_default_meta_gradient() -> None:
    """Defaults 3 steps, lr 0.1, no momentum; the index is |meta-gradient|, in train mode, on all batches."""
    assert (prospr_module.PROSPR_STEPS, prospr_module.PROSPR_LR, prospr_module.PROSPR_MOMENTUM) == (3, 0.1, 0.0)
    model = _prospr_net()
    masks = random_masks(model, 0.7)
    batches = [(torch.randn(5, 3, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1]))]
    s = compute_scores("prospr", model, masks, batches)
    ref = prospr_meta_gradient(model.train(), masks, batches, F.cross_entropy, steps=3, lr=0.1, momentum=0.0)
    for k in masks:
        assert torch.allclose(s[k], ref[k].abs(), rtol=1e-12, atol=0)


def test_prospr_without_inner_steps_is_snip(monkeypatch: pytest.MonkeyPatch) -> None:
    """With K = 0 the loss is taken at θ ⊙ c: |∂L/∂c| = |θ ⊙ ∂L/∂w|, SNIP's score (Alizadeh et al.'s remark)."""
    monkeypatch.setattr(prospr_module, "PROSPR_STEPS", 0)
    model = mlp()
    masks = random_masks(model, 0.6)
    batches = batches_for((12,))
    a = compute_scores("prospr", model, masks, batches)
    b = compute_scores("snip", model, masks, batches)
    for k in masks:
        assert torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-7)


def test_prospr_steps_change_the_scores(monkeypatch: pytest.MonkeyPatch) -> None:
    model, masks, batches = mlp(), random_masks(mlp(), 0.6), batches_for((12,))
    three = compute_scores("prospr", model, masks, batches)
    monkeypatch.setattr(prospr_module, "PROSPR_STEPS", 1)
    one = compute_scores("prospr", model, masks, batches)
    assert not all(torch.allclose(three[k], one[k]) for k in masks)


# --------------------------------------------------------------------------- ntk_sap


def _tanh_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()


def _tanh_forward(model: nn.Module, x: torch.Tensor, w: dict[str, torch.Tensor]) -> torch.Tensor:
    return functional_call(model, {**dict(model.named_parameters()), **w}, (x,))


# torch's forward-mode AD scripts its decompositions with torch.jit.script on first use, which warns in
# torch 2.14; the library's NTK-SAP does not use forward mode, only this reference does
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
def test_ntk_sap_estimator_against_the_jacobian_for_one_perturbation() -> None:
    """For small ε the estimate of one draw is ε² ‖J_θ δ‖², J_θ the Jacobian of f(x; θ ⊙ m) in θ (jvp, exact):
    its mask gradient divided by ε² matches the exact one to O(ε)."""
    model = _tanh_net()
    masks = {"0.weight": torch.tensor([[1, 0, 1], [1, 1, 1], [0, 1, 1], [1, 1, 0]], dtype=torch.bool),
             "2.weight": torch.tensor([[1, 1, 0, 1], [1, 1, 1, 1]], dtype=torch.bool)}
    gen = torch.Generator().manual_seed(1)
    theta = {k: torch.randn(m.shape, generator=gen, dtype=torch.float64) for k, m in masks.items()}
    delta = {k: torch.randn(m.shape, generator=gen, dtype=torch.float64) for k, m in masks.items()}
    x = torch.randn(5, 3, generator=gen, dtype=torch.float64)
    eps = 1e-6
    got = ntk_sap_gradient(model.eval(), masks, [NTKDraw(theta, x, delta)], eps)

    def sq_jvp(m: dict[str, torch.Tensor]) -> torch.Tensor:
        _, tangent = jvp(lambda th: _tanh_forward(model, x, {k: th[k] * m[k] for k in th}), (theta,), (delta,))
        return tangent.square().sum()

    ref = grad(sq_jvp)({k: v.double() for k, v in masks.items()})
    for k in masks:
        assert torch.allclose(got[k] / eps**2, ref[k], rtol=1e-4, atol=1e-6), k


def test_ntk_sap_estimate_over_a_basis_is_the_ntk_trace_gradient() -> None:
    """Summed over δ = every basis vector, the estimate is ε² Tr Θ(m), Tr Θ(m) = Σ_i ‖∂f(x_i; θ ⊙ m)/∂θ‖²_F
    (the paper's quantity: the NTK trace, written exactly with jacrev); its mask gradient matches."""
    model = _tanh_net(1)
    masks = random_masks(model, 0.7, seed=2)
    gen = torch.Generator().manual_seed(4)
    theta = {k: torch.randn(m.shape, generator=gen, dtype=torch.float64) for k, m in masks.items()}
    x = torch.randn(4, 3, generator=gen, dtype=torch.float64)
    draws = []
    for k, m in masks.items():
        for j in range(m.numel()):
            delta = {kk: torch.zeros(mm.shape, dtype=torch.float64) for kk, mm in masks.items()}
            delta[k].view(-1)[j] = 1.0
            draws.append(NTKDraw(theta, x, delta))
    eps = 1e-6
    got = ntk_sap_gradient(model.eval(), masks, draws, eps)

    def trace(m: dict[str, torch.Tensor]) -> torch.Tensor:
        jac = jacrev(lambda th: _tanh_forward(model, x, {k: th[k] * m[k] for k in th}))(theta)
        return sum(j.square().sum() for j in jac.values())

    ref = grad(trace)({k: v.double() for k, v in masks.items()})
    for k in masks:
        assert torch.allclose(got[k] / eps**2, ref[k], rtol=1e-4, atol=1e-6), k


def test_ntk_sap_matches_an_explicit_per_sample_loop_with_batchnorm() -> None:
    """The default estimator (ε = 0.01, the index's own draws) against a hand-written forward, sample by sample,
    BatchNorm normalising with the unperturbed batch's (biased) statistics held constant."""
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 3)).double()
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 1.5)
        model[1].bias.uniform_(-0.5, 0.5)
    masks = random_masks(model, 0.7, seed=6)
    draws = ntk_sap_draws(model, masks, (4,), seed=3)
    assert len(draws) == 5 and all(d.inputs.shape == (30, 4) for d in draws)  # 10 per class, 3 classes, R = 5
    eps = ntk_sap_module.NTKSAP_EPSILON
    assert eps == 0.01
    got = ntk_sap_gradient(model.train(), masks, draws, eps)

    m_var = {k: m.double().requires_grad_(True) for k, m in masks.items()}
    b1, gamma, beta, b3 = (t.detach() for t in (model[0].bias, model[1].weight, model[1].bias, model[3].bias))
    total = torch.zeros((), dtype=torch.float64)
    for d in draws:
        w1, w3 = d.weights["0.weight"] * m_var["0.weight"], d.weights["3.weight"] * m_var["3.weight"]
        p1 = (d.weights["0.weight"] + eps * d.delta["0.weight"]) * m_var["0.weight"]
        p3 = (d.weights["3.weight"] + eps * d.delta["3.weight"]) * m_var["3.weight"]
        pre = (d.inputs @ w1.T + b1).detach()
        mu, var = pre.mean(0), pre.var(0, unbiased=False)

        def f(xi, a, b, mu=mu, var=var):
            h = (xi @ a.T + b1 - mu) / torch.sqrt(var + model[1].eps) * gamma + beta
            return torch.relu(h) @ b.T + b3

        for xi in d.inputs:
            total = total + (f(xi, w1, w3) - f(xi, p1, p3)).square().sum()
    ref = torch.autograd.grad(total, list(m_var.values()))
    for (k, _), r in zip(m_var.items(), ref, strict=True):
        assert torch.allclose(got[k], r, rtol=1e-9, atol=1e-12), k
    scores = compute_scores("ntk_sap", model, masks, input_shape=(4,), seed=3)
    for (k, m), r in zip(masks.items(), ref, strict=True):
        assert torch.allclose(scores[k], r.abs() * m, rtol=1e-9, atol=1e-12), k
        assert torch.all(scores[k][~m] == 0)


def test_ntk_sap_draws_kaiming_weights_noise_inputs_and_batches_per_class() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(400, 300), nn.ReLU(), nn.Linear(300, 30))
    masks = ones_masks(model)
    draws = ntk_sap_draws(model, masks, (400,), seed=0)
    # 10 per class for 30 outputs: 300 noise inputs per round, in batches of at most 256, one weight draw each
    assert [d.inputs.shape[0] for d in draws] == [256, 44] * 5
    w = draws[0].weights["0.weight"]
    assert abs(float(w.std()) - math.sqrt(2 / 400)) < 0.02 * math.sqrt(2 / 400)
    assert abs(float(draws[0].weights["2.weight"].std()) - math.sqrt(2 / 300)) < 0.03 * math.sqrt(2 / 300)
    assert not torch.equal(draws[0].weights["0.weight"], draws[1].weights["0.weight"])
    assert not torch.equal(w, model[0].weight)
    assert abs(float(draws[0].inputs.std()) - 1) < 0.02 and abs(float(draws[0].delta["0.weight"].std()) - 1) < 0.02


def test_ntk_sap_is_weight_and_data_agnostic() -> None:
    """Other weights of one architecture, with or without data: the same scores (fresh random weights)."""
    a, b = conv_bn(0), conv_bn(0)
    masks = random_masks(a, 0.5)
    with torch.no_grad():
        for k in masks:
            b.get_parameter(k).normal_()  # other weights; the rest (biases, BatchNorm) are the model's
    sa = compute_scores("ntk_sap", a, masks, input_shape=(3, 5, 5), seed=7)
    sb = compute_scores("ntk_sap", b, masks, batches_for((3, 5, 5)), seed=7)
    assert all(torch.equal(sa[k], sb[k]) for k in masks)
    other = compute_scores("ntk_sap", a, masks, input_shape=(3, 5, 5), seed=8)
    assert not all(torch.equal(sa[k], other[k]) for k in masks)


# --------------------------------------------------------------------------- all four: contract


@pytest.mark.parametrize("name", NEW)
def test_model_unchanged_after_scoring(name: str) -> None:
    """Weights, buffers (BatchNorm statistics), per-module modes, requires_grad, grads and hooks."""
    model = conv_bn()
    model.bn2.eval()  # a mixed state must come back as it was
    model.fc.bias.requires_grad_(False)
    model.conv1.weight.grad = torch.full_like(model.conv1.weight, 0.5)
    snap = snapshot(model)
    masks = random_masks(model, 0.6)
    s = compute_scores(name, model, masks, batches_for((3, 5, 5)), input_shape=(3, 5, 5))
    assert_same(model, snap)
    assert list(s) == list(masks) and all(s[k].shape == masks[k].shape for k in masks)
    assert all(bool(torch.isfinite(v).all()) and bool((v >= 0).all()) for v in s.values())
    assert all(torch.all(s[k][~m] == 0) for k, m in masks.items())  # pruned weights score 0


@pytest.mark.parametrize("name", NEW)
def test_prune_keeps_exact_counts_and_repeats_bit_for_bit(name: str) -> None:
    model, batches = mlp(), batches_for((12,))
    iterations = 3 if METHODS[name].iterations > 1 else None
    a = prune(model, name, 0.9, batches, iterations=iterations, seed=4)
    b = prune(model, name, 0.9, batches, iterations=iterations, seed=4)
    n = a.masks.num_total
    assert a.masks.num_kept == keep_count(n, 0.9)
    assert a.masks.equal(b.masks)
    assert [r.keep for r in a.history] == keep_schedule(n, 0.9, iterations or 1, "exponential")


@pytest.mark.parametrize("name", NEW)
def test_same_seed_same_scores_bit_for_bit(name: str) -> None:
    model, masks, batches = conv_bn(), random_masks(conv_bn(), 0.7), batches_for((3, 5, 5))
    a = compute_scores(name, model, masks, batches, seed=11)
    b = compute_scores(name, model, masks, batches, seed=11)
    assert all(torch.equal(a[k], b[k]) for k in masks)


@pytest.mark.parametrize("name", NEW)
def test_works_in_the_multi_index_pruner(name: str) -> None:
    """Mixed with SNIP and SynFlow; a one-hot weight reproduces the index's own masks."""
    model, batches = mlp(), batches_for((12,))
    p = Pruner(model, ["snip", name, "synflow"], batches, seed=2)
    alone = Pruner(model, [name], batches, seed=2)
    for keep in keep_schedule(p.num_total, 0.8, 2):
        p.step([0.0, 1.0, 0.0], keep)
        alone.step([1.0], keep)
    assert p.masks.equal(alone.masks)
    mixed = Pruner(model, ["snip", name, "synflow"], batches, seed=2)
    mixed.step([0.3, 0.5, 0.2], 50)
    assert mixed.masks.num_kept == 50


def test_every_new_index_in_an_environment_episode() -> None:
    from panning.envs.panning_env import PanningEnv

    env = PanningEnv("configs/env/tiny.yaml", indices=NEW, device="cpu")
    obs, _ = env.reset(seed=0)
    assert env.observation_space.contains(obs) and env.K == len(NEW)
    rng = np.random.default_rng(0)
    steps, done = 0, False
    while not done:
        obs, reward, term, trunc, info = env.step(rng.uniform(-1, 1, env.K + 1).astype(np.float32))
        assert env.observation_space.contains(obs) and math.isfinite(reward)
        done = term or trunc
        steps += 1
    assert steps == env.config.pruning_steps
    assert env.masks.num_kept == keep_count(env.masks.num_total, env.config.target_sparsity)
