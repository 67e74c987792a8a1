"""Group-relative advantages (GRPO, SPEC §2), shared by GRPO, DiffusionNFT and CRD.

``A_i = (R_i - mean_{j in g(i)} R_j) / (std + eps)``, with std over the prompt's group
(``std_mode="group"``) or over the whole batch (``"global"``, the Flow-GRPO default), then clipped to
``[-clip, clip]``. Invalid samples (NaN reward, a reward that raised) are left out of every statistic and
get advantage 0; so does a group with a single valid member.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

STD_MODES = ("global", "group")


def group_ids_from_prompts(prompts: Sequence[str]) -> torch.Tensor:
    """[B] long: one id per distinct prompt, numbered in order of first appearance."""
    table: dict[str, int] = {}
    return torch.tensor([table.setdefault(p, len(table)) for p in prompts], dtype=torch.long)


def group_advantages(
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    std_mode: str = "global",
    eps: float = 1e-4,
    clip: Optional[float] = 5.0,
    valid: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """rewards [B], group_ids [B] (long), valid [B] bool -> advantages [B] float32 (population std)."""
    if std_mode not in STD_MODES:
        raise ValueError(f"std_mode must be one of {STD_MODES}, got {std_mode!r}")
    rewards = rewards.float()
    if rewards.shape != group_ids.shape:
        raise ValueError(f"rewards {tuple(rewards.shape)} and group_ids {tuple(group_ids.shape)} must have the same shape")
    valid = torch.isfinite(rewards) if valid is None else valid & torch.isfinite(rewards)
    r = torch.where(valid, rewards, torch.zeros_like(rewards))
    adv = torch.zeros_like(r)
    if valid.sum() == 0:
        return adv
    global_std = r[valid].std(unbiased=False)
    for g in torch.unique(group_ids[valid]):
        members = (group_ids == g) & valid
        if members.sum() < 2:
            continue
        group = r[members]
        std = group.std(unbiased=False) if std_mode == "group" else global_std
        adv[members] = (group - group.mean()) / (std + eps)
    return adv.clamp(-clip, clip) if clip is not None else adv
