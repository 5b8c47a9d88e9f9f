"""Reading device values back to the host: once per call where one read suffices (issue 14, item 5).

On a GPU every ``int()``, ``.tolist()`` or ``.cpu()`` of a device tensor waits for the queued work. These
tests count such reads through a TorchFunctionMode on the CPU (the count is a property of the code) and
pin that gathering them changes no value and no digest.
"""
from __future__ import annotations

import numpy as np
import torch

from panning._functional import HostReads as _Reads
from panning.hashing import _host_arrays, masks_digest, pair_digests, state_digest
from panning.masks import Masks


def _masks(layers: int) -> Masks:
    g = torch.Generator().manual_seed(layers)
    return Masks({f"l{i}.weight": torch.rand(3 + i, 4, generator=g) < 0.5 for i in range(layers)})


def test_mask_counts_read_back_once_however_many_layers() -> None:
    for layers in (1, 7):
        expected = [int(torch.count_nonzero(t)) for t in _masks(layers).values()]
        for what in ("layer_counts", "num_kept", "layer_density"):
            m = _masks(layers)
            with _Reads() as r:
                got = getattr(m, what)
                got = got() if callable(got) else got
            assert r.n == 1, (what, layers, r.n)
            with _Reads() as r:  # the same masks again: counted already, nothing to read
                again = getattr(m, what)
                assert (again() if callable(again) else again) == got
            assert r.n == 0, (what, layers, r.n)
            if what == "layer_counts":
                assert got == expected
            elif what == "num_kept":
                assert got == sum(expected)
            else:
                assert list(got.values()) == [c / t.numel() for c, t in zip(expected, m.values(), strict=True)]


def test_gathered_host_bytes_equal_one_copy_per_tensor() -> None:
    ts = [torch.arange(6, dtype=torch.float32).reshape(2, 3).t(), torch.tensor([True, False]), torch.empty(0),
          torch.tensor(3, dtype=torch.int64), torch.arange(4, dtype=torch.float64)]
    one = _host_arrays(ts, gather=False)
    together = _host_arrays(ts, gather=True)
    assert [a.tobytes() for a in one] == [a.tobytes() for a in together]
    assert [a.dtype for a in together] == [np.uint8] * len(ts)
    with _Reads() as r:
        _host_arrays(ts, gather=True)
    assert r.n == 2  # one .cpu() and one .numpy() for all five tensors


def test_digests_unchanged_by_gathering() -> None:
    """Pinned digests, computed by the per-tensor code before the gathered route existed."""
    st = {"a": torch.arange(6, dtype=torch.float32).reshape(2, 3).t(), "b": torch.tensor([True, False]),
          "c": torch.empty(0), "d": torch.tensor(3, dtype=torch.int64), "e": torch.arange(4, dtype=torch.float64)}
    assert state_digest(st) == "4b34294f2365991489923076c0c7cfa610f537eff1c8970d0b89e5afbd552e0c"
    masks = {"x": torch.tensor([[True, False, True]]), "y": torch.zeros(0, dtype=torch.bool),
             "z": torch.tensor([1.0, 0.0])}
    assert masks_digest(masks) == "9af9b05decbc11f3cbca7753920893ae8236541c33a9a03c9198bb11c888696a"


# ---------------------------------------------------------------- the accelerator routes, taken on the CPU


def test_deferred_checks_read_once_and_raise_the_first_failure() -> None:
    from panning._functional import check, deferred_checks, device_routes

    good, bad = torch.tensor(True), torch.tensor(False)
    with device_routes(), _Reads() as r:
        with deferred_checks():
            for _ in range(5):
                check(good, lambda: AssertionError("not raised"))
    assert r.n == 1  # five flags, one read at the end of the block
    with device_routes():
        try:
            with deferred_checks():
                check(good, lambda: AssertionError("not raised"))
                check(bad, lambda: ValueError("first"))
                check(bad, lambda: ValueError("second"))
                ran_on = True  # the block runs to its end: the error comes there
        except ValueError as e:
            assert str(e) == "first" and ran_on
        else:
            raise AssertionError("a failed check was not raised")
        try:  # the block fails after a failed check: the check's error wins, the block's is its cause
            with deferred_checks():
                check(bad, lambda: ValueError("nan scores"))
                raise KeyError("what the bad values caused")
        except ValueError as e:
            assert str(e) == "nan scores" and isinstance(e.__cause__, KeyError)
    try:  # on the CPU's route a check raises at once, block or no block
        with deferred_checks():
            check(bad, lambda: ValueError("now"))
            raise AssertionError("not reached")
    except ValueError as e:
        assert str(e) == "now"


