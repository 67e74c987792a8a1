"""DiffusionNFT: forward-process RL with implicit positive/negative policies (arXiv 2509.16117; docs/math.md §4).
No I/O.

The old model v_old (an EMA snapshot) samples K images per prompt with any sampler; the group advantage A
becomes an optimality probability ``r = clip(A / A_max, -1, 1) / 2 + 1/2`` in [0, 1] (after the ``adv_mode``
transform). On the FORWARD process (the sample's x0, fresh noise eps, ``x_t = (1 - t) x0 + t eps``, target
``u = eps - x0``) the current velocity v_theta defines two implicit policies

    v+ = (1 - beta) v_old + beta v_theta,        v- = (1 + beta) v_old - beta v_theta.

Reference form (``form="reference"``, the default; the DiffusionNFT code, scripts/train_nft_sd3.py): each implicit
policy's error is measured in x0 space, ``x0(v) = x_t - t v``, with a detached per-sample adaptive weight
(float64, floored at 1e-5), and the policy term is scaled by A_max / beta:

    e(v) = mean_d (x0(v) - x0)^2 / sg(max(mean_d |x0(v) - x0|, 1e-5))
         = t mean_d (v - u)^2 / sg(max(mean_d |v - u|, 1e-5 / t))                      [derived]
    L    = (A_max / beta) mean_i [ r_i e(v+_i) + (1 - r_i) e(v-_i) ] + lambda_KL mean_i mean_d (v_theta - v_ref)^2.

Since dv+/dv_theta = beta = -dv-/dv_theta, the 1/beta prefactor cancels beta in the policy gradient: at
v_theta = v_old it is ``A_max mean_i (2 r_i - 1) e'(v_old)`` whatever beta is.

Velocity form (``form="velocity_mse"``, a documented deviation: flowalign's earlier loss)

    L = mean_i [ r_i |v+ - u|^2 + (1 - r_i) |v- - u|^2 ] + lambda_KL |v_theta - v_ref|^2.

Closed form [derived]: with ``a = v_old - u`` and ``delta = v_theta - v_old`` the velocity-form bracket is
``|a|^2 + beta^2 |delta|^2 + 2 beta (2r - 1) <a, delta>``, so for a fixed x_t (lambda_KL = 0) the minimiser is

    v* = v_old + (2 / beta) E[(r - 1/2)(u - v_old)];

the reference form has the same fixed point wherever its adaptive weights (times t) are equal across terms.

Defaults [ref]: no CFG, beta = 1 (0.1 for OCR), lambda_KL = 1e-4, A_max = 5, lr 3e-4.
|.|^2 is averaged over elements by default (``reduction="mean"``), as the reference code does.
``NFTUpdate`` is the update rule the trainer drives (old model = a shadow copy of the LoRA weights).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from .. import lora
from ..rollout import Trajectory
from ..runtime.snapshot import Snapshot
from ..samplers.flow import ForwardSample
from .base import UpdateRule, require_flow
from .distances import velocity_distance
from .timesteps import forward_timesteps

_REDUCTIONS = ("mean", "sum")


def _reduce(x: torch.Tensor, reduction: str) -> torch.Tensor:
    """[B, ...] -> [B], mean or sum over the non-batch dims."""
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    flat = x.reshape(x.shape[0], -1)
    return flat.mean(1) if reduction == "mean" else flat.sum(1)


def _check_same_shape(**tensors: Optional[torch.Tensor]) -> None:
    shapes = {k: tuple(v.shape) for k, v in tensors.items() if v is not None}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"velocity/target tensors must share one shape [B, ...], got {shapes}")


ADV_MODES = ("all", "positive_only", "negative_only", "one_only", "binary")
LOSS_FORMS = ("reference", "velocity_mse")


def optimality(advantages: torch.Tensor, adv_max: float = 5.0, adv_mode: str = "all") -> torch.Tensor:
    """``r = clip(A'/ A_max, -1, 1) / 2 + 1/2`` -> [B] in [0, 1] (A' = 0 gives 1/2, an uninformative sample).

    A' is ``clip(A, -A_max, A_max)`` transformed by ``adv_mode`` (the DiffusionNFT code's options): "all" (none),
    "positive_only" (clamped to [0, A_max]), "negative_only" (clamped to [-A_max, 0]), "one_only" (1 where A > 0,
    else 0) or "binary" (sign A).
    """
    if adv_max <= 0:
        raise ValueError(f"adv_max must be > 0, got {adv_max}")
    if adv_mode not in ADV_MODES:
        raise ValueError(f"adv_mode must be one of {ADV_MODES}, got {adv_mode!r}")
    a = advantages.float().clamp(-adv_max, adv_max)
    if adv_mode == "positive_only":
        a = a.clamp_min(0.0)
    elif adv_mode == "negative_only":
        a = a.clamp_max(0.0)
    elif adv_mode == "one_only":
        a = (a > 0).float()
    elif adv_mode == "binary":
        a = torch.sign(a)
    return (a / adv_max).clamp(-1.0, 1.0) / 2 + 0.5


def implicit_policies(v_theta: torch.Tensor, v_old: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``v+ = (1 - beta) v_old + beta v_theta`` and ``v- = (1 + beta) v_old - beta v_theta`` ([B, ...] each).

    v_old is detached (it is a frozen snapshot).
    """
    v_old = v_old.detach()
    return (1 - beta) * v_old + beta * v_theta, (1 + beta) * v_old - beta * v_theta


