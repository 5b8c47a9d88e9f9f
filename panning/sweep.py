"""Accuracy-versus-sparsity sweeps: methods x sparsities x seeds, each cell pruned and fully trained.

A sweep directory holds one run directory per cell under ``cells/`` and, rebuilt after every cell,
``results.csv`` (one row per finished cell) and ``results.md`` (mean +- std per method and sparsity),
and ``accuracy_vs_sparsity.png`` (redrawn at most every ``DRAW_EVERY`` seconds while the sweep runs,
and at its end). A cell whose ``metrics.json`` exists is finished and never rerun, so
an interrupted sweep resumes where it stopped. Before resuming, every finished cell is checked
against the config this sweep would give it (``check`` in :func:`run_sweep`): a sweep folder never
mixes cells computed under two settings.

One process (the driver) writes a sweep directory. ``panning benchmark --workers N`` runs N cells
at a time as Ray tasks on a local Ray instance, ``--address`` on an existing Ray cluster
(:mod:`panning.distributed`); the driver still records every result, so resuming and the checks
above work the same.
"""
from __future__ import annotations

import csv
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from panning import config as _config
from panning.config import RunConfig
from panning.errors import ConfigError, RunDirError
from panning.io import atomic_path, write_text

if TYPE_CHECKING:
    from panning.distributed import RayCluster

COLUMNS = (
    "dataset",
    "model",
    "method",
    "sparsity",  # achieved by the masks (keep counts are whole numbers), e.g. 0.98000059 for a 0.98 cell
    "target_sparsity",  # the grid's value, what the table groups by
    "seed",
    "test_accuracy",
    "val_accuracy",
    "effective_sparsity",
    "prune_seconds",
    "train_seconds",
)
DENSE = "dense"


class SweepMismatch(RunDirError):
    """Finished cells of a sweep folder were computed under another config than the one given."""


@dataclass
class SweepConfig:
    """A sweep: a base run config plus the grid. Relative paths are relative to the sweep file."""

    base: str = field(default="configs/digits_mlp.yaml", metadata={"path": True})  # the run config
    methods: list[str] = field(default_factory=lambda: ["snip"])  # fixed methods and/or names from ``agents``
    # label -> agent.zip of a trained policy, e.g. {agent: ../../runs/demo/agent/best_agent.zip}
    agents: dict = field(default_factory=dict, metadata={"path": "values"})
    sparsities: list[float] = field(default_factory=lambda: [0.9])
    seeds: list[int] = field(default_factory=lambda: [0])
    dense: bool = True  # also train the unpruned network once per seed
    overrides: dict = field(default_factory=dict)  # dotted keys laid over the base, e.g. {"train.epochs": 5}

    def grid(self) -> dict[str, Any]:
        """What defines the sweep's cells, without where its files live: two sweeps with the same grid
        may share a folder (the config each cell computes is checked separately)."""
        return {"methods": list(self.methods), "agents": sorted(self.agents), "sparsities": list(self.sparsities),
                "seeds": list(self.seeds), "dense": self.dense, "overrides": dict(self.overrides)}


@dataclass(frozen=True)
class Cell:
    """One point of the grid."""

    method: str
    sparsity: float
    seed: int

    @property
    def key(self) -> str:
        safe = self.method.replace("/", "_").replace(":", "_").replace(".zip", "")
        return f"{safe}__s{self.sparsity:g}__seed{self.seed}"


def load_sweep(path: str | Path) -> tuple[SweepConfig, RunConfig]:
    """Read a sweep file and the run config it builds on, validating the grid."""
    p = Path(path)
    sweep = _config.load(p, SweepConfig)
    if not Path(sweep.base).is_file():
        raise ConfigError(f"{p}: base config {sweep.base} not found (relative paths are taken from {p.parent})")
    run_cfg = _config.override(_config.load(sweep.base), sweep.overrides)
    for s in sweep.sparsities:
        if not 0.0 <= s < 1.0:
            raise ConfigError(f"{p}: sparsities must lie in [0, 1), got {s}")
    if not sweep.methods or not sweep.sparsities or not sweep.seeds:
        raise ConfigError(f"{p}: methods, sparsities and seeds must each list at least one value")
    return sweep, run_cfg


def cells(sweep: SweepConfig) -> list[Cell]:
    """The grid in run order: seeds outermost, so partial results already cover every method."""
    out: list[Cell] = []
    for seed in sweep.seeds:
        if sweep.dense:
            out.append(Cell(DENSE, 0.0, seed))
        for s in sweep.sparsities:
            for m in sweep.methods:
                out.append(Cell(m, s, seed))
    return out


