"""Held-out evaluation on the toy world: sample a pipeline on held-out prompts and score toy_geneval.

Each GenEval task gets ``per_task`` images: its held-out prompts cycled, every image with its own seed,
so tasks with a single held-out prompt ("a circle") still get several samples.
"""

from __future__ import annotations

import os
from typing import Sequence

import torch
from tqdm import tqdm

from .models import pipeline_call_kwargs
from .toy import GENEVAL_TASKS, prompts_in_split, toy_geneval


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


def evaluate_loras(loras: Sequence[str], model: str, prompts: str = "toy", per_task: int = 24,
                   steps: int = 10, guidance_scale: float = 1.0, out: str | None = None,
                   reward: str | None = None, reward_options: dict | None = None, device: str | None = None,
                   dtype: str = "float32") -> dict:
    """Held-out scores of the base and of each LoRA folder on one fixed prompt set and seeds (flowalign.heldout).

    Returns (and writes to ``out`` as JSON, when given) ``{"settings": {...}, "scores": {"base": {...},
    lora_dir: {...}}}`` with the ``HeldoutEval`` keys (``toy_geneval``, ``toy_geneval/<task>``, ``ocr``, ``n``);
    ``reward`` (a name, built with ``reward_options``) scores a prompt file's prompts, and every prompt of a toy
    spec too. ``device`` / ``dtype``: as :func:`flowalign.models.load_for_inference`."""
    import json

    from .heldout import HeldoutEval
    from .prompts import toy_tasks
    from .models import inference_dtype, load_for_inference

    from .rewards import get as get_reward

    scorer = get_reward(reward, **(reward_options or {})) if reward else None
    evaluator = HeldoutEval([prompts], per_task, steps, guidance_scale, train_rewards={prompts: scorer},
                            extra=[reward] if reward and toy_tasks(prompts) is not None else [])
    if scorer is not None:
        evaluator.use_reward(reward, scorer)
    inference_dtype(dtype)  # a bad name fails before any loading
    missing = [name for name in loras if not os.path.exists(name)]
    if missing:  # before any loading
        raise FileNotFoundError(f"LoRA {missing[0]!r} not found: pass a folder written by flowalign train/demo")
    scores = {}
    for name in ["base", *loras]:
        pipe = load_for_inference(model, device, dtype)
        if name != "base":
            pipe.load_lora_weights(name)
        scores[name] = evaluator(pipe)[0]
    result = {"settings": {"model": model, "prompts": prompts, "per_task": per_task, "steps": steps,
                           "guidance_scale": guidance_scale, "seed": evaluator.seed, "n": len(evaluator.prompts),
                           "dtype": dtype,
                           "reward": reward, "reward_options": reward_options or {}},
              "scores": scores}
    if out:
        with open(out, "w") as f:
            json.dump(result, f, indent=2)
    return result
