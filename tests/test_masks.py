"""Masks: prunable parameters, validation, persistence, top-k selection, enforcement, torch.prune interop."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.nn.utils import prune

from panning.masks import (
    MaskError,
    Masks,
    _topk_mask,
    _topk_mask_on_device,
    enforce,
    from_torch_prune,
    keep_count,
    prunable_parameters,
    select_topk,
    to_torch_prune,
)

FEW = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2))
        self.fc1 = nn.Linear(4 * 4 * 4, 16)
        self.fc2 = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(self.features(x).flatten(1))))


def _model(seed: int = 0) -> SmallCNN:
    torch.manual_seed(seed)
    return SmallCNN()


def _random_masks(model: nn.Module, density: float = 0.5, seed: int = 0) -> Masks:
    g = torch.Generator().manual_seed(seed)
    return Masks({k: torch.rand(p.shape, generator=g) < density for k, p in prunable_parameters(model).items()})


# ---------------------------------------------------------------- prunable parameters, keep_count


def test_prunable_parameters_conv_linear_weights_only_in_order():
    m = _model()
    assert list(prunable_parameters(m)) == ["features.0.weight", "fc1.weight", "fc2.weight"]
    assert prunable_parameters(m)["fc1.weight"] is m.fc1.weight


@pytest.mark.parametrize("exclude", [["fc2"], ["fc2.weight"], ["fc2*"], ("features.*", "fc2")])
def test_prunable_parameters_exclude(exclude):
    keys = list(prunable_parameters(_model(), exclude=exclude))
    assert "fc2.weight" not in keys and "fc1.weight" in keys


def test_prunable_parameters_nothing_prunable():
    with pytest.raises(MaskError, match="no prunable"):
        prunable_parameters(nn.Sequential(nn.BatchNorm1d(3), nn.ReLU()))
    with pytest.raises(MaskError, match="no prunable"):
        prunable_parameters(nn.Linear(3, 2), exclude=["*"])


def test_prunable_parameters_unmatched_exclude_warns():
    with pytest.warns(UserWarning, match="fc9"):
        prunable_parameters(_model(), exclude=["fc9"])


def test_keep_count():
    assert keep_count(1000, 0.0) == 1000
    assert keep_count(1000, 0.9) == 100
    assert keep_count(10, 0.9) == 1
    assert keep_count(7, 0.5) == round(3.5)
    for bad in (1.0, -0.1, float("nan"), 1.5):
        with pytest.raises(ValueError, match="sparsity"):
            keep_count(100, bad)


# ---------------------------------------------------------------- Masks type


def test_masks_accepts_binary_and_rejects_others():
    m = Masks({"a": torch.tensor([0.0, 1.0, 1.0]), "b": torch.tensor([[True, False]])})
    assert m["a"].dtype == torch.bool and m["a"].tolist() == [False, True, True]
    assert (m.num_kept, m.num_total) == (3, 5)
    assert m.density == pytest.approx(0.6) and m.sparsity == pytest.approx(0.4)
    assert m.layer_density() == {"a": pytest.approx(2 / 3), "b": 0.5}
    for bad in (torch.tensor([0.0, 0.5]), torch.tensor([2, 1]), torch.tensor([float("nan"), 1.0])):
        with pytest.raises(MaskError, match="'x' is not binary"):
            Masks({"x": bad})
    with pytest.raises(MaskError):
        Masks({})
    with pytest.raises(TypeError):
        m["a"] = torch.ones(3, dtype=torch.bool)  # type: ignore[index]


def test_masks_copies_input_and_equality():
    t = torch.ones(4, dtype=torch.bool)
    m = Masks({"w": t})
    t[0] = False
    assert bool(m["w"][0])
    same = Masks({"w": torch.ones(4)})
    other = Masks({"w": torch.tensor([1, 1, 1, 0])})
    assert m.equal(same) and m == same
    assert not m.equal(other) and m != other
    assert not m.equal(Masks({"v": torch.ones(4)}))
    assert m.cpu().equal(m) and m.to("cpu").equal(m)


def test_masks_ones_report_and_apply():
    model = _model()
    ones = Masks.ones(model, exclude=["fc2"])
    assert list(ones) == ["features.0.weight", "fc1.weight"] and ones.sparsity == 0.0
    masks = _random_masks(model, 0.3)
    rep = masks.report()
    for k, v in masks.items():
        assert k in rep and f"{int(v.sum())}/{v.numel()}" in rep
    assert "total" in rep and "sparsity" in rep
    masks.apply_(model)
    for k, p in prunable_parameters(model).items():
        assert torch.all(p[~masks[k]] == 0)


def test_check_errors_name_the_problem():
    model = _model()
    full = Masks.ones(model)
    full.check(model)
    full.check(model, exclude=())
    partial = Masks.ones(model, exclude=["fc2"])
    partial.check(model)  # a subset is fine by default: excluded layers stay dense
    partial.check(model, exclude=["fc2"])
    with pytest.raises(MaskError, match="missing.*fc2.weight"):
        partial.check(model, exclude=())
    with pytest.raises(MaskError, match="excluded.*fc2.weight"):
        full.check(model, exclude=["fc2"])
    with pytest.raises(MaskError, match="extra keys.*not parameters.*nope.weight"):
        Masks({**full, "nope.weight": torch.ones(3)}).check(model)
    with pytest.raises(MaskError, match="not prunable.*fc1.bias"):
        Masks({**full, "fc1.bias": torch.ones(16)}).check(model)
    with pytest.raises(MaskError, match=r"'fc1.weight' has shape \(16, 65\).*\(16, 64\)"):
        Masks({**full, "fc1.weight": torch.ones(16, 65)}).check(model)


def test_save_load_round_trip(tmp_path):
    masks = _random_masks(_model(), 0.4, seed=3)
    path = tmp_path / "masks.pt"
    masks.save(path)
    loaded = Masks.load(path)
    assert loaded.equal(masks) and list(loaded) == list(masks)
    assert loaded["fc1.weight"].dtype == torch.bool
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == "panning.masks"
    torch.save({"fc1.weight": torch.ones(2)}, tmp_path / "plain.pt")
    with pytest.raises(MaskError, match="not a panning masks file"):
        Masks.load(tmp_path / "plain.pt")


# ---------------------------------------------------------------- select_topk


def _reference_global(scores: dict[str, torch.Tensor], keep: int, current: Masks | None) -> dict[str, torch.Tensor]:
    """Specification: stable descending sort over the concatenation, dead weights excluded."""
    flat = torch.cat([s.reshape(-1).double() for s in scores.values()])
    alive = (torch.cat([current[k].reshape(-1) for k in scores]) if current is not None
             else torch.ones_like(flat, dtype=torch.bool))
    order = torch.sort(flat.masked_fill(~alive, float("-inf")), descending=True, stable=True).indices
    chosen = torch.zeros_like(alive)
    chosen[order[:keep]] = True
    out, i = {}, 0
    for k, s in scores.items():
        out[k] = chosen[i : i + s.numel()].reshape(s.shape)
        i += s.numel()
    return out


@st.composite
def score_dicts(draw, ties: bool = True):
    n_layers = draw(st.integers(1, 4))
    shapes = [tuple(draw(st.lists(st.integers(1, 5), min_size=1, max_size=3))) for _ in range(n_layers)]
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    if ties and draw(st.booleans()):
        scores = {f"l{i}.weight": torch.randint(0, 3, s, generator=g).float() for i, s in enumerate(shapes)}
    else:
        scores = {f"l{i}.weight": torch.randn(s, generator=g) for i, s in enumerate(shapes)}
    return scores


@FEW
@given(scores=score_dicts(), frac=st.floats(0, 1), frac2=st.floats(0, 1), mode=st.sampled_from(["global", "layerwise"]))
def test_topk_exact_count_binary_and_monotone(scores, frac, frac2, mode):
    total = sum(s.numel() for s in scores.values())
    keep1 = round(frac * total)
    m1 = select_topk(scores, keep1, mode=mode)
    assert isinstance(m1, Masks) and list(m1) == list(scores)
    assert all(v.dtype == torch.bool and v.shape == scores[k].shape for k, v in m1.items())
    assert m1.num_kept == keep1
    keep2 = round(frac2 * keep1)
    m2 = select_topk(scores, keep2, current=m1, mode=mode)
    assert m2.num_kept == keep2
    assert all(bool((m2[k] & ~m1[k]).sum() == 0) for k in m1)  # never revives a pruned weight


@FEW
@given(scores=score_dicts(), frac=st.floats(0, 1), frac2=st.floats(0, 1))
def test_topk_global_matches_stable_sort_spec(scores, frac, frac2):
    total = sum(s.numel() for s in scores.values())
    keep1 = round(frac * total)
    m1 = select_topk(scores, keep1)
    assert m1.equal(_reference_global(scores, keep1, None))
    # new scores on a second step: selection only among the survivors
    rescored = {k: -v for k, v in scores.items()}
    keep2 = round(frac2 * keep1)
    m2 = select_topk(rescored, keep2, current=m1)
    assert m2.equal(_reference_global(rescored, keep2, m1))


@FEW
@given(scores=score_dicts(ties=False), frac=st.floats(0, 1))
def test_topk_layerwise_shares_are_proportional(scores, frac):
    total = sum(s.numel() for s in scores.values())
    keep = round(frac * total)
    m = select_topk(scores, keep, mode="layerwise")
    for k, s in scores.items():
        kept = int(m[k].sum())
        assert abs(kept - keep * s.numel() / total) < 1.0
        # within a layer, the kept weights are that layer's top scores
        if 0 < kept < s.numel():
            assert s[m[k]].min() >= s[~m[k]].max()


def test_topk_ties_are_deterministic_earliest_first():
    scores = {"a": torch.zeros(2, 3), "b": torch.zeros(4)}
    first = select_topk(scores, 4)
    for _ in range(3):
        assert select_topk(scores, 4).equal(first)
    assert first["a"].reshape(-1).tolist() == [True] * 4 + [False] * 2
    assert first["b"].tolist() == [False] * 4
    m = select_topk(scores, 7)
    assert m["a"].all() and m["b"].tolist() == [True, False, False, False]
    lw = select_topk({"a": torch.zeros(6), "b": torch.zeros(6)}, 6, mode="layerwise")
    assert lw["a"].tolist() == [True] * 3 + [False] * 3 == lw["b"].tolist()


def test_layerwise_tied_remainders_go_to_the_earlier_layer():
    """Largest-remainder rounding: equal remainders give the extra weight to the earlier layer."""
    lw = select_topk({"a": torch.zeros(3), "b": torch.zeros(3)}, 3, mode="layerwise")  # 1.5 each
    assert lw["a"].tolist() == [True, True, False] and lw["b"].tolist() == [True, False, False]
    three = select_topk({"a": torch.zeros(1), "b": torch.zeros(1), "c": torch.zeros(1)}, 2, mode="layerwise")
    assert [bool(three[k]) for k in "abc"] == [True, True, False]
    # a larger remainder wins over an earlier layer: 7 of (4, 6) weights -> 2.8 and 4.2 -> 3 and 4
    uneven = select_topk({"a": torch.zeros(4), "b": torch.zeros(6)}, 7, mode="layerwise")
    assert (int(uneven["a"].sum()), int(uneven["b"].sum())) == (3, 4)


@FEW
@given(
    scores=score_dicts(),
    frac0=st.floats(0, 1),
    frac=st.floats(0, 1),
    mpl=st.integers(1, 6),
    mode=st.sampled_from(["global", "layerwise"]),
)
def test_topk_min_per_layer(scores, frac0, frac, mpl, mode):
    # a global first step leaves uneven alive counts, so layer-wise caps and minimums interact
    total = sum(s.numel() for s in scores.values())
    current = select_topk({k: torch.rand(v.shape) for k, v in scores.items()}, round(frac0 * total))
    alive = {k: int(current[k].sum()) for k in scores}
    need = sum(min(mpl, a) for a in alive.values())
    keep = max(need, round(frac * current.num_kept))
    m = select_topk(scores, keep, current=current, mode=mode, min_per_layer=mpl)
    assert m.num_kept == keep
    for k in scores:
        assert min(mpl, alive[k]) <= int(m[k].sum()) <= alive[k]
    if need > 0:
        with pytest.raises(ValueError, match="min_per_layer"):
            select_topk(scores, need - 1, current=current, mode=mode, min_per_layer=mpl)


def test_topk_layerwise_caps_and_minimums_together():
    # a's proportional share (2.5) exceeds its 2 alive weights, yet b and c must keep one each
    scores = {"a": torch.arange(10.0), "b": torch.ones(1), "c": torch.ones(1)}
    cur = Masks({"a": torch.arange(10) < 2, "b": torch.ones(1), "c": torch.ones(1)})
    m = select_topk(scores, 3, current=cur, mode="layerwise", min_per_layer=1)
    assert [int(m[k].sum()) for k in m] == [1, 1, 1] and m["a"].tolist()[:2] == [False, True]


def test_topk_min_per_layer_takes_each_layers_best():
    scores = {"a": torch.tensor([5.0, 4.0, 3.0]), "b": torch.tensor([0.1, 0.3, 0.2])}
    m = select_topk(scores, 3, min_per_layer=1)
    assert m["a"].tolist() == [True, True, False] and m["b"].tolist() == [False, True, False]
    # alive count below the minimum: the layer keeps what it has
    cur = Masks({"a": torch.tensor([1, 1, 1]), "b": torch.tensor([0, 0, 1])})
    m = select_topk(scores, 3, current=cur, min_per_layer=2)
    assert m["b"].tolist() == [False, False, True] and m["a"].tolist() == [True, True, False]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("mode", ["global", "layerwise"])
def test_topk_non_finite_scores_raise(bad, mode):
    scores = {"a": torch.tensor([1.0, bad, 3.0]), "b": torch.ones(2)}
    with pytest.raises(ValueError, match="non-finite.*'a': 1"):
        select_topk(scores, 2, mode=mode)
    # a NaN on an already pruned weight is irrelevant
    cur = Masks({"a": torch.tensor([1, 0, 1]), "b": torch.ones(2)})
    assert select_topk(scores, 2, current=cur, mode=mode).num_kept == 2


def test_topk_bad_arguments():
    scores = {"a": torch.ones(3), "b": torch.ones(2)}
    cur = Masks({"a": torch.tensor([1, 0, 0]), "b": torch.ones(2)})
    with pytest.raises(ValueError, match="3 weights still alive"):
        select_topk(scores, 4, current=cur)
    with pytest.raises(ValueError, match="keep"):
        select_topk(scores, -1)
    with pytest.raises(ValueError, match="keep must be an integer"):
        select_topk(scores, 2.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="mode"):
        select_topk(scores, 2, mode="per-layer")
    with pytest.raises(MaskError, match="disagree on keys"):
        select_topk({"a": torch.ones(3)}, 1, current=cur)
    with pytest.raises(MaskError, match="shape"):
        select_topk({"a": torch.ones(4), "b": torch.ones(2)}, 1, current=cur)


@pytest.mark.slow
def test_topk_at_vgg16_scale():
    # VGG-16-sized (~15M weights): exact counts at scale (its speed is benchmarked, not tested)
    g = torch.Generator().manual_seed(0)
    sizes = [1728, 36864, 73728, 147456, 294912, 589824, 589824, 1179648] + [2359296] * 5 + [262144, 5120]
    scores = {f"l{i}.weight": torch.randn(n, generator=g) for i, n in enumerate(sizes)}
    total = sum(sizes)
    m = select_topk(scores, total // 10)
    m2 = select_topk(scores, total // 100, current=m, min_per_layer=10)
    assert m.num_kept == total // 10 and m2.num_kept == total // 100
    assert all(int(m2[k].sum()) >= 10 for k in m2) and all(bool((m2[k] <= m[k]).all()) for k in m)


# ---------------------------------------------------------------- enforce


def _train_steps(model, opt, steps: int = 5) -> None:
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(8, 1, 8, 8, generator=g)
        y = torch.randint(0, 3, (8,), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


@pytest.mark.parametrize(
    "make_opt",
    [
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4),
        lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
        lambda p: torch.optim.Adam(p, lr=1e-2, amsgrad=True, weight_decay=1e-3),
    ],
    ids=["sgd-nesterov-wd", "adamw", "adam-amsgrad"],
)
def test_enforce_keeps_pruned_weights_zero(make_opt):
    model = _model()
    masks = _random_masks(model, 0.3, seed=2)
    before = {k: p.detach().clone() for k, p in prunable_parameters(model).items()}
    opt = make_opt(model.parameters())
    handle = enforce(model, masks, opt)
    _train_steps(model, opt)
    params = prunable_parameters(model)
    for k, p in params.items():
        dead = ~masks[k]
        assert torch.all(p[dead] == 0), k
        assert torch.all(p.grad[dead] == 0), k
        assert not torch.equal(p[masks[k]], before[k][masks[k]]), k  # kept weights do train
        for name, buf in opt.state[p].items():
            if isinstance(buf, torch.Tensor) and buf.shape == p.shape:
                assert torch.all(buf[dead] == 0), (k, name)
    assert handle.active
    handle.remove()
    assert not handle.active
    _train_steps(model, opt, 1)
    assert any(bool((p.grad[~masks[k]] != 0).any()) for k, p in params.items())  # hooks really gone


def test_enforce_grad_hooks_without_optimizer_and_state_already_there():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    _train_steps(model, opt, 2)  # momentum buffers are dense now
    masks = _random_masks(model, 0.5, seed=4)
    with enforce(model, masks, opt):
        for k, p in prunable_parameters(model).items():
            assert torch.all(opt.state[p]["momentum_buffer"][~masks[k]] == 0)
        _train_steps(model, opt, 2)
        for k, p in prunable_parameters(model).items():
            assert torch.all(p[~masks[k]] == 0) and torch.all(p.grad[~masks[k]] == 0)
    model2 = _model()
    masks2 = _random_masks(model2, 0.5)
    enforce(model2, masks2)
    model2(torch.randn(2, 1, 8, 8)).sum().backward()
    for k, p in prunable_parameters(model2).items():
        assert torch.all(p.grad[~masks2[k]] == 0) and torch.all(p[~masks2[k]] == 0)


def test_enforce_matches_masked_fill_reference_bit_for_bit():
    # the bit-AND fast path must train exactly as the plain masked_fill formulation does
    masks = _random_masks(_model(), 0.3, seed=5)

    def train(fast: bool) -> dict[str, torch.Tensor]:
        model = _model()
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
        params = prunable_parameters(model)
        if fast:
            enforce(model, masks, opt)
        else:
            with torch.no_grad():
                for k, p in params.items():
                    p.masked_fill_(~masks[k], 0)
            for k, p in params.items():
                p.register_hook(lambda g, m=masks[k]: g.masked_fill(~m, 0))
        _train_steps(model, opt, 4)
        return {k: v.detach().clone() for k, v in model.state_dict().items()}

    fast, ref = train(True), train(False)
    assert all(torch.equal(fast[k], ref[k]) for k in ref)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_zero_pruned_is_exact_for_nan_inf_and_keeps_bits(dtype):
    from panning._functional import keep_bits, zero_pruned

    t = torch.tensor([float("nan"), float("inf"), -0.0, -1.5, float("-inf"), 3.25, float("nan")], dtype=dtype)
    mask = torch.tensor([False, False, False, True, True, False, True])
    bits = keep_bits(mask, dtype)
    out = zero_pruned(t, bits, mask)
    assert out.dtype == dtype and out.data_ptr() != t.data_ptr()
    assert torch.equal(out[~mask], torch.zeros(4, dtype=dtype)) and not torch.signbit(out[~mask]).any()
    assert out[3] == -1.5 and out[4] == float("-inf") and torch.isnan(out[6])
    inplace = t.clone()
    assert zero_pruned(inplace, bits, mask, inplace=True) is inplace
    assert torch.equal(inplace.nan_to_num(), out.nan_to_num())


def test_zero_pruned_falls_back_where_bits_do_not_apply():
    from panning._functional import keep_bits, zero_pruned

    mask = torch.tensor([True, False, True])
    assert keep_bits(mask, torch.int64) is None
    ints = torch.tensor([4, 5, 6])
    assert zero_pruned(ints, None, mask).tolist() == [4, 0, 6]
    # a tensor in an autograd graph keeps its gradient path (masked_fill, not a dtype view)
    w = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
    out = zero_pruned(w * 2, keep_bits(mask, torch.float32), mask)
    out.sum().backward()
    assert w.grad.tolist() == [2.0, 0.0, 2.0]


def test_enforce_zeroes_nan_gradients_of_pruned_weights():
    model = _model()
    masks = _random_masks(model, 0.5, seed=6)
    k0, p0 = next(iter(prunable_parameters(model).items()))
    # registered first, so it runs before enforce's hook: pruned entries reach enforce as NaN
    p0.register_hook(lambda g: g.masked_fill(~masks[k0], float("nan")))
    enforce(model, masks)
    model(torch.randn(2, 1, 8, 8)).sum().backward()
    assert torch.all(p0.grad[~masks[k0]] == 0)


def test_enforce_step_guard_rezeros_what_bypasses_the_gradient():
    """The optimizer post-step hook re-zeros pruned weights and their optimizer state even when the
    update did not come through the hooked gradient (here: a gradient assigned after backward)."""
    torch.manual_seed(0)
    lin = nn.Linear(4, 3)
    mask = torch.tensor([[True, False, True, False], [False, True, True, True], [True, True, False, False]])
    for guarded in (True, False):
        net = copy.deepcopy(lin)
        opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
        handle = enforce(net, Masks({"weight": mask}), opt if guarded else None)
        net(torch.randn(5, 4)).sum().backward()
        net.weight.grad = torch.ones_like(net.weight)  # replaces the masked gradient: bypasses the hook
        opt.step()
        pruned = net.weight.detach()[~mask]
        if guarded:
            assert torch.equal(pruned, torch.zeros_like(pruned))
            assert torch.equal(opt.state[net.weight]["momentum_buffer"][~mask], torch.zeros_like(pruned))
        else:  # without the optimizer, enforce cannot see the step: the documented limit
            assert (pruned != 0).all()
        handle.remove()


def test_enforce_rejects_mismatched_masks():
    model = _model()
    with pytest.raises(MaskError):
        enforce(model, Masks({"fc1.weight": torch.ones(3, 3)}))


# ---------------------------------------------------------------- torch.nn.utils.prune


def test_torch_prune_round_trip_and_forward():
    model = _model()
    model.eval()
    masks = _random_masks(model, 0.4, seed=5)
    reference = copy.deepcopy(model)
    masks.apply_(reference)
    to_torch_prune(model, masks)
    assert hasattr(model.fc1, "weight_orig") and hasattr(model.fc1, "weight_mask")
    assert "fc1.weight_orig" in dict(model.named_parameters())
    x = torch.randn(5, 1, 8, 8)
    torch.testing.assert_close(model(x), reference(x))
    masks.check(model)  # keys stay "<module>.weight" on a torch-pruned model
    assert from_torch_prune(model).equal(masks)
    assert Masks.ones(model).equal(Masks.ones(reference))

    # exporting again replaces the masks instead of combining them
    other = _random_masks(model, 0.7, seed=6)
    to_torch_prune(model, other)
    assert from_torch_prune(model).equal(other)
    torch.testing.assert_close(model.fc1.weight, model.fc1.weight_orig * other["fc1.weight"])

    back = from_torch_prune(model, remove=True)
    assert back.equal(other)
    assert not hasattr(model.fc1, "weight_orig") and isinstance(model.fc1.weight, nn.Parameter)
    assert torch.all(model.fc1.weight[~other["fc1.weight"]] == 0)


def test_from_torch_prune_partial_and_errors():
    model = _model()
    with pytest.raises(MaskError, match="no Conv/Linear weight pruned"):
        from_torch_prune(model)
    prune.l1_unstructured(model.fc1, "weight", amount=0.5)
    m = from_torch_prune(model)
    assert list(m) == ["fc1.weight"] and m.sparsity == pytest.approx(0.5)


def test_keep_count_and_topk_compose_to_sparsity():
    scores = {k: torch.randn(p.shape) for k, p in prunable_parameters(_model()).items()}
    total = sum(s.numel() for s in scores.values())
    m = select_topk(scores, keep_count(total, 0.9))
    assert math.isclose(m.sparsity, 1 - round(0.1 * total) / total)


# ---------------------------------------------------------------- more rules and messages, by hand


class _Blocks(nn.Module):
    """Layers named "fc2" and "blk[1]" (a module name holding glob characters)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc2 = nn.Linear(3, 3)
        self.blocks = nn.ModuleDict({"blk[1]": nn.Linear(3, 3)})
        self.out = nn.Linear(3, 2)


