"""Held-out evaluation on the toy world: sample a pipeline on held-out prompts and score toy_geneval.

Each GenEval task gets ``per_task`` images: its held-out prompts cycled, every image with its own seed,
so tasks with a single held-out prompt ("a circle") still get several samples.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from tqdm import tqdm

from ..models import pipeline_call_kwargs
from ..toy import GENEVAL_TASKS, prompts_in_split, toy_geneval


def heldout_prompts(per_task: int = 16, tasks: Sequence[str] = GENEVAL_TASKS) -> list[str]:
    """``per_task`` held-out prompts per task (cycled), in task order; deterministic."""
    if per_task < 1:
        raise ValueError(f"per_task must be >= 1, got {per_task}")
    out = []
    for task in tasks:
        pool = prompts_in_split(task, "heldout")
        out += [pool[i % len(pool)] for i in range(per_task)]
    return out


@torch.no_grad()
def sample_images(pipe, prompts: Sequence[str], seed: int = 0, steps: int = 10, guidance_scale: float = 4.5,
                  batch_size: int = 32, desc: str = "sampling", images: Optional[Sequence] = None,
                  adapter=None, resolution: Optional[int] = None) -> torch.Tensor:
    """Images [N,3,H,W] in [0,1] from ``pipe(prompt)``; image i uses ``torch.Generator().manual_seed(seed+i)``.

    adapter: the flowalign adapter of ``pipe``: the call then samples as it does (``adapter.call_kwargs``: the
    family's guidance scale, prompt length, negative prompt and options); None: ``guidance_scale`` as given.
    resolution: height = width in pixels (None: the pipeline's default, or each condition image's size).

    images: one condition image per prompt ([3, H, W] in [0, 1]) for editing pipelines: row i is
    ``pipe(image=images[i], prompt=prompts[i], height=H, width=W)`` (one row a call: each row has its own image;
    pipelines that would resize the image to a preferred resolution, FLUX.1 Kontext, are told not to)."""
    previous = dict(getattr(pipe, "_progress_bar_config", {}))
    pipe.set_progress_bar_config(disable=True)  # our own bar below; diffusers' would nest inside it
    if images is not None:
        try:
            return _sample_edits(pipe, prompts, images, seed, steps, guidance_scale, desc, adapter, resolution)
        finally:
            pipe._progress_bar_config = previous
    kwargs = _call_kwargs(pipe, guidance_scale, adapter, resolution, resolution)
    if resolution:
        kwargs.update(height=resolution, width=resolution)
    images = []
    try:
        for start in tqdm(range(0, len(prompts), batch_size), desc=desc, leave=False):
            chunk = list(prompts[start : start + batch_size])
            gens = [torch.Generator().manual_seed(seed + start + i) for i in range(len(chunk))]
            out = pipe(prompt=chunk, num_inference_steps=steps, generator=gens, output_type="pt",
                       **_per_row(kwargs, len(chunk)))
            images.append(out.images.float().clamp(0, 1).cpu())
    finally:
        pipe._progress_bar_config = previous  # the caller's pipeline keeps its own progress-bar setting
    return torch.cat(images)


def _call_kwargs(pipe, guidance_scale, adapter, height=None, width=None) -> dict:
    if adapter is not None:
        return adapter.call_kwargs(guidance_scale, height, width)
    return {"guidance_scale": guidance_scale, **pipeline_call_kwargs(pipe)}


def _per_row(kwargs: dict, n: int) -> dict:
    """A negative prompt repeated for each of the call's ``n`` prompts (ZImagePipeline takes no single one)."""
    if isinstance(kwargs.get("negative_prompt"), str):
        kwargs = {**kwargs, "negative_prompt": [kwargs["negative_prompt"]] * n}
    return kwargs


def _sample_edits(pipe, prompts, conditions, seed, steps, guidance_scale, desc, adapter, resolution) -> torch.Tensor:
    import inspect

    accepted = inspect.signature(pipe.__call__).parameters
    extra = {"_auto_resize": False} if "_auto_resize" in accepted else {}
    from PIL import Image

    out = []
    for i in tqdm(range(len(prompts)), desc=desc, leave=False):
        cond = conditions[i]
        h, w = (resolution, resolution) if resolution else (int(cond.shape[-2]), int(cond.shape[-1]))
        # as PIL, the type every pipeline's processors take (lossless for images read from 8-bit files)
        pil = Image.fromarray((cond.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy())
        kwargs = _per_row({**extra, **_call_kwargs(pipe, guidance_scale, adapter, h, w)}, 1)
        gen = torch.Generator().manual_seed(seed + i)
        result = pipe(image=pil, prompt=[prompts[i]], num_inference_steps=steps, generator=gen, height=h, width=w,
                      output_type="pt", **kwargs)
        out.append(result.images.float().clamp(0, 1).cpu())
    return torch.cat(out)


def score_toy(images: torch.Tensor, prompts: Sequence[str]) -> dict:
    """-> {"toy_geneval": mean fraction, "strict": mean strict, "per_task": {task: {...}}, "n": N}."""
    frac, strict, per_task = toy_geneval(images, list(prompts))
    return {"toy_geneval": frac.mean().item(), "strict": strict.mean().item(), "per_task": per_task,
            "n": len(prompts)}


def evaluate_toy(pipe, per_task: int = 16, seed: int = 10_000, steps: int = 10, guidance_scale: float = 4.5,
                 batch_size: int = 32) -> tuple[dict, torch.Tensor, list[str]]:
    """Sample and score the held-out set -> (metrics, images [N,3,H,W], prompts)."""
    prompts = heldout_prompts(per_task)
    images = sample_images(pipe, prompts, seed, steps, guidance_scale, batch_size, desc="held-out eval")
    return score_toy(images, prompts), images, prompts


