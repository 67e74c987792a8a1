"""Benchmarks: sample efficiency and per-iteration cost of the update rules on one pipeline (``run_bench``),
and training throughput of LoRA at SD3.5-Medium / FLUX.1-dev transformer sizes on a GPU (``bench_scale``).
``flowalign bench`` is the command line. Benchmarks are measurements, not tests: the suite only checks that
this runs on a tiny budget.

Sample efficiency. Every algorithm of ``algorithms`` trains with its own recipe (``configs/toy_<alg>.yaml``)
on the same model, with the same seed (hence the same prompt sequence) and the same budget of reward
queries (``budget_samples``; one query = one scored sample) and/or training wall time (``budget_seconds``).
Held-out evaluation (``Trainer.evaluate``: the base at 0, then every ``eval_every`` iterations and at the
end) gives the curve: held-out ``toy_geneval`` (the trained reward, on prompts never trained on) and
``clip_score`` with the shipped tiny CLIP (a reward the run does NOT train on: if it falls while the trained
reward rises, that is reward hacking). Each recipe keeps its own evaluation settings (CFG-free DiffusionNFT
and CRD evaluate at their guidance 1 unless ``sampling.eval_guidance_scale`` says otherwise); they are
recorded per algorithm.

Per-iteration cost (``NetworkMeter``, module hooks; nothing in the trainer is changed):
  * ``Trainer.step``'s own ``time_rollout`` / ``time_reward`` / ``time_update``;
  * denoiser calls and rows per phase: a CFG call on [2B] counts as ONE call of 2B rows;
  * denoiser forward time: forward pre-hook -> forward hook (``perf_counter``; on CUDA after a synchronize);
  * denoiser backward time: from the moment the gradient of a denoiser output is ready (a tensor hook that
    the forward hook puts on each output requiring grad) to the last gradient accumulated into the trainable
    (LoRA) parameters (``register_post_accumulate_grad_hook``). This works whatever the inputs (the latents
    need no grad), with gradient checkpointing (the recomputation falls inside the window) and for any loss;
    module backward hooks would not (with inputs that need no grad they fire before the parameter gradients);
  * VAE decode (hooks on ``vae.decoder``) and text-encoder time (hooks on ``text_encoder*``);
  * ``overhead = (rollout + update) - (denoiser forward + backward) - VAE decode - text encoders`` in those
    two phases, and ``overhead_frac = overhead / (rollout + update)`` (the reward is left out). The overhead
    is everything flowalign adds around the networks: sampler math and log-probs, CFG concatenation, dtype
    casts, loss computation and the loss's own backward up to the network output, LoRA snapshot swaps
    (NFT/CRD old/sampler models), gradient clipping and the AdamW step, EMA, advantages moved to device,
    Python, and the hooks themselves (a few microseconds per call). On CUDA the hooks synchronize, so the
    overhead is the time the GPU queue is not busy with a network, not hidden host time;
  * peak memory: on CUDA ``torch.cuda.max_memory_allocated`` (reset per algorithm); always the process's
    resident set size sampled every 20 ms during the run (``/proc/self/statm``) and ``ru_maxrss`` (the
    process peak so far, an upper bound shared by all algorithms run in one process).
Means skip the first (warm-up) iteration when there are two or more.

Writes into ``out``: ``bench.json``, ``sample_efficiency.png``, ``cost_breakdown.png``, ``bench.md`` and one
training folder per algorithm (metrics.jsonl, evals.jsonl, eval_grid.png).
"""

from __future__ import annotations

import json
import math
import os
import platform
import resource
import sys
import threading
import time
from typing import Callable, Optional, Sequence

import torch

from ..callbacks import TrainerCallback
from ..resources import shipped_config

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_ALGORITHMS = ("grpo", "nft", "crd")
UNTRAINED_REWARD = "clip_score"  # held-out reward the runs do not train on (reward hacking shows here)
PHASES = ("rollout", "reward", "update", "eval")


def recipe_path(algorithm: str) -> str:
    """The shipped ``configs/toy_<algorithm>.yaml``."""
    return shipped_config(f"toy_{algorithm}.yaml")


# ---- measuring ----------------------------------------------------------------------------------------


