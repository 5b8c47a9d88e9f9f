"""A features extractor that reads the per-layer observation as a set of layers (DeepSets pooling).

The ``layers`` observation of :mod:`panning.episode` is the global summary, then ``max_layers`` rows
of per-layer features, then one presence flag per row (real layers first, padding after).
:class:`LayerSetExtractor` embeds each real row with one shared network ``phi``, pools the
embeddings with a masked mean and a masked max (Zaheer et al., 2017, "Deep Sets"), and concatenates
them with an embedding of the global summary. So:

- the output does not depend on how far the layer axis is padded (rows beyond the largest number of
  real layers in the batch are cut off before anything is computed, so padding changes no float);
- it does not depend on the order of the layers except through each row's own ``depth`` feature;
- it applies to a network of any depth: the number of rows is read from the observation's length,
  not fixed at construction, so a policy trained with ``max_layers = 32`` applies to a deeper network
  (:func:`panning.agents.policy.as_policy` hands it the wider observation).

SB3's actor and critic networks (``net_arch``) sit on top of these features, as on any extractor.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import gymnasium as gym
import torch
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor
from torch import Tensor, nn

from panning.episode import layer_feature_size, observation_size
from panning.errors import ConfigError

__all__ = ["EXTRACTORS", "LayerSetExtractor", "extractor_kwargs"]

EXTRACTORS = ("layers", "flatten")


class LayerSetExtractor(BaseFeaturesExtractor):
    """DeepSets over the layer rows of a ``layers`` observation; see the module docstring.

    ``global_size`` is the length of the global summary, ``layer_size`` the features per layer row;
    ``hidden`` the width of the layer and global embeddings. Output: ``3 * hidden`` features
    (global embedding, masked mean and masked max of the layer embeddings).
    """

    def __init__(self, observation_space: gym.spaces.Box, global_size: int, layer_size: int,
                 hidden: int = 64) -> None:
        super().__init__(observation_space, features_dim=3 * hidden)
        self.global_size, self.layer_size = int(global_size), int(layer_size)
        self.phi = nn.Sequential(nn.Linear(self.layer_size, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh())
        self.rho = nn.Sequential(nn.Linear(self.global_size, hidden), nn.Tanh())

    def split(self, obs: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(global summary [B, G], layer rows [B, L, F], presence [B, L] as bool) of a batch of observations."""
        B, D = obs.shape
        G, F = self.global_size, self.layer_size
        L = (D - G) // (F + 1)
        if L < 1 or G + L * (F + 1) != D:
            raise ValueError(f"an observation of length {D} is not a layers observation with a {G}-feature summary "
                             f"and rows of {F} features")
        rows = obs[:, G:G + L * F].reshape(B, L, F)
        present = obs[:, G + L * F:] > 0.5
        return obs[:, :G], rows, present

    def forward(self, observations: Tensor) -> Tensor:
        glob, rows, present = self.split(observations)
        # real layers come first: cut the padding every observation of the batch has
        n = max(1, int(present.sum(1).max())) if len(present) else 1
        rows, present = rows[:, :n], present[:, :n]
        h = self.phi(rows)
        mask = present.unsqueeze(-1)
        count = mask.sum(1).clamp(min=1).to(h.dtype)
        mean = torch.where(mask, h, torch.zeros_like(h)).sum(1) / count
        top = torch.where(mask, h, torch.full_like(h, -torch.inf)).amax(1)
        top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))  # no layer at all: zeros, not -inf
        return torch.cat([self.rho(glob), mean, top], 1)


def extractor_kwargs(env: Mapping[str, Any], raw: Mapping[str, Any]) -> dict[str, Any]:
    """SB3 ``policy_kwargs`` entries for the features extractor an agent config asks for.

    ``raw`` is the config's ``policy_kwargs``: ``features_extractor`` (``layers``, the default for a
    ``layers`` observation, or ``flatten``, SB3's own) and ``extractor_hidden`` (width, default 64)
    are read here; the rest is left to :func:`panning.agents.config.policy_kwargs`.
    """
    observation = env.get("observation", "summary")
    default = "layers" if observation == "layers" else "flatten"
    kind = raw.get("features_extractor", default)
    if kind not in EXTRACTORS:
        raise ConfigError(f"bad agent config: features_extractor must be one of {', '.join(EXTRACTORS)}, got {kind!r}")
    if kind == "flatten":
        return {}
    if observation != "layers":
        raise ConfigError("bad agent config: features_extractor: layers needs the env's observation: layers")
    K = len(env["indices"])
    hidden = raw.get("extractor_hidden", 64)
    if isinstance(hidden, bool) or not isinstance(hidden, int) or hidden < 1:
        raise ConfigError(f"bad agent config: extractor_hidden must be an integer >= 1, got {hidden!r}")
    return {"features_extractor_class": LayerSetExtractor,
            "features_extractor_kwargs": {"global_size": observation_size(K, "summary"),
                                          "layer_size": layer_feature_size(K), "hidden": hidden}}
