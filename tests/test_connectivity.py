"""Effective connectivity: kept weights on no input-output path, layer collapse, model untouched."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import prune

from panning.connectivity import PathCounter, collapsed_layers, effective_masks, effective_sparsity
from panning.masks import MaskError, Masks, prunable_parameters


def _mlp(act: type[nn.Module] = nn.ReLU) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), act(), nn.Linear(4, 2))


def _ones(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: torch.ones(p.shape, dtype=torch.bool) for k, p in prunable_parameters(model).items()}


def test_dense_network_is_fully_effective():
    model = _mlp()
    masks = Masks(_ones(model))
    assert effective_masks(model, masks, (3,)).equal(masks)
    assert effective_sparsity(model, masks, (3,)) == 0.0
    assert collapsed_layers(model, masks, (3,)) == []


def test_hidden_unit_without_outputs_makes_its_inputs_ineffective():
    model = _mlp()
    m = _ones(model)
    m["2.weight"][:, 1] = False  # hidden unit 1 keeps its inputs but feeds nothing
    m["0.weight"][3, :] = False  # hidden unit 3 has no inputs ...
    m["0.weight"][0, 2] = False  # (an ordinary pruned weight)
    masks = Masks(m)
    eff = effective_masks(model, masks, (3,))
    expected0 = m["0.weight"].clone()
    expected0[1, :] = False
    expected2 = m["2.weight"].clone()
    expected2[:, 3] = False  # ... so its outgoing weights carry no input path
    assert eff["0.weight"].equal(expected0)
    assert eff["2.weight"].equal(expected2)
    kept = masks.num_kept
    assert effective_sparsity(model, masks, (3,)) == pytest.approx(1 - (kept - 3 - 2) / masks.num_total)
    assert collapsed_layers(model, masks, (3,)) == []


def test_fully_pruned_layer_collapses_everything():
    model = _mlp()
    m = _ones(model)
    m["2.weight"][:] = False
    masks = Masks(m)
    assert effective_sparsity(model, masks, (3,)) == 1.0
    assert collapsed_layers(model, masks, (3,)) == ["0.weight", "2.weight"]


class TinyResNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(4)
        self.conv1 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn0(self.stem(x)))
        branch = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        x = F.relu(x + branch)
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def test_residual_shortcut_keeps_network_connected_when_branch_dies():
    torch.manual_seed(0)
    model = TinyResNet()
    model.train()
    state = copy.deepcopy(model.state_dict())
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    m = _ones(model)
    m["conv2.weight"][:] = False
    masks = Masks(m)
    eff = effective_masks(model, masks, (1, 6, 6))
    assert collapsed_layers(model, masks, (1, 6, 6)) == ["conv1.weight", "conv2.weight"]
    assert eff["stem.weight"].all() and eff["fc.weight"].all()
    n_dead = m["conv1.weight"].numel() + m["conv2.weight"].numel()
    assert effective_sparsity(model, masks, (1, 6, 6)) == pytest.approx(n_dead / masks.num_total)
    # the user's model is untouched: values, BN statistics, mode, requires_grad, no hooks left
    after = model.state_dict()
    assert state.keys() == after.keys() and all(torch.equal(state[k], after[k]) for k in state)
    assert model.training and all(mod.training for mod in model.modules())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert not any(mod._forward_hooks or mod._forward_pre_hooks for mod in model.modules())


def test_dead_shortcut_free_chain_without_residual_collapses():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Conv2d(2, 2, 3), nn.ReLU(), nn.Flatten(),
                          nn.Linear(2 * 2 * 2, 2))
    m = _ones(model)
    m["2.weight"][:, 0] = False  # input channel 0 of conv 2 unused -> conv 0's filter 0 is dead
    eff = effective_masks(model, Masks(m), (1, 6, 6))
    assert not eff["0.weight"][0].any() and eff["0.weight"][1].all()


@pytest.mark.parametrize("act", [nn.Tanh, nn.ReLU6, nn.Sigmoid, nn.GELU, nn.Hardtanh])
def test_saturating_activations_do_not_hide_paths(act):
    # path counts are large; tanh/ReLU6 would saturate and zero the gradient without linearisation
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), act(), nn.Linear(64, 64), act(), nn.Linear(64, 2))
    masks = Masks(_ones(model))
    assert effective_sparsity(model, masks, (64,)) == 0.0


def test_max_pool_credits_every_element_of_a_window():
    class PoolNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1 = nn.Linear(4, 8)
            self.fc2 = nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = F.max_pool1d(self.fc1(x).unsqueeze(1), 2).squeeze(1)  # functional call, 8 -> 4
            return self.fc2(h)

    model = PoolNet()
    masks = Masks(_ones(model))
    assert effective_sparsity(model, masks, (4,)) == 0.0
    m = _ones(model)
    m["fc2.weight"][:, 0] = False  # pooled unit 0 (fc1 rows 0 and 1) feeds nothing
    eff = effective_masks(model, Masks(m), (4,))
    assert not eff["fc1.weight"][:2].any() and eff["fc1.weight"][2:].all()

    seq = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                        nn.Linear(2 * 3 * 3, 2))
    assert effective_sparsity(seq, Masks(_ones(seq)), (1, 6, 6)) == 0.0


def test_overflowing_path_counts_fall_back_to_scaling():
    torch.manual_seed(0)
    # 64^200 paths overflow float64 (max ~2^1024); scaled counts stay finite
    model = nn.Sequential(*[nn.Linear(64, 64) for _ in range(200)])
    m = _ones(model)
    m["100.weight"][:, 5] = False  # unit 5 after layer 99 feeds nothing -> row 5 of layer 99 dead
    eff = effective_masks(model, Masks(m), (64,))
    assert not eff["99.weight"][5].any()
    assert eff["99.weight"][:5].all() and eff["0.weight"].all()


def test_torch_pruned_model_and_bad_masks():
    model = _mlp()
    m = _ones(model)
    m["2.weight"][:, 0] = False
    prune.custom_from_mask(model[2], "weight", m["2.weight"].float())
    eff = effective_masks(model, Masks(m), (3,))
    assert not eff["0.weight"][0].any() and eff["0.weight"][1:].all()
    with pytest.raises(MaskError, match="shape"):
        effective_masks(model, Masks({"0.weight": torch.ones(4, 4)}), (3,))
    with pytest.raises(MaskError, match="nope"):
        effective_sparsity(model, Masks({"nope.weight": torch.ones(2)}), (3,))
    with pytest.raises(ValueError, match="input_shape"):
        effective_masks(model, Masks(m), (0,))


class _PoolNet(nn.Module):
    """fc1 (4 -> length) -> pool (a call given as a function of the (1, 1, length) activations) -> fc2."""

    def __init__(self, length: int, pool, pooled: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, length)
        self.fc2 = nn.Linear(pooled, 2)
        self.pool = pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.pool(self.fc1(x).unsqueeze(1)).flatten(1))


# (call, length, pooled length, fc1 rows that lie in some pooling window); max pooling is modelled as
# average pooling over the same windows, so every row inside a window is effective
_POOL_CALLS = {
    "stride": (lambda h: F.max_pool1d(h, 2, stride=1), 8, 7, range(8)),
    "tuple_stride": (lambda h: F.max_pool1d(h, 2, stride=(1,)), 8, 7, range(8)),
    "padding": (lambda h: F.max_pool1d(h, 3, stride=2, padding=1), 8, 4, range(8)),
    "ceil_mode": (lambda h: F.max_pool1d(h, 3, stride=2, ceil_mode=True), 8, 4, range(8)),
    "floor_mode": (lambda h: F.max_pool1d(h, 3, stride=2), 8, 3, range(7)),
    "tuple_dilation_1": (lambda h: F.max_pool1d(h, 2, dilation=(1,)), 8, 4, range(8)),
    "torch_positional_short": (lambda h: torch.max_pool1d(h, 2), 9, 4, range(8)),
    "torch_positional_ceil": (lambda h: torch.max_pool1d(h, 3, 2, 0, 1, True), 8, 4, range(8)),
    "torch_positional_floor": (lambda h: torch.max_pool1d(h, 3, 2, 0, 1, False), 8, 3, range(7)),
    "torch_keywords": (lambda h: torch.max_pool1d(input=h, kernel_size=2, stride=1), 8, 7, range(8)),
    "adaptive": (lambda h: F.adaptive_max_pool1d(h, 3), 8, 3, range(8)),
    "adaptive_2d": (lambda h: F.adaptive_max_pool2d(h.unsqueeze(1), (1, 2)), 8, 2, range(8)),
}


@pytest.mark.parametrize("call", sorted(_POOL_CALLS))
def test_max_pool_is_modelled_as_average_pool_over_the_same_windows(call):
    """Every way of calling max pooling (keywords, positions, defaults, tuples, adaptive) keeps the
    window geometry (output size) and credits every element of a window, none outside."""
    pool, length, pooled, rows = _POOL_CALLS[call]
    torch.manual_seed(0)
    model = _PoolNet(length, pool, pooled)
    eff = effective_masks(model, Masks(_ones(model)), (4,))
    expected = torch.zeros(length, 4, dtype=torch.bool)
    expected[list(rows)] = True
    assert eff["fc1.weight"].equal(expected)
    assert eff["fc2.weight"].all()


def test_dilated_max_pool_is_left_as_it_is():
    """A dilated window is not an average-pool window: the real max pool runs (output size kept) and rows
    that fall between the dilated taps lie on no path."""
    torch.manual_seed(0)
    model = _PoolNet(8, lambda h: F.max_pool1d(h, 2, dilation=2), 3)  # windows {0,2}, {2,4}, {4,6}
    eff = effective_masks(model, Masks(_ones(model)), (4,))
    assert not eff["fc1.weight"][[1, 3, 5, 7]].any()
    assert eff["fc2.weight"].all()


class _CallNet(nn.Module):
    """Linear(3, 4) -> ``act`` -> Linear(4, 2)."""

    def __init__(self, act) -> None:
        super().__init__()
        self.fc1 = nn.Linear(3, 4)
        self.a = nn.Parameter(torch.full((1,), 0.25))
        self.fc2 = nn.Linear(4, 2)
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self, self.fc1(x)))


@pytest.mark.parametrize("act", [
    lambda self, h: torch.relu(input=h),
    lambda self, h: torch.sigmoid(input=h),
    lambda self, h: F.prelu(h, self.a),
    lambda self, h: torch.prelu(input=h, weight=self.a),
], ids=["relu_keyword", "sigmoid_keyword", "prelu_positional", "prelu_keywords"])
def test_activations_called_with_keywords_or_prelu_are_linearised(act):
    """Activations given their input by keyword, and PReLU (positional or keywords), become the identity:
    pruning hidden unit 1's output leaves exactly its inputs ineffective."""
    torch.manual_seed(0)
    model = _CallNet(act)
    m = _ones(model)
    m["fc2.weight"][:, 1] = False
    eff = effective_masks(model, Masks(m), (3,))
    expected = torch.ones(4, 3, dtype=torch.bool)
    expected[1] = False
    assert eff["fc1.weight"].equal(expected)
    assert eff["fc2.weight"].equal(m["fc2.weight"])


