"""Tiny Qwen-Image pipelines (QwenImagePipeline, QwenImageEditPipeline, QwenImageEditPlusPipeline) with random
weights, built in-process (no download).

Components: a 2-layer ``QwenImageTransformer2DModel`` (hidden 32), a 1-layer ``Qwen2_5_VLForConditionalGeneration``
text encoder (hidden 16, a 1-block vision tower), a Wan-like ``AutoencoderKLQwenImage`` that downsamples 8x
(z_dim 4, non-trivial ``latents_mean`` / ``latents_std``) and a byte-level BPE ``Qwen2Tokenizer``. The tokenizer's
vocabulary holds the words of the pipelines' system prompts as single tokens, so the prompt template's system
part is exactly the ``prompt_template_encode_start_idx`` tokens the pipelines drop (34 for Qwen-Image, 64 for the
edit pipelines), as with the real tokenizer: the kept embeddings start at the user's prompt.
"""

from __future__ import annotations

import functools
from contextlib import contextmanager
from typing import Iterable, Optional

import torch

from .pipelines import DEFAULT_WORDS, QWEN_SPECIAL_TOKENS, _bytes_to_unicode, _eval, _learn_merges

# words of QwenImagePipeline's / QwenImageEditPipeline's system prompts
TEMPLATE_WORDS = (
    "describe the image by detailing color shape size texture quantity text spatial relationships of objects and "
    "background key features input then explain how user's instruction should alter or modify generate new that "
    "meets requirements while maintaining consistency with original where appropriate"
).split()
# pre-tokens of the templates that are not a lower-case word after a space (Qwen2's pre-tokenizer splits
# " (color" into " (" + "color", "user's" into "user" + "'s")
TEMPLATE_PIECES = ("system", "user", "assistant", "Describe", "Picture", "color", "'s", "),", "\u0120(",
                   "\u0120Generate")


def tiny_qwen_template_tokenizer(words: Iterable[str] = DEFAULT_WORDS, max_length: int = 1024):
    """A Qwen2Tokenizer (byte-level BPE) whose vocabulary has every word of ``words`` and of the Qwen-Image prompt
    templates as one token (``"Ġ" + word``, and the ``TEMPLATE_PIECES``), ``<|endoftext|>``
    and the chat / vision special tokens."""
    from transformers import Qwen2Tokenizer

    prefixed = dict.fromkeys(w.lower() for w in (*words, *TEMPLATE_WORDS) if w)
    merges = _learn_merges([list("\u0120" + w) for w in prefixed] + [list(w) for w in TEMPLATE_PIECES])
    tokens = list(_bytes_to_unicode().values()) + [a + b for a, b in merges]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(tokens))}
    vocab["<|endoftext|>"] = len(vocab)
    tok = Qwen2Tokenizer(vocab=vocab, merges=merges, model_max_length=max_length)
    tok.add_special_tokens({"additional_special_tokens": list(QWEN_SPECIAL_TOKENS)})
    return tok


