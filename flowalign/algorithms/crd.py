"""CRD, Centered Reward Distillation (arXiv 2603.14128; docs/math.md §5). No I/O.

Theory: the KL-regularised optimum is ``pi* ∝ pi_ref exp(R / beta)``, so
``beta log(pi* / pi_ref)(x | c) = R(x, c) - beta log Z(c)``. Centering WITHIN a prompt's group cancels the
unknown log Z(c): ``beta (l_i - mean_group l) = R_i - mean_group R``. CRD regresses the first onto the second.

Implicit log-ratio on the forward process [ref: Flow-Factory] (x0 = final rollout latent, fresh eps, one t per
micro-batch, ``x_t = (1 - t) x0 + t eps``, ``u = eps - x0``, both velocities at guidance 1):

    l = -mean_d[ (v_theta - u)^2 / w_theta - (v_old - u)^2 / w_old ],   w = sg(max(mean_d |v - u|, 1e-5))

Normalised reward ``R~ = clip(A, -A_max, A_max) / (2 A_max) + 1/2`` in [0, 1] (A_max = 5: ``clip(A)/10 + 1/2``).
Loss (MSE form):

    (A_max / beta) mean_i ( beta (l_i - sg(center(l))_i) - (R~_i - center(R~)_i) )^2

plus the KL anchor ``mean_i (1e-4 + R~_i (beta_KL - 1e-4)) D_i`` with ``D_i = mean_d (v_theta - v_ref^CFG)^2``.
centering="group" (default) centres within prompt groups as the theory needs; centering="batch" centres over the
whole batch as the public implementation does (prompts mixed: log Z(c) does NOT cancel) -- a documented deviation.
Centre weights (``center_weighting``, Flow-Factory's ``weight_temp``): "uniform" (the plain mean, tau < 0 there);
"softmax" (tau > 0: two directions, centres weighted by softmax(R~/tau) and softmax(-R~/tau), every sample in both
halves of the loss with weight 1/2); "hard" (tau = 0 as the public code computes it: softmax(R~) over the samples
with R~ > 0 and softmax(R~) over those with R~ < 0, a uniform mean where none is; since R~ >= 0 the second is the
plain mean in practice). Any weights summing to 1 per group keep the log Z(c) cancellation.

Snapshots (updated once per epoch after the optimizer step, s = optimizer-step count):
``snap <- d snap + (1 - d) theta`` with d from a schedule ``start_step-start_value-slope-end_value`` (Flow-Factory's
format): ``d(s) = start_value`` while ``s < start_step``, then ``min(start_value + (s - start_step) slope,
end_value)``; d <= 0 is a hard copy, d >= 1 keeps the snapshot. Defaults: old (the v_old inside l)
"0-0.25-0.005-0.999", sampler (the rollout policy) "75-0-0.0075-0.999".
``CRDUpdate`` is the update rule the trainer drives (old and sampler models = shadow copies of the LoRA weights).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from .. import lora
from ..rollout import Trajectory
from .advantages import group_ids_from_prompts
from ..runtime.snapshot import Snapshot
from .onpolicy import OnPolicyMeter
from .base import UpdateRule, require_flow
from .distances import velocity_distance
from .timesteps import forward_timesteps

CENTERINGS = ("group", "batch")
FORMS = ("mse", "bce")
CENTER_WEIGHTINGS = ("uniform", "softmax", "hard")
OLD_MODELS = ("snapshot", "reference")


# ---- implicit log-ratio and reward ---------------------------------------------------------------


def _adaptive_sq_error(v: torch.Tensor, target: torch.Tensor, eps: float, adaptive: bool = True) -> torch.Tensor:
    """``mean_d (v - u)^2 / sg(max(mean_d |v - u|, eps))`` -> [B] float64 (without the weight when not adaptive)."""
    diff = (v.double() - target.double()).flatten(1)
    if not adaptive:
        return (diff**2).mean(1)
    w = diff.detach().abs().mean(1).clamp_min(eps)
    return (diff**2).mean(1) / w


def implicit_log_ratio(v_theta: torch.Tensor, v_old: torch.Tensor, target: torch.Tensor,
                       eps: float = 1e-5, adaptive: bool = True) -> torch.Tensor:
    """``l = -mean_d[(v_theta - u)^2 / w_theta - (v_old - u)^2 / w_old]`` -> [B] float32.

    v_theta (with grad), v_old (snapshot, no grad), target u = eps - x0: [B, ...]. The weights
    ``w = sg(max(mean_d |v - u|, eps))`` and the ratio are computed in float64. l > 0 where v_theta denoises
    the sample better than v_old (a higher implicit likelihood). adaptive=False drops the weights (w = 1:
    Flow-Factory's ``adaptive_logp: false``).
    """
    if not (v_theta.shape == v_old.shape == target.shape):
        raise ValueError(f"v_theta {tuple(v_theta.shape)}, v_old {tuple(v_old.shape)} and target "
                         f"{tuple(target.shape)} must share one shape [B, ...]")
    target = target.detach()
    l = -(_adaptive_sq_error(v_theta, target, eps, adaptive) - _adaptive_sq_error(v_old.detach(), target, eps, adaptive))
    return l.float()


def normalized_reward(advantages: torch.Tensor, adv_max: float = 5.0) -> torch.Tensor:
    """``R~ = clip(A, -A_max, A_max) / (2 A_max) + 1/2`` -> [B] in [0, 1] (A = GRPO advantage, global std)."""
    if adv_max <= 0:
        raise ValueError(f"adv_max must be > 0, got {adv_max}")
    return advantages.float().clamp(-adv_max, adv_max) / (2 * adv_max) + 0.5


# ---- centering -------------------------------------------------------------------------------------


def _group_index(group_ids: Optional[torch.Tensor], n: int, centering: str, device) -> torch.Tensor:
    if centering not in CENTERINGS:
        raise ValueError(f"centering must be one of {CENTERINGS}, got {centering!r}")
    if centering == "batch":
        return torch.zeros(n, dtype=torch.long, device=device)
    if group_ids is None:
        raise ValueError("centering='group' needs group_ids [B] (e.g. group_ids_from_prompts(prompts)); "
                         "pass centering='batch' to centre over the whole batch (deviates from the theory)")
    if group_ids.shape != (n,):
        raise ValueError(f"group_ids must have shape [{n}], got {tuple(group_ids.shape)}")
    return torch.unique(group_ids, return_inverse=True)[1].to(device)


def group_center(x: torch.Tensor, index: torch.Tensor, weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Each element replaced by its group's (weighted) mean -> [B].

    x [B]; index [B] long in [0, G); weights [B] >= 0 (default 1; zero weight = left out of the mean).
    """
    w = torch.ones_like(x) if weights is None else weights.to(x.dtype)
    g = int(index.max()) + 1 if index.numel() else 0
    num = torch.zeros(g, dtype=x.dtype, device=x.device).index_add_(0, index, w * x)
    den = torch.zeros(g, dtype=x.dtype, device=x.device).index_add_(0, index, w)
    return (num / den.clamp_min(torch.finfo(x.dtype).tiny))[index]


def _group_softmax(x: torch.Tensor, index: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """softmax of x within each group over the entries of ``mask`` (others get 0) -> [B]; a group with no masked
    entry gets 0 everywhere."""
    g = int(index.max()) + 1
    neg_inf = torch.full((g,), -float("inf"), dtype=x.dtype, device=x.device)
    gmax = neg_inf.scatter_reduce(0, index, torch.where(mask, x, -float("inf")), "amax")[index]
    e = torch.where(mask, (x - gmax).exp(), torch.zeros_like(x))
    z = torch.zeros(g, dtype=x.dtype, device=x.device).index_add_(0, index, e)[index]
    return torch.where(z > 0, e / z.clamp_min(torch.finfo(x.dtype).tiny), torch.zeros_like(e))


def _selected_softmax(x: torch.Tensor, index: torch.Tensor, valid: torch.Tensor, selected: torch.Tensor) -> torch.Tensor:
    """Flow-Factory's hard selection: softmax of x over the valid ``selected`` entries of each group; a group with
    none selected falls back to uniform weights over its valid entries -> [B]."""
    weights = _group_softmax(x, index, valid & selected)
    g = int(index.max()) + 1
    any_selected = torch.zeros(g, dtype=x.dtype, device=x.device).index_add_(0, index, (valid & selected).to(x.dtype))
    uniform = _group_softmax(torch.zeros_like(x), index, valid)
    return torch.where(any_selected[index] > 0, weights, uniform)


def _centers(l: torch.Tensor, reward: torch.Tensor, index: torch.Tensor, mask: torch.Tensor, weighting: str,
             tau: float) -> list[tuple[float, torch.Tensor, torch.Tensor]]:
    """The centring directions: a list of (weight of that direction's loss, center(l) detached, center(R~)), each
    center per sample [B] (module docstring)."""
    if weighting not in CENTER_WEIGHTINGS:
        raise ValueError(f"center_weighting must be one of {CENTER_WEIGHTINGS}, got {weighting!r}")
    m = mask.to(l.dtype)
    if weighting == "uniform":
        return [(1.0, group_center(l.detach(), index, m), group_center(reward, index, m))]
    if weighting == "softmax":
        if tau <= 0:
            raise ValueError(f"tau must be > 0, got {tau} (tau = 0 is center_weighting='hard')")
        w_pos = _group_softmax(reward / tau, index, mask)
        w_neg = _group_softmax(-reward / tau, index, mask)
    else:  # the public code's weight_temp = 0: note the negative side's softmax is of +R~, as written there
        w_pos = _selected_softmax(reward, index, mask, reward > 0)
        w_neg = _selected_softmax(reward, index, mask, reward < 0)
    return [(0.5, group_center(l.detach(), index, w), group_center(reward, index, w)) for w in (w_pos, w_neg)]


# ---- KL anchor --------------------------------------------------------------------------------------


def kl_coefficients(reward: torch.Tensor, beta_kl: float = 0.1, floor: float = 1e-4) -> torch.Tensor:
    """Reward-adaptive KL weight ``floor + R~_i (beta_KL - floor)`` -> [B] (R~ the normalised reward)."""
    return floor + reward.detach().float() * (beta_kl - floor)


# ---- loss -------------------------------------------------------------------------------------------


@dataclass
class CRDLoss:
    """loss: scalar to minimise (main + kl); main, kl: scalars (detached); residual: [B]
    ``beta l_c - R~_c`` (detached; 0 at the optimum); centered_log_ratio: [B] ``l - sg(center(l))`` (detached)."""

    loss: torch.Tensor
    main: torch.Tensor
    kl: torch.Tensor
    residual: torch.Tensor
    centered_log_ratio: torch.Tensor


def crd_loss(
    log_ratio: torch.Tensor,
    reward: torch.Tensor,
    group_ids: Optional[torch.Tensor] = None,
    beta: float = 1.0,
    adv_max: float = 5.0,
    centering: str = "group",
    form: str = "mse",
    center_weighting: str = "uniform",
    tau: float = 1.0,
    kl_distance: Optional[torch.Tensor] = None,
    beta_kl: float = 0.1,
    kl_floor: float = 1e-4,
    mask: Optional[torch.Tensor] = None,
) -> CRDLoss:
    """The CRD loss of one micro-batch at one timestep.

    Args:
        log_ratio: l [B] (``implicit_log_ratio``), with grad.
        reward: R~ [B], the normalised reward (``normalized_reward(A)``); any per-prompt offset cancels.
        group_ids: [B] long, one id per prompt (``group_ids_from_prompts``); needed for centering="group".
        beta: KL strength of the target ``pi_ref e^{R/beta}`` (1).
        adv_max: A_max of the MSE prefactor ``A_max / beta`` (5).
        centering: "group" (theory, default) or "batch" ([deviation] the public code: one centre over a
            batch that mixes prompts, so log Z(c) does not cancel).
        form: "mse" (default) or "bce" (BCE with logits ``beta l_c`` and target ``sigmoid(R~_c)``, as Flow-Factory;
            same fixed point ``beta l_c = R~_c``). Both are scaled by ``A_max / beta``.
        center_weighting: "uniform" (default), "softmax" (two directions at temperature tau) or "hard" (the
            public code's tau = 0); see the module docstring.
        kl_distance: D_i [B] (``distances.velocity_distance`` to the CFG reference), with grad; None drops the anchor.
        beta_kl, kl_floor: the anchor's coefficient ``kl_floor + R~_i (beta_kl - kl_floor)``.
        mask: [B] bool, valid samples (excluded ones enter neither the centres nor the means).
    """
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    n = log_ratio.shape[0]
    if log_ratio.shape != (n,) or reward.shape != (n,):
        raise ValueError(f"log_ratio {tuple(log_ratio.shape)} and reward {tuple(reward.shape)} must both be [B]")
    mask = torch.ones(n, dtype=torch.bool, device=log_ratio.device) if mask is None else mask.bool()
    reward = reward.detach().float()
    index = _group_index(group_ids, n, centering, log_ratio.device)
    directions = _centers(log_ratio, reward, index, mask, center_weighting, tau)
    per_sample = torch.zeros_like(log_ratio)
    for weight, c_l, c_r in directions:
        l_c, r_c = log_ratio - c_l, reward - c_r
        if form == "mse":
            term = (beta * l_c - r_c) ** 2
        else:
            term = F.binary_cross_entropy_with_logits(beta * l_c, torch.sigmoid(r_c), reduction="none")
        per_sample = per_sample + weight * term
    per_sample = (adv_max / beta) * per_sample
    _, c_l, c_r = directions[0]
    l_c, r_c = log_ratio - c_l, reward - c_r  # the first direction's, for the metrics
    m = mask.float()
    denom = m.sum().clamp_min(1.0)
    main = (per_sample * m).sum() / denom
    kl = torch.zeros((), device=log_ratio.device)
    if kl_distance is not None:
        if kl_distance.shape != (n,):
            raise ValueError(f"kl_distance must have shape [{n}], got {tuple(kl_distance.shape)}")
        kl = (kl_coefficients(reward, beta_kl, kl_floor) * kl_distance * m).sum() / denom
    return CRDLoss(loss=main + kl, main=main.detach(), kl=kl.detach(), residual=(beta * l_c - r_c).detach(),
                   centered_log_ratio=l_c.detach())


# ---- snapshot schedules -----------------------------------------------------------------------------


# Flow-Factory's schedule presets (start_step, start_value, slope, end_value), by number and name.
SCHEDULE_PRESETS = {"none": (0, 0.0, 0.0, 0.0), "slow": (0, 0.0, 0.001, 0.5), "medium": (75, 0.0, 0.0075, 0.999),
                    "offline": (0, 1.0, 0.0, 1.0), "fast": (0, 0.0, 0.02, 0.99), "moderate": (0, 0.0, 0.01, 0.5)}
SCHEDULE_PRESETS.update({str(i): v for i, v in enumerate(SCHEDULE_PRESETS.values())})
SCHEDULE_PRESETS["6"] = (0, 0.0, 0.0075, 0.999)
OLD_SCHEDULE = "0-0.25-0.005-0.999"  # d = min(0.25 + 0.005 s, 0.999) (docs/math.md §5)
SAMPLER_SCHEDULE = "75-0-0.0075-0.999"  # hard copy while s < 75, then min(0.0075 (s - 75), 0.999)


def parse_schedule(spec: str) -> tuple[int, float, float, float]:
    """``"start_step-start_value-slope-end_value"`` (e.g. "75-0-0.0075-0.999") or a preset name/number of
    ``SCHEDULE_PRESETS`` -> (start_step, start_value, slope, end_value). Raises ValueError saying the format."""
    spec = str(spec).strip()
    if spec in SCHEDULE_PRESETS:
        return SCHEDULE_PRESETS[spec]
    parts = spec.split("-")
    try:
        if len(parts) != 4:
            raise ValueError
        start, v0, slope, v1 = int(parts[0]), float(parts[1]), float(parts[2]), float(parts[3])
    except ValueError:
        raise ValueError(f"schedule {spec!r} must be 'start_step-start_value-slope-end_value' (e.g. "
                         f"'75-0-0.0075-0.999') or one of {', '.join(k for k in SCHEDULE_PRESETS if not k.isdigit())}"
                         ) from None
    if start < 0 or slope < 0 or not (0 <= v0 <= 1 and 0 <= v1 <= 1):
        raise ValueError(f"schedule {spec!r}: start_step and slope must be >= 0 and both values in [0, 1]")
    return start, v0, slope, v1


def schedule_decay(spec: str, step: int) -> float:
    """d(s) of a schedule: ``start_value`` while s < start_step, then ``min(start_value + (s - start_step) slope,
    end_value)``."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    start, v0, slope, v1 = parse_schedule(spec)
    if step < start:
        return v0
    return min(v0 + (step - start) * slope, v1)


# ---- timesteps --------------------------------------------------------------------------------------


# ---- update rule ------------------------------------------------------------------------------------


class CRDUpdate(UpdateRule):
    """CRD (docs/math.md §5) on a trainer state.

    Two :class:`Snapshot` s of the LoRA weights, both starting equal to them: the sampler (rolls out, with the
    configured sampler: ODE at guidance 1 in the paper's setting) and old (v_old inside l). Update: the prompt
    groups (shuffled) are split into ``crd.steps_per_iter`` optimizer steps; for each, ``crd.num_timesteps``
    stratified draws t from the rollout grid, and for each t every micro-batch of WHOLE groups
    (``train.minibatch // group_size`` groups) gets fresh noise, ``l = implicit_log_ratio(v_theta, v_old, u)``
    (guidance 1), the KL anchor distance to the base model (adapter disabled) at CFG ``crd.kl_guidance_scale``,
    and ``crd_loss``; gradients accumulate over draws and micro-batches. After the iteration, with s the
    optimizer-step count: ``old`` and ``sampler`` move by ``schedule_decay`` of ``crd.old_schedule`` /
    ``crd.sampler_schedule``. With ``crd.old_model=reference`` v_old is the adapter-disabled base (Flow-Factory's
    ``use_old_for_loss: false``); the old snapshot is still kept and moved, as there.
    Metrics: loss, main, kl, the on-policy keys of ``flowalign.algorithms.onpolicy`` for l (``onpolicy_logp_gap``:
    mean |l| before the first optimizer step, 0 while old == current; ``ratio_*`` of exp(l)),
    residual_abs, grad_norm, old_decay, sampler_decay, optimizer_steps, update_samples.
    """

    name = "crd"
    title = "Centered Reward Distillation"  # how reports name the method

    def __init__(self, cfg, adapter, params, optimizer, generator):
        super().__init__(cfg, adapter, params, optimizer, generator)
        require_flow(adapter, "crd")
        self.old = Snapshot(self.params)
        self.sampler = Snapshot(self.params)

    def rollout(self, prompts, images=None):
        with self.sampler.swapped_in():
            return super().rollout(prompts, images)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "old": self.old.state_dict(), "sampler": self.sampler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.old.load_state_dict(state["old"])
        self.sampler.load_state_dict(state["sampler"])

    def update(self, traj: Trajectory, adv: torch.Tensor, valid: torch.Tensor, rewards=None, tasks=None) -> dict:
        c, t = self.cfg.crd, self.cfg.train
        reward = normalized_reward(adv, c.adv_max)
        # global [B], on the device of valid/reward (a CUDA bool mask cannot index a CPU tensor)
        gids = group_ids_from_prompts(self.dist.gather_objects(traj.group_keys)).to(valid.device)
        groups = torch.unique(gids[valid])
        if groups.numel() == 0:
            return {"update_samples": 0}
        groups = groups[torch.randperm(groups.numel(), generator=self.generator)]
        per_mb = max(1, t.minibatch // t.group_size)
        stats = {"loss": [], "main": [], "kl": [], "residual": []}
        meter = OnPolicyMeter()  # l = 0 before the first optimizer step while old == current (algorithms.onpolicy)
        grad_norm = 0.0
        for chunk in torch.tensor_split(groups, min(c.steps_per_iter, groups.numel())):
            batches = [torch.nonzero(torch.isin(gids, g)).flatten() for g in chunk.split(per_mb)]
            n_valid = float(valid[torch.cat(batches)].sum())
            self.optimizer.zero_grad(set_to_none=True)
            draws = forward_timesteps(traj, c.num_timesteps, c.timestep_fraction, self.generator)
            for timestep, sigma in draws:
                for rows in batches:
                    part = self.dist.part(rows, traj.batch_size)  # the rows this process holds (all, in one)
                    x0, cond, mask = traj.final[part.local], traj.cond.select(part.local), valid[part.rows]
                    fp = self.forward_sample(x0, sigma, part)
                    if fp is None:  # this process holds none of these rows
                        continue
                    old = self.old.swapped_in() if c.old_model == "snapshot" else lora.adapter_disabled(self.adapter)
                    with torch.no_grad(), old:
                        v_old = self.adapter.predict(fp.x_t, timestep, cond, 1.0)
                    v = self.adapter.predict(fp.x_t, timestep, cond, 1.0)
                    l = implicit_log_ratio(v, v_old, fp.target, eps=c.eps, adaptive=c.adaptive_weights)
                    dist = None
                    if c.beta_kl > 0:
                        ref_cond = self.adapter.encode_prompts(cond.prompts, c.kl_guidance_scale)
                        with torch.no_grad(), lora.adapter_disabled(self.adapter):
                            v_ref = self.adapter.predict(fp.x_t, timestep, ref_cond, c.kl_guidance_scale)
                        dist = velocity_distance(v, v_ref)
                    out = crd_loss(l, reward[part.rows], gids[part.rows], beta=c.beta, adv_max=c.adv_max,
                                   centering=c.centering, form=c.form, center_weighting=c.center_weighting, tau=c.tau, kl_distance=dist,
                                   beta_kl=c.beta_kl, kl_floor=c.kl_floor, mask=mask)
                    # micro-batch means weighted by their valid samples: the loss of the whole chunk, averaged over
                    # draws (weight 0 for an FSDP placeholder row, which only keeps the collectives in step)
                    weight = 0.0 if part.placeholder else float(mask.sum()) / max(n_valid, 1.0)
                    (out.loss * weight / len(draws)).backward()
                    if part.placeholder:
                        continue
                    meter.add(l, mask)
                    stats["loss"].append(out.loss.item())
                    stats["main"].append(out.main.item())
                    stats["kl"].append(out.kl.item())
                    stats["residual"].append(out.residual[mask].abs().mean().item())
            grad_norm = self.optimizer_step()
            meter.step_taken()
        s = self.optimizer_steps
        d_old = schedule_decay(c.old_schedule, s)
        d_sampler = schedule_decay(c.sampler_schedule, s)
        self.old.update(d_old)
        self.sampler.update(d_sampler)
        if not stats["loss"]:  # distributed: this process held none of the valid rows
            return {"update_samples": int(valid.sum()), "grad_norm": grad_norm, "old_decay": d_old,
                    "sampler_decay": d_sampler, "optimizer_steps": s}
        return {"update_samples": int(valid.sum()), "loss": float(np.mean(stats["loss"])),
                "main": float(np.mean(stats["main"])), "kl": float(np.mean(stats["kl"])),
                **meter.metrics(), "residual_abs": float(np.mean(stats["residual"])),
                "grad_norm": grad_norm, "old_decay": d_old, "sampler_decay": d_sampler, "optimizer_steps": s}
