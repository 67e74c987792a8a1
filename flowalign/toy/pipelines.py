"""Tiny diffusers pipelines of every supported family, built in-process with random weights.

No download: the tokenizers are made from a small vocabulary written by this code (byte-level
characters plus whole-word BPE merges for ``words``), the models from small configs. Used by the
tests, and by ``scripts/`` to create the shipped tiny SD3 pipeline (trained on the toy world):
``tiny_sd3_pipeline(...)`` is configurable and its result round-trips through
``save_pretrained`` / ``StableDiffusion3Pipeline.from_pretrained(dir)`` offline.
"""

from __future__ import annotations

from typing import Iterable, Optional, Sequence

import torch

# A small default word list: toy-world vocabulary (shapes, colours, counts, relations).
DEFAULT_WORDS = (
    "a an the of and on in with to is one two three four five six "
    "red green blue yellow purple orange white black gray pink brown "
    "circle circles square squares triangle triangles star stars "
    "above below left right next photo image text sign says"
).split()


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte -> printable unicode map (the alphabet of byte-level BPE)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def _merge_pair(seq: list[str], pair: tuple[str, str]) -> list[str]:
    out, i = [], 0
    while i < len(seq):
        if i + 1 < len(seq) and (seq[i], seq[i + 1]) == pair:
            out.append(seq[i] + seq[i + 1])
            i += 2
        else:
            out.append(seq[i])
            i += 1
    return out


def clip_vocab(words: Iterable[str] = DEFAULT_WORDS) -> tuple[dict[str, int], list[str]]:
    """CLIP BPE vocabulary and merges in which every listed word is ONE token.

    The merges are learned by BPE training on the word list (each word once): start from characters (the last
    one with ``</w>``), repeatedly merge the most frequent adjacent pair (ties: first seen) until every word
    is a single token. Applying learned merges in rank order reproduces the training segmentation, so unlike
    hand-made per-word merge chains, merges of different words cannot collide (``a n`` from "and" splitting
    "triangle"). Every byte character, with and without ``</w>``, stays in the vocabulary for unseen text.
    Returns (vocab, merges as "left right" strings).
    """
    chars = list(_bytes_to_unicode().values())
    seqs = [list(w[:-1]) + [w[-1] + "</w>"] for w in dict.fromkeys(w.lower() for w in words) if w]
    pairs = _learn_merges(seqs)
    tokens = chars + [c + "</w>" for c in chars] + [a + b for a, b in pairs] + ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(tokens))}
    return vocab, [f"{a} {b}" for a, b in pairs]


def _learn_merges(seqs: list[list[str]]) -> list[tuple[str, str]]:
    """BPE training: repeatedly merge the most frequent adjacent pair of ``seqs`` (ties: first seen) until every
    sequence is one token -> the merges in rank order."""
    merges: list[tuple[str, str]] = []
    while True:
        counts: dict[tuple[str, str], int] = {}
        for seq in seqs:
            for pair in zip(seq, seq[1:]):
                counts[pair] = counts.get(pair, 0) + 1
        if not counts:
            return merges
        pair = max(counts, key=counts.get)
        merges.append(pair)
        seqs = [_merge_pair(seq, pair) for seq in seqs]


