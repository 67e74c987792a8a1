"""What every update rule shares: the :class:`UpdateRule` interface the trainer drives and the configured
rollout. Weight snapshots live in flowalign.runtime.snapshot, timestep draws in flowalign.algorithms.timesteps.
No I/O.

An update rule owns one algorithm's side of an iteration: which weights roll out (``rollout``) and how a
scored batch becomes optimizer steps (``update``), including any snapshot updates after them. The trainer
owns everything else (prompts, rewards, advantages, EMA, metrics, checkpoints).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from ..runtime import fsdp
from ..runtime.distributed import SINGLE, Distributed
from ..rollout import DETERMINISTIC_SAMPLERS, Trajectory, rollout
from ..samplers._checks import randn_like
from ..samplers.flow import forward_process


def sde_window(cfg, generator) -> Optional[tuple[int, int]]:
    """The rollout's (start, length) SDE window: ``sampling.sde_window``, or with ``sampling.sde_window_size`` a
    window placed uniformly at random in ``sampling.sde_window_range`` (start in lo..hi - size, Flow-GRPO-Fast)
    drawn from ``generator`` (the trainer's, shared by every process, so all shards use one window)."""
    s = cfg.sampling
    if s.sde_window_size is None:
        return s.sde_window
    lo, hi = s.sde_window_range or (0, s.num_steps)
    start = lo + int(torch.randint(hi - s.sde_window_size - lo + 1, (1,), generator=generator))
    return start, s.sde_window_size


def configured_rollout(adapter, prompts: Sequence[str], cfg, generator, record_means: bool = False,
                       record_reference_kl: bool = False, images=None) -> Trajectory:
    """``rollout`` with the ``sampling`` section of the config (steps, CFG, sampler, noise, SDE window, grid, size).

    With a stochastic sampler each group of ``train.group_size`` consecutive rows shares its initial noise (the
    SDE makes the samples differ, as in Flow-GRPO); with a deterministic sampler (``flow_ode``, ``flow_dpm2``)
    every row draws its own noise, else a group would hold identical samples and zero advantages.
    generator: a torch.Generator or a distributed ``RowShard`` of one (its shared generator draws the window).
    images: one condition image per row for image-conditioned families (None for text-to-image)."""
    s = cfg.sampling
    group_size = 1 if s.sampler in DETERMINISTIC_SAMPLERS else cfg.train.group_size
    window = sde_window(cfg, getattr(generator, "generator", generator))
    return rollout(adapter, prompts, num_steps=s.num_steps, guidance_scale=s.guidance_scale,
                   sampler=s.sampler, noise_level=s.noise_level, sde_window=window,
                   group_size=group_size, generator=generator, record_means=record_means,
                   height=s.resolution, width=s.resolution, num_frames=s.num_frames,
                   log_prob_convention=s.log_prob_convention, grid=s.grid, grid_shift=s.grid_shift,
                   integer_timesteps=s.integer_timesteps, record_reference_kl=record_reference_kl, images=images)


def require_flow(adapter, algorithm: str) -> None:
    if not getattr(adapter, "is_flow", False):
        raise ValueError(f"{algorithm} trains on the rectified-flow forward process: it needs a flow-matching "
                         f"pipeline (sd3, flux, wan), not {getattr(adapter, 'family', '?')}")


class UpdateRule:
    """One algorithm's rollout policy and update step on a shared trainer state.

    Args:
        cfg: the full Config (each rule reads its own section).
        adapter: the pipeline adapter with the trainable LoRA adapter active.
        params: the trainable LoRA parameters; optimizer: their optimizer.
        generator: the trainer's torch.Generator (rollout noise, shuffles, forward-process noise).

    Subclasses implement ``update``; ``rollout`` defaults to the live policy with the sampling section.
    ``optimizer_steps`` counts the optimizer steps taken so far; ``nan_steps`` the steps skipped for a non-finite
    gradient norm or loss, ``nan_streak`` the current run of them. Subclasses with state of their own (snapshots)
    extend ``state_dict`` / ``load_state_dict`` (checkpoints, flowalign.runtime.checkpoint).

    Distributed (``dist``, set by the trainer; see flowalign.runtime.distributed): ``rollout`` gets this process's shard
    of the prompts, ``update`` its trajectory with the GLOBAL adv / valid / rewards / tasks; rules index the
    trajectory with ``dist.part(rows, traj.batch_size).local`` and weight their loss by its ``share``. Under
    FSDP (``dist.fsdp``) a process holding none of the rows gets a placeholder part (one row, share 0): rules run
    its forwards and backward like any other (they are collectives) and leave it out of their metrics.
    """

    name = "base"
    title = "update rule"  # how reports name the method (each rule sets its own)
    uses_rewards = True
    has_ratio = False  # a likelihood ratio of re-scored rollout steps in the loss (the on-policy gap moves it)
    dist: Distributed = SINGLE

    def __init__(self, cfg, adapter, params, optimizer, generator: torch.Generator):
        self.cfg, self.adapter, self.params, self.optimizer, self.generator = cfg, adapter, list(params), optimizer, generator
        self.optimizer_steps = 0
        self.nan_steps = 0
        self.nan_streak = 0

    @classmethod
    def prepare_model(cls, cfg, adapter) -> None:
        """Put what the rule needs onto the model (e.g. OPD's teacher adapters) before the trainer shards it:
        FSDP shards only the parameters present then. The default adds nothing."""

    @classmethod
    def task_specs(cls, cfg) -> dict:
        """The run's tasks: {task: (reward name or None, reward options, prompt spec)}; every row of a task is
        scored by its reward. The default is one task (None) with ``train.reward`` on ``train.prompts``."""
        t = cfg.train
        return {None: (t.reward, t.reward_options, t.prompts)}

    def use_reward(self, reward) -> None:
        """The trainer hands over the (first) task's reward object; rules that differentiate it keep it."""

    def rollout(self, prompts: Sequence[str], images=None) -> Trajectory:
        """The batch's trajectories (images: one condition image per row, image-conditioned families only)."""
        return configured_rollout(self.adapter, prompts, self.cfg, self.dist.noise(self.generator, len(prompts)),
                                  images=images)

    def update(self, traj: Trajectory, adv: torch.Tensor, valid: torch.Tensor, rewards: torch.Tensor,
               tasks: Sequence[Optional[str]]) -> dict:
        """Optimizer step(s) on one scored batch -> metrics. adv, valid, rewards: [B]; tasks: one per row."""
        raise NotImplementedError

    def forward_sample(self, x0: torch.Tensor, sigma, part):
        """The forward-process point ``x_t = (1 - t) x0 + t eps`` (t = sigma, a float or one per row [b]) of this
        process's rows of ``part`` (x0: those rows [b, ...]) -> a samplers.flow.ForwardSample, or None when the process holds
        none of them. The noise is drawn either way, so the shared generator stays in step across processes
        (flowalign.runtime.distributed)."""
        noise = randn_like(x0, self.dist.noise(self.generator, part))
        return forward_process(x0, sigma, noise=noise) if part.size else None

    def optimizer_step(self, loss: Optional[float] = None) -> float:
        """Sum the gradient over processes, clip it to train.grad_clip, step, count; returns the gradient norm.
        A non-finite gradient norm (or ``loss``) skips the step: gradients zeroed, no optimizer step, counted in
        nan_steps / nan_streak (the trainer stops after train.max_nan_steps in a row). The norm is of the summed
        gradient, so every process skips together."""
        self.dist.all_reduce_grads(self.params)  # distributed: every process now holds the global gradient
        # FSDP: the gradients are shards; clip_grad_norm_ takes the norm over all of them (a DTensor: gathered)
        grad_norm = float(fsdp.full(torch.nn.utils.clip_grad_norm_(self.params, self.cfg.train.grad_clip)))
        if not math.isfinite(grad_norm) or (loss is not None and not math.isfinite(loss)):
            self.optimizer.zero_grad(set_to_none=True)
            self.nan_steps += 1
            self.nan_streak += 1
            return grad_norm
        self.optimizer.step()
        self.optimizer_steps += 1
        self.nan_streak = 0
        return grad_norm

    def state_dict(self) -> dict:
        """Counters (and, in subclasses, snapshots) to checkpoint; tensors may appear anywhere in the dict."""
        return {"optimizer_steps": self.optimizer_steps, "nan_steps": self.nan_steps, "nan_streak": self.nan_streak}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer_steps, self.nan_steps, self.nan_streak = (int(state[k]) for k in
                                                                  ("optimizer_steps", "nan_steps", "nan_streak"))

    def progress(self, metrics: dict) -> dict:
        """Short values for the progress bar."""
        out = {}
        if metrics.get("reward_mean") is not None:
            out["reward"] = f"{metrics['reward_mean']:.3f}"
        if metrics.get("loss") is not None:
            out["loss"] = f"{metrics['loss']:.4g}"
        return out
