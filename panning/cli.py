"""The ``panning`` command: the top layer, which may import every other (library, envs, agents).

Bad input ends with exit code 2 and one line on stderr (``panning: error: ...``): any
:class:`panning.errors.PanningError`, and the OS errors a user causes (a missing file, a folder
that cannot be written). Nothing is written before the inputs have been checked. Any other
exception is a bug in panning: its traceback is printed, with a line asking to report it, and the
exit code is 1.

The flags of ``prune``, ``train`` and ``run`` are generated from the run config's dataclasses
(:func:`panning.config.cli_options`): a setting is declared once, with its flag and help, and its
value reaches the config under the field's dotted name.
"""
from __future__ import annotations

import argparse
import functools
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

import panning
from panning.errors import PanningError, UsageError

EXIT_USAGE = 2
EXIT_BUG = 1
#: OS errors that come from what the user asked for (a path), not from a bug: one line, exit 2
USER_OS_ERRORS = (FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError, NotADirectoryError)


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are the project's: one line through :func:`run_guarded`, no usage dump."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {message} (see --help)")


def _add_config_flags(p: argparse.ArgumentParser, groups: Sequence[str]) -> None:
    """The flags of every run-config field in ``groups`` (see :func:`panning.config.cli_options`)."""
    from panning import config

    for opt in config.cli_options():
        if opt.group not in groups:
            continue
        kw: dict[str, Any] = {"help": opt.help, "dest": opt.dest}
        if opt.kind == "bool":
            kw.update(action="store_true", default=None)
        elif opt.kind == "list":
            kw.update(nargs="+")
        else:
            kw["type"] = {"int": int, "float": float, "str": str}[opt.kind]
        if opt.choices:
            kw["choices"] = list(opt.choices)
        p.add_argument(opt.flag, **kw)


