"""One contract per extension point, run on everything registered (like diffusers' SchedulerCommonTest): a new
algorithm, model family or sampler is tested the moment it is added to its table. Rewards have theirs in
tests/rewards/test_reward_contract.py, divergences in tests/algorithms/test_fdistill.py (every table entry)."""

import math

import pytest
import torch

from flowalign import lora
from flowalign.algorithms import ALGORITHMS, UpdateRule
from flowalign.config import SamplingConfig, load_config
from flowalign.models import ADAPTERS, adapter_for
from flowalign.resources import shipped_config
from flowalign.rewards import Reward
from flowalign.rollout import SAMPLERS, rollout
from flowalign.toy.tiny_families import TINY_BUILDERS, TINY_SETTINGS, tiny_condition_images

# every recipe shrunk to a tiny run: the contract checks the plumbing, not the learning
SMALL = {"sampling.num_steps": 6, "sampling.eval_num_steps": 2, "train.prompts_per_iter": 2, "train.group_size": 2,
         "train.minibatch": 4, "train.eval_per_task": 1, "train.eval_every": 0, "model.lora_rank": 2,
         "sampling.sde_window": None, "sampling.sde_window_size": None, "sampling.sde_window_range": None}


class Brightness(Reward):
    """Mean pixel value [B]: smooth, differentiable (reward backprop needs one), cheap."""

    name = "brightness"
    differentiable = True

    def score(self, images, prompts, metadata=None):
        return images.float().mean(dim=tuple(range(1, images.dim())))


def _teachers(tmp_path) -> dict:
    """OPD distils from trained LoRAs: two random ones on the tiny pipeline, one per task."""
    specs = {}
    for i, task in enumerate(("a", "b")):
        ad = adapter_for(TINY_BUILDERS["sd3"]())
        torch.manual_seed(i)
        for p in lora.add_lora(ad, rank=2):
            torch.nn.init.normal_(p, 0, 0.2)
        specs[task] = {"lora": lora.save_lora(ad, str(tmp_path / f"teacher_{task}")), "guidance_scale": 1.0,
                       "prompts": "toy:colors"}
    return specs


def _trainer(name: str, tmp_path, out: str):
    from flowalign.trainer import Trainer

    overrides = {**SMALL, "train.out_dir": str(tmp_path / out)}
    if name == "opd":  # the one rule that needs trained inputs
        overrides["opd.teachers"] = _teachers(tmp_path)
    cfg = load_config(shipped_config(f"toy_{name}.yaml"), overrides)
    torch.manual_seed(0)
    return Trainer(cfg, adapter=adapter_for(TINY_BUILDERS["sd3"]()), reward=Brightness())


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_update_rule_contract(name, tmp_path):
    rule = ALGORITHMS[name]
    assert issubclass(rule, UpdateRule) and rule.name == name
    assert rule.title != UpdateRule.title  # reports name it
    a = _trainer(name, tmp_path, "a")  # its recipe configs/toy_<name>.yaml loads and builds on the tiny pipeline
    assert a.cfg.train.algorithm == name
    m = a.step()
    assert math.isfinite(m["loss"]) and m["iteration"] == 1 and m["update_samples"] > 0
    assert any(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in a.params)  # it trained something
    # its state (snapshots, schedules, RNG) round-trips: a fresh trainer that loads it takes the same next step
    # (in memory: the loaded trainer must not share tensors with the one it was copied from)
    b = _trainer(name, tmp_path, "b")
    b.load_state_dict(a.state_dict())
    ma, mb = a.step(), b.step()
    assert ma["loss"] == mb["loss"]
    assert all(torch.equal(x, y) for x, y in zip(a.params, b.params))


# LoRA targets a tiny pipeline cannot have: its single SD3 block ends the context stream (context_pre_only)
ABSENT_IN_TINY = {"sd3": {"attn.to_add_out"}}


@pytest.mark.parametrize("family", sorted(ADAPTERS))
def test_model_family_contract(family):
    assert family in TINY_BUILDERS, f"add a tiny {family} pipeline to flowalign.toy.pipelines.TINY_BUILDERS"
    pipe = TINY_BUILDERS[family]()
    cls = ADAPTERS[family]
    assert cls.family == family and type(pipe).__name__ == cls.pipeline_class
    ad = adapter_for(pipe, **TINY_SETTINGS[family]["adapter"])
    assert type(ad) is cls
    names = [n for n, _ in ad.denoiser.named_modules()]
    for target in set(cls.lora_target_modules) - ABSENT_IN_TINY.get(family, set()):  # peft matches path ends
        assert any(n == target or n.endswith("." + target) for n in names), (family, target)
    for attr in cls.fsdp_blocks:
        assert len(getattr(ad.denoiser, attr)) > 0, (family, attr)
    assert SAMPLERS[ad.default_sampler].flow == ad.is_flow
    params = lora.add_lora(ad, rank=2)
    assert params and all(p.requires_grad for p in params)
    g = torch.Generator().manual_seed(0)
    size = TINY_SETTINGS[family]["size"]  # tiny latents
    x = ad.prepare_latents(1, generator=g, **size)
    grid = ad.sampling_grid(2, x)
    images = tiny_condition_images(1, size=size.get("height", 32)) if cls.condition_image else None
    cond = ad.encode_prompts(["a red circle"], 1.0, images=images, **size)
    out = ad.predict(x, grid.timesteps[:1].expand(1), cond, 1.0)
    assert out.dtype == torch.float32 and out.shape == x.shape and torch.isfinite(out).all()
    images = ad.decode(x)
    assert images.shape[0] == 1 and images.shape[-3] == 3 and 0 <= float(images.min()) <= float(images.max()) <= 1


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_sampler_contract(name):
    spec = SAMPLERS[name]
    # a config that switches sampler without a noise level gets that sampler's own default
    assert SamplingConfig(sampler=name).noise_level == spec.default_noise_level
    ad = adapter_for(TINY_BUILDERS["sd3" if spec.flow else "sd"]())
    traj = rollout(ad, ["a red circle"] * 2, num_steps=3, guidance_scale=1.0, sampler=name, group_size=1,
                   generator=torch.Generator().manual_seed(0))
    assert traj.noise_level == spec.default_noise_level and traj.sampler == name
    assert torch.isfinite(traj.latents).all()
    stochastic = spec.step is not None and spec.default_noise_level > 0
    assert bool(traj.stochastic.any()) == stochastic
    if stochastic:
        assert torch.isfinite(traj.log_probs[:, traj.stochastic]).all()
