"""scripts/gpu_check.sh --dry: the GPU check's every step on the CPU at tiny shapes (the real run needs a lent GPU):
each (model, algorithm) pair trains one timed iteration on its scale pipeline and gets the doctor's on-policy table,
all in one JSON file."""

import json
import os
import subprocess
import sys

import torch

from flowalign.apps.gpu_check import ALGORITHMS, MODELS, VARIANTS, scale_pipeline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_scale_pipelines_have_the_real_embedding_widths_in_their_tiny_form():
    for name, family in (("sd35m", "StableDiffusion3"), ("flux", "Flux")):
        pipe = scale_pipeline(name, shrink=True, dtype=torch.float32)
        assert type(pipe).__name__ == f"{family}Pipeline" and pipe.vae_scale_factor == 8
        cfg = pipe.transformer.config
        assert pipe.text_encoder_2.config.d_model == cfg.joint_attention_dim if family == "Flux" else (
            pipe.text_encoder_3.config.d_model == cfg.joint_attention_dim)
        pooled = (pipe.text_encoder.config.hidden_size if family == "Flux" else
                  pipe.text_encoder.config.projection_dim + pipe.text_encoder_2.config.projection_dim)
        assert pooled == cfg.pooled_projection_dim


def test_dry_run_measures_every_pair_and_writes_one_json(tmp_path):
    out = tmp_path / "check"
    proc = subprocess.run([os.path.join(ROOT, "scripts", "gpu_check.sh"), "--dry", "--out", str(out)],
                          capture_output=True, text=True, env={**os.environ, "PYTHON": sys.executable})
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads((out / "gpu_check.json").read_text())
    assert result["dry"] and result["cuda_tests"] == {"skipped": "dry run"} and result["resolution"] == 64
    assert set(result["runs"]) == {f"{m}/{a}" for m in MODELS for a in ALGORITHMS}
    for key, r in result["runs"].items():
        if key.split("/")[1] in VARIANTS:  # an opt-in CUDA path (model.cuda_graphs): the GPU run only
            assert r == {"skipped": "CUDA only"}
            continue
        assert "error" not in r, f"{key}: {r.get('error')}"
        assert r["seconds"] > 0 and r["images_per_s"] == r["images"] / r["seconds"] and r["images"] == 8
        assert r["time_rollout"] > 0 and r["time_update"] > 0
        assert key.endswith("/opd") or r["update_samples"] == 8  # every row trained: the update is timed in full
        assert r["onpolicy"] and r["doctor_verdict"] in ("ok", "warn", "fail", "info")
        assert all(v["max_gap"] >= 0 or v["max_gap"] != v["max_gap"] for v in r["onpolicy"].values())  # >= 0 or NaN
    assert f"wrote {out / 'gpu_check.json'}" in proc.stdout
