"""The velocity-space distance to the reference model, written once: the KL anchor of DiffusionNFT, CRD and reward
backprop (docs/math.md §4, §5, §8). No I/O."""

from __future__ import annotations

import torch

REDUCTIONS = ("mean", "sum")


def velocity_distance(v: torch.Tensor, v_ref: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """``D_i = mean_d (v_i - sg(v_ref_i))^2`` -> [B] (``reduction="sum"``: ``sum_d``).

    v: the policy's velocity [B, ...] (with grad); v_ref: the reference model's (adapter disabled) at the same
    x_t and t, same shape, detached here. Computed in the wider of the two dtypes, at least float32. Two
    Gaussian steps of one sampler that share a variance have a KL proportional to this distance (docs/math.md §1),
    which is why the forward-process methods use it as their KL term.
    """
    if v.shape != v_ref.shape:
        raise ValueError(f"v {tuple(v.shape)} and v_ref {tuple(v_ref.shape)} must match")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    dtype = torch.promote_types(torch.promote_types(v.dtype, v_ref.dtype), torch.float32)
    sq = ((v.to(dtype) - v_ref.to(dtype).detach()) ** 2).reshape(v.shape[0], -1)
    return sq.mean(1) if reduction == "mean" else sq.sum(1)
