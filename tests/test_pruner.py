"""The stepping core: schedules, normalisation, multi-index combination, fixed methods."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
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


# ------------------------------------------------------------------------------------ more by hand


def test_keep_schedule_of_an_empty_network_and_its_error_message() -> None:
    """Zero weights keep zero at every step; an unknown kind lists the known ones, comma-separated."""
    assert keep_schedule(0, 0.5, 3) == [0, 0, 0]
    with pytest.raises(ValueError, match=r"^unknown schedule 'cubic'; known schedules: exponential, linear$"):
        keep_schedule(10, 0.5, 2, "cubic")


def test_normalise_edge_cases_by_hand() -> None:
    """mean is the default; one alive weight still scales (to +-1); a mean |s| or std below 1 still divides;
    a constant score centres to 0; rank orders long runs of ties by position too."""
    s = torch.tensor([0.25, -0.5, 0.75], dtype=torch.float64)
    alive = torch.ones(3, dtype=torch.bool)
    assert normalise(s, alive).tolist() == normalise(s, alive, "mean").tolist() == [0.5, -1.0, 1.5]
    one = torch.tensor([False, True, False])
    assert normalise(s, one, "mean").tolist() == [0.0, -1.0, 0.0]
    z = normalise(torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64), alive, "zscore")
    assert torch.allclose(z, torch.tensor([-1.5 ** 0.5, 0.0, 1.5 ** 0.5], dtype=torch.float64), atol=1e-12)
    assert normalise(torch.full((3,), 2.0, dtype=torch.float64), alive, "zscore").tolist() == [0.0, 0.0, 0.0]
    ties = torch.tensor([1.0, 0.0] * 100, dtype=torch.float64)  # 100 zeros, then (by position) 100 ones
    ranks = normalise(ties, torch.ones(200, dtype=torch.bool), "rank")
    expected = [0.0] * 200
    expected[1::2] = [(i + 1) / 200 for i in range(100)]
    expected[0::2] = [(i + 101) / 200 for i in range(100)]
    assert ranks.tolist() == expected
    with pytest.raises(ValueError, match=r"^unknown normalisation 'max'; known: mean, zscore, abs_zscore, rank, none$"):
        normalise(s, alive, "max")


@pytest.fixture
def counted(monkeypatch):
    """Indices "up" (scores 1..n in key order, so later weights rank higher), "neg" (all -1, then -2 where
    pruned) and "other"; ``calls`` counts how often each is scored."""
    from panning.indices import INDICES, IndexSpec

    calls = {"up": 0, "neg": 0, "other": 0}

    def make(name, fn):
        def index(model, masks, batches, **_):
            calls[name] += 1
            return {k: fn(k, m) for k, m in masks.items()}

        monkeypatch.setitem(INDICES, name, IndexSpec(name, index, False, ""))

    offsets = {"0.weight": 0.0, "1.weight": 8.0}
    make("up", lambda k, m: torch.arange(1.0, m.numel() + 1).reshape(m.shape) + offsets[k])
    make("neg", lambda k, m: torch.where(m, -1.0, -2.0))
    make("other", lambda k, m: torch.ones(m.shape))
    return calls


def two_layers() -> nn.Module:
    """Linear(2, 4) -> Linear(4, 2): 8 + 8 weights."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(2, 4), nn.Linear(4, 2))


def test_only_the_indices_asked_for_are_scored(counted) -> None:
    """scores(names) and normalised_scores(name) score just that index; an index with weight 0 is not
    scored at all; scores() scores every index once per step."""
    p = Pruner(two_layers(), ["up", "other"], input_shape=(2,))
    assert list(p.scores(["up"])) == ["up"] and counted == {"up": 1, "neg": 0, "other": 0}
    p.normalised_scores("up")
    assert counted["other"] == 0
    p.step({"up": 1.0}, 12)
    assert counted == {"up": 1, "neg": 0, "other": 0}
    assert list(p.scores()) == ["up", "other"] and counted == {"up": 2, "neg": 0, "other": 1}


