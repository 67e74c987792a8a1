"""f-divergence trade-off (docs/math.md §6): quality vs diversity of 2-step students distilled from the shipped
pipeline.

    python scripts/fdiv_tradeoff.py --out fdiv_out --iterations 500 --threads 2

For each divergence (default reverse_kl, forward_kl, js) a fresh copy of the pipeline is distilled with
``flowalign.distill`` (configs/toy_fdistill.yaml + the flags + any ``section.key=value`` overrides) for
``--iterations`` iterations, all from the SAME teacher samples (drawn once) and the same seed. Then:

- quality: held-out toy_geneval (flowalign.evaluation.heldout.HeldoutEval on 'toy': ``--eval-per-task`` images per GenEval
  task, the toy world's held-out prompts, fixed seeds), the student sampled at S steps with CFG 1;
- diversity: for ``--div-prompts`` held-out prompts (one per GenEval task, cycled), ``--div-seeds`` samples each
  with different seeds; the mean over prompts of the mean pairwise RMS pixel distance
  ``sqrt(mean_d (x_i - x_j)^2)`` between them (``flowalign.distill.mean_pairwise_distance``; 0 = one image
  per prompt, i.e. mode collapse). Pixel distance is chosen over detected-layout entropy because it also sees
  colour / size / position changes the toy detector bins away, and needs no detector threshold.

References on the same prompts and seeds: the teacher (distill.teacher_steps ODE steps, teacher CFG) and the
undistilled base at S steps (CFG 1 and teacher CFG). Writes ``fdiv_tradeoff.json`` (every number, settings, timings),
``fdiv_tradeoff.png`` (diversity vs toy_geneval, one point per model) and ``samples.png`` (one prompt, the
diversity seeds, one row per model); each student's run folder ``<out>/<divergence>/`` (metrics.jsonl, lora/).

Cost on the shipped pipeline, measured as CPU time on ONE thread (the machine was busy, so wall time was not
measurable): 0.31 s per iteration at the default batch of 16 rows (student 2-step sample, fake-score and
discriminator step, a student step every 5th iteration), 4.2 s per 64 teacher samples (10 steps, CFG), a few
seconds of evaluation per model (the teacher reference ~10 s). The default 500 iterations are therefore ~2.6 min
per divergence on one free core (less with --threads 2), ~9 min for the three divergences with the references.
Smoke run (~20 s CPU): ``--iterations 5 --real-samples 16 --eval-per-task 2 --div-prompts 2 --div-seeds 3
distill.generator_every=2``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIG = os.path.join(ROOT, "configs", "toy_fdistill.yaml")


def evaluate(pipe, steps: int, guidance: float, args, div_prompts: list[str]) -> tuple[dict, torch.Tensor]:
    """Held-out toy_geneval and diversity of ``pipe`` sampled at (steps, guidance) -> (scores, diversity images
    [P, M, 3, H, W])."""
    from flowalign.distill import mean_pairwise_distance
    from flowalign.evaluation.sampling import sample_images
    from flowalign.evaluation.heldout import HeldoutEval

    t0 = time.time()
    heldout = HeldoutEval(["toy"], args.eval_per_task, steps, guidance)
    scores, _ = heldout(pipe)
    m = args.div_seeds
    rows = [p for p in div_prompts for _ in range(m)]  # image i has seed DIV_SEED + i: distinct seeds per prompt
    images = sample_images(pipe, rows, args.div_seed, steps, guidance, desc="diversity")
    images = images.view(len(div_prompts), m, *images.shape[1:])
    per_prompt = [mean_pairwise_distance(images[i]) for i in range(len(div_prompts))]
    out = {"toy_geneval": scores["toy_geneval"], "toy_geneval_strict": scores["toy_geneval_strict"],
           "per_task": {k.split("/", 1)[1]: v for k, v in scores.items() if k.startswith("toy_geneval/")},
           "diversity": float(np.mean(per_prompt)), "diversity_per_prompt": per_prompt, "steps": steps,
           "guidance_scale": guidance, "n_eval": scores["n"], "time_eval": time.time() - t0}
    return out, images


def plot(models: dict, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, m in models.items():
        student = name.startswith("student")
        ax.plot(m["diversity"], m["toy_geneval"], "o" if student else "s", ms=8 if student else 6,
                color=None if student else "gray")
        ax.annotate(name, (m["diversity"], m["toy_geneval"]), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.set_xlabel("diversity: mean pairwise RMS pixel distance (same prompt, different seeds)")
    ax.set_ylabel("held-out toy_geneval")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="fdiv_out", help="output folder (created)")
    ap.add_argument("--config", default=DEFAULT_CONFIG, help="f-distill recipe (default configs/toy_fdistill.yaml)")
    ap.add_argument("--divergences", default="reverse_kl,forward_kl,js", help="comma-separated (fdistill table)")
    ap.add_argument("--iterations", type=int, default=500, help="the budget: f-distill iterations per divergence "
                                                                 "(a student step every distill.generator_every)")
    ap.add_argument("--student-steps", type=int, default=2, help="S: the student's sampling steps")
    ap.add_argument("--real-samples", type=int, default=None, help="teacher samples (default: the config's)")
    ap.add_argument("--eval-per-task", type=int, default=16, help="held-out images per toy GenEval task")
    ap.add_argument("--div-prompts", type=int, default=6, help="held-out prompts for the diversity measure")
    ap.add_argument("--div-seeds", type=int, default=8, help="samples (seeds) per diversity prompt")
    ap.add_argument("--div-seed", type=int, default=20_000, help="first seed of the diversity samples")
    ap.add_argument("--seed", type=int, default=0, help="train.seed of every run (teacher samples use it too)")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides for every run")
    args = ap.parse_args(argv)

    from flowalign import lora
    from flowalign.config import load_config, with_overrides
    from flowalign.distill import STUDENT, run_distill, teacher_samples
    from flowalign.evaluation.sampling import heldout_prompts
    from flowalign.models import load_adapter
    from flowalign.prompts import PromptSource
    from flowalign.evaluation.report import image_grid

    torch.set_num_threads(args.threads)
    t_start = time.time()
    os.makedirs(args.out, exist_ok=True)
    extra = [f"train.iterations={args.iterations}", f"distill.student_steps={args.student_steps}",
             f"train.seed={args.seed}"]
    if args.real_samples is not None:
        extra.append(f"distill.real_samples={args.real_samples}")
    cfg = load_config(args.config, extra + list(args.overrides))
    d, s_steps = cfg.distill, cfg.distill.student_steps
    divergences = [x for x in args.divergences.split(",") if x]
    for name in divergences:
        with_overrides(cfg, {"distill.divergence": name})  # fail fast on a bad name

    base = load_adapter(cfg.model.path, family=cfg.model.family)
    t0 = time.time()
    real_prompts = PromptSource(cfg.train.prompts).sample(d.real_samples, np.random.default_rng(args.seed + 1))
    real = teacher_samples(base, real_prompts, d.teacher_steps, d.teacher_guidance_scale,
                           torch.Generator().manual_seed(args.seed + 1), cfg.sampling.resolution)
    time_real = time.time() - t0
    pool = heldout_prompts(1)
    div_prompts = [pool[i % len(pool)] for i in range(args.div_prompts)]

    models, sample_rows = {}, {}
    g_t = d.teacher_guidance_scale
    refs = {f"teacher {d.teacher_steps} steps cfg {g_t:g}": (d.teacher_steps, g_t),
            f"base {s_steps} steps cfg 1": (s_steps, 1.0),
            f"base {s_steps} steps cfg {g_t:g}": (s_steps, g_t)}
    for name, (steps, g) in refs.items():
        models[name], images = evaluate(base.pipe, steps, g, args, div_prompts)
        sample_rows[name] = images[0]
        print(f"{name}: toy_geneval {models[name]['toy_geneval']:.3f}, diversity {models[name]['diversity']:.4f}")
    del base

    for name in divergences:
        run_cfg = with_overrides(cfg, {"distill.divergence": name, "train.out_dir": os.path.join(args.out, name)})
        adapter = load_adapter(cfg.model.path, family=cfg.model.family)
        summary = run_distill(run_cfg, adapter, real=real, real_prompts=real_prompts)
        with lora.using_adapter(adapter, STUDENT):
            scores, images = evaluate(adapter.pipe, s_steps, 1.0, args, div_prompts)
        hist = [json.loads(line) for line in open(summary["metrics"])]
        gen = [m for m in hist if "loss_gen" in m]
        key = f"student {name}"
        models[key] = {**scores, "iterations": summary["iterations"], "generator_steps": summary["generator_steps"],
                       "time_train": summary["wall_s"], "lora": summary["lora"],
                       "h_std_mean": float(np.mean([m["h_std"] for m in gen])) if gen else None,
                       "final": {k: v for k, v in summary["final"].items() if isinstance(v, (int, float))}}
        sample_rows[key] = images[0]
        print(f"{key}: toy_geneval {scores['toy_geneval']:.3f}, diversity {scores['diversity']:.4f} "
              f"({summary['wall_s']:.0f}s distill)")
        del adapter

    result = {"command": "python scripts/fdiv_tradeoff.py " + shlex.join(sys.argv[1:] if argv is None else argv),
              "settings": {"iterations": args.iterations, "student_steps": s_steps, "divergences": divergences,
                           "batch": cfg.train.prompts_per_iter * cfg.train.group_size, "real_samples": d.real_samples,
                           "teacher_steps": d.teacher_steps, "teacher_guidance_scale": d.teacher_guidance_scale,
                           "generator_every": d.generator_every, "eval_per_task": args.eval_per_task,
                           "div_prompts": div_prompts, "div_seeds": args.div_seeds, "seed": args.seed,
                           "threads": args.threads, "diversity": "mean pairwise RMS pixel distance, same prompt"},
              "models": models, "time_real_samples": time_real, "time_total": time.time() - t_start}
    with open(os.path.join(args.out, "fdiv_tradeoff.json"), "w") as f:
        json.dump(result, f, indent=2)
    plot(models, os.path.join(args.out, "fdiv_tradeoff.png"),
         f"{s_steps}-step students, {args.iterations} iterations: quality vs diversity")
    image_grid(list(sample_rows.values()), [k.replace("student ", "") for k in sample_rows],
               [f"seed {args.div_seed + i}" for i in range(args.div_seeds)], os.path.join(args.out, "samples.png"))
    print(f"wrote {args.out}/fdiv_tradeoff.json, fdiv_tradeoff.png, samples.png in {result['time_total']:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
