"""Flow-GRPO and GRPO-Guard losses on recorded Gaussian transitions (SPEC §2). No I/O.

Per step k: ``rho = exp(logp_theta - logp_old)``,
``L = mean_i max(-A_i rho_i, -A_i clip(rho_i, 1 - eps, 1 + eps)) + beta KL(pi_theta || pi_ref)``,
where pi_ref is the same network with the LoRA adapter disabled.

GRPO-Guard normalises the ratio: with ``dmu = mu_theta - mu_old`` and the step std s,
``b = mean_d(dmu^2) / (2 s^2)`` and ``rho~ = exp((logp_theta - logp_old + b) s)``; for
``x' = mu_old + s xi`` the exponent is exactly ``mean_d(xi dmu)``. Its loss is reweighted by ``1/Delta``.
Log-probs use the mean reduction over elements, as the reference code (and its clip ranges) assume.
``GRPOUpdate`` is the update rule the trainer drives (re-scoring recorded rollouts with the current policy).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from .. import lora
from ..rollout import Trajectory, rescore
from ..samplers import GaussianStep
from .fdistill import transition_weights
from .base import UpdateRule, configured_rollout


def clipped_surrogate(log_ratio: torch.Tensor, advantages: torch.Tensor, clip_range: float) -> torch.Tensor:
    """PPO's pessimistic surrogate per sample: ``max(-A rho, -A clip(rho, 1-eps, 1+eps))`` -> [B]."""
    ratio = log_ratio.exp()
    return torch.maximum(-advantages * ratio, -advantages * ratio.clamp(1 - clip_range, 1 + clip_range))


def guard_log_ratio(new: GaussianStep, logp_old: torch.Tensor, mean_old: torch.Tensor) -> torch.Tensor:
    """GRPO-Guard's normalised log-ratio ``(logp_theta - logp_old + b) s`` -> [B] (mean-reduced log-probs)."""
    s = new.std.reshape(-1)
    b = ((new.mean - mean_old) ** 2).flatten(1).mean(1) / (2 * s**2)
    return (new.log_prob(reduction="mean") - logp_old + b) * s


@dataclass
class GRPOStepLoss:
    """loss: scalar to minimise; policy/kl/ratio: [B] per sample (detached); clip_frac: scalar."""

    loss: torch.Tensor
    policy: torch.Tensor
    kl: torch.Tensor
    ratio: torch.Tensor
    clip_frac: torch.Tensor


def grpo_step_loss(
    new: GaussianStep,
    logp_old: torch.Tensor,
    advantages: torch.Tensor,
    clip_range: float,
    beta: float = 0.0,
    ref_step: Optional[GaussianStep] = None,
    kl_scaling: str = "exact",
    guard: bool = False,
    mean_old: Optional[torch.Tensor] = None,
    mask: Optional[torch.Tensor] = None,
    divergence: Optional[str] = None,
) -> GRPOStepLoss:
    """The GRPO loss of one step.

    Args:
        new: the step re-scored by the current policy at the recorded x_k with prev_sample = x_{k+1}.
        logp_old: [B] the rollout's recorded log-probs (mean reduction).
        advantages: [B].
        clip_range: eps of the ratio clip (Flow-GRPO: 1e-4).
        beta, ref_step: KL(new || ref_step) coefficient and the reference transition (adapter disabled).
        kl_scaling: "exact" or "reference" (the Flow-GRPO code's x Delta scaling), see GaussianStep.kl.
        guard, mean_old: GRPO-Guard ratio normalisation (needs the rollout's step means) and 1/Delta weight.
        mask: [B] bool, samples to include (invalid rewards are excluded).
        divergence: f-divergence of the reference regulariser (SPEC §6 (a)): the per-sample KL is weighted by the
            detached, batch-normalised h(r), r = p_ref(x') / p_theta(x') the exact ratio of the two Gaussian
            transitions (``fdistill.transition_weights``); None or "reverse_kl" is the plain KL.
    """
    if guard:
        if mean_old is None or new.dt is None:
            raise ValueError("guard=True needs mean_old (rollout with record_means=True) and a flow SDE step")
        log_ratio = guard_log_ratio(new, logp_old, mean_old)
    else:
        log_ratio = new.log_prob(reduction="mean") - logp_old
    per_sample = clipped_surrogate(log_ratio, advantages, clip_range)
    if guard:
        per_sample = per_sample / new.dt.reshape(-1)
    kl = torch.zeros_like(per_sample)
    if beta > 0:
        if ref_step is None:
            raise ValueError("beta > 0 needs ref_step, the transition of the reference (adapter-disabled) model")
        kl = new.kl(ref_step, scaling=kl_scaling)
        if divergence not in (None, "reverse_kl"):
            kl = kl * transition_weights(new, ref_step, divergence)
        per_sample = per_sample + beta * kl
    weights = torch.ones_like(per_sample) if mask is None else mask.float()
    loss = (per_sample * weights).sum() / weights.sum().clamp_min(1.0)
    ratio = log_ratio.detach().exp()
    clipped = ((ratio - 1).abs() > clip_range).float()
    return GRPOStepLoss(loss=loss, policy=per_sample.detach() - beta * kl.detach(), kl=kl.detach(), ratio=ratio,
                        clip_frac=(clipped * weights).sum() / weights.sum().clamp_min(1.0))


