"""Sample efficiency and per-iteration cost of the update rules (``run_bench``): each algorithm trains with its
own recipe to the same budget, observed by a ``BenchRecorder`` callback (see the package docstring)."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Callable, Optional, Sequence

import torch

from ...callbacks import TrainerCallback
from ...resources import shipped_config
from .meters import MemorySampler, NetworkMeter, machine_info, ru_maxrss_bytes
from .report import UNTRAINED_REWARD, markdown_table, plot_cost_breakdown, plot_sample_efficiency


DEFAULT_ALGORITHMS = ("grpo", "nft", "crd")


def recipe_path(algorithm: str) -> str:
    """The shipped ``configs/toy_<algorithm>.yaml``."""
    return shipped_config(f"toy_{algorithm}.yaml")


# ---- one algorithm ----------------------------------------------------------------------------------------


def _iteration_cost(metrics: dict, net: dict, time_iter: float) -> dict:
    """One iteration's cost record from Trainer.step metrics and a NetworkMeter.take() (seconds, counts)."""
    g = lambda key, phase: net.get(f"{key}/{phase}", 0)  # noqa: E731
    ru = ("rollout", "update")
    rec = {"iteration": metrics["iteration"], "samples": metrics["samples"], "time_iter": time_iter,
           "time_rollout": metrics["time_rollout"], "time_reward": metrics["time_reward"],
           "time_update": metrics["time_update"], "reward_mean": metrics.get("reward_mean"),
           "update_samples": metrics.get("update_samples")}
    for phase in ("rollout", "reward", "update"):
        rec[f"denoiser_calls_{phase}"] = g("denoiser_calls", phase)
        rec[f"denoiser_rows_{phase}"] = g("denoiser_rows", phase)
        rec[f"denoiser_fwd_s_{phase}"] = g("denoiser_s", phase)
    rec["denoiser_grad_calls"] = sum(g("denoiser_grad_calls", p) for p in ru)
    rec["denoiser_bwd_s"] = sum(g("denoiser_bwd_s", p) for p in ("rollout", "reward", "update"))
    rec["vae_decode_s"] = sum(g("vae_s", p) for p in ru)
    rec["vae_decode_s_reward"] = g("vae_s", "reward")
    rec["text_encoder_s"] = sum(g("text_s", p) for p in ru)
    rec["text_encoder_s_reward"] = g("text_s", "reward")
    busy = rec["time_rollout"] + rec["time_update"]
    network = (rec["denoiser_fwd_s_rollout"] + rec["denoiser_fwd_s_update"] + sum(g("denoiser_bwd_s", p) for p in ru)
               + rec["vae_decode_s"] + rec["text_encoder_s"])
    rec["network_s"] = network
    rec["overhead_s"] = busy - network
    rec["overhead_frac"] = rec["overhead_s"] / busy if busy > 0 else 0.0
    rec["network_limit_ratio"] = busy / network if network > 0 else float("nan")  # 1 = nothing but the networks
    return rec


def _mean_cost(records: list[dict]) -> dict:
    """Mean of the numeric fields, skipping the first (warm-up) iteration when there are two or more."""
    use = records[1:] if len(records) > 1 else records
    keys = [k for k, v in use[0].items() if isinstance(v, (int, float)) and k not in ("iteration", "samples")]
    out = {k: sum(r[k] or 0 for r in use) / len(use) for k in keys}
    busy = out["time_rollout"] + out["time_update"]
    out["overhead_frac"] = out["overhead_s"] / busy if busy > 0 else 0.0  # ratios of the means
    out["network_limit_ratio"] = busy / out["network_s"] if out["network_s"] > 0 else float("nan")
    out["iterations_in_mean"] = len(use)
    return out


def _headline(cfg, row: dict) -> str:
    for key in ("toy_geneval", "ocr", cfg.train.reward):
        if key in row:
            return key
    raise ValueError(f"held-out evaluation gave no score for {cfg.train.reward!r}: use toy prompts or set "
                     "train.eval_prompts")


def _curve_point(row: dict, wall: float, headline: str) -> dict:
    return {"iteration": row["iteration"], "samples": row["samples"], "wall_s": wall,
            "heldout": row.get(headline), UNTRAINED_REWARD: row.get(UNTRAINED_REWARD),
            "time_eval": row.get("time_eval")}


