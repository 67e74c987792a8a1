"""Detector of the offline world: an image -> coloured shapes (numpy only, no scipy).

Pipeline, for an image x in [0,1]^{H x W x 3}:
1. colour: hue label k = nearest palette hue (circular distance <= ``max_hue_dist`` degrees)
   and coverage alpha = clip(sat / sat_k, 0, 1) with sat = max_c x - min_c x (mixing a colour
   with grey keeps its hue and scales sat, so alpha is the colour's share of the pixel);
2. foreground: alpha >= ``coverage``; a 3x3 majority (mode) filter removes noise specks;
3. 4-connected components of equal labels (min-label propagation with pointer jumping);
   components smaller than ``min_area_frac * H * W`` are dropped;
4. shape: soft IoU sum min(a, t) / sum max(a, t) between the object's coverage in its box
   (normalised by its own interior level, so pale objects work) and ideal circle / square /
   triangle (apex up or down) maps, each blurred with sigma in ``TEMPLATE_BLURS`` x size and
   cropped the same way; best IoU wins; objects whose best IoU < ``min_iou`` are dropped.
   (Fill ratios area / box area of the ideal shapes: pi/4 ~ 0.785, 1 and 0.5.)
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image

from .grammar import COLORS, SHAPES
from .render import PALETTE


@dataclass(frozen=True)
class Detected:
    """One detected object; bbox = (x0, y0, x1, y1) pixels, end-exclusive; centroid = (x, y)."""

    shape: str
    color: str
    bbox: tuple[int, int, int, int]
    centroid: tuple[float, float]
    area: int
    iou: float  # IoU with the winning ideal shape, a confidence in [0, 1]

    @property
    def colour(self) -> str:  # British alias
        return self.color


def _hue_sat(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """x [..., 3] in [0,1] -> (hue in degrees [0, 360), saturation max - min)."""
    mx, mn = x.max(-1), x.min(-1)
    c = mx - mn
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    safe = np.where(c > 1e-8, c, 1.0)
    h = np.where(mx == r, ((g - b) / safe) % 6, np.where(mx == g, (b - r) / safe + 2, (r - g) / safe + 4))
    return (h * 60.0) % 360.0, c


PALETTE_HUES, PALETTE_SATS = _hue_sat(np.array([PALETTE[c] for c in COLORS], float) / 255.0)


def to_array(image) -> np.ndarray:
    """PIL image, uint8 array [H,W,3], or float array/tensor [3,H,W] or [H,W,3] in [0,1] -> float [H,W,3]."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    if hasattr(image, "detach"):  # torch tensor, without importing torch
        image = image.detach().cpu().float().numpy()
    x = np.asarray(image)
    if x.ndim != 3 or 3 not in (x.shape[0], x.shape[-1]):
        raise ValueError(f"expected an image [3,H,W] or [H,W,3], got shape {x.shape}")
    if x.shape[-1] != 3:
        x = np.moveaxis(x, 0, -1)
    x = x.astype(np.float32) / 255.0 if x.dtype == np.uint8 else x.astype(np.float32)
    return np.clip(x, 0.0, 1.0)


def color_coverage(x: np.ndarray, min_sat: float = 0.1, max_hue_dist: float = 35.0
                   ) -> tuple[np.ndarray, np.ndarray]:
    """x [H,W,3] -> (hue label [H,W] int, coverage alpha [H,W] float in [0,1]).

    label k = argmin_k |hue - hue_k| (circular), or -1 where sat <= min_sat or that distance >
    max_hue_dist; alpha = clip(sat / sat_k, 0, 1) is how much of colour k is mixed with grey
    (mixing with grey keeps the hue and scales the saturation), 0 where the label is -1.
    """
    hue, sat = _hue_sat(x)
    d = np.abs(hue[..., None] - PALETTE_HUES)
    d = np.minimum(d, 360.0 - d)
    lab = d.argmin(-1)
    lab = np.where((sat > min_sat) & (d.min(-1) <= max_hue_dist), lab, -1)
    alpha = np.where(lab >= 0, np.clip(sat / PALETTE_SATS[lab], 0.0, 1.0), 0.0)
    return lab, alpha


