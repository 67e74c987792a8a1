"""`flowalign train` runs each recipe of the newer families for 2 iterations on a saved tiny pipeline of its
family: the recipe's algorithm, sampler, guidance and adapter options as written; the model, sizes, batch and
(where it needs a GPU model or a server) the reward swapped for small, offline ones."""

import json
import os

import pytest
import torch

from flowalign.cli import main
from flowalign.toy.pipelines_kontext import tiny_flux_kontext_pipeline
from flowalign.toy.pipelines_qwen import tiny_qwenimage_pipeline
from flowalign.toy.pipelines_wan import tiny_wan22_pipeline, tiny_wan_i2v_pipeline
from flowalign.toy.tiny_families import tiny_condition_images

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = ["a red circle", "two blue squares above"]
SMALL = ["model.dtype=float32", "model.gradient_checkpointing=false", "model.lora_rank=2", "model.lora_alpha=4",
         "model.max_sequence_length=16", "train.prompts_per_iter=2", "train.group_size=2", "train.minibatch=4",
         "train.iterations=2", "sampling.num_steps=2", "sampling.eval_num_steps=1"]
# recipe -> (tiny builder, size, image rows?, overrides of what needs a GPU model or a reward server)
RECIPES = {
    "flux_kontext_edit_grpo.yaml": (tiny_flux_kontext_pipeline, 16, True, [
        "train.reward=dino_similarity", "train.reward_options={{model: {dino}, pool: condition_image, device: cpu}}"]),
    "qwenimage_ocr_grpo.yaml": (tiny_qwenimage_pipeline, 32, False, [
        "train.reward=jpeg_compressibility", "train.reward_options={{}}"]),
    "wan22_t2v_grpo.yaml": (tiny_wan22_pipeline, 32, False, [
        "sampling.num_frames=5", "sampling.sde_window=[0, 1]", "train.reward=jpeg_compressibility",
        "train.reward_options={{}}"]),
    "wan_i2v_ipro.yaml": (lambda: tiny_wan_i2v_pipeline("2.2"), 32, True, [
        "sampling.num_frames=5", "backprop.grad_steps=1",
        "train.reward_options={{model: {dino}, pool: row_references, device: cpu}}"]),
}


def _prompts(tmp_path, size, images):
    if not images:
        (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
        return str(tmp_path / "prompts.txt")
    (tmp_path / "refs").mkdir()
    for i, im in enumerate(tiny_condition_images(3, size=size, seed=7)):  # an identity's reference pool
        im.save(tmp_path / "refs" / f"{i}.png")
    lines = []
    for i, (p, im) in enumerate(zip(PROMPTS, tiny_condition_images(2, size=size))):
        im.save(tmp_path / f"row{i}.png")
        lines.append(json.dumps({"prompt": p, "image": f"row{i}.png", "references": "refs"}))
    (tmp_path / "rows.jsonl").write_text("\n".join(lines) + "\n")
    return str(tmp_path / "rows.jsonl")


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_recipe_trains_two_iterations(recipe, tmp_path, dino_dir, capsys):
    build, size, images, extra = RECIPES[recipe]
    torch.manual_seed(0)
    build().save_pretrained(str(tmp_path / "model"))
    out = tmp_path / "run"
    args = [f"model.path={tmp_path / 'model'}", f"train.out_dir={out}", f"sampling.resolution={size}",
            f"train.prompts={_prompts(tmp_path, size, images)}", *SMALL, *[e.format(dino=dino_dir) for e in extra]]
    rc = main(["train", os.path.join(ROOT, "configs", recipe), *args])
    assert rc == 0, capsys.readouterr().err
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [1, 2]
    assert all(r["invalid_rewards"] == 0 and r["update_samples"] == 4 for r in rows), rows
    weights = out / "lora" / "pytorch_lora_weights.safetensors"
    assert weights.is_file()
    if recipe.startswith("wan"):  # the two-expert recipes train a LoRA on both experts (lora_experts: both)
        assert (out / "lora" / "transformer_2" / "pytorch_lora_weights.safetensors").is_file()
