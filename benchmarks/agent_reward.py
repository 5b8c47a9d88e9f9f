"""An agent's reward in any environment: deterministic episodes on held-out initialisations.

Training selects an agent by its reward in its own evaluation env; this scores agents (agent files,
shipped names, or a training run's SB3 checkpoints) by the reward of another env config, on the same
episodes for all: each ``(target, init seed)`` pair of ``--targets`` x ``--inits``. The env takes the
policy settings each agent was trained with (observation layout, per-layer terms, indices, steps: its
metadata, or for a checkpoint ``RUN/checkpoints/x.zip`` the run's ``agent.yaml``). Rewards are the
env's own (``reward: relative``: proxy accuracy minus the best single index's on the same
initialisation, so every agent is compared on the same references; ``--reward relative_loss``: the log
ratio of the best single index's proxy loss to the agent's, bounded to [-1, 1]). Validation split only; no
test image is read.

    PANNING_DATA=../shared/data .venv/bin/python benchmarks/agent_reward.py \\
        --env configs/env/mnist_lenet300_trusted.yaml --agents shipped:default runs/agent/best_agent.zip \\
        runs/agent/checkpoints/ppo_2400_steps.zip --targets 0.99 0.995 --inits 1000 1001 1002 1003
"""
from __future__ import annotations

import json
import time
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from panning.agents.config import load_agent_config, sb3_schedules
from panning.agents.policy import META_MEMBER, POLICY_SETTINGS, agent_path, load_agent, policy_settings
from panning.cli import OneLineParser, run_guarded
from panning.errors import UsageError


def load(agent: str) -> tuple[Any, dict[str, Any]]:
    """The agent's SB3 model and the env settings its policy needs. An agent file is loaded and checked
    by :func:`panning.agents.policy.load_agent`; a checkpoint takes its settings from its run."""
    from stable_baselines3 import PPO

    path = agent_path(agent)
    if not path.is_file():
        raise UsageError(f"agent {agent}: no such file or shipped agent")
    try:
        with zipfile.ZipFile(path) as zf:
            has_meta = META_MEMBER in zf.namelist()
    except zipfile.BadZipFile:
        raise UsageError(f"{path} is not an agent file (not a zip archive)") from None
    if has_meta:
        loaded = load_agent(path)
        return loaded.model, policy_settings(loaded.metadata)
    run = path.parent.parent / "agent.yaml"  # RUN/checkpoints/ppo_N_steps.zip
    if path.parent.name != "checkpoints" or not run.is_file():
        raise UsageError(f"{path} has no panning metadata and is not a checkpoint of a training run "
                         "(RUN/checkpoints/*.zip beside RUN/agent.yaml)")
    env = load_agent_config(run).env_kwargs
    model = PPO.load(path, device="cpu", custom_objects=sb3_schedules())
    return model, {k: env[k] for k in POLICY_SETTINGS if k in env}


def main(argv: list[str] | None = None) -> None:
    ap = OneLineParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--env", required=True, help="env YAML whose reward scores the agents")
    ap.add_argument("--agents", nargs="+", required=True)
    ap.add_argument("--targets", nargs="+", type=float, default=[0.99, 0.995])
    ap.add_argument("--inits", nargs="+", type=int, default=[1000, 1001, 1002, 1003])
    ap.add_argument("--proxy-steps", type=int, default=None, help="override the env's proxy budget")
    ap.add_argument("--reward", choices=["absolute", "relative", "relative_loss"], default=None,
                    help="override the env's reward (relative_loss: ln(best index's proxy loss / the agent's), "
                         "bounded to [-1, 1])")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    from panning.envs.panning_env import PanningEnv, clamped_loss

    torch.set_num_threads(args.threads)
    overrides: dict[str, Any] = {"init_seeds": 0}
    if args.proxy_steps is not None:
        overrides["proxy"] = {"steps": args.proxy_steps}
    if args.reward is not None:
        overrides["reward"] = args.reward
    agents = [(a, *load(a)) for a in args.agents]  # every file checked before any episode runs
    envs: dict[str, PanningEnv] = {}  # one per distinct policy settings: agents alike share its references
    rows: list[dict[str, Any]] = []
    for name, model, settings in agents:
        key = json.dumps(settings, sort_keys=True, default=str)
        if key not in envs:
            envs[key] = PanningEnv(args.env, **{**overrides, **settings})
        env = envs[key]
        t0 = time.perf_counter()
        for target in args.targets:
            for init in args.inits:
                obs, _ = env.reset(options={"target_sparsity": target, "init_seed": init})
                done, info, reward = False, {}, 0.0
                while not done:
                    action, _ = model.predict(obs, deterministic=True)
                    obs, r, term, trunc, info = env.step(action)
                    reward += float(r)
                    done = term or trunc
                rows.append({"agent": name, "target": target, "init": init, "reward": reward,
                             "proxy_accuracy": info.get("proxy_accuracy"),
                             "proxy_loss": clamped_loss(info["proxy_loss"]) if "proxy_loss" in info else None,
                             "reference_accuracy": info.get("reference_accuracy"),
                             "reference_loss": info.get("reference_loss"),
                             "reference_index": info.get("reference_index")})
        print(f"{name}: {len(args.targets) * len(args.inits)} episodes in {time.perf_counter() - t0:.0f} s", flush=True)
    what = {"relative_loss": "100 x ln(the best single index's proxy loss / the agent's), bounded to [-100, 100]",
            "relative": "proxy accuracy minus the best single index's, points"}
    reward = next(iter(envs.values())).config.reward
    print(f"\nreward ({what.get(reward, reward)}) in {args.env}, inits {args.inits}\n")
    print("| agent | mean | " + " | ".join(f"{100 * t:g}%" for t in args.targets) + " |")
    print("|---|---|" + "---|" * len(args.targets))
    for name, _, _ in agents:
        mine = [r for r in rows if r["agent"] == name]
        per = [np.mean([r["reward"] for r in mine if r["target"] == t]) for t in args.targets]
        print(f"| {name} | {100 * np.mean([r['reward'] for r in mine]):+.2f} | "
              + " | ".join(f"{100 * v:+.2f}" for v in per) + " |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "episodes": rows},
                                        indent=1))


if __name__ == "__main__":
    # bad flags or files: one line and exit 2, as the panning command does; a bug keeps its traceback
    raise SystemExit(run_guarded(main, Path(__file__).name))
