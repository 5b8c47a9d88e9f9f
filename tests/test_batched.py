"""N networks at once: the batched proxy, batched scoring and selection, the vectorised environment."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from stable_baselines3.common.vec_env import DummyVecEnv
from torch import nn

from panning._functional import device_routes
from panning.batched import score_networks, select_topk_rows
from panning.data import balanced_batch, load_dataset
from panning.envs.panning_env import PanningEnv, clear_caches
from panning.envs.vec_env import BatchedPanningVecEnv, SubprocBatchedVecEnv
from panning.indices import available_indices, compute_scores
from panning.masks import Masks, keep_count, select_topk
from panning.models import build_model
from panning.proxy import ProxyEvaluator
from panning.pruner import Pruner

ROOT = Path(__file__).resolve().parents[1]
TINY_ENV = ROOT / "configs" / "env" / "tiny.yaml"


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def random_masks(model: nn.Module, density: float, seed: int) -> Masks:
    g = torch.Generator().manual_seed(seed)
    return Masks({k: torch.rand(v.shape, generator=g) < density for k, v in Masks.ones(model).items()})


class BNNet(nn.Module):
    """A small BatchNorm network (Linear, BatchNorm1d, ReLU, Linear) for the digits' 64 features."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.fc1, self.bn, self.fc2 = nn.Linear(64, 48), nn.BatchNorm1d(48), nn.Linear(48, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.bn(self.fc1(x.flatten(1)))))


# ------------------------------------------------------------------------------------------- proxy


def test_batched_proxy_agrees_with_one_at_a_time(digits) -> None:
    """Same masks, initialisations and seed: the same accuracy up to one validation example (float
    rounding of batched products may flip one borderline prediction; here they do not)."""
    ev = ProxyEvaluator(digits, steps=40, cache_size=0)
    inits = [build_model("mlp", 10, (64,), seed=s) for s in range(3)]
    masks = [random_masks(m, d, s) for s, (m, d) in enumerate(zip(inits, (0.5, 0.1, 0.02), strict=True))]
    one = [ev.evaluate(m, k) for m, k in zip(inits, masks, strict=True)]
    many = ev.evaluate_many(inits, masks)
    n_val = len(digits.val)
    for a, b in zip(one, many, strict=True):
        assert abs(a.accuracy - b.accuracy) <= max(1e-4, 1 / n_val)
        assert abs(a.loss - b.loss) < 1e-4
    assert len({round(r.accuracy, 6) for r in many}) > 1  # three different candidates, not one repeated


def test_batched_proxy_with_batchnorm_keeps_per_candidate_statistics(digits) -> None:
    ev = ProxyEvaluator(digits, BNNet, steps=15, cache_size=0)
    inits = [BNNet(s) for s in range(3)]
    masks = [random_masks(m, 0.3, 10 + s) for s, m in enumerate(inits)]
    template, params, buffers = ev.train_many(inits, masks)
    for i, (init, m) in enumerate(zip(inits, masks, strict=True)):
        single = ev.train(init, m).state_dict()
        for k in params:
            assert torch.allclose(params[k][i], single[k], atol=1e-5), k
        for k in ("bn.running_mean", "bn.running_var"):
            assert torch.allclose(buffers[k][i], single[k], atol=1e-5), k
        assert int(buffers["bn.num_batches_tracked"][i]) == 15
        for k, mk in m.items():  # pruned weights exactly zero after training
            assert torch.equal(params[k][i][~mk], torch.zeros_like(params[k][i][~mk]))
    assert not torch.allclose(buffers["bn.running_mean"][0], buffers["bn.running_mean"][1])
    one = [ev.evaluate(i, m) for i, m in zip(inits, masks, strict=True)]
    many = ev.evaluate_many(inits, masks)
    for a, b in zip(one, many, strict=True):
        assert abs(a.accuracy - b.accuracy) <= max(1e-4, 1 / len(digits.val))


