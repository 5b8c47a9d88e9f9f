"""Scripts under benchmarks/ whose options change what they measure (not how fast): run small, end to end."""
from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import math
import sys
from pathlib import Path
from types import ModuleType, SimpleNamespace

import pytest
import torch

from panning.cli import run_guarded

REPO = Path(__file__).resolve().parents[1]
TINY_STUDY = ["--sparsities", "0.99", "--val-sizes", "95", "--epochs", "2", "--workers", "1"]


def _script(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name.removesuffix(".py"), REPO / "benchmarks" / name)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # the worker pool pickles the script's functions by module name
    # a script run as ``python benchmarks/X.py`` finds its neighbours (bench_batched's workers_rate) on sys.path
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        spec.loader.exec_module(mod)
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    return mod


def _run(name: str, *args: str) -> SimpleNamespace:
    """The script as its ``__main__`` runs it (``run_guarded``): exit code, stdout and stderr. In this process
    (a subprocess costs seconds of imports each), leaving nothing behind: the module and the global RNG."""
    mod, out, err = _script(name), io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), torch.random.fork_rng():
            rc = run_guarded(lambda: mod.main(list(args)), name)
    finally:
        sys.modules.pop(mod.__name__, None)
    return SimpleNamespace(returncode=rc, stdout=out.getvalue(), stderr=err.getvalue())


def _proxy_trust(*args: str) -> SimpleNamespace:
    return _run("proxy_trust.py", *TINY_STUDY, *args)


def test_proxy_trust_reuses_an_earlier_truth_for_new_proxies(tmp_path: Path) -> None:
    """--truth-from: the same masks and truth without training them again; new budgets are ranked against it,
    and the budget both runs share gives the same proxy numbers and rho. A study of other masks is refused."""
    first, second = tmp_path / "a.json", tmp_path / "b.json"
    r = _proxy_trust("--mixtures", "1", "--train-seeds", "2", "--budgets", "20", "--json", str(first))
    assert r.returncode == 0, r.stderr
    r = _proxy_trust("--mixtures", "1", "--budgets", "20", "40", "--truth-from", str(first), "--json", str(second))
    assert r.returncode == 0, r.stderr
    a, b = json.loads(first.read_text()), json.loads(second.read_text())
    assert [m["truth"] for m in a["masks"]] == [m["truth"] for m in b["masks"]]
    assert b["full_seconds_per_run"] == a["full_seconds_per_run"]  # carried over: no training ran
    for ma, mb in zip(a["masks"], b["masks"], strict=True):
        assert ma["proxy"]["acc val95@20"] == mb["proxy"]["acc val95@20"]
        assert "acc val95@40" in mb["proxy"]
    assert a["table"][0]["rho_near"]["acc val95@20"] == b["table"][0]["rho_near"]["acc val95@20"]
    r = _proxy_trust("--mixtures", "2", "--budgets", "20", "--truth-from", str(first))
    assert r.returncode == 2 and "--mixtures 1 (here 2)" in r.stderr and r.stderr.count("\n") == 1
    r = _proxy_trust("--mixtures", "1", "--budgets", "20", "--truth-from", str(first), "--epochs", "3")
    assert r.returncode == 2 and "--epochs 2 (here 3)" in r.stderr
    for change, match in [(lambda d: d["masks"][0].update(digest="0" * 64), "bits"),  # the mask code changed
                          (lambda d: d["recipe"].update(lr=0.5), "another recipe"),  # the config file changed
                          (lambda d: d.pop("masks"), "not the --json of a proxy_trust.py run")]:
        edited = json.loads(json.dumps(a))
        change(edited)
        first.write_text(json.dumps(edited))
        r = _proxy_trust("--mixtures", "1", "--budgets", "20", "--truth-from", str(first))
        assert r.returncode == 2 and match in r.stderr and r.stderr.count("\n") == 1, r.stderr


