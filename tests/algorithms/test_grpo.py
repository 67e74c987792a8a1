"""Flow-GRPO loss and GRPO-Guard (docs/math.md §2)."""

import torch

from flowalign.algorithms.grpo import clipped_surrogate, grpo_step_loss, guard_log_ratio
from flowalign.samplers import flow_sde_step


def test_clipped_surrogate_formula():
    log_ratio = torch.tensor([0.0, 0.3, -0.3, 0.3, -0.3])
    adv = torch.tensor([1.0, 1.0, 1.0, -1.0, -1.0])
    eps = 0.2
    rho = log_ratio.exp()
    expected = torch.maximum(-adv * rho, -adv * rho.clamp(1 - eps, 1 + eps))
    torch.testing.assert_close(clipped_surrogate(log_ratio, adv, eps), expected)
    # Positive advantage, ratio above 1+eps: the clipped branch wins and the gradient is zero.
    lr = torch.tensor([0.5], requires_grad=True)
    clipped_surrogate(lr, torch.tensor([1.0]), eps).sum().backward()
    assert lr.grad.item() == 0.0


def _steps(seed=0, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 3, 8, 8, generator=g)
    v_old = torch.randn(4, 3, 8, 8, generator=g)
    old = flow_sde_step(v_old, x, 0.8, 0.7, 0.7, generator=g)
    v_new = (v_old + shift * torch.randn(4, 3, 8, 8, generator=g)).requires_grad_(True)
    new = flow_sde_step(v_new, x, 0.8, 0.7, 0.7, prev_sample=old.prev_sample)
    return old, new, v_new


def test_on_policy_ratio_is_one_and_loss_is_minus_mean_advantage():
    old, new, _ = _steps()
    adv = torch.tensor([1.0, -0.5, 2.0, 0.0])
    out = grpo_step_loss(new, old.log_prob(), adv, clip_range=1e-4)
    torch.testing.assert_close(out.ratio, torch.ones(4))
    torch.testing.assert_close(out.loss, -adv.mean())


def test_kl_term_uses_the_step_object():
    old, new, _ = _steps(shift=0.3)
    ref = old  # "reference" transition at the same x with the old velocity
    adv = torch.zeros(4)
    out = grpo_step_loss(new, old.log_prob(), adv, clip_range=1e-4, beta=0.04, ref_step=ref)
    torch.testing.assert_close(out.kl, new.kl(ref))
    torch.testing.assert_close(out.loss, 0.04 * new.kl(ref).mean())
    out_ref = grpo_step_loss(new, old.log_prob(), adv, clip_range=1e-4, beta=0.04, ref_step=ref, kl_scaling="reference")
    torch.testing.assert_close(out_ref.kl, new.kl(ref, scaling="reference"))


def test_guard_exponent_identity():
    # For x' = mu_old + s xi: (logp_new - logp_old + b) * s == mean_d(xi * dmu), b = mean_d(dmu^2)/(2 s^2).
    old, new, _ = _steps(seed=3, shift=0.5)
    s = old.std
    xi = (old.prev_sample - old.mean) / s
    dmu = new.mean - old.mean
    expected = (xi * dmu).flatten(1).mean(1)
    got = guard_log_ratio(new, old.log_prob(), old.mean)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_guard_loss_reweights_by_one_over_delta():
    old, new, _ = _steps(seed=1)
    adv = torch.tensor([1.0, 2.0, -1.0, 0.5])
    out = grpo_step_loss(new, old.log_prob(), adv, clip_range=1e-4, guard=True, mean_old=old.mean)
    torch.testing.assert_close(out.loss, -adv.mean() / 0.1, rtol=1e-4, atol=1e-4)


def test_mask_excludes_samples():
    old, new, _ = _steps()
    adv = torch.tensor([1.0, -0.5, 2.0, 100.0])
    mask = torch.tensor([True, True, True, False])
    out = grpo_step_loss(new, old.log_prob(), adv, clip_range=1e-4, mask=mask)
    torch.testing.assert_close(out.loss, -adv[:3].mean())


def test_gradient_pushes_mean_towards_positive_advantage_sample():
    # loss = -A rho, and d logp / dv = -(Delta c / (D s^2)) (x' - mu) with c > 0, so grad_v loss is a
    # positive multiple of (x' - mu) for A > 0: descent moves the mean towards the rewarded sample.
    old, new, v_new = _steps(seed=2)
    adv = torch.tensor([1.0, 0.0, 0.0, 0.0])
    grpo_step_loss(new, old.log_prob(), adv, clip_range=10.0).loss.backward()
    direction = (old.prev_sample[0] - new.mean[0]).detach()
    factor = v_new.grad[0] / direction
    assert torch.all(factor > 0)
    torch.testing.assert_close(factor, factor.mean().expand_as(factor), rtol=1e-3, atol=0)
    assert torch.all(v_new.grad[1:] == 0)


