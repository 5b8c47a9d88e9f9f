"""Tests for panning.indices: hand-worked values, conventions, state preservation, bad input."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from panning import indices as indices_module
from panning.indices import INDICES, IndexSpec, available_indices, compute_many, compute_scores, register_index

ALL = ["random", "magnitude", "snip", "force", "grasp", "grasp_abs", "synflow", "synflow_l2", "fts", "ntk_sap",
       "prospr", "px"]
DATA = ["snip", "force", "grasp", "grasp_abs", "fts", "prospr", "px"]
# indices computed in float64 so deep products of weights stay finite
FLOAT64 = {"synflow", "synflow_l2", "px"}
# indices in which the mask is more than a factor on the weights: FORCE scores the dense weights, NTK-SAP
# re-draws the weights, ProsPr trains the masked network, PX runs a network whose weights are the mask
MASK_NOT_A_FACTOR = {"force", "ntk_sap", "prospr", "px"}


# --------------------------------------------------------------------------- helpers


def half_mse(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """½‖out − y‖² per sample, mean over the batch."""
    return 0.5 * ((out - y) ** 2).sum(dim=1).mean()


def tiny_linear() -> nn.Sequential:
    """3 -> 2 -> 2, no bias, hand-set weights."""
    net = nn.Sequential(nn.Linear(3, 2, bias=False), nn.Linear(2, 2, bias=False))
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[1.0, -2.0, 0.5], [0.0, 3.0, -1.0]]))
        net[1].weight.copy_(torch.tensor([[2.0, -1.0], [-0.5, 1.0]]))
    return net


def weight_masks(model: nn.Module, density: float = 1.0, seed: int = 0) -> dict[str, torch.Tensor]:
    """Plain-dict bool masks over Conv/Linear weights."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for mname, m in model.named_modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            out[f"{mname}.weight"] = torch.rand(m.weight.shape, generator=gen) < density
    return out


def small_mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Flatten(), nn.Linear(12, 10), nn.ReLU(), nn.Dropout(0.2), nn.Linear(10, 8), nn.Tanh(), nn.Linear(8, 4)
    )


class SmallConvBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn1(self.conv1(x)))
        h = F.relu(self.bn2(self.conv2(h)) + h)  # residual, like a ResNet block
        return self.fc(F.adaptive_avg_pool2d(h, 1).flatten(1))


def small_conv_bn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return SmallConvBN()


def batches_for(kind: str, seed: int = 0, sizes: tuple[int, ...] = (6, 4)) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    shape = (12,) if kind == "mlp" else (3, 5, 5)
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
    assert now["modes"] == snap["modes"]
    assert now["requires_grad"] == snap["requires_grad"]
    assert now["param_ids"] == snap["param_ids"]
    assert now["grad_ids"] == snap["grad_ids"]
    assert now["hooks"] == snap["hooks"]
    for a, b in zip(now["grads"], snap["grads"], strict=True):
        assert (a is None and b is None) or torch.equal(a, b)


# --------------------------------------------------------------------------- registry


def test_registry_lists_all_indices_with_docs() -> None:
    assert available_indices() == ALL
    for name, spec in INDICES.items():
        assert spec.name == name
        assert spec.needs_data == (name in DATA)
        assert len(spec.doc) > 80 and "kept" in spec.doc and "20" in spec.doc  # formula/sign/paper year


def test_register_duplicate_name_rejected() -> None:
    with pytest.raises(ValueError, match="already registered"):
        register_index("snip", needs_data=True)(lambda *a, **k: {})


# --------------------------------------------------------------------------- hand-worked values


def test_magnitude_by_hand() -> None:
    net = tiny_linear()
    s = compute_scores("magnitude", net, weight_masks(net))
    assert torch.equal(s["0.weight"], torch.tensor([[1.0, 2.0, 0.5], [0.0, 3.0, 1.0]]))
    assert torch.equal(s["1.weight"], torch.tensor([[2.0, 1.0], [0.5, 1.0]]))


def test_snip_by_hand() -> None:
    # x = (1, 0, 2), y = (0, 1): h = W1 x = (2, -2), out = W2 h = (6, -3), e = out - y = (6, -4)
    # dL/dW2 = e hᵀ = [[12, -12], [-8, 8]];  dL/dW1 = (W2ᵀ e) xᵀ = (14, -10)(1, 0, 2)
    net = tiny_linear()
    batch = [(torch.tensor([[1.0, 0.0, 2.0]]), torch.tensor([[0.0, 1.0]]))]
    s = compute_scores("snip", net, weight_masks(net), batch, loss_fn=half_mse)
    assert torch.allclose(s["1.weight"], torch.tensor([[24.0, 12.0], [4.0, 8.0]]))
    assert torch.allclose(s["0.weight"], torch.tensor([[14.0, 0.0, 14.0], [0.0, 0.0, 20.0]]))


def test_synflow_by_hand() -> None:
    # ones input, |W1|, |W2|: h = |W1| 1 = (3.5, 4); R = 1ᵀ |W2| h.
    # dR/dW2[i,j] = h_j; dR/dW1[j,k] = (1ᵀ|W2|)_j = (2.5, 2). score = |W| ⊙ dR/dW.
    net = tiny_linear()
    s = compute_scores("synflow", net, weight_masks(net), input_shape=(3,))
    assert s["1.weight"].dtype == torch.float64
    exp2 = torch.tensor([[2.0 * 3.5, 1.0 * 4.0], [0.5 * 3.5, 1.0 * 4.0]], dtype=torch.float64)
    exp1 = torch.tensor([[1.0 * 2.5, 2.0 * 2.5, 0.5 * 2.5], [0.0, 3.0 * 2.0, 1.0 * 2.0]], dtype=torch.float64)
    assert torch.allclose(s["1.weight"], exp2)
    assert torch.allclose(s["0.weight"], exp1)


