"""The doctor's other checks, each -> a :class:`~flowalign.doctor.verdict.Check`:

* ``reference``: the adapter-disabled model (every KL anchor's reference) predicts exactly what the base
  pipeline predicted before the LoRA was added, while a perturbed LoRA does change the prediction;
* ``gradients``: one backward through the denoiser reaches the LoRA, finite (lora_B non-zero; lora_A is zero
  at init because B = 0);
* ``kl_scaling``: the per-step KL convention in use (exact, or the Flow-GRPO code's x Delta) and what a unit mean
  shift costs per step, ``KL = |dmu|^2 / (2 s_k^2)`` (x Delta_k under the reference scaling);
* ``reward``: the same images scored twice give the same scores (GRPO's group advantages would carry the
  noise), no NaN, and the throughput;
* ``grid``: the rollout's sigma / timestep grid equals the one the pipeline's own ``__call__`` steps through.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from .. import lora
from ..models import pipeline_call_kwargs
from ..rollout import Trajectory, rescore, sampling_grid
from .verdict import Check


@dataclass
class Probe:
    """A few denoiser inputs: x [P, ...] at timesteps [P], their Conditioning, the CFG scale; and the base
    pipeline's prediction on them, taken before the LoRA exists."""

    x: torch.Tensor
    timesteps: torch.Tensor
    cond: object
    guidance_scale: float
    base_out: Optional[torch.Tensor] = None

    def predict(self, adapter) -> torch.Tensor:
        return adapter.predict(self.x, self.timesteps, self.cond, self.guidance_scale)


