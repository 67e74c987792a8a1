"""The pipeline adapter interface: encode prompts, predict with CFG, decode, and the sampling grid.

An adapter wraps a user's diffusers pipeline (no copy of its weights) and exposes what the rollout
and the losses need, with nothing algorithmic:

- ``encode_prompts(prompts, guidance_scale, images=None) -> Conditioning`` (cached per unique prompt, or per unique
  (prompt, condition image) for the families that edit an image or animate it: ``condition_image = True``)
- ``predict(x, timestep, cond, guidance_scale) -> float32`` with CFG ``out = out_null + g (out_c - out_null)``
  (flow families: velocity ``v ~ eps - x0``; SD/SDXL: epsilon or v per ``prediction_type``)
- ``decode(latents) -> images [B, 3, H, W]`` in [0, 1] (video: ``[B, F, 3, H, W]``)
- ``prepare_latents(batch_size, ...) -> float32 noise`` drawn exactly as the pipeline draws it
- ``sampling_grid(num_steps, latents) -> SamplingGrid`` built by the pipeline's own scheduler

CFG follows diffusers: guidance is applied only when ``guidance_scale > 1``.
"""

from __future__ import annotations

import copy
import functools
import hashlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch

GeneratorLike = Union[torch.Generator, Sequence[torch.Generator], None]


def image_tensor(image) -> torch.Tensor:
    """A condition image (PIL, or a float tensor [3, H, W] / [1, 3, H, W] in [0, 1]) -> float32 [3, H, W] in [0, 1]."""
    if isinstance(image, torch.Tensor):
        t = image.detach().float().cpu()
        t = t[0] if t.dim() == 4 and t.shape[0] == 1 else t
        if t.dim() != 3 or t.shape[0] != 3:
            raise ValueError(f"a condition image tensor must be [3, H, W] in [0, 1], got shape {tuple(image.shape)}")
        return t.clamp(0, 1)
    import numpy as np

    if not hasattr(image, "convert"):
        raise ValueError(f"a condition image must be a PIL image or a [3, H, W] tensor, got {type(image).__name__}")
    arr = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1)


def image_key(image: torch.Tensor) -> str:
    """Content hash of a float [3, H, W] image (the prompt cache's key for image-conditioned rows)."""
    data = image.contiguous().numpy().tobytes()
    return hashlib.sha1(data + str(tuple(image.shape)).encode()).hexdigest()[:16]


@dataclass
class Conditioning:
    """Encoded prompts of a batch.

    cond / uncond: denoiser keyword tensors, each ``[B, ...]`` (e.g. ``encoder_hidden_states`` [B, L, D],
    ``pooled_projections`` [B, P]; image-conditioned families add their condition's tensors, e.g. the packed
    latents of the image to edit); uncond is None when no CFG was requested at encoding time.
    images: the B condition images as given (float [3, H, W] in [0, 1], before the family resizes them for its
        encoder) or None for text rows;
        rewards receive them as ``metadata[i]["condition_image"]``.
    keys: one key per row naming its group (its prompt, plus the condition image's hash when there is one), so
        two edits of different images with the same instruction are different prompt groups.
    """

    prompts: list[str]
    cond: dict[str, torch.Tensor]
    uncond: Optional[dict[str, torch.Tensor]] = None
    images: Optional[list] = None
    keys: Optional[list[str]] = None

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def group_keys(self) -> list[str]:
        return list(self.prompts) if self.keys is None else list(self.keys)

    def cfg_pair(self) -> dict[str, torch.Tensor]:
        """``{key: cat([uncond[key], cond[key]])}`` [2B, ...], the batched CFG call's embeddings, built once per
        Conditioning (a rollout makes every denoiser call with the same one) and rebuilt if a tensor is replaced."""
        if any(v.requires_grad for d in (self.cond, self.uncond) for v in d.values()):
            return {k: torch.cat([self.uncond[k], self.cond[k]]) for k in self.cond}  # a graph: never cached
        ids = tuple((k, id(self.cond[k]), id(self.uncond[k])) for k in self.cond)
        cached = self.__dict__.get("_cfg_pair")
        if cached is None or cached[0] != ids:
            cached = (ids, {k: torch.cat([self.uncond[k], self.cond[k]]) for k in self.cond})
            self.__dict__["_cfg_pair"] = cached  # not a dataclass field: equality and repr ignore it
        return cached[1]

    def select(self, index: Union[torch.Tensor, Sequence[int], slice]) -> "Conditioning":
        """Rows ``index`` of the batch (for micro-batches)."""
        if isinstance(index, slice):
            rows = list(range(len(self.prompts)))[index]
        else:
            rows = [int(i) for i in (index.tolist() if isinstance(index, torch.Tensor) else index)]
        idx = torch.tensor(rows, dtype=torch.long)
        pick = lambda d: None if d is None else {k: v[idx.to(v.device)] for k, v in d.items()}  # noqa: E731
        rows_of = lambda xs: None if xs is None else [xs[i] for i in rows]  # noqa: E731
        return Conditioning([self.prompts[i] for i in rows], pick(self.cond), pick(self.uncond),
                            rows_of(self.images), rows_of(self.keys))

    def metadata(self) -> Optional[list[dict]]:
        """Per-row reward metadata (``{"condition_image": [3, H, W]}``), or None for text-only rows."""
        return None if self.images is None else [{"condition_image": im} for im in self.images]


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


