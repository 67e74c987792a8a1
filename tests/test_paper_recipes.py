"""Every SD3/FLUX paper recipe runs its parity switches together: one iteration of each on a tiny in-process
pipeline of its family (the real model, reward, sizes and batch swapped for small ones; everything else kept)."""

import os

import pytest
import torch

from flowalign.config import load_config
from flowalign.models import adapter_for
from flowalign.toy.tiny_families import TINY_BUILDERS
from flowalign.rewards import Reward
from flowalign.trainer import Trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = {"sd35m_geneval_grpo.yaml": "sd3", "sd35m_geneval_grpo_fast.yaml": "sd3", "sd35m_nft_geneval.yaml": "sd3",
           "sd35m_crd_ocr.yaml": "sd3", "flux_dancegrpo_hps.yaml": "flux"}
SMALL = ["model.dtype=float32", "model.gradient_checkpointing=false", "model.lora_rank=2", "train.prompts=toy",
         "train.prompts_per_iter=2", "train.group_size=2", "train.minibatch=4", "train.eval_per_task=1",
         "sampling.resolution=16", "sampling.eval_num_steps=1", "crd.num_timesteps=2", "crd.steps_per_iter=1"]


class RandomPattern(Reward):
    name = "random_pattern"

    def score(self, images, prompts, metadata=None):
        pattern = torch.randn(images.shape[1:], generator=torch.Generator().manual_seed(0))
        return (images * pattern).flatten(1).mean(1)


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_recipe_trains_one_iteration_on_a_tiny_pipeline(recipe, tmp_path):
    cfg = load_config(os.path.join(ROOT, "configs", recipe), SMALL + [f"train.out_dir={tmp_path}"])
    torch.manual_seed(0)
    tr = Trainer(cfg, adapter=adapter_for(TINY_BUILDERS[RECIPES[recipe]]()), reward=RandomPattern())
    before = [p.detach().clone() for p in tr.params]
    m = tr.step()
    assert m["update_samples"] == 4 and m["invalid_rewards"] == 0, m
    assert any(not torch.equal(a, p) for a, p in zip(before, tr.params))
    if cfg.train.algorithm == "grpo":
        assert m["onpolicy_logp_gap"] < 1e-4  # on-policy at the first update, with every switch of the recipe on
