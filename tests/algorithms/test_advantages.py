"""Group advantages (docs/math.md §2): A_i = (R_i - mean_group R) / max(std + eps, floor), std per group or global, clip
+-5; the reference variants (global mean, unbiased std, eps, floor)."""

import pytest
import torch

from flowalign.algorithms.advantages import group_advantages, group_ids_from_prompts


def test_group_std_matches_formula():
    r = torch.tensor([1.0, 2.0, 3.0, 10.0, 10.0, 13.0])
    ids = torch.tensor([0, 0, 0, 1, 1, 1])
    a = group_advantages(r, ids, std_mode="group", clip=None)
    g0, g1 = r[:3], r[3:]
    expected = torch.cat([(g0 - g0.mean()) / (g0.std(unbiased=False) + 1e-4), (g1 - g1.mean()) / (g1.std(unbiased=False) + 1e-4)])
    torch.testing.assert_close(a, expected)


def test_global_std_uses_the_whole_batch():
    r = torch.tensor([1.0, 2.0, 3.0, 10.0, 10.0, 13.0])
    ids = torch.tensor([0, 0, 0, 1, 1, 1])
    a = group_advantages(r, ids, std_mode="global", clip=None)
    centred = torch.cat([r[:3] - r[:3].mean(), r[3:] - r[3:].mean()])
    torch.testing.assert_close(a, centred / (r.std(unbiased=False) + 1e-4))


def test_invariant_to_a_per_group_constant_and_zero_mean_per_group():
    r = torch.randn(12)
    ids = torch.arange(3).repeat_interleave(4)
    shifted = r + torch.tensor([5.0, -3.0, 100.0]).repeat_interleave(4)
    a, b = group_advantages(r, ids, std_mode="group"), group_advantages(shifted, ids, std_mode="group")
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    for g in range(3):
        assert abs(a[ids == g].sum().item()) < 1e-4


def test_clip_and_invalid_samples():
    r = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 1.0, float("nan"), 0.5])
    ids = torch.tensor([0, 0, 0, 0, 0, 0, 0, 0])
    valid = torch.isfinite(r)
    a = group_advantages(r, ids, std_mode="group", clip=1.5, valid=valid)
    assert a[6] == 0 and torch.isfinite(a).all()
    assert a.max() == pytest.approx(1.5)
    # The NaN sample is left out of the statistics: same as scoring without it.
    ref = group_advantages(r[valid], ids[valid], std_mode="group", clip=1.5)
    torch.testing.assert_close(a[valid], ref)


def test_single_member_group_gets_zero():
    a = group_advantages(torch.tensor([3.0, 1.0, 2.0]), torch.tensor([0, 1, 1]), std_mode="group")
    assert a[0] == 0


def test_group_ids_from_prompts_in_order_of_first_appearance():
    ids = group_ids_from_prompts(["b", "a", "b", "c", "a"])
    assert ids.tolist() == [0, 1, 0, 2, 1]


R = torch.tensor([1.0, 2.0, 4.0, 10.0, 10.0, 13.0])
IDS = torch.tensor([0, 0, 0, 1, 1, 1])


def test_exact_zero_for_a_reward_equal_to_its_group_mean():
    # float64 statistics: a reward equal to its group's mean gets exactly 0 (no 1e-7 residue to train on). The
    # first group's float32 mean is not 1/3 (a float32 mean gave |A| ~ 1e-7 there); its float64 mean is.
    r = torch.tensor([1 / 3, 0.2, 0.6, 0.2, 0.3, 0.3, 0.3])
    assert r[:4].mean() != r[0] and r[:4].double().mean() == r[0].double()
    a = group_advantages(r, torch.tensor([0, 0, 0, 0, 1, 1, 1]))
    assert a[0] == 0 and (a[4:] == 0).all() and (a[1:4] != 0).all()


def test_global_mean_centres_on_the_batch():
    # Flow-GRPO with per-prompt stat tracking off: (R - batch mean) / (batch std + 1e-4)
    a = group_advantages(R, IDS, mean_mode="global", clip=None)
    torch.testing.assert_close(a.double(), (R.double() - R.double().mean()) / (R.double().std(unbiased=False) + 1e-4),
                               rtol=1e-6, atol=0)


def test_unbiased_std_and_eps_dancegrpo():
    # DanceGRPO: per-group unbiased std + 1e-8; VeRL-Omni: unbiased + 1e-4
    a = group_advantages(R, IDS, std_mode="group", estimator="unbiased", eps=1e-8, clip=None)
    g0 = R[:3].double()
    torch.testing.assert_close(a[:3].double(), (g0 - g0.mean()) / (g0.std(unbiased=True) + 1e-8), rtol=1e-6, atol=0)
    # with 3 members the unbiased std is sqrt(3/2) x the population std
    b = group_advantages(R, IDS, std_mode="group", estimator="population", eps=0.0, clip=None)
    torch.testing.assert_close(b[:3] / a[:3], torch.full((3,), 1.5**0.5), rtol=1e-6, atol=0)


def test_floor_without_eps_flow_factory():
    # Flow-Factory: (R - mean) / max(std, 1e-6), no epsilon: a near-constant group is scaled by 1e6, not 1e4
    r = torch.tensor([1.0, 1.0 + 2e-7, 1.0 - 2e-7, 0.0])
    ids = torch.tensor([0, 0, 0, 1])
    a = group_advantages(r, ids, std_mode="group", eps=0.0, floor=1e-6, clip=None)
    centred = r[:3].double() - r[:3].double().mean()
    torch.testing.assert_close(a[:3].double(), centred / 1e-6, rtol=1e-6, atol=0)
    # a constant group with eps = floor = 0 has advantage 0, not NaN
    z = group_advantages(torch.tensor([2.0, 2.0]), torch.tensor([0, 0]), std_mode="group", eps=0.0)
    assert torch.equal(z, torch.zeros(2))
