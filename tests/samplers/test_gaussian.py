"""GaussianStep: log-prob, closed-form KL and mean matching against independent computations."""

import math

import pytest
import torch

from flowalign.samplers import GaussianStep


def _step(mean, std, seed=0):
    g = torch.Generator().manual_seed(seed)
    prev = mean + std * torch.randn(mean.shape, generator=g)
    return GaussianStep(prev_sample=prev, mean=mean, std=std)


def test_log_prob_matches_torch_normal_sum_and_mean():
    mean = torch.randn(3, 2, 4, 4)
    std = torch.tensor([0.3, 1.0, 2.5]).view(3, 1, 1, 1)
    step = _step(mean, std)
    ref = torch.distributions.Normal(mean, std.expand_as(mean)).log_prob(step.prev_sample)
    torch.testing.assert_close(step.log_prob(reduction="sum"), ref.flatten(1).sum(1))
    torch.testing.assert_close(step.log_prob(reduction="mean"), ref.flatten(1).mean(1))
    x = torch.randn_like(mean)
    ref_x = torch.distributions.Normal(mean, std.expand_as(mean)).log_prob(x)
    torch.testing.assert_close(step.log_prob(x, reduction="sum"), ref_x.flatten(1).sum(1))


def test_kl_monte_carlo_matches_closed_form_different_stds():
    torch.manual_seed(0)
    mean_p, mean_q = torch.randn(2, 3), torch.randn(2, 3)
    std_p, std_q = torch.tensor([[0.7], [1.3]]), torch.tensor([[1.1], [0.9]])
    p = GaussianStep(mean_p, mean_p, std_p)
    q = GaussianStep(mean_q, mean_q, std_q)
    n = 400_000
    xs = mean_p.unsqueeze(0) + std_p.unsqueeze(0) * torch.randn(n, 2, 3, generator=torch.Generator().manual_seed(1))
    log_p = torch.distributions.Normal(mean_p, std_p.expand_as(mean_p)).log_prob(xs).sum(-1)
    log_q = torch.distributions.Normal(mean_q, std_q.expand_as(mean_q)).log_prob(xs).sum(-1)
    mc = (log_p - log_q).mean(0)
    closed = p.kl(q, reduction="sum")
    torch.testing.assert_close(closed, mc, atol=0.02, rtol=0.01)
    torch.testing.assert_close(p.kl(q, reduction="mean"), closed / 3)


def test_kl_shared_std_is_squared_mean_distance():
    mean_a, mean_b = torch.randn(4, 5), torch.randn(4, 5)
    std = torch.full((4, 1), 0.4)
    a, b = GaussianStep(mean_a, mean_a, std), GaussianStep(mean_b, mean_b, std)
    expected = ((mean_a - mean_b) ** 2).sum(1) / (2 * 0.4**2)
    torch.testing.assert_close(a.kl(b, reduction="sum"), expected)
    torch.testing.assert_close(a.kl(a, reduction="sum"), torch.zeros(4))


def test_reference_scaling_multiplies_by_the_steps_reference_factor():
    mean_a, mean_b = torch.randn(2, 6), torch.randn(2, 6)
    std, dt = torch.full((2, 1), 0.2), torch.tensor([[0.1], [0.05]])
    a = GaussianStep(mean_a, mean_a, std, dt=dt, reference_kl_factor=dt)
    b = GaussianStep(mean_b, mean_b, std, dt=dt, reference_kl_factor=dt)
    torch.testing.assert_close(a.kl(b, scaling="reference"), a.kl(b) * dt.view(-1))
    # dt alone (a step whose public code uses the true variance) leaves the reference scaling exact
    only_dt = GaussianStep(mean_a, mean_a, std, dt=dt)
    torch.testing.assert_close(only_dt.kl(b, scaling="reference"), only_dt.kl(b))


def test_mean_matching_is_half_squared_distance():
    mean_a, mean_b = torch.randn(3, 2, 2), torch.randn(3, 2, 2)
    zero = torch.zeros(3, 1, 1)
    a, b = GaussianStep(mean_a, mean_a, zero), GaussianStep(mean_b, mean_b, zero)
    d2 = ((mean_a - mean_b) ** 2).flatten(1)
    torch.testing.assert_close(a.mean_matching(b, reduction="sum"), 0.5 * d2.sum(1))
    torch.testing.assert_close(a.mean_matching(b), 0.5 * d2.mean(1))


def test_std_squared_times_kl_tends_to_mean_matching():
    mean_a, mean_b = torch.randn(2, 8), torch.randn(2, 8)
    for s in (1e-1, 1e-2, 1e-3):
        std = torch.full((2, 1), s)
        a, b = GaussianStep(mean_a, mean_a, std), GaussianStep(mean_b, mean_b, std)
        torch.testing.assert_close(s**2 * a.kl(b), a.mean_matching(b), rtol=1e-4, atol=1e-6)


def test_deterministic_step_points_to_mean_matching():
    mean = torch.randn(2, 3)
    step = GaussianStep(mean, mean, torch.zeros(2, 1))
    assert step.deterministic
    with pytest.raises(ValueError, match="mean_matching"):
        step.kl(step)
    with pytest.raises(ValueError, match="mean_matching"):
        step.log_prob()


@pytest.mark.parametrize("bad", ["max", "none"])
def test_bad_reduction_is_rejected(bad):
    mean = torch.randn(2, 3)
    step = GaussianStep(mean, mean, torch.ones(2, 1))
    with pytest.raises(ValueError, match="reduction"):
        step.log_prob(reduction=bad)


def test_log_prob_constant_matches_formula():
    # D elements at x = mu: log pi = -D log std - (D/2) log 2 pi.
    mean = torch.zeros(1, 10)
    step = GaussianStep(mean, mean, torch.full((1, 1), 2.0))
    expected = -10 * math.log(2.0) - 5 * math.log(2 * math.pi)
    assert step.log_prob(reduction="sum").item() == pytest.approx(expected, rel=1e-6)
