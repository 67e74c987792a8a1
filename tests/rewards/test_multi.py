"""Multi-reward: weighted sum after per-reward normalisation; every component logged."""

import pytest
import torch

from flowalign.rewards import Reward, get


class Fixed(Reward):
    def __init__(self, values, name):
        self.values, self.name = torch.tensor(values), name

    def score(self, images, prompts, metadata=None):
        return self.values[: len(prompts)]


X = torch.zeros(3, 3, 4, 4)
P = ["a", "b", "c"]


def test_weighted_sum_and_components():
    m = get("multi", rewards={"a": Fixed([1.0, 2.0, 3.0], "a"), "b": Fixed([10.0, 0.0, 5.0], "b")},
            weights={"a": 2.0, "b": -0.5})
    total = m(X, P)
    torch.testing.assert_close(total, torch.tensor([2 - 5.0, 4 - 0.0, 6 - 2.5]))
    assert set(m.last_components) == {"a", "b"}
    torch.testing.assert_close(m.last_components["b"], torch.tensor([10.0, 0.0, 5.0]))


def test_zscore_within_batch():
    m = get("multi", rewards={"a": Fixed([1.0, 2.0, 3.0], "a"), "b": Fixed([100.0, 300.0, 200.0], "b")},
            normalize="zscore")
    total = m(X, P)
    za = torch.tensor([-1.0, 0.0, 1.0]) / torch.tensor([1.0, 2.0, 3.0]).std(unbiased=False)
    zb = torch.tensor([-1.0, 1.0, 0.0]) / torch.tensor([100.0, 300.0, 200.0]).std(unbiased=False) * 100
    torch.testing.assert_close(total, za + zb, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(m.last_normalized["a"], za, rtol=1e-4, atol=1e-5)
    assert m.last_normalized["b"].std(unbiased=False).item() == pytest.approx(1.0, abs=1e-4)


def test_fixed_scale_and_offset():
    m = get("multi", rewards={"a": Fixed([1.0, 2.0, 3.0], "a"), "b": Fixed([10.0, 0.0, 5.0], "b")},
            normalize="scale", scales={"a": (1.0, 2.0), "b": 10.0}, weights={"b": 3.0})
    torch.testing.assert_close(m(X, P), torch.tensor([0.0, 0.5, 1.0]) + 3 * torch.tensor([1.0, 0.0, 0.5]))


def test_builds_by_name_and_alias(tmp_path):
    m = get("multi", rewards={"small": {"reward": "jpeg_compressibility", "quality": 10},
                              "jpeg_incompressibility": {}})
    s = m(torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)), ["x", "y"])
    torch.testing.assert_close(s, m.last_components["small"] + m.last_components["jpeg_incompressibility"])
    assert (m.last_components["small"] < 0).all()


def test_bad_options():
    with pytest.raises(ValueError, match="unknown rewards"):
        get("multi", rewards={"a": Fixed([1.0], "a")}, weights={"b": 1.0})
    with pytest.raises(ValueError, match="normalize must be"):
        get("multi", rewards={"a": Fixed([1.0], "a")}, normalize="rank")
    with pytest.raises(ValueError, match="unknown reward 'nope'"):
        get("multi", rewards={"nope": {}})