def test_proxy_trust_sparse_twins_and_a_truth_without_an_agent(tmp_path: Path) -> None:
    """--sparse adds a "+sp" twin of every variant (the sparse route: within a few validation images of the dense
    one); --truth-from accepts a run given fewer agents than the earlier one and leaves their masks out."""
    first, second = tmp_path / "a.json", tmp_path / "b.json"
    r = _proxy_trust("--mixtures", "1", "--train-seeds", "1", "--budgets", "20", "--agents", "shipped:default",
                     "--json", str(first))
    assert r.returncode == 0, r.stderr
    r = _proxy_trust("--mixtures", "1", "--budgets", "20", "--sparse", "--truth-from", str(first),
                     "--json", str(second))
    assert r.returncode == 0, r.stderr
    a, b = json.loads(first.read_text()), json.loads(second.read_text())
    assert "1 of its masks left out (agents not given here)" in r.stdout
    assert [m["mask"] for m in a["masks"] if not m["mask"].startswith("agent:")] == [m["mask"] for m in b["masks"]]
    for m in b["masks"]:
        assert abs(m["proxy"]["acc val95@20"] - m["proxy"]["acc val95@20+sp"]) <= 3 / 95
    assert "acc val95@20+sp" in b["table"][0]["rho_near"]
    edited = json.loads(first.read_text())
    edited["masks"][0]["digest"] = "0" * 64  # as if another machine's rounding had built it otherwise
    first.write_text(json.dumps(edited))
    r = _proxy_trust("--mixtures", "1", "--budgets", "20", "--truth-from", str(first))
    assert r.returncode == 2 and "--skip-changed" in r.stderr and r.stderr.count("\n") == 1
    r = _proxy_trust("--mixtures", "1", "--budgets", "20", "--truth-from", str(first), "--skip-changed",
                     "--json", str(second))
    assert r.returncode == 0, r.stderr
    name = f"{a['masks'][0]['mask']} at {a['masks'][0]['sparsity']}"
    assert f"--skip-changed: left out {name}" in r.stdout
    assert [m["mask"] for m in json.loads(second.read_text())["masks"]] == [m["mask"] for m in b["masks"][1:]]


def test_proxy_trust_pools_folds_repeats_and_reads_the_truth_on_two_image_halves(tmp_path: Path) -> None:
    """--folds, --repeats and --recipe add their variants; the truth is also read on two halves of its images
    (a ceiling reported per sparsity); bad counts are refused in one line."""
    out = tmp_path / "s.json"
    r = _proxy_trust("--mixtures", "1", "--train-seeds", "2", "--budgets", "10", "--folds", "2", "--repeats", "2",
                     "--recipe", "--json", str(out))
    assert r.returncode == 0, r.stderr
    d = json.loads(out.read_text())
    keys = set(d["masks"][0]["proxy"])
    assert {"acc val95@10", "acc val95@10x2", "acc cv2@10", "acc val95@recipe", "loss cv2@recipe"} <= keys
    n_truth = 400  # the default --truth-size: halves of 200 images each
    for m in d["masks"]:
        assert len(m["truth_halves"]) == 2
        for acc, (a, b) in zip(m["truth"], m["truth_halves"], strict=True):
            assert abs(acc - (a + b) / 2) <= 1 / n_truth
    # two training seeds of one split: their mean is what a repeated proxy reports, not the first seed's alone
    assert any(m["proxy"]["loss val95@10x2"] != m["proxy"]["loss val95@10"] for m in d["masks"])
    assert "image_ceiling_near" in d["table"][0] and "image-half" in r.stdout
    r = _proxy_trust("--budgets", "10", "--folds", "1")
    assert r.returncode == 2 and "--folds and --repeats take counts >= 2" in r.stderr and r.stderr.count("\n") == 1


