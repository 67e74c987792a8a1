"""Sampling with RL guidance from the command line: one scale -> a PNG; several scales -> a reward sweep.

``flowalign sample --lora DIR --rlg-scale W --prompt "..." --out FILE.png`` samples
``pipe(prompt)`` with ``out = out_ref + W (out_theta - out_ref)`` (see ``flowalign.rlg``); without a LoRA
(``--lora none``, or none given and no ``demo_out/lora``) it samples the base model.
``flowalign sample --lora DIR --rlg-scale 0,0.5,1,1.5,2 --reward NAME --out DIR`` samples the same prompts
with the same seeds (image i: ``torch.Generator().manual_seed(seed + i)``) at each scale, scores them with
the reward and writes ``DIR/rlg_sweep.json`` (mean and standard error per scale), ``DIR/rlg_sweep.png``
(reward vs scale) and ``DIR/grid_w<scale>.png`` (the first images at each scale).

``--nrg NAME=WEIGHT`` (repeatable) adds Flow-NRG reward guidance on top, at every scale (``flowalign.nrg``,
docs/nrg.md): ``v <- v - sum_j w_j grad R_j(decode(x0_hat))`` with differentiable rewards, their build options from
``--nrg-option NAME.KEY=VALUE`` (e.g. ``clip_score.model=tiny``, the shipped tiny CLIP). It needs no LoRA.
"""

from __future__ import annotations

import json
import math
import os
from typing import Optional, Sequence

import torch

from ..config import DEFAULT_MODEL
from ..lora import load_lora_weights
from ..nrg import disable_nrg, enable_nrg, resolve_rewards
from ..rlg import disable_rlg, enable_rlg

LORA_FILE = "pytorch_lora_weights.safetensors"
DEFAULT_LORA = "demo_out/lora"  # what `flowalign demo` writes
ADAPTER_NAME = "aligned"
GRID_MAX = 8  # images per grid row


def parse_scales(text: str) -> list[float]:
    """``"0,0.5,1"`` -> [0.0, 0.5, 1.0]; a clear ValueError for anything else."""
    parts = [p.strip() for p in str(text).split(",")]
    try:
        scales = [float(p) for p in parts]
    except ValueError:
        raise ValueError(f"--rlg-scale {text!r} is not a number or a comma-separated list of numbers "
                         "(e.g. 1.5 or 0,0.5,1,1.5,2)") from None
    if not all(math.isfinite(s) for s in scales):
        raise ValueError(f"--rlg-scale {text!r} must contain finite numbers")
    if len(set(scales)) != len(scales):
        raise ValueError(f"--rlg-scale {text!r} repeats a scale")
    return scales


def parse_nrg(items: Optional[Sequence[str]]) -> dict[str, float]:
    """``["clip_score=2", "aesthetic=0.5"]`` -> {"clip_score": 2.0, "aesthetic": 0.5}; one-line ValueErrors."""
    out: dict[str, float] = {}
    for item in items or []:
        name, sep, value = str(item).partition("=")
        name = name.strip()
        try:
            weight = float(value) if sep and name else None
        except ValueError:
            weight = None
        if weight is None or not math.isfinite(weight):
            raise ValueError(f"--nrg {item!r} must look like REWARD=WEIGHT with a finite number (e.g. clip_score=2.0)")
        if name in out:
            raise ValueError(f"--nrg {name} is given twice: give each reward once")
        out[name] = weight
    return out


def parse_nrg_options(items: Optional[Sequence[str]]) -> dict[str, dict]:
    """``["clip_score.model=tiny"]`` -> {"clip_score": {"model": "tiny"}} (values read as YAML)."""
    import yaml

    out: dict[str, dict] = {}
    for item in items or []:
        key, sep, value = str(item).partition("=")
        name, dot, option = key.partition(".")
        if not sep or not dot or not name or not option:
            raise ValueError(f"--nrg-option {item!r} must look like REWARD.KEY=VALUE (e.g. clip_score.model=tiny)")
        out.setdefault(name, {})[option] = yaml.safe_load(value)
    return out


def nrg_terms(nrg: Optional[dict], nrg_options: Optional[dict] = None) -> Optional[list]:
    """The rewards of ``--nrg`` built once (``flowalign.nrg.resolve_rewards``) as (reward, weight) pairs; None
    without ``--nrg``. Options for a reward that has no ``--nrg`` weight are an error."""
    if not nrg:
        if nrg_options:
            raise ValueError(f"--nrg-option {next(iter(nrg_options))}.* needs --nrg {next(iter(nrg_options))}=WEIGHT")
        return None
    unused = sorted(set(nrg_options or {}) - set(nrg))
    if unused:
        raise ValueError(f"--nrg-option {unused[0]}.* needs --nrg {unused[0]}=WEIGHT")
    options, terms = nrg_options or {}, []
    for name, weight in nrg.items():  # one at a time, so a reward that cannot load is named with its flag
        one = {name: options[name]} if name in options else None
        try:
            terms += resolve_rewards({name: weight}, one)
        except FileNotFoundError as err:
            raise FileNotFoundError(f"--nrg {name}: {err} (its options: --nrg-option {name}.KEY=VALUE)") from None
    return [(t.reward, t.weight) for t in terms]


