"""The denoising loop -> :class:`Trajectory`, every transition recorded; and :func:`rescore`.

Notation (rollout order, NOT the data-at-0 convention of docs/math.md §0): x_0 is the initial noise and x_N the
final latent; step k maps x_k -> x_{k+1} on the pipeline's own grid (``adapter.sampling_grid``):
flow families at ``t = sigma_k -> t' = sigma_{k+1}``, SD/SDXL at DDIM timesteps ``t_k -> t_k - T/N``.

Each step is a Gaussian transition from ``flowalign.samplers``: stochastic steps use the chosen sampler
(``flow_sde``, ``flow_constant_noise``, ``flow_cps`` or ``ddim`` with eta = noise_level > 0); the others
use its deterministic variant (``flow_ode`` / DDIM eta = 0), e.g. outside an SDE window
(Flow-GRPO-Fast / MixGRPO). ``flow_dpm2`` is the deterministic multistep DPM-Solver++(2M) (the DiffusionNFT
reference's rollouts). ``rescore`` recomputes step k with the current network at the recorded x_k and the
recorded x_{k+1}: with an unchanged policy it reproduces the recorded log-prob.

Grids: the pipeline scheduler's own (``grid="pipeline"``) or DanceGRPO's ``shift(linspace(1, 0, N + 1))``
(``grid="shifted_linear"``, ``sigma' = shift sigma / (1 + (shift - 1) sigma)``); ``integer_timesteps`` truncates
the timestep the denoiser receives to an integer (``int(sigma * 1000)``, as DanceGRPO and the DiffusionNFT
sampler do) while the step math keeps the exact sigma.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Sequence, Union

import torch

from . import lora
from .runtime.distributed import RowShard
from .models.base import Conditioning, GeneratorLike, PipelineAdapter, SamplingGrid
from .samplers import (
    GaussianStep,
    ddim_step,
    flow_constant_noise_step,
    flow_cps_step,
    flow_dpm2_step,
    flow_ode_step,
    flow_sde_step,
)

@dataclass(frozen=True)
class SamplerSpec:
    """One sampler of the table: its stochastic step (None: deterministic, the rollout steps it itself), the noise
    level it uses when none is set (a of the flow SDE / CPS, eta of the constant-noise SDE / DDIM), and whether
    it steps a rectified flow (sd3/flux/wan) or a DDPM (sd/sdxl)."""

    step: Optional[Callable[..., GaussianStep]]
    default_noise_level: float
    flow: bool = True


# ONE table: sampling.sampler -> its spec. The config's choices and defaults are read from it.
SAMPLERS: dict[str, SamplerSpec] = {
    "flow_sde": SamplerSpec(flow_sde_step, 0.7),  # Flow-GRPO's SDE
    "flow_constant_noise": SamplerSpec(flow_constant_noise_step, 0.3),  # DanceGRPO's
    "flow_cps": SamplerSpec(flow_cps_step, 0.7),  # coefficient-preserving (Flow-GRPO-Fast / VeRL-Omni)
    "flow_ode": SamplerSpec(None, 0.0),  # deterministic Euler step
    "flow_dpm2": SamplerSpec(None, 0.0),  # deterministic DPM-Solver++(2M): multistep, its history kept by the rollout
    "ddim": SamplerSpec(ddim_step, 1.0, flow=False),  # DDPO's, eta = noise_level
}
DETERMINISTIC_SAMPLERS = tuple(name for name, spec in SAMPLERS.items() if spec.step is None)
GRIDS = ("pipeline", "shifted_linear")
DECODES = ("final", "last_x0_hat")  # what Trajectory.output gives the reward


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
    log_prob_convention: "density" or "squared_error" (CPS as the Flow-GRPO code scores it; GaussianStep).
    reference_kl: [B, N] exact KL (mean over elements) of each stochastic transition to the adapter-disabled
        model's from the same x_k, when ``record_reference_kl=True`` (Flow-GRPO's ``kl_reward``); NaN elsewhere.
    last_x0_hat: [B, ...] the last step's clean-latent prediction ``x_{N-1} - sigma_{N-1} v`` (flow families),
        which DanceGRPO decodes instead of x_N.
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
    log_prob_convention: str = "density"
    reference_kl: Optional[torch.Tensor] = None
    last_x0_hat: Optional[torch.Tensor] = None

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

    def output(self, decode: str = "final") -> torch.Tensor:
        """The latent a reward sees: ``final`` (x_N) or ``last_x0_hat`` (DanceGRPO) [B, ...]."""
        if decode == "final":
            return self.final
        if decode == "last_x0_hat":
            if self.last_x0_hat is None:
                raise ValueError("this trajectory has no last-step x0 prediction (a DDIM rollout); decode 'final'")
            return self.last_x0_hat
        raise ValueError(f"decode must be one of {DECODES}, got {decode!r}")

    @property
    def group_keys(self) -> list[str]:
        """One key per row naming its prompt group: the prompt, with the condition image's hash when there is one."""
        return self.cond.group_keys

    @property
    def stochastic_steps(self) -> list[int]:
        return [int(i) for i in torch.nonzero(self.stochastic).flatten()]