def _box3(a: np.ndarray) -> np.ndarray:
    """Sum over the 3x3 neighbourhood (zero padding) of the last two axes."""
    p = np.pad(a, [(0, 0)] * (a.ndim - 2) + [(1, 1), (1, 1)])
    h, w = a.shape[-2:]
    return sum(p[..., i:i + h, j:j + w] for i in range(3) for j in range(3))


def mode_filter(lab: np.ndarray, k: int = len(COLORS)) -> np.ndarray:
    """3x3 majority of labels in {-1..k-1}; ties go to the lower label (background first)."""
    onehot = (lab[None] == np.arange(-1, k)[:, None, None]).astype(np.int16)
    return _box3(onehot).argmax(0) - 1


def connected_components(lab: np.ndarray) -> np.ndarray:
    """4-connected components of equal non-negative labels -> ids [H,W] (-1 background).

    Each pixel's id starts as its flat index; repeat (min over same-label neighbours, then
    pointer jumping id <- id[id]) until stable; ids end as the smallest index in the component.
    """
    h, w = lab.shape
    fg = lab >= 0
    big = h * w
    ids = np.where(fg, np.arange(big).reshape(h, w), big)
    pad_lab = np.pad(lab, 1, constant_values=-2)
    while True:
        pad = np.pad(ids, 1, constant_values=big)
        new = ids
        for dy, dx in ((0, 1), (2, 1), (1, 0), (1, 2)):
            same = pad_lab[dy:dy + h, dx:dx + w] == lab
            new = np.minimum(new, np.where(same & fg, pad[dy:dy + h, dx:dx + w], big))
        flat = new.ravel()
        for _ in range(4):  # pointer jumping
            flat = np.where(flat < big, np.append(flat, big)[flat], big)
        new = np.minimum(new, flat.reshape(h, w))
        if np.array_equal(new, ids):
            return np.where(fg, ids, -1)
        ids = new


TEMPLATE_RES = 48  # ideal shapes are drawn at this resolution, blurred, thresholded, cropped
TEMPLATE_BLURS = (0.0, 0.05, 0.1, 0.15)  # Gaussian sigma as a fraction of the shape's size


