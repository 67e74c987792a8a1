"""flowalign export: the merged pipeline reproduces the LoRA pipeline's output, and bad input is one line."""

import os

import torch

from flowalign import lora
from flowalign.apps.export import export_merged, merged_delta
from flowalign.cli import main
from flowalign.models import load_pipeline


def _latents(pipe):
    out = pipe(prompt=["a red circle", "two blue squares"], num_inference_steps=3, guidance_scale=2.0,
               generator=[torch.Generator().manual_seed(i) for i in range(2)], output_type="latent")
    return out.images.float()


def test_the_merged_pipeline_reproduces_the_lora_pipeline(tmp_path, tiny_model):
    model, lora_dir = tiny_model
    with_lora = load_pipeline(model)
    lora.load_lora_weights(with_lora, lora_dir)
    expected = _latents(with_lora)
    out = export_merged(lora_dir, model, str(tmp_path / "merged"))
    assert any(f.endswith(".safetensors") for _, _, files in os.walk(out) for f in files)
    assert not any(f.endswith(".bin") for _, _, files in os.walk(out) for f in files)
    merged = load_pipeline(out)
    got = _latents(merged)
    base = _latents(load_pipeline(model))
    # W + BA against W x + B (A x): the same function up to float32 rounding, far from the base's output
    assert (got - expected).abs().max() < 1e-4 * expected.abs().max()
    assert (base - expected).abs().max() > 1e-2 * expected.abs().max()
    changed = merged_delta(model, out)
    assert any(v > 0 for k, v in changed.items() if "to_q" in k)  # the LoRA's targets moved
    assert all(v == 0 for k, v in changed.items() if "norm" in k)  # nothing else did


def test_scale_zero_is_the_base_and_bad_input_is_one_line(tmp_path, tiny_model, capsys):
    model, lora_dir = tiny_model
    out = export_merged(lora_dir, model, str(tmp_path / "zero"), scale=0.0)
    assert all(v == 0 for v in merged_delta(model, out).values())
    assert main(["export", lora_dir, "--model", model, "--out", str(tmp_path / "zero")]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "missing"), "--model", model, "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "not found" in err and "\n" not in err.strip()
