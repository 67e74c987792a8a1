"""Command-line entry point: ``flowalign <command> ...``. Thin: parses flags and calls the library."""

from __future__ import annotations

import argparse
import os
import sys


def _demo(args: argparse.Namespace) -> int:
    from .config import DEFAULT_MODEL
    from .apps.demo import DEMO_CONFIG, run_demo

    run_demo(args.out, seed=args.seed, steps=args.steps, quick=args.quick, model=args.model or DEFAULT_MODEL,
             config=args.config or DEMO_CONFIG, resume=args.resume, overwrite=args.overwrite,
             overrides=args.overrides)
    return 0


def _recipe(args: argparse.Namespace) -> dict:
    """Defaults from ``--config RECIPE`` (a YAML path or a shipped recipe name such as toy_grpo.yaml) for sample,
    eval and gradio, so they run what ``flowalign train RECIPE`` trained without repeating its settings; {} without
    --config. ``lora`` is ``train.out_dir/lora`` whether or not it exists yet (each command decides)."""
    if not getattr(args, "config", None):
        return {}
    from .config import load_config

    cfg = load_config(args.config)
    s, t = cfg.sampling, cfg.train
    return {"model": cfg.model.path, "lora": os.path.join(t.out_dir, "lora"), "steps": s.eval_num_steps,
            "guidance_scale": s.guidance_scale if s.eval_guidance_scale is None else s.eval_guidance_scale,
            "prompts": t.eval_prompts or t.prompts, "reward": t.reward, "reward_options": dict(t.reward_options),
            "per_task": t.eval_per_task or None}  # a recipe with evaluation off: the eval command's default


def _resolve(args: argparse.Namespace, recipe: dict, **builtin) -> None:
    """Each flag left at None gets the recipe's value, else the built-in default: flag > --config > built-in."""
    for key, default in builtin.items():
        if getattr(args, key) is None:
            setattr(args, key, recipe[key] if recipe.get(key) is not None else default)


def _sample(args: argparse.Namespace) -> int:
    from .apps.sample import (DEFAULT_LORA, check_lora_dir, nrg_terms, parse_nrg, parse_nrg_options, parse_scales,
                              rlg_sweep, sample_png)
    from .config import DEFAULT_MODEL

    nrg, nrg_options = parse_nrg(args.nrg), parse_nrg_options(args.nrg_option)
    if nrg_options and not nrg:
        nrg_terms(nrg, nrg_options)  # the one-line error: options without a weight
    recipe = _recipe(args)
    _resolve(args, recipe, model=DEFAULT_MODEL, steps=20, guidance_scale=4.5)
    lora, note = args.lora, None
    if lora is None:  # the recipe's adapter, else the demo's, else the base model
        lora = recipe.get("lora", DEFAULT_LORA)
        if not os.path.exists(lora):
            note = f"no LoRA ({lora} not found): sampling the base model; pass --lora DIR for an aligned one"
            lora = None
    elif lora.lower() == "none":
        lora = None
    else:
        check_lora_dir(lora, "pass --lora DIR with a folder `flowalign demo` or `flowalign train` wrote, or "
                             "--lora none to sample the base model")
    scales = parse_scales(args.rlg_scale or ("1.0" if lora else "0"))
    if lora is None and any(scales):
        raise ValueError(f"--rlg-scale {args.rlg_scale} needs the fine-tuned adapter: pass --lora DIR, or drop "
                         "--rlg-scale to sample the base model")
    kw = dict(model=args.model, lora_dir=lora, seed=args.seed, steps=args.steps,
              guidance_scale=args.guidance_scale, device=args.device, dtype=args.dtype)
    if nrg:
        kw.update(nrg=nrg, nrg_options=nrg_options)
    if len(scales) > 1 or args.reward:
        if not args.reward:
            raise ValueError("several --rlg-scale values make a sweep: add --reward NAME to score them")
        rlg_sweep(args.out or "rlg_sweep", scales, args.reward, prompts=args.prompts,
                  num_images=args.num_images or 24, **kw)
        print(f"wrote {args.out or 'rlg_sweep'}/rlg_sweep.json and rlg_sweep.png")
        return 0
    if not args.prompt:
        raise ValueError("--prompt is required for a single --rlg-scale (or give --reward for a sweep)")
    if note:
        print(note)
    out = sample_png(args.out or "rlg.png", args.prompt, scales[0], num_images=args.num_images or 1, **kw)
    print(f"wrote {out}")
    return 0