def test_exclude_matches_module_names_params_and_patterns_separately():
    """A pattern matching only the module name ("fc?"), an exact module name with glob characters, and a bare
    string (not split into characters) all exclude their layer."""
    model = _Blocks()
    assert list(prunable_parameters(model, exclude=["fc?"])) == ["blocks.blk[1].weight", "out.weight"]
    assert list(prunable_parameters(model, exclude=["blocks.blk[1]"])) == ["fc2.weight", "out.weight"]
    assert list(prunable_parameters(model, exclude="out")) == ["fc2.weight", "blocks.blk[1].weight"]


def test_a_stray_weight_orig_parameter_is_not_taken_for_torch_pruning():
    """Only weight_orig *with* a weight_mask buffer is torch.nn.utils.prune's layout; a parameter that merely
    has that name is ignored, and the layers after it are still found."""
    model = _Blocks()
    model.fc2.register_parameter("weight_orig", nn.Parameter(torch.zeros(3, 3)))
    found = prunable_parameters(model)
    assert list(found) == ["fc2.weight", "blocks.blk[1].weight", "out.weight"]
    assert found["fc2.weight"] is model.fc2.weight
    prune.identity(model.out, "weight")
    assert list(from_torch_prune(model)) == ["out.weight"]


def test_nothing_prunable_message():
    """The error names the model class, and the exclude list when one is given."""
    with pytest.raises(MaskError, match=r"^Sequential has no prunable parameters \(weights of Conv1d/2d/3d or Linear "
                                        r"modules\)$"):
        prunable_parameters(nn.Sequential(nn.ReLU()))
    with pytest.raises(MaskError, match=r"^Linear has no prunable parameters \(weights of Conv1d/2d/3d or Linear "
                                        r"modules not excluded by \['\*'\]\)$"):
        prunable_parameters(nn.Linear(3, 2), exclude=["*"])
    with pytest.raises(MaskError, match=r"^masks cannot fit this model: Sequential has no prunable parameters"):
        Masks({"w": torch.ones(2)}).check(nn.Sequential(nn.ReLU()))


