"""DiffusionNFT (SPEC §4): implicit policies, forward process and the closed-form optimum."""

import pytest
import torch

from flowalign.algorithms.nft import forward_process, implicit_policies, nft_loss, nft_optimum, optimality


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

    def loss_of(v):
        return nft_loss(v.expand(n, d), v_old.expand(n, d), u, r, beta=beta, kl_coef=0.0).loss

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


def test_uninformative_samples_keep_old_policy_and_kl_term():
    g = torch.Generator().manual_seed(2)
    v_old, u = torch.randn(4, 6, generator=g), torch.randn(4, 6, generator=g)
    half = torch.full((4,), 0.5)
    # r = 1/2: the loss is |a|^2 + beta^2 |v - v_old|^2, minimised at v_old (zero gradient there)
    v = v_old.clone().requires_grad_(True)
    nft_loss(v, v_old, u, half, beta=0.7, kl_coef=0.0).loss.backward()
    assert v.grad.abs().max() < 1e-6
    v_ref = torch.randn(4, 6, generator=g)
    out = nft_loss(v_old, v_old, u, half, beta=0.7, v_ref=v_ref, kl_coef=0.1)
    torch.testing.assert_close(out.kl, ((v_old - v_ref) ** 2).mean(1))
    torch.testing.assert_close(out.loss, (((v_old - u) ** 2).mean(1) + 0.1 * out.kl).mean())
    with pytest.raises(ValueError, match="v_ref"):
        nft_loss(v_old, v_old, u, half)
    with pytest.raises(ValueError, match="r must"):
        nft_loss(v_old, v_old, u, torch.full((4,), 2.0), kl_coef=0.0)
