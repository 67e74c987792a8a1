"""The tiny in-process pipeline of every model family flowalign supports, and how to drive each one.

``TINY_BUILDERS[family](seed=...)`` builds a pipeline of the family's real diffusers class with random weights (no
download); ``TINY_SETTINGS[family]`` says at which size to sample it and which adapter options / ``pipe(...)``
keywords match; ``tiny_condition_images`` makes condition images for the edit and image-to-video families.
"""

from __future__ import annotations

import numpy as np

from .pipelines import tiny_flux_pipeline, tiny_sd3_pipeline, tiny_sd_pipeline, tiny_sdxl_pipeline, tiny_wan_pipeline
from .pipelines_flux2 import tiny_flux2_klein_pipeline, tiny_flux2_pipeline
from .pipelines_kontext import tiny_flux_kontext_pipeline
from .pipelines_qwen import tiny_qwenimage_edit_pipeline, tiny_qwenimage_pipeline
from .pipelines_wan import tiny_wan_i2v_pipeline
from .pipelines_zimage import tiny_zimage_pipeline

QWEN_AREA, QWEN_VL_AREA = 64 * 64, 32 * 32  # the tiny edit pipelines' condition areas (pixels)
TINY_BUILDERS = {
    "sd3": tiny_sd3_pipeline,
    "flux": tiny_flux_pipeline,
    "sd": tiny_sd_pipeline,
    "sdxl": tiny_sdxl_pipeline,
    "wan": tiny_wan_pipeline,
    "flux_kontext": tiny_flux_kontext_pipeline,
    "flux2": tiny_flux2_pipeline,
    "flux2_klein": tiny_flux2_klein_pipeline,
    "zimage": tiny_zimage_pipeline,
    "wan_i2v": tiny_wan_i2v_pipeline,
    "qwenimage": tiny_qwenimage_pipeline,
    # the edit pipelines at small condition areas (their own 1024**2 px make a CPU call take seconds)
    "qwenimage_edit": lambda seed=0: tiny_qwenimage_edit_pipeline(seed=seed, condition_area=QWEN_AREA),
    "qwenimage_edit_plus": lambda seed=0: tiny_qwenimage_edit_pipeline(plus=True, seed=seed, condition_area=QWEN_AREA,
                                                                       vl_area=QWEN_VL_AREA),
}

# How to drive each family's tiny pipeline: ``size`` = the latent size flowalign samples at (height, width,
# num_frames), ``adapter`` = the adapter options, ``call`` = the ``pipe(...)`` keywords equivalent to both.
# Families whose adapter has ``condition_image`` also take one image per row (``tiny_condition_images``).
_T5 = dict(max_sequence_length=16)
TINY_SETTINGS: dict[str, dict[str, dict]] = {
    "sd3": dict(size={}, adapter=_T5, call=_T5),
    "flux": dict(size=dict(height=16, width=16), adapter=_T5, call=dict(height=16, width=16, **_T5)),
    "sd": dict(size={}, adapter={}, call={}),
    "sdxl": dict(size={}, adapter={}, call={}),
    "wan": dict(size=dict(height=32, width=32, num_frames=5), adapter=_T5,
                call=dict(height=32, width=32, num_frames=5, **_T5)),
    # Kontext rescales to max_area (default 1024**2) unless told the requested area and no auto-resize
    "flux_kontext": dict(size=dict(height=16, width=16), adapter=_T5,
                         call=dict(height=16, width=16, max_area=16 * 16, _auto_resize=False, **_T5)),
    # the Qwen3 chat templates take tokens of their own: FLUX.2 [dev]'s system message ~40, klein's and Z-Image's ~14
    "flux2": dict(size=dict(height=16, width=16), adapter=dict(max_sequence_length=64),
                  call=dict(height=16, width=16, max_sequence_length=64)),
    "flux2_klein": dict(size=dict(height=16, width=16), adapter=dict(max_sequence_length=32),
                        call=dict(height=16, width=16, max_sequence_length=32)),
    "zimage": dict(size=dict(height=16, width=16), adapter=dict(max_sequence_length=32),
                   call=dict(height=16, width=16, max_sequence_length=32)),
    "wan_i2v": dict(size=dict(height=32, width=32, num_frames=5), adapter=_T5,
                    call=dict(height=32, width=32, num_frames=5, **_T5)),
    # Qwen-Image: 2 x 2 packed tokens; the edit adapters told the tiny pipelines' condition areas
    "qwenimage": dict(size=dict(height=32, width=32), adapter={}, call=dict(height=32, width=32)),
    "qwenimage_edit": dict(size=dict(height=32, width=32), adapter=dict(condition_area=QWEN_AREA),
                           call=dict(height=32, width=32)),
    "qwenimage_edit_plus": dict(size=dict(height=32, width=32),
                                adapter=dict(condition_area=QWEN_AREA, vl_area=QWEN_VL_AREA),
                                call=dict(height=32, width=32)),
}


def tiny_condition_images(n: int, size: int = 32, seed: int = 0) -> list:
    """``n`` random RGB PIL images of ``size`` x ``size`` (condition images for the tiny edit / I2V pipelines)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]