def test_synflow_by_hand_with_mask() -> None:
    # prune W2[0,0] and W1[1,1]: h = (3.5, 1); colsum|W2 ⊙ m| = (0.5, 2)
    net = tiny_linear()
    m = weight_masks(net)
    m["1.weight"][0, 0] = False
    m["0.weight"][1, 1] = False
    s = compute_scores("synflow", net, m, input_shape=(3,))
    exp2 = torch.tensor([[0.0, 1.0 * 1.0], [0.5 * 3.5, 1.0 * 1.0]], dtype=torch.float64)
    exp1 = torch.tensor([[1.0 * 0.5, 2.0 * 0.5, 0.5 * 0.5], [0.0, 0.0, 1.0 * 2.0]], dtype=torch.float64)
    assert torch.allclose(s["1.weight"], exp2)
    assert torch.allclose(s["0.weight"], exp1)


def test_grasp_sign_pinned_by_hand() -> None:
    # One linear unit, L = ½(w·x − y)², x = (1, 1), y = 0, w = (1, −3): e = −2, g = x e = (−2, −2),
    # H = x xᵀ, Hg = (−4, −4), θ ⊙ Hg = (−4, 12). GraSP's code removes the top of −θ⊙Hg = (4, −12),
    # i.e. weight 0, keeping weight 1: in our higher-is-kept convention the score is +θ⊙Hg.
    # Check: removing weight 1 would shrink ‖g‖² from 8 to 2 (gradient flow lost), removing
    # weight 0 raises it to 18, so GraSP keeps weight 1.
    net = nn.Sequential(nn.Linear(2, 1, bias=False))
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[1.0, -3.0]]))
    batch = [(torch.tensor([[1.0, 1.0]]), torch.tensor([[0.0]]))]
    m = weight_masks(net)
    s = compute_scores("grasp", net, m, batch, loss_fn=half_mse)
    assert torch.allclose(s["0.weight"], torch.tensor([[-4.0, 12.0]]))
    assert s["0.weight"].argmax().item() == 1
    sa = compute_scores("grasp_abs", net, m, batch, loss_fn=half_mse)
    assert torch.allclose(sa["0.weight"], torch.tensor([[4.0, 12.0]]))


def test_grasp_matches_autograd_hvp() -> None:
    torch.manual_seed(3)
    net = nn.Sequential(nn.Linear(3, 4, bias=False), nn.Tanh(), nn.Linear(4, 3, bias=False))
    x, y = torch.randn(5, 3), torch.randint(0, 3, (5,))
    masks = weight_masks(net, density=0.7, seed=1)
    w1 = (net[0].weight * masks["0.weight"]).detach()
    w2 = (net[2].weight * masks["2.weight"]).detach()

    def loss(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(torch.tanh(x @ a.T) @ b.T, y)

    g = torch.autograd.grad(loss(w1.requires_grad_(), w2.requires_grad_()), (w1, w2))
    _, hg = torch.autograd.functional.hvp(loss, (w1.detach(), w2.detach()), g)
    s = compute_scores("grasp", net, masks, [(x, y)])
    assert torch.allclose(s["0.weight"], w1.detach() * hg[0], atol=1e-6)
    assert torch.allclose(s["2.weight"], w2.detach() * hg[1], atol=1e-6)
    sa = compute_scores("grasp_abs", net, masks, [(x, y)])
    assert all(torch.equal(sa[k], s[k].abs()) for k in s)
    assert (s["0.weight"] < 0).any() and (s["0.weight"] > 0).any()  # genuinely signed

    # several batches: H and g of the mean loss over all samples (two-pass path)
    s2 = compute_scores("grasp", net, masks, [(x[:2], y[:2]), (x[2:], y[2:])])
    assert all(torch.allclose(s2[k], s[k], atol=1e-6) for k in s)


# --------------------------------------------------------------------------- FTS


def fts_by_loop(model: nn.Module, masks: dict, batches: list, bn_batch_stats: bool = False) -> dict:
    """Reference FTS: explicit Python loop over samples with autograd.grad."""
    net = copy.deepcopy(model)
    with torch.no_grad():
        for k, m in masks.items():
            net.get_parameter(k).mul_(m)
    net.eval()  # no dropout in the reference models; BN handled below
    names = list(masks)
    params = [net.get_parameter(k) for k in names]
    sum_g = [torch.zeros_like(p) for p in params]
    sum_g2 = [torch.zeros_like(p) for p in params]
    total = 0
    bns = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    for x, y in batches:
        if bn_batch_stats:
            stats = []
            hooks = [
                bn.register_forward_pre_hook(
                    lambda mod, a, stats=stats: stats.append(
                        (a[0].mean((0, 2, 3)), a[0].var((0, 2, 3), unbiased=False))
                    )
                )
                for bn in bns
            ]
            net.train()  # train-mode forward: each BN normalises with these very statistics
            with torch.no_grad():
                net(x)
            net.eval()
            for h in hooks:
                h.remove()
            for bn, (mu, var) in zip(bns, stats, strict=True):
                bn.running_mean.copy_(mu)
                bn.running_var.copy_(var)
        for i in range(x.shape[0]):
            loss = F.cross_entropy(net(x[i : i + 1]), y[i : i + 1])
            gs = torch.autograd.grad(loss, params)
            for a, a2, gi in zip(sum_g, sum_g2, gs, strict=True):
                a += gi
                a2 += gi**2
            total += 1
    return {
        k: (p.detach() * a / total + 0.5 * p.detach() ** 2 * a2 / total).abs()
        for k, p, a, a2 in zip(names, params, sum_g, sum_g2, strict=True)
    }


def test_fts_matches_per_sample_loop() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, 8), nn.Tanh(), nn.Linear(8, 4))
    masks = weight_masks(net, density=0.6)
    batches = batches_for("mlp", sizes=(7, 3))
    s = compute_scores("fts", net, masks, batches)
    ref = fts_by_loop(net, masks, batches)
    for k in masks:
        assert s[k].dtype == torch.float32
        assert torch.allclose(s[k], ref[k], rtol=1e-5, atol=1e-7), k


