"""f-distill (docs/math.md §6): distribution-matching distillation of a pipeline into an S-step student, with the
generator's score difference weighted by h(r) of an f-divergence and r estimated by a discriminator.

Three parts share ONE denoiser (no copy of its weights):
- teacher: the pipeline itself (LoRA adapters disabled) with CFG ``distill.teacher_guidance_scale``;
- student G_theta: LoRA adapter ``student``, CFG-free, an S-step Euler ODE from noise on the pipeline's own
  S-step grid, differentiated through all S steps: ``x = G_theta(z, c)`` [B, C, h, w];
- fake score: LoRA adapter ``fake``, trained by denoising on the student's samples (DMD2):
  ``L_fake = mean |v_fake(x_t, t, c) - (eps - x)|^2`` with ``x_t = (1 - t) x + t eps``;
- discriminator D(x_t, t, c) -> logit [B] (or [B, K] with ``distill.disc_heads`` = K), trained with ``softplus(D(fake)) + softplus(-D(real))`` on noised
  student samples vs noised teacher samples (``distill.real_samples`` drawn once at the start with
  ``teacher_steps`` ODE steps), so D estimates log(p_teacher / q_student) at noise level t.

Generator step (``fdistill.generator_surrogate_loss``): ``x0_fake = x_t - t v_fake``, ``x0_teacher = x_t - t v_teacher``
(CFG applied to v, i.e. in x0 space at fixed x_t), ``r = discriminator_ratio(D(x_t))``, ``h = h_f(r) / mean h``,
``g = h (x0_fake - x0_teacher) / mean_d |x - x0_teacher|``, ``L = 1/2 |x - sg(x - g)|^2 + lambda_gan softplus(-D)``.
reverse_kl has h = 1 (DMD / VSD); forward_kl (h = r) up-weights samples where the teacher has more mass than the
student (mode covering), js (h = r / (r + 1)) sits between.

Choices (documented deviations from the paper's DMD2 set-up, which puts D on frozen teacher features):
- D is a small conv net on the noised LATENT (``LatentDiscriminator``) with t as an input channel and the prompt
  (mean of the denoiser's text tokens) as a projection term: independent of the denoiser's internals, works for
  every image family, and cheap (the teacher is not run with grad).
- Generator noise levels: one of the ``num_bins`` time bins is drawn per generator step and every sample's t is
  uniform inside it, so the per-bin normalisation of r is over the whole batch (with per-sample bins and a small
  batch most bins would hold a single sample, whose normalised r is exactly 1 for every divergence).
- The fake score and D step every iteration, the student every ``generator_every``-th (DMD2: 5).
"""

from __future__ import annotations

import json
import os
import time
import warnings
from typing import Optional, Sequence

import numpy as np
import torch
from torch import nn

from . import lora
from .algorithms.backprop import backprop_rollout
from .algorithms.divergences import get_divergence
from .algorithms.fdistill import discriminator_loss, generator_surrogate_loss
from .models.base import Conditioning, PipelineAdapter
from .prompts import PromptSource
from .rollout import rollout

STUDENT, FAKE = "student", "fake"  # LoRA adapter names on the shared denoiser


class LatentDiscriminator(nn.Module):
    """D(x_t, t, e) -> logits [B] (one head) or [B, K] (K heads) (projection discriminator on noised latents).

    ``phi_j = mean_{hw}`` of conv level j of ``convnet([x_t, t])`` [B, W], and head j is ``w_j . phi_j + <phi_j, P_j e>``
    with x_t [B, C, h, w], t [B] in [0, 1] (a constant input channel) and e [B, E] the prompt's mean text token.
    One head reads the last level; K heads read the last K levels (FastGen: one head per feature level).
    """

    def __init__(self, latent_channels: int, text_dim: int, width: int = 32, heads: int = 1):
        super().__init__()
        if not 1 <= heads <= 3:
            raise ValueError(f"heads must be 1, 2 or 3, got {heads}")
        self.levels = nn.ModuleList([
            nn.Sequential(nn.Conv2d(latent_channels + 1, width, 3, padding=1), nn.SiLU()),
            nn.Sequential(nn.Conv2d(width, width, 3, stride=2, padding=1), nn.SiLU()),
            nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.SiLU()),
        ])
        self.heads = heads
        self.out = nn.ModuleList([nn.Linear(width, 1) for _ in range(heads)])
        self.proj = nn.ModuleList([nn.Linear(text_dim, width, bias=False) for _ in range(heads)])

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        tt = t.float().view(-1, 1, 1, 1).expand(-1, 1, *x_t.shape[2:])
        h, features = torch.cat([x_t.float(), tt], 1), []
        for level in self.levels:
            h = level(h)
            features.append(h.mean((2, 3)))
        e = text.float()
        logits = [out(phi).squeeze(-1) + (phi * proj(e)).sum(-1)
                  for phi, out, proj in zip(features[-self.heads:], self.out, self.proj)]
        return logits[0] if self.heads == 1 else torch.stack(logits, dim=1)


