"""Best-of-N evaluation (InfAlign, arXiv 2412.19792): how often the aligned model's best of N samples beats the
base model's best of N under a reward, the quantity InfAlign-CTRL's calibrated training targets.

For P held-out prompts, each model draws N samples per prompt; sample (p, k) uses
``torch.Generator().manual_seed(seed + p N + k)`` for EVERY model (common random numbers: the base and the LoRA
start from the same noise, so a zero LoRA ties everywhere and its win rate is exactly 1/2). The scores form a
[P, N] matrix per model and

    win rate = (1/P) sum_p ( 1[max_k a_pk > max_k b_pk] + 1/2 1[equal] ),   SE = std_p / sqrt(P)

(``flowalign.algorithms.calibration.best_of_n_win_rate``).
"""

from __future__ import annotations

from typing import Sequence

import torch

from .heldout import EVAL_SEED
from .sampling import sample_images
from ..algorithms.calibration import best_of_n_win_rate
from ..rewards.guard import safe_scores


@torch.no_grad()
def best_of_n_scores(pipe, prompts: Sequence[str], n: int, reward, seed: int = EVAL_SEED, steps: int = 10,
                     guidance_scale: float = 1.0, batch_size: int = 32) -> torch.Tensor:
    """Rewards [P, N] of N samples of each of the P ``prompts`` from ``pipe`` (seeds as the module doc; a
    failed or NaN score is NaN and left out of that prompt's best)."""
    if n < 1:
        raise ValueError(f"--best-of must be >= 1, got {n}")
    expanded = [p for p in prompts for _ in range(n)]  # prompt-major: row p N + k
    images = sample_images(pipe, expanded, seed, steps, guidance_scale, batch_size, desc=f"best-of-{n}")
    scores, valid, _ = safe_scores(reward, images, expanded, None)
    scores = torch.where(valid.cpu(), scores.double().cpu(), torch.tensor(float("nan"), dtype=torch.float64))
    return scores.reshape(len(prompts), n)


def summarize(scores: torch.Tensor, base: torch.Tensor) -> dict:
    """Headline numbers of one model's [P, N] ``scores`` against the base's: its mean reward, its mean best-of-N
    reward, and the best-of-N win rate against the base with the standard error."""
    best = torch.where(torch.isnan(scores), torch.tensor(float("-inf"), dtype=scores.dtype), scores).max(1).values
    best = best[torch.isfinite(best)]
    rate, se = best_of_n_win_rate(scores, base)
    return {"mean": float(scores.nanmean()), "best_of_n_mean": float(best.mean()) if best.numel() else float("nan"),
            "win_rate": rate, "win_rate_se": se, "prompts": int(scores.shape[0]), "n": int(scores.shape[1])}
