"""LoRA: diffusers-format round trip, disabled adapter = base model, named adapters, precision."""

import pytest
import torch

from flowalign import lora
from flowalign.evaluation.sampling import sample_images
from flowalign.models import ADAPTERS
from flowalign.models.base import image_tensor
from flowalign.toy.tiny_families import TINY_BUILDERS
from flowalign.rollout import rollout



PROMPTS = ["a red circle", "two blue squares above"]


def _predict(adapter, x, g=3.0, **condition):
    t = adapter.sampling_grid(3, x).timesteps[1]
    return adapter.predict(x, t, adapter.encode_prompts(PROMPTS, g, **condition), g)


@pytest.mark.parametrize("family", list(TINY_BUILDERS))
def test_save_load_round_trip_and_disable(family, gen, tmp_path, h):
    pipe, adapter = h.make_adapter(family)
    cond = h.condition(family, len(PROMPTS))  # sizes, and condition images for edit / image-to-video families
    x = adapter.prepare_latents(2, generator=gen(0), **h.SIZE_KW.get(family, {}))
    base = _predict(adapter, x, **cond)
    params = lora.add_lora(adapter, rank=4, alpha=8)  # alpha != rank: the saved metadata must carry it
    assert all(p.dtype == torch.float32 and p.requires_grad for p in params)
    torch.testing.assert_close(_predict(adapter, x, **cond), base)  # B = 0 at init
    h.nonzero_lora(params)
    tuned = _predict(adapter, x, **cond)
    assert (tuned - base).abs().max() > 1e-2
    with lora.adapter_disabled(adapter):
        torch.testing.assert_close(_predict(adapter, x, **cond), base, atol=0, rtol=0)
    torch.testing.assert_close(_predict(adapter, x, **cond), tuned, atol=0, rtol=0)  # re-enabled

    lora.save_lora(adapter, str(tmp_path))
    fresh, fresh_adapter = h.make_adapter(family)
    fresh.load_lora_weights(str(tmp_path))
    torch.testing.assert_close(_predict(fresh_adapter, x, **cond), tuned, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", [f for f in TINY_BUILDERS if not ADAPTERS[f].video])
def test_pipeline_output_after_round_trip(family, gen, tmp_path, h):
    """A fresh pipeline with the saved LoRA, called as the adapter samples (``call_kwargs``), reproduces our LoRA
    ODE rollout, decoded."""
    pipe, adapter = h.make_adapter(family)
    h.nonzero_lora(lora.add_lora(adapter, rank=4))
    cond = h.condition(family, len(h.PROMPTS))
    images = cond.pop("images", None)
    traj = rollout(adapter, h.PROMPTS, num_steps=3, guidance_scale=3.0, sampler="flow_ode" if adapter.is_flow
                   else "ddim", noise_level=0.0, generator=[gen(i) for i in range(2)], images=images, **cond)
    lora.save_lora(adapter, str(tmp_path))
    fresh, fresh_adapter = h.make_adapter(family)
    fresh.load_lora_weights(str(tmp_path))
    tensors = None if images is None else [image_tensor(im) for im in images]
    out = sample_images(fresh, h.PROMPTS, seed=0, steps=3, guidance_scale=3.0, images=tensors, adapter=fresh_adapter,
                        resolution=cond.get("height"))
    torch.testing.assert_close(out, adapter.decode(traj.final).float(), atol=1e-4, rtol=1e-4)
    fresh.disable_lora()  # and the loaded LoRA is what makes it so
    base = sample_images(fresh, h.PROMPTS, seed=0, steps=3, guidance_scale=3.0, images=tensors, adapter=fresh_adapter,
                         resolution=cond.get("height"))
    assert (base - out).abs().max() > 1e-3


def test_named_adapters_switch_and_load(gen, tmp_path, h):
    _, adapter = h.make_adapter("sd3")
    x = adapter.prepare_latents(2, generator=gen(0))
    teacher = lora.add_lora(adapter, rank=2, adapter_name="teacher", trainable=False)
    h.nonzero_lora(teacher, seed=5)
    y_teacher = _predict(adapter, x)
    lora.save_lora(adapter, str(tmp_path), adapter_name="teacher")
    student = lora.add_lora(adapter, rank=2, adapter_name="student")
    h.nonzero_lora(student, seed=6)
    assert lora.active_adapter(adapter) == "student"
    y_student = _predict(adapter, x)
    assert (y_student - y_teacher).abs().max() > 1e-2
    with lora.using_adapter(adapter, "teacher"):
        torch.testing.assert_close(_predict(adapter, x), y_teacher, atol=0, rtol=0)
    assert lora.active_adapter(adapter) == "student"
    assert all(p.requires_grad for p in student) and not any(p.requires_grad for p in teacher)
    # a saved adapter loads back under another name and predicts like the original
    lora.load_lora(adapter, str(tmp_path), adapter_name="teacher_copy")
    assert lora.active_adapter(adapter) == "student"
    lora.set_active_adapter(adapter, "teacher_copy")
    torch.testing.assert_close(_predict(adapter, x), y_teacher, atol=1e-5, rtol=1e-5)
    with pytest.raises(KeyError, match="no LoRA adapter"):
        lora.set_active_adapter(adapter, "nope")


def test_mixed_precision_and_checkpointing(gen, h):
    _, adapter = h.make_adapter("sd3")
    params = lora.add_lora(adapter, rank=2)
    h.nonzero_lora(params)
    lora.set_precision(adapter, torch.bfloat16)
    lora.set_gradient_checkpointing(adapter, True)
    assert adapter.dtype == torch.bfloat16 and all(p.dtype == torch.float32 for p in params)
    x = adapter.prepare_latents(1, generator=gen(0))
    adapter.denoiser.train()
    v = adapter.predict(x, 500.0, adapter.encode_prompts(h.PROMPTS[:1]), 1.0)
    assert v.dtype == torch.float32 and torch.isfinite(v).all()
    v.square().mean().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in params)


