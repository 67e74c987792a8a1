"""StableDiffusion3Pipeline (SD3 / SD3.5): rectified flow, MMDiT, CLIP-L + CLIP-G (+ T5), batched CFG."""

from __future__ import annotations

import torch

from .base import FlowAdapter


class SD3Adapter(FlowAdapter):
    """SD3 adapter. Embeddings: ``encoder_hidden_states`` [B, L, D], ``pooled_projections`` [B, P].
    The denoiser receives ``timestep = sigma * 1000``; velocity ``v ~ eps - x0``."""

    family = "sd3"
    pipeline_class = "StableDiffusion3Pipeline"
    # Flow-GRPO's SD3 targets: joint attention, both streams
    lora_target_modules = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
                           "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out")
    fsdp_blocks = ("transformer_blocks",)

    def __init__(self, pipe, negative_prompt: str = "", max_sequence_length: int = 256):
        super().__init__(pipe, negative_prompt, max_sequence_length)

    def _encode(self, prompts):
        pe, _, pooled, _ = self.pipe.encode_prompt(
            prompt=prompts, prompt_2=None, prompt_3=None, device=self.device, num_images_per_prompt=1,
            do_classifier_free_guidance=False, max_sequence_length=self.max_sequence_length,
        )
        return {"encoder_hidden_states": pe, "pooled_projections": pooled}

    def _forward(self, x, timestep, emb, guidance_scale):
        dt = self.dtype
        return self.denoiser(
            hidden_states=x.to(dt), timestep=timestep.float(), encoder_hidden_states=emb["encoder_hidden_states"].to(dt),
            pooled_projections=emb["pooled_projections"].to(dt), return_dict=False,
        )[0]

    def latent_shape(self, batch_size, height, width, num_frames=None):
        vsf = self.pipe.vae_scale_factor
        height = height or self.pipe.default_sample_size * vsf
        width = width or self.pipe.default_sample_size * vsf
        return (batch_size, self.denoiser.config.in_channels, height // vsf, width // vsf)

    def _shift_mu(self, latents):
        cfg = self.pipe.scheduler.config
        if not cfg.get("use_dynamic_shifting", False):
            return None
        from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift

        p = self.denoiser.config.patch_size
        seq = (latents.shape[-2] // p) * (latents.shape[-1] // p)
        return calculate_shift(seq, cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096),
                               cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.16))

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        cfg = self.pipe.vae.config
        return self._vae_decode(latents.float() / cfg.scaling_factor + cfg.shift_factor)
