"""Pipeline adapters, one small file per family (nothing algorithmic).

    >>> from flowalign.models import adapter_for, load_adapter
    >>> adapter = adapter_for(pipe)                      # wrap an existing diffusers pipeline
    >>> adapter = load_adapter("path/or/hub-id")         # or load one (offline-friendly error)
"""

from __future__ import annotations

import inspect

from .base import (
    Conditioning,
    DDIMAdapter,
    FlowAdapter,
    PipelineAdapter,
    SamplingGrid,
    pipeline_call_kwargs,
    t5_sequence_length,
)
from .flux import FluxAdapter
from .flux2 import Flux2Adapter, Flux2KleinAdapter
from .flux_kontext import FluxKontextAdapter
from .loading import DTYPES, INFERENCE_DTYPES, ModelNotFoundError, inference_dtype, load_for_inference, load_pipeline
from .qwenimage import QwenImageAdapter, QwenImageEditAdapter, QwenImageEditPlusAdapter
from .registry import ADAPTERS, FAMILY_BY_PIPELINE, PIPELINE_BY_FAMILY, detect_family
from .sd import SDAdapter, SDXLAdapter
from .sd3 import SD3Adapter
from .wan import WanAdapter
from .wan_i2v import WanI2VAdapter
from .zimage import ZImageAdapter


def adapter_for(pipe, family: str | None = None, **kwargs) -> PipelineAdapter:
    """The adapter for a diffusers pipeline object (family from its class unless given)."""
    family = family or detect_family(type(pipe).__name__, [c.__name__ for c in type(pipe).__mro__])
    cls = ADAPTERS[family]
    accepted = inspect.signature(cls.__init__).parameters
    unknown = [k for k in kwargs if k not in accepted]
    if unknown:
        raise ValueError(f"{unknown[0]} is not an option of the {family} adapter ({cls.__name__} takes "
                         f"{', '.join(p for p in accepted if p not in ('self', 'pipe'))}); remove model.{unknown[0]}")
    return cls(pipe, **kwargs)


def load_adapter(id_or_path: str, family: str | None = None, torch_dtype=None, device=None,
                 trust_remote_code: bool = False, **kwargs) -> PipelineAdapter:
    """``adapter_for(load_pipeline(id_or_path, family, torch_dtype, trust_remote_code))``, moved to ``device`` when
    given."""
    pipe = load_pipeline(id_or_path, family=family, torch_dtype=torch_dtype, trust_remote_code=trust_remote_code)
    if device is not None:
        pipe = pipe.to(device)
    return adapter_for(pipe, family=family, **kwargs)


__all__ = [
    "ADAPTERS", "FAMILY_BY_PIPELINE", "PIPELINE_BY_FAMILY", "Conditioning", "DDIMAdapter", "FlowAdapter", "Flux2Adapter", "Flux2KleinAdapter", "FluxAdapter",
    "FluxKontextAdapter", "ModelNotFoundError", "PipelineAdapter", "QwenImageAdapter", "QwenImageEditAdapter",
    "QwenImageEditPlusAdapter", "SD3Adapter", "SDAdapter", "SDXLAdapter",
    "SamplingGrid", "WanAdapter", "WanI2VAdapter", "ZImageAdapter", "adapter_for", "detect_family",
    "DTYPES", "INFERENCE_DTYPES", "inference_dtype", "load_adapter", "load_for_inference", "load_pipeline",
    "pipeline_call_kwargs", "t5_sequence_length",
]