def test_adapter_disabled_keeps_a_frozen_active_adapter_frozen():
    # peft's enable_adapters(True) sets requires_grad on the active adapter; a frozen teacher must stay frozen.
    from flowalign.models import adapter_for
    from flowalign.toy.pipelines import tiny_sd3_pipeline

    adapter = adapter_for(tiny_sd3_pipeline(image_size=16))
    teacher = lora.add_lora(adapter, rank=4, adapter_name="teacher", trainable=False)
    lora.set_active_adapter(adapter, "teacher")
    assert not any(p.requires_grad for p in teacher)
    with lora.adapter_disabled(adapter):
        pass
    assert not any(p.requires_grad for p in teacher)
    assert lora.active_adapter(adapter) == "teacher"


@pytest.mark.parametrize("dtype,rest", [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float32)])
def test_pipeline_call_runs_on_a_reduced_precision_denoiser(dtype, rest):
    # bf16: the whole pipeline bf16 except the LoRA; fp16: the denoiser only, so the pipeline's own __call__
    # (held-out evaluation) feeds it float32 latents, cast by the hooks. Both must run, and float32 after
    # set_precision(float32) too (the cast hooks go).
    from flowalign.evaluation.sampling import sample_images
    from flowalign.models import adapter_for
    from flowalign.toy.pipelines import tiny_sd3_pipeline

    adapter = adapter_for(tiny_sd3_pipeline(image_size=16))
    params = lora.add_lora(adapter, rank=2)
    seen = []
    adapter.denoiser.register_forward_hook(lambda m, a, k, out: seen.append(k["hidden_states"].dtype),
                                           with_kwargs=True)
    lora.set_precision(adapter, dtype)
    lora.set_precision(adapter, dtype)  # twice: one cast hook, not two
    images = sample_images(adapter.pipe, ["a red circle", "a square"], steps=2, guidance_scale=2.0)
    assert images.shape == (2, 3, 16, 16) and torch.isfinite(images).all()
    assert seen and set(seen) == {dtype} and all(p.dtype == torch.float32 for p in params)
    pipe = adapter.pipe
    assert {pipe.text_encoder.dtype, pipe.text_encoder_2.dtype, pipe.text_encoder_3.dtype, pipe.vae.dtype} == {rest}
    assert len(adapter.denoiser._forward_pre_hooks) == 1
    lora.set_precision(adapter, torch.float32)  # back to full precision: the hooks go, every weight float32
    assert {p.dtype for p in pipe.vae.parameters()} | {p.dtype for p in pipe.text_encoder_3.parameters()} == {
        torch.float32}
    seen.clear()
    sample_images(adapter.pipe, ["a circle"], steps=1, guidance_scale=1.0)
    assert seen == [torch.float32]


@pytest.mark.parametrize("dtype,rest", [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float32)])
def test_load_dtypes_load_the_big_weights_in_reduced_precision(tmp_path, dtype, rest):
    # from_pretrained(torch_dtype=load_dtypes(dtype)): the denoiser (with bf16 every component) never exists
    # in float32; fp16 leaves text encoders and VAE float32 (T5 and SDXL's VAE overflow in fp16)
    from flowalign.models import load_pipeline
    from flowalign.toy.pipelines import tiny_sd3_pipeline

    assert lora.load_dtypes(torch.float32) is None
    tiny_sd3_pipeline(image_size=16).save_pretrained(str(tmp_path))
    pipe = load_pipeline(str(tmp_path), torch_dtype=lora.load_dtypes(dtype))
    assert pipe.transformer.dtype == dtype
    assert {pipe.text_encoder.dtype, pipe.text_encoder_2.dtype, pipe.text_encoder_3.dtype, pipe.vae.dtype} == {rest}
