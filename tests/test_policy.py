"""Policy metadata (what an agent file must say to be applied) and applying a policy without SB3."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from panning.episode import ACTION_MAPPING, OBS_VERSION, feature_names, observation_size
from panning.errors import AgentError
from panning.policy import FORMAT, Policy, check_metadata, check_spaces, policy_metadata, run_policy

ENV = {"indices": ["synflow", "snip", "grasp_abs"], "pruning_steps": 4, "normalisation": "mean", "mode": "global",
       "exclude": [], "scoring_per_class": 2}
REQUIRED = ("format", "obs_version", "observation_size", "feature_names", "action_mapping", "action_size", "indices",
            "pruning_steps", "normalisation", "mode", "exclude", "scoring_per_class")


def meta(**changes: object) -> dict:
    m = policy_metadata(ENV, 123)
    m.update(changes)
    return m


def test_metadata_states_what_applying_the_policy_needs() -> None:
    m = meta()
    assert m["format"] == FORMAT and m["obs_version"] == OBS_VERSION and m["action_mapping"] == ACTION_MAPPING
    assert m["observation_size"] == observation_size(3) and m["action_size"] == 4
    assert m["feature_names"] == feature_names(ENV["indices"]) and m["trained_timesteps"] == 123
    assert set(REQUIRED) <= set(m)
    check_metadata(m, "agent.zip")
    check_metadata(m, "agent.zip", indices=["synflow", "snip", "grasp_abs"])


@pytest.mark.parametrize("changes, message", [
    ({"format": "panning-agent/0"}, "agent format 'panning-agent/0'"),
    ({"obs_version": OBS_VERSION + 1}, f"observation version {OBS_VERSION + 1}"),
    ({"action_mapping": "w=a; share=b"}, "action mapping 'w=a; share=b'"),
    ({"indices": ["synflow", "snip", "no_such_index"]}, "no_such_index"),
    ({"observation_size": observation_size(3) + 1}, "observation layout"),
    ({"feature_names": feature_names(["snip", "synflow", "grasp_abs"])}, "observation layout"),
], ids=["format", "obs_version", "action_mapping", "unknown_index", "observation_size", "feature_names"])
def test_every_mismatch_is_refused_with_its_reason(changes: dict, message: str) -> None:
    with pytest.raises(AgentError, match=message.replace("(", r"\(").replace(")", r"\)")) as e:
        check_metadata(meta(**changes), "old.zip")
    assert str(e.value).startswith("old.zip")


@pytest.mark.parametrize("key", REQUIRED)
def test_each_required_key_is_required(key: str) -> None:
    m = meta()
    del m[key]
    with pytest.raises(AgentError, match=f"lacks {key}" if key != "format" else "agent format None"):
        check_metadata(m, "damaged.zip")


def test_not_a_mapping_and_wrong_index_order() -> None:
    with pytest.raises(AgentError, match="agent format None"):
        check_metadata(["format", FORMAT], "list.zip")
    with pytest.raises(AgentError, match=r"in this order\); requested \['snip', 'synflow', 'grasp_abs'\]"):
        check_metadata(meta(), "a.zip", indices=["snip", "synflow", "grasp_abs"])


def test_spaces_must_match_the_metadata() -> None:
    check_spaces(meta(), (31,), (4,), "a.zip")
    with pytest.raises(AgentError, match=r"spaces \(30,\)/\(4,\) disagree"):
        check_spaces(meta(), (30,), (4,), "a.zip")
    with pytest.raises(AgentError, match=r"spaces \(31,\)/\(3,\) disagree"):
        check_spaces(meta(), np.array([31]), (3,), "a.zip")


def test_any_predict_callable_prunes_to_the_exact_sparsity() -> None:
    """A hand-written rule as the policy: all weight on SNIP, default step sizes."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 20), nn.ReLU(), nn.Linear(20, 4))
    x, y = torch.randn(12, 8), torch.arange(12) % 4
    seen: list[np.ndarray] = []

    def snip_only(obs: np.ndarray) -> np.ndarray:
        seen.append(obs)
        return np.array([-1.0, 1.0, -1.0, 0.0])

    policy = Policy.from_metadata(snip_only, meta(), path="rule")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    r = run_policy(policy, model, 0.9, batches=[(x, y)], method="rule")
    assert r.masks.num_kept == round(0.1 * 240) and len(seen) == 4
    assert all(o.shape == (31,) for o in seen)
    assert [s["weights"] for s in r.extra["policy"]["steps"]] == [{"synflow": 0.0, "snip": 1.0, "grasp_abs": 0.0}] * 4
    assert r.extra["policy"]["path"] == "rule" and r.method == "rule"
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    from panning.pruner import prune

    # a one-hot policy with default steps is the SNIP index on SynFlow's schedule over 4 steps
    assert r.masks.equal(prune(model, "snip", 0.9, [(x, y)], iterations=4).masks)
    with pytest.raises(ValueError, match="scoring data"):
        run_policy(policy, model, 0.9)