def test_keep_count_total_rules():
    """total must be a non-negative integer (0 is fine; bools, fractions and negatives are not)."""
    assert keep_count(0, 0.5) == 0
    assert keep_count(1, 0.0) == 1
    for bad in (-1, True, 2.5):
        with pytest.raises(ValueError, match=rf"^total must be a non-negative integer, got {bad!r}$"):
            keep_count(bad, 0.5)


def test_masks_construction_inputs_and_messages():
    """Lists and Masks are accepted (copied); non-tensors, non-mappings, non-str keys, empty mappings and
    non-binary values are refused with messages that show the offending values."""
    assert Masks({"a": [0, 1, 1]})["a"].tolist() == [False, True, True]
    m = Masks({"a": torch.tensor([1, 0, 1])})
    copied = Masks(m)
    assert copied.equal(m) and copied["a"] is not m["a"]
    with pytest.raises(MaskError, match=r"^mask 'a' is not a tensor \(object\)$"):
        Masks({"a": object()})
    with pytest.raises(MaskError, match=r"^Masks needs a mapping name -> tensor, got list$"):
        Masks([torch.ones(2)])  # type: ignore[arg-type]
    with pytest.raises(MaskError, match=r"^mask keys must be parameter names \(str\), got 1$"):
        Masks({1: torch.ones(2)})  # type: ignore[dict-item]
    with pytest.raises(MaskError, match=r"^Masks needs at least one entry$"):
        Masks({})
    with pytest.raises(MaskError, match=r"^mask 'x' is not binary: found values such as \[0.5, 2.0, 3.0\] "
                                        r"\(only 0/1 or bool allowed\)$"):
        Masks({"x": torch.tensor([0.0, 0.5, 1.0, 2.0, 1.0, 3.0, 4.0])})


