"""Data sets by name, held as normalised in-memory tensors, with seeded splits and a fast batch loader.

Names (``available_datasets()``):

- ``digits``: scikit-learn's 8x8 digits (bundled, offline), flattened to (64,); pixels /16 then
  standardised with the mean/std of the train+val pool. scikit-learn gives no split, so a fixed
  stratified 25% test split (random_state 0, independent of ``seed``) is carved first.
- ``digits_image``: the same digits, splits and normalisation, as (1, 8, 8) images, for
  convolutional networks (ResNet-20 runs on them: 8 -> 4 -> 2 pixels over its three stages).
- ``mnist``, ``fashionmnist``: 28x28 grey images (1, 28, 28), normalised with mean/std
  0.1307/0.3081 and 0.2860/0.3530. Read from ``<data_dir>/MNIST/raw`` or
  ``<data_dir>/FashionMNIST/raw`` (torchvision's layout). torchvision 0.29 only accepts the
  *extracted* IDX files and extracts the ``.gz`` next to them, which fails on a read-only folder,
  so the IDX files are parsed here directly, compressed or not; torchvision is used to download.
- ``cifar10``, ``cifar100``: (3, 32, 32) through torchvision (``cifar-10-batches-py`` /
  ``cifar-100-python`` under ``data_dir``), per-channel normalisation; training batches get
  random-crop (pad 4) and horizontal-flip augmentation in ``make_loader``.

A validation split, stratified and seeded by ``seed``, is carved from the training set
(default: 10% for digits, 5000 images otherwise). Proxies and agents use ``val``; ``test`` is for
final reports only.
"""
from __future__ import annotations

import functools
import gzip
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, TensorDataset

from panning.errors import ConfigError, DataError

__all__ = [
    "DataError",
    "DataBundle",
    "InMemoryDataset",
    "DatasetSpec",
    "DATASETS",
    "available_datasets",
    "default_data_dir",
    "load_dataset",
    "balanced_batch",
    "make_loader",
    "TensorLoader",
    "dataset_labels",
]


class InMemoryDataset(TensorDataset):
    """``TensorDataset`` of (inputs, labels) with the value a black pixel takes after normalisation.

    ``fill`` (one value per channel, or None) is what random-crop padding uses, so padded borders
    look like the zero padding of the raw image, as torchvision's ``RandomCrop(padding=4)`` does.
    ``indices`` are the rows' positions in the original training (or test) set.
    """

    def __init__(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        fill: Sequence[float] | None = None,
        indices: torch.Tensor | None = None,
    ) -> None:
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"inputs and labels differ in length: {x.shape[0]} vs {y.shape[0]}")
        super().__init__(x, y.long())
        self.fill = tuple(float(f) for f in fill) if fill is not None else None
        # Positions of these rows in the set they were carved from (train/val splits), for audits.
        self.indices = indices if indices is not None else torch.arange(x.shape[0])

    @property
    def x(self) -> torch.Tensor:
        return self.tensors[0]

    @property
    def y(self) -> torch.Tensor:
        return self.tensors[1]

    def subset(self, indices: torch.Tensor | np.ndarray | Sequence[int]) -> InMemoryDataset:
        """A new in-memory data set holding the given rows (copied, so loaders can index it directly)."""
        idx = torch.as_tensor(np.asarray(indices), dtype=torch.long)
        return InMemoryDataset(self.x[idx], self.y[idx], self.fill, self.indices[idx])


@dataclass
class DataBundle:
    """Train / val / test splits of one data set plus what a model needs to know about it."""

    name: str
    train: Dataset
    val: Dataset
    test: Dataset
    num_classes: int
    input_shape: tuple[int, ...]
    augment: bool
    data_dir: Path | None = None
    mean: tuple[float, ...] = field(default=())
    std: tuple[float, ...] = field(default=())

    def summary(self) -> str:
        return (f"{self.name}: train {len(self.train)}, val {len(self.val)}, test {len(self.test)}, "  # type: ignore[arg-type]
                f"{self.num_classes} classes, input {self.input_shape}, augment={self.augment}")


