"""The reward protocol: ``reward(images, prompts, metadata=None) -> float tensor [B]``.

images: a list of PIL images, a float tensor [B,3,H,W] in [0,1], or video [B,F,3,H,W] (scored per frame
and averaged). Rewards are plain callables with a ``name``; heavy dependencies are imported at use.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np
import torch

Images = Any  # list[PIL.Image] | Tensor[B,3,H,W] | Tensor[B,F,3,H,W]


class RewardUnavailable(ConnectionError):
    """The reward cannot score anything now (e.g. its server is down after every retry, or its replies break the
    protocol). ``safe_scores`` re-raises it at once instead of scoring the batch sample by sample, which would
    repeat the same wait B times. The message is one line naming the cause and the fix."""


def to_pil_list(images: Images) -> list:
    """Images (list of PIL, or a float tensor [B,3,H,W] in [0,1]) -> list of RGB PIL images."""
    from PIL import Image

    if isinstance(images, torch.Tensor):
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images tensor must be [B,3,H,W] in [0,1], got shape {tuple(images.shape)}")
        arr = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        return [Image.fromarray(np.ascontiguousarray(a)) for a in arr]
    return [im.convert("RGB") for im in images]


class Reward:
    """Base class: subclasses implement ``score(images, prompts, metadata) -> [B]`` for still images.

    ``__call__`` checks the batch, averages video frames, and returns float32 [B] on the CPU.
    """

    name: str = "reward"
    differentiable: bool = False  # True when score() is a torch function of tensor images (reward backprop)
    # direction in which each of ``diagnostics``' statistics is suspect: +1 a rise, -1 a fall, 0 either
    diagnostic_directions: dict = {}

    def diagnostics(self, images: Images, prompts: Sequence[str]) -> dict:
        """Per-image statistics of what this reward sees that reveal hacking it cannot (e.g. the toy world's extra
        objects, which GenEval's checks ignore): {name: float tensor [B], NaN where undefined}. They join the image
        statistics of the drift flag (flowalign.evaluation.drift). Default: none."""
        return {}

    def score(self, images: Images, prompts: Sequence[str], metadata: Optional[Sequence[dict]] = None) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, images: Images, prompts: Sequence[str], metadata: Optional[Sequence[dict]] = None) -> torch.Tensor:
        prompts = list(prompts)
        if len(images) != len(prompts):
            raise ValueError(f"{self.name}: got {len(images)} images but {len(prompts)} prompts")
        if isinstance(images, torch.Tensor) and images.dim() == 5:  # video [B,F,3,H,W]: mean over frames
            b, f = images.shape[:2]
            frames = images.reshape(b * f, *images.shape[2:])
            reps = [p for p in prompts for _ in range(f)]
            meta = None if metadata is None else [m for m in metadata for _ in range(f)]
            return self(frames, reps, meta).view(b, f).mean(1)
        out = torch.as_tensor(self.score(images, prompts, metadata), dtype=torch.float32).cpu()
        if out.shape != (len(prompts),):
            raise RuntimeError(f"{self.name} returned shape {tuple(out.shape)}, expected [{len(prompts)}]")
        return out

    def score_differentiable(self, images: torch.Tensor, prompts: Sequence[str],
                             metadata: Optional[Sequence[dict]] = None) -> torch.Tensor:
        """Scores [B] float32 on the images' device with the autograd graph kept: images [B,3,H,W] in [0,1]
        (video [B,F,3,H,W]: mean over frames), e.g. decoded latents with grad (reward backprop, docs/math.md §8).
        Same values as ``__call__``. Raises TypeError for rewards that leave torch (PIL, a detector, OCR, HTTP)."""
        if not self.differentiable:
            raise TypeError(f"reward {self.name!r} is not differentiable in torch; reward backprop needs one with "
                            "differentiable=True (flowalign.rewards.differentiable_rewards() lists them) or use a "
                            "policy-gradient algorithm (grpo, nft, crd)")
        prompts = list(prompts)
        if not isinstance(images, torch.Tensor) or images.dim() not in (4, 5) or len(images) != len(prompts):
            raise ValueError(f"{self.name}: score_differentiable needs a tensor [B,3,H,W] or [B,F,3,H,W] with one "
                             f"prompt per row, got {type(images).__name__} for {len(prompts)} prompts")
        if images.dim() == 5:
            b, f = images.shape[:2]
            reps = [p for p in prompts for _ in range(f)]
            meta = None if metadata is None else [m for m in metadata for _ in range(f)]
            return self.score_differentiable(images.flatten(0, 1), reps, meta).view(b, f).mean(1)
        out = self.score(images, prompts, metadata)
        if not isinstance(out, torch.Tensor) or out.shape != (len(prompts),):
            raise RuntimeError(f"{self.name}.score returned {type(out).__name__} {tuple(getattr(out, 'shape', ()))}, "
                               f"expected a tensor [{len(prompts)}]")
        return out.float()
