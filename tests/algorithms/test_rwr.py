"""Flow-RWR (arXiv 2501.13918; docs/algorithms/rwr.md): softmax(R / tau) weights over the batch, the weighted
flow-matching loss (plain flow matching as tau -> infinity), a gradient step that lowers it, and the update rule."""

import pytest
import torch

from flowalign import lora
from flowalign.algorithms.dpo import flow_matching_error
from flowalign.algorithms.rwr import rwr_loss, rwr_weights
from flowalign.config import Config, RWRConfig, SamplingConfig, TrainConfig
from flowalign.models import adapter_for
from flowalign.rewards import Reward
from flowalign.samplers import forward_process
from flowalign.toy.pipelines import tiny_sd3_pipeline
from flowalign.trainer import Trainer


class MeanPixel(Reward):
    name = "mean_pixel"

    def score(self, images, prompts, metadata=None):
        return images.mean(dim=(1, 2, 3))


def test_weights_are_the_softmax_over_valid_rows_and_sum_to_one():
    r = torch.tensor([0.2, 1.5, -0.3, float("nan"), 0.9, 2.0])
    valid = torch.tensor([True, True, True, True, True, False])
    w = rwr_weights(r, tau=0.5, valid=valid)
    assert w.sum().item() == pytest.approx(1.0, abs=1e-6)
    assert w[3] == 0 and w[5] == 0  # NaN reward, invalid row
    keep = torch.tensor([0, 1, 2, 4])
    torch.testing.assert_close(w[keep], torch.softmax(r[keep] / 0.5, dim=0))
    torch.testing.assert_close(rwr_weights(r[keep], tau=1e9), torch.full((4,), 0.25))  # tau -> inf: uniform
    sharp = rwr_weights(r[keep], tau=1e-4)  # tau -> 0: the best sample only (no overflow)
    torch.testing.assert_close(sharp, torch.tensor([0.0, 1.0, 0.0, 0.0]))
    assert rwr_weights(r, 1.0, torch.zeros(6, dtype=torch.bool)).sum() == 0
    with pytest.raises(ValueError, match="tau"):
        rwr_weights(r, 0.0)


def test_loss_is_the_weighted_flow_matching_error_and_plain_flow_matching_at_large_tau():
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(5, 2, 4, 4, generator=g)
    fp = forward_process(x0, torch.rand(5, generator=g), generator=g)
    v = torch.randn(5, 2, 4, 4, generator=g)
    r = torch.randn(5, generator=g)
    e = ((v - fp.target) ** 2).mean(dim=(1, 2, 3))
    w = rwr_weights(r, 0.7)
    out = rwr_loss(v, fp.target, w)
    torch.testing.assert_close(out.loss, (torch.softmax(r / 0.7, 0) * e).sum())
    torch.testing.assert_close(out.errors, e)
    plain = rwr_loss(v, fp.target, rwr_weights(r, 1e9)).loss
    torch.testing.assert_close(plain, flow_matching_error(v, fp.target).mean())
    assert rwr_loss(v, fp.target, w, "sum").loss.item() == pytest.approx(32 * out.loss.item(), rel=1e-5)


def test_a_gradient_step_lowers_the_weighted_loss_and_favours_high_reward_samples():
    torch.manual_seed(0)
    ad = adapter_for(tiny_sd3_pipeline(image_size=16, with_t5=False))
    params = lora.add_lora(ad, rank=2)
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(4, 4, 8, 8, generator=g)
    fp = forward_process(x0, torch.tensor([0.2, 0.4, 0.6, 0.8]), generator=g)
    ts = fp.t * 1000
    cond = ad.encode_prompts(["a red circle"] * 4, 1.0)
    w = rwr_weights(torch.tensor([0.0, 0.0, 0.0, 5.0]), tau=1.0)  # almost all weight on sample 3

    def loss():
        return rwr_loss(ad.predict(fp.x_t, ts, cond, 1.0), fp.target, w)

    before = loss()
    opt = torch.optim.SGD(params, lr=1e-2)
    before.loss.backward()
    opt.step()
    with torch.no_grad():
        after = loss()
    assert after.loss < before.loss
    assert after.errors[3] < before.errors[3]  # the heavily weighted sample is fitted


def _cfg(tmp_path, **rwr_kw):
    return Config(sampling=SamplingConfig(num_steps=3, guidance_scale=1.0, sampler="flow_ode"),
                  train=TrainConfig(prompts_per_iter=2, group_size=3, minibatch=4, lr=1e-2, out_dir=str(tmp_path),
                                    algorithm="rwr", eval_per_task=1),
                  rwr=RWRConfig(**{"num_timesteps": 2, **rwr_kw}))


def test_rule_at_large_tau_is_plain_flow_matching_and_weights_follow_the_reward(tmp_path):
    torch.manual_seed(0)
    tr = Trainer(_cfg(tmp_path, tau=1e9), adapter=adapter_for(tiny_sd3_pipeline(image_size=16, with_t5=False)),
                 reward=MeanPixel())
    m = tr.step()
    assert any(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in tr.params)  # it trained something
    assert m["update_samples"] == 6 and m["optimizer_steps"] == 1
    assert m["weight_ess"] == pytest.approx(6.0, rel=1e-5) and m["weight_max"] == pytest.approx(1 / 6, rel=1e-5)
    assert m["loss"] == pytest.approx(m["fm_loss"], rel=1e-5)  # uniform weights: the plain mean error
    sharp = Trainer(_cfg(tmp_path / "b", tau=1e-6), adapter=adapter_for(tiny_sd3_pipeline(image_size=16,
                                                                                          with_t5=False)),
                    reward=MeanPixel()).step()
    assert sharp["weight_ess"] == pytest.approx(1.0) and sharp["update_samples"] == 1  # only the best sample
    with pytest.raises(ValueError, match="rwr.weights_from"):
        RWRConfig(weights_from="rank")
