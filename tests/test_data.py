"""Data registry: splits, normalisation, file reading, errors, scoring batches and the batch loader."""
from __future__ import annotations

import gzip
import itertools
from pathlib import Path

import numpy as np
import pytest
import torch

from panning.data import (
    DataError,
    InMemoryDataset,
    augment_batch,
    available_datasets,
    balanced_batch,
    default_data_dir,
    load_dataset,
    make_loader,
)


def _write_idx(path: Path, arr: np.ndarray, compress: bool) -> None:
    header = bytes([0, 0, 0x08, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    data = header + arr.astype(np.uint8).tobytes()
    if compress:
        with gzip.open(path.with_name(path.name + ".gz"), "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


def _fake_mnist(root: Path, n_train: int = 200, n_test: int = 50, compress: bool = True) -> Path:
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)), compress)
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", np.arange(n) % 10, compress)
    return root


def test_registry():
    assert available_datasets() == ["cifar10", "cifar100", "digits", "digits_image", "fashionmnist", "mnist"]
    with pytest.raises(ValueError, match="digits"):
        load_dataset("svhn")


# --------------------------------------------------------------------------- digits


def test_digits_splits_and_normalisation():
    b = load_dataset("digits")
    assert (b.num_classes, b.input_shape, b.augment) == (10, (64,), False)
    assert (len(b.train), len(b.val), len(b.test)) == (1212, 135, 450)
    assert b.train.x.shape == (1212, 64) and b.train.x.dtype == torch.float32
    assert set(b.train.indices.tolist()).isdisjoint(b.val.indices.tolist())
    assert sorted(b.train.indices.tolist() + b.val.indices.tolist()) == list(range(1347))
    assert abs(b.train.x.mean().item()) < 0.05 and abs(b.train.x.std().item() - 1) < 0.05
    # stratified: every class present in val in near-equal numbers
    counts = torch.bincount(b.val.y, minlength=10)
    assert counts.min() >= 12 and counts.max() <= 15


def test_digits_seed_moves_val_split_but_never_test():
    a, b, c = load_dataset("digits", seed=0), load_dataset("digits", seed=0), load_dataset("digits", seed=1)
    assert torch.equal(a.val.indices, b.val.indices) and torch.equal(a.val.x, b.val.x)
    assert not torch.equal(a.val.indices, c.val.indices)
    assert torch.equal(a.test.x, c.test.x) and torch.equal(a.test.y, c.test.y)


def test_val_size_forms():
    assert len(load_dataset("digits", val_size=100).val) == 100
    assert len(load_dataset("digits", val_size=0.2).val) == round(0.2 * 1347)
    b = load_dataset("digits", val_size=0)
    assert (len(b.train), len(b.val)) == (1347, 0)
    for bad in (-1, 1.5, 5000, "10"):
        with pytest.raises(ValueError, match="val_size"):
            load_dataset("digits", val_size=bad)


# --------------------------------------------------------------------------- MNIST-like files


@pytest.mark.parametrize("compress", [True, False])
def test_reads_idx_files_compressed_or_not(tmp_path, compress):
    root = _fake_mnist(tmp_path, compress=compress)
    b = load_dataset("mnist", data_dir=root, val_size=20)
    assert (len(b.train), len(b.val), len(b.test)) == (180, 20, 50)
    assert b.train.x.shape == (180, 1, 28, 28)
    assert torch.bincount(b.val.y).tolist() == [2] * 10


def test_corrupt_idx_file_raises(tmp_path):
    root = _fake_mnist(tmp_path)
    bad = root / "MNIST" / "raw" / "t10k-labels-idx1-ubyte.gz"
    bad.write_bytes(gzip.compress(bytes([0, 0, 8, 1, 0, 0, 0, 50]) + b"\x00" * 10))
    with pytest.raises(DataError, match="truncated"):
        load_dataset("mnist", data_dir=root)