def test_fts_without_bn_uses_exact_mean_gradient() -> None:
    # no BN: ḡ is the exact batch gradient, and the ½θ²F̂ term makes FTS differ from SNIP
    net = nn.Sequential(nn.Linear(12, 6), nn.Tanh(), nn.Linear(6, 4))
    masks = weight_masks(net)
    batches = batches_for("mlp", sizes=(8,))
    snip = compute_scores("snip", net, masks, batches)
    ref = fts_by_loop(net, masks, batches)
    fts = compute_scores("fts", net, masks, batches)
    for k in masks:
        assert torch.allclose(fts[k], ref[k], rtol=1e-5, atol=1e-7)
        assert not torch.allclose(fts[k], snip[k])  # the Fisher term matters


def test_fts_batchnorm_uses_frozen_batch_statistics() -> None:
    net = small_conv_bn()
    masks = weight_masks(net, density=0.8)
    batches = batches_for("conv", sizes=(5, 4))
    s = compute_scores("fts", net, masks, batches)
    ref = fts_by_loop(net, masks, batches, bn_batch_stats=True)
    for k in masks:
        assert torch.isfinite(s[k]).all()
        assert torch.allclose(s[k], ref[k], rtol=1e-4, atol=1e-6), k


def test_fts_small_chunks_give_same_scores(monkeypatch: pytest.MonkeyPatch) -> None:
    import panning.fts as ind

    net = small_conv_bn()
    masks = weight_masks(net)
    batches = batches_for("conv")
    full = compute_scores("fts", net, masks, batches)
    monkeypatch.setattr(ind, "FTS_CHUNK_BYTES", 1)  # one sample per vmap call
    chunked = compute_scores("fts", net, masks, batches)
    assert all(torch.allclose(full[k], chunked[k], rtol=1e-5, atol=1e-8) for k in masks)


class SharedLinear(nn.Module):
    """A Linear applied to every position of a sequence (weight shared), then one applied twice."""

    def __init__(self) -> None:
        super().__init__()
        self.tok = nn.Linear(4, 6)
        self.mix = nn.Linear(6, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, T, 4)
        h = torch.tanh(self.tok(x)).mean(dim=1)
        h = torch.tanh(self.mix(torch.tanh(self.mix(h))))
        return self.head(h)


def test_fts_weight_shared_linears_match_loop() -> None:
    # tok (3-D input) and mix (called twice) must not take the outer-product route; head may
    torch.manual_seed(1)
    net = SharedLinear()
    masks = weight_masks(net, density=0.7)
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randn(6, 5, 4, generator=gen), torch.randint(0, 3, (6,), generator=gen))]
    s = compute_scores("fts", net, masks, batches)
    ref = fts_by_loop(net, masks, batches)
    for k in masks:
        assert torch.allclose(s[k], ref[k], rtol=1e-5, atol=1e-7), k


def test_fts_outer_product_route_equals_vmap_route(monkeypatch: pytest.MonkeyPatch) -> None:
    import panning.fts as ind

    net = small_conv_bn()
    net2 = small_mlp()
    net2[3].p = 0.0
    for model, kind in [(net, "conv"), (net2, "mlp")]:
        masks = weight_masks(model, density=0.6)
        batches = batches_for(kind)
        fast = compute_scores("fts", model, masks, batches)
        with monkeypatch.context() as mp:
            mp.setattr(ind, "_tap_layers", lambda *a, **k: {})
            slow = compute_scores("fts", model, masks, batches)
        for k in masks:
            assert torch.allclose(fast[k], slow[k], rtol=1e-5, atol=1e-8), k


def test_fts_on_linear_and_conv_networks_needs_no_vmap(monkeypatch: pytest.MonkeyPatch) -> None:
    # plain Linear/Conv2d networks take one batched backward; the per-sample loop is the reference
    import panning.fts as ind

    def no_vmap(*a, **k):
        raise AssertionError("vmap used")

    monkeypatch.setattr(ind, "vmap", no_vmap)
    torch.manual_seed(2)
    net = nn.Sequential(nn.Flatten(), nn.Linear(12, 9), nn.ReLU(), nn.Linear(9, 7), nn.ReLU(), nn.Linear(7, 4))
    masks = weight_masks(net, density=0.5)
    batches = batches_for("mlp", sizes=(6, 5))
    s = compute_scores("fts", net, masks, batches)
    ref = fts_by_loop(net, masks, batches)
    assert all(torch.allclose(s[k], ref[k], rtol=1e-5, atol=1e-7) for k in masks)
    # strided, padded, dilated convolutions with BatchNorm on small images (unfolded inputs smaller
    # than the per-sample gradients, so the unfold route is taken): against the loop
    conv = nn.Sequential(
        nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 8, (3, 2), dilation=(1, 2), padding=(2, 0), bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3),
    )
    gen = torch.Generator().manual_seed(3)
    cb = [(torch.randn(n, 3, 5, 5, generator=gen), torch.randint(0, 3, (n,), generator=gen)) for n in (5, 4)]
    cm = weight_masks(conv, density=0.7)
    routes: list[str] = []
    for fn in ("_accumulate_conv", "_accumulate_conv_pairs"):
        real = getattr(ind, fn)
        monkeypatch.setattr(ind, fn, lambda *a, _r=real, _n=fn, **k: routes.append(_n) or _r(*a, **k))
    s = compute_scores("fts", conv, cm, cb)
    # 9 output positions: per-sample matmuls; 5: position pairs (each once per batch)
    assert routes.count("_accumulate_conv") == 4 and routes.count("_accumulate_conv_pairs") == 2
    ref = fts_by_loop(conv, cm, cb, bn_batch_stats=True)
    assert all(torch.allclose(s[k], ref[k], rtol=1e-4, atol=1e-6) for k in cm), [
        (k, (s[k] - ref[k]).abs().max().item()) for k in cm]
    # a grouped convolution cannot take that route: vmap it is
    grouped = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2), nn.ReLU(), nn.Flatten(), nn.LazyLinear(3))
    grouped(torch.zeros(1, 4, 6, 6))
    with pytest.raises(AssertionError, match="vmap used"):
        compute_scores("fts", grouped, weight_masks(grouped), [(torch.randn(3, 4, 6, 6), torch.tensor([0, 1, 2]))])


