"""One denoising step as a Gaussian transition ``pi(x' | x) = N(mean, std^2 I)``.

Log-probability and KL live on the same object, so they can never disagree on the variance
(the bug research code gets when "KL" is computed in another file).

Shapes: ``prev_sample`` and ``mean`` are ``[B, ...]`` (D elements per sample); ``std`` is
per sample, ``[B, 1, ..., 1]``, broadcastable to the sample. All tensors are float32.
Reductions over the non-batch dims: ``"sum"`` (the true log-density) or ``"mean"`` (divide
by D, as the Flow-GRPO/DanceGRPO reference code does; its ratio clip ranges assume it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

_REDUCTIONS = ("mean", "sum")
_KL_SCALINGS = ("exact", "reference")
LOG_PROB_CONVENTIONS = ("density", "squared_error")
_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


def _reduce(x: torch.Tensor, reduction: str) -> torch.Tensor:
    """Reduce ``[B, ...]`` over the non-batch dims -> ``[B]``."""
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    flat = x.reshape(x.shape[0], -1)
    return flat.mean(dim=1) if reduction == "mean" else flat.sum(dim=1)


@dataclass(frozen=True)
class GaussianStep:
    """A recorded Gaussian transition.

    Attributes:
        prev_sample: x' [B, ...], the drawn (or re-scored) next state.
        mean: mu [B, ...].
        std: per-sample standard deviation [B, 1, ..., 1]; 0 for deterministic steps.
        dt: optional Delta = sigma - sigma_next [B, 1, ..., 1]; set by the flow steps (GRPO-Guard reweights
            by 1/Delta).
        reference_kl_factor: optional [B, 1, ..., 1], what the reference code's "KL" of this kind of step is,
            relative to the exact KL: Delta for the Flow-GRPO flow SDE (it divides by ``s_t^2``, not the transition
            variance ``s_t^2 Delta``); None (= 1) where the public code uses the true variance (CPS, DanceGRPO's
            constant-noise SDE in VeRL-Omni, DDIM). ``kl(..., scaling="reference")`` multiplies by it.
        log_prob_convention: what ``log_prob`` returns: "density" (the Gaussian log-density, default) or
            "squared_error" (``-(x' - mu)^2`` reduced, no 1/(2 std^2) and no constants: the Flow-GRPO and
            VeRL-Omni CPS code's "log-prob", whose ratios are ``exp(2 std^2 x`` the true log-ratio ``)``).
    """

    prev_sample: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    dt: Optional[torch.Tensor] = None
    reference_kl_factor: Optional[torch.Tensor] = None
    log_prob_convention: str = "density"

    def __post_init__(self):
        if self.log_prob_convention not in LOG_PROB_CONVENTIONS:
            raise ValueError(f"log_prob_convention must be one of {LOG_PROB_CONVENTIONS}, "
                             f"got {self.log_prob_convention!r}")

    @property
    def deterministic(self) -> bool:
        """True when any sample's std is 0 (ODE or eta=0 DDIM): densities and KL are undefined."""
        return bool((self.std <= 0).any())

    def _require_stochastic(self, what: str) -> None:
        if self.deterministic:
            raise ValueError(
                f"{what} is undefined for a deterministic step (std = 0, e.g. an ODE or eta=0 DDIM step); "
                "use mean_matching(other) = 1/2 |mu - mu_other|^2 instead"
            )

    def log_prob(self, x: Optional[torch.Tensor] = None, reduction: str = "mean") -> torch.Tensor:
        """log N(x; mean, std^2 I) -> [B].

        Per element: ``-(x - mu)^2 / (2 std^2) - log std - log sqrt(2 pi)``; summed or averaged over D.
        x defaults to ``prev_sample``. With ``log_prob_convention="squared_error"``: ``-(x - mu)^2`` per element.
        """
        self._require_stochastic("log_prob")
        x = self.prev_sample if x is None else x.float()
        if x.shape != self.mean.shape:
            raise ValueError(f"x has shape {tuple(x.shape)} but the step's mean has {tuple(self.mean.shape)}")
        if self.log_prob_convention == "squared_error":
            return _reduce(-((x - self.mean) ** 2), reduction)
        std = self.std.expand_as(self.mean)
        elem = -((x - self.mean) ** 2) / (2 * std**2) - torch.log(std) - _LOG_SQRT_2PI
        return _reduce(elem, reduction)

    def kl(self, other: "GaussianStep", reduction: str = "mean", scaling: str = "exact") -> torch.Tensor:
        """KL(self || other) in closed form -> [B].

        Diagonal Gaussians: ``sum_d [ log(s2/s1) + (s1^2 + (mu1 - mu2)^2) / (2 s2^2) - 1/2 ]``;
        with a shared std this is ``|mu1 - mu2|^2 / (2 std^2)``.
        scaling="reference" reproduces the public code: the exact KL times ``reference_kl_factor`` (Delta for
        the Flow-GRPO flow SDE, which divides by ``s_t^2`` instead of ``s_t^2 Delta``; unchanged for the other
        steps, whose public code uses the true variance). Use it to reproduce the published beta=0.04 runs.
        """
        if scaling not in _KL_SCALINGS:
            raise ValueError(f"scaling must be one of {_KL_SCALINGS}, got {scaling!r}")
        self._require_stochastic("kl")
        other._require_stochastic("kl")
        if other.mean.shape != self.mean.shape:
            raise ValueError(f"other has shape {tuple(other.mean.shape)}, expected {tuple(self.mean.shape)}")
        s1 = self.std.expand_as(self.mean)
        s2 = other.std.expand_as(self.mean)
        elem = torch.log(s2 / s1) + (s1**2 + (self.mean - other.mean) ** 2) / (2 * s2**2) - 0.5
        kl = _reduce(elem, reduction)
        if scaling == "reference" and self.reference_kl_factor is not None:
            kl = kl * self.reference_kl_factor.reshape(-1)
        return kl

    def mean_matching(self, other: "GaussianStep", reduction: str = "mean") -> torch.Tensor:
        """``1/2 |mu - mu_other|^2`` -> [B]; the std^2-scaled KL, finite for deterministic steps.

        As std -> 0 the KL diverges but ``std^2 KL -> |mu1 - mu2|^2 / 2`` with the same gradient
        direction (DiffusionOPD's ODE branch, docs/math.md §3).
        """
        if other.mean.shape != self.mean.shape:
            raise ValueError(f"other has shape {tuple(other.mean.shape)}, expected {tuple(self.mean.shape)}")
        return _reduce(0.5 * (self.mean - other.mean) ** 2, reduction)
