"""`panning benchmark`: a tiny sweep runs, writes the promised files, and resumes without rerunning cells."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from panning import runs, sweep
from panning.cli import main
from panning.data import load_dataset

BASE = """\
model: mlp
dataset: digits
train:
  epochs: 1
  batch_size: 128
  lr: 0.05
  augment: false
"""


def write_sweep(tmp_path: Path, methods: str = "[magnitude, snip]") -> Path:
    (tmp_path / "base.yaml").write_text(BASE)
    p = tmp_path / "bench.yaml"
    p.write_text(f"base: base.yaml\nmethods: {methods}\nsparsities: [0.5, 0.9]\nseeds: [0, 1]\n")
    return p


def test_tiny_benchmark_writes_table_csv_plot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = write_sweep(tmp_path)
    out = tmp_path / "out"
    assert main(["benchmark", "--config", str(cfg), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| method |" in printed and "magnitude" in printed
    assert "paired seed by seed" in printed and "vs " in printed  # magnitude and snip: one index each
    with (out / "results.csv").open() as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert tuple(reader.fieldnames or ()) == sweep.COLUMNS
    assert len(rows) == 2 * (1 + 2 * 2)  # per seed: dense + 2 methods x 2 sparsities
    assert {r["method"] for r in rows} == {"dense", "magnitude", "snip"}
    assert {r["target_sparsity"] for r in rows} == {"0.0", "0.5", "0.9"}  # the grid's values, as written in it
    # every row is its cell's metrics.json, and an accuracy is a count over the 450 test digits
    n_test = len(load_dataset("digits").test)
    assert n_test == 450  # scikit-learn's 1797 digits, 25% held out
    csv_acc = {(r["method"], int(r["seed"]), float(r["sparsity"])): float(r["test_accuracy"]) for r in rows}
    cell_acc = {}
    for mp in (out / "cells").glob("*/metrics.json"):
        m = json.loads(mp.read_text())
        cell_acc[(m["method"], m["seed"], m["sparsity"])] = m["test_accuracy"]
    assert csv_acc == cell_acc
    for acc in csv_acc.values():
        assert acc * n_test == pytest.approx(round(acc * n_test), abs=1e-9)
    assert (out / "accuracy_vs_sparsity.png").stat().st_size > 1000
    md = (out / "results.md").read_text()
    assert "± " in md and "**" in md
    # a second table of validation accuracy, what a selection may read: its means are the CSV's
    test_md, _, val_md = md.partition("Validation accuracy (%)")
    assert val_md and "magnitude" in val_md
    val = [float(r["val_accuracy"]) for r in rows if r["method"] == "magnitude" and r["target_sparsity"] == "0.5"]
    assert f"| magnitude |  | {100 * sum(val) / len(val):.2f} ± " in val_md.replace("**", "")
    tst = [float(r["test_accuracy"]) for r in rows if r["method"] == "magnitude" and r["target_sparsity"] == "0.5"]
    assert f"| magnitude |  | {100 * sum(tst) / len(tst):.2f} ± " in test_md.replace("**", "")
    assert "minus the best single index of the column" in val_md  # the paired table (magnitude, snip: one index)


def test_interrupted_sweep_resumes_without_rerunning(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = write_sweep(tmp_path, "[magnitude]")
    out = tmp_path / "out"
    calls: list[str] = []
    interrupt = [True]
    real = runs.run_cell

    def flaky(c, cell, d, bundle=None, progress=False, agents=None):  # type: ignore[no-untyped-def]
        calls.append(cell.key)
        if len(calls) == 3 and interrupt[0]:
            interrupt[0] = False
            raise KeyboardInterrupt  # Ctrl-C in the middle of the third cell
        return real(c, cell, d, bundle, progress, agents)

    monkeypatch.setattr(runs, "run_cell", flaky)
    assert main(["benchmark", "--config", str(cfg), "--out", str(out)]) == 130
    finished = sorted(p.parent.name for p in (out / "cells").glob("*/metrics.json"))
    assert finished == sorted(calls[:2])
    stamps = {k: (out / "cells" / k / "metrics.json").stat().st_mtime_ns for k in finished}

    calls.clear()
    assert main(["benchmark", "--config", str(cfg), "--out", str(out)]) == 0
    assert not set(calls) & set(finished), "a finished cell was run again"
    assert len(calls) == 6 - 2
    for k, t in stamps.items():
        assert (out / "cells" / k / "metrics.json").stat().st_mtime_ns == t
    assert len(list((out / "cells").glob("*/metrics.json"))) == 6


def test_sweep_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "base.yaml").write_text(BASE)
    bad = tmp_path / "bad.yaml"
    bad.write_text("base: base.yaml\nmethods: [nope]\nsparsities: [0.5]\n")
    assert main(["benchmark", "--config", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "valid methods" in capsys.readouterr().err
    bad.write_text("base: base.yaml\nmethods: [snip]\nsparsities: [1.5]\n")
    assert main(["benchmark", "--config", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "[0, 1)" in capsys.readouterr().err
    bad.write_text("base: missing.yaml\n")
    assert main(["benchmark", "--config", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "not found" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_resume_refuses_cells_computed_under_another_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "base.yaml").write_text(BASE)
    cfg = tmp_path / "bench.yaml"
    cfg.write_text("base: base.yaml\nmethods: [magnitude]\nsparsities: [0.5]\nseeds: [0]\ndense: false\n")
    out = tmp_path / "out"
    assert main(["benchmark", "--config", str(cfg), "--out", str(out)]) == 0
    metrics = out / "cells" / "magnitude__s0.5__seed0" / "metrics.json"
    stamp = metrics.stat().st_mtime_ns
    capsys.readouterr()

    # --epochs changes what a cell computes: resuming must not mix the two in one table
    assert main(["benchmark", "--config", str(cfg), "--out", str(out), "--epochs", "2"]) == 2
    err = capsys.readouterr().err
    assert "train.epochs was 1" in err and "2" in err and "another --out" in err
    # so does editing the base file the sweep builds on
    (tmp_path / "base.yaml").write_text(BASE.replace("lr: 0.05", "lr: 0.2"))
    assert main(["benchmark", "--config", str(cfg), "--out", str(out)]) == 2
    assert "train.lr was 0.05" in capsys.readouterr().err
    assert metrics.stat().st_mtime_ns == stamp, "a refused resume touched a finished cell"

    # where it runs is not what it computes: another device still resumes
    (tmp_path / "base.yaml").write_text(BASE)
    assert main(["benchmark", "--config", str(cfg), "--out", str(out), "--device", "cpu"]) == 0
    assert metrics.stat().st_mtime_ns == stamp

    # a folder from before run_config.yaml existed: each finished cell is still checked
    (out / "run_config.yaml").unlink()
    capsys.readouterr()
    assert main(["benchmark", "--config", str(cfg), "--out", str(out), "--epochs", "2"]) == 2
    err = capsys.readouterr().err
    assert "cells/magnitude__s0.5__seed0 were computed differently: train.epochs was 1" in err
    assert metrics.stat().st_mtime_ns == stamp
    assert not (out / "run_config.yaml").exists(), "a refused resume recorded its config"
    assert main(["benchmark", "--config", str(cfg), "--out", str(out)]) == 0  # the right config still resumes
    assert metrics.stat().st_mtime_ns == stamp


def test_resume_checks_other_seeds_cells_too(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "base.yaml").write_text(BASE)
    cfg = tmp_path / "bench.yaml"
    cfg.write_text("base: base.yaml\nmethods: [magnitude]\nsparsities: [0.5]\nseeds: [0, 1]\ndense: false\n")
    out = tmp_path / "out"
    assert main(["benchmark", "--config", str(cfg), "--out", str(out), "--seeds", "1"]) == 0
    (out / "run_config.yaml").unlink()  # leave only the per-cell check
    capsys.readouterr()
    # no seed-0 cell exists yet, but the seed-1 cell would land in the same table
    assert main(["benchmark", "--config", str(cfg), "--out", str(out), "--seeds", "0", "--epochs", "2"]) == 2
    assert "seed1 were computed differently" in capsys.readouterr().err
    assert not (out / "cells" / "magnitude__s0.5__seed0" / "metrics.json").exists()


def test_dense_cells_ignore_the_base_pruning_settings(tmp_path: Path) -> None:
    from panning import config

    (tmp_path / "base.yaml").write_text(BASE)
    base = config.load(tmp_path / "base.yaml")
    d = tmp_path / "cell"
    d.mkdir()
    dense = sweep.Cell(sweep.DENSE, 0.0, 0)
    config.dump(runs.cell_config(base, dense), d / "config.yaml")
    edited = config.override(base, {"prune.scoring_per_class": 3, "prune.method": "synflow"})
    assert runs.cell_mismatch(edited, dense, d) is None
    assert "train.lr" in (runs.cell_mismatch(config.override(base, {"train.lr": 0.3}), dense, d) or "")


def test_cell_mismatch_notices_a_retrained_agent(tmp_path: Path) -> None:
    from panning import config

    (tmp_path / "base.yaml").write_text(BASE)
    from panning.hashing import file_digest
    from panning.io import write_json
    from panning.policy import Policy

    def loaded(path: Path) -> dict[str, Policy]:  # what the CLI hands the sweep: label -> loaded policy
        return {"agent": Policy(lambda o: o, ["snip"], 1, info={"path": str(path), "sha256": file_digest(path)})}

    policy = tmp_path / "agent.zip"
    policy.write_bytes(b"first policy")
    base = config.load(tmp_path / "base.yaml")
    cell = sweep.Cell("agent", 0.9, 0)
    d = tmp_path / "cell"
    d.mkdir()
    config.dump(runs.cell_config(base, cell, {"agent": str(policy)}), d / "config.yaml")
    write_json(d / "prune.json", {"policy_sha256": file_digest(policy)})
    assert runs.cell_mismatch(base, cell, d, loaded(policy)) is None
    policy.write_bytes(b"retrained policy")
    assert "SHA-256 differs" in (runs.cell_mismatch(base, cell, d, loaded(policy)) or "")
    # an agent is its bytes, not its path: the same file elsewhere is the same agent, another file is not
    moved = tmp_path / "moved.zip"
    moved.write_bytes(b"first policy")
    assert runs.cell_mismatch(base, cell, d, loaded(moved)) is None
    other = tmp_path / "other.zip"
    other.write_bytes(b"another policy")
    assert "SHA-256 differs" in (runs.cell_mismatch(base, cell, d, loaded(other)) or "")


def test_plot_zooms_only_when_a_method_collapses() -> None:
    close = {"a": [(0.9, 0.97, 0.002), (0.99, 0.95, 0.004)], "b": [(0.9, 0.965, 0.001), (0.99, 0.948, 0.0)]}
    assert sweep.zoom_range(close, dense=98.0) is None  # everything fits one readable panel
    collapsed = {**close, "c": [(0.9, 0.96, 0.0), (0.99, 0.1135, 0.0)]}
    lo, hi = sweep.zoom_range(collapsed, dense=98.0) or (None, None)
    assert lo == pytest.approx(95.0 - 0.4 - 0.2) and hi == pytest.approx(98.0 + 0.2)  # c at 11.35% is left out
    nan = float("nan")
    for order in ({"n": [(0.9, nan, nan)], **close}, {**close, "n": [(0.9, nan, nan)]}):
        assert sweep.zoom_range(order, dense=98.0) is None  # a diverged cell neither adds nor skews a zoom


def test_missing_data_names_flags_the_benchmark_has(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "base.yaml").write_text("model: resnet20\ndataset: cifar10\n")
    cfg = tmp_path / "bench.yaml"
    cfg.write_text("base: base.yaml\nmethods: [snip]\nsparsities: [0.9]\n")
    out = tmp_path / "out"
    args = ["benchmark", "--config", str(cfg), "--out", str(out), "--data-dir", str(tmp_path / "empty")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "CIFAR10 not found" in err and "--download" in err and "Traceback" not in err
    assert not out.exists()
    from panning.cli import build_parser

    assert build_parser().parse_args(args + ["--download"]).download is True  # the fix it names exists here


TINY_SWEEP = "base: base.yaml\nmethods: [magnitude]\nsparsities: {sparsities}\nseeds: [0]\ndense: false\n"


def _files(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in sorted(root.rglob("*")) if p.is_file()}


def test_benchmark_refuses_a_different_sweep_in_the_same_out(tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "base.yaml").write_text(BASE)
    first, other = tmp_path / "first.yaml", tmp_path / "other.yaml"
    first.write_text(TINY_SWEEP.format(sparsities="[0.5]"))
    other.write_text(TINY_SWEEP.format(sparsities="[0.8]"))
    out = tmp_path / "out"
    assert main(["benchmark", "--config", str(first), "--out", str(out)]) == 0
    before = _files(out)
    capsys.readouterr()
    assert main(["benchmark", "--config", str(other), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "different sweep" in lines[0] and "Traceback" not in err
    assert _files(out) == before, "a refused sweep changed the folder"
    assert main(["benchmark", "--config", str(first), "--out", str(out)]) == 0  # the same sweep still resumes
    cell = "cells/magnitude__s0.5__seed0/metrics.json"
    assert _files(out)[cell] == before[cell]


def test_benchmark_refuses_seeds_outside_the_grid(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "base.yaml").write_text(BASE)
    cfg = tmp_path / "bench.yaml"
    cfg.write_text(TINY_SWEEP.format(sparsities="[0.5]"))
    out = tmp_path / "out"
    assert main(["benchmark", "--config", str(cfg), "--out", str(out), "--seeds", "0", "3"]) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "--seeds" in lines[0] and "Traceback" not in err
    assert not out.exists()


def test_benchmark_refuses_a_sparsity_that_empties_a_layer(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "base.yaml").write_text(BASE)
    cfg = tmp_path / "bench.yaml"
    cfg.write_text(TINY_SWEEP.format(sparsities="[0.5, 0.999999]"))
    out = tmp_path / "out"
    assert main(["benchmark", "--config", str(cfg), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    # mlp on digits: 50 200 prunable weights in 3 layers; (1 - 0.99995) * 50 200 = 2.51 rounds to 3 kept
    assert len(lines) == 1 and "largest sparsity" in lines[0] and "0.999950" in lines[0], err
    assert not out.exists(), "nothing may be written before the grid is checked"


def test_the_plot_is_redrawn_at_most_every_draw_every_seconds_and_at_the_end(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sw, cfg = sweep.load_sweep(write_sweep(tmp_path, "[magnitude]"))
    clock = [0.0]
    monkeypatch.setattr(sweep.time, "perf_counter", lambda: clock[0])
    drawn: list[int] = []

    def fake_plot(rows, path, title=""):  # type: ignore[no-untyped-def]
        drawn.append(len(rows))
        path.write_bytes(b"png")

    monkeypatch.setattr(sweep, "plot", fake_plot)

    def fake_cell(c, cell, d):  # type: ignore[no-untyped-def]
        clock[0] += 20.0  # every cell takes 20 s: the plot is due every other cell
        row = {"dataset": "digits", "model": "mlp", "method": cell.method, "sparsity": cell.sparsity,
               "seed": cell.seed, "test_accuracy": 0.5, "val_accuracy": 0.5, "seconds": 20.0}
        (d / "metrics.json").write_text(json.dumps(row))

    sweep.run_sweep(sw, cfg, tmp_path / "out", fake_cell, log=lambda s: None)
    n = len(sweep.cells(sw))
    assert n == 6  # 2 seeds x (dense + 2 sparsities)
    # drawn after cells 1, 3, 5 (at t = 20, 60, 100 s) and once more at the end; the csv after every cell
    assert drawn == [1, 3, 5, 6]
    with (tmp_path / "out" / "results.csv").open() as f:
        assert len(list(csv.DictReader(f))) == n
    monkeypatch.setattr(sweep, "DRAW_EVERY", 0.0)
    drawn.clear()
    sweep.run_sweep(sw, cfg, tmp_path / "out2", fake_cell, log=lambda s: None)
    assert drawn == [1, 2, 3, 4, 5, 6]  # the last cell's reports are the closing ones, written once


def test_paired_table_pairs_each_method_with_the_best_single_index_seed_by_seed() -> None:
    """The reference is the column's best one-index method by mean test accuracy; differences are paired on the
    seeds both have, with the standard error of their mean; no one-index method: no table."""
    def row(method: str, sparsity: float, seed: int, acc: float) -> dict:
        return {"method": method, "target_sparsity": sparsity, "seed": seed, "test_accuracy": acc}

    rows = [row("dense", 0.0, 0, 0.99),
            row("synflow", 0.9, 0, 0.90), row("synflow", 0.9, 1, 0.80), row("synflow", 0.9, 2, 0.85),
            row("snip", 0.9, 0, 0.50), row("snip", 0.9, 1, 0.50), row("snip", 0.9, 2, 0.50),
            # the agent is 1 point better on every seed: a mean of +1.00 and no spread, though the seeds vary
            row("agent", 0.9, 0, 0.91), row("agent", 0.9, 1, 0.81), row("agent", 0.9, 2, 0.86),
            row("panning", 0.9, 0, 0.92), row("panning", 0.9, 1, 0.80),  # seed 2 missing: two pairs
            row("random", 0.9, 0, 0.95), row("random", 0.9, 1, 0.95), row("random", 0.9, 2, 0.95)]  # not an index
    table = sweep.paired_table(rows)
    assert "| agent | +1.00 ± 0.00 (n=3) vs synflow |" in table
    assert "| panning | +1.00 ± 1.00 (n=2) vs synflow |" in table  # differences +2 and 0
    assert "| synflow | (reference: synflow) |" in table and "dense" not in table
    assert "| snip | -35.00 ± 2.89 (n=3) vs synflow |" in table
    assert "| random | +10.00 ± 2.89 (n=3) vs synflow |" in table  # compared, never the reference
    assert sweep.paired_table([r for r in rows if r["method"] in ("agent", "panning", "random")]) == ""
