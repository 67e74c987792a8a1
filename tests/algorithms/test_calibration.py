"""InfAlign-CTRL's calibration math (flowalign.algorithms.calibration): the empirical CDF with ties, its
transforms and the best-of-N win rate, on hand-computed arrays."""

import math

import pytest
import torch

from flowalign.algorithms.calibration import TRANSFORMS, best_of_n_win_rate, calibrate, transform


def test_calibrate_hand_computed_with_ties():
    base = torch.tensor([[1.0, 2.0, 2.0, 3.0]] * 5)
    scores = torch.tensor([0.5, 1.0, 2.0, 2.5, 3.0])
    # <= counts ties: 2.0 is at or above 1, 2, 2 -> 3/4; 3.0 at or above all four -> 1
    assert calibrate(scores, base).tolist() == [0.0, 0.25, 0.75, 0.75, 1.0]


def test_calibrate_nan_and_per_row_base():
    base = torch.tensor([[0.0, 1.0], [5.0, float("nan")], [float("nan"), float("nan")]])
    c = calibrate(torch.tensor([0.5, 5.0, 1.0]), base)
    assert c[0] == 0.5 and c[1] == 1.0 and math.isnan(c[2])  # NaN base samples leave the count and M
    c = calibrate(torch.tensor([float("nan"), 2.0, 1.0]), base)
    assert math.isnan(c[0]) and c[1] == 0.0
    with pytest.raises(ValueError, match="base must be"):
        calibrate(torch.zeros(3), torch.zeros(2, 4))


def test_calibrate_monotone_and_invariant_to_increasing_maps():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(1, 16, generator=g).expand(64, 16)
    scores = torch.linspace(-3, 3, 64)
    c = calibrate(scores, base)
    assert bool((c[1:] >= c[:-1]).all()) and c[0] == 0 and c[-1] == 1
    torch.testing.assert_close(calibrate(torch.exp(2 * scores), torch.exp(2 * base)), c)


def test_transforms():
    c = torch.tensor([0.0, 0.25, 1.0, float("nan")])
    assert transform(c, "identity")[:3].tolist() == [0.0, 0.25, 1.0]
    torch.testing.assert_close(transform(c, "exp", t=2.0)[:3], torch.exp(2.0 * c[:3]))
    torch.testing.assert_close(transform(c, "neg_exp", t=2.0)[:3], -torch.exp(-2.0 * c[:3]))
    m = 4  # log((M C + 1/2) / (M + 1)): finite at C = 0
    torch.testing.assert_close(transform(c, "log", m=m)[:3],
                               torch.tensor([math.log(0.5 / 5), math.log(1.5 / 5), math.log(4.5 / 5)]))
    grid = torch.linspace(0, 1, 9)
    for kind in TRANSFORMS:
        out = transform(c, kind, t=4.0, m=m)
        assert math.isnan(out[3])  # NaN stays NaN
        v = transform(grid, kind, t=4.0, m=8)
        assert bool((v[1:] > v[:-1]).all()), kind  # every transform is increasing in C
    with pytest.raises(ValueError, match="needs m"):
        transform(c, "log")
    with pytest.raises(ValueError, match="not valid"):
        transform(c, "square")


def test_best_of_n_win_rate_and_standard_error():
    aligned = torch.tensor([[1.0, 5.0], [2.0, 2.0], [0.0, 1.0], [3.0, 4.0]])
    base = torch.tensor([[4.0, 0.0], [1.0, 2.0], [3.0, 0.0], [4.0, 2.0]])
    # bests: 5 vs 4 win, 2 vs 2 tie, 1 vs 3 loss, 4 vs 4 tie -> w = [1, 1/2, 0, 1/2]
    rate, se = best_of_n_win_rate(aligned, base)
    assert rate == pytest.approx(0.5)
    w = torch.tensor([1.0, 0.5, 0.0, 0.5])
    assert se == pytest.approx(float(w.std(unbiased=False)) / 2.0)  # population std / sqrt(P)
    assert best_of_n_win_rate(torch.tensor([[1.0, float("nan")]]), torch.tensor([[0.5, 0.7]])) == (1.0, 0.0)
    rate, _ = best_of_n_win_rate(torch.tensor([[float("nan")], [2.0]]), torch.tensor([[1.0], [3.0]]))
    assert rate == 0.0  # the prompt without a finite aligned score is left out
    with pytest.raises(ValueError, match="one P"):
        best_of_n_win_rate(torch.zeros(2, 3), torch.zeros(3, 3))
