"""Group-relative advantages (GRPO, docs/math.md §2), shared by GRPO, DiffusionNFT and CRD.

``A_i = (R_i - m_i) / max(std + eps, floor)``, clipped to ``[-clip, clip]``, where
- m_i is the mean of the prompt's group (``mean_mode="group"``) or of the whole batch (``"global"``: Flow-GRPO with
  per-prompt stat tracking off);
- std is the group's (``std_mode="group"``) or the whole batch's (``"global"``, the Flow-GRPO default), the
  population std (``estimator="population"``: Flow-GRPO, DiffusionNFT, Flow-Factory) or the unbiased one
  (``"unbiased"``: VeRL-Omni, DanceGRPO);
- eps is added (Flow-GRPO/NFT/VeRL-Omni 1e-4, DanceGRPO 1e-8) and floor bounds the denominator from below
  (Flow-Factory: ``max(std, 1e-6)`` with eps 0).

Statistics are computed in float64 (as the references' numpy code does), so a reward equal to its group's mean
gets an advantage of exactly 0. Invalid samples (NaN reward, a reward that raised) are left out of every statistic
and get advantage 0; so does a group with a single valid member when the mean is per group.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

STD_MODES = ("global", "group")
MEAN_MODES = ("group", "global")
ESTIMATORS = ("population", "unbiased")


def group_ids_from_prompts(prompts: Sequence[str]) -> torch.Tensor:
    """[B] long: one id per distinct prompt, numbered in order of first appearance."""
    table: dict[str, int] = {}
    return torch.tensor([table.setdefault(p, len(table)) for p in prompts], dtype=torch.long)


def _std(x: torch.Tensor, estimator: str) -> torch.Tensor:
    if x.numel() < 2:
        return torch.zeros((), dtype=x.dtype)
    return x.std(unbiased=estimator == "unbiased")


def group_advantages(
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    std_mode: str = "global",
    eps: float = 1e-4,
    clip: Optional[float] = 5.0,
    valid: Optional[torch.Tensor] = None,
    mean_mode: str = "group",
    estimator: str = "population",
    floor: float = 0.0,
) -> torch.Tensor:
    """rewards [B], group_ids [B] (long), valid [B] bool -> advantages [B] float32 (module docstring)."""
    if std_mode not in STD_MODES:
        raise ValueError(f"std_mode must be one of {STD_MODES}, got {std_mode!r}")
    if mean_mode not in MEAN_MODES:
        raise ValueError(f"mean_mode must be one of {MEAN_MODES}, got {mean_mode!r}")
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    rewards = rewards.double().cpu()
    group_ids = group_ids.cpu()
    if rewards.shape != group_ids.shape:
        raise ValueError(f"rewards {tuple(rewards.shape)} and group_ids {tuple(group_ids.shape)} must have the same shape")
    valid = torch.isfinite(rewards) if valid is None else valid.cpu() & torch.isfinite(rewards)
    r = torch.where(valid, rewards, torch.zeros_like(rewards))
    adv = torch.zeros_like(r)
    if valid.sum() == 0:
        return adv.float()
    global_std = _std(r[valid], estimator)
    if mean_mode == "global":
        groups = [valid]
    else:
        groups = [(group_ids == g) & valid for g in torch.unique(group_ids[valid])]
    for members in groups:
        if members.sum() < 2:
            continue
        group = r[members]
        std = _std(group, estimator) if std_mode == "group" else global_std
        denom = torch.clamp(std + eps, min=floor)
        centred = group - group.mean()
        adv[members] = centred / denom if denom > 0 else torch.zeros_like(centred)  # eps = floor = 0, std 0
    adv = adv.clamp(-clip, clip) if clip is not None else adv
    return adv.float()


def advantages_for(rewards: torch.Tensor, prompts: Sequence[str], cfg, valid: Optional[torch.Tensor] = None
                   ) -> torch.Tensor:
    """``group_advantages`` with the settings of a config's ``advantage`` section (one group per prompt)."""
    a = cfg.advantage
    return group_advantages(rewards, group_ids_from_prompts(prompts), std_mode=a.std, eps=a.eps, clip=a.clip,
                            valid=valid, mean_mode=a.mean, estimator=a.estimator, floor=a.floor)