def test_masks_equality_with_plain_and_invalid_mappings():
    """equal() reads a plain mapping of 0/1 values as masks; == with a mapping that is not valid masks is False."""
    m = Masks({"w": torch.tensor([1, 0, 1])})
    assert m.equal({"w": torch.tensor([1.0, 0.0, 1.0])}) and m.equal({"w": [True, False, True]})
    assert not (m == {"w": torch.tensor([0.5, 0.0, 1.0])})


def test_report_by_hand():
    """The report table, character for character: padded columns, 'scalar' for 0-dim masks, density 1 for an
    empty tensor, the total line with its sparsity."""
    masks = Masks({"conv.weight": torch.tensor([[1, 1, 0], [1, 0, 1]]), "s": torch.tensor(True),
                   "e": torch.zeros(0, dtype=torch.bool)})
    assert masks.layer_density() == {"conv.weight": 4 / 6, "s": 1.0, "e": 1.0}
    assert masks.report() == "\n".join([
        "layer        shape   kept/total  density",
        "conv.weight  2x3            4/6   0.6667",
        "s            scalar         1/1   1.0000",
        "e            0              0/0   1.0000",
        "total                       5/7   0.7143  (sparsity 0.2857)",
    ])


def test_check_lists_both_kinds_of_extra_keys():
    model = _model()
    bad = Masks({**Masks.ones(model), "nope.weight": torch.ones(3), "fc1.bias": torch.ones(16)})
    with pytest.raises(MaskError, match=r"^masks have extra keys not parameters of the model: \['nope.weight'\]; "
                                        r"not prunable \(Conv/Linear weight\) parameters: \['fc1.bias'\]$"):
        bad.check(model)


