"""Command-line entry point: ``flowalign <command> ...``. Thin: parses flags and calls the library."""

from __future__ import annotations

import argparse
import os
import sys


def _demo(args: argparse.Namespace) -> int:
    from .config import DEFAULT_MODEL
    from .apps.demo import DEMO_CONFIG, run_demo

    run_demo(args.out, seed=args.seed, steps=args.steps, quick=args.quick, model=args.model or DEFAULT_MODEL,
             config=args.config or DEMO_CONFIG, resume=args.resume)
    return 0


def _sample(args: argparse.Namespace) -> int:
    from .apps.sample import parse_scales, rlg_sweep, sample_png

    scales = parse_scales(args.rlg_scale)
    kw = dict(model=args.model, lora_dir=args.lora, seed=args.seed, steps=args.steps,
              guidance_scale=args.guidance_scale, device=args.device, dtype=args.dtype)
    if len(scales) > 1 or args.reward:
        if not args.reward:
            raise ValueError("several --rlg-scale values make a sweep: add --reward NAME to score them")
        rlg_sweep(args.out or "rlg_sweep", scales, args.reward, prompts=args.prompts,
                  num_images=args.num_images or 24, **kw)
        print(f"wrote {args.out or 'rlg_sweep'}/rlg_sweep.json and rlg_sweep.png")
        return 0
    if not args.prompt:
        raise ValueError("--prompt is required for a single --rlg-scale (or give --reward for a sweep)")
    out = sample_png(args.out or "rlg.png", args.prompt, scales[0], num_images=args.num_images or 1, **kw)
    print(f"wrote {out}")
    return 0


def _train(args: argparse.Namespace) -> int:
    from .config import load_config
    from .trainer import run_training

    cfg = load_config(args.config, args.overrides + (["train.resume=true"] if args.resume else []))
    summary = run_training(cfg)
    if not summary["main"]:  # distributed: rank 0 reports
        return 0
    final = summary["final"]
    reward = final.get("reward_mean")
    print(f"{cfg.train.algorithm}: {summary['iterations']} iterations, {summary['samples']} samples in "
          f"{summary['wall_s']:.0f}s" + (f", last reward_mean {reward:.4f}" if reward is not None else "")
          + f"; wrote {summary['metrics']}, {summary['lora']}, {summary['plot']}")
    key, base, aligned = summary["headline"], summary["base"], summary["aligned"]
    if key:
        print(f"held-out {key}: base {base[key]:.3f} -> aligned {aligned[key]:.3f} (n={aligned['n']}; "
              f"{os.path.join(cfg.train.out_dir, 'evals.jsonl')})")
    return 0


def _distill(args: argparse.Namespace) -> int:
    from .config import load_config
    from .distill import run_distill

    cfg = load_config(args.config, args.overrides)
    s = run_distill(cfg)
    print(f"f-distill ({cfg.distill.divergence}, {cfg.distill.student_steps}-step student): {s['iterations']} "
          f"iterations, {s['generator_steps']} student steps in {s['wall_s']:.0f}s; "
          f"wrote {s['metrics']}, {s['lora']}, {s['samples']}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    import shlex

    from .apps.bench import bench_scale, run_bench

    command = "flowalign " + shlex.join(args.argv)
    if args.scale:
        try:
            bench_scale(args.scale.split(","), args.out, resolution=args.scale_resolution, batch=args.scale_batch,
                        rank=args.scale_rank, command=command)
        except RuntimeError as err:  # no GPU
            print(f"flowalign: error: {err}", file=sys.stderr)
            return 2
        print(f"wrote {args.out}/scale.json and scale.md")
        return 0
    configs = {}
    for item in args.config:
        alg, eq, path = item.partition("=")
        if not eq or not alg or not path:
            raise ValueError(f"--config {item!r} must look like ALGORITHM=PATH, e.g. --config nft=configs/toy_nft.yaml")
        configs[alg] = path
    samples = args.budget_samples if args.budget_samples or args.budget_seconds else 3840
    run_bench(args.out, [a for a in args.algorithms.split(",") if a], budget_samples=samples,
              budget_seconds=args.budget_seconds, configs=configs, overrides=args.overrides, model=args.model,
              seed=args.seed, eval_every=args.eval_every, eval_per_task=args.eval_per_task,
              clip_model=args.clip_model, command=command)
    print(f"wrote {args.out}/bench.json, bench.md, sample_efficiency.png, cost_breakdown.png")
    return 0


def _device_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--dtype", default="float32",
                        help="float32 | bfloat16: weights and activations of the whole pipeline (default float32)")


