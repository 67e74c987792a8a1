"""`flowalign eval LORA ...`: the base and each LoRA scored on one held-out set with the same seeds."""

import json

from flowalign.cli import main
from flowalign.evaluation.heldout import heldout_rows


def test_eval_scores_base_and_lora_on_the_same_prompts(tmp_path, tiny_model, capsys):
    model, lora_dir = tiny_model
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\ntwo blue squares\n")
    out = tmp_path / "eval.json"
    rc = main(["eval", lora_dir, "--model", model, "--prompts", str(prompts), "--reward", "jpeg_compressibility",
               "--steps", "2", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    result = json.loads(out.read_text())
    base, tuned = result["scores"]["base"], result["scores"][lora_dir]
    assert base["n"] == tuned["n"] == 2 and result["settings"]["guidance_scale"] == 1.0
    assert base["jpeg_compressibility"] != tuned["jpeg_compressibility"]  # the LoRA was applied
    printed = capsys.readouterr().out
    assert "| base |" in printed and f"| {lora_dir} |" in printed


def test_eval_toy_spec_uses_the_held_out_split(tmp_path, tiny_model):
    model, _ = tiny_model
    out = tmp_path / "eval.json"
    assert main(["eval", "--model", model, "--prompts", "toy:counting", "--per-task", "2", "--steps", "1",
                 "--out", str(out)]) == 0
    s = json.loads(out.read_text())["scores"]["base"]
    assert s["n"] == 2 and 0 <= s["toy_geneval/counting"] <= 1
    assert len(heldout_rows("toy:counting", 2)) == 2


def test_eval_missing_lora_is_one_line(tmp_path, tiny_model, capsys):
    model, _ = tiny_model
    assert main(["eval", str(tmp_path / "nope"), "--model", model, "--prompts", "toy:colors", "--per-task", "1",
                 "--steps", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nope" in err[0]


def test_eval_reward_option_must_be_key_value(tiny_model, capsys):
    model, _ = tiny_model
    assert main(["eval", "--model", model, "--reward", "clip_score", "--reward-option", "tiny"]) == 2
    assert "--reward-option 'tiny' must look like key=value" in capsys.readouterr().err


def test_sample_images_leaves_the_callers_progress_bar_setting():
    from flowalign.evaluation.sampling import sample_images
    from flowalign.toy.pipelines import tiny_sd3_pipeline

    pipe = tiny_sd3_pipeline(image_size=16)
    pipe.set_progress_bar_config(desc="mine", leave=False)
    images = sample_images(pipe, ["a red circle", "a square"], steps=1, guidance_scale=1.0)
    assert images.shape[0] == 2 and 0 <= images.min() and images.max() <= 1
    assert pipe._progress_bar_config == {"desc": "mine", "leave": False}


def test_eval_in_bfloat16_loads_the_pipeline_in_bfloat16(tmp_path, tiny_model, monkeypatch):
    import torch

    import flowalign.models as models

    model, lora_dir = tiny_model
    loaded, real = [], models.load_for_inference

    def spy(*args, **kwargs):
        pipe = real(*args, **kwargs)
        loaded.append({pipe.transformer.dtype, pipe.vae.dtype, pipe.text_encoder.dtype, pipe.device.type})
        return pipe

    monkeypatch.setattr(models, "load_for_inference", spy)
    out = tmp_path / "eval.json"
    assert main(["eval", lora_dir, "--model", model, "--prompts", "toy:colors", "--per-task", "2", "--steps", "2",
                 "--dtype", "bfloat16", "--device", "cpu", "--out", str(out)]) == 0
    assert loaded == [{torch.bfloat16, "cpu"}] * 2  # base and LoRA
    result = json.loads(out.read_text())
    assert result["settings"]["dtype"] == "bfloat16"
    assert all(0 <= s["toy_geneval"] <= 1 and s["n"] == 2 for s in result["scores"].values())


def test_load_for_inference_refuses_float16():
    import pytest

    from flowalign.models import load_for_inference

    with pytest.raises(ValueError, match="float32.*bfloat16.*got 'float16'"):
        load_for_inference("unused", dtype="float16")


def test_eval_table_is_compact_and_the_json_has_the_tasks(tmp_path, tiny_model, capsys):
    model, lora_dir = tiny_model
    out = tmp_path / "eval.json"
    assert main(["eval", lora_dir, "--model", model, "--prompts", "toy:counting,colors", "--per-task", "1",
                 "--steps", "1", "--out", str(out)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == "| weights | n | toy_geneval | toy_geneval_strict | toy_geneval_exact | toy_extra_objects |"
    assert lines[2].startswith("| base | 2 | ") and lines[3].startswith(f"| {lora_dir} | 2 | ")
    assert lines[-1] == f"wrote {out} (with the per-task scores)" and len(lines) == 5
    assert "toy_geneval/counting" in json.loads(out.read_text())["scores"]["base"]


def test_eval_prompt_file_without_reward_is_one_line(tmp_path, tiny_model, capsys):
    model, _ = tiny_model
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\n")
    assert main(["eval", "--model", model, "--prompts", str(prompts)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("flowalign: error: ") and "pass --reward NAME" in err and "\n" not in err, err


def test_eval_config_gives_defaults_and_flags_override(tmp_path, tiny_model, monkeypatch):
    import shutil

    import flowalign.apps.eval as app

    model, lora_dir = tiny_model
    shutil.copytree(lora_dir, tmp_path / "run" / "lora")
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\n")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"model:\n  path: {model}\nsampling:\n  eval_num_steps: 3\n  eval_guidance_scale: 2.0\n"
                      f"train:\n  out_dir: {tmp_path / 'run'}\n  prompts: {prompts}\n  reward: clip_score\n"
                      "  reward_options: {model: tiny}\n  eval_per_task: 5\n")
    calls = []
    monkeypatch.setattr(app, "evaluate_loras", lambda loras, model, **kw: calls.append((loras, model, kw)) or
                        {"scores": {"base": {"n": 1, "clip_score": 0.5}}})
    assert main(["eval", "--config", str(recipe)]) == 0
    assert main(["eval", "other_lora", "--config", str(recipe), "--steps", "1", "--guidance-scale", "4",
                 "--prompts", "toy", "--reward", "jpeg_compressibility", "--per-task", "2"]) == 0
    (l1, m1, kw1), (l2, m2, kw2) = calls
    assert (l1, m1) == ([str(tmp_path / "run" / "lora")], model)
    assert {k: kw1[k] for k in ("prompts", "reward", "reward_options", "steps", "guidance_scale", "per_task")} == {
        "prompts": str(prompts), "reward": "clip_score", "reward_options": {"model": "tiny"}, "steps": 3,
        "guidance_scale": 2.0, "per_task": 5}
    assert l2 == ["other_lora"]
    assert {k: kw2[k] for k in ("prompts", "reward", "reward_options", "steps", "guidance_scale", "per_task")} == {
        "prompts": "toy", "reward": "jpeg_compressibility", "reward_options": {}, "steps": 1, "guidance_scale": 4.0,
        "per_task": 2}