def test_normalised_scores_use_the_pruners_normalisation(counted) -> None:
    p = Pruner(two_layers(), ["up"], input_shape=(2,), normalisation="rank")
    assert p.normalised_scores("up").tolist() == [i / 16 for i in range(1, 17)]


def test_pruned_weights_never_come_back_even_when_alive_ones_score_below_zero(counted) -> None:
    """The next step selects among the alive weights only, although pruned ones score higher (0 > -1)."""
    p = Pruner(two_layers(), ["up", "neg"], input_shape=(2,))
    first = p.step([1.0, 0.0], 10)  # keeps the 10 highest "up" scores: flat positions 6..15
    assert torch.cat([m.reshape(-1) for m in first.values()]).tolist() == [False] * 6 + [True] * 10
    second = p.step([0.0, 1.0], 4)  # all alive weights tie at -1: the earliest alive ones win
    assert torch.cat([m.reshape(-1) for m in second.values()]).tolist() == [False] * 6 + [True] * 4 + [False] * 6


def test_defaults_allow_emptying_a_layer_and_seed_zero(counted) -> None:
    """min_per_layer defaults to 0 (a layer may be emptied), seed to 0."""
    p = Pruner(two_layers(), ["up"], input_shape=(2,))
    masks = p.step([1.0], 8)
    assert not masks["0.weight"].any() and masks["1.weight"].all()
    assert p.seed == 0 and p.min_per_layer == 0


def test_step_keep_bounds_and_step_to_sparsity(counted) -> None:
    """keep may be 0 (everything pruned) but not above the kept count (message with both numbers);
    step_to_sparsity keeps keep_count(N, s)."""
    p = Pruner(two_layers(), ["up"], input_shape=(2,))
    with pytest.raises(ValueError, match=r"^keep must be between 0 and the 16 weights (still kept|that can be kept), "
                                         r"got 17$"):
        p.step([1.0], 17)
    assert p.step_to_sparsity([1.0], 0.75).num_kept == keep_count(16, 0.75) == 4
    assert p.step([1.0], 0).num_kept == 0


def test_step_records_by_hand(counted) -> None:
    """History: step number, weights, keep, sparsity and non-negative timings within the call's duration."""
    import time

    p = Pruner(two_layers(), ["up", "other"], input_shape=(2,))
    for n, keep in enumerate((12, 6), start=1):
        t0 = time.perf_counter()
        p.step({"up": 2.0}, keep)
        took = time.perf_counter() - t0
        r = p.history[-1]
        assert (r.step, r.weights, r.keep, r.sparsity) == (n, {"up": 2.0, "other": 0.0}, keep, 1 - keep / 16)
        assert 0.0 <= r.score_seconds <= took and 0.0 <= r.select_seconds <= took


def test_index_weight_rules_and_messages(counted) -> None:
    """A mapping may leave indices out (weight 0) but not name others; weights must be finite, >= 0, not all 0."""
    p = Pruner(two_layers(), ["up", "other"], input_shape=(2,))
    assert p.weights_dict({"other": 2}) == {"up": 0.0, "other": 2.0}
    with pytest.raises(ValueError, match=r"^weights given for indices not in this pruner: \['a', 'b'\]$"):
        p.weights_dict({"b": 1.0, "a": 1.0, "up": 1.0})
    with pytest.raises(ValueError, match=r"^index weights must be finite and non-negative; up got inf$"):
        p.weights_dict([float("inf"), 1.0])
    with pytest.raises(ValueError, match=r"^index weights are all zero; at least one index needs a positive weight$"):
        p.weights_dict([0.0, 0.0])


