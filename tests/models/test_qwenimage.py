"""Qwen-Image (QwenImagePipeline, QwenImageEditPipeline, QwenImageEditPlusPipeline): the adapters reproduce the
pipelines' __call__ (ODE rollouts with and without true CFG, its norm rescaling, Qwen-Image-Edit-2511's zero_cond_t),
the prompt encoding (variable-length captions, padded batches), the condition tokens, the grid, noise and decoding,
re-scoring, the LoRA round trip and the family contract.

The edit pipelines resize every condition image to a fixed 1024**2 px (Plus: and 384**2 px for the text encoder), a
VAE pass of seconds on a CPU; the tiny pipelines here are built with ``condition_area`` / ``vl_area`` (their
``__call__`` runs inside ``qwen_edit_areas``) and the adapters take the same areas. The default areas are checked
against the pipelines' ``calculate_dimensions`` without running the VAE."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from PIL import Image

from flowalign import lora
from flowalign.models.qwenimage import (QwenImageAdapter, QwenImageEditAdapter, QwenImageEditPlusAdapter,
                                        condition_dimensions)
from flowalign.rollout import rescore, rollout
from flowalign.toy.pipelines_qwen import qwen_edit_areas, tiny_qwenimage_edit_pipeline, tiny_qwenimage_pipeline
from flowalign.toy.tiny_families import tiny_condition_images

PROMPTS = ["a red circle", "two blue squares above"]
NEG = "three stars"
SIZE = dict(height=32, width=32)  # 2 x 2 packed tokens
AREA, VL_AREA = 64 * 64, 32 * 32  # condition 64 x 64 px = 8 x 8 latents = 16 tokens; the Plus VL image 32 x 32 px
FAMILIES = ["qwenimage", "qwenimage_edit", "qwenimage_edit_plus"]
EDITS = FAMILIES[1:]
CLASSES = dict(zip(FAMILIES, (QwenImageAdapter, QwenImageEditAdapter, QwenImageEditPlusAdapter)))


def _make(family, seed=0, zero_cond_t=False, **kw):
    """(pipe, adapter) for a fresh tiny pipeline of ``family`` (edits at the small areas)."""
    if family == "qwenimage":
        pipe = tiny_qwenimage_pipeline(seed=seed)
        adapter = QwenImageAdapter(pipe, **kw)
    else:
        plus = family == "qwenimage_edit_plus"
        pipe = tiny_qwenimage_edit_pipeline(plus=plus, seed=seed, zero_cond_t=zero_cond_t, condition_area=AREA,
                                            vl_area=VL_AREA)
        areas = dict(condition_area=AREA, vl_area=VL_AREA) if plus else dict(condition_area=AREA)
        adapter = CLASSES[family](pipe, **areas, **kw)
    pipe.set_progress_bar_config(disable=True)
    return pipe, adapter


def _images(family, n=2, seed=0):
    return None if family == "qwenimage" else tiny_condition_images(n, size=32, seed=seed)


def _gens(n):
    return [torch.Generator().manual_seed(i) for i in range(n)]


def _call(pipe, adapter, g, prompts=PROMPTS, images=None, steps=3, output_type="latent"):
    """pipe(...) with the adapter's call_kwargs; edits one row a call (row i: generator seed i)."""
    kw = adapter.call_kwargs(g, **SIZE)
    if images is None:
        if "negative_prompt" in kw:  # one negative prompt per row
            kw["negative_prompt"] = [kw["negative_prompt"]] * len(prompts)
        return pipe(prompt=list(prompts), num_inference_steps=steps, generator=_gens(len(prompts)),
                    output_type=output_type, **SIZE, **kw).images
    return torch.cat([pipe(image=images[i], prompt=p, num_inference_steps=steps, generator=_gens(i + 1)[i],
                           output_type=output_type, **SIZE, **kw).images for i, p in enumerate(prompts)])


