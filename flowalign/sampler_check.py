"""Sampler check: sample a 1-D Gaussian with its exact velocity through every flow sampler.

Data ``x0 ~ N(m, s^2)``; with ``x_t = (1 - t) x0 + t eps`` the exact velocity is
``v(x, t) = -m + (t - (1 - t) s^2) / var_t (x - (1 - t) m)``, ``var_t = (1 - t)^2 s^2 + t^2``.
Each sampler should return samples with mean ~ m and std ~ s; the report lists what it got, the mean
per-step log-prob, and a histogram PNG.
"""

from __future__ import annotations

import json
import os

import torch
from tqdm import tqdm

from .samplers import flow_constant_noise_step, flow_cps_step, flow_ode_step, flow_sde_step

DATA_MEAN, DATA_STD = 1.5, 0.5
SAMPLERS = {
    "flow_ode": lambda v, x, t, tn, g: flow_ode_step(v, x, t, tn),
    "flow_sde(a=0.7)": lambda v, x, t, tn, g: flow_sde_step(v, x, t, tn, 0.7, generator=g),
    "flow_constant_noise(eta=0.3)": lambda v, x, t, tn, g: flow_constant_noise_step(v, x, t, tn, 0.3, generator=g),
    "flow_cps(a=0.7)": lambda v, x, t, tn, g: flow_cps_step(v, x, t, tn, 0.7, generator=g),
}


def exact_velocity(x: torch.Tensor, t: float) -> torch.Tensor:
    var_t = (1 - t) ** 2 * DATA_STD**2 + t**2
    return -DATA_MEAN + (t - (1 - t) * DATA_STD**2) / var_t * (x - (1 - t) * DATA_MEAN)


def run_sampler_check(out_dir: str, steps: int = 200, seed: int = 0, n: int = 20_000) -> dict:
    """Sample n points per sampler; write metrics.json and histograms.png to out_dir; return metrics."""
    if steps < 1:
        raise ValueError(f"--steps must be >= 1, got {steps}")
    os.makedirs(out_dir, exist_ok=True)
    sigmas = torch.linspace(1.0, 0.0, steps + 1).tolist()
    results, samples = {}, {}
    for name, step_fn in tqdm(SAMPLERS.items(), desc="samplers"):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(n, 1, generator=g)
        log_probs = []
        for t, t_next in zip(sigmas[:-1], sigmas[1:]):
            step = step_fn(exact_velocity(x, t), x, t, t_next, g)
            if not step.deterministic:
                log_probs.append(step.log_prob().mean().item())
            x = step.prev_sample
        samples[name] = x.flatten()
        results[name] = {
            "mean": x.mean().item(),
            "std": x.std().item(),
            "mean_step_log_prob": sum(log_probs) / len(log_probs) if log_probs else None,
        }
    metrics = {"target": {"mean": DATA_MEAN, "std": DATA_STD}, "steps": steps, "samples": n, "samplers": results}
    with open(os.path.join(out_dir, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2)
    _plot(samples, os.path.join(out_dir, "histograms.png"))
    for name, r in results.items():
        print(f"{name:30s} mean {r['mean']:+.3f} (target {DATA_MEAN})  std {r['std']:.3f} (target {DATA_STD})")
    print(f"wrote {out_dir}/metrics.json and {out_dir}/histograms.png")
    return metrics


def _plot(samples: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    grid = torch.linspace(-0.5, 3.5, 200)
    density = torch.exp(-0.5 * ((grid - DATA_MEAN) / DATA_STD) ** 2) / (DATA_STD * (2 * torch.pi) ** 0.5)
    ax.plot(grid, density, "k-", lw=2, label="target N(1.5, 0.5^2)")
    for name, x in samples.items():
        ax.hist(x.numpy(), bins=80, range=(-0.5, 3.5), density=True, histtype="step", label=name)
    ax.legend(fontsize=7)
    ax.set_xlabel("x0")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