def _gauss_blur(a: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of a 2-D float array (edge padding)."""
    if sigma <= 0:
        return a
    r = int(np.ceil(3 * sigma))
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    k /= k.sum()
    p = np.pad(a, r, mode="edge")
    p = sum(k[i] * p[i:i + p.shape[0] - 2 * r] for i in range(2 * r + 1))
    return sum(k[i] * p[:, i:i + p.shape[1] - 2 * r] for i in range(2 * r + 1))


@lru_cache(maxsize=None)
def _base_templates(level: float) -> dict[str, list[np.ndarray]]:
    """Soft coverage maps of each shape after blur sigma in TEMPLATE_BLURS, cropped to where
    coverage >= level (as the detector crops objects; blur shrinks corners and tips)."""
    n, pad = TEMPLATE_RES, TEMPLATE_RES // 2
    c = (np.arange(n * 4) + 0.5) / (n * 4)  # 4x supersampled
    y, x = c[:, None], c[None, :]
    ideal = {"circle": (2 * x - 1) ** 2 + (2 * y - 1) ** 2 <= 1.0,
             "square": np.ones((4 * n, 4 * n), bool),
             "triangle": np.abs(x - 0.5) <= 0.5 * y}
    out = {}
    for shape, m in ideal.items():
        cov = np.pad(m.reshape(n, 4, n, 4).mean((1, 3)), pad)
        maps = []
        for s in TEMPLATE_BLURS:
            b = _gauss_blur(cov, s * n)
            ys, xs = np.nonzero(b >= level)
            maps.append(b[ys.min():ys.max() + 1, xs.min():xs.max() + 1])
        out[shape] = maps + ([m[::-1] for m in maps] if shape == "triangle" else [])
    return out


def _resize(m: np.ndarray, h: int, w: int) -> np.ndarray:
    """Area resize of a float map: each output cell averages the source pixels that fall in it."""
    ys = np.arange(m.shape[0]) * h // m.shape[0]
    xs = np.arange(m.shape[1]) * w // m.shape[1]
    out, cnt = np.zeros((h, w)), np.zeros((h, w))
    np.add.at(out, (ys[:, None], xs[None, :]), m)
    np.add.at(cnt, (ys[:, None], xs[None, :]), 1.0)
    return out / np.maximum(cnt, 1)


@lru_cache(maxsize=4096)
def _templates(h: int, w: int, level: float) -> dict[str, list[np.ndarray]]:
    """The blurred ideal shapes as soft maps resized to an h x w box."""
    return {s: [_resize(m, h, w) for m in ms] for s, ms in _base_templates(level).items()}


def classify_shape(soft: np.ndarray, level: float = 0.4) -> tuple[str, float]:
    """soft [h,w] coverage of one object (peak ~1) cropped to where it is >= level
    -> (best shape, its soft IoU).

    soft IoU(a, t) = sum min(a, t) / sum max(a, t), maximised over each shape's templates.
    """
    best, best_iou = SHAPES[0], -1.0
    for shape, temps in _templates(*soft.shape, level).items():
        for t in temps:
            iou = float(np.minimum(soft, t).sum() / max(np.maximum(soft, t).sum(), 1e-8))
            if iou > best_iou:
                best, best_iou = shape, iou
    return best, best_iou


def _object_coverage(ids, cid, lab, hue_lab, alpha, box, coverage: float) -> tuple[np.ndarray, float]:
    """(soft [h,w], level): the object's own coverage in its box, normalised by its interior.

    own = the component plus same-hue unlabelled fringe in the box; q = q90(alpha over the
    component); soft = clip(alpha / q, 0, 1), so pale objects keep their geometry; the box was
    cut where alpha >= coverage, i.e. soft >= level = coverage / q (rounded to 0.05).
    """
    y0, y1, x0, x1 = box
    comp = ids[y0:y1, x0:x1] == cid
    k = lab[y0:y1, x0:x1][comp][0]
    own = comp | ((lab[y0:y1, x0:x1] < 0) & (hue_lab[y0:y1, x0:x1] == k))
    q = float(np.clip(np.percentile(alpha[y0:y1, x0:x1][comp], 90), coverage / 0.9, 1.0))
    soft = np.clip(np.where(own, alpha[y0:y1, x0:x1], 0.0) / q, 0.0, 1.0)
    return soft, round(round(coverage / q / 0.05) * 0.05, 2)


def detect(image, coverage: float = 0.4, min_sat: float = 0.1, max_hue_dist: float = 35.0,
           min_area_frac: float = 0.004, min_iou: float = 0.5, smooth: bool = True) -> list[Detected]:
    """Read an image back into objects, sorted by (centroid y, x). See the module docstring."""
    x = to_array(image)
    hue_lab, alpha = color_coverage(x, min_sat, max_hue_dist)
    lab = np.where(alpha >= coverage, hue_lab, -1)
    lab = mode_filter(lab) if smooth else lab
    ids = connected_components(lab)
    h, w = lab.shape
    min_area = max(4, int(min_area_frac * h * w))
    flat = ids.ravel()
    areas = np.bincount(flat[flat >= 0], minlength=h * w)
    out = []
    for cid in np.nonzero(areas >= min_area)[0]:
        ys, xs = np.nonzero(ids == cid)
        y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
        k = lab[ys[0], xs[0]]
        shape, iou = classify_shape(*_object_coverage(ids, cid, lab, hue_lab, alpha, (y0, y1, x0, x1), coverage))
        if iou < min_iou:
            continue
        out.append(Detected(shape, COLORS[k], (int(x0), int(y0), int(x1), int(y1)),
                            (float(xs.mean()) + 0.5, float(ys.mean()) + 0.5), int(areas[cid]), iou))
    return sorted(out, key=lambda d: (d.centroid[1], d.centroid[0]))