def test_unfold_size_matches_torch_unfold() -> None:
    import torch.nn.functional as F

    from panning.fts import _unfold_numel

    for conv, hw in [(nn.Conv2d(3, 4, 3, stride=2, padding=1), (9, 7)),
                     (nn.Conv2d(2, 5, (3, 2), dilation=(1, 2), padding=(2, 0)), (6, 8))]:
        a = torch.zeros(1, conv.in_channels, *hw)
        u = F.unfold(a, conv.kernel_size, dilation=conv.dilation, padding=conv.padding, stride=conv.stride)
        assert _unfold_numel(conv, tuple(a.shape)) == u.numel()


def test_fts_wide_images_take_vmap_and_match_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    import panning.fts as ind

    used = []
    real = ind.vmap
    monkeypatch.setattr(ind, "vmap", lambda *a, **k: used.append(1) or real(*a, **k))
    net = small_conv_bn()  # few output channels: the unfolded inputs outweigh the per-sample gradients
    masks = weight_masks(net, density=0.8)
    batches = batches_for("conv", sizes=(5, 4))
    s = compute_scores("fts", net, masks, batches)
    assert used
    ref = fts_by_loop(net, masks, batches, bn_batch_stats=True)
    assert all(torch.allclose(s[k], ref[k], rtol=1e-4, atol=1e-6) for k in masks)


def test_fts_grouped_conv_falls_back_to_vmap_and_matches_loop() -> None:
    torch.manual_seed(4)
    net = nn.Sequential(nn.Conv2d(4, 6, 3, groups=2), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 4 * 4, 3))
    masks = weight_masks(net, density=0.6)
    gen = torch.Generator().manual_seed(5)
    batches = [(torch.randn(5, 4, 6, 6, generator=gen), torch.randint(0, 3, (5,), generator=gen))]
    s = compute_scores("fts", net, masks, batches)
    ref = fts_by_loop(net, masks, batches)
    assert all(torch.allclose(s[k], ref[k], rtol=1e-5, atol=1e-7) for k in masks)


def test_fts_batchnorm_without_running_stats() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.BatchNorm1d(8, track_running_stats=False), nn.ReLU(),
                        nn.Linear(8, 4))
    snap = snapshot(net)
    s = compute_scores("fts", net, weight_masks(net), batches_for("mlp"))
    assert all(torch.isfinite(v).all() and (v > 0).any() for v in s.values())
    assert_same(net, snap)


def test_all_indices_on_resnet20_and_masks_class() -> None:
    from panning import masks as masks_mod
    from panning import models
    net = models.build_model("resnet20", 10, (3, 32, 32), seed=0)
    masks = masks_mod.Masks.ones(net)
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randn(4, 3, 32, 32, generator=gen), torch.randint(0, 10, (4,), generator=gen))]
    snap = snapshot(net)
    for name in ALL:
        s = compute_scores(name, net, masks, batches)
        assert list(s) == list(masks)
        assert all(torch.isfinite(v).all() for v in s.values()), name
        assert_same(net, snap)


# --------------------------------------------------------------------------- semantics


@pytest.mark.parametrize("name", [n for n in ALL if n != "random"])
@pytest.mark.parametrize("kind", ["mlp", "conv"])
def test_masked_network_semantics(name: str, kind: str) -> None:
    """Scoring with a mask == scoring the net whose weights were multiplied by the mask (and, where the
    mask is only a factor on the weights, == scoring that net with no mask)."""
    net = small_mlp() if kind == "mlp" else small_conv_bn()
    masks = weight_masks(net, density=0.5, seed=2)
    batches = batches_for(kind)
    pre = copy.deepcopy(net)
    with torch.no_grad():
        for k, m in masks.items():
            pre.get_parameter(k).mul_(m)
    a = compute_scores(name, net, masks, batches, seed=5)
    b = compute_scores(name, pre, masks, batches, seed=5)
    ones = {k: torch.ones_like(m) for k, m in masks.items()}
    c = compute_scores(name, pre, ones, batches, seed=5)
    for k in masks:
        if name != "force":  # FORCE multiplies by the dense weights, which the pre-masked net has lost
            assert torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-7), k
        if name not in MASK_NOT_A_FACTOR:
            assert torch.allclose(a[k], c[k], rtol=1e-5, atol=1e-7), k
        if name != "grasp":
            assert (a[k] >= 0).all()