def test_one_at_a_time_route_of_evaluate_many_equals_evaluate_and_reads_once(digits) -> None:
    """Where evaluate_many trains one candidate at a time (stacked off), its results are evaluate's bit for bit,
    and all the candidates' scores come back in one read (their cache keys were taken together before)."""
    from panning._functional import HostReads

    inits = [build_model("mlp", 10, (64,), seed=s) for s in range(3)]
    masks = [random_masks(m, d, s) for s, (m, d) in enumerate(zip(inits, (0.5, 0.1, 0.02), strict=True))]
    one = [ProxyEvaluator(digits, steps=10, cache_size=0).evaluate(m, k) for m, k in zip(inits, masks, strict=True)]
    ev = ProxyEvaluator(digits, steps=10, cache_size=0, stacked=False)
    assert not ev.stacks(inits[0])
    with HostReads() as reads:
        many = ev.evaluate_many(inits, masks)
    assert [(r.accuracy, r.loss, r.cached) for r in many] == [(r.accuracy, r.loss, False) for r in one]
    assert reads.kinds.get("tolist") == 1 and ev.misses == 3


@pytest.mark.parametrize("stacked", [True, False])
def test_a_candidate_given_twice_in_one_call_is_trained_once(digits, stacked: bool) -> None:
    net = build_model("mlp", 10, (64,), seed=0)
    a, b = random_masks(net, 0.3, 1), random_masks(net, 0.3, 2)
    ev = ProxyEvaluator(digits, steps=10, stacked=stacked)
    got = ev.evaluate_many([net] * 4, [a, b, a, Masks({k: v.clone() for k, v in a.items()})])  # by value too
    assert [r.cached for r in got] == [False, False, True, True] and (ev.misses, ev.hits) == (2, 2)
    assert got[0].accuracy == got[2].accuracy == got[3].accuracy and got[0].loss == got[3].loss
    assert ProxyEvaluator(digits, steps=10, cache_size=0, stacked=stacked).evaluate_many([net] * 2, [a, a])[1].cached \
        is False  # no cache: no keys, each candidate trained


def test_chunks_and_cache(digits) -> None:
    inits = [build_model("mlp", 10, (64,), seed=s) for s in range(5)]
    masks = [random_masks(m, 0.2, s) for s, m in enumerate(inits)]
    whole = ProxyEvaluator(digits, steps=10, cache_size=0).evaluate_many(inits, masks)
    ev = ProxyEvaluator(digits, steps=10, max_candidates=2)
    assert ev.chunk_size() == 2
    chunked = ev.evaluate_many(inits, masks)
    assert [r.accuracy for r in chunked] == [r.accuracy for r in whole]
    again = ev.evaluate_many(inits[::-1], masks[::-1])
    assert all(r.cached for r in again) and [r.accuracy for r in again] == [r.accuracy for r in whole][::-1]
    with pytest.raises(ValueError, match="masks"):
        ev.evaluate_many(inits, masks[:2])


def test_a_chunk_out_of_device_memory_is_trained_again_in_halves(digits, monkeypatch) -> None:
    """A chunk that runs out of device memory (the size measured per candidate too small) is trained again in
    halves, with the same results, and later calls start from the smaller chunk."""
    inits = [build_model("mlp", 10, (64,), seed=s) for s in range(5)]
    masks = [random_masks(m, 0.2, s) for s, m in enumerate(inits)]
    whole = ProxyEvaluator(digits, steps=10, cache_size=0).evaluate_many(inits, masks)
    ev = ProxyEvaluator(digits, steps=10, cache_size=0, max_candidates=8)
    real, sizes = ev._chunk_sums, []

    def tight(part_inits, part_masks):
        sizes.append(len(part_inits))
        if len(part_inits) > 2:  # what a device with room for two candidates would do
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(part_inits, part_masks)

    monkeypatch.setattr(ev, "_chunk_sums", tight)
    got = ev.evaluate_many(inits, masks)
    assert sizes == [5, 2, 2, 1]
    assert [r.accuracy for r in got] == [r.accuracy for r in whole]
    assert [r.loss for r in got] == [r.loss for r in whole]
    assert ev.chunk_size() == 2
    sizes.clear()
    ev.evaluate_many(inits[:3], masks[:3])
    assert sizes == [2, 1]

    def never(part_inits, part_masks):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(ev, "_chunk_sums", never)
    with pytest.raises(torch.cuda.OutOfMemoryError):  # one candidate that does not fit: the error, not a loop
        ev.evaluate_many(inits[:1], masks[:1])


# ------------------------------------------------------------------------------ scoring, selection


