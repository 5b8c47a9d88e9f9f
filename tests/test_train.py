"""Training of masked networks: convergence, masks held at zero, seeding, schedules, logging, devices."""
from __future__ import annotations

import contextlib
import math

import pytest
import torch

from panning.data import InMemoryDataset, load_dataset
from panning.models import build_model
from panning.train import TrainConfig, evaluate, lr_factor, resolve_device, train_masked


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def _random_masks(model: torch.nn.Module, density: float, seed: int = 0):
    from panning.masks import Masks, prunable_parameters

    g = torch.Generator().manual_seed(seed)
    return Masks({n: torch.rand(p.shape, generator=g) < density for n, p in prunable_parameters(model).items()})


FAST = dict(epochs=2, batch_size=32, lr=0.2)


def test_masked_training_learns_and_keeps_pruned_weights_zero(digits):
    model = build_model("mlp", 10, (64,), seed=0)
    masks = _random_masks(model, 0.1)
    assert masks.sparsity == pytest.approx(0.9, abs=0.01)
    hist = train_masked(model, masks, digits, TrainConfig(**FAST), device="cpu", seed=0, progress=False)
    assert len(hist["epochs"]) == 2 and not hist["diverged"]
    assert hist["final_val"]["accuracy"] > 0.6  # chance is 0.1
    assert hist["epochs"][-1]["val_accuracy"] == pytest.approx(hist["final_val"]["accuracy"])
    assert hist["sparsity"] == pytest.approx(masks.sparsity)
    assert hist["steps"] == 2 * math.ceil(len(digits.train) / 32)
    params = dict(model.named_parameters())
    for name, m in masks.items():
        assert torch.count_nonzero(params[name].detach()[~m]) == 0, name
        assert torch.count_nonzero(params[name].detach()[m]) > 0, name
    # hooks are removed afterwards: the model is a plain module again
    x, y = digits.train.x[:8], digits.train.y[:8]
    torch.nn.functional.cross_entropy(model(x), y).backward()
    assert torch.count_nonzero(params["fc1.weight"].grad[~masks["fc1.weight"]]) > 0


def test_same_seed_same_result_and_global_rng_untouched(digits):
    def run(seed):
        model = build_model("mlp", 10, (64,), seed=0)
        train_masked(model, _random_masks(model, 0.2), digits, TrainConfig(epochs=1, batch_size=64, lr=0.05),
                     device="cpu", seed=seed, progress=False)
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    state = torch.get_rng_state()
    a = run(0)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a, run(0))
    assert not torch.equal(a, run(1))


def test_dense_training_and_zero_epochs(digits):
    model = build_model("mlp", 10, (64,), seed=0)
    before = [p.detach().clone() for p in model.parameters()]
    hist = train_masked(model, None, digits, TrainConfig(epochs=0), device="cpu", progress=False)
    assert hist["epochs"] == [] and hist["steps"] == 0 and hist["sparsity"] == 0.0
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    hist = train_masked(model, None, digits, TrainConfig(epochs=1, batch_size=128, max_steps_per_epoch=3,
                                                         schedule="constant"), device="cpu", progress=True)
    assert hist["steps"] == 3


def test_tensorboard_scalars_written(digits, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    model = build_model("mlp", 10, (64,), seed=0)
    writer = SummaryWriter(str(tmp_path))
    try:
        train_masked(model, _random_masks(model, 0.5), digits, TrainConfig(**FAST), device="cpu", writer=writer,
                     progress=False)
    finally:
        writer.close()
    assert list(tmp_path.glob("events.out.tfevents.*"))
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/accuracy", "val/loss", "val/accuracy", "lr", "sparsity"} <= tags
    assert [e.step for e in acc.Scalars("val/accuracy")] == [1, 2]
    assert acc.Scalars("sparsity")[0].value == pytest.approx(0.5, abs=0.02)


def test_divergence_stops_training(digits):
    model = build_model("mlp", 10, (64,), seed=0)
    hist = train_masked(model, None, digits, TrainConfig(epochs=3, lr=1e6, momentum=0.0, weight_decay=0.0),
                        device="cpu", progress=False)
    assert hist["diverged"] and len(hist["epochs"]) < 3


def test_evaluate_metrics_and_mode_restored():
    x = torch.randn(30, 4)
    y = torch.arange(30) % 3
    model = torch.nn.Linear(4, 3)
    model.train()
    res = evaluate(model, InMemoryDataset(x, y), "cpu", num_classes=4, batch_size=7)
    assert model.training
    with torch.no_grad():
        out = model(x)
    pred = out.argmax(1)
    assert res["accuracy"] == pytest.approx((pred == y).float().mean().item())
    assert res["loss"] == pytest.approx(torch.nn.functional.cross_entropy(out, y).item(), rel=1e-5)
    for c in range(3):
        assert res["per_class_recall"][c] == pytest.approx((pred[y == c] == c).float().mean().item())
    assert math.isnan(res["per_class_recall"][3])  # class absent from the data
    with pytest.raises(ValueError, match="empty"):
        evaluate(model, InMemoryDataset(x[:0], y[:0]), "cpu", 3)


def test_lr_schedules():
    cos = TrainConfig(epochs=10, schedule="cosine")
    assert lr_factor(cos, 0, 100) == pytest.approx(1.0)
    assert lr_factor(cos, 500, 100) == pytest.approx(0.5)
    assert lr_factor(cos, 999, 100) < 1e-4
    step = TrainConfig(epochs=10, schedule="step", milestones=[6, 3], gamma=0.1)
    assert [round(lr_factor(step, e * 10, 10), 6) for e in (0, 2, 3, 5, 6, 9)] == [1, 1, 0.1, 0.1, 0.01, 0.01]
    warm = TrainConfig(epochs=4, schedule="constant", warmup_epochs=1)
    assert lr_factor(warm, 0, 10) == pytest.approx(0.1) and lr_factor(warm, 9, 10) == 1.0
    assert lr_factor(warm, 25, 10) == 1.0


@pytest.mark.parametrize("bad", [dict(epochs=-1), dict(batch_size=0), dict(lr=0.0), dict(schedule="poly"),
                                 dict(nesterov=True, momentum=0.0), dict(milestones=[0]), dict(gamma=2.0)])
def test_train_config_validation(bad):
    with pytest.raises(ValueError, match="TrainConfig"):
        TrainConfig(**bad)


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="device"):
        resolve_device("tpu-please")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_resolve_device_cuda_without_gpu():
    with pytest.raises(ValueError, match="CUDA is not available"):
        resolve_device("cuda")


