"""Flow-NRG (flowalign.nrg, arXiv 2501.13918): the guidance term is the autograd gradient, weight 0 is bit-exact,
one denoising step moves the latents by exactly g, guidance raises (and a negative weight lowers) the tiny CLIP's
clip_score on the shipped pipeline, composition with RL guidance in either order, the adapter path, clear errors."""

import math

import pytest
import torch

import flowalign
from flowalign import lora, rewards
from flowalign.models import adapter_for, pipeline_call_kwargs
from flowalign.nrg import NRGTerm, disable_nrg, enable_nrg, guidance, guided, guided_velocity, nrg_weights
from flowalign.rewards import Reward
from flowalign.rlg import disable_rlg, enable_rlg

PROMPTS = ["two red circles", "a blue square", "three green triangles", "a yellow circle above a red square",
           "a purple triangle", "two blue squares", "a red circle", "four yellow circles"]


@pytest.fixture(scope="module")
def pipe():
    p = flowalign.load_pipeline(flowalign.asset("toy-sd3"))
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture(scope="module")
def clip():
    return rewards.get("clip_score", model="tiny")


def _call(pipe, prompts, steps, cfg=4.5, output_type="latent", seed=0):
    gens = [torch.Generator().manual_seed(seed + i) for i in range(len(prompts))]
    return pipe(prompt=list(prompts), num_inference_steps=steps, guidance_scale=cfg, generator=gens,
                output_type=output_type, **pipeline_call_kwargs(pipe)).images


# ---- the math -------------------------------------------------------------------------------------------------
class _Quadratic(Reward):
    """R(img) = -mean((img - target)^2) per image: smooth, differentiable, prompt-free."""

    name = "quadratic"
    differentiable = True

    def __init__(self, target):
        self.target = target

    def score(self, images, prompts, metadata=None):
        return -((images - self.target) ** 2).flatten(1).mean(1)


class _Bright(Reward):
    name = "bright"
    differentiable = True

    def score(self, images, prompts, metadata=None):
        return images.flatten(1).mean(1) * torch.tensor([len(p) for p in prompts], dtype=torch.float32)


