"""Attention-kernel choice for training on CUDA.

PyTorch's ``scaled_dot_product_attention`` may pick cuDNN's fused attention on Hopper GPUs. Its backward failed
on FLUX.1-dev's shapes (24 heads x 128 dims, 1,536 tokens at 512 px, bf16) on an H100 with torch 2.11.0+cu130
(``mha_graph.execute(...).is_good()`` / ``CUBLAS_STATUS_EXECUTION_FAILED``: `flowalign bench --scale flux`),
while with cuDNN off PyTorch's other kernels (flash, memory-efficient) ran it. Training paths therefore turn the cuDNN backend off on CUDA;
sampling keeps it (its forward ran). Set ``FLOWALIGN_CUDNN_ATTENTION=1`` to keep cuDNN attention in training.
"""

from __future__ import annotations

import os

import torch


def avoid_cudnn_attention(device) -> bool:
    """Disable cuDNN scaled-dot-product attention when ``device`` is a CUDA device (global torch flag).
    Returns True when it was turned off; a CPU device or ``FLOWALIGN_CUDNN_ATTENTION=1`` leaves it as it is."""
    if torch.device(device).type != "cuda" or os.environ.get("FLOWALIGN_CUDNN_ATTENTION") == "1":
        return False
    torch.backends.cuda.enable_cudnn_sdp(False)
    return True
