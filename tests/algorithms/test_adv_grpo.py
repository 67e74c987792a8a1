"""Adv-GRPO (arXiv 2511.20256): the reward head is trained during RL on the generations it scored."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from flowalign.algorithms.adv_grpo import AdversarialHead
from flowalign.config import Config, ModelConfig, SamplingConfig, TrainConfig, config_from_dict
from flowalign.rewards import get
from flowalign.trainer import Trainer


class RecordingHead:
    """A stand-in reward head: records what it is trained on."""

    name = "recording"
    head = object()

    def __init__(self):
        self.calls = []

    def train_head_step(self, generated):
        self.calls.append(generated.clone())
        return {"loss": 1.0, "d_real": 0.5, "d_fake": -0.5}

    def state_dict(self):
        return {"calls": len(self.calls)}

    def load_state_dict(self, state):
        pass


def test_schedule_trains_on_the_images_seen_since_the_last_head_step():
    r = RecordingHead()
    adv = AdversarialHead(r, head_every=2, head_steps=3)
    a, b = torch.rand(2, 3, 4, 4), torch.rand(1, 3, 4, 4)
    adv.observe(a)
    assert adv.step(1) == {} and not r.calls  # not due at iteration 1
    adv.observe(b)
    m = adv.step(2)
    assert len(r.calls) == 3 and all(torch.equal(c, torch.cat([a, b])) for c in r.calls)
    assert m == {"head_loss": 1.0, "head_d_real": 0.5, "head_d_fake": -0.5, "head_updates": 3}
    assert adv.step(4) == {}  # nothing observed since: no step


def test_schedule_refuses_a_reward_without_a_head():
    with pytest.raises(ValueError, match="trainable head"):
        AdversarialHead(get("jpeg_compressibility"))
    with pytest.raises(ValueError, match=">= 1"):
        AdversarialHead(RecordingHead(), head_every=0)
    with pytest.raises(ValueError, match="adv_grpo.head_every must be > 0"):
        config_from_dict({"adv_grpo": {"head_every": 0}})


def test_toy_references_are_renders():
    from flowalign.rewards.dino import load_images

    ims = load_images("toy:3")
    assert len(ims) == 3 and ims[0].size == (64, 64) and ims[0].tobytes() != ims[1].tobytes()
    with pytest.raises(ValueError, match="toy:N"):
        load_images("toy:zero")


def test_trainer_trains_the_head_on_its_generations(dino_dir, tiny_pipe16, tmp_path):
    """One GRPO iteration: the rewards come from the head as it was, then the head takes one hinge step with the
    iteration's decoded images as negatives (the same images, bit for bit) and the metrics say so."""
    reward = get("dino_similarity", model=dino_dir, head=True, references="toy:4", head_hidden=8, n_patches=4,
                 lr=1e-2)
    seen = []
    step = reward.train_head_step
    reward.train_head_step = lambda gen: (seen.append(gen.clone()), step(gen))[1]
    before = {k: v.clone() for k, v in reward.head.state_dict().items()}
    cfg = Config(model=ModelConfig(path=tiny_pipe16), sampling=SamplingConfig(num_steps=2, guidance_scale=1.0, sampler="flow_sde"),
                 train=TrainConfig(prompts_per_iter=2, group_size=2, minibatch=4, out_dir=str(tmp_path),
                                   algorithm="grpo", eval_per_task=1))
    tr = Trainer(cfg, reward=reward)
    scored = []
    score = reward.score
    reward.score = lambda images, prompts, metadata=None: (scored.append(images.clone()), score(images, prompts,
                                                                                                 metadata))[1]
    m = tr.step()
    assert m["head_updates"] == 1 and m["head_loss"] > 0 and "head_d_real" in m
    # the diagnostics' base batches are scored first (scored[:-1]); only the training batch is a negative
    assert len(seen) == 1 and len(scored) >= 2 and torch.equal(seen[0], scored[-1]) and len(seen[0]) == 4
    assert any(not torch.equal(before[k], v) for k, v in reward.head.state_dict().items())
    assert "dino_similarity" in tr.heldout.extra  # the held-out evaluation scores the head beside toy GenEval
