"""InfAlign-CTRL in the trainer (calibration section): base samples drawn once per prompt with the adapter
disabled, the update learning from the transformed calibrated reward, the run's RNG untouched, nothing changed
when the section is off, and the cache in checkpoints. Tiny in-process SD3 as tests/test_update_rules.py."""

import types

import pytest
import torch

from flowalign.algorithms.calibration import calibrate, transform
from flowalign.config import CalibrationConfig, Config, DiagnosticsConfig, SamplingConfig, TrainConfig
from flowalign.models import adapter_for
from flowalign.rewards import Reward
from flowalign.toy.pipelines import tiny_sd3_pipeline
from flowalign.trainer import Trainer

PROMPTS = ["a red circle"] * 3 + ["two blue squares"] * 3


class MeanPixel(Reward):
    name = "mean_pixel"

    def score(self, images, prompts, metadata=None):
        return images.mean(dim=(1, 2, 3))


def _cfg(tmp_path, calibration=None):
    train = TrainConfig(prompts_per_iter=2, group_size=3, minibatch=6, lr=1e-2, out_dir=str(tmp_path),
                        algorithm="grpo", checkpoint_every=0)
    sections = {} if calibration is None else {"calibration": calibration}
    return Config(sampling=SamplingConfig(num_steps=2, guidance_scale=1.0, sampler="flow_sde", noise_level=0.7),
                  train=train, diagnostics=DiagnosticsConfig(drift=False), **sections)


def _trainer(cfg, fixed=True):
    torch.manual_seed(0)
    tr = Trainer(cfg, adapter=adapter_for(tiny_sd3_pipeline(image_size=16)), reward=MeanPixel())
    if fixed:
        tr._sample_prompts = lambda: (list(PROMPTS), [None] * 6, None)
    return tr


def test_base_samples_drawn_once_per_prompt_and_the_update_sees_phi_of_c(tmp_path):
    tr = _trainer(_cfg(tmp_path, CalibrationConfig(transform="exp", t=2.0, base_samples=4, seed=3)))
    seen, update = {}, tr.algorithm.update

    def recording(traj, adv, valid, rewards, tasks):
        seen["rewards"] = rewards.clone()
        return update(traj, adv=adv, valid=valid, rewards=rewards, tasks=tasks)

    tr.algorithm.update = recording
    raw, inner = {}, tr.calibrator
    orig = type(inner).__call__

    class Spy(type(inner)):
        def __call__(self, rewards, prompts):
            raw["rewards"] = rewards.clone()
            return orig(self, rewards, prompts)

    inner.__class__ = Spy
    m = tr.step()
    assert m["calibration_base_queries"] == 2 * 4 and inner.base_queries == 8
    assert set(inner.cache) == set(PROMPTS) and all(s.shape == (4,) for s in inner.cache.values())
    base = torch.stack([inner.cache[p] for p in PROMPTS])
    expected = transform(calibrate(raw["rewards"], base), "exp", 2.0)
    torch.testing.assert_close(seen["rewards"], expected)
    assert m["reward_mean"] == pytest.approx(raw["rewards"].mean().item(), rel=1e-5)  # the raw reward's mean
    assert m["reward_calibrated_mean"] == pytest.approx(expected.mean().item(), rel=1e-5)
    m2 = tr.step()  # the same prompts again: no new base samples
    assert m2["calibration_base_queries"] == 8 and inner.base_queries == 8


def test_calibration_leaves_the_run_rng_alone_and_off_changes_nothing(tmp_path):
    plain = _trainer(_cfg(tmp_path / "plain"))
    off = _trainer(_cfg(tmp_path / "off", CalibrationConfig(transform=None, base_samples=3, seed=5)))
    on = _trainer(_cfg(tmp_path / "on", CalibrationConfig(transform="identity", base_samples=2)))
    assert plain.calibrator is None and off.calibrator is None and on.calibrator is not None
    for tr in (plain, off, on):
        tr.step()
    # the base rollouts draw from a generator of their own inside fork_rng: the run's draws are unchanged
    assert torch.equal(on.generator.get_state(), plain.generator.get_state())
    state, gen = torch.get_rng_state(), on.generator.get_state()
    n = on.calibrator.base_queries
    on.calibrator.base_scores(["a green triangle"])
    assert torch.equal(torch.get_rng_state(), state) and torch.equal(on.generator.get_state(), gen)
    assert on.calibrator.base_queries == n + 2
    before = on.calibrator.score_fn(["a red circle"] * 2, torch.Generator().manual_seed(0))
    with torch.no_grad():
        for p in on.params:  # the base samples do not see the LoRA (adapter disabled)
            p.add_(0.5)
    torch.testing.assert_close(on.calibrator.score_fn(["a red circle"] * 2, torch.Generator().manual_seed(0)), before)
    plain.step()
    off.step()
    for a, b in zip(plain.params, off.params):
        assert torch.equal(a, b)
    assert "reward_calibrated_mean" not in plain.metrics_log.rows[-1]


def test_calibration_state_round_trip_through_a_checkpoint(tmp_path):
    cal = CalibrationConfig(transform="log", base_samples=3, seed=1)
    tr = _trainer(_cfg(tmp_path, cal))
    tr.step()
    path = tr.save_checkpoint()
    fresh = _trainer(_cfg(tmp_path, cal))
    fresh.load_checkpoint(path)
    a, b = tr.calibrator, fresh.calibrator
    assert b.base_queries == a.base_queries == 6 and set(b.cache) == set(a.cache)
    for p in a.cache:
        torch.testing.assert_close(b.cache[p], a.cache[p], equal_nan=True)
    assert torch.equal(b.generator.get_state(), a.generator.get_state())
    assert fresh.step()["calibration_base_queries"] == 6  # the cached prompts cost nothing after the resume
    plain = _trainer(_cfg(tmp_path / "plain"))
    with pytest.raises(ValueError, match="no calibration state"):
        fresh.load_state_dict(plain.state_dict())


def test_calibration_refuses_several_processes(tmp_path):
    cfg = _cfg(tmp_path, CalibrationConfig(transform="exp"))
    fake = types.SimpleNamespace(cfg=cfg, dist=types.SimpleNamespace(world_size=2))
    with pytest.raises(ValueError, match="single process"):
        Trainer._calibrator(fake)