def test_guidance_is_the_autograd_gradient_of_the_weighted_rewards():
    gen = torch.Generator().manual_seed(0)
    x, v = torch.randn(3, 4, 5, 5, generator=gen), torch.randn(3, 4, 5, 5, generator=gen)
    sigma = torch.tensor([0.9, 0.5, 0.2])
    weight = torch.randn(3, 4, generator=gen)

    def decode(z):  # a differentiable "VAE": [B, 4, 5, 5] -> [B, 3, 10, 10] in [0, 1]
        img = torch.einsum("oc,bchw->bohw", weight, z)
        return torch.sigmoid(img.repeat_interleave(2, -1).repeat_interleave(2, -2))

    target = torch.rand(3, 3, 10, 10, generator=gen)
    terms = [NRGTerm("quadratic", _Quadratic(target), 2.5), NRGTerm("bright", _Bright(), -0.7),
             NRGTerm("off", _Bright(), 0.0)]
    prompts = ["a", "bb", "ccc"]
    with torch.no_grad():  # as inside a pipeline call
        g = guidance(x, v, sigma, terms, decode, prompts)
        vg = guided_velocity(x, v, sigma, terms, decode, prompts)

    xr = x.clone().requires_grad_(True)
    x0_hat = xr - sigma.view(-1, 1, 1, 1) * v  # v held constant
    images = decode(x0_hat)
    total = 2.5 * _Quadratic(target).score(images, prompts).sum() - 0.7 * _Bright().score(images, prompts).sum()
    (expected,) = torch.autograd.grad(total, xr)
    assert g.dtype == torch.float32 and g.shape == x.shape and not g.requires_grad
    torch.testing.assert_close(g, expected, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(vg, v - expected, rtol=1e-5, atol=1e-7)
    # rows are independent: row 1's gradient does not depend on the other rows
    g1 = guidance(x[1:2], v[1:2], sigma[1:2], [NRGTerm("q", _Quadratic(target[1:2]), 2.5),
                                                NRGTerm("b", _Bright(), -0.7)], decode, prompts[1:2])
    torch.testing.assert_close(g1, expected[1:2], rtol=1e-5, atol=1e-7)
    # all weights 0: zeros, no reward evaluated
    assert torch.equal(guidance(x, v, 0.5, [terms[2]], decode, prompts), torch.zeros_like(x))


def test_one_pipeline_step_moves_the_latents_by_exactly_g(pipe, clip):
    # one Euler step from sigma 1 to 0: out = x - (v_cfg - g) and x0_hat = x - v_cfg = the unguided output, so the
    # guided output must be the unguided one plus g at x0_hat (SD3's batched CFG rows, sign, both CFG halves)
    prompts = PROMPTS[:2]
    disable_nrg(pipe)
    plain = _call(pipe, prompts, 1)
    enable_nrg(pipe, {"clip_score": 40.0}, reward_options={"clip_score": {"model": "tiny"}})
    assert nrg_weights(pipe) == {"clip_score": 40.0}
    guided_out = _call(pipe, prompts, 1)
    disable_nrg(pipe)
    x = adapter_for(pipe).prepare_latents(2, generator=[torch.Generator().manual_seed(i) for i in range(2)])
    g = guidance(x, x - plain, 1.0, [NRGTerm("clip_score", clip, 40.0)], adapter_for(pipe).decode, prompts)
    assert g.abs().max() > 1e-4  # a real push
    torch.testing.assert_close(guided_out, plain + g, rtol=1e-4, atol=1e-5)


def test_weight_zero_is_bit_exact_and_disable_restores(pipe, clip):
    prompts = PROMPTS[:2]
    disable_nrg(pipe)
    plain = _call(pipe, prompts, 2)
    enable_nrg(pipe, [(clip, 0.0)])
    assert nrg_weights(pipe) == {"clip_score": 0.0} and "encode_prompt" in pipe.__dict__
    assert torch.equal(_call(pipe, prompts, 2), plain)
    enable_nrg(pipe, [(clip, 5.0)])
    assert not torch.equal(_call(pipe, prompts, 2), plain)
    disable_nrg(pipe)
    assert nrg_weights(pipe) is None and "encode_prompt" not in pipe.__dict__  # the class's method again
    assert torch.equal(_call(pipe, prompts, 2), plain)


def test_guidance_raises_the_reward_it_guides_and_a_negative_weight_lowers_it(pipe, clip):
    # Paired by construction: the same 8 prompts and seeds at weight 0 (bit-exact the unguided pipeline) and at
    # +-W, so the only difference between the runs is the guidance. Measured (6 steps, no CFG, tiny CLIP, this
    # CPU): the 8-image mean clip_score is 0.477 at w = 0 and moves by up to 0.06 between seed sets (seeds
    # 100-107, ..., 400-407 at w = 0: 0.514 / 0.536 / 0.531 / 0.525), so an unpaired comparison could not resolve
    # the effect; paired, w = +30 raises EVERY image (smallest gain +0.001, mean +0.064) and w = -30 lowers every
    # image (mean -0.022). Larger weights (>= 1000) overshoot on steep images (a gradient step, not a line search).
    w = 30.0
    scores = {}
    for weight in (0.0, w, -w):
        enable_nrg(pipe, [(clip, weight)])
        images = _call(pipe, PROMPTS, 6, cfg=1.0, output_type="pt").float().clamp(0, 1)
        with torch.no_grad():
            scores[weight] = clip(images, PROMPTS)
    disable_nrg(pipe)
    up, down = scores[w] - scores[0.0], scores[-w] - scores[0.0]
    assert (up > 0).all(), f"guidance lowered some image's clip_score: {up.tolist()}"
    assert (down < 0).all(), f"negative guidance raised some image's clip_score: {down.tolist()}"
    assert up.mean() > 0.02 and down.mean() < -0.005, (up.mean().item(), down.mean().item())


# ---- with RL guidance ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lora_pipe():
    p = flowalign.load_pipeline(flowalign.asset("toy-sd3"))
    p.set_progress_bar_config(disable=True)
    params = lora.add_lora(adapter_for(p), rank=4)
    with torch.no_grad():
        for q in params:
            q.add_(0.05 * torch.randn(q.shape, generator=torch.Generator().manual_seed(0)))
    return p


def test_composes_with_rlg_in_either_order(lora_pipe, clip):
    p, prompts = lora_pipe, PROMPTS[:2]
    disable_rlg(p), disable_nrg(p)
    tuned = _call(p, prompts, 1)
    with lora.adapter_disabled(adapter_for(p)):
        base = _call(p, prompts, 1)
    enable_rlg(p, 1.0)
    enable_nrg(p, [(clip, 0.0)])
    assert torch.equal(_call(p, prompts, 1), tuned)  # RLG 1 + NRG 0 = the plain LoRA pipeline
    enable_rlg(p, 0.0)  # RLG after NRG
    assert torch.equal(_call(p, prompts, 1), base)
    # RLG 1.5 (two evaluations, a nested reference call) then NRG, and NRG then RLG: the same output, and one step
    # moves the RLG output by g at the RLG-mixed x0_hat (NRG acts on the mix once, never on the nested call)
    disable_nrg(p)
    enable_rlg(p, 1.5)
    mixed = _call(p, prompts, 1)
    enable_nrg(p, [(clip, 40.0)])
    rlg_then_nrg = _call(p, prompts, 1)
    disable_rlg(p), disable_nrg(p)
    enable_nrg(p, [(clip, 40.0)])
    enable_rlg(p, 1.5)
    nrg_then_rlg = _call(p, prompts, 1)
    again = _call(p, prompts, 1)  # hooks stay in their order on later calls
    disable_rlg(p), disable_nrg(p)
    assert torch.equal(rlg_then_nrg, nrg_then_rlg) and torch.equal(nrg_then_rlg, again)
    x = adapter_for(p).prepare_latents(2, generator=[torch.Generator().manual_seed(i) for i in range(2)])
    g = guidance(x, x - mixed, 1.0, [NRGTerm("clip_score", clip, 40.0)], adapter_for(p).decode, prompts)
    torch.testing.assert_close(rlg_then_nrg, mixed + g, rtol=1e-4, atol=1e-5)


# ---- flowalign's own sampler ---------------------------------------------------------------------------------
def test_adapter_path_matches_the_pipeline_path(pipe, clip):
    from flowalign.rollout import rollout

    adapter = adapter_for(pipe)
    prompts = PROMPTS[:2]
    gens = lambda: [torch.Generator().manual_seed(i) for i in range(2)]  # noqa: E731
    kw = dict(num_steps=3, guidance_scale=4.5, sampler="flow_ode", latents=adapter.prepare_latents(2, generator=gens()))
    plain = rollout(adapter, prompts, **kw).latents[:, -1]
    off = guided(adapter, [(clip, 0.0)])
    assert torch.equal(rollout(off, prompts, **kw).latents[:, -1], plain)
    assert off.family == "sd3" and off.weights == {"clip_score": 0.0}  # everything else is the adapter's
    on = rollout(guided(adapter, {"clip_score": 30.0}, reward_options={"clip_score": {"model": "tiny"}}), prompts,
                 **kw).latents[:, -1]
    enable_nrg(pipe, [(clip, 30.0)])
    via_pipe = _call(pipe, prompts, 3)
    disable_nrg(pipe)
    # the unguided rollout and pipe(...) already differ by ~4e-5 (prompt encoding per row vs batched, float order);
    # guided, the two paths differ by ~1e-3 where the guidance moves the latents by up to ~10 (measured)
    effect = (on - plain).abs().max()
    assert effect > 1.0
    torch.testing.assert_close(on, via_pipe, rtol=0, atol=5e-3)


# ---- errors ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["ocr", "toy_geneval", "jpeg_compressibility"])
def test_non_differentiable_reward_is_refused_naming_it(pipe, name):
    with pytest.raises(ValueError) as err:
        enable_nrg(pipe, {name: 1.0})
    msg = str(err.value)
    assert f"{name!r} is not differentiable" in msg and "clip_score" in msg and "aesthetic" in msg and "\n" not in msg
    assert nrg_weights(pipe) is None


@pytest.mark.parametrize("rewards_arg, options, message", [
    ({"nope": 1.0}, None, "unknown reward 'nope'"),
    ({"clip_score": math.inf}, None, "must be a finite number"),
    ({"clip_score": "much"}, None, "must be a number"),
    ({}, None, "at least one reward"),
    ({"clip_score": 1.0}, {"aesthetic": {}}, "options for 'aesthetic'"),
    ([("clip_score", 1.0), ("clip_score", 2.0)], None, "given twice"),
])
def test_bad_rewards_one_line(pipe, rewards_arg, options, message):
    with pytest.raises(ValueError, match=message) as err:
        enable_nrg(pipe, rewards_arg, reward_options=options)
    assert "\n" not in str(err.value)


def test_unsupported_pipeline_and_missing_prompt_text(pipe, clip):
    fake = type("FluxPipeline", (), {})()
    with pytest.raises(ValueError, match=r"enable_nrg supports pipe\(\.\.\.\) of StableDiffusion3Pipeline, not "
                                         r"FluxPipeline.*flowalign\.nrg\.guided"):
        enable_nrg(fake, [(clip, 1.0)])
    with pytest.raises(ValueError, match="neither a reward name nor a flowalign Reward"):
        enable_nrg(pipe, [(object(), 1.0)])
    embeds = pipe.encode_prompt(prompt=["a red circle"], prompt_2=None, prompt_3=None, max_sequence_length=16,
                                do_classifier_free_guidance=False)
    enable_nrg(pipe, [(clip, 1.0)])
    try:
        with pytest.raises(ValueError, match=r"needs the prompt text.*pipe\(prompt=\.\.\.\)"):
            pipe(prompt_embeds=embeds[0], pooled_prompt_embeds=embeds[2], num_inference_steps=1, guidance_scale=1.0,
                 output_type="latent")
        # a denoiser call that raises after NRG's pre-hook (torch then skips NRG's output hook): the next pipe(...)
        # call is still guided
        def boom(*_):
            raise RuntimeError("boom")

        handle = pipe.transformer.register_forward_pre_hook(boom)
        with pytest.raises(RuntimeError, match="boom"):
            _call(pipe, PROMPTS[:1], 1)
        handle.remove()
        guided_once = _call(pipe, PROMPTS[:1], 1)
        disable_nrg(pipe)
        assert not torch.equal(guided_once, _call(pipe, PROMPTS[:1], 1))
    finally:
        disable_nrg(pipe)


def test_skip_layer_guidance_call_reuses_g_and_a_new_call_recomputes(pipe, clip, monkeypatch):
    # SD3's skip-layer guidance calls the transformer a second time per step on the same latents: g is computed once
    # per step (it cancels in that term's difference anyway); every pipe(...) call starts afresh
    import flowalign.nrg as nrg

    calls = []
    real = nrg.guidance
    monkeypatch.setattr(nrg, "guidance", lambda *a, **k: calls.append(1) or real(*a, **k))
    enable_nrg(pipe, [(clip, 20.0)])
    try:
        kw = dict(skip_guidance_layers=[1], skip_layer_guidance_start=0.0, skip_layer_guidance_stop=1.0)
        gens = [torch.Generator().manual_seed(0)]
        first = pipe(prompt=PROMPTS[:1], num_inference_steps=3, guidance_scale=4.5, generator=gens,
                     output_type="latent", max_sequence_length=16, **kw).images
        assert len(calls) == 3  # 3 steps, 5 transformer calls (steps 1 and 2 skip layers)
        gens = [torch.Generator().manual_seed(0)]
        again = pipe(prompt=PROMPTS[:1], num_inference_steps=3, guidance_scale=4.5, generator=gens,
                     output_type="latent", max_sequence_length=16, **kw).images
        assert len(calls) == 6 and torch.equal(first, again)
    finally:
        disable_nrg(pipe)
