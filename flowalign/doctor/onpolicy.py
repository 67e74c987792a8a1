"""The on-policy gap: roll out, re-score the same transitions with the unchanged policy, measure per step.

For a recorded transition ``x_k -> x_{k+1}`` with log-prob ``l_k`` (rollout) and ``l'_k`` (re-scored at the
recorded x_k and x_{k+1}, docs/math.md §1), per step k over the B rows:

    gap_k   = |l'_k - l_k|                         mean and max over rows            [B] -> 2 floats
    rho_k   = exp(l'_k - l_k)                      mean and std over rows: 1 and 0 on-policy
    clip_k  = mean_i [ |rho_k,i - 1| > eps ]       the share of rows the clip range eps already clips
    dmu_k   = max |mu'_k - mu_k|                   the step mean's largest element difference (every step,
                                                   deterministic ones too)

With the same settings in both passes (and deterministic kernels) the gap is exactly 0; Flow-GRPO's clip range
eps = 1e-4 is crossed by bf16 rounding long before a gradient step moves the policy (GRPO-Guard, arXiv
2510.22319, trained FLUX in fp32 for this reason). A :class:`GapCase` pairs a rollout setting with a re-scoring
setting (flowalign.doctor.settings); :func:`measure` returns a :class:`GapResult` for it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from ..algorithms.base import configured_rollout
from ..rollout import Trajectory, concat_trajectories, rescore
from ..runtime.cuda_graphs import training_route
from .settings import PassSetting, applied


@dataclass(frozen=True)
class GapCase:
    """One row of the doctor's table: how the rollout ran and how the training pass re-scores it.

    name: the row's label; group: "dtype <name>" or "cross-dtype" (how the table groups rows); configured: the
    combination the run itself uses; clip_range: eps of the ratio clip (None: the algorithm has no ratio).
    """

    name: str
    rollout: PassSetting
    rescore: PassSetting
    group: str = ""
    configured: bool = False
    clip_range: Optional[float] = None


@dataclass
class GapResult:
    """Per measured step (lists aligned with ``steps``) and the summary over them."""

    case: GapCase
    steps: list[int]
    stochastic: list[bool]
    gap_mean: list[float] = field(default_factory=list)  # NaN at deterministic steps
    gap_max: list[float] = field(default_factory=list)
    ratio_mean: list[float] = field(default_factory=list)
    ratio_std: list[float] = field(default_factory=list)
    clip_frac: list[float] = field(default_factory=list)
    mean_gap: list[float] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def max_gap(self) -> float:
        return _nanmax(self.gap_max)

    @property
    def max_ratio_error(self) -> float:
        """max_i,k |rho - 1| = exp(max gap) - 1 (the gap is symmetric in sign up to this bound)."""
        g = self.max_gap
        return math.expm1(g) if math.isfinite(g) else g

    @property
    def max_clip_frac(self) -> float:
        return _nanmax(self.clip_frac)

    @property
    def max_mean_gap(self) -> float:
        return _nanmax(self.mean_gap)

    def as_dict(self) -> dict:
        c = self.case
        return {"name": c.name, "group": c.group, "configured": c.configured, "clip_range": c.clip_range,
                "rollout": c.rollout.describe(), "rescore": c.rescore.describe(), "steps": self.steps,
                "stochastic": self.stochastic, "gap_mean": self.gap_mean, "gap_max": self.gap_max,
                "ratio_mean": self.ratio_mean, "ratio_std": self.ratio_std, "clip_frac": self.clip_frac,
                "mean_gap": self.mean_gap, "max_gap": self.max_gap, "max_ratio_error": self.max_ratio_error,
                "max_clip_frac": self.max_clip_frac, "max_mean_gap": self.max_mean_gap, "seconds": self.seconds}


def _nanmax(values: Sequence[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return max(finite) if finite else float("nan")


def roll_out(adapter, prompts: Sequence[str], cfg, setting: PassSetting, seed: int) -> Trajectory:
    """The configured rollout (sampling section, step means recorded) under ``setting``, in chunks of
    ``setting.batch`` rows of whole prompt groups; the same seed gives the same noise in every case."""
    generator = torch.Generator().manual_seed(seed)
    g = cfg.train.group_size
    chunk = max(g, setting.batch // g * g)
    parts = []
    with applied(adapter, setting):
        for a in range(0, len(prompts), chunk):
            parts.append(configured_rollout(adapter, prompts[a:a + chunk], cfg, generator, record_means=True))
    return concat_trajectories(parts)


def measured_steps(traj: Trajectory) -> list[int]:
    """The steps the gap is measured on: the stochastic ones (where a ratio exists), or all of them for a
    deterministic sampler (then only the mean gap)."""
    return traj.stochastic_steps or list(range(traj.num_steps))


@torch.no_grad()
def rescore_gap(adapter, traj: Trajectory, case: GapCase, seed: int = 0) -> GapResult:
    """Re-score ``traj`` under ``case.rescore``: rows in a random order (as GRPO draws its minibatches) in chunks
    of ``case.rescore.batch``, every measured step; the per-step statistics of the module docstring."""
    steps = measured_steps(traj)
    result = GapResult(case, steps, [bool(traj.stochastic[k]) for k in steps])
    order = torch.randperm(traj.batch_size, generator=torch.Generator().manual_seed(seed))
    chunks = order.split(max(1, case.rescore.batch))
    with applied(adapter, case.rescore), training_route(adapter.denoisers):  # the update's path (cuda_graphs)
        for k in steps:
            gaps, dmu = [], 0.0
            for rows in chunks:
                new = rescore(adapter, traj, k, index=rows)
                dmu = max(dmu, float((new.mean - traj.means[rows, k]).abs().max()))
                if traj.stochastic[k]:
                    gaps.append(new.log_prob(reduction=traj.reduction) - traj.log_probs[rows, k])
            result.mean_gap.append(dmu)
            if not gaps:
                for name in ("gap_mean", "gap_max", "ratio_mean", "ratio_std", "clip_frac"):
                    getattr(result, name).append(float("nan"))
                continue
            d = torch.cat(gaps).double()
            ratio = d.exp()
            result.gap_mean.append(float(d.abs().mean()))
            result.gap_max.append(float(d.abs().max()))
            result.ratio_mean.append(float(ratio.mean()))
            result.ratio_std.append(float(ratio.std(unbiased=False)))
            eps = case.clip_range
            result.clip_frac.append(float(((ratio - 1).abs() > eps).double().mean()) if eps else float("nan"))
    return result


def measure(adapter, prompts: Sequence[str], cfg, cases: Sequence[GapCase], seed: int = 0,
            progress=None, rollouts: Optional[dict] = None) -> list[GapResult]:
    """Every case's :class:`GapResult`; cases that share a rollout setting share one rollout (same seed, so
    every case sees the same noise). progress: an optional callable(str) told what runs; rollouts: a dict that
    receives the trajectories, keyed ``(setting.key(), setting.batch)``."""
    import time

    rollouts = {} if rollouts is None else rollouts
    results = []
    for case in cases:
        key = (case.rollout.key(), case.rollout.batch)
        t0 = time.perf_counter()
        if key not in rollouts:
            if progress:
                progress(f"rollout {case.rollout.describe()}")
            rollouts[key] = roll_out(adapter, prompts, cfg, case.rollout, seed)
        if progress:
            progress(f"re-score {case.name}")
        res = rescore_gap(adapter, rollouts[key], case, seed)
        res.seconds = time.perf_counter() - t0
        results.append(res)
    return results
