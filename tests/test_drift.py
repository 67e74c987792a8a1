"""Drift monitor: z-scores in base stds (values built so the std is known exactly), the resolution floor,
directions, the reward condition, the significance guard and the window, NaN handling, a JSON round trip of the
state, and the report's metrics. Tests of the effect-size rule alone turn the guard off (significance=0) and pool
no window (window=1)."""

import json

import pytest
import torch

from flowalign.evaluation.drift import DriftMonitor, DriftReport, StatDistribution, compare_distributions
from flowalign.evaluation.image_stats import STATISTICS, image_statistics

NAN, INF = float("nan"), float("inf")


def test_distribution_is_population_std_of_finite_values():
    assert StatDistribution.from_values(torch.tensor([0.0, 2.0])) == StatDistribution(1.0, 1.0, 2)
    assert StatDistribution.from_values([0.0, NAN, 2.0, INF]) == StatDistribution(1.0, 1.0, 2)
    with pytest.raises(ValueError, match="no finite value"):
        StatDistribution.from_values([NAN])


def test_same_values_give_zero_and_a_two_std_shift_gives_two():
    v = torch.rand(64, generator=torch.Generator().manual_seed(0))
    m = DriftMonitor().fit({"saturation": v})
    assert m.fitted and m.z_scores({"saturation": v}) == {"saturation": 0.0}
    m = DriftMonitor().fit({"x": torch.tensor([0.0, 2.0])})  # mean 1, population std 1
    assert m.z_scores({"x": torch.tensor([2.0, 4.0])}) == {"x": 2.0}
    assert m.z_scores({"x": [-1.0], "not_fitted": [5.0]}) == {"x": -2.0}  # stats of one side only are skipped


def test_resolution_floors_the_std():
    m = DriftMonitor().fit({"dark_fraction": torch.zeros(16), "other": torch.zeros(4)})  # base std 0
    z = m.z_scores({"dark_fraction": [0.03], "other": [0.03]})
    assert z["dark_fraction"] == 0.03 / STATISTICS["dark_fraction"].resolution
    assert z["other"] == 0.03 / 0.01  # not in STATISTICS: 0.01
    m = DriftMonitor(resolution={"dark_fraction": 0.25}).fit({"dark_fraction": torch.zeros(16)})
    assert m.z_scores({"dark_fraction": [0.5]}) == {"dark_fraction": 2.0}
    wide = DriftMonitor(resolution={"x": 0.5}).fit({"x": [0.0, 2.0]})  # a std above the floor is kept
    assert wide.z_scores({"x": [3.0]}) == {"x": 2.0}


def test_directions_and_order_of_flags():
    base = {k: [0.0, 2.0] for k in ("up", "down", "both", "quiet")}
    m = DriftMonitor(threshold=1.5, directions={"up": 1, "down": -1}, window=1, significance=0).fit(base, reward=0.0)
    r = m.update({"up": [-1.0], "down": [3.0], "both": [3.0], "quiet": [2.0]}, reward=1.0)  # z -2, 2, 2, 1
    assert r.flagged == ["both"]
    r = m.update({"up": [4.0], "down": [-5.0], "both": [-1.0], "quiet": [0.0]}, reward=1.0)  # z 3, -6, -2, -1
    assert r.flagged == ["down", "up", "both"]  # largest |z| first
    with pytest.raises(ValueError, match="direction of 'x' must be"):
        DriftMonitor(directions={"x": 2})
    with pytest.raises(ValueError, match="threshold must be > 0"):
        DriftMonitor(threshold=0)


def test_flag_needs_the_reward_window_to_rise():
    m = DriftMonitor(threshold=1.0, window=2, significance=0).fit({"x": [0.0, 2.0]}, reward=0.5)
    far = {"x": [4.0]}  # z = 3
    r = m.update(far, reward=0.25)
    assert r.flagged == ["x"] and not r.reward_rose and not r.flag
    r = m.update(far, reward=1.0)  # window [0.25, 1.0]: mean 0.625 > 0.5
    assert r.reward_rose and r.flag
    r = m.update(far, reward=0.75)  # window [1.0, 0.75] (0.25 left it)
    assert r.flag
    r = m.update(far, reward=0.25)  # window [0.75, 0.25]: mean 0.5, not above
    assert not r.reward_rose and not r.flag
    assert not m.update(far, reward=None).flag  # no reward this time
    assert not m.update(far, reward=NAN).reward_rose and m.rewards == [0.75, 0.25]  # NaN not kept
    no_base = DriftMonitor(significance=0).fit({"x": [0.0, 2.0]})  # no base reward
    assert not no_base.update(far, reward=10.0).reward_rose
    near = DriftMonitor(threshold=1.0, window=1, significance=0).fit({"x": [0.0, 2.0]}, reward=0.5).update(
        {"x": [1.5]}, reward=5.0)  # z = 0.5
    assert near.reward_rose and near.flagged == [] and not near.flag


def test_non_finite_values_are_dropped():
    m = DriftMonitor().fit({"x": [0.0, NAN, 2.0], "all_nan": [NAN, NAN]})
    assert set(m.base) == {"x"}
    assert m.z_scores({"x": torch.tensor([2.0, NAN, 4.0, -INF])}) == {"x": 2.0}
    assert m.z_scores({"x": [NAN]}) == {}
    with pytest.raises(RuntimeError, match="call fit"):
        DriftMonitor().update({"x": [1.0]}, reward=1.0)


