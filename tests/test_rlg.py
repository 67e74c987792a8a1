"""RL Guidance: bit-exact endpoints, linear mix, one evaluation at w in {0, 1}, zero_init_step, fused / unloaded
LoRAs refused, and the docs/math.md §7 Gaussian check (base N(0,1), fine-tuned N(mu,1) -> scale w samples N(w mu,
1))."""

import pytest
import torch

from flowalign import lora
from flowalign.models import ADAPTERS, adapter_for
from flowalign.toy.tiny_families import TINY_BUILDERS, TINY_SETTINGS, tiny_condition_images
from flowalign.rlg import disable_rlg, enable_rlg, rlg_mix, rlg_scale
from flowalign.samplers import flow_ode_step, flow_sde_step


PROMPT = ["a red circle"]
RLG_KW = {  # on top of each family's tiny pipe(...) keywords (TINY_SETTINGS)
    # true CFG: FLUX calls the transformer once per CFG branch, each call is mixed
    "flux": dict(negative_prompt="", true_cfg_scale=2.0),
    "flux_kontext": dict(negative_prompt="", true_cfg_scale=2.0),
    "sd": dict(height=16, width=16),
    "sdxl": dict(height=16, width=16),
}
CALL_KW = {f: {**s["call"], **RLG_KW.get(f, {})} for f, s in TINY_SETTINGS.items()}
# denoiser calls per step at guidance 3: one batched CFG call, or one per branch (Wan, true CFG, FLUX.2 [klein]);
# FLUX.2 [dev] and Kontext without true CFG embed the guidance (one call); Z-Image batches [2B] rows in one
CALLS_PER_STEP = {"sd3": 1, "flux": 2, "sd": 1, "sdxl": 1, "wan": 2, "flux_kontext": 2, "flux2": 1,
                  "flux2_klein": 2, "zimage": 1, "wan_i2v": 2, "qwenimage": 1, "qwenimage_edit": 1,
                  "qwenimage_edit_plus": 1}  # Qwen: no negative prompt given, so no true CFG
VIDEO = ("wan", "wan_i2v")


def _saved_lora(family, path, seed=1):
    """Save a random nonzero LoRA (add_lora, B randomised) of a tiny ``family`` pipeline to ``path``."""
    pipe = TINY_BUILDERS[family]()
    adapter = adapter_for(pipe, **TINY_SETTINGS[family]["adapter"])
    params = lora.add_lora(adapter, rank=4)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(0.3 * torch.randn(p.shape, generator=gen))
    lora.save_lora(adapter, str(path))
    return str(path)


def _sample(pipe, family, steps, **kw):
    if ADAPTERS[family].condition_image:  # edit / image-to-video: one condition image
        kw["image"] = tiny_condition_images(1, size=CALL_KW[family]["height"])[0]
    # prompt= by name: FLUX.2's first positional argument is a reference image
    # a copy: ZImagePipeline writes the chat-templated prompts back into the list it is given
    terminal = pipe.scheduler.config.get("shift_terminal")
    if steps == 1 and terminal:  # diffusers stretches a one-sigma grid to the terminal by dividing by 0 (NaN):
        pipe.scheduler.register_to_config(shift_terminal=None)  # the single-step checks run without the stretch
    try:
        out = pipe(prompt=list(PROMPT), num_inference_steps=steps, guidance_scale=3.0,
                   generator=torch.Generator().manual_seed(0), output_type="latent", **CALL_KW[family], **kw)
    finally:
        pipe.scheduler.register_to_config(shift_terminal=terminal)
    return out.frames if family in VIDEO else out.images


class CallCounter:
    """Counts forward calls of a module (nested ones included)."""

    def __init__(self, module):
        self.n = 0
        module.register_forward_pre_hook(self._hook)

    def _hook(self, *_):
        self.n += 1

    def take(self):
        n, self.n = self.n, 0
        return n


