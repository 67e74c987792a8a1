"""DiffusionNFT: forward-process RL with implicit positive/negative policies (SPEC §4). No I/O.

The old model v_old (an EMA snapshot) samples K images per prompt with any sampler; the group advantage A
becomes an optimality probability ``r = clip(A / A_max, -1, 1) / 2 + 1/2`` in [0, 1]. On the FORWARD process
(the sample's x0, fresh noise eps, ``x_t = (1 - t) x0 + t eps``, target ``u = eps - x0``) the current velocity
v_theta defines two implicit policies

    v+ = (1 - beta) v_old + beta v_theta,        v- = (1 + beta) v_old - beta v_theta,

and the loss is

    L = E[ r |v+ - u|^2 + (1 - r) |v- - u|^2 ] + lambda_KL |v_theta - v_ref|^2.

Closed form [derived]: with ``a = v_old - u`` and ``delta = v_theta - v_old`` the bracket is
``|a|^2 + beta^2 |delta|^2 + 2 beta (2r - 1) <a, delta>``, so for a fixed x_t (lambda_KL = 0) the minimiser is

    v* = v_old + (2 / beta) E[(r - 1/2)(u - v_old)].

Defaults [ref]: no CFG, beta = 1 (0.1 for OCR), lambda_KL = 1e-4, A_max = 5, lr 3e-4.
|.|^2 is averaged over elements by default (``reduction="mean"``), as the reference code does.
``NFTUpdate`` is the update rule the trainer drives (old model = a shadow copy of the LoRA weights).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import numpy as np
import torch

from .. import lora
from ..rollout import Trajectory
from .base import Snapshot, UpdateRule, forward_timesteps, require_flow

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


def optimality(advantages: torch.Tensor, adv_max: float = 5.0) -> torch.Tensor:
    """``r = clip(A / A_max, -1, 1) / 2 + 1/2`` -> [B] in [0, 1] (A = 0 gives 1/2, an uninformative sample)."""
    if adv_max <= 0:
        raise ValueError(f"adv_max must be > 0, got {adv_max}")
    return (advantages.float() / adv_max).clamp(-1.0, 1.0) / 2 + 0.5


@dataclass
class ForwardSample:
    """A point of the forward process: x_t [B, ...], the velocity target u = eps - x0 [B, ...], eps, t [B]."""

    x_t: torch.Tensor
    target: torch.Tensor
    noise: torch.Tensor
    t: torch.Tensor


def forward_process(
    x0: torch.Tensor,
    t: Union[float, torch.Tensor],
    noise: Optional[torch.Tensor] = None,
    generator: Optional[torch.Generator] = None,
) -> ForwardSample:
    """Noise a clean latent: ``x_t = (1 - t) x0 + t eps``, ``u = eps - x0`` (SPEC §0).

    Args:
        x0: clean latents [B, ...] (e.g. the final latent of a rollout), any float dtype; math in float32.
        t: a float or a per-sample tensor [B], each in [0, 1].
        noise: eps [B, ...]; drawn fresh (with ``generator``) when None.
    """
    x0 = x0.float()
    b = x0.shape[0]
    tt = torch.as_tensor(t, dtype=torch.float32, device=x0.device)
    tt = tt.expand(b) if tt.dim() == 0 else tt
    if tt.shape != (b,):
        raise ValueError(f"t must be a float or a tensor of shape [{b}], got shape {tuple(tt.shape)}")
    if ((tt < 0) | (tt > 1)).any():
        raise ValueError("t must lie in [0, 1] (1 = pure noise)")
    if noise is None:
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=torch.float32)
    elif noise.shape != x0.shape:
        raise ValueError(f"noise has shape {tuple(noise.shape)} but x0 has {tuple(x0.shape)}")
    noise = noise.float()
    tb = tt.reshape(b, *([1] * (x0.dim() - 1)))
    return ForwardSample(x_t=(1 - tb) * x0 + tb * noise, target=noise - x0, noise=noise, t=tt)


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
    target: torch.Tensor,
    r: torch.Tensor,
    beta: float = 1.0,
    v_ref: Optional[torch.Tensor] = None,
    kl_coef: float = 1e-4,
    reduction: str = "mean",
    mask: Optional[torch.Tensor] = None,
) -> NFTLoss:
    """``mean_i [ r_i |v+ - u|^2 + (1 - r_i) |v- - u|^2 + lambda_KL |v_theta - v_ref|^2 ]``.

    Args:
        v_theta: current velocity at x_t [B, ...] (with grad), no CFG.
        v_old: the old (sampling) snapshot's velocity at the same x_t [B, ...] (no grad).
        target: u = eps - x0 [B, ...] (see ``forward_process``).
        r: optimality [B] in [0, 1] (``optimality(A)``).
        beta: implicit-policy step (> 0); 1 by default, 0.1 for OCR.
        v_ref: reference velocity (adapter disabled) [B, ...]; needed when kl_coef > 0.
        kl_coef: lambda_KL (1e-4); 0 drops the term.
        reduction: "mean" (reference) or "sum" of the squared errors over elements.
        mask: [B] bool, samples to include.
    """
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    _check_same_shape(v_theta=v_theta, v_old=v_old, target=target, v_ref=v_ref)
    r = r.float()
    if r.shape != (v_theta.shape[0],):
        raise ValueError(f"r must have shape [{v_theta.shape[0]}], got {tuple(r.shape)}")
    if ((r < 0) | (r > 1)).any():
        raise ValueError("r must lie in [0, 1]; build it with optimality(advantages)")
    target = target.float().detach()
    v_pos, v_neg = implicit_policies(v_theta.float(), v_old.float(), beta)
    pos = _reduce((v_pos - target) ** 2, reduction)
    neg = _reduce((v_neg - target) ** 2, reduction)
    per_sample = r * pos + (1 - r) * neg
    kl = torch.zeros_like(per_sample)
    if kl_coef > 0:
        if v_ref is None:
            raise ValueError("kl_coef > 0 needs v_ref, the reference (adapter-disabled) velocity at x_t")
        kl = _reduce((v_theta.float() - v_ref.float().detach()) ** 2, reduction)
        per_sample = per_sample + kl_coef * kl
    weights = torch.ones_like(per_sample) if mask is None else mask.float()
    loss = (per_sample * weights).sum() / weights.sum().clamp_min(1.0)
    return NFTLoss(loss=loss, positive=pos.detach(), negative=neg.detach(), kl=kl.detach(), r=r)


# ---- update rule ------------------------------------------------------------------------------------


def old_model_decay(step: int, flat: int = 0, rate: float = 0.001, cap: float = 0.5) -> float:
    """Decay of the old (sampling) model after optimizer step ``step``: 0 (hard copy) while step < flat, then
    ``min(rate (step - flat), cap)``. [uncertain] defaults = the DiffusionNFT code's decay type 1 as recalled;
    (75, 0.0075, 0.999) is its type 2 (= CRD's sampler schedule)."""
    if step < flat:
        return 0.0
    return min(rate * (step - flat), cap)


class NFTUpdate(UpdateRule):
    """DiffusionNFT (SPEC §4) on a trainer state.

    The old model v_old (a :class:`Snapshot` of the LoRA weights, starting equal to them) rolls out with the
    configured sampler. Update, per minibatch and per inner epoch: ``nft.num_timesteps`` stratified draws t from
    the rollout grid; at each, fresh noise gives ``x_t = (1-t) x0 + t eps`` from the sample's final latent x0 and
    ``nft_loss`` compares v_theta, v_old (snapshot swapped in) and, when kl_coef > 0, v_ref (adapter disabled),
    all at guidance 1 (no CFG); gradients accumulate over the draws, one optimizer step per minibatch. After the
    iteration the old model moves: ``old <- d old + (1 - d) theta`` with ``d = old_model_decay(s)``.
    Metrics: loss, positive, negative, kl, ``pos_minus_neg_first`` (0 when old == current: the implicit policies
    coincide), grad_norm, old_decay, update_samples.
    """

    name = "nft"

    def __init__(self, cfg, adapter, params, optimizer, generator):
        super().__init__(cfg, adapter, params, optimizer, generator)
        require_flow(adapter, "nft")
        self.old = Snapshot(self.params)

    def rollout(self, prompts):
        with self.old.swapped_in():
            return super().rollout(prompts)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "old": self.old.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.old.load_state_dict(state["old"])

    def update(self, traj: Trajectory, adv: torch.Tensor, valid: torch.Tensor, rewards=None, tasks=None) -> dict:
        c, t = self.cfg.nft, self.cfg.train
        r = optimality(adv, c.adv_max)
        rows = torch.nonzero(valid).flatten()
        if rows.numel() == 0:
            return {"update_samples": 0}
        stats = {"loss": [], "positive": [], "negative": [], "kl": [], "first": None}
        grad_norm = 0.0
        for _ in range(c.inner_epochs):
            perm = rows[torch.randperm(rows.numel(), generator=self.generator)]
            for mb in perm.split(t.minibatch):
                self.optimizer.zero_grad(set_to_none=True)
                draws = forward_timesteps(traj, c.num_timesteps, c.timestep_fraction, self.generator)
                part = self.dist.part(mb, traj.batch_size)  # the rows of mb this process holds (all, in one)
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
                    out = nft_loss(v, v_old, fp.target, r[part.rows], beta=c.beta, v_ref=v_ref, kl_coef=c.kl_coef,
                                   reduction=c.reduction)
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