def _ode(adapter, g, prompts=PROMPTS, images=None, steps=3):
    traj = rollout(adapter, prompts, num_steps=steps, guidance_scale=g, sampler="flow_ode",
                   generator=_gens(len(prompts)), images=images, **SIZE)
    return traj


class _Calls:
    def __init__(self, module):
        self.n = 0
        module.register_forward_pre_hook(self._hook)

    def _hook(self, *_):
        self.n += 1

    def take(self):
        n, self.n = self.n, 0
        return n


def _nonzero(params, seed=1, scale=0.3):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(scale * torch.randn(p.shape, generator=gen))


@pytest.mark.parametrize("g", [1.0, 4.0])
@pytest.mark.parametrize("family", FAMILIES)
def test_ode_rollout_equals_pipeline(family, g):
    pipe, adapter = _make(family, negative_prompt=NEG)
    images = _images(family)
    calls = _Calls(pipe.transformer)
    ref = _call(pipe, adapter, g, images=images)
    per_step = 2 if g > 1 else 1  # true CFG: one call per branch
    assert ref.shape == (2, 4, 16) and calls.take() == 3 * per_step * (1 if images is None else 2)
    traj = _ode(adapter, g, images=images)
    assert calls.take() == 3 * per_step  # both rows in one call per branch
    assert not traj.stochastic.any() and traj.latents.shape == (2, 4, 4, 4, 4)
    torch.testing.assert_close(adapter.pack(traj.final), ref, atol=1e-5, rtol=1e-5)
    assert (traj.final - traj.latents[:, 0]).abs().max() > 0.1
    # one row alone is the pipeline's call bit for bit (a batch pads the shorter caption, masked)
    one = _ode(adapter, g, prompts=PROMPTS[:1], images=None if images is None else images[:1])
    assert torch.equal(adapter.pack(one.final), _call(pipe, adapter, g, PROMPTS[:1], images and images[:1]))
    if g > 1:  # the null branch is used
        assert (traj.final - _ode(adapter, 1.0, images=images).final).abs().max() > 1e-3


def test_zero_cond_t_edit_plus_equals_pipeline():
    # Qwen-Image-Edit-2511: the transformer gives the condition tokens timestep 0 (from img_shapes)
    pipe, adapter = _make("qwenimage_edit_plus", zero_cond_t=True, negative_prompt=NEG)
    assert pipe.transformer.config.zero_cond_t
    images = _images("qwenimage_edit_plus")
    ref = _call(pipe, adapter, 4.0, images=images)
    got = adapter.pack(_ode(adapter, 4.0, images=images).final)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    _, plain = _make("qwenimage_edit_plus", negative_prompt=NEG)  # the same weights without zero_cond_t
    assert (adapter.pack(_ode(plain, 4.0, images=images).final) - got).abs().max() > 1e-4