@dataclass(frozen=True)
class DatasetSpec:
    """Registry entry: how to read a data set and what it looks like."""

    name: str
    num_classes: int
    input_shape: tuple[int, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: bool
    default_val: int | float
    needs_dir: bool
    # (data_dir, download) -> (x_train uint8/float, y_train, x_test, y_test) as numpy arrays
    reader: Callable[[Path | None, bool], tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]


# --------------------------------------------------------------------------- locations


def default_data_dir() -> Path:
    """``$PANNING_DATA`` if set, else ``$XDG_CACHE_HOME/panning`` (``~/.cache/panning``)."""
    env = os.environ.get("PANNING_DATA")
    if env:
        return Path(env).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache).expanduser() / "panning"


def _fix_hint(name: str, layout: str) -> str:
    return (f"Fix: set PANNING_DATA to the folder that holds {layout}, pass --data-dir (data_dir=...), "
            f"or add --download (download=True, needs internet) to fetch {name} there.")


# --------------------------------------------------------------------------- readers


def _read_idx(path: Path) -> np.ndarray:
    """Parse an IDX file (LeCun's MNIST format, big-endian header), gzip-compressed or not."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise DataError(f"cannot read {path}: {e}") from e
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise DataError(f"{path} is not an unsigned-byte IDX file (bad magic number)")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    offset = 4 + 4 * ndim
    expected = int(np.prod(dims))
    if len(data) - offset != expected:
        raise DataError(f"{path} is truncated or corrupt: header says {dims}, found {len(data) - offset} bytes")
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(dims)


_IDX_FILES = {
    "train_x": "train-images-idx3-ubyte",
    "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte",
    "test_y": "t10k-labels-idx1-ubyte",
}


def _find_idx(raw: Path, stem: str) -> Path | None:
    for cand in (raw / stem, raw / f"{stem}.gz"):
        if cand.is_file():
            return cand
    return None


@functools.lru_cache(maxsize=4)
def _read_mnist_like_cached(raw: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    # Cached because proxies and agents reload the same set many times; gunzip costs ~0.5 s.
    paths = {k: _find_idx(Path(raw), stem) for k, stem in _IDX_FILES.items()}
    arrays = {k: _read_idx(p) for k, p in paths.items() if p is not None}
    return arrays["train_x"], arrays["train_y"], arrays["test_x"], arrays["test_y"]


def _mnist_reader(folder: str, tv_class: str) -> Callable[[Path | None, bool], tuple]:
    def read(data_dir: Path | None, download: bool) -> tuple:
        assert data_dir is not None
        raw = data_dir / folder / "raw"
        missing = [s for s in _IDX_FILES.values() if _find_idx(raw, s) is None]
        if missing and download:
            import torchvision

            try:
                getattr(torchvision.datasets, tv_class)(str(data_dir), train=True, download=True)
            except Exception as e:  # network errors, read-only folders, checksum failures
                raise DataError(f"downloading {folder} into {data_dir} failed: {e}") from e
            missing = [s for s in _IDX_FILES.values() if _find_idx(raw, s) is None]
        if missing:
            raise DataError(
                f"{folder} not found: looked in {raw} for {', '.join(s + '[.gz]' for s in missing)}. "
                + _fix_hint(folder, f"{folder}/raw")
            )
        xtr, ytr, xte, yte = _read_mnist_like_cached(str(raw.resolve()))
        return xtr[:, None], ytr, xte[:, None], yte

    return read


def _cifar_reader(tv_class: str, folder: str) -> Callable[[Path | None, bool], tuple]:
    def read(data_dir: Path | None, download: bool) -> tuple:
        assert data_dir is not None
        if not (data_dir / folder).is_dir() and not download:
            raise DataError(
                f"{tv_class} not found: looked for {data_dir / folder} (torchvision's layout). "
                + _fix_hint(tv_class, folder)
            )
        import torchvision

        cls = getattr(torchvision.datasets, tv_class)
        try:
            if download:
                data_dir.mkdir(parents=True, exist_ok=True)
            train = cls(str(data_dir), train=True, download=download)
            test = cls(str(data_dir), train=False, download=download)
        except Exception as e:
            raise DataError(f"loading {tv_class} from {data_dir} failed: {e}. " + _fix_hint(tv_class, folder)) from e
        # torchvision keeps CIFAR as NHWC uint8; models want NCHW.
        return (train.data.transpose(0, 3, 1, 2), np.asarray(train.targets),
                test.data.transpose(0, 3, 1, 2), np.asarray(test.targets))

    return read


_DIGITS_TEST_FRACTION = 0.25
_DIGITS_TEST_SEED = 0  # fixed so the test split never depends on an experiment's seed


def _digits_reader(data_dir: Path | None, download: bool) -> tuple:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = (d.data.astype(np.float32) / 16.0)
    y = d.target.astype(np.int64)
    xtr, xte, ytr, yte = train_test_split(
        x, y, test_size=_DIGITS_TEST_FRACTION, stratify=y, random_state=_DIGITS_TEST_SEED
    )
    return xtr, ytr, xte, yte


def _digits_image_reader(data_dir: Path | None, download: bool) -> tuple:
    xtr, ytr, xte, yte = _digits_reader(data_dir, download)
    return xtr.reshape(-1, 1, 8, 8), ytr, xte.reshape(-1, 1, 8, 8), yte


_CIFAR10_MEAN, _CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
_CIFAR100_MEAN, _CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)

DATASETS: dict[str, DatasetSpec] = {
    # digits mean/std are computed from its train+val pool at load time (left empty here).
    "digits": DatasetSpec("digits", 10, (64,), (), (), False, 0.1, False, _digits_reader),
    "digitsimage": DatasetSpec("digits_image", 10, (1, 8, 8), (), (), False, 0.1, False, _digits_image_reader),
    "mnist": DatasetSpec("mnist", 10, (1, 28, 28), (0.1307,), (0.3081,), False, 5000, True,
                         _mnist_reader("MNIST", "MNIST")),
    "fashionmnist": DatasetSpec("fashionmnist", 10, (1, 28, 28), (0.2860,), (0.3530,), False, 5000, True,
                                _mnist_reader("FashionMNIST", "FashionMNIST")),
    "cifar10": DatasetSpec("cifar10", 10, (3, 32, 32), _CIFAR10_MEAN, _CIFAR10_STD, True, 5000, True,
                           _cifar_reader("CIFAR10", "cifar-10-batches-py")),
    "cifar100": DatasetSpec("cifar100", 100, (3, 32, 32), _CIFAR100_MEAN, _CIFAR100_STD, True, 5000, True,
                            _cifar_reader("CIFAR100", "cifar-100-python")),
}


def available_datasets() -> list[str]:
    """Registered data set names."""
    return sorted(spec.name for spec in DATASETS.values())


# --------------------------------------------------------------------------- loading


def _normalise(x: np.ndarray, mean: Sequence[float], std: Sequence[float], scale: float) -> torch.Tensor:
    # A fresh float32 copy: the cached IDX arrays are read-only and must stay untouched.
    t = torch.from_numpy(np.array(x, dtype=np.float32, copy=True))
    if scale != 1.0:
        t = t.div_(scale)
    if t.dim() == 4:
        m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    else:
        m = torch.tensor(mean, dtype=torch.float32)
        s = torch.tensor(std, dtype=torch.float32)
    return t.sub_(m).div_(s)


def _val_count(val_size: int | float, n: int) -> int:
    if isinstance(val_size, bool) or not isinstance(val_size, (int, float)):
        raise ConfigError(f"val_size must be an int count or a float fraction, got {val_size!r}")
    if isinstance(val_size, float):
        if not 0.0 <= val_size < 1.0:
            raise ConfigError(f"a fractional val_size must be in [0, 1), got {val_size}")
        return int(round(val_size * n))
    if not 0 <= val_size < n:
        raise ConfigError(f"val_size must be in [0, {n}) for a training set of {n}, got {val_size}")
    return int(val_size)


def _split_indices(y: np.ndarray, n_val: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    n = len(y)
    if n_val == 0:
        return np.arange(n), np.arange(0)
    from sklearn.model_selection import train_test_split

    classes = np.unique(y)
    stratify = y if (n_val >= len(classes) and n - n_val >= len(classes)) else None
    tr, va = train_test_split(np.arange(n), test_size=n_val, stratify=stratify, random_state=seed)
    return np.sort(tr), np.sort(va)


def load_dataset(
    name: str,
    data_dir: str | Path | None = None,
    download: bool = False,
    val_size: int | float | None = None,
    seed: int = 0,
) -> DataBundle:
    """Load data set ``name`` as normalised in-memory tensors split into train / val / test.

    ``data_dir`` defaults to ``default_data_dir()``. ``val_size`` is a count (int) or a fraction
    (float) of the training set; None takes the data set's default (10% digits, 5000 otherwise);
    0 gives an empty val split. The val split is stratified and seeded by ``seed``; the test split
    is the data set's own (digits: fixed 25%). Raises DataError when files are missing (saying
    where it looked and how to fix it) and ValueError for an unknown name.
    """
    key = str(name).strip().lower().replace("-", "").replace("_", "")
    if key not in DATASETS:
        raise ConfigError(f"unknown data set {name!r}; valid: {', '.join(available_datasets())}")
    spec = DATASETS[key]
    root: Path | None = None
    if spec.needs_dir:
        root = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
    xtr, ytr, xte, yte = spec.reader(root, bool(download))
    ytr = np.asarray(ytr, dtype=np.int64)
    yte = np.asarray(yte, dtype=np.int64)

    n_val = _val_count(spec.default_val if val_size is None else val_size, len(ytr))
    tr_idx, va_idx = _split_indices(ytr, n_val, seed)

    if key in ("digits", "digitsimage"):
        # Standardise with the train+val pool, which the fixed test split keeps constant across seeds.
        mean: tuple[float, ...] = (float(xtr.mean()),)
        std: tuple[float, ...] = (float(xtr.std()),)
        scale = 1.0
    else:
        mean, std = spec.mean, spec.std
        scale = 255.0
    fill = tuple(-m / s for m, s in zip(mean, std, strict=True)) if len(spec.input_shape) == 3 else None
    x_all = _normalise(xtr, mean, std, scale)
    y_all = torch.from_numpy(ytr)
    pool = InMemoryDataset(x_all, y_all, fill)
    train = pool.subset(tr_idx) if n_val else pool
    val = pool.subset(va_idx)
    test = InMemoryDataset(_normalise(xte, mean, std, scale), torch.from_numpy(yte), fill)
    return DataBundle(
        name=key, train=train, val=val, test=test, num_classes=spec.num_classes,
        input_shape=tuple(spec.input_shape), augment=spec.augment, data_dir=root, mean=tuple(mean), std=tuple(std),
    )


# --------------------------------------------------------------------------- batches


def _tensors(dataset: Dataset) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(x, y) tensors behind a TensorDataset or a Subset of one, else None."""
    from torch.utils.data import Subset

    if isinstance(dataset, TensorDataset) and len(dataset.tensors) >= 2:
        return dataset.tensors[0], dataset.tensors[1]
    if isinstance(dataset, Subset):
        inner = _tensors(dataset.dataset)
        if inner is not None:
            idx = torch.as_tensor(list(dataset.indices), dtype=torch.long)
            return inner[0][idx], inner[1][idx]
    return None


