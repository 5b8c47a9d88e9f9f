"""What only a GPU can check (marked ``cuda``: skipped, with the reason, where CUDA is absent).

``make gpu-check`` runs these and the GPU rows of ``benchmarks/bench_batched.py``.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from stable_baselines3.common.vec_env import DummyVecEnv

from panning.batched import prefill_scores, score_networks
from panning.data import load_dataset
from panning.envs.panning_env import PanningEnv, clear_caches
from panning.envs.vec_env import BatchedPanningVecEnv
from panning.indices import compute_scores
from panning.masks import Masks
from panning.models import build_model
from panning.proxy import ProxyEvaluator
from panning.pruner import Pruner
from panning.train import TrainConfig, resolve_device, train_masked

pytestmark = pytest.mark.cuda
ROOT = Path(__file__).resolve().parents[1]
CUDA = torch.device("cuda")


@pytest.fixture(autouse=True)
def exact_cuda() -> None:
    """What every library entry that resolves a device does (the tests below also pass torch.device directly)."""
    resolve_device(CUDA)


def test_resolving_cuda_makes_cudnn_deterministic_float32() -> None:
    torch.backends.cudnn.benchmark = True
    torch.backends.cudnn.allow_tf32 = True
    assert resolve_device("auto") == CUDA
    assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32


def random_masks(model: torch.nn.Module, density: float, seed: int) -> Masks:
    g = torch.Generator().manual_seed(seed)
    return Masks({k: torch.rand(v.shape, generator=g) < density for k, v in Masks.ones(model).items()})


def test_masked_training_on_the_gpu_keeps_pruned_weights_zero() -> None:
    b = load_dataset("digits")
    model = build_model("mlp", 10, (64,), seed=0)
    masks = random_masks(model, 0.1, 0)
    hist = train_masked(model, masks, b, TrainConfig(epochs=3, batch_size=64, lr=0.05, augment=False), device=CUDA,
                        seed=0, progress=False)
    assert next(model.parameters()).device.type == "cuda"
    for k, p in model.named_parameters():
        if k in masks:
            assert torch.equal(p.detach()[~masks[k].to(CUDA)], torch.zeros_like(p.detach()[~masks[k].to(CUDA)]))
    assert hist["final_val"]["accuracy"] > 0.5


def test_batched_proxy_on_the_gpu_agrees_with_one_at_a_time() -> None:
    b = load_dataset("digits")
    ev = ProxyEvaluator(b, steps=40, cache_size=0, device=CUDA)
    inits = [build_model("mlp", 10, (64,), seed=s) for s in range(4)]
    masks = [random_masks(m, 0.05, s) for s, m in enumerate(inits)]
    one = [ev.evaluate(m, k) for m, k in zip(inits, masks, strict=True)]
    many = ev.evaluate_many(inits, masks)
    for a, c in zip(one, many, strict=True):
        assert abs(a.accuracy - c.accuracy) <= 1 / len(b.val)
    assert ev.chunk_size(inits[0]) >= 4  # measured from the free memory


def test_sparse_proxy_on_the_gpu_agrees_with_the_cpu_and_with_itself_stacked() -> None:
    """The sparse route through cuSPARSE: within one validation example of the CPU's sparse route, and a
    candidate alone within one example of itself stacked (cuSPARSE does not promise the CPU's row order)."""
    b = load_dataset("digits")
    inits = [build_model("mlp", 10, (64,), seed=s) for s in range(3)]
    masks = [random_masks(m, 0.02, s) for s, m in enumerate(inits)]
    gpu = ProxyEvaluator(b, steps=40, cache_size=0, device=CUDA, sparse=True)
    cpu = ProxyEvaluator(b, steps=40, cache_size=0, device="cpu", sparse=True)
    many = gpu.evaluate_many(inits, masks)
    one = [gpu.evaluate(m, k) for m, k in zip(inits, masks, strict=True)]
    ref = cpu.evaluate_many(inits, masks)
    for a, c, r in zip(one, many, ref, strict=True):
        assert abs(a.accuracy - c.accuracy) <= 1 / len(b.val) and abs(c.accuracy - r.accuracy) <= 1 / len(b.val)
    net = gpu.train(inits[0], masks[0])
    for k, m in masks[0].items():
        assert torch.equal(net.get_parameter(k).detach()[~m.to(CUDA)], torch.zeros(int((~m).sum()), device=CUDA))
    empty = Masks({k: (torch.zeros_like(v) if k == "fc2.weight" else v) for k, v in masks[1].items()})
    r = gpu.evaluate(inits[1], empty)  # one candidate, a layer with nothing kept: cuSPARSE with an empty matrix
    assert abs(r.accuracy - cpu.evaluate(inits[1], empty).accuracy) <= 1 / len(b.val)


@pytest.mark.parametrize("model, shape", [("lenet300", (1, 28, 28)), ("resnet20", (3, 32, 32))])
def test_batched_scores_on_the_gpu_equal_one_at_a_time(model: str, shape: tuple[int, ...]) -> None:
    nets = [build_model(model, 10, shape, seed=s).to(CUDA) for s in range(3)]
    masks = [random_masks(m, 0.3, s).to(CUDA) for s, m in enumerate(nets)]
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(16, *shape, generator=g).to(CUDA), (torch.arange(16) % 10).to(CUDA))]
    import panning.batched as batched

    for name in ("magnitude", "snip", "grasp_abs", "synflow"):
        ref = [compute_scores(name, m, k, batches) for m, k in zip(nets, masks, strict=True)]
        got = score_networks(name, nets, masks, batches)
        assert all(torch.equal(a[k], c[k]) for a, c in zip(ref, got, strict=True) for k in a), name
    # which stacked routes the device ran exactly (the others fell back to one at a time): in gpu_tests.log
    verdicts = {k[0]: v for k, v in batched._EXACT.items() if k[1].startswith("cuda") and k[2] == tuple(
        type(m).__name__ for m in nets[0].modules())}
    print(f"\n{model} on {torch.cuda.get_device_name()}: stacked route exact = {verdicts}")
    assert {"magnitude", "snip", "grasp_abs", "synflow"} <= set(verdicts)
    alone = [Pruner(m, ["snip", "synflow"], batches) for m in nets]
    fed = [Pruner(m, ["snip", "synflow"], batches) for m in nets]
    prefill_scores(fed)
    for a, c in zip(alone, fed, strict=True):
        assert a.step([1.0, 1.0], 500).equal(c.step([1.0, 1.0], 500))


