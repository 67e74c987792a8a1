"""``aesthetic``: the LAION aesthetic predictor v2 (an MLP on CLIP image embeddings), as in DDPO/Flow-GRPO.

score = MLP(E_img(x) / |E_img(x)|), ~1..10; the prompt is ignored. The released head
(sac+logos+ava1-l14-linearMSE.pth, 768 -> 1024 -> 128 -> 64 -> 16 -> 1, Linear layers at indices 0, 2, 4,
6, 7 of an ``nn.Sequential`` with dropouts between) sits on openai/clip-vit-large-patch14. The MLP is
rebuilt from the state dict's shapes, so any head with that key layout loads (.pth or .safetensors).
"""

from __future__ import annotations

import os
import re
from typing import Optional, Sequence

import torch
from torch import nn

from .base import Images, Reward
from .clip import DEFAULT_CLIP, embedder

HEAD_FILE = "sac+logos+ava1-l14-linearMSE.pth"
HEAD_HINT = (f"download {HEAD_FILE} (github.com/christophschuhmann/improved-aesthetic-predictor, also in "
             f"kvablack/ddpo-pytorch assets/) and pass head=/path/to/{HEAD_FILE}")


def load_state(path: str) -> dict:
    """State dict from .safetensors or a torch pickle (weights_only); '.module'/'state_dict' unwrapped."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    sd = torch.load(path, map_location="cpu", weights_only=True)
    return sd.get("state_dict", sd)


def mlp_from_state(sd: dict) -> nn.Sequential:
    """``layers.{i}.weight/bias`` -> nn.Sequential with Linear at each i and Identity (eval dropout) between."""
    idx = sorted({int(m.group(1)) for k in sd if (m := re.match(r"(?:.*\.)?layers\.(\d+)\.weight$", k))})
    if not idx:
        raise ValueError("aesthetic head: expected keys 'layers.<i>.weight' (LAION aesthetic MLP layout)")
    mods: list[nn.Module] = [nn.Identity() for _ in range(idx[-1] + 1)]
    state = {}
    for i in idx:
        w = next(v for k, v in sd.items() if k.endswith(f"layers.{i}.weight"))
        b = next(v for k, v in sd.items() if k.endswith(f"layers.{i}.bias"))
        mods[i] = nn.Linear(w.shape[1], w.shape[0])
        state[f"{i}.weight"], state[f"{i}.bias"] = w, b
    mlp = nn.Sequential(*mods)
    mlp.load_state_dict(state)
    return mlp.float().eval().requires_grad_(False)


class AestheticReward(Reward):
    """score = head(normalised CLIP image embedding), [B]. ``model``: the CLIP (hub id / folder);
    ``head``: the MLP weights file."""

    name = "aesthetic"
    differentiable = True  # torch preprocessing, frozen CLIP and MLP

    def __init__(self, head: Optional[str] = None, model: str = DEFAULT_CLIP, device: str = "cpu",
                 batch_size: int = 32):
        if head is None or not os.path.isfile(os.path.expanduser(head)):
            raise FileNotFoundError(f"aesthetic head weights {head or HEAD_FILE!r} not found locally: {HEAD_HINT}")
        self.head = mlp_from_state(load_state(os.path.expanduser(head))).to(device)
        self.clip = embedder("hf", model=model, what="aesthetic CLIP", device=device, batch_size=batch_size)

    def score(self, images: Images, prompts: Sequence[str], metadata: Optional[Sequence[dict]] = None) -> torch.Tensor:
        return self.head(self.clip.images(images)).squeeze(-1)
