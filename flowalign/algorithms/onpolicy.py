"""On-policy metrics, ONE set of keys for every update rule with a likelihood ratio. No I/O.

An iteration re-scores what its rollout recorded. Before the first optimizer step of the iteration the policy
has not moved, so each log-ratio ``d = log pi_theta(x' | x) - log pi_old(x' | x)`` (GRPO: re-scored minus recorded
Gaussian log-probs; CRD: its implicit log-ratio ``l``) must be 0: whatever is left is the on-policy gap that
``flowalign doctor`` dissects by setting. Keys (one row of metrics.jsonl):

  onpolicy_logp_gap       mean_i |d_i| over the rows re-scored before the first optimizer step
  onpolicy_logp_gap_max   max_i |d_i| over the same rows
  onpolicy_ratio_dev      max_i |exp(d_i) - 1| over the same rows (GRPO clips where this exceeds clip_range)
  onpolicy_clip_frac      share of those rows outside [1 - eps, 1 + eps] (rules with a clip; 0 when on-policy)
  clip_frac               share of all the iteration's ratios outside the clip range (rules with a clip)
  ratio_mean / _min / _max   the iteration's ratios

Shapes: every ``log_ratio`` is [b] (one per re-scored row).
"""

from __future__ import annotations

from typing import Optional

import torch

KEYS = ("onpolicy_logp_gap", "onpolicy_logp_gap_max", "onpolicy_ratio_dev", "onpolicy_clip_frac", "clip_frac",
        "ratio_mean", "ratio_min", "ratio_max")


class OnPolicyMeter:
    """Collects one iteration's log-ratios. ``add(log_ratio)`` for every re-scored batch (before the first
    ``step_taken()`` they count as the on-policy point); ``metrics()`` gives the keys of the module docstring.
    clip_range: the rule's eps (None: no clip, no clip fractions)."""

    def __init__(self, clip_range: Optional[float] = None):
        self.clip_range = clip_range
        self.first: list[torch.Tensor] = []
        self.all: list[torch.Tensor] = []
        self.stepped = False

    def add(self, log_ratio: torch.Tensor, mask: Optional[torch.Tensor] = None) -> None:
        d = log_ratio.detach().double().reshape(-1)
        if mask is not None:
            d = d[mask.reshape(-1).to(d.device).bool()]
        self.all.append(d.cpu())
        if not self.stepped:
            self.first.append(d.cpu())

    def step_taken(self) -> None:
        """The first optimizer step of the iteration happened: later log-ratios are off-policy by design."""
        self.stepped = True

    def _clipped(self, d: torch.Tensor) -> float:
        return float(((d.exp() - 1).abs() > self.clip_range).double().mean())

    def metrics(self) -> dict:
        if not self.all or not torch.cat(self.all).numel():
            return {}
        out = {}
        first = torch.cat(self.first) if self.first else torch.zeros(0, dtype=torch.float64)
        if first.numel():
            out.update(onpolicy_logp_gap=float(first.abs().mean()), onpolicy_logp_gap_max=float(first.abs().max()),
                       onpolicy_ratio_dev=float((first.exp() - 1).abs().max()))
            if self.clip_range is not None:
                out["onpolicy_clip_frac"] = self._clipped(first)
        d = torch.cat(self.all)
        ratio = d.exp()
        out.update(ratio_mean=float(ratio.mean()), ratio_min=float(ratio.min()), ratio_max=float(ratio.max()))
        if self.clip_range is not None:
            out["clip_frac"] = self._clipped(d)
        return out
