"""The stepping core: schedules, normalisation, multi-index combination, fixed methods."""
from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from panning.indices import compute_scores
from panning.masks import Masks, keep_count, select_topk
from panning.pruner import METHODS, Pruner, normalise, panning_weights, prune
from panning.schedules import keep_schedule


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 4))


def batch(seed: int = 0, n: int = 16) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, 16, generator=g), torch.arange(n) % 4)]


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


# ---------------------------------------------------------------------------------------------- schedules


@given(total=st.integers(1, 5000), s=st.floats(0.0, 0.999), steps=st.integers(1, 120),
       kind=st.sampled_from(["exponential", "linear"]))
@settings(max_examples=60, deadline=None)
def test_schedule_ends_exactly_and_never_grows(total: int, s: float, steps: int, kind: str) -> None:
    counts = keep_schedule(total, s, steps, kind)
    assert len(counts) == steps
    assert counts[-1] == keep_count(total, s)
    assert all(a >= b for a, b in zip([total] + counts, counts, strict=False))


def test_exponential_schedule_matches_synflow() -> None:
    # density d^(t/T): 1000 weights to 1% over 2 steps keeps 100 then 10
    assert keep_schedule(1000, 0.99, 2, "exponential") == [100, 10]
    assert keep_schedule(1000, 0.5, 4, "linear") == [875, 750, 625, 500]


def test_schedule_bad_input() -> None:
    with pytest.raises(ValueError, match="schedule"):
        keep_schedule(10, 0.5, 2, "cubic")
    with pytest.raises(ValueError, match="steps"):
        keep_schedule(10, 0.5, 0)
    with pytest.raises(ValueError):
        keep_schedule(10, 1.0, 2)


# ---------------------------------------------------------------------------------------- normalisation


@given(
    values=st.lists(st.integers(-10**6, 10**6), min_size=2, max_size=40),
    how=st.sampled_from(["mean", "zscore", "rank"]),
)
@settings(max_examples=80, deadline=None)
def test_order_preserving_normalisations(values: list[int], how: str) -> None:
    """Distinct scores stay strictly ordered (a constant output fails); equal scores stay equal
    except under ``rank``, which orders ties by position."""
    s = torch.tensor(values, dtype=torch.float64)
    alive = torch.ones_like(s, dtype=torch.bool)
    n = normalise(s, alive, how)
    for i in range(len(values)):
        for j in range(len(values)):
            if values[i] < values[j]:
                assert n[i] < n[j]
            elif values[i] == values[j] and how != "rank":
                assert n[i] == n[j]


def test_every_normalisation_by_hand() -> None:
    s = torch.tensor([1.0, 2.0, 3.0, 6.0, 100.0], dtype=torch.float64)
    alive = torch.tensor([True, True, True, True, False])
    # statistics of the alive weights only: mean |s| = 3, mean 3, population std sqrt(3.5)
    assert normalise(s, alive, "mean").tolist() == [1 / 3, 2 / 3, 1.0, 2.0, 0.0]
    z = [(v - 3.0) / 3.5 ** 0.5 for v in (1.0, 2.0, 3.0, 6.0)]
    assert torch.allclose(normalise(s, alive, "zscore"), torch.tensor(z + [0.0], dtype=torch.float64), atol=1e-15)
    assert torch.allclose(normalise(s, alive, "abs_zscore"), torch.tensor([abs(v) for v in z] + [0.0],
                                                                          dtype=torch.float64), atol=1e-15)
    assert normalise(s, alive, "rank").tolist() == [0.25, 0.5, 0.75, 1.0, 0.0]
    assert normalise(s, alive, "none").tolist() == [1.0, 2.0, 3.0, 6.0, 0.0]
    # rank: ties ordered by position (a stable sort), fraction of alive weights at or below
    ties = torch.tensor([2.0, 1.0, 2.0], dtype=torch.float64)
    assert normalise(ties, torch.ones(3, dtype=torch.bool), "rank").tolist() == [2 / 3, 1 / 3, 1.0]
    # mean keeps signs (GraSP): scale by mean |s|
    signed = torch.tensor([-2.0, 1.0, 3.0], dtype=torch.float64)
    assert normalise(signed, torch.ones(3, dtype=torch.bool), "mean").tolist() == [-1.0, 0.5, 1.5]
    with pytest.raises(ValueError, match="normalisation"):
        normalise(s, alive, "max")


def test_normalise_uses_alive_weights_only() -> None:
    s = torch.tensor([1.0, 3.0, 1000.0])
    alive = torch.tensor([True, True, False])
    n = normalise(s, alive, "mean")
    assert n.tolist() == [0.5, 1.5, 0.0]  # mean |s| over alive = 2
    z = normalise(torch.tensor([1.0, 3.0, 5.0]), torch.ones(3, dtype=torch.bool), "abs_zscore")
    assert torch.allclose(z, torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64) * (2 / (8 / 3) ** 0.5))