class _Foreign:
    """A class weights_only loading refuses."""


def test_load_format_checks(tmp_path):
    """The saved payload is tagged with format and version; files without the tag, with another tag, of a newer
    version or holding arbitrary objects are refused; a tagged file without a version loads."""
    masks = Masks({"w": torch.tensor([1, 0, 1])})
    masks.save(tmp_path / "m.pt")
    raw = torch.load(tmp_path / "m.pt", weights_only=True)
    assert raw["version"] == 1 and set(raw) == {"format", "version", "masks"}
    plain = {"w": torch.tensor([True, False, True])}
    torch.save({"format": "panning.masks", "masks": plain}, tmp_path / "old.pt")
    assert Masks.load(tmp_path / "old.pt").equal(masks)
    torch.save({"format": "other", "masks": plain}, tmp_path / "other.pt")
    torch.save(torch.ones(2), tmp_path / "tensor.pt")
    for name in ("other.pt", "tensor.pt"):
        path = tmp_path / name
        with pytest.raises(MaskError, match=rf"^{path} is not a panning masks file \(format tag 'panning.masks' "
                                            r"missing\)$"):
            Masks.load(path)
    torch.save({"format": "panning.masks", "version": 2, "masks": plain}, tmp_path / "new.pt")
    with pytest.raises(MaskError, match=r"was written by a newer panning \(masks format 2\)$"):
        Masks.load(tmp_path / "new.pt")
    torch.save({"format": "panning.masks", "version": 1, "masks": plain, "extra": _Foreign()}, tmp_path / "evil.pt")
    with pytest.raises(MaskError, match=rf"^{tmp_path / 'evil.pt'} is not a panning masks file: "):
        Masks.load(tmp_path / "evil.pt")


