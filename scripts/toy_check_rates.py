"""Where toy_geneval scores are lost: the pass rate of each kind of check, per task, base vs LoRA adapters.

    python scripts/toy_check_rates.py demo_out/lora [more LoRA folders] [--per-task 96] [--out rates.json]

Samples the held-out set of the demo and of `flowalign eval` (same prompts, seeds, steps and CFG, so the
images are the ones those commands score) and prints, for each task and check kind ("shape", "colour+shape",
"count", "relation"; flowalign.toy.check_rates), checks met / checks made. A two-object prompt makes two
"colour+shape" checks, so for position prompts that row is the share of objects drawn with the right
colour and shape.
"""

import argparse
import json
import os

from flowalign.config import DEFAULT_MODEL
from flowalign.evaluate import sample_images
from flowalign.heldout import EVAL_SEED, heldout_rows
from flowalign.models import load_for_inference
from flowalign.toy import check_rates, detect


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("lora", nargs="*", help="LoRA folders written by flowalign train / demo")
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--per-task", type=int, default=96)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--guidance-scale", type=float, default=1.0)
    ap.add_argument("--out", help="JSON file for the rates")
    a = ap.parse_args()
    missing = [d for d in a.lora if not os.path.isdir(d)]
    if missing:
        raise SystemExit(f"LoRA folder {missing[0]!r} not found: pass a folder written by flowalign train/demo")
    prompts = [p for p, _ in heldout_rows("toy", a.per_task)]
    rates = {}
    for name in ["base", *a.lora]:
        pipe = load_for_inference(a.model)
        if name != "base":
            pipe.load_lora_weights(name)
        images = sample_images(pipe, prompts, EVAL_SEED, a.steps, a.guidance_scale, 32, desc=name)
        rates[name] = check_rates(prompts, [detect(im) for im in images])
    names = list(rates)
    print("| task | check | " + " | ".join(names) + " |")
    print("|---|---|" + "---|" * len(names))
    for task, kinds in rates["base"].items():
        for kind, (_, n) in kinds.items():
            cells = [f"{rates[m][task][kind][0] / n:.3f}" for m in names]
            print(f"| {task} | {kind} ({n}) | " + " | ".join(cells) + " |")
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"per_task": a.per_task, "steps": a.steps, "guidance_scale": a.guidance_scale,
                       "rates": rates}, f, indent=1)
        print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
