"""Attention-kernel choice: ``model.attention`` (one scaled-dot-product kernel for every denoiser call, e.g. to
measure or pin it; the doctor's table compares them), and for training on CUDA the cuDNN exception below.

PyTorch's ``scaled_dot_product_attention`` may pick cuDNN's fused attention on Hopper GPUs. Its backward failed
on FLUX.1-dev's shapes (24 heads x 128 dims, 1,536 tokens at 512 px, bf16) on an H100 with torch 2.11.0+cu130
(``mha_graph.execute(...).is_good()`` / ``CUBLAS_STATUS_EXECUTION_FAILED``: `flowalign bench --scale flux`),
while with cuDNN off PyTorch's other kernels (flash, memory-efficient) ran it. Training paths therefore turn the cuDNN backend off on CUDA;
sampling keeps it (its forward ran). Set ``FLOWALIGN_CUDNN_ATTENTION=1`` to keep cuDNN attention in training.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator

import torch

ATTENTION_BACKENDS = ("default", "math", "flash", "efficient", "cudnn")  # model.attention; "default": torch's own


def avoid_cudnn_attention(device) -> bool:
    """Disable cuDNN scaled-dot-product attention when ``device`` is a CUDA device (global torch flag).
    Returns True when it was turned off; a CPU device or ``FLOWALIGN_CUDNN_ATTENTION=1`` leaves it as it is."""
    if torch.device(device).type != "cuda" or os.environ.get("FLOWALIGN_CUDNN_ATTENTION") == "1":
        return False
    torch.backends.cuda.enable_cudnn_sdp(False)
    return True


def _sdpa_backend(name: str):
    from torch.nn.attention import SDPBackend

    return {"math": SDPBackend.MATH, "flash": SDPBackend.FLASH_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}[name]


@contextmanager
def attention_backend(name: str) -> Iterator[None]:
    """Scaled-dot-product attention restricted to one kernel (``default``: no restriction)."""
    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"attention backend must be one of {ATTENTION_BACKENDS}, got {name!r}")
    if name == "default":
        yield
        return
    from torch.nn.attention import sdpa_kernel

    with sdpa_kernel([_sdpa_backend(name)]):
        yield


def available_attention_backends(device, dtype: torch.dtype = torch.float32) -> list[str]:
    """The restricted kernels that run on ``device`` for ``dtype`` (a tiny attention call tried under each)."""
    q = torch.randn(1, 2, 8, 16, device=device, dtype=dtype)
    found = []
    for name in ATTENTION_BACKENDS[1:]:
        try:
            with attention_backend(name):
                torch.nn.functional.scaled_dot_product_attention(q, q, q)
            found.append(name)
        except RuntimeError:  # "No available kernel": not built for this device / dtype
            continue
    return found
