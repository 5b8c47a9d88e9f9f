"""The proxy's sparse route (``ProxySettings.sparse``): N masked MLPs as block-diagonal CSR matrices."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from stable_baselines3.common.vec_env import DummyVecEnv
from torch.func import functional_call

from panning._sparse import SparseMLPStack, supports
from panning.data import load_dataset
from panning.envs.panning_env import PanningEnv, clear_caches, make_config
from panning.envs.vec_env import BatchedPanningVecEnv
from panning.errors import ConfigError
from panning.masks import Masks
from panning.models import build_model
from panning.proxy import ProxyEvaluator, ProxySettings


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def random_masks(model: torch.nn.Module, density: float, seed: int) -> Masks:
    g = torch.Generator().manual_seed(seed)
    return Masks({k: torch.rand(v.shape, generator=g) < density for k, v in Masks.ones(model).items()})


def test_forward_and_gradients_are_the_dense_networks() -> None:
    """Logits and the gradient of every kept weight and bias match dense autograd on the masked network;
    a layer with nothing kept (fc2 of the third network) gives zero output and gradients, not an error."""
    nets = [build_model("mlp", 10, (64,), seed=s) for s in range(3)]
    masks = [dict(random_masks(n, 0.3, s).items()) for s, n in enumerate(nets)]
    masks[2]["fc2.weight"][:] = False
    stack = SparseMLPStack(nets, masks, torch.device("cpu"))
    x, y = torch.randn(7, 64), torch.randint(0, 10, (7,))
    out = stack.forward(x)
    assert out.shape == (3, 7, 10)
    F.cross_entropy(out.transpose(1, 2), y.expand(3, -1), reduction="none").mean(1).sum().backward()
    for i, (net, m) in enumerate(zip(nets, masks, strict=True)):
        p = {k: (v.detach() * m[k] if k in m else v.detach()).clone().requires_grad_(True)
             for k, v in net.named_parameters()}
        dense_out = functional_call(net, p, (x,))
        assert torch.allclose(dense_out, out[i], atol=1e-6)
        F.cross_entropy(dense_out, y).backward()
        for j, name in enumerate(stack.names):
            layer, sel = stack.layers[j], stack.layers[j].index[0] == i
            grad = torch.zeros_like(p[f"{name}.weight"])
            grad[layer.index[1][sel], layer.index[2][sel]] = stack.params[f"{name}.values"].grad[sel]
            assert torch.allclose(grad, p[f"{name}.weight"].grad * m[f"{name}.weight"], atol=1e-6), name
            assert torch.allclose(stack.params[f"{name}.bias"].grad[i], p[f"{name}.bias"].grad, atol=1e-6), name
    assert not stack.params["fc2.values"].grad[stack.layers[1].index[0] == 2].numel()


def test_sparse_training_agrees_with_dense_and_keeps_pruned_weights_zero(digits) -> None:
    """Same masks, initialisations and seed: the trained weights agree with the dense route up to float
    rounding (15 steps), pruned weights are exactly zero, and accuracy agrees within one validation example."""
    inits = [build_model("mlp", 10, (64,), seed=s) for s in range(3)]
    masks = [random_masks(m, d, s) for s, (m, d) in enumerate(zip(inits, (0.5, 0.1, 0.02), strict=True))]
    dense = ProxyEvaluator(digits, steps=15, cache_size=0)
    sparse = ProxyEvaluator(digits, steps=15, cache_size=0, sparse=True)
    for init, m in zip(inits, masks, strict=True):
        a, b = dense.train(init, m).state_dict(), sparse.train(init, m).state_dict()
        for k in a:
            assert torch.allclose(a[k], b[k], atol=1e-5), k
        for k, mk in m.items():
            assert torch.equal(b[k][~mk], torch.zeros_like(b[k][~mk]))
    dense, sparse = (ProxyEvaluator(digits, steps=40, cache_size=0, sparse=s) for s in (False, True))
    for init, m in zip(inits, masks, strict=True):
        one, other = dense.evaluate(init, m), sparse.evaluate(init, m)
        assert abs(one.accuracy - other.accuracy) <= 1 / len(digits.val)
        assert abs(one.loss - other.loss) < 1e-4


def test_a_candidate_scores_the_same_alone_or_stacked(digits) -> None:
    """Each CSR row sums its own kept weights in column order whatever N is: bit-identical results, so a
    vectorised env and separate envs give the same rewards under the sparse route."""
    inits = [build_model("mlp", 10, (64,), seed=s) for s in range(4)]
    masks = [random_masks(m, d, 10 + s) for s, (m, d) in enumerate(zip(inits, (0.3, 0.05, 0.02, 0.01), strict=True))]
    ev = ProxyEvaluator(digits, steps=30, cache_size=0, sparse=True)
    alone = [ev.evaluate(i, m) for i, m in zip(inits, masks, strict=True)]
    stacked = ev.evaluate_many(inits, masks)
    assert [(r.accuracy, r.loss) for r in alone] == [(r.accuracy, r.loss) for r in stacked]
    assert len({r.accuracy for r in stacked}) > 1
    folds = ProxyEvaluator(digits, steps=10, cache_size=0, sparse=True, folds=3)  # K-fold pools through it too
    assert [r.accuracy for r in folds.evaluate_many(inits[:2], masks[:2])] == \
        [folds.evaluate(i, m).accuracy for i, m in zip(inits[:2], masks[:2], strict=True)]


def test_sparse_is_part_of_the_cache_key(digits) -> None:
    init = build_model("mlp", 10, (64,), seed=0)
    m = random_masks(init, 0.1, 0)
    assert ProxyEvaluator(digits, steps=5).key(init, m) != ProxyEvaluator(digits, steps=5, sparse=True).key(init, m)


def test_unsupported_networks_and_bad_settings_are_clear_errors(digits) -> None:
    assert supports(build_model("mlp", 10, (64,))) and not supports(build_model("lenet5", 10, (1, 28, 28)))
    net = build_model("lenet5", 10, (1, 16, 16))
    ev = ProxyEvaluator(digits, steps=2, sparse=True)
    with pytest.raises(ConfigError, match="sparse"):
        ev.evaluate(net, Masks.ones(net))
    mlp = build_model("mlp", 10, (64,))
    with pytest.raises(ValueError, match="dense stacked route"):  # no silent dense result from a sparse evaluator
        ev.train_many([mlp], [Masks.ones(mlp)])
    with pytest.raises(ConfigError, match="sparse must be true or false"):
        ProxySettings(sparse="yes")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="sparse: true trains the mlp and lenet300 models only"):
        make_config(None, model="lenet5", proxy={"sparse": True})


@pytest.mark.parametrize("reward", ["relative", "relative_loss"])
def test_vectorised_env_matches_separate_envs_under_the_sparse_proxy(reward: str) -> None:
    """Bit for bit, both relative rewards (the sparse route gives a candidate the same bits alone or stacked)."""
    from pathlib import Path

    tiny = Path(__file__).resolve().parents[1] / "configs" / "env" / "tiny.yaml"
    kw = dict(target_sparsity=None, target_range=[0.9, 0.99], target_grid=3, reward=reward, device="cpu",
              proxy={"sparse": True})
    n, rng = 3, np.random.default_rng(0)
    actions = [rng.uniform(-1, 1, size=(n, 6)).astype(np.float32) for _ in range(4)]

    def rollout(venv):
        venv.seed(5)
        out = [venv.reset()]
        out += [venv.step(a[:, : venv.action_space.shape[0]]) for a in actions]
        return out

    clear_caches()
    separate = rollout(DummyVecEnv([lambda: PanningEnv(tiny, **kw) for _ in range(n)]))
    clear_caches()
    venv = BatchedPanningVecEnv(tiny, n, **kw)
    try:
        batched = rollout(venv)
    finally:
        venv.close()
    assert dataclasses.asdict(make_config(tiny, **kw).proxy)["sparse"] is True
    ended = 0
    for (o1, r1, d1, i1), (o2, r2, d2, i2) in zip(separate[1:], batched[1:], strict=True):
        assert np.array_equal(o1, o2) and np.array_equal(r1, r2) and np.array_equal(d1, d2)
        ended += sum("terminal_observation" in i for i in i1)
        for a, b in zip(i1, i2, strict=True):
            key = "reference_loss" if reward == "relative_loss" else "reference_accuracy"
            assert (key in a) == ("terminal_observation" in a) and a.get(key) == b.get(key)
    assert ended == n
