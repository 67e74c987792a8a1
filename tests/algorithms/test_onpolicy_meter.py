"""The on-policy keys every rule with a ratio logs (flowalign.algorithms.onpolicy)."""

import math

import torch

from flowalign.algorithms.onpolicy import OnPolicyMeter


def test_the_first_window_ends_at_the_first_optimizer_step():
    m = OnPolicyMeter(clip_range=0.1)
    m.add(torch.tensor([0.0, 0.0]))
    m.add(torch.tensor([0.0, math.log(1.05)], dtype=torch.float64))  # still before any step: part of the on-policy point
    m.step_taken()
    m.add(torch.tensor([math.log(2.0), math.log(0.5)], dtype=torch.float64))  # after a step: only in the iteration's statistics
    out = m.metrics()
    assert math.isclose(out["onpolicy_logp_gap"], math.log(1.05) / 4, rel_tol=1e-12)
    assert math.isclose(out["onpolicy_logp_gap_max"], math.log(1.05), rel_tol=1e-12)
    assert math.isclose(out["onpolicy_ratio_dev"], 0.05, rel_tol=1e-9)
    assert out["onpolicy_clip_frac"] == 0.0
    assert out["clip_frac"] == 2 / 6  # 2.0 and 0.5 leave [0.9, 1.1]
    assert math.isclose(out["ratio_max"], 2.0) and math.isclose(out["ratio_min"], 0.5)


def test_mask_and_no_clip():
    m = OnPolicyMeter()
    m.add(torch.tensor([0.5, 0.0]), mask=torch.tensor([False, True]))
    out = m.metrics()
    assert out["onpolicy_logp_gap"] == 0.0 and "clip_frac" not in out and "onpolicy_clip_frac" not in out
    assert OnPolicyMeter().metrics() == {}
