"""flowalign.rewards: reward models behind one protocol, ``reward(images, prompts, metadata=None) -> [B]``.

``get(name, **options)`` builds a reward from the explicit table ``REWARDS``; heavy dependencies are
imported when a reward is built, with an install hint when missing.
"""

from __future__ import annotations

from .base import Reward, to_pil_list
from .toy import ToyGenEvalReward

REWARDS = {
    "toy_geneval": ToyGenEvalReward,
}


def get(name: str, **options) -> Reward:
    """Build the reward called ``name`` with ``options``; unknown names list the valid ones."""
    if name not in REWARDS:
        raise ValueError(f"unknown reward {name!r}; choose one of: {', '.join(sorted(REWARDS))}")
    return REWARDS[name](**options)


__all__ = ["REWARDS", "Reward", "get", "to_pil_list"]
