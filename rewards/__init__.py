"""flowalign.rewards: reward models behind one protocol, ``reward(images, prompts, metadata=None) -> [B]``.

``get(name, **options)`` builds a reward from the explicit table ``REWARDS``; heavy dependencies are
imported when a reward is built, with an install hint when missing. ``safe_scores`` wraps any reward
so that NaN/inf or a raising sample marks that sample invalid instead of failing the batch.
"""

from __future__ import annotations

from .aesthetic import AestheticReward
from .base import Reward, RewardUnavailable, to_pil_list
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
    """Build the reward called ``name`` with ``options``; unknown names list the valid ones. A reward class made
    of other rewards (``multi``) builds them from their options through ``cls.from_options(get, **options)``."""
    if name not in REWARDS:
        raise ValueError(f"unknown reward {name!r}; choose one of: {', '.join(sorted(REWARDS))}")
    cls = REWARDS[name]
    build = getattr(cls, "from_options", None)
    return build(get, **options) if build is not None else cls(**options)


def differentiable_rewards() -> list[str]:
    """Names in ``REWARDS`` whose class is differentiable (a MultiReward is when all its parts are)."""
    return sorted(k for k, cls in REWARDS.items() if getattr(cls, "differentiable", False) is True)


__all__ = ["REWARDS", "Reward", "RewardUnavailable", "differentiable_rewards", "get", "safe_scores", "to_pil_list"]
