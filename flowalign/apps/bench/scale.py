"""Training throughput of LoRA at SD3.5-Medium / FLUX.1-dev transformer sizes on a GPU (``bench_scale``), with
random weights and the published configs."""

from __future__ import annotations

import json
import os
import time
from typing import Callable, Optional, Sequence

import torch

from .meters import describe_machine, machine_info


# ---- GPU scale ----------------------------------------------------------------------------------------------

# Transformer configs with random weights (no download). Values from the published diffusers configs:
# stabilityai/stable-diffusion-3.5-medium transformer/config.json (MMDiT-X, 2.5B) and
# black-forest-labs/FLUX.1-dev transformer/config.json (12B).
SCALE_CONFIGS = {
    "sd35m": ("SD3Transformer2DModel", "sd3", {
        "sample_size": 128, "patch_size": 2, "in_channels": 16, "out_channels": 16, "num_layers": 24,
        "attention_head_dim": 64, "num_attention_heads": 24, "joint_attention_dim": 4096,
        "caption_projection_dim": 1536, "pooled_projection_dim": 2048, "pos_embed_max_size": 384,
        "dual_attention_layers": list(range(13)), "qk_norm": "rms_norm"}),
    "flux": ("FluxTransformer2DModel", "flux", {
        "patch_size": 1, "in_channels": 64, "num_layers": 19, "num_single_layers": 38, "attention_head_dim": 128,
        "num_attention_heads": 24, "joint_attention_dim": 4096, "pooled_projection_dim": 768,
        "guidance_embeds": True, "axes_dims_rope": [16, 56, 56]}),
}
# Text tokens the adapters feed: SD3 77 CLIP + 256 T5 (SD3Adapter's max_sequence_length); FLUX 512 T5.
SCALE_TEXT_TOKENS = {"sd35m": 333, "flux": 512}
# The same structure, a few thousand times smaller: for tests on a CPU.
SCALE_SHRINK = {
    "sd35m": {"num_layers": 2, "attention_head_dim": 8, "num_attention_heads": 2, "joint_attention_dim": 16,
              "caption_projection_dim": 16, "pooled_projection_dim": 16, "pos_embed_max_size": 16,
              "dual_attention_layers": [0]},
    "flux": {"num_layers": 1, "num_single_layers": 1, "attention_head_dim": 16, "num_attention_heads": 2,
             "joint_attention_dim": 16, "pooled_projection_dim": 16, "axes_dims_rope": [4, 6, 6]},
}


def scale_config(name: str, shrink: bool = False) -> tuple[str, str, dict]:
    """(diffusers class name, flowalign family, config kwargs) of ``name`` (sd35m | flux); ``shrink``: the
    tiny same-structure variant used by the tests."""
    if name not in SCALE_CONFIGS:
        raise ValueError(f"unknown --scale {name!r}; choose from {', '.join(SCALE_CONFIGS)}")
    cls, family, cfg = SCALE_CONFIGS[name]
    return cls, family, {**cfg, **(SCALE_SHRINK[name] if shrink else {})}


def build_transformer(name: str, shrink: bool = False, device="cpu", dtype: torch.dtype = torch.bfloat16):
    """The transformer of ``name`` with random weights, created directly on ``device`` in ``dtype``
    (``device="meta"``: no memory, e.g. to count parameters)."""
    import diffusers

    cls, _, cfg = scale_config(name, shrink)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = getattr(diffusers, cls)(**cfg)
    finally:
        torch.set_default_dtype(previous)
    if str(device) != "meta":
        model.to(device)  # buffers built from numpy (SD3's pos_embed) start on the CPU
    return model.eval()


