"""Image preprocessing in torch (differentiable for tensor input); no torchvision, no image processors.

``prepare(images, size, mean, std) -> [B,3,size,size]``: resize the shortest side to ``size`` (bicubic,
antialiased), centre-crop ``size x size``, then ``(x - mean) / std`` per channel. Input: a list of PIL
images or a float tensor [B,3,H,W] in [0,1].
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def to_tensors(images) -> list[torch.Tensor]:
    """List of PIL or tensor [B,3,H,W] in [0,1] -> list of float32 [1,3,H,W] tensors (one per image)."""
    if isinstance(images, torch.Tensor):
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images tensor must be [B,3,H,W] in [0,1], got shape {tuple(images.shape)}")
        return list(images.float().split(1))
    out = []
    for im in images:
        a = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
        out.append(torch.from_numpy(a).permute(2, 0, 1)[None])
    return out


def resize_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    """[B,3,H,W] -> [B,3,size,size]: shortest side to ``size`` (bicubic, antialias), centre crop."""
    h, w = x.shape[-2:]
    s = size / min(h, w)
    nh, nw = max(size, round(h * s)), max(size, round(w * s))
    if (nh, nw) != (h, w):
        x = F.interpolate(x, size=(nh, nw), mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
    top, left = (nh - size) // 2, (nw - size) // 2
    return x[..., top:top + size, left:left + size]


def prepare(images, size: int, mean=CLIP_MEAN, std=CLIP_STD) -> torch.Tensor:
    """Images -> normalised pixel values [B,3,size,size] (float32)."""
    x = torch.cat([resize_crop(t, size) for t in to_tensors(images)])
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - m) / s
