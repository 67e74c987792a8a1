"""GRPO trainer on a tiny in-process SD3 pipeline: on-policy ratio, bad rewards, files on disk."""

import json
import warnings

import pytest
import torch

from flowalign.config import Config, GRPOConfig, ModelConfig, SamplingConfig, TrainConfig
from flowalign.models import adapter_for
from flowalign.toy.pipelines import tiny_sd3_pipeline
from flowalign.rewards import Reward
from flowalign.trainer import GRPOTrainer


class MeanPixel(Reward):
    """A reward with signal on random images; optionally NaN on the first sample."""

    name = "mean_pixel"

    def __init__(self, nan_first: bool = False):
        self.nan_first = nan_first

    def score(self, images, prompts, metadata=None):
        r = images.mean(dim=(1, 2, 3))
        if self.nan_first:
            r[0] = float("nan")
        return r


def _trainer(tmp_path, reward, **grpo):
    cfg = Config(
        sampling=SamplingConfig(num_steps=3, guidance_scale=2.0, sde_window=(0, 2)),
        grpo=GRPOConfig(clip_range=0.2, **grpo),
        train=TrainConfig(prompts_per_iter=2, group_size=3, minibatch=8, lr=1e-2, out_dir=str(tmp_path)),
    )
    return GRPOTrainer(cfg, adapter=adapter_for(tiny_sd3_pipeline(image_size=16)), reward=reward)


def test_first_update_is_on_policy_and_weights_move(tmp_path):
    tr = _trainer(tmp_path, MeanPixel())
    before = [p.detach().clone() for p in tr.params]
    m = tr.step()
    assert m["onpolicy_logp_gap"] < 1e-5
    assert abs(m["ratio_mean"] - 1) < 1e-5
    assert m["update_samples"] == 6 and m["samples"] == 6
    assert any(not torch.equal(a, p) for a, p in zip(before, tr.params))
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[0])["iteration"] == 1


def test_kl_to_reference_is_zero_before_any_update(tmp_path):
    tr = _trainer(tmp_path, MeanPixel(), beta=0.5)
    m = tr.step()
    assert m["kl"] == pytest.approx(0.0, abs=1e-10)
    m2 = tr.step()
    assert m2["kl"] > 0  # the adapter moved away from the reference in step 1


def test_nan_reward_is_left_out_and_counted(tmp_path):
    tr = _trainer(tmp_path, MeanPixel(nan_first=True))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        m = tr.step()
    assert m["invalid_rewards"] == 1 and tr.bad_rewards == 1
    assert m["update_samples"] == 5
    assert any("1/6 samples invalid" in str(w.message) for w in caught)


def test_saved_lora_loads_into_a_fresh_pipeline(tmp_path):
    tr = _trainer(tmp_path, MeanPixel())
    tr.step()
    path = tr.save_lora()
    fresh = tiny_sd3_pipeline(image_size=16)
    fresh.load_lora_weights(path)
    x = torch.randn(1, 4, 8, 8)
    cond = tr.adapter.encode_prompts(["a red circle"], 1.0)
    ours = tr.adapter.predict(x, torch.tensor(500.0), cond, 1.0)
    theirs = adapter_for(fresh).predict(x, torch.tensor(500.0), adapter_for(fresh).encode_prompts(["a red circle"], 1.0), 1.0)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)


def test_lora_target_modules_choose_the_layers_that_train(tmp_path):
    cfg = Config(
        model=ModelConfig(lora_rank=2, lora_target_modules=["attn.to_q", "ff.net.2"]),
        sampling=SamplingConfig(num_steps=3, guidance_scale=2.0, sde_window=(0, 2)),
        train=TrainConfig(prompts_per_iter=2, group_size=3, minibatch=8, lr=1e-2, out_dir=str(tmp_path)),
    )
    tr = GRPOTrainer(cfg, adapter=adapter_for(tiny_sd3_pipeline(image_size=16)), reward=MeanPixel())
    names = {n.split(".lora_")[0].split("transformer_blocks.")[-1].split(".", 1)[1]
             for n, p in tr.adapter.denoiser.named_parameters() if "lora_" in n}
    assert names == {"attn.to_q", "ff.net.2"}
    n_blocks = len(tr.adapter.denoiser.transformer_blocks)
    assert len(tr.params) == 2 * 2 * n_blocks  # lora_A and lora_B on two modules per block
    before = [p.detach().clone() for p in tr.params]
    tr.step()
    tr.step()  # B starts at 0: A moves from the second step on
    assert all(not torch.equal(a, p) for a, p in zip(before, tr.params))