def test_random_scores_are_seeded_by_seed_and_step() -> None:
    """Step t of a pruner with seed s scores ``random`` with seed s * 100003 + t (fresh draws every step,
    reproducible from the seed)."""
    model = mlp()
    p = Pruner(model, ["random"], input_shape=(16,), seed=3)
    for t in range(2):
        expected = compute_scores("random", model, p.masks, seed=3 * 100_003 + t)
        got = p.scores()["random"]
        assert all(torch.equal(got[k], expected[k]) for k in expected)
        p.step([1.0], p.masks.num_kept - 10)


def test_pruner_settings_and_messages() -> None:
    """exclude is kept (as a tuple) and its layers get no mask; configuration errors say what is wrong."""
    model, b = mlp(), batch()
    p = Pruner(model, ["magnitude"], b, exclude=["5"])
    assert p.exclude == ("5",) and list(p.masks) == ["1.weight", "3.weight"]
    from panning.indices import available_indices

    with pytest.raises(ValueError, match=r"^at least one saliency index is needed$"):
        Pruner(model, [], b)
    with pytest.raises(ValueError, match=rf"^unknown index 'nope'; known indices: {', '.join(available_indices())}$"):
        Pruner(model, ["nope"], b)
    with pytest.raises(ValueError, match=r"^indices must be distinct, got \['snip', 'snip'\]$"):
        Pruner(model, ["snip", "snip"], b)
    with pytest.raises(ValueError, match=r"^unknown normalisation 'max'; known: mean, zscore, abs_zscore, rank, none$"):
        Pruner(model, ["snip"], b, normalisation="max")
    with pytest.raises(ValueError, match=r"^unknown selection mode 'local'; use 'global' or 'layerwise'$"):
        Pruner(model, ["snip"], b, mode="local")
    for batches in (None, []):
        with pytest.raises(ValueError, match=r"^indices \['snip'\] need a non-empty scoring batch$"):
            Pruner(model, ["synflow", "snip"], batches)
    with pytest.raises(ValueError, match=r"^give input_shape \(without the batch dimension\) or scoring batches$"):
        Pruner(model, ["synflow"])
    from panning.pruner import available_methods

    with pytest.raises(ValueError, match=rf"^unknown method 'nope'; known methods: {', '.join(available_methods())}$"):
        prune(model, "nope", 0.5, b)


def test_prune_passes_its_settings_on_and_reports_them() -> None:
    """schedule, exclude, normalisation and seed reach the pruner (seed 0 by default); the result names the
    method and schedule, counts the steps and times the call."""
    import time

    model, b = mlp(), batch()
    t0 = time.perf_counter()
    r = prune(model, "random", 0.5, b, iterations=4, schedule="linear", exclude=["1"], seed=5)
    took = time.perf_counter() - t0
    assert (r.method, r.schedule, r.iterations) == ("random", "linear", 4)
    assert [h.keep for h in r.history] == keep_schedule(r.masks.num_total, 0.5, 4, "linear") == [112, 96, 80, 64]
    assert list(r.masks) == ["3.weight", "5.weight"]
    assert 0.0 < r.seconds <= took
    p = Pruner(model, ["random"], b, exclude=["1"], seed=5)
    for keep in keep_schedule(p.num_total, 0.5, 4, "linear"):
        p.step([1.0], keep)
    assert r.masks.equal(p.masks)
    assert prune(model, "random", 0.5, b).masks.equal(prune(model, "random", 0.5, b, seed=0).masks)
    q = Pruner(model, ["magnitude"], b, normalisation="abs_zscore")
    q.step([1.0], keep_count(q.num_total, 0.5))
    assert prune(model, "magnitude", 0.5, b, normalisation="abs_zscore").masks.equal(q.masks)
    assert not q.masks.equal(prune(model, "magnitude", 0.5, b).masks)