@pytest.mark.parametrize("model", ["mlp", "lenet5"])
def test_batched_scores_are_bit_identical_and_so_are_the_masks(model: str) -> None:
    shape = (64,) if model == "mlp" else (1, 28, 28)
    nets = [build_model(model, 10, shape, seed=s) for s in range(3)]
    masks = [random_masks(m, 0.4, s) for s, m in enumerate(nets)]
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(20, *shape, generator=g), torch.arange(20) % 10)]
    for name in available_indices():
        ref = [compute_scores(name, m, k, batches, input_shape=shape, seed=7 + i)
               for i, (m, k) in enumerate(zip(nets, masks, strict=True))]
        got = score_networks(name, nets, masks, batches, input_shape=shape, seeds=[7, 8, 9])
        for a, b in zip(ref, got, strict=True):
            assert list(a) == list(b) and all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a), name
    # and a multi-index step of N pruners fed batched scores gives the masks of N pruners on their own
    from panning.batched import prefill_scores

    alone = [Pruner(m, ["snip", "synflow", "grasp_abs"], batches, seed=i) for i, m in enumerate(nets)]
    fed = [Pruner(m, ["snip", "synflow", "grasp_abs"], batches, seed=i) for i, m in enumerate(nets)]
    for step, keep in enumerate((2000, 300)):
        prefill_scores(fed)
        for a, b in zip(alone, fed, strict=True):
            w = [1.0, 0.5, 0.25 * (step + 1)]
            assert a.step(w, min(keep, a.masks.num_kept)).equal(b.step(w, min(keep, b.masks.num_kept)))


@settings(max_examples=40, deadline=None)
@given(data=st.data(), n=st.integers(1, 4), sizes=st.lists(st.integers(1, 12), min_size=1, max_size=3))
def test_topk_rows_equal_select_topk_per_row(data, n: int, sizes: list[int]) -> None:
    rows, alives, keeps, refs = [], [], [], []
    for _ in range(n):
        sc = {f"l{i}": torch.tensor(data.draw(st.lists(st.integers(0, 3), min_size=s, max_size=s)), dtype=torch.float32)
              for i, s in enumerate(sizes)}  # few distinct values: many ties
        alive = {k: torch.tensor(data.draw(st.lists(st.booleans(), min_size=v.numel(), max_size=v.numel())))
                 for k, v in sc.items()}
        keep = data.draw(st.integers(0, sum(int(a.sum()) for a in alive.values())))
        refs.append(torch.cat(list(select_topk(sc, keep, current=Masks(alive)).values())))
        rows.append(torch.cat(list(sc.values())))
        alives.append(torch.cat(list(alive.values())))
        keeps.append(keep)
    got = select_topk_rows(torch.stack(rows), keeps, torch.stack(alives))
    assert torch.equal(got, torch.stack(refs))


# ---------------------------------------------------------------------------------- the VecEnv

ENV_KW = dict(target_sparsity=None, target_range=[0.9, 0.99], target_grid=3, reward="relative", device="cpu")


def _rollout(venv, n: int, steps: int = 7):
    venv.seed(5)
    out = [venv.reset()]
    rng = np.random.default_rng(0)
    for _ in range(steps):
        a = rng.uniform(-1, 1, size=(n, venv.action_space.shape[0])).astype(np.float32)
        out.append(venv.step(a))
    return out


@pytest.mark.parametrize("workers", [None, 2])
def test_vectorised_env_matches_separate_envs_step_by_step(workers: int | None) -> None:
    """One process (workers None) or the episodes split over two processes of a stacked env each."""
    n = 3
    clear_caches()
    separate = _rollout(DummyVecEnv([lambda: PanningEnv(TINY_ENV, **ENV_KW) for _ in range(n)]), n)
    clear_caches()
    batched_env = (BatchedPanningVecEnv(TINY_ENV, n, **ENV_KW) if workers is None
                   else SubprocBatchedVecEnv(TINY_ENV, n, workers, **ENV_KW))
    try:
        batched = _rollout(batched_env, n)
    finally:
        batched_env.close()
    assert np.array_equal(separate[0], batched[0])
    finished = 0
    for (o1, r1, d1, i1), (o2, r2, d2, i2) in zip(separate[1:], batched[1:], strict=True):
        assert np.array_equal(o1, o2) and np.array_equal(d1, d2)
        assert np.allclose(r1, r2, atol=1e-6)
        for a, b in zip(i1, i2, strict=True):
            assert a["sparsity"] == b["sparsity"] and a["index_weights"] == b["index_weights"]
            if "terminal_observation" in a:
                finished += 1
                assert np.array_equal(a["terminal_observation"], b["terminal_observation"])
                assert a["proxy_accuracy"] == pytest.approx(b["proxy_accuracy"], abs=1 / 135)
                assert a["reference_accuracy"] == pytest.approx(b["reference_accuracy"], abs=1 / 135)
    assert finished == 2 * n  # T = 3: episodes end at steps 3 and 6 and restart on their own