def tiny_clip_tokenizer(words: Iterable[str] = DEFAULT_WORDS, max_length: int = 16, save_dir: Optional[str] = None):
    """A CLIPTokenizer from a generated vocab.json/merges.txt (written to ``save_dir`` when given)."""
    import json
    import os

    from transformers import CLIPTokenizer

    vocab, merges = clip_vocab(words)
    if save_dir is None:
        return CLIPTokenizer(vocab=vocab, merges=[tuple(m.split(" ")) for m in merges], model_max_length=max_length)
    os.makedirs(save_dir, exist_ok=True)
    vpath, mpath = os.path.join(save_dir, "vocab.json"), os.path.join(save_dir, "merges.txt")
    with open(vpath, "w", encoding="utf-8") as f:
        json.dump(vocab, f)
    with open(mpath, "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    return CLIPTokenizer(vocab=vpath, merges=mpath, model_max_length=max_length)


def tiny_t5_tokenizer(words: Iterable[str] = DEFAULT_WORDS, max_length: int = 16):
    """A T5 (Unigram, fast) tokenizer over ``words`` plus single characters; ids 0/1/2 = pad/eos/unk."""
    from transformers import T5TokenizerFast

    pieces = ["<pad>", "</s>", "<unk>"]
    pieces += ["▁" + w.lower() for w in words] + list("abcdefghijklmnopqrstuvwxyz0123456789") + ["▁"]
    pieces = list(dict.fromkeys(pieces))
    vocab = [(p, 0.0 if i < 3 else -float(len(p) < 3) - 1.0) for i, p in enumerate(pieces)]
    return T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=max_length)


QWEN_SPECIAL_TOKENS = ("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
                       "<|video_pad|>")


# Qwen3's chat template for user turns (Z-Image, FLUX.2 [klein]): the assistant prompt gets an empty thinking
# block only when enable_thinking=False, as the real template does (ZImagePipeline passes True: none)
QWEN3_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{ '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)


def bpe_vocab(words: Iterable[str] = DEFAULT_WORDS, prefix: str = "\u0120") -> tuple[dict[str, int], list[tuple]]:
    """GPT-2-style byte-level BPE vocabulary in which every listed word, preceded by a space (``prefix``: "Ġ"),
    is ONE token: every byte character, then the merges learned by BPE training on the words (as ``clip_vocab``,
    without CLIP's ``</w>`` ends). Returns (vocab, merges as (left, right) pairs)."""
    merges = _learn_merges([list(prefix + w) for w in dict.fromkeys(w.lower() for w in words) if w])
    tokens = list(_bytes_to_unicode().values()) + [a + b for a, b in merges]
    return {tok: i for i, tok in enumerate(dict.fromkeys(tokens))}, merges


def tiny_qwen_tokenizer(words: Iterable[str] = DEFAULT_WORDS, max_length: int = 128):
    """A Qwen2 tokenizer (byte-level BPE, the one of Qwen2.5-VL and Qwen3 text encoders) over ``words``, with
    ``<|endoftext|>`` (pad / eos) and the chat and vision special tokens the pipelines' prompt templates use."""
    from transformers import Qwen2Tokenizer

    vocab, merges = bpe_vocab(words)
    vocab["<|endoftext|>"] = len(vocab)
    tok = Qwen2Tokenizer(vocab=vocab, merges=merges, model_max_length=max_length)
    tok.add_special_tokens({"additional_special_tokens": list(QWEN_SPECIAL_TOKENS)})
    return tok


def tiny_qwen3_encoder(vocab_size: int, hidden: int = 16, layers: int = 2, causal_lm: bool = False):
    """A Qwen3 text model (``Qwen3ForCausalLM`` with ``causal_lm``, else ``Qwen3Model``) with random weights:
    the text encoder of Z-Image and FLUX.2 [klein]."""
    from transformers import Qwen3Config, Qwen3ForCausalLM, Qwen3Model

    cfg = Qwen3Config(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=hidden // 2, max_position_embeddings=512,
                      rope_theta=10000.0, tie_word_embeddings=False)
    return (Qwen3ForCausalLM if causal_lm else Qwen3Model)(cfg)


def _clip_text(vocab_size: int, hidden: int, layers: int, max_pos: int, projection: bool, eos_id: int, proj_dim=None):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=2, max_position_embeddings=max_pos, projection_dim=proj_dim or hidden,
        bos_token_id=eos_id - 1, eos_token_id=eos_id, pad_token_id=eos_id, hidden_act="gelu",
    )
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg)


