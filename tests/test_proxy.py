"""Proxy evaluator: short seeded training of a masked copy, scored on the validation split only."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.utils.data import Dataset

from panning.data import load_dataset
from panning.hashing import masks_digest as masks_hash
from panning.hashing import state_digest as state_hash
from panning.masks import Masks, prunable_parameters
from panning.models import build_model
from panning.proxy import ProxyEvaluator, ProxySettings, fold_of


class Poisoned(Dataset):
    """A split that fails the test on any use."""

    def __len__(self) -> int:
        raise AssertionError("the test split was read")

    def __getitem__(self, i: int):
        raise AssertionError("the test split was read")


@pytest.fixture(scope="module")
def digits():
    return dataclasses.replace(load_dataset("digits"), test=Poisoned())


def random_masks(model: torch.nn.Module, density: float, seed: int = 0) -> Masks:
    g = torch.Generator().manual_seed(seed)
    return Masks({n: torch.rand(p.shape, generator=g) < density for n, p in prunable_parameters(model).items()})


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_trains_a_copy_caches_and_never_reads_test(digits) -> None:
    model = build_model("mlp", 10, (64,), seed=0)
    before = snapshot(model)
    masks = random_masks(model, 0.2)
    proxy = ProxyEvaluator(digits, steps=40, batch_size=64, lr=0.1, device="cpu")
    first = proxy.evaluate(model, masks)
    assert not first.cached and first.steps == 40
    assert 0.3 < first.accuracy <= 1.0  # chance is 0.1
    assert first.loss > 0 and first.seconds > 0
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), f"proxy modified the caller's {k}"
    again = proxy.evaluate(model, masks)
    assert again.cached and (again.accuracy, again.loss) == (first.accuracy, first.loss)
    assert proxy.hits == 1 and proxy.misses == 1
    other = random_masks(model, 0.2, seed=1)
    assert not proxy.evaluate(model, other).cached


def test_seeded_and_deterministic(digits) -> None:
    model = build_model("mlp", 10, (64,), seed=0)
    masks = random_masks(model, 0.3)
    a = ProxyEvaluator(digits, steps=20, batch_size=64, seed=3, device="cpu", cache_size=0)
    r1, r2 = a.evaluate(model, masks), a.evaluate(model, masks)
    assert not r1.cached and not r2.cached
    assert (r1.accuracy, r1.loss) == (r2.accuracy, r2.loss)
    b = ProxyEvaluator(digits, steps=20, batch_size=64, seed=4, device="cpu", cache_size=0)
    assert b.evaluate(model, masks).loss != r1.loss  # another seed, another batch order


def test_pruned_weights_stay_zero(digits) -> None:
    model = build_model("mlp", 10, (64,), seed=0)
    masks = random_masks(model, 0.1)
    net = ProxyEvaluator(digits, steps=15, batch_size=64, device="cpu").train(model, masks)
    params = dict(net.named_parameters())
    original = dict(model.named_parameters())
    for name, m in masks.items():
        assert torch.all(params[name][~m] == 0), name
        assert not torch.equal(params[name][m], original[name][m]), f"{name} did not train"


def test_state_dict_input_and_key(digits) -> None:
    model = build_model("mlp", 10, (64,), seed=2)
    masks = random_masks(model, 0.3)
    proxy = ProxyEvaluator(digits, "mlp", steps=10, batch_size=64, device="cpu", cache_size=0)
    from_module = proxy.evaluate(model, masks)
    from_state = proxy.evaluate(model.state_dict(), masks)
    assert (from_module.accuracy, from_module.loss) == (from_state.accuracy, from_state.loss)
    with pytest.raises(ValueError, match="state dict"):
        ProxyEvaluator(digits, steps=5, device="cpu").evaluate(model.state_dict(), masks)
    # the cache key follows initial weights and mask bits
    assert state_hash(model) == state_hash(model.state_dict())
    assert state_hash(model) != state_hash(build_model("mlp", 10, (64,), seed=3))
    assert masks_hash(masks) == masks_hash(Masks(dict(masks)))
    assert masks_hash(masks) != masks_hash(random_masks(model, 0.3, seed=9))


def test_budget_in_epochs(digits) -> None:
    n = len(digits.train)
    proxy = ProxyEvaluator(digits, epochs=2, batch_size=100, device="cpu")
    assert proxy.steps == -(-2 * n // 100)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(steps=0), "steps"),
        (dict(steps=5, epochs=1.0), "not both"),
        (dict(epochs=-1.0), "epochs"),
        (dict(lr=-0.1), "lr"),
        (dict(batch_size=0), "batch_size"),
        (dict(schedule="cubic"), "schedule"),
        (dict(momentum=1.5), "momentum"),
    ],
)
def test_bad_settings(digits, kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        ProxyEvaluator(digits, device="cpu", **kwargs)


def test_empty_validation_split_is_an_error() -> None:
    bundle = load_dataset("digits", val_size=0)
    with pytest.raises(ValueError, match="validation"):
        ProxyEvaluator(bundle, device="cpu")


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny matrices: a second intra-op thread only adds synchronisation (and stalls on a busy machine).
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# --------------------------------------------------------------------------- K-fold proxy


def test_folds_deal_every_class_evenly() -> None:
    y = torch.tensor([0] * 10 + [1] * 7 + [2] * 4)
    fold = fold_of(y, 3, seed=5)
    assert torch.equal(fold, fold_of(y, 3, seed=5))  # seeded
    sizes = torch.bincount(fold, minlength=3)
    assert int(sizes.max() - sizes.min()) <= 1
    for c, n in ((0, 10), (1, 7), (2, 4)):
        per = torch.bincount(fold[y == c], minlength=3)
        assert int(per.sum()) == n and int(per.max() - per.min()) <= 1
    assert not torch.equal(fold, fold_of(y, 3, seed=6))


def test_a_fold_never_trains_on_what_it_validates(digits) -> None:
    """With K folds every pooled example validates exactly once, and never in a split that trains on it."""
    ev = ProxyEvaluator(digits, steps=3, folds=4, device="cpu", cache_size=0)
    pool = len(digits.train) + len(digits.val)
    assert ev.val_size == pool
    seen: list[bytes] = []
    for j, sp in enumerate(ev._splits):
        val = {row.numpy().tobytes() for row in sp.xva}
        seen += [row.numpy().tobytes() for row in sp.xva]
        trained = {row.numpy().tobytes() for x, _ in ev.batches(split=j) for row in x}
        # digits holds a few identical images; a train row equal to a validation row is one of those
        assert len(trained & val) <= 3, f"fold {j} trains on {len(trained & val)} of its validation images"
    assert len(seen) == pool


def test_k_fold_accuracy_pools_every_fold(digits) -> None:
    model = build_model("mlp", 10, (64,), seed=0)
    masks = random_masks(model, 0.1)
    ev = ProxyEvaluator(digits, steps=15, batch_size=64, folds=3, device="cpu", cache_size=0)
    correct = 0
    for j, sp in enumerate(ev._splits):
        acc, _ = ev.score(ev.train(model, masks, split=j), split=j)
        correct += round(acc * sp.xva.shape[0])
    res = ev.evaluate(model, masks)
    assert res.accuracy == correct / ev.val_size
    one = ProxyEvaluator(digits, steps=15, batch_size=64, device="cpu", cache_size=0).evaluate(model, masks)
    assert res.accuracy != one.accuracy  # another validation set, not the one split renamed
    # stacked (N at once) pools the folds the same way, up to one validation example of float rounding
    inits = [model, build_model("mlp", 10, (64,), seed=1)]
    many = ev.evaluate_many(inits, [masks, random_masks(inits[1], 0.1, seed=1)])
    assert abs(many[0].accuracy - res.accuracy) <= 1 / ev.val_size
    assert many[1].accuracy != many[0].accuracy


def test_bad_folds(digits) -> None:
    with pytest.raises(ValueError, match="folds"):
        ProxySettings(folds=0)
    with pytest.raises(ValueError, match="folds"):
        ProxyEvaluator(digits, folds=True, device="cpu")  # type: ignore[arg-type]
    tiny = dataclasses.replace(digits, train=torch.utils.data.Subset(digits.train, range(5)),
                               val=torch.utils.data.Subset(digits.val, range(2)))
    with pytest.raises(ValueError, match="folds=4 needs at least 8"):
        ProxyEvaluator(tiny, folds=4, device="cpu")
