"""Typed configuration: every YAML file the project reads maps onto a dataclass through :func:`load`.

One loader, one rule for every file (run configs, sweeps, environment and agent configs):

- Unknown keys are errors that name the key and the file, so a typo never silently falls back to a
  default. Values are checked against the field's annotated type; nested dataclasses are nested
  mappings.
- **Relative paths in a YAML file are relative to the folder of that file.** A field holding a path
  says so in its metadata (``field(metadata={"path": True})``, or ``{"path": "values"}`` for a
  mapping of names to paths); the loader makes such paths absolute, so a config means the same
  thing from any working directory and a resolved config written into a run directory
  (:func:`dump`) still points at the right files. Paths given on the command line or in code are
  relative to the current folder, as usual.
- A class may define ``normalise_yaml(data) -> data`` to accept spellings of its own (the agent
  config reads rl-baselines3-zoo's numbers) before the typed check.

A setting is declared once: a field whose metadata holds ``"flag"`` (and ``"help"``, ``"group"``)
becomes a command-line flag (see :func:`cli_options`); the flag's value reaches the config through
:func:`override` under the field's dotted name.
"""
from __future__ import annotations

import dataclasses
import os
import types
import typing
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from panning.errors import ConfigError
from panning.io import write_text
from panning.train import TrainConfig

__all__ = [
    "CliOption",
    "ConfigError",
    "PruneSettings",
    "RunConfig",
    "cli_options",
    "dump",
    "from_dict",
    "load",
    "override",
    "read_yaml",
    "to_dict",
]


def _flag(flag: str, help: str, group: str, **extra: Any) -> dict[str, Any]:
    return {"flag": flag, "help": help, "group": group, **extra}


@dataclass
class PruneSettings:
    """How masks are computed."""

    method: str = field(default="snip", metadata=_flag(
        "--method", "pruning method (see `panning list`); with --policy, a label for the results", "prune"))
    sparsity: float = field(default=0.9, metadata=_flag(
        "--sparsity", "fraction of prunable weights removed, in [0, 1)", "prune"))
    # None: the method's own (1, or 100 for synflow/panning)
    iterations: int | None = field(default=None, metadata=_flag(
        "--iterations", "pruning steps (default: the method's own)", "prune"))
    schedule: str | None = field(default=None, metadata=_flag(
        "--schedule", "density schedule over the steps (default: the method's own, exponential)", "prune",
        choices=("exponential", "linear")))
    mode: str = field(default="global", metadata=_flag(
        "--mode", "top-k over all layers or per layer", "prune", choices=("global", "layerwise")))
    normalisation: str = "mean"
    min_per_layer: int = field(default=0, metadata=_flag(
        "--min-per-layer", "keep at least this many weights in every layer", "prune"))
    exclude: list[str] = field(default_factory=list, metadata=_flag(
        "--exclude", "layers left dense, e.g. fc3", "prune"))
    scoring_per_class: int = field(default=10, metadata=_flag(
        "--scoring-per-class", "scoring batch size per class (class-balanced, from the training split)", "prune"))
    # a trained agent (agent.zip): prune with it; ``method`` is then only a label
    policy: str | None = field(default=None, metadata=_flag(
        "--policy", "prune with a trained agent (agent.zip from `panning train-agent`) instead of a method",
        "prune", path=True))


@dataclass
class RunConfig:
    """Everything a prune -> train -> evaluate run needs."""

    model: str = field(default="mlp", metadata=_flag("--model", "model name (see `panning list`)", "model"))
    dataset: str = field(default="digits", metadata=_flag("--dataset", "dataset name (see `panning list`)", "model"))
    data_dir: str | None = field(default=None, metadata=_flag(
        "--data-dir", "dataset folder (default: $PANNING_DATA, else ~/.cache/panning)", "data", path=True))
    download: bool = field(default=False, metadata=_flag("--download", "download the dataset if missing", "data"))
    # initialisation, scoring batch, training order
    seed: int = field(default=0, metadata=_flag(
        "--seed", "seed (>= 0) for initialisation, scoring batch and training", "model"))
    split_seed: int = 0  # the validation split is a property of the dataset, fixed across seeds
    device: str = field(default="auto", metadata=_flag(
        "--device", "where to compute (default auto: CUDA if present)", "device", choices=("auto", "cpu", "cuda")))
    init: str = field(default="kaiming_normal", metadata=_flag(
        "--init", "weight initialisation: kaiming_normal (default), kaiming_uniform, xavier_normal, "
                  "variance_scaling (SNIP's code), default (PyTorch's)", "model"))
    # True: train from a fresh draw of the weights (same init, another seed) under the mask found on
    # the first draw, as SNIP's public code does; False: train the very weights that were scored.
    reinit: bool = field(default=False, metadata=_flag(
        "--reinit", "train from a fresh draw of the weights under the mask (SNIP's code; the "
                    "reinitialisation check)", "train"))
    prune: PruneSettings = field(default_factory=PruneSettings)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        for name in ("seed", "split_seed"):
            v = getattr(self, name)
            if isinstance(v, int) and not isinstance(v, bool) and v < 0:
                raise ConfigError(f"{name} must be >= 0 (seeds are non-negative integers), got {v}")


# ------------------------------------------------------------------------------------------ loading


