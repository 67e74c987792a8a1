"""Tiny Z-Image pipeline (``ZImagePipeline``) built in-process with random weights.

No download: the Qwen2 byte-level BPE tokenizer and the Qwen3 text encoder of :mod:`flowalign.toy.pipelines` (2
layers, 16 wide: the pipeline reads ``hidden_states[-2]``, the first layer's output), with the Qwen3 chat template
reduced to what ``ZImagePipeline`` renders (one user turn, ``add_generation_prompt=True``, ``enable_thinking=True``:
no think block). Transformer: ``ZImageTransformer2DModel`` (single-stream DiT, 1 main + 1 noise- and 1
context-refiner layer, dim 32, 2 heads of 16, 2x2 patches). VAE: the FLUX-style ``AutoencoderKL`` of the toy
pipelines (4 latent channels, downsampling by 2, scaling and shift factors). 16 px -> latents [4, 8, 8] -> 16 tokens.
Round-trips through ``save_pretrained`` / ``ZImagePipeline.from_pretrained(dir)`` offline.
"""

from __future__ import annotations

from typing import Iterable

import torch

from .pipelines import DEFAULT_WORDS, QWEN3_CHAT_TEMPLATE, _eval, _vae, tiny_qwen3_encoder, tiny_qwen_tokenizer


def tiny_zimage_pipeline(seed: int = 0, words: Iterable[str] = DEFAULT_WORDS, text_hidden: int = 16,
                         text_layers: int = 2, latent_channels: int = 4, dynamic_shift: bool = False):
    """A ZImagePipeline with random weights.

    dynamic_shift: False = the released Z-Image scheduler (``shift=3.0``, no dynamic shifting: the pipeline's ``mu``
    is ignored); True = ``use_dynamic_shifting`` with small ``base/max_image_seq_len`` (4 / 64) so that the ``mu``
    the pipeline computes from the image token count moves the grid at toy sizes.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel

    torch.manual_seed(seed)
    tok = tiny_qwen_tokenizer(list(words))
    tok.chat_template = QWEN3_CHAT_TEMPLATE
    text_encoder = tiny_qwen3_encoder(len(tok), hidden=text_hidden, layers=text_layers)
    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=latent_channels, dim=32, n_layers=1,
        n_refiner_layers=1, n_heads=2, n_kv_heads=2, qk_norm=True, cap_feat_dim=text_hidden, rope_theta=256.0,
        t_scale=1000.0, axes_dims=[4, 6, 6], axes_lens=[1024, 64, 64],
    )
    # the pads the model learns are zeros at init: random ones, so that padding handling is exercised
    with torch.no_grad():
        transformer.x_pad_token.normal_()
        transformer.cap_pad_token.normal_()
    if dynamic_shift:
        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
                                                    base_shift=0.5, max_shift=1.15, base_image_seq_len=4,
                                                    max_image_seq_len=64)
    else:
        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False)
    return _eval(ZImagePipeline(scheduler=scheduler, vae=_vae(latent_channels, (8, 8)), text_encoder=text_encoder,
                                tokenizer=tok, transformer=transformer))
