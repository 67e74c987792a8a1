"""``scripts/gpu_check.sh`` (``python -m flowalign.apps.gpu_check``): what a lent GPU should measure, in one run of
at most ~10 minutes on one H100/H200, written to one JSON file (``gpu_check.json``):

1. the CUDA tests (``tests/test_cuda_runs.py``: every toy recipe trains on the GPU): pytest's exit status;
2. one full training iteration (rollout, reward, update; after one warm-up iteration) of GRPO, DiffusionNFT, CRD
   and DiffusionOPD on a real-size SD3.5-Medium and FLUX.1-dev transformer (random weights, the published configs
   of ``bench.scale.SCALE_CONFIGS``) at 512 px in bf16: seconds, images/s and peak CUDA memory;
3. the doctor's on-policy table (``flowalign.doctor``) of each, the largest |log-ratio| gap per setting;
4. GRPO again with ``model.cuda_graphs`` (the rollout replayed from CUDA graphs): its ``time_rollout`` against
   plain GRPO's is that path's speed-up, its doctor table the gap between graphed rollout and eager re-scoring.

The text encoders and the VAE are small random modules of the real embedding widths (CLIP pooled 2048 for SD3.5 /
768 for FLUX, T5 width 4096) and the real 8x VAE downsampling, so the transformer is what is measured; their time
is included in the iteration. ``--dry`` runs the same steps on the CPU with the tiny same-structure transformers
(``SCALE_SHRINK``) at 64 px and skips the CUDA tests and the CUDA-graph run: the suite runs it
(tests/test_gpu_check.py).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Optional, Sequence

import torch

from .bench.meters import machine_info
from .bench.scale import build_transformer, scale_config

MODELS = ("sd35m", "flux")
RECIPES = {a: f"toy_{a}.yaml" for a in ("grpo", "nft", "crd", "opd")}  # the toy recipes, shrunk to one small batch
# a recipe with an opt-in path on: its time_rollout against the plain recipe's is the path's speed-up (CUDA only)
VARIANTS = {"grpo_cuda_graphs": ("grpo", ["model.cuda_graphs=true"])}
ALGORITHMS = (*RECIPES, *VARIANTS)
# jpeg_compressibility: an offline reward that differs between any two images, so every row has an advantage and
# the update is timed in full (toy GenEval scores the random-weight images 0 alike: no advantage, no update)
BATCH = ["train.prompts_per_iter=2", "train.group_size=4", "train.minibatch=4", "train.eval_per_task=0",
         "train.iterations=2", "nft.num_timesteps=2", "crd.num_timesteps=2", "crd.steps_per_iter=1",
         "train.reward=jpeg_compressibility", "train.reward_options={}"]
VAE_BLOCKS = (32, 32, 32, 32)  # 4 levels: the real 8x downsampling, a few MB of weights
CLIP_TOKENS, T5_TOKENS = 77, 256


def scale_pipeline(name: str, shrink: bool = False, device: str = "cpu", dtype: torch.dtype = torch.bfloat16,
                   seed: int = 0):
    """A StableDiffusion3Pipeline (``sd35m``) or FluxPipeline (``flux``) around the real-size transformer of
    ``name`` (``shrink``: its tiny variant), with 1-layer random text encoders of the real widths, a small 16-channel
    8x VAE and the family's scheduler, on ``device`` in ``dtype``."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, StableDiffusion3Pipeline

    from ..toy.pipelines import (DEFAULT_WORDS, _clip_text, _eval, _t5_encoder, _vae, tiny_clip_tokenizer,
                                 tiny_t5_tokenizer)

    torch.manual_seed(seed)
    _, family, cfg = scale_config(name, shrink)
    transformer = build_transformer(name, shrink, device, dtype)
    tok, tok_t5 = tiny_clip_tokenizer(DEFAULT_WORDS, CLIP_TOKENS), tiny_t5_tokenizer(DEFAULT_WORDS, T5_TOKENS)
    eos = tok.convert_tokens_to_ids("<|endoftext|>")
    t5 = _t5_encoder(len(tok_t5), cfg["joint_attention_dim"])
    if family == "sd3":
        pooled = cfg["pooled_projection_dim"]
        h1 = pooled * 3 // 8  # CLIP-L 768 + CLIP-G 1280 = 2048 pooled, padded to T5's 4096 by the pipeline
        h1 += h1 % 2  # both widths even: 2 attention heads
        pipe = StableDiffusion3Pipeline(
            transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=_vae(16, VAE_BLOCKS),
            text_encoder=_clip_text(len(tok), h1, 1, CLIP_TOKENS, True, eos), tokenizer=tok,
            text_encoder_2=_clip_text(len(tok), pooled - h1, 1, CLIP_TOKENS, True, eos),
            tokenizer_2=tiny_clip_tokenizer(DEFAULT_WORDS, CLIP_TOKENS), text_encoder_3=t5, tokenizer_3=tok_t5)
    else:  # FLUX.1-dev's scheduler (dynamic shifting) and its VAE factors
        scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                                    max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
        pipe = FluxPipeline(
            transformer=transformer, scheduler=scheduler, vae=_vae(16, VAE_BLOCKS, shift=0.1159, scale=0.3611),
            text_encoder=_clip_text(len(tok), cfg["pooled_projection_dim"], 1, CLIP_TOKENS, False, eos),
            tokenizer=tok, text_encoder_2=t5, tokenizer_2=tok_t5)
    pipe = _eval(pipe).to(device)
    if dtype != torch.float32:
        for module in pipe.components.values():
            if isinstance(module, torch.nn.Module):
                module.to(dtype)
    return pipe


