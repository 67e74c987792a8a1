"""FLUX.2 (Black Forest Labs, 2025; no arXiv paper): ``Flux2KleinPipeline`` (FLUX.2 [klein], family
``flux2_klein``; https://bfl.ai/blog/flux2-klein-towards-interactive-visual-intelligence) and ``Flux2Pipeline``
(FLUX.2 [dev], family ``flux2``).

[klein] text: a Qwen3 causal LM reads the prompt in its chat template (one user turn, ``enable_thinking=False``),
padded to ``max_sequence_length``; the hidden states of ``text_encoder_out_layers`` (default (9, 18, 27)) are
concatenated per token: ``encoder_hidden_states`` [B, L, 3 D]. Guidance: the base model uses real CFG with the empty
negative prompt, ``v = v_null + g (v_c - v_null)`` for ``g > 1``, as two transformer calls; the step-distilled model
(``pipe.config.is_distilled``) ignores the guidance scale (one call). No guidance embedding.

[dev] text: Mistral Small 3.1 (``Mistral3ForConditionalGeneration``) reads the prompt after the pipeline's system
message (``pipe.system_message``), layers (10, 20, 30) stacked the same way. Guidance-distilled: the guidance scale
goes into the guidance embedding (``guidance = g``; the transformer embeds ``1000 g``), one call, no CFG.

Latents: ``AutoencoderKLFlux2`` latents [B, c, 2h, 2w] are 2x2-patchified to [B, 4c, h, w] and batch-normalised with
the VAE's running statistics, ``z = (patchify(x_vae) - mu_bn) / sqrt(var_bn + eps)``; the flow runs on z. flowalign
keeps z UNPACKED as the spatial tensor [B, 4c, h, w] (4c = ``transformer.config.in_channels``, h = H / (2 vsf)); it is
packed to tokens [B, h w, 4c] (row-major) around each transformer call, with 4-D position ids (T, H, W, L): image
tokens (0, i, j, 0), text tokens (0, 0, 0, l). The noise is drawn in this [B, 4c, h, w] shape, as the pipeline does.

Grid: ``sigmas = linspace(1, 1/N, N)`` shifted with ``mu = compute_empirical_mu(h w, N)`` (an empirical fit in the
token count and the step count); the transformer receives ``t / 1000``.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

from .base import FlowAdapter


class Flux2Adapter(FlowAdapter):
    """FLUX.2 [dev] adapter (and the shared FLUX.2 machinery: packing, position ids, grid, decoding).

    Args:
        text_encoder_out_layers: the text encoder's hidden-state indices stacked into the prompt embedding (the
            pipeline's ``text_encoder_out_layers``; pass the same value to ``pipe(...)``); None: the pipeline's default.
    """

    family = "flux2"
    pipeline_class = "Flux2Pipeline"
    default_out_layers = (10, 20, 30)
    # double-stream attention (image + text streams) and the single-stream fused QKV+MLP input projection (the
    # single blocks' output Linear is "attn.to_out", a name the double blocks' to_out ModuleList shares)
    lora_target_modules = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                           "to_qkv_mlp_proj")
    fsdp_blocks = ("transformer_blocks", "single_transformer_blocks")
    cfg_batched = False  # [klein] base: the pipeline calls the transformer once per CFG branch

    def __init__(self, pipe, negative_prompt: str = "", max_sequence_length: int = 512,
                 text_encoder_out_layers: Optional[Sequence[int]] = None):
        super().__init__(pipe, negative_prompt, max_sequence_length)
        layers = self.default_out_layers if text_encoder_out_layers is None else text_encoder_out_layers
        self.text_encoder_out_layers = tuple(int(i) for i in layers)
        cfg = self.pipe.text_encoder.config
        n = getattr(cfg, "text_config", cfg).num_hidden_layers
        if max(self.text_encoder_out_layers) > n:
            raise ValueError(f"text_encoder_out_layers {self.text_encoder_out_layers} reach past the text encoder's "
                             f"{n} layers: pass indices <= {n}")
        self._mu_steps = None

    def call_kwargs(self, guidance_scale, height=None, width=None):
        kw = super().call_kwargs(guidance_scale, height, width)
        return {**kw, "text_encoder_out_layers": self.text_encoder_out_layers}

    def _uses_uncond(self, guidance_scale):
        return False  # guidance-distilled: the scale is embedded, no unconditional branch

    def _encode(self, prompts):
        pe, _ = self.pipe.encode_prompt(prompt=prompts, device=self.device, num_images_per_prompt=1,
                                        max_sequence_length=self.max_sequence_length,
                                        text_encoder_out_layers=self.text_encoder_out_layers)
        return {"encoder_hidden_states": pe}

    def _guidance(self, b, guidance_scale, device):
        return torch.full([b], float(guidance_scale), device=device, dtype=torch.float32)

    def _forward(self, x, timestep, emb, guidance_scale):
        pipe, dt = self.pipe, self.dtype
        txt = emb["encoder_hidden_states"].to(dt)
        out = self.denoiser(
            hidden_states=pipe._pack_latents(x.to(dt)), timestep=timestep.to(self._noise_dtype()) / 1000,
            guidance=self._guidance(x.shape[0], guidance_scale, x.device), encoder_hidden_states=txt,
            txt_ids=pipe._prepare_text_ids(txt).to(x.device), img_ids=pipe._prepare_latent_ids(x).to(x.device),
            return_dict=False,
        )[0]
        b, c, h, w = x.shape
        return out.permute(0, 2, 1).reshape(b, c, h, w)  # tokens [B, h w, C] -> [B, C, h, w] (inverse of the packing)

    def _noise_dtype(self):
        return self.pipe.text_encoder.dtype  # the pipeline draws latents in the prompt embeddings' dtype

    def latent_shape(self, batch_size, height, width, num_frames=None):
        m = 2 * self.pipe.vae_scale_factor
        height = int(height or self.pipe.default_sample_size * self.pipe.vae_scale_factor)
        width = int(width or self.pipe.default_sample_size * self.pipe.vae_scale_factor)
        if height % m or width % m:
            raise ValueError(f"FLUX.2 needs height and width divisible by {m}, got {height}x{width}: round them "
                             f"to a multiple of {m}")
        return (batch_size, self.denoiser.config.in_channels, height // m, width // m)

    # ---- grid -------------------------------------------------------------------------------
    def sampling_grid(self, num_steps, latents):
        self._mu_steps = int(num_steps)  # compute_empirical_mu depends on the step count too
        return super().sampling_grid(num_steps, latents)

    def _grid_sigmas(self, num_steps):
        if self.pipe.scheduler.config.get("use_flow_sigmas", False):
            return None
        return np.linspace(1.0, 1 / num_steps, num_steps)

    def _shift_mu(self, latents):
        from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu

        return compute_empirical_mu(image_seq_len=latents.shape[-2] * latents.shape[-1], num_steps=self._mu_steps)

    # ---- latents, decoding --------------------------------------------------------------------
    def pack(self, latents: torch.Tensor) -> torch.Tensor:
        """[B, C, h, w] -> the transformer's tokens [B, h w, C] (the pipeline's scheduler state; what
        ``Flux2Pipeline(output_type="latent")`` returns)."""
        return self.pipe._pack_latents(latents)

    def vae_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised patchified z [B, 4c, h, w] -> VAE latents [B, c, 2h, 2w]: ``unpatchify(z std_bn + mu_bn)``
        (what ``Flux2KleinPipeline(output_type="latent")`` returns; the decoder's input)."""
        vae = self.pipe.vae
        z = latents.float()
        mean = vae.bn.running_mean.view(1, -1, 1, 1).to(z.device, z.dtype)
        std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(z.device, z.dtype)
        return self.pipe._unpatchify_latents(z * std + mean)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self._vae_decode(self.vae_latents(latents))


class Flux2KleinAdapter(Flux2Adapter):
    """FLUX.2 [klein] adapter: base model (``is_distilled=False``) with real CFG on the empty negative prompt
    (``negative_prompt``), step-distilled model without CFG; no guidance embedding."""

    family = "flux2_klein"
    pipeline_class = "Flux2KleinPipeline"
    default_out_layers = (9, 18, 27)

    @property
    def distilled(self) -> bool:
        return bool(self.pipe.config.get("is_distilled", False))

    def _uses_uncond(self, guidance_scale):
        return guidance_scale > 1.0 and not self.distilled

    def _guidance(self, b, guidance_scale, device):
        return None
