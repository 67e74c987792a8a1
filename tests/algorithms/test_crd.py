"""CRD (docs/math.md §5): centering invariances, the categorical optimum pi_ref e^{R/beta}/Z, schedules, helpers."""

import pytest
import torch

from flowalign.algorithms.distances import velocity_distance
from flowalign.algorithms.timesteps import stratified_timesteps
from flowalign.runtime.snapshot import ema_update_
from flowalign.algorithms.crd import (
    crd_loss,
    implicit_log_ratio,
    normalized_reward,
    parse_schedule,
    schedule_decay,
)

GROUPS = torch.tensor([0, 0, 0, 1, 1, 1, 1, 2, 2])


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(9, generator=g), torch.rand(9, generator=g)


@pytest.mark.parametrize("form,weighting", [("mse", "uniform"), ("bce", "uniform"), ("mse", "softmax"),
                                           ("bce", "softmax"), ("mse", "hard")])
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
    d = velocity_distance(v, v_ref)
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
    old, sampler = "0-0.25-0.005-0.999", "75-0-0.0075-0.999"  # docs/math.md §5 (Flow-Factory's defaults)
    assert schedule_decay(old, 0) == 0.25 and schedule_decay(old, 10) == pytest.approx(0.3)
    assert schedule_decay(old, 10_000) == 0.999
    assert [schedule_decay(sampler, s) for s in (0, 74, 75)] == [0.0, 0.0, 0.0]
    assert schedule_decay(sampler, 175) == pytest.approx(0.75) and schedule_decay(sampler, 10_000) == 0.999
    assert schedule_decay("0-0.25-0.005-0.9", 10_000) == 0.9 and schedule_decay("75-0-0.0075-0.5", 175) == 0.5
    assert schedule_decay("10-0.3-0.1-0.6", 5) == 0.3  # start_value before start_step, not a hard copy
    assert parse_schedule("medium") == parse_schedule("2") == (75, 0.0, 0.0075, 0.999)
    assert parse_schedule("offline") == (0, 1.0, 0.0, 1.0)
    for bad in ("0-0.25-0.005", "a-b-c-d", "0-1.5-0-1"):
        with pytest.raises(ValueError, match="schedule"):
            parse_schedule(bad)
    snap, p = [torch.zeros(3)], [torch.ones(3)]
    ema_update_(snap, p, 0.75)
    torch.testing.assert_close(snap[0], torch.full((3,), 0.25))
    ema_update_(snap, p, 1.0)  # d >= 1 keeps the snapshot (the offline preset)
    torch.testing.assert_close(snap[0], torch.full((3,), 0.25))
    ema_update_(snap, p, 0.0)
    torch.testing.assert_close(snap[0], p[0])


def test_stratified_timesteps():
    ts = torch.linspace(1000, 100, 10)
    vals, pos = stratified_timesteps(ts, num_draws=9, generator=torch.Generator().manual_seed(0))
    assert pos.tolist() == list(range(9))  # 9 of 10 kept (top 99%), one per stratum
    torch.testing.assert_close(vals, ts[:9])
    grid = torch.linspace(1, 0.001, 1000)
    vals, pos = stratified_timesteps(grid, num_draws=20, generator=torch.Generator().manual_seed(1))
    assert pos.max() < 990 and (pos[1:] > pos[:-1]).all()
    assert ((pos // 49.5).long() == torch.arange(20)).all()  # one draw in each stratum


def test_softmax_centering_is_the_dual_direction_loss():
    # Flow-Factory weight_temp = tau > 0: 1/2 of the loss centred at softmax(R~/tau)-weighted means, 1/2 at
    # softmax(-R~/tau)-weighted ones, every sample in both (one group here: the whole batch)
    l, r = _batch(5)
    gid = torch.zeros(9, dtype=torch.long)
    beta, a_max, tau = 0.5, 5.0, 0.3
    out = crd_loss(l, r, gid, beta=beta, adv_max=a_max, center_weighting="softmax", tau=tau)
    expected = 0.0
    for sign in (1, -1):
        w = torch.softmax(sign * r / tau, dim=0)
        expected = expected + 0.5 * ((beta * (l - (w * l).sum()) - (r - (w * r).sum())) ** 2).mean()
    torch.testing.assert_close(out.main, (a_max / beta) * expected)
    bce = crd_loss(l, r, gid, beta=beta, adv_max=a_max, form="bce", center_weighting="softmax", tau=tau)
    expected_bce = 0.0
    for sign in (1, -1):
        w = torch.softmax(sign * r / tau, dim=0)
        expected_bce = expected_bce + 0.5 * torch.nn.functional.binary_cross_entropy_with_logits(
            beta * (l - (w * l).sum()), torch.sigmoid(r - (w * r).sum()))
    torch.testing.assert_close(bce.main, (a_max / beta) * expected_bce)  # BCE carries the prefactor too


def test_hard_centering_as_the_public_code_computes_it():
    # weight_temp = 0: positive centre = softmax(R~) over R~ > 0 (temperature 1); negative centre = softmax(R~)
    # over R~ < 0, which is empty for R~ in [0, 1], so the plain mean
    l, r = _batch(6)
    r[2] = 0.0  # A <= -A_max: left out of the positive pool
    gid = torch.zeros(9, dtype=torch.long)
    out = crd_loss(l, r, gid, beta=1.0, adv_max=5.0, center_weighting="hard")
    pos = r > 0
    w = torch.zeros(9)
    w[pos] = torch.softmax(r[pos], dim=0)
    plus = ((l - (w * l).sum()) - (r - (w * r).sum())) ** 2
    minus = ((l - l.mean()) - (r - r.mean())) ** 2
    torch.testing.assert_close(out.main, 5.0 * (0.5 * plus + 0.5 * minus).mean())


def test_implicit_log_ratio_without_adaptive_weights():
    g = torch.Generator().manual_seed(7)
    u, v_old, v = (torch.randn(3, 2, 4, generator=g) for _ in range(3))
    plain = -(((v - u) ** 2).flatten(1).mean(1) - ((v_old - u) ** 2).flatten(1).mean(1))
    torch.testing.assert_close(implicit_log_ratio(v, v_old, u, adaptive=False), plain)