def test_prune_result_summary_by_hand() -> None:
    """summary() is the JSON body of prune.json: every field under its documented key."""
    r = prune(mlp(), "magnitude", 0.5, batch(), iterations=2)
    assert r.summary() == {
        "method": "magnitude", "sparsity": r.sparsity, "effective_sparsity": r.effective_sparsity,
        "collapsed_layers": [], "empty_layers": [], "kept": 160, "prunable": 320, "iterations": 2,
        "schedule": "exponential", "seconds": r.seconds, "layers": r.masks.layer_density(),
        "steps": [{"step": h.step, "weights": {"magnitude": 1.0}, "keep": h.keep, "sparsity": h.sparsity}
                  for h in r.history],
    }
    assert [s["keep"] for s in r.summary()["steps"]] == [226, 160]


def test_collapse_warning_says_why() -> None:
    """A fully pruned layer is named as such; a layer cut off from the input is 'no path'."""
    from panning.pruner import finish

    model = mlp()
    with torch.no_grad():
        model[5].weight.mul_(1e-6)
    with pytest.warns(RuntimeWarning) as rec:
        prune(model, "magnitude", 0.9, batch())
    assert str(rec[0].message) == ("layer collapse in ['1.weight', '3.weight', '5.weight'] "
                                   "(fully pruned: ['5.weight'])")
    m = {k: v.clone() for k, v in Masks.ones(model).items()}
    m["1.weight"][:] = False
    m["1.weight"][0] = True  # hidden unit 0 of the first layer is fed ...
    m["3.weight"][:, 0] = False  # ... but feeds nothing: no path, though no layer is empty
    p = Pruner(model, ["magnitude"], batch(), masks=Masks(m))
    with pytest.warns(RuntimeWarning) as rec:
        r = finish(p, "handmade", "linear", 1.5)
    assert str(rec[0].message) == ("layer collapse in ['1.weight', '3.weight', '5.weight'] "
                                   "(no path from input to output)")
    assert (r.method, r.schedule, r.seconds, r.iterations, r.empty) == ("handmade", "linear", 1.5, 0, [])


# mutmut calls every function through a trampoline, which adds stack frames: warning locations cannot be checked there
_UNDER_MUTMUT = pytest.mark.skipif("MUTANT_UNDER_TEST" in __import__("os").environ,
                                   reason="mutmut's trampolines shift stack levels")


@_UNDER_MUTMUT
def test_collapse_warning_points_at_the_caller_of_prune() -> None:
    model = mlp()
    with torch.no_grad():
        model[5].weight.mul_(1e-6)
    with pytest.warns(RuntimeWarning, match="layer collapse") as rec:
        prune(model, "magnitude", 0.9, batch())
    assert rec[0].filename == __file__


# -------------------------------------------------------------------------- provided scores and regrowth


def test_needs_scores_until_scored_on_the_current_masks(counted) -> None:
    """needs_scores: True before an index is scored, False once it is (others still True), True again after
    a step (new masks)."""
    p = Pruner(two_layers(), ["up", "other"], input_shape=(2,))
    assert p.needs_scores("up") and p.needs_scores("other")
    p.scores(["up"])
    assert not p.needs_scores("up") and p.needs_scores("other")
    p.step([1.0, 0.0], 12)
    assert p.needs_scores("up") and p.needs_scores("other")


def test_provided_scores_are_used_as_the_index_scores(counted) -> None:
    """provide_scores stands in for scoring: the index is not computed, the step ranks by the given scores,
    scores already computed for other indices stay cached, and a normalisation computed before is replaced."""
    p = Pruner(two_layers(), ["up", "other"], input_shape=(2,))
    p.scores(["other"])
    down = {"0.weight": torch.arange(16.0, 8.0, -1.0).reshape(4, 2),
            "1.weight": torch.arange(8.0, 0.0, -1.0).reshape(2, 4)}
    p.provide_scores("up", down)  # flat scores 16..9, 8..1: the first 6 weights rank highest
    assert not p.needs_scores("up") and not p.needs_scores("other")
    assert p.step({"up": 1.0}, 6)["0.weight"].reshape(-1).tolist() == [True] * 6 + [False] * 2
    assert counted == {"up": 0, "neg": 0, "other": 1}
    # a normalisation cached before the scores were provided is not reused
    q = Pruner(two_layers(), ["up"], input_shape=(2,))
    assert q.normalised_scores("up").tolist() == [i / 8.5 for i in range(1, 17)]  # mean of 1..16 is 8.5
    q.provide_scores("up", {k: torch.ones(m.shape) for k, m in q.masks.items()})
    assert q.normalised_scores("up").tolist() == [1.0] * 16


