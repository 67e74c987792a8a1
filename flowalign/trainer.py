"""Orchestration only: rollouts -> rewards -> advantages -> updates -> metrics and LoRA on disk.

The math lives in ``flowalign.algorithms`` (each algorithm's loss and its update rule) and
``flowalign.samplers``; this file wires a pipeline adapter, rewards and prompt sources into the loop, dispatches
the update on ``cfg.train.algorithm`` (the table ``flowalign.algorithms.ALGORITHMS``), and logs metrics per iteration
(``flowalign.runtime.metrics``). The trainer owns its state (``state_dict`` /
``load_state_dict``; ``flowalign.runtime.checkpoint`` only writes and reads the dicts) and tells callbacks
(``flowalign.callbacks``) what it does: the demo and the benchmark observe this one loop.
"""

from __future__ import annotations

import json
import os
import random
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from typing import Optional, Sequence

import numpy as np
import torch
from tqdm import tqdm

from .runtime import checkpoint, distributed, fsdp
from . import lora
from .algorithms import ALGORITHMS
from .algorithms.adv_grpo import AdversarialHead
from .algorithms.advantages import advantages_for
from .callbacks import CallbackList, TrainerCallback
from .config import Config, config_to_dict
from .errors import FlowalignError
from .runtime.ema import EMA
from .evaluation.calibration import RewardCalibrator, base_score_fn
from .evaluation.hacking import HackingMeter, progress_note
from .evaluation.heldout import HeldoutEval
from .runtime.kernels import available_attention_backends, avoid_cudnn_attention
from .runtime.metrics import EVALS_JSONL, MetricsLog, write_jsonl
from .runtime.cuda_graphs import check_cuda_graphs, graph_no_grad_calls
from .runtime.snapshot import load_tensors_
from .models import DTYPES, load_adapter
from .prompts import PromptSource, toy_tasks
from .rewards import get as get_reward
from .evaluation.report import image_grid
from .rewards.guard import safe_scores
from .rollout import concat_trajectories


def prepare_model(cfg: Config, adapter=None, device=None):
    """The run's pipeline adapter before its LoRA: ``model.path`` loaded (unless ``adapter`` is given) with the
    base weights in ``model.dtype`` (``lora.set_precision``); the trainer and ``flowalign doctor`` share it."""
    if adapter is None:
        adapter = load_adapter(cfg.model.path, family=cfg.model.family, device=device,
                               torch_dtype=lora.load_dtypes(DTYPES[cfg.model.dtype]),
                               trust_remote_code=cfg.model.trust_remote_code, **cfg.model.adapter_kwargs())
    avoid_cudnn_attention(adapter.device)  # its backward failed on FLUX shapes (flowalign.runtime.kernels)
    if cfg.model.autocast is not None:
        adapter.autocast = DTYPES[cfg.model.autocast]  # every predict under torch.autocast (models.base)
    if cfg.model.attention != "default":
        dtype = adapter.autocast or DTYPES[cfg.model.dtype]
        have = available_attention_backends(adapter.device, dtype)
        if cfg.model.attention not in have:
            raise ValueError(f"model.attention={cfg.model.attention} has no kernel on {adapter.device} for "
                             f"{dtype}: choose one of default, {', '.join(have)}")
        adapter.attention = cfg.model.attention  # every predict restricted to that kernel (models.base)
    if cfg.model.dtype != "float32":
        lora.set_precision(adapter, DTYPES[cfg.model.dtype])
    return adapter


def add_policy_lora(cfg: Config, adapter, sharded: bool = False) -> list:
    """The trainable LoRA of ``model`` (rank, alpha, dropout, targets) on the adapter -> its float32 parameters;
    then ``model.compile`` / ``model.cuda_graphs`` (``sharded``: the denoiser will be FSDP-sharded)."""
    m = cfg.model
    if m.cuda_graphs:  # refused before anything is built
        check_cuda_graphs(adapter.device, sharded)
    params = lora.add_lora(adapter, rank=m.lora_rank, alpha=m.lora_alpha, dropout=m.lora_dropout,
                           target_modules=m.lora_target_modules)
    if m.cuda_graphs:
        for den in adapter.denoisers:  # gradient-free calls replayed from graphs (flowalign.runtime.cuda_graphs)
            graph_no_grad_calls(den, compile_training=m.compile)
    elif m.compile:
        for den in adapter.denoisers:  # in place: the module, its hooks and its LoRA layers stay the same objects
            den.compile()
    return params


