"""How one pass over the denoiser runs: the settings that move the on-policy ratio off 1 in practice.

A rollout records ``log pi(x_{k+1} | x_k)`` and training re-scores the same transition; any difference in how
the two passes call the network changes the prediction in its last bits and the ratio with it:

* the denoiser's dtype (bf16 / fp16 weights: every rounding is ~1e-3 relative instead of ~1e-7);
* the batch the network sees (kernels pick other blockings, reductions another order, for another batch size:
  rollout batch vs training minibatch);
* CFG's two branches batched in one call of 2B rows or called apart;
* the attention kernel (``torch.nn.attention.sdpa_kernel``: flash, memory-efficient, cuDNN, math);
* deterministic algorithms (GPU kernels with atomics differ from run to run);
* ``model.autocast`` (the denoiser's forwards under torch.autocast in bf16 / fp16, its weights left as they are).

:class:`PassSetting` names one combination and :func:`applied` runs code under it, restoring the model after.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace
from typing import Iterator, Optional

import torch

from .. import lora
from ..runtime.kernels import attention_backend

DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
DTYPE_BY_NAME = {name: dtype for dtype, name in DTYPE_NAMES.items()}
DTYPE_BY_NAME.update(float32=torch.float32, bfloat16=torch.bfloat16, float16=torch.float16)


@dataclass(frozen=True)
class PassSetting:
    """How one pass (the rollout, or the re-scoring) calls the denoiser.

    dtype: the denoiser's base weights (LoRA stays float32, sampler math float32); batch: rows per call (CFG
    doubles it when batched); cfg_batched: CFG branches in one call of 2B rows; attention: an
    ``ATTENTION_BACKENDS`` name; deterministic: ``torch.use_deterministic_algorithms(True)``; autocast: the
    adapter's ``autocast`` dtype for the pass (None: off).
    """

    dtype: torch.dtype
    batch: int
    cfg_batched: bool = True
    attention: str = "default"
    deterministic: bool = False
    autocast: Optional[torch.dtype] = None

    def but(self, **changes) -> "PassSetting":
        return replace(self, **changes)

    def describe(self) -> str:
        parts = [DTYPE_NAMES.get(self.dtype, str(self.dtype)), f"batch {self.batch}"]
        if not self.cfg_batched:
            parts.append("CFG apart")
        if self.attention != "default":
            parts.append(f"attention {self.attention}")
        if self.deterministic:
            parts.append("deterministic")
        if self.autocast is not None:
            parts.append(f"autocast {DTYPE_NAMES.get(self.autocast, str(self.autocast))}")
        return ", ".join(parts)

    def key(self) -> tuple:
        """Everything but the batch: what a rollout must be redone for."""
        return (self.dtype, self.cfg_batched, self.attention, self.deterministic, self.autocast)


@contextmanager
def deterministic_algorithms(enabled: bool) -> Iterator[None]:
    """``torch.use_deterministic_algorithms(enabled, warn_only=True)`` (and cuDNN's flags), restored after.
    On CUDA a fully deterministic cuBLAS also needs ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` set before start-up."""
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
              torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    torch.use_deterministic_algorithms(enabled, warn_only=True)
    torch.backends.cudnn.deterministic = enabled or before[2]
    torch.backends.cudnn.benchmark = before[3] and not enabled
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = before[2], before[3]


@contextmanager
def cfg_batching(adapter, batched: bool) -> Iterator[None]:
    """The adapter's CFG branches in one call (True) or two (False), restored after."""
    before = adapter.cfg_batched
    adapter.cfg_batched = batched
    try:
        yield
    finally:
        adapter.cfg_batched = before


def denoiser_dtype(adapter) -> torch.dtype:
    """The dtype of the denoiser's base (non-LoRA) floating weights."""
    for name, p in adapter.denoiser.named_parameters():
        if p.is_floating_point() and "lora_" not in name:
            return p.dtype
    return torch.float32


@contextmanager
def denoiser_precision(adapter, dtype: torch.dtype) -> Iterator[None]:
    """Run with the denoiser's base weights in ``dtype`` (LoRA float32, as ``lora.set_precision`` lays them
    out), then put back the exact weights it had: a copy of them waits on the CPU (no rounding round trip)."""
    before = denoiser_dtype(adapter)
    if dtype == before:
        yield
        return
    dens = adapter.denoisers  # both experts of a two-expert pipeline
    tensors = [(i, name, t) for i, den in enumerate(dens)
               for name, t in [*den.named_parameters(), *den.named_buffers()]]
    saved = {(i, name): t.detach().to("cpu", copy=True) for i, name, t in tensors if t.is_floating_point()}
    try:
        for _, name, t in tensors:
            if t.is_floating_point() and "lora_" not in name:
                t.data = t.data.to(dtype)
        for den in dens:
            lora.set_cast_hooks(den, dtype)
        yield
    finally:
        for i, name, t in tensors:
            if (i, name) in saved:
                t.data = saved[(i, name)].to(t.device)
        for den in dens:
            lora.set_cast_hooks(den, before)


@contextmanager
def autocasting(adapter, dtype: Optional[torch.dtype]) -> Iterator[None]:
    """The adapter's predict under ``torch.autocast(dtype)`` (None: off), restored after."""
    before = adapter.autocast
    adapter.autocast = dtype
    try:
        yield
    finally:
        adapter.autocast = before


@contextmanager
def applied(adapter, setting: PassSetting) -> Iterator[None]:
    """Run the block under ``setting`` (its batch is the caller's to honour)."""
    with ExitStack() as stack:
        stack.enter_context(denoiser_precision(adapter, setting.dtype))
        stack.enter_context(cfg_batching(adapter, setting.cfg_batched))
        stack.enter_context(attention_backend(setting.attention))
        stack.enter_context(deterministic_algorithms(setting.deterministic))
        stack.enter_context(autocasting(adapter, setting.autocast))
        yield
