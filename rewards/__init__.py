"""flowalign.rewards: reward models behind one protocol, ``reward(images, prompts, metadata=None) -> [B]``.

``get(name, **options)`` builds a reward from the explicit table ``REWARDS``; heavy dependencies are
imported when a reward is built, with an install hint when missing. ``safe_scores`` wraps any reward
so that NaN/inf or a raising sample marks that sample invalid instead of failing the batch.
"""

from __future__ import annotations

from .aesthetic import AestheticReward
from .base import Reward, to_pil_list
from .clip import ClipScoreReward
from .dino import DinoSimilarityReward
from .guard import safe_scores
from .jpeg import JpegCompressibilityReward, JpegIncompressibilityReward
from .multi import MultiReward
from .ocr import OCRReward
from .preference import HPSReward, PickScoreReward
from .remote import RemoteReward
from .toy import ToyGenEvalReward

REWARDS = {
    "toy_geneval": ToyGenEvalReward,
    "clip_score": ClipScoreReward,
    "dino_similarity": DinoSimilarityReward,
    "ocr": OCRReward,
    "pickscore": PickScoreReward,
    "hps": HPSReward,
    "aesthetic": AestheticReward,
    "jpeg_compressibility": JpegCompressibilityReward,
    "jpeg_incompressibility": JpegIncompressibilityReward,
    "remote": RemoteReward,
    "multi": MultiReward,
}


def get(name: str, **options) -> Reward:
    """Build the reward called ``name`` with ``options``; unknown names list the valid ones."""
    if name not in REWARDS:
        raise ValueError(f"unknown reward {name!r}; choose one of: {', '.join(sorted(REWARDS))}")
    return REWARDS[name](**options)


__all__ = ["REWARDS", "Reward", "get", "safe_scores", "to_pil_list"]