def test_snip_averages_over_batches() -> None:
    net = small_mlp()
    net[3].p = 0.0  # no dropout: compare one batch with the same samples split in two
    masks = weight_masks(net)
    (x1, y1), (x2, y2) = batches_for("mlp", sizes=(6, 2))
    split = compute_scores("snip", net, masks, [(x1, y1), (x2, y2)])
    whole = compute_scores("snip", net, masks, [(torch.cat([x1, x2]), torch.cat([y1, y2]))])
    assert all(torch.allclose(split[k], whole[k], atol=1e-6) for k in masks)


def test_data_indices_run_in_train_mode() -> None:
    # a model handed over in eval mode is scored in train mode, then handed back in eval mode
    net = small_conv_bn().eval()
    masks = weight_masks(net)
    batches = batches_for("conv")
    seen = []
    hook = net.bn1.register_forward_pre_hook(lambda m, a: seen.append(m.training))
    try:
        compute_scores("snip", net, masks, batches)
    finally:
        hook.remove()
    assert seen and all(seen)
    assert not net.training


def test_synflow_eval_mode_and_input_shape_from_batches() -> None:
    net = small_conv_bn().train()
    net.bn1.running_mean.fill_(0.3)  # eval mode must use these (absolute) running stats
    masks = weight_masks(net)
    batches = batches_for("conv")
    seen = []
    hook = net.bn1.register_forward_pre_hook(lambda m, a: seen.append(m.training))
    try:
        a = compute_scores("synflow", net, masks, batches)
    finally:
        hook.remove()
    assert seen == [False] and net.training
    b = compute_scores("synflow", net, masks, input_shape=(3, 5, 5))
    assert all(torch.equal(a[k], b[k]) for k in masks)
    net2 = copy.deepcopy(net)
    net2.bn1.running_mean.fill_(0.0)
    c = compute_scores("synflow", net2, masks, input_shape=(3, 5, 5))
    assert not torch.allclose(a["conv2.weight"], c["conv2.weight"])


def test_synflow_deep_narrow_mlp_no_underflow() -> None:
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Linear(8, 8, bias=False) for _ in range(30)]
    for lin in layers:
        nn.init.uniform_(lin.weight, -0.005, 0.005)  # path products ~ (8·0.0025)^30 ≈ 1e-51
    net = nn.Sequential(*[m for lin in layers for m in (lin, nn.ReLU())])
    masks = weight_masks(net)
    # in float32 the synaptic flow itself underflows to exactly zero ...
    with torch.no_grad():
        h = torch.ones(1, 8)
        for lin in layers:
            h = h @ lin.weight.abs().T
    assert h.sum().item() == 0.0
    # ... float64 keeps every score finite and positive
    s = compute_scores("synflow", net, masks, input_shape=(8,))
    for k, v in s.items():
        assert v.dtype == torch.float64
        assert torch.isfinite(v).all() and (v > 0).all(), k


def test_scores_keys_order_dtype_device() -> None:
    net = small_conv_bn()
    masks = weight_masks(net)
    rev = dict(reversed(list(masks.items())))
    for name in ALL:
        s = compute_scores(name, net, rev, batches_for("conv"))
        assert list(s) == list(rev)
        for k, v in s.items():
            assert v.shape == net.get_parameter(k).shape
            assert v.device == net.get_parameter(k).device
            assert v.dtype == (torch.float64 if name in FLOAT64 else torch.float32)


def test_pruned_weights_score_zero_for_gradient_indices() -> None:
    net = small_mlp()
    masks = weight_masks(net, density=0.5)
    for name in ["magnitude", "snip", "grasp", "grasp_abs", "synflow", "fts"]:
        s = compute_scores(name, net, masks, batches_for("mlp"))
        for k, m in masks.items():
            assert (s[k][~m] == 0).all(), (name, k)


def test_global_rng_untouched() -> None:
    net = small_mlp()
    torch.manual_seed(123)
    before = torch.get_rng_state()
    for name in ALL:
        compute_scores(name, net, weight_masks(net), batches_for("mlp"), seed=9)
    assert torch.equal(torch.get_rng_state(), before)


def test_random_depends_on_seed_only() -> None:
    net = small_mlp()
    m = weight_masks(net)
    a = compute_scores("random", net, m, seed=1)
    b = compute_scores("random", small_mlp(seed=7), m, seed=1)
    c = compute_scores("random", net, m, seed=2)
    assert all(torch.equal(a[k], b[k]) for k in m)
    assert not all(torch.equal(a[k], c[k]) for k in m)
    assert all(((v >= 0) & (v < 1)).all() for v in a.values())


# --------------------------------------------------------------------------- properties


@pytest.mark.parametrize("kind", ["mlp", "conv"])
@pytest.mark.parametrize("name", ALL)
@settings(max_examples=3, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    seed=st.integers(0, 2**31 - 1),
    density=st.sampled_from([1.0, 0.5, 0.1]),
    train=st.booleans(),
    grads=st.sampled_from(["none", "some", "all"]),
    frozen=st.booleans(),
)
def test_model_unchanged_and_reproducible(
    name: str, kind: str, seed: int, density: float, train: bool, grads: str, frozen: bool
) -> None:
    net = small_mlp(seed % 100) if kind == "mlp" else small_conv_bn(seed % 100)
    net.train(train)
    if kind == "conv":
        net.bn2.eval()  # mixed modes must come back exactly
        with torch.no_grad():
            net.bn1.running_mean.uniform_(-1, 1)
    params = list(net.parameters())
    for i, p in enumerate(params):
        if grads == "all" or (grads == "some" and i % 2 == 0):
            p.grad = torch.randn_like(p)
    if frozen:
        params[0].requires_grad_(False)
    masks = weight_masks(net, density=density, seed=seed)
    batches = batches_for(kind, seed=seed)
    snap = snapshot(net)
    a = compute_scores(name, net, masks, batches, seed=seed)
    assert_same(net, snap)
    b = compute_scores(name, net, masks, batches, seed=seed)
    assert_same(net, snap)
    for k in masks:
        assert torch.equal(a[k], b[k]), k
        assert torch.isfinite(a[k]).all()


