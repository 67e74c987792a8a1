"""``flowalign sample``: one scale -> PNG, a scale list -> reward sweep (JSON, plot, grids), one-line errors."""

import json

import numpy as np
import pytest
from PIL import Image

from flowalign.cli import main


def test_sample_single_png(tiny_model, tmp_path):
    model, lora_dir = tiny_model
    out = tmp_path / "img.png"
    assert main(["sample", "--model", model, "--lora", lora_dir, "--rlg-scale", "1.5", "--prompt", "a red circle",
                 "--out", str(out), "--steps", "2", "--guidance-scale", "3"]) == 0
    assert Image.open(out).size == (32, 32)
    grid = tmp_path / "grid.png"
    assert main(["sample", "--model", model, "--lora", lora_dir, "--rlg-scale", "0.5", "--prompt", "a red circle",
                 "--out", str(grid), "--steps", "1", "--num-images", "2"]) == 0
    assert Image.open(grid).size[0] > 64


def test_sample_in_bfloat16(tiny_model, tmp_path):
    model, lora_dir = tiny_model
    out = tmp_path / "img.png"
    assert main(["sample", "--model", model, "--lora", lora_dir, "--rlg-scale", "1.5", "--prompt", "a red circle",
                 "--out", str(out), "--steps", "2", "--dtype", "bfloat16", "--device", "cpu"]) == 0
    assert Image.open(out).size == (32, 32)


def test_sample_sweep(tiny_model, tmp_path):
    model, lora_dir = tiny_model
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n\ntwo blue squares\n")
    out = tmp_path / "sweep"
    assert main(["sample", "--model", model, "--lora", lora_dir, "--rlg-scale", "0,1,2", "--reward",
                 "jpeg_compressibility", "--prompts", str(prompts), "--num-images", "3", "--steps", "2",
                 "--out", str(out)]) == 0
    result = json.loads((out / "rlg_sweep.json").read_text())
    assert [r["scale"] for r in result["per_scale"]] == [0.0, 1.0, 2.0]
    assert all(r["n"] == 3 and isinstance(r["mean"], float) for r in result["per_scale"])
    for name in ["rlg_sweep.png"] + [r["grid"] for r in result["per_scale"]]:
        assert Image.open(out / name).size[0] > 0
    # The scale changes the images (JPEG size in kB is too coarse a witness on 3 tiny images).
    grids = [np.asarray(Image.open(out / r["grid"]).convert("RGB")) for r in result["per_scale"]]
    assert not np.array_equal(grids[0], grids[1]) and not np.array_equal(grids[1], grids[2])


