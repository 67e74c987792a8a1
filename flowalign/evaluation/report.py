"""Report artefacts people look at: reward curves and image grids (PNG), and a report.md linking them."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont


def plot_reward_curve(history: Sequence[dict], path: str, key: str = "reward_mean", evals: Sequence[tuple] = (),
                      title: str = "training reward", evals_label: str = "held-out") -> None:
    """Per-iteration ``key`` (dots), its running mean (line), and optional held-out points (iteration, value)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    its = [m["iteration"] for m in history]
    vals = [m[key] for m in history]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(its, vals, ".", alpha=0.35, label=f"train {key} (per iteration)")
    if len(vals) >= 2:
        w = max(1, len(vals) // 10)
        smooth = np.convolve(vals, np.ones(w) / w, mode="valid")
        ax.plot(its[w - 1 :], smooth, "-", label=f"running mean ({w})")
    if evals:
        ax.plot([e[0] for e in evals], [e[1] for e in evals], "o-", color="k", label=evals_label)
    ax.set_xlabel("iteration")
    ax.set_ylabel(key)
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _to_pil(image: torch.Tensor, scale: int) -> Image.Image:
    arr = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    im = Image.fromarray(np.ascontiguousarray(arr))
    return im.resize((im.width * scale, im.height * scale), Image.Resampling.NEAREST)


def _wrap(text: str, width: int) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        if len(line) + len(word) + 1 > width and line:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return lines + [line]


def image_grid(rows: Sequence[torch.Tensor], row_labels: Sequence[str], captions: Sequence[str], path: str,
               scale: int = 2) -> None:
    """rows: tensors [N,3,H,W] in [0,1], one per row (same N); captions: N column captions."""
    n = rows[0].shape[0]
    h, w = rows[0].shape[2] * scale, rows[0].shape[3] * scale
    font = ImageFont.load_default(size=11)
    label_w, cap_h = 70, 44
    grid = Image.new("RGB", (label_w + n * (w + 4), cap_h + len(rows) * (h + 4)), "white")
    draw = ImageDraw.Draw(grid)
    for j, cap in enumerate(captions):
        for li, text in enumerate(_wrap(cap, max(8, w // 6))[:3]):
            draw.text((label_w + j * (w + 4), 2 + 13 * li), text, fill="black", font=font)
    for i, (row, label) in enumerate(zip(rows, row_labels)):
        y = cap_h + i * (h + 4)
        draw.text((4, y + h // 2 - 6), label, fill="black", font=font)
        for j in range(n):
            grid.paste(_to_pil(row[j], scale), (label_w + j * (w + 4), y))
    grid.save(path)
