"""DDIM with eta as a Gaussian transition (SD1.5 / SDXL; epsilon or v prediction).

Notation: ``abar_t`` = alphas_cumprod at the current timestep, ``abar_prev`` at the next (less noisy)
one, ``x = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps``.
- ``x0_hat = (x - sqrt(1 - abar_t) eps_hat) / sqrt(abar_t)``
- ``sigma_t^2 = eta^2 (1 - abar_prev) / (1 - abar_t) (1 - abar_t / abar_prev)``
- ``mu = sqrt(abar_prev) x0_hat + sqrt(1 - abar_prev - sigma_t^2) eps_hat``, ``std = sigma_t``.
eta = 0 is deterministic DDIM (diffusers' ``DDIMScheduler.step`` with clip_sample=False); eta = 1 on
adjacent timesteps is the DDPM posterior q(x_{t-1} | x_t, x0_hat). Math and outputs are float32.
"""

from __future__ import annotations

from typing import Optional

import torch

from ._checks import (
    GeneratorLike,
    Scalar,
    as_float32,
    non_negative,
    per_sample,
    prepare_prev_sample,
    randn_like,
    same_shape,
)
from .gaussian import GaussianStep

_PREDICTION_TYPES = ("epsilon", "v_prediction")


def ddim_step(
    model_output: torch.Tensor,
    sample: torch.Tensor,
    alpha_prod: Scalar,
    alpha_prod_prev: Scalar,
    eta: float,
    prediction_type: str = "epsilon",
    *,
    prev_sample: Optional[torch.Tensor] = None,
    generator: GeneratorLike = None,
) -> GaussianStep:
    """One DDIM step.

    Args:
        model_output: eps_hat, or v_hat when prediction_type="v_prediction" [B, ...].
            v-prediction is converted first: ``eps = sqrt(abar) v + sqrt(1 - abar) x``,
            ``x0 = sqrt(abar) x - sqrt(1 - abar) v``.
        sample: x_t [B, ...].
        alpha_prod, alpha_prod_prev: abar_t and abar_prev (floats or [B]); 0 < abar_t < abar_prev <= 1.
        eta: >= 0; 0 = deterministic DDIM, 1 = DDPM posterior on adjacent steps.
    """
    if prediction_type not in _PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {_PREDICTION_TYPES}, got {prediction_type!r}")
    eta = non_negative("eta", eta)
    sample = as_float32("sample", sample)
    model_output = as_float32("model_output", model_output)
    same_shape("model_output", model_output, sample)
    abar = per_sample("alpha_prod", alpha_prod, sample)
    abar_prev = per_sample("alpha_prod_prev", alpha_prod_prev, sample)
    if (abar <= 0).any() or (abar >= 1).any():
        raise ValueError("alpha_prod must lie in (0, 1)")
    if (abar_prev > 1).any() or (abar_prev < abar).any():
        raise ValueError("alpha_prod_prev must lie in [alpha_prod, 1] (the next step is less noisy)")

    if prediction_type == "epsilon":
        eps_hat = model_output
        x0_hat = (sample - (1 - abar).sqrt() * eps_hat) / abar.sqrt()
    else:
        x0_hat = abar.sqrt() * sample - (1 - abar).sqrt() * model_output
        eps_hat = abar.sqrt() * model_output + (1 - abar).sqrt() * sample

    variance = (1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev)
    std = eta * variance.clamp_min(0).sqrt()
    mean = abar_prev.sqrt() * x0_hat + (1 - abar_prev - std**2).clamp_min(0).sqrt() * eps_hat

    prev = prepare_prev_sample(prev_sample, sample)
    if prev is None:
        prev = mean + std * randn_like(sample, generator) if (std > 0).any() else mean
    return GaussianStep(prev_sample=prev, mean=mean, std=std)
