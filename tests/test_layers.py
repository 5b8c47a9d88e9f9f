"""The house's layers: the library loads no RL code, one package is installed, bugs are not usage errors."""
from __future__ import annotations

import json
import os
import pkgutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import panning
from panning.cli import main

ROOT = Path(__file__).resolve().parents[1]
RL_MODULES = ("panning.envs", "panning.agents", "envs", "agents", "gymnasium", "stable_baselines3")


def library_modules() -> list[str]:
    """Every module of the library: panning/ without the command-line layer and the RL subpackages."""
    names = [f"panning.{m.name}" for m in pkgutil.iter_modules(panning.__path__)]
    return sorted(n for n in names if n not in ("panning.cli", "panning.envs", "panning.agents"))


def test_the_library_loads_no_rl_code(tmp_path: Path) -> None:
    mods = library_modules()
    assert {"panning.episode", "panning.policy", "panning.pruner", "panning.runs", "panning.sweep"} <= set(mods)
    code = (f"import importlib, json, sys\nfor m in {mods!r}: importlib.import_module(m)\n"
            f"print(json.dumps(sorted(n for n in sys.modules if n.split('.')[0] in {RL_MODULES!r} "
            f"or n.startswith(('panning.envs', 'panning.agents')))))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, check=True)
    assert json.loads(r.stdout) == []


def test_every_library_module_is_placed_in_the_import_contract() -> None:
    import tomllib

    contracts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    forbidden = next(c for c in contracts if c["type"] == "forbidden")
    assert sorted(forbidden["source_modules"]) == library_modules()
    layers = next(c for c in contracts if c["type"] == "layers")
    placed = {m.strip() for layer in layers["layers"] for m in layer.replace("|", ":").split(":")}
    assert {f"panning.{m}" for m in placed} == (set(library_modules())
                                                | {"panning.cli", "panning.envs", "panning.agents"})


def test_only_the_panning_package_is_installed(tmp_path: Path) -> None:
    """The wheel holds one top-level package: nothing generic (``envs``, ``agents``) to clash with."""
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "--wheel-dir", str(tmp_path), str(ROOT)], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("panning-*.whl")
    tops = {name.split("/")[0] for name in zipfile.ZipFile(wheel).namelist()}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"panning"}
    names = zipfile.ZipFile(wheel).namelist()
    assert "panning/envs/panning_env.py" in names and "panning/agents/train.py" in names


def test_a_distribution_with_top_level_agents_and_envs_installs_beside_panning(tmp_path: Path) -> None:
    """Another distribution's ``agents`` and ``envs`` packages and panning work side by side."""
    site = tmp_path / "site"
    for pkg in ("agents", "envs"):
        (site / pkg).mkdir(parents=True)
        (site / pkg / "__init__.py").write_text(f"WHO = 'the other distribution\\'s {pkg}'\n")
    code = ("import agents, envs, gymnasium\n"
            "import panning.agents.train, panning.envs\n"
            "from panning.cli import main\n"
            "assert agents.WHO.endswith('agents') and envs.WHO.endswith('envs')\n"
            "env = gymnasium.make('panning/Panning-v0', model='mlp', dataset='digits', device='cpu')\n"
            "assert type(env.unwrapped).__module__ == 'panning.envs.panning_env'\n"
            "raise SystemExit(main(['list']))\n")
    env = {**os.environ, "PYTHONPATH": str(site)}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "methods:" in r.stdout


def test_a_bug_keeps_its_traceback_and_exits_1(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                                               tmp_path: Path) -> None:
    from panning import runs

    def broken(*args: object, **kwargs: object) -> None:
        raise ValueError("an internal inconsistency")  # a ValueError that is not a PanningError: a bug

    monkeypatch.setattr(runs, "prune_model", broken)
    code = main(["prune", "--method", "snip", "--sparsity", "0.5", "--out", str(tmp_path / "p")])
    err = capsys.readouterr().err
    assert code == 1
    assert "Traceback (most recent call last)" in err and "an internal inconsistency" in err
    assert "this is a bug in panning" in err


def test_a_missing_file_given_by_the_user_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["train-agent", "--config", str(tmp_path / "nope.yaml"), "--out", str(tmp_path / "a")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "nope.yaml" in err
    assert not (tmp_path / "a").exists()


def test_every_panning_error_is_a_value_error_too() -> None:
    """Code written against earlier versions caught ValueError; it still does."""
    from panning import errors

    for name in errors.__all__:
        cls = getattr(errors, name)
        assert issubclass(cls, errors.PanningError)
        if cls is not errors.PanningError:
            assert issubclass(cls, ValueError), name
