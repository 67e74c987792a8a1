"""Flow-RWR: reward-weighted regression on the rectified-flow forward process (VideoAlign, "Improving Video Generation
with Human Feedback", arXiv 2501.13918; docs/algorithms/rwr.md). No I/O.

The policy's own samples x0_i (the rollout's final latents) are noised again, ``x_t = (1 - t) x0 + t eps``,
``u = eps - x0``, and fitted with the flow-matching loss, each sample weighted by a softmax of its reward over the
batch:

    w_i = softmax_i(R_i / tau) = exp(R_i / tau) / sum_j exp(R_j / tau)        (valid samples; sum_i w_i = 1)
    e_i = mean_d |v_theta(x_t^i, t, c_i) - u_i|^2
    L   = sum_i w_i e_i

This is the EM-style solution of max E[R] - tau KL(pi || pi_old): the optimum ``pi_old exp(R / tau) / Z``, fitted
by weighted maximum likelihood on samples of pi_old (the flow-matching loss standing in for -log-likelihood). The
paper weights by exp(R) without a KL term; the batch softmax normalises those weights [assumed: normalisation over
the batch, as flowalign's SPEC states it]. tau -> infinity gives uniform weights 1/B: plain flow matching on the
policy's own samples (self-distillation, no reward signal); tau -> 0 keeps only the best sample.
Velocities are conditional (guidance 1, no CFG). ``FlowRWRUpdate`` is the update rule the trainer drives.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from ..rollout import Trajectory
from .base import UpdateRule, require_flow
from .dpo import flow_matching_error
from .timesteps import forward_timesteps

WEIGHT_SOURCES = ("reward", "advantage")


def rwr_weights(values: torch.Tensor, tau: float, valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``w = softmax(R / tau)`` over the valid entries -> [B] float32 summing to one (0 at invalid or non-finite
    entries; all zeros when none is valid). Computed in float64 with the max subtracted, so a tiny tau is safe."""
    if not tau > 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    r = values.detach().double().cpu()
    if r.dim() != 1:
        raise ValueError(f"values must be [B], got shape {tuple(r.shape)}")
    ok = torch.isfinite(r) if valid is None else valid.detach().cpu().bool() & torch.isfinite(r)
    if not ok.any():
        return torch.zeros(r.shape, dtype=torch.float32)
    logits = torch.where(ok, r / tau, torch.full_like(r, -float("inf")))
    return torch.softmax(logits, dim=0).float()


@dataclass
class RWRLoss:
    """loss: scalar ``sum_i w_i e_i`` (with grad); errors: e [B] (detached); weights: w [B]."""

    loss: torch.Tensor
    errors: torch.Tensor
    weights: torch.Tensor


def rwr_loss(v: torch.Tensor, target: torch.Tensor, weights: torch.Tensor, reduction: str = "mean") -> RWRLoss:
    """``L = sum_i w_i e_i``, ``e_i = mean_d (v_i - u_i)^2`` (module docstring).

    v: the policy's velocity [B, ...] (with grad); target: u = eps - x0 [B, ...]; weights: w [B] (``rwr_weights``;
    any non-negative weights, e.g. a minibatch's share of the batch's softmax); reduction: "mean" or "sum" over
    elements."""
    e = flow_matching_error(v, target, reduction)
    w = weights.detach().to(e.device, e.dtype)
    if w.shape != e.shape:
        raise ValueError(f"weights must have shape [{e.shape[0]}], got {tuple(weights.shape)}")
    return RWRLoss(loss=(w * e).sum(), errors=e.detach(), weights=w)


class FlowRWRUpdate(UpdateRule):
    """Flow-RWR (module docstring) on a trainer state.

    The live policy rolls out with the sampling section. Weights ``w = rwr_weights(R, rwr.tau)`` over the valid
    rows of the whole batch (``rwr.weights_from``: the raw rewards, or the group advantages). Per inner epoch, the
    valid rows are shuffled and split into minibatches (``train.minibatch``); each minibatch draws
    ``rwr.num_timesteps`` stratified timesteps from the rollout grid (its noisiest ``rwr.timestep_fraction``),
    fresh noise per draw, and adds ``sum_{i in mb} w_i e_i / K`` to the gradient: the minibatches together give
    the batch's weighted loss, one optimizer step per inner epoch.
    Metrics: loss (sum_i w_i e_i, averaged over the draws), fm_loss (the unweighted mean e), weight_max,
    weight_ess (effective sample size 1 / sum w^2: B for uniform weights, 1 for one sample), grad_norm,
    optimizer_steps, update_samples.
    """

    name = "rwr"
    title = "Flow-RWR"

    def __init__(self, cfg, adapter, params, optimizer, generator):
        super().__init__(cfg, adapter, params, optimizer, generator)
        require_flow(adapter, "rwr")

    def update(self, traj: Trajectory, adv: torch.Tensor, valid: torch.Tensor, rewards=None, tasks=None) -> dict:
        c, t = self.cfg.rwr, self.cfg.train
        values = adv if c.weights_from == "advantage" or rewards is None else rewards
        weights = rwr_weights(values, c.tau, valid).to(valid.device)
        rows = torch.nonzero(valid & (weights > 0)).flatten()
        if rows.numel() == 0:
            return {"update_samples": 0}
        sums = np.zeros(3)  # this process's sum_i w_i e_i, sum_i e_i and row count (over draws)
        grad_norm = 0.0
        for _ in range(c.inner_epochs):
            self.optimizer.zero_grad(set_to_none=True)
            perm = rows[torch.randperm(rows.numel(), generator=self.generator).to(rows.device)]
            for mb in perm.split(t.minibatch):
                part = self.dist.part(mb, traj.batch_size)  # the rows of mb this process holds
                x0, cond = traj.final[part.local], traj.cond.select(part.local)
                draws = forward_timesteps(traj, c.num_timesteps, c.timestep_fraction, self.generator)
                for timestep, sigma in draws:
                    fp = self.forward_sample(x0, sigma, part)
                    if fp is None:  # this process holds none of these rows
                        continue
                    v = self.adapter.predict(fp.x_t, timestep, cond, 1.0)
                    w = weights[part.rows] * (0.0 if part.placeholder else 1.0)
                    out = rwr_loss(v, fp.target, w, c.reduction)
                    (out.loss / len(draws)).backward()
                    if not part.placeholder:
                        sums += (out.loss.item() / len(draws), out.errors.sum().item() / len(draws), 0.0)
                if not part.placeholder:
                    sums[2] += part.size
            grad_norm = self.optimizer_step()
        total = self.dist.sum(list(sums))  # every process calls it (a collective)
        w = weights[rows].double()
        return {"update_samples": int(rows.numel()), "loss": total[0] / c.inner_epochs,
                "fm_loss": total[1] / max(total[2], 1.0), "weight_max": float(w.max()),
                "weight_ess": float(1.0 / (w**2).sum()), "grad_norm": grad_norm,
                "optimizer_steps": self.optimizer_steps}
