"""PIL renderer of the offline world: a spec (or prompt) -> an anti-aliased RGB image.

Shapes are drawn at ``SUPERSAMPLE`` x resolution and box-downsampled. Object sizes (bounding
box side d) are uniform in [10, 18] px at 64 px and scale linearly with ``size``; boxes keep a
gap of >= 4 px (at 64 px) so the detector can separate them even after blur. For position
prompts the boxes are placed so that ``relations_of`` gives exactly the prompted relation, both
with GenEval's margin and with a 3x margin. Colours the prompt leaves open are drawn uniformly from the palette.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .grammar import COLORS, POSITION_THRESHOLD, TEXT_TASK, SceneSpec, parse_prompt, relations_of

PALETTE = {  # RGB; hues ~0, 128, 226, 49 degrees, saturated, so hue alone separates them
    "red": (215, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 80, 215),
    "yellow": (230, 190, 20),
}
BACKGROUND = (236, 236, 236)
TEXT_COLOR = (20, 20, 20)
SIZE_RANGE = (10.0, 18.0)  # bounding-box side at 64 px
GAP = 4.0  # min gap between boxes at 64 px
SUPERSAMPLE = 4
RENDER_MARGIN = 3 * POSITION_THRESHOLD
assert set(PALETTE) == set(COLORS)


@dataclass(frozen=True)
class Placed:
    """One drawn object: box (x0, y0, x1, y1) in pixels of the output image."""

    shape: str
    color: str
    box: tuple[float, float, float, float]
    rgb: tuple[int, int, int]


def layout(spec: SceneSpec, size: int, rng: np.random.Generator, max_tries: int = 200) -> list[Placed]:
    """Random non-overlapping placement of the spec's objects (exact counts, one per 'a').

    Boxes are squares of side d ~ U(SIZE_RANGE) * size / 64 inside the image with a margin of
    GAP; a layout is redrawn until no two boxes come within GAP of each other and, for position,
    ``relations_of`` gives exactly ``{relation}`` at both RENDER_MARGIN and GenEval's margin.
    """
    s = size / 64.0
    gap = GAP * s
    want = []
    for o in spec.objects:
        color = o.color or COLORS[rng.integers(len(COLORS))]
        want += [(o.shape, color)] * o.count
    for _ in range(max_tries):
        boxes = []
        for _shape, _color in want:
            d = rng.uniform(*SIZE_RANGE) * s
            for _ in range(50):
                x0, y0 = rng.uniform(gap, size - gap - d, size=2)
                box = (x0, y0, x0 + d, y0 + d)
                if all(_apart(box, b, gap) for b in boxes):
                    boxes.append(box)
                    break
            else:
                break
        if len(boxes) < len(want):
            continue
        if spec.relation and not (relations_of(boxes[0], boxes[1], RENDER_MARGIN) == {spec.relation}
                                  == relations_of(boxes[0], boxes[1])):
            continue
        return [Placed(sh, c, b, _jitter(PALETTE[c], rng)) for (sh, c), b in zip(want, boxes)]
    raise RuntimeError(f"could not lay out {spec} at size {size}")


def _apart(a, b, gap: float) -> bool:
    return a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1]


def _jitter(rgb, rng: np.random.Generator, amount: int = 12) -> tuple[int, int, int]:
    return tuple(int(np.clip(c + rng.integers(-amount, amount + 1), 0, 255)) for c in rgb)


def _draw_shape(draw: ImageDraw.ImageDraw, p: Placed, k: int) -> None:
    x0, y0, x1, y1 = (v * k for v in p.box)
    if p.shape == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=p.rgb)
    elif p.shape == "square":
        draw.rectangle((x0, y0, x1, y1), fill=p.rgb)
    else:  # upright isosceles triangle filling its box
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=p.rgb)


def render(spec: SceneSpec | str, size: int = 64, seed: int | np.random.Generator = 0
           ) -> tuple[Image.Image, str, SceneSpec]:
    """Render a spec or prompt -> (RGB image size x size, canonical caption, spec).

    Background is light grey (jittered by +-4); object colours are jittered by +-12 per channel.
    Text specs are drawn with PIL's bundled font, dark on light, as large as fits (width <= 0.85
    size); use size >= 64 for legible text.
    """
    spec = parse_prompt(spec) if isinstance(spec, str) else spec
    rng = np.random.default_rng(seed)
    bg = _jitter(BACKGROUND, rng, 4)
    if spec.task == TEXT_TASK:
        return _render_text(spec, size, bg, rng), spec.prompt, spec
    k = SUPERSAMPLE
    big = Image.new("RGB", (size * k, size * k), bg)
    draw = ImageDraw.Draw(big)
    for p in layout(spec, size, rng):
        _draw_shape(draw, p, k)
    return big.resize((size, size), Image.Resampling.BOX), spec.prompt, spec


def _render_text(spec: SceneSpec, size: int, bg, rng: np.random.Generator) -> Image.Image:
    img = Image.new("RGB", (size, size), bg)
    draw = ImageDraw.Draw(img)
    font_px = int(size * 0.45)
    while True:
        font = ImageFont.load_default(size=font_px)
        x0, y0, x1, y1 = draw.textbbox((0, 0), spec.text, font=font)
        if x1 - x0 <= 0.85 * size or font_px <= 8:
            break
        font_px -= 1
    w, h = x1 - x0, y1 - y0
    jx, jy = rng.uniform(-1, 1, size=2) * 0.04 * size
    xy = ((size - w) / 2 - x0 + jx, (size - h) / 2 - y0 + jy)
    draw.text(xy, spec.text, font=font, fill=_jitter(TEXT_COLOR, rng, 10))
    return img