# --------------------------------------------------------------------------- bad input


def test_unknown_index_lists_known_names() -> None:
    net = small_mlp()
    with pytest.raises(ValueError, match="unknown index 'snipp'.*synflow"):
        compute_scores("snipp", net, weight_masks(net))


@pytest.mark.parametrize("name", DATA)
@pytest.mark.parametrize("batches", [None, []])
def test_data_index_needs_batches(name: str, batches) -> None:
    net = small_mlp()
    with pytest.raises(ValueError, match="needs data"):
        compute_scores(name, net, weight_masks(net), batches)


def test_synflow_needs_input_shape_or_batches() -> None:
    net = small_mlp()
    with pytest.raises(ValueError, match="input_shape"):
        compute_scores("synflow", net, weight_masks(net))


def test_bad_masks_rejected() -> None:
    net = small_mlp()
    good = weight_masks(net)
    with pytest.raises(ValueError, match="not parameters of the model.*nope"):
        compute_scores("magnitude", net, {**good, "nope.weight": torch.ones(3, dtype=torch.bool)})
    with pytest.raises(ValueError, match="shape"):
        compute_scores("magnitude", net, {"1.weight": torch.ones(3, 3, dtype=torch.bool)})
    with pytest.raises(ValueError, match="binary"):
        compute_scores("magnitude", net, {"1.weight": torch.full((10, 12), 0.5)})
    with pytest.raises(ValueError, match="empty"):
        compute_scores("magnitude", net, {})
    float_masks = {k: v.float() for k, v in good.items()}  # 0/1 float masks are fine
    assert compute_scores("magnitude", net, float_masks).keys() == good.keys()


def test_bad_batches_rejected() -> None:
    net = small_mlp()
    x, y = batches_for("mlp")[0]
    with pytest.raises(ValueError, match="wrap one batch in a list"):
        compute_scores("snip", net, weight_masks(net), (x, y))
    with pytest.raises(ValueError, match="same"):
        compute_scores("snip", net, weight_masks(net), [(x, y[:2])])


def test_model_restored_after_error_midway() -> None:
    net = small_conv_bn().eval()
    snap = snapshot(net)

    def exploding_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("boom")

    for name in [n for n in DATA if n != "px"]:  # PX uses no loss
        with pytest.raises(RuntimeError, match="boom"):
            compute_scores(name, net, weight_masks(net), batches_for("conv"), loss_fn=exploding_loss)
        assert_same(net, snap)


def test_non_finite_scores_rejected() -> None:
    net = small_mlp()
    x, y = batches_for("mlp")[0]
    x[0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        compute_scores("snip", net, weight_masks(net), [(x, y)])


@pytest.mark.parametrize("name", ["random", "magnitude", "snip", "grasp", "grasp_abs", "synflow", "fts"])
def test_scores_are_plain_tensors_without_autograd_history(name: str) -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(12, 6), nn.ReLU(), nn.Linear(6, 4))
    scores = compute_scores(name, net, weight_masks(net), batches_for("mlp"))
    assert all(not v.requires_grad and v.grad_fn is None for v in scores.values())


def test_snip_takes_the_absolute_value_by_hand() -> None:
    """SNIP = |θ ⊙ ∂L/∂θ|: with L = Σ w·x and x = (1, 1), ∂L/∂w = (1, 1), so θ = (1, -2) scores (1, 2)."""
    model = nn.Sequential(nn.Linear(2, 1, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, -2.0]]))
    masks = {"0.weight": torch.ones(1, 2, dtype=torch.bool)}
    batches = [(torch.ones(1, 2), torch.zeros(1, dtype=torch.long))]
    scores = compute_scores("snip", model, masks, batches, loss_fn=lambda out, y: out.sum())
    assert scores["0.weight"].tolist() == [[1.0, 2.0]]
    # GraSP keeps its sign; for this linear loss H = 0, so θ ⊙ Hg = 0 exactly
    assert compute_scores("grasp", model, masks, batches, loss_fn=lambda out, y: out.sum())["0.weight"].tolist() \
        == [[0.0, 0.0]]


# --------------------------------------------------------------------------- registry records, messages


def test_register_index_records_name_data_need_and_doc(monkeypatch: pytest.MonkeyPatch) -> None:
    """The IndexSpec holds the name, needs_data, the docstring, and "" for a function without one."""
    monkeypatch.setattr(indices_module, "INDICES", dict(INDICES))

    def documented(model, masks, batches, **_):
        """Doc line."""
        return {}

    def bare(model, masks, batches, **_):
        return {}

    register_index("documented", needs_data=True)(documented)
    register_index("bare", needs_data=False)(bare)
    assert indices_module.INDICES["documented"] == IndexSpec("documented", documented, True, "Doc line.")
    assert indices_module.INDICES["bare"] == IndexSpec("bare", bare, False, "")


def test_compute_scores_seed_defaults_to_zero() -> None:
    """Without a seed, ``random`` draws what seed 0 draws."""
    net = small_mlp()
    m = weight_masks(net)
    a, b = compute_scores("random", net, m), compute_scores("random", net, m, seed=0)
    assert all(torch.equal(a[k], b[k]) for k in m)