def test_agent_reward_scores_agent_files_and_checkpoints_on_the_same_episodes(tmp_path: Path) -> None:
    """agent_reward.py: an agent file and a checkpoint of its run (policy settings from the run's agent.yaml)
    play every (target, init) episode; the same agent twice scores the same; a stray zip is refused."""
    from panning.agents.train import train_agent

    run = tmp_path / "run"
    train_agent(REPO / "configs" / "agent" / "tiny.yaml", run, log=lambda s: None)
    ckpt = sorted((run / "checkpoints").glob("*.zip"))[-1]
    out = tmp_path / "r.json"
    cmd = ["--env", str(REPO / "configs" / "env" / "tiny.yaml"), "--targets", "0.9", "--inits", "1000", "1001",
           "--threads", "1", "--json", str(out)]
    r = _run("agent_reward.py", *cmd, "--agents", str(run / "agent.zip"), str(ckpt), str(run / "agent.zip"))
    assert r.returncode == 0, r.stderr
    rows = json.loads(out.read_text())["episodes"]
    assert len(rows) == 3 * 2 and all(x["proxy_accuracy"] is not None for x in rows)
    assert [x["reward"] for x in rows[:2]] == [x["reward"] for x in rows[4:]]
    assert "| agent | mean | 90% |" in r.stdout
    r = _run("agent_reward.py", *cmd, "--agents", str(run / "agent.zip"), "--reward", "relative_loss")
    assert r.returncode == 0, r.stderr
    assert "ln(the best single index's proxy loss / the agent's)" in r.stdout
    for x in json.loads(out.read_text())["episodes"]:
        ratio = math.log(x["reference_loss"]) - math.log(x["proxy_loss"])
        assert x["reward"] == pytest.approx(min(max(ratio, -1.0), 1.0))
    stray = tmp_path / "stray.zip"
    stray.write_bytes(ckpt.read_bytes())
    r = _run("agent_reward.py", *cmd, "--agents", str(stray))
    assert r.returncode == 2 and "not a checkpoint of a training run" in r.stderr and r.stderr.count("\n") == 1
    stray.write_text("not a zip")
    r = _run("agent_reward.py", *cmd, "--agents", str(stray))
    assert r.returncode == 2 and "not a zip archive" in r.stderr and r.stderr.count("\n") == 1


def test_headroom_search_picks_by_validation_and_reproduces_the_sweep_cells(tmp_path: Path) -> None:
    """headroom.py: a fixed method's and an agent's figures at the protocol's training seed are the sweep cells'
    own results (the same pruning and training path); the agent's draws are sampled, each independent of how many
    are drawn. Bad flags: one line, exit 2."""
    from panning.agents.policy import load_policy
    from panning.runs import run_cell
    from panning.sweep import Cell, load_sweep

    bench = tmp_path / "bench.yaml"
    bench.write_text(f"base: {REPO / 'configs' / 'digits_mlp.yaml'}\nmethods: [synflow, snip, agent]\n"
                     "agents: {agent: 'shipped:default'}\nsparsities: [0.99]\nseeds: [3]\n"
                     "overrides: {train.epochs: 2, device: cpu}\n")
    out, one = tmp_path / "h.json", tmp_path / "one.json"
    r = _run("headroom.py", "--bench", str(bench), "--mixtures", "3", "--draws", "2", "--propose", "shipped:default",
             "--train-seeds", "2", "--workers", "1", "--json", str(out))
    assert r.returncode == 0, r.stderr
    d = json.loads(out.read_text())
    sweep, base = load_sweep(bench)
    for method, agents in [("synflow", None), ("agent", {"agent": load_policy("shipped:default")})]:
        cell = run_cell(base, Cell(method, 0.99, 3), tmp_path / method, agents=agents)
        mine = next(c for c in d["candidates"] if c["name"] == method)
        assert (mine["test"][0], mine["val"][0]) == (cell["test_accuracy"], cell["val_accuracy"])
    mixes = [c for c in d["candidates"] if c["kind"] == "mix"]
    assert len(mixes) == 3 and len({c["digest"] for c in mixes}) == 3  # three different actions
    draws = [c for c in d["candidates"] if c["kind"] == "draw"]
    assert len(draws) == 2 and draws[0]["actions"] != draws[1]["actions"]  # sampled, not the deterministic action
    assert len(draws[0]["actions"]) == 10  # the policy's pruning steps
    r = _run("headroom.py", "--bench", str(bench), "--mixtures", "0", "--draws", "1", "--propose", "shipped:default",
             "--train-seeds", "1", "--workers", "1", "--json", str(one))
    assert r.returncode == 0, r.stderr
    assert next(c for c in json.loads(one.read_text())["candidates"] if c["kind"] == "draw")["digest"] == \
        draws[0]["digest"]
    r = _run("headroom.py", "--from-json", str(out))  # summarised again, nothing trained: the same table
    assert r.returncode == 0 and "summarised again" in r.stdout and "K=1 " in r.stdout, r.stderr
    for bad, match in [(["--mixtures", "-1"], "--mixtures must be at least 0"), (["--draws", "2"], "needs --propose"),
                       (["--from-json", str(bench)], "not the --json of a headroom.py run"),
                       (["--json", str(tmp_path / "nope" / "h.json")], "its folder does not exist")]:
        r = _run("headroom.py", "--bench", str(bench), *bad)
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and match in r.stderr, r.stderr


