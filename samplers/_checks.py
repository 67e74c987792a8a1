"""Argument checks and broadcasting shared by the step functions (torch only).

Every check raises ``ValueError`` naming the offending argument, so a caller sees at once
which input to fix.
"""

from __future__ import annotations

from typing import Sequence, Union

import torch

Scalar = Union[float, int, torch.Tensor]
GeneratorLike = Union[torch.Generator, Sequence[torch.Generator], None]


def as_float32(name: str, x: torch.Tensor) -> torch.Tensor:
    """Return ``x`` as float32 after checking it is a finite tensor with a batch dim."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 1:
        raise ValueError(f"{name} must have a batch dimension, got a 0-d tensor")
    x = x.float()
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or inf; check the model output and inputs")
    return x


def same_shape(name: str, x: torch.Tensor, ref: torch.Tensor, ref_name: str = "sample") -> None:
    if x.shape != ref.shape:
        raise ValueError(f"{name} has shape {tuple(x.shape)} but {ref_name} has {tuple(ref.shape)}; they must match")


def per_sample(name: str, value: Scalar, sample: torch.Tensor) -> torch.Tensor:
    """Broadcast a float or a per-sample tensor to float32 of shape ``[B, 1, ..., 1]``.

    value: a Python number, a 0-d tensor, or a tensor of shape [B] (one value per sample).
    """
    batch, ndim = sample.shape[0], sample.dim()
    t = torch.as_tensor(value, dtype=torch.float32, device=sample.device)
    if t.dim() == 0:
        t = t.expand(batch)
    elif t.dim() != 1 or t.shape[0] != batch:
        raise ValueError(f"{name} must be a float or a tensor of shape [{batch}], got shape {tuple(t.shape)}")
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} contains NaN or inf")
    return t.reshape(batch, *([1] * (ndim - 1)))


def check_sigmas(sigma: torch.Tensor, sigma_next: torch.Tensor) -> None:
    """Flow-matching grid: 1 >= sigma > sigma_next >= 0 (sigma is noise level, 1 = pure noise)."""
    if (sigma > 1).any() or (sigma <= 0).any():
        raise ValueError("sigma must lie in (0, 1] (1 = pure noise)")
    if (sigma_next < 0).any():
        raise ValueError("sigma_next must be >= 0")
    if (sigma_next >= sigma).any():
        raise ValueError("sigma_next must be smaller than sigma (sampling runs from noise towards data)")


def non_negative(name: str, value: float) -> float:
    value = float(value)
    if not value >= 0:  # also rejects NaN
        raise ValueError(f"{name} must be >= 0, got {value}")
    return value


def randn_like(sample: torch.Tensor, generator: GeneratorLike) -> torch.Tensor:
    """Standard normal noise in float32 shaped like ``sample``.

    generator: one torch.Generator, a list with one per sample (row i drawn from generator i,
    as diffusers pipelines accept), None, or an object with its own ``randn_like(sample)`` (e.g. one
    process's rows of a larger batch's noise). Noise is drawn on the generator's device.
    """
    if hasattr(generator, "randn_like"):
        return generator.randn_like(sample)
    if isinstance(generator, (list, tuple)):
        if len(generator) != sample.shape[0]:
            raise ValueError(f"generator list has {len(generator)} entries for a batch of {sample.shape[0]}")
        rows = [torch.randn(sample.shape[1:], generator=g, device=g.device, dtype=torch.float32) for g in generator]
        return torch.stack(rows).to(sample.device)
    device = generator.device if generator is not None else sample.device
    return torch.randn(sample.shape, generator=generator, device=device, dtype=torch.float32).to(sample.device)


def prepare_prev_sample(prev_sample, sample: torch.Tensor) -> torch.Tensor | None:
    if prev_sample is None:
        return None
    prev = as_float32("prev_sample", prev_sample)
    same_shape("prev_sample", prev, sample)
    return prev
