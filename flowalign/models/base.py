"""The pipeline adapter interface: encode prompts, predict with CFG, decode, and the sampling grid.

An adapter wraps a user's diffusers pipeline (no copy of its weights) and exposes what the rollout
and the losses need, with nothing algorithmic:

- ``encode_prompts(prompts, guidance_scale) -> Conditioning`` (cached per unique prompt)
- ``predict(x, timestep, cond, guidance_scale) -> float32`` with CFG ``out = out_null + g (out_c - out_null)``
  (flow families: velocity ``v ~ eps - x0``; SD/SDXL: epsilon or v per ``prediction_type``)
- ``decode(latents) -> images [B, 3, H, W]`` in [0, 1] (video: ``[B, F, 3, H, W]``)
- ``prepare_latents(batch_size, ...) -> float32 noise`` drawn exactly as the pipeline draws it
- ``sampling_grid(num_steps, latents) -> SamplingGrid`` built by the pipeline's own scheduler

CFG follows diffusers: guidance is applied only when ``guidance_scale > 1``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch

GeneratorLike = Union[torch.Generator, Sequence[torch.Generator], None]


@dataclass
class Conditioning:
    """Encoded prompts of a batch.

    cond / uncond: denoiser keyword tensors, each ``[B, ...]`` (e.g. ``encoder_hidden_states`` [B, L, D],
    ``pooled_projections`` [B, P]); uncond is None when no CFG was requested at encoding time.
    """

    prompts: list[str]
    cond: dict[str, torch.Tensor]
    uncond: Optional[dict[str, torch.Tensor]] = None

    def __len__(self) -> int:
        return len(self.prompts)

    def select(self, index: Union[torch.Tensor, Sequence[int], slice]) -> "Conditioning":
        """Rows ``index`` of the batch (for micro-batches)."""
        if isinstance(index, slice):
            rows = list(range(len(self.prompts)))[index]
        else:
            rows = [int(i) for i in (index.tolist() if isinstance(index, torch.Tensor) else index)]
        idx = torch.tensor(rows, dtype=torch.long)
        pick = lambda d: None if d is None else {k: v[idx.to(v.device)] for k, v in d.items()}  # noqa: E731
        return Conditioning([self.prompts[i] for i in rows], pick(self.cond), pick(self.uncond))


@dataclass
class SamplingGrid:
    """The discretisation a pipeline's scheduler builds for ``num_steps`` steps.

    timesteps: [N] float32, the value the denoiser receives at step k (scheduler units, e.g. sigma * 1000).
    sigmas: [N + 1] float32; flow: ``1 >= sigma_0 > ... > sigma_N = 0``; DDIM: ``sqrt(1 - abar)`` per point.
    alpha_prod, alpha_prod_prev: [N] float32, DDIM only: abar at t_k and at the previous (less noisy)
        timestep ``t_k - T // N`` (``final_alpha_cumprod`` past 0), exactly as ``DDIMScheduler.step``.
    """

    timesteps: torch.Tensor
    sigmas: torch.Tensor
    alpha_prod: Optional[torch.Tensor] = None
    alpha_prod_prev: Optional[torch.Tensor] = None

    @property
    def num_steps(self) -> int:
        return int(self.timesteps.shape[0])


_T5_TOKENIZERS = ("tokenizer_3", "tokenizer_2", "tokenizer")  # SD3, FLUX, Wan hold their T5 under these


def t5_sequence_length(pipe, default: int) -> int:
    """The T5/UMT5 token length to encode prompts with: ``min(default, tokenizer.model_max_length)``.

    Pipelines pad T5 prompts to ``max_sequence_length`` (SD3 __call__: 256); tokens past the tokenizer's own
    limit carry nothing but padding, cost attention compute and, for a model trained with shorter prompts
    (the shipped toy pipeline: 16), feed it inputs it never saw. Non-T5 pipelines get ``default``.
    """
    for name in _T5_TOKENIZERS:
        tok = getattr(pipe, name, None)
        if tok is not None and "T5" in type(tok).__name__:
            limit = getattr(tok, "model_max_length", default)
            return int(min(default, limit)) if limit and limit < 1_000_000 else default
    return default


def pipeline_call_kwargs(pipe, default: int = 256) -> dict:
    """Extra ``pipe(...)`` kwargs so direct pipeline calls encode prompts as the adapters do."""
    import inspect

    if "max_sequence_length" in inspect.signature(pipe.__call__).parameters:
        return {"max_sequence_length": t5_sequence_length(pipe, default)}
    return {}


class PipelineAdapter:
    """Base class: one subclass per pipeline family (``sd3``, ``flux``, ``sd``, ``sdxl``, ``wan``).

    Args:
        pipe: the diffusers pipeline (used in place; its weights are not copied).
        negative_prompt: text of the unconditional branch for CFG (default "").
        max_sequence_length: T5/UMT5 token length for families that use it; capped at the T5 tokenizer's
            ``model_max_length`` (see :func:`t5_sequence_length`).
    """

    family: str = ""
    pipeline_class: str = ""
    # peft matches a name against the END of module paths (".to_q" matches "transformer_blocks.0.attn.to_q")
    lora_target_modules: tuple = ()  # the default LoRA targets (model.lora_target_modules overrides)
    fsdp_blocks: tuple = ()  # attributes of the denoiser holding its block lists: one FSDP unit per block
    is_flow: bool = True  # velocity prediction on a sigma grid; False = DDIM (eps / v)
    denoiser_name: str = "transformer"  # attribute of the pipeline holding the network LoRA is put on
    default_sampler: str = "flow_sde"
    video: bool = False
    # CFG's two branches in ONE denoiser call on [2B] rows (diffusers' way); False: two calls on [B] rows each.
    # Kernels may differ with the batch size, so rollout and re-scoring must agree on it (flowalign doctor)
    cfg_batched: bool = True

    def __init__(self, pipe, negative_prompt: str = "", max_sequence_length: int = 512):
        if type(pipe).__name__ != self.pipeline_class and not any(
            c.__name__ == self.pipeline_class for c in type(pipe).__mro__
        ):
            raise TypeError(f"{type(self).__name__} wraps a {self.pipeline_class}, got {type(pipe).__name__}; "
                            "use flowalign.models.adapter_for(pipe) to pick the right adapter")
        self.pipe = pipe
        self.negative_prompt = negative_prompt
        self.max_sequence_length = t5_sequence_length(pipe, max_sequence_length)
        self._cache: dict[str, dict[str, torch.Tensor]] = {}

    # ---- properties -------------------------------------------------------------------------
    @property
    def denoiser(self) -> torch.nn.Module:
        return getattr(self.pipe, self.denoiser_name)

    @property
    def device(self) -> torch.device:
        return next(self.denoiser.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the denoiser's base weights (LoRA weights may be float32)."""
        return self.denoiser.dtype

    @property
    def prediction_type(self) -> str:
        return "flow" if self.is_flow else self.pipe.scheduler.config.get("prediction_type", "epsilon")

    # ---- prompts ------------------------------------------------------------------------------
    def _encode(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Encode a list of prompts -> denoiser kwargs, tensors [len(prompts), ...]. Per family."""
        raise NotImplementedError

    def _encode_negative(self, n: int) -> dict[str, torch.Tensor]:
        """Unconditional embeddings for n rows (default: the encoded ``negative_prompt``)."""
        return self._stack([self.negative_prompt] * n)

    def _uses_uncond(self, guidance_scale: float) -> bool:
        """Whether CFG at this (user-facing) guidance scale needs the unconditional branch (diffusers: g > 1)."""
        return guidance_scale > 1.0

    def _stack(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        # each new prompt is encoded on its own: a text encoder's output for one row depends (in the last bits)
        # on the other rows of its batch, so batching new prompts would make an embedding, and every weight trained
        # on it, depend on the run's history (a resumed run would drift from an uninterrupted one by ~1e-7)
        for p in dict.fromkeys(prompts):
            if p not in self._cache:
                with torch.no_grad():
                    self._cache[p] = {k: v[:1].detach() for k, v in self._encode([p]).items()}
        keys = self._cache[prompts[0]].keys()
        return {k: torch.cat([self._cache[p][k] for p in prompts]) for k in keys}

    def encode_prompts(self, prompts: Union[str, Sequence[str]], guidance_scale: float = 1.0) -> Conditioning:
        """Encode prompts (each unique prompt once, then cached) -> Conditioning with cond [B, ...] and,
        when ``guidance_scale`` needs CFG, the unconditional embeddings."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            raise ValueError("encode_prompts needs at least one prompt")
        cond = self._stack(prompts)
        uncond = self._encode_negative(len(prompts)) if self._uses_uncond(guidance_scale) else None
        return Conditioning(prompts, cond, uncond)

    def clear_cache(self) -> None:
        self._cache.clear()

    # ---- prediction ---------------------------------------------------------------------------
    def _forward(self, x: torch.Tensor, timestep: torch.Tensor, emb: dict, guidance_scale: float) -> torch.Tensor:
        """One denoiser call on x [B, ...] at timestep [B] with embeddings emb -> output [B, ...]. Per family."""
        raise NotImplementedError

    def _cfg_scale(self, guidance_scale: float) -> float:
        """The scale used to combine cond and uncond outputs (FLUX: its true-CFG scale)."""
        return guidance_scale

    def predict(self, x: torch.Tensor, timestep, cond: Conditioning, guidance_scale: float = 1.0) -> torch.Tensor:
        """Network output with CFG, float32, shape of x.

        ``out = out(null) + g (out(c) - out(null))`` when CFG is active (one batched call on [2B], or two on [B]
        with ``cfg_batched = False``), else ``out(c)``. timestep: scheduler units (``SamplingGrid.timesteps[k]``), a float or [B].
        x is cast to the denoiser's dtype before the call.
        """
        b = x.shape[0]
        t = torch.as_tensor(timestep, device=x.device)
        t = (t.expand(b) if t.dim() == 0 else t).to(x.device)
        g = self._cfg_scale(guidance_scale)
        if self._uses_uncond(guidance_scale):
            if cond.uncond is None:
                raise ValueError(f"guidance_scale {g} needs unconditional embeddings: call "
                                 f"encode_prompts(prompts, guidance_scale={g})")
            if self.cfg_batched:
                emb = {k: torch.cat([cond.uncond[k], cond.cond[k]]) for k in cond.cond}
                out = self._forward(torch.cat([x, x]), torch.cat([t, t]), emb, guidance_scale).float()
                out_null, out_c = out.chunk(2)
            else:
                out_null = self._forward(x, t, cond.uncond, guidance_scale).float()
                out_c = self._forward(x, t, cond.cond, guidance_scale).float()
            return out_null + g * (out_c - out_null)
        return self._forward(x, t, cond.cond, guidance_scale).float()

    # ---- latents, grid, decoding --------------------------------------------------------------
    def latent_shape(self, batch_size: int, height: Optional[int], width: Optional[int],
                     num_frames: Optional[int] = None) -> tuple[int, ...]:
        raise NotImplementedError

    def prepare_latents(self, batch_size: int, height: Optional[int] = None, width: Optional[int] = None,
                        num_frames: Optional[int] = None, generator: GeneratorLike = None) -> torch.Tensor:
        """Initial noise x_0 [B, ...] float32, drawn with diffusers' ``randn_tensor`` as the pipeline does
        (same generator -> same noise as ``pipe(...)``)."""
        from diffusers.utils.torch_utils import randn_tensor

        shape = self.latent_shape(batch_size, height, width, num_frames)
        dtype = self._noise_dtype()
        return randn_tensor(shape, generator=generator, device=self.device, dtype=dtype).float()

    def _noise_dtype(self) -> torch.dtype:
        return self.dtype

    def _scheduler_copy(self):
        return copy.deepcopy(self.pipe.scheduler)

    def sampling_grid(self, num_steps: int, latents: torch.Tensor) -> SamplingGrid:
        raise NotImplementedError

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> float images [B, 3, H, W] in [0, 1] (differentiable)."""
        raise NotImplementedError

    def _vae_decode(self, z: torch.Tensor) -> torch.Tensor:
        vae = self.pipe.vae
        img = vae.decode(z.to(vae.dtype), return_dict=False)[0]
        return (img.float() / 2 + 0.5).clamp(0, 1)


class FlowAdapter(PipelineAdapter):
    """Rectified-flow families: sigma grid from a FlowMatchEulerDiscreteScheduler-like scheduler."""

    def _shift_mu(self, latents: torch.Tensor) -> Optional[float]:
        """``mu`` for dynamic shifting (None when the scheduler does not use it)."""
        return None

    def _grid_sigmas(self, num_steps: int):
        """Explicit input sigmas passed to ``set_timesteps`` (None: the scheduler's default)."""
        return None

    def sampling_grid(self, num_steps: int, latents: torch.Tensor) -> SamplingGrid:
        sched = self._scheduler_copy()
        kw = {}
        mu = self._shift_mu(latents)
        if mu is not None:
            kw["mu"] = mu
        sig = self._grid_sigmas(num_steps)
        if sig is not None:
            kw["sigmas"] = sig
            sched.set_timesteps(device=latents.device, **kw)
        else:
            sched.set_timesteps(num_steps, device=latents.device, **kw)
        timesteps = sched.timesteps.float()[:num_steps]
        sigmas = torch.as_tensor(sched.sigmas, device=latents.device).float()
        if sigmas.shape[0] == num_steps:  # schedulers that omit the terminal 0
            sigmas = torch.cat([sigmas, sigmas.new_zeros(1)])
        return SamplingGrid(timesteps=timesteps, sigmas=sigmas[: num_steps + 1])


class DDIMAdapter(PipelineAdapter):
    """SD / SDXL: a DDIM grid built by ``DDIMScheduler.from_config(pipe.scheduler.config)``."""

    is_flow = False
    denoiser_name = "unet"
    default_sampler = "ddim"

    def sampling_grid(self, num_steps: int, latents: torch.Tensor) -> SamplingGrid:
        from diffusers import DDIMScheduler

        sched = self.pipe.scheduler
        sched = copy.deepcopy(sched) if isinstance(sched, DDIMScheduler) else DDIMScheduler.from_config(sched.config)
        sched.set_timesteps(num_steps)
        ts = sched.timesteps.long()
        ratio = sched.config.num_train_timesteps // num_steps
        ac = sched.alphas_cumprod.float()
        final = torch.as_tensor(sched.final_alpha_cumprod).float()
        prev = ts - ratio
        a = ac[ts]
        a_prev = torch.where(prev >= 0, ac[prev.clamp_min(0)], final)
        sigmas = torch.cat([(1 - a).sqrt(), (1 - a_prev[-1:]).sqrt()])
        dev = latents.device
        return SamplingGrid(ts.float().to(dev), sigmas.to(dev), a.to(dev), a_prev.to(dev))

    def latent_shape(self, batch_size, height, width, num_frames=None):
        vsf = self.pipe.vae_scale_factor
        height = height or self.pipe.unet.config.sample_size * vsf
        width = width or self.pipe.unet.config.sample_size * vsf
        return (batch_size, self.pipe.unet.config.in_channels, height // vsf, width // vsf)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        cfg = self.pipe.vae.config
        z = latents.float()
        if cfg.get("latents_mean") is not None and cfg.get("latents_std") is not None:
            mean = torch.tensor(cfg.latents_mean, device=z.device).view(1, -1, 1, 1)
            std = torch.tensor(cfg.latents_std, device=z.device).view(1, -1, 1, 1)
            z = z * std / cfg.scaling_factor + mean
        else:
            z = z / cfg.scaling_factor
        return self._vae_decode(z)