# ---- update rule ------------------------------------------------------------------------------------


class GRPOUpdate(UpdateRule):
    """Flow-GRPO (SPEC §2): the live policy rolls out with the SDE sampler; every stochastic step of every
    sample is re-scored by the current policy and the clipped loss (+ beta KL to the adapter-disabled model)
    is minimised, one optimizer step per minibatch (``train.minibatch``) per inner epoch (``grpo.inner_epochs``).
    Metrics: ``logp_diff`` (mean |logp recomputed - logp rollout| before any update: the on-policy check),
    ratio mean/min/max, clip_frac, kl, loss, grad_norm, update_samples.
    """

    name = "grpo"

    def rollout(self, prompts):
        return configured_rollout(self.adapter, prompts, self.cfg, self.dist.noise(self.generator, len(prompts)),
                                  record_means=self.cfg.grpo.guard)

    def update(self, traj: Trajectory, adv: torch.Tensor, valid: torch.Tensor, rewards=None, tasks=None) -> dict:
        g, t = self.cfg.grpo, self.cfg.train
        steps = traj.stochastic_steps
        # Samples with zero advantage only feed the KL term: skip them when there is none (same gradient).
        active = valid & ((adv != 0) | (g.beta > 0))
        rows = torch.nonzero(active).flatten()
        stats = {"ratio": [], "clip_frac": [], "kl": [], "logp_diff": None, "loss": []}
        if rows.numel() == 0 or not steps:
            return {"update_samples": 0}
        for _ in range(g.inner_epochs):
            perm = rows[torch.randperm(rows.numel(), generator=self.generator)]
            for mb in perm.split(t.minibatch):
                self.optimizer.zero_grad(set_to_none=True)
                part = self.dist.part(mb, traj.batch_size)  # the rows of mb this process holds (all, in one)
                for k in steps if part.size else ():
                    new = rescore(self.adapter, traj, k, index=part.local)
                    ref = None
                    if g.beta > 0:
                        with torch.no_grad(), lora.adapter_disabled(self.adapter):
                            ref = rescore(self.adapter, traj, k, index=part.local)
                    out = grpo_step_loss(new, traj.log_probs[part.local, k], adv[part.rows], g.clip_range, beta=g.beta,
                                         ref_step=ref, kl_scaling=g.kl_scaling, guard=g.guard,
                                         mean_old=None if traj.means is None else traj.means[part.local, k],
                                         divergence=g.kl_divergence)
                    (out.loss * part.share / len(steps)).backward()
                    if part.placeholder:  # FSDP: a zero-weight row that only keeps the collectives in step
                        continue
                    if stats["logp_diff"] is None:  # on-policy check: before any update of this batch
                        diff = new.log_prob().detach() - traj.log_probs[part.local, k]
                        stats["logp_diff"] = diff.abs().mean().item()
                    stats["ratio"].append(out.ratio)
                    stats["clip_frac"].append(out.clip_frac.item())
                    stats["kl"].append(out.kl.mean().item())
                    stats["loss"].append(out.loss.item())
                grad_norm = self.optimizer_step()
        if not stats["loss"]:  # distributed: this process held none of the active rows
            return {"update_samples": int(rows.numel()), "grad_norm": grad_norm}
        ratio = torch.cat(stats["ratio"])
        return {"update_samples": int(rows.numel()), "loss": float(np.mean(stats["loss"])),
                "logp_diff": stats["logp_diff"], "ratio_mean": ratio.mean().item(), "ratio_max": ratio.max().item(),
                "ratio_min": ratio.min().item(), "clip_frac": float(np.mean(stats["clip_frac"])),
                "kl": float(np.mean(stats["kl"])), "grad_norm": grad_norm}

    def progress(self, metrics: dict) -> dict:
        return {"reward": f"{metrics['reward_mean']:.3f}", "ratio": f"{metrics.get('ratio_mean', 1):.4f}"}
