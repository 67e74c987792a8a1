"""WanPipeline (Wan2.1 / Wan2.2-TI2V-5B text-to-video): rectified flow on video latents
[B, C, F', h, w], UMT5 text encoder, two-pass CFG (batched here). Frames decode to [B, F, 3, H, W]."""

from __future__ import annotations

import torch

from .base import FlowAdapter


class WanAdapter(FlowAdapter):
    """Wan adapter. Embeddings: ``encoder_hidden_states`` [B, L, D]. The grid is that of the pipeline's
    scheduler (a UniPC scheduler's flow sigmas are used as an Euler grid by our samplers)."""

    family = "wan"
    pipeline_class = "WanPipeline"
    lora_target_modules = ("to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2")  # attention, FFN
    fsdp_blocks = ("blocks",)
    video = True

    def __init__(self, pipe, negative_prompt: str = "", max_sequence_length: int = 512):
        if getattr(pipe, "transformer_2", None) is not None:
            raise NotImplementedError("two-expert Wan2.2 (transformer_2) is not supported: use Wan2.1 or "
                                      "Wan2.2-TI2V-5B, or set pipe.transformer_2 = None to use one expert")
        super().__init__(pipe, negative_prompt, max_sequence_length)

    def _encode(self, prompts):
        pe, _ = self.pipe.encode_prompt(prompt=prompts, do_classifier_free_guidance=False, num_videos_per_prompt=1,
                                        max_sequence_length=self.max_sequence_length, device=self.device)
        return {"encoder_hidden_states": pe}

    def _forward(self, x, timestep, emb, guidance_scale):
        dt = self.dtype
        t = timestep
        if self.pipe.config.get("expand_timesteps", False):  # Wan2.2-5B: one timestep per latent patch
            f, h, w = x.shape[2:]
            t = timestep[:, None].expand(x.shape[0], f * (h // 2) * (w // 2))
        return self.denoiser(hidden_states=x.to(dt), timestep=t, encoder_hidden_states=emb["encoder_hidden_states"].to(dt),
                             return_dict=False)[0]

    def _noise_dtype(self):
        return torch.float32  # WanPipeline draws its noise in float32

    def latent_shape(self, batch_size, height, width, num_frames=None):
        pipe = self.pipe
        height, width, num_frames = height or 480, width or 832, num_frames or 81
        st, ss = pipe.vae_scale_factor_temporal, pipe.vae_scale_factor_spatial
        if num_frames % st != 1:
            raise ValueError(f"num_frames - 1 must be divisible by {st}, got {num_frames}")
        return (batch_size, self.denoiser.config.in_channels, (num_frames - 1) // st + 1, height // ss, width // ss)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """[B, C, F', h, w] -> frames [B, F, 3, H, W] in [0, 1]."""
        vae = self.pipe.vae
        z = latents.float()
        mean = torch.tensor(vae.config.latents_mean, device=z.device).view(1, -1, 1, 1, 1)
        std = torch.tensor(vae.config.latents_std, device=z.device).view(1, -1, 1, 1, 1)
        video = self._vae_decode(z * std + mean)  # [B, 3, F, H, W]
        return video.permute(0, 2, 1, 3, 4)