def text_features(cond: Conditioning) -> torch.Tensor:
    """The prompt's mean text token [B, E] (``encoder_hidden_states`` of the conditional branch)."""
    if "encoder_hidden_states" not in cond.cond:
        raise ValueError(f"f-distill's discriminator reads encoder_hidden_states; this pipeline's conditioning has "
                         f"{sorted(cond.cond)}")
    return cond.cond["encoder_hidden_states"].float().mean(1)


def noised(x0: torch.Tensor, t: torch.Tensor,
           generator: Optional[torch.Generator]) -> tuple[torch.Tensor, torch.Tensor]:
    """``x_t = (1 - t) x0 + t eps`` and eps, x0 [B, ...], t [B]."""
    eps = torch.randn(x0.shape, generator=generator, dtype=torch.float32).to(x0.device)
    tb = t.view(-1, *([1] * (x0.dim() - 1)))
    return (1 - tb) * x0 + tb * eps, eps


def bin_times(batch: int, num_bins: int, t_range: tuple[float, float],
              generator: Optional[torch.Generator]) -> torch.Tensor:
    """[B] noise levels inside ONE time bin (drawn uniformly among the bins meeting t_range), uniform in it."""
    lo, hi = t_range
    bins = [k for k in range(num_bins) if (k + 1) / num_bins > lo and k / num_bins < hi]
    k = bins[int(torch.randint(len(bins), (1,), generator=generator))]
    a, b = max(lo, k / num_bins), min(hi, (k + 1) / num_bins)
    return a + (b - a) * torch.rand(batch, generator=generator)


def uniform_times(batch: int, t_range: tuple[float, float], generator: Optional[torch.Generator]) -> torch.Tensor:
    lo, hi = t_range
    return lo + (hi - lo) * torch.rand(batch, generator=generator)


@torch.no_grad()
def teacher_samples(adapter: PipelineAdapter, prompts: Sequence[str], steps: int, guidance_scale: float,
                    generator: torch.Generator, resolution: Optional[int] = None, batch_size: int = 64) -> torch.Tensor:
    """Teacher latents [M, ...] (LoRA disabled, ODE, CFG) for ``prompts`` (one row each, its own noise)."""
    out = []
    with lora.adapter_disabled(adapter):
        for i in range(0, len(prompts), batch_size):
            chunk = list(prompts[i : i + batch_size])
            out.append(rollout(adapter, chunk, num_steps=steps, guidance_scale=guidance_scale, sampler="flow_ode",
                               generator=generator, height=resolution, width=resolution).final)
    return torch.cat(out)