@pytest.mark.parametrize("wrap", [lambda y: {"logits": y}, lambda y: (y, [y])], ids=["dict", "tuple"])
def test_outputs_in_dicts_and_tuples_are_counted(wrap):
    """A forward returning a dict or tuple of tensors is handled: paths to any of its tensors count."""

    class Wrapped(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = _mlp()

        def forward(self, x: torch.Tensor):
            return wrap(self.net(x))

    model = Wrapped()
    m = _ones(model)
    m["net.2.weight"][:, 1] = False
    eff = effective_masks(model, Masks(m), (3,))
    assert not eff["net.0.weight"][1].any() and eff["net.0.weight"][[0, 2, 3]].all()


def test_model_returning_no_float_tensor_is_refused_by_name():
    """The error names the model class and says why paths cannot be counted."""

    class ArgMax(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x).argmax(1)

    with pytest.raises(ValueError, match=r"^ArgMax returned no floating-point tensor; cannot count paths$"):
        effective_masks(ArgMax(), Masks.ones(ArgMax()), (3,))


def test_output_independent_of_masked_weights_makes_them_all_ineffective():
    """A masked layer the forward never uses lies on no path; with no path at all, R is a constant."""

    class Unused(nn.Module):
        def __init__(self, use: bool) -> None:
            super().__init__()
            self.fc = nn.Linear(3, 3)
            self.unused = nn.Linear(3, 2)
            self.use = use

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x) if self.use else 2 * x

    used = Unused(True)
    eff = effective_masks(used, Masks.ones(used), (3,))
    assert eff["fc.weight"].all() and not eff["unused.weight"].any()
    assert eff["unused.weight"].dtype == torch.bool
    unused = Unused(False)
    assert collapsed_layers(unused, Masks.ones(unused), (3,)) == ["fc.weight", "unused.weight"]
    assert effective_sparsity(unused, Masks.ones(unused), (3,)) == 1.0


