"""DDIM step against diffusers' DDIMScheduler and the DDPM posterior."""

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from flowalign.samplers import ddim_step


def _ddim_scheduler(prediction_type):
    return DDIMScheduler(
        num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
        clip_sample=False, set_alpha_to_one=False, prediction_type=prediction_type,
    )


def _alphas(sched, t):
    prev_t = t - sched.config.num_train_timesteps // sched.num_inference_steps
    abar = sched.alphas_cumprod[t]
    abar_prev = sched.alphas_cumprod[prev_t] if prev_t >= 0 else sched.final_alpha_cumprod
    return abar, abar_prev


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_matches_diffusers_ddim_scheduler(prediction_type, eta):
    sched = _ddim_scheduler(prediction_type)
    sched.set_timesteps(10)
    g = torch.Generator().manual_seed(0)
    x_ref = torch.randn(2, 4, 8, 8, generator=g)
    x_ours = x_ref.clone()
    for t in sched.timesteps:
        out = torch.randn(2, 4, 8, 8, generator=g)
        seed = int(t)
        x_ref = sched.step(out, t, x_ref, eta=eta, generator=torch.Generator().manual_seed(seed)).prev_sample
        abar, abar_prev = _alphas(sched, int(t))
        step = ddim_step(out, x_ours, abar, abar_prev, eta, prediction_type,
                         generator=torch.Generator().manual_seed(seed))
        x_ours = step.prev_sample
        torch.testing.assert_close(x_ours, x_ref, rtol=1e-4, atol=1e-4)
        assert step.deterministic == (eta == 0.0 or float(abar) == float(abar_prev))


def test_eta_zero_is_deterministic_whatever_the_generator():
    x, eps = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    a = ddim_step(eps, x, 0.3, 0.6, 0.0, generator=torch.Generator().manual_seed(1))
    b = ddim_step(eps, x, 0.3, 0.6, 0.0, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a.prev_sample, b.prev_sample) and torch.equal(a.prev_sample, a.mean)


def test_eta_one_on_adjacent_steps_is_ddpm_posterior():
    ddpm = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                         beta_end=0.012, clip_sample=False, variance_type="fixed_small")
    ddpm.set_timesteps(1000)
    g = torch.Generator().manual_seed(0)
    x, eps = torch.randn(2, 3, 8, 8, generator=g), torch.randn(2, 3, 8, 8, generator=g)
    for t in (999, 500, 20, 1):
        abar, abar_prev = ddpm.alphas_cumprod[t], ddpm.alphas_cumprod[t - 1]
        ref = ddpm.step(eps, t, x, generator=torch.Generator().manual_seed(t)).prev_sample
        ours = ddim_step(eps, x, abar, abar_prev, 1.0, generator=torch.Generator().manual_seed(t))
        torch.testing.assert_close(ours.prev_sample, ref, rtol=1e-4, atol=1e-4)
        # std^2 is the posterior variance beta_t (1 - abar_prev) / (1 - abar_t).
        beta = 1 - abar / abar_prev
        torch.testing.assert_close(ours.std.flatten()[0] ** 2, beta * (1 - abar_prev) / (1 - abar), rtol=1e-4, atol=0)


def test_v_prediction_equals_converted_epsilon():
    x, v = torch.randn(2, 4), torch.randn(2, 4)
    abar = 0.4
    eps = abar**0.5 * v + (1 - abar) ** 0.5 * x
    a = ddim_step(v, x, abar, 0.7, 0.8, "v_prediction", generator=torch.Generator().manual_seed(3))
    b = ddim_step(eps, x, abar, 0.7, 0.8, "epsilon", generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(a.mean, b.mean)
    torch.testing.assert_close(a.prev_sample, b.prev_sample)


def test_rescoring_reproduces_log_prob():
    x, eps = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    drawn = ddim_step(eps, x, 0.3, 0.5, 1.0, generator=torch.Generator().manual_seed(0))
    again = ddim_step(eps, x, 0.3, 0.5, 1.0, prev_sample=drawn.prev_sample)
    torch.testing.assert_close(again.log_prob(), drawn.log_prob(), rtol=0, atol=1e-6)
