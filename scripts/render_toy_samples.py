"""Write a PNG grid of toy-world renders with their captions, for humans to look at.

    python scripts/render_toy_samples.py --out out/toy_samples.png [--n-per-task 6] [--scale 3]

One row per task (GenEval tasks, then text); each cell shows the render upscaled by --scale
with its caption and the detector's strict score (OK / FAIL) under it.
"""

import argparse
import os
import textwrap

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from flowalign.toy import TASKS, TEXT_TASK, detect, render, sample, score


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="out/toy_samples.png")
    ap.add_argument("--n-per-task", type=int, default=6)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--scale", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    cell, text_h = a.size * a.scale, 30
    font = ImageFont.load_default(size=11)
    grid = Image.new("RGB", (cell * a.n_per_task, (cell + text_h) * len(TASKS)), "white")
    draw = ImageDraw.Draw(grid)
    rng = np.random.default_rng(a.seed)  # one stream: nearby integer seeds give correlated first draws
    for r, task in enumerate(TASKS):
        for c in range(a.n_per_task):
            prompt, spec = sample(rng, task=task)
            img, caption, _ = render(spec, a.size, seed=rng)
            x, y = c * cell, r * (cell + text_h)
            grid.paste(img.resize((cell, cell), Image.Resampling.NEAREST), (x, y))
            mark = "" if task == TEXT_TASK else ("  OK" if score(prompt, detect(img))["strict"] else "  FAIL")
            lines = textwrap.wrap(caption + mark, 30)
            for i, line in enumerate(lines):
                draw.text((x + 3, y + cell + 2 + 13 * i), line, fill="black", font=font)
    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    grid.save(a.out)
    print(f"wrote {a.out} ({grid.size[0]}x{grid.size[1]})")


if __name__ == "__main__":
    main()
