"""The doctor's table: which (rollout, re-scoring) combinations it measures for a config.

For the configured dtype D, rollout batch R (rows per rollout call) and training minibatch b:

* per dtype d in ``dtypes`` (D first): ``same batch`` (d, R) -> (d, R), ``minibatch`` (d, R) -> (d, b') with
  b' = b when b < R else R // 2 (the batch-size effect), ``CFG apart`` (when the run uses CFG); the case (D, R) -> (D, min(b, R)) is the
  one the run itself uses (``configured``);
* for D only: each other attention kernel available on the device, and deterministic algorithms in both passes;
* ``cross-dtype``: rollout in d, re-scoring in D (a bf16 sampler feeding an fp32 trainer);
* ``autocast``: with ``model.autocast`` A set, every case above runs under A, plus a rollout under A re-scored
  without it; without it, the opt-in's own cases: bf16 autocast same batch and minibatch (what turning it on costs).
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..models import DTYPES
from .onpolicy import GapCase
from ..runtime.kernels import available_attention_backends
from .settings import DTYPE_NAMES, PassSetting


def has_ratio(cfg) -> bool:
    """Whether the run's loss has a likelihood ratio that the on-policy gap moves (Flow-GRPO / GRPO-Guard)."""
    from ..algorithms import ALGORITHMS

    return bool(getattr(ALGORITHMS[cfg.train.algorithm], "has_ratio", False))


def uses_cfg(adapter, cfg) -> bool:
    return bool(adapter._uses_uncond(cfg.sampling.guidance_scale))


def gap_cases(cfg, adapter, rows: int, dtypes: Sequence[torch.dtype]) -> list[GapCase]:
    """The cases of the module docstring for a rollout of ``rows`` rows."""
    configured = DTYPES[cfg.model.dtype]
    eps = cfg.grpo.clip_range  # the clip fraction it would produce; the verdict says whether the loss has a ratio
    b = cfg.train.minibatch
    small = b if b < rows else max(1, rows // 2)
    order = [configured] + [d for d in dtypes if d != configured]
    cases = []
    auto = DTYPES[cfg.model.autocast] if cfg.model.autocast else None
    for d in order:
        name = DTYPE_NAMES[d]
        base = PassSetting(d, rows, autocast=auto)
        group = f"dtype {name}"
        mine = d == configured
        cases.append(GapCase(f"{name}: same batch {rows}", base, base, group, configured=mine and b >= rows,
                             clip_range=eps))
        if small != rows:
            cases.append(GapCase(f"{name}: minibatch {small} of {rows}", base, base.but(batch=small), group,
                                 configured=mine and b < rows, clip_range=eps))
        if uses_cfg(adapter, cfg):
            cases.append(GapCase(f"{name}: CFG branches apart", base, base.but(cfg_batched=False), group,
                                 clip_range=eps))
        if d == configured:
            for backend in available_attention_backends(adapter.device, d):
                cases.append(GapCase(f"{name}: attention {backend}", base, base.but(attention=backend), group,
                                     clip_range=eps))
            det = base.but(deterministic=True)
            cases.append(GapCase(f"{name}: deterministic algorithms", det, det, group, clip_range=eps))
    for d in order[1:]:
        cases.append(GapCase(f"rollout {DTYPE_NAMES[d]}, re-score {DTYPE_NAMES[configured]}",
                             PassSetting(d, rows, autocast=auto), PassSetting(configured, rows, autocast=auto),
                             "cross-dtype", clip_range=eps))
    name = DTYPE_NAMES[configured]
    if auto is not None:
        cases.append(GapCase(f"rollout autocast {DTYPE_NAMES[auto]}, re-score without", PassSetting(configured, rows,
                             autocast=auto), PassSetting(configured, rows), "autocast", clip_range=eps))
    elif configured == torch.float32:
        on = PassSetting(configured, rows, autocast=torch.bfloat16)
        cases.append(GapCase(f"{name} + autocast bf16: same batch {rows}", on, on, "autocast", clip_range=eps))
        if small != rows:
            cases.append(GapCase(f"{name} + autocast bf16: minibatch {small} of {rows}", on, on.but(batch=small),
                                 "autocast", clip_range=eps))
    return cases
