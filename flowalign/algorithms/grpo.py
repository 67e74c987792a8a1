"""Flow-GRPO and GRPO-Guard losses on recorded Gaussian transitions (docs/math.md §2). No I/O.

Per step k: ``rho = exp(logp_theta - logp_old)``,
``L = mean_i max(-A_i rho_i, -A_i clip(rho_i, 1 - eps, 1 + eps)) + beta KL(pi_theta || pi_ref)``,
where pi_ref is the same network with the LoRA adapter disabled.

GRPO-Guard normalises the ratio: with ``dmu = mu_theta - mu_old`` and the step std s,
``b = mean_d(dmu^2) / (2 s^2)`` and ``rho~ = exp((logp_theta - logp_old + b) s)``; for
``x' = mu_old + s xi`` the exponent is exactly ``mean_d(xi dmu)``. Its loss is reweighted by ``1/Delta``.
Log-probs use the mean reduction over elements, as the reference code (and its clip ranges) assume.
``GRPOUpdate`` is the update rule the trainer drives (re-scoring recorded rollouts with the current policy).
Flow-GRPO: arXiv 2505.05470; GRPO-Guard: arXiv 2510.22319; DanceGRPO: arXiv 2505.07818.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import numpy as np
import torch

from .. import lora
from ..rollout import Trajectory, rescore
from ..samplers import GaussianStep
from .advantages import advantages_for
from .fdistill import transition_weights
from .onpolicy import OnPolicyMeter
from .base import UpdateRule, configured_rollout


GUARD_BIASES = ("sample", "batch")
STEP_SELECTIONS = ("first", "random")


def clipped_surrogate(log_ratio: torch.Tensor, advantages: torch.Tensor, clip_range: float) -> torch.Tensor:
    """PPO's pessimistic surrogate per sample: ``max(-A rho, -A clip(rho, 1-eps, 1+eps))`` -> [B]."""
    ratio = log_ratio.exp()
    return torch.maximum(-advantages * ratio, -advantages * ratio.clamp(1 - clip_range, 1 + clip_range))


def guard_log_ratio(new: GaussianStep, logp_old: torch.Tensor, mean_old: torch.Tensor,
                    bias: str = "sample") -> torch.Tensor:
    """GRPO-Guard's normalised log-ratio ``(logp_theta - logp_old + b) s`` -> [B] (mean-reduced log-probs).

    bias: "sample" (b per sample, as VeRL-Omni computes it) or "batch" (b averaged over the batch, as the
    Flow-GRPO GRPO-Guard script's reduction does)."""
    s = new.std.reshape(-1)
    b = ((new.mean - mean_old) ** 2).flatten(1).mean(1) / (2 * s**2)
    if bias == "batch":
        b = b.mean().expand_as(b)
    elif bias not in GUARD_BIASES:
        raise ValueError(f"bias must be one of {GUARD_BIASES}, got {bias!r}")
    return (new.log_prob(reduction="mean") - logp_old + b) * s


