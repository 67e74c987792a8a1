"""flowalign.toy: the offline verifiable scene world.

``grammar`` (prompts <-> SceneSpec, seeded sampler, train/held-out splits), ``render`` (PIL
renderer), ``detect`` (image -> Detected objects, numpy only) and ``geneval`` (GenEval-style
fraction / strict scores). Typical use::

    prompt, spec = sample(seed)
    image, caption, spec = render(spec, size=64, seed=seed)
    frac, strict, per_task = toy_geneval([image], [prompt])
"""

from .detect import Detected, detect
from .geneval import DIAGNOSTIC_KINDS, check_kind, check_rates, checks, diagnostics, score, toy_geneval
from .grammar import (COLORS, GENEVAL_TASKS, RELATIONS, SHAPES, TASKS, TEMPLATES, TEXT_TASK, ObjectSpec,
                      SceneSpec, all_prompts, caption, noisy_caption, parse_prompt, prompts_in_split, relations_of,
                      sample, sample_batch, split_of)
from .render import PALETTE, layout, render

__all__ = [
    "COLORS", "DIAGNOSTIC_KINDS", "GENEVAL_TASKS", "PALETTE", "RELATIONS", "SHAPES", "TASKS", "TEMPLATES", "TEXT_TASK",
    "Detected", "ObjectSpec", "SceneSpec", "all_prompts", "caption", "check_kind", "check_rates", "checks",
    "detect", "diagnostics", "layout", "noisy_caption", "parse_prompt", "prompts_in_split", "relations_of", "render", "sample",
    "sample_batch", "score", "split_of", "toy_geneval",
]