def _run(venv, steps: int) -> list:
    venv.seed(1)
    out = [venv.reset()]
    act = np.zeros((venv.num_envs, venv.action_space.shape[0]), np.float32)
    for _ in range(steps):
        out.append(venv.step(act)[:3])
    venv.close()
    return out


@pytest.mark.parametrize("overrides", [{}, {"model": "resnet20", "dataset": "digits_image", "pruning_steps": 2}],
                         ids=["mlp", "resnet20"])
def test_vectorised_env_on_the_gpu_matches_separate_envs(overrides: dict) -> None:
    """The same observations and ends as separate envs, and rewards within one validation example (the stacked
    proxy's kernels are not the lone one's); each side with its own caches, so the batched rewards are its own
    stacked proxy's, not the separate envs' cached results. ResNet-20: convolutions, BatchNorm and the float64
    path counting of a network with shortcuts, stacked on the device."""
    kw = dict(device="cuda", reward="absolute", **overrides)
    tiny = ROOT / "configs" / "env" / "tiny.yaml"
    clear_caches()
    a = _run(DummyVecEnv([lambda: PanningEnv(tiny, **kw) for _ in range(3)]), 3)
    clear_caches()
    b = _run(BatchedPanningVecEnv(tiny, 3, **kw), 3)
    clear_caches()
    assert np.array_equal(a[0], b[0])
    val = PanningEnv(tiny, **kw).bundle.val
    for (oa, ra, da), (ob, rb, db) in zip(a[1:], b[1:], strict=True):
        assert np.array_equal(oa, ob) and np.array_equal(da, db)
        assert np.allclose(ra, rb, atol=1 / len(val) + 1e-6)


def test_synchronised_episode_timing_on_the_gpu(monkeypatch) -> None:
    """A GPU episode knows it is on CUDA; with sync_timing its stage times are real, non-negative seconds."""
    from panning.data import balanced_batch
    from panning.episode import PruningEpisode

    monkeypatch.setattr(PruningEpisode, "sync_timing", True)
    b = load_dataset("digits")
    model = build_model("mlp", 10, (64,), seed=0).to(CUDA)
    x, y = balanced_batch(b.train, 5, 10, seed=0)
    ep = PruningEpisode(model, ["synflow", "snip"], [(x.to(CUDA), y.to(CUDA))], target_sparsity=0.9, steps=3)
    assert ep._cuda
    ep.observe()
    ep.step([0.0, 0.0, 0.0])
    assert all(v >= 0.0 for v in ep.timing.values()) and ep.timing["select"] > 0.0


def test_topk_on_the_gpu_reads_nothing_back_and_keeps_what_the_cpu_keeps() -> None:
    from panning._functional import HostReads
    from panning.masks import _topk_mask

    g = torch.Generator().manual_seed(0)
    flat = torch.randint(-3, 4, (5000,), generator=g).float()  # seven values: ties everywhere
    for k in (1, 777, 4999):
        with HostReads() as r:
            on_gpu = _topk_mask(flat.to(CUDA), k)
        assert r.n == 0
        assert torch.equal(on_gpu.cpu(), _topk_mask(flat, k))



def test_a_vectorised_step_on_the_gpu_reads_back_once() -> None:
    """What tests/test_host_reads.py counts on the CPU through the accelerator routes, on the device itself:
    a middle step of N episodes reads the device once, the step's values and the observations' together with the
    checks deferred until then (step_observe_many; nonzero_static, deferred checks, one read for N)."""
    from panning._functional import HostReads

    clear_caches()
    venv = BatchedPanningVecEnv(ROOT / "configs" / "env" / "tiny.yaml", 4, device="cuda", target_sparsity=0.95,
                                pruning_steps=6)  # steps 2 and 3 counted: neither ends an episode
    venv.seed(0)
    venv.reset()
    act = np.zeros((4, venv.action_space.shape[0]), np.float32)
    venv.step(act)
    with HostReads() as reads:
        obs, _, done, _ = venv.step(act)
    assert reads.n <= 1, reads.n
    assert np.isfinite(obs).all() and not done.any()
    # what CUDA itself reports as synchronising, kernels' own reads included (HostReads sees Python's calls)
    import warnings

    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            venv.step(act)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [str(w.message) for w in caught if "ynchroniz" in str(w.message)]
    assert len(syncs) <= 1, syncs


def test_nan_scores_on_the_gpu_fail_the_step_with_the_index_error(nan_magnitude) -> None:
    """The finiteness checks are deferred to the end of a GPU step; a NaN score still fails it, with its error."""
    from panning.episode import PruningEpisode

    batch = (torch.randn(20, 64).to(CUDA), (torch.arange(20) % 10).to(CUDA))
    ep = PruningEpisode(build_model("mlp", 10, (64,), seed=0).to(CUDA), ["magnitude", "snip"], [batch],
                        target_sparsity=0.9, steps=3)
    with pytest.raises(ValueError, match="magnitude.*non-finite"):
        ep.step([0.0, 0.0, 0.0])
