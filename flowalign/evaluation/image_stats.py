"""Cheap per-image statistics that reveal reward hacking, and within-prompt diversity.

A reward model can be satisfied by images that drift away from the base model in simple, measurable ways:
UniRL saw the share of dark pixels rise from 0.45 to 0.93 under an OCR reward; other runs grow grid artefacts
(edge density), blank backgrounds (bright fraction, colour entropy, JPEG size) or collapse to one image per
prompt (within-prompt diversity -> 0). ``STATISTICS`` is the table of those statistics; ``image_statistics``
computes them per image, and ``drift.DriftMonitor`` compares them with the base model's distribution.

All statistics are computed in float64 from images in [0, 1]; luma is Y = 0.299 R + 0.587 G + 0.114 B (BT.601).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

DARK_LUMA = 0.1  # luma below this is a dark pixel
BRIGHT_LUMA = 0.9  # luma above this is a bright pixel
COLOUR_LEVELS = 8  # quantisation levels per channel for colour_entropy (8^3 = 512 bins)
EDGE_THRESHOLD = 0.25  # Sobel magnitude (= step contrast in luma) above which a pixel is an edge
JPEG_QUALITY = 75
CHUNK = 32  # images per chunk in image_statistics (bounds the float64 intermediates)

_LUMA = (0.299, 0.587, 0.114)


@dataclass(frozen=True)
class ImageStatistic:
    """One statistic: ``fn(images [B,3,H,W] float in [0,1]) -> float64 [B]``; ``resolution`` is the smallest
    change worth seeing (the drift monitor's floor on a base std); ``description`` is one line for reports."""

    fn: Callable[[torch.Tensor], torch.Tensor]
    resolution: float
    description: str


def _luma(x: torch.Tensor) -> torch.Tensor:
    """[B,3,H,W] -> luma [B,H,W] (float64)."""
    w = torch.tensor(_LUMA, dtype=torch.float64).view(1, 3, 1, 1)
    return (x.double() * w).sum(1)


def dark_fraction(x: torch.Tensor) -> torch.Tensor:
    """Share of pixels with luma < 0.1: mean_{h,w} [Y < 0.1], float64 [B]."""
    return (_luma(x) < DARK_LUMA).double().flatten(1).mean(1)


def bright_fraction(x: torch.Tensor) -> torch.Tensor:
    """Share of pixels with luma > 0.9: mean_{h,w} [Y > 0.9], float64 [B]."""
    return (_luma(x) > BRIGHT_LUMA).double().flatten(1).mean(1)


def colour_entropy(x: torch.Tensor) -> torch.Tensor:
    """Shannon entropy in bits of the colour histogram, float64 [B]: each channel quantised to
    q = min(floor(8 x), 7), bin = 64 q_R + 8 q_G + q_B (512 bins), H = -sum_k p_k log2 p_k (0 log 0 = 0).
    0 for a one-colour image, at most 9 bits."""
    b = x.shape[0]
    q = (x.double() * COLOUR_LEVELS).floor().clamp(0, COLOUR_LEVELS - 1).long()  # [B,3,H,W]
    bins = COLOUR_LEVELS ** 3
    idx = (q[:, 0] * COLOUR_LEVELS + q[:, 1]) * COLOUR_LEVELS + q[:, 2]  # [B,H,W]
    idx = idx.flatten(1) + bins * torch.arange(b).view(b, 1)  # one block of bins per image
    counts = torch.bincount(idx.flatten(), minlength=b * bins).view(b, bins).double()
    p = counts / counts.sum(1, keepdim=True)
    return -(p * torch.where(p > 0, p.log2(), torch.zeros_like(p))).sum(1)


def saturation(x: torch.Tensor) -> torch.Tensor:
    """Mean HSV saturation, float64 [B]: s = (max_c - min_c) / max_c per pixel (0 where max_c = 0)."""
    x = x.double()
    hi, lo = x.amax(1), x.amin(1)  # [B,H,W]
    s = torch.where(hi > 0, (hi - lo) / hi.clamp_min(1e-300), torch.zeros_like(hi))
    return s.flatten(1).mean(1)


def sobel_magnitude(x: torch.Tensor) -> torch.Tensor:
    """Sobel gradient magnitude of luma, float64 [B,H,W]: g = sqrt(gx^2 + gy^2), gx = Y * [[-1,0,1],[-2,0,2],
    [-1,0,1]] / 4 and gy with the transposed kernel, replicate padding. The /4 (the smoothing weights 1,2,1 sum
    to 4) makes g of a step edge its contrast: a step from luma a to b gives |b - a| on the two pixels either
    side of it and 0 elsewhere (a linear ramp of slope s per pixel gives 2 s)."""
    k = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], dtype=torch.float64) / 4
    kernels = torch.stack([k, k.t()]).unsqueeze(1)  # [2,1,3,3]: d/dx, d/dy
    y = F.pad(_luma(x).unsqueeze(1), (1, 1, 1, 1), mode="replicate")  # [B,1,H+2,W+2]
    g = F.conv2d(y, kernels)  # [B,2,H,W]
    return g.pow(2).sum(1).sqrt()


