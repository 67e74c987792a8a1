"""JPEG (in)compressibility, as in DDPO (Black et al. 2023): the size of the image saved as JPEG.

size_i = bytes(JPEG(x_i, quality)) / 1000  (kB);  ``jpeg_incompressibility`` = size,
``jpeg_compressibility`` = -size. The prompt is ignored.
"""

from __future__ import annotations

import io
from typing import Optional, Sequence

import torch

from .base import Images, Reward, to_pil_list


def jpeg_kb(images: Images, quality: int = 95) -> torch.Tensor:
    """JPEG size in kB per image, [B] float32."""
    sizes = []
    for im in to_pil_list(images):
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=quality)
        sizes.append(buf.tell() / 1000.0)
    return torch.tensor(sizes, dtype=torch.float32)


class JpegIncompressibilityReward(Reward):
    """score = JPEG size in kB (larger = more detail)."""

    name = "jpeg_incompressibility"
    sign = 1.0

    def __init__(self, quality: int = 95):
        self.quality = quality

    def score(self, images: Images, prompts: Sequence[str], metadata: Optional[Sequence[dict]] = None) -> torch.Tensor:
        return self.sign * jpeg_kb(images, self.quality)


class JpegCompressibilityReward(JpegIncompressibilityReward):
    """score = -JPEG size in kB (larger = simpler image)."""

    name = "jpeg_compressibility"
    sign = -1.0