# -------------------------------------------------------------------------------------------- the core


@pytest.fixture
def two_fixed_indices():
    """Two indices with hand-chosen scores on a 1x4 weight: a = [4, 3, 2, 1], b = [1, 1, 1, 5]."""
    from panning.indices import INDICES, register_index

    fixed = {"fixed_a": [4.0, 3.0, 2.0, 1.0], "fixed_b": [1.0, 1.0, 1.0, 5.0]}
    for name, values in fixed.items():
        register_index(name, needs_data=False)(
            lambda model, masks, batches=None, v=values, **_: {k: torch.tensor([v]) for k in masks})
    yield nn.Sequential(nn.Linear(4, 1, bias=False))
    for name in fixed:
        del INDICES[name]


def test_index_weights_combine_normalised_scores_by_hand(two_fixed_indices: nn.Module) -> None:
    """c = sum_k w_k n_k with n_k = s_k / mean|s_k|: n_a = [1.6, 1.2, 0.8, 0.4], n_b = [.5, .5, .5, 2.5]."""
    p = Pruner(two_fixed_indices, ["fixed_a", "fixed_b"], input_shape=(4,))
    expect = {(1.0, 3.0): [3.1, 2.7, 2.3, 7.9], (3.0, 1.0): [5.3, 4.1, 2.9, 3.7], (1.0, 0.0): [1.6, 1.2, 0.8, 0.4]}
    for w, c in expect.items():
        got = p.combined_scores(w)["0.weight"].reshape(-1)
        assert torch.allclose(got, torch.tensor(c, dtype=torch.float64), atol=1e-12), w
    # the weights decide which weights survive: keep 2
    assert p.step({"fixed_a": 3.0, "fixed_b": 1.0}, 2)["0.weight"].reshape(-1).tolist() == [True, True, False, False]
    q = Pruner(two_fixed_indices, ["fixed_a", "fixed_b"], input_shape=(4,))
    assert q.step([1.0, 3.0], 2)["0.weight"].reshape(-1).tolist() == [True, False, False, True]
    # a second step normalises over the alive weights only: a = [4, 3] -> [8/7, 6/7]; b = [1, 1] -> [1, 1]
    p2 = Pruner(two_fixed_indices, ["fixed_a", "fixed_b"], input_shape=(4,))
    p2.step([1.0, 0.0], 2)
    got = p2.combined_scores([1.0, 1.0])["0.weight"].reshape(-1)
    assert torch.allclose(got, torch.tensor([1 + 8 / 7, 1 + 6 / 7, 0.0, 0.0], dtype=torch.float64), atol=1e-12)


def test_single_step_equals_topk_of_the_index() -> None:
    model, b = mlp(), batch()
    masks = Masks.ones(model)
    scores = compute_scores("snip", model, masks, b)
    expected = select_topk(scores, keep_count(masks.num_total, 0.9))
    result = prune(model, "snip", 0.9, b)
    assert result.masks.equal(expected)
    assert result.masks.num_kept == keep_count(masks.num_total, 0.9)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_exact_count_model_untouched(method: str) -> None:
    model, b = mlp(), batch()
    before = state(model)
    result = prune(model, method, 0.8, b, iterations=3 if METHODS[method].iterations > 1 else None)
    n = result.masks.num_total
    assert result.masks.num_kept == keep_count(n, 0.8)
    assert abs(result.sparsity - (1 - keep_count(n, 0.8) / n)) < 1e-12
    assert 0.8 <= result.effective_sparsity <= 1.0
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_iterative_masks_are_monotone_and_reproducible() -> None:
    def run(seed: int) -> list[Masks]:
        p = Pruner(mlp(seed), ["synflow", "snip", "grasp_abs"], batch(seed), seed=seed)
        out = []
        for keep in keep_schedule(p.num_total, 0.95, 6):
            out.append(p.step([0.2, 0.5, 0.3], keep))
        return out

    a, b = run(0), run(0)
    for prev, cur in zip(a, a[1:], strict=False):
        for k in cur:
            assert not (cur[k] & ~prev[k]).any(), "a pruned weight came back"
    assert all(x.equal(y) for x, y in zip(a, b, strict=True))
    assert not run(1)[-1].equal(a[-1])


def test_one_hot_weights_reproduce_single_index_iterative_masks() -> None:
    model, b = mlp(), batch()
    single = prune(model, "snip", 0.9, b, iterations=4)
    p = Pruner(model, ["synflow", "snip", "grasp"], b)
    for keep in keep_schedule(p.num_total, 0.9, 4):
        p.step([0.0, 1.0, 0.0], keep)
    assert p.masks.equal(single.masks)


