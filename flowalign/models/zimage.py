"""ZImagePipeline (Z-Image / Z-Image-Turbo, Alibaba Tongyi, arXiv 2511.22699): rectified flow with a single-stream
DiT (``ZImageTransformer2DModel``) over [image tokens, caption tokens], Qwen3 text encoder, FLUX-style VAE.

What ``ZImagePipeline.__call__`` does, and the adapter reproduces:

- prompt: Qwen3 chat template (one user turn, ``add_generation_prompt=True``, ``enable_thinking=True``), padded to
  ``max_sequence_length`` (512), ``hidden_states[-2]`` of the text encoder, then only the real tokens: a
  variable-length caption [L_i, D] per prompt. Kept here zero-padded, ``encoder_hidden_states`` [B, L, D], with
  its token mask ``encoder_attention_mask`` [B, L] (bool); each row is cut back to its L_i tokens for the call.
- the transformer takes LISTS: latents [C, 1, h, w] per sample (a frame axis of 1), the timestep
  ``(1000 - t) / 1000`` (= 1 - sigma: 0 is noise, 1 is clean) and the caption list; it returns a list of
  [C, 1, h, w] predictions of ``x0 - eps``. The scheduler steps with ``-output``, the velocity ``v ~ eps - x0``
  with ``x_{k+1} = x_k + (sigma_{k+1} - sigma_k) v``: ``_forward`` returns that velocity.
- grid: ``sigmas = torch.linspace(1, 1 / N, N)`` through the scheduler's shift, with ``mu = calculate_shift(
  (h / 2) (w / 2), ...)`` always passed (used only when the scheduler has ``use_dynamic_shifting``).
- noise: float32 [B, C, 2 (H // 16), 2 (W // 16)] (VAE factor 8, 2x2 patches); decoding ``z / scaling + shift``.

Guidance (``guidance_scale`` here = the pipeline's ``guidance_scale + 1``, the standard CFG form shared by every
flowalign family: CFG when > 1, ``predict(..., 1.0)`` is the conditional model; see :meth:`ZImageAdapter.
pipeline_guidance_scale`). With the pipeline's scale ``g = guidance_scale - 1 > 0``, per sample:

    v = v_c + g (v_c - v_null)                                    (= v_null + guidance_scale (v_c - v_null))
    cfg_normalization = r > 0:  v <- v * min(1, r ||v_c|| / ||v||)   (norms over the whole sample [C, h, w])
    cfg_truncation = c <= 1:    no CFG (v = v_c, one [B] call) at the steps with (1000 - t) / 1000 > c

The two branches run in one call on [2B] rows, conditional rows first (the pipeline's order).
"""

from __future__ import annotations

import torch

from .base import Conditioning, FlowAdapter