@pytest.mark.parametrize("family", list(TINY_BUILDERS))
def test_rlg_on_pipeline(family, tmp_path):
    pipe = TINY_BUILDERS[family]()
    pipe.set_progress_bar_config(disable=True)
    den = pipe.transformer if hasattr(pipe, "transformer") else pipe.unet
    calls = CallCounter(den)
    with pytest.raises(ValueError, match="no LoRA adapter"):
        enable_rlg(pipe, 1.0)
    base, base1 = _sample(pipe, family, 2), _sample(pipe, family, 1)  # the pipeline without LoRA
    calls.take()
    pipe.load_lora_weights(_saved_lora(family, tmp_path / "lora"))
    theta, theta1 = _sample(pipe, family, 2), _sample(pipe, family, 1)
    per_run = 2 * CALLS_PER_STEP[family]
    assert calls.take() == per_run + per_run // 2
    assert (theta - base).abs().max() > 1e-2  # the LoRA changes the output

    # 0 < w: the exact linear mix at the level of one step (Euler / DDIM steps are affine in the output)
    enable_rlg(pipe, 0.5)
    assert rlg_scale(pipe) == 0.5
    mix1 = _sample(pipe, family, 1)
    assert calls.take() == 2 * per_run // 2  # two evaluations per call
    torch.testing.assert_close(mix1, base1 + 0.5 * (theta1 - base1), atol=1e-4, rtol=1e-4)
    assert (mix1 - base1).abs().max() > 1e-3 and (mix1 - theta1).abs().max() > 1e-3

    # calling again changes the scale (one set of hooks): w = 1 is the adapter, one evaluation per call
    enable_rlg(pipe, 1.0)
    assert torch.equal(_sample(pipe, family, 2), theta)
    assert calls.take() == per_run
    enable_rlg(pipe, 0.0)
    assert torch.equal(_sample(pipe, family, 2), base)
    assert calls.take() == per_run

    # disable restores the plain pipeline (LoRA on) and removes every hook
    disable_rlg(pipe)
    assert rlg_scale(pipe) is None
    assert torch.equal(_sample(pipe, family, 2), theta)
    assert calls.take() == per_run
    assert len(den._forward_hooks) == 0 and len(den._forward_pre_hooks) == 1  # only the counter


@pytest.mark.parametrize("family", ["sd3", "sd", "wan"])
def test_zero_init_step(family, tmp_path):
    """zero_init_step=1 at w=0: step 0 fine-tuned, then base == the plain pipeline with the LoRA switched off
    by the pipeline's own step callback after step 0."""
    pipe = TINY_BUILDERS[family]()
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(_saved_lora(family, tmp_path / "lora"))

    def lora_off_after_first(p, i, t, kw):
        if i == 0:
            p.disable_lora()
        return kw

    expected = _sample(pipe, family, 3, callback_on_step_end=lora_off_after_first)
    pipe.enable_lora()
    theta = _sample(pipe, family, 3)
    enable_rlg(pipe, 0.0, zero_init_step=1)
    got = _sample(pipe, family, 3)
    assert torch.equal(got, expected)
    assert not torch.equal(got, theta)
    assert torch.equal(_sample(pipe, family, 3), expected)  # the step count restarts with each call
    enable_rlg(pipe, 0.0, zero_init_step=3)  # every step fine-tuned
    assert torch.equal(_sample(pipe, family, 3), theta)


