"""The before/after grid a person reads: base and aligned images of the same held-out prompts and seeds, each with
its toy-world verdict drawn in the margin (which checks pass, and whether the image is exact: every constraint met
and no object the prompt did not ask for), the prompts the adapter fixed first and the ones it broke last.

Rows are classified by the exact verdict (b = base, a = aligned, each 0 or 1):
    fixed (b=0, a=1) -> kept (1, 1) -> still failing (0, 0) -> broken (1, 0),
within a class cycling through the tasks (the i-th image of every task before the (i+1)-th of any), so a grid of
a few rows shows several tasks. Images: [N, 3, H, W] in [0, 1], the two sets in the same prompt order.
"""

from __future__ import annotations

from collections import Counter
from typing import Optional, Sequence

import torch
from PIL import Image, ImageDraw, ImageFont

from .report import _to_pil, _wrap

CLASSES = ("fixed", "kept", "failing", "broken")  # row order, top to bottom
_CLASS_OF = {(0, 1): "fixed", (1, 1): "kept", (0, 0): "failing", (1, 0): "broken"}
_CLASS_COLOUR = {"fixed": (20, 140, 40), "kept": (90, 90, 90), "failing": (90, 90, 90), "broken": (200, 30, 30)}
PASS, FAIL = (20, 120, 40), (200, 30, 30)


def verdicts(images, prompts: Sequence[str]) -> list[dict]:
    """The toy world's verdict of each image -> [{"exact": 0.0 | 1.0, "checks": {check name: passed}}] in order;
    the checks include "no extra objects" (toy.geneval.score with no_extra=True)."""
    from ..toy.geneval import score_batch

    return [{"exact": r["strict"], "checks": r["checks"]} for r in score_batch(images, prompts, no_extra=True)]


def order_rows(base_exact: Sequence[float], aligned_exact: Sequence[float], tasks: Optional[Sequence[str]] = None,
               max_rows: Optional[int] = None) -> list[tuple[int, str]]:
    """(image index, class) of the grid's rows, top to bottom (module docstring). With ``max_rows``, up to a third
    of the rows (at least one when any exists) are broken ones, kept at the bottom; the rest are the head of the
    order."""
    if len(base_exact) != len(aligned_exact):
        raise ValueError(f"got {len(base_exact)} base verdicts but {len(aligned_exact)} aligned ones")
    tasks = list(tasks) if tasks is not None else [""] * len(base_exact)
    seen: Counter = Counter()
    rank = []
    for t in tasks:  # the i-th image of its task
        rank.append(seen[t])
        seen[t] += 1
    by_class = {c: [] for c in CLASSES}
    for i, (b, a) in enumerate(zip(base_exact, aligned_exact)):
        by_class[_CLASS_OF[(int(b > 0.5), int(a > 0.5))]].append(i)
    rows = []
    for c in CLASSES:
        rows += [(i, c) for i in sorted(by_class[c], key=lambda i: (rank[i], i))]
    return _cap(rows, max_rows)


def _cap(rows: list[tuple[int, str]], max_rows: Optional[int]) -> list[tuple[int, str]]:
    """The first ``max_rows`` of an ordered row list, keeping up to a third of them for the broken rows."""
    if max_rows is None or len(rows) <= max_rows:
        return rows
    broken = [r for r in rows if r[1] == "broken"]
    n_broken = min(len(broken), max(1 if broken else 0, max_rows // 3))
    head = [r for r in rows if r[1] != "broken"][:max_rows - n_broken]
    return head + broken[:n_broken]


def verdict_grid(base_images: torch.Tensor, aligned_images: torch.Tensor, prompts: Sequence[str], path: str,
                 tasks: Optional[Sequence[str]] = None, max_rows: int = 12, aligned_label: str = "aligned",
                 scale: int = 2) -> dict:
    """Write the grid PNG to ``path``; returns {"rows": [(index, class)], "counts": {class: images}} over all
    the images (not only the rows drawn)."""
    if base_images.shape != aligned_images.shape or base_images.shape[0] != len(prompts):
        raise ValueError(f"base {tuple(base_images.shape)} and aligned {tuple(aligned_images.shape)} images must "
                         f"match each other and the {len(prompts)} prompts")
    vb, va = verdicts(base_images, prompts), verdicts(aligned_images, prompts)
    every = order_rows([v["exact"] for v in vb], [v["exact"] for v in va], tasks)
    counts = {c: sum(1 for _, k in every if k == c) for c in CLASSES}
    rows = _cap(every, max_rows)

    font = ImageFont.load_default(size=11)
    h, w = base_images.shape[2] * scale, base_images.shape[3] * scale
    prompt_w, verdict_w, head_h, pad = 150, 190, 20, 4
    row_h = max(h, 14 * 7) + pad
    width = prompt_w + 2 * (w + verdict_w) + 2 * pad
    grid = Image.new("RGB", (width, head_h + len(rows) * row_h), "white")
    draw = ImageDraw.Draw(grid)
    for x, text in ((4, "prompt (row class)"), (prompt_w, "base"), (prompt_w + w + verdict_w + pad, aligned_label)):
        draw.text((x, 4), text, fill="black", font=font)
    for r, (i, cls) in enumerate(rows):
        y = head_h + r * row_h
        draw.rectangle((0, y, 3, y + h), fill=_CLASS_COLOUR[cls])
        lines = _wrap(prompts[i], 24)[:5] + [f"({cls})"]
        for li, text in enumerate(lines):
            fill = _CLASS_COLOUR[cls] if li == len(lines) - 1 else "black"
            draw.text((8, y + 2 + 13 * li), text, fill=fill, font=font)
        for col, (image, verdict) in enumerate(((base_images[i], vb[i]), (aligned_images[i], va[i]))):
            x = prompt_w + col * (w + verdict_w + pad)
            grid.paste(_to_pil(image, scale), (x, y))
            _draw_verdict(draw, font, verdict, x + w + 4, y)
    grid.save(path)
    return {"rows": rows, "counts": counts}


def _draw_verdict(draw, font, verdict: dict, x: int, y: int) -> None:
    """EXACT / not exact, then each check with + (passed) or - (failed), in green or red."""
    ok = verdict["exact"] > 0.5
    draw.text((x, y + 2), "EXACT" if ok else "not exact", fill=PASS if ok else FAIL, font=font)
    for li, (name, passed) in enumerate(list(verdict["checks"].items())[:6]):
        draw.text((x, y + 16 + 13 * li), f"{'+' if passed else '-'} {name}"[:32], fill=PASS if passed else FAIL,
                  font=font)