@dataclass
class GRPOStepLoss:
    """loss: scalar to minimise; policy/kl/ratio/log_ratio: [B] per sample (detached); clip_frac: scalar."""

    loss: torch.Tensor
    policy: torch.Tensor
    kl: torch.Tensor
    ratio: torch.Tensor
    clip_frac: torch.Tensor
    log_ratio: Optional[torch.Tensor] = None


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
    guard_bias: str = "sample",
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
        divergence: f-divergence of the reference regulariser (docs/math.md §6 (a)): the per-sample KL is weighted by
            the detached, batch-normalised h(r), r = p_ref(x') / p_theta(x') the exact ratio of the two Gaussian
            transitions (``fdistill.transition_weights``); None or "reverse_kl" is the plain KL.
        guard_bias: GRPO-Guard's b per sample or averaged over the batch (``guard_log_ratio``).
    """
    if guard:
        if mean_old is None or new.dt is None:
            raise ValueError("guard=True needs mean_old (rollout with record_means=True) and a flow SDE step")
        log_ratio = guard_log_ratio(new, logp_old, mean_old, guard_bias)
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
                        clip_frac=(clipped * weights).sum() / weights.sum().clamp_min(1.0),
                        log_ratio=log_ratio.detach())


# ---- update rule ------------------------------------------------------------------------------------


def trainable_steps(traj: Trajectory, train_last_step: bool = True) -> list[int]:
    """The steps GRPO may train: the stochastic ones, without the last step when ``train_last_step`` is False
    (DanceGRPO samples it stochastically but never trains it)."""
    steps = traj.stochastic_steps
    return [k for k in steps if train_last_step or k != traj.num_steps - 1]


def step_columns(pool: Sequence[int], fraction: float, selection: str, num_rows: int,
                 generator: Optional[torch.Generator]) -> list[Union[int, torch.Tensor]]:
    """Which steps each row trains, as columns: ``count = max(1, int(len(pool) fraction))`` of them. selection
    "first": the first ``count`` steps of the pool for every row (Flow-GRPO's timestep_fraction; one int per
    column); "random": each row its own random subset of ``count`` steps (DanceGRPO; one LongTensor [num_rows] per
    column). The order of the columns does not matter: the gradient is accumulated over them."""
    if not pool:
        return []
    count = max(1, int(len(pool) * fraction))
    if selection == "first":
        return list(pool[:count])
    if selection not in STEP_SELECTIONS:
        raise ValueError(f"selection must be one of {STEP_SELECTIONS}, got {selection!r}")
    order = torch.rand(num_rows, len(pool), generator=generator).argsort(dim=1)[:, :count]
    chosen = torch.as_tensor(list(pool), dtype=torch.long)[order]
    return [chosen[:, j] for j in range(count)]


class GRPOUpdate(UpdateRule):
    """Flow-GRPO (docs/math.md §2): the live policy rolls out with the SDE sampler; the trainable steps (the
    stochastic ones, ``grpo.train_last_step``) of every sample, or the ``grpo.timestep_fraction`` of them picked by
    ``grpo.timestep_selection``, are re-scored by the current policy and the clipped loss (+ beta KL to the
    adapter-disabled model) is minimised, one optimizer step per minibatch (``train.minibatch``) per inner epoch
    (``grpo.inner_epochs``). With ``grpo.kl_reward`` > 0 the rollout also records the per-step KL to the reference
    and each step k gets its own advantage from ``R - kl_reward KL_k`` (Flow-GRPO's sample.kl_reward).
    Metrics: the on-policy keys of ``flowalign.algorithms.onpolicy`` (``onpolicy_logp_gap`` etc. before the first
    optimizer step: the on-policy check; ratio mean/min/max, clip_frac), kl, loss, grad_norm, update_samples (and
    ``kl_reward_penalty``).
    """

    name = "grpo"
    title = "Flow-GRPO"  # how reports name the method
    has_ratio = True

    def rollout(self, prompts, images=None):
        return configured_rollout(self.adapter, prompts, self.cfg, self.dist.noise(self.generator, len(prompts)),
                                  record_means=self.cfg.grpo.guard, record_reference_kl=self.cfg.grpo.kl_reward > 0,
                                  images=images)

    def _step_advantages(self, traj: Trajectory, adv: torch.Tensor, valid: torch.Tensor,
                         rewards: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """[B, N] per-step advantages of ``R - kl_reward KL_k`` (global rows), or None without kl_reward."""
        c = self.cfg.grpo.kl_reward
        if c <= 0:
            return None
        kl = self.dist.gather(traj.reference_kl).cpu()  # [B, N], NaN at deterministic steps
        prompts = self.dist.gather_objects(traj.group_keys)
        out = torch.zeros(kl.shape, dtype=torch.float32)
        for k in traj.stochastic_steps:
            out[:, k] = advantages_for(rewards.cpu() - c * kl[:, k], prompts, self.cfg, valid=valid.cpu())
        return out.to(adv.device)

    def update(self, traj: Trajectory, adv: torch.Tensor, valid: torch.Tensor, rewards=None, tasks=None) -> dict:
        g, t = self.cfg.grpo, self.cfg.train
        step_adv = self._step_advantages(traj, adv, valid, rewards)
        pool = trainable_steps(traj, g.train_last_step)
        # Samples with zero advantage only feed the KL term: skip them when there is none (same gradient).
        signal = (adv != 0) if step_adv is None else (step_adv != 0).any(dim=1)
        active = valid & (signal | (g.beta > 0))
        rows = torch.nonzero(active).flatten()
        stats = {"kl": [], "loss": []}
        meter = OnPolicyMeter(g.clip_range)  # the on-policy keys every rule with a ratio logs (algorithms.onpolicy)
        skipped = int((valid & ~active).sum())  # rows with a finite reward but no advantage (and no KL term)
        if rows.numel() == 0 or not pool:
            return {"update_samples": 0, "skipped_rows": skipped}
        n_global = adv.shape[0]
        for _ in range(g.inner_epochs):
            columns = step_columns(pool, g.timestep_fraction, g.timestep_selection, n_global, self.generator)
            perm = rows[torch.randperm(rows.numel(), generator=self.generator)]
            for mb in perm.split(t.minibatch):
                self.optimizer.zero_grad(set_to_none=True)
                part = self.dist.part(mb, traj.batch_size)  # the rows of mb this process holds (all, in one)
                for col in columns if part.size else ():
                    k = col if isinstance(col, int) else col[part.rows.cpu()]  # one step, or one per row
                    new = rescore(self.adapter, traj, k, index=part.local)
                    ref = None
                    if g.beta > 0:
                        with torch.no_grad(), lora.adapter_disabled(self.adapter):
                            ref = rescore(self.adapter, traj, k, index=part.local)
                    kk = k if isinstance(k, int) else k.to(traj.log_probs.device)
                    a = adv[part.rows] if step_adv is None else step_adv[part.rows, kk]
                    out = grpo_step_loss(new, traj.log_probs[part.local, kk], a, g.clip_range, beta=g.beta,
                                         ref_step=ref, kl_scaling=g.kl_scaling, guard=g.guard,
                                         mean_old=None if traj.means is None else traj.means[part.local, kk],
                                         divergence=g.kl_divergence, guard_bias=g.guard_bias)
                    (out.loss * part.share / len(columns)).backward()
                    if part.placeholder:  # FSDP: a zero-weight row that only keeps the collectives in step
                        continue
                    meter.add(out.log_ratio)
                    stats["kl"].append(out.kl.mean().item())
                    stats["loss"].append(out.loss.item())
                grad_norm = self.optimizer_step()
                meter.step_taken()
        extra = {}
        if step_adv is not None:
            kl = traj.reference_kl[:, traj.stochastic_steps]
            extra["kl_reward_penalty"] = float(g.kl_reward * kl.sum(dim=1).mean())
        if not stats["loss"]:  # distributed: this process held none of the active rows
            return {"update_samples": int(rows.numel()), "skipped_rows": skipped, "grad_norm": grad_norm, **extra}
        return {"update_samples": int(rows.numel()), "skipped_rows": skipped, "loss": float(np.mean(stats["loss"])),
                **meter.metrics(),
                "kl": float(np.mean(stats["kl"])), "grad_norm": grad_norm, **extra}

    def progress(self, metrics: dict) -> dict:
        out = super().progress(metrics)  # no reward when the batch had none that was finite
        out.pop("loss", None)
        return {**out, "ratio": f"{metrics.get('ratio_mean', 1):.4f}"}