def nft_optimum(v_old: torch.Tensor, targets: torch.Tensor, r: torch.Tensor, beta: float) -> torch.Tensor:
    """Closed-form minimiser for one fixed x_t: ``v* = v_old + (2 / beta) mean_i[(r_i - 1/2)(u_i - v_old)]``.

    v_old: [...] (one state), targets: [n, ...] (u_i from n (x0, eps) pairs sharing x_t), r: [n] -> [...].
    """
    w = (r.float() - 0.5).reshape(-1, *([1] * (targets.dim() - 1)))
    return v_old + (2.0 / beta) * (w * (targets - v_old)).mean(0)


def _math_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 when any input is float64, else float32 (bf16/fp16 network outputs are computed on in float32)."""
    return torch.float64 if any(x.dtype == torch.float64 for x in tensors) else torch.float32


def x0_error(v: torch.Tensor, point: ForwardSample) -> torch.Tensor:
    """``x0(v) - x0 = (x_t - t v) - x0`` -> [B, ...]: the error of a velocity's clean-latent prediction (float32, or
    float64 for float64 inputs)."""
    if point.x0 is None:
        raise ValueError("the reference NFT form needs the forward sample's x0 (build it with forward_process)")
    dtype = _math_dtype(v, point.x_t, point.x0)
    x_t = point.x_t.to(dtype)
    return x_t - point.t_like(x_t).to(dtype) * v.to(dtype) - point.x0.to(dtype)


def adaptive_x0_error(v: torch.Tensor, point: ForwardSample, reduction: str = "mean",
                      floor: float = 1e-5) -> torch.Tensor:
    """The reference's per-sample error ``e(v) = red_d (x0(v) - x0)^2 / sg(max(mean_d |x0(v) - x0|, floor))`` -> [B].

    The weight is detached and, like the error's square, computed in float64; the result has the error's dtype.
    reduction: "mean" (reference) or "sum" over elements of the squared error (the weight is always a mean).
    """
    err = x0_error(v, point).flatten(1)
    wide = err.double()
    weight = wide.detach().abs().mean(1).clamp_min(floor)
    sq = (wide**2).mean(1) if reduction == "mean" else (wide**2).sum(1)
    return (sq / weight).to(err.dtype)


@dataclass
class NFTLoss:
    """loss: scalar to minimise; positive, negative, kl: [B] per-sample terms (detached); r: [B] optimality."""

    loss: torch.Tensor
    positive: torch.Tensor
    negative: torch.Tensor
    kl: torch.Tensor
    r: torch.Tensor


def nft_loss(
    v_theta: torch.Tensor,
    v_old: torch.Tensor,
    point: ForwardSample,
    r: torch.Tensor,
    beta: float = 1.0,
    v_ref: Optional[torch.Tensor] = None,
    kl_coef: float = 1e-4,
    reduction: str = "mean",
    mask: Optional[torch.Tensor] = None,
    form: str = "reference",
    adv_max: float = 5.0,
    weight_floor: float = 1e-5,
) -> NFTLoss:
    """The DiffusionNFT loss of one forward-process point (module docstring).

    reference: ``(A_max / beta) mean_i [r_i e(v+) + (1 - r_i) e(v-)] + lambda_KL mean_i mean_d (v_theta - v_ref)^2``;
    velocity_mse: ``mean_i [r_i |v+ - u|^2 + (1 - r_i) |v- - u|^2 + lambda_KL |v_theta - v_ref|^2]``.

    Args:
        v_theta: current velocity at x_t [B, ...] (with grad), no CFG.
        v_old: the old (sampling) snapshot's velocity at the same x_t [B, ...] (no grad).
        point: the forward-process point (``forward_process``): x_t, target u = eps - x0, t [B] and x0.
        r: optimality [B] in [0, 1] (``optimality(A)``).
        beta: implicit-policy step (> 0); 1 by default, 0.1 for OCR.
        v_ref: reference velocity (adapter disabled) [B, ...]; needed when kl_coef > 0.
        kl_coef: lambda_KL (1e-4); 0 drops the term.
        reduction: "mean" (reference) or "sum" of the squared errors over elements.
        mask: [B] bool, samples to include.
        form: "reference" (x0-space errors with adaptive weights and the A_max / beta prefactor) or
            "velocity_mse" (the plain velocity-space form; a documented deviation).
        adv_max: A_max of the reference form's prefactor (the value ``r`` was built with).
        weight_floor: floor of the reference form's adaptive weights (reference: 1e-5).
    """
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if form not in LOSS_FORMS:
        raise ValueError(f"form must be one of {LOSS_FORMS}, got {form!r}")
    target = point.target
    _check_same_shape(v_theta=v_theta, v_old=v_old, target=target, v_ref=v_ref)
    r = r.float()
    if r.shape != (v_theta.shape[0],):
        raise ValueError(f"r must have shape [{v_theta.shape[0]}], got {tuple(r.shape)}")
    if ((r < 0) | (r > 1)).any():
        raise ValueError("r must lie in [0, 1]; build it with optimality(advantages)")
    dtype = _math_dtype(v_theta, v_old, target)
    target, r = target.to(dtype).detach(), r.to(dtype)
    v_pos, v_neg = implicit_policies(v_theta.to(dtype), v_old.to(dtype), beta)
    if form == "reference":
        pos = adaptive_x0_error(v_pos, point, reduction, weight_floor)
        neg = adaptive_x0_error(v_neg, point, reduction, weight_floor)
        per_sample = (adv_max / beta) * (r * pos + (1 - r) * neg)
    else:
        pos = _reduce((v_pos - target) ** 2, reduction)
        neg = _reduce((v_neg - target) ** 2, reduction)
        per_sample = r * pos + (1 - r) * neg
    kl = torch.zeros_like(per_sample)
    if kl_coef > 0:
        if v_ref is None:
            raise ValueError("kl_coef > 0 needs v_ref, the reference (adapter-disabled) velocity at x_t")
        kl = velocity_distance(v_theta.to(dtype), v_ref, reduction)
        per_sample = per_sample + kl_coef * kl
    weights = torch.ones_like(per_sample) if mask is None else mask.float()
    loss = (per_sample * weights).sum() / weights.sum().clamp_min(1.0)
    return NFTLoss(loss=loss, positive=pos.detach(), negative=neg.detach(), kl=kl.detach(), r=r)


# ---- update rule ------------------------------------------------------------------------------------


# DiffusionNFT's old-model decay types [ref: train_nft_sd3.py]: (flat, uprate, uphold); 1 is its default, 2 its OCR
# recipe's (= CRD's sampler schedule), 0 makes the old model the current one after every iteration.
DECAY_TYPES = {0: (0, 0.0, 0.0), 1: (0, 0.001, 0.5), 2: (75, 0.0075, 0.999)}
TIMESTEP_SAMPLINGS = ("stratified", "permutation")


def old_model_decay(step: int, flat: int = 0, rate: float = 0.001, cap: float = 0.5) -> float:
    """Decay of the old (sampling) model after optimizer step ``step``: 0 (hard copy) while step < flat, then
    ``min(rate (step - flat), cap)`` (DiffusionNFT's decay schedule; ``DECAY_TYPES`` holds its presets)."""
    if step < flat:
        return 0.0
    return min(rate * (step - flat), cap)


def permuted_timesteps(num_rows: int, num_steps: int, count: int,
                       generator: Optional[torch.Generator]) -> torch.Tensor:
    """[num_rows, count] long: row i holds the first ``count`` entries of its own random permutation of the grid
    positions 0..num_steps-1 (the DiffusionNFT code's per-sample timesteps, every grid step eligible)."""
    if not 1 <= count <= num_steps:
        raise ValueError(f"count must be in [1, {num_steps}], got {count}")
    keys = torch.rand(num_rows, num_steps, generator=generator)
    return keys.argsort(dim=1)[:, :count]


class NFTUpdate(UpdateRule):
    """DiffusionNFT (docs/math.md §4) on a trainer state.

    The old model v_old (a :class:`Snapshot` of the LoRA weights, starting equal to them) rolls out with the
    configured sampler. Update, per minibatch and per inner epoch, timesteps from the rollout grid: either
    ``nft.num_timesteps`` stratified draws shared by the minibatch (``timestep_sampling="stratified"``) or, as the
    reference code does, ``int(N * timestep_fraction)`` columns of a random permutation of the N grid steps drawn
    per sample (``"permutation"``). At each, fresh noise gives ``x_t = (1-t) x0 + t eps`` from the sample's final
    latent x0 and ``nft_loss`` (``nft.loss_form``) compares v_theta, v_old (snapshot swapped in) and, when
    kl_coef > 0, v_ref (adapter disabled), all at guidance 1 (no CFG); gradients accumulate over the draws, one
    optimizer step per minibatch. After the iteration the old model moves: ``old <- d old + (1 - d) theta`` with
    ``d = old_model_decay(s)``.
    Metrics: loss, positive, negative, kl, ``pos_minus_neg_first`` (0 when old == current: the implicit policies
    coincide), grad_norm, old_decay, update_samples.
    """

    name = "nft"
    title = "DiffusionNFT"  # how reports name the method

    def __init__(self, cfg, adapter, params, optimizer, generator):
        super().__init__(cfg, adapter, params, optimizer, generator)
        require_flow(adapter, "nft")
        self.old = Snapshot(self.params)

    def rollout(self, prompts, images=None):
        with self.old.swapped_in():
            return super().rollout(prompts, images)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "old": self.old.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.old.load_state_dict(state["old"])

    def _timestep_draws(self, traj: Trajectory, num_rows: int, part) -> list:
        """(denoiser timestep, t) pairs of one minibatch of ``num_rows`` global rows: scalars shared by the rows
        (stratified) or per-row tensors [b] of this process's rows (permutation, drawn for all rows alike so the
        shared generator stays in step across processes)."""
        c = self.cfg.nft
        if c.timestep_sampling == "stratified":
            return forward_timesteps(traj, c.num_timesteps, c.timestep_fraction, self.generator)
        count = max(1, int(traj.num_steps * c.timestep_fraction))
        cols = permuted_timesteps(num_rows, traj.num_steps, count, self.generator)
        cols = cols if part.pos is None else cols[part.pos.cpu()]
        timesteps, sigmas = traj.timesteps.cpu(), traj.sigmas.cpu()
        dev = traj.timesteps.device
        return [(timesteps[cols[:, j]].to(dev), sigmas[cols[:, j]].to(dev)) for j in range(count)]

    def update(self, traj: Trajectory, adv: torch.Tensor, valid: torch.Tensor, rewards=None, tasks=None) -> dict:
        c, t = self.cfg.nft, self.cfg.train
        r = optimality(adv, c.adv_max, c.adv_mode)
        rows = torch.nonzero(valid).flatten()
        if rows.numel() == 0:
            return {"update_samples": 0}
        stats = {"loss": [], "positive": [], "negative": [], "kl": [], "first": None}
        grad_norm = 0.0
        for _ in range(c.inner_epochs):
            perm = rows[torch.randperm(rows.numel(), generator=self.generator)]
            for mb in perm.split(t.minibatch):
                self.optimizer.zero_grad(set_to_none=True)
                part = self.dist.part(mb, traj.batch_size)  # the rows of mb this process holds (all, in one)
                draws = self._timestep_draws(traj, mb.numel(), part)
                x0, cond = traj.final[part.local], traj.cond.select(part.local)
                for timestep, sigma in draws:
                    fp = self.forward_sample(x0, sigma, part)
                    if fp is None:  # this process holds none of these rows
                        continue
                    with torch.no_grad(), self.old.swapped_in():
                        v_old = self.adapter.predict(fp.x_t, timestep, cond, 1.0)
                    v_ref = None
                    if c.kl_coef > 0:
                        with torch.no_grad(), lora.adapter_disabled(self.adapter):
                            v_ref = self.adapter.predict(fp.x_t, timestep, cond, 1.0)
                    v = self.adapter.predict(fp.x_t, timestep, cond, 1.0)
                    out = nft_loss(v, v_old, fp, r[part.rows], beta=c.beta, v_ref=v_ref, kl_coef=c.kl_coef,
                                   reduction=c.reduction, form=c.loss_form, adv_max=c.adv_max)
                    (out.loss * part.share / len(draws)).backward()
                    if part.placeholder:  # FSDP: a zero-weight row that only keeps the collectives in step
                        continue
                    if stats["first"] is None:
                        stats["first"] = (out.positive - out.negative).abs().mean().item()
                    stats["loss"].append(out.loss.item())
                    stats["positive"].append(out.positive.mean().item())
                    stats["negative"].append(out.negative.mean().item())
                    stats["kl"].append(out.kl.mean().item())
                grad_norm = self.optimizer_step()
        decay = old_model_decay(self.optimizer_steps, c.old_decay_flat, c.old_decay_rate, c.old_decay_max)
        self.old.update(decay)
        if not stats["loss"]:  # distributed: this process held none of the valid rows
            return {"update_samples": int(rows.numel()), "grad_norm": grad_norm, "old_decay": decay,
                    "optimizer_steps": self.optimizer_steps}
        return {"update_samples": int(rows.numel()), "loss": float(np.mean(stats["loss"])),
                "positive": float(np.mean(stats["positive"])), "negative": float(np.mean(stats["negative"])),
                "kl": float(np.mean(stats["kl"])), "pos_minus_neg_first": stats["first"], "grad_norm": grad_norm,
                "old_decay": decay, "optimizer_steps": self.optimizer_steps}
