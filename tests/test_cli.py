"""The `panning` command: happy paths on a tiny config, and every bad input exits 2 with one line."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from panning.cli import main
from panning.masks import Masks

REPO = Path(__file__).resolve().parents[1]

TINY = """\
model: mlp
dataset: digits
seed: 0
prune:
  method: snip
  sparsity: 0.9
train:
  epochs: 2
  batch_size: 64
  lr: 0.05
  augment: false
"""


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    p = tmp_path / "tiny.yaml"
    p.write_text(TINY)
    return p


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(args + (["--no-progress"] if args and args[0] in ("run", "train") else []))
    out, err = capsys.readouterr()
    return code, out, err


def test_prune_train_run_happy_paths(tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = tmp_path / "p"
    code, out, _ = run_cli(["prune", "--config", str(tiny), "--method", "synflow", "--iterations", "5",
                            "--sparsity", "0.95", "--out", str(p)], capsys)
    assert code == 0, out
    info = json.loads((p / "prune.json").read_text())
    assert info["method"] == "synflow" and abs(info["sparsity"] - 0.95) < 1e-3
    assert {"effective_sparsity", "layers", "seconds"} <= set(info)
    assert set(info["layers"]) == {"fc1.weight", "fc2.weight", "fc3.weight"}
    masks = Masks.load(p / "masks.pt")
    assert masks.num_kept == round(0.05 * masks.num_total)

    t = tmp_path / "t"
    code, out, err = run_cli(["train", "--masks", str(p / "masks.pt"), "--out", str(t), "--epochs", "1"], capsys)
    assert code == 0, err
    m = json.loads((t / "metrics.json").read_text())
    assert {"test_accuracy", "val_accuracy", "per_class_recall", "sparsity", "epochs", "seconds"} <= set(m)
    assert m["epochs"] == 1 and len(m["per_class_recall"]) == 10
    assert list((t / "tb").glob("events.out.tfevents.*"))

    r = tmp_path / "r"
    code, out, err = run_cli(["run", "--config", str(tiny), "--method", "magnitude", "--sparsity", "0.5",
                              "--out", str(r)], capsys)
    assert code == 0, err
    assert "test accuracy" in out
    for f in ("config.yaml", "masks.pt", "prune.json", "metrics.json"):
        assert (r / f).is_file()
    assert json.loads((r / "metrics.json").read_text())["test_accuracy"] > 0.5

    # a run directory holding results is never overwritten silently
    before = (r / "metrics.json").read_bytes()
    code, _, err = run_cli(["run", "--config", str(tiny), "--method", "snip", "--sparsity", "0.5", "--out", str(r)],
                           capsys)
    assert code == 2 and "--overwrite" in err and len(err.strip().splitlines()) == 1
    assert (r / "metrics.json").read_bytes() == before
    code, _, _ = run_cli(["run", "--config", str(tiny), "--method", "snip", "--sparsity", "0.5", "--out", str(r),
                          "--overwrite", "--epochs", "1"], capsys)
    assert code == 0 and json.loads((r / "prune.json").read_text())["method"] == "snip"


def test_same_seed_same_masks(tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for d in ("a", "b"):
        assert run_cli(["prune", "--config", str(tiny), "--method", "fts", "--out", str(tmp_path / d)], capsys)[0] == 0
    assert Masks.load(tmp_path / "a" / "masks.pt").equal(Masks.load(tmp_path / "b" / "masks.pt"))


def test_init_and_reinit_flags(tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    from panning import config
    from panning.models import build_model

    runs = {}
    for name, extra in (("plain", []), ("reinit", ["--reinit"])):
        out = tmp_path / name
        code, _, err = run_cli(["run", "--config", str(tiny), "--init", "variance_scaling", "--epochs", "0",
                                "--out", str(out), *extra], capsys)
        assert code == 0, err
        cfg = config.load(out / "config.yaml")
        assert cfg.init == "variance_scaling" and cfg.reinit is (name == "reinit")
        assert json.loads((out / "metrics.json").read_text())["reinit"] is (name == "reinit")
        runs[name] = out
    # same mask either way; with zero epochs the test accuracy is that of the (re)drawn weights
    assert Masks.load(runs["plain"] / "masks.pt").equal(Masks.load(runs["reinit"] / "masks.pt"))
    accs = [json.loads((runs[n] / "metrics.json").read_text())["test_accuracy"] for n in ("plain", "reinit")]
    assert accs[0] != accs[1]
    first = build_model("mlp", 10, (64,), seed=0, init="variance_scaling")
    assert first.fc1.weight.abs().max() <= 2 / 8 / 0.8796 + 1e-6 and torch.count_nonzero(first.fc1.bias) == 0


BAD = [
    (["prune", "--init", "he", "--out", "{o}"], "unknown init 'he'"),
    (["prune", "--model", "nope", "--out", "{o}"], "valid models"),
    (["prune", "--dataset", "imagenet", "--out", "{o}"], "valid datasets"),
    (["prune", "--method", "nope", "--out", "{o}"], "valid methods"),
    (["prune", "--sparsity", "1.0", "--out", "{o}"], "[0, 1)"),
    (["prune", "--sparsity", "-0.1", "--out", "{o}"], "[0, 1)"),
    (["prune", "--sparsity", "abc", "--out", "{o}"], "invalid float"),
    (["prune", "--iterations", "0", "--out", "{o}"], "iterations"),
    (["prune", "--device", "tpu", "--out", "{o}"], "invalid choice"),
    (["prune", "--dataset", "cifar10", "--model", "resnet20", "--data-dir", "{o}/nodata", "--out", "{o}"],
     "--download"),
    (["prune", "--config", "{o}/missing.yaml", "--out", "{o}"], "does not exist"),
    (["prune", "--config", "{bad_yaml}", "--out", "{o}"], "malformed YAML"),
    (["prune", "--config", "{bad_key}", "--out", "{o}"], "unknown key 'epochz'"),
    (["prune", "--config", "{bad_type}", "--out", "{o}"], "expected a number"),
    (["train", "--masks", "{o}/none/masks.pt", "--out", "{o}"], "does not exist"),
    (["train", "--masks", "{wrong_masks}", "--out", "{o}"], "mask"),
    (["prune"], "--out"),
    (["frobnicate"], "invalid choice"),
]


@pytest.mark.parametrize("args,expected", BAD, ids=[" ".join(a[:3]) for a, _ in BAD])
def test_bad_input_exits_2_with_one_line(args: list[str], expected: str, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "bad.yaml").write_text("model: [unclosed\n")
    (tmp_path / "key.yaml").write_text("model: mlp\ntrain:\n  epochz: 3\n")
    (tmp_path / "type.yaml").write_text("prune:\n  sparsity: lots\n")
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    (wrong / "config.yaml").write_text("model: mlp\ndataset: digits\n")
    import torch

    Masks({"fc1.weight": torch.ones(3, 3, dtype=torch.bool)}).save(wrong / "masks.pt")
    out_dir = tmp_path / "out"
    subs = {"{o}": str(out_dir), "{bad_yaml}": str(tmp_path / "bad.yaml"), "{bad_key}": str(tmp_path / "key.yaml"),
            "{bad_type}": str(tmp_path / "type.yaml"), "{wrong_masks}": str(wrong / "masks.pt")}
    filled = []
    for a in args:
        for k, v in subs.items():
            a = a.replace(k, v)
        filled.append(a)
    code = main(filled)
    out, err = capsys.readouterr()
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert expected in lines[0]
    assert "Traceback" not in err
    assert not out_dir.exists(), "nothing may be written before the inputs are checked"


def test_cuda_without_gpu_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    code = main(["prune", "--device", "cuda", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "cuda" in err.lower() and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_console_script_help_and_exit_code() -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-m", "panning.cli", "--help"], capture_output=True, text=True, env=env)
    assert r.returncode == 0
    for sub in ("prune", "train", "run", "benchmark", "list"):
        assert sub in r.stdout
    r = subprocess.run([sys.executable, "-m", "panning.cli", "prune", "--sparsity", "2", "--out", "/tmp/x"],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr


def test_collapsed_training_is_flagged(tiny: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A network that ends up predicting one class says so (metrics and stderr), instead of a quiet 10%."""
    import torch

    from panning import config, runs

    cfg = config.load(tiny)
    s = runs.setup(cfg)
    every_weight_pruned = Masks({k: torch.zeros_like(v) for k, v in Masks.ones(s.model).items()})
    m = runs.train_and_evaluate(cfg, s, every_weight_pruned, None, progress=False, method="snip")
    assert m["single_class"] is True
    assert "predicts a single class" in capsys.readouterr().err
    s = runs.setup(cfg)
    m = runs.train_and_evaluate(cfg, s, Masks.ones(s.model), None, progress=False, method="dense")
    assert m["single_class"] is False and m["test_accuracy"] > 0.5
    assert "single class" not in capsys.readouterr().err
