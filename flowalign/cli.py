"""Command-line entry point: ``flowalign <command> ...``. Thin: parses flags and calls the library."""

from __future__ import annotations

import argparse
import os
import sys


def _demo(args: argparse.Namespace) -> int:
    from .config import DEFAULT_MODEL
    from .demo import DEMO_CONFIG, run_demo

    run_demo(args.out, seed=args.seed, steps=args.steps, quick=args.quick, model=args.model or DEFAULT_MODEL,
             config=args.config or DEMO_CONFIG)
    return 0


def _sample(args: argparse.Namespace) -> int:
    from .sample import parse_scales, rlg_sweep, sample_png

    scales = parse_scales(args.rlg_scale)
    kw = dict(model=args.model, lora_dir=args.lora, seed=args.seed, steps=args.steps,
              guidance_scale=args.guidance_scale)
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

    cfg = load_config(args.config, args.overrides)
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


def _gradio(args: argparse.Namespace) -> int:
    try:
        from .app import launch
        import gradio  # noqa: F401
    except ImportError as err:
        print(f"flowalign: error: {err}", file=sys.stderr)
        return 2
    launch(model=args.model, lora_dir=args.lora, host=args.host, port=args.port)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flowalign", description="Align diffusion/flow generators to rewards.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="align the shipped pipeline with Flow-GRPO and write a report folder")
    demo.add_argument("--out", default="demo_out", help="report folder (created)")
    demo.add_argument("--steps", type=int, default=None, help="GRPO iterations (default: the fixed demo budget)")
    demo.add_argument("--seed", type=int, default=0, help="random seed")
    demo.add_argument("--quick", action="store_true", help="a <= 2-minute smoke run")
    demo.add_argument("--model", default=None, help="pipeline folder or hub id (default: the shipped one)")
    demo.add_argument("--config", default=None, help="GRPO recipe YAML (default: configs/toy_grpo.yaml)")
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
    sample.add_argument("--num-images", type=int, default=None, help="images (single: default 1; sweep: per "
                                                                     "scale, default 24)")
    sample.set_defaults(func=_sample)

    train = sub.add_parser("train", help="train a LoRA with any algorithm from a YAML config (see configs/)")
    train.add_argument("config", help="YAML config file, e.g. configs/toy_grpo.yaml")
    train.add_argument("overrides", nargs="*", metavar="section.key=value",
                       help="override config values (each value read as YAML), e.g. train.lr=1e-4 "
                            "sampling.sde_window=[0,2] opd.teachers.ocr.lora=runs/ocr/lora")
    train.set_defaults(func=_train)

    app = sub.add_parser("gradio", help="web app: base vs RL-guided images side by side")
    app.add_argument("--model", default=DEFAULT_MODEL, help="pipeline folder or hub id (default: the shipped one)")
    app.add_argument("--lora", default="demo_out/lora", help="LoRA folder (default: the one `flowalign demo` writes)")
    app.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1: this machine only)")
    app.add_argument("--port", type=int, default=None, help="port (default: gradio's, 7860 or the next free one)")
    app.set_defaults(func=_gradio)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as err:  # bad input: one clear line, no traceback
        print(f"flowalign: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
