"""``clip_score``: cosine similarity of CLIP image and prompt embeddings, and the CLIP embedder that the
preference and aesthetic rewards share.

score_i = scale * cos(E_img(x_i), E_txt(c_i))  (in [-scale, scale]; Hessel et al.'s CLIPScore is
2.5 * max(cos, 0), Flow-GRPO's ``clip`` reward is logit_scale * cos / 30).

Backends: ``hf`` (transformers ``CLIPModel`` + ``CLIPTokenizer``, hub id or local folder, or ``"tiny"``
for the shipped toy-world CLIP) and ``open_clip`` (imported only when asked for). Preprocessing is
torch-only (rewards/preprocess.py), so a tensor input that requires grad gets a gradient through the
score (reward backprop); the model itself is frozen.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from .base import Images, Reward
from .hub import check, load, missing_message, resolve
from .preprocess import CLIP_MEAN, CLIP_STD, prepare

DEFAULT_CLIP = "openai/clip-vit-large-patch14"


def _features(out) -> torch.Tensor:
    """transformers >= 5 returns an output object from get_*_features (projection in pooler_output)."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


class CLIPEmbedder:
    """transformers CLIP: ``images(x) -> [B,D]`` and ``texts(c) -> [B,D]``, both L2-normalised."""

    def __init__(self, model: str = DEFAULT_CLIP, tokenizer: Optional[str] = None, what: str = "CLIP",
                 device: str = "cpu", dtype: torch.dtype = torch.float32, batch_size: int = 32):
        check(model, what)  # fail before the transformers import when the weights cannot be had
        if tokenizer is not None:
            check(tokenizer, what, "tokenizer")
        from transformers import CLIPModel, CLIPTokenizer

        self.model = load(CLIPModel, model, what).to(device=device, dtype=dtype).eval().requires_grad_(False)
        self.tokenizer = load(CLIPTokenizer, tokenizer or model, what, option="tokenizer")
        if len(self.tokenizer) < 256:  # transformers 5 builds an EMPTY tokenizer when the files are missing
            raise FileNotFoundError(missing_message(f"{what} tokenizer", resolve(tokenizer or model), "tokenizer"))
        cfg = self.model.config
        self.size = cfg.vision_config.image_size
        self.max_length = min(self.tokenizer.model_max_length, cfg.text_config.max_position_embeddings)
        self.device, self.dtype, self.batch_size = device, dtype, batch_size

    @property
    def logit_scale(self) -> float:
        return float(self.model.logit_scale.exp())

    def images(self, images: Images) -> torch.Tensor:
        x = prepare(images, self.size, CLIP_MEAN, CLIP_STD).to(self.device, self.dtype)
        feats = [_features(self.model.get_image_features(pixel_values=c)) for c in x.split(self.batch_size)]
        return F.normalize(torch.cat(feats).float(), dim=-1)

    def texts(self, prompts: Sequence[str]) -> torch.Tensor:
        tok = self.tokenizer(list(prompts), padding="max_length", truncation=True, max_length=self.max_length,
                             return_tensors="pt").to(self.device)
        feats = [_features(self.model.get_text_features(input_ids=i, attention_mask=m))
                 for i, m in zip(tok.input_ids.split(self.batch_size), tok.attention_mask.split(self.batch_size))]
        return F.normalize(torch.cat(feats).float(), dim=-1)


class OpenCLIPEmbedder:
    """open_clip backend (``pip install open_clip_torch``): ``model`` is an architecture name such as
    'ViT-H-14', ``pretrained`` a tag or a checkpoint file. Same interface as CLIPEmbedder."""

    def __init__(self, model: str = "ViT-H-14", pretrained: Optional[str] = None, device: str = "cpu",
                 dtype: torch.dtype = torch.float32, batch_size: int = 32, **_):
        try:
            import open_clip
        except ImportError as e:
            raise ImportError("backend='open_clip' needs open_clip: pip install 'flowalign[clip]'") from e
        self.model = open_clip.create_model(model, pretrained=pretrained, device=device).to(dtype).eval()
        self.model.requires_grad_(False)
        self.tokenize = open_clip.get_tokenizer(model)
        cfg = getattr(self.model.visual, "preprocess_cfg", {}) or {}
        size = cfg.get("size", getattr(self.model.visual, "image_size", 224))
        self.size = size[0] if isinstance(size, (tuple, list)) else int(size)
        self.mean, self.std = cfg.get("mean", CLIP_MEAN), cfg.get("std", CLIP_STD)
        self.device, self.dtype, self.batch_size = device, dtype, batch_size

    @property
    def logit_scale(self) -> float:
        return float(self.model.logit_scale.exp())

    def images(self, images: Images) -> torch.Tensor:
        x = prepare(images, self.size, self.mean, self.std).to(self.device, self.dtype)
        return F.normalize(torch.cat([self.model.encode_image(c) for c in x.split(self.batch_size)]).float(), dim=-1)

    def texts(self, prompts: Sequence[str]) -> torch.Tensor:
        t = self.tokenize(list(prompts)).to(self.device)
        return F.normalize(torch.cat([self.model.encode_text(c) for c in t.split(self.batch_size)]).float(), dim=-1)


def embedder(backend: str = "hf", **kw):
    """'hf' -> CLIPEmbedder(**kw); 'open_clip' -> OpenCLIPEmbedder(**kw)."""
    if backend == "hf":
        kw.pop("pretrained", None)
        return CLIPEmbedder(**kw)
    if backend == "open_clip":
        kw.pop("tokenizer", None)
        kw.pop("what", None)
        return OpenCLIPEmbedder(**kw)
    raise ValueError(f"backend must be 'hf' or 'open_clip', got {backend!r}")


class ClipScoreReward(Reward):
    """score = scale * cos(image, prompt) per sample, [B] float32."""

    name = "clip_score"
    differentiable = True  # torch preprocessing and a frozen CLIP: gradients reach tensor images

    def __init__(self, model: str = DEFAULT_CLIP, tokenizer: Optional[str] = None, backend: str = "hf",
                 scale: float = 1.0, device: str = "cpu", batch_size: int = 32, pretrained: Optional[str] = None):
        self.clip = embedder(backend, model=model, tokenizer=tokenizer, what="CLIP", device=device,
                             batch_size=batch_size, pretrained=pretrained)
        self.scale = scale

    def score(self, images: Images, prompts: Sequence[str], metadata: Optional[Sequence[dict]] = None) -> torch.Tensor:
        return self.scale * (self.clip.images(images) * self.clip.texts(prompts)).sum(-1)