def _options(items: list[str]) -> dict:
    """['model=tiny', 'k=1'] -> {'model': 'tiny', 'k': 1} (values read as YAML)."""
    import yaml

    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--reward-option {item!r} must look like key=value")
        out[key] = yaml.safe_load(value)
    return out


def _eval(args: argparse.Namespace) -> int:
    from .apps.eval import evaluate_loras

    result = evaluate_loras(args.lora, args.model, prompts=args.prompts, per_task=args.per_task, steps=args.steps,
                            guidance_scale=args.guidance_scale, out=args.out, reward=args.reward,
                            reward_options=_options(args.reward_option), device=args.device, dtype=args.dtype)
    keys = sorted({k for s in result["scores"].values() for k in s if isinstance(s[k], float) and k != "time_eval"
                   and not k.startswith("toy_check/")})  # the per-check pass rates: in --out's JSON
    print("| weights | " + " | ".join(keys) + " |")
    print("|---" * (len(keys) + 1) + "|")
    for name, s in result["scores"].items():
        print(f"| {name} | " + " | ".join(f"{s[k]:.3f}" if k in s else "" for k in keys) + " |")
    if args.out:
        print(f"wrote {args.out}")
    return 0


def _gradio(args: argparse.Namespace) -> int:
    try:
        from .apps.gradio_app import launch
        import gradio  # noqa: F401
    except ImportError as err:
        print(f"flowalign: error: {err}", file=sys.stderr)
        return 2
    launch(model=args.model, lora_dir=args.lora, host=args.host, port=args.port, device=args.device,
           dtype=args.dtype)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flowalign", description="Align diffusion/flow generators to rewards.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="align the shipped pipeline (CRD) and write a report folder")
    demo.add_argument("--out", default="demo_out", help="report folder (created)")
    demo.add_argument("--steps", type=int, default=None, help="training iterations (default: the fixed demo budget)")
    demo.add_argument("--seed", type=int, default=0, help="random seed")
    demo.add_argument("--quick", action="store_true", help="a <= 2-minute smoke run")
    demo.add_argument("--model", default=None, help="pipeline folder or hub id (default: the shipped one)")
    demo.add_argument("--config", default=None, help="recipe YAML, any algorithm (default: configs/toy_demo.yaml)")
    demo.add_argument("--resume", action="store_true", help="continue a killed demo from its newest checkpoint")
    demo.set_defaults(func=_demo)

    from .config import DEFAULT_MODEL

    sample = sub.add_parser("sample", help="sample with RL guidance (one scale -> PNG; several -> reward sweep)")
    sample.add_argument("--model", default=DEFAULT_MODEL, help="pipeline folder or hub id (default: the shipped one)")
    sample.add_argument("--lora", default="demo_out/lora", help="LoRA folder (default: the one `flowalign demo` writes)")
    sample.add_argument("--rlg-scale", default="1.0",
                        help="w (0 = base, 1 = fine-tuned, >1 stronger) or a list like 0,0.5,1,1.5,2 for a sweep")
    sample.add_argument("--prompt", default=None, help="prompt (single scale)")
    sample.add_argument("--reward", default=None, help="reward name for a sweep (e.g. toy_geneval)")
    sample.add_argument("--prompts", default=None, help="sweep prompts: text file, one a line (default: toy held-out)")
    sample.add_argument("--out", default=None, help="PNG file (single scale, default rlg.png) or sweep folder "
                                                    "(default rlg_sweep)")
    sample.add_argument("--seed", type=int, default=0, help="image i uses seed + i")
    sample.add_argument("--steps", type=int, default=20, help="denoising steps")
    sample.add_argument("--guidance-scale", type=float, default=4.5, help="CFG scale")
    _device_flags(sample)
    sample.add_argument("--num-images", type=int, default=None, help="images (single: default 1; sweep: per "
                                                                     "scale, default 24)")
    sample.set_defaults(func=_sample)

    ev = sub.add_parser("eval", help="held-out scores of the base and LoRA folders on the same prompts and seeds")
    ev.add_argument("lora", nargs="*", help="LoRA folders (written by flowalign train / demo)")
    ev.add_argument("--model", default=DEFAULT_MODEL, help="pipeline folder or hub id (default: the shipped one)")
    ev.add_argument("--prompts", default="toy", help="toy spec (toy, toy:position,...) or a prompt file")
    ev.add_argument("--reward", default=None, help="reward name for a prompt file's prompts (toy specs use the "
                                                   "toy world's rewards; a name here is added to them)")
    ev.add_argument("--reward-option", action="append", default=[], metavar="KEY=VALUE",
                    help="option of --reward, e.g. model=tiny for clip_score with the shipped tiny CLIP (repeatable)")
    ev.add_argument("--per-task", type=int, default=24, help="held-out prompts per toy task")
    ev.add_argument("--steps", type=int, default=10, help="denoising steps")
    ev.add_argument("--guidance-scale", type=float, default=1.0, help="CFG scale")
    _device_flags(ev)
    ev.add_argument("--out", default=None, help="JSON file for the scores")
    ev.set_defaults(func=_eval)

    train = sub.add_parser("train", help="train a LoRA with any algorithm from a YAML config (see configs/)")
    train.add_argument("config", help="YAML config file, e.g. configs/toy_grpo.yaml")
    train.add_argument("overrides", nargs="*", metavar="section.key=value",
                       help="override config values (each value read as YAML), e.g. train.lr=1e-4 "
                            "sampling.sde_window=[0,2] opd.teachers.ocr.lora=runs/ocr/lora")
    train.add_argument("--resume", action="store_true",
                       help="continue from the newest checkpoint in train.out_dir (same as train.resume=true)")
    train.set_defaults(func=_train)

    distill = sub.add_parser("distill", help="f-distill the pipeline into a few-step student LoRA (SPEC §6)")
    distill.add_argument("config", help="YAML config file, e.g. configs/toy_fdistill.yaml")
    distill.add_argument("overrides", nargs="*", metavar="section.key=value",
                         help="override config values, e.g. distill.divergence=forward_kl train.iterations=50")
    distill.set_defaults(func=_distill)

    bench = sub.add_parser("bench", help="benchmark algorithms: held-out reward vs reward queries and wall time, "
                                         "per-iteration cost; --scale: GPU throughput at SD3.5-M / FLUX size")
    bench.add_argument("--out", default="bench_out", help="output folder (created)")
    bench.add_argument("--algorithms", default="grpo,nft,crd", help="comma-separated, each run with its "
                                                                   "configs/toy_<alg>.yaml recipe")
    bench.add_argument("--config", action="append", default=[], metavar="ALG=PATH",
                       help="recipe of one algorithm instead of configs/toy_<alg>.yaml (repeatable)")
    bench.add_argument("--budget-samples", type=int, default=None,
                       help="reward queries (scored samples) per algorithm (default 3840 unless --budget-seconds)")
    bench.add_argument("--budget-seconds", type=float, default=None,
                       help="training wall time per algorithm (evaluation excluded); with --budget-samples: "
                            "whichever comes first")
    bench.add_argument("--eval-every", type=int, default=10, help="held-out evaluation every N iterations")
    bench.add_argument("--eval-per-task", type=int, default=24, help="held-out images per toy task")
    bench.add_argument("--seed", type=int, default=0, help="train.seed of every algorithm")
    bench.add_argument("--model", default=None, help="pipeline folder (default: each recipe's, the shipped one)")
    bench.add_argument("--clip-model", default="tiny", help="CLIP of the untrained held-out clip_score "
                                                             "(default: the shipped tiny CLIP)")
    bench.add_argument("--scale", default=None, metavar="sd35m,flux",
                       help="GPU only: time LoRA fwd/bwd of these transformers (real configs, random weights) "
                            "with and without gradient checkpointing, instead of the algorithm benchmark")
    bench.add_argument("--scale-resolution", type=int, default=512, help="--scale image size in pixels")
    bench.add_argument("--scale-batch", type=int, default=1, help="--scale images per call")
    bench.add_argument("--scale-rank", type=int, default=32, help="--scale LoRA rank")
    bench.add_argument("overrides", nargs="*", metavar="section.key=value",
                       help="config overrides applied to every algorithm, e.g. train.prompts_per_iter=4")
    bench.set_defaults(func=_bench)

    app = sub.add_parser("gradio", help="web app: base vs RL-guided images side by side")
    app.add_argument("--model", default=DEFAULT_MODEL, help="pipeline folder or hub id (default: the shipped one)")
    app.add_argument("--lora", default="demo_out/lora", help="LoRA folder (default: the one `flowalign demo` writes)")
    app.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1: this machine only)")
    app.add_argument("--port", type=int, default=None, help="port (default: gradio's, 7860 or the next free one)")
    _device_flags(app)
    app.set_defaults(func=_gradio)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .errors import FlowalignError

    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # for commands that record how they were run
    try:
        return args.func(args)
    # known failures: bad input, a reward server that is down, NaN training, a full disk, a missing optional
    # package (its ImportError names the pip command; any other ImportError is a bug): one line, no traceback
    except (ValueError, FileNotFoundError, ConnectionError, FlowalignError, ImportError) as err:
        if isinstance(err, ImportError) and "pip install" not in str(err):
            raise
        print(f"flowalign: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