class BenchRecorder(TrainerCallback):
    """Observes the training loop: the NetworkMeter's phase follows the trainer's (outside rollout, update and
    evaluation it is "reward", as the scoring between them), each iteration's cost record (timed with the device
    synchronized), the held-out curve, and the stop once a budget is spent."""

    def __init__(self, meter: NetworkMeter, sync: Callable[[], None], budget_samples: Optional[int],
                 budget_seconds: Optional[float]):
        self.meter, self.sync = meter, sync
        self.budget_samples, self.budget_seconds = budget_samples, budget_seconds
        self.records: list[dict] = []
        self.curve: list[dict] = []
        self.wall = 0.0
        self.headline: Optional[str] = None

    def start_curve(self, cfg, base: dict, log: Callable[[str], None]) -> None:
        self.cfg, self.log = cfg, log
        self.headline = _headline(cfg, base)
        self.curve.append(_curve_point(base, 0.0, self.headline))

    def on_phase_begin(self, trainer, phase: str) -> None:
        self.meter.phase = phase

    def on_phase_end(self, trainer, phase: str) -> None:
        self.meter.phase = "reward"

    def on_step_begin(self, trainer) -> None:
        self.meter.take()  # drop what evaluation ran
        self.sync()
        self._t0 = time.perf_counter()

    def on_step_end(self, trainer, metrics: dict) -> bool:
        self.sync()
        dt = time.perf_counter() - self._t0
        self.wall += dt
        self.records.append(_iteration_cost(metrics, self.meter.take(), dt))
        return (self.budget_samples is not None and trainer.samples_seen >= self.budget_samples) or \
               (self.budget_seconds is not None and self.wall >= self.budget_seconds)

    def on_evaluate(self, trainer, row: dict) -> None:
        if row["weights"] == "base" or self.headline is None:
            return
        self.curve.append(_curve_point(row, self.wall, self.headline))
        self.log(f"{self.cfg.train.algorithm}: it {trainer.iteration}, {trainer.samples_seen} samples, "
                 f"{self.wall:.0f}s: held-out {self.headline} {row[self.headline]:.3f}")


def bench_algorithm(cfg, budget_samples: Optional[int] = None, budget_seconds: Optional[float] = None,
                    untrained_reward=None, adapter=None, log: Callable[[str], None] = print) -> dict:
    """Train one config to the budget with held-out evaluation; returns its bench.json entry.

    cfg: a Config (``train.eval_every``, ``train.out_dir`` set by the caller); budgets: stop once
    ``samples >= budget_samples`` or the summed iteration time ``>= budget_seconds`` (at least one given);
    untrained_reward: a Reward scored as ``clip_score`` at held-out evaluation (None: built by name, which needs
    the default CLIP weights); adapter: a fresh pipeline adapter (None: loaded from ``cfg.model.path``).
    """
    from ...runtime.metrics import remove_logs
    from ...trainer import Trainer

    if budget_samples is None and budget_seconds is None:
        raise ValueError("give a budget: budget_samples (reward queries) and/or budget_seconds (training time)")
    remove_logs(cfg.train.out_dir)  # a fresh run owns its logs
    trainer = Trainer(cfg, adapter=adapter)
    if trainer.heldout is None:
        raise ValueError(f"{cfg.train.algorithm}: the prompts have no held-out split: set train.eval_prompts")
    if untrained_reward is not None and UNTRAINED_REWARD in trainer.heldout.extra:
        trainer.heldout.use_reward(UNTRAINED_REWARD, untrained_reward)
    cuda = trainer.adapter.device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    meter = NetworkMeter(trainer.adapter, trainer.params)
    recorder = BenchRecorder(meter, sync, budget_samples, budget_seconds)
    trainer.add_callback(recorder)
    with meter, MemorySampler() as mem:
        base = trainer.evaluate(base=True)
        recorder.start_curve(cfg, base, log)
        trainer.train(iterations=sys.maxsize, progress=False)  # until the recorder's budget stops it
        trainer.evaluate()  # the end (the loop evaluates every train.eval_every iterations before it)
    records, curve, wall, headline = recorder.records, recorder.curve, recorder.wall, recorder.headline
    s = cfg.sampling
    return {
        "algorithm": cfg.train.algorithm, "trained_reward": cfg.train.reward, "heldout_metric": headline,
        "untrained_reward": UNTRAINED_REWARD if UNTRAINED_REWARD in base else None,
        "settings": {"sampler": s.sampler, "num_steps": s.num_steps, "guidance_scale": s.guidance_scale,
                     "eval_num_steps": s.eval_num_steps,
                     "eval_guidance_scale": s.eval_guidance_scale if s.eval_guidance_scale is not None
                     else s.guidance_scale, "eval_images": base["n"],
                     "samples_per_iter": trainer.samples_seen // max(trainer.iteration, 1), "seed": cfg.train.seed,
                     "lr": cfg.train.lr, "lora_rank": cfg.model.lora_rank, "dtype": cfg.model.dtype,
                     "gradient_checkpointing": cfg.model.gradient_checkpointing, "device": str(trainer.adapter.device)},
        "iterations": trainer.iteration, "samples": trainer.samples_seen, "train_wall_s": wall,
        "eval_wall_s": sum(p["time_eval"] or 0 for p in curve),
        "base": {headline: base[headline], UNTRAINED_REWARD: base.get(UNTRAINED_REWARD)},
        "final": {headline: curve[-1]["heldout"], UNTRAINED_REWARD: curve[-1][UNTRAINED_REWARD]},
        "curve": curve, "mean_cost": _mean_cost(records), "per_iteration": records,
        "peak_memory": {"cuda_max_allocated_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
                        "rss_peak_mb": mem.peak / 2**20, "rss_start_mb": mem.start / 2**20,
                        "ru_maxrss_mb": ru_maxrss_bytes() / 2**20},
    }


