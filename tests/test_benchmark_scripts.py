"""Scripts under benchmarks/ whose options change what they measure (not how fast): run small, end to end."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TINY_STUDY = ["--sparsities", "0.99", "--val-sizes", "95", "--epochs", "2", "--workers", "1"]


def _proxy_trust(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(REPO / "benchmarks" / "proxy_trust.py"), *TINY_STUDY, *args],
                          capture_output=True, text=True, cwd=REPO, timeout=300)


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
    cmd = [sys.executable, str(REPO / "benchmarks" / "agent_reward.py"), "--env", "configs/env/tiny.yaml",
           "--targets", "0.9", "--inits", "1000", "1001", "--threads", "1", "--json", str(out)]
    r = subprocess.run([*cmd, "--agents", str(run / "agent.zip"), str(ckpt), str(run / "agent.zip")],
                       capture_output=True, text=True, cwd=REPO, timeout=300)
    assert r.returncode == 0, r.stderr
    rows = json.loads(out.read_text())["episodes"]
    assert len(rows) == 3 * 2 and all(x["proxy_accuracy"] is not None for x in rows)
    assert [x["reward"] for x in rows[:2]] == [x["reward"] for x in rows[4:]]
    assert "| agent | mean | 90% |" in r.stdout
    stray = tmp_path / "stray.zip"
    stray.write_bytes(ckpt.read_bytes())
    r = subprocess.run([*cmd, "--agents", str(stray)], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert r.returncode == 2 and "not a checkpoint of a training run" in r.stderr and r.stderr.count("\n") == 1
    stray.write_text("not a zip")
    r = subprocess.run([*cmd, "--agents", str(stray)], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert r.returncode == 2 and "not a zip archive" in r.stderr and r.stderr.count("\n") == 1
