"""f-divergence weighting (docs/math.md §6): h = r^2 f'', the weighted score-difference gradient, DMD2 surrogate."""

import math

import pytest
import torch
import torch.nn.functional as F

from flowalign.algorithms.divergences import DIVERGENCES, alpha_divergence, get_divergence
from flowalign.algorithms.fdistill import (
    discriminator_loss,
    discriminator_ratio,
    generator_surrogate_loss,
    transition_log_ratio,
    transition_weights,
)
from flowalign.samplers import flow_sde_step

ALL = [*DIVERGENCES.values(), alpha_divergence(0.5), alpha_divergence(2.0), alpha_divergence(-1.0)]
IDS = [d.name for d in ALL]


@pytest.mark.parametrize("div", ALL, ids=IDS)
def test_h_is_r_squared_f_second_derivative(div):
    r = torch.tensor([0.05, 0.3, 1.0, 2.5, 17.0], dtype=torch.float64, requires_grad=True)
    (df,) = torch.autograd.grad(div.f(r).sum(), r, create_graph=True)
    (d2f,) = torch.autograd.grad(df.sum(), r)
    rd = r.detach()
    torch.testing.assert_close(rd**2 * d2f, div.h(rd))
    torch.testing.assert_close(div.log_h(rd.log()), div.h(rd).log())
    torch.testing.assert_close(div.f(torch.ones(1, dtype=torch.float64)), torch.zeros(1, dtype=torch.float64))


def _divergence_by_quadrature(div, theta):
    """D_f(p || q_theta) = ∫ q f(p / q), p = N(0, 1), q = N(theta, 1), trapezoid on [-15, 15]."""
    x = torch.linspace(-15, 15, 30001, dtype=torch.float64)
    log_p = -x**2 / 2 - 0.5 * math.log(2 * math.pi)
    log_q = -((x - theta) ** 2) / 2 - 0.5 * math.log(2 * math.pi)
    return torch.trapezoid(log_q.exp() * div.f((log_p - log_q).exp()), x)