def edge_density(x: torch.Tensor) -> torch.Tensor:
    """Share of pixels whose Sobel luma gradient magnitude (``sobel_magnitude``) exceeds 0.25, float64 [B]:
    a step edge of luma contrast > 0.25 marks the 2 pixels either side of it."""
    return (sobel_magnitude(x) > EDGE_THRESHOLD).double().flatten(1).mean(1)


def _to_uint8(x: torch.Tensor) -> np.ndarray:
    """[B,3,H,W] in [0,1] -> uint8 [B,H,W,3] by round(255 x)."""
    return (x.double().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def jpeg_bytes_per_pixel(x: torch.Tensor) -> torch.Tensor:
    """Size of the PIL JPEG (quality 75) of round(255 x) in bytes / (H W), float64 [B]; flat images ~0.1,
    detailed ones ~1."""
    from PIL import Image

    h, w = x.shape[-2:]
    sizes = []
    for a in _to_uint8(x):
        buf = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(a)).save(buf, format="JPEG", quality=JPEG_QUALITY)
        sizes.append(buf.tell())
    return torch.tensor(sizes, dtype=torch.float64) / (h * w)


STATISTICS: dict[str, ImageStatistic] = {
    "dark_fraction": ImageStatistic(dark_fraction, 0.01, "share of pixels with luma < 0.1"),
    "bright_fraction": ImageStatistic(bright_fraction, 0.01, "share of pixels with luma > 0.9"),
    "colour_entropy": ImageStatistic(colour_entropy, 0.05, "entropy (bits) of the RGB histogram, 8 levels a channel"),
    "saturation": ImageStatistic(saturation, 0.01, "mean HSV saturation (max - min) / max"),
    "edge_density": ImageStatistic(edge_density, 0.01, "share of pixels on a luma edge of contrast > 0.25 (Sobel)"),
    "jpeg_bytes_per_pixel": ImageStatistic(jpeg_bytes_per_pixel, 0.01, "JPEG (quality 75) bytes per pixel"),
}

_SHAPES = "images must be a float tensor [B,3,H,W] or video [B,F,3,H,W] in [0,1], or a list of PIL images"


def _pil_to_tensor(im) -> torch.Tensor:
    """PIL image -> float32 [3,H,W] = uint8 / 255 (the same float32 values as a tensor made that way)."""
    return torch.from_numpy(np.asarray(im.convert("RGB")).copy()).permute(2, 0, 1).float() / 255


def _compute(x: torch.Tensor, names: Sequence[str]) -> dict[str, torch.Tensor]:
    """[B,3,H,W] -> {name: float64 [B]}, CHUNK images at a time."""
    x = x.detach().cpu().clamp(0, 1)
    out: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    for chunk in x.split(CHUNK):
        for n in names:
            out[n].append(STATISTICS[n].fn(chunk).double())
    return {n: torch.cat(v) if v else torch.zeros(0, dtype=torch.float64) for n, v in out.items()}