@pytest.mark.parametrize("observation", ["summary", "layers"])
def test_accelerator_routes_give_the_same_episodes_on_the_cpu(observation: str) -> None:
    """The routes written for a GPU (torch kernels, sorts, no host reads), taken on the CPU through
    ``device_routes``: the same observations, rewards and masks bit for bit, as every route is exact. No GPU
    has run this code; this is what checks those routes' logic here."""
    kw = {**ENV_KW, "observation": observation, "layer_actions": 2 if observation == "layers" else 0}
    out = []
    for forced in (False, True):
        clear_caches()
        venv = BatchedPanningVecEnv(TINY_ENV, 3, **kw)
        with device_routes(forced):
            rollout = _rollout(venv, 3)
            masks = [e.episode.masks for e in venv.envs]
        out.append((rollout, [torch.cat([m.reshape(-1) for m in ms.values()]) for ms in masks]))
    (host, host_masks), (dev, dev_masks) = out
    assert np.array_equal(host[0], dev[0])
    for (o1, r1, d1, i1), (o2, r2, d2, i2) in zip(host[1:], dev[1:], strict=True):
        assert np.array_equal(o1, o2) and np.array_equal(r1, r2) and np.array_equal(d1, d2)
        for a, b in zip(i1, i2, strict=True):
            if "terminal_observation" in a:
                assert np.array_equal(a["terminal_observation"], b["terminal_observation"])
    assert all(torch.equal(a, b) for a, b in zip(host_masks, dev_masks, strict=True))


@pytest.mark.parametrize("workers", [None, 2])
def test_vec_env_contract(workers: int | None) -> None:
    """The VecEnv contract, checked as SB3's own VecEnv tests do."""
    n = 2
    venv = (BatchedPanningVecEnv(TINY_ENV, n, device="cpu", reward="absolute") if workers is None
            else SubprocBatchedVecEnv(TINY_ENV, n, workers, device="cpu", reward="absolute"))
    assert venv.num_envs == n
    venv.seed(3)
    obs = venv.reset()
    assert obs.shape == (n, *venv.observation_space.shape) and obs.dtype == np.float32
    assert all(venv.observation_space.contains(o) for o in obs)
    assert len(venv.reset_infos) == n and all("target_sparsity" in i for i in venv.reset_infos)
    actions = np.stack([venv.action_space.sample() for _ in range(n)])
    venv.step_async(actions)
    obs, rewards, dones, infos = venv.step_wait()
    assert obs.shape == (n, *venv.observation_space.shape) and rewards.shape == (n,) and dones.shape == (n,)
    assert rewards.dtype == np.float32 and dones.dtype == bool and isinstance(infos, list) and len(infos) == n
    for _ in range(2):
        obs, rewards, dones, infos = venv.step(actions)
    assert dones.all() and all("terminal_observation" in i and "TimeLimit.truncated" in i for i in infos)
    assert all(i["proxy_accuracy"] == r for i, r in zip(infos, rewards, strict=True))  # absolute reward
    # seeding: the same seed gives the same first observations and draws
    venv.seed(11)
    a = venv.reset()
    targets = venv.get_attr("target_sparsity")
    venv.seed(11)
    assert np.array_equal(a, venv.reset()) and venv.get_attr("target_sparsity") == targets
    seeds = venv.get_attr("init_seed")
    assert len(seeds) == n and venv.get_attr("init_seed", indices=[1]) == seeds[1:]
    assert venv.get_attr("init_seed", indices=[1, 0, 1]) == [seeds[1], seeds[0], seeds[1]]
    venv.set_attr("marker", 7, indices=0)
    assert venv.get_attr("marker", indices=[0]) == [7]
    assert venv.env_method("cached_reference", 0.5, 0, indices=[0]) == [None]
    assert venv.env_is_wrapped(PanningEnv) == [True, True]
    venv.close()


