"""Training and evaluation of a masked network.

``train_masked`` runs SGD (momentum, weight decay, optional Nesterov) with a per-step learning-rate
schedule (cosine, step or constant, optional linear warm-up) and keeps pruned weights exactly zero
throughout (:func:`panning.masks.enforce_tensors`: weights zeroed at the start, gradients zeroed
at every step, which keeps weight decay and momentum at exactly 0 too). It is seeded: on the CPU
the same model, masks, data and seed give the same result, and the caller's global RNG state is
left untouched.
"""
from __future__ import annotations

import contextlib
import functools
import itertools
import math
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import Dataset

from panning._functional import preserved_modes, seeded
from panning.data import DataBundle, make_loader
from panning.errors import ConfigError, DataError

if TYPE_CHECKING:  # masks.py is imported lazily at run time
    from panning.masks import Masks

__all__ = ["SCHEDULES", "SGDSettings", "TrainConfig", "evaluate", "lr_factor", "masked_sgd_steps", "resolve_device",
           "train_masked"]

SCHEDULES = ("cosine", "step", "constant")


@dataclass
class TrainConfig:
    """Optimiser and schedule settings of one training run (YAML key ``train``).

    ``milestones`` are epochs at which the ``step`` schedule multiplies the learning rate by
    ``gamma``. ``warmup_epochs`` ramps the rate linearly from lr/steps up to lr first. The schedule
    is applied per step. ``max_steps_per_epoch`` caps an epoch (short proxy runs); None = full
    passes. ``augment`` uses the data set's augmentation (CIFAR crop+flip) when it has one.
    """

    epochs: int = field(default=10, metadata={"flag": "--epochs", "help": "training epochs", "group": "train"})
    batch_size: int = field(default=128, metadata={"flag": "--batch-size", "help": "training batch size",
                                                    "group": "train"})
    lr: float = field(default=0.1, metadata={"flag": "--lr", "help": "learning rate", "group": "train"})
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = False
    schedule: str = "cosine"
    milestones: list[int] = field(default_factory=list)
    gamma: float = 0.1
    warmup_epochs: int = 0
    max_steps_per_epoch: int | None = None
    augment: bool = True

    def __post_init__(self) -> None:
        problems = []
        if not isinstance(self.epochs, int) or self.epochs < 0:
            problems.append(f"epochs must be an int >= 0, got {self.epochs!r}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            problems.append(f"batch_size must be an int >= 1, got {self.batch_size!r}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            problems.append(f"lr must be a positive finite number, got {self.lr!r}")
        if not 0 <= self.momentum < 1:
            problems.append(f"momentum must be in [0, 1), got {self.momentum!r}")
        if self.weight_decay < 0:
            problems.append(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        if self.nesterov and self.momentum <= 0:
            problems.append("nesterov needs momentum > 0")
        if self.schedule not in SCHEDULES:
            problems.append(f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if not 0 < self.gamma <= 1:
            problems.append(f"gamma must be in (0, 1], got {self.gamma!r}")
        if any((not isinstance(m, int)) or m < 1 for m in self.milestones):
            problems.append(f"milestones must be epochs >= 1, got {self.milestones!r}")
        if not isinstance(self.warmup_epochs, int) or self.warmup_epochs < 0:
            problems.append(f"warmup_epochs must be an int >= 0, got {self.warmup_epochs!r}")
        if self.max_steps_per_epoch is not None and self.max_steps_per_epoch < 1:
            problems.append(f"max_steps_per_epoch must be >= 1 or None, got {self.max_steps_per_epoch!r}")
        if problems:
            raise ConfigError("bad TrainConfig: " + "; ".join(problems))
        self.milestones = sorted(self.milestones)


def resolve_device(spec: str | torch.device = "auto") -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; ``"cpu"``, ``"cuda"``, ``"cuda:1"`` as given.

    On CUDA it also sets cuDNN to deterministic float32 algorithms (:func:`_exact_cuda`). Raises
    ConfigError when CUDA is asked for but unavailable, or for an unknown spec.
    """
    if isinstance(spec, torch.device):
        dev = spec
    else:
        s = str(spec).strip().lower()
        if s == "auto":
            return _exact_cuda(torch.device("cuda")) if torch.cuda.is_available() else torch.device("cpu")
        try:
            dev = torch.device(s)
        except RuntimeError as e:
            raise ConfigError(f"unknown device {spec!r}; use 'auto', 'cpu' or 'cuda[:N]'") from e
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {spec!r} requested but CUDA is not available here; use 'cpu' or 'auto'")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"device {spec!r} requested but only {torch.cuda.device_count()} GPU(s) exist")
        return _exact_cuda(dev)
    if dev.type not in ("cpu", "mps"):
        raise ConfigError(f"unsupported device {spec!r}; use 'auto', 'cpu' or 'cuda[:N]'")
    return dev


def _exact_cuda(dev: torch.device) -> torch.device:
    """Deterministic cuDNN algorithms in full float32 for everything panning runs on CUDA.

    The project's rule is that one seed gives the same masks, bit for bit, on one machine; cuDNN's
    autotuner and some of its convolution weight-gradient algorithms are not deterministic, and its
    convolutions default to TF32, which would make CUDA scores and proxies differ from the float32
    the indices are defined in by far more than rounding. Matrix products stay float32 (PyTorch's default).
    """
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.allow_tf32 = False
    return dev


def lr_factor(cfg: TrainConfig, step: int, steps_per_epoch: int) -> float:
    """Multiplier of ``cfg.lr`` for optimiser step ``step`` (0-based) of a run."""
    total = max(1, cfg.epochs * steps_per_epoch)
    warm = min(cfg.warmup_epochs * steps_per_epoch, total)
    if step < warm:
        return (step + 1) / warm
    if cfg.schedule == "cosine":
        progress = (step - warm) / max(1, total - warm)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    if cfg.schedule == "step":
        epoch = step // max(1, steps_per_epoch)
        return cfg.gamma ** sum(epoch >= m for m in cfg.milestones)
    return 1.0


def _as_device(device: str | torch.device) -> torch.device:
    return device if isinstance(device, torch.device) else resolve_device(device)


@contextlib.contextmanager
def cpu_channels_last(model: nn.Module, device: torch.device, example: torch.Tensor | None) -> Iterator[bool]:
    """Run the model's 2-D convolutions in the channels_last layout for training on the CPU; yields
    whether it did (then feed 4-D inputs as channels_last too).

    oneDNN's convolutions are faster on NHWC tensors: a masked SGD step is about 1.4x faster on
    LeNet-5 (benchmarks/bench_train_step.py, BENCHMARKS.md). Results differ from NCHW only by float
    rounding and stay the same run to run. Only ``nn.Conv2d`` weights in the NCHW layout are
    converted (Parameters keep their identity, so optimisers and hooks stay attached), and on exit
    they are converted back. Left alone (yields False): CUDA devices (not measured here), models
    without Conv2d, 4-D ``example`` missing, torch's swap-on-conversion mode (which would drop
    hooks registered on the parameters), and models whose forward fails on channels_last
    activations (a ``.view`` after a convolution), found by a no-grad eval-mode probe on
    ``example[:2]``.
    """
    convs = [m for m in model.modules()
             if isinstance(m, nn.Conv2d) and m.weight.dim() == 4 and m.weight.is_contiguous()]
    if (device.type != "cpu" or not convs or example is None or example.dim() != 4
            or torch.__future__.get_swap_module_params_on_conversion()):
        yield False
        return
    for m in convs:
        m.to(memory_format=torch.channels_last)
    try:
        ok = True
        try:
            with torch.no_grad(), preserved_modes(model):
                model.eval()  # no BatchNorm statistics updated, no dropout randomness consumed
                model(example[:2].contiguous(memory_format=torch.channels_last))
        except RuntimeError:
            ok = False
            for m in convs:
                m.to(memory_format=torch.contiguous_format)
        yield ok
    finally:
        for m in convs:
            m.to(memory_format=torch.contiguous_format)


class SGDSettings(Protocol):
    """What the optimiser needs of a training config (:class:`TrainConfig`, the proxy's settings)."""

    @property
    def lr(self) -> float: ...

    @property
    def momentum(self) -> float: ...

    @property
    def weight_decay(self) -> float: ...

    @property
    def nesterov(self) -> bool: ...


Batch = tuple[torch.Tensor, torch.Tensor]
#: ``(inputs, targets) -> (mean loss, outputs)`` of one step; for N stacked networks the sum of their losses
LossFn = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def masked_sgd_steps(
    params: Mapping[str, torch.Tensor],
    masks: Mapping[str, torch.Tensor] | None,
    settings: SGDSettings,
    batches: Iterable[Batch],
    loss_fn: LossFn,
    lr_at: Callable[[int], float],
    *,
    on_step: Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], None] | None = None,
) -> int:
    """The one masked-SGD loop of the project: full training, the proxy and the batched proxy run it.

    ``torch.optim.SGD`` (momentum, weight decay, Nesterov from ``settings``) over the leaf tensors
    ``params``: one network's parameters, or N networks' stacked along a leading axis (SGD is
    elementwise, so stacking changes nothing per network). ``masks[k]`` holds the pruned entries of
    ``params[k]`` at exactly zero throughout (:func:`panning.masks.enforce_tensors`: zeroed weights
    at the start, zeroed gradients at every step). Step ``i`` (counted from 0 over ``batches``)
    uses learning rate ``lr_at(i)``; ``on_step(i, x, y, outputs, loss)`` sees each step after the
    update (loss detached). Returns the number of steps taken. Seeding, the data order and the layout
    are the caller's: they come with ``batches`` and ``loss_fn``.
    """
    from panning.masks import enforce_tensors

    opt = torch.optim.SGD(list(params.values()), lr=settings.lr, momentum=settings.momentum,
                          weight_decay=settings.weight_decay, nesterov=settings.nesterov)
    # Gradient hooks alone keep pruned entries exactly 0 here: with a zero weight and a zero gradient,
    # SGD's weight decay, momentum and Nesterov terms are all exactly 0. The step guard of enforce()
    # (re-zeroing weights and momentum after each step) protects updates that bypass the gradient,
    # which this loop never makes; it cost a third of a batched MLP proxy step.
    handle = enforce_tensors(params, masks) if masks else None
    steps = 0
    try:
        for i, (x, y) in enumerate(batches):
            lr = lr_at(i)
            for group in opt.param_groups:
                group["lr"] = lr
            loss, out = loss_fn(x, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            steps += 1
            if on_step is not None:
                on_step(i, x, y, out, loss.detach())
    finally:
        if handle is not None:
            handle.remove()
    return steps


@torch.no_grad()
def evaluate(
    model: nn.Module,
    dataset: Dataset,
    device: str | torch.device,
    num_classes: int,
    batch_size: int = 1000,
) -> dict[str, Any]:
    """Accuracy, mean cross-entropy loss and per-class recall of ``model`` on ``dataset``.

    The model is moved to ``device`` and evaluated in eval mode; its train/eval mode is restored.
    Recall of a class absent from ``dataset`` is NaN. Raises ValueError on an empty data set.
    """
    n = len(dataset)  # type: ignore[arg-type]
    if n == 0:
        raise DataError("cannot evaluate on an empty data set")
    dev = _as_device(device)
    model.to(dev)
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), device=dev, dtype=torch.float64)
    hits = torch.zeros(num_classes, device=dev, dtype=torch.long)
    counts = torch.zeros(num_classes, device=dev, dtype=torch.long)
    try:
        for x, y in make_loader(dataset, batch_size, shuffle=False, device=dev):
            out = model(x)
            loss_sum += F.cross_entropy(out, y, reduction="sum").double()
            counts += torch.bincount(y, minlength=num_classes)[:num_classes]
            hits += torch.bincount(y[out.argmax(1) == y], minlength=num_classes)[:num_classes]
    finally:
        model.train(was_training)
    counts_c, hits_c = counts.cpu(), hits.cpu()
    recall = [float(h) / float(c) if c > 0 else float("nan")
              for h, c in zip(hits_c.tolist(), counts_c.tolist(), strict=True)]
    return {
        "accuracy": float(hits_c.sum()) / n,
        "loss": float(loss_sum) / n,
        "per_class_recall": recall,
        "n": n,
    }


def _lr_at(cfg: TrainConfig, first: int, steps_per_epoch: int, i: int) -> float:
    """Learning rate of step ``i`` of an epoch that starts at overall step ``first``."""
    return cfg.lr * lr_factor(cfg, first + i, steps_per_epoch)


class _Tally:
    """Per-epoch training loss and accuracy, summed on the device (no per-step host sync)."""

    def __init__(self, dev: torch.device, bar: Any) -> None:
        self.loss_sum = torch.zeros((), device=dev)
        self.correct = torch.zeros((), device=dev, dtype=torch.long)
        self.seen = 0
        self.bar = bar

    def __call__(self, i: int, x: torch.Tensor, y: torch.Tensor, out: torch.Tensor, loss: torch.Tensor) -> None:
        self.loss_sum += loss * y.shape[0]
        self.correct += (out.detach().argmax(1) == y).sum()
        self.seen += y.shape[0]
        self.bar.update(1)


def train_masked(
    model: nn.Module,
    masks: Masks | None,
    bundle: DataBundle,
    cfg: TrainConfig,
    *,
    device: str | torch.device = "auto",
    seed: int = 0,
    writer: Any | None = None,
    progress: bool | None = None,
) -> dict[str, Any]:
    """Train ``model`` in place on ``bundle.train`` under ``masks`` (None = dense); validate each epoch.

    Pruned weights are zero at the start and stay exactly zero (:func:`masked_sgd_steps`; its hooks
    are removed at the end). ``writer`` (a ``torch.utils.tensorboard.SummaryWriter``) receives per-epoch
    scalars train/loss, train/accuracy, val/loss, val/accuracy, lr and sparsity. ``progress`` shows a
    tqdm bar (None: only when stderr is a terminal). Training stops early if the loss turns
    non-finite (``diverged``).

    Returns a history dict: ``epochs`` (a list of per-epoch dicts: epoch, train_loss, train_accuracy,
    val_loss, val_accuracy, lr, seconds), ``final_val`` (``evaluate`` on ``bundle.val``, None if the
    split is empty), ``seconds``, ``steps``, ``diverged``, ``sparsity`` and ``config``.
    """
    from tqdm.auto import tqdm

    dev = _as_device(device)
    model.to(dev)
    sparsity = 0.0
    mask_map: dict[str, torch.Tensor] | None = None
    if masks is not None:
        masks = masks.to(dev)
        masks.check(model)
        mask_map = dict(masks.items())
        sparsity = float(masks.sparsity)
    params = dict(model.named_parameters())

    loader = make_loader(bundle.train, cfg.batch_size, shuffle=True, seed=seed,
                         augment=bool(bundle.augment and cfg.augment), device=dev)
    steps_per_epoch = len(loader)
    if cfg.max_steps_per_epoch is not None:
        steps_per_epoch = min(steps_per_epoch, cfg.max_steps_per_epoch)
    has_val = len(bundle.val) > 0  # type: ignore[arg-type]
    if progress is None:
        progress = sys.stderr.isatty()

    epochs: list[dict[str, Any]] = []
    diverged = False
    steps = 0
    t_start = time.perf_counter()
    bar = tqdm(total=cfg.epochs * steps_per_epoch, desc="train", unit="step", disable=not progress, leave=False)
    layout = contextlib.ExitStack()
    try:
        nhwc = layout.enter_context(cpu_channels_last(model, dev, loader.x))

        def loss_fn(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            if nhwc and x.dim() == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            out = model(x)
            return F.cross_entropy(out, y), out

        # Forked RNG: dropout etc. are seeded by ``seed`` and the caller's RNG stream is not consumed.
        with seeded(seed, dev):
            for epoch in range(1, cfg.epochs + 1):
                t0 = time.perf_counter()
                lr_now = cfg.lr * lr_factor(cfg, steps, steps_per_epoch)
                model.train()
                # Sums stay on the device: no per-step host sync.
                tally = _Tally(dev, bar)
                first = steps
                steps += masked_sgd_steps(
                    params, mask_map, cfg, itertools.islice(loader, steps_per_epoch), loss_fn,
                    functools.partial(_lr_at, cfg, first, steps_per_epoch), on_step=tally)
                loss_sum, correct, seen = tally.loss_sum, tally.correct, tally.seen
                train_loss = float(loss_sum) / max(1, seen)
                train_acc = float(correct) / max(1, seen)
                record: dict[str, Any] = {
                    "epoch": epoch, "train_loss": train_loss, "train_accuracy": train_acc, "lr": lr_now,
                }
                if not math.isfinite(train_loss):
                    diverged = True
                if has_val and not diverged:
                    val = evaluate(model, bundle.val, dev, bundle.num_classes)
                    record["val_loss"], record["val_accuracy"] = val["loss"], val["accuracy"]
                else:
                    record["val_loss"], record["val_accuracy"] = float("nan"), float("nan")
                record["seconds"] = time.perf_counter() - t0
                epochs.append(record)
                bar.set_postfix(epoch=epoch, loss=f"{train_loss:.3f}", val_acc=f"{record['val_accuracy']:.3f}")
                if writer is not None:
                    for tag, key in (("train/loss", "train_loss"), ("train/accuracy", "train_accuracy"),
                                     ("val/loss", "val_loss"), ("val/accuracy", "val_accuracy"), ("lr", "lr")):
                        writer.add_scalar(tag, record[key], epoch)
                    writer.add_scalar("sparsity", sparsity, epoch)
                if diverged:
                    break
    finally:
        bar.close()
        layout.close()  # the convolutions back in the layout the caller gave
    if writer is not None:
        writer.flush()
    seconds = time.perf_counter() - t_start
    final_val = evaluate(model, bundle.val, dev, bundle.num_classes) if has_val else None
    return {
        "epochs": epochs,
        "final_val": final_val,
        "seconds": seconds,
        "steps": steps,
        "diverged": diverged,
        "sparsity": sparsity,
        "config": asdict(cfg),
    }