class ZImageAdapter(FlowAdapter):
    """Z-Image adapter. Latents [B, C, h, w] float32 (C = 16 for the released model, h = 2 (H // 16)).

    Args:
        negative_prompt: text of the unconditional branch ("" as the pipeline's default).
        max_sequence_length: caption token length (chat template included), as the pipeline's (512).
        cfg_normalization: r, as ``ZImagePipeline(cfg_normalization=r)`` (False / 0 = off, True = 1): the guided
            velocity's norm is capped at r times the conditional one's.
        cfg_truncation: c, as ``ZImagePipeline(cfg_truncation=c)`` (default 1.0: never): CFG is switched off at the
            steps whose normalised time ``(1000 - t) / 1000`` exceeds c (the last ones); a value > 1 also never.
    """

    family = "zimage"
    pipeline_class = "ZImagePipeline"
    # single-stream attention and SwiGLU feed-forward of every block (main layers and both refiners)
    lora_target_modules = ("attention.to_q", "attention.to_k", "attention.to_v", "attention.to_out.0",
                           "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")
    fsdp_blocks = ("noise_refiner", "context_refiner", "layers")

    def __init__(self, pipe, negative_prompt: str = "", max_sequence_length: int = 512,
                 cfg_normalization: float = 0.0, cfg_truncation: float = 1.0):
        super().__init__(pipe, negative_prompt, max_sequence_length)
        self.cfg_normalization = float(cfg_normalization)
        self.cfg_truncation = float(cfg_truncation)
        if self.cfg_normalization < 0:
            raise ValueError(f"cfg_normalization must be >= 0 (0 = off), got {cfg_normalization}")

    @staticmethod
    def pipeline_guidance_scale(guidance_scale: float) -> float:
        """The ``ZImagePipeline(guidance_scale=...)`` equal to flowalign's ``guidance_scale``: ``guidance_scale - 1``
        (the pipeline guides with ``v_c + g (v_c - v_null)``; Z-Image-Turbo's g = 0 is flowalign's 1)."""
        return float(guidance_scale) - 1.0

    def call_kwargs(self, guidance_scale, height=None, width=None):
        kw = super().call_kwargs(guidance_scale, height, width)
        return {**kw, "guidance_scale": self.pipeline_guidance_scale(guidance_scale),
                "cfg_normalization": self.cfg_normalization, "cfg_truncation": self.cfg_truncation}

    # ---- prompts --------------------------------------------------------------------------------
    def _encode(self, prompts):
        pipe, n = self.pipe, self.max_sequence_length
        caps = pipe._encode_prompt(prompt=list(prompts), device=self.device, max_sequence_length=n)  # [L_i, D] each
        emb = caps[0].new_zeros(len(caps), n, caps[0].shape[-1])
        mask = torch.zeros(len(caps), n, dtype=torch.bool, device=emb.device)
        for i, c in enumerate(caps):
            emb[i, : c.shape[0]] = c
            mask[i, : c.shape[0]] = True
        return {"encoder_hidden_states": emb, "encoder_attention_mask": mask}

    # ---- prediction -----------------------------------------------------------------------------
    def _forward(self, x, timestep, emb, guidance_scale):
        dt = self.dtype
        caps = [e[m].to(dt) for e, m in zip(emb["encoder_hidden_states"], emb["encoder_attention_mask"])]
        t = (1000 - timestep.float()) / 1000
        out = self.denoiser(list(x.to(dt).unsqueeze(2).unbind(0)), t, caps, return_dict=False)[0]
        return -torch.stack([o.float() for o in out]).squeeze(2)

    def _uses_uncond(self, guidance_scale):
        return self.pipeline_guidance_scale(guidance_scale) > 0

    def _truncated(self, t: torch.Tensor) -> torch.Tensor:
        """[B] bool: rows whose step has CFG switched off by ``cfg_truncation`` (normalised time > c)."""
        if self.cfg_truncation > 1:
            return torch.zeros(t.shape, dtype=torch.bool)
        return torch.tensor([(1000 - v) / 1000 > self.cfg_truncation for v in t.float().cpu().tolist()])

    def predict(self, x: torch.Tensor, timestep, cond: Conditioning, guidance_scale: float = 1.0) -> torch.Tensor:
        """Velocity with Z-Image's CFG (module docstring), float32 [B, C, h, w]. Rows of one batch may have
        different timesteps; where ``cfg_truncation`` switches CFG off for only some of them, those take the
        conditional branch of the [2B] call (the pipeline, with one timestep per step, makes one [B] call)."""
        b = x.shape[0]
        t = torch.as_tensor(timestep, device=x.device)
        t = (t.expand(b) if t.dim() == 0 else t).to(x.device)
        if not self._uses_uncond(guidance_scale):
            return self._forward(x, t, cond.cond, guidance_scale)
        if cond.uncond is None:
            raise ValueError(f"guidance_scale {guidance_scale} needs unconditional embeddings: call "
                             f"encode_prompts(prompts, guidance_scale={guidance_scale})")
        off = self._truncated(t)
        if bool(off.all()):
            return self._forward(x, t, cond.cond, guidance_scale)
        if self.cfg_batched:
            emb = {k: torch.cat([cond.cond[k], cond.uncond[k]]) for k in cond.cond}
            v_c, v_null = self._forward(torch.cat([x, x]), torch.cat([t, t]), emb, guidance_scale).chunk(2)
        else:
            v_c = self._forward(x, t, cond.cond, guidance_scale)
            v_null = self._forward(x, t, cond.uncond, guidance_scale)
        v = v_c + self.pipeline_guidance_scale(guidance_scale) * (v_c - v_null)
        if self.cfg_normalization > 0:
            v = torch.stack([self._renormalise(v[j], v_c[j]) for j in range(b)])
        return torch.where(off.to(x.device).view(-1, *[1] * (x.dim() - 1)), v_c, v) if bool(off.any()) else v

    def _renormalise(self, v: torch.Tensor, v_c: torch.Tensor) -> torch.Tensor:
        """One sample: ``v * (r ||v_c|| / ||v||)`` when ``||v|| > r ||v_c||``, else v (the pipeline's formula)."""
        cap = torch.linalg.vector_norm(v_c) * self.cfg_normalization
        norm = torch.linalg.vector_norm(v)
        return torch.where(norm > cap, v * (cap / norm), v)

    # ---- latents, grid, decoding ----------------------------------------------------------------
    def latent_shape(self, batch_size, height, width, num_frames=None):
        vsf = self.pipe.vae_scale_factor
        height, width = int(height or 1024), int(width or 1024)  # the pipeline's default size
        if height % (2 * vsf) or width % (2 * vsf):
            raise ValueError(f"Z-Image needs height and width divisible by {2 * vsf} (VAE factor {vsf} x 2x2 "
                             f"patches), got {height}x{width}: pick e.g. {height // (2 * vsf) * 2 * vsf}")
        return (batch_size, self.denoiser.config.in_channels, 2 * (height // (vsf * 2)), 2 * (width // (vsf * 2)))

    def _noise_dtype(self):
        return torch.float32  # the pipeline draws float32 noise whatever the model dtype

    def _grid_sigmas(self, num_steps):
        return torch.linspace(1.0, 1 / num_steps, num_steps).tolist()  # get_default_z_image_sigmas

    def _shift_mu(self, latents):
        from diffusers.pipelines.z_image.pipeline_z_image import calculate_shift

        cfg = self.pipe.scheduler.config
        seq = (latents.shape[-2] // 2) * (latents.shape[-1] // 2)
        return calculate_shift(seq, cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096),
                               cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15))

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        cfg = self.pipe.vae.config
        return self._vae_decode(latents.float() / cfg.scaling_factor + cfg.shift_factor)