def test_read_together_reads_values_and_deferred_checks_in_one_transfer() -> None:
    import pytest

    from panning._functional import check, deferred_checks, device_routes, read_together

    values = [torch.tensor([1.5, -2.0], dtype=torch.float32), torch.arange(3), torch.tensor(True),
              torch.zeros(0)]
    with device_routes(), _Reads() as r:
        with deferred_checks():
            check(torch.tensor(True), lambda: AssertionError("not raised"))
            got = read_together(values)
            assert r.n == 1  # the values and the check's flag together
        assert r.n == 1  # the check was read with them: nothing left for the block's end
    assert [a.tolist() for a in got] == [[1.5, -2.0], [0.0, 1.0, 2.0], [1.0], []]
    assert all(a.dtype == np.float64 for a in got)
    with device_routes(), _Reads() as r:
        with pytest.raises(ValueError, match="first"), deferred_checks():
            check(torch.tensor(False), lambda: ValueError("first"))
            check(torch.tensor(False), lambda: ValueError("second"))
            read_together(values)
            raise AssertionError("not reached: the failed check raises at the read")
    assert r.n == 1
    with device_routes(), _Reads() as r:
        with pytest.raises(ValueError, match="later"), deferred_checks():
            check(torch.tensor(False), lambda: ValueError("later"))
            assert read_together([]) == [] and r.n == 0  # nothing to read: the check waits for the block's end
    assert r.n == 1


def test_an_index_with_nan_scores_fails_the_episode_step_on_either_route(nan_magnitude) -> None:
    from panning._functional import device_routes
    from panning.episode import PruningEpisode
    from panning.models import build_model

    g = torch.Generator().manual_seed(0)
    batch = (torch.randn(20, 64, generator=g), torch.arange(20) % 10)
    for forced in (False, True):
        ep = PruningEpisode(build_model("mlp", 10, (64,), seed=0), ["magnitude", "snip"], [batch],
                            target_sparsity=0.9, steps=3)
        with device_routes(forced):
            try:
                ep.step([0.0, 0.0, 0.0])
            except ValueError as e:
                assert "magnitude" in str(e) and "non-finite" in str(e), str(e)
            else:
                raise AssertionError(f"NaN scores passed (device routes: {forced})")
        # on the CPU the check comes before anything moves; deferred, it comes with the step's read, after the
        # network was pruned (the pruner moved) and before the episode counts the step
        assert ep.t == 0 and ep.pruner.steps_done == int(forced)


def test_scores_failing_inside_step_observe_many_leave_the_step_uncounted(nan_magnitude) -> None:
    """The scoring for the observation fails (magnitude NaN, unweighted by the action, so the step itself never
    scored it): on either route the error is the index's and no episode counts the step."""
    from panning._functional import device_routes
    from panning.batched import prefill_scores
    from panning.episode import PruningEpisode, step_observe_many
    from panning.models import build_model

    g = torch.Generator().manual_seed(0)
    batch = (torch.randn(20, 64, generator=g), torch.arange(20) % 10)
    for forced in (False, True):
        eps = [PruningEpisode(build_model("mlp", 10, (64,), seed=s), ["magnitude", "snip"], [batch],
                              target_sparsity=0.9, steps=3) for s in range(2)]
        with device_routes(forced):
            try:
                step_observe_many(eps, [[-1.0, 1.0, 0.0]] * 2, lambda e: prefill_scores([x.pruner for x in e]))
            except ValueError as e:
                assert "magnitude" in str(e) and "non-finite" in str(e), str(e)
            else:
                raise AssertionError(f"NaN scores passed (device routes: {forced})")
        assert [(ep.t, ep.u, ep.pruner.steps_done) for ep in eps] == [(0, 0.0, 1)] * 2


def test_masks_from_an_exact_top_k_know_their_count_until_edited() -> None:
    from panning.masks import select_topk

    scores = {"a": torch.randn(5, 7, generator=torch.Generator().manual_seed(1)), "b": torch.randn(9)}
    current = select_topk(scores, 30)
    m = select_topk(scores, 12, current=current)
    with _Reads() as r:
        assert m.num_kept == 12 and current.num_kept == 30 and m.known_kept() == 12
    assert r.n == 0
    assert sum(int(t.sum()) for t in m.values()) == 12
    m["a"].view(-1)[0] = ~m["a"].view(-1)[0]  # edited in place: the recorded count no longer holds
    assert m.known_kept() is None
    assert m.num_kept == sum(int(t.sum()) for t in m.values()) != 12
    assert m.to("cpu").num_kept == m.num_kept


