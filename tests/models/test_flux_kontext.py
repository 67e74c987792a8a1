"""FLUX.1 Kontext (image editing): the adapter against FluxKontextPipeline.__call__ on a tiny in-process pipeline.

An ODE rollout equals the pipeline (per-row images, one image for the batch, true CFG); the condition image's
tokens are the pipeline's; re-scoring, LoRA round trip, RLG and the family contract (training: test_family_training)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")


import numpy as np
import pytest
import torch
from PIL import Image

from flowalign import lora
from flowalign.models.flux_kontext import FluxKontextAdapter
from flowalign.rlg import disable_rlg, enable_rlg, rlg_scale
from flowalign.rollout import rescore, rollout
from flowalign.toy.pipelines_kontext import tiny_flux_kontext_pipeline

PROMPTS = ["a red circle", "two blue squares above"]
SIZE = dict(height=16, width=16)
# the pipeline call equivalent to the adapter at 16 x 16: no auto-resize, max_area = the requested area
CALL_KW = dict(height=16, width=16, max_area=16 * 16, _auto_resize=False, max_sequence_length=16)


def _images(n=2, size=16, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


def _pipe():
    pipe = tiny_flux_kontext_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _adapter(pipe=None, **kw):
    return FluxKontextAdapter(pipe or _pipe(), max_sequence_length=16, **kw)


def _gens(*seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _call(pipe, image, prompt, generator, steps=3, **kw):
    return pipe(image=image, prompt=prompt, num_inference_steps=steps, guidance_scale=3.0, generator=generator,
                output_type="latent", **CALL_KW, **kw).images


def _ode(adapter, images, generator, prompts=PROMPTS, steps=3):
    traj = rollout(adapter, prompts, num_steps=steps, guidance_scale=3.0, sampler="flow_ode", generator=generator,
                   images=images, **SIZE)
    return adapter.pack(traj.final)


def test_ode_rollout_equals_pipeline_per_row_images():
    pipe = _pipe()
    adapter = _adapter(pipe)
    ims = _images(2)
    # FluxKontextPipeline takes one image per prompt (a list); a list of generators encodes each image alone
    ref = _call(pipe, ims, PROMPTS, _gens(0, 1))
    got = _ode(adapter, ims, _gens(0, 1))
    assert got.shape == ref.shape == (2, 16, 16)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    # each row is its own edit: the single-row pipeline call of its (prompt, image) gives it
    for i in range(2):
        torch.testing.assert_close(got[i:i + 1], _call(pipe, ims[i], PROMPTS[i], _gens(i)), atol=1e-5, rtol=1e-5)
    # the image is an input: the same prompts and noise with the images swapped give other edits
    swapped = _ode(adapter, ims[::-1], _gens(0, 1))
    assert all((swapped[i] - got[i]).abs().max() > 1e-3 for i in range(2))
    # one image for the whole batch (the pipeline broadcasts it) == that image on every row
    torch.testing.assert_close(_ode(adapter, [ims[0]] * 2, _gen(0)), _call(pipe, ims[0], PROMPTS, _gen(0)),
                               atol=1e-5, rtol=1e-5)


def test_true_cfg_equals_pipeline():
    pipe = _pipe()
    adapter = _adapter(pipe, true_cfg_scale=2.0, negative_prompt="blurry")
    ims = _images(2)
    # the pipeline runs the branches as two calls, with the negative prompt encoded once per row when it is a list
    ref = _call(pipe, ims, PROMPTS, _gens(0, 1), negative_prompt=["blurry"] * 2, true_cfg_scale=2.0)
    adapter.cfg_batched = False
    assert torch.equal(_ode(adapter, ims, _gens(0, 1)), ref)
    # flowalign's default: both branches in one [2B] call (other kernels: measured 4.8e-7 on these values)
    adapter.cfg_batched = True
    got = _ode(adapter, ims, _gens(0, 1))
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    assert (got - _ode(_adapter(pipe), ims, _gens(0, 1))).abs().max() > 1e-3  # the null branch is used
    # one image, a string negative prompt (encoded once for the batch)
    torch.testing.assert_close(_ode(adapter, ims[:1] * 2, _gen(0)),
                               _call(pipe, ims[0], PROMPTS, _gen(0), negative_prompt="blurry", true_cfg_scale=2.0),
                               atol=1e-5, rtol=1e-5)
    cond = adapter.encode_prompts(PROMPTS, 3.0, images=ims, **SIZE)
    assert torch.equal(cond.uncond["image_latents"], cond.cond["image_latents"])  # the null branch edits the image


def test_condition_tokens_are_the_pipelines():
    pipe = _pipe()
    adapter = _adapter(pipe)
    im = _images(1)[0]
    emb = adapter.encode_prompts(["a red circle"], 1.0, images=[im], **SIZE).cond
    # 16 x 16 px -> 8 x 8 latents -> 4 x 4 = 16 packed tokens of 4 * 4 channels, ids (1, row, col)
    assert emb["image_latents"].shape == (1, 16, 16) and emb["image_ids"].shape == (1, 16, 3)
    assert (emb["image_ids"][0, :, 0] == 1).all()
    assert emb["image_ids"][0, 5].tolist() == [1.0, 1.0, 1.0] and emb["image_ids"][0, 15].tolist() == [1.0, 3.0, 3.0]
    pixels = pipe.image_processor.preprocess(im, 16, 16)
    _, lat, _, ids = pipe.prepare_latents(pixels, 1, 4, 16, 16, torch.float32, "cpu", torch.Generator())
    assert torch.equal(emb["image_latents"], lat) and torch.equal(emb["image_ids"][0], ids)
    # a condition image of another size is resized to the output size as pipe(image=PIL) resizes it (Lanczos)
    big = _images(1, size=24, seed=3)[0]
    got = adapter.encode_prompts(["a red circle"], 1.0, images=[big], **SIZE).cond["image_latents"]
    pixels = pipe.image_processor.preprocess(pipe.image_processor.resize(big, 16, 16), 16, 16)
    assert torch.equal(got, pipe.prepare_latents(pixels, 1, 4, 16, 16, torch.float32, "cpu", None)[1])
    # a non-8-bit tensor takes the processor's tensor path
    t = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(0))
    lat_t = adapter.encode_prompts(["x"], 1.0, images=[t], **SIZE).cond["image_latents"]
    assert torch.equal(lat_t, pipe.prepare_latents(t[None] * 2 - 1, 1, 4, 16, 16, torch.float32, "cpu", None)[1])


def test_sizes_and_errors():
    adapter = _adapter()
    with pytest.raises(ValueError, match="images=") as err:
        adapter.encode_prompts(["a red circle"])
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="one image per prompt"):
        adapter.encode_prompts(PROMPTS, images=_images(1))
    with pytest.raises(ValueError, match=r"multiples of 4 .*use 16 x 20") as err:
        adapter.latent_shape(1, 18, 20)
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="multiples of 4"):
        adapter.encode_prompts(["a"], images=_images(1), height=18, width=16)
    with pytest.raises(ValueError, match="max_area must be a positive"):
        _adapter(adapter.pipe, max_area=0)
    assert adapter.latent_shape(2, 16, 32) == (2, 4, 8, 16)
    assert adapter.latent_shape(1, None, None) == (1, 4, 128, 128)  # the pipeline default: 128 * 2 = 256 px
    # max_area: the pipeline's rescaling to an area at the requested aspect ratio
    pipe = adapter.pipe
    area = _adapter(pipe, max_area=16 * 16)
    assert area.output_size(32, 32) == (16, 16) and area.output_size(16, 64) == (8, 32)
    ref = pipe(image=_images(1, size=32)[0], prompt="a", num_inference_steps=1, height=32, width=32, max_area=256,
               _auto_resize=False, max_sequence_length=16, output_type="latent").images
    assert ref.shape[1] == (area.latent_shape(1, 32, 32)[2] // 2) ** 2 == 16


def test_rescore_reproduces_logprobs_with_images(gen, h):
    adapter = _adapter()
    params = lora.add_lora(adapter, rank=2)
    h.nonzero_lora(params)
    ims = _images(2)
    traj = rollout(adapter, PROMPTS, num_steps=3, guidance_scale=2.0, sampler="flow_sde", generator=gen(0),
                   record_means=True, images=ims, **SIZE)
    assert len(traj.stochastic_steps) >= 2 and traj.cond.metadata()[1]["condition_image"].shape == (3, 16, 16)
    for k in traj.stochastic_steps:
        step = rescore(adapter, traj, k)
        torch.testing.assert_close(step.log_prob(), traj.log_probs[:, k], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(step.mean, traj.means[:, k], atol=1e-5, rtol=1e-5)
    k = traj.stochastic_steps[0]
    one = rescore(adapter, traj, k, index=[1])  # a micro-batch selects its rows' images
    torch.testing.assert_close(one.log_prob(), traj.log_probs[1:, k], atol=1e-5, rtol=1e-5)
    h.nonzero_lora(params, seed=2, scale=0.3)
    step = rescore(adapter, traj, k)
    assert (step.log_prob() - traj.log_probs[:, k]).abs().max() > 1e-4
    step.log_prob().sum().backward()
    assert sum(float(p.grad.abs().sum()) for p in params if p.grad is not None) > 0


def _lora_adapter(seed=1):
    adapter = _adapter()
    params = lora.add_lora(adapter, rank=4, alpha=8)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(0.3 * torch.randn(p.shape, generator=g))
    return adapter


def test_lora_round_trip_and_disable(tmp_path):
    base_adapter = _adapter()
    ims = _images(2)
    x = base_adapter.prepare_latents(2, generator=torch.Generator().manual_seed(0), **SIZE)
    t = base_adapter.sampling_grid(3, x).timesteps[1]

    def predict(ad):
        return ad.predict(x, t, ad.encode_prompts(PROMPTS, 3.0, images=ims, **SIZE), 3.0)

    base = predict(base_adapter)
    adapter = _lora_adapter()
    tuned = predict(adapter)
    assert (tuned - base).abs().max() > 1e-2
    with lora.adapter_disabled(adapter):
        assert torch.equal(predict(adapter), base)  # the reference is the base model bit for bit
    traj = rollout(adapter, PROMPTS, num_steps=2, guidance_scale=3.0, sampler="flow_ode", generator=_gens(0, 1),
                   images=ims, **SIZE)
    lora.save_lora(adapter, str(tmp_path))
    fresh = _pipe()
    fresh.load_lora_weights(str(tmp_path))
    torch.testing.assert_close(predict(_adapter(fresh)), tuned, atol=1e-5, rtol=1e-5)
    out = _call(fresh, ims, PROMPTS, _gens(0, 1), steps=2)  # and the fresh pipeline's own __call__
    torch.testing.assert_close(adapter.pack(traj.final), out, atol=1e-5, rtol=1e-5)


class CallCounter:
    def __init__(self, module):
        self.n = 0
        self.handle = module.register_forward_pre_hook(self._hook)

    def _hook(self, *_):
        self.n += 1

    def take(self):
        n, self.n = self.n, 0
        return n


def test_rlg_on_the_kontext_pipeline(tmp_path):
    # true CFG: FluxKontextPipeline calls the transformer once per CFG branch (2 per step), each call is mixed
    im = _images(1)[0]

    def sample(steps):
        return _call(pipe, im, PROMPTS[:1], _gens(0), steps=steps, negative_prompt="", true_cfg_scale=2.0)

    lora.save_lora(_lora_adapter(), str(tmp_path / "lora"))
    pipe = _pipe()
    calls = CallCounter(pipe.transformer)
    base, base1 = sample(2), sample(1)
    pipe.load_lora_weights(str(tmp_path / "lora"))
    calls.take()
    theta, theta1 = sample(2), sample(1)
    assert calls.take() == 2 * 2 + 2 and (theta - base).abs().max() > 1e-2
    enable_rlg(pipe, 0.5)
    mix1 = sample(1)
    assert calls.take() == 2 * 2  # 2 calls per step, each runs the reference and the LoRA model
    torch.testing.assert_close(mix1, base1 + 0.5 * (theta1 - base1), atol=1e-4, rtol=1e-4)
    assert (mix1 - base1).abs().max() > 1e-3 and (mix1 - theta1).abs().max() > 1e-3
    enable_rlg(pipe, 1.0)  # the endpoints: one evaluation per call, bit for bit
    assert torch.equal(sample(2), theta) and calls.take() == 2 * 2
    enable_rlg(pipe, 0.0)
    assert torch.equal(sample(2), base) and calls.take() == 2 * 2
    disable_rlg(pipe)
    assert rlg_scale(pipe) is None and torch.equal(sample(2), theta)
    den = pipe.transformer
    assert len(den._forward_hooks) == 0 and len(den._forward_pre_hooks) == 1  # only the counter


def test_family_contract():
    from flowalign.rollout import SAMPLERS
    from flowalign.runtime import fsdp

    adapter = _adapter()
    names = [n for n, _ in adapter.denoiser.named_modules()]
    for target in adapter.lora_target_modules:
        assert any(n == target or n.endswith("." + target) for n in names), target
    assert len(fsdp.blocks(adapter.denoiser, adapter.fsdp_blocks)) == 2  # 1 double-stream + 1 single-stream block
    assert SAMPLERS[adapter.default_sampler].flow and adapter.condition_image and not adapter.video
    assert lora.add_lora(adapter, rank=2)
    x = adapter.prepare_latents(1, generator=torch.Generator().manual_seed(0), **SIZE)
    grid = adapter.sampling_grid(2, x)
    out = adapter.predict(x, grid.timesteps[:1], adapter.encode_prompts(["a"], 1.0, images=_images(1), **SIZE), 1.0)
    assert out.dtype == torch.float32 and out.shape == x.shape == (1, 4, 8, 8) and torch.isfinite(out).all()
    with torch.no_grad():
        images = adapter.decode(x)
    assert images.shape == (1, 3, 16, 16) and 0 <= float(images.min()) <= float(images.max()) <= 1