def concat_trajectories(parts: Sequence[Trajectory]) -> Trajectory:
    """One trajectory of the rows of ``parts`` in order (rollouts of consecutive chunks of one batch). The grid,
    the stochastic steps and the sampler settings must be the same in every part (ValueError otherwise)."""
    first = parts[0]
    if len(parts) == 1:
        return first
    for p in parts[1:]:
        same = (torch.equal(p.timesteps, first.timesteps) and torch.equal(p.sigmas, first.sigmas)
                and torch.equal(p.stochastic, first.stochastic) and p.sampler == first.sampler
                and p.noise_level == first.noise_level and p.guidance_scale == first.guidance_scale)
        if not same:
            raise ValueError("trajectories to concatenate must share their grid, stochastic steps and sampler "
                             "(a random SDE window is drawn per rollout: roll out such a batch in one chunk)")

    def cat(name):
        values = [getattr(p, name) for p in parts]
        return None if values[0] is None else torch.cat(values)

    def cat_dicts(dicts):
        return None if dicts[0] is None else {k: torch.cat([d[k] for d in dicts]) for k in dicts[0]}

    def cat_lists(lists):
        return None if lists[0] is None else [x for xs in lists for x in xs]

    cond = Conditioning([q for p in parts for q in p.cond.prompts], cat_dicts([p.cond.cond for p in parts]),
                        cat_dicts([p.cond.uncond for p in parts]), cat_lists([p.cond.images for p in parts]),
                        cat_lists([p.cond.keys for p in parts]))
    return dataclasses.replace(first, latents=cat("latents"), log_probs=cat("log_probs"),
                               prompts=[q for p in parts for q in p.prompts], cond=cond, means=cat("means"),
                               reference_kl=cat("reference_kl"), last_x0_hat=cat("last_x0_hat"))


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
    if adapter.is_flow and not SAMPLERS[sampler].flow:
        raise ValueError(f"sampler 'ddim' is for SD/SDXL; the {adapter.family} pipeline is a flow model: "
                         "use flow_sde, flow_constant_noise, flow_cps or flow_ode")
    if not adapter.is_flow and SAMPLERS[sampler].flow:
        raise ValueError(f"sampler {sampler!r} needs a flow-matching pipeline (sd3/flux/wan); use sampler='ddim' "
                         f"(noise_level = eta) for {adapter.family}")


def _transition(adapter, sampler, noise_level, stochastic, out, x, k, sigmas, alpha_prod, alpha_prod_prev,
                prev_sample=None, generator=None, log_prob_convention="density", history=None) -> GaussianStep:
    """Step k from x [B, ...] given the network output ``out`` (CFG-combined, float32). history: flow_dpm2's
    (x0_hat, sigma) of the previous step, or None."""
    b = x.shape[0]
    if not adapter.is_flow:
        eta = noise_level if stochastic else 0.0
        return ddim_step(out, x, alpha_prod[k].expand(b), alpha_prod_prev[k].expand(b), eta, adapter.prediction_type,
                         prev_sample=prev_sample, generator=generator)
    s, s_next = sigmas[k].expand(b), sigmas[k + 1].expand(b)  # k: a step, or one per row [b]
    if sampler == "flow_dpm2":
        return flow_dpm2_step(out, x, s, s_next, *(history or (None, None)))
    fn = SAMPLERS[sampler].step
    if not stochastic or fn is None:
        return flow_ode_step(out, x, s, s_next)
    if sampler == "flow_cps":
        return fn(out, x, s, s_next, noise_level, prev_sample=prev_sample, generator=generator,
                  log_prob_convention=log_prob_convention)
    return fn(out, x, s, s_next, noise_level, prev_sample=prev_sample, generator=generator)


def shifted_linear_grid(adapter: PipelineAdapter, num_steps: int, device, shift: Optional[float] = None
                        ) -> SamplingGrid:
    """DanceGRPO's grid: ``sigma = shift s / (1 + (shift - 1) s)`` at ``s = linspace(1, 0, N + 1)``; timesteps
    ``sigma_k * num_train_timesteps`` (k < N). shift: default the scheduler config's ``shift`` (1 if it has none)."""
    config = adapter.pipe.scheduler.config
    shift = float(config.get("shift", 1.0) if shift is None else shift)
    if not shift > 0:
        raise ValueError(f"grid shift must be > 0, got {shift}")
    s = torch.linspace(1, 0, num_steps + 1, dtype=torch.float64)
    sigmas = (shift * s / (1 + (shift - 1) * s)).float().to(device)
    return SamplingGrid(timesteps=sigmas[:-1] * float(config.get("num_train_timesteps", 1000)), sigmas=sigmas)


