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
