"""DiffusionNFT (docs/math.md §4): implicit policies, forward process, the reference loss (x0-space errors with adaptive
weights and the A_max / beta prefactor), the velocity-MSE form's closed-form optimum, adv_mode and timesteps."""

import pytest
import torch

from flowalign.samplers import ForwardSample, forward_process
from flowalign.algorithms.nft import (
    DECAY_TYPES,
    adaptive_x0_error,
    implicit_policies,
    nft_loss,
    nft_optimum,
    old_model_decay,
    optimality,
    permuted_timesteps,
)


def _shared_state(x_t: torch.Tensor, u: torch.Tensor, t: float) -> ForwardSample:
    """n (x0, eps) pairs sharing one x_t [d] with targets u [n, d]: x0_i = x_t - t u_i, eps_i = x_t + (1 - t) u_i."""
    n = u.shape[0]
    x = x_t.expand(n, -1)
    return ForwardSample(x_t=x, target=u, noise=x + (1 - t) * u, t=torch.full((n,), t), x0=x - t * u)


def test_optimality_mapping():
    a = torch.tensor([-10.0, -5.0, 0.0, 2.5, 5.0, 7.0])
    torch.testing.assert_close(optimality(a), torch.tensor([0.0, 0.0, 0.5, 0.75, 1.0, 1.0]))


def test_forward_process_and_implicit_policies():
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 2, 4, 4, generator=g)
    fs = forward_process(x0, torch.tensor([0.0, 0.5, 1.0]), generator=g)
    torch.testing.assert_close(fs.x_t[0], x0[0])
    torch.testing.assert_close(fs.x_t[2], fs.noise[2])
    torch.testing.assert_close(fs.target, fs.noise - x0)
    # x_t - t u = x0: the target is the exact velocity of the straight path
    torch.testing.assert_close(fs.x_t - fs.t.reshape(3, 1, 1, 1) * fs.target, x0)
    v, vo = torch.randn(2, 5, generator=g), torch.randn(2, 5, generator=g)
    vp, vn = implicit_policies(v, vo, 0.3)
    torch.testing.assert_close((vp + vn) / 2, vo)  # symmetric around v_old
    torch.testing.assert_close(vp - vn, 2 * 0.3 * (v - vo))
    with pytest.raises(ValueError, match="t must"):
        forward_process(x0, 1.5)