class Trainer:
    """Any algorithm of ``ALGORITHMS`` on any supported pipeline.

    One iteration: ``prompts_per_iter`` prompts (per task, for OPD) x ``group_size`` samples are rolled out by the
    algorithm's rollout policy and scored; group advantages are computed; the algorithm's update rule takes its
    optimizer step(s). ``reward``: a Reward for every row (default: ``train.reward``; for OPD each task's
    optional ``reward``), or a dict task -> Reward. ``callbacks``: :class:`~flowalign.callbacks.TrainerCallback` s
    that observe the loop (also ``add_callback``).
    """

    def __init__(self, cfg: Config, adapter=None, reward=None, callbacks: Sequence[TrainerCallback] = ()):
        self.cfg = cfg
        self.callbacks = CallbackList()
        for cb in callbacks:
            self.callbacks.add(cb)
        self.dist = distributed.setup(cfg.train.shard)  # one process, or its place under accelerate launch / torchrun
        torch.manual_seed(cfg.train.seed)
        self.adapter = prepare_model(cfg, adapter, device=cfg.model.device or self.dist.device)
        self.params = add_policy_lora(cfg, self.adapter, sharded=self.dist.fsdp)
        ALGORITHMS[cfg.train.algorithm].prepare_model(cfg, self.adapter)  # e.g. OPD's teachers, before sharding
        self.dist.broadcast_(self.params)  # distributed: every process starts from rank 0's LoRA
        if cfg.model.gradient_checkpointing:
            lora.set_gradient_checkpointing(self.adapter, True)
        if self.dist.fsdp:  # train.shard=fsdp: base and LoRA weights sharded per block (flowalign.runtime.fsdp)
            for den in self.adapter.denoisers:  # each expert of a two-expert pipeline is sharded on its own
                fsdp.shard_denoiser(den, self.adapter.device, self.dist.world_size, self.adapter.fsdp_blocks)
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
        self.bad_batches = 0  # batches without one finite reward, skipped (no optimizer step)
        self.bad_batch_streak = 0
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
        self.algorithm.use_reward(self.reward)
        # image statistics of every scored batch and their drift from the first one (flowalign.evaluation.hacking)
        self.hacking = HackingMeter(cfg.diagnostics, getattr(self.reward, "diagnostic_directions", {})) \
            if cfg.diagnostics.drift else None
        self._base_eval_values: Optional[dict] = None  # the base's held-out statistics, per image
        # scoring a finished rollout chunk on a worker thread while the next one samples (train.overlap_rewards)
        self._overlap = cfg.train.overlap_rewards and cfg.train.reward_chunks > 1
        self._scorer = ThreadPoolExecutor(1, thread_name_prefix="flowalign-reward") if self._overlap else None
        # a batch with no valid reward is skipped when the rule learns from the scores (not OPD, not backprop)
        self._rewarded = self.algorithm.uses_rewards and any(r is not None for r in self.rewards.values())
        self.adversary = self._adversary()  # Adv-GRPO: a reward head trained on the generations it scores
        self.calibrator = self._calibrator()  # InfAlign-CTRL: rewards calibrated to the base, per prompt

    def _adversary(self) -> Optional[AdversarialHead]:
        """The Adv-GRPO schedule of the (one) reward with a trainable head, or None."""
        heads = [task for task, r in self.rewards.items() if r is not None and AdversarialHead.wanted(r)]
        if not heads:
            return None
        if len(heads) > 1 or self.dist.world_size > 1:
            raise ValueError("Adv-GRPO trains one reward head in one process: use one task whose reward has "
                             "head: true, and a single process (the head is not synchronised across processes)")
        self._adversary_task = heads[0]
        reward, a = self.rewards[heads[0]], self.cfg.adv_grpo
        if self.heldout is not None and reward.name not in self.heldout.extra:  # the head's score beside toy GenEval
            self.heldout.use_reward(reward.name, reward)
            self.heldout.extra += (reward.name,)
        return AdversarialHead(reward, a.head_every, a.head_steps)

    def _calibrator(self) -> Optional[RewardCalibrator]:
        """InfAlign-CTRL's per-prompt calibration to the base model (``calibration.transform`` set), or None."""
        c = self.cfg.calibration
        if c.transform is None:
            return None
        if self.dist.world_size > 1:
            raise ValueError("calibration (InfAlign-CTRL) runs in a single process: its base-score cache is not "
                             "synchronised across processes; unset calibration.transform or run one process")
        if len(self.rewards) > 1 or self.reward is None or self.prompts.has_images or not self.algorithm.uses_rewards:
            raise ValueError("calibration (InfAlign-CTRL) needs one task with a reward, text prompts and a rule that "
                             "learns from rewards; unset calibration.transform")
        return RewardCalibrator(c, base_score_fn(self.adapter, self.cfg, self.reward))

    def _calibrate(self, rewards: torch.Tensor, valid: torch.Tensor, prompts: list) -> tuple:
        """(transformed calibrated rewards [B] (0 where invalid), valid [B], metrics) of the raw ``rewards``; a row
        whose prompt has no finite base score becomes invalid."""
        nan = torch.tensor(float("nan"))
        cal = self.calibrator(torch.where(valid, rewards.float(), nan), prompts)
        ok = valid & torch.isfinite(cal)
        metrics = {"reward_calibrated_mean": cal[ok].mean().item() if ok.any() else None,
                   "calibration_base_queries": self.calibrator.base_queries}
        return torch.where(ok, cal, torch.zeros(())), ok, metrics

    def _tasks(self, reward) -> tuple[dict, dict]:
        """({task: Reward or None}, {task: PromptSource}) from the rule's ``task_specs`` (one task, None, except
        for OPD's per-teacher tasks); ``reward`` given to the trainer replaces the configured ones."""
        rewards, sources = {}, {}
        for task, (name, options, prompts) in ALGORITHMS[self.cfg.train.algorithm].task_specs(self.cfg).items():
            if isinstance(reward, dict):
                rewards[task] = reward.get(task)
            else:
                rewards[task] = reward if reward is not None else (get_reward(name, **options) if name else None)
            sources[task] = PromptSource(prompts)
        return rewards, sources

    def _heldout(self) -> Optional[HeldoutEval]:
        """The held-out evaluator (see flowalign.evaluation.heldout), or None when evaluation is off
        (``train.eval_per_task=0``) or the prompts have no held-out split."""
        t, s = self.cfg.train, self.cfg.sampling
        if t.eval_per_task == 0:
            return None  # no sampling or scoring of held-out images at all (timing runs, bench of the update)
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
        return HeldoutEval(sources, t.eval_per_task, s.eval_num_steps, guidance, train_rewards, t.eval_rewards,
                           resolution=s.resolution, reward_options=t.eval_reward_options)

    def evaluate(self, base: bool = False) -> Optional[dict]:
        """Held-out scores of the adapter-disabled base (``base``) or of the evaluation weights (EMA when on),
        appended to ``evals.jsonl``; also writes ``eval_grid.png`` (base row vs the latest weights, same seeds).
        Distributed: rank 0 evaluates, except under FSDP, where every process samples the same held-out set (its
        forwards are collectives) and rank 0 writes the files."""
        if self.heldout is None or not (self.dist.is_main or self.dist.fsdp):
            return None
        t0 = time.perf_counter()
        self.callbacks.on_phase_begin(self, "eval")
        with (lora.adapter_disabled(self.adapter) if base else self.evaluation_weights()):
            scores, images = self.heldout(self.adapter.pipe, self.adapter)
        self.callbacks.on_phase_end(self, "eval")
        row = {"iteration": self.iteration, "samples": self.samples_seen, "weights": "base" if base else "lora",
               **scores, "time_eval": time.perf_counter() - t0}
        if self.hacking is not None:
            row.update(self._eval_drift(images, row, base))
        self.evals.append(row)
        self.last_eval_images = images  # [N, 3, H, W] in the held-out prompt order, for callbacks (the demo's grid)
        cols = _grid_columns(self.heldout.tasks)
        if base:
            self._base_images = images[cols]
        if self.dist.is_main:
            with open(self.evals_path, "a") as f:
                f.write(json.dumps(row) + "\n")
            if not base and self._base_images is not None:
                image_grid([self._base_images, images[cols]], ["base", f"it {self.iteration}"],
                           [self.heldout.prompts[i] for i in cols],
                           os.path.join(self.cfg.train.out_dir, "eval_grid.png"))
        self.callbacks.on_evaluate(self, row)
        return row

    def _eval_drift(self, images, row: dict, base: bool) -> dict:
        """The held-out images' hacking statistics (``stat/<name>``) and, for the LoRA, their drift from the base
        model's on the same prompts and seeds (``drift_z/<name>``, ``drift``, ``drift_stats``, ``drift_summary``;
        the reward "rose" when the headline score did)."""
        values = self._hacking_values(images, self.heldout.prompts)
        out = HackingMeter.means(values)
        if base:
            self._base_eval_values = HackingMeter.finite(values)
            return out
        base_row = next((e for e in self.evals if e["weights"] == "base"), None)
        if self._base_eval_values is None or base_row is None:
            return out
        key = _headline(base_row)
        rose = key is not None and key in row and row[key] > base_row[key]
        report = self.hacking.compare(self._base_eval_values, values, rose)
        return {**out, **report.metrics(), "drift_summary": report.summary()}

    # --- one iteration -----------------------------------------------------------------------------
    def _sample_prompts(self) -> tuple[list[str], list, Optional[list]]:
        """prompts_per_iter prompts from each task's source, each repeated group_size times (consecutive rows),
        their tasks, and for a source of (prompt, image) rows the rows (ImageRow, else None per row)."""
        g, n = self.cfg.train.group_size, self.cfg.train.prompts_per_iter
        prompts, tasks, rows = [], [], []
        for task, source in self.prompt_sources.items():
            drawn = source.sample_rows(n, self.rng) if source.has_images else source.sample(n, self.rng)
            for r in drawn:
                prompts += [getattr(r, "prompt", r)] * g
                rows += [r if source.has_images else None] * g
                tasks += [task] * g
        return prompts, tasks, (rows if any(r is not None for r in rows) else None)

    @staticmethod
    def _group_keys(prompts: list, rows: Optional[list]) -> list:
        """The advantage groups' keys: the prompt, or the (prompt, image) row's key."""
        return list(prompts) if rows is None else [r.key if r is not None else p for p, r in zip(prompts, rows)]

    @staticmethod
    def _images(rows: Optional[list]) -> Optional[list]:
        """Condition images [3, H, W] of image rows (each file read once per batch), or None for text rows."""
        if rows is None:
            return None
        loaded: dict = {}
        for r in rows:
            if r.image not in loaded:
                loaded[r.image] = r.load()
        return [loaded[r.image] for r in rows]

    def _hacking_values(self, images, prompts) -> dict:
        """The batch's hacking statistics ({} when diagnostics.drift is off); with one task, the reward's own too."""
        if self.hacking is None:
            return {}
        return self.hacking.values(images, prompts, self.reward if len(self.rewards) == 1 else None)

    def _score(self, traj, tasks: list, rows: Optional[list] = None, observe: bool = False
               ) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """Rewards [B], a validity mask [B] and the batch's hacking statistics: NaN/inf scores, images the reward
        raised on, and rows of a task without a reward are left out of the advantages (bad scores warned about and
        counted in ``bad_rewards``). Rows of (prompt, image) sources give the reward metadata: each row's
        ``condition_image`` and, when the row has one, its identity pool ``references`` (image paths).
        ``observe``: a training batch, whose images become the negatives of Adv-GRPO's next head step."""
        if all(r is None for r in self.rewards.values()):
            n = traj.batch_size
            return torch.full((n,), float("nan")), torch.zeros(n, dtype=torch.bool), {}
        with torch.no_grad():
            images = self.adapter.decode(traj.output(self.cfg.sampling.decode))
        if observe and self.adversary is not None:
            mine = [i for i, x in enumerate(tasks) if x == self._adversary_task]
            self.adversary.observe(images[mine])
        values = self._hacking_values(images, traj.prompts)
        meta = traj.cond.metadata()  # condition images of edit / image-to-video rows
        if meta is not None and rows is not None:
            meta = [{**m, "references": list(r.references)} if r is not None and r.references else m
                    for m, r in zip(meta, rows)]
        if len(self.rewards) == 1:
            scores, valid, n_bad = safe_scores(next(iter(self.rewards.values())), images, traj.prompts, meta)
            self.bad_rewards += n_bad
            return scores, valid, values
        rewards = torch.full((traj.batch_size,), float("nan"))
        valid = torch.zeros(traj.batch_size, dtype=torch.bool)
        for task, reward in self.rewards.items():
            rows = [i for i, x in enumerate(tasks) if x == task]
            if reward is None or not rows:
                continue
            scores, ok, n_bad = safe_scores(reward, images[rows], [traj.prompts[i] for i in rows],
                                            None if meta is None else [meta[i] for i in rows])
            self.bad_rewards += n_bad
            rewards[rows], valid[rows] = scores.float().cpu(), ok.cpu()
        return rewards, valid, values

    def _rollout_chunks(self, prompts: list, tasks: list, rows: Optional[list] = None):
        """Roll out this process's rows in ``train.reward_chunks`` chunks of whole groups; each finished chunk's
        scoring is handed to a worker thread (``train.overlap_rewards``) while the next chunk samples, or left to
        the reward phase. The chunks and their order are the same either way, so are the weights. Returns (trajectory of all
        rows, [job() -> (rewards, valid, hacking statistics, scoring seconds)] in row order, seconds in the rollout)."""
        g = self.cfg.train.group_size
        groups = len(prompts) // g
        n = max(1, min(self.cfg.train.reward_chunks, groups))
        bounds = [g * (groups * i // n) for i in range(n + 1)]
        parts, pending, rolling = [], [], 0.0

        def score(traj, rows_tasks, part_rows):
            t = time.perf_counter()
            rewards, valid, values = self._score(traj, rows_tasks, part_rows, observe=True)
            return rewards, valid, values, time.perf_counter() - t

        for a, b in zip(bounds[:-1], bounds[1:]):
            self.callbacks.on_phase_begin(self, "rollout")
            t = time.perf_counter()
            part_rows = None if rows is None else rows[a:b]
            images = self._images(part_rows)  # a rule written for text rows keeps its rollout(prompts)
            part = self.algorithm.rollout(prompts[a:b]) if images is None else self.algorithm.rollout(prompts[a:b], images)
            rolling += time.perf_counter() - t
            self.callbacks.on_phase_end(self, "rollout")
            parts.append(part)
            if self._overlap and n > 1:
                pending.append(self._scorer.submit(score, part, tasks[a:b], part_rows).result)
            else:  # scored in the reward phase, after the rollout, in the main thread
                pending.append(lambda part=part, rows_tasks=tasks[a:b], pr=part_rows: score(part, rows_tasks, pr))
        return concat_trajectories(parts), pending, rolling

    @torch.no_grad()
    def fit_drift_base(self) -> None:
        """The base distribution of the hacking statistics: ``diagnostics.base_batches`` batches of the
        adapter-disabled model (prompts and noise from their own seed, so the run's own draws are unchanged), or,
        with 0, nothing here (the first training batch becomes the base)."""
        n = self.cfg.diagnostics.base_batches
        if self.hacking is None or self.hacking.monitor.fitted or n == 0:
            return
        with torch.random.fork_rng(devices=[]):  # whatever the base batches draw stays out of the run
            self._fit_drift_base(n)

    def _fit_drift_base(self, n: int) -> None:
        from .algorithms.base import configured_rollout

        seed = self.cfg.train.seed + 7_919  # a seed of its own
        rng, gen = np.random.default_rng(seed), torch.Generator().manual_seed(seed)
        g = self.cfg.train.group_size
        values, rewards, units, bad = [], [], 0, self.bad_rewards
        task = next(iter(self.rewards))
        for _ in range(n):
            src = self.prompts
            n_prompts = self.cfg.train.prompts_per_iter
            drawn = src.sample_rows(n_prompts, rng) if src.has_images else src.sample(n_prompts, rng)
            rows = [r for r in drawn for _ in range(g)] if src.has_images else None
            prompts = [getattr(r, "prompt", r) for r in drawn for _ in range(g)]
            with lora.adapter_disabled(self.adapter):
                traj = configured_rollout(self.adapter, prompts, self.cfg, gen, images=self._images(rows))
            r, valid, v = self._score(traj, [task] * len(prompts), rows)
            values.append(v)
            rewards.append(r[valid])
            units += len(prompts) // g
        self.bad_rewards = bad  # the base's invalid rewards are not the run's
        ok = torch.cat(rewards)
        self.hacking.monitor.fit(HackingMeter.concat(values), float(ok.mean()) if ok.numel() else None, units)

    def step(self) -> dict:
        """One rollout -> reward -> update iteration; returns its metrics (also appended to metrics.jsonl).
        Distributed: each process rolls out and scores its shard of the global batch; rewards are gathered."""
        cb = self.callbacks
        self.fit_drift_base()  # once, before the first update (a resumed run has it from its checkpoint)
        cb.on_step_begin(self)
        t0 = time.perf_counter()
        prompts, tasks, rows = self._sample_prompts()  # the global batch (the same on every process)
        mine = self.dist.shard(len(prompts), self.cfg.train.group_size)
        traj, pending, time_rollout = self._rollout_chunks(prompts[mine], tasks[mine],
                                                           None if rows is None else rows[mine])
        cb.on_phase_begin(self, "reward")
        wait0 = time.perf_counter()
        scored = [job() for job in pending]  # (rewards, valid, statistics, seconds spent scoring) per chunk
        waited = time.perf_counter() - wait0
        scoring = sum(s for *_, s in scored)
        hidden = max(scoring - waited, 0.0) if self._overlap else 0.0  # scored while the next chunk sampled
        rewards, valid = torch.cat([r for r, *_ in scored]), torch.cat([v for _, v, *_ in scored])
        hacking = HackingMeter.concat([h for _, _, h, _ in scored])
        rewards, valid = self.dist.gather(rewards), self.dist.gather(valid)  # global [B]
        raw_rewards, calibration = rewards, {}
        if self.calibrator is not None:  # InfAlign-CTRL: the update learns from Phi(C), metrics keep the raw mean
            rewards, valid, calibration = self._calibrate(rewards, valid, prompts)
        adv = advantages_for(rewards, self._group_keys(prompts, rows), self.cfg, valid=valid)
        adv, valid = adv.to(self.adapter.device), valid.to(self.adapter.device)  # rewards come back on the CPU
        cb.on_phase_end(self, "reward")
        t2 = time.perf_counter()
        cb.on_phase_begin(self, "update")
        if self._rewarded and not bool(valid.any()):  # no finite reward in the whole batch: nothing to learn from
            metrics = {"update_samples": 0}
            self.bad_batches += 1
            self.bad_batch_streak += 1
        else:
            metrics = self.algorithm.update(traj, adv=adv, valid=valid, rewards=rewards, tasks=tasks)
            if self.ema is not None:
                self.ema.update()
            self.bad_batch_streak = 0
        cb.on_phase_end(self, "update")
        t3 = time.perf_counter()
        self.iteration += 1
        self.samples_seen += len(prompts)
        valid = valid.cpu()
        ok = raw_rewards[valid]
        metrics.update(iteration=self.iteration, samples=self.samples_seen,
                       reward_mean=ok.mean().item() if ok.numel() else None,
                       reward_std=ok.std().item() if ok.numel() else None, invalid_rewards=int((~valid).sum()),
                       nan_steps=self.algorithm.nan_steps, skipped_batches=self.bad_batches,
                       time_rollout=time_rollout, time_reward=t2 - t0 - time_rollout, time_update=t3 - t2,
                       time_reward_scoring=scoring, time_reward_hidden=hidden)
        if len(self.rewards) > 1:
            for task in self.rewards:
                m = valid & torch.tensor([x == task for x in tasks])
                metrics[f"reward_{task}"] = rewards[m].mean().item() if m.any() else None
        metrics.update(calibration)
        if self.adversary is not None:  # Adv-GRPO: the head learns from the generations the update just used
            metrics.update(self.adversary.step(self.iteration))
        if hacking:  # this process's rows (distributed: rank 0's are logged, as every diagnostic)
            groups = len(traj.prompts) // self.cfg.train.group_size  # rows of a group share their initial noise
            metrics.update(self.hacking.observe(hacking, metrics["reward_mean"], max(1, groups)))
        self.metrics_log.log(metrics)  # files and loggers on the main process only
        return metrics

    def add_callback(self, callback: TrainerCallback) -> None:
        self.callbacks.add(callback)

    def train(self, iterations: Optional[int] = None, progress: bool = True) -> list[dict]:
        """``iterations`` (default train.iterations) steps with periodic evaluation and checkpoints, or fewer when
        a callback's ``on_step_end`` asks to stop; stops with FlowalignError after train.max_nan_steps skipped
        (NaN) optimizer steps in a row. Returns their metrics."""
        history = []
        n = iterations if iterations is not None else self.cfg.train.iterations
        t = self.cfg.train
        self.callbacks.on_train_begin(self)
        bar = tqdm(range(n), desc=t.algorithm, disable=not (progress and self.dist.is_main))
        for i in bar:
            m = self.step()
            history.append(m)
            bar.set_postfix(**self.algorithm.progress(m), **progress_note(m))
            stop = self.callbacks.on_step_end(self, m)
            if t.eval_every > 0 and self.iteration % t.eval_every == 0 and i < n - 1 and not stop:
                self.evaluate()  # the caller evaluates the end
            if t.checkpoint_every > 0 and self.iteration % t.checkpoint_every == 0:
                self.save_checkpoint()
            self._nan_stop()
            if stop:
                break
        return history

    def _nan_stop(self) -> None:
        """After ``train.max_nan_steps`` skipped (NaN/inf) optimizer steps, or as many batches without a finite
        reward, in a row: a checkpoint, then FlowalignError (nothing of the run is lost)."""
        if self.bad_batch_streak >= self.cfg.train.max_nan_steps:
            path = self.save_checkpoint()
            raise FlowalignError(
                f"stopped at iteration {self.iteration}: {self.bad_batch_streak} batches in a row had no finite "
                f"reward (the reward gave NaN/inf or failed on every image; {self.bad_batches} batches skipped in "
                f"all); saved {path}; fix the reward (or its server), then continue with "
                "`flowalign train CONFIG --resume`")
        algo = self.algorithm
        if algo.nan_streak >= self.cfg.train.max_nan_steps:
            path = self.save_checkpoint()
            raise FlowalignError(
                f"stopped at iteration {self.iteration}: {algo.nan_streak} optimizer steps in a row had a NaN/inf "
                f"loss or gradient (skipped, weights unchanged; {algo.nan_steps} in all); saved {path}; lower "
                "train.lr or train.grad_clip, or fix the reward/model that gives NaN, then continue with "
                "`flowalign train CONFIG --resume`")

    # --- state ---------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything a run needs to continue exactly: weights, optimizer, EMA, algorithm state, RNGs, counters,
        the evaluation history and the evaluation grid's base row. Under FSDP the sharded tensors are gathered
        whole (a collective: every process calls this)."""
        rng = {"torch": torch.get_rng_state(), "generator": self.generator.get_state(),
               "numpy": self.rng.bit_generator.state, "python": random.getstate()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        base = self._base_images  # uint8: what the grid draws, a quarter of the float32 bytes
        return fsdp.full_state({
            "format": checkpoint.FORMAT, "iteration": self.iteration, "samples_seen": self.samples_seen,
            "bad_rewards": self.bad_rewards, "bad_batches": self.bad_batches,
            "bad_batch_streak": self.bad_batch_streak, "config": config_to_dict(self.cfg),
            "lora": list(self.params), "optimizer": self.optimizer.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "algorithm": self.algorithm.state_dict(), "rng": rng, "evals": self.evals,
            "base_images": None if base is None else (base.detach().float().clamp(0, 1) * 255).round().to(torch.uint8),
            "hacking": None if self.hacking is None else self.hacking.state_dict(),
            "base_eval_values": self._base_eval_values,
            "adversary": None if self.adversary is None else self.adversary.state_dict(),
            "calibration": None if self.calibrator is None else self.calibrator.state_dict(),
        })

    def load_state_dict(self, state: dict) -> None:
        """Put ``state_dict`` output (also after a JSON/safetensors round trip) back into this freshly built
        trainer. The config's lr and weight decay win over the saved ones."""
        load_tensors_(self.params, state["lora"], "checkpoint LoRA weights (model.lora_rank changed?)")
        opt = state["optimizer"]
        live = self.optimizer.state_dict()["param_groups"]
        groups = [{k: tuple(v) if isinstance(g.get(k), tuple) else v for k, v in saved.items()}
                  for saved, g in zip(opt["param_groups"], live)]  # JSON turned tuples (betas) into lists
        own = {int(k): {n: v.clone() if isinstance(v, torch.Tensor) else v for n, v in s.items()}
               for k, s in opt["state"].items()}  # copies: a state taken in memory must not alias its source
        moments = fsdp.shard_optimizer_state(own, self.params)
        self.optimizer.load_state_dict({"state": moments, "param_groups": groups})
        for g in self.optimizer.param_groups:
            g["lr"], g["weight_decay"] = self.cfg.train.lr, self.cfg.train.weight_decay
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        self.algorithm.load_state_dict(state["algorithm"])
        rng = state["rng"]
        torch.set_rng_state(rng["torch"])
        self.generator.set_state(rng["generator"])
        self.rng.bit_generator.state = rng["numpy"]
        version, internal, gauss = rng["python"]
        random.setstate((version, tuple(internal), gauss))
        if "cuda" in rng and torch.cuda.is_available() and len(rng["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(rng["cuda"])
        self.iteration, self.samples_seen = int(state["iteration"]), int(state["samples_seen"])
        self.bad_rewards = int(state["bad_rewards"])
        self.bad_batches, self.bad_batch_streak = int(state["bad_batches"]), int(state["bad_batch_streak"])
        self.evals = list(state["evals"])
        base = state["base_images"]
        self._base_images = None if base is None else base.float() / 255
        if self.hacking is not None and state.get("hacking") is not None:
            self.hacking.load_state_dict(state["hacking"])
        if self.adversary is not None:
            if state.get("adversary") is None:
                raise ValueError("checkpoint has no Adv-GRPO reward head: it was written by a run without "
                                 "head: true; resume with the run's own config")
            self.adversary.load_state_dict(state["adversary"])
        if self.calibrator is not None:
            if state.get("calibration") is None:
                raise ValueError("checkpoint has no calibration state: it was written by a run without "
                                 "calibration.transform; resume with the run's own config")
            self.calibrator.load_state_dict(state["calibration"])
        values = state.get("base_eval_values")
        self._base_eval_values = None if values is None else {k: torch.as_tensor(v, dtype=torch.float64)
                                                               for k, v in values.items()}

    def save_checkpoint(self) -> str:
        """``train.out_dir/ckpt-<iteration>/`` (see flowalign.runtime.checkpoint): the state and the evaluation
        weights' LoRA folder; the newest ``train.keep_checkpoints`` are kept. Returns its path."""
        def collect():
            state = self.state_dict()
            with self.evaluation_weights():
                weights = lora.lora_state_dict(self.adapter)
            return state, lambda folder: lora.save_lora(self.adapter, folder, state=weights)

        t = self.cfg.train
        return checkpoint.save(t.out_dir, self.iteration, collect, self.dist, t.keep_checkpoints)

    def load_checkpoint(self, path: str, state: Optional[dict] = None) -> None:
        """Load ``path`` (a ckpt-<it> folder) into this freshly built trainer; it must verify and the config must
        match. ``state``: what ``checkpoint.read(path)`` already returned for it."""
        if state is None:
            state = checkpoint.load(path, self.cfg)
        else:
            checkpoint.fits(state, self.cfg, path)
        try:
            self.load_state_dict(state)
        except (KeyError, ValueError) as err:
            raise checkpoint.CheckpointError(f"checkpoint {path} does not fit this run ({err}); resume with the "
                                             "run's settings or start a fresh run in another train.out_dir") from None

    def resume(self) -> str:
        """Load the newest checkpoint of ``train.out_dir`` that verifies (``checkpoint.read``; each newer one is
        skipped with one warning saying why) and cut metrics.jsonl / metrics.csv / evals.jsonl back to its
        iteration. Returns its path; CheckpointError when none verifies."""
        out = self.cfg.train.out_dir
        found, skipped, path, state = checkpoint.list_checkpoints(out), [], None, None
        for _, candidate in reversed(found):
            state, why = checkpoint.read(candidate)
            if why is None:
                path = candidate
                break
            skipped.append(f"{os.path.basename(candidate)} ({why})")
        if skipped:
            warnings.warn(f"resume skips {len(skipped)} checkpoint(s) that do not verify: {'; '.join(skipped)}",
                          RuntimeWarning, stacklevel=2)
        if path is None:
            what = f"no checkpoint in {out} verifies ({'; '.join(skipped)})" if found else \
                f"no checkpoint (ckpt-<iteration>/) in {out}"
            raise checkpoint.CheckpointError(f"nothing to resume: {what}; run without --resume to start, or point "
                                             "train.out_dir at the run to continue")
        self.load_checkpoint(path, state)
        self.metrics_log.truncate(self.iteration)
        if self.dist.is_main:  # distributed: rank 0 writes, every rank loads
            write_jsonl(self.evals_path, self.evals)
        return path

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


def run_training(cfg: Config, adapter=None, reward=None, progress: bool = True,
                 callbacks: Sequence[TrainerCallback] = (), overwrite: bool = False) -> dict:
    """Train with ``cfg`` and write into ``train.out_dir``: ``config.yaml`` (the resolved config), a fresh
    ``metrics.jsonl`` / ``metrics.csv``, ``ckpt-<iteration>/`` checkpoints (at least the last), ``lora/`` (EMA
    weights when EMA is on) and ``reward_curve.png`` (the per-iteration reward, or the loss when no reward is
    logged, e.g. OPD without task rewards). With ``train.resume`` it continues the newest checkpoint instead (its
    logs kept up to it). A folder holding another run's results is refused unless ``overwrite``. ``callbacks``
    observe the run (``on_train_end`` gets the summary). Returns a summary dict."""
    import yaml

    from .config import config_to_dict
    from .evaluation.report import plot_reward_curve

    out = cfg.train.out_dir
    os.makedirs(out, exist_ok=True)
    main = distributed.setup(cfg.train.shard).is_main  # distributed: only rank 0 writes files
    if main and not cfg.train.resume:
        checkpoint.start_fresh(out, overwrite)  # another run's results are refused unless overwrite
    t0 = time.time()
    trainer = Trainer(cfg, adapter=adapter, reward=reward, callbacks=callbacks)
    resumed = trainer.resume() if cfg.train.resume else None
    if resumed:
        print(f"resuming from {resumed}")
    if main:
        with open(os.path.join(out, "config.yaml"), "w") as f:  # after a resume passed the config check
            yaml.safe_dump(config_to_dict(cfg), f, sort_keys=False)
    base = next((e for e in trainer.evals if e["weights"] == "base"), None) if resumed else trainer.evaluate(base=True)
    trainer.train(max(cfg.train.iterations - trainer.iteration, 0), progress=progress)
    trainer.save_checkpoint()  # the end (a no-op when the loop just wrote this iteration)
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
    summary = {"iterations": trainer.iteration, "samples": trainer.samples_seen, "lora": lora_dir,
               "metrics": trainer.metrics_path,
               "plot": plot_path, "final": history[-1] if history else {}, "wall_s": time.time() - t0,
               "base": base, "aligned": aligned, "headline": headline, "main": main, "history": history}
    trainer.callbacks.on_train_end(trainer, summary)
    return summary


def _headline(scores: Optional[dict]) -> Optional[str]:
    """The held-out score to quote: toy_geneval, else ocr, else the first reward key."""
    if not scores:
        return None
    for key in ("toy_geneval", "ocr"):
        if key in scores:
            return key
    keys = [k for k, v in scores.items() if "/" not in k and isinstance(v, float) and not k.startswith("time_")]
    return keys[0] if keys else None
