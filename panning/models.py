"""Network architectures by name, built with a stated, seeded initialisation.

Built-in names (``available_models()``):

- ``mlp``: fully connected prod(input_shape)-300-100-classes, ReLU (for digits: 64-300-100-10).
- ``lenet300``: LeNet-300-100 (LeCun et al., 1998), prod(input_shape)-300-100-classes, ReLU
  (784-300-100-10 on MNIST). Same layout as ``mlp``; the two names exist so configs say what they mean.
- ``lenet5``: LeNet-5-Caffe as used by SNIP (Lee et al., 2019): conv 20@5x5, maxpool 2, conv 50@5x5,
  maxpool 2, fc 500, fc classes; ReLU after both convs and the first fc; no padding.
- ``vgg11``, ``vgg16``, ``vgg19``: CIFAR VGG with BatchNorm as in OpenLTH / SynFlow (``lottery_vgg``):
  3x3 conv (bias) + BN + ReLU stacks, 4 max-pools (the last stage has none), global average pool,
  one linear layer 512 -> classes.
- ``resnet20``, ``resnet32``, ``resnet56``: CIFAR ResNets (He et al., 2016), 16/32/64 filters in three
  stages of (depth-2)/6 basic blocks; shortcuts that change shape are **option B**
  (1x1 conv stride 2 + BN projection, as in OpenLTH / SynFlow), the others are identity.
- ``tv:<name>``: any torchvision classification model, ``torchvision.models.get_model(name,
  weights=None, num_classes=...)``; its first 3-channel conv is replaced when the input has another
  channel count.

Initialisation (``init``), applied to every Conv/Linear module:

- ``"kaiming_normal"`` (default, as SynFlow): ``kaiming_normal_(w, mode="fan_in", nonlinearity="relu")``,
  i.e. N(0, 2/fan_in);
- ``"kaiming_uniform"``: ``kaiming_uniform_(w, mode="fan_in", nonlinearity="relu")``;
- ``"xavier_normal"``: ``xavier_normal_(w)`` (gain 1);
- ``"variance_scaling"``: TensorFlow 1's ``variance_scaling_initializer()`` defaults, which SNIP's public
  code uses: a normal truncated at two standard deviations, scaled so that the variance is 1/fan_in
  (std ``sqrt(1/fan_in) / 0.8796``, the truncation correction TF applies);
- ``"default"``: PyTorch's (or torchvision's) own initialisation, untouched.

With every option but ``"default"`` biases are set to 0 and norm layers to weight 1, bias 0.
Construction runs under :func:`panning._functional.seeded` (the CPU generator): the same seed gives the same
weights and the caller's global RNG state is left as it was.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from panning._functional import seeded
from panning.errors import ConfigError

__all__ = [
    "MODELS",
    "INITS",
    "TV_PREFIX",
    "available_models",
    "build_model",
    "init_weights",
    "reinit_weights",
    "REINIT_SEED_OFFSET",
    "MLP",
    "LeNet5",
    "VGG",
    "CifarResNet",
]

TV_PREFIX = "tv:"
INITS = ("kaiming_normal", "kaiming_uniform", "xavier_normal", "variance_scaling", "default")
# reinit_weights draws from seed + this, a stream no other seed of a sweep uses for its first draw
REINIT_SEED_OFFSET = 1_000_003


# --------------------------------------------------------------------------- architectures


class MLP(nn.Module):
    """Fully connected ReLU network; flattens its input, so (N, 1, 28, 28) and (N, 784) both work."""

    def __init__(self, in_features: int, hidden: Sequence[int], num_classes: int) -> None:
        super().__init__()
        sizes = [in_features, *hidden, num_classes]
        # Named fc1..fcK so users can exclude e.g. "fc3" (the classifier) by module name.
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True), start=1):
            self.add_module(f"fc{i}", nn.Linear(a, b))
        self.num_layers = len(sizes) - 1
        self.in_features = in_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        for i in range(1, self.num_layers + 1):
            x = getattr(self, f"fc{i}")(x)
            if i < self.num_layers:
                x = F.relu(x)
        return x


class LeNet5(nn.Module):
    """LeNet-5-Caffe: conv(20,5) - pool - conv(50,5) - pool - fc(500) - fc(classes)."""

    def __init__(self, input_shape: Sequence[int], num_classes: int) -> None:
        super().__init__()
        c, h, w = _image_shape(input_shape, "lenet5")
        self.conv1 = nn.Conv2d(c, 20, kernel_size=5)
        self.conv2 = nn.Conv2d(20, 50, kernel_size=5)
        h2, w2 = ((h - 4) // 2 - 4) // 2, ((w - 4) // 2 - 4) // 2
        if h2 < 1 or w2 < 1:
            raise ConfigError(f"lenet5 needs images of at least 16x16, got input_shape {tuple(input_shape)}")
        self.fc1 = nn.Linear(50 * h2 * w2, 500)
        self.fc2 = nn.Linear(500, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.relu(self.fc1(x.flatten(1)))
        return self.fc2(x)


_VGG_PLANS: dict[int, list[int | str]] = {
    11: [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512],
    16: [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512],
    19: [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512],
}


class VGG(nn.Module):
    """CIFAR VGG with BatchNorm (OpenLTH / SynFlow layout): ``features`` then ``classifier`` (one Linear)."""

    def __init__(self, depth: int, in_channels: int, num_classes: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c = in_channels
        for spec in _VGG_PLANS[depth]:
            if spec == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                layers += [nn.Conv2d(c, int(spec), kernel_size=3, padding=1), nn.BatchNorm2d(int(spec)),
                           nn.ReLU(inplace=True)]
                c = int(spec)
        self.features = nn.Sequential(*layers)
        # Adaptive pooling equals SynFlow's AvgPool2d(2) on 32x32 inputs and also accepts other sizes.
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.features(x)).flatten(1))


class BasicBlock(nn.Module):
    """Two 3x3 conv+BN layers around a residual connection (projection shortcut when the shape changes)."""

    def __init__(self, f_in: int, f_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(f_in, f_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(f_out)
        self.conv2 = nn.Conv2d(f_out, f_out, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(f_out)
        self.shortcut: nn.Module
        if stride != 1 or f_in != f_out:
            self.shortcut = nn.Sequential(nn.Conv2d(f_in, f_out, 1, stride=stride, bias=False), nn.BatchNorm2d(f_out))
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for CIFAR (He et al., 2016), option-B projection shortcuts."""

    def __init__(self, depth: int, in_channels: int, num_classes: int, width: int = 16) -> None:
        super().__init__()
        if (depth - 2) % 6 != 0:
            raise ConfigError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.conv = nn.Conv2d(in_channels, width, 3, stride=1, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        blocks: list[nn.Module] = []
        f_in = width
        for stage, f_out in enumerate((width, 2 * width, 4 * width)):
            for b in range(n):
                stride = 2 if (stage > 0 and b == 0) else 1
                blocks.append(BasicBlock(f_in, f_out, stride))
                f_in = f_out
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(f_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn(self.conv(x)))
        out = self.blocks(out)
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.fc(out)


# --------------------------------------------------------------------------- registry


def _image_shape(input_shape: Sequence[int], name: str) -> tuple[int, int, int]:
    shape = tuple(int(s) for s in input_shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ConfigError(f"{name} needs an image input_shape (C, H, W), got {shape}")
    return shape


def _flat(input_shape: Sequence[int]) -> int:
    shape = tuple(int(s) for s in input_shape)
    if not shape or min(shape) < 1:
        raise ConfigError(f"input_shape must be non-empty positive sizes, got {shape}")
    return math.prod(shape)


Builder = Callable[[int, Sequence[int]], nn.Module]

MODELS: dict[str, Builder] = {
    "mlp": lambda k, s: MLP(_flat(s), (300, 100), k),
    "lenet300": lambda k, s: MLP(_flat(s), (300, 100), k),
    "lenet5": lambda k, s: LeNet5(s, k),
    "vgg11": lambda k, s: VGG(11, _image_shape(s, "vgg11")[0], k),
    "vgg16": lambda k, s: VGG(16, _image_shape(s, "vgg16")[0], k),
    "vgg19": lambda k, s: VGG(19, _image_shape(s, "vgg19")[0], k),
    "resnet8": lambda k, s: CifarResNet(8, _image_shape(s, "resnet8")[0], k),
    "resnet20": lambda k, s: CifarResNet(20, _image_shape(s, "resnet20")[0], k),
    "resnet32": lambda k, s: CifarResNet(32, _image_shape(s, "resnet32")[0], k),
    "resnet56": lambda k, s: CifarResNet(56, _image_shape(s, "resnet56")[0], k),
}


def available_models() -> list[str]:
    """Built-in model names; any torchvision classifier is also available as ``"tv:<name>"``."""
    return sorted(MODELS)


def _torchvision_names() -> list[str]:
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


def _build_torchvision(name: str, num_classes: int, input_shape: Sequence[int]) -> nn.Module:
    import torchvision

    valid = _torchvision_names()
    if name not in valid:
        raise ConfigError(f"unknown torchvision classification model {name!r}; valid: {', '.join(valid)}")
    model = torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    shape = tuple(int(s) for s in input_shape)
    in_ch = shape[0] if len(shape) == 3 else None
    if in_ch is None:
        raise ConfigError(f"tv:{name} needs an image input_shape (C, H, W), got {shape}")
    if in_ch != 3:
        _replace_first_conv(model, in_ch)
    return model


def _replace_first_conv(model: nn.Module, in_channels: int) -> None:
    """Swap the first Conv2d taking 3 channels for one taking ``in_channels``, same hyper-parameters."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d) and module.in_channels == 3:
            if module.groups != 1:
                raise ConfigError(f"cannot adapt grouped first conv {name!r} to {in_channels} input channels")
            new = nn.Conv2d(
                in_channels,
                module.out_channels,
                kernel_size=module.kernel_size,  # type: ignore[arg-type]
                stride=module.stride,  # type: ignore[arg-type]
                padding=module.padding,  # type: ignore[arg-type]
                dilation=module.dilation,  # type: ignore[arg-type]
                bias=module.bias is not None,
                padding_mode=module.padding_mode,
            )
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, attr, new)
            return
    raise ConfigError(f"no 3-channel Conv2d found to adapt to {in_channels} input channels")


# std of a standard normal truncated to [-2, 2]; TF divides by it so the truncated draw keeps variance 1/fan_in
_TRUNC_STD = 0.87962566103423978


def _variance_scaling_(w: torch.Tensor) -> None:
    fan_in = w[0].numel()  # Linear: in_features; Conv: in_channels/groups * kernel size
    std = math.sqrt(1.0 / fan_in) / _TRUNC_STD
    nn.init.trunc_normal_(w, mean=0.0, std=std, a=-2 * std, b=2 * std)


def init_weights(model: nn.Module, init: str = "kaiming_normal") -> nn.Module:
    """Re-initialise ``model`` in place (see module docstring for each option); uses the global RNG."""
    if init not in INITS:
        raise ConfigError(f"unknown init {init!r}; valid: {', '.join(INITS)}")
    if init == "default":
        return model
    conv_linear = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
    norms = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.modules.instancenorm._InstanceNorm)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, conv_linear):
                if init == "kaiming_normal":
                    nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
                elif init == "kaiming_uniform":
                    nn.init.kaiming_uniform_(m.weight, mode="fan_in", nonlinearity="relu")
                elif init == "variance_scaling":
                    _variance_scaling_(m.weight)
                else:
                    nn.init.xavier_normal_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, norms):
                if getattr(m, "weight", None) is not None:
                    nn.init.ones_(m.weight)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
    return model


def reinit_weights(model: nn.Module, init: str, seed: int) -> nn.Module:
    """Draw fresh weights for ``model`` in place (seeded by ``seed + REINIT_SEED_OFFSET``, global RNG untouched).

    This is SNIP's public-code protocol (the mask comes from one draw, training starts from an
    independent one) and the "reinitialisation" sanity check of Frankle et al. (2021). With
    ``init="default"`` every module's own ``reset_parameters`` is called.
    """
    if init not in INITS:
        raise ConfigError(f"unknown init {init!r}; valid: {', '.join(INITS)}")
    with seeded(seed + REINIT_SEED_OFFSET):
        if init == "default":
            for m in model.modules():
                reset = getattr(m, "reset_parameters", None)
                if callable(reset):
                    reset()
        else:
            init_weights(model, init)
    return model


def build_model(
    name: str,
    num_classes: int,
    input_shape: Sequence[int],
    seed: int = 0,
    init: str = "kaiming_normal",
) -> nn.Module:
    """Build model ``name`` for ``num_classes`` classes and inputs of ``input_shape`` (no batch dim).

    Initialisation is seeded by ``seed`` inside a forked RNG, so the global RNG is untouched.
    Raises ValueError for an unknown name or init, or an input shape the architecture cannot take.
    """
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ConfigError(f"num_classes must be a positive int, got {num_classes!r}")
    if init not in INITS:
        raise ConfigError(f"unknown init {init!r}; valid: {', '.join(INITS)}")
    if not isinstance(name, str):
        raise ConfigError(f"model name must be a string, got {name!r}")
    key = name.strip().lower()
    if not key.startswith(TV_PREFIX) and key not in MODELS:
        raise ConfigError(
            f"unknown model {name!r}; valid: {', '.join(available_models())}, "
            f"or 'tv:<name>' for any torchvision classification model (e.g. tv:resnet18)"
        )
    with seeded(seed):  # the CPU generator alone: models are built on the CPU
        if key.startswith(TV_PREFIX):
            model = _build_torchvision(name.strip()[len(TV_PREFIX):], num_classes, input_shape)
        else:
            model = MODELS[key](num_classes, input_shape)
        init_weights(model, init)
    return model