def scale_inputs(name: str, model, batch: int, resolution: int, text_tokens: Optional[int] = None,
                 device="cpu", dtype: torch.dtype = torch.bfloat16) -> dict:
    """Random denoiser kwargs for ``batch`` images of ``resolution`` px (VAE factor 8, 16 latent channels) as
    flowalign's adapters pass them: SD3 latents [B, 16, r/8, r/8]; FLUX packed [B, (r/16)^2, 64] with its ids."""
    cfg = model.config
    h = resolution // 8
    n_txt = text_tokens or SCALE_TEXT_TOKENS[name]
    g = torch.Generator().manual_seed(0)
    rand = lambda *shape: torch.randn(*shape, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    txt = rand(batch, n_txt, cfg.joint_attention_dim)
    pooled = rand(batch, cfg.pooled_projection_dim)
    if name == "sd35m":
        return {"hidden_states": rand(batch, cfg.in_channels, h, h), "encoder_hidden_states": txt,
                "pooled_projections": pooled, "timestep": torch.full((batch,), 500.0, device=device),
                "return_dict": False}
    side = h // 2
    img_ids = torch.zeros(side, side, 3)
    img_ids[..., 1] = torch.arange(side)[:, None]
    img_ids[..., 2] = torch.arange(side)[None, :]
    kwargs = {"hidden_states": rand(batch, side * side, cfg.in_channels), "encoder_hidden_states": txt,
              "pooled_projections": pooled, "timestep": torch.full((batch,), 0.5, device=device, dtype=dtype),
              "img_ids": img_ids.reshape(-1, 3).to(device=device, dtype=dtype),
              "txt_ids": torch.zeros(n_txt, 3, device=device, dtype=dtype), "return_dict": False}
    if cfg.guidance_embeds:
        kwargs["guidance"] = torch.full((batch,), 3.5, device=device, dtype=torch.float32)
    return kwargs


def time_train_step(model, inputs: dict, params: Sequence[torch.nn.Parameter], repeats: int = 3,
                    warmup: int = 1) -> dict:
    """Mean seconds of one no-grad forward (sampling) and of one forward + backward (training) through
    ``model`` on ``inputs``, with peak CUDA memory of each (None on CPU). Loss = mean(out^2)."""
    cuda = next(model.parameters()).device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def timed(train: bool) -> tuple[float, Optional[float]]:
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        for i in range(warmup + repeats):
            if i == warmup:
                sync()
                t0 = time.perf_counter()
            with torch.set_grad_enabled(train):
                out = model(**inputs)[0]
                if train:
                    out.float().pow(2).mean().backward()
                    for p in params:
                        p.grad = None
            del out
        sync()
        return (time.perf_counter() - t0) / repeats, (torch.cuda.max_memory_allocated() / 2**30 if cuda else None)

    fwd_s, fwd_mem = timed(False)
    train_s, train_mem = timed(True)
    return {"forward_s": fwd_s, "forward_peak_gb": fwd_mem, "train_step_s": train_s, "train_peak_gb": train_mem}


def run_scale(name: str, resolution: int = 512, batch: int = 1, rank: int = 32, repeats: int = 3,
              device="cuda", dtype: torch.dtype = torch.bfloat16, shrink: bool = False,
              num_steps: int = 10) -> dict:
    """LoRA (``LORA_TARGET_MODULES[family]``, float32 params on a ``dtype`` base, as ``set_precision``) on the
    transformer of ``name``: forward and forward + backward timings and peak memory, without and with gradient
    checkpointing. ``samples_per_s`` = batch / seconds per call; ``rollout_images_per_s`` = forward
    samples/s / (num_steps x CFG passes): whole images sampled per second at ``num_steps`` steps."""
    from peft import LoraConfig

    from ...runtime.kernels import avoid_cudnn_attention
    from ...lora import LORA_TARGET_MODULES

    _, family, _ = scale_config(name, shrink)
    avoid_cudnn_attention(device)  # cuDNN attention's backward failed on FLUX shapes (flowalign.runtime.kernels)
    model = build_transformer(name, shrink, device, dtype)
    model.requires_grad_(False)
    model.add_adapter(LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=LORA_TARGET_MODULES[family]))
    params = [p for n, p in model.named_parameters() if "lora_" in n]
    for p in params:
        p.data = p.data.float()
        p.requires_grad_(True)
    inputs = scale_inputs(name, model, batch, resolution, device=device, dtype=dtype)
    cfg_passes = 2 if family == "sd3" else 1  # FLUX.1-dev is guidance-distilled: one pass per step
    out = {"model": name, "class": type(model).__name__, "resolution": resolution, "batch": batch,
           "params_b": sum(p.numel() for p in model.parameters()) / 1e9,
           "lora_params_m": sum(p.numel() for p in params) / 1e6, "dtype": str(dtype).replace("torch.", ""),
           "lora_rank": rank, "num_steps": num_steps, "cfg_passes": cfg_passes, "runs": {}}
    for ckpt in (False, True):
        if ckpt:
            model.enable_gradient_checkpointing()
        else:
            model.disable_gradient_checkpointing()
        t = time_train_step(model, inputs, params, repeats=repeats)
        t["train_samples_per_s"] = batch / t["train_step_s"]
        t["forward_samples_per_s"] = batch / t["forward_s"]
        t["rollout_images_per_s"] = t["forward_samples_per_s"] / (num_steps * cfg_passes)
        out["runs"]["checkpointing" if ckpt else "no_checkpointing"] = t
    return out


def bench_scale(names: Sequence[str], out: str, resolution: int = 512, batch: int = 1, rank: int = 32,
                repeats: int = 3, command: Optional[str] = None, log: Callable[[str], None] = print) -> dict:
    """``run_scale`` for each name on the GPU; writes ``scale.json`` and ``scale.md`` into ``out``."""
    if not torch.cuda.is_available():
        raise RuntimeError("--scale needs a CUDA GPU (torch.cuda.is_available() is False): run it on a GPU "
                           "machine with a CUDA build of torch, or drop --scale")
    os.makedirs(out, exist_ok=True)
    results = []
    for name in names:
        scale_config(name)  # fail on a bad name before building anything
    for name in names:
        log(f"bench --scale {name}: {resolution}px, batch {batch}, LoRA r{rank}")
        results.append(run_scale(name, resolution, batch, rank, repeats))
        torch.cuda.empty_cache()
    report = {"machine": machine_info(), "command": command, "results": results}
    with open(os.path.join(out, "scale.json"), "w") as f:
        json.dump(report, f, indent=1)
    with open(os.path.join(out, "scale.md"), "w") as f:
        f.write(scale_markdown(report))
    return report


def scale_markdown(report: dict) -> str:
    lines = ["| transformer | params | grad. checkpointing | train step (fwd+bwd) | train samples/s | "
             "peak memory (train) | forward samples/s | images/s (sampling) |", "|---|---|---|---|---|---|---|---|"]
    for r in report["results"]:
        for key, t in r["runs"].items():
            lines.append(f"| {r['model']} ({r['resolution']}px, batch {r['batch']}, {r['dtype']}, LoRA r{r['lora_rank']})"
                         f" | {r['params_b']:.2f}B | {'yes' if key == 'checkpointing' else 'no'} | "
                         f"{t['train_step_s'] * 1000:.0f} ms | {t['train_samples_per_s']:.2f} | "
                         f"{t['train_peak_gb']:.1f} GB | {t['forward_samples_per_s']:.2f} | "
                         f"{t['rollout_images_per_s']:.2f} ({r['num_steps']} steps x {r['cfg_passes']} CFG) |")
    lines += ["", f"Machine: {describe_machine(report['machine'])}. Random weights, real configs."]
    if report.get("command"):
        lines += ["", f"Reproduce: `{report['command']}`"]
    return "\n".join(lines) + "\n"