def test_named_adapter_add_lora_and_pipeline_features():
    """adapter_name picks one adapter of several (added by flowalign.lora); PIL output and callbacks work."""
    pipe = TINY_BUILDERS["sd3"]()
    pipe.set_progress_bar_config(disable=True)
    adapter = adapter_for(pipe, max_sequence_length=16)
    gen = torch.Generator().manual_seed(3)
    for name in ("a", "b"):
        with torch.no_grad():
            for p in lora.add_lora(adapter, rank=2, adapter_name=name, trainable=False):
                p.add_(0.3 * torch.randn(p.shape, generator=gen))
    assert lora.active_adapter(adapter) == "b"
    with lora.using_adapter(adapter, "a"):
        out_a = _sample(pipe, "sd3", 2)
    out_b = _sample(pipe, "sd3", 2)
    assert not torch.equal(out_a, out_b)
    with pytest.raises(ValueError, match="no LoRA adapter named 'c'"):
        enable_rlg(pipe, 1.0, adapter_name="c")
    enable_rlg(pipe, 1.0, adapter_name="a")
    assert torch.equal(_sample(pipe, "sd3", 2), out_a)
    assert lora.active_adapter(adapter) == "b"  # restored after each call
    steps = []
    enable_rlg(pipe, 1.5)
    out = pipe(PROMPT * 2, num_inference_steps=2, guidance_scale=3.0, max_sequence_length=16, output_type="pil",
               callback_on_step_end=lambda p, i, t, kw: steps.append(i) or kw)
    assert steps == [0, 1] and len(out.images) == 2 and out.images[0].size == (32, 32)
    # a failing forward leaves the adapters as they were (the forward hook runs with always_call)
    enable_rlg(pipe, 0.0)
    with pytest.raises(Exception):
        pipe.transformer(hidden_states=torch.zeros(1, 3, 5, 5), timestep=torch.ones(1))
    layers = [m for m in pipe.transformer.modules() if hasattr(m, "disable_adapters") and hasattr(m, "lora_A")]
    assert layers and not any(m.disable_adapters for m in layers)
    for bad in (dict(scale=float("nan")), dict(scale=1.0, zero_init_step=-1)):
        with pytest.raises(ValueError):
            enable_rlg(pipe, **bad)
    disable_rlg(pipe)
    disable_rlg(pipe)  # idempotent


def _lora_pipe(family, tmp_path):
    """(pipe, its denoiser, base output, LoRA output): a tiny pipeline sampled before and after loading a LoRA."""
    pipe = TINY_BUILDERS[family]()
    pipe.set_progress_bar_config(disable=True)
    den = pipe.transformer if hasattr(pipe, "transformer") else pipe.unet
    base = _sample(pipe, family, 2)
    pipe.load_lora_weights(_saved_lora(family, tmp_path / "lora"))
    return pipe, den, base, _sample(pipe, family, 2)


