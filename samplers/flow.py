"""Rectified-flow steps as Gaussian transitions (SD3/SD3.5, FLUX, Wan).

Convention (docs/math.md §0): ``x_t = (1 - t) x0 + t eps``, t = sigma in [0, 1], t = 1 is pure noise, and the
network predicts the velocity ``v ~ eps - x0``. One step goes from t = sigma to t' = sigma_next < t,
``Delta = t - t'``. From (x, t, v): ``x0_hat = x - t v``, ``x1_hat = x + (1 - t) v`` and the score
``s = -(x + (1 - t) v) / t``.

Each function is pure in (sigma, sigma_next): no hidden step counter. ``sigma`` and ``sigma_next`` are
floats or per-sample tensors [B]. Inputs may be any float dtype; all math and all returned tensors are
float32 (bf16 overflows in the SDE drift). Passing ``prev_sample`` re-scores a stored transition
instead of drawing a new one.

``forward_process`` (end of file) is the forward process itself, written once: the training point
``x_t`` and velocity target ``u = eps - x0`` of every forward-process method (DiffusionNFT, CRD, f-distill).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Union

import torch

from ._checks import (
    GeneratorLike,
    Scalar,
    as_float32,
    check_sigmas,
    non_negative,
    per_sample,
    prepare_prev_sample,
    randn_like,
    same_shape,
)
from .gaussian import GaussianStep


def _prepare(velocity, sample, sigma, sigma_next):
    sample = as_float32("sample", sample)
    velocity = as_float32("velocity", velocity)
    same_shape("velocity", velocity, sample)
    t = per_sample("sigma", sigma, sample)
    t_next = per_sample("sigma_next", sigma_next, sample)
    check_sigmas(t, t_next)
    return velocity, sample, t, t_next


def _finish(mean, std, prev_sample, sample, generator, **fields) -> GaussianStep:
    if prev_sample is None:
        prev_sample = mean + std * randn_like(sample, generator) if (std > 0).any() else mean
    return GaussianStep(prev_sample=prev_sample, mean=mean, std=std, **fields)


def _same_marginal_sde(velocity, sample, t, t_next, s_t, prev_sample, generator,
                       reference_kl_is_delta: bool) -> GaussianStep:
    """Euler-Maruyama step of the SDE with drift ``v - (s_t^2 / 2) score`` (same marginals as the ODE).

    ``mu = x - Delta [ v + s_t^2 / (2t) (x + (1 - t) v) ]``, ``std = s_t sqrt(Delta)``.
    reference_kl_is_delta: the public code's KL of this step is Delta x the exact KL (Flow-GRPO's SDE).
    """
    dt = t - t_next
    mean = sample - dt * (velocity + s_t**2 / (2 * t) * (sample + (1 - t) * velocity))
    std = s_t * dt.sqrt()
    return _finish(mean, std, prepare_prev_sample(prev_sample, sample), sample, generator, dt=dt,
                   reference_kl_factor=dt if reference_kl_is_delta else None)


def flow_sde_step(
    velocity: torch.Tensor,
    sample: torch.Tensor,
    sigma: Scalar,
    sigma_next: Scalar,
    noise_level: float = 0.7,
    *,
    prev_sample: Optional[torch.Tensor] = None,
    generator: GeneratorLike = None,
) -> GaussianStep:
    """Flow-GRPO SDE step: ``s_t = a sqrt(t / (1 - t))`` with a = noise_level.

    At t = 1 the ratio diverges; like the reference code we then use the next grid value in the
    denominator, ``s_t = a sqrt(t / (1 - t'))``, which keeps s_t finite. Any s_t gives an SDE with the
    same marginals as the ODE (its drift carries the matching score term), so this only changes
    how much noise the first step injects. a = 0 is exactly the Euler ODE step ``x - Delta v``.

    Args:
        velocity: v [B, ...] (CFG-combined when CFG is used).
        sample: x_t [B, ...].
        sigma, sigma_next: t and t' (floats or [B]), 1 >= t > t' >= 0.
        noise_level: a >= 0 (default 0.7).
    Returns:
        GaussianStep with ``dt = Delta`` and ``reference_kl_factor = Delta``: the Flow-GRPO code divides by
        ``s_t^2``, not ``s_t^2 Delta``, so ``kl(scaling="reference")`` equals that code's KL.
    """
    a = non_negative("noise_level", noise_level)
    velocity, sample, t, t_next = _prepare(velocity, sample, sigma, sigma_next)
    denom = 1 - torch.where(t >= 1, t_next, t)
    s_t = a * (t / denom).sqrt()
    return _same_marginal_sde(velocity, sample, t, t_next, s_t, prev_sample, generator, reference_kl_is_delta=True)


def flow_constant_noise_step(
    velocity: torch.Tensor,
    sample: torch.Tensor,
    sigma: Scalar,
    sigma_next: Scalar,
    eta: float = 0.3,
    *,
    prev_sample: Optional[torch.Tensor] = None,
    generator: GeneratorLike = None,
) -> GaussianStep:
    """DanceGRPO's constant-noise SDE step: the Flow SDE with ``s_t = eta`` at every t.

    ``mu = x - Delta [ v + eta^2 / (2t) (x + (1 - t) v) ]``, ``std = eta sqrt(Delta)``. The public code's KL of
    this step (VeRL-Omni's dance_sde; DanceGRPO has none) divides by the true std, so its reference scaling is
    the exact KL (``reference_kl_factor`` None).
    """
    eta = non_negative("eta", eta)
    velocity, sample, t, t_next = _prepare(velocity, sample, sigma, sigma_next)
    s_t = torch.full_like(t, eta)
    return _same_marginal_sde(velocity, sample, t, t_next, s_t, prev_sample, generator, reference_kl_is_delta=False)


def flow_cps_step(
    velocity: torch.Tensor,
    sample: torch.Tensor,
    sigma: Scalar,
    sigma_next: Scalar,
    noise_level: float = 0.7,
    *,
    prev_sample: Optional[torch.Tensor] = None,
    generator: GeneratorLike = None,
    log_prob_convention: str = "density",
) -> GaussianStep:
    """Coefficient-preserving sampling (CPS) step.

    ``std = t' sin(a pi / 2)``, ``mu = (1 - t') x0_hat + sqrt(t'^2 - std^2) x1_hat`` with
    ``x0_hat = x - t v`` and ``x1_hat = x + (1 - t) v``. The coefficients of signal and noise stay
    those of the forward process at t'. a = 0 is the Euler step; the last step (t' = 0) returns x0_hat.
    Requires 0 <= a <= 1. CPS is a few-step sampler, not an SDE discretisation: its per-step noise does not
    shrink with Delta, so with posterior-mean predictions many steps under-disperse the samples (on
    N(1.5, 0.5^2) with the exact velocity, 100 steps at a = 0.7 gave std 0.42).
    log_prob_convention: "density" (the true Gaussian log-density) or "squared_error" (the Flow-GRPO / VeRL-Omni
    CPS code's ``-mean_d (x' - mu)^2``, whose clip ranges were tuned on it; see GaussianStep).
    """
    a = non_negative("noise_level", noise_level)
    if a > 1:
        raise ValueError(f"noise_level must be in [0, 1] for CPS (std = t' sin(a pi/2)), got {a}")
    velocity, sample, t, t_next = _prepare(velocity, sample, sigma, sigma_next)
    std = t_next * math.sin(a * math.pi / 2)
    x0_hat = sample - t * velocity
    x1_hat = sample + (1 - t) * velocity
    mean = (1 - t_next) * x0_hat + (t_next**2 - std**2).clamp_min(0).sqrt() * x1_hat
    return _finish(mean, std, prepare_prev_sample(prev_sample, sample), sample, generator,
                   log_prob_convention=log_prob_convention)


def flow_ode_step(
    velocity: torch.Tensor, sample: torch.Tensor, sigma: Scalar, sigma_next: Scalar
) -> GaussianStep:
    """Euler step of the probability-flow ODE: ``x' = x - Delta v``, std 0.

    Identical to diffusers' ``FlowMatchEulerDiscreteScheduler.step`` (``x + (t' - t) v``). Deterministic:
    KL and log_prob are undefined; compare steps with ``mean_matching``.
    """
    velocity, sample, t, t_next = _prepare(velocity, sample, sigma, sigma_next)
    mean = sample + (t_next - t) * velocity
    return GaussianStep(prev_sample=mean, mean=mean, std=torch.zeros_like(t), dt=t - t_next)


def flow_dpm2_step(
    velocity: torch.Tensor,
    sample: torch.Tensor,
    sigma: Scalar,
    sigma_next: Scalar,
    prev_x0: Optional[torch.Tensor] = None,
    prev_sigma: Optional[Scalar] = None,
) -> GaussianStep:
    """Deterministic multistep DPM-Solver++(2M) step in data (x0) prediction (Lu et al., arXiv 2211.01095), the
    DiffusionNFT reference's default rollout solver; std 0.

    With ``alpha = 1 - t``, ``lambda = log(alpha / t)``, ``x0_hat = x - t v`` and the previous step's
    ``(prev_x0, prev_sigma)`` (the multistep history, passed in: the function keeps no state):
    ``h = lambda' - lambda``, ``r0 = (lambda - lambda_prev) / h``, ``D1 = (x0_hat - prev_x0) / r0`` and
    ``x' = (t' / t) x - alpha' (e^{-h} - 1) (x0_hat + D1 / 2)``. Without history (the first step) or when the
    previous point was pure noise (lambda_prev = -inf, r0 = inf) D1 = 0: the first-order step, which on the flow
    path is exactly the Euler step ``x - Delta v``. At t' = 0 the step returns x0_hat. Sigma arithmetic in float64.
    """
    velocity, sample, t, t_next = _prepare(velocity, sample, sigma, sigma_next)
    x0_hat = sample - t * velocity
    first_order = prev_x0 is None
    if not first_order:
        prev_x0 = as_float32("prev_x0", prev_x0)
        same_shape("prev_x0", prev_x0, sample)
        if prev_sigma is None:
            raise ValueError("prev_x0 needs prev_sigma, the noise level the previous prediction was made at")
        t_prev = per_sample("prev_sigma", prev_sigma, sample).double()
        first_order = bool((t_prev >= 1).all())
    td, tnd = t.double(), t_next.double()
    if first_order:
        mean = sample + (t_next - t) * velocity
    else:
        lam = torch.log((1 - td) / td)
        lam_next = torch.log((1 - tnd) / tnd.clamp_min(1e-300))
        h = lam_next - lam
        r0 = torch.where(t_prev >= 1, torch.full_like(h, float("inf")), (lam - torch.log((1 - t_prev) / t_prev)) / h)
        d1 = (x0_hat - prev_x0) / r0.float()
        coef = (-(1 - tnd) * torch.expm1(-h)).float()
        mean = (tnd / td).float() * sample + coef * (x0_hat + 0.5 * d1)
    mean = torch.where(t_next <= 0, x0_hat, mean)
    return GaussianStep(prev_sample=mean, mean=mean, std=torch.zeros_like(t), dt=t - t_next)


# ---- the forward process --------------------------------------------------------------------------


@dataclass
class ForwardSample:
    """A point of the forward process: x_t [B, ...], the velocity target u = eps - x0 [B, ...], eps, t [B] and the
    clean latent x0 [B, ...] it was made from."""

    x_t: torch.Tensor
    target: torch.Tensor
    noise: torch.Tensor
    t: torch.Tensor
    x0: Optional[torch.Tensor] = None

    def t_like(self, x: torch.Tensor) -> torch.Tensor:
        """t reshaped to broadcast against ``x`` [B, ...] -> [B, 1, ..., 1]."""
        return self.t.reshape(-1, *([1] * (x.dim() - 1)))


def forward_process(
    x0: torch.Tensor,
    t: Union[float, torch.Tensor],
    noise: Optional[torch.Tensor] = None,
    generator: Optional[torch.Generator] = None,
) -> ForwardSample:
    """Noise a clean latent: ``x_t = (1 - t) x0 + t eps``, ``u = eps - x0`` (docs/math.md §0).

    Args:
        x0: clean latents [B, ...] (e.g. the final latent of a rollout), any float dtype; math in float32.
        t: a float or a per-sample tensor [B], each in [0, 1].
        noise: eps [B, ...]; drawn fresh (with ``generator``) when None.
    """
    x0 = x0.float()
    b = x0.shape[0]
    tt = torch.as_tensor(t, dtype=torch.float32, device=x0.device)
    tt = tt.expand(b) if tt.dim() == 0 else tt
    if tt.shape != (b,):
        raise ValueError(f"t must be a float or a tensor of shape [{b}], got shape {tuple(tt.shape)}")
    if ((tt < 0) | (tt > 1)).any():
        raise ValueError("t must lie in [0, 1] (1 = pure noise)")
    if noise is None:
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=torch.float32)
    elif noise.shape != x0.shape:
        raise ValueError(f"noise has shape {tuple(noise.shape)} but x0 has {tuple(x0.shape)}")
    noise = noise.float()
    tb = tt.reshape(b, *([1] * (x0.dim() - 1)))
    return ForwardSample(x_t=(1 - tb) * x0 + tb * noise, target=noise - x0, noise=noise, t=tt, x0=x0)