def _train(args: argparse.Namespace) -> int:
    from .config import load_config
    from .trainer import run_training

    cfg = load_config(args.config, args.overrides + (["train.resume=true"] if args.resume else []))
    summary = run_training(cfg, overwrite=args.overwrite)
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
    if aligned and aligned.get("drift"):  # reward-hacking diagnostics (docs/doctor.md)
        print(f"drift from the base model, held-out: {aligned['drift_summary']}")
    flagged = sum(1 for m in summary["history"] if m.get("drift")) if summary.get("history") else 0
    if flagged:
        print(f"drift flagged in {flagged} of {summary['iterations']} iterations (metrics.jsonl: drift, drift_stats)")
    return 0


def _doctor(args: argparse.Namespace) -> int:
    from . import doctor

    report = doctor.run(args.config, args.overrides, out=args.out, rows=args.rows, dtypes=args.dtypes,
                        seed=args.seed)
    return 1 if report.verdict == "fail" else 0


def _export(args: argparse.Namespace) -> int:
    from .apps.export import export_merged
    from .config import DEFAULT_MODEL

    out = export_merged(args.lora, args.model or DEFAULT_MODEL, args.out, scale=args.scale, dtype=args.dtype,
                        overwrite=args.overwrite)
    print(f"wrote {out}: the pipeline with the LoRA merged (scale {args.scale:g}); load it with "
          f"DiffusionPipeline.from_pretrained({out!r})")
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


# eval's table columns, first
HEADLINE = ("toy_geneval", "toy_geneval_strict", "toy_geneval_exact", "toy_extra_objects", "ocr")


def _eval(args: argparse.Namespace) -> int:
    from .apps.eval import evaluate_loras
    from .config import DEFAULT_MODEL

    recipe = _recipe(args)  # the recipe's reward comes with its options, a --reward without them
    options = _options(args.reward_option) if args.reward_option or args.reward else recipe.get("reward_options", {})
    _resolve(args, recipe, model=DEFAULT_MODEL, prompts="toy", reward=None, per_task=24, steps=10,
             guidance_scale=1.0)
    loras = args.lora or ([recipe["lora"]] if recipe and os.path.exists(recipe["lora"]) else [])
    if args.best_of is not None:
        return _eval_best_of(args, loras, options)
    result = evaluate_loras(loras, args.model, prompts=args.prompts, per_task=args.per_task, steps=args.steps,
                            guidance_scale=args.guidance_scale, out=args.out, reward=args.reward,
                            reward_options=options, device=args.device, dtype=args.dtype)
    found = {k for s in result["scores"].values() for k in s if isinstance(s[k], float) and "/" not in k
             and k != "time_eval"}  # per-task and per-check columns: in --out's JSON
    keys = [k for k in HEADLINE if k in found] + sorted(found - set(HEADLINE))
    print("| weights | n | " + " | ".join(keys) + " |")
    print("|---" * (len(keys) + 2) + "|")
    for name, s in result["scores"].items():
        print(f"| {name} | {s.get('n', '')} | " + " | ".join(f"{s[k]:.3f}" if k in s else "" for k in keys) + " |")
    print(f"wrote {args.out} (with the per-task scores)" if args.out else
          "per-task scores: add --out FILE.json")
    return 0


