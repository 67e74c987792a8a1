"""Orchestration only: rollouts -> rewards -> advantages -> updates -> metrics and LoRA on disk.

The math lives in ``flowalign.algorithms`` and ``flowalign.samplers``; this file wires a pipeline
adapter, a reward and a prompt source into the loop, and writes ``metrics.jsonl`` per iteration.
"""

from __future__ import annotations

import json
import os
import time
from contextlib import nullcontext
from typing import Callable, Optional

import numpy as np
import torch
from tqdm import tqdm

from . import lora
from .algorithms.advantages import group_advantages, group_ids_from_prompts
from .algorithms.grpo import grpo_step_loss
from .config import Config
from .ema import EMA
from .models import load_adapter
from .prompts import PromptSource
from .rewards import get as get_reward
from .rewards.guard import safe_scores
from .rollout import rescore, rollout

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class GRPOTrainer:
    """Flow-GRPO on any supported pipeline (SPEC §2).

    One iteration: ``prompts_per_iter`` prompts x ``group_size`` samples are rolled out with the SDE
    sampler and scored; group advantages are computed; every stochastic step of every sample is re-scored
    by the current policy and the clipped loss (+ beta KL to the adapter-disabled model) is minimised.
    """

    def __init__(self, cfg: Config, adapter=None, reward=None):
        self.cfg = cfg
        torch.manual_seed(cfg.train.seed)
        self.adapter = adapter if adapter is not None else load_adapter(cfg.model.path, family=cfg.model.family)
        if cfg.model.dtype != "float32":
            lora.set_precision(self.adapter, _DTYPES[cfg.model.dtype])
        self.params = lora.add_lora(self.adapter, rank=cfg.model.lora_rank, alpha=cfg.model.lora_alpha,
                                    dropout=cfg.model.lora_dropout)
        if cfg.model.gradient_checkpointing:
            lora.set_gradient_checkpointing(self.adapter, True)
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
        self.ema = EMA(self.params, cfg.train.ema_decay) if cfg.train.ema_decay > 0 else None
        self.reward = reward if reward is not None else get_reward(cfg.train.reward)
        self.prompts = PromptSource(cfg.train.prompts)
        self.rng = np.random.default_rng(cfg.train.seed)
        self.generator = torch.Generator().manual_seed(cfg.train.seed)
        self.iteration = 0
        self.samples_seen = 0
        self.bad_rewards = 0
        os.makedirs(cfg.train.out_dir, exist_ok=True)
        self.metrics_path = os.path.join(cfg.train.out_dir, "metrics.jsonl")

    # --- one iteration -----------------------------------------------------------------------------
    def _score(self, images: torch.Tensor, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Rewards [B] and a validity mask [B]: NaN/inf scores, and images the reward raised on, are left
        out of the advantages (with a warning; counted in ``bad_rewards``)."""
        scores, valid, n_bad = safe_scores(self.reward, images, prompts)
        self.bad_rewards += n_bad
        return scores, valid

    def _rollout(self):
        c, s = self.cfg, self.cfg.sampling
        prompts = [p for p in self.prompts.sample(c.train.prompts_per_iter, self.rng) for _ in range(c.train.group_size)]
        return rollout(self.adapter, prompts, num_steps=s.num_steps, guidance_scale=s.guidance_scale,
                       sampler=s.sampler, noise_level=s.noise_level, sde_window=s.sde_window,
                       group_size=c.train.group_size, generator=self.generator, record_means=c.grpo.guard)

    def _update(self, traj, adv: torch.Tensor, valid: torch.Tensor) -> dict:
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
                for k in steps:
                    new = rescore(self.adapter, traj, k, index=mb)
                    ref = None
                    if g.beta > 0:
                        with torch.no_grad(), lora.adapter_disabled(self.adapter):
                            ref = rescore(self.adapter, traj, k, index=mb)
                    out = grpo_step_loss(new, traj.log_probs[mb, k], adv[mb], g.clip_range, beta=g.beta, ref_step=ref,
                                         kl_scaling=g.kl_scaling, guard=g.guard,
                                         mean_old=None if traj.means is None else traj.means[mb, k])
                    (out.loss / len(steps)).backward()
                    if stats["logp_diff"] is None:  # on-policy check: before any update of this batch
                        stats["logp_diff"] = (new.log_prob().detach() - traj.log_probs[mb, k]).abs().mean().item()
                    stats["ratio"].append(out.ratio)
                    stats["clip_frac"].append(out.clip_frac.item())
                    stats["kl"].append(out.kl.mean().item())
                    stats["loss"].append(out.loss.item())
                grad_norm = torch.nn.utils.clip_grad_norm_(self.params, t.grad_clip)
                self.optimizer.step()
        ratio = torch.cat(stats["ratio"])
        return {"update_samples": int(rows.numel()), "loss": float(np.mean(stats["loss"])),
                "logp_diff": stats["logp_diff"], "ratio_mean": ratio.mean().item(), "ratio_max": ratio.max().item(),
                "ratio_min": ratio.min().item(), "clip_frac": float(np.mean(stats["clip_frac"])),
                "kl": float(np.mean(stats["kl"])), "grad_norm": float(grad_norm)}

    def step(self) -> dict:
        """One rollout -> reward -> update iteration; returns its metrics (also appended to metrics.jsonl)."""
        t0 = time.perf_counter()
        traj = self._rollout()
        t1 = time.perf_counter()
        with torch.no_grad():
            images = self.adapter.decode(traj.final)
        rewards, valid = self._score(images, traj.prompts)
        adv = group_advantages(rewards, group_ids_from_prompts(traj.prompts), std_mode=self.cfg.grpo.adv_std,
                               clip=self.cfg.grpo.adv_clip, valid=valid)
        t2 = time.perf_counter()
        metrics = self._update(traj, adv, valid)
        if self.ema is not None:
            self.ema.update()
        t3 = time.perf_counter()
        self.iteration += 1
        self.samples_seen += len(traj.prompts)
        metrics.update(iteration=self.iteration, samples=self.samples_seen, reward_mean=rewards[valid].mean().item(),
                       reward_std=rewards[valid].std().item(), invalid_rewards=int((~valid).sum()),
                       time_rollout=t1 - t0, time_reward=t2 - t1, time_update=t3 - t2)
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(metrics) + "\n")
        return metrics

    def train(self, iterations: Optional[int] = None, callback: Optional[Callable[[dict], None]] = None) -> list[dict]:
        history = []
        n = iterations if iterations is not None else self.cfg.train.iterations
        bar = tqdm(range(n), desc="grpo")
        for _ in bar:
            m = self.step()
            history.append(m)
            bar.set_postfix(reward=f"{m['reward_mean']:.3f}", ratio=f"{m.get('ratio_mean', 1):.4f}")
            if callback is not None:
                callback(m)
        return history

    def evaluation_weights(self):
        """Context for evaluation: the EMA weights when EMA is on, else the live ones."""
        return self.ema.swapped_in() if self.ema is not None else nullcontext()

    def save_lora(self, out_dir: Optional[str] = None) -> str:
        out_dir = out_dir or os.path.join(self.cfg.train.out_dir, "lora")
        with self.evaluation_weights():
            return lora.save_lora(self.adapter, out_dir)
