"""FluxKontextPipeline (FLUX.1 Kontext, arXiv 2506.15742): in-context image editing with a FLUX.1 transformer.

The transformer's image sequence is ``[noisy tokens (N), condition tokens (M)]``: the condition image is
VAE-encoded (the posterior's mode), ``z_c = (z - shift_factor) * scaling_factor``, packed 2x2 like the noisy
latents ([1, M, 4C]), and its position ids are the latent ids with the first coordinate set to 1 (the noisy
tokens have 0). The output is cut back to the N noisy tokens. Guidance as FLUX.1 (``FluxAdapter``): the guidance
scale goes into the guidance embedding, true CFG ``v = v_null + s (v_c - v_null)`` only when
``true_cfg_scale > 1`` (the null branch edits the same image). Latents are kept UNPACKED, [B, C, h, w].

Sizes: the pipeline rescales the requested size to ``max_area`` at its aspect ratio and floors it to multiples
of ``vae_scale_factor * 2`` (16). Its default ``max_area`` is 1024**2 whatever the size asked for; here the
default (``max_area=None``) is the requested area, so ``height=512`` samples 512 x 512, as
``pipe(..., max_area=512 * 512)``. The condition image is resized to the output size by the pipeline's
``image_processor`` (as ``pipe(image=...)`` with ``_auto_resize=False`` and an image of that size).
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from .flux import FluxAdapter


class FluxKontextAdapter(FluxAdapter):
    """FLUX.1 Kontext adapter: every row edits its own condition image (``encode_prompts(..., images=...)``).

    Args:
        true_cfg_scale: > 1 enables true CFG with ``negative_prompt`` (as ``FluxKontextPipeline(true_cfg_scale=...)``).
        max_area: output area in pixels the requested height x width is rescaled to (the pipeline's
            ``max_area``); None keeps the requested size.
    """

    family = "flux_kontext"
    pipeline_class = "FluxKontextPipeline"
    condition_image = True

    def __init__(self, pipe, negative_prompt: str = "", max_sequence_length: int = 512, true_cfg_scale: float = 1.0,
                 max_area: Optional[int] = None):
        super().__init__(pipe, negative_prompt, max_sequence_length, true_cfg_scale)
        if max_area is not None and int(max_area) <= 0:
            raise ValueError(f"max_area must be a positive number of pixels (e.g. 1024 * 1024), got {max_area}")
        self.max_area = None if max_area is None else int(max_area)

    # ---- sizes ------------------------------------------------------------------------------
    def output_size(self, height: Optional[int], width: Optional[int]) -> tuple[int, int]:
        """(height, width) in pixels the pipeline's ``__call__`` generates for a requested size: the default
        ``default_sample_size * vae_scale_factor``, rescaled to ``max_area`` at the same aspect ratio, floored to
        multiples of ``vae_scale_factor * 2``."""
        pipe = self.pipe
        m = pipe.vae_scale_factor * 2
        height = int(height or pipe.default_sample_size * pipe.vae_scale_factor)
        width = int(width or pipe.default_sample_size * pipe.vae_scale_factor)
        if self.max_area is None:
            if height % m or width % m or height <= 0 or width <= 0:
                raise ValueError(f"FLUX.1 Kontext sizes are multiples of {m} (vae_scale_factor * 2): got {height} x "
                                 f"{width}, use {max(m, height // m * m)} x {max(m, width // m * m)}")
            return height, width
        aspect = width / height
        w = round((self.max_area * aspect) ** 0.5) // m * m
        h = round((self.max_area / aspect) ** 0.5) // m * m
        if h <= 0 or w <= 0:
            raise ValueError(f"max_area {self.max_area} is too small for {height} x {width}: it must hold at least one "
                             f"{m} x {m} patch at that aspect ratio")
        return h, w

    def call_kwargs(self, guidance_scale, height=None, width=None):
        """As FLUX.1's, plus the area the adapter samples at (``max_area``; the requested one when None) and no
        resize of the condition image to the pipeline's preferred resolutions (``_auto_resize=False``)."""
        kw = super().call_kwargs(guidance_scale, height, width)
        h, w = self.output_size(height, width)
        return {**kw, "max_area": self.max_area or h * w, "_auto_resize": False}

    def latent_shape(self, batch_size, height, width, num_frames=None):
        return super().latent_shape(batch_size, *self.output_size(height, width))

    def _grid_sigmas(self, num_steps):
        # unlike FluxPipeline, FluxKontextPipeline ignores use_flow_sigmas: always its linspace
        return np.linspace(1.0, 1 / num_steps, num_steps)

    # ---- the condition image ------------------------------------------------------------------
    def _preprocess(self, image: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """[1, 3, H, W] in [0, 1] -> [1, 3, height, width] in [-1, 1] by the pipeline's image_processor. An image that
        is exactly 8-bit (a PIL image read by flowalign) goes back to PIL, so it is resized as ``pipe(image=PIL)``
        resizes it (Lanczos); other tensors take the processor's tensor path."""
        proc = self.pipe.image_processor
        img = image.float().cpu()
        q = (img * 255).round()
        if torch.equal(q / 255, img):
            from PIL import Image

            img = Image.fromarray(q[0].permute(1, 2, 0).to(torch.uint8).numpy())
        img = proc.resize(img, height, width)
        return proc.preprocess(img, height, width)

    def _encode_image(self, image, height, width, num_frames=None):
        """The condition image -> ``image_latents`` [1, M, 4C] (packed, shifted and scaled VAE mode) and
        ``image_ids`` [1, M, 3] (first coordinate 1), M = (height / 16) (width / 16)."""
        pipe = self.pipe
        h, w = self.output_size(height, width)
        pixels = self._preprocess(image, h, w).to(self.device, pipe.vae.dtype)
        z = pipe._encode_vae_image(pixels, generator=None)  # (mode - shift_factor) * scaling_factor
        _, c, lh, lw = z.shape
        ids = pipe._prepare_latent_image_ids(1, lh // 2, lw // 2, z.device, z.dtype)
        ids[..., 0] = 1
        return {"image_latents": pipe._pack_latents(z, 1, c, lh, lw), "image_ids": ids[None]}

    # ---- prediction -----------------------------------------------------------------------------
    def _forward(self, x, timestep, emb, guidance_scale):
        pipe, dt = self.pipe, self.dtype
        b, c, h, w = x.shape
        packed = pipe._pack_latents(x.to(dt), b, c, h, w)
        n = packed.shape[1]
        ids = emb["image_ids"]
        if ids.shape[0] > 1 and not torch.equal(ids, ids[:1].expand_as(ids)):
            raise ValueError("the condition images of one batch must share one size: encode them with one "
                             "height / width (encode_prompts(..., height=, width=))")
        img_ids = torch.cat([pipe._prepare_latent_image_ids(b, h // 2, w // 2, x.device, dt), ids[0].to(dt)])
        txt, txt_ids, guidance = self._text_inputs(emb, b, x.device, guidance_scale)
        out = self.denoiser(
            hidden_states=torch.cat([packed, emb["image_latents"].to(dt)], dim=1), timestep=timestep.to(dt) / 1000,
            guidance=guidance, pooled_projections=emb["pooled_projections"].to(dt), encoder_hidden_states=txt,
            txt_ids=txt_ids, img_ids=img_ids, return_dict=False,
        )[0]
        vsf = pipe.vae_scale_factor
        return pipe._unpack_latents(out[:, :n], h * vsf, w * vsf, vsf)
