"""Indices computed together (shared forward pass and gradient) and Panning as its authors' code runs it."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from panning import indices as indices_mod
from panning.errors import ConfigError
from panning.indices import compute_many, compute_scores
from panning.masks import Masks
from panning.pruner import METHODS, Pruner, panning_weights, prune


def conv_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 6, 3), nn.ReLU(),
                         nn.Flatten(), nn.Linear(6 * 4 * 4, 5))


def data(n_batches: int = 1, n: int = 10, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, 1, 8, 8, generator=g), torch.arange(n) % 5) for _ in range(n_batches)]


def half_masks(net: nn.Module, seed: int = 3) -> Masks:
    g = torch.Generator().manual_seed(seed)
    m = Masks.ones(net)
    return Masks({k: torch.rand(v.shape, generator=g) < 0.6 for k, v in m.items()})


@pytest.mark.parametrize("n_batches", [1, 2])
def test_compute_many_is_compute_scores_bit_for_bit(n_batches: int) -> None:
    net, batches = conv_net(), data(n_batches)
    masks = half_masks(net)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    names = ["synflow", "snip", "grasp", "grasp_abs", "magnitude"]
    together = compute_many(names, net, masks, batches, seed=4)
    assert list(together) == names
    for name in names:
        alone = compute_scores(name, net, masks, batches, seed=4)
        assert list(together[name]) == list(masks)
        for k in masks:
            assert torch.equal(together[name][k], alone[k]), (name, k)
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    assert net.training  # modes restored


def test_compute_many_shares_one_gradient_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    """SNIP and both GraSP signs from one batch: one gradient with graph plus one Hessian-gradient product,
    against 1 + 2 + 2 gradient calls when each is computed alone."""
    net, batches = conv_net(), data(1)
    calls = {"n": 0}
    real = indices_mod._grads

    def counting(*a, **k):
        calls["n"] += 1
        return real(*a, **k)

    monkeypatch.setattr(indices_mod, "_grads", counting)
    compute_many(["snip", "grasp", "grasp_abs"], net, Masks.ones(net), batches)
    assert calls["n"] == 2
    calls["n"] = 0
    compute_many(["snip", "grasp", "grasp_abs"], net, Masks.ones(net), batches, share=False)
    assert calls["n"] == 5


def test_pruner_with_and_without_shared_passes_gives_the_same_masks() -> None:
    net, batches = conv_net(), data(2)
    a = prune(net, "panning", 0.9, batches, iterations=5)
    b = prune(net, "panning", 0.9, batches, iterations=5, share_passes=False)
    assert all(torch.equal(a.masks[k], b.masks[k]) for k in a.masks)


def test_dense_indices_score_the_unpruned_network_once(monkeypatch: pytest.MonkeyPatch) -> None:
    net, batches = conv_net(), data(1)
    p = Pruner(net, ["synflow", "snip"], batches, dense_indices=["snip"], masks=half_masks(net))
    dense_snip = compute_scores("snip", net, Masks.ones(net), batches)
    masked_synflow = compute_scores("synflow", net, half_masks(net), input_shape=(1, 8, 8))
    s = p.scores()
    assert all(torch.equal(s["snip"][k], dense_snip[k]) for k in dense_snip)
    assert all(torch.equal(s["synflow"][k], masked_synflow[k]) for k in masked_synflow)
    assert not p.needs_scores("snip")
    with pytest.raises(ValueError, match="unpruned network"):
        p.provide_scores("snip", dense_snip)
    p.step([0.5, 0.5], p.masks.num_kept // 2)
    seen = []
    real = indices_mod.compute_many
    monkeypatch.setattr(indices_mod, "compute_many", lambda names, *a, **k: seen.append(list(names)) or real(
        names, *a, **k))
    s2 = p.scores()
    assert seen == [["synflow"]]  # SNIP of the dense network is not computed again
    assert all(torch.equal(s2["snip"][k], dense_snip[k]) for k in dense_snip)


def test_a_logit_temperature_divides_the_logits_in_that_index_only() -> None:
    net, batches = conv_net(), data(1)
    p = Pruner(net, ["snip", "grasp_abs"], batches, temperatures={"grasp_abs": 200.0})
    s = p.scores()
    want = compute_scores("grasp_abs", net, Masks.ones(net), batches,
                          loss_fn=lambda out, y: F.cross_entropy(out / 200.0, y))
    plain = compute_scores("snip", net, Masks.ones(net), batches)
    assert all(torch.equal(s["grasp_abs"][k], want[k]) for k in want)
    assert all(torch.equal(s["snip"][k], plain[k]) for k in plain)
    with pytest.raises(ConfigError, match="positive"):
        Pruner(net, ["grasp_abs"], batches, temperatures={"grasp_abs": 0.0})
    with pytest.raises(ConfigError, match="indices of this pruner"):
        Pruner(net, ["snip"], batches, dense_indices=["grasp"])


@pytest.mark.filterwarnings("ignore:layer collapse")  # 99.5% of a tiny network; the rows are what is tested
def test_panning_authors_chooses_the_row_by_the_target_and_panning_by_the_current_sparsity() -> None:
    net, batches = conv_net(), data(1)
    for method, by_target in (("panning_authors", True), ("panning", False)):
        r = prune(net, method, 0.995, batches, iterations=8)
        n = r.masks.num_total
        before = 0.0
        for h in r.history:
            at = 1 - h.keep / n if by_target else before
            assert tuple(h.weights.values()) == panning_weights(at), (method, h.step)
            before = h.sparsity
        # the last step aims at 99.5%: the authors' row is (0.5, 0, 0.5); the current sparsity is below 99%
        assert tuple(r.history[-1].weights.values()) == ((0.5, 0.0, 0.5) if by_target else (0.4, 0.2, 0.4))


def test_panning_authors_is_the_options_of_one_method() -> None:
    m = METHODS["panning_authors"]
    assert (m.indices, m.iterations, m.regrow, m.weights_by, m.dense_indices, dict(m.temperatures),
            m.normalisation) == (("synflow", "snip", "grasp_abs"), 100, True, "target", ("snip", "grasp_abs"),
                                 {"grasp_abs": 200.0}, "abs_zscore")
    net, batches = conv_net(), data(1)
    a = prune(net, "panning_authors", 0.9, batches, iterations=4, seed=2)
    b = prune(net, "panning_authors", 0.9, batches, iterations=4, seed=2)
    assert a.masks.num_kept == round(0.1 * a.masks.num_total)
    assert all(torch.equal(a.masks[k], b.masks[k]) for k in a.masks)
    with pytest.raises(ConfigError, match="normalises by 'abs_zscore'"):
        prune(net, "panning_authors", 0.9, batches, iterations=2, normalisation="rank")


def _hessian_gradient_of(loss_of, weights: list[torch.Tensor]) -> list[torch.Tensor]:
    g = torch.autograd.grad(loss_of(), weights, create_graph=True)
    z = sum((a * a.detach()).sum() for a in g)
    return [t.detach() for t in g] + list(torch.autograd.grad(z, weights))


@pytest.mark.parametrize("dim,kw", [
    (1, {"stride": 2, "padding": 1}),
    (2, {"stride": (2, 1), "padding": (1, 0), "dilation": 2}),
    (2, {"groups": 2}),
    (3, {"padding": 1}),
])
def test_weight_grad_only_convs_is_the_plain_double_backward_bit_for_bit(dim: int, kw: dict) -> None:
    """The first layer's weight gradient and the Hessian-gradient product through it equal PyTorch's own,
    bit for bit, and the layer's backward is the weight-gradient-only one."""
    from panning._functional import weight_grad_only_convs

    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[dim]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 2, *([9] * dim), generator=g)
    w1 = torch.randn(4, 2 // kw.get("groups", 1), *([3] * dim), generator=g).requires_grad_()
    b1 = torch.randn(4, generator=g)  # a bias that needs no gradient, as the indices' detached biases
    w2 = torch.randn(3, 4, *([2] * dim), generator=g).requires_grad_()

    def loss() -> torch.Tensor:
        h = torch.tanh(conv(x, w1, b1, **kw))
        return conv(h, w2).square().mean()

    plain = _hessian_gradient_of(loss, [w1, w2])
    with weight_grad_only_convs():
        out = loss()
        assert out.grad_fn is not None
        routed = _hessian_gradient_of(lambda: out, [w1, w2])
    for a, b in zip(plain, routed, strict=True):
        assert torch.equal(a, b)
    with weight_grad_only_convs():
        first = conv(x, w1, b1, **kw)
        second = conv(torch.tanh(first), w2)  # its input needs a gradient: PyTorch's own convolution
    assert type(first.grad_fn).__name__ == "_InputFreeConvBackward"
    assert type(second.grad_fn).__name__ == "ConvolutionBackward0"


def test_weight_grad_only_convs_leaves_other_convolutions_alone() -> None:
    from panning._functional import weight_grad_only_convs

    x, w = torch.randn(2, 1, 6, 6), torch.randn(2, 1, 3, 3).requires_grad_()
    with weight_grad_only_convs():
        same = F.conv2d(x, w, padding="same")  # string padding
        with_bias = F.conv2d(x, w, torch.zeros(2, requires_grad=True))  # a bias that needs its gradient
        fixed = F.conv2d(x, w.detach())  # nothing to differentiate
        with torch.no_grad():
            quiet = F.conv2d(x, w)
    assert type(same.grad_fn).__name__ == "ConvolutionBackward0"
    assert type(with_bias.grad_fn).__name__ == "ConvolutionBackward0"
    assert fixed.grad_fn is None and quiet.grad_fn is None
    assert torch.equal(same.detach(), F.conv2d(x, w.detach(), padding="same"))
    with weight_grad_only_convs():
        unbatched = F.conv2d(x[0], w)
        one_entry = F.conv2d(x, w, stride=(2,))  # PyTorch reads a one-entry stride as every dimension's
        with torch.autocast("cpu", dtype=torch.bfloat16):
            cast = F.conv2d(x, w)
        per_sample = torch.func.vmap(lambda xi: F.conv2d(xi[None], w)[0])(x)
    assert type(unbatched.grad_fn).__name__ == "SqueezeBackward1"  # PyTorch batches it itself
    assert type(one_entry.grad_fn).__name__ == "_InputFreeConvBackward"
    assert torch.equal(one_entry.detach(), F.conv2d(x, w.detach(), stride=2))
    assert type(cast.grad_fn).__name__ == "ConvolutionBackward0" and cast.dtype == torch.bfloat16
    for out in (unbatched, one_entry, cast, per_sample):
        assert torch.autograd.grad(out.float().sum(), w)[0].shape == w.shape
