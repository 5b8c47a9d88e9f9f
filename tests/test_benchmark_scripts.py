"""Scripts under benchmarks/ whose options change what they measure (not how fast): run small, end to end."""
from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType, SimpleNamespace

import pytest
import torch

from panning.cli import run_guarded

REPO = Path(__file__).resolve().parents[1]
TINY_STUDY = ["--sparsities", "0.99", "--val-sizes", "95", "--epochs", "2", "--workers", "1"]


@pytest.fixture(autouse=True)
def _keep_torch_threads() -> Iterator[None]:
    """The scripts set one torch thread for their workers; the tests run them in this process (a subprocess
    costs seconds of imports each), so the thread count is put back for the tests after."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _script(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name.removesuffix(".py"), REPO / "benchmarks" / name)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # the worker pool pickles the script's functions by module name
    spec.loader.exec_module(mod)
    return mod


def _run(name: str, *args: str) -> SimpleNamespace:
    """The script as its ``__main__`` runs it (``run_guarded``): exit code, stdout and stderr."""
    mod, out, err = _script(name), io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = run_guarded(lambda: mod.main(list(args)), name)
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
    stray = tmp_path / "stray.zip"
    stray.write_bytes(ckpt.read_bytes())
    r = _run("agent_reward.py", *cmd, "--agents", str(stray))
    assert r.returncode == 2 and "not a checkpoint of a training run" in r.stderr and r.stderr.count("\n") == 1
    stray.write_text("not a zip")
    r = _run("agent_reward.py", *cmd, "--agents", str(stray))
    assert r.returncode == 2 and "not a zip archive" in r.stderr and r.stderr.count("\n") == 1


def test_headroom_search_picks_by_validation_and_reproduces_the_sweep_cells(tmp_path: Path) -> None:
    """headroom.py: a fixed method's figure at the protocol's training seed is the sweep cell's own result (the
    same pruning and training path), the search's pick is the mixture with the best mean validation accuracy,
    and the headroom is its test accuracy minus the best single index's. Bad flags: one line, exit 2."""
    from panning.runs import run_cell
    from panning.sweep import Cell, load_sweep

    bench = tmp_path / "bench.yaml"
    bench.write_text(f"base: {REPO / 'configs' / 'digits_mlp.yaml'}\nmethods: [synflow, snip]\n"
                     "sparsities: [0.99]\nseeds: [3]\noverrides: {train.epochs: 2}\n")
    out = tmp_path / "h.json"
    r = _run("headroom.py", "--bench", str(bench), "--mixtures", "3", "--draws", "2", "--propose", "shipped:default",
             "--train-seeds", "2", "--workers", "1", "--json", str(out))
    assert r.returncode == 0, r.stderr
    d = json.loads(out.read_text())
    sweep, base = load_sweep(bench)
    cell = run_cell(base, Cell("synflow", 0.99, 3), tmp_path / "cell")
    synflow = next(c for c in d["candidates"] if c["name"] == "synflow")
    assert synflow["test"][0] == cell["test_accuracy"] and synflow["val"][0] == cell["val_accuracy"]
    mixes = [c for c in d["candidates"] if c["name"].startswith("mix")]
    assert len(mixes) == 3 and len({c["digest"] for c in mixes}) == 3  # three different actions
    pick = max(mixes, key=lambda c: (sum(c["val"]) / 2, -int(c["name"][3:])))  # ties: the first drawn
    e = d["table"][0]
    assert e["picks"]["search"] == [pick["name"]]
    best = max(("synflow", "snip"), key=lambda n: e["methods"][n]["test_protocol"])
    assert e["best_single_test_protocol"] == best
    for label in ("search", "search (agent draws)"):
        assert abs(e["headroom_test_protocol"][label] - (e["methods"][label]["test_protocol"]
                                                        - e["methods"][best]["test_protocol"])) < 1e-12
    draws = [c for c in d["candidates"] if c["name"].startswith("draw")]
    assert len(draws) == 2 and draws[0]["actions"] != draws[1]["actions"]  # sampled, not the deterministic action
    agent = next(c for c in d["candidates"] if c["name"] == "draw0")
    assert len(agent["actions"]) == 10  # the policy's pruning steps
    for bad, match in [(["--mixtures", "-1"], "--mixtures must be at least 0"), (["--draws", "2"], "needs --propose")]:
        r = _run("headroom.py", "--bench", str(bench), *bad)
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and match in r.stderr, r.stderr