def image_statistics(images, names: Optional[Sequence[str]] = None) -> dict[str, torch.Tensor]:
    """Each statistic of ``names`` (default: all of ``STATISTICS``) per image -> {name: float64 [B]} on the CPU.

    images: a float tensor [B,3,H,W] in [0,1]; video [B,F,3,H,W] (each frame's statistic, mean over frames);
    or a list of PIL images (converted as uint8 / 255; images of different sizes are fine).
    """
    names = list(STATISTICS) if names is None else list(names)
    unknown = [n for n in names if n not in STATISTICS]
    if unknown:
        raise ValueError(f"unknown image statistic {unknown[0]!r}; known: {', '.join(STATISTICS)}")
    if isinstance(images, torch.Tensor):
        if not images.is_floating_point() or images.dim() not in (4, 5) or images.shape[-3] != 3:
            raise ValueError(f"{_SHAPES}; got a {images.dtype} tensor of shape {tuple(images.shape)}")
        if images.dim() == 5:  # video: statistics of every frame, mean over frames
            b, f = images.shape[:2]
            per_frame = _compute(images.reshape(b * f, *images.shape[2:]), names)
            return {n: v.view(b, f).mean(1) for n, v in per_frame.items()}
        return _compute(images, names)
    if isinstance(images, (list, tuple)) and all(hasattr(im, "convert") for im in images):
        frames = [_pil_to_tensor(im) for im in images]
        if len({t.shape for t in frames}) <= 1:  # one size (or none): one batch
            x = torch.stack(frames) if frames else torch.zeros(0, 3, 1, 1)
            return _compute(x, names)
        per_image = [_compute(t[None], names) for t in frames]
        return {n: torch.cat([s[n] for s in per_image]) for n in names}
    raise ValueError(f"{_SHAPES}; got {type(images).__name__}")


def within_prompt_diversity(features: torch.Tensor, prompts: Sequence[str]) -> tuple[torch.Tensor, list[str]]:
    """Mean pairwise cosine distance of the images of each prompt -> (float64 [G], the G prompts).

    features: [B, D] (any scale: rows are L2-normalised here); prompts: B strings. For every distinct prompt with
    at least 2 rows, in order of first appearance, d = mean_{i<j} (1 - cos(f_i, f_j)) over its unordered pairs:
    0 when the model gives one image per prompt (mode collapse), 1 for orthogonal features, at most 2.
    """
    prompts = list(prompts)
    if not isinstance(features, torch.Tensor) or features.dim() != 2 or features.shape[0] != len(prompts):
        shape = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
        raise ValueError(f"features must be a tensor [B, D] with one row per prompt ({len(prompts)} prompts), "
                         f"got {shape}")
    f = F.normalize(features.detach().cpu().double(), dim=1)
    rows: dict[str, list[int]] = {}
    for i, p in enumerate(prompts):
        rows.setdefault(p, []).append(i)  # dicts keep first-seen order
    values, kept = [], []
    for p, idx in rows.items():
        if len(idx) < 2:
            continue
        g = f[idx]
        i, j = torch.triu_indices(len(idx), len(idx), offset=1)
        values.append((1 - (g[i] * g[j]).sum(1)).clamp(0, 2).mean())
        kept.append(p)
    return (torch.stack(values) if values else torch.zeros(0, dtype=torch.float64)), kept


def feature_embedder(spec: Optional[str], device: str = "cpu") -> Optional[Callable[..., torch.Tensor]]:
    """Image features for ``within_prompt_diversity``: a callable images -> [B, D] (L2-normalised), or None.

    spec: "none" (or None) -> None; "tiny_clip" -> the shipped toy-world CLIP (the rewards' ``tiny`` alias, so
    FLOWALIGN_ASSETS and wheel installs resolve as for ``clip_score``); any other string -> a CLIP hub id or
    folder. Loaded through ``rewards.clip.CLIPEmbedder`` (transformers imported here, not at module import).
    """
    if spec is None or spec == "none":
        return None
    from ..rewards.clip import CLIPEmbedder

    model = "tiny" if spec == "tiny_clip" else spec
    return CLIPEmbedder(model=model, what="diversity features", device=device).images