def _run_parser(sub: Any, name: str, help: str, groups: Sequence[str], *,
                config: bool = True) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help)
    if config:
        p.add_argument("--config", type=Path, help="YAML run config (configs/*.yaml); flags override it")
    _add_config_flags(p, groups)
    p.add_argument("--overwrite", action="store_true", help="replace results already in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``panning`` command."""
    parser = OneLineParser(prog="panning", description="Prune neural networks before training.")
    parser.add_argument("--version", action="version", version=f"panning {panning.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=OneLineParser)

    p = _run_parser(sub, "prune", "compute masks for a freshly initialised network",
                    ("model", "data", "device", "prune"))
    p.add_argument("--checkpoint", type=Path,
                   help="prune these trained weights (model.pt of a `panning train` run) instead of a fresh init")
    p.add_argument("--out", type=Path, required=True, help="run directory (masks.pt, prune.json)")
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser("train", help="train and evaluate a network under masks from `panning prune`")
    p.add_argument("--masks", type=Path, required=True, help="masks.pt inside a prune run directory")
    p.add_argument("--config", type=Path, help="YAML run config; flags override it (default: the prune run's)")
    _add_config_flags(p, ("data", "device", "train"))
    p.add_argument("--overwrite", action="store_true", help="replace results already in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--out", type=Path, required=True, help="run directory (metrics.json, tb/)")
    p.set_defaults(func=cmd_train)

    p = _run_parser(sub, "run", "prune, then train and evaluate, in one run directory",
                    ("model", "data", "device", "prune", "train"))
    p.add_argument("--out", type=Path, required=True, help="run directory")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("benchmark", help="sweep methods x sparsities x seeds; resumable; table, CSV and plot")
    p.add_argument("--config", type=Path, required=True, help="sweep YAML (configs/bench/*.yaml)")
    p.add_argument("--out", type=Path, required=True, help="sweep directory; rerun the same command to resume")
    _add_config_flags(p, ("data", "device"))
    p.add_argument("--epochs", type=int, help="override the training epochs of every cell")
    p.add_argument("--seeds", type=int, nargs="+", help="run only these seeds of the grid")
    p.add_argument("--workers", type=int, help="run this many cells at a time as Ray tasks on a local Ray instance")
    p.add_argument("--address", help="run the cells on this existing Ray cluster (host:port; default $RAY_ADDRESS)")
    p.add_argument("--cpus-per-cell", type=float,
                   help="CPUs a cell declares to Ray (default 1; with --workers or --address)")
    p.add_argument("--gpus-per-cell", type=float,
                   help="GPUs a cell declares to Ray, fractions allowed (default 0; with --workers or --address)")
    p.set_defaults(func=cmd_benchmark)

    p = sub.add_parser("train-agent", help="train the panning agent (PPO) in panning/Panning-v0; resumable")
    p.add_argument("--config", type=Path, help="agent YAML (configs/agent/*.yaml)")
    p.add_argument("--out", type=Path, help="new run directory (agent.zip, best_agent.zip, checkpoints/, tb/)")
    p.add_argument("--resume", type=Path, metavar="DIR", help="continue the run in DIR from its last checkpoint")
    p.add_argument("--timesteps", type=int, help="override n_timesteps (total env steps)")
    p.add_argument("--seed", type=int, help="override the config's seed (PPO's and the envs' random streams)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train_agent)

    p = _run_parser(sub, "sanity", "sanity checks: original, shuffled, re-initialised and inverted masks, trained",
                    ("model", "data", "device", "prune", "train"))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="initialisation and training seeds")
    p.add_argument("--masks", type=Path, help="check these masks (masks.pt of a prune run) instead of pruning")
    p.add_argument("--out", type=Path, required=True, help="folder: sanity.json/.md/.png, layers.json/.png, seed*/")
    p.set_defaults(func=cmd_sanity)

    p = sub.add_parser("collapse", help="layer collapse: effective sparsity and critical compression per method")
    p.add_argument("--models", nargs="+", default=["mlp:digits", "lenet300:mnist", "lenet5:mnist"],
                   help="model:dataset pairs (default: mlp:digits lenet300:mnist lenet5:mnist)")
    p.add_argument("--methods", nargs="+", help="methods (default: every fixed method)")
    p.add_argument("--sparsities", type=float, nargs="+", default=[0.9, 0.95, 0.98, 0.99, 0.995, 0.998, 0.999])
    p.add_argument("--tol", type=float, default=0.02, help="bisection tolerance in log-density (default 0.02)")
    p.add_argument("--config", type=Path, help="run config for the other settings (init, seed, exclude, ...)")
    _add_config_flags(p, ("data", "device"))
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--overwrite", action="store_true", help="replace results already in --out")
    p.set_defaults(func=cmd_collapse)

    p = sub.add_parser("recall", help="recall distortion of every pruned cell of a finished sweep")
    p.add_argument("--sweep", type=Path, required=True, help="a `panning benchmark` output folder with dense cells")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--overwrite", action="store_true", help="replace results already in --out")
    p.set_defaults(func=cmd_recall)

    p = sub.add_parser("instability", help="accuracy lost right after pruning a trained network, per method")
    p.add_argument("--checkpoint", type=Path, required=True, help="model.pt of a `panning train` or `run` directory")
    p.add_argument("--methods", nargs="+", help="methods (default: every fixed method)")
    p.add_argument("--sparsities", type=float, nargs="+", default=[0.9, 0.98, 0.99])
    _add_config_flags(p, ("data", "device"))
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--overwrite", action="store_true", help="replace results already in --out")
    p.set_defaults(func=cmd_instability)

    p = sub.add_parser("list", help="list models, datasets, methods and indices")
    p.set_defaults(func=cmd_list)
    return parser


# --------------------------------------------------------------------------------------------------


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    """``{dotted setting: value}`` of every generated flag given on the command line."""
    from panning import config

    return {opt.dotted: getattr(args, opt.dest, None) for opt in config.cli_options()}


def _resolve(args: argparse.Namespace, base: Any = None) -> Any:
    """Config from --config (or ``base``), with flags laid over it, validated by name."""
    from panning import config

    cfg = config.load(args.config) if getattr(args, "config", None) else (base or config.RunConfig())
    given = _overrides(args)
    if given.get("prune.policy"):
        # the agent brings its own steps, schedule, selection mode and normalisation
        clash = [opt.flag for opt in config.cli_options()
                 if opt.dotted in ("prune.iterations", "prune.schedule", "prune.mode", "prune.min_per_layer")
                 and given[opt.dotted] is not None]
        if clash:
            raise UsageError(f"{', '.join(clash)} cannot be combined with --policy: the agent decides its own steps")
        if given.get("prune.method") is None:
            given["prune.method"] = "agent"
    cfg = config.override(cfg, given)
    _validate(cfg)
    return cfg


def _validate(cfg: Any) -> None:
    """Check names and ranges before any data is loaded or anything is written."""
    from panning.data import available_datasets
    from panning.masks import keep_count
    from panning.models import INITS, available_models
    from panning.pruner import available_methods
    from panning.train import resolve_device

    if cfg.model not in available_models() and not cfg.model.startswith("tv:"):
        raise UsageError(f"unknown model {cfg.model!r}; valid models: {', '.join(available_models())}, "
                         "tv:<torchvision name>")
    if cfg.init not in INITS:
        raise UsageError(f"unknown init {cfg.init!r}; valid: {', '.join(INITS)}")
    if cfg.dataset not in available_datasets():
        raise UsageError(f"unknown dataset {cfg.dataset!r}; valid datasets: {', '.join(available_datasets())}")
    if cfg.prune.policy:
        from panning.agents.policy import agent_path, check_agent_file, shipped_agents

        if not agent_path(cfg.prune.policy).is_file():
            raise UsageError(f"--policy {cfg.prune.policy} does not exist (train one with `panning train-agent`, or "
                             f"name a shipped agent: {', '.join(shipped_agents()) or 'none'})")
        check_agent_file(cfg.prune.policy)  # metadata against the installed code, before anything is written
    elif cfg.prune.method not in available_methods():
        raise UsageError(f"unknown method {cfg.prune.method!r}; valid methods: {', '.join(available_methods())}")
    if not 0.0 <= cfg.prune.sparsity < 1.0:
        raise UsageError(f"--sparsity must be in [0, 1), got {cfg.prune.sparsity}")
    keep_count(1, cfg.prune.sparsity)
    if cfg.prune.iterations is not None and cfg.prune.iterations < 1:
        raise UsageError(f"--iterations must be >= 1, got {cfg.prune.iterations}")
    if cfg.train.epochs < 0:
        raise UsageError(f"--epochs must be >= 0, got {cfg.train.epochs}")
    resolve_device(cfg.device)


def _load_policy(cfg: Any) -> Any:
    """The trained agent ``prune.policy`` names, as a library policy (None for a fixed method)."""
    if not cfg.prune.policy:
        return None
    from panning.agents.policy import load_policy

    return load_policy(cfg.prune.policy)


def _progress(args: argparse.Namespace) -> bool | None:
    return False if args.no_progress else None


def _print_row(method: str, sparsity: float, eff: float, acc: float | None = None) -> None:
    acc_s = "" if acc is None else f"  test accuracy {100 * acc:6.2f}%"
    print(f"{method:<10} sparsity {100 * sparsity:6.2f}%  effective {100 * eff:6.2f}%{acc_s}")


def cmd_prune(args: argparse.Namespace) -> int:
    """``panning prune``: masks.pt + prune.json."""
    from panning import runs

    cfg = _resolve(args)
    runs.prepare_out(args.out, args.overwrite, results=runs.RESULT_FILES)
    policy = _load_policy(cfg)
    s = runs.setup(cfg)
    if args.checkpoint is not None:
        runs.load_checkpoint(args.checkpoint, s.model)
    runs.check_sparsity(s.model, cfg.prune.sparsity, cfg.prune.exclude)
    result = runs.prune_model(cfg, s, policy)
    runs.save_prune(args.out, cfg, s, result,
                    extra={"checkpoint": str(args.checkpoint)} if args.checkpoint is not None else None)
    _print_row(cfg.prune.method, result.sparsity, result.effective_sparsity)
    print(f"wrote {args.out / 'masks.pt'} and {args.out / 'prune.json'} ({result.seconds:.1f} s)")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    """``panning train``: metrics.json + tb/ for masks from a prune run."""
    from panning import config, runs

    base, masks, info = runs.load_run_masks(args.masks)
    cfg = _resolve(args, base)
    runs.prepare_out(args.out, args.overwrite, results=("metrics.json",))
    s = runs.setup(cfg)
    masks.check(s.model)
    if info.get("init_sha256") and info["init_sha256"] != runs.state_digest(s.model.cpu()):
        raise runs.RunDirError("the rebuilt initial weights differ from the ones that were pruned "
                               "(different machine or library version)")
    s.model.to(s.device)
    args.out.mkdir(parents=True, exist_ok=True)
    config.dump(cfg, args.out / "config.yaml")
    metrics = runs.train_and_evaluate(cfg, s, masks, args.out, progress=_progress(args))
    _print_row(cfg.prune.method, masks.sparsity, info.get("effective_sparsity", float("nan")), metrics["test_accuracy"])
    print(f"wrote {args.out / 'metrics.json'} ({metrics['seconds']:.1f} s training)")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    """``panning run``: prune, train and evaluate in one directory."""
    from panning import runs

    cfg = _resolve(args)
    runs.prepare_out(args.out, args.overwrite)
    policy = _load_policy(cfg)
    s = runs.setup(cfg)
    runs.check_sparsity(s.model, cfg.prune.sparsity, cfg.prune.exclude)
    result = runs.prune_model(cfg, s, policy)
    runs.save_prune(args.out, cfg, s, result)
    metrics = runs.train_and_evaluate(cfg, s, result.masks, args.out, progress=_progress(args))
    _print_row(cfg.prune.method, result.sparsity, result.effective_sparsity, metrics["test_accuracy"])
    print(f"wrote {args.out}/ (prune {result.seconds:.1f} s, train {metrics['seconds']:.1f} s)")
    return 0


def cmd_benchmark(args: argparse.Namespace) -> int:
    """``panning benchmark``: a resumable sweep with results.csv, results.md and a plot."""
    from panning import config, runs, sweep
    from panning.agents.policy import agent_path, check_agent_file, load_policy
    from panning.data import load_dataset
    from panning.pruner import available_methods

    address = args.address or os.environ.get("RAY_ADDRESS")
    on_ray = args.workers is not None or bool(address)
    if not on_ray:  # a resource declaration nobody reads would run the sweep serially without a word
        for flag, value in (("--cpus-per-cell", args.cpus_per_cell), ("--gpus-per-cell", args.gpus_per_cell)):
            if value is not None:
                raise UsageError(f"{flag} declares what a cell needs from Ray: add --workers N (a local Ray "
                                 "instance) or --address host:port, or drop it")
    sw, cfg = sweep.load_sweep(args.config)
    given = {k: v for k, v in _overrides(args).items() if k in ("device", "data_dir", "download")}
    cfg = config.override(cfg, {**given, "train.epochs": args.epochs})
    _validate(cfg)
    for name, path in sw.agents.items():
        if not agent_path(path).is_file():
            raise UsageError(f"{args.config}: agent {name!r}: {path} does not exist "
                             "(train it with `panning train-agent`)")
        check_agent_file(path)
    for name in sw.agents:
        if name in available_methods() or name == sweep.DENSE:
            raise UsageError(f"{args.config}: agent name {name!r} is also a fixed method's name; "
                             f"call it e.g. 'agent_{name}'")
    for m in sw.methods:
        if m not in available_methods() and m not in sw.agents:
            raise UsageError(f"{args.config}: unknown method {m!r}; valid methods: {', '.join(available_methods())}"
                             + (f", or the agents {', '.join(sw.agents)}" if sw.agents else ""))
    if args.seeds and not set(args.seeds) <= set(sw.seeds):
        raise UsageError(f"--seeds {args.seeds} are not all in the sweep's seeds {sw.seeds}")
    done = args.out / "sweep.yaml"
    if done.is_file() and config.load(done, sweep.SweepConfig).grid() != sw.grid():
        raise runs.RunDirError(f"{args.out} holds a different sweep; choose another --out (it is never overwritten)")
    bundle = load_dataset(cfg.dataset, cfg.data_dir, download=cfg.download, seed=cfg.split_seed)
    probe = runs.setup(cfg, bundle).model
    for s in sw.sparsities:
        runs.check_sparsity(probe, s, cfg.prune.exclude)
    policies = {name: load_policy(path) for name, path in sw.agents.items()}
    # vet the finished cells before recording this run's config: a refused resume must leave nothing behind
    sweep.check_finished_cells(sw, args.out, lambda cell, d: runs.cell_mismatch(cfg, cell, d, policies))
    if on_ray:
        from panning.distributed import RayCluster

        agent_files = {name: (path, agent_path(path).read_bytes()) for name, path in sw.agents.items()}
        cpus = 1.0 if args.cpus_per_cell is None else args.cpus_per_cell
        gpus = 0.0 if args.gpus_per_cell is None else args.gpus_per_cell
        with RayCluster(args.workers, address, cpus, gpus) as cluster:
            runs.record_sweep_config(args.out, cfg)
            rows = sweep.run_sweep(sw, cfg, args.out, SweepCell(agent_files), seeds=args.seeds, cluster=cluster)
    else:
        runs.record_sweep_config(args.out, cfg)
        rows = sweep.run_sweep(
            sw, cfg, args.out, lambda c, cell, d: runs.run_cell(c, cell, d, bundle, progress=None, agents=policies),
            seeds=args.seeds)
    print(sweep.markdown_table(rows), end="")
    # the margins a comparison with the best index needs: the seeds' own spread cancels in the pairs
    print(sweep.paired_section(rows), end="")
    print(f"wrote {args.out / 'results.csv'}, {args.out / 'results.md'}, {args.out / 'accuracy_vs_sparsity.png'}")
    return 0


def cmd_sanity(args: argparse.Namespace) -> int:
    """``panning sanity``: Frankle et al.'s sanity checks of a method or an agent."""
    from panning import runs
    from panning.analysis_runs import sanity_checks
    from panning.masks import Masks

    cfg = _resolve(args)
    if any(seed < 0 for seed in args.seeds):
        raise UsageError(f"--seeds must be >= 0, got {args.seeds}")
    if (args.out / "sanity.json").is_file() and not args.overwrite:
        raise runs.RunDirError(f"{args.out} already holds sanity.json; pass --overwrite or choose another --out")
    masks = Masks.load(args.masks) if args.masks is not None else None
    policy = _load_policy(cfg)
    s = runs.setup(cfg)
    if masks is not None:
        masks.check(s.model)  # another model's masks: refused before anything is written
    else:
        runs.check_sparsity(s.model, cfg.prune.sparsity, cfg.prune.exclude)
    summary = sanity_checks(cfg, args.seeds, args.out, policy=policy, masks=masks, bundle=s.bundle,
                            progress=_progress(args))
    for v in ("original", "shuffled", "reinit", "inverted"):
        print(f"{v:<9} {100 * summary[v]['mean']:6.2f} ± {100 * summary[v]['std']:.2f}% test accuracy")
    print(f"wrote {args.out / 'sanity.json'}, sanity.md, sanity.png, layers.json, layers.png")
    return 0


def _methods(names: Sequence[str] | None) -> list[str]:
    from panning.pruner import available_methods

    names = list(names) if names else available_methods()
    unknown = [m for m in names if m not in available_methods()]
    if unknown:
        raise UsageError(f"unknown method {unknown[0]!r}; valid methods: {', '.join(available_methods())}")
    return names


def _refuse_results(out: Path, name: str, overwrite: bool) -> None:
    from panning import runs

    if (out / name).is_file() and not overwrite:
        raise runs.RunDirError(f"{out} already holds {name}; pass --overwrite or choose another --out")


def cmd_collapse(args: argparse.Namespace) -> int:
    """``panning collapse``: effective sparsity and critical compression of each method on each model."""
    from panning import config
    from panning.analysis_runs import collapse_study

    _refuse_results(args.out, "collapse.json", args.overwrite)
    methods = _methods(args.methods)
    base = config.load(args.config) if args.config else config.RunConfig()
    place = {k: v for k, v in _overrides(args).items() if k in ("device", "data_dir", "download")}
    cfgs = []
    for pair in args.models:
        model, _, dataset = pair.partition(":")
        if not dataset:
            raise UsageError(f"--models takes model:dataset pairs (e.g. lenet300:mnist), got {pair!r}")
        cfg = config.override(base, {**place, "model": model, "dataset": dataset})
        _validate(cfg)
        cfgs.append(cfg)
    for sp in args.sparsities:
        if not 0 <= sp < 1:
            raise UsageError(f"--sparsities must lie in [0, 1), got {sp}")
    if not 0 < args.tol < 1:
        raise UsageError(f"--tol must lie in (0, 1), got {args.tol}")
    results = collapse_study(cfgs, methods, args.sparsities, args.out, tol=args.tol)
    print((args.out / "collapse.md").read_text(), end="")
    print(f"wrote {args.out / 'collapse.json'}, collapse.md, collapse.png ({len(results)} models)")
    return 0


def cmd_recall(args: argparse.Namespace) -> int:
    """``panning recall``: recall distortion over a finished sweep."""
    from panning.analysis_runs import recall_study

    if not args.sweep.is_dir():
        raise UsageError(f"--sweep {args.sweep} is not a folder (a `panning benchmark` output)")
    _refuse_results(args.out, "recall.json", args.overwrite)
    recall_study(args.sweep, args.out)
    print((args.out / "recall.md").read_text(), end="")
    print(f"wrote {args.out / 'recall.json'}, recall.md, recall.png")
    return 0


def cmd_instability(args: argparse.Namespace) -> int:
    """``panning instability``: the accuracy drop right after pruning a trained network."""
    from panning import config, runs
    from panning.analysis_runs import instability_study

    _refuse_results(args.out, "instability.json", args.overwrite)
    cfg_path = args.checkpoint.parent / "config.yaml"
    if not args.checkpoint.is_file():
        raise runs.RunDirError(f"checkpoint {args.checkpoint} does not exist (model.pt of a `panning train` run)")
    if not cfg_path.is_file():
        raise runs.RunDirError(f"{cfg_path} is missing: --checkpoint must be model.pt inside a run directory")
    cfg = config.override(config.load(cfg_path), {k: v for k, v in _overrides(args).items()
                                                  if k in ("device", "data_dir", "download")})
    _validate(cfg)
    methods = _methods(args.methods)
    s = runs.setup(cfg)
    runs.load_checkpoint(args.checkpoint, s.model)  # another architecture's weights: refused before writing
    for sp in args.sparsities:
        runs.check_sparsity(s.model, sp, cfg.prune.exclude)
    instability_study(cfg, args.checkpoint, methods, args.sparsities, args.out)
    print((args.out / "instability.md").read_text(), end="")
    print(f"wrote {args.out / 'instability.json'}, instability.md, instability.png")
    return 0


class SweepCell:
    """One sweep cell in whatever process runs it (a Ray worker on any node): the data set is loaded
    there (once per process), and the agents come as their files' bytes, so no path needs to exist
    on the worker except the data folder."""

    def __init__(self, agents: dict[str, tuple[str, bytes]]) -> None:
        self.agents = agents
        self._policies: dict[str, Any] | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"agents": self.agents, "_policies": None}

    def __call__(self, cfg: Any, cell: Any, out: Path) -> object:
        import tempfile

        from panning import runs
        from panning.agents.policy import load_policy

        if self._policies is None:
            self._policies = {}
            # the agents' bytes travel with the task; load them from a folder removed right after
            with tempfile.TemporaryDirectory(prefix="panning-agents-") as tmp:
                folder = Path(tmp)
                for name, (path, data) in self.agents.items():
                    (folder / f"{name}.zip").write_bytes(data)
                    policy = load_policy(folder / f"{name}.zip")
                    policy.info["path"] = path  # the cell records where the agent lives, not the copy
                    self._policies[name] = policy
        bundle = _bundle(cfg.dataset, cfg.data_dir, cfg.download, cfg.split_seed)
        return runs.run_cell(cfg, cell, out, bundle, progress=False, agents=self._policies)


@functools.lru_cache(maxsize=2)
def _bundle(dataset: str, data_dir: str | None, download: bool, split_seed: int) -> Any:
    from panning.data import load_dataset

    return load_dataset(dataset, data_dir, download=download, seed=split_seed)


def cmd_train_agent(args: argparse.Namespace) -> int:
    """``panning train-agent``: PPO on panning/Panning-v0, checkpointed, resumable."""
    import dataclasses

    from panning.agents.config import load_agent_config
    from panning.agents.train import train_agent

    bar = False if args.no_progress else None
    if (args.out is None) == (args.resume is None):
        raise UsageError("give either --out DIR (a new run) or --resume DIR (continue one)")
    if args.resume is not None:
        if args.config is not None or args.timesteps is not None or args.seed is not None:
            raise UsageError("--resume continues a run with its saved agent.yaml; "
                             "--config, --timesteps and --seed do not apply")
        record = train_agent(None, args.resume, resume=True, progress_bar=bar)
    else:
        if args.config is None:
            raise UsageError("--config is required for a new run (e.g. configs/agent/digits_mlp.yaml)")
        if args.timesteps is not None and args.timesteps < 1:
            raise UsageError(f"--timesteps must be >= 1, got {args.timesteps}")
        if args.seed is not None and args.seed < 0:
            raise UsageError(f"--seed must be >= 0, got {args.seed}")
        cfg = load_agent_config(args.config)
        if args.timesteps is not None:
            cfg = dataclasses.replace(cfg, n_timesteps=args.timesteps)
        if args.seed is not None:
            cfg = dataclasses.replace(cfg, seed=args.seed)
        record = train_agent(cfg, args.out, overwrite=args.overwrite, progress_bar=bar)
    wall = f" in {record['wall_seconds'] / 60:.1f} min" if "wall_seconds" in record else ""
    print(f"trained {record['timesteps']} steps{wall}")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    """``panning list``: the names every flag accepts."""
    from panning.data import available_datasets
    from panning.indices import available_indices
    from panning.models import INITS, available_models
    from panning.pruner import available_methods

    print("models:   " + ", ".join(available_models()) + ", tv:<torchvision model>")
    print("datasets: " + ", ".join(available_datasets()))
    print("methods:  " + ", ".join(available_methods()))
    print("indices:  " + ", ".join(available_indices()))
    print("inits:    " + ", ".join(INITS))
    from panning.agents.policy import shipped_agents  # file names only: Stable-Baselines3 is not loaded

    print("agents:   " + ", ".join(shipped_agents()))
    return 0


def _one_line(e: BaseException, prog: str = "panning") -> str:
    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    if isinstance(e, OSError) and e.filename is not None and str(e.filename) not in msg:
        msg = f"{msg}: {e.filename}"
    return msg if msg.startswith(prog) else f"{prog}: error: {msg}"


def run_guarded(func: Callable[[], int | None], prog: str = "panning") -> int:
    """Run ``func`` as a command: its exit code, or (bad input: a :class:`PanningError` or a user's OS
    error) one line on stderr and exit 2, or (a bug) the traceback and exit 1. The ``panning`` command
    and the scripts under ``benchmarks/`` end the same way."""
    import warnings

    # one readable line per warning (layer collapse, ...), not a source excerpt; restored on return
    original_format = warnings.formatwarning
    warnings.formatwarning = lambda msg, cat, *a, **k: f"{prog}: warning: {msg}\n"
    try:
        return func() or 0
    except (PanningError, *USER_OS_ERRORS) as e:
        print(_one_line(e, prog), file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception:  # anything else is a bug: keep everything a report needs
        traceback.print_exc()
        print(f"{prog}: internal error: this is a bug in panning {panning.__version__}, not a problem with your "
              "input; please report it on the project's issue tracker with the traceback above and the command "
              "you ran", file=sys.stderr)
        return EXIT_BUG
    finally:
        warnings.formatwarning = original_format


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: parse and run; bad input is one line and exit 2, a bug a traceback and exit 1."""
    from panning.alloc import tune_malloc

    tune_malloc()  # we own this process: keep freed tensor memory for reuse (see panning/alloc.py)
    parser = build_parser()

    def run() -> int:
        args = parser.parse_args(argv)
        if not getattr(args, "command", None):
            parser.print_help()
            return EXIT_USAGE
        func: Callable[[argparse.Namespace], int] = args.func
        return func(args)

    return run_guarded(run)


if __name__ == "__main__":
    sys.exit(main())
