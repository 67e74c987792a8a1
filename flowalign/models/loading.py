"""Loading a diffusers pipeline offline-first: ``load_pipeline`` (safetensors only, one-line errors that say how to
get the model), ``load_for_inference`` (dtype and device) and the dtype names of the config.
"""

from __future__ import annotations

import json
import os
from typing import Optional

import torch

from .registry import PIPELINE_BY_FAMILY, detect_family


class ModelNotFoundError(FileNotFoundError):
    """The requested model is neither a local folder nor in the local Hub cache (and the Hub is unreachable)."""


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}  # model.dtype's names
INFERENCE_DTYPES = ("float32", "bfloat16")  # float16 overflows in T5 and the SDXL VAE


def inference_dtype(name: str) -> Optional[torch.dtype]:
    """``torch_dtype`` for :func:`load_pipeline` from a name in INFERENCE_DTYPES (None for float32); any other
    name raises ValueError."""
    if name not in INFERENCE_DTYPES:
        raise ValueError(f"dtype (--dtype) must be one of {list(INFERENCE_DTYPES)}, got {name!r} (float16 "
                         "overflows in T5 and the SDXL VAE)")
    return None if name == "float32" else DTYPES[name]


def load_for_inference(id_or_path: str, device: Optional[str] = None, dtype: str = "float32", **kwargs):
    """:func:`load_pipeline` for sampling and evaluation: every component in ``dtype`` (float32 | bfloat16, as
    ``from_pretrained(dtype=torch.bfloat16)``), moved to ``device`` (default: CUDA when available, else CPU)."""
    torch_dtype = inference_dtype(dtype)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return load_pipeline(id_or_path, torch_dtype=torch_dtype, **kwargs).to(device)


def _dtype_kwarg() -> str:
    """``from_pretrained``'s dtype argument: ``dtype`` where diffusers has deprecated ``torch_dtype`` for it."""
    try:
        from diffusers.utils import deprecation_utils
    except ImportError:
        return "torch_dtype"
    return "dtype" if hasattr(deprecation_utils, "_resolve_dtype") else "torch_dtype"


def load_pipeline(id_or_path: str, family: Optional[str] = None, torch_dtype=None, trust_remote_code: bool = False,
                  **kwargs):
    """``<PipelineClass>.from_pretrained(id_or_path)`` for a local folder or a Hub id.

    family: one of sd3/flux/sd/sdxl/wan; default: read from the folder's ``model_index.json``.
    Weights load from safetensors files only (never a pickle); code shipped with the model runs only with
    ``trust_remote_code=True`` (config: ``model.trust_remote_code``).
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
        if torch_dtype is not None:
            kwargs[_dtype_kwarg()] = torch_dtype
        pipe = cls.from_pretrained(id_or_path, local_files_only=offline, use_safetensors=True,
                                   trust_remote_code=trust_remote_code, **kwargs)
    except (OSError, ValueError) as err:
        if os.path.isdir(id_or_path):
            if "safetensors" in str(err):
                raise ModelNotFoundError(f"{id_or_path!r}: flowalign loads weights from .safetensors files only "
                                         "(pickled .bin/.pt files can run code); re-save the pipeline with "
                                         "pipe.save_pretrained(dir, safe_serialization=True)") from None
            raise
        hub = "the Hub is unreachable (HF_HUB_OFFLINE=1)" if offline else f"the Hub download failed ({type(err).__name__})"
        raise ModelNotFoundError(
            f"model {id_or_path!r} not found locally and {hub}: download it with "
            f"`huggingface-cli download {id_or_path}` on a machine with network, or pass a local folder"
        ) from None
    if family is None:
        detect_family(type(pipe).__name__, [c.__name__ for c in type(pipe).__mro__])
    return pipe
