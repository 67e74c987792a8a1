"""Tiny Wan 2.2 / Wan image-to-video pipelines with random weights (no download), for the tests.

- ``tiny_wan22_pipeline``: ``WanPipeline`` with two experts (Wan2.2 A14B layout): ``transformer`` (high noise) for
  ``t >= boundary_ratio * 1000``, ``transformer_2`` (low noise) below.
- ``tiny_wan_i2v_pipeline(version)``: ``WanImageToVideoPipeline``; "2.1": CLIP vision ``image_encoder`` +
  ``image_processor`` (``CLIPImageProcessorPil``, no torchvision), one expert with ``image_dim``; "2.2": A14B, no
  image encoder, two experts; "2.2-5b": TI2V-5B, ``expand_timesteps`` (the first latent frame is the image's).

Same sizes as ``flowalign.toy.pipelines.tiny_wan_pipeline``: VAE 8x spatial / 4x temporal (z_dim 4), 1-layer
transformers of width 16, a 1-layer UMT5. Call with e.g. ``height=32, width=32, num_frames=5,
max_sequence_length=16``. Every pipeline round-trips through ``save_pretrained`` / ``from_pretrained(dir)``.
"""

from __future__ import annotations

from typing import Iterable

import torch

from .pipelines import DEFAULT_WORDS, _eval, _t5_encoder, tiny_t5_tokenizer

Z_DIM = 4
WAN_I2V_VERSIONS = ("2.1", "2.2", "2.2-5b")


def _wan_vae():
    from diffusers import AutoencoderKLWan

    return AutoencoderKLWan(base_dim=3, z_dim=Z_DIM, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                            temperal_downsample=[False, True, True], latents_mean=[0.0] * Z_DIM,
                            latents_std=[1.0] * Z_DIM)


def _wan_transformer(in_channels: int, image_dim=None):
    from diffusers import WanTransformer3DModel

    # image_dim: the CLIP image tokens' width (Wan2.1 I2V); their K/V projections read the inner width (2 x 8)
    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=in_channels,
        out_channels=Z_DIM, text_dim=16, freq_dim=32, ffn_dim=16, num_layers=1, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=32, image_dim=image_dim,
        added_kv_proj_dim=None if image_dim is None else 16,
    )


def _text(words, max_text_length):
    tok = tiny_t5_tokenizer(list(words), max_text_length)
    return tok, _t5_encoder(len(tok), 16, umt5=True)


def tiny_wan22_pipeline(seed: int = 0, boundary_ratio: float = 0.875, shift: float = 5.0,
                        words: Iterable[str] = DEFAULT_WORDS, max_text_length: int = 16):
    """A two-expert ``WanPipeline`` (Wan2.2 T2V A14B layout). With ``shift=5`` the 3-step grid is t = 1000, 909, 714
    and the 2-step one 1000, 833: the default boundary 875 (Wan2.2 T2V's 0.875) gives both experts steps."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

    torch.manual_seed(seed)
    tok, te = _text(words, max_text_length)
    vae = _wan_vae()
    high, low = _wan_transformer(Z_DIM), _wan_transformer(Z_DIM)
    return _eval(WanPipeline(tokenizer=tok, text_encoder=te, vae=vae, transformer=high, transformer_2=low,
                             scheduler=FlowMatchEulerDiscreteScheduler(shift=shift), boundary_ratio=boundary_ratio))


def tiny_clip_vision(image_size: int = 32, hidden: int = 16):
    """(CLIPVisionModel, CLIPImageProcessorPil): 2 layers (the pipeline reads ``hidden_states[-2]``), 8 px patches,
    images resized / cropped to ``image_size``."""
    from transformers import CLIPVisionConfig, CLIPVisionModel
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    cfg = CLIPVisionConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                           num_attention_heads=2, image_size=image_size, patch_size=8, projection_dim=hidden)
    proc = CLIPImageProcessorPil(size={"shortest_edge": image_size},
                                 crop_size={"height": image_size, "width": image_size})
    return CLIPVisionModel(cfg), proc


def tiny_wan_i2v_pipeline(version: str = "2.1", seed: int = 0, boundary_ratio: float = 0.875, shift: float = 5.0,
                          words: Iterable[str] = DEFAULT_WORDS, max_text_length: int = 16):
    """A ``WanImageToVideoPipeline`` with random weights.

    version "2.1": CLIP image encoder, transformer in_channels = 2 z + 4 (noise, mask, condition latents);
    "2.2": two experts (boundary_ratio; Wan2.2 I2V A14B ships 0.9), no image encoder; "2.2-5b": one expert,
    in_channels = z, ``expand_timesteps=True`` (TI2V-5B).
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, WanImageToVideoPipeline

    if version not in WAN_I2V_VERSIONS:
        raise ValueError(f"version must be one of {', '.join(WAN_I2V_VERSIONS)}, got {version!r}")
    torch.manual_seed(seed)
    tok, te = _text(words, max_text_length)
    vae = _wan_vae()
    kw = {}
    if version == "2.1":
        image_encoder, image_processor = tiny_clip_vision()
        kw = dict(transformer=_wan_transformer(2 * Z_DIM + 4, image_dim=16), image_encoder=image_encoder,
                  image_processor=image_processor)
    elif version == "2.2":
        kw = dict(transformer=_wan_transformer(2 * Z_DIM + 4), transformer_2=_wan_transformer(2 * Z_DIM + 4),
                  boundary_ratio=boundary_ratio)
    else:
        kw = dict(transformer=_wan_transformer(Z_DIM), expand_timesteps=True)
    return _eval(WanImageToVideoPipeline(tokenizer=tok, text_encoder=te, vae=vae,
                                         scheduler=FlowMatchEulerDiscreteScheduler(shift=shift), **kw))


TINY_WAN_BUILDERS = {"wan22": tiny_wan22_pipeline, "wan_i2v": tiny_wan_i2v_pipeline}
