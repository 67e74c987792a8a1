"""The f-divergence table (f-distill; docs/math.md §6): f, its weight h(r) = r^2 f''(r) and log h, by name.
No I/O.

``D_f(p || q) = E_q f(p / q)`` with p the teacher/target, q the student and r = p / q; every f-divergence's
gradient is reverse KL's with the per-sample weight h(r), so a method only needs ``log_h`` (log space: weights
from log-ratios that would overflow exp). Used by f-distill (flowalign.distill), GRPO's kl_divergence and OPD.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

Fn = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class FDivergence:
    """f(r) (convex, f(1) = 0), h(r) = r^2 f''(r) and log h(log r), each elementwise on tensors."""

    name: str
    f: Fn
    h: Fn
    log_h: Fn


def _xlogx(r: torch.Tensor) -> torch.Tensor:
    return torch.special.xlogy(r, r)


DIVERGENCES: dict[str, FDivergence] = {
    "reverse_kl": FDivergence("reverse_kl", lambda r: -torch.log(r), lambda r: torch.ones_like(r),
                              lambda lr: torch.zeros_like(lr)),
    "forward_kl": FDivergence("forward_kl", _xlogx, lambda r: r, lambda lr: lr),
    "js": FDivergence("js", lambda r: _xlogx(r) - (r + 1) * torch.log((r + 1) / 2), lambda r: r / (r + 1),
                      lambda lr: lr - F.softplus(lr)),
    "hellinger": FDivergence("hellinger", lambda r: (r.sqrt() - 1) ** 2, lambda r: r.sqrt() / 2,
                             lambda lr: lr / 2 - math.log(2)),
    "jeffreys": FDivergence("jeffreys", lambda r: (r - 1) * torch.log(r), lambda r: r + 1, F.softplus),
    "sf": FDivergence("sf", lambda r: (r + 1) * torch.log((r + 1) / (2 * r)), lambda r: 1 / (1 + r),
                      lambda lr: -F.softplus(lr)),
    "neyman": FDivergence("neyman", lambda r: (1 - r) ** 2 / r, lambda r: 2 / r, lambda lr: math.log(2) - lr),
}
"""The fixed divergences by name: reverse KL (-log r, h = 1), forward KL (r log r, h = r),
Jensen-Shannon (r log r - (r+1) log((r+1)/2), h = r/(r+1)), squared Hellinger ((sqrt r - 1)^2, h = sqrt(r)/2),
Jeffreys ((r-1) log r, h = r + 1), FastGen's "sf", a softened reverse KL ((r+1) log((r+1)/(2r)), h = 1/(1+r)),
and Neyman chi^2 ((1-r)^2/r, h = 2/r; FastGen's code uses 1/r, the same after the batch normalisation of h). The
alpha family is ``alpha_divergence(a)``."""


def alpha_divergence(a: float) -> FDivergence:
    """``f(r) = (r^a - a r - (1 - a)) / (a (a - 1))``, ``h(r) = r^a``; a not in {0, 1} (those are the KL limits)."""
    a = float(a)
    if a in (0.0, 1.0):
        raise ValueError("alpha must not be 0 or 1 (the limits are reverse KL and forward KL: use those names)")
    return FDivergence(f"alpha({a:g})", lambda r: (r**a - a * r - (1 - a)) / (a * (a - 1)), lambda r: r**a,
                       lambda lr: a * lr)


def get_divergence(name: str, alpha: Optional[float] = None) -> FDivergence:
    """A divergence from the table, or ``"alpha"`` with ``alpha=a``."""
    if name == "alpha":
        if alpha is None:
            raise ValueError("divergence 'alpha' needs alpha=a (e.g. 0.5)")
        return alpha_divergence(alpha)
    if name not in DIVERGENCES:
        raise ValueError(f"unknown divergence {name!r}; choose one of {', '.join([*DIVERGENCES, 'alpha'])}")
    return DIVERGENCES[name]


def _as_divergence(divergence, alpha: Optional[float]) -> FDivergence:
    return divergence if isinstance(divergence, FDivergence) else get_divergence(divergence, alpha)


def normalized_weights(log_h: torch.Tensor) -> torch.Tensor:
    """``h / mean(h)`` from log h [B], computed stably in log space -> [B] (mean 1)."""
    log_mean = torch.logsumexp(log_h, dim=0) - math.log(log_h.numel())
    return (log_h - log_mean).exp()
