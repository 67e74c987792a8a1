"""Recipe for the shipped tiny pipeline: a StableDiffusion3Pipeline pretrained on the toy world.

    python scripts/train_tiny_pipeline.py --out assets/toy-sd3 --work runs/pretrain --seed 0

Stages (each cached in --work, so a rerun resumes after the last finished stage):
1. VAE: an AutoencoderKL (64 px -> 16x16x4) trained on toy renders (MSE + small KL); its latent shift
   and scale are set from data statistics, as SD3's shift_factor / scaling_factor.
2. Latents: a fixed data set of (prompt, render) pairs from the TRAIN split, encoded once.
3. Denoiser: the SD3 transformer and all text encoders (two CLIP, one 1-layer T5) trained end to end with rectified flow,
   ``x_t = (1 - t) z + t eps``, target ``eps - z``, t ~ logit-normal(0, 1); 10% of captions dropped to
   "" for classifier-free guidance. ``--caption-noise p`` (default 0, as shipped) makes a share p of
   counting, position and colour-attribution captions misstate the scene like web alt-text
   (``flowalign.toy.noisy_caption``: a count off by one, another relation, the colours swapped); the README's
   demo section reports the base it gave (``--steps 6000 --caption-noise 0.3``).
4. Save with ``save_pretrained`` (safetensors) and report held-out toy_geneval per task.
Reproducible from --seed on the same thread count (CPU, float32). Default budget: ~45 min on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from flowalign.evaluation.sampling import evaluate_toy
from flowalign.toy.pipelines import DEFAULT_WORDS, tiny_sd3_pipeline
from flowalign.toy import GENEVAL_TASKS, noisy_caption, render, sample_batch

IMAGE_SIZE = 64
ARCH = dict(image_size=IMAGE_SIZE, latent_channels=4, num_layers=4, num_heads=4, head_dim=32, patch_size=2,
            vae_channels=(16, 32, 32), text_hidden=64, text_layers=2, max_text_length=16, shift=3.0)


def render_batch(pairs, seeds) -> torch.Tensor:
    """[N,3,H,W] in [-1, 1]."""
    arrs = [np.asarray(render(spec, IMAGE_SIZE, seed=int(s))[0], dtype=np.float32) for (_, spec), s in zip(pairs, seeds)]
    return torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2) / 127.5 - 1


def train_vae(vae, steps: int, batch: int, seed: int, lr: float = 2e-3, kl_weight: float = 1e-6):
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    rng = np.random.default_rng(seed)
    bar = tqdm(range(steps), desc="vae")
    for i in bar:
        pairs = sample_batch(batch, seed=int(rng.integers(1 << 31)))
        x = render_batch(pairs, rng.integers(1 << 31, size=batch))
        post = vae.encode(x).latent_dist
        recon = vae.decode(post.sample()).sample
        loss = F.mse_loss(recon, x) + kl_weight * post.kl().mean()
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (i + 1) / 50) * 0.5 * (1 + math.cos(math.pi * i / steps))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
    return loss.item()


@torch.no_grad()
def encode_dataset(vae, n: int, seed: int, batch: int = 256):
    pairs = sample_batch(n, seed=seed)
    seeds = np.random.default_rng(seed + 1).integers(1 << 31, size=n)
    latents = []
    for s in tqdm(range(0, n, batch), desc="encode"):
        latents.append(vae.encode(render_batch(pairs[s : s + batch], seeds[s : s + batch])).latent_dist.mean)
    return torch.cat(latents), [p for p, _ in pairs]


def train_denoiser(pipe, latents, prompts, steps: int, batch: int, seed: int, lr: float = 1e-3, drop: float = 0.1,
                   caption_noise: float = 0.0):
    modules = [m for m in (pipe.transformer, pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3) if m is not None]
    params = [p for m in modules for p in m.parameters()]
    for m in modules:
        m.train()
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(seed)
    noise_rng = np.random.default_rng(seed)
    cfg = pipe.vae.config
    losses = []
    bar = tqdm(range(steps), desc="denoiser")
    for i in bar:
        idx = torch.randint(len(prompts), (batch,), generator=gen)
        z = (latents[idx] - cfg.shift_factor) * cfg.scaling_factor
        caps = ["" if torch.rand((), generator=gen) < drop else noisy_caption(prompts[j], noise_rng, caption_noise)
                for j in idx.tolist()]
        emb, _, pooled, _ = pipe.encode_prompt(caps, None, None, do_classifier_free_guidance=False,
                                               device=torch.device("cpu"), max_sequence_length=16)
        t = torch.sigmoid(torch.randn(batch, generator=gen))
        eps = torch.randn(z.shape, generator=gen)
        tb = t.view(-1, 1, 1, 1)
        x_t = (1 - tb) * z + tb * eps
        pred = pipe.transformer(hidden_states=x_t, timestep=t * 1000, encoder_hidden_states=emb,
                                pooled_projections=pooled, return_dict=False)[0]
        loss = F.mse_loss(pred, eps - z)
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (i + 1) / 100) * 0.5 * (1 + math.cos(math.pi * i / steps))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
    for m in modules:
        m.eval()
    return losses


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="assets/toy-sd3", help="where the pipeline is saved")
    ap.add_argument("--work", default="runs/pretrain", help="cache folder for stages and logs")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vae-steps", type=int, default=400)
    ap.add_argument("--dataset", type=int, default=40_000, help="(prompt, render) pairs encoded for stage 3")
    ap.add_argument("--steps", type=int, default=4000, help="denoiser optimizer steps")
    ap.add_argument("--caption-noise", type=float, default=0.0,
                    help="share of counting/position/colour-attribution captions that misstate the scene")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--eval-per-task", type=int, default=16)
    args = ap.parse_args(argv)
    if not 0.0 <= args.caption_noise <= 1.0:
        ap.error(f"--caption-noise must be in [0, 1], got {args.caption_noise}")
    os.makedirs(args.work, exist_ok=True)
    torch.manual_seed(args.seed)
    t0 = time.time()
    pipe = tiny_sd3_pipeline(words=DEFAULT_WORDS, seed=args.seed, **ARCH)
    report = {"arch": {k: list(v) if isinstance(v, tuple) else v for k, v in ARCH.items()}, "seed": args.seed}

    vae_path = os.path.join(args.work, "vae.pt")
    if os.path.exists(vae_path):
        pipe.vae.load_state_dict(torch.load(vae_path))
    else:
        report["vae_loss"] = train_vae(pipe.vae, args.vae_steps, args.batch, args.seed)
        torch.save(pipe.vae.state_dict(), vae_path)
    pipe.vae.eval()

    data_path = os.path.join(args.work, "latents.pt")
    if os.path.exists(data_path):
        latents, prompts = torch.load(data_path)
    else:
        latents, prompts = encode_dataset(pipe.vae, args.dataset, args.seed + 1)
        torch.save((latents, prompts), data_path)
    shift, scale = latents.mean().item(), 1.0 / latents.std().item()
    pipe.vae.register_to_config(shift_factor=shift, scaling_factor=scale)
    report["latent_shift"], report["latent_scale"] = shift, scale

    losses = train_denoiser(pipe, latents, prompts, args.steps, args.batch, args.seed + 2,
                            caption_noise=args.caption_noise)
    report["caption_noise"], report["denoiser_steps"] = args.caption_noise, args.steps
    report["denoiser_loss_last100"] = float(np.mean(losses[-100:]))
    os.makedirs(args.out, exist_ok=True)
    pipe.save_pretrained(args.out, safe_serialization=True)
    report["train_wall_s"] = time.time() - t0

    metrics, _, _ = evaluate_toy(pipe, per_task=args.eval_per_task)
    report["heldout"] = metrics
    report["wall_s"] = time.time() - t0
    with open(os.path.join(args.work, "report.json"), "w") as f:
        json.dump(report, f, indent=2)
    print(json.dumps({k: report[k] for k in ("heldout", "wall_s")}, indent=2))


if __name__ == "__main__":
    main()