def test_layerwise_masks_know_their_layer_counts() -> None:
    from panning.masks import select_topk

    g = torch.Generator().manual_seed(2)
    scores = {"a": torch.randn(5, 7, generator=g), "b": torch.randn(9, generator=g),
              "c": torch.randn(3, 4, generator=g)}
    current = select_topk(scores, 40, mode="layerwise")
    for keep, floor in ((40, 0), (17, 0), (9, 2)):
        m = select_topk(scores, keep, current=current, mode="layerwise", min_per_layer=floor)
        with _Reads() as r:
            counts = m.layer_counts()
        assert r.n == 0 and counts == [int(t.sum()) for t in m.values()] and sum(counts) == keep
        current = m
    m["b"][0] = ~m["b"][0]  # edited in place: counted again
    assert m.layer_counts() == [int(t.sum()) for t in m.values()]


def test_positions_from_a_known_count_match_nonzero_and_a_wrong_count_is_refused() -> None:
    import pytest

    from panning._functional import deferred_checks, device_routes, flat_nonzero

    mask = torch.rand(257, generator=torch.Generator().manual_seed(3)) < 0.3
    expect = mask.nonzero().squeeze(1)
    with device_routes(), _Reads() as r:
        with deferred_checks():
            got = flat_nonzero(mask, count=int(expect.numel()))
            assert r.n == 0  # sized by the count: nothing read; its check waits for the block's end
    assert r.n == 1 and torch.equal(got, expect)
    for wrong in (int(expect.numel()) + 3, int(expect.numel()) - 1):  # a stale count: refused at the block's end
        with device_routes(), pytest.raises(RuntimeError, match="recorded kept count"):
            with deferred_checks():
                got = flat_nonzero(mask, count=wrong)
                assert got.min() >= 0  # padded with a valid position, not -1: indexing with it is safe meanwhile


def test_a_vectorised_step_on_the_accelerator_routes_reads_back_few_values() -> None:
    """Issue 14, item 5: on a GPU a step should read the device only to hand SB3 its arrays. Counted on the
    CPU through the accelerator routes; what remains is listed in BENCHMARKS.md (benchmarks/host_syncs.py)."""
    from pathlib import Path

    from panning._functional import device_routes
    from panning.envs.vec_env import BatchedPanningVecEnv

    tiny = Path(__file__).resolve().parents[1] / "configs" / "env" / "tiny.yaml"
    per_step = {}
    for n in (1, 2, 4, 8):  # 1: one episode's own step (PruningEpisode.step), the route of the plain env
        venv = BatchedPanningVecEnv(tiny, n, device="cpu", target_sparsity=0.95)
        venv.seed(0)
        venv.reset()
        act = np.zeros((n, venv.action_space.shape[0]), np.float32)
        venv.step(act)  # the rewards' reads (the last step) are counted by benchmarks/host_syncs.py
        with device_routes(), _Reads() as r:
            venv.step(act)
        per_step[n] = r.n
    # one read however many episodes (step_observe_many): the step's values (the effective masks' overflow flags,
    # the loss/gradient signals and the masks' layer counts, which the shaping reward and the info need) and the
    # observations' device values together, with the checks deferred until then
    assert per_step[1] == per_step[2] == per_step[4] == per_step[8] == 1, per_step


def test_the_plain_env_steps_and_observes_with_one_read() -> None:
    from pathlib import Path

    from panning._functional import device_routes
    from panning.envs.panning_env import PanningEnv

    env = PanningEnv(Path(__file__).resolve().parents[1] / "configs" / "env" / "tiny.yaml", device="cpu",
                     target_sparsity=0.95, pruning_steps=4)
    env.reset(seed=0)
    act = np.zeros(env.action_space.shape, np.float32)
    env.step(act)
    with device_routes(), _Reads() as r:
        env.step(act)
    assert r.n == 1