def test_plain_dict_of_masks_is_accepted():
    """effective_masks validates a plain {name: tensor} mapping like a Masks."""
    model = _mlp()
    m = _ones(model)
    m["2.weight"][:, 0] = False
    eff = effective_masks(model, m, (3,))
    assert isinstance(eff, Masks)
    assert eff["0.weight"].equal(torch.tensor([[False] * 3] + [[True] * 3] * 3))


def test_input_shape_error_message():
    """The input_shape error states the rule and echoes the shape."""
    model = _mlp()
    with pytest.raises(ValueError, match=r"^input_shape must hold positive sizes \(without the batch dimension\), "
                                         r"got \(3, 0\)$"):
        effective_masks(model, Masks.ones(model), (3, 0))


def test_torch_pruned_model_is_judged_by_the_given_masks_not_its_weight_mask():
    """The mask that counts is the one passed in: a torch.nn.utils.prune weight_mask is overridden."""
    model = _mlp()
    pruned = torch.ones(2, 4)
    pruned[:, 0] = 0  # torch's mask cuts hidden unit 0 off ...
    prune.custom_from_mask(model[2], "weight", pruned)
    eff = effective_masks(model, Masks(_ones(model)), (3,))  # ... the given masks keep everything
    assert eff["0.weight"].all() and eff["2.weight"].all()