def nrg_label(terms: Optional[list]) -> str:
    """`` nrg clip_score=2`` for captions and logs ('' without NRG)."""
    return "" if not terms else " nrg " + " ".join(f"{r.name}={w:g}" for r, w in terms)


def _looks_local(path: str) -> bool:
    """A filesystem path rather than a Hub id ('org/name')."""
    return path.startswith((os.sep, ".", "~")) or path.count("/") != 1 or path.endswith("/") or os.path.exists(path)


LORA_FIX = "train one with `flowalign demo` (writes demo_out/lora) or pass --lora DIR"


def check_lora_dir(lora_dir: str, fix: str = LORA_FIX) -> str:
    """The LoRA folder (or .safetensors file) must exist (else a one-line error ending in ``fix``); returns it."""
    if os.path.isfile(lora_dir) and lora_dir.endswith(".safetensors"):
        return lora_dir
    if not os.path.isdir(lora_dir):
        raise FileNotFoundError(f"LoRA folder {lora_dir!r} not found: {fix}")
    if not os.path.isfile(os.path.join(lora_dir, LORA_FILE)):
        raise FileNotFoundError(f"LoRA folder {lora_dir!r} has no {LORA_FILE}: pass a folder written by "
                                "flowalign.lora.save_lora / pipe.save_lora_weights")
    return lora_dir


def load_rlg_pipeline(model: str = DEFAULT_MODEL, lora_dir: Optional[str] = None, device: Optional[str] = None,
                      dtype: str = "float32"):
    """Load the pipeline (``flowalign.models.load_for_inference``: ``dtype``, on ``device``, default CUDA when
    available) and, when given, the LoRA as adapter 'aligned'."""
    from ..models import load_for_inference

    if _looks_local(model) and not os.path.isdir(model):
        hint = " (the shipped pipeline: run scripts/train_tiny_pipeline.py)" if model == DEFAULT_MODEL else ""
        what = "is not a folder" if os.path.exists(model) else "not found"
        raise FileNotFoundError(f"model folder {model!r} {what}{hint}: pass --model DIR (a diffusers pipeline) "
                                "or a Hub id")
    if lora_dir is not None:
        check_lora_dir(lora_dir)
    pipe = load_for_inference(model, device, dtype)
    pipe.set_progress_bar_config(disable=True)
    if lora_dir is not None:
        load_lora_weights(pipe, lora_dir, ADAPTER_NAME)  # safetensors only, one-line errors
    return pipe


@torch.no_grad()
def sample_at_scale(pipe, prompts: Sequence[str], scale: Optional[float], seed: int = 0, steps: int = 20,
                    guidance_scale: float = 4.5, batch_size: int = 16, zero_init_step: int = 0,
                    nrg: Optional[list] = None) -> torch.Tensor:
    """Images [N,3,H,W] in [0,1] at RLG scale w (None: no RL guidance, the pipeline as loaded, e.g. the base
    model without a LoRA); image i uses seed + i (paired across scales). ``nrg``: (reward, weight) pairs for
    Flow-NRG on top (:func:`nrg_terms`; None: off)."""
    from ..evaluation.sampling import sample_images

    if scale is None:
        disable_rlg(pipe)
    else:
        enable_rlg(pipe, scale, zero_init_step=zero_init_step)
    if nrg:
        enable_nrg(pipe, nrg)  # after enable_rlg: NRG guides the RLG-mixed output
    else:
        disable_nrg(pipe)
    desc = ("base" if scale is None else f"RLG w={scale:g}") + nrg_label(nrg)
    return sample_images(pipe, list(prompts), seed=seed, steps=steps, guidance_scale=guidance_scale,
                         batch_size=batch_size, desc=desc)


def _save_images(images: torch.Tensor, path: str, captions: Sequence[str], label: str) -> None:
    from ..evaluation.report import _to_pil, image_grid

    if images.shape[0] == 1:
        _to_pil(images[0], 1).save(path)
    else:
        image_grid([images[:GRID_MAX]], [label], list(captions[:GRID_MAX]), path)


