"""f-divergence score weighting (f-distill, docs/math.md §6). No I/O.

``D_f(p || q) = ∫ q f(p / q)`` with p the teacher/target, q the student and r = p / q. For a student sample
``x = G_theta(z)`` the gradient is a weighted score difference [derived]:

    d/dtheta D_f(p || q_theta) = E_z[ h(r(x)) (s_q(x) - s_p(x)) . dx/dtheta ],   h(r) = r^2 f''(r),

so every f-divergence is reverse KL (h = 1, VSD/DMD) with per-sample weights h(r). The table of f, h and
``log_h`` (h in log space) is flowalign.algorithms.divergences.

Two ways to get r:
- per-step Gaussian transitions (closed form, no discriminator): ``transition_weights``;
- one-step distillation, DMD2-style: a discriminator logit d estimates log(p_data / p_gen):
  ``discriminator_ratio`` + ``generator_surrogate_loss`` + ``discriminator_loss``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from ..samplers import GaussianStep
from .divergences import _as_divergence, normalized_weights


# ---- per-step Gaussian transitions --------------------------------------------------------------------


def transition_log_ratio(student: GaussianStep, teacher: GaussianStep, x: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``log r = log p_T(x') - log p_S(x')`` -> [B], the exact density ratio of two transitions from the same
    state (sum over elements: the true densities), at x' = the student's prev_sample unless x is given."""
    x = student.prev_sample if x is None else x
    return teacher.log_prob(x, reduction="sum") - student.log_prob(x, reduction="sum")