def test_state_dict_survives_json():
    g = torch.Generator().manual_seed(3)
    base = {"dark_fraction": torch.rand(32, generator=g), "edge_density": torch.rand(32, generator=g) / 7}
    current = {k: v + 0.1 * torch.rand(32, generator=g) for k, v in base.items()}
    m = DriftMonitor(threshold=0.7, resolution={"edge_density": 0.003}, directions={"dark_fraction": 1},
                     window=3).fit(base, reward=0.3)
    m.update(current, reward=0.1)
    m.update(current, reward=0.7)
    state = json.loads(json.dumps(m.state_dict()))
    restored = DriftMonitor()
    restored.load_state_dict(state)
    assert restored.state_dict() == m.state_dict()
    assert restored.z_scores(current) == m.z_scores(current)
    assert restored.update(current, reward=0.2) == m.update(current, reward=0.2)
    with pytest.raises(KeyError, match="missing 'base'"):
        DriftMonitor().load_state_dict({"threshold": 1.0, "window": 5})


def test_metrics_and_summary():
    m = DriftMonitor(threshold=1.0, window=1, significance=0).fit(
        {"dark_fraction": [0.0, 2.0], "edge_density": [0.0, 2.0], "saturation": [0.0, 2.0]}, reward=0.0)
    r = m.update({"dark_fraction": [4.0], "edge_density": [-0.5], "saturation": [1.0 + 1 / 3]}, reward=1.0)
    assert r.metrics() == {"drift_z/dark_fraction": 3.0, "drift_z/edge_density": -1.5, "drift_z/saturation": 0.3333,
                           "drift": 1, "drift_stats": "dark_fraction,edge_density"}
    assert r.summary() == "dark_fraction +3.0 sd, edge_density -1.5 sd while the reward rose"
    quiet = m.update({"dark_fraction": [4.0]}, reward=-1.0)  # flagged, but the reward did not rise
    assert quiet.metrics()["drift"] == 0 and quiet.metrics()["drift_stats"] == "dark_fraction"
    assert quiet.summary() == ""
    none = DriftReport(z={})
    assert none.metrics() == {"drift": 0, "drift_stats": ""} and none.summary() == ""


def test_compare_distributions_on_images():
    g = torch.Generator().manual_seed(4)
    base_images = 0.2 + 0.8 * torch.rand(8, 3, 16, 16, generator=g)  # luma >= 0.2: no dark pixels
    dark = base_images.clone()
    dark[:, :, :8] = 0.0  # the aligned model blacks out the top half
    base, current = image_statistics(base_images), image_statistics(dark)
    r = compare_distributions(base, current, threshold=2.0, reward_rose=True)
    assert r.z["dark_fraction"] == 0.5 / STATISTICS["dark_fraction"].resolution  # base all 0: the floor
    assert "dark_fraction" in r.flagged and r.flag
    assert not compare_distributions(base, current, threshold=2.0).flag  # reward_rose defaults to False
    assert compare_distributions(base, base).flagged == []


def test_the_significance_guard_needs_the_move_to_beat_chance():
    # base: 4 items, mean 1, std 1; a move of 1.5 std on 4 items has t = 1.5 / sqrt(1/4 + 1/4) = 2.12
    base = {"x": [0.0, 0.0, 2.0, 2.0]}
    now = {"x": [1.5, 1.5, 3.5, 3.5]}
    assert DriftMonitor(threshold=1.0, significance=2.0, window=1).fit(base, 0.0).update(now, 1.0).flagged == ["x"]
    assert DriftMonitor(threshold=1.0, significance=2.2, window=1).fit(base, 0.0).update(now, 1.0).flagged == []
    m = DriftMonitor(threshold=1.0, significance=2.0, window=1).fit(base, 0.0, units=1)  # the 4 items are 1 unit
    t = m.t_scores(now, units=1)["x"]
    assert t == pytest.approx(1.5 / (2 ** 0.5)) and m.update(now, 1.0, units=1).flagged == []


def test_the_window_pools_the_last_batches():
    m = DriftMonitor(threshold=1.0, significance=0, window=2).fit({"x": [0.0, 2.0]}, reward=0.0)
    assert m.update({"x": [4.0]}, 1.0).z == {"x": 3.0}
    assert m.update({"x": [0.0]}, 1.0).z == {"x": 1.0}  # mean of 4 and 0
    assert m.update({"x": [2.0]}, 1.0).z == {"x": 0.0}  # the 4 left the window: mean of 0 and 2
    assert [u for _, u in m.batches] == [None, None] and m.rewards == [1.0, 1.0]


def test_a_move_below_the_resolution_is_not_flagged():
    m = DriftMonitor(threshold=0.5, significance=0, window=1).fit({"dark_fraction": torch.zeros(64)}, 0.0)
    r = m.update({"dark_fraction": torch.full((64,), 0.006)}, 1.0)  # z = 0.6 past 0.5, but 0.006 < 0.01
    assert r.z["dark_fraction"] == pytest.approx(0.6) and r.flagged == []