def test_step_observe_many_is_step_many_then_observe_many_with_one_read() -> None:
    """The vectorised env's middle step: the same steps and observations bit for bit as step_many, the indices'
    scoring and observe_many one after the other, with one read (on the accelerator routes); ``None``, with
    nothing done, where a step would end the episodes. One episode: its own step, then its observation."""
    from panning._functional import device_routes
    from panning.batched import prefill_scores
    from panning.episode import PruningEpisode, observe_many, step_many, step_observe_many
    from panning.models import build_model

    g = torch.Generator().manual_seed(0)
    batch = (torch.randn(24, 64, generator=g), torch.arange(24) % 10)
    indices = ["magnitude", "snip", "synflow"]

    def episodes() -> list[PruningEpisode]:
        return [PruningEpisode(build_model("mlp", 10, (64,), seed=s), indices, [batch], target_sparsity=0.98,
                               steps=4, observation="layers", seed=s) for s in range(3)]

    def prefill(eps) -> None:
        prefill_scores([e.pruner for e in eps], indices)

    rng = np.random.default_rng(0)
    a, b = episodes(), episodes()
    with device_routes():
        for t in range(4):
            acts = [rng.uniform(-1, 1, 4).astype(np.float32) for _ in a]
            if t == 3:  # the last step ends every episode: not taken, nothing moved
                assert step_observe_many(b, acts, prefill) is None and all(e.t == 3 for e in b)
                break
            if t == 0:  # one episode alone: PruningEpisode.step, then observe
                alone = episodes()[0]
                with _Reads() as r:
                    (got1,), (obs1,) = step_observe_many([alone], acts[:1])  # type: ignore[misc]
                assert r.n == 1
                want1 = episodes()[0]
                assert want1.step(acts[0]).masks.equal(got1.masks)
                assert want1.observe().tobytes() == obs1.tobytes() and want1.loss_ratio == alone.loss_ratio
            want = step_many(a, acts)
            prefill(a)
            want_obs = observe_many(a)
            with _Reads() as r:
                got, got_obs = step_observe_many(b, acts, prefill)  # type: ignore[misc]
            assert r.n == 1, (t, r.kinds)
            for x, y in zip(want, got, strict=True):
                assert (x.step, x.keep, x.collapsed, x.loss_ratio, x.grad_ratio) == (
                    y.step, y.keep, y.collapsed, y.loss_ratio, y.grad_ratio)
                assert x.masks.equal(y.masks) and x.effective.equal(y.effective)
            assert all(o.tobytes() == p.tobytes() for o, p in zip(want_obs, got_obs, strict=True))



def test_pair_digests_equal_the_single_digests() -> None:
    from panning.models import build_model

    nets = [build_model("mlp", 10, (64,), seed=s) for s in range(3)]
    masks = [_masks(n + 1) for n in range(3)]
    assert pair_digests(nets, masks) == [(state_digest(n), masks_digest(m)) for n, m in zip(nets, masks, strict=True)]
    assert pair_digests([], []) == []


def test_gathered_copies_are_bounded_and_equal(monkeypatch) -> None:
    from panning import hashing

    ts = [torch.arange(n, dtype=torch.float32) for n in (3, 1, 0, 5, 2)]
    monkeypatch.setattr(hashing, "_GATHER_BYTES", 12)  # three float32 a transfer at most
    with _Reads() as r:
        got = _host_arrays(ts, gather=True)
    assert [a.tobytes() for a in got] == [a.tobytes() for a in _host_arrays(ts, gather=False)]
    assert r.n == 2 * 4  # groups [3], [1, 0], [5], [2]: one .cpu() and one .numpy() each


def test_calls_that_read_the_device_inside_are_counted() -> None:
    x = torch.tensor([0, 2, 1, 2])
    with _Reads() as r:
        torch.bincount(x, minlength=3)
        torch.repeat_interleave(torch.arange(3), torch.tensor([1, 2, 3]))
        x[x > 0]
    assert r.n == 3
    with _Reads() as r:  # their reading-free forms
        torch.zeros(3, dtype=torch.long).index_add_(0, x, torch.ones_like(x))
        torch.repeat_interleave(torch.arange(3), torch.tensor([1, 2, 3]), output_size=6)
        x[torch.tensor([1, 3])]
        torch.where(x > 0, x, 0)
    assert r.n == 0


def test_deferred_checks_belong_to_their_thread() -> None:
    import threading

    from panning._functional import check, deferred_checks, device_routes

    results: dict[str, str] = {}
    inside = threading.Barrier(2)

    def run(name: str, ok: bool) -> None:
        try:
            with device_routes(), deferred_checks():
                check(torch.tensor(ok), lambda: ValueError(name))
                inside.wait(timeout=10)  # both blocks open at once
            results[name] = "passed"
        except ValueError as e:
            results[name] = f"raised {e}"

    threads = [threading.Thread(target=run, args=("good", True)), threading.Thread(target=run, args=("bad", False))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == {"good": "passed", "bad": "raised bad"}
