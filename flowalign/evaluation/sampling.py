"""Held-out evaluation on the toy world: sample a pipeline on held-out prompts and score toy_geneval.

Each GenEval task gets ``per_task`` images: its held-out prompts cycled, every image with its own seed,
so tasks with a single held-out prompt ("a circle") still get several samples.
"""

from __future__ import annotations

from typing import Sequence

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
                  batch_size: int = 32, desc: str = "sampling") -> torch.Tensor:
    """Images [N,3,H,W] in [0,1] from ``pipe(prompt)``; image i uses ``torch.Generator().manual_seed(seed+i)``."""
    previous = dict(getattr(pipe, "_progress_bar_config", {}))
    pipe.set_progress_bar_config(disable=True)  # our own bar below; diffusers' would nest inside it
    images = []
    try:
        for start in tqdm(range(0, len(prompts), batch_size), desc=desc, leave=False):
            chunk = list(prompts[start : start + batch_size])
            gens = [torch.Generator().manual_seed(seed + start + i) for i in range(len(chunk))]
            out = pipe(prompt=chunk, num_inference_steps=steps, guidance_scale=guidance_scale, generator=gens,
                       output_type="pt", **pipeline_call_kwargs(pipe))
            images.append(out.images.float().clamp(0, 1).cpu())
    finally:
        pipe._progress_bar_config = previous  # the caller's pipeline keeps its own progress-bar setting
    return torch.cat(images)


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


