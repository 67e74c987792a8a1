"""Z-Image (ZImagePipeline): the adapter reproduces the pipeline's __call__ (CFG, cfg_normalization,
cfg_truncation, the grid with and without dynamic shifting), the caption encoding, decoding, re-scoring, the LoRA
round trip and RL guidance (training: test_family_training)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from flowalign import lora
from flowalign.models.zimage import ZImageAdapter
from flowalign.rlg import disable_rlg, enable_rlg, rlg_scale
from flowalign.rollout import rollout
from flowalign.toy.pipelines_zimage import tiny_zimage_pipeline

PROMPTS = ["a red circle", "two blue squares above"]
SEQ = 32  # the chat template takes ~14 tokens: room for the prompts
SIZE_KW = dict(height=16, width=16)


def _make(dynamic_shift=False, **adapter_kw):
    pipe = tiny_zimage_pipeline(dynamic_shift=dynamic_shift)
    pipe.set_progress_bar_config(disable=True)
    return pipe, ZImageAdapter(pipe, max_sequence_length=SEQ, **adapter_kw)


def _call(pipe, prompts=PROMPTS, steps=3, g=4.0, output_type="latent", **kw):
    """pipe(...) at flowalign's guidance g (the pipeline's g - 1). The prompt list is copied: ZImagePipeline writes
    the chat-templated prompts back into the list it is given (a negative prompt list too)."""
    if isinstance(kw.get("negative_prompt"), list):
        kw["negative_prompt"] = list(kw["negative_prompt"])
    return pipe(prompt=list(prompts), num_inference_steps=steps,
                guidance_scale=ZImageAdapter.pipeline_guidance_scale(g), generator=torch.Generator().manual_seed(0),
                output_type=output_type, max_sequence_length=SEQ, **SIZE_KW, **kw).images


def _ode(adapter, g=4.0, steps=3):
    return rollout(adapter, PROMPTS, num_steps=steps, guidance_scale=g, sampler="flow_ode", noise_level=0.0,
                   generator=torch.Generator().manual_seed(0), **SIZE_KW)


def _nonzero(params, seed=1, scale=0.3):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(scale * torch.randn(p.shape, generator=gen))


class _Calls:
    """Transformer calls and their batch sizes."""

    def __init__(self, module):
        self.sizes = []
        module.register_forward_pre_hook(lambda m, args: self.sizes.append(len(args[0])))

    def take(self):
        sizes, self.sizes = self.sizes, []
        return sizes


# (adapter options, pipeline options): plain CFG, renormalised CFG, CFG switched off at the steps with
# (1000 - t) / 1000 > 0.1 (of t = 1000, 857, 600: the last two), a negative prompt
CFG_CASES = {
    "cfg": ({}, {}),
    "normalization": (dict(cfg_normalization=1.0), dict(cfg_normalization=True)),
    "truncation": (dict(cfg_truncation=0.1), dict(cfg_truncation=0.1)),
    "negative_prompt": (dict(negative_prompt="three stars"), dict(negative_prompt=["three stars"] * 2)),
}


@pytest.mark.parametrize("dynamic_shift", [False, True])
@pytest.mark.parametrize("case", list(CFG_CASES))
def test_ode_rollout_equals_pipeline(case, dynamic_shift):
    ad_kw, pipe_kw = CFG_CASES[case]
    pipe, adapter = _make(dynamic_shift, **ad_kw)
    calls = _Calls(pipe.transformer)
    ref = _call(pipe, **pipe_kw)
    assert ref.shape == (2, 4, 8, 8)
    # one [2B] call per CFG step, one [B] call per truncated step
    expected = [4, 2, 2] if case == "truncation" else [4, 4, 4]
    assert calls.take() == expected
    traj = _ode(adapter)
    assert calls.take() == expected
    assert not traj.stochastic.any() and torch.isnan(traj.log_probs).all()
    torch.testing.assert_close(traj.final, ref.float(), atol=1e-5, rtol=1e-5)
    assert (traj.latents[:, 0] - traj.final).abs().max() > 0.1
    if case != "cfg":  # the option changes the result
        plain = _ode(_make(dynamic_shift)[1]).final
        assert (plain - traj.final).abs().max() > 1e-3


@pytest.mark.parametrize("g", [1.0, 0.5])
def test_no_cfg_at_or_below_one(g):
    # flowalign's g = 1 is the pipeline's guidance_scale 0 (Z-Image-Turbo): the conditional model alone
    pipe, adapter = _make()
    calls = _Calls(pipe.transformer)
    ref = _call(pipe, g=g)
    assert calls.take() == [2, 2, 2]
    assert adapter.encode_prompts(PROMPTS, g).uncond is None
    traj = _ode(adapter, g=g)
    torch.testing.assert_close(traj.final, ref, atol=1e-5, rtol=1e-5)
    assert (traj.final - _ode(adapter, g=4.0).final).abs().max() > 1e-3


def test_caption_encoding_and_cfg_formulas():
    pipe, adapter = _make()
    x = adapter.prepare_latents(2, generator=torch.Generator().manual_seed(0), **SIZE_KW)
    assert x.dtype == torch.float32 and x.shape == (2, 4, 8, 8)
    t = adapter.sampling_grid(3, x).timesteps[1]
    cond = adapter.encode_prompts(PROMPTS, 4.0)
    emb, mask = cond.cond["encoder_hidden_states"], cond.cond["encoder_attention_mask"]
    assert emb.shape == (2, SEQ, 16) and mask.shape == (2, SEQ) and mask.dtype == torch.bool
    # the caption = hidden_states[-2] of Qwen3 on the chat-templated prompt, real tokens only, zero padding
    text = pipe.tokenizer.apply_chat_template([{"role": "user", "content": PROMPTS[1]}], tokenize=False,
                                              add_generation_prompt=True, enable_thinking=True)
    ids = pipe.tokenizer(text, padding="max_length", max_length=SEQ, truncation=True, return_tensors="pt")
    n = int(ids.attention_mask.sum())
    assert 10 < n < SEQ and int(mask[1].sum()) == n and int(mask[0].sum()) < n
    with torch.no_grad():
        hs = pipe.text_encoder(input_ids=ids.input_ids, attention_mask=ids.attention_mask.bool(),
                               output_hidden_states=True).hidden_states
    torch.testing.assert_close(emb[1, :n], hs[-2][0, :n], atol=0, rtol=0)
    assert (hs[-2][0, :n] - hs[-1][0, :n]).abs().max() > 1e-3  # the second-to-last layer, not the last
    assert torch.equal(emb[1, n:], torch.zeros_like(emb[1, n:]))
    ref = pipe.encode_prompt(list(PROMPTS), do_classifier_free_guidance=False, max_sequence_length=SEQ)[0]
    for i in range(2):
        torch.testing.assert_close(emb[i][mask[i]], ref[i], atol=1e-6, rtol=1e-6)
    # CFG: v = v_c + (g - 1) (v_c - v_null); the unconditional branch is the empty prompt
    v_c = adapter.predict(x, t, cond, 1.0)
    v_null = adapter.predict(x, t, adapter.encode_prompts(["", ""], 1.0), 1.0)
    v = adapter.predict(x, t, cond, 4.0)
    torch.testing.assert_close(v, v_c + 3.0 * (v_c - v_null), atol=1e-5, rtol=1e-5)
    assert (v_c - v_null).abs().max() > 1e-3
    unbatched = ZImageAdapter(pipe, max_sequence_length=SEQ)
    unbatched.cfg_batched = False  # two [B] calls
    torch.testing.assert_close(unbatched.predict(x, t, cond, 4.0), v, atol=1e-5, rtol=1e-5)
    # the velocity the scheduler steps with is minus the transformer's output, at timestep (1000 - t) / 1000
    with torch.no_grad():
        raw = pipe.transformer(list(x.unsqueeze(2).unbind(0)), (1000 - t.expand(2)) / 1000,
                               [e[m] for e, m in zip(emb, mask)], return_dict=False)[0]
    torch.testing.assert_close(v_c, -torch.stack(raw).squeeze(2), atol=0, rtol=0)
    with pytest.raises(ValueError, match="encode_prompts"):
        adapter.predict(x, t, adapter.encode_prompts(PROMPTS, 1.0), 4.0)
    # renormalisation: ||v|| capped at r ||v_c|| per sample (r = 0.5, 1: both rows capped; r = 100: none)
    norm_v, norm_c = torch.linalg.vector_norm(v.flatten(1), dim=1), torch.linalg.vector_norm(v_c.flatten(1), dim=1)
    assert (norm_v > norm_c).all() and (norm_v < 100 * norm_c).all()
    for r in (0.5, 1.0):
        out = ZImageAdapter(pipe, max_sequence_length=SEQ, cfg_normalization=r).predict(x, t, cond, 4.0)
        torch.testing.assert_close(out, v * (r * norm_c / norm_v).view(2, 1, 1, 1), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(torch.linalg.vector_norm(out.flatten(1), dim=1), r * norm_c)
    loose = ZImageAdapter(pipe, max_sequence_length=SEQ, cfg_normalization=100.0)
    assert torch.equal(loose.predict(x, t, cond, 4.0), v)
    # truncation by normalised time (1000 - t) / 1000, per row
    tt = torch.tensor([900.0, 100.0])  # normalised 0.1 and 0.9
    trunc = ZImageAdapter(pipe, max_sequence_length=SEQ, cfg_truncation=0.5)
    mixed = trunc.predict(x, tt, cond, 4.0)
    torch.testing.assert_close(mixed[0], adapter.predict(x, tt, cond, 4.0)[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mixed[1], adapter.predict(x, tt, cond, 1.0)[1], atol=1e-5, rtol=1e-5)
    assert torch.equal(trunc.predict(x, 100.0, cond, 4.0), adapter.predict(x, 100.0, cond, 1.0))


@pytest.mark.parametrize("dynamic_shift", [False, True])
def test_grid_linspace_sigmas_and_mu(dynamic_shift):
    import math

    _, adapter = _make(dynamic_shift)
    x = adapter.prepare_latents(1, height=32, width=16)  # [1, 4, 16, 8]: 8 x 4 = 32 image tokens
    for n in (2, 5):
        grid = adapter.sampling_grid(n, x)
        s = torch.linspace(1.0, 1 / n, n).double()
        if dynamic_shift:
            mu = 0.5 + (1.15 - 0.5) / (64 - 4) * (32 - 4)  # calculate_shift with base/max seq len 4 / 64
            assert adapter._shift_mu(x) == pytest.approx(mu)
            shifted = math.exp(mu) / (math.exp(mu) + (1 / s - 1))
        else:
            shifted = 3.0 * s / (1 + 2.0 * s)
        torch.testing.assert_close(grid.sigmas, torch.cat([shifted.float(), torch.zeros(1)]))
        torch.testing.assert_close(grid.timesteps, (shifted * 1000).float())


def test_decode_matches_pipeline_images():
    pipe, adapter = _make()
    img = _call(pipe, steps=2, output_type="pt")
    traj = _ode(adapter, steps=2)
    with torch.no_grad():
        out = adapter.decode(traj.final)
    assert out.shape == (2, 3, 16, 16) and 0 <= float(out.min()) <= float(out.max()) <= 1
    torch.testing.assert_close(out, img.float(), atol=1e-5, rtol=1e-5)
    assert pipe.vae.config.shift_factor != 0 and pipe.vae.config.scaling_factor != 1


def _rlg_pipe(tmp_path):
    _, src = _make()
    _nonzero(lora.add_lora(src, rank=4))
    lora.save_lora(src, str(tmp_path))
    pipe, _ = _make()
    calls = _Calls(pipe.transformer)
    base, base1 = _call(pipe, steps=2), _call(pipe, steps=1)
    pipe.load_lora_weights(str(tmp_path))
    theta, theta1 = _call(pipe, steps=2), _call(pipe, steps=1)
    assert (theta - base).abs().max() > 1e-2
    calls.take()
    return pipe, calls, (base, base1, theta, theta1)


def test_rlg_endpoints(tmp_path):
    # under CFG, one transformer call per step ([2B] rows); w in {0, 1}: one evaluation per call
    pipe, calls, (base, _, theta, _) = _rlg_pipe(tmp_path)
    enable_rlg(pipe, 1.0)
    assert torch.equal(_call(pipe, steps=2), theta) and calls.take() == [4, 4]
    enable_rlg(pipe, 0.0)
    assert torch.equal(_call(pipe, steps=2), base) and calls.take() == [4, 4]
    disable_rlg(pipe)
    assert rlg_scale(pipe) is None and torch.equal(_call(pipe, steps=2), theta)
    den = pipe.transformer
    assert len(den._forward_hooks) == 0 and len(den._forward_pre_hooks) == 1  # only the counter


def test_rlg_linear_mix(tmp_path):
    pipe, calls, (base, base1, theta, theta1) = _rlg_pipe(tmp_path)
    enable_rlg(pipe, 0.5)
    mix1 = _call(pipe, steps=1)
    assert calls.take() == [4, 4]  # base and fine-tuned evaluation
    torch.testing.assert_close(mix1, base1 + 0.5 * (theta1 - base1), atol=1e-4, rtol=1e-4)
    assert (mix1 - base1).abs().max() > 1e-3 and (mix1 - theta1).abs().max() > 1e-3


def test_rlg_zero_init_step(tmp_path):
    """zero_init_step=1 at w=0 is the pipeline with its LoRA switched off after step 0: the transformer's rising
    timestep input ((1000 - t) / 1000) is counted as steps, and the count restarts with each call."""
    pipe, calls, (base, _, theta, _) = _rlg_pipe(tmp_path)

    def lora_off_after_first(p, i, t, kw):
        if i == 0:
            p.disable_lora()
        return kw

    expected = _call(pipe, steps=2, callback_on_step_end=lora_off_after_first)
    pipe.enable_lora()
    enable_rlg(pipe, 0.0, zero_init_step=1)  # step 0 fine-tuned, step 1 base
    out = _call(pipe, steps=2)
    assert torch.equal(out, expected)
    assert (out - theta).abs().max() > 1e-4 and (out - base).abs().max() > 1e-4
    assert torch.equal(_call(pipe, steps=2), expected)


def test_family_contract_fsdp_blocks_and_errors():
    from flowalign.runtime import fsdp

    pipe, ad = _make()
    names = [n for n, _ in ad.denoiser.named_modules()]
    for target in ad.lora_target_modules:
        assert any(n == target or n.endswith("." + target) for n in names), target
    assert len(fsdp.blocks(ad.denoiser, ad.fsdp_blocks)) == 3
    params = lora.add_lora(ad, rank=2)
    assert params and all(p.requires_grad for p in params)
    # LoRA on the main layers and both refiners
    assert {n.split(".")[0] for n, _ in ad.denoiser.named_parameters() if "lora_" in n} == set(ad.fsdp_blocks)
    x = ad.prepare_latents(1, generator=torch.Generator().manual_seed(0), **SIZE_KW)
    grid = ad.sampling_grid(2, x)
    out = ad.predict(x, grid.timesteps[:1], ad.encode_prompts(["a red circle"], 1.0), 1.0)
    assert out.dtype == torch.float32 and out.shape == x.shape == (1, 4, 8, 8) and torch.isfinite(out).all()
    with torch.no_grad():
        img = ad.decode(x)
    assert img.shape == (1, 3, 16, 16) and 0 <= float(img.min()) <= float(img.max()) <= 1
    assert ad.latent_shape(1, None, None) == (1, 4, 512, 512)  # the pipeline's default 1024 x 1024, VAE factor 2
    with pytest.raises(ValueError, match="divisible by 4"):
        ad.prepare_latents(1, height=18, width=16)
    with pytest.raises(ValueError, match="text only"):
        ad.encode_prompts(["a red circle"], images=[torch.zeros(3, 16, 16)])
    with pytest.raises(ValueError, match="cfg_normalization"):
        ZImageAdapter(pipe, cfg_normalization=-1.0)
    with pytest.raises(TypeError, match="wraps a"):
        from flowalign.models.flux import FluxAdapter

        FluxAdapter(pipe)


def test_builder_round_trips_through_save_pretrained(tmp_path):
    from diffusers import ZImagePipeline

    pipe, _ = _make(dynamic_shift=True)
    pipe.save_pretrained(str(tmp_path))
    loaded = ZImagePipeline.from_pretrained(str(tmp_path))
    loaded.set_progress_bar_config(disable=True)
    assert loaded.tokenizer.chat_template == pipe.tokenizer.chat_template
    assert torch.equal(_call(loaded, steps=2), _call(pipe, steps=2))