def _teacher_loras(adapter, out_dir: str) -> list[str]:
    """OPD's two teachers as LoRA folders on ``adapter``'s base (rank 4, B = 0: the base itself, which is all a
    timing needs) -> ``opd.teachers`` overrides."""
    from .. import lora

    lora.add_lora(adapter, rank=4, adapter_name="gpu_check_teacher")
    path = lora.save_lora(adapter, os.path.join(out_dir, "teacher"), adapter_name="gpu_check_teacher")
    _remove_loras(adapter)
    return [f"opd.teachers.{task}.lora={path}" for task in ("spatial", "attributes")]


def _remove_loras(adapter) -> None:
    """Delete every LoRA adapter from the denoisers (the pipeline is the base again)."""
    from .. import lora

    names = lora.adapter_names(adapter)
    for den in adapter.lora_denoisers:
        if names:
            den.delete_adapters(names)


def _peak_mb(device: str) -> Optional[float]:
    return torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else None


def train_iteration(name: str, algorithm: str, out_dir: str, dry: bool, device: str, resolution: int) -> dict:
    """One warm-up and one timed iteration of ``algorithm`` on the scale pipeline ``name`` -> {seconds, images/s,
    peak memory, the iteration's metrics}, then the doctor's on-policy gaps on the same adapter."""
    from .. import doctor
    from ..config import load_config
    from ..models import adapter_for
    from ..resources import shipped_config
    from ..trainer import Trainer

    run_dir = os.path.join(out_dir, f"{name}_{algorithm}")
    algorithm, extra = VARIANTS.get(algorithm, (algorithm, []))
    dtype = torch.float32 if dry else torch.bfloat16
    pipe = scale_pipeline(name, shrink=dry, device=device, dtype=dtype)
    adapter = adapter_for(pipe)
    overrides = [*BATCH, f"train.out_dir={run_dir}", f"model.device={device}", f"sampling.resolution={resolution}",
                 f"model.dtype={'float32' if dry else 'bfloat16'}", "sampling.num_steps=4" if dry else
                 "sampling.num_steps=10", "opd.train_window=null", *extra]
    if algorithm == "opd":
        overrides += _teacher_loras(adapter, run_dir)
    cfg = load_config(shipped_config(RECIPES[algorithm]), overrides)
    # the doctor first, on the adapter without a policy LoRA (it adds and measures its own), which is then removed
    # the run's own dtype only: the fp32 and fp16 rows would cast a 12B transformer twice more (minutes each)
    report = doctor.run(cfg, adapter=adapter, out=os.path.join(run_dir, "doctor"), rows=4,
                        dtypes="fp32" if dry else "bf16", progress=False, echo=False)
    _remove_loras(adapter)
    trainer = Trainer(cfg, adapter=adapter)
    trainer.step()  # warm-up: kernels, caches, allocator
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    metrics = trainer.step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    images = cfg.train.prompts_per_iter * cfg.train.group_size
    out = {"seconds": seconds, "images_per_s": images / seconds, "images": images, "peak_memory_mb": _peak_mb(device),
           "time_rollout": metrics.get("time_rollout"), "time_reward": metrics.get("time_reward"),
           "time_update": metrics.get("time_update"), "update_samples": metrics.get("update_samples")}
    out["doctor_verdict"] = report.verdict
    out["onpolicy"] = {g.case.name: {"max_gap": g.max_gap, "max_ratio_error": g.max_ratio_error,
                                     "max_clip_frac": g.max_clip_frac, "configured": g.case.configured}
                       for g in report.gaps}  # the doctor's table: |log rho| of each setting vs the rollout
    return out