def test_biases_count_no_paths_even_as_top_level_parameters():
    """Biases are zeroed wherever they sit (here a top-level ``bias`` parameter): a hidden unit whose
    inputs are all pruned carries no path even though a bias would feed it."""

    class TopBias(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3, 4, bias=False)
            self.bias = nn.Parameter(torch.ones(4))
            self.out = nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.out(self.fc(x) + self.bias)

    model = TopBias()
    m = _ones(model)
    m["fc.weight"][0] = False
    eff = effective_masks(model, Masks(m), (3,))
    assert not eff["out.weight"][:, 0].any() and eff["out.weight"][:, 1:].all()


def test_integer_parameters_are_skipped_not_a_stop():
    """A non-float parameter before the layers is left alone and the layers after it are still replaced
    (kept weights set to one): with negative initial weights every kept weight still counts."""

    class WithIndex(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.index = nn.Parameter(torch.arange(3), requires_grad=False)
            self.net = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
            with torch.no_grad():
                for p in self.net.parameters():
                    p.fill_(-1.0)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x[:, self.index])

    model = WithIndex()
    assert effective_sparsity(model, Masks.ones(model), (3,)) == 0.0


def test_deep_sparse_chain_is_counted_unscaled_first():
    """200 layers keeping only their diagonal: 64 paths, no overflow, so the unscaled count is used (the
    1/fan_in fallback would underflow to zero here: 64**-200) and every kept weight is effective."""
    model = nn.Sequential(*[nn.Linear(64, 64, bias=False) for _ in range(200)])
    diag = torch.eye(64, dtype=torch.bool)
    masks = Masks({k: diag for k in prunable_parameters(model)})
    assert effective_masks(model, masks, (64,)).equal(masks)


