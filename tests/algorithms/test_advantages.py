"""Group advantages (SPEC §2): A_i = (R_i - mean_group R) / (std + 1e-4), std per group or global, clip +-5."""

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
