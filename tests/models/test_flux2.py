"""FLUX.2 [klein] (Flux2KleinPipeline) and FLUX.2 [dev] (Flux2Pipeline): the adapters reproduce the pipelines'
__call__ (klein base with real CFG, klein step-distilled without, dev with its guidance embedding), the grid,
decoding, re-scoring, LoRA round trip and RL guidance (training: test_family_training)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import math

import numpy as np
import pytest
import torch

from flowalign import lora
from flowalign.models.flux2 import Flux2Adapter, Flux2KleinAdapter
from flowalign.rollout import rollout
from flowalign.toy.pipelines_flux2 import tiny_flux2_klein_pipeline, tiny_flux2_pipeline

PROMPTS = ["a red circle", "two blue squares above"]
# klein: the chat template's own tokens come after the prompt (truncation would cut only them); dev: the system
# message (~40 tokens) comes first, so its prompts need more room
SEQ = {"klein": 32, "klein_distilled": 32, "dev": 64}
SIZE_KW = dict(height=16, width=16)


def _make(variant="klein"):
    pipe = tiny_flux2_pipeline() if variant == "dev" else tiny_flux2_klein_pipeline(variant == "klein_distilled")
    pipe.set_progress_bar_config(disable=True)
    cls = Flux2Adapter if variant == "dev" else Flux2KleinAdapter
    return pipe, cls(pipe, max_sequence_length=SEQ[variant])


def _call(pipe, prompts=PROMPTS, steps=3, g=3.0, output_type="latent", **kw):
    # prompt= by name: Flux2KleinPipeline's first positional argument is the reference image
    seq = 64 if type(pipe).__name__ == "Flux2Pipeline" else 32
    return pipe(prompt=prompts, num_inference_steps=steps, guidance_scale=g, generator=torch.Generator().manual_seed(0),
                output_type=output_type, height=16, width=16, max_sequence_length=seq, **kw).images


def _as_pipeline_latents(adapter, z):
    """Our [B, 16, 4, 4] state as the pipeline returns it with output_type="latent": klein the VAE latents
    [B, 4, 8, 8] (batch norm undone, unpatchified), dev the packed tokens [B, 16, 16]."""
    return adapter.pack(z) if adapter.family == "flux2" else adapter.vae_latents(z)


def _ode(adapter, g=3.0, steps=3):
    return rollout(adapter, PROMPTS, num_steps=steps, guidance_scale=g, sampler="flow_ode", noise_level=0.0,
                   generator=torch.Generator().manual_seed(0), **SIZE_KW)


@pytest.mark.parametrize("variant", ["klein", "klein_distilled", "dev"])
def test_ode_rollout_equals_pipeline(variant):
    pipe, adapter = _make(variant)
    ref = _call(pipe)
    traj = _ode(adapter)
    assert traj.final.shape == (2, 16, 4, 4) and ref.shape == ((2, 16, 16) if variant == "dev" else (2, 4, 8, 8))
    assert not traj.stochastic.any() and torch.isnan(traj.log_probs).all()
    torch.testing.assert_close(_as_pipeline_latents(adapter, traj.final), ref.float(), atol=1e-5, rtol=1e-5)
    assert (traj.latents[:, 0] - traj.final).abs().max() > 0.1
    # klein base: g = 3 (CFG) differs from g = 1 (one branch); klein distilled ignores g; dev embeds it
    plain = _ode(adapter, g=1.0).final
    if variant == "klein_distilled":
        assert torch.equal(plain, traj.final)
    else:
        assert (plain - traj.final).abs().max() > 1e-3
        torch.testing.assert_close(_as_pipeline_latents(adapter, plain), _call(pipe, g=1.0), atol=1e-5, rtol=1e-5)


def test_cfg_formula_and_text_embedding():
    pipe, adapter = _make()
    x = adapter.prepare_latents(2, generator=torch.Generator().manual_seed(0), **SIZE_KW)
    t = adapter.sampling_grid(4, x).timesteps[1]
    cond = adapter.encode_prompts(PROMPTS, 4.0)
    emb = cond.cond["encoder_hidden_states"]
    assert emb.shape == (2, 32, 48) and cond.uncond["encoder_hidden_states"].shape == (2, 32, 48)
    # the embedding = hidden states 9, 18, 27 of the Qwen3 encoder, concatenated per token
    ids = pipe.tokenizer(pipe.tokenizer.apply_chat_template([{"role": "user", "content": PROMPTS[0]}], tokenize=False,
                                                            add_generation_prompt=True, enable_thinking=False),
                         padding="max_length", max_length=32, truncation=True, return_tensors="pt")
    with torch.no_grad():
        hs = pipe.text_encoder(**ids, output_hidden_states=True, use_cache=False).hidden_states
    torch.testing.assert_close(emb[0], torch.cat([hs[9][0], hs[18][0], hs[27][0]], -1), atol=0, rtol=0)
    v_c = adapter.predict(x, t, cond, 1.0)
    v_null = adapter.predict(x, t, adapter.encode_prompts(["", ""], 1.0), 1.0)
    torch.testing.assert_close(adapter.predict(x, t, cond, 4.0), v_null + 4.0 * (v_c - v_null), atol=1e-5, rtol=1e-5)
    assert (v_c - v_null).abs().max() > 1e-3
    with pytest.raises(ValueError, match="encode_prompts"):
        adapter.predict(x, t, adapter.encode_prompts(PROMPTS, 1.0), 4.0)
    # the step-distilled model: no unconditional branch at any scale
    _, dist = _make("klein_distilled")
    c = dist.encode_prompts(PROMPTS, 4.0)
    assert c.uncond is None
    assert torch.equal(dist.predict(x, t, c, 4.0), dist.predict(x, t, c, 1.0))


def test_dev_guidance_embedding_and_system_message():
    pipe, adapter = _make("dev")
    x = adapter.prepare_latents(2, generator=torch.Generator().manual_seed(0), **SIZE_KW)
    t = adapter.sampling_grid(3, x).timesteps[1]
    cond = adapter.encode_prompts(PROMPTS, 4.0)
    assert cond.uncond is None  # guidance-distilled: no unconditional branch
    assert (adapter.predict(x, t, cond, 4.0) - adapter.predict(x, t, cond, 1.0)).abs().max() > 1e-3
    # the prompt sits after the system message, inside max_sequence_length: the two prompts' embeddings differ
    emb = cond.cond["encoder_hidden_states"]
    assert emb.shape == (2, 64, 48) and (emb[0] - emb[1]).abs().max() > 1e-3
    ref, _ = pipe.encode_prompt(prompt=PROMPTS[:1], max_sequence_length=64)
    torch.testing.assert_close(emb[:1], ref, atol=0, rtol=0)


def test_grid_uses_the_empirical_mu():
    _, adapter = _make()
    x = adapter.prepare_latents(1, **SIZE_KW)
    for n in (2, 5):
        grid = adapter.sampling_grid(n, x)
        seq = 16  # 4 x 4 tokens
        a1, b1, a2, b2 = 8.73809524e-05, 1.89833333, 0.00016927, 0.45666666
        m200, m10 = a2 * seq + b2, a1 * seq + b1
        mu = (m200 - m10) / 190.0 * n + m200 - 200.0 * (m200 - m10) / 190.0
        s = np.linspace(1.0, 1 / n, n)
        shifted = math.exp(mu) / (math.exp(mu) + (1 / s - 1))  # exponential time shift
        torch.testing.assert_close(grid.sigmas, torch.tensor([*shifted, 0.0], dtype=torch.float32))
        torch.testing.assert_close(grid.timesteps, torch.tensor(shifted * 1000, dtype=torch.float32))


@pytest.mark.parametrize("variant", ["klein", "dev"])
def test_decode_matches_pipeline_images(variant):
    pipe, adapter = _make(variant)
    img = _call(pipe, steps=2, output_type="pt")
    traj = _ode(adapter, steps=2)
    with torch.no_grad():
        out = adapter.decode(traj.final)
    assert out.shape == (2, 3, 16, 16) and 0 <= float(out.min()) <= float(out.max()) <= 1
    torch.testing.assert_close(out, img.float(), atol=1e-5, rtol=1e-5)
    # the batch-norm statistics matter (the builder sets non-trivial ones)
    assert pipe.vae.bn.running_mean.abs().max() > 0.1 and (pipe.vae.bn.running_var - 1).abs().max() > 0.1


@pytest.mark.parametrize("variant", ["klein", "dev"])
def test_family_contract_fsdp_blocks_and_errors(variant):
    from flowalign.runtime import fsdp

    pipe, ad = _make(variant)
    names = [n for n, _ in ad.denoiser.named_modules()]
    for target in ad.lora_target_modules:
        assert any(n == target or n.endswith("." + target) for n in names), target
    assert len(fsdp.blocks(ad.denoiser, ad.fsdp_blocks)) == 2
    params = lora.add_lora(ad, rank=2)
    assert params and all(p.requires_grad for p in params)
    x = ad.prepare_latents(1, generator=torch.Generator().manual_seed(0), **SIZE_KW)
    grid = ad.sampling_grid(2, x)
    out = ad.predict(x, grid.timesteps[:1], ad.encode_prompts(["a red circle"], 1.0), 1.0)
    assert out.dtype == torch.float32 and out.shape == x.shape == (1, 16, 4, 4) and torch.isfinite(out).all()
    assert ad.pack(x).shape == (1, 16, 16)
    with pytest.raises(ValueError, match="divisible by 4"):
        ad.prepare_latents(1, height=18, width=16)
    with pytest.raises(ValueError, match="text only"):
        ad.encode_prompts(["a red circle"], images=[torch.zeros(3, 16, 16)])
    with pytest.raises(ValueError, match="text_encoder_out_layers"):
        type(ad)(pipe, text_encoder_out_layers=(9, 18, 31))
    with pytest.raises(TypeError, match="wraps a"):
        (Flux2KleinAdapter if variant == "dev" else Flux2Adapter)(pipe)
    # fewer layers, passed to the pipeline and the adapter alike
    short = type(ad)(pipe, max_sequence_length=SEQ[variant], text_encoder_out_layers=(1, 2, 3))
    ref = _call(pipe, text_encoder_out_layers=(1, 2, 3))
    torch.testing.assert_close(_as_pipeline_latents(short, _ode(short).final), ref, atol=1e-5, rtol=1e-5)
    assert (ref - _call(pipe)).abs().max() > 1e-3  # other layers, another output


@pytest.mark.parametrize("variant", ["klein_distilled", "dev"])
def test_builder_round_trips_through_save_pretrained(variant, tmp_path):
    pipe, _ = _make(variant)
    pipe.save_pretrained(str(tmp_path))
    loaded = type(pipe).from_pretrained(str(tmp_path))
    loaded.set_progress_bar_config(disable=True)
    assert torch.equal(loaded.vae.bn.running_var, pipe.vae.bn.running_var)
    assert torch.equal(_call(loaded, steps=2), _call(pipe, steps=2))