def sampling_grid(adapter: PipelineAdapter, num_steps: int, x: torch.Tensor, grid: str = "pipeline",
                  shift: Optional[float] = None, integer_timesteps: bool = False) -> SamplingGrid:
    """The rollout's grid (module docstring): the pipeline's own or DanceGRPO's, timesteps optionally truncated to
    integers (the denoiser's input only; the sigmas stay exact)."""
    if grid not in GRIDS:
        raise ValueError(f"grid must be one of {GRIDS}, got {grid!r}")
    if grid == "shifted_linear":
        if not adapter.is_flow:
            raise ValueError("grid='shifted_linear' is a flow-matching grid; SD/SDXL use the DDIM grid")
        out = shifted_linear_grid(adapter, num_steps, x.device, shift)
    else:
        out = adapter.sampling_grid(num_steps, x)
    if integer_timesteps:
        out = SamplingGrid(out.timesteps.trunc(), out.sigmas, out.alpha_prod, out.alpha_prod_prev)
    return out


def _initial_noise(adapter, batch_size, group_size, generator, height, width, num_frames) -> torch.Tensor:
    if batch_size % group_size:
        raise ValueError(f"batch of {batch_size} prompts is not a multiple of group_size={group_size}")
    if isinstance(generator, RowShard):  # this process's rows of the global batch's noise (flowalign.runtime.distributed)
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
    log_prob_convention: str = "density",
    grid: str = "pipeline",
    grid_shift: Optional[float] = None,
    integer_timesteps: bool = False,
    record_reference_kl: bool = False,
    images=None,
) -> Trajectory:
    """Sample B = len(prompts) latents and record every transition (no gradients).

    Args:
        prompts: the batch, one prompt per row; rows of one prompt group must be consecutive.
        num_steps: N; the grid is the pipeline scheduler's for N steps.
        guidance_scale: CFG scale of the policy (FLUX: the embedded guidance; see FluxAdapter.true_cfg_scale).
        sampler: flow_sde (default for flow) / flow_constant_noise / flow_cps / flow_ode / flow_dpm2, or ddim
            (SD/SDXL).
        noise_level: a (flow_sde, flow_cps), eta (flow_constant_noise, ddim); default per sampler.
        sde_window: (start, length): only these steps are stochastic, the rest ODE / eta=0 DDIM.
        stochastic_steps: alternatively, explicit indices or an [N] bool mask.
        group_size: G; each block of G consecutive rows starts from the same initial noise.
        generator: torch.Generator (or one per row, or a distributed ``RowShard``) for the initial and step noise.
        latents: initial noise [B, ...] to use instead of drawing it.
        cond: pre-encoded Conditioning for the prompts (else ``adapter.encode_prompts``).
        images: one condition image per prompt for image-conditioned families (editing, image-to-video); they
            are encoded with the prompts, so re-scoring and the reference see them too.
        reduction: "mean" or "sum" over elements for the recorded log-probs.
        log_prob_convention: "density", or "squared_error" for CPS as the Flow-GRPO code scores it.
        grid, grid_shift, integer_timesteps: the sampling grid (module docstring).
        record_reference_kl: also run the adapter-disabled model at every stochastic step and record the exact
            per-step KL of the two transitions (``Trajectory.reference_kl``; one extra denoiser call per step).
    """
    sampler = sampler or adapter.default_sampler
    _check_sampler(adapter, sampler)
    noise_level = SAMPLERS[sampler].default_noise_level if noise_level is None else float(noise_level)
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if cond is None:
        cond = adapter.encode_prompts(prompts, guidance_scale, images=images, height=height, width=width,
                                      num_frames=num_frames)
    if len(cond) != len(prompts):
        raise ValueError(f"cond holds {len(cond)} rows for {len(prompts)} prompts")
    x = latents.float() if latents is not None else _initial_noise(
        adapter, len(prompts), group_size, generator, height, width, num_frames)
    grid = sampling_grid(adapter, num_steps, x, grid, grid_shift, integer_timesteps)
    requested = stochastic_mask(num_steps, sde_window, stochastic_steps)
    requested &= noise_level > 0 and sampler not in DETERMINISTIC_SAMPLERS

    xs, logps, means, kls = [x], [], [], []
    stochastic = torch.zeros(num_steps, dtype=torch.bool)
    history, x0_hat = None, None
    for k in range(num_steps):
        out = adapter.predict(x, grid.timesteps[k], cond, guidance_scale)
        step = _transition(adapter, sampler, noise_level, bool(requested[k]), out, x, k, grid.sigmas,
                           grid.alpha_prod, grid.alpha_prod_prev, generator=generator,
                           log_prob_convention=log_prob_convention, history=history)
        stochastic[k] = not step.deterministic
        nan = torch.full((x.shape[0],), float("nan"), device=x.device)
        logps.append(step.log_prob(reduction=reduction) if stochastic[k] else nan)
        if record_reference_kl:
            kls.append(_reference_kl(adapter, sampler, noise_level, step, x, k, grid, cond, guidance_scale)
                       if stochastic[k] else nan)
        if record_means:
            means.append(step.mean)
        # x0_hat: flow_dpm2's history, and at the last step what decode="last_x0_hat" shows the reward
        if adapter.is_flow and (sampler == "flow_dpm2" or k == num_steps - 1):
            x0_hat = x - grid.sigmas[k] * out
            history = (x0_hat, grid.sigmas[k])
        x = step.prev_sample
        xs.append(x)
    return Trajectory(
        latents=torch.stack(xs, dim=1), timesteps=grid.timesteps, sigmas=grid.sigmas,
        log_probs=torch.stack(logps, dim=1), stochastic=stochastic, prompts=prompts, cond=cond,
        guidance_scale=float(guidance_scale), sampler=sampler, noise_level=noise_level, reduction=reduction,
        alpha_prod=grid.alpha_prod, alpha_prod_prev=grid.alpha_prod_prev,
        means=torch.stack(means, dim=1) if record_means else None, log_prob_convention=log_prob_convention,
        reference_kl=torch.stack(kls, dim=1) if record_reference_kl else None, last_x0_hat=x0_hat,
    )


