"""The ``panning`` command.

Every bad input ends with exit code 2 and one line on stderr (``panning: error: ...``), and nothing
is written before the inputs have been checked.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Callable, NoReturn, Sequence

EXIT_USAGE = 2


class UsageError(ValueError):
    """Bad command-line input."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, no usage dump
        raise UsageError(f"{self.prog}: {message} (see --help)")


def _common(p: argparse.ArgumentParser, *, model: bool = True) -> None:
    p.add_argument("--config", type=Path, help="YAML run config (configs/*.yaml); flags override it")
    if model:
        p.add_argument("--model", help="model name (see `panning list`)")
        p.add_argument("--dataset", help="dataset name (see `panning list`)")
        p.add_argument("--data-dir", help="dataset folder (default: $PANNING_DATA, else ~/.cache/panning)")
        p.add_argument("--download", action="store_true", default=None, help="download the dataset if missing")
        p.add_argument("--seed", type=int, help="seed for initialisation, scoring batch and training")
        p.add_argument("--init", help="weight initialisation: kaiming_normal (default), kaiming_uniform, "
                                      "xavier_normal, variance_scaling (SNIP's code), default (PyTorch's)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], help="where to compute (default auto: CUDA if present)")
    p.add_argument("--overwrite", action="store_true", help="replace results already in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _prune_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--method", help="pruning method (see `panning list`); with --policy, a label for the results")
    p.add_argument("--policy", help="prune with a trained agent (agent.zip from `panning train-agent`) instead of a method")
    p.add_argument("--sparsity", type=float, help="fraction of prunable weights removed, in [0, 1)")
    p.add_argument("--iterations", type=int, help="pruning steps (default: the method's own)")
    p.add_argument("--schedule", choices=["exponential", "linear"], help="density schedule over the steps")
    p.add_argument("--mode", choices=["global", "layerwise"], help="top-k over all layers or per layer")
    p.add_argument("--min-per-layer", type=int, help="keep at least this many weights in every layer")
    p.add_argument("--exclude", nargs="+", help="layers left dense, e.g. fc3")
    p.add_argument("--scoring-per-class", type=int, help="scoring batch size per class")


def _train_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--epochs", type=int, help="training epochs")
    p.add_argument("--lr", type=float, help="learning rate")
    p.add_argument("--batch-size", type=int, help="training batch size")
    p.add_argument("--reinit", action="store_true", default=None,
                   help="train from a fresh draw of the weights under the mask (SNIP's code; the reinitialisation check)")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``panning`` command."""
    parser = _Parser(prog="panning", description="Prune neural networks before training.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    p = sub.add_parser("prune", help="compute masks for a freshly initialised network")
    _common(p)
    _prune_flags(p)
    p.add_argument("--out", type=Path, required=True, help="run directory (masks.pt, prune.json)")
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser("train", help="train and evaluate a network under masks from `panning prune`")
    p.add_argument("--masks", type=Path, required=True, help="masks.pt inside a prune run directory")
    _common(p, model=False)
    _train_flags(p)
    p.add_argument("--out", type=Path, required=True, help="run directory (metrics.json, tb/)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("run", help="prune, then train and evaluate, in one run directory")
    _common(p)
    _prune_flags(p)
    _train_flags(p)
    p.add_argument("--out", type=Path, required=True, help="run directory")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("benchmark", help="sweep methods x sparsities x seeds; resumable; table, CSV and plot")
    p.add_argument("--config", type=Path, required=True, help="sweep YAML (configs/bench/*.yaml)")
    p.add_argument("--out", type=Path, required=True, help="sweep directory; rerun the same command to resume")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], help="where to compute")
    p.add_argument("--data-dir", help="dataset folder (default: $PANNING_DATA, else ~/.cache/panning)")
    p.add_argument("--download", action="store_true", default=None, help="download the dataset if missing")
    p.add_argument("--epochs", type=int, help="override the training epochs of every cell")
    p.add_argument("--seeds", type=int, nargs="+", help="run only these seeds of the grid; any number of processes may share one --out (cells are claimed)")
    p.set_defaults(func=cmd_benchmark)

    p = sub.add_parser("train-agent", help="train the panning agent (PPO) in panning/Panning-v0; resumable")
    p.add_argument("--config", type=Path, help="agent YAML (configs/agent/*.yaml)")
    p.add_argument("--out", type=Path, help="new run directory (agent.zip, best_agent.zip, checkpoints/, tb/)")
    p.add_argument("--resume", type=Path, metavar="DIR", help="continue the run in DIR from its last checkpoint")
    p.add_argument("--timesteps", type=int, help="override n_timesteps (total env steps)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run in --out")
    p.set_defaults(func=cmd_train_agent)

    p = sub.add_parser("list", help="list models, datasets, methods and indices")
    p.set_defaults(func=cmd_list)
    return parser


# --------------------------------------------------------------------------------------------------


def _resolve(args: argparse.Namespace, base: Any = None) -> Any:
    """Config from --config (or ``base``), with flags laid over it, validated by name."""
    from panning import config

    cfg = config.load(args.config) if getattr(args, "config", None) else (base or config.RunConfig())
    get = lambda name: getattr(args, name, None)  # noqa: E731
    if get("policy"):
        # the agent brings its own steps, schedule, selection mode and normalisation
        clash = [f"--{n.replace('_', '-')}" for n in ("iterations", "schedule", "mode", "min_per_layer") if get(n) is not None]
        if clash:
            raise UsageError(f"{', '.join(clash)} cannot be combined with --policy: the agent decides its own steps")
    cfg = config.override(
        cfg,
        {
            "model": get("model"),
            "dataset": get("dataset"),
            "data_dir": get("data_dir"),
            "download": get("download"),
            "seed": get("seed"),
            "init": get("init"),
            "reinit": get("reinit"),
            "device": get("device"),
            "prune.method": get("method") or ("agent" if get("policy") else None),
            "prune.policy": get("policy"),
            "prune.sparsity": get("sparsity"),
            "prune.iterations": get("iterations"),
            "prune.schedule": get("schedule"),
            "prune.mode": get("mode"),
            "prune.min_per_layer": get("min_per_layer"),
            "prune.exclude": get("exclude"),
            "prune.scoring_per_class": get("scoring_per_class"),
            "train.epochs": get("epochs"),
            "train.lr": get("lr"),
            "train.batch_size": get("batch_size"),
        },
    )
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
        raise UsageError(f"unknown model {cfg.model!r}; valid models: {', '.join(available_models())}, tv:<torchvision name>")
    if cfg.init not in INITS:
        raise UsageError(f"unknown init {cfg.init!r}; valid: {', '.join(INITS)}")
    if cfg.dataset not in available_datasets():
        raise UsageError(f"unknown dataset {cfg.dataset!r}; valid datasets: {', '.join(available_datasets())}")
    if cfg.prune.policy:
        from panning.agents.policy import check_agent_file

        if not Path(cfg.prune.policy).is_file():
            raise UsageError(f"--policy {cfg.prune.policy} does not exist (train one with `panning train-agent`)")
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
    result = runs.prune_model(cfg, s, policy)
    runs.save_prune(args.out, cfg, s, result)
    _print_row(cfg.prune.method, result.sparsity, result.effective_sparsity)
    print(f"wrote {args.out / 'masks.pt'} and {args.out / 'prune.json'} ({result.seconds:.1f} s)")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    """``panning train``: metrics.json + tb/ for masks from a prune run."""
    from panning import runs

    base, masks, info = runs.load_run_masks(args.masks)
    cfg = _resolve(args, base)
    runs.prepare_out(args.out, args.overwrite, results=("metrics.json",))
    s = runs.setup(cfg)
    masks.check(s.model)
    if info.get("init_sha256") and info["init_sha256"] != runs.state_digest(s.model.cpu()):
        raise runs.RunDirError("the rebuilt initial weights differ from the ones that were pruned (different machine or library version)")
    s.model.to(s.device)
    from panning import config

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
    result = runs.prune_model(cfg, s, policy)
    runs.save_prune(args.out, cfg, s, result)
    metrics = runs.train_and_evaluate(cfg, s, result.masks, args.out, progress=_progress(args))
    _print_row(cfg.prune.method, result.sparsity, result.effective_sparsity, metrics["test_accuracy"])
    print(f"wrote {args.out}/ (prune {result.seconds:.1f} s, train {metrics['seconds']:.1f} s)")
    return 0


def cmd_benchmark(args: argparse.Namespace) -> int:
    """``panning benchmark``: a resumable sweep with results.csv, results.md and a plot."""
    from panning import config, runs, sweep

    sw, cfg = sweep.load_sweep(args.config)
    cfg = config.override(cfg, {"device": args.device, "data_dir": args.data_dir, "download": args.download,
                                "train.epochs": args.epochs})
    _validate(cfg)
    from panning.pruner import available_methods

    from panning.agents.policy import check_agent_file

    for name, path in sw.agents.items():
        if not Path(path).is_file():
            raise UsageError(f"{args.config}: agent {name!r}: {path} does not exist (train it with `panning train-agent`)")
        check_agent_file(path)
    for name in sw.agents:
        if name in available_methods() or name == sweep.DENSE:
            raise UsageError(f"{args.config}: agent name {name!r} is also a fixed method's name; call it e.g. 'agent_{name}'")
    for m in sw.methods:
        if m not in available_methods() and m not in sw.agents:
            raise UsageError(f"{args.config}: unknown method {m!r}; valid methods: {', '.join(available_methods())}"
                             + (f", or the agents {', '.join(sw.agents)}" if sw.agents else ""))
    done = args.out / "sweep.yaml"
    if done.is_file() and config.load(done, sweep.SweepConfig) != sw:
        raise runs.RunDirError(f"{args.out} holds a different sweep; choose another --out (it is never overwritten)")
    from panning.data import load_dataset

    bundle = load_dataset(cfg.dataset, cfg.data_dir, download=cfg.download, seed=cfg.split_seed)
    if args.seeds and not set(args.seeds) <= set(sw.seeds):
        raise UsageError(f"--seeds {args.seeds} are not all in the sweep's seeds {sw.seeds}")
    # vet the finished cells before recording this run's config: a refused resume must leave nothing behind
    from panning.agents.policy import load_policy

    policies = {name: load_policy(path) for name, path in sw.agents.items()}
    sweep.check_finished_cells(sw, args.out, lambda cell, d: runs.cell_mismatch(cfg, cell, d, policies))
    runs.record_sweep_config(args.out, cfg)
    rows = sweep.run_sweep(sw, cfg, args.out, lambda c, cell, d: runs.run_cell(c, cell, d, bundle, progress=None, agents=policies),
                           seeds=args.seeds)
    print(sweep.markdown_table(rows), end="")
    print(f"wrote {args.out / 'results.csv'}, {args.out / 'results.md'}, {args.out / 'accuracy_vs_sparsity.png'}")
    return 0


def cmd_train_agent(args: argparse.Namespace) -> int:
    """``panning train-agent``: PPO on panning/Panning-v0, checkpointed, resumable."""
    import dataclasses

    from panning.agents.config import load_agent_config
    from panning.agents.train import train_agent

    if (args.out is None) == (args.resume is None):
        raise UsageError("give either --out DIR (a new run) or --resume DIR (continue one)")
    if args.resume is not None:
        if args.config is not None or args.timesteps is not None:
            raise UsageError("--resume continues a run with its saved agent.yaml; --config and --timesteps do not apply")
        record = train_agent(None, args.resume, resume=True)
    else:
        if args.config is None:
            raise UsageError("--config is required for a new run (e.g. configs/agent/digits_mlp.yaml)")
        cfg = load_agent_config(args.config)
        if args.timesteps is not None:
            cfg = dataclasses.replace(cfg, n_timesteps=args.timesteps)
        record = train_agent(cfg, args.out, config_file=args.config, overwrite=args.overwrite)
    print(f"trained {record['timesteps']} steps" + (f" in {record['wall_seconds'] / 60:.1f} min" if "wall_seconds" in record else ""))
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
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: parse, run, and turn bad input into exit code 2 with one line on stderr."""
    import warnings

    # one readable line per warning (layer collapse, ...), not a source excerpt
    warnings.formatwarning = lambda msg, cat, *a, **k: f"panning: warning: {msg}\n"
    from panning.alloc import tune_malloc

    tune_malloc()  # we own this process: keep freed tensor memory for reuse (see panning/alloc.py)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if not getattr(args, "command", None):
            parser.print_help()
            return EXIT_USAGE
        func: Callable[[argparse.Namespace], int] = args.func
        return func(args)
    except (ValueError, FileNotFoundError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        if not msg.startswith("panning"):
            msg = f"panning: error: {msg}"
        print(msg, file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("panning: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
