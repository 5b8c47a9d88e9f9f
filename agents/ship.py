"""Ship a trained agent inside the package, with the record of how it was trained.

``python -m panning.agents.ship runs/agent_default default`` copies the run's ``best_agent.zip`` (the
policy chosen by its deterministic evaluations on held-out initialisations, never on a test split) to
``agents/shipped/default.zip`` and writes ``default.json`` beside it: the resolved agent config, the
commit, the env steps and wall time of training, the machine, the library versions and how the file
was selected. ``panning prune --policy default`` and ``apply_policy("default", ...)`` then find it.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml

from panning.agents.policy import SHIPPED_DIR, read_metadata
from panning.errors import AgentError
from panning.machine import describe

__all__ = ["ship_agent"]


def _commit(repo: Path) -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                               capture_output=True, text=True, check=True).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def ship_agent(run: str | Path, name: str, *, dest: Path = SHIPPED_DIR, note: str = "") -> dict[str, Any]:
    """Copy ``run/best_agent.zip`` to ``dest/<name>.zip`` and write ``dest/<name>.json``; returns the record."""
    import stable_baselines3
    import torch

    run = Path(run)
    src = run / "best_agent.zip"
    meta = read_metadata(src)  # an agent file, with panning's metadata
    train = json.loads((run / "train.json").read_text())
    evals = json.loads((run / "eval.json").read_text()) if (run / "eval.json").is_file() else []
    cfg = yaml.safe_load((run / "agent.yaml").read_text())
    if not train.get("finished"):
        raise AgentError(f"{run}: training is not finished ({train.get('timesteps')} of {train.get('n_timesteps')} "
                         "steps); resume it first")
    best = max(evals, key=lambda e: e["mean_reward"]) if evals else None
    record = {
        "name": name,
        "config": cfg,
        "commit": _commit(Path(__file__).resolve().parents[1]),
        "env_steps": int(meta["trained_timesteps"]),
        "run_env_steps": int(train["timesteps"]),
        "episodes": int(train["episodes"]),
        "wall_seconds": float(train["wall_seconds"]),
        "machine": describe(),
        "torch": torch.__version__,
        "stable_baselines3": stable_baselines3.__version__,
        "selected_by": (f"best mean reward over the run's {len(evals)} deterministic evaluations on held-out "
                        f"initialisations {cfg.get('eval_init_seeds')} at targets {cfg.get('eval_targets')} "
                        "(proxy accuracy on the validation split; never the test split)"),
        "selected_evaluation": None if best is None else {"timesteps": best["timesteps"],
                                                           "mean_reward": best["mean_reward"]},
        "note": note,
    }
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dest / f"{name}.zip")
    (dest / f"{name}.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
    return record


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", help="a finished `panning train-agent` run directory")
    ap.add_argument("name", help="the shipped agent's name (`--policy NAME`)")
    ap.add_argument("--note", default="")
    args = ap.parse_args(argv)
    record = ship_agent(args.run, args.name, note=args.note)
    print(f"shipped {args.name}: {record['env_steps']} env steps, {record['wall_seconds'] / 60:.1f} min on "
          f"{record['machine']} (commit {record['commit']})")


if __name__ == "__main__":
    main()
