"""Load a diffusers pipeline from a local folder or a Hub id, with one clear line when it is missing."""

from __future__ import annotations

import json
import os
from typing import Optional, Sequence

# pipeline class name -> family
FAMILY_BY_PIPELINE = {
    "StableDiffusion3Pipeline": "sd3",
    "FluxPipeline": "flux",
    "StableDiffusionPipeline": "sd",
    "StableDiffusionXLPipeline": "sdxl",
    "WanPipeline": "wan",
}
PIPELINE_BY_FAMILY = {v: k for k, v in FAMILY_BY_PIPELINE.items()}


class ModelNotFoundError(FileNotFoundError):
    """The requested model is neither a local folder nor in the local Hub cache (and the Hub is unreachable)."""


def detect_family(class_name: str, bases: Sequence[str] = ()) -> str:
    """Family of a pipeline class name (or of one of its base classes)."""
    for name in (class_name, *bases):
        if name in FAMILY_BY_PIPELINE:
            return FAMILY_BY_PIPELINE[name]
    raise ValueError(f"unsupported pipeline {class_name!r}: supported are {', '.join(FAMILY_BY_PIPELINE)} "
                     "(or pass family=... for a subclass)")


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def load_pipeline(id_or_path: str, family: Optional[str] = None, torch_dtype=None, **kwargs):
    """``<PipelineClass>.from_pretrained(id_or_path)`` for a local folder or a Hub id.

    family: one of sd3/flux/sd/sdxl/wan; default: read from the folder's ``model_index.json``.
    Raises ModelNotFoundError with one line saying how to get the model when it is not available offline.
    """
    import diffusers

    if family is not None and family not in PIPELINE_BY_FAMILY:
        raise ValueError(f"family must be one of {sorted(PIPELINE_BY_FAMILY)}, got {family!r}")
    if os.path.isdir(id_or_path):
        index = os.path.join(id_or_path, "model_index.json")
        if not os.path.isfile(index):
            raise ModelNotFoundError(f"{id_or_path!r} is a folder without model_index.json: pass a diffusers "
                                     "pipeline folder (written by pipe.save_pretrained)")
        with open(index) as f:
            spec = json.load(f)
        family = family or detect_family(spec.get("_class_name", "?"))
        for name, entry in spec.items():  # components saved as None (e.g. SD3 without T5) must be passed as None
            if not name.startswith("_") and entry == [None, None] and name not in kwargs:
                kwargs[name] = None
    cls = getattr(diffusers, PIPELINE_BY_FAMILY[family]) if family else diffusers.DiffusionPipeline
    offline = _offline()
    try:
        pipe = cls.from_pretrained(id_or_path, torch_dtype=torch_dtype, local_files_only=offline, **kwargs)
    except (OSError, ValueError) as err:
        if os.path.isdir(id_or_path):
            raise
        hub = "the Hub is unreachable (HF_HUB_OFFLINE=1)" if offline else f"the Hub download failed ({type(err).__name__})"
        raise ModelNotFoundError(
            f"model {id_or_path!r} not found locally and {hub}: download it with "
            f"`huggingface-cli download {id_or_path}` on a machine with network, or pass a local folder"
        ) from None
    if family is None:
        detect_family(type(pipe).__name__, [c.__name__ for c in type(pipe).__mro__])
    return pipe
