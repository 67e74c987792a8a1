"""WanImageToVideoPipeline (Wan, arXiv 2503.20314): the video's first frame is a condition image. Flow latents
[B, z, F', h, w] (F' = (F - 1) / 4 + 1), UMT5 text, two-pass CFG (batched here); the null branch sees the same image.

Variants, as ``WanImageToVideoPipeline.__call__`` / ``prepare_latents`` build them:

- Wan2.1 I2V (``transformer.config.image_dim`` set): CLIP vision tokens ``encoder_hidden_states_image`` [1, L, D]
  (``image_encoder(image_processor(image)).hidden_states[-2]``), and the denoiser input ``cat([x, mask, y])``
  along channels (in_channels = 2 z + 4): ``y = (E(cat[image, 0 x (F - 1) frames]) - mean) / std`` (VAE mode),
  ``mask`` [1, 4, F', h, w] = 1 on the first frame's 4 temporal slots, 0 elsewhere.
- Wan2.2 I2V A14B: the same without image tokens, and two experts (high / low noise, see ``WanAdapter``).
- Wan2.2-TI2V-5B (``expand_timesteps``): ``y = (E(image) - mean) / std`` [1, z, 1, h, w] replaces the first latent
  frame of the input, ``x_in = (1 - m) y + m x`` (m = 0 on frame 0), and each token gets its own timestep
  (0 on frame 0, t elsewhere). The pipeline ignores the denoiser's output on frame 0 and replaces that frame with
  y at the end; here the output on frame 0 is the velocity of the clean frame y, ``v0 = (x0 - y) / sigma`` with
  sigma = t / num_train_timesteps, so every sampler ends frame 0 on y (ODE: exactly up to rounding), its
  transitions do not depend on the weights, and ``decode`` needs no condition.
"""

from __future__ import annotations

import torch

from .wan import WanAdapter

DEFAULT_SIZE = (480, 832, 81)  # WanImageToVideoPipeline.__call__: height, width, num_frames