def _digit_images(digits):
    """digits as 1x8x8 images, for small convolutional tests."""
    import dataclasses

    def img(ds):
        return InMemoryDataset(ds.tensors[0].reshape(-1, 1, 8, 8), ds.tensors[1])

    return dataclasses.replace(digits, train=img(digits.train), val=img(digits.val), test=img(digits.test),
                               input_shape=(1, 8, 8), augment=False)


def _small_convnet() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 16, 3), torch.nn.ReLU(),
        torch.nn.Flatten(), torch.nn.Linear(16 * 6 * 6, 10),
    )


class _ViewNet(torch.nn.Module):
    """Flattens with ``.view``, which channels_last activations do not allow."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 4, 3)
        self.fc = torch.nn.Linear(4 * 6 * 6, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(x))
        return self.fc(h.view(h.size(0), -1))


class _Conv3dToo(torch.nn.Module):
    """A Conv2d beside a 5-D weight, which a whole-model channels_last conversion rejects."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 4, 3)
        self.conv3 = torch.nn.Conv3d(1, 1, 1)
        self.fc = torch.nn.Linear(4 * 6 * 6, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv3(x.unsqueeze(1)).squeeze(1)
        return self.fc(torch.relu(self.conv(h)).flatten(1))


def test_cpu_channels_last_rule():
    from panning.train import cpu_channels_last

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    x = torch.randn(4, 1, 8, 8)
    net = _small_convnet()
    with cpu_channels_last(net, cpu, x) as on:
        assert on and net[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert net[0].weight.is_contiguous()  # handed back NCHW
    with cpu_channels_last(net, cuda, x) as on:  # not measured on GPUs: left alone (no GPU needed to decide)
        assert not on
    with cpu_channels_last(build_model("mlp", 10, (64,)), cpu, torch.randn(4, 64)) as on:
        assert not on
    view = _ViewNet()
    with cpu_channels_last(view, cpu, x) as on:
        assert not on and view.conv.weight.is_contiguous()
        view(x)  # still works, in NCHW
    both = _Conv3dToo()
    with cpu_channels_last(both, cpu, x) as on:
        assert on and both.conv3.weight.is_contiguous()
        both(x.contiguous(memory_format=torch.channels_last))


def test_user_model_with_view_still_trains(digits):
    images = _digit_images(digits)
    model = _ViewNet()
    masks = _random_masks(model, 0.5)
    hist = train_masked(model, masks, images, TrainConfig(epochs=1, batch_size=64, lr=0.05), device="cpu",
                        seed=0, progress=False)
    assert not hist["diverged"]


def test_proxy_hands_back_nchw(digits):
    from panning.proxy import ProxyEvaluator

    images = _digit_images(digits)
    model = _small_convnet()
    net = ProxyEvaluator(images, steps=3, batch_size=32, device="cpu",
                         cache_size=0).train(model, _random_masks(model, 0.5))
    assert all(p.is_contiguous() for p in net.parameters())


def test_conv_training_on_cpu_channels_last_matches_nchw(digits, monkeypatch):
    """NHWC on the CPU changes speed, not the computation: the same weights up to float rounding,
    pruned weights exactly zero, and the caller's NCHW layout handed back."""
    import panning.train as train_mod

    images = _digit_images(digits)

    def run():
        model = _small_convnet()
        masks = _random_masks(model, 0.3)
        hist = train_masked(model, masks, images, TrainConfig(epochs=1, batch_size=64, lr=0.05),
                            device="cpu", seed=0, progress=False)
        return model, masks, hist

    nhwc, masks, hist = run()
    assert hist["final_val"]["accuracy"] > 0.3  # chance is 0.1
    params = dict(nhwc.named_parameters())
    for name, m in masks.items():
        assert params[name].is_contiguous(), name
        assert torch.count_nonzero(params[name].detach()[~m]) == 0, name
    monkeypatch.setattr(train_mod, "cpu_channels_last", lambda model, device, example: contextlib.nullcontext(False))
    nchw, _, hist_nchw = run()
    for (name, a), b in zip(nhwc.named_parameters(), nchw.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
    assert hist["final_val"]["accuracy"] == pytest.approx(hist_nchw["final_val"]["accuracy"], abs=0.01)


def test_resolving_the_cpu_leaves_cudnn_settings_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only a CUDA device makes cuDNN deterministic float32 (tests/test_cuda.py checks that on a GPU)."""
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    assert resolve_device("cpu") == torch.device("cpu")
    assert torch.backends.cudnn.benchmark and torch.backends.cudnn.allow_tf32
