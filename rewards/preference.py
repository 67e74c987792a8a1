"""Human-preference rewards built on CLIP towers: ``pickscore`` and ``hps`` (HPS v2-style).

PickScore (Kirstain et al. 2023): score = exp(logit_scale) * cos(E_img(x), E_txt(c)) / divisor
  (the model card's score; Flow-GRPO divides by 26 to bring it near [0, 1]).
HPS v2 / v2.1 (Wu et al. 2023): score = cos(E_img(x), E_txt(c)) with an open_clip ViT-H-14 fine-tuned
  on human preferences; a CLIP folder in transformers format can be used with ``backend='hf'``.
"""

from __future__ import annotations

import os
from typing import Optional, Sequence

import torch

from .base import Images, Reward
from .clip import embedder

PICKSCORE = "yuvalkirstain/PickScore_v1"
PICKSCORE_TOKENIZER = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"  # PickScore_v1 ships no tokenizer
HPS_FILE = "HPS_v2.1_compressed.pt"


class PickScoreReward(Reward):
    """score = exp(logit_scale) * cos / divisor, [B]. ``model``: hub id or folder; ``tokenizer``: where the
    CLIP tokenizer lives (defaults to the LAION ViT-H-14 repo, or ``model`` when that is a folder)."""

    name = "pickscore"
    differentiable = True  # a frozen CLIP on torch-preprocessed images

    def __init__(self, model: str = PICKSCORE, tokenizer: Optional[str] = None, divisor: float = 1.0,
                 device: str = "cpu", batch_size: int = 32):
        if tokenizer is None:
            tokenizer = PICKSCORE_TOKENIZER if model == PICKSCORE else model
        self.clip = embedder("hf", model=model, tokenizer=tokenizer, what="PickScore", device=device,
                             batch_size=batch_size)
        self.divisor = divisor

    def score(self, images: Images, prompts: Sequence[str], metadata: Optional[Sequence[dict]] = None) -> torch.Tensor:
        cos = (self.clip.images(images) * self.clip.texts(prompts)).sum(-1)
        return self.clip.logit_scale * cos / self.divisor


class HPSReward(Reward):
    """HPS v2-style: score = scale * cos(image, prompt), [B].

    backend 'open_clip' (default, as released): ``model`` = architecture ('ViT-H-14'), ``pretrained`` =
    path to HPS_v2.1_compressed.pt. backend 'hf': ``model`` = a transformers CLIP folder or hub id.
    """

    name = "hps"
    differentiable = True  # a frozen CLIP on torch-preprocessed images

    def __init__(self, model: str = "ViT-H-14", pretrained: Optional[str] = None, backend: str = "open_clip",
                 tokenizer: Optional[str] = None, scale: float = 1.0, device: str = "cpu", batch_size: int = 32):
        if backend == "open_clip" and (pretrained is None or not os.path.isfile(pretrained)):
            raise FileNotFoundError(
                f"HPS weights {pretrained or HPS_FILE!r} not found locally (offline): run `hf download xswu/HPSv2 "
                f"{HPS_FILE}` (or `huggingface-cli download xswu/HPSv2 {HPS_FILE}`) and pass "
                f"pretrained=/path/to/{HPS_FILE} (needs pip install open_clip_torch), or pass backend='hf', "
                f"model=/path/to/clip-folder")
        self.clip = embedder(backend, model=model, tokenizer=tokenizer, pretrained=pretrained, what="HPS",
                             device=device, batch_size=batch_size)
        self.scale = scale

    def score(self, images: Images, prompts: Sequence[str], metadata: Optional[Sequence[dict]] = None) -> torch.Tensor:
        return self.scale * (self.clip.images(images) * self.clip.texts(prompts)).sum(-1)
