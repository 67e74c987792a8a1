"""``flowalign eval``: held-out scores of the base and of LoRA folders on one fixed prompt set and seeds."""

from __future__ import annotations

import json
import os
from typing import Sequence

from ..evaluation.heldout import HeldoutEval
from .. import models  # models.load_for_inference looked up at call time (tests spy on it)
from ..lora import load_lora_weights
from ..prompts import toy_tasks
from ..rewards import get as get_reward


def evaluate_loras(loras: Sequence[str], model: str, prompts: str = "toy", per_task: int = 24,
                   steps: int = 10, guidance_scale: float = 1.0, out: str | None = None,
                   reward: str | None = None, reward_options: dict | None = None, device: str | None = None,
                   dtype: str = "float32") -> dict:
    """Held-out scores of the base and of each LoRA folder on one fixed prompt set and seeds (flowalign.evaluation.heldout).

    Returns (and writes to ``out`` as JSON, when given) ``{"settings": {...}, "scores": {"base": {...},
    lora_dir: {...}}}`` with the ``HeldoutEval`` keys (``toy_geneval``, ``toy_geneval/<task>``, ``ocr``, ``n``);
    ``reward`` (a name, built with ``reward_options``) scores a prompt file's prompts, and every prompt of a toy
    spec too (a prompt file without one would score nothing: ValueError). ``device`` / ``dtype``: as
    :func:`flowalign.models.load_for_inference`."""
    if not reward and toy_tasks(prompts) is None:
        raise ValueError(f"--prompts {prompts!r} is a prompt file: pass --reward NAME to score its images (e.g. "
                         "--reward clip_score --reward-option model=tiny; toy specs such as 'toy' need none)")
    scorer = get_reward(reward, **(reward_options or {})) if reward else None
    evaluator = HeldoutEval([prompts], per_task, steps, guidance_scale, train_rewards={prompts: scorer},
                            extra=[reward] if reward and toy_tasks(prompts) is not None else [])
    if scorer is not None:
        evaluator.use_reward(reward, scorer)
    models.inference_dtype(dtype)  # a bad name fails before any loading
    missing = [name for name in loras if not os.path.exists(name)]
    if missing:  # before any loading
        raise FileNotFoundError(f"LoRA {missing[0]!r} not found: pass a folder written by flowalign train/demo")
    scores = {}
    for name in ["base", *loras]:
        pipe = models.load_for_inference(model, device, dtype)
        if name != "base":
            load_lora_weights(pipe, name)  # safetensors only, one-line errors
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


def best_of_n_loras(loras: Sequence[str], model: str, n: int, prompts: str = "toy", per_task: int = 24,
                    steps: int = 10, guidance_scale: float = 1.0, out: str | None = None, reward: str | None = None,
                    reward_options: dict | None = None, device: str | None = None, dtype: str = "float32") -> dict:
    """Best-of-``n`` evaluation of each LoRA folder against the base (flowalign.evaluation.best_of_n) on the
    held-out prompts of ``prompts``: one reward scores every sample (``reward``, default toy_geneval for a toy
    spec). Returns (and writes to ``out``) ``{"settings": {...}, "scores": {"base": {...}, lora_dir: {...}}}``,
    each with ``mean``, ``best_of_n_mean``, ``win_rate`` and ``win_rate_se`` (the base against itself: 1/2)."""
    from ..evaluation.best_of_n import best_of_n_scores, summarize
    from ..evaluation.heldout import EVAL_SEED, heldout_rows

    if not reward and toy_tasks(prompts) is None:
        raise ValueError(f"--prompts {prompts!r} is a prompt file: pass --reward NAME to pick the best of N (e.g. "
                         "--reward clip_score --reward-option model=tiny)")
    reward = reward or "toy_geneval"
    if n < 1:
        raise ValueError(f"--best-of must be >= 1, got {n}")
    scorer = get_reward(reward, **(reward_options or {}))
    models.inference_dtype(dtype)
    missing = [name for name in loras if not os.path.exists(name)]
    if missing:
        raise FileNotFoundError(f"LoRA {missing[0]!r} not found: pass a folder written by flowalign train/demo")
    rows = [p for p, _ in heldout_rows(prompts, per_task)]
    matrices = {}
    for name in ["base", *loras]:
        pipe = models.load_for_inference(model, device, dtype)
        if name != "base":
            load_lora_weights(pipe, name)
        matrices[name] = best_of_n_scores(pipe, rows, n, scorer, EVAL_SEED, steps, guidance_scale)
    result = {"settings": {"model": model, "prompts": prompts, "per_task": per_task, "steps": steps,
                           "guidance_scale": guidance_scale, "seed": EVAL_SEED, "best_of": n, "reward": reward,
                           "reward_options": reward_options or {}, "dtype": dtype},
              "scores": {name: summarize(m, matrices["base"]) for name, m in matrices.items()}}
    if out:
        with open(out, "w") as f:
            json.dump(result, f, indent=2)
    return result
