"""StableDiffusionPipeline (SD1.x/2.x) and StableDiffusionXLPipeline: UNet, epsilon or v-prediction,
sampled with DDIM (the grid of ``DDIMScheduler.from_config(pipe.scheduler.config)``), batched CFG."""

from __future__ import annotations

import torch

from .base import DDIMAdapter


class SDAdapter(DDIMAdapter):
    """SD1.x/2.x adapter. Embeddings: ``encoder_hidden_states`` [B, 77, D]."""

    family = "sd"
    pipeline_class = "StableDiffusionPipeline"
    lora_target_modules = ("to_q", "to_k", "to_v", "to_out.0")  # UNet attention (diffusers' LoRA script, DDPO)
    fsdp_blocks = ("down_blocks", "up_blocks")

    def _encode(self, prompts):
        pe, _ = self.pipe.encode_prompt(prompts, self.device, 1, False)
        return {"encoder_hidden_states": pe}

    def _forward(self, x, timestep, emb, guidance_scale):
        dt = self.dtype
        return self.denoiser(x.to(dt), timestep, encoder_hidden_states=emb["encoder_hidden_states"].to(dt),
                             return_dict=False)[0]


class SDXLAdapter(DDIMAdapter):
    """SDXL adapter. Embeddings: ``encoder_hidden_states`` [B, 77, D1+D2], ``text_embeds`` [B, P]; the
    micro-conditioning ``time_ids = (H, W, 0, 0, H, W)`` is built from the latent size, as the pipeline's
    defaults do. With ``force_zeros_for_empty_prompt`` an empty negative prompt gives zero embeddings."""

    family = "sdxl"
    pipeline_class = "StableDiffusionXLPipeline"
    lora_target_modules = SDAdapter.lora_target_modules
    fsdp_blocks = SDAdapter.fsdp_blocks

    def _encode(self, prompts):
        pe, _, pooled, _ = self.pipe.encode_prompt(prompt=prompts, device=self.device, num_images_per_prompt=1,
                                                   do_classifier_free_guidance=False)
        return {"encoder_hidden_states": pe, "text_embeds": pooled}

    def _encode_negative(self, n, images=None, size=(None, None, None)):
        if not self.negative_prompt and self.pipe.config.get("force_zeros_for_empty_prompt", False):
            ref = self._stack([""])
            return {k: torch.zeros_like(v).expand(n, *v.shape[1:]).clone() for k, v in ref.items()}
        return super()._encode_negative(n, images, size)

    def _forward(self, x, timestep, emb, guidance_scale):
        dt = self.dtype
        vsf = self.pipe.vae_scale_factor
        h, w = x.shape[-2] * vsf, x.shape[-1] * vsf
        time_ids = torch.tensor([[h, w, 0, 0, h, w]], device=x.device, dtype=dt).expand(x.shape[0], 6)
        added = {"text_embeds": emb["text_embeds"].to(dt), "time_ids": time_ids}
        return self.denoiser(x.to(dt), timestep, encoder_hidden_states=emb["encoder_hidden_states"].to(dt),
                             added_cond_kwargs=added, return_dict=False)[0]