def test_provided_scores_are_checked(counted) -> None:
    """Only this pruner's indices, exactly the masks' keys in order with their shapes; a non-finite provided
    score of an alive weight is refused when normalised."""
    p = Pruner(two_layers(), ["up"], input_shape=(2,))
    good = {k: torch.ones(m.shape) for k, m in p.masks.items()}
    with pytest.raises(ValueError, match=r"^index 'other' is not one of this pruner's \['up'\]$"):
        p.provide_scores("other", good)
    message = r"^scores for 'up' do not have the masks' keys and shapes$"
    with pytest.raises(ValueError, match=message):
        p.provide_scores("up", dict(reversed(list(good.items()))))  # same tensors, other key order
    with pytest.raises(ValueError, match=message):
        p.provide_scores("up", {"0.weight": torch.ones(4, 2), "1.weight": torch.ones(4, 2)})
    with pytest.raises(ValueError, match=message):
        p.provide_scores("up", {"0.weight": torch.ones(4, 2)})
    bad = {k: v.clone() for k, v in good.items()}
    bad["1.weight"][0, 0] = float("nan")
    p.provide_scores("up", bad)
    with pytest.raises(ValueError, match=r"^index 'up' produced NaN or infinite scores for unpruned weights$"):
        p.normalised_scores("up")


@pytest.fixture
def flip(monkeypatch):
    """Index "flip" on a 1x4 weight: scores [1, 2, 3, 4] at a pruner's first step, [4, 3, 2, 1] after (the
    pruner's score seed is seed * 100003 + steps done)."""
    from panning.indices import INDICES, IndexSpec

    def index(model, masks, batches, *, seed, **_):
        v = [1.0, 2.0, 3.0, 4.0] if seed == 0 else [4.0, 3.0, 2.0, 1.0]
        return {k: torch.tensor([v]) for k in masks}

    monkeypatch.setitem(INDICES, "flip", IndexSpec("flip", index, False, ""))
    return nn.Sequential(nn.Linear(4, 1, bias=False))


def test_regrow_selects_among_all_weights_so_pruned_ones_return(flip) -> None:
    """With regrow, each step ranks every weight (pruned ones included, normalised over all of them) and keep
    may grow back up to the total; without it, pruned weights never return."""
    p = Pruner(flip, ["flip"], input_shape=(4,), regrow=True)
    assert p.regrow is True
    assert p.step([1.0], 3)["0.weight"].tolist() == [[False, True, True, True]]
    # scores [4, 3, 2, 1] over all four weights: mean 2.5, the pruned first weight is not zeroed
    assert p.normalised_scores("flip").tolist() == [1.6, 1.2, 0.8, 0.4]
    assert p.step([1.0], 2)["0.weight"].tolist() == [[True, True, False, False]]
    assert p.step([1.0], 4)["0.weight"].all()  # grows back to the dense network
    with pytest.raises(ValueError, match=r"^keep must be between 0 and the 4 weights that can be kept, got 5$"):
        p.step([1.0], 5)
    q = Pruner(flip, ["flip"], input_shape=(4,))
    assert q.regrow is False
    q.step([1.0], 3)
    assert q.normalised_scores("flip").tolist() == [0.0, 1.5, 1.0, 0.5]  # alive scores [3, 2, 1], mean 2
    assert q.step([1.0], 2)["0.weight"].tolist() == [[False, True, True, False]]
    with pytest.raises(ValueError, match=r"^keep must be between 0 and the 2 weights that can be kept, got 3$"):
        q.step([1.0], 3)