def test_missing_mnist_names_place_and_fix(tmp_path):
    with pytest.raises(DataError) as e:
        load_dataset("mnist", data_dir=tmp_path / "nowhere")
    msg = str(e.value)
    assert str(tmp_path / "nowhere" / "MNIST" / "raw") in msg
    assert "PANNING_DATA" in msg and "--data-dir" in msg and "--download" in msg


def test_missing_cifar_without_download(tmp_path):
    for name, folder in (("cifar10", "cifar-10-batches-py"), ("cifar100", "cifar-100-python")):
        with pytest.raises(DataError) as e:
            load_dataset(name, data_dir=tmp_path, download=False)
        msg = str(e.value)
        assert str(tmp_path / folder) in msg
        assert "PANNING_DATA" in msg and "--data-dir" in msg and "--download" in msg


def test_default_data_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("PANNING_DATA", str(tmp_path))
    assert default_data_dir() == tmp_path
    monkeypatch.delenv("PANNING_DATA")
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_data_dir() == tmp_path / ".cache" / "panning"


@pytest.mark.data
@pytest.mark.parametrize("name", ["mnist", "fashionmnist"])
def test_real_mnist_like(data_dir, name):
    b = load_dataset(name, data_dir=data_dir)
    assert (b.num_classes, b.input_shape) == (10, (1, 28, 28))
    assert (len(b.train), len(b.val), len(b.test)) == (55000, 5000, 10000)
    assert b.train.x.shape == (55000, 1, 28, 28) and b.test.x.shape == (10000, 1, 28, 28)
    assert set(b.train.indices.tolist()).isdisjoint(b.val.indices.tolist())
    for split in (b.train, b.val, b.test):
        assert abs(split.x.mean().item()) < 0.05 and abs(split.x.std().item() - 1) < 0.05
        assert split.y.min() == 0 and split.y.max() == 9
    assert torch.bincount(b.val.y).min() >= 400  # stratified


# --------------------------------------------------------------------------- batches


def test_balanced_batch_counts_and_seeding():
    b = load_dataset("digits")
    x, y = balanced_batch(b.train, 5, 10, seed=0)
    assert x.shape == (50, 64) and torch.bincount(y).tolist() == [5] * 10
    x2, y2 = balanced_batch(b.train, 5, 10, seed=0)
    x3, _ = balanced_batch(b.train, 5, 10, seed=1)
    assert torch.equal(x, x2) and torch.equal(y, y2) and not torch.equal(x, x3)
    assert y[:10].unique().numel() > 1  # shuffled, not sorted by class
    with pytest.raises(ValueError, match="fewer"):
        balanced_batch(b.val, 50, 10)
    with pytest.raises(ValueError, match="n_per_class"):
        balanced_batch(b.train, 0, 10)


class _ListDataset(torch.utils.data.Dataset):
    """Not tensor-backed: exercises the generic paths."""

    def __init__(self, n: int, k: int) -> None:
        self.items = [(torch.full((3,), float(i)), i % k) for i in range(n)]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def test_balanced_batch_on_subsets_and_generic_datasets():
    sub = torch.utils.data.Subset(InMemoryDataset(torch.randn(40, 3), torch.arange(40) % 4), range(0, 40, 2))
    with pytest.raises(ValueError, match="class 1"):  # only labels 0 and 2 survive in the subset
        balanced_batch(sub, 3, 4)
    x, y = balanced_batch(_ListDataset(30, 3), 4, 3, seed=2)
    assert x.shape == (12, 3) and torch.bincount(y).tolist() == [4, 4, 4]
    assert torch.equal(x[:, 0].long() % 3, y)
    xb, yb = next(iter(make_loader(_ListDataset(30, 3), 8, shuffle=False)))
    assert xb.shape == (8, 3) and yb.tolist() == [0, 1, 2, 0, 1, 2, 0, 1]