def _eval_best_of(args: argparse.Namespace, loras: list, options: dict) -> int:
    """``flowalign eval --best-of N``: each LoRA's best-of-N win rate against the base's best-of-N."""
    from .apps.eval import best_of_n_loras

    result = best_of_n_loras(loras, args.model, args.best_of, prompts=args.prompts, per_task=args.per_task,
                             steps=args.steps, guidance_scale=args.guidance_scale, out=args.out, reward=args.reward,
                             reward_options=options, device=args.device, dtype=args.dtype)
    reward, n = result["settings"]["reward"], args.best_of
    print(f"| weights | prompts | mean {reward} | best-of-{n} {reward} | best-of-{n} win rate vs base |")
    print("|---|---|---|---|---|")
    for name, s in result["scores"].items():
        print(f"| {name} | {s['prompts']} | {s['mean']:.3f} | {s['best_of_n_mean']:.3f} | "
              f"{s['win_rate']:.3f} +- {s['win_rate_se']:.3f} |")
    if args.out:
        print(f"wrote {args.out}")
    return 0


def _gradio(args: argparse.Namespace) -> int:
    try:
        from .apps.gradio_app import DEFAULT_LORA, launch
        import gradio  # noqa: F401
    except ImportError as err:
        print(f"flowalign: error: {err}", file=sys.stderr)
        return 2
    from .apps.sample import check_lora_dir
    from .config import DEFAULT_MODEL

    recipe = _recipe(args)
    _resolve(args, recipe, model=DEFAULT_MODEL, steps=20, guidance_scale=4.5)
    if args.lora is None and not args.runs:  # --runs alone offers only the runs' adapters
        args.lora = recipe.get("lora") or DEFAULT_LORA
        if recipe:
            check_lora_dir(args.lora, f"train it with `flowalign train {args.config}` or pass --lora DIR or "
                           "--runs DIR")
    warning = bind_warning(args.host)
    if warning:
        print(f"flowalign: warning: {warning}", file=sys.stderr)
    launch(model=args.model, lora_dir=args.lora, host=args.host, port=args.port, device=args.device,
           dtype=args.dtype, default_steps=args.steps, default_cfg=args.guidance_scale, runs=args.runs or ())
    return 0


LOOPBACK = ("127.0.0.1", "localhost", "::1")


