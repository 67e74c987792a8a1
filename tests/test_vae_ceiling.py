"""scripts/vae_ceiling.py: the held-out set's ground-truth renders score ~1, their round trip through the
shipped VAE scores what the detector still reads, and a VAE that decodes to a blank scores ~0."""

import importlib.util
import json
import os

import pytest
import torch
from diffusers import AutoencoderKL

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("vae_ceiling", os.path.join(ROOT, "scripts", "vae_ceiling.py"))
vae_ceiling = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(vae_ceiling)


def test_shipped_vae_keeps_what_the_detector_reads(tmp_path):
    out = tmp_path / "ceiling.json"
    result = vae_ceiling.main(["--per-task", "4", "--out", str(out)])
    assert json.loads(out.read_text()) == result
    assert result["renders"]["n"] == result["reconstructions"]["n"] == 24
    assert result["renders"]["toy_geneval"] >= 0.99
    assert 0.8 <= result["reconstructions"]["toy_geneval"] <= result["renders"]["toy_geneval"]
    assert set(result["reconstructions"]["per_task"]) == {"single_object", "two_object", "counting", "colors",
                                                          "position", "color_attr"}


def test_a_vae_that_decodes_to_blank_scores_near_zero():
    vae = AutoencoderKL.from_pretrained(os.path.join(ROOT, "assets", "toy-sd3", "vae")).eval()
    with torch.no_grad():
        vae.decoder.conv_out.weight.zero_()
        vae.decoder.conv_out.bias.fill_(1.0)  # every pixel white: nothing to detect
    result = vae_ceiling.vae_ceiling(vae, 64, per_task=2)
    assert result["renders"]["toy_geneval"] >= 0.99
    assert result["reconstructions"]["toy_geneval"] < 0.1


def test_a_folder_without_a_pipeline_is_a_one_line_error(tmp_path, capsys):
    with pytest.raises(SystemExit):
        vae_ceiling.main(["--model", str(tmp_path)])
    assert "pass --model an SD3 pipeline folder" in capsys.readouterr().err