def _coerce(tp: Any, value: Any, where: str) -> Any:
    """Convert a YAML value to the annotated type, or raise ConfigError naming ``where``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(a, value, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: bad value {value!r}")
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return from_dict(tp, value, where)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (inner, *_) = typing.get_args(tp) or (Any,)
        return [_coerce(inner, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    if tp is dict or origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    return value


def from_dict(cls: type, data: Mapping[str, Any], where: str = "config") -> Any:
    """Build dataclass ``cls`` from a mapping; unknown keys and mistyped values raise :class:`ConfigError`.

    Errors raised by the class's own checks (``__post_init__``) are reported with ``where``.
    """
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = [k for k in data if k not in names]
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r} (known keys: {', '.join(sorted(names))})")
    kwargs = {k: _coerce(hints[k], v, f"{where}: {k}") for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError as e:
        msg = str(e)
        raise ConfigError(msg if msg.startswith(where) else f"{where}: {msg}") from None


def read_yaml(path: str | Path) -> dict[str, Any]:
    """The top-level mapping of a YAML file (ConfigError if missing, malformed or not a mapping)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        first = str(e).splitlines()[0] if str(e) else "invalid YAML"
        raise ConfigError(f"{p}: malformed YAML ({first})") from None
    if not isinstance(data, Mapping):
        raise ConfigError(f"{p}: expected a mapping of settings at the top level")
    return dict(data)


#: a path setting of this form names a file that ships inside the package (an agent), not a path
SHIPPED_PREFIX = "shipped:"


def _absolute(value: Any, base: Path) -> Any:
    if isinstance(value, str) and value.startswith(SHIPPED_PREFIX):
        return value
    if isinstance(value, str) and value and not os.path.isabs(os.path.expanduser(value)):
        return os.path.normpath(base / value)
    return os.path.expanduser(value) if isinstance(value, str) else value


def resolve_paths(cls: type, data: Mapping[str, Any], base: Path) -> dict[str, Any]:
    """``data`` with the path fields of ``cls`` (and of its nested dataclasses) made absolute against ``base``."""
    out = dict(data)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name not in out or out[f.name] is None:
            continue
        kind = f.metadata.get("path")
        value = out[f.name]
        if kind == "values" and isinstance(value, Mapping):
            out[f.name] = {k: _absolute(v, base) for k, v in value.items()}
        elif kind:
            out[f.name] = _absolute(value, base)
        else:
            inner = _dataclass_of(hints[f.name])
            if inner is not None and isinstance(value, Mapping):
                out[f.name] = resolve_paths(inner, value, base)
    return out


def _dataclass_of(tp: Any) -> type | None:
    if dataclasses.is_dataclass(tp):
        return tp  # type: ignore[return-value]
    for a in typing.get_args(tp):
        if dataclasses.is_dataclass(a):
            return a  # type: ignore[return-value]
    return None


def load(path: str | Path, cls: type = RunConfig) -> Any:
    """Read a YAML file into dataclass ``cls``, its relative paths taken from the file's folder."""
    p = Path(path)
    data = read_yaml(p)
    normalise = getattr(cls, "normalise_yaml", None)
    if normalise is not None:
        data = normalise(data)
    data = resolve_paths(cls, data, p.parent.absolute())
    return from_dict(cls, data, str(p))


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain-data form of a config dataclass."""
    return dataclasses.asdict(cfg)


def dump(cfg: Any, path: str | Path) -> None:
    """Write the resolved config as YAML (atomically)."""
    write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))


def override(cfg: Any, dotted: Mapping[str, Any]) -> Any:
    """Return a copy of ``cfg`` with ``{"train.epochs": 3, "seed": 1}``-style values replaced (None skipped)."""
    data = to_dict(cfg)
    for key, value in dotted.items():
        if value is None:
            continue
        node = data
        *parents, leaf = key.split(".")
        for p in parents:
            if not isinstance(node.get(p), dict):
                raise ConfigError(f"unknown setting {key!r}")
            node = node[p]
        if leaf not in node:
            raise ConfigError(f"unknown setting {key!r}")
        node[leaf] = value
    return from_dict(type(cfg), data, "command line")


# -------------------------------------------------------------------------------- command line


@dataclass(frozen=True)
class CliOption:
    """A command-line flag generated from a config field."""

    dotted: str  # e.g. "prune.sparsity"
    flag: str  # e.g. "--sparsity"
    help: str
    group: str  # which commands offer it: "model", "data", "device", "prune", "train"
    kind: str  # "bool", "int", "float", "str" or "list"
    choices: tuple[str, ...] | None = None

    @property
    def dest(self) -> str:
        """The argparse destination of the flag."""
        return self.flag.lstrip("-").replace("-", "_")


def _kind(tp: Any) -> str:
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    base = args[0] if typing.get_origin(tp) in (typing.Union, types.UnionType) and len(args) == 1 else tp
    if typing.get_origin(base) in (list, tuple):
        return "list"
    for kind, t in (("bool", bool), ("int", int), ("float", float), ("str", str)):
        if base is t:
            return kind
    raise TypeError(f"no command-line form for a field of type {tp!r}")


def cli_options(cls: type = RunConfig, prefix: str = "") -> Iterator[CliOption]:
    """Every field of ``cls`` (and its nested dataclasses) that declares a flag, in declaration order."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        inner = _dataclass_of(hints[f.name])
        if inner is not None:
            yield from cli_options(inner, f"{prefix}{f.name}.")
        elif "flag" in f.metadata:
            m = f.metadata
            yield CliOption(f"{prefix}{f.name}", m["flag"], m["help"], m["group"], _kind(hints[f.name]),
                            tuple(m["choices"]) if "choices" in m else None)
