"""The denoising loop -> :class:`Trajectory`, every transition recorded; and :func:`rescore`.

Notation (rollout order, NOT the SPEC's data-at-0 convention): x_0 is the initial noise and x_N the
final latent; step k maps x_k -> x_{k+1} on the pipeline's own grid (``adapter.sampling_grid``):
flow families at ``t = sigma_k -> t' = sigma_{k+1}``, SD/SDXL at DDIM timesteps ``t_k -> t_k - T/N``.

Each step is a Gaussian transition from ``flowalign.samplers``: stochastic steps use the chosen sampler
(``flow_sde``, ``flow_constant_noise``, ``flow_cps`` or ``ddim`` with eta = noise_level > 0); the others
use its deterministic variant (``flow_ode`` / DDIM eta = 0), e.g. outside an SDE window
(Flow-GRPO-Fast / MixGRPO). ``rescore`` recomputes step k with the current network at the recorded
x_k and the recorded x_{k+1}: with an unchanged policy it reproduces the recorded log-prob.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional, Sequence, Union

import torch

from .distributed import RowShard
from .models.base import Conditioning, GeneratorLike, PipelineAdapter
from .samplers import (
    GaussianStep,
    ddim_step,
    flow_constant_noise_step,
    flow_cps_step,
    flow_ode_step,
    flow_sde_step,
)

FLOW_SAMPLERS = {
    "flow_sde": flow_sde_step,
    "flow_constant_noise": flow_constant_noise_step,
    "flow_cps": flow_cps_step,
    "flow_ode": None,  # deterministic Euler step
}
SAMPLERS = (*FLOW_SAMPLERS, "ddim")
DEFAULT_NOISE_LEVEL = {"flow_sde": 0.7, "flow_constant_noise": 0.3, "flow_cps": 0.7, "flow_ode": 0.0, "ddim": 1.0}


@dataclass
class Trajectory:
    """A batch of recorded rollouts (B samples, N steps). All tensors float32 unless noted.

    latents: [B, N+1, ...], x_0 (noise) .. x_N (final latent).
    timesteps: [N], the denoiser's timestep argument at each step (scheduler units).
    sigmas: [N+1]; flow: the sigma grid; DDIM: sqrt(1 - abar) per grid point.
    log_probs: [B, N], log pi(x_{k+1} | x_k) with ``reduction`` over elements; NaN at deterministic steps.
    stochastic: [N] bool, which steps drew noise (std > 0).
    prompts: the B prompts; cond: their encoded Conditioning; guidance_scale: CFG used by the policy.
    sampler, noise_level: the stochastic sampler and its a / eta.
    alpha_prod, alpha_prod_prev: [N], DDIM only.
    means: [B, N, ...] step means when ``record_means=True``, else None.
    """

    latents: torch.Tensor
    timesteps: torch.Tensor
    sigmas: torch.Tensor
    log_probs: torch.Tensor
    stochastic: torch.Tensor
    prompts: list[str]
    cond: Conditioning
    guidance_scale: float
    sampler: str
    noise_level: float
    reduction: str = "mean"
    alpha_prod: Optional[torch.Tensor] = None
    alpha_prod_prev: Optional[torch.Tensor] = None
    means: Optional[torch.Tensor] = None

    @property
    def num_steps(self) -> int:
        return int(self.timesteps.shape[0])

    @property
    def batch_size(self) -> int:
        return int(self.latents.shape[0])

    @property
    def final(self) -> torch.Tensor:
        """x_N [B, ...], the latent to decode."""
        return self.latents[:, -1]

    @property
    def stochastic_steps(self) -> list[int]:
        return [int(i) for i in torch.nonzero(self.stochastic).flatten()]


def stochastic_mask(num_steps: int, sde_window: Optional[tuple[int, int]] = None,
                    steps: Union[Iterable[int], torch.Tensor, None] = None) -> torch.Tensor:
    """[N] bool: the steps that may be stochastic. sde_window=(start, length) -> steps start..start+length-1;
    steps: explicit indices or a bool mask; neither -> all steps."""
    if sde_window is not None and steps is not None:
        raise ValueError("give either sde_window=(start, length) or stochastic_steps, not both")
    mask = torch.zeros(num_steps, dtype=torch.bool)
    if sde_window is not None:
        start, length = (int(v) for v in sde_window)
        if start < 0 or length < 0 or start + length > num_steps:
            raise ValueError(f"sde_window={sde_window} does not fit in {num_steps} steps: need 0 <= start and "
                             f"start + length <= {num_steps}")
        mask[start : start + length] = True
    elif steps is not None:
        steps = torch.as_tensor(steps if isinstance(steps, torch.Tensor) else list(steps))
        if steps.dtype == torch.bool:
            if steps.shape != (num_steps,):
                raise ValueError(f"a stochastic_steps mask must have shape [{num_steps}], got {tuple(steps.shape)}")
            mask = steps.clone()
        elif steps.numel():
            if steps.min() < 0 or steps.max() >= num_steps:
                raise ValueError(f"stochastic_steps must be step indices in [0, {num_steps}), got {steps.tolist()}")
            mask[steps.long()] = True
    else:
        mask[:] = True
    return mask


def _check_sampler(adapter: PipelineAdapter, sampler: str) -> None:
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    if adapter.is_flow and sampler == "ddim":
        raise ValueError(f"sampler 'ddim' is for SD/SDXL; the {adapter.family} pipeline is a flow model: "
                         "use flow_sde, flow_constant_noise, flow_cps or flow_ode")
    if not adapter.is_flow and sampler != "ddim":
        raise ValueError(f"sampler {sampler!r} needs a flow-matching pipeline (sd3/flux/wan); use sampler='ddim' "
                         f"(noise_level = eta) for {adapter.family}")


def _transition(adapter, sampler, noise_level, stochastic, out, x, k, sigmas, alpha_prod, alpha_prod_prev,
                prev_sample=None, generator=None) -> GaussianStep:
    """Step k from x [B, ...] given the network output ``out`` (CFG-combined, float32)."""
    b = x.shape[0]
    if not adapter.is_flow:
        eta = noise_level if stochastic else 0.0
        return ddim_step(out, x, alpha_prod[k].expand(b), alpha_prod_prev[k].expand(b), eta, adapter.prediction_type,
                         prev_sample=prev_sample, generator=generator)
    s, s_next = sigmas[k].expand(b), sigmas[k + 1].expand(b)
    fn = FLOW_SAMPLERS[sampler]
    if not stochastic or fn is None:
        return flow_ode_step(out, x, s, s_next)
    return fn(out, x, s, s_next, noise_level, prev_sample=prev_sample, generator=generator)


def _initial_noise(adapter, batch_size, group_size, generator, height, width, num_frames) -> torch.Tensor:
    if batch_size % group_size:
        raise ValueError(f"batch of {batch_size} prompts is not a multiple of group_size={group_size}")
    if isinstance(generator, RowShard):  # this process's rows of the global batch's noise (flowalign.distributed)
        full = _initial_noise(adapter, generator.total, group_size, generator.generator, height, width, num_frames)
        return full[generator.rows]
    gen = generator[::group_size] if isinstance(generator, (list, tuple)) else generator
    x0 = adapter.prepare_latents(batch_size // group_size, height, width, num_frames, generator=gen)
    return x0.repeat_interleave(group_size, dim=0) if group_size > 1 else x0


@torch.no_grad()
def rollout(
    adapter: PipelineAdapter,
    prompts: Union[str, Sequence[str]],
    *,
    num_steps: int = 10,
    guidance_scale: float = 4.5,
    sampler: Optional[str] = None,
    noise_level: Optional[float] = None,
    sde_window: Optional[tuple[int, int]] = None,
    stochastic_steps: Union[Iterable[int], torch.Tensor, None] = None,
    group_size: int = 1,
    generator: GeneratorLike = None,
    latents: Optional[torch.Tensor] = None,
    height: Optional[int] = None,
    width: Optional[int] = None,
    num_frames: Optional[int] = None,
    cond: Optional[Conditioning] = None,
    record_means: bool = False,
    reduction: str = "mean",
) -> Trajectory:
    """Sample B = len(prompts) latents and record every transition (no gradients).

    Args:
        prompts: the batch, one prompt per row; rows of one prompt group must be consecutive.
        num_steps: N; the grid is the pipeline scheduler's for N steps.
        guidance_scale: CFG scale of the policy (FLUX: the embedded guidance; see FluxAdapter.true_cfg_scale).
        sampler: flow_sde (default for flow) / flow_constant_noise / flow_cps / flow_ode, or ddim (SD/SDXL).
        noise_level: a (flow_sde, flow_cps), eta (flow_constant_noise, ddim); default per sampler.
        sde_window: (start, length): only these steps are stochastic, the rest ODE / eta=0 DDIM.
        stochastic_steps: alternatively, explicit indices or an [N] bool mask.
        group_size: G; each block of G consecutive rows starts from the same initial noise.
        generator: torch.Generator (or one per row, or a distributed ``RowShard``) for the initial and step noise.
        latents: initial noise [B, ...] to use instead of drawing it.
        cond: pre-encoded Conditioning for the prompts (else ``adapter.encode_prompts``).
        reduction: "mean" or "sum" over elements for the recorded log-probs.
    """
    sampler = sampler or adapter.default_sampler
    _check_sampler(adapter, sampler)
    noise_level = DEFAULT_NOISE_LEVEL[sampler] if noise_level is None else float(noise_level)
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    cond = adapter.encode_prompts(prompts, guidance_scale) if cond is None else cond
    if len(cond) != len(prompts):
        raise ValueError(f"cond holds {len(cond)} rows for {len(prompts)} prompts")
    x = latents.float() if latents is not None else _initial_noise(
        adapter, len(prompts), group_size, generator, height, width, num_frames)
    grid = adapter.sampling_grid(num_steps, x)
    requested = stochastic_mask(num_steps, sde_window, stochastic_steps)
    requested &= noise_level > 0 and sampler != "flow_ode"

    xs, logps, means = [x], [], []
    stochastic = torch.zeros(num_steps, dtype=torch.bool)
    for k in range(num_steps):
        out = adapter.predict(x, grid.timesteps[k], cond, guidance_scale)
        step = _transition(adapter, sampler, noise_level, bool(requested[k]), out, x, k, grid.sigmas,
                           grid.alpha_prod, grid.alpha_prod_prev, generator=generator)
        stochastic[k] = not step.deterministic
        nan = torch.full((x.shape[0],), float("nan"), device=x.device)
        logps.append(step.log_prob(reduction=reduction) if stochastic[k] else nan)
        if record_means:
            means.append(step.mean)
        x = step.prev_sample
        xs.append(x)
    return Trajectory(
        latents=torch.stack(xs, dim=1), timesteps=grid.timesteps, sigmas=grid.sigmas,
        log_probs=torch.stack(logps, dim=1), stochastic=stochastic, prompts=prompts, cond=cond,
        guidance_scale=float(guidance_scale), sampler=sampler, noise_level=noise_level, reduction=reduction,
        alpha_prod=grid.alpha_prod, alpha_prod_prev=grid.alpha_prod_prev,
        means=torch.stack(means, dim=1) if record_means else None,
    )


def rescore(
    adapter: PipelineAdapter,
    traj: Trajectory,
    step_index: int,
    *,
    index: Union[torch.Tensor, Sequence[int], slice, None] = None,
    guidance_scale: Optional[float] = None,
    cond: Optional[Conditioning] = None,
) -> GaussianStep:
    """Step k's Gaussian transition under the CURRENT network (differentiable w.r.t. LoRA params).

    Predicts at the recorded x_k (rows ``index``, default all) and passes the recorded x_{k+1} as
    ``prev_sample``, so ``step.log_prob()`` is log pi_theta(x_{k+1} | x_k); with the rollout's policy it
    equals ``traj.log_probs[:, k]`` (ratio 1 up to float error). Deterministic steps return the ODE /
    eta=0 step (use ``mean_matching``). guidance_scale / cond override the recorded ones (e.g. a teacher
    with its own CFG).
    """
    k = int(step_index)
    if not 0 <= k < traj.num_steps:
        raise IndexError(f"step_index {k} out of range for a trajectory of {traj.num_steps} steps")
    idx = slice(None) if index is None else index
    rows = idx if not isinstance(idx, (list, tuple)) else torch.tensor(idx, dtype=torch.long)
    x = traj.latents[rows, k]
    prev = traj.latents[rows, k + 1]
    g = traj.guidance_scale if guidance_scale is None else guidance_scale
    if cond is None:
        cond = traj.cond if index is None else traj.cond.select(idx)
    out = adapter.predict(x, traj.timesteps[k], cond, g)
    stochastic = bool(traj.stochastic[k])
    return _transition(adapter, traj.sampler, traj.noise_level, stochastic, out, x, k, traj.sigmas,
                       traj.alpha_prod, traj.alpha_prod_prev, prev_sample=prev if stochastic else None)
