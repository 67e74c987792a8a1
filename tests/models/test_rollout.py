"""Trajectory recording and re-scoring: recorded log-probs are reproduced by the unchanged policy."""

import pytest
import torch

from flowalign import lora
from flowalign.rollout import rescore, rollout, stochastic_mask



# every family: the rarer samplers on one family each (the sampler math is family-independent)
@pytest.mark.parametrize("family,sampler", [("sd3", "flow_sde"), ("sd3", "flow_cps"), ("flux", "flow_constant_noise"),
                                            ("sd", "ddim"), ("wan", "flow_sde"), ("flux2", "flow_sde"),
                                            ("flux2_klein", "flow_sde"), ("zimage", "flow_sde"),
                                            ("flux_kontext", "flow_sde"), ("wan_i2v", "flow_sde")])
def test_rescore_reproduces_logprobs(family, sampler, gen, h):
    _, adapter = h.make_adapter(family)
    params = lora.add_lora(adapter, rank=2)
    h.nonzero_lora(params)
    traj = rollout(adapter, h.PROMPTS, num_steps=3, guidance_scale=2.0, sampler=sampler, generator=gen(0),
                   record_means=True, **h.condition(family, 2))
    n = traj.num_steps
    assert traj.latents.shape[:2] == (2, n + 1) and traj.log_probs.shape == (2, n)
    assert traj.means.shape == traj.latents[:, 1:].shape
    for k in traj.stochastic_steps:
        step = rescore(adapter, traj, k)
        torch.testing.assert_close(step.log_prob(), traj.log_probs[:, k], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(step.mean, traj.means[:, k], atol=1e-5, rtol=1e-5)
    assert len(traj.stochastic_steps) >= 2
    # a changed policy gives a different log-prob, and the gradient reaches the LoRA params
    k = traj.stochastic_steps[0]
    h.nonzero_lora(params, seed=2, scale=0.3)
    step = rescore(adapter, traj, k)
    assert (step.log_prob() - traj.log_probs[:, k]).abs().max() > 1e-4
    step.log_prob().sum().backward()
    assert sum(float(p.grad.abs().sum()) for p in params if p.grad is not None) > 0


def test_rescore_subset_and_teacher_cfg(gen, h):
    _, adapter = h.make_adapter("sd3")
    traj = rollout(adapter, h.PROMPTS, num_steps=3, guidance_scale=3.0, generator=gen(0))
    step = rescore(adapter, traj, 1, index=[1])
    torch.testing.assert_close(step.log_prob(), traj.log_probs[1:, 1], atol=1e-5, rtol=1e-5)
    other = rescore(adapter, traj, 1, guidance_scale=1.0)  # a teacher with its own CFG at the same states
    assert (other.mean - rescore(adapter, traj, 1).mean).abs().max() > 1e-4


def test_sde_window_and_groups(gen, h):
    _, adapter = h.make_adapter("sd3")
    prompts = [h.PROMPTS[0]] * 3 + [h.PROMPTS[1]] * 3
    traj = rollout(adapter, prompts, num_steps=4, guidance_scale=1.0, sde_window=(1, 2), group_size=3,
                   generator=gen(0))
    assert traj.stochastic.tolist() == [False, True, True, False]
    assert torch.isnan(traj.log_probs[:, [0, 3]]).all() and torch.isfinite(traj.log_probs[:, [1, 2]]).all()
    x0 = traj.latents[:, 0]
    assert torch.equal(x0[0], x0[2]) and torch.equal(x0[3], x0[5]) and not torch.equal(x0[0], x0[3])
    # step 0 is deterministic: same prompt + same noise -> same x_1; the SDE step then separates them
    assert torch.allclose(traj.latents[0, 1], traj.latents[1, 1])
    assert not torch.allclose(traj.final[0], traj.final[1])
    # deterministic steps re-score as the ODE step
    torch.testing.assert_close(rescore(adapter, traj, 0).mean, traj.latents[:, 1], atol=1e-5, rtol=1e-5)


def test_stochastic_mask_and_errors(h):
    assert stochastic_mask(5, steps=[0, 4]).tolist() == [True, False, False, False, True]
    assert stochastic_mask(3).all()
    with pytest.raises(ValueError, match="sde_window"):
        stochastic_mask(4, sde_window=(3, 2))
    _, adapter = h.make_adapter("sd")
    with pytest.raises(ValueError, match="ddim"):
        rollout(adapter, h.PROMPTS, num_steps=2, sampler="flow_sde")