def test_headroom_summary_chooses_on_validation_never_test() -> None:
    """The search's pick per seed is the candidate with the best mean validation accuracy even where test
    disagrees; a tie goes to the first drawn; the headroom is the pick's test minus the best single index's."""
    headroom = _script("headroom.py")
    sys.modules.pop(headroom.__name__, None)

    def cand(name: str, kind: str, seed: int, val: list[float], test: list[float], draw: int = 0) -> dict:
        return {"name": name, "kind": kind, "draw": draw, "seed": seed, "sparsity": 0.99, "val": val, "test": test}

    cands = [cand("synflow", "method", 0, [0.90, 0.90], [0.80, 0.82]),
             cand("snip", "method", 0, [0.5, 0.5], [0.9, 0.9]),
             cand("mix0", "mix", 0, [0.95, 0.93], [0.70, 0.70], 0),   # best validation, poor test: still the pick
             cand("mix1", "mix", 0, [0.60, 0.60], [0.99, 0.99], 1),   # best test: never the pick
             cand("synflow", "method", 1, [0.90, 0.90], [0.84, 0.84]),
             cand("snip", "method", 1, [0.5, 0.5], [0.9, 0.9]),
             cand("mix0", "mix", 1, [0.80, 0.80], [0.60, 0.60], 0),   # tied on validation with mix1: first drawn wins
             cand("mix1", "mix", 1, [0.80, 0.80], [0.95, 0.95], 1)]
    e = headroom.summarise(cands, [0, 1], [0.99])[0]
    assert e["picks"] == {"search": ["mix0", "mix0"]}
    assert e["methods"]["search"]["test_protocol"] == pytest.approx((0.70 + 0.60) / 2)
    assert e["methods"]["search"]["test_all"] == pytest.approx((0.70 + 0.60) / 2)
    assert e["best_single_test_protocol"] == "snip" and e["best_single_test_all"] == "snip"
    assert e["headroom_test_protocol"]["search"] == pytest.approx(0.65 - 0.90)
    assert e["methods"]["synflow"]["test_all"] == pytest.approx((0.81 + 0.84) / 2)
    # a smaller search: K = 2 is the whole search (the picks above, against snip's 0.90); K = 1 any candidate
    assert e["best_of_k"]["search"]["2"] == pytest.approx((0.70 - 0.90 + 0.60 - 0.90) / 2)
    assert e["best_of_k"]["search"]["1"] == pytest.approx((0.70 + 0.99 + 0.60 + 0.95) / 4 - 0.90, abs=0.02)
    assert e["held_out_order"]["search"] == pytest.approx((0.70 - 0.90 + 0.60 - 0.90) / 2)
    # held out: order 0's test is read after choosing on order 1's validation (mix1), and the other way round
    rows = [cand("synflow", "method", 0, [0.5, 0.5], [0.6, 0.6]),
            cand("mix0", "mix", 0, [0.9, 0.5], [0.5, 0.7], 0), cand("mix1", "mix", 0, [0.6, 0.6], [0.8, 0.8], 1)]
    assert headroom.held_out_order(rows, [0], "mix", "synflow") == pytest.approx((0.8 - 0.6 + 0.7 - 0.6) / 2)
    assert headroom.held_out_order([{**c, "val": c["val"][:1], "test": c["test"][:1]} for c in rows], [0], "mix",
                                   "synflow") is None  # one training order: nothing to hold out


