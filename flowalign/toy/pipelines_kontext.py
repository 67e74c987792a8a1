"""A tiny FluxKontextPipeline (FLUX.1 Kontext, image editing) with random weights, built in-process.

FLUX.1 Kontext has the components of FLUX.1 (CLIP + T5 text encoders, a FluxTransformer2DModel, a 16x-packed
AutoencoderKL); only the pipeline differs: the condition image's packed latents are appended to the noisy image
tokens. So the tiny Kontext pipeline takes the tiny FLUX pipeline's components (same seed -> same weights).
"""

from __future__ import annotations

from typing import Iterable

from .pipelines import DEFAULT_WORDS, _eval, tiny_flux_pipeline


def tiny_flux_kontext_pipeline(image_size: int = 16, latent_channels: int = 4, guidance_embeds: bool = True,
                               seed: int = 0, words: Iterable[str] = DEFAULT_WORDS, max_text_length: int = 16):
    """A FluxKontextPipeline with random weights (``torch.manual_seed(seed)``): a 1 + 1 layer FLUX transformer
    (hidden 32), 1-layer CLIP and T5 (hidden 16), a VAE that downsamples by 2 (so sizes are multiples of 4:
    ``vae_scale_factor * 2``). Round-trips through ``save_pretrained`` / ``FluxKontextPipeline.from_pretrained``.
    Call it with ``height=16, width=16, max_area=16 * 16, _auto_resize=False, max_sequence_length=16`` and a
    16 x 16 condition image (the pipeline's default ``max_area`` is 1024**2: it would generate 1024 x 1024)."""
    from diffusers import FluxKontextPipeline

    flux = tiny_flux_pipeline(image_size=image_size, latent_channels=latent_channels, guidance_embeds=guidance_embeds,
                              seed=seed, words=words, max_text_length=max_text_length)
    return _eval(FluxKontextPipeline(**flux.components))
