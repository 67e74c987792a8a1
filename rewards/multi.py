"""``multi``: a weighted sum of rewards, each normalised first, every component kept for logging.

total_i = sum_k w_k n_k(s_k)_i, with n_k one of
  'none'   : n(s) = s
  'zscore' : n(s) = (s - mean_B s) / (std_B s + eps)   (within the batch; a sample's total then depends
             on the rest of the batch, and a batch of one scores 0)
  'scale'  : n(s) = (s - offset_k) / scale_k            (fixed, from ``scales``: {name: scale} or
             {name: (offset, scale)}; missing names use (0, 1))
After each call ``last_components`` holds {name: raw [B]} and ``last_normalized`` {name: n_k(s_k) [B]}.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from .base import Images, Reward

NORMALIZE = ("none", "zscore", "scale")


class MultiReward(Reward):
    """rewards: {name: Reward}; weights: {name: w} (missing -> 1). From a config, ``rewards.get("multi",
    rewards={name: options dict})`` builds the parts (``from_options``): an options dict may name its class
    with 'reward' (so two differently configured copies can coexist), else the key is the reward's name."""

    name = "multi"

    @classmethod
    def from_options(cls, get: Callable[..., Reward], rewards: dict, **options) -> "MultiReward":
        """Build the parts given as options dicts with ``get`` (the reward table's builder), then the sum."""
        built = {}
        for key, r in (rewards or {}).items():
            if isinstance(r, dict):
                opts = dict(r)
                r = get(opts.pop("reward", key), **opts)
            built[key] = r
        return cls(built, **options)

    def __init__(self, rewards: dict, weights: Optional[dict] = None, normalize: str = "none",
                 scales: Optional[dict] = None, eps: float = 1e-6):
        if not rewards:
            raise ValueError("multi reward: give at least one reward, e.g. rewards={'clip_score': {'model': 'tiny'}}")
        if normalize not in NORMALIZE:
            raise ValueError(f"multi reward: normalize must be one of {NORMALIZE}, got {normalize!r}")
        unbuilt = [k for k, r in rewards.items() if not callable(r)]
        if unbuilt:
            raise TypeError(f"multi reward: {unbuilt[0]!r} is not a reward; build the parts from options with "
                            "flowalign.rewards.get('multi', rewards={name: options})")
        self.rewards = dict(rewards)
        weights, scales = dict(weights or {}), dict(scales or {})
        for what, d in (("weights", weights), ("scales", scales)):
            unknown = set(d) - set(self.rewards)
            if unknown:
                raise ValueError(f"multi reward: {what} for unknown rewards {sorted(unknown)}; "
                                 f"rewards are {sorted(self.rewards)}")
        self.weights = {k: float(weights.get(k, 1.0)) for k in self.rewards}
        self.scales = {k: self._offset_scale(scales.get(k, 1.0)) for k in self.rewards}
        self.normalize, self.eps = normalize, eps
        self.last_components: dict[str, torch.Tensor] = {}
        self.last_normalized: dict[str, torch.Tensor] = {}

    @staticmethod
    def _offset_scale(v) -> tuple[float, float]:
        off, sc = (0.0, float(v)) if isinstance(v, (int, float)) else (float(v[0]), float(v[1]))
        if sc == 0:
            raise ValueError("multi reward: a scale of 0 would divide by zero")
        return off, sc

    def _norm(self, key: str, s: torch.Tensor) -> torch.Tensor:
        if self.normalize == "zscore":
            return (s - s.mean()) / (s.std(unbiased=False) + self.eps)
        if self.normalize == "scale":
            off, sc = self.scales[key]
            return (s - off) / sc
        return s

    def __call__(self, images: Images, prompts: Sequence[str], metadata: Optional[Sequence[dict]] = None) -> torch.Tensor:
        """Each component handles its own batching and video averaging; then normalise and sum."""
        prompts = list(prompts)
        if len(images) != len(prompts):
            raise ValueError(f"{self.name}: got {len(images)} images but {len(prompts)} prompts")
        return self._combine({k: r(images, prompts, metadata) for k, r in self.rewards.items()})

    def _combine(self, raw: dict) -> torch.Tensor:
        norm = {k: self._norm(k, s) for k, s in raw.items()}
        self.last_components, self.last_normalized = raw, norm
        return sum(self.weights[k] * norm[k] for k in norm).to(torch.float32)

    @property
    def differentiable(self) -> bool:
        """True when every component is (the weighted, normalised sum is then differentiable too)."""
        return all(getattr(r, "differentiable", False) for r in self.rewards.values())

    def score_differentiable(self, images: torch.Tensor, prompts: Sequence[str],
                             metadata: Optional[Sequence[dict]] = None) -> torch.Tensor:
        if not self.differentiable:
            bad = [k for k, r in self.rewards.items() if not getattr(r, "differentiable", False)]
            raise TypeError(f"reward 'multi' is not differentiable in torch (components {bad} are not); reward "
                            "backprop needs every component differentiable")
        return self._combine({k: r.score_differentiable(images, prompts, metadata) for k, r in self.rewards.items()})

    def score(self, images: Images, prompts: Sequence[str], metadata: Optional[Sequence[dict]] = None) -> torch.Tensor:
        return self(images, prompts, metadata)
