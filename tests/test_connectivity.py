"""Effective connectivity: kept weights on no input-output path, layer collapse, model untouched."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import prune

from panning.connectivity import collapsed_layers, effective_masks, effective_sparsity
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