@pytest.mark.parametrize("div", ALL, ids=IDS)
def test_weighted_score_difference_matches_finite_difference(div):
    theta, eps = 0.5, 1e-4
    fd = (_divergence_by_quadrature(div, theta + eps) - _divergence_by_quadrature(div, theta - eps)) / (2 * eps)
    # Estimator: x = theta + z ~ q; grad = E[h(r(x)) (s_q(x) - s_p(x)) dx/dtheta] via a stop-gradient surrogate.
    th = torch.tensor(theta, dtype=torch.float64, requires_grad=True)
    z = torch.randn(400_000, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    x = th + z
    with torch.no_grad():
        xd = x.detach()
        log_r = (-xd**2 / 2) - (-((xd - theta) ** 2) / 2)
        score_p, score_q = -xd, -(xd - theta)
        coef = div.h(log_r.exp()) * (score_q - score_p)
    (coef * x).mean().backward()
    torch.testing.assert_close(th.grad, fd, rtol=1e-2, atol=1e-4)


def test_divergence_lookup_errors():
    assert get_divergence("alpha", alpha=0.5).name == "alpha(0.5)"
    with pytest.raises(ValueError, match="unknown divergence"):
        get_divergence("tv")
    with pytest.raises(ValueError, match="alpha"):
        alpha_divergence(1.0)


def _steps(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(6, 2, 3, 3, generator=g)
    v_s, v_t = torch.randn(6, 2, 3, 3, generator=g), torch.randn(6, 2, 3, 3, generator=g)
    student = flow_sde_step(v_s, x, 0.6, 0.5, 0.7, generator=g)
    teacher = flow_sde_step(v_t, x, 0.6, 0.5, 0.7, prev_sample=student.prev_sample)
    return student, teacher


def test_transition_weights():
    student, teacher = _steps()
    log_r = transition_log_ratio(student, teacher)
    expected = teacher.log_prob(reduction="sum") - student.log_prob(reduction="sum")
    torch.testing.assert_close(log_r, expected)
    torch.testing.assert_close(transition_weights(student, teacher), torch.ones(6))
    r = log_r.double().exp()
    torch.testing.assert_close(transition_weights(student, teacher, "forward_kl"), (r / r.mean()).float())
    js = r / (r + 1)
    torch.testing.assert_close(transition_weights(student, teacher, "js"), (js / js.mean()).float())
    w = transition_weights(student, teacher, "alpha", alpha=0.5)
    torch.testing.assert_close(w.mean(), torch.tensor(1.0))


def test_discriminator_ratio_bins():
    d = torch.tensor([0.0, 1.0, 20.0, -20.0, 0.5, 0.5])
    t = torch.tensor([0.05, 0.08, 0.55, 0.52, 1.0, 0.95])
    r = discriminator_ratio(d, t)
    raw = torch.tensor([1.0, math.e, 20.0, 0.1, math.exp(0.5), math.exp(0.5)])
    expected = raw / torch.tensor([(1 + math.e) / 2] * 2 + [10.05] * 2 + [math.exp(0.5)] * 2)
    torch.testing.assert_close(r, expected)


def test_discriminator_ratio_fastgen_options():
    # [B, K] logits are averaged over K before the exp; bins over [t_min, t_max]; an EMA of the per-bin means
    d = torch.tensor([[0.0, 2.0], [1.0, 1.0], [0.2, 0.8], [3.0, 1.0]])
    t = torch.tensor([0.1, 0.15, 0.8, 0.85])
    torch.testing.assert_close(discriminator_ratio(d, t), discriminator_ratio(d.mean(1), t))
    raw = d.mean(1).exp()
    # bin_range (0, 0.2) with 2 bins: t = 0.1 and 0.15 fall in the second bin, t >= 0.2 past the last (clamped)
    r = discriminator_ratio(d, t, num_bins=2, bin_range=(0.0, 0.2))
    torch.testing.assert_close(r, raw / raw.mean())
    state = torch.ones(2)
    first = discriminator_ratio(d, t, num_bins=2, bin_means=state, ema_rate=0.5)
    means = torch.tensor([(raw[0] + raw[1]) / 2, (raw[2] + raw[3]) / 2])
    torch.testing.assert_close(state, 0.5 + 0.5 * means)  # both bins seen: m <- 0.5 m + 0.5 batch mean
    torch.testing.assert_close(first, raw / state[torch.tensor([0, 0, 1, 1])])
    only_first_bin = discriminator_ratio(d[:2], t[:2], num_bins=2, bin_means=state, ema_rate=0.5)
    assert state[1] == 0.5 + 0.5 * means[1]  # an empty bin keeps its mean
    torch.testing.assert_close(state[0], 0.5 * (0.5 + 0.5 * means[0]) + 0.5 * means[0])
    torch.testing.assert_close(only_first_bin, raw[:2] / state[0])
    # ema_rate = 0 with state is the stateless batch normalisation
    torch.testing.assert_close(discriminator_ratio(d, t, bin_means=torch.ones(10), ema_rate=0.0),
                               discriminator_ratio(d, t))


def test_generator_surrogate_gradient_and_discriminator_loss():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 2, 5, generator=g).requires_grad_(True)
    x0_fake, x0_teacher = torch.randn(4, 2, 5, generator=g), torch.randn(4, 2, 5, generator=g)
    d_fake = torch.randn(4, generator=g).requires_grad_(True)
    t = torch.tensor([0.1, 0.3, 0.3, 0.9])
    out = generator_surrogate_loss(x, x0_fake, x0_teacher, d_fake, t, divergence="forward_kl", lambda_gan=0.1)
    out.loss.backward()
    r = discriminator_ratio(d_fake, t)
    h = r / r.mean()
    w = h / ((x.detach() - x0_teacher).abs().flatten(1).mean(1) + 1e-6)
    grad = w.reshape(4, 1, 1) * (x0_fake - x0_teacher)
    torch.testing.assert_close(out.weights, h)
    torch.testing.assert_close(x.grad, grad / x.numel())
    torch.testing.assert_close(out.distill, 0.5 * (grad**2).mean())
    torch.testing.assert_close(d_fake.grad, 0.1 * -torch.sigmoid(-d_fake.detach()) / 4)
    d_real = torch.randn(4, generator=g)
    torch.testing.assert_close(discriminator_loss(d_fake, d_real),
                               F.softplus(d_fake).mean() + F.softplus(-d_real).mean())