def _qwen25_vl(tok, hidden: int = 16):
    """A 1-layer Qwen2.5-VL (text hidden ``hidden``, a 1-block vision tower of width 16 projecting to ``hidden``)
    whose image / vision token ids are the tokenizer's."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    ids = dict(zip(QWEN_SPECIAL_TOKENS, tok.convert_tokens_to_ids(list(QWEN_SPECIAL_TOKENS))))
    eos = tok.convert_tokens_to_ids("<|endoftext|>")
    cfg = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=2048,
                         bos_token_id=eos, eos_token_id=eos, pad_token_id=eos,
                         rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=[1, 1, 2])),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=hidden,
                           fullatt_block_indexes=[0], window_size=56),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )
    return Qwen2_5_VLForConditionalGeneration(cfg)


def _qwen_vae(z_dim: int = 4):
    from diffusers import AutoencoderKLQwenImage

    return AutoencoderKLQwenImage(base_dim=4, z_dim=z_dim, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                                  temperal_downsample=[False, True, True],
                                  latents_mean=[0.1 * i - 0.1 for i in range(z_dim)],
                                  latents_std=[0.5 + 0.25 * i for i in range(z_dim)])


def _components(seed: int, words, guidance_embeds: bool = False, zero_cond_t: bool = False) -> dict:
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel

    torch.manual_seed(seed)
    tok = tiny_qwen_template_tokenizer(words)
    z = 4
    transformer = QwenImageTransformer2DModel(
        patch_size=2, in_channels=4 * z, out_channels=z, num_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=16, guidance_embeds=guidance_embeds, axes_dims_rope=(4, 6, 6), zero_cond_t=zero_cond_t,
    )
    # Qwen-Image's scheduler: dynamic (exponential) shift, mu from the image sequence length (small lengths here)
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9, base_image_seq_len=4, max_image_seq_len=64,
        shift_terminal=0.02, time_shift_type="exponential",
    )
    return dict(transformer=transformer, scheduler=scheduler, vae=_qwen_vae(z), text_encoder=_qwen25_vl(tok),
                tokenizer=tok)


def tiny_qwenimage_pipeline(seed: int = 0, words: Iterable[str] = DEFAULT_WORDS, guidance_embeds: bool = False):
    """A QwenImagePipeline with random weights (``torch.manual_seed(seed)``). Sizes are multiples of 16
    (``vae_scale_factor * 2``); call it with ``height=32, width=32`` (2 x 2 packed tokens). Round-trips through
    ``save_pretrained`` / ``QwenImagePipeline.from_pretrained(dir)``."""
    from diffusers import QwenImagePipeline

    return _eval(QwenImagePipeline(**_components(seed, list(words), guidance_embeds)))


def tiny_qwen_vl_processor(tok, pixels: int = 56 * 56):
    """A Qwen2VLProcessor: the PIL ``Qwen2VLImageProcessorPil`` (patch 14, merge 2) resizing every image to about
    ``pixels`` pixels (min = max), and ``tok``.

    transformers requires a video processor, which needs torchvision (not installed here; the pipelines never pass
    videos): the processor is built with ``video_processor=None``, skipping only that argument's class check. Such
    a processor cannot be saved and loaded back by transformers, so the edit pipelines do not round-trip through
    ``save_pretrained`` without torchvision."""
    from transformers import Qwen2VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    ip = Qwen2VLImageProcessorPil(min_pixels=pixels, max_pixels=pixels)
    proc = Qwen2VLProcessor.__new__(Qwen2VLProcessor)
    proc.check_argument_for_proper_class = lambda name, arg: None  # instance attribute, removed below
    try:
        Qwen2VLProcessor.__init__(proc, image_processor=ip, tokenizer=tok, video_processor=None)
    finally:
        del proc.check_argument_for_proper_class
    return proc


def tiny_qwenimage_edit_pipeline(plus: bool = False, seed: int = 0, words: Iterable[str] = DEFAULT_WORDS,
                                 zero_cond_t: bool = False, condition_area: Optional[int] = None,
                                 vl_area: Optional[int] = None):
    """A QwenImageEditPipeline (``plus``: QwenImageEditPlusPipeline, Qwen-Image-Edit-2509) with random weights:
    the components of :func:`tiny_qwenimage_pipeline` (same seed -> same weights) plus a Qwen2VLProcessor whose
    image processor sends 56 x 56 px (4 merged vision tokens) to the text encoder's vision tower.
    ``zero_cond_t``: the transformer of Qwen-Image-Edit-2511 (timestep 0 for the condition tokens).

    The pipelines resize the condition image to an area of 1024**2 px for the VAE (and, Plus, 384**2 px for the
    vision-language model) whatever the output size: call them with ``height=32, width=32``. At 1024**2 a call takes
    seconds on a CPU (the VAE encodes 1024 x 1024 px, the transformer attends over 4096 condition tokens).
    ``condition_area`` / ``vl_area`` (None: the pipeline's own 1024**2 / 384**2): the pipeline is then an instance of
    a subclass of the same name whose ``__call__`` runs inside :func:`qwen_edit_areas` with these areas (diffusers
    has no option for them), e.g. 64 * 64 for a condition of 8 x 8 latents; the adapter takes the same
    ``condition_area`` / ``vl_area``."""
    from diffusers import QwenImageEditPipeline, QwenImageEditPlusPipeline

    comps = _components(seed, list(words), zero_cond_t=zero_cond_t)
    comps["processor"] = tiny_qwen_vl_processor(comps["tokenizer"])
    cls = QwenImageEditPlusPipeline if plus else QwenImageEditPipeline
    if condition_area is None and vl_area is None:
        return _eval(cls(**comps))
    pipe = _eval(_area_class(cls)(**comps))
    pipe._qwen_edit_areas = (int(condition_area or EDIT_AREA), int(vl_area or EDIT_PLUS_VL_AREA))
    return pipe


EDIT_AREA = 1024 * 1024  # the edit pipelines' fixed condition image area (VAE; QwenImageEditPipeline: also the VL's)
EDIT_PLUS_VL_AREA = 384 * 384  # QwenImageEditPlusPipeline's fixed area of the image the text encoder reads


def _mapped_dimensions(original, areas: dict, target_area, ratio):
    return original(areas.get(target_area, target_area), ratio)


@contextmanager
def qwen_edit_areas(area: int = EDIT_AREA, vl_area: int = EDIT_PLUS_VL_AREA):
    """Within the block, ``QwenImageEditPipeline`` / ``QwenImageEditPlusPipeline`` resize condition images to ``area``
    (the VAE's image; QwenImageEditPipeline's text encoder reads it too) and ``vl_area`` (Plus: the text encoder's
    image) instead of 1024**2 / 384**2 px: their modules' ``calculate_dimensions`` is wrapped to map those two areas
    (and restored on exit)."""
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit, pipeline_qwenimage_edit_plus

    areas = {EDIT_AREA: int(area), EDIT_PLUS_VL_AREA: int(vl_area)}
    saved = [(m, m.calculate_dimensions) for m in (pipeline_qwenimage_edit, pipeline_qwenimage_edit_plus)]
    try:
        for module, original in saved:
            module.calculate_dimensions = functools.partial(_mapped_dimensions, original, areas)
        yield
    finally:
        for module, original in saved:
            module.calculate_dimensions = original


@functools.lru_cache(maxsize=None)
def _area_class(cls):
    """A subclass of ``cls`` with its name, whose ``__call__`` runs inside ``qwen_edit_areas(*pipe._qwen_edit_areas)``
    (same signature: ``inspect.signature`` follows the wrapped method)."""

    @functools.wraps(cls.__call__)
    def __call__(self, *args, **kwargs):
        with qwen_edit_areas(*self._qwen_edit_areas):
            return cls.__call__(self, *args, **kwargs)

    return type(cls.__name__, (cls,), {"__call__": __call__, "__module__": __name__,
                                       "__doc__": f"{cls.__name__} at the tiny condition areas (qwen_edit_areas)"})
