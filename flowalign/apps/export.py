"""``flowalign export LORA_DIR --model M --out DIR``: a LoRA merged into a full diffusers pipeline folder.

The merged denoiser's weights are ``W' = W + scale (alpha / r) B A`` for every LoRA-targeted linear layer (peft's
``merge``, through diffusers' ``fuse_lora``); every other component is the base pipeline's, unchanged. The folder
is what ``DiffusionPipeline.from_pretrained(DIR)`` loads and what tools that need full checkpoints take (VeRL-Omni's
OPD teachers, ComfyUI's diffusers loader), written with ``save_pretrained(safe_serialization=True)``. The LoRA
folder itself is already in the diffusers LoRA key format (``pipe.load_lora_weights``).

``scale`` multiplies the weight update; it is not RL Guidance's scale, which mixes predictions, not weights
(docs/rlg.md), so ``scale = w`` only matches RLG at w = 0 and w = 1.
"""

from __future__ import annotations

import os
from typing import Optional

import torch

from .. import lora
from ..models import load_pipeline
from .sample import check_lora_dir


def export_merged(lora_dir: str, model: str, out_dir: str, scale: float = 1.0, dtype: str = "float32",
                  overwrite: bool = False) -> str:
    """Merge ``lora_dir`` into ``model`` and write the full pipeline to ``out_dir`` (refused when it already holds
    files, unless ``overwrite``). dtype: float32 | bfloat16 | float16 of the written weights. Returns out_dir."""
    from ..models import DTYPES

    check_lora_dir(lora_dir, "pass a LoRA folder written by flowalign train / demo")
    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if not (isinstance(scale, (int, float)) and torch.isfinite(torch.tensor(float(scale)))):
        raise ValueError(f"--scale must be a finite number, got {scale!r}")
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not overwrite:
        raise ValueError(f"{out_dir} is not empty: pass --overwrite to replace it, or choose another --out")
    pipe = load_pipeline(model)
    lora.load_lora_weights(pipe, lora_dir, adapter_name="export")
    pipe.fuse_lora(lora_scale=float(scale), adapter_names=["export"])
    pipe.unload_lora_weights()  # the fused weights stay; the LoRA layers go
    if dtype != "float32":
        pipe.to(DTYPES[dtype])
    tmp = out_dir.rstrip("/") + ".partial"
    pipe.save_pretrained(tmp, safe_serialization=True)
    if os.path.isdir(out_dir):
        import shutil

        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)  # a folder that exists is complete
    return out_dir


def merged_delta(model: str, merged_dir: str, component: Optional[str] = None) -> dict:
    """{parameter name: max |W_merged - W_base|} of the denoiser (which layers the merge changed)."""
    base, merged = load_pipeline(model), load_pipeline(merged_dir)
    name = component or next(n for n in ("transformer", "unet") if getattr(base, n, None) is not None)
    a, b = getattr(base, name).state_dict(), getattr(merged, name).state_dict()
    return {k: float((b[k].float() - v.float()).abs().max()) for k, v in a.items() if k in b}