def test_apportion_by_hand():
    """Water-filling quotas, worked out from the docstring: clamp(t * w, lower, upper) summing to keep, floors,
    then +1 by largest remainder (earlier layer on ties); exact shares when no bound binds."""
    from panning.masks import _apportion

    # no bound binds: 7 over weights (6, 4) -> 4.2, 2.8: the larger remainder is the later layer's
    assert _apportion(7, [6, 4], [0, 0], [6, 4]) == [4, 3]
    # exact shares 0.5 and 1.5: a remainder tie, the earlier layer wins
    assert _apportion(2, [1, 3], [0, 0], [1, 3]) == [1, 1]
    # a share exactly at its upper (first layer: 3 * 2/6 = 1 = upper) or lower bound still counts as unbound
    assert _apportion(3, [2, 1, 3], [0, 0, 0], [1, 1, 3]) == [1, 1, 1]
    assert _apportion(3, [2, 1, 3], [1, 0, 0], [2, 1, 3]) == [1, 1, 1]
    # an upper bound binds: a = 1, then 2t + 4t = 8 -> 2.67, 5.33 -> floors 2, 5 and the remainder to b
    assert _apportion(9, [1, 2, 4], [0, 0, 0], [1, 10, 10]) == [1, 3, 5]
    # binding with t < 1 (a = 1, b = 10 t = 4) and with t > 2 (a = 1, b = 49)
    assert _apportion(5, [10, 10], [0, 0], [1, 10]) == [1, 4]
    assert _apportion(50, [1, 1], [0, 0], [1, 100]) == [1, 49]
    # the lower bound binds: b = 3 > 2 t
    assert _apportion(6, [4, 2], [0, 3], [4, 2 + 2]) == [3, 3]
    # c has no room (upper 0), b caps at 4: 3t + 7t = 5 -> t = 1/2, shares 1.5 and 3.5: the tie goes to a
    assert _apportion(9, [3, 12, 8, 7], [0, 0, 0, 0], [3, 4, 0, 4]) == [2, 4, 0, 3]
    # a is fixed at 1 (lower = upper); b = clamp(3t, 1, 2) and c = clamp(9t, 1, 3) sum to 4 only at t = 1/3
    assert _apportion(5, [5, 3, 9], [1, 1, 1], [1, 2, 3]) == [1, 1, 3]
    # unbound, b's share 6 * 2/12 = 1 sits exactly on its bounds: exact shares 3.5, 1, 1.5, tie to a
    assert _apportion(6, [7, 2, 3], [1, 1, 1], [4, 1, 3]) == [4, 1, 1]
    # unbound at t = 8/20, a's share 2 sits exactly on its cap: 2, 4.4, 0.4, 1.2 -> floors 2, 4, 0, 1, and the
    # remainder tie between b and c goes to b
    assert _apportion(8, [5, 11, 1, 3], [0, 0, 0, 0], [2, 10, 1, 2]) == [2, 5, 0, 1]
    # b caps at 1: 12 t + 5 t = 11 -> t = 11/17: a = 7.76, c = 3.24 -> 7 + 1 + 3, the remainder to a
    assert _apportion(12, [12, 4, 5], [0, 0, 0], [9, 1, 5]) == [8, 1, 3]