def test_prune_regrows_for_methods_that_say_so(flip, monkeypatch) -> None:
    """prune() gives the pruner the method's regrow setting: two linear steps (keep 3, then 2) end on the
    first two weights with regrowth and on the middle two without."""
    from panning.pruner import METHODS, Method

    for regrow, expected in ((True, [True, True, False, False]), (False, [False, True, True, False])):
        monkeypatch.setitem(METHODS, "flipper", Method("flipper", ("flip",), lambda s: (1.0,), 2, "linear",
                                                       regrow=regrow))
        r = prune(flip, "flipper", 0.5, input_shape=(4,))
        assert r.masks["0.weight"].reshape(-1).tolist() == expected, regrow


# ------------------------------------------------- options of a method: dense indices, temperatures, sharing


def test_dense_indices_are_scored_once_on_the_unpruned_network(counted, monkeypatch) -> None:
    """An index in dense_indices scores the all-kept masks, once for the whole run, with the first step's seed;
    it never needs scores and cannot be provided; the other indices score the masked network every step."""
    from panning import indices as indices_module

    seen = []
    real = indices_module.compute_many

    def recording(names, model, masks, batches=None, **kw):
        seen.append((list(names), sum(int(m.sum()) for m in masks.values()), kw["seed"]))
        return real(names, model, masks, batches, **kw)

    monkeypatch.setattr(indices_module, "compute_many", recording)
    p = Pruner(two_layers(), ["up", "other"], input_shape=(2,), dense_indices=["up"], seed=2)
    assert p.dense_indices == ("up",) and not p.needs_scores("up") and p.needs_scores("other")
    with pytest.raises(ValueError, match=r"^index 'up' scores the unpruned network here; the pruner computes it "
                                         r"itself$"):
        p.provide_scores("up", {k: torch.ones(m.shape) for k, m in p.masks.items()})
    p.step([1.0, 1.0], 10)
    p.step([1.0, 1.0], 6)
    assert seen == [(["up"], 16, 200_006), (["other"], 16, 200_006), (["other"], 10, 200_007)]
    assert counted == {"up": 1, "neg": 0, "other": 2}
    assert not p.needs_scores("up")


def test_a_logit_temperature_applies_to_its_index_only() -> None:
    """temperatures={"grasp": T} scores grasp with cross_entropy(logits / T, y) (reference: compute_scores with
    that loss), snip of the same pruner with the plain loss."""
    model, b = mlp(), batch()
    p = Pruner(model, ["snip", "grasp"], b, temperatures={"grasp": 4.0})
    assert p.temperatures == {"grasp": 4.0}
    s = p.scores()
    hot = compute_scores("grasp", model, p.masks, b, loss_fn=lambda out, y: F.cross_entropy(out / 4.0, y))
    plain = compute_scores("snip", model, p.masks, b)
    assert all(torch.equal(s["grasp"][k], hot[k]) for k in hot)
    assert all(torch.equal(s["snip"][k], plain[k]) for k in plain)


def test_dense_indices_and_temperatures_are_checked() -> None:
    model, b = mlp(), batch()
    with pytest.raises(ValueError, match=r"^dense_indices and temperatures name indices of this pruner \['snip'\]; "
                                         r"got 'grasp'$"):
        Pruner(model, ["snip"], b, dense_indices=["grasp"])
    with pytest.raises(ValueError, match=r"^dense_indices and temperatures name indices of this pruner \['snip'\]; "
                                         r"got 'grasp'$"):
        Pruner(model, ["snip"], b, temperatures={"grasp": 2.0})
    for t in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match=rf"^the logit temperature of 'snip' must be positive and finite, "
                                             rf"got {t}$"):
            Pruner(model, ["snip"], b, temperatures={"snip": t})
    assert Pruner(model, ["snip"], b, temperatures={"snip": 1e-3}).temperatures == {"snip": 1e-3}


