"""``dino_similarity``: similarity of generated images to a POOL of reference images in a frozen vision
backbone (DINOv2 by default; any transformers vision model, or the vision tower of a CLIP folder).

Cosine mode (IPRO, docs/math.md §8):  f = feature(x) (CLS token, or mean of patch tokens), n(v) = v/|v|,
    score_i = mean_j cos(f_i, r_j) = n(f_i) . mean_j n(r_j)         over the pool r_1..r_N, [B].
Head mode (Adv-GRPO, docs/math.md §8): a small trainable head h: R^D -> R on frozen tokens,
    score_i = D(x_i) = 0.7 h(cls_i) + 0.3 mean_{k in K} h(patch_{i,k}),  K = 64 random patch indices
(drawn from a generator seeded with ``patch_seed`` on every call, the same K for the whole batch, so
scores are deterministic; ``patch_seed=None`` draws fresh ones). ``train_head_step`` trains h as a
discriminator with the hinge loss  L = mean relu(1 - D(ref)) + mean relu(1 + D(gen)),  alternating
with the generator's updates.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .base import Images, Reward
from .hub import check, load
from .preprocess import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD, prepare

IMAGE_EXT = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
POOLS = ("references", "condition_image", "row_references")


def load_images(folder: str) -> list:
    """Every image in ``folder`` (sorted by name), as RGB PIL; ``"toy"`` / ``"toy:N"``: N (default 64) renders of
    the toy world's scenes (flowalign.toy, seeds 0..N-1, 64 px), the offline stand-in for a reference photo set."""
    from PIL import Image

    spec = str(folder)
    if spec == "toy" or spec.startswith("toy:"):
        return _toy_references(spec)
    files = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_EXT)
    if not files:
        raise FileNotFoundError(f"dino_similarity: no images ({', '.join(IMAGE_EXT)}) in reference folder {folder!r}")
    return [Image.open(p).convert("RGB") for p in files]


def _toy_references(spec: str) -> list:
    from ..toy import render, sample

    count = spec.partition(":")[2] or "64"
    if not count.isdigit() or int(count) < 1:
        raise ValueError(f"dino_similarity: references={spec!r}: write toy:N with N >= 1 renders, e.g. toy:64")
    return [render(sample(seed)[1], size=64, seed=seed)[0].convert("RGB") for seed in range(int(count))]


class Backbone:
    """Frozen vision model: ``tokens(images) -> [B, T, D]`` with the CLS token first and the patch tokens
    from index ``n_prefix`` (1 + register tokens)."""

    def __init__(self, model: str, image_size: Optional[int] = None, device: str = "cpu", batch_size: int = 32):
        check(model, "dino_similarity backbone")  # fail before the transformers import when the weights are missing
        from transformers import AutoModel

        net = load(AutoModel, model, "dino_similarity backbone")
        cfg = net.config
        if hasattr(net, "vision_model"):  # a full CLIP(-like) model: use its vision tower
            net, cfg = net.vision_model, cfg.vision_config
            self.mean, self.std = CLIP_MEAN, CLIP_STD
            default_size = cfg.image_size
        else:
            self.mean, self.std = IMAGENET_MEAN, IMAGENET_STD
            default_size = min(224, getattr(cfg, "image_size", 224))  # DINOv2's processor crops 224
        self.net = net.to(device).eval().requires_grad_(False)
        self.post_norm = getattr(net, "post_layernorm", None)  # CLIP vision: LayerNorm after the encoder
        self.n_prefix = 1 + int(getattr(cfg, "num_register_tokens", 0) or 0)
        self.size, self.device, self.batch_size = image_size or default_size, device, batch_size
        self.dim = cfg.hidden_size

    def tokens(self, images: Images) -> torch.Tensor:
        x = prepare(images, self.size, self.mean, self.std).to(self.device)
        out = torch.cat([self.net(pixel_values=c).last_hidden_state for c in x.split(self.batch_size)]).float()
        return self.post_norm(out) if self.post_norm is not None else out