class FDistiller:
    """The f-distill loop state on one adapter: ``step() -> metrics``; see the module docstring.

    Args:
        cfg: the full Config (``distill``, ``train`` for prompts / batch / lr / seed, ``model`` for the LoRA rank,
            ``sampling.resolution``).
        adapter: a flow pipeline adapter WITHOUT LoRA (the adapters ``student`` and ``fake`` are added here).
        real: teacher latents to use as the discriminator's real data (with ``real_prompts``), e.g. shared
            between runs; default: ``distill.real_samples`` drawn at construction.
    """

    def __init__(self, cfg, adapter: PipelineAdapter, real: Optional[torch.Tensor] = None,
                 real_prompts: Optional[Sequence[str]] = None):
        if not adapter.is_flow or adapter.video:
            raise ValueError(f"f-distill needs an image flow pipeline (sd3, flux); got {adapter.family}")
        self.cfg, self.adapter = cfg, adapter
        d, t, m = cfg.distill, cfg.train, cfg.model
        self.divergence = get_divergence(d.divergence)
        torch.manual_seed(t.seed)
        self.generator = torch.Generator().manual_seed(t.seed)
        self.rng = np.random.default_rng(t.seed)
        self.prompts = PromptSource(t.prompts)
        with warnings.catch_warnings():  # peft warns about a second adapter on one model: intended here
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")
            self.fake_params = lora.add_lora(adapter, m.lora_rank, m.lora_alpha, adapter_name=FAKE)
            self.student_params = lora.add_lora(adapter, m.lora_rank, m.lora_alpha, adapter_name=STUDENT)
        lora.set_active_adapter(adapter, STUDENT)
        self.opt_student = torch.optim.AdamW(self.student_params, lr=t.lr, weight_decay=t.weight_decay)
        self.opt_fake = torch.optim.AdamW(self.fake_params, lr=d.fake_lr, weight_decay=0.0)
        if real is None:
            real_prompts = self.prompts.sample(d.real_samples, self.rng)
            real = teacher_samples(adapter, real_prompts, d.teacher_steps, d.teacher_guidance_scale,
                                   self.generator, cfg.sampling.resolution)
        if real_prompts is None or len(real_prompts) != len(real):
            raise ValueError("real teacher latents need one prompt per row (real_prompts)")
        self.real, self.real_prompts = real, list(real_prompts)
        e = text_features(adapter.encode_prompts(self.real_prompts[:1]))
        self.disc = LatentDiscriminator(real.shape[1], e.shape[-1], d.disc_channels, d.disc_heads).to(adapter.device)
        self.ratio_bins = torch.ones(d.num_bins)  # per-bin ratio means (FastGen's EMA state; used when ratio_ema > 0)
        self.opt_disc = torch.optim.AdamW(self.disc.parameters(), lr=d.disc_lr, weight_decay=0.0)
        grid = adapter.sampling_grid(d.student_steps, real[:1])
        self.timestep_scale = float(grid.timesteps[0] / grid.sigmas[0])  # scheduler units per unit of t (1000)
        self.iteration = 0
        self.generator_steps = 0
        self.last_generator: dict = {}

    # ---- pieces -------------------------------------------------------------------------------------
    def batch_prompts(self) -> list[str]:
        t = self.cfg.train
        return [p for p in self.prompts.sample(t.prompts_per_iter, self.rng) for _ in range(t.group_size)]

    def student_sample(self, prompts: Sequence[str], noise: Optional[torch.Tensor] = None,
                       grad: bool = False) -> torch.Tensor:
        """x = G_theta(z, c) [B, ...]: the student's S-step CFG-free ODE from noise z (drawn when None)."""
        s = self.cfg.sampling
        if noise is None:
            noise = self.adapter.prepare_latents(len(prompts), s.resolution, s.resolution, generator=self.generator)
        steps = self.cfg.distill.student_steps
        with lora.using_adapter(self.adapter, STUDENT), torch.set_grad_enabled(grad):
            return backprop_rollout(self.adapter, list(prompts), noise, num_steps=steps,
                                    grad_steps=steps if grad else 0, guidance_scale=1.0, compute_kl=False).final

    def _x0(self, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning, guidance: float,
            adapter_name: Optional[str]) -> torch.Tensor:
        """x0 prediction ``x_t - t v`` (no grad) of the teacher (adapter_name None: LoRA disabled) or an adapter."""
        if adapter_name is None:
            ctx = lora.adapter_disabled(self.adapter)
        else:
            ctx = lora.using_adapter(self.adapter, adapter_name)
        with torch.no_grad(), ctx:
            v = self.adapter.predict(x_t, t * self.timestep_scale, cond, guidance)
        return x_t - t.view(-1, *([1] * (x_t.dim() - 1))) * v

    def generator_step(self, x: torch.Tensor, prompts: Sequence[str]) -> dict:
        """One student step on samples x [B, ...] (with grad through G_theta); returns metrics."""
        d = self.cfg.distill
        t = bin_times(x.shape[0], d.num_bins, d.t_range, self.generator).to(x.device)
        x_t, _ = noised(x, t, self.generator)
        cond = self.adapter.encode_prompts(list(prompts), d.teacher_guidance_scale)
        plain = Conditioning(cond.prompts, cond.cond, None)
        x0_fake = self._x0(x_t.detach(), t, plain, 1.0, FAKE)
        x0_teacher = self._x0(x_t.detach(), t, cond, d.teacher_guidance_scale, None)
        d_fake = self.disc(x_t, t, text_features(cond))
        out = generator_surrogate_loss(x, x0_fake, x0_teacher, d_fake, t, self.divergence, lambda_gan=d.lambda_gan,
                                       num_bins=d.num_bins, bin_range=d.ratio_bin_range,
                                       bin_means=self.ratio_bins if d.ratio_ema > 0 else None, ema_rate=d.ratio_ema)
        self.opt_student.zero_grad(set_to_none=True)
        out.loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(self.student_params, self.cfg.train.grad_clip)
        self.opt_student.step()
        self.generator_steps += 1
        w = out.weights
        self.last_generator = {"t": t.detach(), "weights": w}  # [B] each, for inspection
        return {"loss_gen": float(out.loss.detach()), "distill": float(out.distill), "gan": float(out.gan),
                "h_min": float(w.min()), "h_max": float(w.max()), "h_std": float(w.std()) if w.numel() > 1 else 0.0,
                "t_gen": float(t.mean()), "grad_norm_gen": float(norm)}

    def fake_step(self, x: torch.Tensor, prompts: Sequence[str]) -> dict:
        """Denoising (flow matching) step of the fake score on the student's samples x (detached)."""
        x = x.detach()
        t = uniform_times(x.shape[0], self.cfg.distill.t_range, self.generator).to(x.device)
        x_t, eps = noised(x, t, self.generator)
        cond = self.adapter.encode_prompts(list(prompts), 1.0)
        with lora.using_adapter(self.adapter, FAKE):
            v = self.adapter.predict(x_t, t * self.timestep_scale, cond, 1.0)
        loss = ((v - (eps - x)) ** 2).mean()
        self.opt_fake.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.fake_params, self.cfg.train.grad_clip)
        self.opt_fake.step()
        return {"loss_fake": float(loss.detach())}

    def disc_step(self, x: torch.Tensor, prompts: Sequence[str]) -> dict:
        """Discriminator step: noised student samples x (fake) vs noised teacher samples (real), same t draws."""
        x = x.detach()
        b = x.shape[0]
        idx = torch.randint(len(self.real), (b,), generator=self.generator)
        real = self.real[idx].to(x.device)
        t = uniform_times(b, self.cfg.distill.t_range, self.generator).to(x.device)
        xf, _ = noised(x, t, self.generator)
        xr, _ = noised(real, t, self.generator)
        ef = text_features(self.adapter.encode_prompts(list(prompts)))
        er = text_features(self.adapter.encode_prompts([self.real_prompts[int(i)] for i in idx]))
        d_fake, d_real = self.disc(xf, t, ef), self.disc(xr, t, er)
        loss = discriminator_loss(d_fake, d_real)
        self.opt_disc.zero_grad(set_to_none=True)
        loss.backward()
        self.opt_disc.step()
        return {"loss_disc": float(loss.detach()), "d_real": float(d_real.detach().mean()),
                "d_fake": float(d_fake.detach().mean())}

    def step(self) -> dict:
        """One iteration: student samples; a generator step every ``generator_every``-th iteration (the last of
        each block, so the fake score and D have trained first); then the fake-score and discriminator steps."""
        self.iteration += 1
        prompts = self.batch_prompts()
        train_gen = self.iteration % self.cfg.distill.generator_every == 0
        x = self.student_sample(prompts, grad=train_gen)
        metrics = {"iteration": self.iteration}
        if train_gen:
            metrics.update(self.generator_step(x, prompts))
        metrics.update(self.fake_step(x, prompts))
        metrics.update(self.disc_step(x, prompts))
        metrics["generator_steps"] = self.generator_steps
        return metrics