@pytest.mark.parametrize("beta", [1.0, 0.1])
def test_closed_form_optimum_for_fixed_state(beta):
    # n (x0, eps) pairs sharing one x_t: many targets u_i with optimalities r_i; v_theta is one free tensor.
    g = torch.Generator().manual_seed(1)
    n, d = 256, 12
    v_old = torch.randn(d, generator=g)
    u = torch.randn(n, d, generator=g) + 0.5
    r = torch.rand(n, generator=g)
    v_star = nft_optimum(v_old, u, r, beta)

    point = _shared_state(torch.randn(d, generator=g), u, 0.6)

    def loss_of(v):
        return nft_loss(v.expand(n, d), v_old.expand(n, d), point, r, beta=beta, kl_coef=0.0,
                        form="velocity_mse").loss

    # gradient vanishes at v*
    v = v_star.clone().requires_grad_(True)
    loss_of(v).backward()
    assert v.grad.abs().max() < 1e-5
    # and gradient descent from elsewhere converges to it (the loss is a quadratic with curvature 2 beta^2 / d)
    v = torch.zeros(d, requires_grad=True)
    opt = torch.optim.SGD([v], lr=d / (2 * beta**2) * 0.5)
    for _ in range(200):
        opt.zero_grad()
        loss_of(v).backward()
        opt.step()
    torch.testing.assert_close(v.detach(), v_star, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("form", ["velocity_mse", "reference"])
def test_uninformative_samples_keep_old_policy_and_kl_term(form):
    g = torch.Generator().manual_seed(2)
    v_old = torch.randn(4, 6, generator=g)
    point = forward_process(torch.randn(4, 6, generator=g), torch.rand(4, generator=g) * 0.8 + 0.1, generator=g)
    u = point.target
    half = torch.full((4,), 0.5)
    # r = 1/2: both halves weigh the same; v+ and v- move oppositely, so the gradient at v_old is zero
    v = v_old.clone().requires_grad_(True)
    nft_loss(v, v_old, point, half, beta=0.7, kl_coef=0.0, form=form).loss.backward()
    assert v.grad.abs().max() < 1e-6
    v_ref = torch.randn(4, 6, generator=g)
    out = nft_loss(v_old, v_old, point, half, beta=0.7, v_ref=v_ref, kl_coef=0.1, form=form)
    torch.testing.assert_close(out.kl, ((v_old - v_ref) ** 2).mean(1))  # the KL term is the same in both forms
    policy = ((v_old - u) ** 2).mean(1) if form == "velocity_mse" else (5.0 / 0.7) * adaptive_x0_error(v_old, point)
    torch.testing.assert_close(out.loss, (policy + 0.1 * out.kl).mean())
    with pytest.raises(ValueError, match="v_ref"):
        nft_loss(v_old, v_old, point, half, form=form)
    with pytest.raises(ValueError, match="r must"):
        nft_loss(v_old, v_old, point, torch.full((4,), 2.0), kl_coef=0.0, form=form)


def test_reference_error_x0_space_equals_velocity_space_identity():
    # e(v) = mean (x0(v) - x0)^2 / sg(max(mean |x0(v) - x0|, 1e-5)) = t mean (v - u)^2 / sg(max(mean |v - u|, 1e-5/t))
    # (float64 throughout, so the identity holds to rounding even for an error below the floor)
    g = torch.Generator().manual_seed(3)
    x0, eps = (torch.randn(5, 3, 4, 4, generator=g, dtype=torch.float64) for _ in range(2))
    t = torch.tensor([0.05, 0.3, 0.5, 0.9, 1.0], dtype=torch.float64)
    tb = t.view(5, 1, 1, 1)
    point = ForwardSample(x_t=(1 - tb) * x0 + tb * eps, target=eps - x0, noise=eps, t=t, x0=x0)
    u = point.target
    v = u + 0.3 * torch.randn(5, 3, 4, 4, generator=g, dtype=torch.float64)
    v[0] = u[0] + 1e-7  # an error below the floor: the weight is the floor
    diff = (v - u).flatten(1)
    expected = t * (diff**2).mean(1) / torch.maximum(diff.abs().mean(1), 1e-5 / t)
    # sample 0's x0-space error (~1e-8) is a difference of O(1) float64 numbers: relative rounding ~1e-8 at most
    torch.testing.assert_close(adaptive_x0_error(v, point), expected, rtol=1e-6, atol=0)


def test_reference_loss_by_hand_two_samples():
    # Two samples of D = 2 elements, t = 0.5, x0 = 0, so x0(v) - x0 = x_t - t v with x_t = t eps.
    eps = torch.tensor([[2.0, 0.0], [0.0, -2.0]])
    point = forward_process(torch.zeros(2, 2), 0.5, noise=eps)  # x_t = [[1, 0], [0, -1]], u = eps
    v_old = torch.tensor([[2.0, 2.0], [0.0, 0.0]])
    v = torch.tensor([[4.0, 2.0], [0.0, -2.0]])
    r = torch.tensor([1.0, 0.25])
    beta, a_max = 0.5, 5.0
    out = nft_loss(v, v_old, point, r, beta=beta, kl_coef=0.0, adv_max=a_max)
    # sample 0: v+ = 0.5 v + 0.5 v_old = [3, 2] -> x0(v+) = [1 - 1.5, 0 - 1] = [-0.5, -1]:
    #   mean sq = (0.25 + 1) / 2 = 0.625, weight = (0.5 + 1) / 2 = 0.75, e+ = 0.8333...; r = 1 so e- does not count
    # sample 1: v+ = [0, -1] -> x0(v+) = [0, -0.5]: e+ = 0.125 / 0.25 = 0.5;
    #   v- = 1.5 v_old - 0.5 v = [0, 1] -> x0(v-) = [0, -1.5]: e- = 1.125 / 0.75 = 1.5
    e_pos = torch.tensor([0.625 / 0.75, 0.125 / 0.25])
    torch.testing.assert_close(out.positive, e_pos)
    torch.testing.assert_close(out.negative[1], torch.tensor(1.5))
    per_sample = (a_max / beta) * torch.tensor([1.0 * e_pos[0], 0.25 * 0.5 + 0.75 * 1.5])
    torch.testing.assert_close(out.loss, per_sample.mean())


def _policy_grad(v, v_old, point, r, beta):
    v = v.clone().requires_grad_(True)
    nft_loss(v, v_old, point, r, beta=beta, kl_coef=0.0).loss.backward()
    return v.grad


def test_reference_policy_gradient_is_invariant_to_beta_to_first_order():
    # dv+/dv_theta = beta = -dv-/dv_theta cancels the 1/beta prefactor: at v_theta = v_old the gradient is
    # A_max mean_i (2 r_i - 1) e'(v_old) for every beta, and near it the betas differ only at first order.
    g = torch.Generator().manual_seed(4)
    x0, eps = (torch.randn(6, 8, generator=g, dtype=torch.float64) for _ in range(2))
    t = torch.rand(6, generator=g, dtype=torch.float64) * 0.8 + 0.1
    point = ForwardSample(x_t=(1 - t[:, None]) * x0 + t[:, None] * eps, target=eps - x0, noise=eps, t=t, x0=x0)
    v_old = point.target + torch.randn(6, 8, generator=g, dtype=torch.float64)
    r = torch.rand(6, generator=g, dtype=torch.float64)
    at_old = [_policy_grad(v_old, v_old, point, r, beta) for beta in (1.0, 0.1)]
    torch.testing.assert_close(at_old[0], at_old[1], rtol=1e-10, atol=0)
    direction = torch.randn(6, 8, generator=g, dtype=torch.float64)
    gaps = []
    for eps in (1e-2, 1e-3):
        g1, g01 = (_policy_grad(v_old + eps * direction, v_old, point, r, beta) for beta in (1.0, 0.1))
        gaps.append(float((g1 - g01).norm() / g1.norm()))
    assert gaps[0] > 1e-4 and 7 < gaps[0] / gaps[1] < 13, gaps  # shrinks 10x with a 10x smaller step: first order


@pytest.mark.parametrize("beta", [1.0, 0.1])
def test_reference_form_has_the_velocity_forms_fixed_point_when_weights_are_equal(beta):
    # With a floor above every adaptive weight all weights equal the floor: the reference loss is then
    # (A_max / beta) (t / floor) x the velocity form, so its gradient vanishes at the same v*.
    g = torch.Generator().manual_seed(5)
    n, d = 64, 6
    v_old = torch.randn(d, generator=g)
    u = torch.randn(n, d, generator=g)
    r = torch.rand(n, generator=g)
    point = _shared_state(torch.randn(d, generator=g), u, 0.4)
    v = nft_optimum(v_old, u, r, beta).clone().requires_grad_(True)
    nft_loss(v.expand(n, d), v_old.expand(n, d), point, r, beta=beta, kl_coef=0.0, weight_floor=1e3).loss.backward()
    assert v.grad.abs().max() < 1e-6
    # with the real floor the adaptive weights differ per term, so the fixed point moves
    v.grad = None
    nft_loss(v.expand(n, d), v_old.expand(n, d), point, r, beta=beta, kl_coef=0.0).loss.backward()
    assert v.grad.abs().max() > 1e-3


@pytest.mark.parametrize("mode,expected", [
    ("all", [0.0, 0.4, 0.5, 0.6, 1.0]),
    ("positive_only", [0.5, 0.5, 0.5, 0.6, 1.0]),
    ("negative_only", [0.0, 0.4, 0.5, 0.5, 0.5]),
    ("one_only", [0.5, 0.5, 0.5, 0.6, 0.6]),  # A' = 1 where A > 0, else 0
    ("binary", [0.4, 0.4, 0.5, 0.6, 0.6]),  # A' = sign(A)
])
def test_adv_modes(mode, expected):
    a = torch.tensor([-7.0, -1.0, 0.0, 1.0, 5.0])
    torch.testing.assert_close(optimality(a, 5.0, mode), torch.tensor(expected))


def test_permuted_timesteps_are_per_sample_permutations():
    g = torch.Generator().manual_seed(6)
    cols = permuted_timesteps(200, 10, 9, g)
    assert cols.shape == (200, 9)
    assert all(len(set(row.tolist())) == 9 for row in cols)  # distinct grid steps within a sample
    assert len({tuple(row.tolist()) for row in cols}) > 190  # each sample its own order
    counts = torch.bincount(cols.flatten(), minlength=10)
    assert counts.min() > 130  # every grid step, t = 1 and the last included, is eligible (expected 180)


def test_decay_types_are_the_references_presets():
    assert DECAY_TYPES == {0: (0, 0.0, 0.0), 1: (0, 0.001, 0.5), 2: (75, 0.0075, 0.999)}
    assert [old_model_decay(s, *DECAY_TYPES[2]) for s in (0, 74, 75, 100, 10_000)] == \
        [0.0, 0.0, 0.0, pytest.approx(0.1875), 0.999]
    assert old_model_decay(50, *DECAY_TYPES[0]) == 0.0