def _first_tensor(args: tuple, kwargs: dict) -> Optional[torch.Tensor]:
    """The batch tensor of a denoiser call: the first positional tensor, else hidden_states / sample."""
    for a in args:
        if isinstance(a, torch.Tensor):
            return a
    for key in ("hidden_states", "sample", "x"):
        if isinstance(kwargs.get(key), torch.Tensor):
            return kwargs[key]
    return next((v for v in kwargs.values() if isinstance(v, torch.Tensor)), None)


def _output_tensors(out) -> list:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _output_tensors(o)]
    if isinstance(out, dict):
        return [t for o in out.values() for t in _output_tensors(o)]
    sample = getattr(out, "sample", None)  # diffusers output dataclasses
    return [sample] if isinstance(sample, torch.Tensor) else []


class NetworkMeter:
    """Counts and times the pipeline's networks with hooks, bucketed by ``phase`` (set by the caller).

    ``take()`` returns the totals since the last ``take()`` and resets them:
    ``{"<net>_calls/<phase>": n, "<net>_rows/<phase>": rows, "<net>_s/<phase>": seconds}`` for net in
    ``denoiser`` (forward), ``vae`` (decoder forward), ``text`` (all text encoders), plus
    ``denoiser_bwd_s/<phase>`` and ``denoiser_grad_calls/<phase>`` (forwards that built a graph).
    See the module docstring for what each time includes. Use as a context manager (hooks removed on exit).
    """

    def __init__(self, adapter, params: Sequence[torch.nn.Parameter]):
        self.adapter = adapter
        self.params = [p for p in params if p.requires_grad]
        self.phase = "reward"
        self._cuda = adapter.device.type == "cuda"
        self._handles: list = []
        self._open = None  # [phase, start, end] of the backward window in progress
        self._starts: dict = {}
        self.totals: dict = {}

    def _now(self) -> float:
        if self._cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def _add(self, key: str, value: float) -> None:
        k = f"{key}/{self.phase}" if "/" not in key else key
        self.totals[k] = self.totals.get(k, 0) + value

    def _mark(self):
        """A point in time: perf_counter on CPU; on CUDA an event on the stream (no synchronize per parameter)."""
        if self._cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def _close_backward(self) -> None:
        if self._open is not None:
            phase, start, end = self._open
            if end is not None:
                if self._cuda:
                    end.synchronize()
                    seconds = start.elapsed_time(end) / 1000
                else:
                    seconds = end - start
                self._add(f"denoiser_bwd_s/{phase}", max(seconds, 0.0))
            self._open = None

    # hooks
    def _pre(self, name: str):
        def hook(module, args, kwargs):
            if name == "denoiser":
                self._close_backward()
            self._starts[id(module)] = self._now()
            if name != "text":
                x = _first_tensor(args, kwargs)
                self._add(f"{name}_rows", int(x.shape[0]) if x is not None and x.dim() else 0)
            self._add(f"{name}_calls", 1)
        return hook

    def _post(self, name: str):
        def hook(module, args, kwargs, out):
            self._add(f"{name}_s", self._now() - self._starts.pop(id(module)))
            if name == "denoiser" and torch.is_grad_enabled():
                outs = [t for t in _output_tensors(out) if t.requires_grad]
                if outs:
                    self._add("denoiser_grad_calls", 1)
                    for t in outs:
                        t.register_hook(self._backward_start)
        return hook

    def _backward_start(self, grad):
        if self._open is None:
            self._open = [self.phase, self._mark(), None]
        return grad

    def _backward_param(self, param):
        if self._open is not None:
            self._open[2] = self._mark()

    def __enter__(self) -> "NetworkMeter":
        pipe = self.adapter.pipe
        vae = getattr(pipe, "vae", None)
        modules = [("denoiser", self.adapter.denoiser)]
        if vae is not None:
            modules.append(("vae", getattr(vae, "decoder", vae)))
        for attr in ("text_encoder", "text_encoder_2", "text_encoder_3"):
            if isinstance(getattr(pipe, attr, None), torch.nn.Module):
                modules.append(("text", getattr(pipe, attr)))
        for name, m in modules:
            self._handles.append(m.register_forward_pre_hook(self._pre(name), with_kwargs=True))
            self._handles.append(m.register_forward_hook(self._post(name), with_kwargs=True))
        for p in self.params:
            self._handles.append(p.register_post_accumulate_grad_hook(self._backward_param))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def take(self) -> dict:
        self._close_backward()
        out, self.totals = self.totals, {}
        return out