def _t5_encoder(vocab_size: int, d_model: int, umt5: bool = False):
    from transformers import T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel

    kw = dict(vocab_size=vocab_size, d_model=d_model, d_kv=8, d_ff=2 * d_model, num_layers=1, num_heads=2,
              relative_attention_num_buckets=8, dropout_rate=0.0, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    return UMT5EncoderModel(UMT5Config(**kw)) if umt5 else T5EncoderModel(T5Config(**kw))


def _vae(latent_channels: int, block_out_channels: Sequence[int], shift: Optional[float] = 0.0609, scale: float = 1.5035):
    from diffusers import AutoencoderKL

    n = len(block_out_channels)
    kw = {} if shift is None else dict(shift_factor=shift, use_quant_conv=False, use_post_quant_conv=False)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=latent_channels, block_out_channels=tuple(block_out_channels),
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
        layers_per_block=1, norm_num_groups=min(block_out_channels), scaling_factor=scale, **kw,
    )


def _eval(pipe):
    """Put every module in eval mode (freshly constructed models start in train mode, with dropout)."""
    for comp in pipe.components.values():
        if isinstance(comp, torch.nn.Module):
            comp.eval()
    return pipe


def tiny_sd3_pipeline(
    image_size: int = 32,
    latent_channels: int = 4,
    num_layers: int = 1,
    num_heads: int = 2,
    head_dim: int = 8,
    patch_size: int = 1,
    vae_channels: Sequence[int] = (8, 8),
    text_hidden: int = 16,
    text_layers: int = 1,
    max_text_length: int = 16,
    with_t5: bool = True,
    words: Iterable[str] = DEFAULT_WORDS,
    shift: float = 3.0,
    seed: int = 0,
):
    """A StableDiffusion3Pipeline with random weights.

    image_size: pixel height = width; the VAE downsamples by 2^(len(vae_channels)-1).
    with_t5: a 1-layer T5 (d_model = 2 * text_hidden) so that a saved folder loads with a plain
    ``StableDiffusion3Pipeline.from_pretrained(dir)``. with_t5=False drops T5 (text_encoder_3 = tokenizer_3 =
    None; the pipeline feeds zeros instead); such a folder loads with ``flowalign.models.load_pipeline(dir)``
    or ``from_pretrained(dir, text_encoder_3=None, tokenizer_3=None)`` (diffusers refuses missing components).
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    torch.manual_seed(seed)
    words = list(words)
    tok = tiny_clip_tokenizer(words, max_text_length)
    eos = tok.convert_tokens_to_ids("<|endoftext|>")
    te1 = _clip_text(len(tok), text_hidden, text_layers, max_text_length, True, eos)
    te2 = _clip_text(len(tok), text_hidden, text_layers, max_text_length, True, eos)
    joint_dim = 2 * text_hidden
    te3 = tok3 = None
    if with_t5:
        tok3 = tiny_t5_tokenizer(words, max_text_length)
        te3 = _t5_encoder(len(tok3), joint_dim)
    vsf = 2 ** (len(vae_channels) - 1)
    transformer = SD3Transformer2DModel(
        sample_size=image_size // vsf, patch_size=patch_size, in_channels=latent_channels, out_channels=latent_channels,
        num_layers=num_layers, attention_head_dim=head_dim, num_attention_heads=num_heads,
        joint_attention_dim=joint_dim, caption_projection_dim=num_heads * head_dim, pooled_projection_dim=2 * text_hidden,
        pos_embed_max_size=max(image_size // vsf // patch_size, 8),
    )
    return _eval(StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=shift), vae=_vae(latent_channels, vae_channels),
        text_encoder=te1, tokenizer=tok, text_encoder_2=te2, tokenizer_2=tiny_clip_tokenizer(words, max_text_length),
        text_encoder_3=te3, tokenizer_3=tok3,
    ))


def tiny_flux_pipeline(image_size: int = 16, latent_channels: int = 4, guidance_embeds: bool = True, seed: int = 0,
                       words: Iterable[str] = DEFAULT_WORDS, max_text_length: int = 16):
    """A FluxPipeline (guidance-distilled: ``guidance_embeds=True``) with random weights; VAE downsamples by 2."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(seed)
    words = list(words)
    tok = tiny_clip_tokenizer(words, max_text_length)
    tok2 = tiny_t5_tokenizer(words, max_text_length)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=4 * latent_channels, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=16, axes_dims_rope=[4, 4, 8],
        guidance_embeds=guidance_embeds,
    )
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=4, max_image_seq_len=64
    )
    return _eval(FluxPipeline(
        transformer=transformer, scheduler=scheduler, vae=_vae(latent_channels, (8, 8)),
        text_encoder=_clip_text(len(tok), 16, 1, max_text_length, False, tok.convert_tokens_to_ids("<|endoftext|>")),
        tokenizer=tok, text_encoder_2=_t5_encoder(len(tok2), 16), tokenizer_2=tok2,
    ))


