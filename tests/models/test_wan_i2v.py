"""Wan image-to-video (WanImageToVideoPipeline): the ODE rollout equals ``pipe(image=...)`` for Wan2.1 (CLIP image
tokens), Wan2.2 A14B (two experts) and Wan2.2-TI2V-5B (expand_timesteps); the condition tensors, the null branch
seeing the image, re-scoring, the LoRA round trip and the input checks."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from PIL import Image

from flowalign import lora
from flowalign.models.base import image_tensor
from flowalign.models.wan_i2v import WanI2VAdapter
from flowalign.rollout import rescore, rollout
from flowalign.toy.pipelines_wan import tiny_wan_i2v_pipeline

PROMPTS = ["a red circle", "two blue squares above"]
SIZE = dict(height=32, width=32, num_frames=5)
CALL = dict(SIZE, max_sequence_length=16)
VERSIONS = ["2.1", "2.2", "2.2-5b"]


def _image(seed=0, size=32):
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((size, size, 3)) * 255).astype(np.uint8))


def _make(version, **kw):
    pipe = tiny_wan_i2v_pipeline(version)
    pipe.set_progress_bar_config(disable=True)
    return pipe, WanI2VAdapter(pipe, max_sequence_length=16, **kw)


@pytest.mark.parametrize("version", VERSIONS)
def test_ode_rollout_equals_pipeline(version, gen):
    pipe, adapter = _make(version)
    images = [_image(0), _image(1)]
    calls = {"transformer": 0, "transformer_2": 0}
    for name in calls:
        if getattr(pipe, name) is not None:
            getattr(pipe, name).register_forward_pre_hook(lambda *_, n=name: calls.__setitem__(n, calls[n] + 1))
    outs = [pipe(image=im, prompt=[p], num_inference_steps=3, guidance_scale=3.0, generator=gen(i),
                 output_type="latent", **CALL).frames for i, (im, p) in enumerate(zip(images, PROMPTS))]
    ref = torch.cat(outs)
    if version == "2.2":  # both experts ran: 1 high-noise step, 2 low-noise ones, two CFG passes each, two videos
        assert calls == {"transformer": 4, "transformer_2": 8}
    traj = rollout(adapter, PROMPTS, num_steps=3, guidance_scale=3.0, sampler="flow_ode", noise_level=0.0,
                   generator=[gen(0), gen(1)], images=images, **SIZE)
    assert traj.final.shape == ref.shape == (2, 4, 2, 4, 4)
    torch.testing.assert_close(traj.final, ref.float(), atol=1e-5, rtol=1e-5)
    assert (traj.latents[:, 0] - traj.final).abs().max() > 0.1
    if version == "2.2-5b":  # the first latent frame ends on the image's latents, as the pipeline replaces it
        torch.testing.assert_close(traj.final[:, :, :1], traj.cond.cond["condition"], atol=1e-5, rtol=1e-5)
    # the image matters
    other = rollout(adapter, PROMPTS, num_steps=3, guidance_scale=3.0, sampler="flow_ode", noise_level=0.0,
                    generator=[gen(0), gen(1)], images=[_image(2), _image(3)], **SIZE)
    assert (other.final - traj.final).abs().max() > 1e-3


def test_condition_tensors_and_null_branch():
    pipe, adapter = _make("2.1")
    cond = adapter.encode_prompts(PROMPTS, 3.0, images=[_image(0), _image(0)], **SIZE)
    c = cond.cond["condition"]
    assert c.shape == (2, 4 + 4, 2, 4, 4)  # mask (4 temporal slots of frame 0) + image latents, F' = 2
    assert torch.equal(c[:, :4, 0], torch.ones_like(c[:, :4, 0])) and not c[:, :4, 1:].any()
    tokens = cond.cond["encoder_hidden_states_image"]
    assert tokens.shape == (2, 17, 16)  # CLIP: 16 patches + class token, hidden_states[-2]
    for k in ("condition", "encoder_hidden_states_image"):
        assert torch.equal(cond.uncond[k], cond.cond[k])  # the null branch sees the image
    assert not torch.equal(cond.uncond["encoder_hidden_states"], cond.cond["encoder_hidden_states"])
    # a tensor image made from the PIL one encodes identically; one not on the 8-bit grid also works
    again = adapter.encode_prompts(PROMPTS[:1], 1.0, images=[image_tensor(_image(0))], **SIZE)
    assert torch.equal(again.cond["condition"], c[:1])
    smooth = torch.linspace(0, 1, 3 * 32 * 32).view(3, 32, 32) * 0.999
    rows = adapter.encode_prompts(PROMPTS[:1], 1.0, images=[smooth], **SIZE).cond
    assert rows["condition"].shape == c[:1].shape and torch.isfinite(rows["condition"]).all()
    # Wan2.2 A14B: no image tokens; TI2V-5B: the first frame's latents only
    assert "encoder_hidden_states_image" not in _make("2.2")[1].encode_prompts(
        PROMPTS[:1], images=[_image()], **SIZE).cond
    five = _make("2.2-5b")[1].encode_prompts(PROMPTS[:1], images=[_image()], **SIZE).cond["condition"]
    assert five.shape == (1, 4, 1, 4, 4)


def test_input_errors():
    _, adapter = _make("2.1")
    with pytest.raises(ValueError, match="pass images="):
        adapter.encode_prompts(PROMPTS)
    with pytest.raises(ValueError, match="divisible by 16"):
        adapter.encode_prompts(PROMPTS[:1], images=[_image()], height=24, width=32, num_frames=5)
    with pytest.raises(ValueError, match="num_frames - 1"):
        adapter.encode_prompts(PROMPTS[:1], images=[_image()], height=32, width=32, num_frames=4)
    with pytest.raises(ValueError, match="one image per prompt"):
        adapter.encode_prompts(PROMPTS, images=[_image()], **SIZE)


@pytest.mark.parametrize("version", ["2.1", "2.2-5b"])
def test_rescore_reproduces_logprobs(version, gen):
    _, adapter = _make(version)
    params = lora.add_lora(adapter, rank=2)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in params:
            p.add_(0.3 * torch.randn(p.shape, generator=g))
    traj = rollout(adapter, PROMPTS, num_steps=3, guidance_scale=2.0, sampler="flow_sde", generator=gen(0),
                   record_means=True, images=[_image(0), _image(1)], **SIZE)
    for k in traj.stochastic_steps:
        step = rescore(adapter, traj, k)
        torch.testing.assert_close(step.log_prob(), traj.log_probs[:, k], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(step.mean, traj.means[:, k], atol=1e-5, rtol=1e-5)
    k = traj.stochastic_steps[0]
    step = rescore(adapter, traj, k)
    step.log_prob().sum().backward()
    assert sum(float(p.grad.abs().sum()) for p in params if p.grad is not None) > 0
    if version == "2.2-5b":  # frame 0's mean is the clean frame's: it does not depend on the weights
        with torch.no_grad():
            for p in params:
                p.add_(0.3)
        moved = rescore(adapter, traj, k).mean
        assert torch.equal(moved[:, :, 0], step.mean[:, :, 0].detach())
        assert (moved[:, :, 1:] - step.mean[:, :, 1:]).abs().max() > 1e-4


def test_lora_round_trip_includes_the_image_attention(gen, tmp_path):
    pipe, adapter = _make("2.1")
    images = [_image(0), _image(1)]
    params = lora.add_lora(adapter, rank=4, alpha=8)
    names = [n for n, _ in adapter.denoiser.named_modules()]
    assert any(n.endswith("attn2.add_k_proj.lora_A") for n in names)  # the image cross-attention is adapted
    with torch.no_grad():
        for p in params:
            p.add_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    traj = rollout(adapter, PROMPTS, num_steps=3, guidance_scale=3.0, sampler="flow_ode", generator=[gen(0), gen(1)],
                   images=images, **SIZE)
    with lora.adapter_disabled(adapter):
        base = rollout(adapter, PROMPTS, num_steps=3, guidance_scale=3.0, sampler="flow_ode",
                       generator=[gen(0), gen(1)], images=images, **SIZE)
    assert (traj.final - base.final).abs().max() > 1e-2
    lora.save_lora(adapter, str(tmp_path))
    fresh, _ = _make("2.1")
    fresh.load_lora_weights(str(tmp_path))
    outs = [fresh(image=im, prompt=[p], num_inference_steps=3, guidance_scale=3.0, generator=gen(i),
                  output_type="latent", **CALL).frames for i, (im, p) in enumerate(zip(images, PROMPTS))]
    torch.testing.assert_close(traj.final, torch.cat(outs), atol=1e-5, rtol=1e-5)