@pytest.mark.parametrize("args, message", [
    (["--model", "/nonexistent/model", "--prompt", "x"], "model folder '/nonexistent/model' not found"),
    (["--lora", "/nonexistent/lora", "--prompt", "x"], "LoRA folder '/nonexistent/lora' not found"),
    (["--rlg-scale", "0,a,1", "--reward", "toy_geneval"], "is not a number or a comma-separated list"),
    (["--rlg-scale", "0,1"], "add --reward NAME"),
    (["--rlg-scale", "1"], "--prompt is required"),
    (["--rlg-scale", "0,1", "--reward", "nope"], "unknown reward 'nope'"),
    (["--prompt", "x", "--dtype", "float16"], "dtype (--dtype) must be one of ['float32', 'bfloat16'], got 'float16'"),
])
def test_bad_input_one_line(tiny_model, tmp_path, capsys, args, message):
    model, lora_dir = tiny_model
    base = ["sample", "--model", model, "--lora", lora_dir, "--out", str(tmp_path / "o.png")]
    assert main(base + args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("flowalign: error: ") and message in err and "\n" not in err, err


def test_sample_without_lora_draws_the_base_model(tiny_model, tmp_path, monkeypatch, capsys):
    import shutil

    model, lora_dir = tiny_model
    monkeypatch.chdir(tmp_path)  # no demo_out/lora here
    common = ["sample", "--model", model, "--prompt", "a red circle", "--steps", "2"]
    assert main(common + ["--out", "base.png"]) == 0
    assert "no LoRA (demo_out/lora not found): sampling the base model" in capsys.readouterr().out
    assert main(common + ["--lora", "none", "--out", "none.png"]) == 0
    assert main(common + ["--lora", lora_dir, "--rlg-scale", "0", "--out", "w0.png"]) == 0
    assert main(common + ["--lora", lora_dir, "--out", "w1.png"]) == 0
    img = {n: np.asarray(Image.open(tmp_path / f"{n}.png").convert("RGB")) for n in ("base", "none", "w0", "w1")}
    assert np.array_equal(img["base"], img["none"]) and np.array_equal(img["base"], img["w0"])
    assert not np.array_equal(img["base"], img["w1"])  # the LoRA changes the image
    shutil.copytree(lora_dir, tmp_path / "demo_out" / "lora")  # now the demo's adapter is the default
    capsys.readouterr()
    assert main(common + ["--out", "demo.png"]) == 0
    assert "base model" not in capsys.readouterr().out
    assert np.array_equal(np.asarray(Image.open(tmp_path / "demo.png").convert("RGB")), img["w1"])


@pytest.mark.parametrize("args, message", [
    (["--lora", "/nonexistent/lora"], "or --lora none to sample the base model"),
    (["--lora", "none", "--rlg-scale", "1.5"], "--rlg-scale 1.5 needs the fine-tuned adapter: pass --lora DIR"),
])
def test_sample_lora_errors_say_how_to_fix(tiny_model, tmp_path, capsys, args, message):
    model, _ = tiny_model
    assert main(["sample", "--model", model, "--prompt", "x", "--out", str(tmp_path / "o.png")] + args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("flowalign: error: ") and message in err and "\n" not in err, err


def test_sample_config_gives_defaults_and_flags_override(tiny_model, tmp_path, monkeypatch):
    import shutil

    import flowalign.apps.sample as sample

    model, lora_dir = tiny_model
    shutil.copytree(lora_dir, tmp_path / "run" / "lora")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"model:\n  path: {model}\nsampling:\n  eval_num_steps: 3\n  guidance_scale: 6.0\n"
                      f"train:\n  out_dir: {tmp_path / 'run'}\n")
    calls = []
    monkeypatch.setattr(sample, "sample_png", lambda out, prompt, scale, **kw: calls.append((scale, kw)) or out)
    assert main(["sample", "--config", str(recipe), "--prompt", "x"]) == 0
    assert main(["sample", "--config", str(recipe), "--prompt", "x", "--steps", "1", "--guidance-scale", "2",
                 "--lora", "none", "--model", "other"]) == 0
    (s1, kw1), (s2, kw2) = calls
    assert (s1, kw1["model"], kw1["lora_dir"], kw1["steps"], kw1["guidance_scale"]) == (
        1.0, model, str(tmp_path / "run" / "lora"), 3, 6.0)
    assert (s2, kw2["model"], kw2["lora_dir"], kw2["steps"], kw2["guidance_scale"]) == (0.0, "other", None, 1, 2.0)


def test_sample_with_nrg_reward_guidance(tiny_model, tmp_path, capsys):
    # --nrg clip_score=0 is the unguided image bit for bit; a large weight changes it; NRG composes with RLG and a
    # sweep records its weights
    model, lora_dir = tiny_model
    common = ["sample", "--model", model, "--lora", lora_dir, "--rlg-scale", "1.5", "--prompt", "a red circle",
              "--steps", "2"]
    tiny = ["--nrg-option", "clip_score.model=tiny"]
    assert main(common + ["--out", str(tmp_path / "plain.png")]) == 0
    assert main(common + ["--nrg", "clip_score=0", *tiny, "--out", str(tmp_path / "off.png")]) == 0
    assert main(common + ["--nrg", "clip_score=200", *tiny, "--out", str(tmp_path / "on.png")]) == 0
    img = {n: np.asarray(Image.open(tmp_path / f"{n}.png").convert("RGB")) for n in ("plain", "off", "on")}
    assert np.array_equal(img["plain"], img["off"]) and not np.array_equal(img["plain"], img["on"])
    out = tmp_path / "sweep"
    assert main(["sample", "--model", model, "--lora", lora_dir, "--rlg-scale", "0,1", "--reward",
                 "jpeg_compressibility", "--num-images", "2", "--steps", "1", "--out", str(out),
                 "--nrg", "clip_score=50", *tiny]) == 0
    result = json.loads((out / "rlg_sweep.json").read_text())
    assert result["nrg"] == {"clip_score": 50.0} and len(result["per_scale"]) == 2
    assert "RLG w=1 nrg clip_score=50: jpeg_compressibility" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["--nrg", "ocr=1"], "'ocr' is not differentiable in torch; differentiable rewards: aesthetic, clip_score"),
    (["--nrg", "toy_geneval=2"], "'toy_geneval' is not differentiable"),
    (["--nrg", "clip_score"], "--nrg 'clip_score' must look like REWARD=WEIGHT"),
    (["--nrg", "clip_score=nan"], "with a finite number"),
    (["--nrg", "clip_score=1", "--nrg", "clip_score=2"], "--nrg clip_score is given twice"),
    (["--nrg-option", "clip_score.model=tiny"], "--nrg-option clip_score.* needs --nrg clip_score=WEIGHT"),
    (["--nrg", "clip_score=1", "--nrg-option", "model=tiny"], "must look like REWARD.KEY=VALUE"),
    (["--nrg", "clip_score=1", "--nrg-option", "clip_score.model=/nonexistent/clip"],
     "--nrg clip_score: CLIP weights '/nonexistent/clip' not found"),
])
def test_sample_nrg_errors_one_line(tiny_model, tmp_path, capsys, args, message):
    model, lora_dir = tiny_model
    base = ["sample", "--model", model, "--lora", lora_dir, "--prompt", "x", "--out", str(tmp_path / "o.png")]
    assert main(base + args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("flowalign: error: ") and message in err and "\n" not in err, err
