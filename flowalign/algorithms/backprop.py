"""Reward backpropagation through the last K sampling steps (IPRO / DRaFT-K, docs/math.md §8). No I/O.

An ODE rollout from noise: the first N - K steps run without grad, the last K with grad through the network and
the Euler updates ``x' = x - Delta v``, so a differentiable reward of the final latent (decoded image) sends its
gradient into the LoRA parameters through those K steps only. With the reference velocity (adapter disabled,
no grad) at the same states:

    KL_v = sum_{k in last K} mean_d |v_theta(x_k) - v_ref(x_k)|^2,      L = -lambda1 R + lambda2 KL_v

IPRO defaults [ref]: K = 4, lambda1 = 0.1, lambda2 = 1. The reference is a stop-gradient target (its dependence on
x_k through the window is not differentiated). ``BackpropUpdate`` is the update rule the trainer drives
(``train.algorithm: backprop``); the reward must be differentiable in torch (``Reward.score_differentiable``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch

from .. import lora
from ..models.base import Conditioning, PipelineAdapter
from ..rollout import Trajectory
from ..rollout import rollout as run_rollout
from ..samplers import flow_ode_step
from .base import UpdateRule, require_flow
from .distances import velocity_distance


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
    start_step: int = 0,
) -> BackpropRollout:
    """ODE rollout from ``latents`` (initial noise [B, ...]) with gradient through the last ``grad_steps`` steps.

    Args:
        prompts: the B prompts, or their Conditioning (encoded with CFG when guidance_scale needs it).
        num_steps: N, on the pipeline's own sigma grid (flow families only).
        grad_steps: K in [0, N]; K = 0 gives a final latent without grad.
        guidance_scale: CFG of the policy; ref_guidance_scale: of the reference (default the same).
        compute_kl: also evaluate the reference (adapter disabled) at each of the K states.
        start_step: ``latents`` is x_{start_step}, a state of an earlier rollout on the same grid (e.g. a recorded
            x_{N-K}); the loop runs steps start_step..N-1 only. Needs K <= N - start_step.
    """
    if not adapter.is_flow:
        raise ValueError(f"backprop_rollout uses the flow ODE; the {adapter.family} pipeline is not a flow model")
    if not 0 <= grad_steps <= num_steps:
        raise ValueError(f"grad_steps must be in [0, num_steps={num_steps}], got {grad_steps}")
    if not 0 <= start_step <= num_steps - grad_steps:
        raise ValueError(f"start_step={start_step} must be in [0, num_steps - grad_steps = {num_steps - grad_steps}]")
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
    for k in range(start_step, num_steps):
        if k == start:
            window_start = x.detach()
        s, s_next = grid.sigmas[k].expand(b), grid.sigmas[k + 1].expand(b)
        with torch.set_grad_enabled(k >= start and torch.is_grad_enabled()):
            v = adapter.predict(x, grid.timesteps[k], cond, guidance_scale)
            if k >= start and compute_kl:
                with torch.no_grad(), lora.adapter_disabled(adapter):
                    v_ref = adapter.predict(x.detach(), grid.timesteps[k], cond, g_ref)
                kl = kl + velocity_distance(v, v_ref)
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


# ---- update rule ------------------------------------------------------------------------------------


class BackpropUpdate(UpdateRule):
    """Reward backprop (docs/math.md §8) on a trainer state: ``train.algorithm: backprop``, section ``backprop``.

    Rollout: a deterministic flow-ODE rollout of the live policy (no grad, every row its own initial noise) at
    ``sampling.num_steps`` / ``sampling.guidance_scale``, recorded as a Trajectory; the trainer scores it, so its
    ``reward_mean`` is the reward of exactly the samples trained on. Update, per minibatch of ``train.minibatch``
    rows: the last K = ``backprop.grad_steps`` steps are re-run WITH grad from the recorded x_{N-K} (same weights,
    so the same final latent), decoded with grad (``adapter.decode``) and scored with
    ``reward.score_differentiable``; ``L = mean_i (-lambda_reward R_i + lambda_kl KL_v,i)`` (``reward_backprop_loss``)
    is backpropagated with each minibatch weighted by its share of the batch; ONE optimizer step per iteration.
    Cost per row: N + K policy calls (+ K reference calls when lambda_kl > 0), one decode with grad, one reward
    call with grad; memory holds K steps of activations per minibatch (``model.gradient_checkpointing`` helps).

    No group advantages: the trainer's scalar rewards and advantages are only logged (``uses_rewards = False``);
    the reward object itself is set by the trainer (``rule.reward = reward``) and must be differentiable.
    Rows whose differentiable reward is not finite are left out of the loss. Metrics: loss, reward (mean
    differentiable reward before the step), velocity_kl, grad_norm, update_samples.
    """

    name = "backprop"
    title = "Reward backprop"  # how reports name the method
    uses_rewards = False

    def __init__(self, cfg, adapter, params, optimizer, generator, reward=None):
        super().__init__(cfg, adapter, params, optimizer, generator)
        require_flow(adapter, "backprop")
        self._reward = None
        if reward is not None:
            self.reward = reward

    def use_reward(self, reward) -> None:
        self.reward = reward  # differentiated, not only scored (the setter checks it is differentiable)

    @property
    def reward(self):
        if self._reward is None:
            raise ValueError("backprop needs a differentiable reward: set rule.reward = REWARD (the Trainer does)")
        return self._reward

    @reward.setter
    def reward(self, reward) -> None:
        if reward is None or not getattr(reward, "differentiable", False):
            from ..rewards import differentiable_rewards

            name = getattr(reward, "name", reward)
            raise ValueError(f"train.algorithm=backprop needs a reward differentiable in torch, got {name!r}: use one "
                             f"of {', '.join(differentiable_rewards())}, or grpo/nft/crd for this reward")
        self._reward = reward

    def _ref_guidance(self) -> float:
        g = self.cfg.backprop.ref_guidance_scale
        return self.cfg.sampling.guidance_scale if g is None else g

    def rollout(self, prompts: Sequence[str], images=None) -> Trajectory:
        s = self.cfg.sampling
        cond = self.adapter.encode_prompts(list(prompts), max(s.guidance_scale, self._ref_guidance()), images=images,
                                           height=s.resolution, width=s.resolution, num_frames=s.num_frames)
        return run_rollout(self.adapter, list(prompts), num_steps=s.num_steps, guidance_scale=s.guidance_scale,
                           sampler="flow_ode", generator=self.generator, height=s.resolution, width=s.resolution,
                           num_frames=s.num_frames, cond=cond)

    def update(self, traj: Trajectory, adv=None, valid=None, rewards=None, tasks=None) -> dict:
        c, t = self.cfg.backprop, self.cfg.train
        reward = self.reward
        n, k = traj.batch_size, min(c.grad_steps, traj.num_steps)
        start = traj.num_steps - k
        self.optimizer.zero_grad(set_to_none=True)
        losses, rewards_d, kls, used = [], [], [], 0
        for mb in torch.arange(n).split(t.minibatch):
            out = backprop_rollout(self.adapter, traj.cond.select(mb), traj.latents[mb, start],
                                   num_steps=traj.num_steps, grad_steps=k, guidance_scale=traj.guidance_scale,
                                   ref_guidance_scale=self._ref_guidance(), compute_kl=c.lambda_kl > 0,
                                   start_step=start)
            meta = traj.cond.metadata()
            r = reward.score_differentiable(self.adapter.decode(out.final), [traj.prompts[i] for i in mb],
                                            None if meta is None else [meta[i] for i in mb])
            r = r.to(out.velocity_kl.device)
            ok = torch.isfinite(r.detach())
            if not ok.any():
                continue
            loss = reward_backprop_loss(r[ok], out.velocity_kl[ok], c.lambda_reward, c.lambda_kl)
            if loss.requires_grad:  # K = 0: nothing to differentiate
                (loss * int(ok.sum()) / n).backward()
            used += int(ok.sum())
            losses.append(float(loss.detach()) * int(ok.sum()))
            rewards_d.append(r.detach()[ok])
            kls.append(out.velocity_kl.detach()[ok])
        if used == 0:
            return {"update_samples": 0}
        grad_norm = self.optimizer_step()
        return {"update_samples": used, "loss": sum(losses) / used, "reward": float(torch.cat(rewards_d).mean()),
                "velocity_kl": float(torch.cat(kls).mean()), "grad_norm": grad_norm, "grad_steps": k,
                "optimizer_steps": self.optimizer_steps}
