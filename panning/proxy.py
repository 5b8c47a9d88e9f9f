"""Proxy evaluator: masks in, validation accuracy out, after a short seeded training run.

The RL environment's reward and any quick comparison of masks use :class:`ProxyEvaluator`. It
trains a *copy* of the masked network (the caller's model is never modified) with SGD for a fixed
number of steps on the training split, keeping pruned weights exactly zero through
:func:`panning.masks.enforce`, then scores it on the **validation** split. The test split is never
read: the evaluator keeps only the train and validation tensors of the bundle it is given.

Speed: the train and validation tensors are moved to the device once; batches are drawn by
indexing them with a seeded, precomputed order; the loop makes no host synchronisation
(no ``.item()``) until the final evaluation. Results are cached by
``(hash of the initial weights, hash of the mask bits, training settings)``, so a mask seen before
(the agent repeating itself, or the single-index references of the environment) is not retrained.
"""
from __future__ import annotations

import copy
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from panning.data import DataBundle, make_loader
from panning.errors import ConfigError, DataError
from panning.hashing import masks_digest, state_digest
from panning.masks import Masks, enforce
from panning.train import cpu_channels_last, resolve_device

__all__ = ["ProxyEvaluator", "ProxyResult", "ProxySettings"]

ModelSpec = str | Callable[[], nn.Module] | None


@dataclass(frozen=True)
class ProxyResult:
    """Outcome of one proxy evaluation (validation split only)."""

    accuracy: float
    loss: float
    seconds: float
    cached: bool
    steps: int