def _autocast_predict(predict):
    """``predict`` under ``torch.autocast(device, adapter.autocast)`` when the adapter has one (model.autocast): the
    denoiser's matmuls in bf16/fp16, its output cast back to float32, so sampler math, log-probs and losses stay
    float32. Off (None), or inside an autocast region already (a family's predict calling the base one), the call
    is unchanged. ``adapter.attention`` (model.attention) other than "default" restricts scaled-dot-product
    attention to that kernel for the call (``runtime.kernels.attention_backend``)."""

    @functools.wraps(predict)
    def wrapped(self, *args, **kwargs):
        if self.attention != "default":
            from ..runtime.kernels import attention_backend

            with attention_backend(self.attention):
                return _autocast_call(predict, self, args, kwargs)
        return _autocast_call(predict, self, args, kwargs)

    return wrapped


def _autocast_call(predict, adapter, args, kwargs):
    dtype = adapter.autocast
    if dtype is None or torch.is_autocast_enabled(adapter.device.type):
        return predict(adapter, *args, **kwargs)
    with torch.autocast(adapter.device.type, dtype=dtype):
        out = predict(adapter, *args, **kwargs)
    return out.float()


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
    # True: every row conditions on an image as well as its prompt (editing, image-to-video); encode_prompts then
    # needs images=[one per row] and the family implements _encode_image (or _encode_row)
    condition_image: bool = False
    image_cache_size: int = 256  # encoded (prompt, image) rows kept (image latents are large); text rows: all

    autocast: Optional[torch.dtype] = None  # model.autocast: the denoiser's forwards in this dtype (predict)
    attention: str = "default"  # model.attention: the scaled-dot-product kernel of every predict

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "predict" in cls.__dict__:  # a family's own predict gets model.autocast too
            cls.predict = _autocast_predict(cls.__dict__["predict"])

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
        self._image_cache: OrderedDict = OrderedDict()  # (prompt, image key, size) -> embeddings, LRU

    # ---- properties -------------------------------------------------------------------------
    @property
    def denoiser(self) -> torch.nn.Module:
        return getattr(self.pipe, self.denoiser_name)

    @property
    def denoiser_names(self) -> tuple:
        """Pipeline attributes of every denoiser (one; two-expert Wan 2.2 has two, high-noise first)."""
        return (self.denoiser_name,)

    @property
    def denoisers(self) -> tuple:
        """Every denoiser (``denoiser`` = the first): FSDP, precision casts and meters act on all of them."""
        return tuple(getattr(self.pipe, n) for n in self.denoiser_names)

    @property
    def lora_denoisers(self) -> tuple:
        """The denoisers ``lora.add_lora`` puts the LoRA on (all, unless a family lets the user choose)."""
        return self.denoisers

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

    # ---- the pipeline's own __call__ ---------------------------------------------------------------
    def call_kwargs(self, guidance_scale: float, height: Optional[int] = None, width: Optional[int] = None) -> dict:
        """Keywords of ``pipe(...)`` that make the pipeline's own ``__call__`` sample as this adapter does at
        flowalign's ``guidance_scale`` (held-out evaluation and the sample app call the pipeline): the guidance,
        and the adapter's prompt length and negative prompt where the pipeline takes them. A family whose
        pipeline has another scale or further options (Z-Image, FLUX true CFG, Kontext's area) extends it.
        height / width: the size asked for (families that rescale it need it)."""
        import inspect

        accepted = inspect.signature(self.pipe.__call__).parameters
        kw = {"guidance_scale": float(guidance_scale)}
        if "max_sequence_length" in accepted:
            kw["max_sequence_length"] = self.max_sequence_length
        if self.negative_prompt and "negative_prompt" in accepted:
            kw["negative_prompt"] = self.negative_prompt
        return kw

    # ---- prompts ------------------------------------------------------------------------------
    def _encode(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Encode a list of prompts -> denoiser kwargs, tensors [len(prompts), ...]. Per family."""
        raise NotImplementedError

    def _encode_image(self, image: torch.Tensor, height: Optional[int], width: Optional[int],
                      num_frames: Optional[int] = None) -> dict[str, torch.Tensor]:
        """The condition image [1, 3, H, W] in [0, 1] -> denoiser kwargs [1, ...] (e.g. its packed VAE latents) for
        an output of ``height`` x ``width`` (x ``num_frames`` for video; None: the family's default). Per
        image-conditioned family."""
        raise NotImplementedError(f"the {self.family} adapter does not condition on images")

    def _encode_row(self, prompt: str, image: Optional[torch.Tensor], height, width, num_frames=None
                    ) -> dict[str, torch.Tensor]:
        """One row's embeddings [1, ...]: the prompt's, plus the condition image's when there is one (families
        whose text encoder reads the image too, e.g. Qwen-Image-Edit, override this)."""
        out = dict(self._encode([prompt]))
        if image is not None:
            out.update(self._encode_image(image[None], height, width, num_frames))
        return out

    def _encode_negative(self, n: int, images: Optional[list] = None, size=(None, None, None)
                         ) -> dict[str, torch.Tensor]:
        """Unconditional embeddings for n rows (default: the encoded ``negative_prompt``, with each row's condition
        image: the null branch of an edit still sees the image it edits)."""
        return self._stack([self.negative_prompt] * n, images, size)

    def _uses_uncond(self, guidance_scale: float) -> bool:
        """Whether CFG at this (user-facing) guidance scale needs the unconditional branch (diffusers: g > 1)."""
        return guidance_scale > 1.0

    def _row(self, prompt: str, image: Optional[torch.Tensor], size) -> dict[str, torch.Tensor]:
        # each new row is encoded on its own: a text encoder's output for one row depends (in the last bits)
        # on the other rows of its batch, so batching new prompts would make an embedding, and every weight trained
        # on it, depend on the run's history (a resumed run would drift from an uninterrupted one by ~1e-7)
        if image is None:
            if prompt not in self._cache:
                with torch.no_grad():
                    self._cache[prompt] = {k: v[:1].detach() for k, v in self._encode_row(prompt, None, *size).items()}
            return self._cache[prompt]
        key = (prompt, image_key(image), size)
        if key in self._image_cache:
            self._image_cache.move_to_end(key)
        else:
            with torch.no_grad():
                self._image_cache[key] = {k: v[:1].detach() for k, v in self._encode_row(prompt, image, *size).items()}
            while len(self._image_cache) > self.image_cache_size:
                self._image_cache.popitem(last=False)
        return self._image_cache[key]

    def _stack(self, prompts: list[str], images: Optional[list] = None, size=(None, None, None)
               ) -> dict[str, torch.Tensor]:
        rows = [self._row(p, None if images is None else images[i], size) for i, p in enumerate(prompts)]
        return {k: torch.cat([r[k] for r in rows]) for k in rows[0]}

    def _check_images(self, images, n: int) -> Optional[list]:
        if images is None:
            if self.condition_image:
                raise ValueError(f"the {self.family} adapter conditions every row on an image: pass images=[one per "
                                 "prompt] (training: train.prompts = a JSONL of prompt and image rows, docs/models.md)")
            return None
        if not self.condition_image:
            raise ValueError(f"the {self.family} adapter generates from text only: drop images=..., or use an "
                             "image-conditioned family (flux_kontext, qwenimage_edit, wan_i2v)")
        images = list(images)
        if len(images) != n:
            raise ValueError(f"{len(images)} condition images for {n} prompts: pass one image per prompt")
        return [image_tensor(im) for im in images]

    def encode_prompts(self, prompts: Union[str, Sequence[str]], guidance_scale: float = 1.0, images=None,
                       height: Optional[int] = None, width: Optional[int] = None,
                       num_frames: Optional[int] = None) -> Conditioning:
        """Encode prompts (each unique prompt, or (prompt, image) row, once, then cached) -> Conditioning with cond
        [B, ...] and, when ``guidance_scale`` needs CFG, the unconditional embeddings.

        images: for image-conditioned families (``condition_image``), one condition image per prompt (PIL or
        [3, H, W] in [0, 1]); height / width / num_frames: the output size the condition is prepared for (None: the
        family's default)."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            raise ValueError("encode_prompts needs at least one prompt")
        images = self._check_images(images, len(prompts))
        size = (height, width, num_frames) if images is not None else (None, None, None)
        cond = self._stack(prompts, images, size)
        uncond = self._encode_negative(len(prompts), images, size) if self._uses_uncond(guidance_scale) else None
        keys = None if images is None else [f"{p}\x00{image_key(im)}" for p, im in zip(prompts, images)]
        return Conditioning(prompts, cond, uncond, images, keys)

    def clear_cache(self) -> None:
        self._cache.clear()
        self._image_cache.clear()

    # ---- prediction ---------------------------------------------------------------------------
    def _forward(self, x: torch.Tensor, timestep: torch.Tensor, emb: dict, guidance_scale: float) -> torch.Tensor:
        """One denoiser call on x [B, ...] at timestep [B] with embeddings emb -> output [B, ...]. Per family."""
        raise NotImplementedError

    def _cfg_scale(self, guidance_scale: float) -> float:
        """The scale used to combine cond and uncond outputs (FLUX: its true-CFG scale)."""
        return guidance_scale

    @_autocast_predict
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
                emb = cond.cfg_pair()
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
        """The scheduler's grid for ``num_steps`` at this latent size, built on a copy of the pipeline's scheduler
        once per (steps, shift, sigmas, device, scheduler and its config) and then reused: a rollout loop makes
        no scheduler copy. Returns fresh tensors (a caller may modify them)."""
        mu = self._shift_mu(latents)
        sig = self._grid_sigmas(num_steps)
        sched = self.pipe.scheduler
        key = (num_steps, mu, None if sig is None else tuple(float(v) for v in sig), str(latents.device),
               id(sched), repr(sorted(dict(sched.config).items())))
        cache = self.__dict__.setdefault("_grid_cache", {})
        if key not in cache:
            cache.clear()  # one grid in use at a time (eval and rollout steps may differ: rebuilt when they do)
            cache[key] = self._build_grid(num_steps, latents, mu, sig)
        grid = cache[key]
        return SamplingGrid(timesteps=grid.timesteps.clone(), sigmas=grid.sigmas.clone())

    def _build_grid(self, num_steps: int, latents: torch.Tensor, mu, sig) -> SamplingGrid:
        sched = self._scheduler_copy()
        kw = {}
        if mu is not None:
            kw["mu"] = mu
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