def test_error_messages_name_the_problem() -> None:
    """Unknown index (known ones listed, comma-separated), a non-module model, non-mapping masks, a
    non-tensor mask, a data index without data, a loss that is not a scalar."""
    net = small_mlp()
    masks = weight_masks(net)
    known = ", ".join(available_indices())
    with pytest.raises(ValueError, match=rf"^unknown index 'snipp'; known indices: {known}$"):
        compute_scores("snipp", net, masks)
    with pytest.raises(ValueError, match=r"^model must be a torch.nn.Module, got dict$"):
        compute_scores("magnitude", {"w": torch.ones(1)}, masks)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"^masks must be a mapping \{param name: tensor\}, got list$"):
        compute_scores("magnitude", net, [torch.ones(1)])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"^masks is empty: nothing to score$"):
        compute_scores("magnitude", net, {})
    with pytest.raises(ValueError, match=r"^mask '1.weight' is not a tensor \(list\)$"):
        compute_scores("magnitude", net, {"1.weight": [[1.0] * 12] * 10})
    with pytest.raises(ValueError, match=r"^index 'snip' needs data: pass a non-empty list of \(inputs, targets\)$"):
        compute_scores("snip", net, masks)
    with pytest.raises(ValueError, match=r"^loss_fn must return a scalar tensor \(use a mean-reduced loss\)$"):
        compute_scores("snip", net, masks, batches_for("mlp"),
                       loss_fn=lambda out, y: F.cross_entropy(out, y, reduction="none"))


def test_float_masks_mean_the_same_as_bool_masks() -> None:
    """0/1 float masks (with zeros) are read as kept where 1: the same scores as the bool masks."""
    net = small_mlp()
    masks = weight_masks(net, density=0.5)
    batches = batches_for("mlp")
    a = compute_scores("snip", net, masks, batches)
    b = compute_scores("snip", net, {k: v.float() for k, v in masks.items()}, batches)
    assert all(torch.equal(a[k], b[k]) for k in masks)


def test_batch_shape_rules() -> None:
    """A tuple of (inputs, targets) pairs and 1-D inputs are fine; a list [x, y], a triple, a pair holding a
    non-tensor, 0-dim inputs and empty batches are refused with a message naming the batch and shapes."""
    net = small_mlp()
    masks = weight_masks(net)
    x, y = batches_for("mlp")[0]
    a = compute_scores("snip", net, masks, [(x, y), (x, y)])
    b = compute_scores("snip", net, masks, ((x, y), (x, y)))
    assert all(torch.equal(a[k], b[k]) for k in masks)
    with pytest.raises(ValueError, match=r"^batches must be a sequence of \(inputs, targets\) pairs; "
                                         r"wrap one batch in a list$"):
        compute_scores("snip", net, masks, (x, y))
    for bad in ([x, y], [(x, y, y)], [(x, y.tolist())]):
        with pytest.raises(ValueError, match=r"^batch 0 is not an \(inputs, targets\) pair of tensors$"):
            compute_scores("snip", net, masks, bad)
    for xs, ys, shapes in ((torch.tensor(1.0), y, r"\(\) and \(6,\)"), (x[:0], y[:0], r"\(0, 12\) and \(0,\)"),
                           (x, y[:2], r"\(6, 12\) and \(2,\)")):
        with pytest.raises(ValueError, match=r"^batch 0: inputs and targets must hold the same, non-zero number of "
                                             rf"samples \(shapes {shapes}\)$"):
            compute_scores("snip", net, masks, [(xs, ys)])

    class PerSample(nn.Module):  # 1-D inputs: one number per sample
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(1, 3)

        def forward(self, v: torch.Tensor) -> torch.Tensor:
            return self.fc(v.unsqueeze(1))

    model = PerSample()
    scores = compute_scores("snip", model, {"fc.weight": torch.ones(3, 1, dtype=torch.bool)},
                            [(torch.arange(4.0), torch.arange(4) % 3)])
    assert scores["fc.weight"].shape == (3, 1)


def test_misshapen_or_overflowing_scores_from_a_registered_index(monkeypatch: pytest.MonkeyPatch) -> None:
    """An index returning a missing key or a wrong shape is a bug (RuntimeError naming index and keys); finite
    scores whose sum overflows are fine; non-finite scores get the documented hint."""
    net = tiny_linear()
    masks = {"0.weight": torch.ones(2, 3, dtype=torch.bool), "1.weight": torch.ones(2, 2, dtype=torch.bool)}
    monkeypatch.setattr(indices_module, "INDICES", dict(INDICES))
    big = torch.full((2, 3), 1e308, dtype=torch.float64)
    outputs = {
        "missing": {"0.weight": torch.ones(2, 3)},
        "misshapen": {"0.weight": torch.ones(2, 3), "1.weight": torch.ones(4)},
        "huge": {"0.weight": big, "1.weight": torch.ones(2, 2, dtype=torch.float64)},
        "infinite": {"0.weight": torch.ones(2, 3), "1.weight": torch.full((2, 2), float("inf"))},
    }
    for name, out in outputs.items():
        register_index(name, needs_data=False)(lambda model, masks, batches, out=out, **_: out)
    for name in ("missing", "misshapen"):
        with pytest.raises(RuntimeError, match=rf"^index '{name}' returned no or misshapen scores for \['1.weight'\]$"):
            compute_scores(name, net, masks)
    assert torch.equal(compute_scores("huge", net, masks)["0.weight"], big)
    with pytest.raises(ValueError, match=r"^index 'infinite' produced non-finite scores for \['1.weight'\] "
                                         r"\(non-finite inputs or weights, or a loss that overflows\?\)$"):
        compute_scores("infinite", net, masks)


