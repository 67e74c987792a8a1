"""Qwen-Image (Qwen team, arXiv 2508.02324): ``QwenImagePipeline`` (family ``qwenimage``) and the editing pipelines
``QwenImageEditPipeline`` (``qwenimage_edit``) and ``QwenImageEditPlusPipeline`` (``qwenimage_edit_plus``,
Qwen-Image-Edit-2509 / 2511). A double-stream MMDiT (``QwenImageTransformer2DModel``) over [text tokens, image tokens],
a Qwen2.5-VL text encoder, a Wan-style VAE with per-channel latent statistics.

What the pipelines' ``__call__`` do, and the adapters reproduce:

- prompt: a chat template (system prompt + one user turn); the LAST hidden state of Qwen2.5-VL, the system part
  (``prompt_template_encode_start_idx`` tokens) dropped, real tokens only: a caption [L_i, D] per prompt. A batch is
  zero-padded to its longest caption with the token mask ``encoder_hidden_states_mask`` [B, L] (no mask when no row
  is padded). Text-to-image truncates captions to ``max_sequence_length`` (512); the edit pipelines do not truncate.
  Here every row is encoded alone and kept zero-padded with its mask; a batch is padded to its longest row, and cut
  back to its longest real row for each transformer call (so a batch is called exactly as the pipeline calls it).
- latents: noise drawn as [B, 1, C, h, w] in the text encoder's dtype (h = 2 (H // 16)), i.e. the same numbers as
  [B, C, h, w]; flowalign keeps this UNPACKED [B, C, h, w] float32 tensor and packs it into 2x2 patches,
  [B, (h/2)(w/2), 4C], around each transformer call (``pack``). ``img_shapes`` = [(1, h/2, w/2)] per row.
- transformer: ``timestep = t / 1000`` (sigma); the output is the velocity ``v ~ eps - x0`` the scheduler steps with.
- guidance: true CFG with the negative prompt at scale s > 1, two transformer calls per step (conditional, then
  unconditional), combined per packed token and rescaled to the conditional prediction's norm:

      v = v_null + s (v_c - v_null);     v <- v * ||v_c|| / ||v||      (norms over the last axis of [B, N, 4C])

- grid: ``sigmas = linspace(1, 1/N, N)`` through the scheduler's shift with ``mu = calculate_shift((h/2)(w/2), ...)``
  (the noisy tokens only), stretched so the last sigma is ``shift_terminal`` (0.02) when the scheduler has one; that
  stretch is 0 / 0 for N = 1 (the pipeline samples NaN), so the adapters refuse a 1-step grid there.
- decoding: ``z = x / (1 / latents_std) + latents_mean`` on [B, C, 1, h, w], ``vae.decode(z)[:, :, 0]``.

Editing (``condition_image``): the condition image is resized to an area of ~1024**2 px at its aspect ratio
(``calculate_dimensions``: sides rounded to multiples of 32), VAE-encoded (the posterior's mode) and normalised
``(z - latents_mean) / latents_std``, packed like the noise ([1, M, 4C]) and appended to the noisy tokens:
``hidden_states = [x_packed (N), image_latents (M)]``, ``img_shapes = [(1, h/2, w/2), (1, h_c/2, w_c/2)]``; only the
first N outputs are kept. The text encoder sees the image too, inside the prompt template: QwenImageEditPipeline
gives it the 1024**2-px image, the Plus pipeline a ~384**2-px copy ("Picture 1: <image>"). The null branch edits the
same image (the negative prompt is encoded with it). Transformers with ``zero_cond_t`` (Qwen-Image-Edit-2511) give
the condition tokens timestep 0 themselves, from ``img_shapes``. The edit pipelines' output size defaults to the
condition image's 1024**2-px size; here (no image at ``latent_shape``) to the square one, 1024 x 1024.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Optional

import numpy as np
import torch

from .base import Conditioning, FlowAdapter, image_key
from .wan_i2v import _exact_pil, _to_pil

_TEXT = "encoder_hidden_states"
_MASK = "encoder_hidden_states_mask"
_PADDED = {_TEXT: 0.0, _MASK: False, "image_latents": 0.0}  # keys padded along dim 1 when rows are stacked
DEFAULT_AREA = 1024 * 1024  # the edit pipelines' condition (VAE) image area
DEFAULT_VL_AREA = 384 * 384  # QwenImageEditPlusPipeline's vision-language image area


def condition_dimensions(area: int, ratio: float) -> tuple[int, int]:
    """(width, height) of an image of about ``area`` px at aspect ratio ``ratio`` = width / height, each side rounded
    to a multiple of 32 (the edit pipelines' ``calculate_dimensions``)."""
    width = (area * ratio) ** 0.5
    height = width / ratio
    return int(round(width / 32) * 32), int(round(height / 32) * 32)


def _pad_cat(rows: list) -> dict:
    """Concatenate embedding dicts [b_i, ...] along the batch; text, mask and condition tokens are zero-padded
    (mask: False) along dim 1 to the longest row first."""
    out = {}
    for k in rows[0]:
        vals = [r[k] for r in rows]
        if k in _PADDED:
            n = max(v.shape[1] for v in vals)
            vals = [v if v.shape[1] == n else torch.cat(
                [v, v.new_full((v.shape[0], n - v.shape[1], *v.shape[2:]), _PADDED[k])], dim=1) for v in vals]
        out[k] = torch.cat(vals)
    return out


class QwenImageAdapter(FlowAdapter):
    """Qwen-Image text-to-image adapter (module docstring). Latents [B, C, h, w] float32 (C = 16, h = 2 (H // 16)).

    Embeddings: ``encoder_hidden_states`` [B, L, D] zero-padded, ``encoder_hidden_states_mask`` [B, L] bool.

    Args:
        negative_prompt: text of CFG's null branch (flowalign's default ""; Qwen-Image's examples use " ").
        max_sequence_length: caption tokens kept (the pipeline's ``max_sequence_length``, 512, at most 1024).
        true_cfg_scale: the CFG scale s. None (default): flowalign's ``guidance_scale`` is s (CFG when > 1); a number:
            s is fixed (as ``QwenImagePipeline(true_cfg_scale=...)``) and ``guidance_scale`` only feeds the guidance
            embedding of transformers that have one (``guidance_embeds``; none released).
    """

    family = "qwenimage"
    pipeline_class = "QwenImagePipeline"
    # joint attention (image and text projections) and both streams' GELU MLPs of every double-stream block
    lora_target_modules = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                           "img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj", "txt_mlp.net.2")
    fsdp_blocks = ("transformer_blocks",)
    cfg_batched = False  # the pipeline calls the transformer once per CFG branch

    def __init__(self, pipe, negative_prompt: str = "", max_sequence_length: int = 512,
                 true_cfg_scale: Optional[float] = None):
        super().__init__(pipe, negative_prompt, max_sequence_length)
        if not 1 <= self.max_sequence_length <= 1024:
            raise ValueError(f"max_sequence_length must be in 1..1024 (the Qwen-Image pipelines' limit), got "
                             f"{max_sequence_length}")
        if true_cfg_scale is not None and not float(true_cfg_scale) > 0:
            raise ValueError(f"true_cfg_scale must be > 0 (> 1 turns on CFG; None = guidance_scale), got "
                             f"{true_cfg_scale}")
        self.true_cfg_scale = None if true_cfg_scale is None else float(true_cfg_scale)

    # ---- guidance and the pipeline's own __call__ ---------------------------------------------------
    def _cfg_scale(self, guidance_scale):
        return float(guidance_scale) if self.true_cfg_scale is None else self.true_cfg_scale

    def _uses_uncond(self, guidance_scale):
        return self._cfg_scale(guidance_scale) > 1.0

    @property
    def guidance_embeds(self) -> bool:
        return bool(self.denoiser.config.get("guidance_embeds", False))

    def call_kwargs(self, guidance_scale, height=None, width=None):
        """``true_cfg_scale`` = the CFG scale (always passed: the pipeline's default is 4), the negative prompt when
        CFG is on (the pipeline guides only when it is given one), the prompt length, and ``guidance_scale`` only for
        a transformer with a guidance embedding (others warn that they ignore it)."""
        s = self._cfg_scale(guidance_scale)
        kw = {"true_cfg_scale": s, "max_sequence_length": self.max_sequence_length}
        if s > 1.0:
            kw["negative_prompt"] = self.negative_prompt
        if self.guidance_embeds:
            kw["guidance_scale"] = float(guidance_scale)
        return kw

    # ---- prompts --------------------------------------------------------------------------------
    @staticmethod
    def _text_dict(pe: torch.Tensor, mask: Optional[torch.Tensor]) -> dict:
        mask = torch.ones(pe.shape[:2], dtype=torch.bool, device=pe.device) if mask is None else mask.bool()
        return {_TEXT: pe, _MASK: mask}

    def _encode(self, prompts):
        pe, mask = self.pipe.encode_prompt(prompt=list(prompts), device=self.device,
                                           max_sequence_length=self.max_sequence_length)
        return self._text_dict(pe, mask)

    def _stack(self, prompts, images=None, size=(None, None, None)):
        rows = [self._row(p, None if images is None else images[i], size) for i, p in enumerate(prompts)]
        return _pad_cat(rows)

    # ---- prediction -----------------------------------------------------------------------------
    def predict(self, x: torch.Tensor, timestep, cond: Conditioning, guidance_scale: float = 1.0) -> torch.Tensor:
        """Velocity float32 [B, C, h, w] with Qwen-Image's renormalised true CFG (module docstring) when the CFG
        scale is > 1, else the conditional prediction. ``cfg_batched`` runs both branches in one [2B] call
        (conditional rows first; other kernels than the pipeline's two calls)."""
        b = x.shape[0]
        t = torch.as_tensor(timestep, device=x.device)
        t = (t.expand(b) if t.dim() == 0 else t).to(x.device)
        if not self._uses_uncond(guidance_scale):
            return self._unpack(self._forward_packed(x, t, cond.cond, guidance_scale), x)
        if cond.uncond is None:
            raise ValueError(f"CFG scale {self._cfg_scale(guidance_scale)} needs unconditional embeddings: call "
                             f"encode_prompts(prompts, guidance_scale={guidance_scale})")
        if self.cfg_batched:
            out = self._forward_packed(torch.cat([x, x]), torch.cat([t, t]), _pad_cat([cond.cond, cond.uncond]),
                                       guidance_scale)
            v_c, v_null = out.chunk(2)
        else:
            v_c = self._forward_packed(x, t, cond.cond, guidance_scale)
            v_null = self._forward_packed(x, t, cond.uncond, guidance_scale)
        return self._unpack(self.combine(v_c, v_null, self._cfg_scale(guidance_scale)), x)

    @staticmethod
    def combine(v_c: torch.Tensor, v_null: torch.Tensor, scale: float) -> torch.Tensor:
        """The pipelines' CFG on packed predictions [B, N, 4C]: ``v = v_null + s (v_c - v_null)`` rescaled per token
        to the conditional norm, ``v * ||v_c|| / ||v||`` (norms over the last axis)."""
        v = v_null + scale * (v_c - v_null)
        return v * (torch.norm(v_c, dim=-1, keepdim=True) / torch.norm(v, dim=-1, keepdim=True))

    def _forward(self, x, timestep, emb, guidance_scale):
        return self._unpack(self._forward_packed(x, timestep, emb, guidance_scale), x)

    def _forward_packed(self, x: torch.Tensor, timestep: torch.Tensor, emb: dict, guidance_scale) -> torch.Tensor:
        """Transformer output for the noisy tokens, float32 [B, N, 4C]. Rows whose condition images have different
        token grids (edits of images of other aspect ratios) are called in one sub-batch per grid: the transformer's
        RoPE takes a single image layout per call."""
        grid = emb.get("image_grid")
        if grid is None or bool((grid == grid[:1]).all()):
            return self._call(x, timestep, emb, guidance_scale)
        out = None
        for g in torch.unique(grid, dim=0):
            idx = (grid == g).all(dim=1).nonzero().flatten()
            part = self._call(x[idx], timestep[idx], {k: v[idx.to(v.device)] for k, v in emb.items()}, guidance_scale)
            out = part.new_zeros(x.shape[0], *part.shape[1:]) if out is None else out
            out[idx.to(out.device)] = part
        return out

    def _call(self, x, timestep, emb, guidance_scale) -> torch.Tensor:
        """One transformer call: rows share one condition layout (if any)."""
        pipe, dt = self.pipe, self.dtype
        b, c, h, w = x.shape
        hidden = pipe._pack_latents(x.to(dt), b, c, h, w)
        n = hidden.shape[1]
        shapes = [(1, h // 2, w // 2)]
        mask = emb[_MASK]
        keep = int(mask.sum(dim=1).max())  # the longest real caption of these rows
        txt, mask = emb[_TEXT][:, :keep].to(dt), mask[:, :keep]
        mask = None if bool(mask.all()) else mask
        if "image_latents" in emb:
            gh, gw = (int(v) for v in emb["image_grid"][0])
            hidden = torch.cat([hidden, emb["image_latents"][:, : gh * gw].to(dt)], dim=1)
            shapes.append((1, gh, gw))
        guidance = None
        if self.guidance_embeds:
            guidance = torch.full([b], float(guidance_scale), device=x.device, dtype=torch.float32)
        out = self.denoiser(hidden_states=hidden, timestep=timestep.to(dt) / 1000, guidance=guidance,
                            encoder_hidden_states_mask=mask, encoder_hidden_states=txt, img_shapes=[shapes] * b,
                            return_dict=False)[0]
        return out[:, :n].float()

    def _unpack(self, packed: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """[B, N, 4C] -> [B, C, h, w] (the pipeline's ``_unpack_latents`` without its frame axis)."""
        vsf = self.pipe.vae_scale_factor
        return self.pipe._unpack_latents(packed, x.shape[-2] * vsf, x.shape[-1] * vsf, vsf)[:, :, 0]

    def pack(self, latents: torch.Tensor) -> torch.Tensor:
        """[B, C, h, w] -> the pipeline's packed [B, (h/2)(w/2), 4C] (``pipe(..., output_type="latent")``)."""
        b, c, h, w = latents.shape
        return self.pipe._pack_latents(latents, b, c, h, w)

    # ---- sizes, latents, grid, decoding -----------------------------------------------------------
    def _default_size(self) -> tuple[int, int]:
        side = self.pipe.default_sample_size * self.pipe.vae_scale_factor  # 128 * 8 = 1024
        return side, side

    def output_size(self, height: Optional[int], width: Optional[int]) -> tuple[int, int]:
        """(height, width) in pixels the pipeline generates: the requested size (default 1024 x 1024) floored to
        multiples of ``vae_scale_factor * 2`` (16), as the pipeline floors it."""
        m = self.pipe.vae_scale_factor * 2
        h0, w0 = self._default_size()
        height, width = int(height or h0), int(width or w0)
        if height < m or width < m:
            raise ValueError(f"Qwen-Image sizes are at least {m} px (vae_scale_factor * 2), got {height} x {width}")
        return height // m * m, width // m * m

    def latent_shape(self, batch_size, height, width, num_frames=None):
        h, w = self.output_size(height, width)
        vsf = self.pipe.vae_scale_factor
        return (batch_size, self.denoiser.config.in_channels // 4, 2 * (h // (vsf * 2)), 2 * (w // (vsf * 2)))

    def _noise_dtype(self):
        return self.pipe.text_encoder.dtype  # prepare_latents draws in prompt_embeds' dtype

    def _grid_sigmas(self, num_steps):
        return np.linspace(1.0, 1 / num_steps, num_steps)

    def sampling_grid(self, num_steps, latents):
        if num_steps < 2 and self.pipe.scheduler.config.get("shift_terminal"):
            # stretching sigmas = [1] to shift_terminal divides 0 by 0: the pipeline samples NaN at 1 step
            raise ValueError(f"Qwen-Image's scheduler (shift_terminal={self.pipe.scheduler.config.shift_terminal}) "
                             "cannot make a 1-step grid (the pipeline's would be NaN): use num_steps >= 2")
        return super().sampling_grid(num_steps, latents)

    def _shift_mu(self, latents):
        from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift

        cfg = self.pipe.scheduler.config
        seq = (latents.shape[-2] // 2) * (latents.shape[-1] // 2)
        return calculate_shift(seq, cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096),
                               cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15))

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """[B, C, h, w] -> images [B, 3, 8h, 8w] in [0, 1]: ``z / (1 / latents_std) + latents_mean`` (the pipeline's
        exact operations) on [B, C, 1, h, w], then the VAE's first frame."""
        vae = self.pipe.vae
        cfg = vae.config
        z = latents.unsqueeze(2).to(vae.dtype)
        mean = torch.tensor(cfg.latents_mean).view(1, cfg.z_dim, 1, 1, 1).to(z.device, z.dtype)
        inv_std = 1.0 / torch.tensor(cfg.latents_std).view(1, cfg.z_dim, 1, 1, 1).to(z.device, z.dtype)
        img = vae.decode(z / inv_std + mean, return_dict=False)[0][:, :, 0]
        return (img.float() / 2 + 0.5).clamp(0, 1)


class QwenImageEditAdapter(QwenImageAdapter):
    """Qwen-Image-Edit adapter: every row edits its own condition image (``encode_prompts(..., images=...)``).

    Embeddings, beyond the text ones: ``image_latents`` [B, M, 4C] (packed normalised VAE mode of the condition
    image, zero-padded to the batch's largest M) and ``image_grid`` [B, 2] (its token grid h_c/2, w_c/2).

    Args (and those of :class:`QwenImageAdapter`; ``max_sequence_length`` is not applied: the edit pipelines do not
    truncate):
        condition_area: pixel area the condition image is resized to for the VAE (and, here, the text encoder), at its
            aspect ratio. The pipelines fix it at 1024**2 (the default) and have no option for it: ``pipe(...)``
            samples as the adapter only at the default (a smaller area is cheaper, e.g. for tests).
    """

    family = "qwenimage_edit"
    pipeline_class = "QwenImageEditPipeline"
    condition_image = True
    condition_cache_size = 16  # condition images kept encoded (each row's cond and null branches share one)

    def __init__(self, pipe, negative_prompt: str = "", max_sequence_length: int = 512,
                 true_cfg_scale: Optional[float] = None, condition_area: int = DEFAULT_AREA):
        super().__init__(pipe, negative_prompt, max_sequence_length, true_cfg_scale)
        if int(condition_area) < 32 * 32:
            raise ValueError(f"condition_area must be at least 32 * 32 px (default 1024 * 1024), got {condition_area}")
        self.condition_area = int(condition_area)
        self._conditions: OrderedDict = OrderedDict()

    def clear_cache(self):
        super().clear_cache()
        self._conditions.clear()

    def _default_size(self):
        w, h = condition_dimensions(self.condition_area, 1.0)
        return h, w

    def output_size(self, height, width, image_size: Optional[tuple] = None):
        """As :meth:`QwenImageAdapter.output_size`, with the pipeline's default: the condition image's size at
        ``condition_area`` (``image_size`` = its (width, height); None: a square image, 1024 x 1024)."""
        if image_size is not None and (height is None or width is None):
            w, h = condition_dimensions(self.condition_area, image_size[0] / image_size[1])
            height, width = height or h, width or w
        return super().output_size(height, width)

    # ---- the condition image ------------------------------------------------------------------
    def _vl_size(self, ratio: float) -> tuple[int, int]:
        """(width, height) of the image the text encoder sees (QwenImageEditPipeline: the VAE's)."""
        return condition_dimensions(self.condition_area, ratio)

    def _resized(self, image: torch.Tensor):
        """[3, H, W] in [0, 1] -> (the text encoder's image, VAE pixels [1, 3, 1, h_c, w_c] in [-1, 1]) as
        ``QwenImageEditPipeline.__call__`` resizes a PIL image (an exactly 8-bit image goes back to PIL; other
        tensors take the image processor's tensor path, the text encoder then reads an 8-bit copy)."""
        proc = self.pipe.image_processor
        pil = _exact_pil(image)
        src = pil if pil is not None else image[None].float()
        w, h = condition_dimensions(self.condition_area, image.shape[-1] / image.shape[-2])
        resized = proc.resize(src, h, w)
        vl = resized if pil is not None else _to_pil(resized[0])
        return vl, proc.preprocess(resized, h, w).unsqueeze(2)

    def _prompt(self, prompt: str, vl_image):
        return self.pipe.encode_prompt(prompt=[prompt], image=vl_image, device=self.device)

    def _condition(self, image: torch.Tensor):
        """(text encoder image, {image_latents [1, M, 4C], image_grid [1, 2]}) of one condition image, cached."""
        key = image_key(image)
        if key in self._conditions:
            self._conditions.move_to_end(key)
            return self._conditions[key]
        pipe = self.pipe
        vl, pixels = self._resized(image)
        pixels = pixels.to(self.device, pipe.text_encoder.dtype)  # prepare_latents: prompt_embeds' dtype
        z = pipe._encode_vae_image(pixels, generator=None)  # (mode - latents_mean) / latents_std, [1, C, 1, h, w]
        lh, lw = z.shape[-2:]
        latents = pipe._pack_latents(z, 1, self.denoiser.config.in_channels // 4, lh, lw)
        grid = torch.tensor([[lh // 2, lw // 2]], device=latents.device)
        self._conditions[key] = (vl, {"image_latents": latents, "image_grid": grid})
        while len(self._conditions) > self.condition_cache_size:
            self._conditions.popitem(last=False)
        return self._conditions[key]

    def _encode(self, prompts):
        raise ValueError(f"the {self.family} adapter encodes prompts with their condition image: "
                         "encode_prompts(prompts, images=[one per prompt])")

    def _encode_row(self, prompt, image, height, width, num_frames=None):
        """One (prompt, condition image) row: the caption of the prompt read with the image, and the image's
        condition tokens (independent of the output size)."""
        if image is None:
            return self._encode([prompt])
        vl, tokens = self._condition(image)
        pe, mask = self._prompt(prompt, vl)
        return {**self._text_dict(pe, mask), **tokens}


class QwenImageEditPlusAdapter(QwenImageEditAdapter):
    """Qwen-Image-Edit-2509 / 2511 (``QwenImageEditPlusPipeline``) with one condition image per row: the text
    encoder reads a ~384**2-px copy of the image ("Picture 1: <image>" in the prompt), the VAE the
    ``condition_area`` one. 2511's transformer (``zero_cond_t``) gives the condition tokens timestep 0.

    Args: as :class:`QwenImageEditAdapter`, and ``vl_area``: the text encoder image's area (the pipeline's fixed
    384**2, the default).
    """

    family = "qwenimage_edit_plus"
    pipeline_class = "QwenImageEditPlusPipeline"

    def __init__(self, pipe, negative_prompt: str = "", max_sequence_length: int = 512,
                 true_cfg_scale: Optional[float] = None, condition_area: int = DEFAULT_AREA,
                 vl_area: int = DEFAULT_VL_AREA):
        super().__init__(pipe, negative_prompt, max_sequence_length, true_cfg_scale, condition_area)
        if int(vl_area) < 32 * 32:
            raise ValueError(f"vl_area must be at least 32 * 32 px (default 384 * 384), got {vl_area}")
        self.vl_area = int(vl_area)

    def _resized(self, image):
        """As QwenImageEditPlusPipeline: the VAE pixels straight from the image at ``condition_area``, the text
        encoder's image resized at ``vl_area``."""
        proc = self.pipe.image_processor
        pil = _exact_pil(image)
        src = pil if pil is not None else image[None].float()
        ratio = image.shape[-1] / image.shape[-2]
        w, h = condition_dimensions(self.condition_area, ratio)
        vw, vh = condition_dimensions(self.vl_area, ratio)
        vl = proc.resize(src, vh, vw)
        return (vl if pil is not None else _to_pil(vl[0])), proc.preprocess(src, h, w).unsqueeze(2)

    def _prompt(self, prompt, vl_image):
        return self.pipe.encode_prompt(prompt=[prompt], image=[vl_image], device=self.device)
