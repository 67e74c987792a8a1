"""``ocr``: does the image show the prompt's quoted text? (Flow-GRPO's OCR reward, with RapidOCR.)

target t = the text between the first pair of double quotes in the prompt; read r = the concatenated
OCR lines; both lowercased with spaces removed. score = 1 if t is a substring of r, else
1 - min(lev(r, t), |t|) / |t|  in [0, 1]  (0 for an image with no text). RapidOCR ships its ONNX models,
so this runs offline; ``pip install 'flowalign[ocr]'``.
"""

from __future__ import annotations

import re
from typing import Optional, Sequence

import numpy as np
import torch

from .base import Images, Reward, to_pil_list

_QUOTED = re.compile(r'"([^"]+)"')


def quoted_text(prompt: str) -> str:
    """The text between the first pair of double quotes; ValueError when there is none."""
    m = _QUOTED.search(prompt)
    if m is None:
        shown = repr(prompt) if len(prompt) <= 60 else repr(prompt[:57] + "...")
        raise ValueError(f'ocr reward: prompt {shown} has no "quoted text"; write the target text in double '
                         f'quotes, e.g. a sign that says "OPEN"')
    return m.group(1)


def normalize(text: str) -> str:
    return text.replace(" ", "").lower()


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insert / delete / substitute, each cost 1)."""
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def text_score(read: str, target: str) -> float:
    """1 if target in read else 1 - min(lev(read, target), |target|) / |target| (both normalised)."""
    read, target = normalize(read), normalize(target)
    if not target:
        raise ValueError('ocr reward: the quoted text is empty after removing spaces')
    if target in read:
        return 1.0
    return 1.0 - min(levenshtein(read, target), len(target)) / len(target)


class OCRReward(Reward):
    """score in [0, 1] per sample, [B].

    min_confidence: OCR lines below it are ignored. det_side: images whose short side is below it are
    upscaled to it for text detection (RapidOCR's own default, 736, is ~4x slower on small images and
    upscales 512-px ones; 256 leaves >= 256-px images untouched, like Flow-GRPO's PaddleOCR setting).
    Other RapidOCR settings pass through, e.g. ``**{"EngineConfig.onnxruntime.intra_op_num_threads": 1}``.
    """

    name = "ocr"

    def __init__(self, min_confidence: float = 0.0, det_side: int = 256, use_cls: bool = False, **rapidocr_params):
        try:
            from rapidocr import RapidOCR
        except ImportError as e:
            raise ImportError("the ocr reward needs rapidocr: pip install 'flowalign[ocr]'") from e
        params = {"Global.log_level": "error", "Global.use_cls": use_cls, "Det.limit_side_len": det_side,
                  **rapidocr_params}
        self.engine = RapidOCR(params=params)
        self.min_confidence = min_confidence

    def read(self, image) -> str:
        """OCR one PIL image -> the concatenated text of its lines ('' when none)."""
        out = self.engine(np.asarray(image.convert("RGB")))
        txts, scores = out.txts or (), out.scores or ()
        return "".join(t for t, c in zip(txts, scores) if c >= self.min_confidence)

    def score(self, images: Images, prompts: Sequence[str], metadata: Optional[Sequence[dict]] = None) -> torch.Tensor:
        targets = [quoted_text(p) for p in prompts]  # fail before any OCR work
        return torch.tensor([text_score(self.read(im), t) for im, t in zip(to_pil_list(images), targets)])