def test_loader_covers_every_example_once_and_is_seeded():
    ds = InMemoryDataset(torch.arange(103).float().view(103, 1), torch.arange(103) % 10)
    loader = make_loader(ds, 10, shuffle=True, seed=0)
    assert len(loader) == 11
    first = torch.cat([x for x, _ in loader]).flatten()
    second = torch.cat([x for x, _ in loader]).flatten()
    assert sorted(first.tolist()) == list(range(103))
    assert not torch.equal(first, second)  # a new permutation per epoch
    again = make_loader(ds, 10, shuffle=True, seed=0)
    assert torch.equal(torch.cat([x for x, _ in again]).flatten(), first)
    plain = torch.cat([x for x, _ in make_loader(ds, 10, shuffle=False)]).flatten()
    assert plain.tolist() == list(range(103))
    assert len(make_loader(ds, 10, shuffle=False, drop_last=True)) == 10
    for x, y in make_loader(ds, 10, shuffle=True):
        assert torch.equal(y, x.flatten().long() % 10)  # inputs and labels stay paired


def test_augment_batch_is_a_crop_and_maybe_flip_of_the_padded_image():
    n, c, h, w = 6, 2, 5, 5
    x = torch.arange(n * c * h * w, dtype=torch.float32).view(n, c, h, w) + 1
    fill = (-1.0, -2.0)
    out = augment_batch(x, torch.Generator().manual_seed(0), padding=2, fill=fill)
    assert out.shape == x.shape
    padded = torch.empty(n, c, h + 4, w + 4)
    padded[:, 0], padded[:, 1] = fill
    padded[:, :, 2:2 + h, 2:2 + w] = x
    flipped = 0
    for i in range(n):
        crops = {(dy, dx, f): padded[i, :, dy:dy + h, dx:dx + w].flip(2) if f else padded[i, :, dy:dy + h, dx:dx + w]
                 for dy, dx, f in itertools.product(range(5), range(5), (False, True))}
        matches = [k for k, v in crops.items() if torch.equal(v, out[i])]
        assert matches, f"sample {i} is not a crop/flip of its padded image"
        flipped += matches[0][2]
    assert 0 < flipped < n  # seed 0 flips some samples and not others
    out2 = augment_batch(x, torch.Generator().manual_seed(0), padding=2, fill=fill)
    assert torch.equal(out, out2)


def test_augmenting_loader_needs_images():
    ds = InMemoryDataset(torch.randn(8, 64), torch.zeros(8, dtype=torch.long))
    with pytest.raises(ValueError, match="NCHW"):
        make_loader(ds, 4, shuffle=True, augment=True)
    img = InMemoryDataset(torch.randn(8, 3, 32, 32), torch.zeros(8, dtype=torch.long), fill=(0.0, 0.0, 0.0))
    xb, _ = next(iter(make_loader(img, 4, shuffle=True, augment=True)))
    assert xb.shape == (4, 3, 32, 32)


def test_missing_data_skips_here_and_fails_where_it_is_required(monkeypatch: pytest.MonkeyPatch) -> None:
    import conftest

    monkeypatch.setattr(conftest, "REQUIRE_DATA", False)
    with pytest.raises(pytest.skip.Exception, match="PANNING_DATA"):
        conftest.require_data(None)
    monkeypatch.setattr(conftest, "REQUIRE_DATA", True)
    with pytest.raises(pytest.fail.Exception, match="PANNING_REQUIRE_DATA=1"):
        conftest.require_data(None)
    assert conftest.require_data(Path("/x")) == Path("/x")


def test_digits_image_is_digits_as_8x8_images():
    """The same splits and normalisation as digits, shaped (1, 8, 8) for convolutional networks."""
    flat, img = load_dataset("digits"), load_dataset("digits_image")
    assert img.input_shape == (1, 8, 8) and img.name == "digitsimage"
    for a, b in ((flat.train, img.train), (flat.val, img.val), (flat.test, img.test)):
        assert torch.equal(a.x.reshape(-1, 1, 8, 8), b.x) and torch.equal(a.y, b.y)