def test_gradient_indices_score_a_layer_outside_the_forward_zero() -> None:
    """A prunable layer the forward never uses has no gradient: its SNIP and GraSP scores are 0."""

    class Spare(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(12, 4)
            self.spare = nn.Linear(3, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x)

    torch.manual_seed(0)
    net = Spare()
    masks = weight_masks(net)
    for name in ("snip", "grasp"):
        scores = compute_scores(name, net, masks, batches_for("mlp"))
        assert torch.equal(scores["spare.weight"], torch.zeros(3, 3)) and scores["fc.weight"].any()


@pytest.mark.parametrize("name", ["synflow", "synflow_l2"])
def test_data_free_flow_indices_need_an_input_shape_or_batches(name):
    """Without input_shape and batches there is no input to push through: a ValueError that says so."""
    model = nn.Sequential(nn.Linear(3, 2))
    masks = {"0.weight": torch.ones(2, 3, dtype=torch.bool)}
    with pytest.raises(ValueError, match=rf"^{name} needs input_shape \(or batches to take it from\)$"):
        compute_scores(name, model, masks)


# ------------------------------------------------------------------------------ several indices together

_FAMILY_SETS = [["snip", "grasp"], ["snip", "grasp_abs"], ["grasp", "grasp_abs"], ["grasp_abs", "snip", "grasp"],
                ["snip", "magnitude", "grasp"]]


@pytest.mark.parametrize("sizes", [(6,), (6, 4)], ids=["one_batch", "two_batches"])
@pytest.mark.parametrize("names", _FAMILY_SETS, ids=["+".join(n) for n in _FAMILY_SETS])
@pytest.mark.parametrize("share", [True, False], ids=["shared", "alone"])
def test_compute_many_is_each_index_computed_alone(names, sizes, share):
    """compute_many gives, in the order asked, exactly what compute_scores gives for each name alone (the
    reference), on a partly pruned network with dropout (same seed), and leaves the model as it was."""
    model, batches = small_mlp(), batches_for("mlp", sizes=sizes)
    masks = weight_masks(model, density=0.6, seed=2)
    snap = snapshot(model)
    got = compute_many(names, model, masks, batches, seed=5, share=share)
    assert list(got) == names
    for name in names:
        alone = compute_scores(name, model, masks, batches, seed=5)
        assert list(got[name]) == list(masks)
        assert all(torch.equal(got[name][k], alone[k]) for k in masks), name
    assert_same(model, snap)


def test_compute_many_validates_like_compute_scores():
    """Unknown names and non-modules are refused with compute_scores' messages; the missing-data message
    names the first index that needs data; data-free indices need no batches."""
    model = small_mlp()
    masks = weight_masks(model)
    with pytest.raises(ValueError, match=r"^unknown index 'nope'; known indices: "):
        compute_many(["magnitude", "nope"], model, masks)
    with pytest.raises(ValueError, match=r"^model must be a torch.nn.Module, got dict$"):
        compute_many(["magnitude"], {}, masks)
    with pytest.raises(ValueError, match=r"^index 'grasp' needs data: pass a non-empty list of \(inputs, targets\)$"):
        compute_many(["magnitude", "grasp", "snip"], model, masks)
    got = compute_many(["magnitude", "random"], model, masks, seed=3)
    assert all(torch.equal(got["random"][k], compute_scores("random", model, masks, seed=3)[k]) for k in masks)


@pytest.mark.parametrize("sizes, shared, alone", [((6,), 2, 5), ((6, 4), 6, 14)], ids=["one_batch", "two_batches"])
def test_compute_many_shares_the_gradient_of_snip_and_grasp(monkeypatch, sizes, shared, alone):
    """With share, SNIP and both GraSP signs use one gradient and one Hessian-gradient product. Gradient calls, by
    hand: one batch, 2 (g with graph, Hg) instead of 1 (SNIP) + 2 (GraSP) + 2 (|GraSP|); two batches, 2 (mean g)
    + 2 x 2 (per batch: g with graph, Hg) = 6 instead of 2 (SNIP) + 6 (GraSP: mean g, then 2 per batch) + 6."""
    model, batches = small_mlp(), batches_for("mlp", sizes=sizes)
    calls = {"n": 0}
    real = indices_module._grads

    def counting(*a, **k):
        calls["n"] += 1
        return real(*a, **k)

    monkeypatch.setattr(indices_module, "_grads", counting)
    compute_many(["snip", "grasp", "grasp_abs"], model, weight_masks(model), batches)
    n_shared = calls["n"]
    calls["n"] = 0
    compute_many(["snip", "grasp", "grasp_abs"], model, weight_masks(model), batches, share=False)
    assert (n_shared, calls["n"]) == (shared, alone)


@pytest.mark.parametrize("emptied", [["fc1.weight"], ["fc2.weight"], ["fc1.weight", "fc2.weight"]])
def test_every_shipped_index_scores_a_collapsed_network_finitely(emptied: list[str]) -> None:
    """The envs score the indices on a step's new masks before they know whether the step collapsed the network
    (step_observe_many), and with terminate_on_collapse off they step on after a collapse: every index must give
    finite scores to the weights still kept when a whole layer is pruned."""
    from panning.masks import Masks
    from panning.models import build_model

    model = build_model("mlp", 10, (64,), seed=0)
    g = torch.Generator().manual_seed(1)
    masks = Masks({n: (torch.rand(p.shape, generator=g) < 0.5) & (n not in emptied)
                   for n, p in model.named_parameters() if n.endswith("weight")})
    batches = [(torch.randn(20, 64, generator=g), torch.arange(20) % 10)]
    for name in available_indices():
        scores = compute_scores(name, model, masks, batches, input_shape=(64,), seed=3)
        for k, s in scores.items():
            assert torch.isfinite(s[masks[k]]).all(), (name, k, emptied)