@dataclass(frozen=True)
class ProxySettings:
    """The short training run. ``steps`` SGD steps of ``batch_size`` samples (drop-last, reshuffled each
    pass); the learning rate follows ``schedule`` ("cosine" to 0, or "constant") over those steps."""

    steps: int = 200
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = False
    schedule: str = "cosine"
    seed: int = 0

    def __post_init__(self) -> None:
        problems = []
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            problems.append(f"steps must be an int >= 1, got {self.steps!r}")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            problems.append(f"batch_size must be an int >= 1, got {self.batch_size!r}")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0 and math.isfinite(self.lr)):
            problems.append(f"lr must be a positive finite number, got {self.lr!r}")
        if not 0 <= self.momentum < 1:
            problems.append(f"momentum must be in [0, 1), got {self.momentum!r}")
        if not self.weight_decay >= 0:
            problems.append(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        if self.nesterov and self.momentum <= 0:
            problems.append("nesterov needs momentum > 0")
        if self.schedule not in ("cosine", "constant"):
            problems.append(f"schedule must be 'cosine' or 'constant', got {self.schedule!r}")
        if problems:
            raise ConfigError("bad proxy settings: " + "; ".join(problems))


def _split_tensors(dataset: Dataset, what: str) -> tuple[Tensor, Tensor]:
    if len(dataset) == 0:  # type: ignore[arg-type]
        raise DataError(f"the {what} split is empty; the proxy needs training and validation data")
    loader = make_loader(dataset, 1, shuffle=False)  # materialises (x, y) tensors once
    return loader.x, loader.y


class ProxyEvaluator:
    """Short-budget training of a masked network, scored on the validation split, cached by mask.

    ``model`` says how to rebuild the architecture when :meth:`evaluate` is given a state dict
    instead of a module: a registered model name (built with ``panning.models.build_model`` for
    the bundle's classes and input shape) or a zero-argument factory. It is not needed when a
    module is passed. ``steps`` is the budget in SGD steps; ``epochs`` (a float) may be given
    instead and is converted to ``ceil(epochs * n_train / batch_size)`` steps. ``settings`` (a
    :class:`ProxySettings`) gives every training setting at once, in place of the keywords.
    """

    def __init__(
        self,
        bundle: DataBundle,
        model: ModelSpec = None,
        *,
        steps: int | None = None,
        epochs: float | None = None,
        batch_size: int = 128,
        lr: float = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        nesterov: bool = False,
        schedule: str = "cosine",
        seed: int = 0,
        device: str | torch.device = "auto",
        cache_size: int = 4096,
        settings: ProxySettings | None = None,
    ) -> None:
        xtr, ytr = _split_tensors(bundle.train, "training")
        # Only train and val are kept: the reward can never reach the test split through us.
        xva, yva = _split_tensors(bundle.val, "validation")
        if settings is not None:
            steps, batch_size, lr, momentum = settings.steps, settings.batch_size, settings.lr, settings.momentum
            weight_decay, nesterov, schedule, seed = (settings.weight_decay, settings.nesterov, settings.schedule,
                                                      settings.seed)
        if steps is not None and epochs is not None:
            raise ValueError("give the proxy budget as steps or as epochs, not both")
        if epochs is not None:
            if not (isinstance(epochs, (int, float)) and epochs > 0 and math.isfinite(epochs)):
                raise ConfigError(f"epochs must be a positive number, got {epochs!r}")
            if isinstance(batch_size, int) and batch_size >= 1:
                steps = max(1, math.ceil(float(epochs) * xtr.shape[0] / min(batch_size, xtr.shape[0])))
        self.settings = ProxySettings(
            steps=200 if steps is None else steps, batch_size=batch_size, lr=float(lr), momentum=float(momentum),
            weight_decay=float(weight_decay), nesterov=bool(nesterov), schedule=schedule, seed=int(seed),
        )
        if cache_size < 0:
            raise ValueError(f"cache_size must be >= 0, got {cache_size}")
        self.device = resolve_device(device)
        self.num_classes = int(bundle.num_classes)
        self.input_shape = tuple(bundle.input_shape)
        self._model_spec = model
        self._xtr, self._ytr = xtr.to(self.device), ytr.to(self.device)
        self._xva, self._yva = xva.to(self.device), yva.to(self.device)
        self.cache_size = int(cache_size)
        self._cache: OrderedDict[tuple, ProxyResult] = OrderedDict()
        self.hits = 0
        self.misses = 0

    @property
    def steps(self) -> int:
        """The training budget in SGD steps."""
        return self.settings.steps

    def clear_cache(self) -> None:
        """Forget every cached result."""
        self._cache.clear()

    # ------------------------------------------------------------------------------------------

    def _fresh(self, init: nn.Module | Mapping[str, Tensor]) -> nn.Module:
        if isinstance(init, nn.Module):
            return copy.deepcopy(init)
        spec = self._model_spec
        if spec is None:
            raise ValueError("evaluate() got a state dict but the evaluator has no model name or factory to rebuild it")
        if isinstance(spec, str):
            from panning.models import build_model

            net = build_model(spec, self.num_classes, self.input_shape)
        else:
            net = spec()
        net.load_state_dict(dict(init))
        return net

    def _order(self, n: int) -> Tensor:
        """Sample indices of every step: consecutive seeded permutations, cut into full batches."""
        s = self.settings
        bs = min(s.batch_size, n)
        per_pass = n // bs
        passes = -(-s.steps // per_pass)
        g = torch.Generator().manual_seed(s.seed)
        perms = [torch.randperm(n, generator=g)[: per_pass * bs] for _ in range(passes)]
        return torch.cat(perms)[: s.steps * bs].view(s.steps, bs).to(self.device)

    def train(self, init: nn.Module | Mapping[str, Tensor], masks: Masks) -> nn.Module:
        """A trained copy of the masked network (pruned weights exactly zero); ``init`` is untouched."""
        s = self.settings
        net = self._fresh(init).to(self.device)
        masks = masks if isinstance(masks, Masks) else Masks(dict(masks))
        masks.check(net)
        masks = masks.to(self.device)
        net.train()
        opt = torch.optim.SGD(net.parameters(), lr=s.lr, momentum=s.momentum, weight_decay=s.weight_decay,
                              nesterov=s.nesterov)
        handle = enforce(net, masks, opt)
        order = self._order(self._xtr.shape[0])
        try:
            cuda = ([torch.cuda.current_device() if self.device.index is None else self.device.index]
                    if self.device.type == "cuda" else [])
            # the trained copy comes back in the usual layout: callers may score or save it
            with cpu_channels_last(net, self.device, self._xtr) as nhwc, torch.random.fork_rng(devices=cuda):
                torch.manual_seed(s.seed)  # dropout and the like, without touching the caller's RNG
                for i in range(s.steps):
                    if s.schedule == "cosine":
                        lr = 0.5 * s.lr * (1.0 + math.cos(math.pi * i / s.steps))
                        for group in opt.param_groups:
                            group["lr"] = lr
                    idx = order[i]
                    x = self._xtr[idx]
                    if nhwc and x.dim() == 4:
                        x = x.contiguous(memory_format=torch.channels_last)
                    loss = F.cross_entropy(net(x), self._ytr[idx])
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
        finally:
            handle.remove()
        return net

    @torch.no_grad()
    def score(self, net: nn.Module, chunk: int = 2048) -> tuple[float, float]:
        """(accuracy, mean cross-entropy) of ``net`` on the validation split, in eval mode."""
        was = net.training
        net.eval()
        correct = torch.zeros((), device=self.device, dtype=torch.long)
        loss = torch.zeros((), device=self.device, dtype=torch.float64)
        try:
            for lo in range(0, self._xva.shape[0], chunk):
                out = net(self._xva[lo : lo + chunk])
                y = self._yva[lo : lo + chunk]
                correct += (out.argmax(1) == y).sum()
                loss += F.cross_entropy(out.double(), y, reduction="sum")
        finally:
            net.train(was)
        n = self._xva.shape[0]
        return float(correct) / n, float(loss) / n

    def key(self, init: nn.Module | Mapping[str, Tensor], masks: Mapping[str, Tensor]) -> tuple:
        """Cache key: initial weights, mask bits and every training setting."""
        return (state_digest(init), masks_digest(masks), tuple(sorted(asdict(self.settings).items())))

    def evaluate(self, init: nn.Module | Mapping[str, Tensor], masks: Masks) -> ProxyResult:
        """Train a copy of ``init`` under ``masks`` for the budget; accuracy and loss on the validation split."""
        t0 = time.perf_counter()
        key = self.key(init, masks) if self.cache_size else None
        if key is not None and key in self._cache:
            self._cache.move_to_end(key)
            self.hits += 1
            hit = self._cache[key]
            return ProxyResult(hit.accuracy, hit.loss, time.perf_counter() - t0, True, hit.steps)
        self.misses += 1
        net = self.train(init, masks)
        acc, loss = self.score(net)
        if not math.isfinite(loss):
            loss = float("inf")
        result = ProxyResult(acc, loss, time.perf_counter() - t0, False, self.settings.steps)
        if key is not None:
            self._cache[key] = result
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return result