def test_call_kwargs_and_cfg_scale_options():
    pipe, adapter = _make("qwenimage")
    # true_cfg_scale always passed (QwenImagePipeline's default is 4); the negative prompt only with CFG
    assert adapter.call_kwargs(1.0) == {"true_cfg_scale": 1.0, "max_sequence_length": 512}
    assert adapter.call_kwargs(4.0) == {"true_cfg_scale": 4.0, "max_sequence_length": 512, "negative_prompt": ""}
    assert adapter.encode_prompts(PROMPTS, 1.0).uncond is None and adapter.encode_prompts(PROMPTS, 4.0).uncond
    # a fixed true_cfg_scale (FLUX-style): CFG whatever guidance_scale
    fixed = QwenImageAdapter(pipe, true_cfg_scale=4.0, negative_prompt=NEG)
    assert fixed.call_kwargs(1.0) == {"true_cfg_scale": 4.0, "max_sequence_length": 512, "negative_prompt": NEG}
    with_neg = QwenImageAdapter(pipe, negative_prompt=NEG)
    torch.testing.assert_close(_ode(fixed, 1.0).final, _ode(with_neg, 4.0).final, atol=0, rtol=0)
    ad_edit = _make("qwenimage_edit", negative_prompt=NEG)[1]
    assert ad_edit.call_kwargs(3.0) == {"true_cfg_scale": 3.0, "max_sequence_length": 512, "negative_prompt": NEG}
    for bad in (dict(true_cfg_scale=0.0), dict(max_sequence_length=2048)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            QwenImageAdapter(pipe, **bad)


@pytest.mark.parametrize("family", FAMILIES)
def test_prompt_encoding_batch_equals_rows(family):
    pipe, adapter = _make(family, negative_prompt=NEG)
    images = _images(family)
    cond = adapter.encode_prompts(PROMPTS, 4.0, images=images, **SIZE)
    emb, mask = cond.cond["encoder_hidden_states"], cond.cond["encoder_hidden_states_mask"]
    lengths = mask.sum(dim=1).tolist()
    assert mask.dtype == torch.bool and lengths[0] < lengths[1] and emb.shape == (2, lengths[1], 16)
    assert mask[0, : lengths[0]].all() and not mask[0, lengths[0]:].any()
    assert torch.equal(emb[0, lengths[0]:], torch.zeros_like(emb[0, lengths[0]:]))
    for i in range(2):  # each row is its own encoding, padded
        fresh = _make(family)[1]
        one = fresh.encode_prompts([PROMPTS[i]], 1.0, images=images and images[i:i + 1], **SIZE).cond
        assert one["encoder_hidden_states"].shape[1] == lengths[i]
        assert torch.equal(one["encoder_hidden_states"][0], emb[i, : lengths[i]])
        if images is not None:
            assert torch.equal(one["image_latents"][0], cond.cond["image_latents"][i])
    # the pipeline's own encoding: t2i batched (its padding and mask), edits of one row with the resized image
    if images is None:
        ref, ref_mask = pipe.encode_prompt(list(PROMPTS), max_sequence_length=512)
        assert torch.equal(ref_mask.bool(), mask)
        torch.testing.assert_close(emb, ref, atol=1e-6, rtol=1e-6)
    else:
        plus = family == "qwenimage_edit_plus"
        vl = pipe.image_processor.resize(images[1], 32, 32) if plus else pipe.image_processor.resize(images[1], 64, 64)
        ref, ref_mask = pipe.encode_prompt(prompt=[PROMPTS[1]], image=[vl] if plus else vl)
        assert ref_mask is None and torch.equal(ref[0], emb[1])
    # the null branch: the negative prompt, read with each row's own condition image
    neg = cond.uncond["encoder_hidden_states"]
    assert neg.shape[0] == 2 and (neg[0, -3:] - emb[0, -3:]).abs().max() > 1e-3
    if images is None:
        assert torch.equal(neg[0], neg[1])
    else:
        assert (neg[0] - neg[1]).abs().max() > 1e-3  # the text encoder reads the image
        assert torch.equal(cond.uncond["image_latents"], cond.cond["image_latents"])
    # a padded batch predicts what its rows predict alone; the CFG branches batched in one call agree too
    x = adapter.prepare_latents(2, generator=_gens(2), **SIZE)
    t = adapter.sampling_grid(3, x).timesteps[1]
    v = adapter.predict(x, t, cond, 4.0)
    for i in range(2):
        torch.testing.assert_close(v[i:i + 1], adapter.predict(x[i:i + 1], t, cond.select([i]), 4.0),
                                   atol=1e-5, rtol=1e-5)
    adapter.cfg_batched = True
    torch.testing.assert_close(adapter.predict(x, t, cond, 4.0), v, atol=1e-5, rtol=1e-5)


def test_cfg_is_renormalised_per_token():
    pipe, adapter = _make("qwenimage", negative_prompt=NEG)
    x = adapter.prepare_latents(2, generator=_gens(2), **SIZE)
    t = adapter.sampling_grid(3, x).timesteps[0]
    cond = adapter.encode_prompts(PROMPTS, 4.0)
    v_c = adapter.pack(adapter.predict(x, t, cond, 1.0))
    v_null = adapter.pack(adapter.predict(x, t, adapter.encode_prompts([NEG] * 2, 1.0), 1.0))
    v = adapter.pack(adapter.predict(x, t, cond, 4.0))
    comb = v_null + 4.0 * (v_c - v_null)
    torch.testing.assert_close(v, comb * v_c.norm(dim=-1, keepdim=True) / comb.norm(dim=-1, keepdim=True),
                               atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(v.norm(dim=-1), v_c.norm(dim=-1))  # each token keeps the conditional norm
    assert (v - comb).abs().max() > 1e-3 and (v - v_c).abs().max() > 1e-3
    # the velocity is the transformer's output at t / 1000 with the pipeline's img_shapes
    with torch.no_grad():
        raw = pipe.transformer(hidden_states=adapter.pack(x), timestep=t.expand(2) / 1000,
                               encoder_hidden_states=cond.cond["encoder_hidden_states"],
                               encoder_hidden_states_mask=cond.cond["encoder_hidden_states_mask"],
                               img_shapes=[[(1, 2, 2)]] * 2, return_dict=False)[0]
    torch.testing.assert_close(v_c, raw, atol=0, rtol=0)
    with pytest.raises(ValueError, match="encode_prompts"):
        adapter.predict(x, t, adapter.encode_prompts(PROMPTS, 1.0), 4.0)


@pytest.mark.parametrize("family", FAMILIES)
def test_noise_grid_and_decoding_match_pipeline(family):
    import math

    pipe, adapter = _make(family)
    x = adapter.prepare_latents(2, generator=_gens(2), height=64, width=32)  # 4 x 2 packed tokens
    assert x.dtype == torch.float32 and x.shape == (2, 4, 8, 4)
    args = (None,) if family != "qwenimage" else ()
    lat = pipe.prepare_latents(*args, 2, 4, 64, 32, torch.float32, "cpu", _gens(2))
    assert torch.equal(adapter.pack(x), lat[0] if isinstance(lat, tuple) else lat)
    # sigmas = linspace(1, 1/N, N), exponential shift with mu = calculate_shift(8 tokens), stretched to 0.02
    for n in (2, 5):
        grid = adapter.sampling_grid(n, x)
        mu = 0.5 + (0.9 - 0.5) / (64 - 4) * (8 - 4)
        assert adapter._shift_mu(x) == pytest.approx(mu)
        s = torch.linspace(1.0, 1 / n, n).double()
        shifted = math.exp(mu) / (math.exp(mu) + (1 / s - 1))
        one_minus = 1 - shifted
        stretched = 1 - one_minus / (one_minus[-1] / (1 - 0.02))
        torch.testing.assert_close(grid.sigmas, torch.cat([stretched.float(), torch.zeros(1)]))
        torch.testing.assert_close(grid.timesteps, (stretched * 1000).float(), atol=1e-4, rtol=1e-6)
    with pytest.raises(ValueError, match="1-step"):  # the stretch to shift_terminal is 0 / 0 (the pipeline: NaN)
        adapter.sampling_grid(1, x)
    # decoding: the pipeline's images (output_type="pt") of the same rollout
    images = _images(family)
    img = _call(pipe, adapter, 1.0, images=images, steps=2, output_type="pt")
    with torch.no_grad():
        out = adapter.decode(_ode(adapter, 1.0, images=images, steps=2).final)
    assert out.shape == (2, 3, 32, 32) and 0 <= float(out.min()) <= float(out.max()) <= 1
    torch.testing.assert_close(out, img.float(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", EDITS)
def test_condition_tokens_are_the_pipelines(family):
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit, pipeline_qwenimage_edit_plus

    pipe, adapter = _make(family)
    im = Image.fromarray((torch.rand(32, 64, 3, generator=torch.Generator().manual_seed(0)) * 255).byte().numpy())
    emb = adapter.encode_prompts(["a red circle"], 1.0, images=[im], **SIZE).cond
    # 64 x 32 px at 64**2 px -> 96 x 32 px (sides rounded to 32) -> 12 x 4 latents -> 6 x 2 tokens of 4 * 4 channels
    assert condition_dimensions(AREA, 2.0) == (96, 32)
    assert emb["image_latents"].shape == (1, 12, 16) and emb["image_grid"].tolist() == [[2, 6]]
    pixels = pipe.image_processor.preprocess(pipe.image_processor.resize(im, 32, 96), 32, 96).unsqueeze(2)
    _, ref = pipe.prepare_latents(pixels if family == "qwenimage_edit" else [pixels], 1, 4, 32, 32, torch.float32,
                                  "cpu", None)
    assert torch.equal(emb["image_latents"], ref)
    # the pipelines' own sizes at their fixed areas (1024**2, Plus' VL image 384**2), without the tiny areas
    for ratio in (1.0, 1.5, 0.5, 16 / 9):
        w, h, _ = pipeline_qwenimage_edit.calculate_dimensions(1024 * 1024, ratio)
        assert condition_dimensions(1024 * 1024, ratio) == (w, h)
        assert condition_dimensions(384 * 384, ratio) == pipeline_qwenimage_edit_plus.calculate_dimensions(
            384 * 384, ratio)
    with qwen_edit_areas(AREA):  # the tiny pipelines' mapping, restored on exit
        assert pipeline_qwenimage_edit.calculate_dimensions(1024 * 1024, 1.0)[:2] == (64, 64)
    assert pipeline_qwenimage_edit.calculate_dimensions(1024 * 1024, 1.0)[:2] == (1024, 1024)
    # rows whose images differ in aspect ratio: one transformer call per condition layout, each as alone
    square = tiny_condition_images(1, size=32)[0]
    cond = adapter.encode_prompts(PROMPTS, 1.0, images=[im, square], **SIZE)
    assert cond.cond["image_latents"].shape == (2, 16, 16)  # padded to the larger condition
    x = adapter.prepare_latents(2, generator=_gens(2), **SIZE)
    calls = _Calls(pipe.transformer)
    v = adapter.predict(x, 500.0, cond, 1.0)
    assert calls.take() == 2
    for i in range(2):
        torch.testing.assert_close(v[i:i + 1], adapter.predict(x[i:i + 1], 500.0, cond.select([i]), 1.0),
                                   atol=1e-6, rtol=1e-6)
    # output size: the pipeline's default is the condition image's size at the area
    assert adapter.output_size(None, None) == (64, 64) and adapter.output_size(None, None, (64, 32)) == (32, 96)
    assert CLASSES[family](pipe).output_size(None, None) == (1024, 1024)  # the default area's square


@pytest.mark.parametrize("family", FAMILIES)
def test_rescore_reproduces_logprobs(family):
    _, adapter = _make(family, negative_prompt=NEG)
    params = lora.add_lora(adapter, rank=2)
    _nonzero(params)
    images = _images(family)
    traj = rollout(adapter, PROMPTS, num_steps=3, guidance_scale=4.0, sampler="flow_sde", generator=_gens(2),
                   record_means=True, images=images, **SIZE)
    assert len(traj.stochastic_steps) >= 2 and traj.log_probs.shape == (2, 3)
    for k in traj.stochastic_steps:
        step = rescore(adapter, traj, k)
        torch.testing.assert_close(step.log_prob(), traj.log_probs[:, k], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(step.mean, traj.means[:, k], atol=1e-5, rtol=1e-5)
    k = traj.stochastic_steps[0]
    one = rescore(adapter, traj, k, index=[1])  # a micro-batch: its rows' captions (and images)
    torch.testing.assert_close(one.log_prob(), traj.log_probs[1:, k], atol=1e-5, rtol=1e-5)
    _nonzero(params, seed=2)
    step = rescore(adapter, traj, k)
    assert (step.log_prob() - traj.log_probs[:, k]).abs().max() > 1e-4
    step.log_prob().sum().backward()
    assert sum(float(p.grad.abs().sum()) for p in params if p.grad is not None) > 0


@pytest.mark.parametrize("family", ["qwenimage", "qwenimage_edit_plus"])
def test_lora_round_trip(family, tmp_path):
    _, adapter = _make(family, negative_prompt=NEG)
    _nonzero(lora.add_lora(adapter, rank=4, alpha=8))
    images = _images(family)
    traj = _ode(adapter, 4.0, images=images, steps=2)
    lora.save_lora(adapter, str(tmp_path))
    fresh, fresh_adapter = _make(family, negative_prompt=NEG)
    base = _call(fresh, fresh_adapter, 4.0, images=images, steps=2)
    fresh.load_lora_weights(str(tmp_path))
    out = _call(fresh, fresh_adapter, 4.0, images=images, steps=2)  # the pipeline's own __call__ with the LoRA
    torch.testing.assert_close(adapter.pack(traj.final), out, atol=1e-5, rtol=1e-5)
    assert (out - base).abs().max() > 1e-2


@pytest.mark.parametrize("family", FAMILIES)
def test_family_contract(family):
    from flowalign.rollout import SAMPLERS
    from flowalign.runtime import fsdp

    pipe, adapter = _make(family)
    names = [n for n, _ in adapter.denoiser.named_modules()]
    for target in adapter.lora_target_modules:
        assert any(n == target or n.endswith("." + target) for n in names), target
    assert adapter.fsdp_blocks == ("transformer_blocks",)
    assert len(fsdp.blocks(adapter.denoiser, adapter.fsdp_blocks)) == 2
    assert SAMPLERS[adapter.default_sampler].flow and not adapter.video and not adapter.cfg_batched
    assert adapter.condition_image == (family != "qwenimage")
    params = lora.add_lora(adapter, rank=2)
    assert params and all(p.requires_grad for p in params)
    wrapped = {n.rsplit(".lora_", 1)[0].split(".", 2)[2] for n, _ in adapter.denoiser.named_parameters()
               if "lora_" in n}
    assert {"attn.to_q", "attn.add_v_proj", "attn.to_add_out", "img_mlp.net.2", "txt_mlp.net.0.proj"} <= wrapped
    images = _images(family, 1)
    x = adapter.prepare_latents(1, generator=_gens(1)[0], **SIZE)
    grid = adapter.sampling_grid(2, x)
    out = adapter.predict(x, grid.timesteps[:1], adapter.encode_prompts(["a"], 1.0, images=images, **SIZE), 1.0)
    assert out.dtype == torch.float32 and out.shape == x.shape == (1, 4, 4, 4) and torch.isfinite(out).all()
    with torch.no_grad():
        img = adapter.decode(x)
    assert img.shape == (1, 3, 32, 32) and 0 <= float(img.min()) <= float(img.max()) <= 1
    # sizes: floored to multiples of 16 as the pipelines floor them; defaults 1024 x 1024 (edits: the area's square)
    assert adapter.latent_shape(1, 40, 36) == (1, 4, 4, 4)
    assert adapter.latent_shape(1, None, None) == ((1, 4, 128, 128) if family == "qwenimage" else (1, 4, 8, 8))
    with pytest.raises(ValueError, match="at least 16"):
        adapter.latent_shape(1, 8, 32)
    if family == "qwenimage":
        with pytest.raises(ValueError, match="text only"):
            adapter.encode_prompts(["a"], images=tiny_condition_images(1))
    else:
        with pytest.raises(ValueError, match="images="):
            adapter.encode_prompts(["a"])
        with pytest.raises(ValueError, match="condition_area"):
            CLASSES[family](pipe, condition_area=16)
    other = _make("qwenimage")[0] if family != "qwenimage" else _make("qwenimage_edit")[0]
    with pytest.raises(TypeError, match="wraps a"):
        CLASSES[family](other)