def read_rows(out: Path) -> list[dict[str, Any]]:
    """Rows of every finished cell under ``out/cells``."""
    rows = []
    for d in sorted((out / "cells").glob("*")):
        mp, pp = d / "metrics.json", d / "prune.json"
        if not mp.is_file():
            continue
        m = json.loads(mp.read_text())
        p = json.loads(pp.read_text()) if pp.is_file() else {}
        rows.append(
            {
                "dataset": m["dataset"],
                "model": m["model"],
                "method": m["method"],
                "sparsity": m["sparsity"],
                "seed": m["seed"],
                "test_accuracy": m["test_accuracy"],
                "val_accuracy": m["val_accuracy"],
                "effective_sparsity": p.get("effective_sparsity", m["sparsity"]),
                "prune_seconds": p.get("seconds", 0.0),
                "train_seconds": m["seconds"],
                "target_sparsity": p.get("target_sparsity", m["sparsity"]),
            }
        )
    return rows


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    """results.csv with exactly :data:`COLUMNS` (written whole, then moved into place)."""
    with atomic_path(path) as tmp, tmp.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow(r)


def _group(rows: list[dict[str, Any]], metric: str = "test_accuracy") -> dict[tuple[str, float], list[float]]:
    groups: dict[tuple[str, float], list[float]] = {}
    for r in rows:
        groups.setdefault((r["method"], round(float(r["target_sparsity"]), 6)), []).append(float(r[metric]))
    return groups


def _mean_std(v: list[float]) -> tuple[float, float]:
    return statistics.fmean(v), (statistics.stdev(v) if len(v) > 1 else 0.0)


def markdown_table(rows: list[dict[str, Any]], metric: str = "test_accuracy") -> str:
    """``metric`` (test or validation accuracy, %) mean +- std per method (rows) and sparsity (columns);
    best per column in bold."""
    groups = _group(rows, metric)
    if not groups:
        return "(no finished cells)\n"
    methods = sorted({m for m, _ in groups}, key=lambda m: (m != DENSE, m))
    sparsities = sorted({s for _, s in groups})
    best = {}
    for s in sparsities:
        cands = [(_mean_std(groups[(m, s)])[0], m) for m in methods if (m, s) in groups and m != DENSE]
        if cands:
            best[s] = max(cands)[1]
    head = "| method | " + " | ".join(f"{100 * s:g}%" for s in sparsities) + " |"
    lines = [head, "|" + "---|" * (len(sparsities) + 1)]
    for m in methods:
        cells_ = []
        for s in sparsities:
            if (m, s) not in groups:
                cells_.append("")
                continue
            mean, std = _mean_std(groups[(m, s)])
            txt = f"{100 * mean:.2f} ± {100 * std:.2f} (n={len(groups[(m, s)])})"
            cells_.append(f"**{txt}**" if best.get(s) == m else txt)
        lines.append(f"| {m} | " + " | ".join(cells_) + " |")
    return "\n".join(lines) + "\n"


def paired_table(rows: list[dict[str, Any]]) -> str:
    """Each method against the best single index of its column (by mean test accuracy; one-index methods other
    than random), seed by seed on the seeds both finished: the mean difference in test accuracy (points) with
    its standard error and the number of pairs. The seeds' spread cancels in the pairs, which is what an
    acceptance margin of a point needs ("+1.0 over the best index" on 3 seeds is within one standard error
    on small data sets); empty when no column has a single index."""
    from panning.analysis import paired_comparison
    from panning.pruner import SINGLE_INDEX_METHODS

    by_seed: dict[tuple[str, float], dict[int, float]] = {}
    for r in rows:
        key = (r["method"], round(float(r["target_sparsity"]), 6))
        by_seed.setdefault(key, {})[int(r["seed"])] = float(r["test_accuracy"])
    sparsities = sorted({s for m, s in by_seed if m != DENSE})
    refs = {}
    for s in sparsities:
        cands = [(statistics.fmean(v.values()), m) for (m, s2), v in by_seed.items()
                 if s2 == s and m in SINGLE_INDEX_METHODS]
        if cands:
            refs[s] = max(cands)[1]
    if not refs:
        return ""
    methods = sorted({m for m, s in by_seed if s in refs and m != DENSE})
    lines = ["| method | " + " | ".join(f"{100 * s:g}%" for s in refs) + " |", "|" + "---|" * (len(refs) + 1)]
    for m in methods:
        cells_ = []
        for s, ref in refs.items():
            mine, theirs = by_seed.get((m, s), {}), by_seed[(ref, s)]
            seeds = sorted(set(mine) & set(theirs))
            if m == ref:
                cells_.append(f"(reference: {ref})")
            elif not seeds:
                cells_.append("")
            else:
                c = paired_comparison([theirs[k] for k in seeds], [mine[k] for k in seeds])
                se = c["std_difference"] / math.sqrt(c["n"]) if c["n"] > 1 else float("nan")
                cells_.append(f"{100 * c['mean_difference']:+.2f} ± {100 * se:.2f} (n={c['n']}) vs {ref}")
        lines.append(f"| {m} | " + " | ".join(cells_) + " |")
    return "\n".join(lines) + "\n"