def test_headroom_fixed_action_is_chosen_on_other_seeds_by_validation() -> None:
    """One action for every network: chosen by mean validation over the choosing run's seeds (never the judged
    run's test), reported on the judged run's seeds against the best single index there; runs whose actions
    differ per seed are refused."""
    headroom = _script("headroom.py")
    sys.modules.pop(headroom.__name__, None)
    from panning.errors import UsageError

    def mix(j: int, seed: int, val: float, test: float, w: float = 0.0) -> dict:
        return {"name": f"mix{j}", "kind": "mix", "draw": j, "seed": seed, "sparsity": 0.99, "val": [val],
                "test": [test], "weights": [round(j + w, 4), 0.0, 0.0], "steps": [0.5]}

    def method(name: str, seed: int, test: float) -> dict:
        return {"name": name, "kind": "method", "seed": seed, "sparsity": 0.99, "val": [0.5], "test": [test]}

    # choosing seeds 10, 11: mix0 has the best mean validation (its test there is poor and never read)
    chooser = [mix(0, 10, 0.90, 0.10), mix(0, 11, 0.80, 0.10), mix(1, 10, 0.95, 0.99), mix(1, 11, 0.70, 0.99),
               mix(2, 10, 0.60, 0.99), mix(2, 11, 0.60, 0.99)]
    judged = [mix(0, 0, 0.1, 0.86), mix(0, 1, 0.1, 0.90), mix(1, 0, 0.9, 0.95), mix(1, 1, 0.9, 0.95),
              mix(2, 0, 0.1, 0.50), mix(2, 1, 0.1, 0.50),
              method("synflow", 0, 0.80), method("synflow", 1, 0.84), method("snip", 0, 0.6), method("snip", 1, 0.6)]
    e = headroom.fixed_action(chooser, judged, [0.99])[0]
    assert e["action"] == "mix0" and e["actions"] == 3
    assert e["fixed"]["test_all"] == pytest.approx(0.88) and e["best_single"] == "synflow"
    assert e["gain_test_all"] == pytest.approx(0.88 - 0.82)
    assert e["ceiling_action"] == "mix1" and e["ceiling"]["test_all"] == pytest.approx(0.95)
    assert e["rho"] == pytest.approx(0.5)  # validation there 0.85 / 0.825 / 0.60 against test here 0.88 / 0.95 / 0.50
    per_seed = [mix(0, 10, 0.9, 0.1), mix(0, 11, 0.9, 0.1, w=0.1)]  # each seed drew its own action
    with pytest.raises(UsageError, match="--shared-actions"):
        headroom.fixed_action(per_seed, judged, [0.99])
    # shared across its seeds, but none of the judged run's actions
    other = [{**c, "weights": [9.0 + c["draw"], 0.0, 0.0]} for c in chooser]
    with pytest.raises(UsageError, match="no random action is in both runs"):
        headroom.fixed_action(other, judged, [0.99])