def test_overflow_with_a_pruned_weight_after_the_overflow_falls_back():
    """Path counts that overflow to inf and then meet a pruned (zero) weight turn into NaN; that also
    triggers the scaled recount, which gives the exact answer."""
    model = nn.Sequential(*[nn.Linear(64, 64) for _ in range(200)], nn.Linear(64, 1))
    m = _ones(model)
    m["199.weight"][:, 3] = False  # unit 3 after layer 198 feeds only this pruned column
    m["200.weight"][0, 7] = False  # unit 7 after layer 199 feeds nothing (the last layer has one output)
    eff = effective_masks(model, Masks(m), (64,))
    assert not eff["198.weight"][3].any() and eff["198.weight"][[0, 1, 2, 4]].all()
    assert not eff["199.weight"][7].any() and eff["199.weight"][0].equal(m["199.weight"][0])
    assert eff["0.weight"].all() and eff["200.weight"].equal(m["200.weight"])


def test_scalar_and_empty_parameters_survive_the_scaled_recount():
    """A 0-dim parameter (a learned output scale), a one-output last layer and (unused) zero-size layers do
    not break the fallback."""

    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(*[nn.Linear(64, 64) for _ in range(200)], nn.Linear(64, 1))
            self.scale = nn.Parameter(torch.tensor(2.0))
            with pytest.warns(UserWarning):
                self.no_rows = nn.Linear(64, 0, bias=False)
            with pytest.warns(UserWarning):
                self.no_cols = nn.Linear(0, 3, bias=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.body(x) * self.scale

    model = Scaled()
    m = {k: v for k, v in _ones(model).items() if k.startswith("body.")}
    m["body.100.weight"][:, 5] = False
    eff = effective_masks(model, Masks(m), (64,))
    assert not eff["body.99.weight"][5].any() and eff["body.99.weight"][:5].all()
    assert eff["body.200.weight"].all()


def test_counts_that_overflow_even_scaled_raise():
    """exp(1000 * paths) overflows whatever the scaling: a RuntimeError that says so."""

    class Exploding(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.exp(1000 * self.fc(x))

    model = Exploding()
    with pytest.raises(RuntimeError, match=r"^path counts overflow float64 even with 1/fan_in scaling; "
                                           r"cannot compute effective masks$"):
        effective_masks(model, Masks.ones(model), (3,))


def test_effective_sparsity_of_zero_size_masks_is_zero():
    """Masks over no weight at all (a layer with zero outputs): nothing is pruned, sparsity 0."""
    with pytest.warns(UserWarning):
        model = nn.Sequential(nn.Linear(3, 0))
    assert effective_sparsity(model, Masks.ones(model), (3,)) == 0.0


def test_a_path_count_that_overflows_even_scaled_raises_although_the_gradients_are_finite():
    """R itself must be finite: an output term that is infinite whatever the scaling (exp(1000) of an
    unmasked scalar set to one) raises, even though dR/dw of the masked layer is finite (all ones)."""

    class InfiniteTerm(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3, 2)
            self.t = nn.Parameter(torch.ones(()))

        def forward(self, x: torch.Tensor):
            return self.fc(x), torch.exp(1000 * self.t)

    model = InfiniteTerm()
    with pytest.raises(RuntimeError, match=r"^path counts overflow float64"):
        effective_masks(model, Masks.ones(model), (3,))


@pytest.mark.parametrize("torch_pruned", [False, True], ids=["plain", "torch_pruned"])
def test_a_chain_deeper_than_float64_range_keeps_its_unit_counts(torch_pruned):
    """Kept weights count as one, not more: 1100 layers keeping only their diagonal carry exactly 2 paths
    (R = 2, every kept weight effective), also when the layers were pruned with torch.nn.utils.prune. Were a
    kept weight worth 2, R = 2 * 2**1100 would overflow, and the 1/fan_in recount (2 * 2**-1100) would
    underflow to zero, making every weight look dead."""
    model = nn.Sequential(*[nn.Linear(2, 2, bias=False) for _ in range(1100)])
    diag = torch.eye(2, dtype=torch.bool)
    if torch_pruned:
        for layer in model:
            prune.custom_from_mask(layer, "weight", diag.float())
    masks = Masks({k: diag for k in prunable_parameters(model)})
    assert effective_masks(model, masks, (2,)).equal(masks)


def test_a_dense_chain_deeper_than_float64_range_is_recounted_at_one_path_per_unit():
    """1100 dense 2-wide layers: 2**1101 paths overflow; the recount with weights 1/fan_in = 1/2 keeps every
    unit's count at one and finds every weight effective (weights 2/fan_in would overflow again)."""
    model = nn.Sequential(*[nn.Linear(2, 2, bias=False) for _ in range(1100)])
    masks = Masks.ones(model)
    assert effective_masks(model, masks, (2,)).equal(masks)


def test_torch_level_adaptive_max_pool_still_returns_values_and_indices():
    """``torch.adaptive_max_pool1d`` returns (values, indices) even when it is modelled as average pooling."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv1d(1, 2, 3, padding=1)
            self.fc = nn.Linear(2 * 3, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            values, _ = torch.adaptive_max_pool1d(self.conv(x), 3)
            return self.fc(values.flatten(1))

    torch.manual_seed(0)
    model = Net()
    eff = effective_masks(model, Masks(_ones(model)), (1, 9))
    assert all(m.all() for m in eff.values())


def test_a_reused_path_counter_equals_a_fresh_copy_for_every_mask():
    """PathCounter keeps one path-counting copy; reused across random masks (including an overflow that needs the
    scaled pass, then a plain one again) it gives effective_masks' answer each time and leaves the model alone."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                          nn.Linear(3 * 3 * 3, 5), nn.ReLU(), nn.Linear(5, 2))
    before = copy.deepcopy(model.state_dict())
    counter = PathCounter(model)
    gen = torch.Generator().manual_seed(1)
    seen_dead = False
    for density in (0.9, 0.5, 0.2, 0.1, 0.6):
        m = Masks({k: torch.rand(p.shape, generator=gen) < density for k, p in prunable_parameters(model).items()})
        got = counter.effective(m, (1, 6, 6))
        assert got.equal(effective_masks(model, m, (1, 6, 6)))
        seen_dead |= got.num_kept < m.num_kept
    assert seen_dead  # some masks leave kept weights off every path: the test compares non-trivial answers
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    deep = nn.Sequential(*[nn.Linear(64, 64) for _ in range(200)])
    counter = PathCounter(deep)
    m = _ones(deep)
    m["100.weight"][:, 5] = False
    assert counter.effective(Masks(m), (64,)).equal(effective_masks(deep, Masks(m), (64,)))
    small = {k: torch.ones(p.shape, dtype=torch.bool) if i < 2 else torch.zeros(p.shape, dtype=torch.bool)
             for i, (k, p) in enumerate(prunable_parameters(deep).items())}
    assert counter.effective(Masks(small), (64,)).num_kept == 0  # the first layers feed a pruned layer


def _random_masks(model: nn.Module, densities, seed: int = 1) -> list[Masks]:
    gen = torch.Generator().manual_seed(seed)
    return [Masks({k: torch.rand(p.shape, generator=gen) < d for k, p in prunable_parameters(model).items()})
            for d in densities]


class _Tied(nn.Module):
    """One weight used by two layers (tied): both uses must see each network's own mask."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4, bias=False)
        self.b = nn.Linear(4, 4, bias=False)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


@pytest.mark.parametrize("name", ["plain", "conv", "shortcut", "tied"])
def test_effective_many_equals_one_mask_at_a_time(name):
    """The stacked path count gives every mask the answer effective_masks gives it alone (MLP; convolution with
    BatchNorm and max pooling; a residual shortcut), down to masks that leave most kept weights off every path."""
    torch.manual_seed(0)
    if name == "plain":
        model, shape = _mlp(), (3,)
    elif name == "conv":
        model = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.MaxPool2d(2),
                              nn.Flatten(), nn.Linear(27, 5), nn.ReLU(), nn.Linear(5, 2))
        shape = (1, 6, 6)
    elif name == "tied":
        model, shape = _Tied(), (4,)
    else:
        from panning.models import build_model
        model, shape = build_model("resnet8", 10, (3, 16, 16), seed=0), (3, 16, 16)
    masks = _random_masks(model, (0.9, 0.3, 0.05, 0.01))
    if name == "tied":  # all kept, then one weight: the second network's only weight feeds no output
        masks = [Masks({"a.weight": torch.ones(4, 4, dtype=torch.bool)}),
                 Masks({"a.weight": torch.tensor([[False] * 4, [True] + [False] * 3, [False] * 4, [False] * 4])})]
    counter = PathCounter(model)
    got = counter.effective_many(masks, shape)
    ref = [effective_masks(model, m, shape) for m in masks]
    assert counter._stackable  # the stacked pass ran: the comparison is not the loop against itself
    assert all(a.equal(b) for a, b in zip(got, ref, strict=True))
    assert sum(m.num_kept - e.num_kept for m, e in zip(masks, ref, strict=True)) > 0


def test_effective_many_falls_back_where_counts_overflow_or_vmap_cannot_run():
    deep = nn.Sequential(*[nn.Linear(64, 64) for _ in range(200)])
    dead = _ones(deep)
    dead["100.weight"][:, 5] = False
    sparse = {k: v.clone() for k, v in dead.items()}
    sparse["0.weight"][:, 1:] = False  # one input feeds everything: few paths, no overflow
    masks = [Masks(dead), Masks(sparse)]
    got = PathCounter(deep).effective_many(masks, (64,))  # the first overflows float64 unscaled
    assert all(a.equal(effective_masks(deep, m, (64,))) for a, m in zip(got, masks, strict=True))
    assert not got[0]["99.weight"][5].any()
    # counts that overflow and then meet a pruned weight turn NaN, where the unscaled answer would be wrong
    chain = nn.Sequential(*[nn.Linear(64, 64) for _ in range(200)], nn.Linear(64, 1))
    nan = _ones(chain)
    nan["199.weight"][:, 3] = False
    nan["200.weight"][0, 7] = False
    few = {k: v.clone() for k, v in nan.items()}
    few["0.weight"][:, 1:] = False
    masks = [Masks(nan), Masks(few)]
    got = PathCounter(chain).effective_many(masks, (64,))
    assert all(a.equal(effective_masks(chain, m, (64,))) for a, m in zip(got, masks, strict=True))

    class Branchy(nn.Module):  # control flow on a value: vmap has no rule for it
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(3, 4), nn.Linear(4, 2)

        def forward(self, x):
            h = self.a(x)
            return self.b(h) if bool(h.sum() > 0) else self.b(h) * 2

    model = Branchy()
    masks = _random_masks(model, (0.8, 0.4, 0.2))
    counter = PathCounter(model)
    got = counter.effective_many(masks, (3,))
    assert not counter._stackable
    assert all(a.equal(effective_masks(model, m, (3,))) for a, m in zip(got, masks, strict=True))