@pytest.mark.parametrize("family", list(TINY_BUILDERS))
def test_rlg_fused_lora_refused_until_unfused(family, tmp_path):
    """fuse_lora merges the LoRA into the base weights: enable_rlg refuses, a call after a fuse raises (peft would
    silently un-merge the disabled layers) and leaves the fuse as it was; unfuse_lora makes the same hooks work."""
    pipe, den, base, theta = _lora_pipe(family, tmp_path)
    layers = lora.lora_layers(den)
    pipe.fuse_lora()
    assert all(m.merged for m in layers)
    with pytest.raises(ValueError, match=r"fused into the denoiser.*call pipe\.unfuse_lora\(\) before enable_rlg"):
        enable_rlg(pipe, 0.0)
    assert rlg_scale(pipe) is None
    pipe.unfuse_lora()
    enable_rlg(pipe, 0.0)
    pipe.fuse_lora()
    with pytest.raises(RuntimeError, match=r"fused into its weights \(fuse_lora\) after enable_rlg.*unfuse_lora\(\)"):
        _sample(pipe, family, 2)
    assert all(m.merged for m in layers) and not any(m.disable_adapters for m in layers)  # not un-fused, not left off
    assert rlg_scale(pipe) == 0.0
    pipe.unfuse_lora()  # RLG (enabled before the fuse) works again
    got0 = _sample(pipe, family, 2)
    enable_rlg(pipe, 1.0)
    got1 = _sample(pipe, family, 2)
    enable_rlg(pipe, 0.5)
    mix = _sample(pipe, family, 1)
    disable_rlg(pipe)
    theta_u, theta_u1 = _sample(pipe, family, 2), _sample(pipe, family, 1)
    pipe.disable_lora()
    base_u, base_u1 = _sample(pipe, family, 2), _sample(pipe, family, 1)
    pipe.enable_lora()
    # bit for bit against the unfused pipeline (unmerge restores the weights up to rounding: close to the originals)
    assert torch.equal(got0, base_u) and torch.equal(got1, theta_u)
    torch.testing.assert_close(mix, base_u1 + 0.5 * (theta_u1 - base_u1), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(base_u, base, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(theta_u, theta, atol=1e-4, rtol=1e-4)
    assert (theta - base).abs().max() > 1e-2


@pytest.mark.parametrize("family", ["sd3", "sd"])
def test_rlg_unloaded_lora_raises(family, tmp_path):
    """unload_lora_weights with RLG on: the call raises instead of returning the wrong model under the scale; after
    fuse + unload the LoRA stays in the base weights (w = 0 gave the LoRA output), enable_rlg refuses even after a
    reload; a plain unload + reload works once RLG is enabled again."""
    pipe, den, base, theta = _lora_pipe(family, tmp_path)
    enable_rlg(pipe, 0.0)
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    assert not lora.lora_layers(den)
    with pytest.raises(RuntimeError, match=r"LoRA adapter of \w+ was unloaded.*cannot be separated.*disable_rlg"):
        _sample(pipe, family, 2)
    assert rlg_scale(pipe) == 0.0
    disable_rlg(pipe)
    torch.testing.assert_close(_sample(pipe, family, 2), theta, atol=1e-4, rtol=1e-4)  # the LoRA is in the weights
    gone = r"fused \(fuse_lora\) and then unloaded.*reload the pipeline"
    with pytest.raises(ValueError, match=gone):
        enable_rlg(pipe, 0.0)
    pipe.load_lora_weights(_saved_lora(family, tmp_path / "lora"))  # LoRA layers again, on the fused weights
    with pytest.raises(ValueError, match=gone):
        enable_rlg(pipe, 0.0)

    pipe, den, base, theta = _lora_pipe(family, tmp_path)
    enable_rlg(pipe, 1.0)
    pipe.unload_lora_weights()
    with pytest.raises(RuntimeError, match="was unloaded"):  # w = 1 would have returned the base model
        _sample(pipe, family, 2)
    with pytest.raises(ValueError, match="no LoRA adapter"):
        enable_rlg(pipe, 1.0)
    pipe.load_lora_weights(_saved_lora(family, tmp_path / "lora"))
    with pytest.raises(RuntimeError, match=r"LoRA layers of \w+ changed.*call enable_rlg"):
        _sample(pipe, family, 2)
    enable_rlg(pipe, 1.0)
    assert torch.equal(_sample(pipe, family, 2), theta)
    enable_rlg(pipe, 0.0)
    assert torch.equal(_sample(pipe, family, 2), base)


# ---- docs/math.md §7: exact velocities of Gaussian data ------------------------------------------------------
class GaussianVelocity(torch.nn.Module):
    """Exact flow velocity ``E[eps - x0 | x_t]`` for data N(mu, 1), ``x_t = (1-t) x0 + t eps``:
    ``v(x, t) = (2t - 1) / ((1-t)^2 + t^2) * (x - (1-t) mu) - mu``."""

    def __init__(self, mu: float):
        super().__init__()
        self.mu = mu

    def forward(self, x, t):
        s2 = (1 - t) ** 2 + t**2
        return (2 * t - 1) / s2 * (x - (1 - t) * self.mu) - self.mu


@pytest.mark.parametrize("sampler", ["ode", "sde"])
def test_gaussian_rlg_samples_scaled_mean(sampler):
    mu, n, steps = 1.5, 10_000, 100
    ref, tuned = GaussianVelocity(0.0), GaussianVelocity(mu)
    sigmas = torch.linspace(1, 0, steps + 1)
    for w in (0.0, 0.5, 1.0, 2.0):
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(n, 1, generator=gen)
        for k in range(steps):
            t, t_next = sigmas[k].item(), sigmas[k + 1].item()
            v = rlg_mix(ref(x, t), tuned(x, t), w)
            step = flow_ode_step(v, x, t, t_next) if sampler == "ode" else \
                flow_sde_step(v, x, t, t_next, noise_level=0.7, generator=gen)
            x = step.prev_sample
        assert abs(x.mean().item() - w * mu) < 0.05, (w, x.mean().item())
        assert abs(x.std().item() - 1.0) < 0.05, (w, x.std().item())


def test_rlg_mix_endpoints_exact():
    a, b = torch.randn(3, 4), torch.randn(3, 4)
    assert rlg_mix(a, b, 0.0) is a and rlg_mix(a, b, 1) is b
    torch.testing.assert_close(rlg_mix(a, b, 2.0), 2 * b - a)
