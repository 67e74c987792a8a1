"""Flow-matching steps: Euler equivalence with diffusers, marginal preservation, KL identities."""

import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from flowalign.samplers import flow_constant_noise_step, flow_cps_step, flow_dpm2_step, flow_ode_step, flow_sde_step


def test_ode_and_zero_noise_sde_match_diffusers_euler_scheduler():
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    sched.set_timesteps(8)
    sigmas = sched.sigmas
    g = torch.Generator().manual_seed(0)
    x_ref = torch.randn(2, 4, 8, 8, generator=g)
    x_ode, x_sde = x_ref.clone(), x_ref.clone()
    for i, t in enumerate(sched.timesteps):
        v = torch.randn(2, 4, 8, 8, generator=g)
        x_ref = sched.step(v, t, x_ref).prev_sample
        x_ode = flow_ode_step(v, x_ode, sigmas[i], sigmas[i + 1]).prev_sample
        x_sde = flow_sde_step(v, x_sde, sigmas[i], sigmas[i + 1], noise_level=0.0).prev_sample
        torch.testing.assert_close(x_ode, x_ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(x_sde, x_ref, rtol=1e-5, atol=1e-5)


def test_cps_at_zero_noise_is_euler_and_ends_at_x0_hat():
    x, v = torch.randn(3, 5), torch.randn(3, 5)
    torch.testing.assert_close(flow_cps_step(v, x, 0.6, 0.4, 0.0).mean, flow_ode_step(v, x, 0.6, 0.4).mean)
    last = flow_cps_step(v, x, 0.3, 0.0, 0.7)
    torch.testing.assert_close(last.mean, x - 0.3 * v)
    assert torch.all(last.std == 0)


# --- marginal preservation on a 1-D Gaussian with the exact velocity ------------------------------
# x0 ~ N(m, s^2), x_t = (1 - t) x0 + t eps: x_t ~ N((1 - t) m, (1 - t)^2 s^2 + t^2) and
# v(x) = E[eps - x0 | x_t = x] = -m + (t - (1 - t) s^2) / var_t (x - (1 - t) m), affine in x.
M0, S0 = 1.5, 0.5


def _marginal(t):
    return (1 - t) * M0, (1 - t) ** 2 * S0**2 + t**2


def _exact_velocity(x, t):
    mean_t, var_t = _marginal(t)
    return -M0 + (t - (1 - t) * S0**2) / var_t * (x - mean_t)


def _propagate(step_fn, sigmas):
    """Push the exact marginal at sigmas[0] through affine Gaussian steps; return the worst error."""
    mean, var = _marginal(sigmas[0])
    worst = 0.0
    for t, t_next in zip(sigmas[:-1], sigmas[1:]):
        xs = torch.tensor([[0.0], [1.0]], dtype=torch.float64)
        step = step_fn(_exact_velocity(xs, t).float(), xs.float(), t, t_next)
        b, slope = step.mean[0, 0].item(), (step.mean[1, 0] - step.mean[0, 0]).item()
        std = step.std[0].item()
        mean, var = slope * mean + b, slope**2 * var + std**2
        exp_mean, exp_var = _marginal(t_next)
        worst = max(worst, abs(mean - exp_mean), abs(var - exp_var))
    return worst


SDES = {
    "sde-0.7": lambda v, x, t, tn: flow_sde_step(v, x, t, tn, noise_level=0.7),
    "sde-1.0": lambda v, x, t, tn: flow_sde_step(v, x, t, tn, noise_level=1.0),
    "constant-0.3": lambda v, x, t, tn: flow_constant_noise_step(v, x, t, tn, eta=0.3),
    "ode": lambda v, x, t, tn: flow_ode_step(v, x, t, tn),
}


@pytest.mark.parametrize("name", list(SDES))
def test_sde_preserves_marginals_with_first_order_convergence(name):
    # Start at t0 = 0.95: s_t^2 ~ 1/(1 - t) is singular at t = 1, where no finite grid is exact.
    coarse = _propagate(SDES[name], torch.linspace(0.95, 0.0, 401).tolist())
    fine = _propagate(SDES[name], torch.linspace(0.95, 0.0, 1601).tolist())
    assert coarse < 0.01
    assert fine < coarse / 3  # error shrinks ~4x for 4x the steps: it is discretisation error only


def test_negative_control_sde_without_score_term_drifts_off():
    # Same noise as the Flow SDE but drift v alone: the variance is inflated, so the check can fail.
    def wrong(v, x, t, tn):
        step = flow_sde_step(v, x, t, tn, noise_level=0.7)
        return type(step)(step.prev_sample, x - (t - tn) * v, step.std)

    assert _propagate(wrong, torch.linspace(0.95, 0.0, 401).tolist()) > 0.2


def test_full_grid_from_pure_noise_stays_close():
    # From t = 1 the first step uses sigma_next in the denominator (std = a for a fine grid); the
    # marginals stay close but not exact, as with the reference code.
    assert _propagate(SDES["sde-0.7"], torch.linspace(1.0, 0.0, 401).tolist()) < 0.15


@pytest.mark.parametrize("a", [0.3, 0.7, 1.0])
def test_cps_preserves_forward_coefficients(a):
    # With exact predictions (v = eps - x0) CPS gives x' = (1 - t') x0 + t' * (unit-variance noise).
    g = torch.Generator().manual_seed(5)
    n, t, t_next = 200_000, 0.7, 0.45
    x0, eps = torch.randn(n, 1, generator=g) * 2 + 1, torch.randn(n, 1, generator=g)
    x = (1 - t) * x0 + t * eps
    step = flow_cps_step(eps - x0, x, t, t_next, noise_level=a, generator=g)
    noise = (step.prev_sample - (1 - t_next) * x0) / t_next
    assert abs(noise.mean().item()) < 0.01
    assert abs(noise.var().item() - 1.0) < 0.01


# --- KL identities --------------------------------------------------------------------------------
@pytest.mark.parametrize("t,t_next", [(0.9, 0.8), (0.5, 0.3), (1.0, 0.9)])
def test_velocity_form_kl_equals_mean_form(t, t_next):
    g = torch.Generator().manual_seed(3)
    x, va, vb = (torch.randn(4, 3, 4, 4, generator=g) for _ in range(3))
    a = flow_sde_step(va, x, t, t_next, noise_level=0.7, generator=g)
    b = flow_sde_step(vb, x, t, t_next, noise_level=0.7, prev_sample=a.prev_sample)
    delta = t - t_next
    s_t = 0.7 * math.sqrt(t / (1 - (t_next if t == 1.0 else t)))
    coef = (delta / 2) * (1 / s_t + s_t * (1 - t) / (2 * t)) ** 2
    expected = coef * ((va - vb) ** 2).flatten(1).sum(1)
    torch.testing.assert_close(a.kl(b, reduction="sum"), expected, rtol=1e-4, atol=1e-5)
    # Reference scaling: mean_d |dmu|^2 / (2 s_t^2) (s_t without sqrt(Delta)).
    ref = ((a.mean - b.mean) ** 2).flatten(1).mean(1) / (2 * s_t**2)
    torch.testing.assert_close(a.kl(b, scaling="reference"), ref, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("t,t_next", [(0.9, 0.8), (0.5, 0.3)])
def test_constant_noise_reference_scaling_is_the_exact_kl(t, t_next):
    # VeRL-Omni's dance_sde KL divides by the true std eta sqrt(Delta); DanceGRPO has no KL; no public code
    # multiplies it by Delta (docs/parity.md). So scaling="reference" is the exact KL: |dmu|^2 / (2 eta^2 Delta).
    g = torch.Generator().manual_seed(4)
    x, va, vb = (torch.randn(3, 2, 4, 4, generator=g) for _ in range(3))
    a = flow_constant_noise_step(va, x, t, t_next, eta=0.3, generator=g)
    b = flow_constant_noise_step(vb, x, t, t_next, eta=0.3, prev_sample=a.prev_sample)
    exact = ((a.mean - b.mean) ** 2).flatten(1).mean(1) / (2 * 0.3**2 * (t - t_next))
    torch.testing.assert_close(a.kl(b), exact, rtol=1e-5, atol=0)
    torch.testing.assert_close(a.kl(b, scaling="reference"), exact, rtol=1e-5, atol=0)


def test_first_step_from_pure_noise_is_finite():
    x, v = torch.randn(2, 8), torch.randn(2, 8)
    step = flow_sde_step(v, x, 1.0, 0.95, noise_level=0.7)
    assert torch.isfinite(step.mean).all() and torch.isfinite(step.std).all()
    assert step.std[0].item() == pytest.approx(0.7 * math.sqrt(1 / 0.05) * math.sqrt(0.05), rel=1e-5)


def test_rescoring_reproduces_log_prob():
    g = torch.Generator().manual_seed(7)
    x, v = torch.randn(3, 2, 4, 4, generator=g), torch.randn(3, 2, 4, 4, generator=g)
    for fn in (flow_sde_step, flow_cps_step, flow_constant_noise_step):
        drawn = fn(v, x, 0.7, 0.6, generator=g)
        again = fn(v, x, 0.7, 0.6, prev_sample=drawn.prev_sample)
        assert torch.equal(again.prev_sample, drawn.prev_sample)
        torch.testing.assert_close(again.log_prob(), drawn.log_prob(), rtol=0, atol=1e-6)
        # A different velocity scores the same sample lower on average (ratio != 1).
        other = fn(v + 5.0, x, 0.7, 0.6, prev_sample=drawn.prev_sample)
        assert (other.log_prob() < drawn.log_prob()).all()


# --- DPM-Solver++(2M) -----------------------------------------------------------------------------
def _gaussian_velocity(x, t, m=1.5, s=0.5):
    """The exact velocity E[eps - x0 | x_t] for data x0 ~ N(m, s^2) per element."""
    var = (1 - t) ** 2 * s**2 + t**2
    centred = x - (1 - t) * m
    return t / var * centred - (m + (1 - t) * s**2 / var * centred)


def _solve(step, x1, sigmas):
    x, prev = x1, None
    for k in range(len(sigmas) - 1):
        v = _gaussian_velocity(x, sigmas[k])
        if step == "dpm2":
            out = flow_dpm2_step(v, x, sigmas[k], sigmas[k + 1], *(prev or (None, None)))
            prev = (x - sigmas[k] * v, sigmas[k])
        else:
            out = flow_ode_step(v, x, sigmas[k], sigmas[k + 1])
        x = out.prev_sample
    return x


def test_dpm2_first_step_is_euler_and_last_returns_x0_hat():
    g = torch.Generator().manual_seed(7)
    x, v, prev = (torch.randn(3, 2, 4, generator=g) for _ in range(3))
    torch.testing.assert_close(flow_dpm2_step(v, x, 1.0, 0.8).mean, flow_ode_step(v, x, 1.0, 0.8).mean)
    # after a pure-noise point (lambda = -inf) the history carries no information: still first order
    torch.testing.assert_close(flow_dpm2_step(v, x, 0.8, 0.6, prev, 1.0).mean, flow_ode_step(v, x, 0.8, 0.6).mean)
    torch.testing.assert_close(flow_dpm2_step(v, x, 0.3, 0.0, prev, 0.5).mean, x - 0.3 * v)
    assert flow_dpm2_step(v, x, 0.3, 0.1, prev, 0.5).deterministic


def test_dpm2_is_second_order_where_euler_is_first():
    # On Gaussian data with the exact velocity the probability-flow ODE maps noise z to m + s z. Halving the step
    # cuts Euler's error 2x and DPM-Solver++(2M)'s towards 4x (measured 3.05x and 3.32x from 40 to 80 to 160 steps:
    # its first two steps from pure noise, lambda = -inf, are first order, which slows the approach to 4).
    z = torch.linspace(-2.5, 2.5, 101, dtype=torch.float32).reshape(1, -1)
    exact = 1.5 + 0.5 * z
    errors = {}
    for name in ("euler", "dpm2"):
        errors[name] = [float((_solve(name, z, torch.linspace(1, 0, n + 1).tolist()) - exact).abs().max())
                        for n in (40, 80, 160)]
    e, d = errors["euler"], errors["dpm2"]
    assert 1.8 < e[0] / e[1] < 2.2 and 1.8 < e[1] / e[2] < 2.2, e
    assert 2.8 < d[0] / d[1] < 4.2 and 2.8 < d[1] / d[2] < 4.2, d
    assert d[2] < e[2] / 10, (d, e)


def test_cps_reference_log_prob_convention():
    # Flow-GRPO / VeRL-Omni score CPS transitions with -mean_d (x' - mu)^2: log-ratios are 2 std^2 x the true
    # (mean-reduced) log-ratio, so their clip range 1e-4 clips far fewer samples than on true densities
    # (docs/parity.md).
    g = torch.Generator().manual_seed(8)
    x, va, vb = (torch.randn(4, 2, 3, 3, generator=g) for _ in range(3))
    a = flow_cps_step(va, x, 0.3, 0.2, noise_level=0.7, generator=g)
    ref_a = flow_cps_step(va, x, 0.3, 0.2, noise_level=0.7, prev_sample=a.prev_sample, log_prob_convention="squared_error")
    ref_b = flow_cps_step(vb, x, 0.3, 0.2, noise_level=0.7, prev_sample=a.prev_sample, log_prob_convention="squared_error")
    b = flow_cps_step(vb, x, 0.3, 0.2, noise_level=0.7, prev_sample=a.prev_sample)
    torch.testing.assert_close(ref_a.log_prob(), -((a.prev_sample - a.mean) ** 2).flatten(1).mean(1))
    std = 0.2 * math.sin(0.7 * math.pi / 2)
    torch.testing.assert_close(ref_b.log_prob() - ref_a.log_prob(), 2 * std**2 * (b.log_prob() - a.log_prob()),
                               rtol=1e-4, atol=1e-7)
    assert torch.equal(ref_a.kl(ref_b), a.kl(b))  # the KL keeps the true variance
    with pytest.raises(ValueError, match="log_prob_convention"):
        flow_cps_step(va, x, 0.3, 0.2, log_prob_convention="mean")
