"""Orchestration only: rollouts -> rewards -> advantages -> updates -> metrics and LoRA on disk.

The math lives in ``flowalign.algorithms`` (each algorithm's loss and its update rule) and
``flowalign.samplers``; this file wires a pipeline adapter, rewards and prompt sources into the loop, dispatches
the update on ``cfg.train.algorithm`` (the explicit table ``ALGORITHMS``), and logs metrics per iteration
(``flowalign.logging_utils``). Checkpoints, resume and the NaN stop live in ``flowalign.checkpoint``.
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

from . import checkpoint, distributed, fsdp, lora
from .algorithms.advantages import advantages_for
from .algorithms.backprop import BackpropUpdate
from .algorithms.crd import CRDUpdate
from .algorithms.grpo import GRPOUpdate
from .algorithms.nft import NFTUpdate
from .algorithms.opd import OPDUpdate
from .config import Config, config_to_dict
from .ema import EMA
from .heldout import HeldoutEval
from .kernels import avoid_cudnn_attention
from .logging_utils import EVALS_JSONL, MetricsLog
from .models import DTYPES, load_adapter
from .prompts import PromptSource, toy_tasks
from .rewards import get as get_reward
from .report import image_grid
from .rewards.guard import safe_scores


# cfg.train.algorithm -> its update rule (flowalign.algorithms.*)
ALGORITHMS = {"grpo": GRPOUpdate, "nft": NFTUpdate, "crd": CRDUpdate, "opd": OPDUpdate, "backprop": BackpropUpdate}


class Trainer:
    """Any algorithm of ``ALGORITHMS`` on any supported pipeline.

    One iteration: ``prompts_per_iter`` prompts (per task, for OPD) x ``group_size`` samples are rolled out by the
    algorithm's rollout policy and scored; group advantages are computed; the algorithm's update rule takes its
    optimizer step(s). ``reward``: a Reward for every row (default: ``train.reward``; for OPD each task's
    optional ``reward``), or a dict task -> Reward.
    """

    def __init__(self, cfg: Config, adapter=None, reward=None):
        self.cfg = cfg
        self.dist = distributed.setup(cfg.train.shard)  # one process, or its place under accelerate launch / torchrun
        torch.manual_seed(cfg.train.seed)
        if adapter is None:
            device = cfg.model.device or self.dist.device
            adapter = load_adapter(cfg.model.path, family=cfg.model.family, device=device,
                                   torch_dtype=lora.load_dtypes(DTYPES[cfg.model.dtype]),
                                   trust_remote_code=cfg.model.trust_remote_code)
        self.adapter = adapter
        avoid_cudnn_attention(self.adapter.device)  # its backward failed on FLUX shapes (flowalign.kernels)
        if cfg.model.dtype != "float32":
            lora.set_precision(self.adapter, DTYPES[cfg.model.dtype])
        self.params = lora.add_lora(self.adapter, rank=cfg.model.lora_rank, alpha=cfg.model.lora_alpha,
                                    dropout=cfg.model.lora_dropout, target_modules=cfg.model.lora_target_modules)
        ALGORITHMS[cfg.train.algorithm].prepare_model(cfg, self.adapter)  # e.g. OPD's teachers, before sharding
        self.dist.broadcast_(self.params)  # distributed: every process starts from rank 0's LoRA
        if cfg.model.gradient_checkpointing:
            lora.set_gradient_checkpointing(self.adapter, True)
        if self.dist.fsdp:  # train.shard=fsdp: base and LoRA weights sharded per block (flowalign.fsdp)
            fsdp.shard_denoiser(self.adapter.denoiser, self.adapter.device, self.dist.world_size)
            self.params = lora.lora_parameters(self.adapter)  # the sharded parameters that replaced them
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
        self.ema = EMA(self.params, cfg.train.ema_decay) if cfg.train.ema_decay > 0 else None
        self.rewards, self.prompt_sources = self._tasks(reward)
        self.dist.check(cfg, num_tasks=len(self.prompt_sources))  # distributed: fail fast on what cannot be split
        self.reward, self.prompts = next(iter(self.rewards.values())), next(iter(self.prompt_sources.values()))
        self.rng = np.random.default_rng(cfg.train.seed)
        self.generator = torch.Generator().manual_seed(cfg.train.seed)
        self.iteration = 0
        self.samples_seen = 0
        self.bad_rewards = 0
        os.makedirs(cfg.train.out_dir, exist_ok=True)
        self.metrics_log = MetricsLog(cfg.train.out_dir, cfg.train.log_with, config_to_dict(cfg),
                                      write=self.dist.is_main)
        self.metrics_path = self.metrics_log.jsonl
        self.evals_path = os.path.join(cfg.train.out_dir, EVALS_JSONL)
        self.heldout = self._heldout()
        self.evals: list[dict] = []
        self._base_images = None
        self.algorithm = ALGORITHMS[cfg.train.algorithm](cfg, self.adapter, self.params, self.optimizer,
                                                         self.generator)
        self.algorithm.dist = self.dist
        if isinstance(self.algorithm, BackpropUpdate):
            self.algorithm.reward = self.reward  # differentiated, not only scored (checked: differentiable)

    def _tasks(self, reward) -> tuple[dict, dict]:
        """({task: Reward or None}, {task: PromptSource}); one task (None) except for OPD."""
        t = self.cfg.train
        if t.algorithm != "opd":
            r = reward if reward is not None else get_reward(t.reward, **t.reward_options)
            return {None: r}, {None: PromptSource(t.prompts)}
        rewards, sources = {}, {}
        for task, spec in self.cfg.opd.teachers.items():
            if isinstance(reward, dict):
                rewards[task] = reward.get(task)
            else:
                rewards[task] = reward if reward is not None else (get_reward(spec["reward"]) if spec.get("reward")
                                                                   else None)
            sources[task] = PromptSource(spec.get("prompts") or t.prompts)
        return rewards, sources

    def _heldout(self) -> Optional[HeldoutEval]:
        """The held-out evaluator (see flowalign.heldout), or None when the prompts have no held-out split."""
        t, s = self.cfg.train, self.cfg.sampling
        if t.eval_prompts is not None:
            sources = [t.eval_prompts]
        else:
            sources = [src.spec for src in self.prompt_sources.values()]
            if any(toy_tasks(spec) is None for spec in sources):
                return None  # a prompt file has no held-out split: set train.eval_prompts
        train_rewards = {src.spec: self.rewards[task] for task, src in self.prompt_sources.items()}
        if t.eval_prompts is not None:
            train_rewards[t.eval_prompts] = self.reward
        guidance = s.eval_guidance_scale if s.eval_guidance_scale is not None else s.guidance_scale
        return HeldoutEval(sources, t.eval_per_task, s.eval_num_steps, guidance, train_rewards, t.eval_rewards)

    def evaluate(self, base: bool = False) -> Optional[dict]:
        """Held-out scores of the adapter-disabled base (``base``) or of the evaluation weights (EMA when on),
        appended to ``evals.jsonl``; also writes ``eval_grid.png`` (base row vs the latest weights, same seeds).
        Distributed: rank 0 evaluates, except under FSDP, where every process samples the same held-out set (its
        forwards are collectives) and rank 0 writes the files."""
        if self.heldout is None or not (self.dist.is_main or self.dist.fsdp):
            return None
        t0 = time.perf_counter()
        with (lora.adapter_disabled(self.adapter) if base else self.evaluation_weights()):
            scores, images = self.heldout(self.adapter.pipe)
        row = {"iteration": self.iteration, "samples": self.samples_seen, "weights": "base" if base else "lora",
               **scores, "time_eval": time.perf_counter() - t0}
        self.evals.append(row)
        cols = _grid_columns(self.heldout.tasks)
        if base:
            self._base_images = images[cols]
        if not self.dist.is_main:
            return row
        with open(self.evals_path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if not base and self._base_images is not None:
            image_grid([self._base_images, images[cols]], ["base", f"it {self.iteration}"],
                       [self.heldout.prompts[i] for i in cols], os.path.join(self.cfg.train.out_dir, "eval_grid.png"))
        return row

    # --- one iteration -----------------------------------------------------------------------------
    def _sample_prompts(self) -> tuple[list[str], list]:
        """prompts_per_iter prompts from each task's source, each repeated group_size times (consecutive rows)."""
        g, n = self.cfg.train.group_size, self.cfg.train.prompts_per_iter
        prompts, tasks = [], []
        for task, source in self.prompt_sources.items():
            for p in source.sample(n, self.rng):
                prompts += [p] * g
                tasks += [task] * g
        return prompts, tasks

    def _score(self, traj, tasks: list) -> tuple[torch.Tensor, torch.Tensor]:
        """Rewards [B] and a validity mask [B]: NaN/inf scores, images the reward raised on, and rows of a task
        without a reward are left out of the advantages (bad scores warned about and counted in ``bad_rewards``)."""
        if all(r is None for r in self.rewards.values()):
            n = traj.batch_size
            return torch.full((n,), float("nan")), torch.zeros(n, dtype=torch.bool)
        with torch.no_grad():
            images = self.adapter.decode(traj.output(self.cfg.sampling.decode))
        if len(self.rewards) == 1:
            scores, valid, n_bad = safe_scores(next(iter(self.rewards.values())), images, traj.prompts)
            self.bad_rewards += n_bad
            return scores, valid
        rewards = torch.full((traj.batch_size,), float("nan"))
        valid = torch.zeros(traj.batch_size, dtype=torch.bool)
        for task, reward in self.rewards.items():
            rows = [i for i, x in enumerate(tasks) if x == task]
            if reward is None or not rows:
                continue
            scores, ok, n_bad = safe_scores(reward, images[rows], [traj.prompts[i] for i in rows])
            self.bad_rewards += n_bad
            rewards[rows], valid[rows] = scores.float().cpu(), ok.cpu()
        return rewards, valid

    def step(self) -> dict:
        """One rollout -> reward -> update iteration; returns its metrics (also appended to metrics.jsonl).
        Distributed: each process rolls out and scores its shard of the global batch; rewards are gathered."""
        t0 = time.perf_counter()
        prompts, tasks = self._sample_prompts()  # the global batch (the same on every process)
        mine = self.dist.shard(len(prompts), self.cfg.train.group_size)
        traj = self.algorithm.rollout(prompts[mine])
        t1 = time.perf_counter()
        rewards, valid = self._score(traj, tasks[mine])
        rewards, valid = self.dist.gather(rewards), self.dist.gather(valid)  # global [B]
        adv = advantages_for(rewards, prompts, self.cfg, valid=valid)
        adv, valid = adv.to(self.adapter.device), valid.to(self.adapter.device)  # rewards come back on the CPU
        t2 = time.perf_counter()
        metrics = self.algorithm.update(traj, adv=adv, valid=valid, rewards=rewards, tasks=tasks)
        if self.ema is not None:
            self.ema.update()
        t3 = time.perf_counter()
        self.iteration += 1
        self.samples_seen += len(prompts)
        valid = valid.cpu()
        ok = rewards[valid]
        metrics.update(iteration=self.iteration, samples=self.samples_seen,
                       reward_mean=ok.mean().item() if ok.numel() else None,
                       reward_std=ok.std().item() if ok.numel() else None, invalid_rewards=int((~valid).sum()),
                       nan_steps=self.algorithm.nan_steps,
                       time_rollout=t1 - t0, time_reward=t2 - t1, time_update=t3 - t2)
        if len(self.rewards) > 1:
            for task in self.rewards:
                m = valid & torch.tensor([x == task for x in tasks])
                metrics[f"reward_{task}"] = rewards[m].mean().item() if m.any() else None
        self.metrics_log.log(metrics)  # files and loggers on the main process only
        return metrics

    def train(self, iterations: Optional[int] = None, callback: Optional[Callable[[dict], None]] = None,
              progress: bool = True) -> list[dict]:
        """``iterations`` (default train.iterations) steps with periodic evaluation and checkpoints; stops with
        FlowalignError after train.max_nan_steps skipped (NaN) optimizer steps in a row. Returns their metrics."""
        history = []
        n = iterations if iterations is not None else self.cfg.train.iterations
        bar = tqdm(range(n), desc=self.cfg.train.algorithm, disable=not (progress and self.dist.is_main))
        for i in bar:
            m = self.step()
            history.append(m)
            bar.set_postfix(**self.algorithm.progress(m))
            every = self.cfg.train.eval_every
            if every > 0 and self.iteration % every == 0 and i < n - 1:  # the caller evaluates the end
                self.evaluate()
            checkpoint.after_iteration(self)
            if callback is not None:
                callback(m)
        return history

    def evaluation_weights(self):
        """Context for evaluation: the EMA weights when EMA is on, else the live ones."""
        return self.ema.swapped_in() if self.ema is not None else nullcontext()

    def save_lora(self, out_dir: Optional[str] = None) -> str:
        out_dir = out_dir or os.path.join(self.cfg.train.out_dir, "lora")
        if not (self.dist.is_main or self.dist.fsdp):  # distributed: every process holds the same weights
            return out_dir
        with self.evaluation_weights():  # FSDP: every process gathers the shards, rank 0 writes
            return lora.save_lora(self.adapter, out_dir, write=self.dist.is_main)