def test_headroom_shared_actions_are_the_same_on_every_seed(tmp_path: Path) -> None:
    """--shared-actions tries one list of random actions on every seed (without it each seed draws its own), and
    --fixed-from reports the action chosen on a run's seeds; without --shared-actions it is refused up front.
    --layer-actions adds per-layer depth points to each action."""
    bench = tmp_path / "bench.yaml"
    bench.write_text(f"base: {REPO / 'configs' / 'digits_mlp.yaml'}\nmethods: [synflow]\nsparsities: [0.99]\n"
                     "seeds: [3, 4]\noverrides: {train.epochs: 1, device: cpu}\n")
    flags = ["--bench", str(bench), "--mixtures", "2", "--train-seeds", "1", "--workers", "1"]
    shared, own = tmp_path / "shared.json", tmp_path / "own.json"
    assert _run("headroom.py", *flags, "--shared-actions", "--json", str(shared)).returncode == 0
    assert _run("headroom.py", *flags, "--json", str(own)).returncode == 0

    def actions(path: Path, seed: int) -> list:
        return [(c["weights"], c["steps"]) for c in json.loads(path.read_text())["candidates"]
                if c["kind"] == "mix" and c["seed"] == seed]

    assert actions(shared, 3) == actions(shared, 4) and actions(own, 3) != actions(own, 4)
    r = _run("headroom.py", "--from-json", str(shared), "--fixed-from", str(shared))
    assert r.returncode == 0 and "one action for every network" in r.stdout and "biased up" in r.stdout, r.stderr
    r = _run("headroom.py", *flags, "--fixed-from", str(shared))
    assert r.returncode == 2 and "add --shared-actions" in r.stderr and r.stderr.count("\n") == 1
    # per-layer points: the first action keeps its weights and steps (the points are drawn after them), its
    # mask changes
    layered = tmp_path / "layered.json"
    r = _run("headroom.py", *flags, "--shared-actions", "--layer-actions", "3", "--json", str(layered))
    assert r.returncode == 0, r.stderr
    first = [next(c for c in json.loads(f.read_text())["candidates"] if c["name"] == "mix0") for f in (shared, layered)]
    assert (first[0]["weights"], first[0]["steps"]) == (first[1]["weights"], first[1]["steps"])
    assert len(first[1]["layers"]) == 3 and "layers" not in first[0] and first[0]["digest"] != first[1]["digest"]
    r = _run("headroom.py", *flags, "--layer-actions", "1")
    assert r.returncode == 2 and "--layer-actions" in r.stderr and r.stderr.count("\n") == 1
    r = _run("headroom.py", "--from-json", str(shared), "--fixed-from", str(own))
    assert r.returncode == 2 and "ran without --shared-actions" in r.stderr and r.stderr.count("\n") == 1
    data = json.loads(shared.read_text())
    bad = tmp_path / "bad.json"
    for change, match in [(lambda d: d["args"].update(indices=["snip", "synflow", "grasp_abs"]), "indices"),
                          (lambda d: d.update(candidates=[]), "not the --json of a headroom.py run"),
                          (lambda d: d["candidates"][0].update(seed="x"), "not the --json of a headroom.py run")]:
        d = json.loads(json.dumps(data))
        change(d)
        bad.write_text(json.dumps(d))
        r = _run("headroom.py", "--from-json", str(shared), "--fixed-from", str(bad))
        assert r.returncode == 2 and match in r.stderr and r.stderr.count("\n") == 1, r.stderr


def test_bench_batched_counts_linear_work_and_measures_the_roof() -> None:
    """The roofline figures of bench_batched.py: a Linear network's proxy work is 2 flops a multiply-add, three
    passes a training sample (two for the first layer: its input needs no gradient) and one an evaluated sample;
    convolutional networks get none (not counted)."""
    bench = _script("bench_batched.py")
    sys.modules.pop(bench.__name__, None)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    assert bench.linear_flops(net, 10, 5) == 2 * ((2 * 3 * 4 + 3 * 4 * 2) * 10 + (3 * 4 + 4 * 2) * 5)
    conv = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.Flatten(), torch.nn.Linear(2, 2))
    assert bench.linear_flops(conv, 10, 5) is None
    assert bench.peak_gflops(torch.device("cpu"), size=64, repeats=2) > 0
    # the count matches autograd's own: with the input not requiring a gradient, the first layer's backward
    # computes the weight's gradient only
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(10, 3)
    with FlopCounterMode(display=False) as fc:
        net(x).sum().backward()
    assert fc.get_total_flops() == 2 * (2 * 3 * 4 + 3 * 4 * 2) * 10