#: the zoomed panel of :func:`plot` shows methods within this many points of each column's best
ZOOM_POINTS = 3.0


Series = dict[str, list[tuple[float, float, float]]]  # method -> [(sparsity, mean, std)], fractions


def zoom_range(series: Series, dense: float | None = None) -> tuple[float, float] | None:
    """Accuracy limits (%) of the zoomed panel: the means ± std of every point within
    :data:`ZOOM_POINTS` of its column's best (and the dense line); None when nothing lies more
    than that below them, so one panel shows everything."""
    finite = [(s, 100 * mean, 100 * std) for pts in series.values() for s, mean, std in pts
              if math.isfinite(mean) and math.isfinite(std)]
    best: dict[float, float] = {}
    for s, mean, _ in finite:
        best[s] = max(best.get(s, 0.0), mean)
    near = [(mean, std) for s, mean, std in finite if mean >= best[s] - ZOOM_POINTS]
    if not near:
        return None
    lowest = min(mean for _, mean, _ in finite)
    if lowest >= min(m for m, _ in near) - ZOOM_POINTS:
        return None
    top = max([m + e for m, e in near] + ([dense] if dense is not None else []))
    return min(m - e for m, e in near) - 0.2, min(100.0, top + 0.2)


def plot(rows: list[dict[str, Any]], path: Path, title: str = "") -> None:
    """Accuracy versus sparsity on a log-density axis, one line per method, std error bars (clipped
    to 0-100%). When some method collapses far below the rest, a second panel zooms on the methods
    within :data:`ZOOM_POINTS` of each column's best, where the choice between them is made."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = _group(rows)
    dense = [v for (m, _), vs in groups.items() if m == DENSE for v in vs]
    methods = sorted({m for m, _ in groups if m != DENSE})
    series = {m: sorted((s, *_mean_std(v)) for (mm, s), v in groups.items() if mm == m) for m in methods}
    dense_mean = 100 * statistics.fmean(dense) if dense else None
    zoom = zoom_range(series, dense_mean)
    fig, axes = plt.subplots(1, 2 if zoom else 1, figsize=(12 if zoom else 7, 4.5), squeeze=False)
    ticks = sorted({1 - s for (_, s) in groups if s > 0}, reverse=True)
    for i, ax in enumerate(axes[0]):
        if dense_mean is not None:
            ax.axhline(dense_mean, color="grey", ls="--", lw=1, label="dense")
        for m, pts in series.items():
            means = [100 * a for _, a, _ in pts]
            stds = [100 * e for _, _, e in pts]
            yerr = [[min(e, a) for a, e in zip(means, stds, strict=True)],
                    [min(e, 100 - a) for a, e in zip(means, stds, strict=True)]]
            ax.errorbar([1 - s for s, _, _ in pts], means, yerr=yerr, marker="o", capsize=3, label=m)
        if len(ticks) == 1:  # a single sparsity: give the log axis some width around it
            ax.set_xlim(ticks[0] * 2, ticks[0] / 2)
        ax.set_xscale("log")
        if len(ticks) != 1:
            ax.invert_xaxis()
        if ticks:
            ax.set_xticks(ticks)
            ax.set_xticklabels([f"{100 * (1 - d):g}%" for d in ticks])
            ax.minorticks_off()
        ax.set_xlabel("sparsity (log density axis)")
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
        if i == 1 and zoom is not None:
            ax.set_ylim(*zoom)
            ax.set_title(f"zoom: within {ZOOM_POINTS:g} points of each column's best")
        else:
            ax.set_title(title)
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_reports(out: Path, title: str = "", draw: bool = True) -> list[dict[str, Any]]:
    """Rebuild results.csv, results.md and (with ``draw``) the plot from the finished cells."""
    rows = read_rows(out)
    write_csv(rows, out / "results.csv")
    # the validation table is what a choice between methods (an agent to ship) may read; the test table is not
    write_text(out / "results.md", f"# {title}\n\nTest accuracy (%), mean ± std over seeds.\n\n" + markdown_table(rows)
               + "\nValidation accuracy (%), mean ± std over seeds (the split carved from the training set: what a "
               "selection may read).\n\n" + markdown_table(rows, "val_accuracy") + paired_section(rows))
    if rows and draw:
        with atomic_path(out / "accuracy_vs_sparsity.png") as png:  # the temporary name keeps the .png suffix
            plot(rows, png, title)
    return rows


def paired_section(rows: list[dict[str, Any]]) -> str:
    """:func:`paired_table` under its heading, as results.md ends and ``panning benchmark`` prints it; empty
    without a single index."""
    table = paired_table(rows)
    return ("\nTest accuracy minus the best single index of the column, paired seed by seed (points): mean ± "
            "standard error of the differences (n pairs).\n\n" + table) if table else ""


#: ``(run config, cell, folder)``: computes the cell and writes its prune.json and metrics.json
CellRunner = Callable[[RunConfig, Cell, Path], object]
#: ``(cell, folder) -> reason`` a finished cell does not match this sweep, or None when it does
CellCheck = Callable[[Cell, Path], "str | None"]


def check_finished_cells(sweep: SweepConfig, out: Path, check: CellCheck | None) -> list[Cell]:
    """The grid's finished cells under ``out``, each vetted by ``check`` (when given): raises
    :class:`SweepMismatch` naming the first one computed under another config. Every seed's cells
    are vetted, not only those a process was asked to run: the reports cover them all."""
    finished = [c for c in cells(sweep) if (out / "cells" / c.key / "metrics.json").is_file()]
    if check is not None:
        bad = [(c, why) for c in finished if (why := check(c, out / "cells" / c.key))]
        if bad:
            c, why = bad[0]
            more = f" and {len(bad) - 1} more cells" if len(bad) > 1 else ""
            raise SweepMismatch(f"{out}/cells/{c.key}{more} were computed differently: {why}; "
                                "use another --out, or delete those cells to recompute them")
    return finished


#: while a sweep runs, its plot is redrawn at most this often (seconds); always at the end
DRAW_EVERY = 30.0


def run_sweep(
    sweep: SweepConfig,
    run_cfg: RunConfig,
    out: Path,
    run_cell: CellRunner,
    *,
    seeds: list[int] | None = None,
    check: CellCheck | None = None,
    cluster: RayCluster | None = None,
    log: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True),
) -> list[dict[str, Any]]:
    """Run every unfinished cell with ``run_cell`` (which writes prune.json + metrics.json into its folder).

    ``seeds`` runs only those seeds of the grid; the reports always cover every finished cell.
    ``check`` vets every finished cell of the grid first: a cell computed under another config (base
    file edited, --epochs given, agent retrained) would mix into the table unseen, so any mismatch
    raises :class:`SweepMismatch` before anything runs or is written. With ``cluster`` (an entered
    :class:`panning.distributed.RayCluster`) the cells run as Ray tasks, ``run_cell`` in a worker's
    temporary folder, and this process alone writes their files into the sweep directory; without,
    they run here one after the other.
    """
    grid = [c for c in cells(sweep) if seeds is None or c.seed in seeds]
    finished = set(check_finished_cells(sweep, out, check))
    out.mkdir(parents=True, exist_ok=True)
    _config.dump(sweep, out / "sweep.yaml")
    title = f"{run_cfg.dataset} / {run_cfg.model}"
    todo = [c for c in grid if c not in finished]
    workers = cluster.slots() if cluster is not None else 1
    log(f"{len(grid) - len(todo)}/{len(grid)} cells already finished; {len(todo)} to run"
        + (f" on Ray, {workers} at a time" if cluster is not None else ""))
    t_start = time.perf_counter()
    done_now = 0
    drawn_at = -math.inf

    def finished_one(c: Cell, seconds: float) -> None:
        nonlocal done_now, drawn_at
        done_now += 1
        # Redrawing the plot costs ~0.25 s of CPU (matplotlib), which on a small machine is taken from the
        # cells running beside it; the table files stay current after every cell, the plot at most DRAW_EVERY s old.
        if done_now < len(todo):  # after the last cell the closing write_reports below writes them all
            draw = time.perf_counter() - drawn_at >= DRAW_EVERY
            write_reports(out, title, draw=draw)
            if draw:
                drawn_at = time.perf_counter()
        done = sum((out / "cells" / g.key / "metrics.json").is_file() for g in grid)
        rate = done_now / max(time.perf_counter() - t_start, 1e-9)
        eta = (len(todo) - done_now) / rate if rate > 0 else float("nan")
        log(f"[{done}/{len(grid)}] {c.key} done in {seconds:.0f} s; about {_fmt(eta)} left")

    if cluster is None:
        for c in todo:
            d = out / "cells" / c.key
            d.mkdir(parents=True, exist_ok=True)
            t0 = time.perf_counter()
            run_cell(run_cfg, c, d)
            finished_one(c, time.perf_counter() - t0)
    else:
        from panning.distributed import unpack_folder

        for c, files, seconds in cluster.run(run_cfg, todo, run_cell):
            d = out / "cells" / c.key
            if (d / "metrics.json").is_file():
                continue  # already recorded (never twice)
            unpack_folder(files, d)
            finished_one(c, seconds)
    return write_reports(out, title)


def _fmt(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"
