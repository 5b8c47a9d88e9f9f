"""Methods beyond one-shot indices: iterative SNIP and FORCE (de Jorge et al., 2021)."""
from __future__ import annotations

import torch
from torch import nn

from panning.indices import INDICES, compute_scores, register_index
from panning.masks import Masks, keep_count
from panning.pruner import METHODS, Pruner, prune


def test_force_scores_pruned_weights_with_their_dense_values_by_hand() -> None:
    """L = w·x with x = (1, 1): the gradient at θ ⊙ m is (1, 1) for both weights, pruned or not, so FORCE
    scores |θ| = (1, 2) where SNIP of the pruned network scores |θ ⊙ m ⊙ g| = (1, 0)."""
    model = nn.Sequential(nn.Linear(2, 1, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, -2.0]]))
    masks = {"0.weight": torch.tensor([[True, False]])}
    batches = [(torch.ones(1, 2), torch.zeros(1, dtype=torch.long))]
    loss = lambda out, y: out.sum()  # noqa: E731
    assert compute_scores("force", model, masks, batches, loss_fn=loss)["0.weight"].tolist() == [[1.0, 2.0]]
    assert compute_scores("snip", model, masks, batches, loss_fn=loss)["0.weight"].tolist() == [[1.0, 0.0]]
    dense = {"0.weight": torch.ones(1, 2, dtype=torch.bool)}
    assert torch.equal(compute_scores("force", model, dense, batches, loss_fn=loss)["0.weight"],
                       compute_scores("snip", model, dense, batches, loss_fn=loss)["0.weight"])


def test_regrow_lets_a_pruned_weight_return_and_nested_selection_does_not() -> None:
    """An index that prefers weight 0 at the first step and weight 3 at the second: with regrow the
    second step can pick weight 3 back although the first step pruned it; without, it keeps the better
    of the two survivors (weight 1)."""
    calls = {"n": 0}

    def flip(model, masks, batches=None, **_):
        calls["n"] += 1
        s = [4.0, 3.0, 2.0, 1.0] if calls["n"] == 1 else [1.0, 2.0, 3.0, 4.0]
        return {k: torch.tensor([s]) for k in masks}

    register_index("flip_test", needs_data=False)(flip)
    try:
        model = nn.Sequential(nn.Linear(4, 1, bias=False))
        for regrow, second in ((True, [False, False, False, True]), (False, [False, True, False, False])):
            calls["n"] = 0
            p = Pruner(model, ["flip_test"], input_shape=(4,), regrow=regrow)
            assert p.step([1.0], 2)["0.weight"].reshape(-1).tolist() == [True, True, False, False]
            assert p.step([1.0], 1)["0.weight"].reshape(-1).tolist() == second
    finally:
        del INDICES["flip_test"]


def test_iterative_snip_and_force_are_the_papers_schedules() -> None:
    assert (METHODS["iter_snip"].iterations, METHODS["iter_snip"].schedule, METHODS["iter_snip"].regrow) == (
        60, "exponential", False)
    assert (METHODS["force"].indices, METHODS["force"].iterations, METHODS["force"].regrow) == (("force",), 60, True)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 4))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(16, 16, generator=g), torch.arange(16) % 4)]
    for name in ("iter_snip", "force"):
        r = prune(model, name, 0.9, batches, iterations=5)
        assert r.masks.num_kept == keep_count(Masks.ones(model).num_total, 0.9) and r.iterations == 5
        assert r.masks.equal(prune(model, name, 0.9, batches, iterations=5).masks)  # same seed, same mask
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    # iterative SNIP is SNIP's index on the pruned network, nested steps
    it = prune(model, "iter_snip", 0.9, batches, iterations=5)
    manual = Pruner(model, ["snip"], batches)
    from panning.schedules import keep_schedule

    for keep in keep_schedule(manual.num_total, 0.9, 5, "exponential"):
        manual.step([1.0], keep)
    assert it.masks.equal(manual.masks)