class WanI2VAdapter(WanAdapter):
    """Wan image-to-video adapter (``condition_image``: every row has a first-frame image).

    Embeddings: ``encoder_hidden_states`` [B, L, D], ``condition`` ([B, 4 + z, F', h, w] mask and image latents,
    or TI2V-5B's [B, z, 1, h, w] first-frame latents), ``encoder_hidden_states_image`` [B, L_img, D_img] (Wan2.1).
    Options as :class:`WanAdapter` (``guidance_scale_2``, ``lora_experts`` for Wan2.2 A14B).
    """

    family = "wan_i2v"
    pipeline_class = "WanImageToVideoPipeline"
    # + the image cross-attention's K/V (Wan2.1 I2V; absent in Wan2.2 I2V, peft then skips them)
    lora_target_modules = WanAdapter.lora_target_modules + ("add_k_proj", "add_v_proj")
    condition_image = True

    @property
    def expand_timesteps(self) -> bool:
        return bool(self.pipe.config.get("expand_timesteps", False))

    def _latent_channels(self) -> int:
        return self.pipe.vae.config.z_dim  # the noise has z channels; the mask and image latents are appended

    # ---- the condition image -------------------------------------------------------------------
    def _encode_image(self, image, height, width, num_frames=None):
        """image [1, 3, H, W] in [0, 1] -> ``condition`` (+ ``encoder_hidden_states_image``) [1, ...]."""
        pipe = self.pipe
        h0, w0, f0 = DEFAULT_SIZE
        height, width, num_frames = height or h0, width or w0, num_frames or f0
        if height % 16 or width % 16:
            raise ValueError(f"Wan image-to-video needs height and width divisible by 16, got {height} x {width}: "
                             "set sampling.resolution to a multiple of 16")
        st = pipe.vae_scale_factor_temporal
        if num_frames % st != 1:
            raise ValueError(f"num_frames - 1 must be divisible by {st}, got {num_frames}")
        pil = _exact_pil(image[0])
        out = {}
        if self.denoiser.config.get("image_dim", None) is not None:  # Wan2.1: CLIP tokens of the image as given
            out["encoder_hidden_states_image"] = pipe.encode_image(pil if pil is not None else _to_pil(image[0]),
                                                                   self.device)
        img = pipe.video_processor.preprocess(pil if pil is not None else image, height=height, width=width)
        out["condition"] = self._condition(img.to(self.device, torch.float32), height, width, num_frames)
        return out

    def _condition(self, image, height, width, num_frames):
        """``prepare_latents``' condition for one row: image [1, 3, H, W] in [-1, 1]."""
        from diffusers.pipelines.wan.pipeline_wan_i2v import retrieve_latents

        vae, pipe = self.pipe.vae, self.pipe
        image = image.unsqueeze(2)  # [1, 3, 1, H, W]
        video = image if self.expand_timesteps else torch.cat(
            [image, image.new_zeros(1, image.shape[1], num_frames - 1, height, width)], dim=2)
        lat = retrieve_latents(vae.encode(video.to(vae.dtype)), sample_mode="argmax").to(torch.float32)
        mean = torch.tensor(vae.config.latents_mean).view(1, vae.config.z_dim, 1, 1, 1).to(lat.device, lat.dtype)
        inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, vae.config.z_dim, 1, 1, 1).to(lat.device, lat.dtype)
        lat = (lat - mean) * inv_std
        if self.expand_timesteps:
            return lat
        st, ss = pipe.vae_scale_factor_temporal, pipe.vae_scale_factor_spatial
        lh, lw = height // ss, width // ss
        mask = torch.ones(1, 1, num_frames, lh, lw)
        mask[:, :, list(range(1, num_frames))] = 0
        first = torch.repeat_interleave(mask[:, :, 0:1], dim=2, repeats=st)
        mask = torch.concat([first, mask[:, :, 1:, :]], dim=2).view(1, -1, st, lh, lw).transpose(1, 2)
        return torch.concat([mask.to(lat.device), lat], dim=1)

    # ---- prediction ---------------------------------------------------------------------------
    def _expert_forward(self, den, x, timestep, emb):
        dt = self.dtype
        cond = emb["condition"]
        image_tokens = emb.get("encoder_hidden_states_image")
        if self.expand_timesteps:
            keep = torch.ones(1, 1, *x.shape[2:], device=x.device, dtype=x.dtype)
            keep[:, :, 0] = 0
            inp = ((1 - keep) * cond + keep * x).to(dt)
            t = (keep[0, 0][:, ::2, ::2].flatten()[None] * timestep[:, None])  # per-token timesteps [b, seq]
        else:
            inp, t = torch.cat([x, cond], dim=1).to(dt), timestep
        out = den(hidden_states=inp, timestep=t, encoder_hidden_states=emb["encoder_hidden_states"].to(dt),
                  encoder_hidden_states_image=None if image_tokens is None else image_tokens.to(dt),
                  return_dict=False)[0]
        if self.expand_timesteps:  # frame 0: the clean frame's velocity (module docstring)
            sigma = (timestep.float() / self.pipe.scheduler.config.num_train_timesteps).view(-1, 1, 1, 1)
            out = out.clone()
            out[:, :, 0] = ((x[:, :, 0].float() - cond[:, :, 0].float()) / sigma).to(out.dtype)
        return out


def _exact_pil(image: torch.Tensor):
    """[3, H, W] in [0, 1] -> the PIL image it came from when its values are k / 255 (then the pipeline's PIL path is
    reproduced exactly), else None."""
    q = (image * 255).round()
    if not torch.equal((q / 255).float(), image.float()):
        return None
    return _to_pil(image)


def _to_pil(image: torch.Tensor):
    """[3, H, W] in [0, 1] -> 8-bit PIL (the CLIP image processor reads 8-bit images)."""
    import numpy as np
    from PIL import Image

    arr = (image.float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(np.ascontiguousarray(arr))