def run_distill(cfg, adapter: Optional[PipelineAdapter] = None, real: Optional[torch.Tensor] = None,
                real_prompts: Optional[Sequence[str]] = None, progress: bool = True) -> dict:
    """Distil with ``cfg`` for ``train.iterations`` iterations into ``train.out_dir``: ``config.yaml``,
    ``metrics.jsonl``, ``lora/`` (the student, diffusers format: ``pipe.load_lora_weights`` then sample with
    ``num_inference_steps=S, guidance_scale=1``) and ``samples.png`` (teacher vs student on fixed seeds).
    Returns a summary dict with the distiller (``distiller``) for further evaluation."""
    import yaml
    from tqdm import tqdm

    from .config import config_to_dict
    from .evaluation.sampling import sample_images
    from .runtime.kernels import avoid_cudnn_attention
    from .models import load_adapter
    from .evaluation.report import image_grid

    out = cfg.train.out_dir
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "config.yaml"), "w") as f:
        yaml.safe_dump(config_to_dict(cfg), f, sort_keys=False)
    t0 = time.time()
    if adapter is None:
        device = cfg.model.device or ("cuda" if torch.cuda.is_available() else None)
        adapter = load_adapter(cfg.model.path, family=cfg.model.family, device=device, **cfg.model.adapter_kwargs())
    avoid_cudnn_attention(adapter.device)  # training backward (flowalign.runtime.kernels)
    dist = FDistiller(cfg, adapter, real, real_prompts)
    t_real = time.time() - t0
    history = []
    with open(os.path.join(out, "metrics.jsonl"), "w") as f:
        for _ in tqdm(range(cfg.train.iterations), desc=f"f-distill {cfg.distill.divergence}", disable=not progress):
            m = dist.step()
            m["time"] = time.time() - t0
            history.append(m)
            f.write(json.dumps(m) + "\n")
    lora_dir = lora.save_lora(adapter, os.path.join(out, "lora"), adapter_name=STUDENT)
    prompts = dist.real_prompts[:8]
    d = cfg.distill
    with lora.adapter_disabled(adapter):
        teacher = sample_images(adapter.pipe, prompts, 0, d.teacher_steps, d.teacher_guidance_scale, desc="teacher")
    with lora.using_adapter(adapter, STUDENT):
        student = sample_images(adapter.pipe, prompts, 0, d.student_steps, 1.0, desc="student")
    grid = os.path.join(out, "samples.png")
    labels = [f"teacher {d.teacher_steps} steps", f"student {d.student_steps} steps"]
    image_grid([teacher, student], labels, prompts, grid)
    return {"iterations": dist.iteration, "generator_steps": dist.generator_steps, "lora": lora_dir,
            "metrics": os.path.join(out, "metrics.jsonl"), "samples": grid, "wall_s": time.time() - t0,
            "time_real_samples": t_real, "final": history[-1] if history else {}, "distiller": dist}


def mean_pairwise_distance(images: torch.Tensor) -> float:
    """Diversity of samples of ONE prompt: mean over pairs i < j of the RMS pixel distance
    ``sqrt(mean_d (x_i - x_j)^2)``, images [M, 3, H, W] in [0, 1] (M >= 2)."""
    flat = images.float().flatten(1)
    m = flat.shape[0]
    if m < 2:
        raise ValueError("diversity needs at least 2 samples per prompt")
    d2 = torch.cdist(flat, flat).pow(2) / flat.shape[1]
    iu = torch.triu_indices(m, m, 1)
    return float(d2[iu[0], iu[1]].clamp_min(0).sqrt().mean())


__all__ = ["FDistiller", "LatentDiscriminator", "bin_times", "mean_pairwise_distance", "run_distill",
           "teacher_samples", "text_features"]
