"""Rollout-level reference-parity switches (docs/parity.md): per-row re-scoring, the CPS log-prob convention, the
per-step KL to the reference (Flow-GRPO's kl_reward), DanceGRPO's grid, integer timesteps and x0_hat decode, the
DPM-Solver++(2M) rollout and the random SDE window."""

import math

import pytest
import torch

from flowalign import lora
from flowalign.algorithms.base import sde_window
from flowalign.config import Config, SamplingConfig
from flowalign.rollout import rescore, rollout, shifted_linear_grid
from flowalign.samplers import flow_dpm2_step


def test_per_row_steps_rescore_like_separate_calls(gen, h):
    # DanceGRPO trains each sample at its own steps: one call with a step per row equals one call per row
    _, adapter = h.make_adapter("sd3")
    prompts = [h.PROMPTS[0]] * 2 + [h.PROMPTS[1]] * 2
    traj = rollout(adapter, prompts, num_steps=4, guidance_scale=2.0, generator=gen(0))
    ks = torch.tensor([3, 0, 2, 1])
    together = rescore(adapter, traj, ks, index=torch.tensor([0, 1, 2, 3]))
    for i, k in enumerate(ks.tolist()):
        alone = rescore(adapter, traj, k, index=[i])
        torch.testing.assert_close(together.mean[i:i + 1], alone.mean, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(together.std[i:i + 1], alone.std)
    torch.testing.assert_close(together.log_prob(), traj.log_probs[torch.arange(4), ks], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="per-row steps"):
        rescore(adapter, traj, torch.tensor([0, 1]), index=[0])  # two per-row steps for one selected row
    mixed = rollout(adapter, prompts, num_steps=4, guidance_scale=2.0, sde_window=(0, 2), generator=gen(0))
    with pytest.raises(ValueError, match="mix stochastic"):
        rescore(adapter, mixed, torch.tensor([0, 3, 0, 3]))


def test_cps_squared_error_log_probs_are_recorded_and_reproduced(gen, h):
    _, adapter = h.make_adapter("sd3")
    traj = rollout(adapter, h.PROMPTS, num_steps=3, guidance_scale=2.0, sampler="flow_cps", noise_level=0.8,
                   generator=gen(0), record_means=True, log_prob_convention="squared_error")
    for k in traj.stochastic_steps:
        sq = -((traj.latents[:, k + 1] - traj.means[:, k]) ** 2).flatten(1).mean(1)
        torch.testing.assert_close(traj.log_probs[:, k], sq)
        torch.testing.assert_close(rescore(adapter, traj, k).log_prob(), sq, atol=1e-6, rtol=1e-5)


def test_reference_kl_recorded_at_rollout_is_the_rescored_kl(gen, h):
    _, adapter = h.make_adapter("sd3")
    params = lora.add_lora(adapter, rank=2)
    h.nonzero_lora(params, scale=0.3)
    traj = rollout(adapter, h.PROMPTS, num_steps=3, guidance_scale=2.0, generator=gen(0), sde_window=(0, 2),
                   record_reference_kl=True)
    assert torch.isnan(traj.reference_kl[:, 2]).all()
    for k in (0, 1):
        new = rescore(adapter, traj, k)
        with lora.adapter_disabled(adapter):
            ref = rescore(adapter, traj, k)
        torch.testing.assert_close(traj.reference_kl[:, k], new.kl(ref), atol=1e-6, rtol=1e-4)
        assert (traj.reference_kl[:, k] > 0).all()


def test_dancegrpo_grid_integer_timesteps_and_x0_hat_decode(gen, h):
    _, adapter = h.make_adapter("sd3")
    shift = float(adapter.pipe.scheduler.config.shift)
    grid = shifted_linear_grid(adapter, 4, torch.device("cpu"))
    s = torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0], dtype=torch.float64)
    torch.testing.assert_close(grid.sigmas, (shift * s / (1 + (shift - 1) * s)).float())
    traj = rollout(adapter, h.PROMPTS, num_steps=4, guidance_scale=2.0, sampler="flow_constant_noise",
                   noise_level=0.3, grid="shifted_linear", integer_timesteps=True, generator=gen(0))
    torch.testing.assert_close(traj.sigmas, grid.sigmas)
    assert torch.equal(traj.timesteps, (grid.sigmas[:-1] * 1000).trunc())  # int(sigma * 1000) to the network
    assert traj.stochastic.all()  # the last step too: DanceGRPO decodes x0_hat instead of the noisy x_N
    # x0_hat of the last step: x_{N-1} - sigma_{N-1} v with the network at the recorded x_{N-1}
    v = adapter.predict(traj.latents[:, 3], traj.timesteps[3], traj.cond, 2.0)
    torch.testing.assert_close(traj.output("last_x0_hat"), traj.latents[:, 3] - traj.sigmas[3] * v, atol=1e-5, rtol=1e-5)
    assert torch.equal(traj.output("final"), traj.final)


def test_dpm2_rollout_is_the_multistep_solver_and_refuses_rescoring(gen, h):
    _, adapter = h.make_adapter("sd3")
    traj = rollout(adapter, h.PROMPTS, num_steps=4, guidance_scale=1.0, sampler="flow_dpm2", generator=gen(0))
    assert not traj.stochastic.any()
    x, prev = traj.latents[:, 0], (None, None)
    for k in range(4):
        v = adapter.predict(x, traj.timesteps[k], traj.cond, 1.0)
        x_next = flow_dpm2_step(v, x, traj.sigmas[k], traj.sigmas[k + 1], *prev).prev_sample
        prev = (x - traj.sigmas[k] * v, traj.sigmas[k])
        x = x_next
        torch.testing.assert_close(traj.latents[:, k + 1], x, atol=1e-5, rtol=1e-5)
    rescore(adapter, traj, 0)  # the first step has no history: allowed
    with pytest.raises(ValueError, match="flow_dpm2"):
        rescore(adapter, traj, 2)


def test_random_sde_window_is_uniform_over_the_range():
    cfg = Config(sampling=SamplingConfig(num_steps=10, sde_window_size=3, sde_window_range=(0, 5)))
    g = torch.Generator().manual_seed(0)
    starts = [sde_window(cfg, g)[0] for _ in range(3000)]
    assert set(starts) == {0, 1, 2}  # Flow-GRPO-Fast: randint(lo, hi - size) inclusive
    counts = [starts.count(v) for v in (0, 1, 2)]
    assert all(abs(c - 1000) < 4 * math.sqrt(3000 * (1 / 3) * (2 / 3)) for c in counts), counts
    assert sde_window(cfg, g)[1] == 3
    fixed = Config(sampling=SamplingConfig(num_steps=10, sde_window=(2, 4)))
    assert sde_window(fixed, g) == (2, 4)
    with pytest.raises(ValueError, match="not both"):
        SamplingConfig(num_steps=10, sde_window=(0, 2), sde_window_size=2)
    with pytest.raises(ValueError, match="sde_window_range"):
        SamplingConfig(num_steps=10, sde_window_size=6, sde_window_range=(0, 5))