@pytest.mark.filterwarnings("ignore:layer collapse")  # 3 weights left of 320: collapse is expected
def test_panning_table_and_method() -> None:
    assert panning_weights(0.0) == (0.2, 0.5, 0.3)
    assert panning_weights(0.85) == (0.2, 0.4, 0.4)
    assert panning_weights(0.9) == (0.2, 0.3, 0.5)
    assert panning_weights(0.985) == (0.4, 0.2, 0.4)
    assert panning_weights(0.995) == (0.5, 0.0, 0.5)
    assert METHODS["panning"].iterations == 100 and METHODS["synflow"].iterations == 100
    assert METHODS["snip"].iterations == 1
    r = prune(mlp(), "panning", 0.995, batch(), iterations=10)
    # each step used the table entry for the sparsity the network had *before* it
    sparsity_before = 0.0
    for rec in r.history:
        assert tuple(rec.weights.values()) == panning_weights(sparsity_before)
        sparsity_before = rec.sparsity
    assert r.history[-1].weights["snip"] == 0.0


def test_layerwise_mode_prunes_each_layer_equally() -> None:
    r = prune(mlp(), "magnitude", 0.5, batch(), mode="layerwise")
    # 192, 96 and 32 weights: half of each is a whole number, so the split is exact
    assert {k: int(m.sum()) for k, m in r.masks.items()} == {"1.weight": 96, "3.weight": 48, "5.weight": 16}


def test_min_per_layer_prevents_collapse() -> None:
    model = mlp()
    with torch.no_grad():
        model[5].weight.mul_(1e-6)  # the classifier would be pruned away first by magnitude
    r = prune(model, "magnitude", 0.95, batch(), min_per_layer=4)
    assert all(r.masks[k].sum() >= 4 for k in r.masks)
    with pytest.warns(RuntimeWarning, match="collapse"):
        collapsed = prune(model, "magnitude", 0.9, batch())
    assert collapsed.empty == ["5.weight"] and collapsed.effective_sparsity == 1.0
    assert set(collapsed.collapsed) == set(collapsed.masks)  # nothing reaches the output any more


# ------------------------------------------------------------------------------------------- bad input


def test_bad_input_raises_value_error_and_leaves_model() -> None:
    model, b = mlp(), batch()
    before = state(model)
    with pytest.raises(ValueError, match="known indices"):
        Pruner(model, ["snip", "nope"], b)
    with pytest.raises(ValueError, match="at least one"):
        Pruner(model, [], b)
    with pytest.raises(ValueError, match="scoring batch"):
        Pruner(model, ["snip"], [])
    with pytest.raises(ValueError, match="scoring batch"):
        Pruner(model, ["snip"], [(torch.zeros(0, 16), torch.zeros(0, dtype=torch.long))])
    with pytest.raises(ValueError, match="known methods"):
        prune(model, "nope", 0.5, b)
    for s in (-0.1, 1.0, 1.5):
        with pytest.raises(ValueError):
            prune(model, "snip", s, b)
    p = Pruner(model, ["snip", "magnitude"], b)
    with pytest.raises(ValueError, match="non-negative"):
        p.step([-0.5, 1.0], 10)
    with pytest.raises(ValueError, match="all zero"):
        p.step([0.0, 0.0], 10)
    with pytest.raises(ValueError, match="expected 2"):
        p.step([1.0], 10)
    with pytest.raises(ValueError, match="keep"):
        p.step([1.0, 1.0], p.num_total + 1)
    with pytest.raises(ValueError):
        Pruner(nn.Sequential(nn.ReLU()), ["magnitude"], input_shape=(4,))
    other = Masks.ones(nn.Sequential(nn.Flatten(), nn.Linear(16, 3)))
    with pytest.raises(ValueError):
        Pruner(model, ["magnitude"], b, masks=other)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_data_free_pruner_needs_only_input_shape() -> None:
    model = mlp()
    r = prune(model, "synflow", 0.9, None, input_shape=(16,), iterations=5)
    assert r.masks.num_kept == keep_count(r.masks.num_total, 0.9)
    with pytest.raises(ValueError, match="input_shape"):
        prune(copy.deepcopy(model), "synflow", 0.9, None)


def test_largest_sparsity_keeping_a_count_by_hand() -> None:
    from panning.runs import largest_sparsity

    # keep_count = round((1 - s) * N): 10 weights keep 3 up to s = 0.749999 (0.75 gives round(2.5) = 2)
    assert largest_sparsity(10, 3) == 0.749999
    assert keep_count(10, 0.749999) == 3 and keep_count(10, 0.75) == 2
    assert largest_sparsity(50200, 3) == 0.99995
    assert keep_count(50200, 0.99995) == 3 and keep_count(50200, 0.999951) == 2
    assert largest_sparsity(100, 100) == 0.005  # round(99.5) = 100 (half to even); 0.005001 keeps 99
    assert keep_count(100, 0.005) == 100 and keep_count(100, 0.005001) == 99
