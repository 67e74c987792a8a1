"""CRD (SPEC §5): centering invariances, the categorical optimum pi_ref e^{R/beta}/Z, schedules, helpers."""

import pytest
import torch

from flowalign.algorithms.crd import (
    crd_loss,
    ema_update_,
    implicit_log_ratio,
    kl_anchor_distance,
    normalized_reward,
    old_decay,
    sampler_decay,
    stratified_timesteps,
)

GROUPS = torch.tensor([0, 0, 0, 1, 1, 1, 1, 2, 2])


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(9, generator=g), torch.rand(9, generator=g)


@pytest.mark.parametrize("form,weighting", [("mse", "uniform"), ("bce", "uniform"), ("mse", "softmax")])
def test_per_prompt_constants_cancel_within_groups(form, weighting):
    l, r = _batch()
    shift = torch.tensor([3.0, -1.5, 0.7])[GROUPS]
    kw = dict(group_ids=GROUPS, beta=0.5, form=form, center_weighting=weighting)
    base = crd_loss(l, r, **kw).loss
    torch.testing.assert_close(crd_loss(l + shift, r, **kw).loss, base)
    torch.testing.assert_close(crd_loss(l, r + shift, **kw).loss, base)


def test_batch_centering_is_not_invariant_to_per_prompt_constants():
    l, r = _batch()
    shift = torch.tensor([3.0, -1.5, 0.7])[GROUPS]
    base = crd_loss(l, r, beta=0.5, centering="batch").loss
    assert not torch.allclose(crd_loss(l + shift, r, beta=0.5, centering="batch").loss, base)
    # a constant shared by the whole batch still cancels
    torch.testing.assert_close(crd_loss(l + 2.0, r, beta=0.5, centering="batch").loss, base)
    with pytest.raises(ValueError, match="group_ids"):
        crd_loss(l, r)


def _fit_categorical(log_ref, reward, groups, beta, centering):
    """Minimise the CRD MSE loss over the logits of one categorical per prompt (exact log-ratios)."""
    logits = torch.zeros(log_ref.shape, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([logits], lr=1.0, max_iter=200, tolerance_grad=1e-12, tolerance_change=1e-14,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        l = (torch.log_softmax(logits, dim=1) - log_ref).flatten()
        loss = crd_loss(l, reward.flatten(), groups, beta=beta, centering=centering).loss
        loss.backward()
        return loss

    opt.step(closure)
    return torch.softmax(logits.detach(), dim=1).float()


def test_categorical_minimiser_is_tilted_reference():
    g = torch.Generator().manual_seed(0)
    beta, k = 0.4, 6
    log_ref = torch.log_softmax(torch.randn(1, k, generator=g), dim=1)
    reward = torch.rand(1, k, generator=g)
    pi = _fit_categorical(log_ref, reward, torch.zeros(k, dtype=torch.long), beta, "group")
    target = torch.softmax(log_ref + reward / beta, dim=1)
    torch.testing.assert_close(pi, target, atol=2e-4, rtol=1e-3)


def test_batch_centering_misses_the_optimum_when_prompts_mix():
    # Two prompts with different log Z(c): group centering recovers each tilted reference, batch centering not.
    g = torch.Generator().manual_seed(1)
    beta, k = 0.4, 5
    log_ref = torch.log_softmax(torch.randn(2, k, generator=g) * 1.5, dim=1)
    reward = torch.rand(2, k, generator=g)
    reward[1] = reward[1] * 0.2  # the second prompt is hard: a much smaller log Z
    groups = torch.arange(2).repeat_interleave(k)
    target = torch.softmax(log_ref + reward / beta, dim=1)
    pi_group = _fit_categorical(log_ref, reward, groups, beta, "group")
    pi_batch = _fit_categorical(log_ref, reward, groups, beta, "batch")
    torch.testing.assert_close(pi_group, target, atol=2e-4, rtol=1e-3)
    assert (pi_batch - target).abs().max() > 0.01


def test_mse_formula_and_kl_anchor():
    l, r = _batch(3)
    l = l.requires_grad_(True)
    beta, a_max = 0.5, 5.0
    gid = torch.zeros(9, dtype=torch.long)
    v, v_ref = torch.randn(9, 4), torch.randn(9, 4)
    d = kl_anchor_distance(v, v_ref)
    out = crd_loss(l, r, gid, beta=beta, adv_max=a_max, kl_distance=d, beta_kl=0.1)
    expected = (a_max / beta) * ((beta * (l - l.mean()) - (r - r.mean())) ** 2).mean()
    expected_kl = ((1e-4 + r * (0.1 - 1e-4)) * ((v - v_ref) ** 2).mean(1)).mean()
    torch.testing.assert_close(out.main, expected.detach())
    torch.testing.assert_close(out.loss, expected + expected_kl)
    # the centre is stop-gradient: dL/dl_i = 2 A_max residual_i / B
    out.loss.backward()
    torch.testing.assert_close(l.grad, 2 * a_max * out.residual / 9)


def test_implicit_log_ratio():
    g = torch.Generator().manual_seed(4)
    u, v_old = torch.randn(3, 2, 4, generator=g), torch.randn(3, 2, 4, generator=g)
    v = v_old.clone().requires_grad_(True)
    l = implicit_log_ratio(v, v_old, u)
    assert l.dtype == torch.float32 and l.abs().max() == 0
    l.sum().backward()
    w = (v_old - u).abs().flatten(1).mean(1).reshape(3, 1, 1)
    torch.testing.assert_close(v.grad, -2 * (v_old - u) / (w * 8))  # w is stop-gradient
    assert (implicit_log_ratio(u, v_old, u) > 0).all()  # the exact target beats v_old
    torch.testing.assert_close(normalized_reward(torch.tensor([-7.0, -5.0, 0.0, 1.0, 9.0])),
                               torch.tensor([0.0, 0.0, 0.5, 0.6, 1.0]))


def test_decay_schedules_and_ema_update():
    assert old_decay(0) == 0.25 and old_decay(10) == pytest.approx(0.3) and old_decay(10_000) == 0.999
    assert sampler_decay(0) == 0.0 and sampler_decay(74) == 0.0 and sampler_decay(75) == 0.0
    assert sampler_decay(175) == pytest.approx(0.75) and sampler_decay(10_000) == 0.999
    assert old_decay(10, max_decay=0.9) == pytest.approx(0.3) and old_decay(10_000, max_decay=0.9) == 0.9
    assert sampler_decay(175, max_decay=0.5) == 0.5 and sampler_decay(80, max_decay=0.5) == pytest.approx(0.0375)
    snap, p = [torch.zeros(3)], [torch.ones(3)]
    ema_update_(snap, p, 0.75)
    torch.testing.assert_close(snap[0], torch.full((3,), 0.25))
    ema_update_(snap, p, 0.0)
    torch.testing.assert_close(snap[0], p[0])
    with pytest.raises(ValueError, match="decay"):
        ema_update_(snap, p, 1.0)


def test_stratified_timesteps():
    ts = torch.linspace(1000, 100, 10)
    vals, pos = stratified_timesteps(ts, num_draws=9, generator=torch.Generator().manual_seed(0))
    assert pos.tolist() == list(range(9))  # 9 of 10 kept (top 99%), one per stratum
    torch.testing.assert_close(vals, ts[:9])
    grid = torch.linspace(1, 0.001, 1000)
    vals, pos = stratified_timesteps(grid, num_draws=20, generator=torch.Generator().manual_seed(1))
    assert pos.max() < 990 and (pos[1:] > pos[:-1]).all()
    assert ((pos // 49.5).long() == torch.arange(20)).all()  # one draw in each stratum
