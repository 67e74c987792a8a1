"""The model families: ONE table, family name -> adapter class. Everything else about a family is an attribute of
its adapter (``pipeline_class``, ``lora_target_modules``, ``fsdp_blocks``, ``is_flow``), and the lookups below are
derived from it. Adding a family = its adapter file, one line here, and its tiny pipeline in
flowalign.toy.pipelines (docs/extending.md).
"""

from __future__ import annotations

from typing import Sequence

from .base import PipelineAdapter
from .flux import FluxAdapter
from .flux2 import Flux2Adapter, Flux2KleinAdapter
from .flux_kontext import FluxKontextAdapter
from .qwenimage import QwenImageAdapter, QwenImageEditAdapter, QwenImageEditPlusAdapter
from .sd import SDAdapter, SDXLAdapter
from .sd3 import SD3Adapter
from .wan import WanAdapter
from .wan_i2v import WanI2VAdapter
from .zimage import ZImageAdapter

ADAPTERS: dict[str, type[PipelineAdapter]] = {
    cls.family: cls for cls in (SD3Adapter, FluxAdapter, SDAdapter, SDXLAdapter, WanAdapter, FluxKontextAdapter,
                                Flux2Adapter, Flux2KleinAdapter, ZImageAdapter, WanI2VAdapter, QwenImageAdapter,
                                QwenImageEditAdapter, QwenImageEditPlusAdapter)
}
FAMILY_BY_PIPELINE = {cls.pipeline_class: family for family, cls in ADAPTERS.items()}  # diffusers class -> family
PIPELINE_BY_FAMILY = {family: cls.pipeline_class for family, cls in ADAPTERS.items()}


def detect_family(class_name: str, bases: Sequence[str] = ()) -> str:
    """Family of a pipeline class name (or of one of its base classes)."""
    for name in (class_name, *bases):
        if name in FAMILY_BY_PIPELINE:
            return FAMILY_BY_PIPELINE[name]
    raise ValueError(f"unsupported pipeline {class_name!r}: supported are {', '.join(FAMILY_BY_PIPELINE)} "
                     "(or pass family=... for a subclass)")