def bind_warning(host: str):
    """A one-line warning when the app would listen beyond this machine (None on loopback)."""
    if host in LOOPBACK or host.startswith("127."):
        return None
    return (f"serving on {host}: anyone who can reach this machine can use the app (no authentication); "
            "use the default --host 127.0.0.1 and an SSH tunnel to keep it private")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flowalign", description="Align diffusion/flow generators to rewards.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="align the shipped pipeline (CRD) and write a report folder")
    demo.add_argument("--out", default="demo_out", help="report folder (created)")
    demo.add_argument("--steps", type=int, default=None, help="training iterations (default: the fixed demo budget)")
    demo.add_argument("--seed", type=int, default=0, help="random seed")
    demo.add_argument("--quick", action="store_true", help="a smoke run: 2 small iterations (about 10 s)")
    demo.add_argument("--model", default=None, help="pipeline folder or hub id (default: the shipped one)")
    demo.add_argument("--config", default=None, help="recipe YAML, any algorithm (default: configs/toy_demo.yaml)")
    demo.add_argument("--resume", action="store_true", help="continue a killed demo from its newest checkpoint")
    demo.add_argument("--overwrite", action="store_true", help="replace an earlier demo's results in --out")
    demo.add_argument("overrides", nargs="*", metavar="section.key=value",
                      help="override recipe values as for train, e.g. train.reward_options={strict: true}")
    demo.set_defaults(func=_demo)

    recipe_help = ("recipe YAML or shipped name (e.g. toy_grpo.yaml): defaults from it (model.path, "
                   "train.out_dir/lora, sampling.eval_num_steps, eval CFG%s); flags override")
    sample = sub.add_parser("sample", help="sample with RL guidance (one scale -> PNG; several -> reward sweep) and "
                                           "Flow-NRG reward guidance")
    sample.add_argument("--config", default=None, metavar="RECIPE", help=recipe_help % "")
    sample.add_argument("--model", default=None, help="pipeline folder or hub id (default: the shipped one)")
    sample.add_argument("--lora", default=None, help="LoRA folder, or none for the base model (default: the "
                                                     "recipe's, else the one `flowalign demo` writes, demo_out/lora, "
                                                     "else the base model)")
    sample.add_argument("--rlg-scale", default=None,
                        help="w (0 = base, 1 = fine-tuned, >1 stronger; default 1, 0 without a LoRA) or a list like "
                             "0,0.5,1,1.5,2 for a sweep")
    sample.add_argument("--prompt", default=None, help="prompt (single scale)")
    sample.add_argument("--reward", default=None, help="reward name for a sweep (e.g. toy_geneval)")
    sample.add_argument("--prompts", default=None, help="sweep prompts: text file, one a line (default: toy held-out)")
    sample.add_argument("--out", default=None, help="PNG file (single scale, default rlg.png) or sweep folder "
                                                    "(default rlg_sweep)")
    sample.add_argument("--seed", type=int, default=0, help="image i uses seed + i")
    sample.add_argument("--steps", type=int, default=None, help="denoising steps (default 20, or the recipe's)")
    sample.add_argument("--guidance-scale", type=float, default=None, help="CFG scale (default 4.5, or the recipe's)")
    _device_flags(sample)
    sample.add_argument("--num-images", type=int, default=None, help="images (single: default 1; sweep: per "
                                                                     "scale, default 24)")
    sample.add_argument("--nrg", action="append", default=[], metavar="REWARD=WEIGHT",
                        help="Flow-NRG reward guidance with a differentiable reward (repeatable, e.g. --nrg "
                             "clip_score=2.0 --nrg aesthetic=1.0; weight 0 = off; docs/nrg.md)")
    sample.add_argument("--nrg-option", action="append", default=[], metavar="REWARD.KEY=VALUE",
                        help="build option of an --nrg reward (repeatable, e.g. clip_score.model=tiny for the shipped "
                             "tiny CLIP)")
    sample.set_defaults(func=_sample)

    ev = sub.add_parser("eval", help="held-out scores of the base and LoRA folders on the same prompts and seeds")
    ev.add_argument("lora", nargs="*", help="LoRA folders (written by flowalign train / demo; default: the "
                                            "recipe's when it exists)")
    ev.add_argument("--config", default=None, metavar="RECIPE",
                    help=recipe_help % ", train.eval_prompts or train.prompts, train.reward, train.eval_per_task")
    ev.add_argument("--model", default=None, help="pipeline folder or hub id (default: the shipped one)")
    ev.add_argument("--prompts", default=None,
                    help="toy spec (toy, toy:position,...) or a prompt file (default toy, or the recipe's)")
    ev.add_argument("--reward", default=None, help="reward name, needed for a prompt file's prompts (toy specs use "
                                                   "the toy world's rewards; a name here is added to them)")
    ev.add_argument("--reward-option", action="append", default=[], metavar="KEY=VALUE",
                    help="option of --reward, e.g. model=tiny for clip_score with the shipped tiny CLIP (repeatable)")
    ev.add_argument("--per-task", type=int, default=None,
                    help="held-out prompts per toy task (default 24, or the recipe's)")
    ev.add_argument("--steps", type=int, default=None, help="denoising steps (default 10, or the recipe's)")
    ev.add_argument("--guidance-scale", type=float, default=None, help="CFG scale (default 1.0, or the recipe's)")
    _device_flags(ev)
    ev.add_argument("--out", default=None, help="JSON file for the scores, per task too (the table shows the "
                                                "overall ones)")
    ev.add_argument("--best-of", type=int, default=None, metavar="N",
                    help="InfAlign's best-of-N evaluation: N samples per prompt from each model, the win rate of "
                         "each LoRA's best against the base's best under --reward (default toy_geneval)")
    ev.set_defaults(func=_eval)

    train = sub.add_parser("train", help="train a LoRA with any algorithm from a YAML config (see configs/)")
    train.add_argument("config", help="YAML config file, e.g. configs/toy_grpo.yaml")
    train.add_argument("overrides", nargs="*", metavar="section.key=value",
                       help="override config values (each value read as YAML), e.g. train.lr=1e-4 "
                            "sampling.sde_window=[0,2] opd.teachers.ocr.lora=runs/ocr/lora")
    train.add_argument("--resume", action="store_true",
                       help="continue from the newest checkpoint in train.out_dir (same as train.resume=true)")
    train.add_argument("--overwrite", action="store_true",
                       help="replace another run's checkpoints and LoRA in train.out_dir (refused without it)")
    train.set_defaults(func=_train)

    doc = sub.add_parser("doctor", help="before training: is the config on-policy (rollout vs re-scored log-probs "
                                        "per dtype / batch / CFG / attention setting), is the reference the base, do "
                                        "LoRA gradients flow, is the reward deterministic, does the grid match")
    doc.add_argument("config", help="YAML config file, e.g. configs/toy_grpo.yaml")
    doc.add_argument("overrides", nargs="*", metavar="section.key=value", help="override config values, as for train")
    doc.add_argument("--out", default=None, help="folder for doctor.md, doctor.json, doctor_gaps.png (default: "
                                                 "train.out_dir/doctor)")
    doc.add_argument("--rows", type=int, default=None,
                     help="rows rolled out per setting (default: the run's rollout batch, at most 16; 0: all of it)")
    doc.add_argument("--dtypes", default=None, help="denoiser dtypes to compare (default fp32,bf16,fp16)")
    doc.add_argument("--seed", type=int, default=0, help="seed of the prompts and the rollout noise")
    doc.set_defaults(func=_doctor)

    export = sub.add_parser("export", help="merge a LoRA into a full diffusers pipeline folder (safetensors)")
    export.add_argument("lora", help="LoRA folder written by flowalign train / demo")
    export.add_argument("--model", default=None, help="base pipeline folder or hub id (default: the shipped one)")
    export.add_argument("--out", required=True, help="folder for the merged pipeline (save_pretrained)")
    export.add_argument("--scale", type=float, default=1.0, help="multiplier of the weight update (default 1)")
    export.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16 of the written weights")
    export.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    export.set_defaults(func=_export)

    distill = sub.add_parser("distill", help="f-distill the pipeline into a few-step student LoRA "
                                             "(docs/algorithms/fdistill.md)")
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
    app.add_argument("--config", default=None, metavar="RECIPE", help=recipe_help % "")
    app.add_argument("--model", default=None, help="pipeline folder or hub id (default: the shipped one)")
    app.add_argument("--lora", default=None, help="LoRA folder (default without --runs: the recipe's, else the one "
                                                  "`flowalign demo` writes, demo_out/lora)")
    app.add_argument("--runs", nargs="+", default=None, metavar="DIR",
                     help="run folders (train.out_dir) whose adapters the app offers in a list: lora/ and each "
                          "ckpt-<iteration>/; a folder of runs is searched one level down")
    app.add_argument("--steps", type=int, default=None, help="initial steps slider (default 20, or the recipe's)")
    app.add_argument("--guidance-scale", type=float, default=None,
                     help="initial CFG slider (default 4.5, or the recipe's)")
    app.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1: this machine only)")
    app.add_argument("--port", type=int, default=None, help="port (default: gradio's, 7860 or the next free one)")
    _device_flags(app)
    app.set_defaults(func=_gradio)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .errors import FlowalignError
    from .runtime.quiet import quiet_third_party

    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # for commands that record how they were run
    quiet_third_party()  # before any command imports diffusers / transformers
    try:
        return args.func(args)
    # known failures: bad input, a reward server that is down, NaN training, a full disk, a missing optional
    # package (its ImportError names the pip command; any other ImportError is a bug): one line, no traceback
    except (ValueError, FileNotFoundError, ConnectionError, FlowalignError, ImportError) as err:
        if isinstance(err, ImportError) and "pip install" not in str(err):
            raise
        print(f"flowalign: error: {err}", file=sys.stderr)
        return 2
    except (FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError) as err:  # an output path
        name = err.filename if err.filename is not None else "a path"
        print(f"flowalign: error: cannot write {name}: {err.strerror}; choose another output path (--out, "
              "train.out_dir)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
