"""Adv-GRPO ("The Image as Its Own Reward", arXiv 2511.20256): the reward model is trained DURING RL.

The reward is a discriminator head on a frozen vision backbone (``dino_similarity`` with ``head: true``,
docs/math.md §8): ``D(x) = w h(cls) + (1 - w) mean_K h(patch_K)``. Each iteration the generator is updated
with GRPO on ``D`` as it is, then (every ``head_every`` iterations) the head takes ``head_steps`` hinge steps
with the reference images as positives and the iteration's generations as negatives:

    L_head = mean_j relu(1 - D(ref_j)) + mean_i relu(1 + D(gen_i))

so the reward moves with the policy: an image that fooled the head becomes a negative of the next head step.
``AdversarialHead`` is that schedule (no I/O); the trainer shows it the images it scored (``observe``) and calls
``step`` after the generator's update. The head's weights and optimizer state travel in checkpoints.
"""

from __future__ import annotations

from typing import Optional

import torch


class AdversarialHead:
    """Trains a reward's discriminator head on the generations it scored.

    Args:
        reward: a reward with ``train_head_step(generated) -> {loss, d_real, d_fake}`` and ``state_dict`` /
            ``load_state_dict`` (``DinoSimilarityReward(head=True, references=...)``).
        head_every: train the head after every ``head_every``-th iteration (1 = every iteration).
        head_steps: hinge steps each time, each on all the images observed since the last training.
    """

    def __init__(self, reward, head_every: int = 1, head_steps: int = 1):
        if getattr(reward, "head", None) is None or not hasattr(reward, "train_head_step"):
            raise ValueError(f"Adv-GRPO needs a reward with a trainable head (dino_similarity with head: true), got "
                             f"{getattr(reward, 'name', type(reward).__name__)}")
        if int(head_every) < 1 or int(head_steps) < 1:
            raise ValueError(f"head_every and head_steps must be >= 1, got {head_every}, {head_steps}")
        self.reward, self.head_every, self.head_steps = reward, int(head_every), int(head_steps)
        self._seen: list[torch.Tensor] = []
        self.head_updates = 0

    @staticmethod
    def wanted(reward) -> bool:
        """Whether ``reward`` has a head to train (the trainer builds an AdversarialHead only then)."""
        return getattr(reward, "head", None) is not None and hasattr(reward, "train_head_step")

    def observe(self, images: torch.Tensor) -> None:
        """Keep the generated images [B, 3, H, W] the reward just scored (the negatives of the next head step)."""
        self._seen.append(images.detach().float().cpu())

    def step(self, iteration: int) -> dict:
        """After the generator's update of ``iteration`` (1-based): the head's hinge steps when it is due.
        Returns ``head_loss``, ``head_d_real``, ``head_d_fake`` (means over the steps) and the ``head_updates``
        count, or ``{}`` when the head was not trained this iteration."""
        if iteration % self.head_every or not self._seen:
            return {}
        generated = torch.cat(self._seen)
        self._seen = []
        out: Optional[dict] = None
        for _ in range(self.head_steps):
            m = self.reward.train_head_step(generated)
            out = m if out is None else {k: out[k] + m[k] for k in out}
        self.head_updates += self.head_steps
        return {"head_loss": out["loss"] / self.head_steps, "head_d_real": out["d_real"] / self.head_steps,
                "head_d_fake": out["d_fake"] / self.head_steps, "head_updates": self.head_updates}

    def state_dict(self) -> dict:
        return {"reward": self.reward.state_dict(), "head_updates": self.head_updates}

    def load_state_dict(self, state: dict) -> None:
        self.reward.load_state_dict(state["reward"])
        self.head_updates = int(state["head_updates"])
        self._seen = []
