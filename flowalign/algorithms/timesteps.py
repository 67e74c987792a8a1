"""Forward-process timestep draws shared by the forward-process methods (DiffusionNFT, CRD): stratified positions
on a rollout's own grid. No I/O.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..rollout import Trajectory


def stratified_timesteps(
    timesteps: Sequence[float] | torch.Tensor,
    num_draws: int = 20,
    fraction: float = 0.99,
    generator: Optional[torch.Generator] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """K stratified draws from a scheduler's timestep list restricted to its top ``fraction``.

    timesteps: [M] in the scheduler's order (high noise first). [uncertain] "top 99%" is read as Flow-GRPO's
    ``timestep_fraction``: keep the first ``max(1, int(M * fraction))`` entries (drop the low-noise tail; with
    M = 10 that is 9 steps). The kept positions are split into ``num_draws`` equal strata and one position is
    drawn uniformly in each (strata repeat positions when K > kept). Returns (values [K], positions [K] long).
    """
    ts = torch.as_tensor(timesteps, dtype=torch.float32).flatten()
    if ts.numel() == 0:
        raise ValueError("timesteps is empty")
    if num_draws < 1:
        raise ValueError(f"num_draws must be >= 1, got {num_draws}")
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    kept = max(1, int(ts.numel() * fraction))
    edges = torch.linspace(0, kept, num_draws + 1, dtype=torch.float64)
    lo = edges[:-1].floor().long()
    width = (edges[1:].floor().long() - lo).clamp_min(1)
    u = torch.rand(num_draws, generator=generator, dtype=torch.float64)
    pos = (lo + (u * width).floor().long()).clamp(max=kept - 1)
    return ts[pos], pos


def forward_timesteps(traj: Trajectory, num_draws: int, fraction: float,
                      generator: Optional[torch.Generator]) -> list[tuple[torch.Tensor, float]]:
    """K stratified draws from the rollout's own grid (``stratified_timesteps``): a list of
    (denoiser timestep in scheduler units, t = sigma in [0, 1]) for the forward process ``x_t = (1-t) x0 + t eps``."""
    values, positions = stratified_timesteps(traj.timesteps, num_draws, fraction, generator)
    return [(traj.timesteps[int(k)], float(traj.sigmas[int(k)])) for k in positions]
