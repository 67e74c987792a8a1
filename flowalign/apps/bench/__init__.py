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
    two phases, ``overhead_frac = overhead / (rollout + update)`` (the reward is left out) and
    ``network_limit_ratio = (rollout + update) / networks``, the iteration's time over its network-only limit
    (1 = nothing but the networks; the table's "x network-only"). The overhead
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

from .efficiency import (
    DEFAULT_ALGORITHMS,
    BenchRecorder,
    bench_algorithm,
    bench_configs,
    recipe_path,
    run_bench,
)
from .meters import MemorySampler, NetworkMeter, describe_machine, machine_info, ru_maxrss_bytes
from .report import UNTRAINED_REWARD, markdown_table, plot_cost_breakdown, plot_sample_efficiency
from .scale import bench_scale, build_transformer, run_scale, scale_config, scale_inputs, scale_markdown, time_train_step

__all__ = [
    "DEFAULT_ALGORITHMS", "UNTRAINED_REWARD", "BenchRecorder", "MemorySampler", "NetworkMeter", "bench_algorithm",
    "bench_configs", "bench_scale", "build_transformer", "describe_machine", "machine_info", "markdown_table",
    "plot_cost_breakdown", "plot_sample_efficiency", "recipe_path", "ru_maxrss_bytes", "run_bench", "run_scale",
    "scale_config", "scale_inputs", "scale_markdown", "time_train_step",
]
