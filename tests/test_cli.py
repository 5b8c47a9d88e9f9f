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
    (["prune", "--seed", "-1", "--out", "{o}"], "seed must be >= 0"),
    # 50 200 prunable weights in 3 layers; keep_count rounds: (1 - 0.99995) * 50 200 = 2.51 keeps 3, while
    # (1 - 0.999951) * 50 200 = 2.46 keeps 2, so 0.999950 is the largest 6-decimal sparsity keeping 3
    (["prune", "--sparsity", "0.999999", "--out", "{o}"],
     "largest sparsity that keeps one weight per layer is 0.999950"),
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


def test_seeds_must_be_non_negative_for_run_too(tiny: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "r"
    code, _, err = run_cli(["run", "--config", str(tiny), "--seed", "-1", "--epochs", "0", "--out", str(out)], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert "seed must be >= 0" in lines[0] and "-1" in lines[0]
    assert not out.exists()


# ------------------------------------------------------------------------------------------ panning list


def test_list_names_every_choice(capsys: pytest.CaptureFixture[str]) -> None:
    from panning.data import available_datasets
    from panning.indices import available_indices
    from panning.models import INITS, available_models
    from panning.pruner import available_methods

    code = main(["list"])
    out, err = capsys.readouterr()
    assert code == 0 and err == ""
    listed = {}
    for line in out.strip().splitlines():
        label, _, names = line.partition(":")
        listed[label.strip()] = names.strip().split(", ")
    assert set(listed) == {"models", "datasets", "methods", "indices", "inits", "agents"}
    assert listed["agents"] == ["default", "mnist_recipe", "summary"]  # the shipped agents, `--policy NAME`
    assert listed["models"] == [*available_models(), "tv:<torchvision model>"]
    assert listed["datasets"] == list(available_datasets())
    assert listed["methods"] == list(available_methods())
    assert listed["indices"] == list(available_indices())
    assert listed["inits"] == list(INITS)
    # the names the docs promise are among them
    assert {"mlp", "lenet300"} <= set(listed["models"]) and {"digits", "mnist"} <= set(listed["datasets"])
    assert {"random", "magnitude", "snip", "grasp", "synflow", "fts", "panning"} <= set(listed["methods"])


# ------------------------------------------------------------------------------- train: refused masks


def test_train_refuses_masks_whose_initial_weights_cannot_be_rebuilt(tiny: Path, tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    p = tmp_path / "p"
    assert run_cli(["prune", "--config", str(tiny), "--out", str(p)], capsys)[0] == 0
    ok = tmp_path / "ok"
    code, _, err = run_cli(["train", "--masks", str(p / "masks.pt"), "--epochs", "0", "--out", str(ok)], capsys)
    assert code == 0, err  # the untouched prune run trains: the refusal below comes from the edit alone
    info = json.loads((p / "prune.json").read_text())
    assert len(info["init_sha256"]) == 64
    info["init_sha256"] = ("0" if info["init_sha256"][0] != "0" else "1") * 64
    (p / "prune.json").write_text(json.dumps(info))
    out = tmp_path / "t"
    code, _, err = run_cli(["train", "--masks", str(p / "masks.pt"), "--epochs", "0", "--out", str(out)], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert "initial weights" in lines[0] and "Traceback" not in err
    assert not out.exists(), "a refused train wrote into --out"


# ------------------------------------------------------------------------ flags reach the run directory


def _kept(masks: Masks) -> dict[str, int]:
    return {k: int(v.sum()) for k, v in masks.items()}


# the default network: mlp 64-300-100-10 on digits (prunable weights per layer)
MLP_LAYERS = {"fc1.weight": 64 * 300, "fc2.weight": 300 * 100, "fc3.weight": 100 * 10}
MLP_TOTAL = sum(MLP_LAYERS.values())  # 50 200


def test_exclude_flag_leaves_the_layer_dense_and_out_of_the_count(tiny: Path, tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    from panning import config

    p = tmp_path / "p"
    code, _, err = run_cli(["prune", "--config", str(tiny), "--exclude", "fc3", "--sparsity", "0.9",
                            "--out", str(p)], capsys)
    assert code == 0, err
    masks = Masks.load(p / "masks.pt")
    assert list(masks) == ["fc1.weight", "fc2.weight"]
    assert masks.num_total == 64 * 300 + 300 * 100 == 49_200
    assert masks.num_kept == 4_920  # round(0.1 * 49 200): the excluded layer counts for nothing
    info = json.loads((p / "prune.json").read_text())
    assert info["prunable"] == 49_200 and info["kept"] == 4_920 and set(info["layers"]) == set(masks)
    assert config.load(p / "config.yaml").prune.exclude == ["fc3"]


def test_layerwise_mode_gives_every_layer_its_share_to_one_weight(tiny: Path, tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    from panning import config

    p = tmp_path / "p"
    code, _, err = run_cli(["prune", "--config", str(tiny), "--mode", "layerwise", "--sparsity", "0.977",
                            "--out", str(p)], capsys)
    assert code == 0, err
    kept = _kept(Masks.load(p / "masks.pt"))
    # keep = round(0.023 * 50 200) = round(1154.6) = 1155; each layer's share 1155 * n_l / 50 200 is
    # 441.75 (fc1), 690.24 (fc2), 23.01 (fc3): floors sum to 1154, the one left goes to the largest remainder
    assert kept == {"fc1.weight": 442, "fc2.weight": 690, "fc3.weight": 23}
    for k, n in MLP_LAYERS.items():
        assert abs(kept[k] - (1 - 0.977) * n) < 1, k  # density = target up to one weight
    assert config.load(p / "config.yaml").prune.mode == "layerwise"


@pytest.mark.filterwarnings("ignore:layer collapse")
def test_min_per_layer_keeps_that_many_in_every_layer(tiny: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    from panning import config

    common = ["prune", "--config", str(tiny), "--method", "magnitude", "--sparsity", "0.9995"]
    plain, floor = tmp_path / "plain", tmp_path / "floor"
    assert run_cli([*common, "--out", str(plain)], capsys)[0] == 0
    code, _, err = run_cli([*common, "--min-per-layer", "8", "--out", str(floor)], capsys)
    assert code == 0, err
    # round(0.0005 * 50 200) = round(25.1) = 25 weights in all
    without, with_floor = _kept(Masks.load(plain / "masks.pt")), _kept(Masks.load(floor / "masks.pt"))
    assert sum(without.values()) == sum(with_floor.values()) == 25
    # global magnitude alone starves a layer (fc2's initial weights are the smallest: kaiming std sqrt(2/300))
    assert min(without.values()) < 8
    assert all(n >= 8 for n in with_floor.values()), with_floor
    assert config.load(floor / "config.yaml").prune.min_per_layer == 8


def test_linear_schedule_removes_equal_amounts_per_step(tiny: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    from panning import config

    p = tmp_path / "p"
    code, _, err = run_cli(["prune", "--config", str(tiny), "--method", "snip", "--schedule", "linear",
                            "--iterations", "4", "--sparsity", "0.9", "--out", str(p)], capsys)
    assert code == 0, err
    info = json.loads((p / "prune.json").read_text())
    # N = 50 200, final = round(0.1 * N) = 5 020; linear: keep_t = N - t * (N - final) / 4 = N - 11 295 t
    assert [s["keep"] for s in info["steps"]] == [38_905, 27_610, 16_315, 5_020]
    assert [s["step"] for s in info["steps"]] == [1, 2, 3, 4]
    assert info["schedule"] == "linear" and info["iterations"] == 4
    cfg = config.load(p / "config.yaml")
    assert cfg.prune.schedule == "linear" and cfg.prune.iterations == 4


def test_scoring_per_class_sets_the_scoring_batch(tiny: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    from panning import config
    from panning.data import balanced_batch, load_dataset
    from panning.models import build_model
    from panning.pruner import prune

    default, small = tmp_path / "default", tmp_path / "small"
    assert run_cli(["prune", "--config", str(tiny), "--method", "snip", "--out", str(default)], capsys)[0] == 0
    code, _, err = run_cli(["prune", "--config", str(tiny), "--method", "snip", "--scoring-per-class", "3",
                            "--out", str(small)], capsys)
    assert code == 0, err
    assert config.load(default / "config.yaml").prune.scoring_per_class == 10  # the documented default
    assert config.load(small / "config.yaml").prune.scoring_per_class == 3
    masks = Masks.load(small / "masks.pt")
    assert not masks.equal(Masks.load(default / "masks.pt"))  # SNIP's scores depend on the batch
    # SNIP on a class-balanced batch of 3 per class from the training split, seeded by the run's seed
    bundle = load_dataset("digits")
    x, y = balanced_batch(bundle.train, 3, bundle.num_classes, seed=0)
    assert y.bincount(minlength=10).tolist() == [3] * 10
    ref = prune(build_model("mlp", 10, (64,), seed=0), "snip", 0.9, [(x, y)])
    assert masks.equal(ref.masks)


def test_lr_flag_is_the_rate_training_starts_with(tiny: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    from panning import config

    r = tmp_path / "r"
    code, _, err = run_cli(["run", "--config", str(tiny), "--lr", "0.03", "--epochs", "2", "--out", str(r)], capsys)
    assert code == 0, err
    assert config.load(r / "config.yaml").train.lr == 0.03
    history = json.loads((r / "metrics.json").read_text())["history"]
    assert [h["epoch"] for h in history] == [1, 2]
    assert history[0]["lr"] == 0.03
    # cosine over 2 epochs: half-way through, 0.5 * (1 + cos(pi / 2)) = 0.5 of the rate
    assert history[1]["lr"] == pytest.approx(0.015, rel=1e-9)


def test_batch_size_flag_sets_the_training_batch(tiny: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """One batch of the whole training split: the single epoch's training loss and accuracy are those of
    the masked initial network on that split (measured on the forward pass before the only step)."""
    import torch
    import torch.nn.functional as F

    from panning import config
    from panning.data import load_dataset, make_loader
    from panning.models import build_model

    bundle = load_dataset("digits")
    n = len(bundle.train)
    r = tmp_path / "r"
    code, _, err = run_cli(["run", "--config", str(tiny), "--batch-size", str(n), "--epochs", "1", "--out", str(r)],
                           capsys)
    assert code == 0, err
    assert config.load(r / "config.yaml").train.batch_size == n
    epoch = json.loads((r / "metrics.json").read_text())["history"][0]
    net = Masks.load(r / "masks.pt").apply_(build_model("mlp", 10, (64,), seed=0))
    loader = make_loader(bundle.train, n, shuffle=False)
    with torch.no_grad():
        out = net(loader.x)
    assert epoch["train_accuracy"] == float((out.argmax(1) == loader.y).sum()) / n
    assert epoch["train_loss"] == pytest.approx(float(F.cross_entropy(out, loader.y)), rel=1e-5)


def test_seed_flag_sets_initialisation_and_random_masks(tiny: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    from panning import config
    from panning.hashing import state_digest
    from panning.models import build_model

    dirs = {}
    for seed in (0, 1):
        dirs[seed] = tmp_path / f"seed{seed}"
        code, _, err = run_cli(["prune", "--config", str(tiny), "--method", "random", "--seed", str(seed),
                                "--out", str(dirs[seed])], capsys)
        assert code == 0, err
        assert config.load(dirs[seed] / "config.yaml").seed == seed
        info = json.loads((dirs[seed] / "prune.json").read_text())
        assert info["seed"] == seed
        assert info["init_sha256"] == state_digest(build_model("mlp", 10, (64,), seed=seed))
    a, b = Masks.load(dirs[0] / "masks.pt"), Masks.load(dirs[1] / "masks.pt")
    assert a.num_kept == b.num_kept == 5_020 and not a.equal(b)


@pytest.mark.parametrize("script, args, expected", [
    ("host_syncs.py", ["--n", "0"], "n_envs must be >= 1"),
    ("profile_episodes.py", ["--episodes", "0"], "--episodes must be >= 1, got 0"),
    ("profile_episodes.py", ["--json", "no/such/folder/p.json"], "its folder does not exist"),
    ("bench_batched.py", ["--model", "nope"], "nothing to measure for --model nope"),
    ("bench_batched.py", ["--sparse", "--model", "lenet5"], "--sparse measures the sparse route"),
    ("bench_batched.py", ["--sparsity", "1"], "--sparsity must be in [0, 1)"),
    ("bench_batched.py", ["--sequential-at-most", "0"], "--sequential-at-most must be >= 1, got 0"),
    ("bench_batched.py", ["--steady-rounds", "2", "--warmup", "0"], "--steady-rounds must be >= 0 and needs --warmup"),
    ("bench_env.py", ["--model", "nope"], "unrecognized arguments: --model nope"),
    ("proxy_trust.py", ["--config", "configs/bench/nope.yaml"], "does not exist"),
    ("proxy_trust.py", ["--skip-changed"], "--skip-changed leaves out masks of a --truth-from run"),
    ("proxy_trust.py", ["--sparse", "--config", "configs/mnist_lenet5.yaml"], "--sparse: the proxy's sparse route"),
])
def test_benchmark_scripts_end_bad_input_like_the_command(script: str, args: list[str], expected: str) -> None:
    """A script under benchmarks/ given a bad flag or file prints one line naming itself and exits 2."""
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), *args], capture_output=True, text=True,
                       cwd=REPO, timeout=120)
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith(f"{script}: ") and expected in r.stderr and r.stderr.count("\n") == 1


def test_a_bug_keeps_its_traceback_and_exits_1(capsys: pytest.CaptureFixture[str]) -> None:
    from panning.cli import run_guarded
    from panning.errors import ConfigError

    def bug() -> int:
        raise ValueError("not the user's fault")

    def bad() -> int:
        raise ConfigError("line one\nline two")

    assert run_guarded(bug, "x.py") == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "x.py: internal error" in err
    assert run_guarded(bad, "x.py") == 2
    assert capsys.readouterr().err == "x.py: error: line one\n"
    assert run_guarded(lambda: None, "x.py") == 0
