"""Tiny FLUX.2 pipelines (``Flux2KleinPipeline``, ``Flux2Pipeline``) built in-process with random weights.

No download. [klein]: the Qwen2 byte-level BPE tokenizer and the Qwen3 text encoder of :mod:`flowalign.toy.pipelines`,
with a minimal Qwen3 chat template (one user turn, ``enable_thinking=False``); 27 layers (16 wide) so the pipeline's
default ``text_encoder_out_layers=(9, 18, 27)`` works unchanged. [dev]: a tiny ``Mistral3ForConditionalGeneration``
(1-layer Pixtral vision tower, 30-layer Mistral text model for the default layers (10, 20, 30)); its tokenizer is the
same byte-level BPE with a Mistral-style chat template (``[SYSTEM_PROMPT]...[/SYSTEM_PROMPT][INST]...[/INST]``) in
place of the real ``PixtralProcessor``, which needs torchvision; the pipeline's text-to-image path only calls its
``apply_chat_template``. The transformer reads the three layers concatenated (``joint_attention_dim = 3 * 16``).
VAE: ``AutoencoderKLFlux2`` downsampling by 2, 4 latent channels, 2x2-patchified to 16 (the transformer's
``in_channels``), with random batch-norm statistics so the latent normalisation is exercised. 16 px -> 4 x 4 tokens.
"""

from __future__ import annotations

import re
from typing import Iterable

import torch

from .pipelines import DEFAULT_WORDS, QWEN3_CHAT_TEMPLATE, _eval, tiny_qwen3_encoder, tiny_qwen_tokenizer


def _flux2_vae(latent_channels: int = 4, block_out_channels=(8, 8)):
    """AutoencoderKLFlux2 with random weights and random (fixed) batch-norm running statistics."""
    from diffusers import AutoencoderKLFlux2

    n = len(block_out_channels)
    vae = AutoencoderKLFlux2(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n, block_out_channels=tuple(block_out_channels), layers_per_block=1,
        latent_channels=latent_channels, norm_num_groups=min(block_out_channels), sample_size=16,
        mid_block_add_attention=False,
    )
    with torch.no_grad():
        vae.bn.running_mean.copy_(0.3 * torch.randn_like(vae.bn.running_mean))
        vae.bn.running_var.copy_(0.5 + torch.rand_like(vae.bn.running_var))
    return vae


def _flux2_transformer(in_channels: int, joint_dim: int, guidance_embeds: bool):
    from diffusers import Flux2Transformer2DModel

    return Flux2Transformer2DModel(
        patch_size=1, in_channels=in_channels, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=joint_dim, timestep_guidance_channels=32, mlp_ratio=2.0,
        axes_dims_rope=(4, 4, 4, 4), rope_theta=2000, guidance_embeds=guidance_embeds,
    )


def _flux2_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    # as FLUX.2's scheduler_config.json: dynamic shifting with the mu the pipeline computes (compute_empirical_mu)
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
                                           base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                                           max_image_seq_len=4096, time_shift_type="exponential")


def tiny_flux2_klein_pipeline(is_distilled: bool = False, seed: int = 0, words: Iterable[str] = DEFAULT_WORDS,
                              text_hidden: int = 16, text_layers: int = 27, latent_channels: int = 4):
    """A Flux2KleinPipeline with random weights (FLUX.2 [klein]).

    is_distilled: False = the base model (real CFG with the empty negative prompt when guidance_scale > 1);
    True = the step-distilled model (guidance ignored). text_layers must reach the pipeline's
    ``text_encoder_out_layers`` (default (9, 18, 27)).
    """
    from diffusers import Flux2KleinPipeline

    torch.manual_seed(seed)
    tok = tiny_qwen_tokenizer(list(words))
    tok.chat_template = QWEN3_CHAT_TEMPLATE
    te = tiny_qwen3_encoder(len(tok), hidden=text_hidden, layers=text_layers, causal_lm=True)
    transformer = _flux2_transformer(4 * latent_channels, 3 * text_hidden, guidance_embeds=False)
    return _eval(Flux2KleinPipeline(scheduler=_flux2_scheduler(), vae=_flux2_vae(latent_channels), text_encoder=te,
                                    tokenizer=tok, transformer=transformer, is_distilled=is_distilled))


# the [dev] tokenizer's chat template: Mistral's layout for a system turn and user turns (text parts only)
MISTRAL_CHAT_TEMPLATE = (
    "{%- for message in messages %}{%- if message['content'] is string %}{%- set text = message['content'] %}"
    "{%- else %}{%- set text = message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') "
    "| join('') %}{%- endif %}"
    "{%- if message['role'] == 'system' %}{{ '[SYSTEM_PROMPT]' + text + '[/SYSTEM_PROMPT]' }}"
    "{%- elif message['role'] == 'user' %}{{ '[INST]' + text + '[/INST]' }}{%- else %}{{ text + '</s>' }}{%- endif %}"
    "{%- endfor %}"
)
MISTRAL_SPECIAL_TOKENS = ("[IMG]", "[IMG_BREAK]", "[IMG_END]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[INST]",
                          "[/INST]")


def tiny_flux2_pipeline(seed: int = 0, words: Iterable[str] = DEFAULT_WORDS, text_hidden: int = 16,
                        text_layers: int = 30, latent_channels: int = 4):
    """A Flux2Pipeline (FLUX.2 [dev], guidance-distilled: guidance embedding) with random weights. The words of
    the pipeline's system message are single tokens, so it takes ~40 of the ``max_sequence_length`` tokens."""
    from diffusers import Flux2Pipeline
    from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration, MistralConfig, PixtralVisionConfig

    torch.manual_seed(seed)
    tok = tiny_qwen_tokenizer(list(words) + re.findall(r"[A-Za-z]+", SYSTEM_MESSAGE))
    tok.add_tokens(list(MISTRAL_SPECIAL_TOKENS), special_tokens=True)
    tok.chat_template = MISTRAL_CHAT_TEMPLATE
    d = text_hidden
    cfg = Mistral3Config(
        vision_config=PixtralVisionConfig(hidden_size=d, intermediate_size=2 * d, num_hidden_layers=1,
                                          num_attention_heads=2, head_dim=d // 2, image_size=32, patch_size=16),
        text_config=MistralConfig(vocab_size=len(tok), hidden_size=d, intermediate_size=2 * d,
                                  num_hidden_layers=text_layers, num_attention_heads=2, num_key_value_heads=1,
                                  head_dim=d // 2, max_position_embeddings=512),
        image_token_index=tok.convert_tokens_to_ids("[IMG]"), spatial_merge_size=1, tie_word_embeddings=False,
    )
    te = Mistral3ForConditionalGeneration(cfg)
    transformer = _flux2_transformer(4 * latent_channels, 3 * d, guidance_embeds=True)
    return _eval(Flux2Pipeline(scheduler=_flux2_scheduler(), vae=_flux2_vae(latent_channels), text_encoder=te,
                               tokenizer=tok, transformer=transformer))
