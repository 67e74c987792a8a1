"""Reward backpropagation through the last K sampling steps (IPRO / DRaFT-K, SPEC §8). No I/O.

An ODE rollout from noise: the first N - K steps run without grad, the last K with grad through the network and
the Euler updates ``x' = x - Delta v``, so a differentiable reward of the final latent (decoded image) sends its
gradient into the LoRA parameters through those K steps only. With the reference velocity (adapter disabled,
no grad) at the same states:

    KL_v = sum_{k in last K} mean_d |v_theta(x_k) - v_ref(x_k)|^2,      L = -lambda1 R + lambda2 KL_v

IPRO defaults [ref]: K = 4, lambda1 = 0.1, lambda2 = 1. The reference is a stop-gradient target (its dependence on
x_k through the window is not differentiated).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch

from .. import lora
from ..models.base import Conditioning, PipelineAdapter
from ..samplers import flow_ode_step


@dataclass
class BackpropRollout:
    """final: x_N [B, ...] (with grad when K > 0); velocity_kl: [B] KL_v over the last K steps (with grad);
    window_start: x_{N-K} [B, ...] (detached), where the gradient window begins; sigmas: [N + 1] the grid."""

    final: torch.Tensor
    velocity_kl: torch.Tensor
    window_start: torch.Tensor
    sigmas: torch.Tensor


def backprop_rollout(
    adapter: PipelineAdapter,
    prompts: Union[Sequence[str], Conditioning],
    latents: torch.Tensor,
    num_steps: int = 10,
    grad_steps: int = 4,
    guidance_scale: float = 4.5,
    ref_guidance_scale: Optional[float] = None,
    compute_kl: bool = True,
) -> BackpropRollout:
    """ODE rollout from ``latents`` (initial noise [B, ...]) with gradient through the last ``grad_steps`` steps.

    Args:
        prompts: the B prompts, or their Conditioning (encoded with CFG when guidance_scale needs it).
        num_steps: N, on the pipeline's own sigma grid (flow families only).
        grad_steps: K in [0, N]; K = 0 gives a final latent without grad.
        guidance_scale: CFG of the policy; ref_guidance_scale: of the reference (default the same).
        compute_kl: also evaluate the reference (adapter disabled) at each of the K states.
    """
    if not adapter.is_flow:
        raise ValueError(f"backprop_rollout uses the flow ODE; the {adapter.family} pipeline is not a flow model")
    if not 0 <= grad_steps <= num_steps:
        raise ValueError(f"grad_steps must be in [0, num_steps={num_steps}], got {grad_steps}")
    g_ref = guidance_scale if ref_guidance_scale is None else ref_guidance_scale
    if isinstance(prompts, Conditioning):
        cond = prompts
    else:
        cond = adapter.encode_prompts(list(prompts), max(guidance_scale, g_ref))
    if len(cond) != latents.shape[0]:
        raise ValueError(f"{len(cond)} prompts for {latents.shape[0]} initial latents")
    x = latents.float()
    grid = adapter.sampling_grid(num_steps, x)
    b = x.shape[0]
    kl = torch.zeros(b, device=x.device)
    start = num_steps - grad_steps
    window_start = x
    for k in range(num_steps):
        if k == start:
            window_start = x.detach()
        s, s_next = grid.sigmas[k].expand(b), grid.sigmas[k + 1].expand(b)
        with torch.set_grad_enabled(k >= start and torch.is_grad_enabled()):
            v = adapter.predict(x, grid.timesteps[k], cond, guidance_scale)
            if k >= start and compute_kl:
                with torch.no_grad(), lora.adapter_disabled(adapter):
                    v_ref = adapter.predict(x.detach(), grid.timesteps[k], cond, g_ref)
                kl = kl + ((v - v_ref) ** 2).flatten(1).mean(1)
            x = flow_ode_step(v, x, s, s_next).prev_sample
    if start == num_steps:
        window_start = x.detach()
    return BackpropRollout(final=x, velocity_kl=kl, window_start=window_start, sigmas=grid.sigmas)


def reward_backprop_loss(reward: torch.Tensor, velocity_kl: torch.Tensor, lambda_reward: float = 0.1,
                         lambda_kl: float = 1.0) -> torch.Tensor:
    """``mean_i (-lambda1 R_i + lambda2 KL_v,i)`` -> scalar; reward [B] differentiable, velocity_kl [B]."""
    if reward.shape != velocity_kl.shape:
        raise ValueError(f"reward {tuple(reward.shape)} and velocity_kl {tuple(velocity_kl.shape)} must both be [B]")
    return (-lambda_reward * reward.float() + lambda_kl * velocity_kl).mean()
