"""An ODE rollout on the pipeline's own grid equals the pipeline's __call__ for the same generator."""

import pytest
import torch

from flowalign.rollout import rollout



@pytest.mark.parametrize(
    "family,builder_kw",
    [("sd3", {}), ("flux", {}), ("sd", {}), ("sd", {"prediction_type": "v_prediction"}), ("sdxl", {}), ("wan", {})],
)
def test_ode_rollout_equals_pipeline(family, builder_kw, gen, h):
    pipe, adapter = h.make_adapter(family, **builder_kw)
    g = 3.0
    out = pipe(h.PROMPTS, num_inference_steps=3, guidance_scale=g, generator=gen(0), output_type="latent",
               **h.CALL_KW[family])
    ref = out.frames if family == "wan" else out.images
    sampler = "ddim" if family in ("sd", "sdxl") else "flow_ode"
    traj = rollout(adapter, h.PROMPTS, num_steps=3, guidance_scale=g, sampler=sampler, noise_level=0.0,
                   generator=gen(0), **h.SIZE_KW.get(family, {}))
    final = adapter.pack(traj.final) if family == "flux" else traj.final
    assert final.shape == ref.shape
    assert not traj.stochastic.any() and torch.isnan(traj.log_probs).all()
    assert traj.latents.shape[1] == 4
    torch.testing.assert_close(final, ref.float(), atol=1e-5, rtol=1e-5)
    # and it is not trivially equal: the first state is pure noise, different from the output
    assert (traj.latents[:, 0] - traj.final).abs().max() > 0.1


def test_cfg_formula(gen, h):
    """predict = v_null + g (v_c - v_null), with v_null from the empty prompt."""
    _, adapter = h.make_adapter("sd3")
    x = adapter.prepare_latents(2, generator=gen(0))
    t = adapter.sampling_grid(4, x).timesteps[1]
    cond = adapter.encode_prompts(h.PROMPTS, 4.0)
    v_c = adapter.predict(x, t, cond, 1.0)
    v_null = adapter.predict(x, t, adapter.encode_prompts(["", ""], 1.0), 1.0)
    torch.testing.assert_close(adapter.predict(x, t, cond, 4.0), v_null + 4.0 * (v_c - v_null), atol=1e-5, rtol=1e-5)
    assert (v_c - v_null).abs().max() > 1e-3
    with pytest.raises(ValueError, match="encode_prompts"):
        adapter.predict(x, t, adapter.encode_prompts(h.PROMPTS, 1.0), 4.0)


def test_cfg_embeddings_are_built_once_per_conditioning(gen, h):
    """Conditioning.cfg_pair: the [2B] CFG embeddings of a batch are concatenated once and reused by every denoiser
    call (same tensor object), rebuilt when a tensor is replaced, and never cached when they carry a graph."""
    _, adapter = h.make_adapter("sd3")
    x = adapter.prepare_latents(2, generator=gen(0))
    t = adapter.sampling_grid(4, x).timesteps[1]
    cond = adapter.encode_prompts(h.PROMPTS, 4.0)
    pair = cond.cfg_pair()
    assert cond.cfg_pair() is pair  # one concatenation per batch
    for k in cond.cond:
        assert torch.equal(pair[k], torch.cat([cond.uncond[k], cond.cond[k]]))
    first = adapter.predict(x, t, cond, 4.0)
    assert torch.equal(adapter.predict(x, t, cond, 4.0), first) and cond.cfg_pair() is pair
    key = next(iter(cond.cond))
    cond.cond[key] = cond.cond[key] * 2  # a replaced tensor: the pair follows it
    assert torch.equal(cond.cfg_pair()[key][2:], cond.cond[key])
    cond.cond[key] = cond.cond[key].detach().requires_grad_(True)
    assert cond.cfg_pair()[key].requires_grad and cond.cfg_pair() is not cond.cfg_pair()


def test_sampling_grid_is_built_once_and_follows_the_scheduler(gen, h, monkeypatch):
    """FlowAdapter.sampling_grid copies the scheduler once per setting (not once per rollout), hands out fresh
    tensors, and rebuilds when the pipeline's scheduler or the step count changes."""
    pipe, adapter = h.make_adapter("sd3")
    x = adapter.prepare_latents(2, generator=gen(0))
    copies = []
    real = type(adapter)._scheduler_copy
    monkeypatch.setattr(type(adapter), "_scheduler_copy", lambda self: copies.append(1) or real(self))
    first = adapter.sampling_grid(4, x)
    first.sigmas[0] = -1.0  # a caller's edit stays its own
    again = adapter.sampling_grid(4, x)
    assert len(copies) == 1 and again.sigmas[0] == 1.0
    torch.testing.assert_close(again.timesteps, first.timesteps, rtol=0, atol=0)
    assert adapter.sampling_grid(6, x).timesteps.shape == (6,) and len(copies) == 2
    from diffusers import FlowMatchEulerDiscreteScheduler

    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config, shift=1.0)  # was 3
    shifted = adapter.sampling_grid(4, x)
    assert len(copies) == 3 and not torch.equal(shifted.sigmas, again.sigmas)


@pytest.mark.parametrize("family", ["sd3", "zimage"])  # zimage: a family with its own predict
def test_autocast_runs_the_denoiser_in_bf16_and_hands_back_float32(family, gen, h):
    """model.autocast=bfloat16: predict runs under torch.autocast (the output moves by bf16 rounding, not more) and
    returns float32, so the sampler math stays float32; off, the output is bit-identical to a plain call."""
    _, adapter = h.make_adapter(family)
    x = adapter.prepare_latents(2, generator=gen(0), **h.SIZE_KW.get(family, {}))
    t = adapter.sampling_grid(4, x).timesteps[1]
    cond = adapter.encode_prompts(h.PROMPTS, 1.0, **h.condition(family, 2))
    exact = adapter.predict(x, t, cond, 1.0)
    adapter.autocast = torch.bfloat16
    half = adapter.predict(x, t, cond, 1.0)
    adapter.autocast = None
    assert half.dtype == torch.float32 and torch.equal(adapter.predict(x, t, cond, 1.0), exact)
    err = (half - exact).abs().max() / exact.abs().max()
    assert 0 < err < 0.05  # bf16 keeps 8 bits of mantissa: a few 1e-3 relative, never the float32 result exactly


def test_attention_kernel_is_pinned_per_call(gen, h, monkeypatch):
    """model.attention=math: every predict runs scaled-dot-product attention under sdpa_kernel([MATH]); the math
    kernel gives the same prediction up to rounding; "default" leaves torch's choice alone."""
    import torch.nn.attention as attn

    _, adapter = h.make_adapter("sd3")
    x = adapter.prepare_latents(2, generator=gen(0))
    t = adapter.sampling_grid(4, x).timesteps[1]
    cond = adapter.encode_prompts(h.PROMPTS, 4.0)
    default = adapter.predict(x, t, cond, 4.0)
    seen = []
    real = attn.sdpa_kernel
    monkeypatch.setattr(attn, "sdpa_kernel", lambda backends, *a, **k: seen.append(list(backends)) or real(
        backends, *a, **k))
    adapter.attention = "math"
    torch.testing.assert_close(adapter.predict(x, t, cond, 4.0), default, rtol=1e-4, atol=1e-5)
    assert seen == [[attn.SDPBackend.MATH]]
    adapter.attention = "default"
    adapter.predict(x, t, cond, 4.0)
    assert len(seen) == 1
