"""velocity_distance, the KL anchor shared by DiffusionNFT, CRD and reward backprop."""

import pytest
import torch

from flowalign.algorithms.distances import velocity_distance


def test_formula_reductions_and_stop_gradient():
    g = torch.Generator().manual_seed(0)
    v = torch.randn(3, 2, 4, generator=g, requires_grad=True)
    v_ref = torch.randn(3, 2, 4, generator=g, requires_grad=True)
    d = velocity_distance(v, v_ref)
    torch.testing.assert_close(d, ((v - v_ref) ** 2).mean((1, 2)))
    torch.testing.assert_close(velocity_distance(v, v_ref, "sum"), ((v - v_ref) ** 2).sum((1, 2)))
    d.sum().backward()
    torch.testing.assert_close(v.grad, 2 * (v - v_ref).detach() / 8)  # d/dv mean_d (v - v_ref)^2
    assert v_ref.grad is None  # the reference is a fixed target
    assert velocity_distance(v.bfloat16(), v_ref.bfloat16()).dtype == torch.float32


def test_bad_input():
    with pytest.raises(ValueError, match="must match"):
        velocity_distance(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="reduction must be one of"):
        velocity_distance(torch.zeros(2, 3), torch.zeros(2, 3), "max")