def transition_weights(student: GaussianStep, teacher: GaussianStep, divergence="reverse_kl",
                       alpha: Optional[float] = None, x: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Detached weights ``h(r) / mean_batch h(r)`` -> [B] for per-step distillation (r from the exact
    transition densities, see ``transition_log_ratio``). reverse_kl gives all ones."""
    div = _as_divergence(divergence, alpha)
    with torch.no_grad():
        return normalized_weights(div.log_h(transition_log_ratio(student, teacher, x).double())).float()


# ---- DMD2-style one-step distillation -----------------------------------------------------------------


def discriminator_ratio(logits: torch.Tensor, t: torch.Tensor, num_bins: int = 10, logit_clamp: float = 10.0,
                        clip: tuple[float, float] = (0.1, 20.0), bin_range: tuple[float, float] = (0.0, 1.0),
                        bin_means: Optional[torch.Tensor] = None, ema_rate: float = 0.0) -> torch.Tensor:
    """Density ratio from discriminator logits -> [B] (detached).

    logits: [B], or [B, K] for a discriminator with K heads (averaged over K before the exp, as FastGen does).
    ``r = clip(exp(clamp(d, -c, c)), 0.1, 20)``, then divided by its time bin's mean: ``num_bins`` equal bins of t
    over ``bin_range`` (FastGen: the noise schedule's [t_min, t_max]; t outside falls in the first / last bin).
    bin_means: optional [num_bins] state (start with ones) for FastGen's EMA of the per-bin means: each bin seen
    in this batch moves ``m <- ema_rate m + (1 - ema_rate) batch mean`` (in place) and r is divided by the updated
    m; ema_rate = 0 (FastGen's default) is the batch's own per-bin mean, as without state.
    """
    d = logits.detach().float()
    if d.dim() == 2:
        d = d.mean(1)
    d = d.reshape(-1)
    t = torch.as_tensor(t, dtype=torch.float32, device=d.device).reshape(-1)
    if t.shape != d.shape:
        raise ValueError(f"t must have one value per sample ([{d.numel()}]), got {tuple(t.shape)}")
    if ((t < 0) | (t > 1)).any():
        raise ValueError("t must lie in [0, 1] (divide scheduler timesteps by num_train_timesteps)")
    lo, hi = (float(v) for v in bin_range)
    if not hi > lo:
        raise ValueError(f"bin_range must be [lo, hi] with hi > lo, got {list(bin_range)}")
    if not 0 <= ema_rate < 1:
        raise ValueError(f"ema_rate must be in [0, 1), got {ema_rate}")
    r = d.clamp(-logit_clamp, logit_clamp).exp().clamp(*clip)
    bins = ((t - lo) / (hi - lo) * num_bins).floor().long().clamp(0, num_bins - 1)
    total = torch.zeros(num_bins, device=d.device).index_add_(0, bins, r)
    count = torch.zeros(num_bins, device=d.device).index_add_(0, bins, torch.ones_like(r))
    batch_means = total / count.clamp_min(1)
    if bin_means is None:
        return r / batch_means[bins]
    if bin_means.shape != (num_bins,):
        raise ValueError(f"bin_means must have shape [{num_bins}], got {tuple(bin_means.shape)}")
    seen = count > 0
    updated = torch.where(seen, ema_rate * bin_means.to(d.device) + (1 - ema_rate) * batch_means, bin_means.to(d.device))
    bin_means.copy_(updated.to(bin_means.device))
    return r / updated[bins]


@dataclass
class GeneratorLoss:
    """loss: scalar; distill, gan: scalars (detached); weights: [B] normalised h (detached)."""

    loss: torch.Tensor
    distill: torch.Tensor
    gan: torch.Tensor
    weights: torch.Tensor


def generator_surrogate_loss(
    x: torch.Tensor,
    x0_fake: torch.Tensor,
    x0_teacher: torch.Tensor,
    d_fake: torch.Tensor,
    t: torch.Tensor,
    divergence="js",
    alpha: Optional[float] = None,
    lambda_gan: float = 1e-3,
    num_bins: int = 10,
    bin_range: tuple[float, float] = (0.0, 1.0),
    bin_means: Optional[torch.Tensor] = None,
    ema_rate: float = 0.0,
) -> GeneratorLoss:
    """DMD2-style generator loss with f-divergence weights.

    ``h = h(r) / mean_batch h(r)`` with r from ``discriminator_ratio(d_fake, t)``,
    ``w = h / (mean_d |x - x0_teacher| + 1e-6)``, ``g = w (x0_fake - x0_teacher)``,
    ``L = 1/2 mean_{i,d} (x - sg(x - g))^2 + lambda_gan mean_i softplus(-d_fake)``.
    The first term's gradient w.r.t. x is g / numel (the DMD "fake minus real" direction, descent moves x
    toward the teacher's x0).

    Args:
        x: generator outputs [B, ...] (with grad).
        x0_fake, x0_teacher: the fake-score network's and the teacher's (CFG, in x0 space) x0 predictions at
            the noised x_t [B, ...] (no grad).
        d_fake: discriminator logits on the generated samples [B] or [B, K] (K heads; with grad for the GAN term,
            averaged over all entries).
        t: noise level of each sample's x_t in [0, 1] [B].
        divergence: a name from the table (default "js") or "alpha" with alpha=a.
        num_bins, bin_range, bin_means, ema_rate: the ratio's time-bin normalisation (``discriminator_ratio``).
    """
    if not (x.shape == x0_fake.shape == x0_teacher.shape):
        raise ValueError(f"x {tuple(x.shape)}, x0_fake {tuple(x0_fake.shape)} and x0_teacher "
                         f"{tuple(x0_teacher.shape)} must share one shape")
    div = _as_divergence(divergence, alpha)
    with torch.no_grad():
        r = discriminator_ratio(d_fake, t, num_bins, bin_range=bin_range, bin_means=bin_means, ema_rate=ema_rate)
        h = div.h(r)
        h = h / h.mean()
        scale = (x - x0_teacher).abs().flatten(1).mean(1) + 1e-6
        w = (h / scale).reshape(-1, *([1] * (x.dim() - 1)))
        g = w * (x0_fake.float() - x0_teacher.float())
        target = x.detach() - g
    distill = 0.5 * ((x - target) ** 2).mean()
    gan = F.softplus(-d_fake.float()).mean()
    return GeneratorLoss(loss=distill + lambda_gan * gan, distill=distill.detach(), gan=gan.detach(), weights=h)


def discriminator_loss(d_fake: torch.Tensor, d_real: torch.Tensor) -> torch.Tensor:
    """``mean softplus(d_fake) + mean softplus(-d_real)``: the logit then estimates log(p_data / p_gen)."""
    return F.softplus(d_fake.float()).mean() + F.softplus(-d_real.float()).mean()
