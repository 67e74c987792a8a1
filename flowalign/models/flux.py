"""FluxPipeline (FLUX.1): guidance-distilled rectified flow. The guidance scale goes into the guidance
embedding; true CFG (two passes) only when ``true_cfg_scale > 1``. Latents are kept UNPACKED,
[B, C, h, w]; they are packed into 2x2 patches around each transformer call."""

from __future__ import annotations

import numpy as np
import torch

from .base import FlowAdapter


class FluxAdapter(FlowAdapter):
    """FLUX adapter.

    Args:
        true_cfg_scale: > 1 enables true CFG ``v = v_null + s (v_c - v_null)`` with ``negative_prompt``
            (as ``FluxPipeline(true_cfg_scale=...)``); the default 1 uses the guidance embedding only.
    """

    family = "flux"
    pipeline_class = "FluxPipeline"
    # double-stream attention (+ context stream) and single-stream attention
    lora_target_modules = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
    fsdp_blocks = ("transformer_blocks", "single_transformer_blocks")

    def __init__(self, pipe, negative_prompt: str = "", max_sequence_length: int = 512, true_cfg_scale: float = 1.0):
        super().__init__(pipe, negative_prompt, max_sequence_length)
        self.true_cfg_scale = float(true_cfg_scale)

    def _uses_uncond(self, guidance_scale):
        return self.true_cfg_scale > 1.0

    def call_kwargs(self, guidance_scale, height=None, width=None):
        kw = super().call_kwargs(guidance_scale, height, width)
        if self.true_cfg_scale > 1.0:  # FluxPipeline runs true CFG only when it is given a negative prompt
            kw.update(true_cfg_scale=self.true_cfg_scale, negative_prompt=self.negative_prompt)
        return kw

    def _cfg_scale(self, guidance_scale):
        return self.true_cfg_scale

    def _encode(self, prompts):
        pe, pooled, _ = self.pipe.encode_prompt(
            prompt=prompts, prompt_2=None, device=self.device, num_images_per_prompt=1,
            max_sequence_length=self.max_sequence_length,
        )
        return {"encoder_hidden_states": pe, "pooled_projections": pooled}

    def _text_inputs(self, emb, b, device, guidance_scale):
        """The transformer's text side: ``encoder_hidden_states`` [B, L, D], ``txt_ids`` zeros [L, 3], and the
        embedded ``guidance`` [B] float32 (None for a model without a guidance embedding, e.g. FLUX.1 [schnell])."""
        txt = emb["encoder_hidden_states"].to(self.dtype)
        txt_ids = torch.zeros(txt.shape[1], 3, device=device, dtype=self.dtype)
        guidance = None
        if self.denoiser.config.guidance_embeds:
            guidance = torch.full([b], float(guidance_scale), device=device, dtype=torch.float32)
        return txt, txt_ids, guidance

    def _forward(self, x, timestep, emb, guidance_scale):
        pipe, dt = self.pipe, self.dtype
        b, c, h, w = x.shape
        packed = pipe._pack_latents(x.to(dt), b, c, h, w)
        img_ids = pipe._prepare_latent_image_ids(b, h // 2, w // 2, x.device, dt)
        txt, txt_ids, guidance = self._text_inputs(emb, b, x.device, guidance_scale)
        out = self.denoiser(
            hidden_states=packed, timestep=timestep.to(dt) / 1000, guidance=guidance,
            pooled_projections=emb["pooled_projections"].to(dt), encoder_hidden_states=txt, txt_ids=txt_ids,
            img_ids=img_ids, return_dict=False,
        )[0]
        vsf = pipe.vae_scale_factor
        return pipe._unpack_latents(out, h * vsf, w * vsf, vsf)

    def latent_shape(self, batch_size, height, width, num_frames=None):
        vsf = self.pipe.vae_scale_factor
        height = height or self.pipe.default_sample_size * vsf
        width = width or self.pipe.default_sample_size * vsf
        c = self.denoiser.config.in_channels // 4
        return (batch_size, c, 2 * (int(height) // (vsf * 2)), 2 * (int(width) // (vsf * 2)))

    def _grid_sigmas(self, num_steps):
        if self.pipe.scheduler.config.get("use_flow_sigmas", False):
            return None
        return np.linspace(1.0, 1 / num_steps, num_steps)

    def _shift_mu(self, latents):
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        cfg = self.pipe.scheduler.config
        seq = (latents.shape[-2] // 2) * (latents.shape[-1] // 2)
        return calculate_shift(seq, cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096),
                               cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15))

    def pack(self, latents: torch.Tensor) -> torch.Tensor:
        """[B, C, h, w] -> the pipeline's packed [B, h/2 * w/2, 4C] (e.g. to compare with ``output_type="latent"``)."""
        b, c, h, w = latents.shape
        return self.pipe._pack_latents(latents, b, c, h, w)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        cfg = self.pipe.vae.config
        return self._vae_decode(latents.float() / cfg.scaling_factor + cfg.shift_factor)
