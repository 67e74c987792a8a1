"""Bad input raises ValueError naming the argument."""

import pytest
import torch

from flowalign.samplers import ddim_step, flow_cps_step, flow_ode_step, flow_sde_step

X = torch.randn(2, 3, 4, 4)


@pytest.mark.parametrize(
    "call,name",
    [
        (lambda: flow_sde_step(torch.randn(2, 3, 4, 5), X, 0.5, 0.4), "velocity"),
        (lambda: flow_sde_step(X, X, 0.5, 0.4, prev_sample=torch.randn(2, 3, 4)), "prev_sample"),
        (lambda: flow_sde_step(X, X, 0.4, 0.5), "sigma_next"),
        (lambda: flow_sde_step(X, X, 0.4, 0.4), "sigma_next"),
        (lambda: flow_ode_step(X, X, 1.5, 0.4), "sigma"),
        (lambda: flow_sde_step(X, X, torch.tensor([0.5, 0.5, 0.5]), 0.4), "sigma"),
        (lambda: flow_sde_step(X, X, 0.5, 0.4, noise_level=-0.1), "noise_level"),
        (lambda: flow_sde_step(X, X, 0.5, 0.4, noise_level=float("nan")), "noise_level"),
        (lambda: flow_cps_step(X, X, 0.5, 0.4, noise_level=1.5), "noise_level"),
        (lambda: flow_sde_step(X * float("nan"), X, 0.5, 0.4), "velocity"),
        (lambda: flow_sde_step(X, X * float("inf"), 0.5, 0.4), "sample"),
        (lambda: flow_ode_step(X, X, float("nan"), 0.4), "sigma"),
        (lambda: ddim_step(X, X, 0.5, 0.3, 0.0), "alpha_prod_prev"),
        (lambda: ddim_step(X, X, 0.3, 0.5, -1.0), "eta"),
        (lambda: ddim_step(X, X, 0.3, 0.5, 0.0, "sample"), "prediction_type"),
        (lambda: ddim_step(X[:1], X, 0.3, 0.5, 0.0), "model_output"),
    ],
)
def test_bad_input_names_the_argument(call, name):
    with pytest.raises(ValueError, match=rf"\b{name}\b"):
        call()