def test_select_topk_argument_messages():
    scores = {"a": torch.ones(3), "b": torch.ones(2)}
    for bad in (-1, True, 1.5):
        with pytest.raises(ValueError, match=rf"^min_per_layer must be a non-negative integer, got {bad!r}$"):
            select_topk(scores, 2, min_per_layer=bad)
    with pytest.raises(ValueError, match=r"^scores must be a non-empty mapping name -> tensor$"):
        select_topk({}, 0)
    with pytest.raises(ValueError, match=r"^score 'a' is not a tensor \(list\)$"):
        select_topk({"a": [1.0, 2.0]}, 1)  # type: ignore[dict-item]
    with pytest.raises(ValueError, match=r"^score 'a' is complex$"):
        select_topk({"a": torch.ones(2, dtype=torch.complex64)}, 1)
    cur = Masks({"a": torch.ones(3), "b": torch.ones(2)})
    with pytest.raises(MaskError, match=r"^scores and current masks disagree on keys: missing scores \['b'\], "
                                        r"extra scores \['c'\]$"):
        select_topk({"a": torch.ones(3), "c": torch.ones(2)}, 1, current=cur)


def test_select_topk_current_as_a_plain_mapping_and_mixed_dtypes():
    """current may be a plain 0/1 mapping (pruned weights stay out); scores of mixed dtypes are compared in the
    widest one (a float64 difference below float32 resolution still counts); integer scores work with minimums."""
    scores = {"a": torch.tensor([5.0, 1.0, 2.0]), "b": torch.tensor([4.0, 3.0])}
    m = select_topk(scores, 2, current={"a": torch.tensor([0, 1, 1]), "b": torch.tensor([1, 0])})
    assert m["a"].tolist() == [False, False, True] and m["b"].tolist() == [True, False]
    mixed = {"a": torch.tensor([1.0]), "b": torch.tensor([1.0 + 1e-12], dtype=torch.float64), "c": torch.tensor([1.0])}
    assert [bool(v) for v in select_topk(mixed, 1).values()] == [False, True, False]
    ints = select_topk({"a": torch.tensor([3, 1, 2]), "b": torch.tensor([0, 1])}, 3, min_per_layer=1)
    assert ints["a"].tolist() == [True, False, True] and ints["b"].tolist() == [False, True]


def test_device_mask_converts_once_per_device():
    """A mask is moved to a new device once and reused; zeroing works there too (the meta device stands in for
    an accelerator)."""
    from panning.masks import _DeviceMask

    mask = torch.tensor([True, False, True])
    dm = _DeviceMask(mask)
    assert dm.on(torch.device("cpu")) is mask
    meta = dm.on(torch.device("meta"))
    assert meta.device.type == "meta" and meta.dtype == torch.bool and meta.shape == (3,)
    assert dm.on(torch.device("meta")) is meta
    out = dm.zero(torch.ones(3, device="meta"))
    assert out.device.type == "meta" and out.shape == (3,)
    assert dm.zero(torch.ones(3)).tolist() == [1.0, 0.0, 1.0]


def test_enforce_channels_last_double_backward_and_other_hooks():
    """enforce zeros channels_last conv weights, gradients that carry a graph (create_graph=True), and leaves the
    gradient tensor other hooks saw untouched; it accepts a plain mapping and keeps it on the handle."""
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 4, 3).to(memory_format=torch.channels_last)
    mask = torch.rand(4, 2, 3, 3) < 0.5
    handle = enforce(conv, {"weight": mask})
    assert torch.all(conv.weight[~mask] == 0) and conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert isinstance(handle.masks, Masks) and handle.masks.equal({"weight": mask})
    seen = []
    lin = nn.Linear(3, 2)
    lm = torch.tensor([[True, False, True], [False, True, True]])
    lin.weight.register_hook(lambda g: seen.append(g))
    enforce(lin, Masks({"weight": lm}))
    x = torch.randn(4, 3)
    (g,) = torch.autograd.grad((lin(x) ** 2).sum(), [lin.weight], create_graph=True)
    assert torch.all(g[~lm] == 0) and g.requires_grad
    assert (seen[0][~lm] != 0).all()
    handle.remove()
    handle.remove()
    assert not handle.active


def test_torch_prune_export_of_plain_mappings_and_a_bare_module():
    """to_torch_prune takes a plain mapping and writes masks in the weight's dtype (as torch's own pruning does);
    a bare pruned Linear reads back under the key "weight"; a non-binary weight_mask is named in the error."""
    lin = nn.Linear(3, 2).double()
    m = {"weight": torch.tensor([[1, 0, 1], [0, 1, 1]])}
    to_torch_prune(lin, m)
    assert lin.weight_mask.dtype == torch.float64
    assert list(from_torch_prune(lin)) == ["weight"] and from_torch_prune(lin).equal(m)
    with torch.no_grad():
        lin.weight_mask[0, 0] = 0.5
    with pytest.raises(MaskError, match=r"^mask 'weight' is not binary"):
        from_torch_prune(lin)
    with pytest.raises(MaskError, match=r"^no Conv/Linear weight pruned with torch.nn.utils.prune found in the model$"):
        from_torch_prune(nn.Linear(2, 2))


@pytest.mark.skipif("MUTANT_UNDER_TEST" in __import__("os").environ,
                    reason="mutmut's trampolines add stack frames, which shifts the warning's location")
def test_unmatched_exclude_warning_points_at_the_caller():
    with pytest.warns(UserWarning, match=r"^exclude entries matched no prunable layer: \['fc9'\]$") as rec:
        prunable_parameters(_model(), exclude=["fc9"])
    assert rec[0].filename == __file__