# ---- all algorithms -----------------------------------------------------------------------------------------


def bench_configs(algorithms: Sequence[str], out: str, budget_samples: Optional[int] = None,
                  configs: Optional[dict] = None, overrides: Sequence[str] = (), model: Optional[str] = None,
                  seed: int = 0, eval_every: int = 10, eval_per_task: int = 24) -> dict:
    """{algorithm: Config}: each recipe (``configs[alg]`` or ``configs/toy_<alg>.yaml``) with the bench's
    settings (seed, held-out evaluation with clip_score, out_dir ``out/<alg>``, iterations to cover
    ``budget_samples``), then ``overrides`` ('section.key=value', applied to every algorithm)."""
    from ...config import load_config, parse_overrides, with_overrides

    configs = configs or {}
    unknown = set(configs) - set(algorithms)
    if unknown:
        raise ValueError(f"--config names {', '.join(sorted(unknown))}, which is not in --algorithms "
                         f"{','.join(algorithms)}")
    if not algorithms:
        raise ValueError("no algorithms to benchmark: pass --algorithms grpo,nft,crd (or a subset)")
    out_cfgs = {}
    for alg in algorithms:
        path = configs.get(alg, recipe_path(alg))
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no recipe for algorithm {alg!r} at {path}: pass --config {alg}=PATH")
        cfg = load_config(path)
        if cfg.train.algorithm != alg:
            raise ValueError(f"{path} trains train.algorithm={cfg.train.algorithm}, not {alg}: pass the right "
                             f"--config {alg}=PATH")
        extra = list(cfg.train.eval_rewards) + [UNTRAINED_REWARD] * (UNTRAINED_REWARD not in cfg.train.eval_rewards)
        bench = {"train.seed": seed, "train.eval_every": eval_every, "train.eval_per_task": eval_per_task,
                 "train.eval_rewards": extra, "train.out_dir": os.path.join(out, alg)}
        if model is not None:
            bench["model.path"] = model
        cfg = with_overrides(cfg, {**bench, **parse_overrides(list(overrides)), "train.out_dir": bench["train.out_dir"]})
        if budget_samples is not None:
            per_iter = cfg.train.prompts_per_iter * cfg.train.group_size
            cfg = with_overrides(cfg, {"train.iterations": max(1, math.ceil(budget_samples / per_iter))})
        out_cfgs[alg] = cfg
    return out_cfgs


def run_bench(out: str, algorithms: Sequence[str] = DEFAULT_ALGORITHMS, budget_samples: Optional[int] = 3840,
              budget_seconds: Optional[float] = None, configs: Optional[dict] = None, overrides: Sequence[str] = (),
              model: Optional[str] = None, seed: int = 0, eval_every: int = 10, eval_per_task: int = 24,
              clip_model: str = "tiny", command: Optional[str] = None,
              adapter_factory: Optional[Callable[[], object]] = None, log: Callable[[str], None] = print) -> dict:
    """Benchmark ``algorithms`` (see the module doc) and write bench.json, the two plots and bench.md into ``out``.

    clip_model: CLIP for the untrained held-out reward ('tiny' = assets/tiny-clip, or a folder / hub id);
    adapter_factory: builds a fresh adapter per algorithm (default: load ``model.path`` of each config).
    Returns the bench.json dict.
    """
    from ...rewards import get as get_reward

    os.makedirs(out, exist_ok=True)
    cfgs = bench_configs(algorithms, out, budget_samples, configs, overrides, model, seed, eval_every, eval_per_task)
    clip = get_reward(UNTRAINED_REWARD, model=clip_model)
    results = {}
    for alg, cfg in cfgs.items():
        log(f"bench: {alg} ({cfg.train.iterations if budget_samples else '?'} iterations) -> {cfg.train.out_dir}")
        results[alg] = bench_algorithm(cfg, budget_samples, budget_seconds, untrained_reward=clip,
                                       adapter=adapter_factory() if adapter_factory else None, log=log)
    first = next(iter(cfgs.values()))
    report = {"machine": machine_info(), "command": command, "model": first.model.path,
              "budget": {"samples": budget_samples, "seconds": budget_seconds}, "seed": seed,
              "eval_every": eval_every, "eval_per_task": eval_per_task, "clip_model": clip_model,
              "algorithms": results}
    with open(os.path.join(out, "bench.json"), "w") as f:
        json.dump(report, f, indent=1)
    plot_sample_efficiency(report, os.path.join(out, "sample_efficiency.png"))
    plot_cost_breakdown(report, os.path.join(out, "cost_breakdown.png"))
    with open(os.path.join(out, "bench.md"), "w") as f:
        f.write(markdown_table(report))
    return report