def _grid_columns(tasks: list, n: int = 8) -> list[int]:
    """Indices of up to n held-out images, taking each task's first images in turn."""
    order = list(dict.fromkeys(tasks))
    firsts = {task: [i for i, x in enumerate(tasks) if x == task] for task in order}
    cols, k = [], 0
    while len(cols) < min(n, len(tasks)):
        for task in order:
            if k < len(firsts[task]) and len(cols) < n:
                cols.append(firsts[task][k])
        k += 1
    return cols


# Kept for existing callers (the demo, tests): the trainer runs Flow-GRPO with the default train.algorithm.
GRPOTrainer = Trainer


def run_training(cfg: Config, adapter=None, reward=None, progress: bool = True) -> dict:
    """Train with ``cfg`` and write into ``train.out_dir``: ``config.yaml`` (the resolved config), a fresh
    ``metrics.jsonl`` / ``metrics.csv``, ``ckpt-<iteration>/`` checkpoints (at least the last), ``lora/`` (EMA
    weights when EMA is on) and ``reward_curve.png`` (the per-iteration reward, or the loss when no reward is
    logged, e.g. OPD without task rewards). With ``train.resume`` it continues the newest checkpoint instead (its
    logs kept up to it). Returns a summary dict."""
    import yaml

    from .config import config_to_dict
    from .report import plot_reward_curve

    out = cfg.train.out_dir
    os.makedirs(out, exist_ok=True)
    main = distributed.setup(cfg.train.shard).is_main  # distributed: only rank 0 writes files
    if main and not cfg.train.resume:
        checkpoint.start_fresh(out)  # a fresh run owns its logs (an unfinished run's checkpoint is refused)
    t0 = time.time()
    trainer = Trainer(cfg, adapter=adapter, reward=reward)
    resumed = checkpoint.resume(trainer) if cfg.train.resume else None
    if resumed:
        print(f"resuming from {resumed}")
    if main:
        with open(os.path.join(out, "config.yaml"), "w") as f:  # after a resume passed the config check
            yaml.safe_dump(config_to_dict(cfg), f, sort_keys=False)
    base = next((e for e in trainer.evals if e["weights"] == "base"), None) if resumed else trainer.evaluate(base=True)
    trainer.train(max(cfg.train.iterations - trainer.iteration, 0), progress=progress)
    checkpoint.save_checkpoint(trainer)  # the end (a no-op when the loop just wrote this iteration)
    history = trainer.metrics_log.rows  # with a resumed run's earlier iterations
    trainer.metrics_log.close()
    aligned = trainer.evaluate()
    lora_dir = trainer.save_lora(os.path.join(out, "lora"))
    key = "reward_mean" if any(m.get("reward_mean") is not None for m in history) else "loss"
    curve = [m for m in history if m.get(key) is not None]
    plot_path = os.path.join(out, "reward_curve.png")
    headline = _headline(base)
    evals = [(e["iteration"], e[headline]) for e in trainer.evals] if headline else ()
    if main:
        plot_reward_curve(curve, plot_path, key=key, title=f"{cfg.train.algorithm}: {key}", evals=evals,
                          evals_label=f"held-out {headline}")
    return {"iterations": trainer.iteration, "samples": trainer.samples_seen, "lora": lora_dir,
            "metrics": trainer.metrics_path,
            "plot": plot_path, "final": history[-1] if history else {}, "wall_s": time.time() - t0,
            "base": base, "aligned": aligned, "headline": headline, "main": main}


def _headline(scores: Optional[dict]) -> Optional[str]:
    """The held-out score to quote: toy_geneval, else ocr, else the first reward key."""
    if not scores:
        return None
    for key in ("toy_geneval", "ocr"):
        if key in scores:
            return key
    keys = [k for k, v in scores.items() if "/" not in k and isinstance(v, float) and not k.startswith("time_")]
    return keys[0] if keys else None