def make_probe(adapter, cfg, prompts: Sequence[str], seed: int = 0) -> Probe:
    """Two rows at the first and the middle step of the configured grid, predicted by the base pipeline now."""
    s = cfg.sampling
    prompts = list(prompts[:1]) * 2
    gen = torch.Generator().manual_seed(seed)
    x = adapter.prepare_latents(2, s.resolution, s.resolution, s.num_frames, generator=gen)
    grid = sampling_grid(adapter, s.num_steps, x, s.grid, s.grid_shift, s.integer_timesteps)
    t = torch.stack([grid.timesteps[0], grid.timesteps[s.num_steps // 2]])
    cond = adapter.encode_prompts(prompts, s.guidance_scale)
    probe = Probe(x, t, cond, s.guidance_scale)
    with torch.no_grad():
        probe.base_out = probe.predict(adapter)
    return probe


def _perturbed(params: Sequence[torch.nn.Parameter], scale: float, seed: int):
    """Context: every LoRA tensor plus N(0, scale^2) noise, restored after."""
    from contextlib import contextmanager

    @contextmanager
    def ctx():
        saved = [p.detach().clone() for p in params]
        gen = torch.Generator().manual_seed(seed)
        try:
            with torch.no_grad():
                for p in params:
                    p.add_(torch.randn(p.shape, generator=gen).to(p) * scale)
            yield
        finally:
            with torch.no_grad():
                for p, v in zip(params, saved):
                    p.copy_(v)

    return ctx()


@torch.no_grad()
def check_reference(adapter, params, probe: Probe, scale: float = 0.05) -> Check:
    """Reference (adapter disabled) == base prediction, with the LoRA perturbed so that the live policy differs."""
    with _perturbed(params, scale, seed=1):
        with lora.adapter_disabled(adapter):
            ref = probe.predict(adapter)
        live = probe.predict(adapter)
    ref_err = float((ref - probe.base_out).abs().max())
    live_diff = float((live - probe.base_out).abs().max())
    data = {"reference_vs_base_max_abs": ref_err, "perturbed_lora_vs_base_max_abs": live_diff,
            "perturbation_std": scale}
    if ref_err > 0:
        return Check("reference", "fail",
                     f"the adapter-disabled model is not the base pipeline: predictions differ by {ref_err:.2e} "
                     "(max abs)", "a LoRA merged into the base weights, or an adapter that disabling does not remove: "
                     "load the base pipeline without fused LoRAs", data)
    if live_diff == 0:
        return Check("reference", "fail", "a perturbed LoRA leaves the prediction unchanged: the adapter is not "
                     "in the forward pass", "check model.lora_target_modules against the denoiser's module names",
                     data)
    return Check("reference", "ok", f"adapter-disabled prediction equals the base pipeline's exactly; a perturbed "
                 f"LoRA moves it by {live_diff:.2e}", data=data)


def check_gradients(adapter, params, probe: Probe, seed: int = 2) -> Check:
    """One backward of ``<prediction, random direction>``: per LoRA tensor finite and non-zero."""
    for p in params:
        p.grad = None
    direction = torch.randn(probe.base_out.shape, generator=torch.Generator().manual_seed(seed))
    out = probe.predict(adapter)
    (out * direction.to(out)).mean().backward()
    named = [(n, p) for den in adapter.denoisers for n, p in den.named_parameters() if p.requires_grad and "lora_" in n]
    kinds = {"lora_A": [0, 0], "lora_B": [0, 0]}
    finite, total_sq, dead = True, 0.0, []
    for n, p in named:
        kind = "lora_A" if "lora_A" in n else "lora_B"
        g = p.grad
        kinds[kind][1] += 1
        if g is not None:
            finite &= bool(torch.isfinite(g).all())
            total_sq += float(g.float().pow(2).sum())
        if g is not None and bool((g != 0).any()):
            kinds[kind][0] += 1
        elif kind == "lora_B":
            dead.append(n.split(".lora_B")[0])
    for p in params:
        p.grad = None
    nonzero_b, n_b = kinds["lora_B"]
    data = {"tensors": len(named), "nonzero_lora_A": kinds["lora_A"][0], "nonzero_lora_B": nonzero_b,
            "lora_B": n_b, "grad_norm": math.sqrt(total_sq), "finite": finite, "no_gradient": dead}
    if not named:
        return Check("gradients", "fail", "no trainable LoRA parameter", "the LoRA was not added or is frozen", data)
    if not finite:
        return Check("gradients", "fail", "a LoRA gradient is NaN/inf after one backward",
                     "run model.dtype=float32 to see whether the half-precision forward overflows", data)
    if nonzero_b == 0:
        return Check("gradients", "fail", "every LoRA gradient is zero", "the prediction does not depend on the "
                     "LoRA: check model.lora_target_modules", data)
    msg = (f"finite; {nonzero_b}/{n_b} lora_B tensors get a gradient (norm {data['grad_norm']:.2e}; lora_A is "
           "zero at init, B = 0)")
    if not dead:
        return Check("gradients", "ok", msg, data=data)
    # a module whose output never reaches the prediction (SD3's last block computes a context query that its
    # context_pre_only attention discards): its LoRA cannot train, the rest is unaffected
    shown = ", ".join(dead[:3]) + (f" and {len(dead) - 3} more" if len(dead) > 3 else "")
    status = "info" if 2 * len(dead) <= n_b else "warn"
    return Check("gradients", status, msg + f"; no gradient reaches {shown} (its output is not used downstream)",
                 "" if status == "info" else "most targeted modules are not in the forward pass: check "
                 "model.lora_target_modules", data)


@torch.no_grad()
def check_kl_scaling(adapter, cfg, traj: Trajectory) -> Check:
    """Per stochastic step: the step std s_k, Delta_k, and the KL of a unit mean shift per element under each
    convention: exact ``1 / (2 s_k^2)``, reference ``Delta_k / (2 s_k^2)`` (flow SDE; = exact elsewhere)."""
    g = cfg.grpo
    steps = traj.stochastic_steps
    rows = []
    for k in steps:
        step = rescore(adapter, traj, k, index=[0])
        s = float(step.std.reshape(-1)[0])
        factor = 1.0 if step.reference_kl_factor is None else float(step.reference_kl_factor.reshape(-1)[0])
        rows.append({"step": k, "std": s, "reference_factor": factor, "kl_per_unit_shift_exact": 1 / (2 * s * s),
                     "kl_per_unit_shift_reference": factor / (2 * s * s)})
    data = {"scaling": g.kl_scaling, "beta": g.beta, "algorithm": cfg.train.algorithm, "steps": rows}
    if cfg.train.algorithm != "grpo":
        return Check("kl_scaling", "info", f"{cfg.train.algorithm} anchors to the reference in its own units "
                     "(docs/algorithms); the per-step Gaussian KL scaling is GRPO's option", data=data)
    if not rows:
        return Check("kl_scaling", "info", "no stochastic step: no Gaussian KL", data=data)
    factors = [r["reference_factor"] for r in rows]
    spread = f"{min(factors):.3g}..{max(factors):.3g}" if min(factors) != max(factors) else f"{factors[0]:.3g}"
    msg = (f"grpo.kl_scaling={g.kl_scaling}, beta={g.beta}: reference/exact = {spread} per step; a mean shift of "
           f"1e-3 per element costs KL {1e-6 * rows[0]['kl_per_unit_shift_exact']:.2e} (exact) at step "
           f"{rows[0]['step']}")
    if g.beta == 0:
        return Check("kl_scaling", "info", msg + "; the KL term is off (beta = 0)", data=data)
    if g.kl_scaling == "exact" and max(factors) < 1 and math.isclose(g.beta, 0.04):
        return Check("kl_scaling", "warn", msg, "beta=0.04 is Flow-GRPO's value for its x Delta KL: under the exact "
                     f"scaling the penalty is {1 / max(factors):.3g}x or more larger; set grpo.kl_scaling=reference "
                     "to reproduce the published runs", data)
    return Check("kl_scaling", "ok", msg, data=data)


def check_reward(reward, images: torch.Tensor, prompts: Sequence[str], repeats: int = 2) -> Check:
    """Score the same images ``repeats`` times: equal, finite, and the images per second."""
    if reward is None:
        return Check("reward", "info", "the run has no reward (e.g. OPD without task rewards)")
    scores, seconds = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        scores.append(torch.as_tensor(reward(images, list(prompts))).float())
        seconds.append(time.perf_counter() - t0)
    first = scores[0]
    spread = max(float((s - first).abs().nan_to_num(float("inf")).max()) for s in scores[1:]) if repeats > 1 else 0.0
    bad = int((~torch.isfinite(first)).sum())
    per_s = len(prompts) / max(min(seconds), 1e-9)
    data = {"reward": getattr(reward, "name", type(reward).__name__), "n": len(prompts), "max_abs_diff": spread,
            "non_finite": bad, "images_per_s": per_s, "mean": float(first[torch.isfinite(first)].mean())
            if bad < len(first) else None, "seconds": seconds}
    if bad:
        return Check("reward", "fail", f"{bad} of {len(prompts)} scores are NaN/inf", "fix the reward (its "
                     "rows are left out of the advantages and counted in invalid_rewards)", data)
    if spread > 0:
        return Check("reward", "fail", f"{data['reward']} gives different scores for the same images (max diff "
                     f"{spread:.3g})", "make it deterministic (eval mode, no dropout, fixed sampling in a remote "
                     "scorer): GRPO's group advantages would learn its noise", data)
    return Check("reward", "ok", f"{data['reward']} is deterministic on the same images; {per_s:.1f} images/s, "
                 f"mean {data['mean']:.3f} over {len(prompts)}", data=data)


@torch.no_grad()
def pipeline_grid(pipe, num_steps: int, guidance_scale: float, prompt: str, resolution=None, num_frames=None):
    """The timesteps the pipeline's own ``__call__`` steps through (a callback records them; latents only, no
    decode) and its scheduler's sigmas after the call -> (timesteps [N], sigmas or None)."""
    import inspect

    seen = []

    def record(p, i, t, kwargs):
        seen.append(float(t))
        return {}

    kw = dict(pipeline_call_kwargs(pipe))
    params = inspect.signature(pipe.__call__).parameters
    if resolution:
        kw.update(height=resolution, width=resolution)
    if num_frames and "num_frames" in params:
        kw["num_frames"] = num_frames
    previous = dict(getattr(pipe, "_progress_bar_config", {}))
    pipe.set_progress_bar_config(disable=True)
    try:
        pipe(prompt=[prompt], num_inference_steps=num_steps, guidance_scale=guidance_scale, output_type="latent",
             generator=torch.Generator().manual_seed(0), callback_on_step_end=record, **kw)
    finally:
        pipe._progress_bar_config = previous
    sigmas = getattr(pipe.scheduler, "sigmas", None)
    return torch.tensor(seen), (None if sigmas is None else torch.as_tensor(sigmas).float().cpu())


def check_grid(adapter, cfg, prompt: str) -> Check:
    """Configured rollout grid vs the pipeline's own (timesteps; flow sigmas too)."""
    s = cfg.sampling
    x = adapter.prepare_latents(1, s.resolution, s.resolution, s.num_frames,
                                generator=torch.Generator().manual_seed(0))
    ours = sampling_grid(adapter, s.num_steps, x, s.grid, s.grid_shift, s.integer_timesteps)
    theirs_t, theirs_sigma = pipeline_grid(adapter.pipe, s.num_steps, s.guidance_scale, prompt, s.resolution,
                                           s.num_frames)
    data = {"grid": s.grid, "integer_timesteps": s.integer_timesteps, "rollout_timesteps": ours.timesteps.tolist(),
            "pipeline_timesteps": theirs_t.tolist(), "scheduler": type(adapter.pipe.scheduler).__name__}
    if theirs_t.shape != ours.timesteps.shape:
        return Check("grid", "warn", f"the pipeline stepped {theirs_t.numel()} times for num_inference_steps="
                     f"{s.num_steps}, the rollout {ours.num_steps}", "compare the scheduler config with sampling.grid",
                     data)
    dt = float((theirs_t - ours.timesteps.cpu()).abs().max())
    dsig = None
    if adapter.is_flow and theirs_sigma is not None and theirs_sigma.numel() >= ours.sigmas.numel():
        dsig = float((theirs_sigma[: ours.sigmas.numel()] - ours.sigmas.cpu()).abs().max())
    data.update(max_abs_timestep_diff=dt, max_abs_sigma_diff=dsig)
    by_design = s.grid != "pipeline" or s.integer_timesteps
    sig_text = "" if dsig is None else f", sigmas {dsig:.2e}"
    if dt <= 1e-3 and (dsig is None or dsig <= 1e-6):
        return Check("grid", "ok", f"the rollout steps the pipeline's own {data['scheduler']} grid ({s.num_steps} "
                     f"steps; max diff timesteps {dt:.2e}{sig_text})", data=data)
    if by_design:
        return Check("grid", "info", f"sampling.grid={s.grid}, integer_timesteps={s.integer_timesteps}: the rollout "
                     f"grid differs from the pipeline's by design (timesteps up to {dt:.3g}{sig_text}); held-out "
                     "evaluation and `flowalign sample` use the pipeline's", data=data)
    return Check("grid", "warn" if adapter.is_flow else "info",
                 f"the rollout grid differs from the pipeline's {data['scheduler']} (timesteps up to {dt:.3g}"
                 f"{sig_text})", "" if not adapter.is_flow else "the adapter's sampling_grid does not follow the "
                 "scheduler config (shift, dynamic shifting): report it with the model id", data)
