"""One contract every sampler passes: shapes, dtypes, generator reproducibility, per-sample sigma."""

import pytest
import torch

from flowalign.samplers import (
    GaussianStep,
    ddim_step,
    flow_constant_noise_step,
    flow_cps_step,
    flow_dpm2_step,
    flow_ode_step,
    flow_sde_step,
)

# Each entry: (step(out, x, hi, lo, **kw), a per-sample "hi" and "lo" schedule value, stochastic?)
# For flow samplers hi/lo are sigma/sigma_next; for DDIM they are abar/abar_prev (less noisy = larger).
SAMPLERS = {
    "flow_sde": (lambda o, x, a, b, **kw: flow_sde_step(o, x, a, b, 0.7, **kw), (0.9, 0.6), (0.8, 0.5), True),
    "flow_constant_noise": (lambda o, x, a, b, **kw: flow_constant_noise_step(o, x, a, b, 0.3, **kw),
                            (0.9, 0.6), (0.8, 0.5), True),
    "flow_cps": (lambda o, x, a, b, **kw: flow_cps_step(o, x, a, b, 0.7, **kw), (0.9, 0.6), (0.8, 0.5), True),
    "flow_ode": (lambda o, x, a, b, **kw: flow_ode_step(o, x, a, b), (0.9, 0.6), (0.8, 0.5), False),
    # the multistep solver with a history: the previous prediction x0_hat = x (t' = 0.95)
    "flow_dpm2": (lambda o, x, a, b, **kw: flow_dpm2_step(o, x, a, b, prev_x0=x, prev_sigma=0.95), (0.9, 0.6),
                  (0.8, 0.5), False),
    "ddim_eta1": (lambda o, x, a, b, **kw: ddim_step(o, x, a, b, 1.0, **kw), (0.2, 0.5), (0.4, 0.7), True),
    "ddim_eta0": (lambda o, x, a, b, **kw: ddim_step(o, x, a, b, 0.0, **kw), (0.2, 0.5), (0.4, 0.7), False),
}
SHAPE = (2, 3, 4, 4)


def _inputs(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return torch.randn(SHAPE, generator=g).to(dtype), torch.randn(SHAPE, generator=g).to(dtype)


@pytest.fixture(params=list(SAMPLERS))
def sampler(request):
    return SAMPLERS[request.param]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_shapes_and_float32_outputs(sampler, dtype):
    fn, hi, lo, stochastic = sampler
    out, x = _inputs(dtype)
    step = fn(out, x, hi[0], lo[0], generator=torch.Generator().manual_seed(1))
    assert isinstance(step, GaussianStep)
    assert step.prev_sample.shape == step.mean.shape == SHAPE
    assert step.std.shape == (SHAPE[0], 1, 1, 1)
    assert step.prev_sample.dtype == step.mean.dtype == step.std.dtype == torch.float32
    assert step.deterministic != stochastic
    if stochastic:
        assert step.log_prob().shape == (SHAPE[0],)
        assert step.kl(step).shape == (SHAPE[0],)
    assert step.mean_matching(step).shape == (SHAPE[0],)


def test_generator_reproducibility(sampler):
    fn, hi, lo, stochastic = sampler
    out, x = _inputs()
    a = fn(out, x, hi[0], lo[0], generator=torch.Generator().manual_seed(1)).prev_sample
    b = fn(out, x, hi[0], lo[0], generator=torch.Generator().manual_seed(1)).prev_sample
    c = fn(out, x, hi[0], lo[0], generator=torch.Generator().manual_seed(2)).prev_sample
    assert torch.equal(a, b)
    assert torch.equal(a, c) != stochastic


def test_per_sample_schedule_equals_separate_calls(sampler):
    fn, hi, lo, _ = sampler
    out, x = _inputs()
    batched = fn(out, x, torch.tensor(hi), torch.tensor(lo))
    for i in range(2):
        single = fn(out[i : i + 1], x[i : i + 1], hi[i], lo[i], prev_sample=batched.prev_sample[i : i + 1])
        torch.testing.assert_close(single.mean, batched.mean[i : i + 1])
        torch.testing.assert_close(single.std, batched.std[i : i + 1])


def test_list_of_generators_draws_row_by_row(sampler):
    fn, hi, lo, stochastic = sampler
    out, x = _inputs()
    gens = [torch.Generator().manual_seed(10), torch.Generator().manual_seed(11)]
    batched = fn(out, x, hi[0], lo[0], generator=gens).prev_sample
    row1 = fn(out[1:], x[1:], hi[0], lo[0], generator=torch.Generator().manual_seed(11)).prev_sample
    torch.testing.assert_close(batched[1:], row1)


@pytest.mark.parametrize("name", [n for n, s in SAMPLERS.items() if s[3]])
def test_prev_sample_is_kept_when_given(name):
    fn, hi, lo, _ = SAMPLERS[name]
    out, x = _inputs()
    given = torch.randn(SHAPE)
    step = fn(out, x, hi[0], lo[0], prev_sample=given)
    assert torch.equal(step.prev_sample, given)