def tiny_sd_pipeline(prediction_type: str = "epsilon", seed: int = 0, words: Iterable[str] = DEFAULT_WORDS,
                     max_text_length: int = 16):
    """A StableDiffusionPipeline (UNet 2 levels, 32px images -> 16x16 latents) with a DDIMScheduler."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    torch.manual_seed(seed)
    tok = tiny_clip_tokenizer(words, max_text_length)
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=16, attention_head_dim=4, norm_num_groups=4,
    )
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type)
    return _eval(StableDiffusionPipeline(
        unet=unet, scheduler=scheduler, vae=_vae(4, (8, 8), shift=None, scale=0.18215),
        text_encoder=_clip_text(len(tok), 16, 1, max_text_length, False, tok.convert_tokens_to_ids("<|endoftext|>")),
        tokenizer=tok, safety_checker=None, feature_extractor=None, image_encoder=None, requires_safety_checker=False,
    ))


def tiny_sdxl_pipeline(prediction_type: str = "epsilon", seed: int = 0, words: Iterable[str] = DEFAULT_WORDS,
                       max_text_length: int = 16):
    """A StableDiffusionXLPipeline (two CLIP encoders, text_time conditioning) with a DDIMScheduler."""
    from diffusers import DDIMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    torch.manual_seed(seed)
    tok = tiny_clip_tokenizer(words, max_text_length)
    eos = tok.convert_tokens_to_ids("<|endoftext|>")
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, transformer_layers_per_block=(1, 1), projection_class_embeddings_input_dim=6 * 8 + 16,
        cross_attention_dim=32, norm_num_groups=4,
    )
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading",
                              prediction_type=prediction_type)
    return _eval(StableDiffusionXLPipeline(
        unet=unet, scheduler=scheduler, vae=_vae(4, (8, 8), shift=None, scale=0.13025),
        text_encoder=_clip_text(len(tok), 16, 1, max_text_length, False, eos), tokenizer=tok,
        text_encoder_2=_clip_text(len(tok), 16, 1, max_text_length, True, eos, proj_dim=16),
        tokenizer_2=tiny_clip_tokenizer(words, max_text_length), force_zeros_for_empty_prompt=True,
    ))


def tiny_wan_pipeline(seed: int = 0, words: Iterable[str] = DEFAULT_WORDS, max_text_length: int = 16):
    """A WanPipeline (text-to-video) with random weights: VAE 8x spatial / 4x temporal, UMT5 text encoder."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel

    torch.manual_seed(seed)
    tok = tiny_t5_tokenizer(words, max_text_length)
    vae = AutoencoderKLWan(base_dim=3, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True], latents_mean=[0.0] * 4, latents_std=[1.0] * 4)
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
        text_dim=16, freq_dim=32, ffn_dim=16, num_layers=1, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    )
    return _eval(WanPipeline(tokenizer=tok, text_encoder=_t5_encoder(len(tok), 16, umt5=True), vae=vae,
                       transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0)))


# the builders of the other families build on the helpers above