def test_a_tiny_batched_agent_trains_saves_and_resumes(tmp_path: Path) -> None:
    from panning.agents.config import load_agent_config
    from panning.agents.policy import load_agent
    from panning.agents.train import AGENT_FILE, train_agent

    cfg = dataclasses.replace(load_agent_config(ROOT / "configs" / "agent" / "tiny.yaml"), vec_env="batched",
                              n_envs=4, n_steps=6, batch_size=12, n_timesteps=48, eval_freq=0, checkpoint_freq=24)
    out = tmp_path / "run"
    record = train_agent(cfg, out, log=lambda s: None, progress_bar=False)
    assert record["timesteps"] == 48 and record["finished"]
    assert load_agent(out / AGENT_FILE).model.num_timesteps == 48
    spec = (out / "agent.yaml").read_text().replace("n_timesteps: 48", "n_timesteps: 72")
    (out / "agent.yaml").write_text(spec)
    assert train_agent(None, out, resume=True, log=lambda s: None, progress_bar=False)["timesteps"] == 72
    assert json.loads((out / "train.json").read_text())["sessions"] == 2


def test_a_tiny_agent_trains_on_batched_envs_in_two_processes(tmp_path: Path) -> None:
    from panning.agents.config import load_agent_config
    from panning.agents.policy import load_agent
    from panning.agents.train import AGENT_FILE, train_agent

    cfg = dataclasses.replace(load_agent_config(ROOT / "configs" / "agent" / "tiny.yaml"), vec_env="batched",
                              batched_workers=2, n_envs=4, n_steps=6, batch_size=12, n_timesteps=24, eval_freq=0,
                              checkpoint_freq=0)
    record = train_agent(cfg, tmp_path / "run", log=lambda s: None, progress_bar=False)
    assert record["timesteps"] == 24 and record["finished"]
    assert load_agent(tmp_path / "run" / AGENT_FILE).model.num_timesteps == 24


@pytest.mark.parametrize("change, message", [
    ({"batched_workers": 2}, "batched_workers splits vec_env: batched over processes"),
    ({"vec_env": "batched", "n_envs": 2, "batched_workers": 3}, "must not exceed n_envs"),
    ({"vec_env": "batched", "batched_workers": 0}, "batched_workers must be >= 1"),
])
def test_bad_batched_workers_are_refused(change: dict, message: str) -> None:
    from panning.agents.config import load_agent_config
    from panning.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        dataclasses.replace(load_agent_config(ROOT / "configs" / "agent" / "tiny.yaml"), **change)


def test_scoring_batch_is_shared(digits) -> None:
    """The vectorised env's envs score on the same class-balanced batch (prefill assumes it)."""
    venv = BatchedPanningVecEnv(TINY_ENV, 2, device="cpu")
    (x0, y0), (x1, y1) = venv.envs[0].batches[0], venv.envs[1].batches[0]
    assert torch.equal(x0, x1) and torch.equal(y0, y1)
    x, y = balanced_batch(digits.train, 5, 10, seed=0)
    assert torch.equal(x0, x)


def test_indices_without_an_exact_stacked_route_are_left_to_the_pruners(monkeypatch) -> None:
    """Where the stacked route was found inexact, prefill leaves the index to each pruner, which then scores
    the indices it reads together (SNIP and GraSP share their gradient) with the same bits as alone."""
    import panning.batched as batched

    class Inexact(dict):
        def get(self, key, default=None):  # every stacked route "found" inexact
            return False

    monkeypatch.setattr(batched, "_EXACT", Inexact())
    nets = [build_model("mlp", 10, (64,), seed=s) for s in range(3)]
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(20, 64, generator=g), torch.arange(20) % 10)]
    names = ["snip", "grasp_abs", "magnitude"]
    fed = [Pruner(m, names, batches, seed=i) for i, m in enumerate(nets)]
    assert not batched.may_stack("snip", nets, [p.masks for p in fed], batches)
    batched.prefill_scores(fed)
    assert all(p.needs_scores(n) for p in fed for n in names)  # nothing computed one by one per index here
    for i, p in enumerate(fed):
        got = p.scores(names)
        for n in names:
            ref = compute_scores(n, nets[i], p.masks, batches, seed=p.score_seed())
            assert all(torch.equal(ref[k], got[n][k]) for k in ref), n


