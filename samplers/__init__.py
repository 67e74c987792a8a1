"""flowalign.samplers: each denoising step as a Gaussian transition (mean, std, log-prob, KL).

Depends on torch only. Every step function returns a :class:`GaussianStep`; pass ``prev_sample`` to
re-score a stored transition instead of drawing one.

    >>> step = flow_sde_step(v, x, sigma=0.8, sigma_next=0.7, noise_level=0.7, generator=g)
    >>> step.log_prob()            # [B], mean over elements (reduction="sum" for the density)
    >>> step.kl(ref_step)          # closed form, same variance as the sampler used
"""

from .ddim import ddim_step
from .flow import (
    ForwardSample,
    flow_constant_noise_step,
    flow_cps_step,
    flow_dpm2_step,
    flow_ode_step,
    flow_sde_step,
    forward_process,
)
from .gaussian import GaussianStep

__all__ = [
    "GaussianStep",
    "flow_sde_step",
    "flow_constant_noise_step",
    "flow_cps_step",
    "flow_ode_step",
    "flow_dpm2_step",
    "ddim_step",
    "ForwardSample",
    "forward_process",
]
