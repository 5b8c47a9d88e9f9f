"""The literature's analyses: sanity-check masks, layer statistics, collapse, recall distortion, instability."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from panning import analysis
from panning.cli import main
from panning.masks import Masks, keep_count
from panning.pruner import prune

TINY = """\
model: mlp
dataset: digits
prune:
  method: snip
  sparsity: 0.9
  scoring_per_class: 5
train:
  epochs: 0
  batch_size: 64
  lr: 0.05
  augment: false
"""


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    p = tmp_path / "tiny.yaml"
    p.write_text(TINY)
    return p


def test_shuffling_keeps_the_count_of_every_layer_and_moves_the_weights() -> None:
    g = torch.Generator().manual_seed(0)
    masks = Masks({"a": torch.rand(20, 30, generator=g) < 0.1, "b": torch.rand(50, generator=g) < 0.5})
    shuffled = analysis.shuffle_within_layers(masks, seed=3)
    for k in masks:
        assert int(shuffled[k].sum()) == int(masks[k].sum()) and shuffled[k].shape == masks[k].shape
        assert not torch.equal(shuffled[k], masks[k])
    assert shuffled.equal(analysis.shuffle_within_layers(masks, seed=3))  # seeded
    assert not shuffled.equal(analysis.shuffle_within_layers(masks, seed=4))


def test_inverting_keeps_exactly_the_lowest_scores_of_each_layer() -> None:
    masks = Masks({"a": torch.tensor([True, True, False, False, False]), "b": torch.tensor([[True], [False], [False]])})
    scores = {"a": torch.tensor([5.0, 4.0, 1.0, 3.0, 2.0]), "b": torch.tensor([[0.5], [0.1], [0.3]])}
    inv = analysis.invert_within_layers(masks, scores)
    assert inv["a"].tolist() == [False, False, True, False, True]  # the two lowest: 1 and 2
    assert inv["b"].tolist() == [[False], [True], [False]]  # the lowest: 0.1
    ties = analysis.invert_within_layers(Masks({"c": torch.tensor([True, False, False])}),
                                         {"c": torch.tensor([1.0, 1.0, 1.0])})
    assert ties["c"].tolist() == [True, False, False]


def test_ks_statistic_and_layer_statistics_by_hand() -> None:
    assert analysis.ks_statistic(torch.tensor([0.0, 1.0]), torch.tensor([2.0, 3.0])) == 1.0
    assert analysis.ks_statistic(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([3.0, 2.0, 1.0])) == 0.0
    # [0, 1] against [0, 1, 2, 3]: at 1 the CDFs are 1 and 1/2
    assert analysis.ks_statistic(torch.tensor([0.0, 1.0]), torch.tensor([0.0, 1.0, 2.0, 3.0])) == 0.5
    w = {"l": torch.tensor([-2.0, 1.0, 3.0, -4.0])}
    st = analysis.layer_statistics(w, Masks({"l": torch.tensor([True, False, True, False])}))["l"]
    assert st == {"density": 0.5, "mean": 0.5, "std": 2.5, "mean_abs": 2.5,
                  "ks": analysis.ks_statistic(torch.tensor([-2.0, 3.0]), w["l"])}


def test_paired_comparison_by_hand() -> None:
    c = analysis.paired_comparison([0.9, 0.8, 0.7], [0.8, 0.8, 0.5])
    assert c["mean_difference"] == pytest.approx(-0.1) and c["n"] == 3
    assert c["std_difference"] == pytest.approx(0.1)  # differences -0.1, 0, -0.2
    assert c["t"] == pytest.approx(-0.1 / (0.1 / 3 ** 0.5))


def test_critical_sparsity_of_a_hand_built_network() -> None:
    """Magnitude on a 4-3-2 MLP whose second layer is tiny: it empties that layer first. 18 weights, 6 in
    the second layer: collapse once at most 12 are kept, i.e. round((1 - s) * 18) <= 12, s > 0.3056."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 3, bias=False), nn.ReLU(), nn.Linear(3, 2, bias=False))
    with torch.no_grad():
        net[0].weight.copy_(torch.arange(1.0, 13.0).view(3, 4))
        net[2].weight.fill_(1e-3)

    def collapses(s: float) -> bool:
        with pytest.warns(RuntimeWarning) if keep_count(18, s) <= 12 else _no_warning():
            return prune(net, "magnitude", s, None, input_shape=(4,)).effective_sparsity >= 1.0

    crit = analysis.critical_sparsity(collapses, tol=1e-4)
    assert keep_count(18, crit) == 13 and keep_count(18, 1 - (1 - crit) * 0.999) <= 13
    assert 0.30 < crit <= 1 - 12.5 / 18
    assert analysis.critical_sparsity(lambda s: False) == 0.9999
    assert analysis.critical_sparsity(lambda s: True) == 0.0


