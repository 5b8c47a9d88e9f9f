"""Typed run configuration: YAML files in ``configs/`` map onto dataclasses.

Unknown keys are errors that name the key and the file, so a typo never silently falls back to a
default. Command-line flags override the file (see :func:`override`), and the resolved config is
written into every run directory (:func:`dump`).
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from panning.train import TrainConfig


class ConfigError(ValueError):
    """A configuration file or value is malformed."""


@dataclass
class PruneSettings:
    """How masks are computed."""

    method: str = "snip"
    sparsity: float = 0.9
    iterations: int | None = None  # None: the method's own (1, or 100 for synflow/panning)
    schedule: str | None = None  # None: the method's own (exponential)
    mode: str = "global"  # or "layerwise"
    normalisation: str = "mean"
    min_per_layer: int = 0
    exclude: list[str] = field(default_factory=list)  # layers left dense, e.g. ["fc3"]
    scoring_per_class: int = 10  # class-balanced scoring batch: this many samples per class
    policy: str | None = None  # a trained agent (agent.zip): prune with it; ``method`` is then only a label


@dataclass
class RunConfig:
    """Everything a prune -> train -> evaluate run needs."""

    model: str = "mlp"
    dataset: str = "digits"
    data_dir: str | None = None
    download: bool = False
    seed: int = 0  # initialisation, scoring batch, training order
    split_seed: int = 0  # the validation split is a property of the dataset, fixed across seeds
    device: str = "auto"
    init: str = "kaiming_normal"
    # True: train from a fresh draw of the weights (same init, another seed) under the mask found on
    # the first draw, as SNIP's public code does; False: train the very weights that were scored.
    reinit: bool = False
    prune: PruneSettings = field(default_factory=PruneSettings)
    train: TrainConfig = field(default_factory=TrainConfig)


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
    if dataclasses.is_dataclass(tp):
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
    return value


def from_dict(cls: type, data: Mapping[str, Any], where: str = "config") -> Any:
    """Build dataclass ``cls`` from a mapping; unknown keys raise :class:`ConfigError`."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = [k for k in data if k not in names]
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r} (known keys: {', '.join(sorted(names))})")
    kwargs = {k: _coerce(hints[k], v, f"{where}: {k}") for k, v in data.items()}
    return cls(**kwargs)


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


def load(path: str | Path, cls: type = RunConfig) -> Any:
    """Read a YAML config file into ``cls``."""
    return from_dict(cls, read_yaml(path), str(path))


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain-data form of a config dataclass."""
    return dataclasses.asdict(cfg)


def dump(cfg: Any, path: str | Path) -> None:
    """Write the resolved config as YAML."""
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def override(cfg: Any, dotted: Mapping[str, Any]) -> Any:
    """Return a copy of ``cfg`` with ``{"train.epochs": 3, "seed": 1}``-style values replaced (None skipped)."""
    data = to_dict(cfg)
    for key, value in dotted.items():
        if value is None:
            continue
        node = data
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        if leaf not in node:
            raise ConfigError(f"unknown setting {key!r}")
        node[leaf] = value
    return from_dict(type(cfg), data, "command line")