def test_bench_batched_proxy_row_can_time_fewer_candidates_one_at_a_time() -> None:
    """--sequential-at-most: the one-at-a-time side runs that many of the N candidates (a GPU lease is short), and
    the row says how many; the batched side still trains all N, and the accuracies of those few agree."""
    bench = _script("bench_batched.py")
    sys.modules.pop(bench.__name__, None)
    calls: list[int] = []
    real = bench.ProxyEvaluator.evaluate

    def counted(self, *args, **kwargs):
        calls.append(1)
        return real(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(bench.ProxyEvaluator, "evaluate", counted)
        row = bench.proxy_row("mlp", "digits", 2, 3, torch.device("cpu"), sequential_at_most=1)
    assert len(calls) == 1 + 1  # the warm-up, then one timed
    assert row["n"] == 3 and row["sequential_timed"] == 1 and row["sequential_per_s"] > 0
    assert row["max_abs_accuracy_diff"] == 0.0


def test_bench_batched_episode_phases_cold_warm_and_steady_rounds() -> None:
    """episode_rates (workers_rate.py; bench_batched.py's too) times a cold run, a warm one after the warm-up, and
    each steady round after that."""
    from stable_baselines3.common.vec_env import DummyVecEnv

    from panning.envs.panning_env import PanningEnv

    rates = _script("workers_rate.py")
    assert Path(_script("bench_batched.py").episode_rates.__code__.co_filename).name == "workers_rate.py"
    calls: list[int] = []

    class Counting(DummyVecEnv):
        def step_wait(self):
            calls.append(1)
            return super().step_wait()

    venv = Counting([lambda: PanningEnv(REPO / "configs" / "env" / "tiny.yaml", reward="absolute")])
    cold, warm, rounds = rates.episode_rates(venv, 2, 1, 1, rounds=2)
    assert cold > 0 and warm is not None and warm > 0 and len(rounds) == 2 and min(rounds) > 0
    assert len(calls) == 3 * (2 + 1 + 2 + 2 + 2)  # tiny episodes have 3 steps: 2 cold, 1 warm-up, 2 warm, 2 x 2
    assert rates.episode_rates(venv, 1, 1, 0, rounds=3)[1:] == (None, [])


def test_workers_rate_times_subprocess_workers_of_the_importable_code(tmp_path: Path) -> None:
    """workers_rate.py runs real SubprocVecEnv workers through every phase, says whose code it ran and writes the
    same figures to --json; bad flags exit 2 with one line, before any worker starts."""
    out = tmp_path / "rates.json"
    r = _run("workers_rate.py", "--config", str(REPO / "configs" / "env" / "tiny.yaml"), "--workers", "1",
             "--episodes", "2", "--warmup", "1", "--rounds", "2", "--json", str(out))
    assert r.returncode == 0, r.stderr
    got = json.loads(out.read_text())
    assert got == json.loads(r.stdout)
    assert got["code"] == str(Path(sys.modules["panning"].__file__).resolve().parents[1])
    assert got["cold"] > 0 and got["warm"] > 0 and len(got["rounds"]) == 2 and got["steady"] == got["rounds"][-1]
    for bad, says in ((["--workers", "0"], "--workers and --episodes must be >= 1"),
                      (["--rounds", "1", "--warmup", "0"], "--rounds needs --warmup > 0"),
                      (["--config", str(tmp_path / "none.yaml")], "no env config at"),
                      (["--json", str(tmp_path / "no" / "x.json")], "the folder of --json"),
                      (["--episodes", "x"], "invalid int value")):
        with pytest.raises(SystemExit) as ex, contextlib.redirect_stderr(io.StringIO()) as err:
            _script("workers_rate.py").main(bad)
        assert ex.value.code == 2
        lines = err.getvalue().strip().splitlines()
        assert len(lines) == 1 and says in lines[0], lines


def test_profile_episodes_names_the_stages_of_a_vectorised_step(tmp_path: Path) -> None:
    """profile_episodes.py profiles real vectorised steps: every stage is found in the profile (a renamed function
    would show 0 s) and the step's parts add up to no more than the step."""
    out = tmp_path / "profile.json"
    r = _run("profile_episodes.py", "--config", str(REPO / "configs" / "env" / "tiny.yaml"), "--n", "2",
             "--warmup", "2", "--episodes", "2", "--top", "3", "--json", str(out))
    assert r.returncode == 0, r.stderr
    got = json.loads(out.read_text())
    assert got["episodes"] >= 2 and got["step_s"] > 0 and len(got["own_time"]) == 3
    assert all(s["seconds"] > 0 for s in got["stages"]), got["stages"]
    parts = sum(s["seconds"] for s in got["stages"] if s["depth"] == 0)
    assert parts <= got["step_s"] * 1.001
    assert "| rewards: the proxy (_rewards) |" in r.stdout and "| the step's host reads (read_together) |" in r.stdout