class DinoSimilarityReward(Reward):
    """score = mean cosine similarity to the reference pool ([B]), or the discriminator head's logit.

    references: list of PIL / tensor [N,3,H,W] (e.g. all frames of a reference video) / folder of images;
    reference_features: precomputed pool features [N,D] (tensor or .safetensors file with key 'features').
    variant: 'cls' or 'patch_mean'. head=True: Adv-GRPO discriminator head (see module docstring).
    Per-sample pools (IPRO: one identity per prompt): ``metadata[i]["reference_features"]`` ([N,D],
    e.g. from ``features(frames)``) replaces the global pool for sample i.
    pool: where each sample's pool comes from. "references" (default): the above. "condition_image": the row's
    condition image (``metadata[i]["condition_image"]``, the image an edit starts from), i.e. edit preservation
    ``cos(f(x_i), f(c_i))``. "row_references": the row's identity pool, the image paths of
    ``metadata[i]["references"]`` (a (prompt, image) row's "references"; features cached per pool), falling back
    to the condition image for a row without one (image-to-video: the first frame is the identity).
    """

    name = "dino_similarity"
    differentiable = True  # torch preprocessing and a frozen backbone (head mode: the head too)

    def __init__(self, model: str = "facebook/dinov2-small", references=None, reference_features=None,
                 variant: str = "cls", head: bool = False, head_hidden: int = 256, head_path: Optional[str] = None,
                 cls_weight: float = 0.7, n_patches: int = 64, patch_seed: Optional[int] = 0, lr: float = 1e-4,
                 image_size: Optional[int] = None, device: str = "cpu", batch_size: int = 32, seed: int = 0,
                 pool: str = "references"):
        if variant not in ("cls", "patch_mean"):
            raise ValueError(f"dino_similarity: variant must be 'cls' or 'patch_mean', got {variant!r}")
        if pool not in POOLS:
            raise ValueError(f"dino_similarity: pool must be one of {', '.join(POOLS)}, got {pool!r}")
        self.pool, self._row_pools = pool, {}
        self.backbone = Backbone(model, image_size, device, batch_size)
        self.variant, self.cls_weight, self.n_patches, self.patch_seed = variant, cls_weight, n_patches, patch_seed
        self.ref_tokens = None
        if references is not None:
            refs = load_images(references) if isinstance(references, (str, os.PathLike)) else references
            with torch.no_grad():
                self.ref_tokens = self.backbone.tokens(refs)  # [N, T, D], kept for head training
            reference_features = self.feature(self.ref_tokens)
        self.ref_mean = None
        if reference_features is not None:
            feats = self._load_features(reference_features)
            if feats.shape[-1] != self.backbone.dim:
                raise ValueError(f"dino_similarity: reference features have dim {feats.shape[-1]}, "
                                 f"backbone has {self.backbone.dim}")
            self.ref_mean = F.normalize(feats, dim=-1).mean(0)  # [D]: mean_j n(r_j)
        self.head = None
        if head:
            d = self.backbone.dim
            with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's RNG
                torch.manual_seed(seed)
                self.head = nn.Sequential(nn.Linear(d, head_hidden), nn.GELU(), nn.Linear(head_hidden, 1)).to(device)
            if head_path is not None:
                from safetensors.torch import load_file

                self.head.load_state_dict(load_file(head_path))
            self.opt = torch.optim.AdamW(self.head.parameters(), lr=lr, weight_decay=0.0)

    @staticmethod
    def _load_features(f) -> torch.Tensor:
        if isinstance(f, (str, os.PathLike)):
            from safetensors.torch import load_file

            f = load_file(str(f))["features"]
        f = torch.as_tensor(f).float()
        return f[None] if f.dim() == 1 else f

    def feature(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B,T,D] -> [B,D]: the CLS token or the mean patch token."""
        return tokens[:, 0] if self.variant == "cls" else tokens[:, self.backbone.n_prefix:].mean(1)

    def features(self, images: Images) -> torch.Tensor:
        """Pool features of ``images`` [B,D] (e.g. to save as reference_features)."""
        return self.feature(self.backbone.tokens(images))

    def discriminate(self, tokens: torch.Tensor, seed: Optional[int] = None) -> torch.Tensor:
        """D = w h(cls) + (1-w) mean_K h(patch_K), [B]; K = ``n_patches`` indices shared by the batch,
        drawn with ``seed`` (None: the global RNG)."""
        patches = tokens[:, self.backbone.n_prefix:]
        p = patches.shape[1]
        g = None if seed is None else torch.Generator().manual_seed(seed)
        k = torch.randperm(p, generator=g)[: min(self.n_patches, p)].to(tokens.device)
        d_cls = self.head(tokens[:, 0]).squeeze(-1)
        d_patch = self.head(patches[:, k]).squeeze(-1).mean(1)
        return self.cls_weight * d_cls + (1 - self.cls_weight) * d_patch

    def score(self, images: Images, prompts: Sequence[str], metadata: Optional[Sequence[dict]] = None) -> torch.Tensor:
        tokens = self.backbone.tokens(images)
        if self.head is not None:
            return self.discriminate(tokens, self.patch_seed)
        f = F.normalize(self.feature(tokens), dim=-1)
        if self.pool != "references":
            metadata = self._row_metadata(metadata, len(f))
        pools = [None if m is None else m.get("reference_features") for m in (metadata or [None] * len(f))]
        if all(p is None for p in pools):
            if self.ref_mean is None:
                raise ValueError("dino_similarity: no reference pool: pass references= or per-sample "
                                 "metadata[i]['reference_features']")
            return f @ self.ref_mean.to(f.device)
        if any(p is None for p in pools) and self.ref_mean is None:
            raise ValueError("dino_similarity: some samples have no metadata['reference_features'] and no "
                             "global references= was given")
        means = [self.ref_mean if p is None else F.normalize(self._load_features(p), dim=-1).mean(0) for p in pools]
        return (f * torch.stack(means).to(f.device)).sum(-1)

    def _row_metadata(self, metadata, n: int) -> list[dict]:
        """metadata with each row's ``reference_features`` from its condition image or its identity pool."""
        if metadata is None or any(m is None for m in metadata):
            raise ValueError(f"dino_similarity: pool={self.pool} scores each image against its row's condition "
                             "image: train on (prompt, image) rows (train.prompts = a JSONL file, docs/models.md)")
        out = []
        for m in metadata:
            refs = tuple(m.get("references") or ()) if self.pool == "row_references" else ()
            if refs:
                if refs not in self._row_pools:
                    from PIL import Image

                    with torch.no_grad():
                        self._row_pools[refs] = self.features([Image.open(r).convert("RGB") for r in refs]).cpu()
                feats = self._row_pools[refs]
            elif "condition_image" in m:
                with torch.no_grad():
                    feats = self.features(m["condition_image"][None].float())
            else:
                raise ValueError(f"dino_similarity: pool={self.pool} needs metadata['condition_image'] per row")
            out.append({**m, "reference_features": feats})
        return out

    def train_head_step(self, generated: Images, references: Optional[Images] = None) -> dict:
        """One hinge-loss step of the head: references positive, generated negative. Returns floats
        {loss, d_real, d_fake}. ``references`` defaults to the pool given at construction; patches are
        drawn fresh from the global RNG each step."""
        if self.head is None:
            raise RuntimeError("dino_similarity: train_head_step needs head=True")
        with torch.no_grad():
            fake = self.backbone.tokens(generated.detach() if isinstance(generated, torch.Tensor) else generated)
            real = self.backbone.tokens(references) if references is not None else self.ref_tokens
        if real is None:
            raise ValueError("dino_similarity: pass references= to train_head_step (no reference images stored)")
        self.head.train()
        d_real, d_fake = self.discriminate(real), self.discriminate(fake)
        loss = F.relu(1 - d_real).mean() + F.relu(1 + d_fake).mean()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.head.eval()
        return {"loss": loss.item(), "d_real": d_real.mean().item(), "d_fake": d_fake.mean().item()}

    def state_dict(self) -> dict:
        """The head's weights and its optimizer state (Adv-GRPO trains them during RL: checkpoints keep them)."""
        if self.head is None:
            raise RuntimeError("dino_similarity: state_dict is the trainable head's; build it with head=True")
        return {"head": {k: v.detach().clone() for k, v in self.head.state_dict().items()},
                "optimizer": self.opt.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """``state_dict`` output, also after a checkpoint's JSON round trip (string state keys, lists for tuples)."""
        self.head.load_state_dict({k: torch.as_tensor(v) for k, v in state["head"].items()})
        opt = state["optimizer"]
        groups = [{k: tuple(v) if k == "betas" else v for k, v in g.items()} for g in opt["param_groups"]]
        moments = {int(k): {n: torch.as_tensor(v) if n != "step" or isinstance(v, torch.Tensor) else v
                            for n, v in st.items()} for k, st in opt["state"].items()}
        self.opt.load_state_dict({"state": moments, "param_groups": groups})

    def save_head(self, path: str) -> None:
        """Save the head's weights (safetensors); reload with head=True, head_path=path."""
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in self.head.state_dict().items()}, path)
