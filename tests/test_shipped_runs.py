"""A short run of each update rule on the shipped pipeline moves its reward the right way.

The reward is the image's redness, mean(R - (G + B) / 2), and its negative: smooth, cheap and verifiable, so a
few iterations are enough to see its direction, and a run must follow the sign. Before and after are sampled with the pipeline's own ``__call__`` on the same
prompts and seeds, the LoRA off and on. For DiffusionOPD (no reward) the student must move towards its teacher.
"""

import os

import pytest
import torch

from flowalign import lora
from flowalign.config import DEFAULT_MODEL, load_config
from flowalign.evaluation.sampling import sample_images
from flowalign.trainer import Trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.skipif(not os.path.isdir(DEFAULT_MODEL), reason=f"shipped pipeline missing at {DEFAULT_MODEL}")
PROMPTS = ["a blue circle", "two green squares", "a yellow triangle", "a circle and a square"]


class Redness:
    """sign * mean(R - (G + B) / 2) per image [B]; sign -1 rewards the opposite, so a run must follow the sign."""

    name = "redness"

    def __init__(self, sign: float = 1.0):
        self.sign = sign

    def __call__(self, images, prompts, metadata=None):
        return self.sign * (images[:, 0] - images[:, 1:].mean(1)).mean((1, 2)).float().cpu()


def _mean_reward(trainer, reward, guidance: float) -> float:
    images = sample_images(trainer.adapter.pipe, PROMPTS * 2, seed=123, steps=4, guidance_scale=guidance)
    return reward(images, PROMPTS * 2).mean().item()


SMALL = {"sampling.num_steps": 4, "sampling.eval_num_steps": 4, "train.prompts_per_iter": 2,
         "train.group_size": 8, "train.minibatch": 16, "train.eval_per_task": 1}


ITERATIONS = 6


@pytest.mark.parametrize("recipe,extra", [
    ("toy_grpo.yaml", {"sampling.sde_window": None, "grpo.clip_range": 0.2, "train.lr": 1e-3}),
    ("toy_nft.yaml", {"nft.num_timesteps": 2, "train.lr": 3e-3}),
    ("toy_crd.yaml", {"crd.num_timesteps": 2, "crd.steps_per_iter": 1, "train.lr": 3e-3}),
])
@pytest.mark.parametrize("sign", [1.0, -1.0], ids=["redder", "less_red"])
def test_reward_goes_up(tmp_path, recipe, extra, sign):
    torch.manual_seed(0)
    cfg = load_config(os.path.join(ROOT, "configs", recipe),
                      {**SMALL, **extra, "train.out_dir": str(tmp_path), "train.iterations": ITERATIONS})
    reward = Redness(sign)
    trainer = Trainer(cfg, reward=reward)
    g = cfg.sampling.guidance_scale
    with lora.adapter_disabled(trainer.adapter):
        before = _mean_reward(trainer, reward, g)
    history = trainer.train(progress=False)
    after = _mean_reward(trainer, reward, g)
    assert all(m.get("update_samples", 1) > 0 for m in history)
    # both signs must move their own way, so a drift that ignores the reward fails one of the two runs;
    # 2e-4 is far above float noise (sampling is deterministic) and ~10% of the base's spread of redness
    assert after > before + 2e-4, (recipe, before, after)