def test_a_stacked_route_is_checked_again_for_another_number_of_networks(monkeypatch) -> None:
    """Exactness found at one N is not taken for another (a device may pick its batched kernels by the batch
    size): the first and the last network are scored alone again, and the route's verdict is kept per N."""
    import panning.batched as batched

    monkeypatch.setattr(batched, "_EXACT", {})
    alone: list[int] = []
    real = batched.compute_scores

    def counted(*args, **kwargs):
        alone.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(batched, "compute_scores", counted)
    g = torch.Generator().manual_seed(2)
    batches = [(torch.randn(12, 64, generator=g), torch.arange(12) % 10)]
    nets = [build_model("mlp", 10, (64,), seed=s) for s in range(4)]
    masks = [Masks.ones(n) for n in nets]
    score_networks("snip", nets[:3], masks[:3], batches)
    assert len(alone) == 2  # the first time at N = 3: two networks alone
    score_networks("snip", nets[:3], masks[:3], batches)
    assert len(alone) == 2  # N = 3 again: the verdict is kept
    got = score_networks("snip", nets, masks, batches)
    assert len(alone) == 4  # N = 4: checked again
    assert sorted(k[-1] for k in batched._EXACT) == [3, 4]
    for net, m, s in zip(nets, masks, got, strict=True):
        ref = real("snip", net, m, batches)
        assert all(torch.equal(ref[k], s[k]) for k in ref)


@pytest.mark.parametrize("grasp", ["grasp", "grasp_abs"])
def test_snip_and_grasp_from_one_stacked_pass_equal_each_network_alone(grasp: str) -> None:
    """prefill_scores gives SNIP and GraSP from one stacked pass (SNIP's gradient is GraSP's first), checked once
    against one network; every pruner then holds each index's scores bit for bit as it would compute them alone."""
    import panning.batched as batched

    nets = [build_model("mlp", 10, (64,), seed=s) for s in range(4)]
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(30, 64, generator=g), torch.arange(30) % 10)]
    fed = [Pruner(m, ["synflow", "snip", grasp], batches, seed=i) for i, m in enumerate(nets)]
    for i, p in enumerate(fed):  # different masks per network
        p.step([1.0, 1.0, 1.0], keep_count(p.num_total, 0.5 + 0.1 * i))
    batched.prefill_scores(fed)
    route = [k for k in batched._EXACT if k[0] == f"snip+{grasp}"]
    assert route  # the shared pass was tried for this architecture
    if batched._EXACT[route[0]]:
        assert not any(p.needs_scores("snip") or p.needs_scores(grasp) for p in fed)  # handed over by the pass
    for p, net in zip(fed, nets, strict=True):
        got = p.scores(["snip", grasp])
        for n in ("snip", grasp):
            ref = compute_scores(n, net, p.masks, batches, seed=p.score_seed())
            assert all(torch.equal(ref[k], got[n][k]) for k in ref), n


def test_prefill_leaves_an_index_with_its_own_temperature_to_the_pruner() -> None:
    """A pruner scoring GraSP with a logit temperature (Panning's reference code: T = 200) keeps computing it itself:
    the stacked routes use the plain cross-entropy, so prefill must not hand it those scores."""
    import panning.batched as batched

    nets = [build_model("mlp", 10, (64,), seed=s) for s in range(3)]
    g = torch.Generator().manual_seed(2)
    batches = [(torch.randn(20, 64, generator=g), torch.arange(20) % 10)]
    fed = [Pruner(m, ["snip", "grasp"], batches, seed=i, temperatures={"grasp": 200.0}) for i, m in enumerate(nets)]
    plain = [Pruner(m, ["snip", "grasp"], batches, seed=i) for i, m in enumerate(nets)]
    batched.prefill_scores(fed)
    assert all(p.needs_scores("grasp") for p in fed)
    for p, q in zip(fed, plain, strict=True):
        tempered, untempered = p.scores(["grasp"])["grasp"], q.scores(["grasp"])["grasp"]
        assert any(not torch.equal(tempered[k], untempered[k]) for k in tempered)  # the temperature matters here