def test_f_divergence_weights_the_reference_regulariser():
    """grpo.kl_divergence: the per-sample KL to the reference is weighted by the detached, batch-normalised
    h(r) of the exact transition ratio r = p_ref(x') / p_theta(x') (docs/math.md §6 (a)); reverse_kl is the plain KL."""
    from flowalign.algorithms.divergences import get_divergence
    from flowalign.algorithms.fdistill import transition_log_ratio

    old, new, _ = _steps(shift=0.3)
    ref = old
    adv = torch.zeros(4)
    plain = grpo_step_loss(new, old.log_prob(), adv, clip_range=1e-4, beta=0.04, ref_step=ref)
    same = grpo_step_loss(new, old.log_prob(), adv, clip_range=1e-4, beta=0.04, ref_step=ref, divergence="reverse_kl")
    torch.testing.assert_close(same.loss, plain.loss)
    js = grpo_step_loss(new, old.log_prob(), adv, clip_range=1e-4, beta=0.04, ref_step=ref, divergence="js")
    h = get_divergence("js").log_h(transition_log_ratio(new, ref).double()).exp().float()
    w = h / h.mean()
    torch.testing.assert_close(js.loss, 0.04 * (w * new.kl(ref)).mean().detach(), rtol=1e-4, atol=1e-6)
    assert not torch.allclose(w, torch.ones(4))  # the weights are not trivially 1 here


def test_guard_batch_bias_averages_b_over_the_batch():
    from flowalign.algorithms.grpo import guard_log_ratio

    old, new, _ = _steps(seed=4, shift=0.5)
    s = new.std.reshape(-1)
    b = ((new.mean - old.mean) ** 2).flatten(1).mean(1) / (2 * s**2)
    per_sample = guard_log_ratio(new, old.log_prob(), old.mean)
    batch = guard_log_ratio(new, old.log_prob(), old.mean, bias="batch")
    torch.testing.assert_close(batch - per_sample, (b.mean() - b) * s)


def test_step_columns_first_and_random():
    from flowalign.algorithms.grpo import step_columns

    pool = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]
    assert step_columns(pool, 0.99, "first", 4, None) == list(range(9))  # Flow-GRPO: int(10 x 0.99) = 9 steps
    assert step_columns(pool[:1], 0.5, "first", 4, None) == [0]  # at least one
    g = torch.Generator().manual_seed(0)
    cols = step_columns(list(range(15)), 0.6, "random", 50, g)  # DanceGRPO: int(15 x 0.6) = 9 of 15 per sample
    chosen = torch.stack(cols, dim=1)
    assert chosen.shape == (50, 9)
    assert all(len(set(r.tolist())) == 9 and set(r.tolist()) <= set(range(15)) for r in chosen)
    assert len({frozenset(r.tolist()) for r in chosen}) > 40  # each sample its own subset


def test_rows_without_advantage_carry_no_gradient_so_skipping_them_drops_no_signal():
    """The update skips rows whose advantage is exactly 0 (GRPOUpdate.update, as flow_grpo filters them): off policy
    (ratio != 1) their clipped surrogate and its gradient are exactly 0, so the summed loss and the gradient of the
    kept rows equal those of the whole batch; with a KL term (beta > 0) they do carry one, and are kept."""
    old, new, v_new = _steps(seed=3, shift=0.3)
    adv = torch.tensor([1.5, 0.0, -0.7, 0.0])
    keep = adv != 0
    n = len(adv)  # 4 rows, 2 kept: the mean's 1/n and the test's x n are powers of two, so the comparison is exact
    (grpo_step_loss(new, old.log_prob(), adv, clip_range=0.2).loss * n).backward(retain_graph=True)  # all rows
    grad_all = v_new.grad.clone()
    v_new.grad = None
    (grpo_step_loss(new, old.log_prob(), adv, clip_range=0.2, mask=keep).loss * keep.sum()).backward(retain_graph=True)
    assert torch.equal(v_new.grad, grad_all) and torch.all(grad_all[~keep] == 0)
    v_new.grad = None
    grpo_step_loss(new, old.log_prob(), adv, clip_range=0.2, beta=0.04, ref_step=old).loss.backward()
    assert torch.all(v_new.grad[~keep].abs().sum(dim=(1, 2, 3)) > 0)  # the KL term: no skipping with beta > 0