class MemorySampler:
    """Peak resident set size (bytes) of this process, sampled every ``interval`` s in a thread while active.

    ``peak`` / ``start``: the highest and the first reading; 0 where /proc/self/statm does not exist."""

    def __init__(self, interval: float = 0.02):
        self.interval, self.peak, self.start = interval, 0, 0
        self._stop = threading.Event()
        self._thread = None

    @staticmethod
    def rss() -> int:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):
            return 0

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self.rss())

    def __enter__(self) -> "MemorySampler":
        self.start = self.peak = self.rss()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())


def ru_maxrss_bytes() -> int:
    """The process's peak RSS so far (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if platform.system() == "Darwin" else peak * 1024)


def machine_info() -> dict:
    """CPU model, cores, memory, GPU, library versions and git commit: what a result was measured on."""
    import diffusers
    import peft

    cpu = platform.processor() or platform.machine()
    mem = None
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
        with open("/proc/meminfo") as f:
            mem = next((int(line.split()[1]) * 1024 for line in f if line.startswith("MemTotal")), None)
    except OSError:
        pass
    commit = None
    try:
        import subprocess

        commit = subprocess.run(["git", "-C", REPO_ROOT, "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu, "cores": cores, "torch_threads": torch.get_num_threads(),
            "memory_gb": round(mem / 2**30, 1) if mem else None, "gpu": gpu,
            "gpu_memory_gb": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1) if gpu else None,
            "torch": torch.__version__, "cuda": torch.version.cuda, "diffusers": diffusers.__version__,
            "peft": peft.__version__, "python": platform.python_version(), "platform": platform.platform(),
            "flowalign_commit": commit}


def describe_machine(m: dict) -> str:
    """One line, e.g. '2-core Intel Xeon ..., 8 GB RAM, no GPU; torch 2.13.0, 1 thread'."""
    gpu = f"{m['gpu']} ({m['gpu_memory_gb']} GB)" if m.get("gpu") else "no GPU"
    mem = f", {m['memory_gb']} GB RAM" if m.get("memory_gb") else ""
    return (f"{m['cores']}-core {m['cpu']}{mem}, {gpu}; torch {m['torch']}, {m['torch_threads']} "
            f"thread{'s' if m['torch_threads'] != 1 else ''}")


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
    rec["overhead_s"] = busy - network
    rec["overhead_frac"] = rec["overhead_s"] / busy if busy > 0 else 0.0
    return rec


def _mean_cost(records: list[dict]) -> dict:
    """Mean of the numeric fields, skipping the first (warm-up) iteration when there are two or more."""
    use = records[1:] if len(records) > 1 else records
    keys = [k for k, v in use[0].items() if isinstance(v, (int, float)) and k not in ("iteration", "samples")]
    out = {k: sum(r[k] or 0 for r in use) / len(use) for k in keys}
    busy = out["time_rollout"] + out["time_update"]
    out["overhead_frac"] = out["overhead_s"] / busy if busy > 0 else 0.0  # ratio of the means
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
    from ..runtime.metrics import remove_logs
    from ..trainer import Trainer

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
    from ..config import load_config, parse_overrides, with_overrides

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
    from ..rewards import get as get_reward

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


# ---- reports ----------------------------------------------------------------------------------------------


def plot_sample_efficiency(report: dict, path: str) -> None:
    """2 x 2 panels: held-out trained reward (top) and untrained clip_score (bottom) vs reward queries (left)
    and vs training wall time (right), one line per algorithm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(10, 7), sharey="row")
    for alg, r in report["algorithms"].items():
        c = r["curve"]
        g = r["settings"]["eval_guidance_scale"]
        for row, key in enumerate(("heldout", UNTRAINED_REWARD)):
            ys = [p[key] for p in c]
            if any(y is None for y in ys):
                continue
            for col, x in enumerate(("samples", "wall_s")):
                axes[row, col].plot([p[x] for p in c], ys, "o-", label=f"{alg} (eval CFG {g:g})")
    metric = next(iter(report["algorithms"].values()))["heldout_metric"]
    for col, xlabel in enumerate(("reward queries (samples scored)", "training wall time [s]")):
        axes[1, col].set_xlabel(xlabel)
    axes[0, 0].set_ylabel(f"held-out {metric} (trained)")
    axes[1, 0].set_ylabel(f"held-out {UNTRAINED_REWARD} (not trained on)")
    for ax in axes.flat:
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=8)
    fig.suptitle(f"sample efficiency: {describe_machine(report['machine'])}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


COST_PARTS = (  # (label, function of the mean cost record), stacked in this order
    ("denoiser fwd (rollout)", lambda m: m["denoiser_fwd_s_rollout"]),
    ("denoiser fwd (update)", lambda m: m["denoiser_fwd_s_update"] + m["denoiser_fwd_s_reward"]),
    ("denoiser bwd", lambda m: m["denoiser_bwd_s"]),
    ("VAE decode", lambda m: m["vae_decode_s"] + m["vae_decode_s_reward"]),
    ("text encoders", lambda m: m["text_encoder_s"] + m["text_encoder_s_reward"]),
    ("reward model", lambda m: m["time_reward"] - m["vae_decode_s_reward"] - m["text_encoder_s_reward"]
     - m["denoiser_fwd_s_reward"]),
    ("flowalign overhead", lambda m: m["overhead_s"]),
)


def plot_cost_breakdown(report: dict, path: str) -> None:
    """Stacked bars: mean seconds per iteration by component (COST_PARTS), overhead % on top of each bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    algs = list(report["algorithms"])
    fig, ax = plt.subplots(figsize=(1.6 * len(algs) + 4, 4.5))
    bottom = [0.0] * len(algs)
    for label, part in COST_PARTS:
        vals = [max(part(report["algorithms"][a]["mean_cost"]), 0.0) for a in algs]
        ax.bar(algs, vals, bottom=bottom, label=label, width=0.6)
        bottom = [b + v for b, v in zip(bottom, vals)]
    for i, a in enumerate(algs):
        ax.text(i, bottom[i], f"overhead {100 * report['algorithms'][a]['mean_cost']['overhead_frac']:.1f}%",
                ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("seconds per iteration (mean)")
    ax.set_ylim(0, max(bottom) * 1.15 if max(bottom) > 0 else 1)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    ax.set_title(f"per-iteration cost: {describe_machine(report['machine'])}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _mb(pm: dict) -> str:
    if pm.get("cuda_max_allocated_mb") is not None:
        return f"{pm['cuda_max_allocated_mb'] / 1024:.1f} GB (CUDA)"
    return f"{pm['rss_peak_mb']:.0f} MB (RSS)"


def _short_path(path: str) -> str:
    """A path inside the repository relative to it (assets/toy-sd3), anything else unchanged."""
    full = os.path.abspath(path)
    return os.path.relpath(full, REPO_ROOT) if full.startswith(REPO_ROOT + os.sep) else path


def markdown_table(report: dict) -> str:
    """bench.md: the results table (one row per algorithm), the machine and the command, ready for the README."""
    rows = ["| method | eval CFG | held-out {m} base → final | {u} (not trained) base → final | reward queries | "
            "train wall | s/iter rollout / reward / update | denoiser calls (rows) per iter | overhead | peak memory |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    metric = None
    for alg, r in report["algorithms"].items():
        metric = r["heldout_metric"]
        m, s = r["mean_cost"], r["settings"]
        calls = m["denoiser_calls_rollout"] + m["denoiser_calls_update"]
        rows_ = m["denoiser_rows_rollout"] + m["denoiser_rows_update"]
        u0, u1 = r["base"].get(UNTRAINED_REWARD), r["final"].get(UNTRAINED_REWARD)
        untrained = f"{u0:.3f} → {u1:.3f}" if u0 is not None and u1 is not None else "-"
        rows.append(
            f"| {alg} | {s['eval_guidance_scale']:g} | {r['base'][metric]:.3f} → {r['final'][metric]:.3f} | "
            f"{untrained} | {r['samples']} | {r['train_wall_s']:.0f} s | "
            f"{m['time_iter']:.2f} = {m['time_rollout']:.2f} / {m['time_reward']:.2f} / {m['time_update']:.2f} | "
            f"{calls:.0f} ({rows_:.0f}) | {100 * m['overhead_frac']:.1f}% | {_mb(r['peak_memory'])} |")
    head = rows[0].format(m=metric, u=UNTRAINED_REWARD)
    n = next(iter(report["algorithms"].values()))["settings"]["eval_images"]
    lines = [head, *rows[1:], "",
             f"Machine: {describe_machine(report['machine'])}. Model: `{_short_path(report['model'])}`; "
             f"seed {report['seed']}; held-out evaluation on {n} images every {report['eval_every']} iterations "
             f"(each recipe's own eval CFG). Overhead = (rollout + update) - denoiser fwd/bwd - VAE decode - text "
             f"encoders, as a fraction of rollout + update; means skip the warm-up iteration."]
    if report.get("command"):
        lines += ["", f"Reproduce: `{report['command']}`"]
    return "\n".join(lines) + "\n"


# ---- GPU scale ----------------------------------------------------------------------------------------------

# Transformer configs with random weights (no download). Values from the published diffusers configs:
# stabilityai/stable-diffusion-3.5-medium transformer/config.json (MMDiT-X, 2.5B) and
# black-forest-labs/FLUX.1-dev transformer/config.json (12B).
SCALE_CONFIGS = {
    "sd35m": ("SD3Transformer2DModel", "sd3", {
        "sample_size": 128, "patch_size": 2, "in_channels": 16, "out_channels": 16, "num_layers": 24,
        "attention_head_dim": 64, "num_attention_heads": 24, "joint_attention_dim": 4096,
        "caption_projection_dim": 1536, "pooled_projection_dim": 2048, "pos_embed_max_size": 384,
        "dual_attention_layers": list(range(13)), "qk_norm": "rms_norm"}),
    "flux": ("FluxTransformer2DModel", "flux", {
        "patch_size": 1, "in_channels": 64, "num_layers": 19, "num_single_layers": 38, "attention_head_dim": 128,
        "num_attention_heads": 24, "joint_attention_dim": 4096, "pooled_projection_dim": 768,
        "guidance_embeds": True, "axes_dims_rope": [16, 56, 56]}),
}
# Text tokens the adapters feed: SD3 77 CLIP + 256 T5 (SD3Adapter's max_sequence_length); FLUX 512 T5.
SCALE_TEXT_TOKENS = {"sd35m": 333, "flux": 512}
# The same structure, a few thousand times smaller: for tests on a CPU.
SCALE_SHRINK = {
    "sd35m": {"num_layers": 2, "attention_head_dim": 8, "num_attention_heads": 2, "joint_attention_dim": 16,
              "caption_projection_dim": 16, "pooled_projection_dim": 16, "pos_embed_max_size": 16,
              "dual_attention_layers": [0]},
    "flux": {"num_layers": 1, "num_single_layers": 1, "attention_head_dim": 16, "num_attention_heads": 2,
             "joint_attention_dim": 16, "pooled_projection_dim": 16, "axes_dims_rope": [4, 6, 6]},
}


def scale_config(name: str, shrink: bool = False) -> tuple[str, str, dict]:
    """(diffusers class name, flowalign family, config kwargs) of ``name`` (sd35m | flux); ``shrink``: the
    tiny same-structure variant used by the tests."""
    if name not in SCALE_CONFIGS:
        raise ValueError(f"unknown --scale {name!r}; choose from {', '.join(SCALE_CONFIGS)}")
    cls, family, cfg = SCALE_CONFIGS[name]
    return cls, family, {**cfg, **(SCALE_SHRINK[name] if shrink else {})}


def build_transformer(name: str, shrink: bool = False, device="cpu", dtype: torch.dtype = torch.bfloat16):
    """The transformer of ``name`` with random weights, created directly on ``device`` in ``dtype``
    (``device="meta"``: no memory, e.g. to count parameters)."""
    import diffusers

    cls, _, cfg = scale_config(name, shrink)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = getattr(diffusers, cls)(**cfg)
    finally:
        torch.set_default_dtype(previous)
    if str(device) != "meta":
        model.to(device)  # buffers built from numpy (SD3's pos_embed) start on the CPU
    return model.eval()


def scale_inputs(name: str, model, batch: int, resolution: int, text_tokens: Optional[int] = None,
                 device="cpu", dtype: torch.dtype = torch.bfloat16) -> dict:
    """Random denoiser kwargs for ``batch`` images of ``resolution`` px (VAE factor 8, 16 latent channels) as
    flowalign's adapters pass them: SD3 latents [B, 16, r/8, r/8]; FLUX packed [B, (r/16)^2, 64] with its ids."""
    cfg = model.config
    h = resolution // 8
    n_txt = text_tokens or SCALE_TEXT_TOKENS[name]
    g = torch.Generator().manual_seed(0)
    rand = lambda *shape: torch.randn(*shape, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    txt = rand(batch, n_txt, cfg.joint_attention_dim)
    pooled = rand(batch, cfg.pooled_projection_dim)
    if name == "sd35m":
        return {"hidden_states": rand(batch, cfg.in_channels, h, h), "encoder_hidden_states": txt,
                "pooled_projections": pooled, "timestep": torch.full((batch,), 500.0, device=device),
                "return_dict": False}
    side = h // 2
    img_ids = torch.zeros(side, side, 3)
    img_ids[..., 1] = torch.arange(side)[:, None]
    img_ids[..., 2] = torch.arange(side)[None, :]
    kwargs = {"hidden_states": rand(batch, side * side, cfg.in_channels), "encoder_hidden_states": txt,
              "pooled_projections": pooled, "timestep": torch.full((batch,), 0.5, device=device, dtype=dtype),
              "img_ids": img_ids.reshape(-1, 3).to(device=device, dtype=dtype),
              "txt_ids": torch.zeros(n_txt, 3, device=device, dtype=dtype), "return_dict": False}
    if cfg.guidance_embeds:
        kwargs["guidance"] = torch.full((batch,), 3.5, device=device, dtype=torch.float32)
    return kwargs


def time_train_step(model, inputs: dict, params: Sequence[torch.nn.Parameter], repeats: int = 3,
                    warmup: int = 1) -> dict:
    """Mean seconds of one no-grad forward (sampling) and of one forward + backward (training) through
    ``model`` on ``inputs``, with peak CUDA memory of each (None on CPU). Loss = mean(out^2)."""
    cuda = next(model.parameters()).device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def timed(train: bool) -> tuple[float, Optional[float]]:
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        for i in range(warmup + repeats):
            if i == warmup:
                sync()
                t0 = time.perf_counter()
            with torch.set_grad_enabled(train):
                out = model(**inputs)[0]
                if train:
                    out.float().pow(2).mean().backward()
                    for p in params:
                        p.grad = None
            del out
        sync()
        return (time.perf_counter() - t0) / repeats, (torch.cuda.max_memory_allocated() / 2**30 if cuda else None)

    fwd_s, fwd_mem = timed(False)
    train_s, train_mem = timed(True)
    return {"forward_s": fwd_s, "forward_peak_gb": fwd_mem, "train_step_s": train_s, "train_peak_gb": train_mem}


def run_scale(name: str, resolution: int = 512, batch: int = 1, rank: int = 32, repeats: int = 3,
              device="cuda", dtype: torch.dtype = torch.bfloat16, shrink: bool = False,
              num_steps: int = 10) -> dict:
    """LoRA (``LORA_TARGET_MODULES[family]``, float32 params on a ``dtype`` base, as ``set_precision``) on the
    transformer of ``name``: forward and forward + backward timings and peak memory, without and with gradient
    checkpointing. ``samples_per_s`` = batch / seconds per call; ``rollout_images_per_s`` = forward
    samples/s / (num_steps x CFG passes): whole images sampled per second at ``num_steps`` steps."""
    from peft import LoraConfig

    from ..runtime.kernels import avoid_cudnn_attention
    from ..lora import LORA_TARGET_MODULES

    _, family, _ = scale_config(name, shrink)
    avoid_cudnn_attention(device)  # cuDNN attention's backward failed on FLUX shapes (flowalign.runtime.kernels)
    model = build_transformer(name, shrink, device, dtype)
    model.requires_grad_(False)
    model.add_adapter(LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=LORA_TARGET_MODULES[family]))
    params = [p for n, p in model.named_parameters() if "lora_" in n]
    for p in params:
        p.data = p.data.float()
        p.requires_grad_(True)
    inputs = scale_inputs(name, model, batch, resolution, device=device, dtype=dtype)
    cfg_passes = 2 if family == "sd3" else 1  # FLUX.1-dev is guidance-distilled: one pass per step
    out = {"model": name, "class": type(model).__name__, "resolution": resolution, "batch": batch,
           "params_b": sum(p.numel() for p in model.parameters()) / 1e9,
           "lora_params_m": sum(p.numel() for p in params) / 1e6, "dtype": str(dtype).replace("torch.", ""),
           "lora_rank": rank, "num_steps": num_steps, "cfg_passes": cfg_passes, "runs": {}}
    for ckpt in (False, True):
        if ckpt:
            model.enable_gradient_checkpointing()
        else:
            model.disable_gradient_checkpointing()
        t = time_train_step(model, inputs, params, repeats=repeats)
        t["train_samples_per_s"] = batch / t["train_step_s"]
        t["forward_samples_per_s"] = batch / t["forward_s"]
        t["rollout_images_per_s"] = t["forward_samples_per_s"] / (num_steps * cfg_passes)
        out["runs"]["checkpointing" if ckpt else "no_checkpointing"] = t
    return out


def bench_scale(names: Sequence[str], out: str, resolution: int = 512, batch: int = 1, rank: int = 32,
                repeats: int = 3, command: Optional[str] = None, log: Callable[[str], None] = print) -> dict:
    """``run_scale`` for each name on the GPU; writes ``scale.json`` and ``scale.md`` into ``out``."""
    if not torch.cuda.is_available():
        raise RuntimeError("--scale needs a CUDA GPU (torch.cuda.is_available() is False): run it on a GPU "
                           "machine with a CUDA build of torch, or drop --scale")
    os.makedirs(out, exist_ok=True)
    results = []
    for name in names:
        scale_config(name)  # fail on a bad name before building anything
    for name in names:
        log(f"bench --scale {name}: {resolution}px, batch {batch}, LoRA r{rank}")
        results.append(run_scale(name, resolution, batch, rank, repeats))
        torch.cuda.empty_cache()
    report = {"machine": machine_info(), "command": command, "results": results}
    with open(os.path.join(out, "scale.json"), "w") as f:
        json.dump(report, f, indent=1)
    with open(os.path.join(out, "scale.md"), "w") as f:
        f.write(scale_markdown(report))
    return report


def scale_markdown(report: dict) -> str:
    lines = ["| transformer | params | grad. checkpointing | train step (fwd+bwd) | train samples/s | "
             "peak memory (train) | forward samples/s | images/s (sampling) |", "|---|---|---|---|---|---|---|---|"]
    for r in report["results"]:
        for key, t in r["runs"].items():
            lines.append(f"| {r['model']} ({r['resolution']}px, batch {r['batch']}, {r['dtype']}, LoRA r{r['lora_rank']})"
                         f" | {r['params_b']:.2f}B | {'yes' if key == 'checkpointing' else 'no'} | "
                         f"{t['train_step_s'] * 1000:.0f} ms | {t['train_samples_per_s']:.2f} | "
                         f"{t['train_peak_gb']:.1f} GB | {t['forward_samples_per_s']:.2f} | "
                         f"{t['rollout_images_per_s']:.2f} ({r['num_steps']} steps x {r['cfg_passes']} CFG) |")
    lines += ["", f"Machine: {describe_machine(report['machine'])}. Random weights, real configs."]
    if report.get("command"):
        lines += ["", f"Reproduce: `{report['command']}`"]
    return "\n".join(lines) + "\n"