def cuda_tests(root: str) -> dict:
    """pytest of the CUDA-only tests -> {"returncode", "seconds", "summary"} (the last line pytest printed)."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", os.path.join(root, "tests", "test_cuda_runs.py")],
                          capture_output=True, text=True, cwd=root)
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    return {"returncode": proc.returncode, "seconds": time.perf_counter() - t0, "summary": lines[-1] if lines else ""}


def run(out_dir: str = "gpu_check_out", dry: bool = False, models: Sequence[str] = MODELS,
        algorithms: Sequence[str] = ALGORITHMS, root: Optional[str] = None) -> dict:
    """Every step of the module docstring -> the result, also written to ``out_dir/gpu_check.json`` (after each
    step, so a run cut short keeps what it measured)."""
    device = "cpu" if dry else "cuda"
    if not dry and not torch.cuda.is_available():
        raise RuntimeError("gpu_check needs a CUDA GPU; on a CPU run it with --dry (tiny shapes)")
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "gpu_check.json")
    result = {"dry": dry, "machine": machine_info(), "resolution": 64 if dry else 512, "runs": {}}

    def save():
        with open(path, "w") as f:
            json.dump(result, f, indent=2)

    root = root or os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    result["cuda_tests"] = {"skipped": "dry run"} if dry else cuda_tests(root)
    save()
    for name in models:
        for algorithm in algorithms:
            key = f"{name}/{algorithm}"
            try:
                result["runs"][key] = ({"skipped": "CUDA only"} if dry and algorithm in VARIANTS else
                                       train_iteration(name, algorithm, out_dir, dry, device, result["resolution"]))
            except Exception as err:  # one failing pair is a finding, not the end of the check
                result["runs"][key] = {"error": f"{type(err).__name__}: {err}"}
            if device == "cuda":
                torch.cuda.empty_cache()
            save()
            r = result["runs"][key]
            print(f"{key}: " + (r.get("error") or r.get("skipped") or
                                f"{r['seconds']:.2f} s per iteration, {r['images_per_s']:.2f} images/s"), flush=True)
    print(f"wrote {path}")
    return result


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="gpu_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="gpu_check_out", help="folder of gpu_check.json and the runs")
    p.add_argument("--dry", action="store_true", help="CPU, tiny shapes, no CUDA tests (what the suite runs)")
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated: sd35m,flux")
    p.add_argument("--algorithms", default=",".join(ALGORITHMS), help="comma-separated: " + ",".join(ALGORITHMS))
    a = p.parse_args(argv)
    run(a.out, a.dry, a.models.split(","), a.algorithms.split(","))
    return 0


if __name__ == "__main__":
    sys.exit(main())
