"""The toy_geneval ceiling the pipeline's VAE allows: ground-truth renders of the held-out prompts, scored
as rendered and after a round trip through the VAE.

    python scripts/vae_ceiling.py [--model assets/toy-sd3] [--per-task 96] [--seed 20000] [--out FILE]

No denoiser can score above what its VAE can reconstruct: ``decode(mean(encode(x)))`` of a perfect image
``x`` is the best the pipeline can output. Image i of the held-out set (``heldout_prompts(per_task)``,
the demo's prompts) is ``render(prompt_i, size, seed + i)``, size = the transformer's latent side x the VAE's
downsampling (shipped: 16 x 4 = 64 px). Prints (and with --out writes) JSON:
``{"renders": {...}, "reconstructions": {...}}``, each ``{"toy_geneval", "strict", "per_task": {task: fraction}, "n"}``.
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np
import torch

from flowalign.evaluation.sampling import heldout_prompts, score_toy
from flowalign.toy import render


def _summary(metrics: dict) -> dict:
    return {"toy_geneval": metrics["toy_geneval"], "strict": metrics["strict"], "n": metrics["n"],
            "per_task": {task: m["fraction"] for task, m in metrics["per_task"].items()}}


@torch.no_grad()
def vae_ceiling(vae, size: int, per_task: int, seed: int = 20_000, batch: int = 64) -> dict:
    """vae: a diffusers AutoencoderKL; size: the pipeline's image side in px -> the two scores (module doc)."""
    prompts = heldout_prompts(per_task)
    arrays = [np.asarray(render(p, size, seed=seed + i)[0], dtype=np.float32) for i, p in enumerate(prompts)]
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 255.0  # [N,3,H,W] in [0,1]
    recon = []
    for start in range(0, len(prompts), batch):
        chunk = x[start : start + batch] * 2 - 1
        z = vae.encode(chunk).latent_dist.mean
        recon.append((vae.decode(z).sample / 2 + 0.5).clamp(0, 1))
    return {"renders": _summary(score_toy(x, prompts)),
            "reconstructions": _summary(score_toy(torch.cat(recon), prompts))}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="pipeline folder (default: the shipped assets/toy-sd3)")
    ap.add_argument("--per-task", type=int, default=96, help="held-out images per GenEval task (demo: 96)")
    ap.add_argument("--seed", type=int, default=20_000)
    ap.add_argument("--out", default=None, help="also write the JSON here")
    a = ap.parse_args(argv)
    from diffusers import AutoencoderKL

    from flowalign.resources import asset

    model = a.model or asset("toy-sd3")
    vae_dir, transformer_config = os.path.join(model, "vae"), os.path.join(model, "transformer", "config.json")
    if not (os.path.isdir(vae_dir) and os.path.isfile(transformer_config)):
        ap.error(f"{model} has no vae/ or transformer/config.json: pass --model an SD3 pipeline folder")
    if a.per_task < 1:
        ap.error(f"--per-task must be >= 1, got {a.per_task}")
    vae = AutoencoderKL.from_pretrained(vae_dir).eval()
    with open(transformer_config) as f:  # image side = latent side x the VAE's downsampling
        size = json.load(f)["sample_size"] * 2 ** (len(vae.config.block_out_channels) - 1)
    result = vae_ceiling(vae, size, a.per_task, a.seed)
    text = json.dumps(result, indent=2)
    print(text)
    if a.out:
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        with open(a.out, "w") as f:
            f.write(text + "\n")
    return result


if __name__ == "__main__":
    main()
