"""Model registry: shapes, names, seeded and stated initialisation."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from panning.models import INITS, available_models, build_model

CASES = [
    ("mlp", (64,), 10),
    ("lenet300", (1, 28, 28), 10),
    ("lenet5", (1, 28, 28), 10),
    ("vgg11", (3, 32, 32), 10),
    ("vgg16", (3, 32, 32), 100),
    ("vgg19", (3, 32, 32), 10),
    ("resnet20", (3, 32, 32), 10),
    ("resnet32", (3, 32, 32), 100),
    ("resnet56", (3, 32, 32), 10),
]


def test_registry_lists_builtins():
    assert available_models() == sorted(
        ["mlp", "lenet300", "lenet5", "vgg11", "vgg16", "vgg19", "resnet8", "resnet20", "resnet32", "resnet56"]
    )


@pytest.mark.parametrize("name,shape,k", CASES)
def test_forward_shape(name, shape, k):
    model = build_model(name, k, shape)
    with torch.no_grad():
        out = model(torch.randn(2, *shape))
    assert out.shape == (2, k)
    assert torch.isfinite(out).all()


def test_mlps_flatten_their_input():
    model = build_model("lenet300", 10, (1, 28, 28))
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(model(x), model(x.view(3, 784)))
    assert [n for n, _ in model.named_parameters()] == [
        "fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias", "fc3.weight", "fc3.bias"
    ]
    assert model.fc1.in_features == 784 and model.fc1.out_features == 300 and model.fc2.out_features == 100


def test_digits_mlp_is_64_300_100_10():
    model = build_model("mlp", 10, (64,))
    assert [(m.in_features, m.out_features) for m in model.modules() if isinstance(m, nn.Linear)] == [
        (64, 300), (300, 100), (100, 10)
    ]


def test_lenet5_caffe_layout():
    model = build_model("lenet5", 10, (1, 28, 28))
    assert (model.conv1.out_channels, model.conv1.kernel_size) == (20, (5, 5))
    assert (model.conv2.out_channels, model.conv2.kernel_size) == (50, (5, 5))
    assert (model.fc1.in_features, model.fc1.out_features, model.fc2.out_features) == (800, 500, 10)


def test_resnet_uses_projection_shortcuts_only_where_shape_changes():
    model = build_model("resnet20", 10, (3, 32, 32))
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    shortcuts = [n for n in convs if "shortcut" in n]
    assert len(convs) == 19 + 2  # 1 stem + 18 block convs + 2 option-B projections
    assert shortcuts == ["blocks.3.shortcut.0", "blocks.6.shortcut.0"]


def test_torchvision_model_with_one_input_channel():
    model = build_model("tv:resnet18", 10, (1, 28, 28))
    assert model.conv1.in_channels == 1
    with torch.no_grad():
        assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_unknown_names_raise_listing_valid_ones():
    with pytest.raises(ValueError, match="resnet20.*tv:"):
        build_model("resnet7", 10, (3, 32, 32))
    with pytest.raises(ValueError, match="resnet18"):
        build_model("tv:not_a_model", 10, (3, 32, 32))
    with pytest.raises(ValueError, match="init"):
        build_model("mlp", 10, (64,), init="orthogonal")
    with pytest.raises(ValueError, match="input_shape"):
        build_model("lenet5", 10, (64,))
    with pytest.raises(ValueError, match="num_classes"):
        build_model("mlp", 0, (64,))


def _flat_params(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


@pytest.mark.parametrize("name,shape", [("mlp", (64,)), ("resnet20", (3, 32, 32))])
def test_seeded_init_is_reproducible_and_leaves_global_rng_alone(name, shape):
    state = torch.get_rng_state()
    a = build_model(name, 10, shape, seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    b = build_model(name, 10, shape, seed=3)
    c = build_model(name, 10, shape, seed=4)
    assert torch.equal(_flat_params(a), _flat_params(b))
    assert not torch.equal(_flat_params(a), _flat_params(c))


@pytest.mark.parametrize("init", INITS)
def test_init_options(init):
    model = build_model("lenet300", 10, (1, 28, 28), seed=0, init=init)
    w = model.fc1.weight.detach()
    fan_in, fan_out = 784, 300
    if init == "kaiming_normal":
        assert w.std().item() == pytest.approx(math.sqrt(2 / fan_in), rel=0.02)
    elif init == "kaiming_uniform":
        bound = math.sqrt(6 / fan_in)
        assert w.abs().max().item() <= bound and w.abs().max().item() > 0.95 * bound
    elif init == "xavier_normal":
        assert w.std().item() == pytest.approx(math.sqrt(2 / (fan_in + fan_out)), rel=0.02)
    elif init == "variance_scaling":  # TF's truncated normal: variance 1/fan_in after truncation at 2 std
        assert w.std().item() == pytest.approx(math.sqrt(1 / fan_in), rel=0.02)
        assert w.abs().max().item() <= 2 * math.sqrt(1 / fan_in) / 0.87962566103423978 + 1e-7
    if init == "default":
        assert model.fc1.bias.abs().sum() > 0  # PyTorch's own uniform bias init, untouched
    else:
        assert torch.count_nonzero(model.fc1.bias) == 0


def test_batchnorm_init():
    model = build_model("vgg11", 10, (3, 32, 32))
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(torch.all(m.weight == 1) and torch.all(m.bias == 0) for m in bns)


@pytest.mark.parametrize("init", INITS)
def test_reinit_draws_fresh_seeded_weights_of_the_same_kind(init):
    from panning.models import reinit_weights

    a = build_model("lenet300", 10, (1, 28, 28), seed=0, init=init)
    first = _flat_params(a).clone()
    state = torch.get_rng_state()
    reinit_weights(a, init, seed=0)
    assert torch.equal(torch.get_rng_state(), state)
    assert not torch.equal(_flat_params(a), first)
    b = build_model("lenet300", 10, (1, 28, 28), seed=0, init=init)
    reinit_weights(b, init, seed=0)
    assert torch.equal(_flat_params(a), _flat_params(b))  # seeded
    # a fresh draw of the same distribution, not a copy of another seed's first draw
    other = build_model("lenet300", 10, (1, 28, 28), seed=1, init=init)
    assert not torch.equal(_flat_params(a), _flat_params(other))
    assert a.fc1.weight.std().item() == pytest.approx(first[: 784 * 300].std().item(), rel=0.05)


def test_resnet8_on_digits_images():
    """ResNet-8 (one block a stage, BatchNorm) runs on 1x8x8 digits: 8 -> 4 -> 2 pixels over its stages."""
    import torch

    from panning.masks import Masks

    net = build_model("resnet8", 10, (1, 8, 8), seed=0)
    assert net(torch.zeros(2, 1, 8, 8)).shape == (2, 10)
    # the stem, two convs a stage, a projection shortcut at each of the two downsampling stages, the classifier
    assert len(Masks.ones(net)) == 10


def test_seeded_construction_leaves_the_cuda_generators_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """Seeded construction, scoring, the proxy and training (panning._functional.seeded) seed the CPU generator
    only on the CPU: torch.manual_seed would also reseed every CUDA generator (not restored by
    fork_rng(devices=[])), so a policy on the GPU would draw the same exploration noise after every episode."""
    from panning.batched import score_networks
    from panning.data import load_dataset
    from panning.masks import Masks
    from panning.models import reinit_weights
    from panning.proxy import ProxyEvaluator
    from panning.train import TrainConfig, train_masked

    calls: list[int] = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda seed: calls.append(seed))
    monkeypatch.setattr(torch.cuda, "manual_seed", lambda seed: calls.append(seed))
    nets = [build_model("mlp", 10, (64,), seed=s) for s in (0, 1)]
    reinit_weights(nets[0], "kaiming_normal", seed=3)
    masks = [Masks.ones(n) for n in nets]
    score_networks("synflow", nets, masks, input_shape=(64,), seeds=[0, 1])
    bundle = load_dataset("digits")
    ProxyEvaluator(bundle, steps=2, device="cpu").evaluate(nets[0], masks[0])
    train_masked(nets[1], masks[1], bundle, TrainConfig(epochs=1, batch_size=256, augment=False), device="cpu",
                 seed=0, progress=False)
    assert calls == []
    torch.manual_seed(0)  # the check itself can fail: the global seeding does call it
    assert calls == [0]