def dataset_labels(dataset: Dataset) -> torch.Tensor:
    """All labels of ``dataset`` as a long tensor (fast for tensor-backed sets, a full pass otherwise)."""
    t = _tensors(dataset)
    if t is not None:
        return t[1].long()
    return torch.as_tensor([int(dataset[i][1]) for i in range(len(dataset))], dtype=torch.long)  # type: ignore[arg-type]


def balanced_batch(
    dataset: Dataset, n_per_class: int, num_classes: int, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """``n_per_class`` examples of each of ``num_classes`` classes, drawn without replacement (seeded),
    returned in a seeded shuffled order as (inputs, labels). ValueError if a class has too few."""
    if n_per_class < 1:
        raise ConfigError(f"n_per_class must be >= 1, got {n_per_class}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    labels = dataset_labels(dataset)
    g = torch.Generator().manual_seed(seed)
    chosen = []
    for c in range(num_classes):
        idx = torch.nonzero(labels == c, as_tuple=False).flatten()
        if idx.numel() < n_per_class:
            raise DataError(f"class {c} has {idx.numel()} examples, fewer than n_per_class={n_per_class}")
        chosen.append(idx[torch.randperm(idx.numel(), generator=g)[:n_per_class]])
    order = torch.cat(chosen)
    order = order[torch.randperm(order.numel(), generator=g)]
    t = _tensors(dataset)
    if t is not None:
        return t[0][order].clone(), t[1][order].long().clone()
    items = [dataset[int(i)] for i in order]
    return torch.stack([torch.as_tensor(x) for x, _ in items]), torch.as_tensor([int(y) for _, y in items])


def augment_batch(
    x: torch.Tensor, generator: torch.Generator, padding: int = 4, fill: Sequence[float] | None = None
) -> torch.Tensor:
    """Random crop (pad ``padding``, crop back) and random horizontal flip of an NCHW batch, per sample.

    Random draws come from ``generator`` (CPU) so results do not depend on the device.
    """
    n, c, h, w = x.shape
    if fill is None:
        fill = (0.0,) * c
    padded = x.new_empty((n, c, h + 2 * padding, w + 2 * padding))
    padded.copy_(torch.as_tensor(fill, dtype=x.dtype, device=x.device).view(1, c, 1, 1).expand_as(padded))
    padded[:, :, padding:padding + h, padding:padding + w] = x
    dy = torch.randint(0, 2 * padding + 1, (n,), generator=generator).to(x.device)
    dx = torch.randint(0, 2 * padding + 1, (n,), generator=generator).to(x.device)
    flip = (torch.rand(n, generator=generator) < 0.5).to(x.device)
    ar_h = torch.arange(h, device=x.device)
    ar_w = torch.arange(w, device=x.device)
    rows = (dy[:, None] + ar_h[None, :])[:, None, :, None]
    cols = dx[:, None] + ar_w[None, :]
    # Flipping is a reversed column index, so crop and flip are one gather.
    cols = torch.where(flip[:, None], cols.flip(1), cols)[:, None, None, :]
    return padded[torch.arange(n, device=x.device)[:, None, None, None],
                  torch.arange(c, device=x.device)[None, :, None, None], rows, cols]


class TensorLoader:
    """Batches from in-memory tensors: one seeded permutation per pass, indexed on ``device``.

    Iterating again starts a new epoch with the next permutation of the same seeded stream, so a
    loader built with the same seed yields the same sequence of epochs.
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        shuffle: bool,
        seed: int = 0,
        augment: bool = False,
        device: torch.device | str | None = None,
        drop_last: bool = False,
    ) -> None:
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        t = _tensors(dataset)
        if t is None:
            # Anything else is materialised once; these sets are small enough to hold in memory.
            xs, ys = zip(*(dataset[i] for i in range(len(dataset))), strict=True)  # type: ignore[arg-type]
            t = (torch.stack([torch.as_tensor(v) for v in xs]), torch.as_tensor([int(v) for v in ys]))
        self.device = torch.device(device) if device is not None else t[0].device
        self.x = t[0].to(self.device)
        self.y = t[1].long().to(self.device)
        if augment and self.x.dim() != 4:
            raise ValueError(f"augmentation needs NCHW images, got inputs of shape {tuple(self.x.shape)}")
        self.batch_size = int(batch_size)
        self.shuffle = shuffle
        self.augment = augment
        self.drop_last = drop_last
        self.fill = getattr(dataset, "fill", None)
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        n = self.x.shape[0]
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = self.x.shape[0]
        if self.shuffle:
            order = torch.randperm(n, generator=self.generator).to(self.device)
        else:
            order = None
        for b in range(len(self)):
            lo, hi = b * self.batch_size, min((b + 1) * self.batch_size, n)
            if order is None:
                xb, yb = self.x[lo:hi], self.y[lo:hi]
            else:
                idx = order[lo:hi]
                xb, yb = self.x[idx], self.y[idx]
            if self.augment:
                xb = augment_batch(xb, self.generator, 4, self.fill)
            yield xb, yb


def make_loader(
    dataset: Dataset,
    batch_size: int,
    shuffle: bool,
    seed: int = 0,
    augment: bool = False,
    device: torch.device | str | None = None,
    drop_last: bool = False,
) -> TensorLoader:
    """Seeded batch iterator over ``dataset`` (see ``TensorLoader``); the data are moved to ``device``
    once. ``augment`` applies random crop (pad 4) and horizontal flip to image batches."""
    return TensorLoader(dataset, batch_size, shuffle, seed, augment, device, drop_last)