def test_share_passes_reaches_compute_many(monkeypatch) -> None:
    """Pruner(share_passes=...) is what compute_many is asked (default True)."""
    from panning import indices as indices_module

    shares = []
    real = indices_module.compute_many
    monkeypatch.setattr(indices_module, "compute_many",
                        lambda names, *a, **kw: shares.append(kw["share"]) or real(names, *a, **kw))
    model, b = mlp(), batch()
    for share in (True, False):
        p = Pruner(model, ["snip", "grasp"], b, share_passes=share)
        assert p.share_passes is share
        p.scores()
    Pruner(model, ["snip"], b).scores()
    assert shares == [True, False, True]


@pytest.mark.filterwarnings("ignore:layer collapse")  # "up" ranks the first layer lowest: it is emptied
def test_prune_passes_a_methods_options_on(counted, monkeypatch) -> None:
    """prune() gives the pruner the method's dense indices, temperatures and normalisation, and share_passes;
    weights_by="target" picks the weights by the step's target sparsity (1 - keep / N), "current" by the
    network's sparsity before the step; another normalisation than the default or the method's is refused."""
    from panning import pruner as pruner_module
    from panning.errors import ConfigError
    from panning.pruner import Method

    made = []

    class Recording(Pruner):
        def __init__(self, *a, **kw):
            made.append(kw)
            super().__init__(*a, **kw)

    monkeypatch.setattr(pruner_module, "Pruner", Recording)
    for by in ("target", "current"):
        monkeypatch.setitem(METHODS, "opts", Method("opts", ("up", "other"), lambda s: (1.0, s), 2, "linear",
                                                    weights_by=by, dense_indices=("other",),
                                                    temperatures=(("up", 3.0),), normalisation="rank"))
        r = prune(two_layers(), "opts", 0.5, input_shape=(2,), share_passes=False)
        kw = made[-1]
        assert (kw["dense_indices"], kw["temperatures"], kw["normalisation"], kw["share_passes"]) == (
            ("other",), {"up": 3.0}, "rank", False)
        # linear schedule on 16 weights to 8: keep 12, then 8
        expected = [0.25, 0.5] if by == "target" else [0.0, 0.25]
        assert [h.weights["other"] for h in r.history] == expected, by
    assert prune(two_layers(), "opts", 0.5, input_shape=(2,), normalisation="rank").masks.num_kept == 8
    with pytest.raises(ConfigError, match=r"^method 'opts' normalises by 'rank' as part of its definition; leave the "
                                          r"normalisation at its default \(got 'zscore'\)$"):
        prune(two_layers(), "opts", 0.5, input_shape=(2,), normalisation="zscore")
    assert made[-1]["share_passes"] is True  # the default (from the call before)


def test_a_dense_index_first_weighted_later_still_scores_the_unpruned_network(counted, monkeypatch) -> None:
    """A dense index that gets weight only at the second step, on a pruner started from pruned masks, is scored
    then on the all-kept masks (16 weights) with the first step's seed (seed * 100003)."""
    from panning import indices as indices_module

    seen = []
    real = indices_module.compute_many

    def recording(names, model, masks, batches=None, **kw):
        seen.append((list(names), sum(int(m.sum()) for m in masks.values()), kw["seed"]))
        return real(names, model, masks, batches, **kw)

    monkeypatch.setattr(indices_module, "compute_many", recording)
    model = two_layers()
    start = {k: v.clone() for k, v in Masks.ones(model).items()}
    start["0.weight"][0] = False  # 14 of 16 kept
    p = Pruner(model, ["up", "other"], input_shape=(2,), dense_indices=["up"], masks=Masks(start), seed=1)
    p.step([0.0, 1.0], 12)
    p.step([1.0, 1.0], 8)
    assert seen == [(["other"], 14, 100_003), (["up"], 16, 100_003), (["other"], 12, 100_004)]