def _reference_kl(adapter, sampler, noise_level, step: GaussianStep, x, k, grid, cond, guidance_scale) -> torch.Tensor:
    """KL(policy step || adapter-disabled step) from the same x_k -> [B] (exact, mean over elements)."""
    with lora.adapter_disabled(adapter):
        out_ref = adapter.predict(x, grid.timesteps[k], cond, guidance_scale)
    ref = _transition(adapter, sampler, noise_level, True, out_ref, x, k, grid.sigmas, grid.alpha_prod,
                      grid.alpha_prod_prev, prev_sample=step.prev_sample)
    return step.kl(ref)


def rescore(
    adapter: PipelineAdapter,
    traj: Trajectory,
    step_index: Union[int, torch.Tensor],
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
    with its own CFG). step_index: one step for all rows, or a LongTensor with one step per selected row (each
    sample its own step, DanceGRPO's random subsets); the steps of one call must be all stochastic or all not.
    """
    idx = slice(None) if index is None else index
    rows = idx if not isinstance(idx, (list, tuple)) else torch.tensor(idx, dtype=torch.long)
    per_row = isinstance(step_index, torch.Tensor) and step_index.dim() == 1
    k = step_index.long().cpu() if per_row else int(step_index)
    ks = k if per_row else torch.tensor([k])
    if ks.numel() and (ks.min() < 0 or ks.max() >= traj.num_steps):
        raise IndexError(f"step_index {ks.tolist()} out of range for a trajectory of {traj.num_steps} steps")
    stochastic = traj.stochastic[ks]
    if stochastic.numel() and not (stochastic.all() or not stochastic.any()):
        raise ValueError("per-row steps mix stochastic and deterministic steps; re-score them in separate calls")
    if traj.sampler == "flow_dpm2" and bool((ks > 0).any()):
        raise ValueError("a flow_dpm2 step depends on the previous step's prediction, which re-scoring does not "
                         "recompute: roll out with flow_ode (or a stochastic sampler) for algorithms that re-score")
    if per_row:
        selected = torch.arange(traj.batch_size)[rows.cpu() if isinstance(rows, torch.Tensor) else rows]
        if selected.shape != k.shape:
            raise ValueError(f"{k.numel()} per-row steps for {selected.numel()} selected rows")
        x, prev = traj.latents[selected, k], traj.latents[selected, k + 1]
        dev = traj.timesteps.device
        timestep, kk = traj.timesteps[k.to(dev)], k.to(dev)
    else:
        x, prev = traj.latents[rows, k], traj.latents[rows, k + 1]
        timestep, kk = traj.timesteps[k], k
    g = traj.guidance_scale if guidance_scale is None else guidance_scale
    if cond is None:
        cond = traj.cond if index is None else traj.cond.select(idx)
    out = adapter.predict(x, timestep, cond, g)
    is_stochastic = bool(stochastic.any())
    return _transition(adapter, traj.sampler, traj.noise_level, is_stochastic, out, x, kk, traj.sigmas,
                       traj.alpha_prod, traj.alpha_prod_prev, prev_sample=prev if is_stochastic else None,
                       log_prob_convention=traj.log_prob_convention)