class _no_warning:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *a: object) -> None:
        return None


def test_recall_statistics_of_a_hand_made_confusion() -> None:
    # dense: class 0 recall 0.9, class 1 0.5, accuracy 0.7; pruned: 0.9, 0.3, accuracy 0.6
    r = analysis.recall_distortion([0.9, 0.5], 0.7, [0.9, 0.3], 0.6)
    a = 0.6 / 0.7 - 1
    assert r["relative_accuracy_change"] == pytest.approx(a)
    assert [c["relative_change"] for c in r["classes"]] == pytest.approx([0.0, -0.4])
    assert [c["distortion"] for c in r["classes"]] == pytest.approx([-a, -0.4 - a])
    assert r["intensification_ratio"] == 1.0 and r["rho"] == pytest.approx(1.0)  # the weak class lost more
    de = analysis.recall_distortion([0.9, 0.5], 0.7, [0.8, 0.5], 0.65)  # the strong class lost more
    assert de["intensification_ratio"] == 0.0 and de["rho"] == pytest.approx(-1.0)


def test_sanity_command_masks_and_layer_statistics(tiny: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "sanity"
    assert main(["sanity", "--config", str(tiny), "--seeds", "0", "--out", str(out), "--no-progress"]) == 0
    summary = json.loads((out / "sanity.json").read_text())
    assert set(summary) >= {"original", "shuffled", "reinit", "inverted", "comparison"}
    assert all(len(summary[v]["per_seed"]) == 1 for v in ("original", "shuffled", "reinit", "inverted"))
    layers = json.loads((out / "layers.json").read_text())["seed0"]
    for k in layers["original"]:  # every variant keeps the original's per-layer counts
        assert {layers[v][k]["density"] for v in layers} == {layers["original"][k]["density"]}
    # re-initialised weights differ while the mask is the same
    assert layers["reinit"]["fc1.weight"]["mean_abs"] != layers["original"]["fc1.weight"]["mean_abs"]
    # SNIP keeps large weights: its kept weights are larger than a random (shuffled) subset
    assert layers["original"]["fc1.weight"]["mean_abs"] > layers["shuffled"]["fc1.weight"]["mean_abs"]
    assert layers["inverted"]["fc1.weight"]["mean_abs"] < layers["shuffled"]["fc1.weight"]["mean_abs"]
    for f in ("sanity.md", "sanity.png", "layers.png"):
        assert (out / f).is_file()
    # resumable: nothing is retrained, the same summary comes back
    before = (out / "seed0" / "original" / "metrics.json").stat().st_mtime_ns
    assert main(["sanity", "--config", str(tiny), "--seeds", "0", "--out", str(out), "--overwrite",
                 "--no-progress"]) == 0
    assert (out / "seed0" / "original" / "metrics.json").stat().st_mtime_ns == before


def test_pruning_a_checkpoint_starts_from_its_weights(tiny: Path, tmp_path: Path) -> None:
    from panning import config, runs
    from panning.hashing import state_digest

    assert main(["run", "--config", str(tiny), "--sparsity", "0", "--epochs", "1", "--out", str(tmp_path / "t"),
                 "--no-progress"]) == 0
    ckpt = tmp_path / "t" / "model.pt"
    assert main(["prune", "--config", str(tiny), "--method", "magnitude", "--checkpoint", str(ckpt), "--out",
                 str(tmp_path / "p")]) == 0
    info = json.loads((tmp_path / "p" / "prune.json").read_text())
    s = runs.setup(config.load(tiny))
    fresh = state_digest(s.model)
    runs.load_checkpoint(ckpt, s.model)
    assert info["init_sha256"] == state_digest(s.model) != fresh and info["checkpoint"] == str(ckpt)
    expected = prune(s.model, "magnitude", 0.9, None, input_shape=(64,)).masks
    assert Masks.load(tmp_path / "p" / "masks.pt").equal(expected)
    # instability of the dense trained network: every drop is its accuracy minus the pruned one's
    out = tmp_path / "inst"
    assert main(["instability", "--checkpoint", str(ckpt), "--methods", "magnitude", "random", "--sparsities", "0.5",
                 "0.95", "--out", str(out)]) == 0
    res = json.loads((out / "instability.json").read_text())
    assert res["dense_test_accuracy"] == json.loads((tmp_path / "t" / "metrics.json").read_text())["test_accuracy"]
    for r in res["rows"]:
        assert r["instability"] == pytest.approx(r["test_accuracy_before"] - r["test_accuracy_after"])
    worst = {r["method"]: r["instability"] for r in res["rows"] if r["sparsity"] == 0.95}
    assert worst["random"] > worst["magnitude"]  # removing large trained weights at random hurts more


def test_recall_command_on_a_sweep(tmp_path: Path) -> None:
    (tmp_path / "base.yaml").write_text(TINY.replace("epochs: 0", "epochs: 2"))
    (tmp_path / "sweep.yaml").write_text("base: base.yaml\nmethods: [magnitude]\nsparsities: [0.9]\nseeds: [0]\n")
    assert main(["benchmark", "--config", str(tmp_path / "sweep.yaml"), "--out", str(tmp_path / "sw")]) == 0
    assert main(["recall", "--sweep", str(tmp_path / "sw"), "--out", str(tmp_path / "rec")]) == 0
    rec = json.loads((tmp_path / "rec" / "recall.json").read_text())
    assert [(g["method"], g["sparsity"], g["n"]) for g in rec] == [("magnitude", 0.9, 1)]
    dense = json.loads(next((tmp_path / "sw" / "cells").glob("dense*/metrics.json")).read_text())
    pruned = json.loads(next((tmp_path / "sw" / "cells").glob("magnitude*/metrics.json")).read_text())
    again = analysis.recall_distortion(dense["per_class_recall"], dense["test_accuracy"], pruned["per_class_recall"],
                                       pruned["test_accuracy"])
    assert rec[0]["intensification_ratio"] == again["intensification_ratio"]


@pytest.mark.parametrize("argv, expected", [
    (["sanity", "--config", "{tiny}", "--masks", "{other}", "--out", "{o}"], "mask"),
    (["prune", "--config", "{tiny}", "--model", "lenet300", "--dataset", "mnist", "--data-dir", "{data}",
      "--checkpoint", "{ckpt}", "--out", "{o}"], "does not fit this model"),
    (["instability", "--checkpoint", "{o}/none/model.pt", "--out", "{o}"], "does not exist"),
    (["recall", "--sweep", "{o}/nowhere", "--out", "{o}"], "not a folder"),
    (["frobnicate"], "invalid choice"),
])
def test_bad_analysis_input_exits_2_and_writes_nothing(argv: list[str], expected: str, tiny: Path, tmp_path: Path,
                                                       capsys, data_dir: Path) -> None:
    other = tmp_path / "other.pt"
    Masks({"fc1.weight": torch.ones(3, 3, dtype=torch.bool)}).save(other)
    assert main(["run", "--config", str(tiny), "--sparsity", "0", "--out", str(tmp_path / "t"), "--no-progress"]) == 0
    capsys.readouterr()
    subs = {"{tiny}": str(tiny), "{other}": str(other), "{o}": str(tmp_path / "out"), "{data}": str(data_dir),
            "{ckpt}": str(tmp_path / "t" / "model.pt")}
    filled = []
    for a in argv:
        for k, v in subs.items():
            a = a.replace(k, v)
        filled.append(a)
    assert main(filled) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expected in err[0], err
    assert not (tmp_path / "out").exists()
