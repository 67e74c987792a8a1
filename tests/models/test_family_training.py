"""Two GRPO and two DiffusionNFT iterations on every family's tiny pipeline: text families on toy prompts,
image-conditioned families (editing, image-to-video) on (prompt, image) rows with a reward that reads the row's
condition image from the metadata. Each run must update the LoRA with every reward valid."""

import json

import pytest
import torch

from flowalign.config import Config, ModelConfig, NFTConfig, SamplingConfig, TrainConfig
from flowalign.models import ADAPTERS
from flowalign.rewards import Reward
from flowalign.toy.tiny_families import TINY_SETTINGS, tiny_condition_images
from flowalign.trainer import Trainer

PROMPTS = ["a red circle", "two blue squares above"]
CASES = [(f, a) for f in sorted(ADAPTERS) for a in ("grpo", "nft") if a == "grpo" or ADAPTERS[f].is_flow]


class RandomPattern(Reward):
    name = "random_pattern"

    def score(self, images, prompts, metadata=None):
        pattern = torch.randn(images.shape[1:], generator=torch.Generator().manual_seed(0))
        return (images * pattern).flatten(1).mean(1)


class Preservation(Reward):
    """Closeness to each row's condition image."""

    name = "preservation"

    def __init__(self):
        self.seen = []

    def score(self, images, prompts, metadata=None):
        self.seen.append(metadata)
        ref = torch.stack([m["condition_image"] for m in metadata])
        return -(images - ref).abs().flatten(1).mean(1)


def _rows(tmp_path, size):
    """A (prompt, image) JSONL of two rows with their PNGs."""
    lines = []
    for i, (prompt, image) in enumerate(zip(PROMPTS, tiny_condition_images(2, size=size, seed=3))):
        image.save(tmp_path / f"row{i}.png")
        lines.append(json.dumps({"prompt": prompt, "image": f"row{i}.png"}))
    (tmp_path / "rows.jsonl").write_text("\n".join(lines) + "\n")
    return str(tmp_path / "rows.jsonl")


@pytest.mark.parametrize("family,algorithm", CASES)
def test_two_iterations_train_the_lora(family, algorithm, tmp_path, h):
    _, adapter = h.make_adapter(family)
    size = TINY_SETTINGS[family]["size"]
    conditioned = ADAPTERS[family].condition_image
    prompts = _rows(tmp_path, size.get("height", 32)) if conditioned else "toy"
    sampler = adapter.default_sampler if algorithm == "grpo" else "flow_ode"
    cfg = Config(train=TrainConfig(algorithm=algorithm, prompts=prompts, prompts_per_iter=2, group_size=2,
                                   minibatch=4, lr=0.05, eval_every=0, out_dir=str(tmp_path / "run")),
                 sampling=SamplingConfig(num_steps=2, guidance_scale=3.0, sampler=sampler,
                                         resolution=size.get("height"), num_frames=size.get("num_frames")),
                 nft=NFTConfig(num_timesteps=1), model=ModelConfig(lora_rank=2))
    torch.manual_seed(0)
    reward = Preservation() if conditioned else RandomPattern()
    tr = Trainer(cfg, adapter=adapter, reward=reward)
    before = [p.detach().clone() for p in tr.params]
    metrics = [tr.step() for _ in range(2)]
    assert all(m["update_samples"] == 4 and m["invalid_rewards"] == 0 for m in metrics), metrics
    assert all(torch.isfinite(torch.tensor(m["loss"])) for m in metrics)
    assert any(not torch.equal(a, p) for a, p in zip(before, tr.params))
    if conditioned:  # the reward saw each row's own condition image
        rows = 4 * size.get("num_frames", 1)  # videos are scored frame by frame, each frame with its row's metadata
        assert reward.seen and all(len(meta) == rows and meta[0]["condition_image"].shape[-2:] == (size["height"],) * 2
                                   for meta in reward.seen)