def test_enforce_tensors_on_bare_tensors_records_its_masks():
    """enforce_tensors zeroes the pruned entries of bare tensors now and their gradients from then on; its
    handle holds the masks it enforces."""
    from panning.masks import enforce_tensors

    w = torch.nn.Parameter(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    m = torch.tensor([[True, False], [False, True]])
    handle = enforce_tensors({"w": w}, {"w": m})
    assert w.detach().tolist() == [[1.0, 0.0], [0.0, 4.0]]
    (w * torch.tensor([[5.0, 6.0], [7.0, 8.0]])).sum().backward()
    assert w.grad.tolist() == [[5.0, 0.0], [0.0, 8.0]]
    assert isinstance(handle.masks, Masks) and handle.masks.equal({"w": m}) and handle.active
    handle.remove()


def test_enforce_tensors_zeroes_tensors_without_a_bit_form():
    """Complex (and integer) tensors have no bit form (keep_bits gives None): their pruned entries are zeroed
    all the same."""
    from panning.masks import enforce_tensors

    m = torch.tensor([True, False, True])
    z = torch.tensor([1 + 1j, 2 + 2j, 3 + 3j])
    i = torch.tensor([1, 2, 3])
    enforce_tensors({"z": z, "i": i}, {"z": m, "i": m})
    assert z.tolist() == [1 + 1j, 0j, 3 + 3j] and i.tolist() == [1, 0, 3]


def test_topk_mask_of_nothing_or_everything_is_boolean():
    """_topk_mask returns a boolean mask also when k <= 0 (nothing kept) or k >= n (everything kept)."""
    from panning.masks import _topk_mask

    flat = torch.tensor([3.0, 1.0, 2.0])
    for k, expected in ((0, [False] * 3), (-1, [False] * 3), (3, [True] * 3), (4, [True] * 3)):
        got = _topk_mask(flat, k)
        assert got.dtype == torch.bool and got.tolist() == expected, k


def test_select_topk_validates_plain_current_masks():
    """A plain mapping given as current is validated like Masks: a non-binary entry is refused."""
    with pytest.raises(MaskError, match=r"^mask 'a' is not binary"):
        select_topk({"a": torch.tensor([1.0, 2.0, 3.0])}, 1, current={"a": torch.tensor([2, 0, 1])})


@FEW
@given(values=st.lists(st.integers(-3, 3), min_size=2, max_size=60), frac=st.floats(0, 1))
def test_the_device_topk_route_chooses_as_the_cpu_route(values, frac):
    """_topk_mask's route without host reads (taken on a GPU) keeps exactly what its CPU route keeps,
    ties to the lowest position included (few distinct values: many ties)."""
    flat = torch.tensor(values, dtype=torch.float32)
    k = min(max(1, round(frac * flat.numel())), flat.numel() - 1)
    assert torch.equal(_topk_mask_on_device(flat, k), _topk_mask(flat, k))


def test_layer_counts_are_counted_again_after_an_in_place_change():
    m = Masks({"a": torch.tensor([True, True, False]), "b": torch.ones(4, dtype=torch.bool)})
    assert m.layer_counts() == [2, 4] and m.num_kept == 6
    m["b"][0] = False  # in place: the tensor's version counter moves, so the cached counts are not reused
    assert m.layer_counts() == [2, 3] and m.num_kept == 5
    m["a"].logical_and_(torch.tensor([True, False, False]))
    assert m.layer_counts() == [1, 3]
    c = copy.deepcopy(m)
    assert c.layer_counts() == [1, 3] and c.num_kept == 4
    m["a"].zero_()  # edited after its last count, then copied: the copy's fresh tensors are counted afresh
    c = copy.deepcopy(m)
    assert c.layer_counts() == [0, 3] and m.layer_counts() == [0, 3]
    with torch.inference_mode():
        i = Masks({"a": torch.tensor([True, False])})
        assert i.layer_counts() == [1] and i.num_kept == 1


@FEW
@given(values=st.lists(st.integers(-3, 3), min_size=2, max_size=80), frac=st.floats(0, 1),
       dtype=st.sampled_from([torch.float32, torch.float64, torch.int64]), stride=st.booleans())
def test_topk_mask_is_the_stable_descending_sort_for_every_dtype_and_layout(values, frac, dtype, stride):
    """_topk_mask keeps what the first k of a stable descending sort keep (ties to the lowest position), whether its
    threshold comes from numpy's selection (float32/64, also on a strided view) or torch.topk (other dtypes)."""
    flat = torch.tensor(values, dtype=dtype)
    if stride:
        flat = torch.stack([flat, -flat], 1)[:, 0]  # a non-contiguous view: numpy must read it through its strides
    k = min(max(1, round(frac * flat.numel())), flat.numel() - 1)
    expected = torch.zeros(flat.numel(), dtype=torch.bool)
    expected[torch.sort(flat, descending=True, stable=True).indices[:k]] = True
    assert torch.equal(_topk_mask(flat, k), expected)


def test_numpy_helpers_equal_their_torch_forms():
    """flat_nonzero, all_finite and rows_finite (numpy on the CPU) give what torch's nonzero, isfinite().all() and
    isfinite().flatten(1).all(1) give: empty, multi-dimensional and strided inputs, NaN and infinities."""
    from panning._functional import all_finite, device_routes, flat_nonzero, rows_finite

    g = torch.Generator().manual_seed(0)
    cases = [torch.zeros(0, dtype=torch.bool), torch.rand(7, 5, generator=g) < 0.3, torch.ones(4, dtype=torch.bool),
             (torch.rand(6, 8, generator=g) < 0.5).t()]
    for m in cases:
        assert torch.equal(flat_nonzero(m), m.reshape(-1).nonzero().squeeze(1))
        assert flat_nonzero(m).dtype == torch.int64
    for dtype in (torch.float32, torch.float64, torch.float16):
        x = torch.randn(9, 4, generator=g).to(dtype)
        assert bool(all_finite(x)) and bool(all_finite(x.t()))
        for bad in (float("nan"), float("inf"), -float("inf")):
            y = x.clone()
            y[3, 2] = bad
            assert not bool(all_finite(y)) and not bool(all_finite(y.t()))
    assert bool(all_finite(torch.zeros(0)))
    for dtype in (torch.float32, torch.float64, torch.float16):
        x = torch.randn(5, 3, 4, generator=g).to(dtype)
        x[1, 2, 0], x[3, 0, 3], x[4, 1, 1] = float("nan"), float("inf"), -float("inf")
        for t in (x, x.transpose(1, 2), torch.zeros(3, 0, dtype=dtype), torch.zeros(0, 3, dtype=dtype)):
            want = torch.isfinite(t).flatten(1).all(1)
            assert torch.equal(rows_finite(t), want)
            with device_routes():  # the device's route, on the CPU
                assert torch.equal(rows_finite(t), want)
        assert rows_finite(x).tolist() == [True, False, True, False, False]
