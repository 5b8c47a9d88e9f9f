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
import dataclasses
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from panning._functional import one_read, preserved_modes, seeded
from panning._sparse import SPARSE_MODELS, SparseMLPStack
from panning._sparse import supports as sparse_supports
from panning.data import DataBundle, make_loader
from panning.errors import ConfigError, DataError
from panning.hashing import pair_digests
from panning.masks import Masks
from panning.train import cpu_channels_last, masked_sgd_steps, resolve_device

__all__ = ["SPARSE_MODELS", "ProxyEvaluator", "ProxyResult", "ProxySettings", "fold_of"]

#: validation rows evaluated at once, per candidate (what the memory probe of a stacked chunk also measures)
EVAL_CHUNK = 2048

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
    pass); the learning rate follows ``schedule`` ("cosine" to 0, or "constant") over those steps.

    ``folds`` > 1 makes it a K-fold proxy: the training and validation splits are pooled and dealt,
    class by class, into ``folds`` folds (seeded by ``seed``); the candidate is trained once per fold on
    the other folds and scored on that one, and accuracy and loss are pooled over every example of the
    pool, each validating once. It costs ``folds`` short trainings; what it buys is the resolution of a
    validation split as large as the whole pool (digits: 1 347 images, 0.074 point each, where a
    250-image split gives 0.4) and an average over ``folds`` training runs. ``steps`` is each fold's
    budget (what :attr:`ProxyResult.steps` reports).

    ``sparse`` trains panning's MLP (``mlp``, ``lenet300``) as sparse matrices of its kept weights
    (:mod:`panning._sparse`): the same arithmetic up to float rounding, and at the agent's sparsities
    (98-99.8%) several times faster than dense matrix products on the CPU (BENCHMARKS.md). Its
    results are its own: a mask's accuracy may differ from the dense route's by rounding, so it is a
    setting of the proxy (and of its cache key), off by default.
    """

    steps: int = 200
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = False
    schedule: str = "cosine"
    seed: int = 0
    folds: int = 1
    sparse: bool = False

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
        if isinstance(self.folds, bool) or not isinstance(self.folds, int) or self.folds < 1:
            problems.append(f"folds must be an int >= 1 (1: one validation split), got {self.folds!r}")
        if not isinstance(self.sparse, bool):
            problems.append(f"sparse must be true or false, got {self.sparse!r}")
        if problems:
            raise ConfigError("bad proxy settings: " + "; ".join(problems))


def _split_tensors(dataset: Dataset, what: str) -> tuple[Tensor, Tensor]:
    if len(dataset) == 0:  # type: ignore[arg-type]
        raise DataError(f"the {what} split is empty; the proxy needs training and validation data")
    loader = make_loader(dataset, 1, shuffle=False)  # materialises (x, y) tensors once
    return loader.x, loader.y


@dataclass(frozen=True)
class _Split:
    """One training/validation split of the proxy. ``rows`` (K-fold proxies): the rows of ``xtr``/``ytr``,
    the whole pool, that this split trains on; the pool is then held once for all folds."""

    xtr: Tensor
    ytr: Tensor
    xva: Tensor
    yva: Tensor
    rows: Tensor | None = None

    @property
    def n_train(self) -> int:
        return int(self.rows.shape[0] if self.rows is not None else self.xtr.shape[0])


def fold_of(y: Tensor, folds: int, seed: int) -> Tensor:
    """The fold (0..folds-1) of every example: each class's examples in a seeded random order, dealt
    round-robin, continuing where the previous class stopped, so every fold has each class's share
    and the fold sizes differ by at most one."""
    g = torch.Generator().manual_seed(seed)
    y = y.cpu()
    out = torch.empty(y.shape[0], dtype=torch.long)
    start = 0
    for c in torch.unique(y, sorted=True).tolist():
        idx = (y == c).nonzero().flatten()
        idx = idx[torch.randperm(idx.shape[0], generator=g)]
        out[idx] = (torch.arange(idx.shape[0]) + start) % folds
        start += idx.shape[0]
    return out


class ProxyEvaluator:
    """Short-budget training of a masked network, scored on the validation split, cached by mask.

    ``model`` says how to rebuild the architecture when :meth:`evaluate` is given a state dict
    instead of a module: a registered model name (built with ``panning.models.build_model`` for
    the bundle's classes and input shape) or a zero-argument factory. It is not needed when a
    module is passed. ``steps`` is the budget in SGD steps; ``epochs`` (a float) may be given
    instead and is converted to ``ceil(epochs * n_train / batch_size)`` steps. ``settings`` (a
    :class:`ProxySettings`) gives every training setting at once, in place of the keywords. ``folds``
    > 1: a K-fold proxy over the training and validation splits pooled; ``sparse``: the sparse route for
    panning's MLPs (both :class:`ProxySettings`).
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
        max_candidates: int | None = None,
        stacked: bool | str = "auto",
        folds: int = 1,
        sparse: bool = False,
    ) -> None:
        xtr, ytr = _split_tensors(bundle.train, "training")
        # Only train and val are kept: the reward can never reach the test split through us.
        xva, yva = _split_tensors(bundle.val, "validation")
        if settings is not None:
            steps, batch_size, lr, momentum = settings.steps, settings.batch_size, settings.lr, settings.momentum
            weight_decay, nesterov, schedule, seed = (settings.weight_decay, settings.nesterov, settings.schedule,
                                                      settings.seed)
            folds, sparse = settings.folds, settings.sparse
        if steps is not None and epochs is not None:
            raise ValueError("give the proxy budget as steps or as epochs, not both")
        if epochs is not None:
            if not (isinstance(epochs, (int, float)) and epochs > 0 and math.isfinite(epochs)):
                raise ConfigError(f"epochs must be a positive number, got {epochs!r}")
            if isinstance(batch_size, int) and batch_size >= 1:
                n = xtr.shape[0]
                if isinstance(folds, int) and folds > 1:  # a fold trains on all folds but one
                    n = (n + xva.shape[0]) * (folds - 1) // folds
                steps = max(1, math.ceil(float(epochs) * n / min(batch_size, n)))
        self.settings = ProxySettings(
            steps=200 if steps is None else steps, batch_size=batch_size, lr=float(lr), momentum=float(momentum),
            weight_decay=float(weight_decay), nesterov=bool(nesterov), schedule=schedule, seed=int(seed),
            folds=folds, sparse=sparse,
        )
        if cache_size < 0:
            raise ValueError(f"cache_size must be >= 0, got {cache_size}")
        self.device = resolve_device(device)
        self.num_classes = int(bundle.num_classes)
        self.input_shape = tuple(bundle.input_shape)
        self._model_spec = model
        self._splits = self._make_splits(xtr, ytr, xva, yva)
        self.cache_size = int(cache_size)
        if max_candidates is not None and max_candidates < 1:
            raise ConfigError(f"max_candidates must be >= 1, got {max_candidates}")
        self.max_candidates = max_candidates
        self._oom_cap: int | None = None  # half of a chunk that ran out of device memory (evaluate_many)
        if stacked not in (True, False, "auto"):
            raise ConfigError(f"stacked must be True, False or 'auto', got {stacked!r}")
        self.stacked = stacked
        self._bytes_per_candidate: int | None = None
        self._cache: OrderedDict[tuple, ProxyResult] = OrderedDict()
        self.hits = 0
        self.misses = 0

    @property
    def steps(self) -> int:
        """The training budget in SGD steps."""
        return self.settings.steps

    def _make_splits(self, xtr: Tensor, ytr: Tensor, xva: Tensor, yva: Tensor) -> list[_Split]:
        k = self.settings.folds
        if k == 1:
            return [_Split(xtr.to(self.device), ytr.to(self.device), xva.to(self.device), yva.to(self.device))]
        x, y = torch.cat([xtr, xva]), torch.cat([ytr, yva])
        if x.shape[0] < 2 * k:
            raise ConfigError(f"folds={k} needs at least {2 * k} training and validation examples, got {x.shape[0]}")
        fold = fold_of(y, k, self.settings.seed).to(self.device)
        xd, yd = x.to(self.device), y.to(self.device)
        return [_Split(xd, yd, xd[fold == j], yd[fold == j], rows=(fold != j).nonzero().flatten()) for j in range(k)]

    @property
    def val_size(self) -> int:
        """The number of validation examples the accuracy is pooled over (with K folds: the whole pool)."""
        return sum(int(sp.xva.shape[0]) for sp in self._splits)

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

    def lr_at(self, step: int) -> float:
        """Learning rate of SGD step ``step`` (from 0): cosine from ``lr`` to 0 over the budget, or constant."""
        s = self.settings
        if s.schedule == "cosine":
            return 0.5 * s.lr * (1.0 + math.cos(math.pi * step / s.steps))
        return s.lr

    def batches(self, split: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
        """The training batches of the budget, in the seeded order every candidate sees (on fold ``split``'s
        training rows for a K-fold proxy)."""
        sp = self._splits[split]
        for idx in self._order(sp.n_train):
            if sp.rows is not None:
                idx = sp.rows[idx]
            yield sp.xtr[idx], sp.ytr[idx]

    def train(self, init: nn.Module | Mapping[str, Tensor], masks: Masks, split: int = 0) -> nn.Module:
        """A trained copy of the masked network (pruned weights exactly zero); ``init`` is untouched.
        ``split``: which fold's training rows, for a K-fold proxy."""
        s = self.settings
        net = self._fresh(init).to(self.device)
        if s.sparse:
            net.load_state_dict(self._train_sparse([init], [masks], split).dense_state(0))  # an MLP has no buffers
            return net
        masks = masks if isinstance(masks, Masks) else Masks(dict(masks))
        masks.check(net)
        masks = masks.to(self.device)
        net.train()
        # the trained copy comes back in the usual layout: callers may score or save it
        example = self._splits[split].xtr
        with cpu_channels_last(net, self.device, example) as nhwc, seeded(s.seed, self.device):  # dropout etc.

            def loss_fn(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
                if nhwc and x.dim() == 4:
                    x = x.contiguous(memory_format=torch.channels_last)
                out = net(x)
                return F.cross_entropy(out, y), out

            masked_sgd_steps(dict(net.named_parameters()), dict(masks.items()), s, self.batches(split), loss_fn,
                             self.lr_at)
        return net

    # ----------------------------------------------------------------------------- N at once

    def _candidates(self, inits: Sequence[nn.Module | Mapping[str, Tensor]],
                    masks_list: Sequence[Masks | Mapping[str, Tensor]]) -> tuple[list[nn.Module], list[Masks]]:
        """Fresh copies of N initialisations on the device and their masks, checked: one architecture, each
        mask fitting its network."""
        nets = [self._fresh(i).to(self.device) for i in inits]
        shapes = {k: v.shape for k, v in nets[0].state_dict().items()}
        for net in nets[1:]:
            if {k: v.shape for k, v in net.state_dict().items()} != shapes:
                raise ValueError("evaluate_many trains candidates of one architecture; got different state shapes")
        masks = [m if isinstance(m, Masks) else Masks(dict(m)) for m in masks_list]
        for net, m in zip(nets, masks, strict=True):
            m.check(net)
        return nets, masks

    def _stack(self, inits: Sequence[nn.Module | Mapping[str, Tensor]],
               masks_list: Sequence[Masks | Mapping[str, Tensor]]) -> tuple[nn.Module, dict, dict, dict]:
        """(template module, stacked parameters, stacked buffers, stacked masks) of N candidates."""
        nets, masks = self._candidates(inits, masks_list)
        template = nets[0]
        named = [dict(n.named_parameters()) for n in nets]
        params = {k: torch.stack([p[k].detach() for p in named]).requires_grad_(True) for k in named[0]}
        bufs = [dict(n.named_buffers()) for n in nets]
        buffers = {k: torch.stack([b[k].detach() for b in bufs]).clone() for k in bufs[0]}
        stacked_masks = {k: torch.stack([m[k].to(self.device) for m in masks]) for k in masks[0]}
        return template, params, buffers, stacked_masks

    def train_many(self, inits: Sequence[nn.Module | Mapping[str, Tensor]],
                   masks_list: Sequence[Masks | Mapping[str, Tensor]], split: int = 0) -> tuple[nn.Module, dict, dict]:
        """Train N candidates (an initialisation and masks each) of one architecture as one stacked
        computation: ``torch.func.functional_call`` + ``vmap`` over parameters and buffers stacked along
        a leading axis, through the same :func:`panning.train.masked_sgd_steps` (pruned weights exactly
        zero), data order, learning rates and seed as :meth:`train`. BatchNorm keeps running statistics
        per candidate. Returns (template module, trained stacked parameters, stacked buffers)."""
        from torch.func import functional_call, vmap

        s = self.settings
        if s.sparse:  # a dense result from a sparse evaluator would be a silent change of reward
            raise ValueError("train_many is the dense stacked route; a sparse evaluator trains through evaluate_many")
        template, params, buffers, masks = self._stack(inits, masks_list)
        template.train()

        def forward(p: dict, b: dict, x: Tensor) -> Tensor:
            return functional_call(template, (p, b), (x,))

        batched = vmap(forward, in_dims=(0, 0, None), randomness="same")

        def loss_fn(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
            out = batched(params, buffers, x)  # (N, batch, classes)
            n, b, c = out.shape
            per = F.cross_entropy(out.reshape(n * b, c), y.repeat(n), reduction="none").view(n, b).mean(1)
            return per.sum(), out  # candidates are independent: each gets the gradient of its own mean loss

        with seeded(s.seed, self.device):
            masked_sgd_steps(params, masks, s, self.batches(split), loss_fn, self.lr_at)
        return template, {k: v.detach() for k, v in params.items()}, buffers

    @torch.no_grad()
    def _sums_many(self, template: nn.Module, params: dict, buffers: dict, split: int,
                   chunk: int = EVAL_CHUNK) -> tuple[Tensor, Tensor]:
        """(correct predictions, summed float64 cross-entropy) on split ``split``'s validation rows, per
        stacked candidate, eval mode; left on the device."""
        from torch.func import functional_call, vmap

        sp = self._splits[split]
        was = template.training
        template.eval()
        n_cand = next(iter(params.values())).shape[0]
        correct = torch.zeros(n_cand, device=self.device, dtype=torch.long)
        loss = torch.zeros(n_cand, device=self.device, dtype=torch.float64)
        batched = vmap(lambda p, b, x: functional_call(template, (p, b), (x,)), in_dims=(0, 0, None))
        try:
            for lo in range(0, sp.xva.shape[0], chunk):
                out = batched(params, buffers, sp.xva[lo : lo + chunk])
                y = sp.yva[lo : lo + chunk]
                correct += (out.argmax(2) == y).sum(1)
                n, b, c = out.shape
                loss += F.cross_entropy(out.double().reshape(n * b, c), y.repeat(n), reduction="none").view(n, b).sum(1)
        finally:
            template.train(was)
        return correct, loss

    def score_many(self, template: nn.Module, params: dict, buffers: dict,
                   chunk: int = EVAL_CHUNK, split: int = 0) -> list[tuple[float, float]]:
        """(accuracy, mean cross-entropy) on the validation split (fold ``split``'s) of each of N stacked
        candidates, eval mode."""
        if self.settings.sparse:
            raise ValueError("score_many scores the dense stacked route; a sparse evaluator scores through "
                             "evaluate_many")
        correct, loss = self._sums_many(template, params, buffers, split, chunk)
        n = self._splits[split].xva.shape[0]
        return [(float(c) / n, float(v) / n) for c, v in zip(correct.cpu(), loss.cpu(), strict=True)]

    def _train_sparse(self, inits: Sequence[nn.Module | Mapping[str, Tensor]],
                      masks_list: Sequence[Masks | Mapping[str, Tensor]], split: int = 0) -> SparseMLPStack:
        """:meth:`train_many` by the sparse route (``settings.sparse``): the same SGD loop, data order and
        seed, over each layer's kept values (:class:`panning._sparse.SparseMLPStack`)."""
        s = self.settings
        nets, masks = self._candidates(inits, masks_list)
        for net in nets:
            if not sparse_supports(net):
                raise ConfigError(f"the sparse proxy (sparse: true) trains panning's MLP ({', '.join(SPARSE_MODELS)}) "
                                  f"only, not {type(net).__name__}; set sparse: false")
        stack = SparseMLPStack(nets, [dict(m.items()) for m in masks], self.device)

        def loss_fn(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
            out = stack.forward(x)  # (N, batch, classes)
            per = F.cross_entropy(out.transpose(1, 2), y.expand(stack.n, -1), reduction="none").mean(1)
            return per.sum(), out  # each candidate gets the gradient of its own mean loss

        with seeded(s.seed, self.device):
            masked_sgd_steps(stack.params, None, s, self.batches(split), loss_fn, self.lr_at)
        return stack

    @torch.no_grad()
    def _sums_sparse(self, stack: SparseMLPStack, split: int, chunk: int = EVAL_CHUNK) -> tuple[Tensor, Tensor]:
        """:meth:`_sums_many` for a sparse stack. Its own loop: the cross-entropy reads the stack's feature-major
        logits as they lie (``[N, classes, batch]``); :meth:`_sums_many`'s layout rounds the loss differently."""
        sp = self._splits[split]
        correct = torch.zeros(stack.n, device=self.device, dtype=torch.long)
        loss = torch.zeros(stack.n, device=self.device, dtype=torch.float64)
        for lo in range(0, sp.xva.shape[0], chunk):
            out = stack.forward(sp.xva[lo : lo + chunk])
            y = sp.yva[lo : lo + chunk]
            correct += (out.argmax(2) == y).sum(1)
            loss += F.cross_entropy(out.double().transpose(1, 2), y.expand(stack.n, -1), reduction="none").sum(1)
        return correct, loss

    def chunk_size(self, example: nn.Module | Mapping[str, Tensor] | None = None) -> int:
        """How many candidates :meth:`evaluate_many` trains at once: ``max_candidates`` if set; on CUDA
        what 70% of the free memory holds, measured per candidate (a one-candidate probe step of
        ``example`` and a validation pass); on the CPU 64. At most half a chunk that ran out of memory."""
        size = self._chunk_size(example)
        return size if self._oom_cap is None else min(size, self._oom_cap)

    def _chunk_size(self, example: nn.Module | Mapping[str, Tensor] | None) -> int:
        if self.max_candidates is not None:
            return self.max_candidates
        if self.device.type != "cuda" or example is None:
            return 64
        if self._bytes_per_candidate is None:
            torch.cuda.synchronize(self.device)
            base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            template, params, buffers, masks = self._stack([example], [Masks.ones(self._fresh(example))])
            x, y = next(self.batches())
            from torch.func import functional_call, vmap

            fwd = vmap(lambda p, b, x: functional_call(template, (p, b), (x,)), in_dims=(0, 0, None))
            out = fwd(params, buffers, x)
            F.cross_entropy(out[0], y).backward()
            with torch.no_grad(), preserved_modes(template):  # a validation chunk's activations on top
                template.eval()
                fwd(params, buffers, self._splits[0].xva[:EVAL_CHUNK])
            # parameters, buffers and masks resident, plus gradients, momentum and activations at the peak
            self._bytes_per_candidate = max(1, torch.cuda.max_memory_allocated(self.device) - base
                                            + sum(p.numel() * p.element_size() for p in params.values()))
            del template, params, buffers, masks, out
        free, _ = torch.cuda.mem_get_info(self.device)
        return max(1, int(0.7 * free // self._bytes_per_candidate))

    def stacks(self, example: nn.Module | Mapping[str, Tensor]) -> bool:
        """Whether :meth:`evaluate_many` trains this architecture stacked (``stacked``: True/False, or
        "auto"): on CUDA always; on the CPU only networks without convolutions, whose stacked form
        is batched matrix products (vmapped convolutions become grouped ones, 3x slower than one
        channels_last network at a time on the 2-core CPU: BENCHMARKS.md)."""
        if self.settings.sparse:
            return True  # block-diagonal sparse matrices: N candidates cost N times one, with one loop
        if self.stacked != "auto":
            return bool(self.stacked)
        if self.device.type == "cuda":
            return True
        net = example if isinstance(example, nn.Module) else self._fresh(example)
        return not any(isinstance(m, nn.modules.conv._ConvNd) for m in net.modules())

    def evaluate_many(self, inits: Sequence[nn.Module | Mapping[str, Tensor]],
                      masks_list: Sequence[Masks | Mapping[str, Tensor]]) -> list[ProxyResult]:
        """:meth:`evaluate` for N candidates of one architecture, trained together (:meth:`train_many`)
        in chunks of :meth:`chunk_size` where that is faster (:meth:`stacks`), else one at a time;
        cached results are not retrained, nor is a candidate given twice (the repeat counts as a cache hit).
        Accuracies agree with one-at-a-time :meth:`evaluate` up to float rounding (at most one validation
        example apart, up to training chaos: see the tests)."""
        if len(inits) != len(masks_list):
            raise ValueError(f"got {len(inits)} initialisations for {len(masks_list)} masks")
        results: list[ProxyResult | None] = [None] * len(inits)
        todo: list[tuple[int, tuple | None]] = []
        repeats: list[tuple[int, int]] = []  # (candidate, the earlier one in this call with its key)
        first: dict[tuple, int] = {}
        keys: list[tuple | None] = list(self.keys(inits, masks_list)) if self.cache_size else [None] * len(inits)
        for i, key in enumerate(keys):
            if key is not None and key in self._cache:
                results[i] = self._hit(key, 0.0)
            elif key is not None and key in first:  # trained once, a cache hit after, as one evaluate() each would
                repeats.append((i, first[key]))
            else:
                if key is not None:
                    first[key] = i
                todo.append((i, key))
        if todo and not self.stacks(inits[todo[0][0]]):  # one at a time is faster here (see stacks())
            t0 = time.perf_counter()
            sums = [self._trained_sums(inits[i], masks_list[i]) for i, _ in todo]
            values = one_read([v.double() for pair in sums for v in pair]).tolist()  # one read for all of them
            seconds = (time.perf_counter() - t0) / len(todo)
            for k, (i, key) in enumerate(todo):
                results[i] = self._recorded(key, values[2 * k], values[2 * k + 1], seconds)
            todo = []
        if todo:
            size, lo = self.chunk_size(inits[todo[0][0]]), 0
            while lo < len(todo):
                part = todo[lo : lo + size]
                t0 = time.perf_counter()
                try:
                    counts, losses = self._chunk_sums([inits[i] for i, _ in part], [masks_list[i] for i, _ in part])
                except torch.cuda.OutOfMemoryError:
                    # the measured size per candidate was too small for this chunk: half as many, once more
                    if size == 1:
                        raise
                    size = self._oom_cap = max(1, len(part) // 2)  # and in later calls (chunk_size)
                    torch.cuda.empty_cache()
                    continue
                seconds = (time.perf_counter() - t0) / len(part)
                for (i, key), (c, v) in zip(part, zip(counts, losses, strict=True), strict=True):
                    results[i] = self._recorded(key, c, v, seconds)
                lo += len(part)
        for i, j in repeats:
            done = results[j]
            assert done is not None
            results[i] = self._hit(done, 0.0)
        return [r for r in results if r is not None]

    def _chunk_sums(self, inits: Sequence[nn.Module | Mapping[str, Tensor]],
                    masks_list: Sequence[Masks | Mapping[str, Tensor]]) -> tuple[list[float], list[float]]:
        """(correct predictions, summed cross-entropy) per candidate of one chunk trained together, pooled over
        the folds, read back in one transfer (float64 holds every count exactly)."""
        sums = []
        for j in range(len(self._splits)):  # K-fold: every fold's training, pooled (one split otherwise)
            if self.settings.sparse:
                sums.append(self._sums_sparse(self._train_sparse(inits, masks_list, j), j))
            else:
                template, params, buffers = self.train_many(inits, masks_list, split=j)
                sums.append(self._sums_many(template, params, buffers, j))
        correct = torch.stack([c for c, _ in sums]).sum(0)
        loss_sum = torch.stack([v for _, v in sums]).sum(0)
        counts, losses = one_read([correct.double(), loss_sum.double()]).tolist()
        return counts, losses

    def _trained_sums(self, init: nn.Module | Mapping[str, Tensor], masks: Masks | Mapping[str, Tensor]
                      ) -> tuple[Tensor, Tensor]:
        """(correct predictions, summed cross-entropy) on the validation split of a copy of ``init`` trained under
        ``masks``, pooled over the folds (each fold's copy trained on the other folds); left on the device."""
        masks = masks if isinstance(masks, Masks) else Masks(dict(masks))
        sums = [self._sums(self.train(init, masks, split=j), j) for j in range(len(self._splits))]
        return torch.stack([c for c, _ in sums]).sum(), torch.stack([v for _, v in sums]).sum()

    def _hit(self, known: tuple | ProxyResult, seconds: float) -> ProxyResult:
        """A result not trained again, counted as a cache hit: the cache's under a key (now its most recent
        entry), or a result of the same call."""
        if not isinstance(known, ProxyResult):  # a cache key
            self._cache.move_to_end(known)
            known = self._cache[known]
        self.hits += 1
        return ProxyResult(known.accuracy, known.loss, seconds, True, known.steps)

    def _recorded(self, key: tuple | None, correct: float, loss_sum: float, seconds: float) -> ProxyResult:
        """The result of a candidate trained now, from its validation sums; counted and cached under ``key``."""
        self.misses += 1
        n = self.val_size
        loss = loss_sum / n
        result = ProxyResult(correct / n, loss if math.isfinite(loss) else float("inf"), seconds, False,
                             self.settings.steps)
        if key is not None:
            self._cache[key] = result
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return result

    @torch.no_grad()
    def _sums(self, net: nn.Module, split: int, chunk: int = EVAL_CHUNK) -> tuple[Tensor, Tensor]:
        """(correct predictions, summed float64 cross-entropy) of ``net`` on split ``split``'s validation
        rows, eval mode; 0-d tensors left on the device."""
        sp = self._splits[split]
        was = net.training
        net.eval()
        correct = torch.zeros((), device=self.device, dtype=torch.long)
        loss = torch.zeros((), device=self.device, dtype=torch.float64)
        try:
            for lo in range(0, sp.xva.shape[0], chunk):
                out = net(sp.xva[lo : lo + chunk])
                y = sp.yva[lo : lo + chunk]
                correct += (out.argmax(1) == y).sum()
                loss += F.cross_entropy(out.double(), y, reduction="sum")
        finally:
            net.train(was)
        return correct, loss

    def score(self, net: nn.Module, chunk: int = EVAL_CHUNK, split: int = 0) -> tuple[float, float]:
        """(accuracy, mean cross-entropy) of ``net`` on the validation split (fold ``split``'s), in eval mode."""
        correct, loss = self._sums(net, split, chunk)
        n = self._splits[split].xva.shape[0]
        return float(correct) / n, float(loss) / n

    def key(self, init: nn.Module | Mapping[str, Tensor], masks: Mapping[str, Tensor]) -> tuple:
        """Cache key: initial weights, mask bits and every training setting."""
        return self.keys([init], [masks])[0]

    def keys(self, inits: Sequence[nn.Module | Mapping[str, Tensor]], masks_list: Sequence[Mapping[str, Tensor]]
             ) -> list[tuple]:
        """``[self.key(i, m) for i, m in zip(inits, masks_list)]``, every tensor copied to the host together."""
        settings = tuple(sorted(asdict(self.settings).items()))
        return [(a, b, settings) for a, b in pair_digests(inits, masks_list)]

    def evaluate(self, init: nn.Module | Mapping[str, Tensor], masks: Masks) -> ProxyResult:
        """Train a copy of ``init`` under ``masks`` for the budget; accuracy and loss on the validation split
        (pooled over the folds of a K-fold proxy, each fold's copy trained on the other folds)."""
        t0 = time.perf_counter()
        if self.settings.sparse:  # one route for one and for many: a candidate scores the same either way
            r = self.evaluate_many([init], [masks])[0]
            return dataclasses.replace(r, seconds=time.perf_counter() - t0) if r.cached else r
        key = self.key(init, masks) if self.cache_size else None
        if key is not None and key in self._cache:
            return self._hit(key, time.perf_counter() - t0)
        correct, total = one_read([v.double() for v in self._trained_sums(init, masks)]).tolist()
        return self._recorded(key, correct, total, time.perf_counter() - t0)
