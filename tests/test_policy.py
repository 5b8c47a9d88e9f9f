"""Policy metadata (what an agent file must say to be applied) and applying a policy without SB3."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from panning.episode import ACTION_MAPPING, OBS_VERSIONS, feature_names, observation_size
from panning.errors import AgentError
from panning.masks import Masks
from panning.policy import FORMAT, Policy, check_metadata, check_spaces, policy_metadata, run_policy

V1 = OBS_VERSIONS["summary"]  # ENV names no layout: the summary's, as an agent file written before 0.3

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
    assert m["format"] == FORMAT and m["obs_version"] == V1 and m["action_mapping"] == ACTION_MAPPING
    assert m["observation_size"] == observation_size(3) and m["action_size"] == 4
    assert m["feature_names"] == feature_names(ENV["indices"]) and m["trained_timesteps"] == 123
    assert set(REQUIRED) <= set(m)
    check_metadata(m, "agent.zip")
    check_metadata(m, "agent.zip", indices=["synflow", "snip", "grasp_abs"])


@pytest.mark.parametrize("changes, message", [
    ({"format": "panning-agent/0"}, "agent format 'panning-agent/0'"),
    ({"obs_version": V1 + 1}, f"observation version {V1 + 1}"),
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


# --------------------------------------------------------------------------- metadata details


def test_policy_from_metadata_takes_every_setting() -> None:
    """Indices, steps, mode, normalisation, exclude, scoring_per_class from the metadata; info holds the
    observation version, the training length and whatever the loader adds."""
    m = meta(mode="layerwise", normalisation="rank", exclude=["fc"], scoring_per_class=7)
    p = Policy.from_metadata(lambda o: o, m, path="a.zip")
    assert (p.indices, p.pruning_steps, p.mode, p.normalisation, p.exclude, p.scoring_per_class) == (
        ["synflow", "snip", "grasp_abs"], 4, "layerwise", "rank", ["fc"], 7)
    assert p.info == {"obs_version": V1, "trained_timesteps": 123, "path": "a.zip"}


def test_policy_metadata_from_a_dataclass_config() -> None:
    """A config dataclass works like its dict; the record names the panning version and keeps the env settings;
    trained_timesteps defaults to 0."""
    import dataclasses

    import panning

    @dataclasses.dataclass
    class EnvConfig:
        indices: list = dataclasses.field(default_factory=lambda: list(ENV["indices"]))
        pruning_steps: int = 4
        normalisation: str = "mean"
        mode: str = "global"
        exclude: list = dataclasses.field(default_factory=list)
        scoring_per_class: int = 2

    m = policy_metadata(EnvConfig())
    assert m == {**policy_metadata(ENV), "trained_timesteps": 0}
    assert m["panning_version"] == panning.__version__ and m["env"] == ENV and m["trained_timesteps"] == 0
    check_metadata(m, "a.zip")


def test_metadata_messages_in_full() -> None:
    """Missing keys listed comma-separated; an unknown index refused even with a consistent layout, with the
    known indices listed; layout and space mismatches say what to do."""
    from panning.indices import available_indices

    m = meta()
    del m["mode"], m["exclude"]
    with pytest.raises(AgentError, match=r"^d.zip: its metadata lacks mode, exclude; the file is damaged$"):
        check_metadata(m, "d.zip")
    odd = ["synflow", "zzz"]
    consistent = meta(indices=odd, observation_size=observation_size(2), feature_names=feature_names(odd))
    known = ", ".join(available_indices())
    with pytest.raises(AgentError, match=rf"^u.zip was trained with indices \['zzz'\] that this panning does not "
                                         rf"provide \(known: {known}\)$"):
        check_metadata(consistent, "u.zip")
    with pytest.raises(AgentError, match=r"^l.zip: its observation layout does not match this panning's for indices "
                                         r"\['synflow', 'snip', 'grasp_abs'\]; retrain the agent$"):
        check_metadata(meta(observation_size=1), "l.zip")
    with pytest.raises(AgentError, match=r"^s.zip: the policy's spaces \(30,\)/\(4,\) disagree with its own "
                                         r"metadata; the file is damaged$"):
        check_spaces(meta(), (30,), (4,), "s.zip")


# --------------------------------------------------------------------------- run_policy details


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 20), nn.ReLU(), nn.Linear(20, 4))


def _snip_rule(obs: np.ndarray) -> np.ndarray:
    return np.array([-1.0, 1.0, -1.0, 0.0])


def _dataset() -> torch.utils.data.TensorDataset:
    g = torch.Generator().manual_seed(1)
    return torch.utils.data.TensorDataset(torch.randn(40, 8, generator=g), torch.arange(40) % 4)


def test_scoring_data_from_a_dataset_or_loader() -> None:
    """data= draws one class-balanced batch: scoring_per_class per class (default the policy's), the classes
    from the labels unless num_classes is given, drawn with seed (default 0); a DataLoader's dataset is used."""
    from panning.data import balanced_batch

    policy = Policy.from_metadata(_snip_rule, meta())  # scoring_per_class 2
    ds = _dataset()

    def by_batch(per_class: int, classes: int, seed: int) -> Masks:
        return run_policy(policy, _net(), 0.9, batches=[balanced_batch(ds, per_class, classes, seed=seed)]).masks

    assert run_policy(policy, _net(), 0.9, ds).masks.equal(by_batch(2, 4, 0))
    loader = torch.utils.data.DataLoader(ds, batch_size=5)
    assert run_policy(policy, _net(), 0.9, loader, seed=3).masks.equal(by_batch(2, 4, 3))
    assert run_policy(policy, _net(), 0.9, ds, scoring_per_class=3).masks.equal(by_batch(3, 4, 0))
    assert run_policy(policy, _net(), 0.9, ds, num_classes=2).masks.equal(by_batch(2, 2, 0))
    assert not by_batch(2, 4, 0).equal(by_batch(2, 4, 3))


def test_run_policy_batch_rules_and_messages() -> None:
    policy = Policy.from_metadata(_snip_rule, meta())
    with pytest.raises(ValueError, match=r"^run_policy needs scoring data: pass data= \(a Dataset or DataLoader\) "
                                         r"or batches=$"):
        run_policy(policy, _net(), 0.9)
    with pytest.raises(ValueError, match=r"^the scoring batch is empty$"):
        run_policy(policy, _net(), 0.9, batches=[])
    one = run_policy(policy, _net(), 0.9, batches=[(torch.ones(1, 8), torch.tensor([2]))])
    assert one.masks.num_kept == 24


def test_run_policy_record_by_hand() -> None:
    """The result: method 'agent' by default, schedule 'policy', the call's duration, and per step the
    weights, share, keep, sparsity and the action as a flat list (a (1, K + 1) action from predict is fine)."""
    import time

    policy = Policy.from_metadata(lambda obs: np.array([[-1.0, 1.0, -1.0, 0.0]]), meta(), path="p")
    x, y = torch.randn(12, 8, generator=torch.Generator().manual_seed(0)), torch.arange(12) % 4
    t0 = time.perf_counter()
    r = run_policy(policy, _net(), 0.9, batches=[(x, y)])
    took = time.perf_counter() - t0
    assert (r.method, r.schedule) == ("agent", "policy") and 0.0 < r.seconds <= took
    keeps = [135, 76, 43, 24]  # 240 * 0.1 ** (t / 4), rounded (SynFlow's exponential schedule)
    assert r.extra["policy"] == {
        "obs_version": V1, "trained_timesteps": 123, "path": "p",
        "indices": ["synflow", "snip", "grasp_abs"], "pruning_steps": 4,
        "steps": [{"step": t + 1, "weights": {"synflow": 0.0, "snip": 1.0, "grasp_abs": 0.0},
                   "share": 1 / (4 - t), "keep": k, "sparsity": 1 - k / 240, "action": [-1.0, 1.0, -1.0, 0.0]}
                  for t, k in enumerate(keeps)],
    }


def test_run_policy_uses_the_policys_settings_as_training_did() -> None:
    """mode, normalisation and exclude come from the policy (exclude can be overridden), input_shape is passed
    on: the same masks and observations as driving the episode core by hand with those settings."""
    from panning.episode import PruningEpisode

    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(12, 8, generator=g), torch.arange(12) % 4

    def rule(obs: np.ndarray) -> np.ndarray:
        return np.array([0.5, 0.0, -0.5, 0.3])

    def net3() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(8, 20), nn.ReLU(), nn.Linear(20, 10), nn.ReLU(), nn.Linear(10, 4))

    def by_hand(**settings) -> Masks:
        ep = PruningEpisode(net3(), ENV["indices"], [(x, y)], target_sparsity=0.9, steps=4, **settings)
        while not ep.done:
            ep.step(rule(ep.observe()))
        return ep.masks

    policy = Policy.from_metadata(rule, meta(mode="layerwise", normalisation="abs_zscore", exclude=["4"]))
    got = run_policy(policy, net3(), 0.9, batches=[(x, y)]).masks
    assert list(got) == ["0.weight", "2.weight"]
    assert got.equal(by_hand(mode="layerwise", normalisation="abs_zscore", exclude=["4"]))
    for other in ({"mode": "global", "normalisation": "abs_zscore"}, {"mode": "layerwise", "normalisation": "mean"}):
        assert not got.equal(by_hand(exclude=["4"], **other))
    override = run_policy(policy, net3(), 0.9, batches=[(x, y)], exclude=[]).masks
    assert list(override) == ["0.weight", "2.weight", "4.weight"]
    assert override.equal(by_hand(mode="layerwise", normalisation="abs_zscore"))
    seen: list[np.ndarray] = []
    flat = Policy.from_metadata(lambda obs: seen.append(obs) or rule(obs), meta())
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(2, 4))
    xs = torch.randn(8, 1, 4, 4, generator=g)
    run_policy(flat, model, 0.5, batches=[(xs, torch.arange(8) % 4)], input_shape=(1, 9, 9))
    ep = PruningEpisode(model, ENV["indices"], [(xs, torch.arange(8) % 4)], target_sparsity=0.5, steps=4,
                        input_shape=(1, 9, 9))
    assert np.array_equal(seen[0], ep.observe())
    default = PruningEpisode(model, ENV["indices"], [(xs, torch.arange(8) % 4)], target_sparsity=0.5, steps=4)
    assert not np.array_equal(seen[0], default.observe())


def test_run_policy_seed_reaches_the_episode() -> None:
    """seed also seeds the indices (here ``random``) when the batches are given directly."""
    from panning.episode import PruningEpisode

    idx = ["random"]
    m = meta(indices=idx, observation_size=observation_size(1), feature_names=feature_names(idx))
    policy = Policy.from_metadata(lambda obs: np.array([1.0, 0.0]), m)
    x, y = torch.ones(4, 8), torch.arange(4)

    def by_hand(seed: int) -> Masks:
        ep = PruningEpisode(_net(), idx, [(x, y)], target_sparsity=0.9, steps=4, seed=seed)
        while not ep.done:
            ep.step([1.0, 0.0])
        return ep.masks

    got = run_policy(policy, _net(), 0.9, batches=[(x, y)], seed=5).masks
    assert got.equal(by_hand(5)) and not got.equal(by_hand(0))