def sample_png(out: str, prompt: str, scale: float, model: str = DEFAULT_MODEL, lora_dir: Optional[str] = None,
               seed: int = 0, steps: int = 20, guidance_scale: float = 4.5, num_images: int = 1,
               device: Optional[str] = None, dtype: str = "float32", nrg: Optional[dict] = None,
               nrg_options: Optional[dict] = None) -> str:
    """Sample ``num_images`` images of ``prompt`` at scale w and write them to ``out`` (one image, or a grid).
    Without ``lora_dir``: the base model, which only scale 0 describes (any other is a ValueError).
    nrg / nrg_options: Flow-NRG weights ``{reward: w}`` and build options ``{reward: {key: value}}``."""
    if not out.lower().endswith(".png"):
        raise ValueError(f"--out {out!r} must be a .png file for a single scale")
    if num_images < 1:
        raise ValueError(f"--num-images must be >= 1, got {num_images}")
    if lora_dir is None and scale != 0:
        raise ValueError(f"RLG scale {scale:g} needs the fine-tuned adapter: pass lora_dir (scale 0 = the base)")
    terms = nrg_terms(nrg, nrg_options)  # reward errors before the pipeline loads
    pipe = load_rlg_pipeline(model, lora_dir, device, dtype)
    images = sample_at_scale(pipe, [prompt] * num_images, None if lora_dir is None else scale, seed, steps,
                             guidance_scale, nrg=terms)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    label = ("base" if lora_dir is None else f"w={scale:g}") + nrg_label(terms)
    _save_images(images, out, [f"seed {seed + i}" for i in range(num_images)], label)
    return out


def sweep_prompts(prompts: Optional[str], num_images: int) -> list[str]:
    """``num_images`` prompts: a text file's lines cycled, or the toy held-out prompts round-robin over tasks."""
    if num_images < 1:
        raise ValueError(f"--num-images must be >= 1, got {num_images}")
    if prompts:
        from ..prompts import read_prompt_file

        pool = read_prompt_file(prompts)
    else:
        from ..toy import GENEVAL_TASKS, prompts_in_split

        per_task = [prompts_in_split(task, "heldout") for task in GENEVAL_TASKS]
        pool = [p[i % len(p)] for i in range(num_images) for p in per_task][:num_images]
    return [pool[i % len(pool)] for i in range(num_images)]


def plot_sweep(result: dict, path: str) -> None:
    """Reward mean +- standard error vs RLG scale; w = 0 (base) and w = 1 (fine-tuned) marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    w = [r["scale"] for r in result["per_scale"]]
    m = [r["mean"] for r in result["per_scale"]]
    se = [r["sem"] for r in result["per_scale"]]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.errorbar(w, m, yerr=se, fmt="o-", capsize=3, color="C0", label=f"{result['reward']} (mean ± s.e.)")
    for x, name in ((0.0, "base"), (1.0, "fine-tuned")):
        ax.axvline(x, color="gray", ls=":", lw=1)
        ax.text(x, ax.get_ylim()[1], f" {name}", va="top", fontsize=8, color="gray")
    ax.set_xlabel("RLG scale w")
    ax.set_ylabel(result["reward"])
    ax.set_title(f"RL guidance sweep ({result['n']} images per scale)", fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def rlg_sweep(out_dir: str, scales: Sequence[float], reward: str, model: str = DEFAULT_MODEL,
              lora_dir: Optional[str] = None, prompts: Optional[str] = None, seed: int = 0, steps: int = 20,
              guidance_scale: float = 4.5, num_images: int = 24, device: Optional[str] = None,
              dtype: str = "float32", nrg: Optional[dict] = None, nrg_options: Optional[dict] = None) -> dict:
    """Score each RLG scale with ``reward`` on the same prompts and seeds; write JSON, plot and grids.
    nrg / nrg_options: Flow-NRG on top at every scale (as :func:`sample_png`).

    Returns {"per_scale": [{"scale", "mean", "sem", "n", "grid"}], "reward", "model", "lora", "nrg", ...}."""
    from .. import rewards

    if lora_dir is None:
        raise ValueError("an RLG sweep needs --lora DIR (the fine-tuned adapter)")
    scorer = rewards.get(reward)  # unknown names fail before any sampling
    terms = nrg_terms(nrg, nrg_options)
    texts = sweep_prompts(prompts, num_images)
    pipe = load_rlg_pipeline(model, lora_dir, device, dtype)
    os.makedirs(out_dir, exist_ok=True)
    rows = []
    for w in scales:
        images = sample_at_scale(pipe, texts, w, seed, steps, guidance_scale, nrg=terms)
        scores = torch.as_tensor(scorer(images, texts)).float().flatten()
        n = scores.numel()
        sem = scores.std().item() / math.sqrt(n) if n > 1 else 0.0
        grid = f"grid_w{w:g}.png"
        _save_images(images, os.path.join(out_dir, grid), texts, f"w={w:g}")
        rows.append({"scale": w, "mean": scores.mean().item(), "sem": sem, "n": n, "grid": grid})
        print(f"RLG w={w:g}{nrg_label(terms)}: {reward} {rows[-1]['mean']:.4f} ± {sem:.4f} (n={n})")
    result = {"reward": reward, "model": model, "lora": lora_dir, "seed": seed, "steps": steps,
              "guidance_scale": guidance_scale, "n": len(texts), "prompts": prompts or "toy held-out",
              "nrg": {r.name: w for r, w in terms or []}, "per_scale": rows}
    with open(os.path.join(out_dir, "rlg_sweep.json"), "w") as f:
        json.dump(result, f, indent=2)
    plot_sweep(result, os.path.join(out_dir, "rlg_sweep.png"))
    return result
