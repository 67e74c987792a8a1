"""Two-expert Wan2.2 (WanPipeline with transformer_2 and boundary_ratio): the ODE rollout equals the pipeline with
both experts used, rows split by expert, guidance_scale_2, re-scoring at steps of each expert, LoRA on one or both
experts (round trip into a fresh pipeline, disabled = base, precision, checkpointing), RLG on both experts, and
GRPO / NFT iterations."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from flowalign import lora
from flowalign.config import Config, GRPOConfig, ModelConfig, NFTConfig, SamplingConfig, TrainConfig
from flowalign.models.wan import WanAdapter
from flowalign.rewards import Reward
from flowalign.rlg import disable_rlg, enable_rlg
from flowalign.rollout import rescore, rollout
from flowalign.runtime import fsdp
from flowalign.toy.pipelines import tiny_wan_pipeline
from flowalign.toy.pipelines_wan import tiny_wan22_pipeline

PROMPTS = ["a red circle", "two blue squares above"]
SIZE = dict(height=32, width=32, num_frames=5)
CALL = dict(SIZE, max_sequence_length=16)


def _make(seed=0, **kw):
    pipe = tiny_wan22_pipeline(seed=seed)
    pipe.set_progress_bar_config(disable=True)
    return pipe, WanAdapter(pipe, max_sequence_length=16, **kw)


class Calls:
    """Forward calls per expert."""

    def __init__(self, pipe):
        self.n = {"transformer": 0, "transformer_2": 0}
        self.handles = [getattr(pipe, k).register_forward_pre_hook(self._hook(k)) for k in self.n]

    def _hook(self, name):
        def hook(*_):
            self.n[name] += 1
        return hook

    def take(self):
        out, self.n = dict(self.n), dict.fromkeys(self.n, 0)
        return out

    def remove(self):
        for h in self.handles:
            h.remove()


def _x_and_steps(adapter, gen):
    x = adapter.prepare_latents(2, generator=gen(0), **SIZE)
    ts = adapter.sampling_grid(3, x).timesteps
    return x, ts


@pytest.mark.parametrize("g2", [None, 1.5])
def test_ode_rollout_equals_pipeline_with_both_experts(g2, gen):
    pipe, adapter = _make(guidance_scale_2=g2)
    assert adapter.denoisers == (pipe.transformer, pipe.transformer_2) and adapter.denoiser is pipe.transformer
    calls = Calls(pipe)
    out = pipe(PROMPTS, num_inference_steps=3, guidance_scale=3.0, guidance_scale_2=g2, generator=gen(0),
               output_type="latent", **CALL).frames
    # the boundary 875 falls between the steps (t = 1000 | 834.7, 24.4): 1 high step, 2 low; two CFG calls each
    assert calls.take() == {"transformer": 2, "transformer_2": 4}
    traj = rollout(adapter, PROMPTS, num_steps=3, guidance_scale=3.0, sampler="flow_ode", noise_level=0.0,
                   generator=gen(0), **SIZE)
    assert calls.take() == {"transformer": 1, "transformer_2": 2}  # CFG batched: one call per step
    assert adapter.low_noise(traj.timesteps).tolist() == [False, True, True]
    torch.testing.assert_close(traj.final, out.float(), atol=1e-5, rtol=1e-5)
    assert (traj.latents[:, 0] - traj.final).abs().max() > 0.1
    if g2 is not None:  # guidance_scale_2 matters: the default (= guidance_scale) gives another video
        other = rollout(_make()[1], PROMPTS, num_steps=3, guidance_scale=3.0, sampler="flow_ode", noise_level=0.0,
                        generator=gen(0), **SIZE)
        assert (other.final - traj.final).abs().max() > 1e-3


def test_rows_at_different_steps_go_to_their_expert(gen):
    """A batch with one row per expert == each row alone (its expert, its CFG scale)."""
    _, adapter = _make(guidance_scale_2=1.5)
    x, ts = _x_and_steps(adapter, gen)
    cond = adapter.encode_prompts(PROMPTS, 3.0)
    t = torch.stack([ts[0], ts[1]])
    both = adapter.predict(x, t, cond, 3.0)
    for i in range(2):
        alone = adapter.predict(x[i:i + 1], t[i:i + 1], cond.select([i]), 3.0)
        assert torch.equal(both[i:i + 1], alone), i
    # the low-noise row really used transformer_2 with guidance 1.5: compare with the expert called by hand
    emb = {k: v[1:] for k, v in cond.cond.items()}
    nul = {k: v[1:] for k, v in cond.uncond.items()}
    den = adapter.denoisers[1]
    v_c = den(hidden_states=x[1:], timestep=t[1:], encoder_hidden_states=emb["encoder_hidden_states"],
              return_dict=False)[0]
    v_n = den(hidden_states=x[1:], timestep=t[1:], encoder_hidden_states=nul["encoder_hidden_states"],
              return_dict=False)[0]
    torch.testing.assert_close(both[1:], v_n + 1.5 * (v_c - v_n), atol=1e-5, rtol=1e-5)


def test_rescore_reproduces_logprobs_at_steps_of_each_expert(gen):
    _, adapter = _make()
    params = lora.add_lora(adapter, rank=2)
    assert {id(p) for p in params} >= {id(p) for d in adapter.denoisers for n, p in d.named_parameters() if "lora_" in n}
    _nonzero(params)
    traj = rollout(adapter, PROMPTS, num_steps=3, guidance_scale=2.0, sampler="flow_sde", generator=gen(0),
                   record_means=True, **SIZE)
    steps = list(traj.stochastic_steps)
    low = adapter.low_noise(traj.timesteps)
    assert not low[steps].all() and low[steps].any()  # stochastic steps of both experts
    for k in steps:
        step = rescore(adapter, traj, k)
        torch.testing.assert_close(step.log_prob(), traj.log_probs[:, k], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(step.mean, traj.means[:, k], atol=1e-5, rtol=1e-5)
    _nonzero(params, seed=2)
    for k in (steps[0], steps[-1]):  # one high-noise and one low-noise step: the gradient reaches that expert
        for p in params:
            p.grad = None
        step = rescore(adapter, traj, k)
        assert (step.log_prob() - traj.log_probs[:, k]).abs().max() > 1e-4
        step.log_prob().sum().backward()
        den = adapter.denoisers[int(low[k])]
        assert sum(float(p.grad.abs().sum()) for n, p in den.named_parameters() if p.grad is not None) > 0


def _nonzero(params, seed=1, scale=0.3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(scale * torch.randn(p.shape, generator=g))


def _predict(adapter, x, t, g=3.0):
    return adapter.predict(x, t, adapter.encode_prompts(PROMPTS, g), g)


@pytest.mark.parametrize("experts", ["both", "high", "low"])
def test_lora_on_chosen_experts_round_trip_into_a_fresh_pipeline(experts, gen, tmp_path):
    pipe, adapter = _make(lora_experts=experts)
    x, ts = _x_and_steps(adapter, gen)
    hi, lo = ts[0], ts[1]
    base = [_predict(adapter, x, t) for t in (hi, lo)]
    params = lora.add_lora(adapter, rank=4, alpha=8)
    on = {"both": (True, True), "high": (True, False), "low": (False, True)}[experts]
    assert tuple(bool(lora.lora_layers(d)) for d in adapter.denoisers) == on
    _nonzero(params)
    tuned = [_predict(adapter, x, t) for t in (hi, lo)]
    for b, tu, has in zip(base, tuned, on):
        assert ((tu - b).abs().max() > 1e-2) == has
    with lora.adapter_disabled(adapter):  # the reference: both experts' LoRA off
        for b, t in zip(base, (hi, lo)):
            assert torch.equal(_predict(adapter, x, t), b)
    assert torch.equal(_predict(adapter, x, lo), tuned[1])

    lora.save_lora(adapter, str(tmp_path))
    assert os.path.exists(tmp_path / "pytorch_lora_weights.safetensors") == on[0]
    assert os.path.exists(tmp_path / "transformer_2" / "pytorch_lora_weights.safetensors") == on[1]
    # diffusers' own calls: the high expert's file, then the low one's with load_into_transformer_2
    fresh, _ = _make()
    if on[0]:
        fresh.load_lora_weights(str(tmp_path))
    if on[1]:
        fresh.load_lora_weights(str(tmp_path / "transformer_2"), load_into_transformer_2=True)
    fresh_adapter = WanAdapter(fresh, max_sequence_length=16)
    for tu, t in zip(tuned, (hi, lo)):
        torch.testing.assert_close(_predict(fresh_adapter, x, t), tu, atol=1e-5, rtol=1e-5)
    # flowalign's loader does both, and the pipeline's own __call__ reproduces our LoRA rollout
    again, _ = _make()
    lora.load_lora_weights(again, str(tmp_path))
    assert tuple(bool(lora.lora_layers(d)) for d in (again.transformer, again.transformer_2)) == on
    traj = rollout(adapter, PROMPTS, num_steps=3, guidance_scale=3.0, sampler="flow_ode", generator=gen(0), **SIZE)
    out = again(PROMPTS, num_inference_steps=3, guidance_scale=3.0, generator=gen(0), output_type="latent",
                **CALL).frames
    torch.testing.assert_close(traj.final, out, atol=1e-5, rtol=1e-5)
    # the state dict names the second expert's keys
    keys = list(lora.lora_state_dict(adapter))
    assert any(k.startswith("transformer_2.") for k in keys) == on[1]
    assert any(not k.startswith("transformer_2.") for k in keys) == on[0]


def test_options_are_checked():
    pipe = tiny_wan_pipeline()
    with pytest.raises(ValueError, match="two-expert"):
        WanAdapter(pipe, max_sequence_length=16, guidance_scale_2=2.0)
    with pytest.raises(ValueError, match="two-expert"):
        WanAdapter(pipe, max_sequence_length=16, lora_experts="low")
    assert WanAdapter(pipe, max_sequence_length=16).denoisers == (pipe.transformer,)
    two, _ = _make()
    with pytest.raises(ValueError, match="lora_experts must be one of"):
        WanAdapter(two, lora_experts="middle")
    two.transformer_2 = None
    with pytest.raises(ValueError, match="no transformer_2"):
        WanAdapter(two)


def test_named_adapters_precision_checkpointing_and_fsdp_units(gen):
    _, adapter = _make()
    a = lora.add_lora(adapter, rank=2, adapter_name="a", trainable=False)
    b = lora.add_lora(adapter, rank=2, adapter_name="b")
    assert lora.adapter_names(adapter) == ["a", "b"] and lora.active_adapter(adapter) == "b"
    one = lora.add_lora(WanAdapter(tiny_wan_pipeline(), max_sequence_length=16), rank=2)
    assert len(a) == len(b) == 2 * len(one)  # both experts
    _nonzero(a, seed=3)
    _nonzero(b, seed=4)
    x, ts = _x_and_steps(adapter, gen)
    y_b = _predict(adapter, x, ts[1])
    with lora.using_adapter(adapter, "a"):
        y_a = _predict(adapter, x, ts[1])
        assert all(not p.requires_grad for p in a)
    assert (y_a - y_b).abs().max() > 1e-3 and torch.equal(_predict(adapter, x, ts[1]), y_b)

    lora.set_precision(adapter, torch.bfloat16)
    lora.set_gradient_checkpointing(adapter, True)
    for den in adapter.denoisers:
        assert den.dtype == torch.bfloat16 and den.is_gradient_checkpointing
        assert len(den._forward_pre_hooks) == 1  # the cast hook
    assert all(p.dtype == torch.float32 for p in a + b)
    for den in adapter.denoisers:
        den.train()
    v = adapter.predict(x[:1], ts[1], adapter.encode_prompts(PROMPTS[:1]), 1.0)
    assert v.dtype == torch.float32 and torch.isfinite(v).all()
    v.square().mean().backward()
    low = {id(p) for n, p in adapter.denoisers[1].named_parameters() if "lora_" in n}
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in b if id(p) in low)
    for den in adapter.denoisers:  # FSDP units: each expert's blocks
        assert len(fsdp.blocks(den, adapter.fsdp_blocks)) == 1


def _saved_lora(path, experts="both"):
    _, adapter = _make(lora_experts=experts)
    _nonzero(lora.add_lora(adapter, rank=4))
    lora.save_lora(adapter, str(path))
    return str(path)


def _sample(pipe, steps, **kw):
    return pipe(PROMPTS[:1], num_inference_steps=steps, guidance_scale=3.0, generator=torch.Generator().manual_seed(0),
                output_type="latent", **CALL, **kw).frames


def test_rlg_acts_on_both_experts(tmp_path):
    pipe, _ = _make()
    base = _sample(pipe, 3)
    lora.load_lora_weights(pipe, _saved_lora(tmp_path / "lora"))
    calls = Calls(pipe)
    theta = _sample(pipe, 3)
    assert calls.take() == {"transformer": 2, "transformer_2": 4}  # 2 calls per step (the pipeline's two CFG passes)
    assert (theta - base).abs().max() > 1e-2
    enable_rlg(pipe, 1.0)
    assert torch.equal(_sample(pipe, 3), theta)
    assert calls.take() == {"transformer": 2, "transformer_2": 4}
    enable_rlg(pipe, 0.0)
    assert torch.equal(_sample(pipe, 3), base)
    assert calls.take() == {"transformer": 2, "transformer_2": 4}
    # 0 < w: each expert's output is the exact mix of its base and LoRA outputs (two evaluations per call)
    _, adapter = _make()
    x, ts = _x_and_steps(adapter, torch.Generator().manual_seed)
    emb = adapter.encode_prompts(PROMPTS).cond["encoder_hidden_states"]
    for den, t in ((pipe.transformer, ts[0]), (pipe.transformer_2, ts[1])):
        def call():
            return den(hidden_states=x, timestep=t.expand(2), encoder_hidden_states=emb, return_dict=False)[0]
        disable_rlg(pipe)
        out_theta = call()
        pipe.disable_lora()
        out_ref = call()
        pipe.enable_lora()
        enable_rlg(pipe, 0.5)
        calls.take()
        mixed = call()
        assert sum(calls.take().values()) == 2
        torch.testing.assert_close(mixed, out_ref + 0.5 * (out_theta - out_ref), atol=1e-6, rtol=1e-6)
        assert (mixed - out_ref).abs().max() > 1e-3 and (mixed - out_theta).abs().max() > 1e-3
    disable_rlg(pipe)
    assert torch.equal(_sample(pipe, 3), theta)
    for den in (pipe.transformer, pipe.transformer_2):
        assert len(den._forward_hooks) == 0 and len(den._forward_pre_hooks) == 1  # only the counter


def test_rlg_zero_init_step_counts_the_expert_without_lora(tmp_path):
    """LoRA on the low-noise expert only; zero_init_step=2 at w=0: steps 0 (high, no LoRA) and 1 (low) fine-tuned,
    step 2 base == the pipeline with the LoRA switched off after step 1."""
    pipe, _ = _make()
    lora.load_lora_weights(pipe, _saved_lora(tmp_path / "lora", experts="low"))
    assert not lora.lora_layers(pipe.transformer) and lora.lora_layers(pipe.transformer_2)

    def off_after_second(p, i, t, kw):
        if i == 1:
            p.disable_lora()
        return kw

    expected = _sample(pipe, 3, callback_on_step_end=off_after_second)
    pipe.enable_lora()
    theta = _sample(pipe, 3)
    enable_rlg(pipe, 0.0, zero_init_step=2)
    got = _sample(pipe, 3)
    assert torch.equal(got, expected) and not torch.equal(got, theta)
    disable_rlg(pipe)
    assert len(pipe.transformer._forward_pre_hooks) == 0


class RandomPattern(Reward):
    name = "random_pattern"

    def score(self, images, prompts, metadata=None):
        pattern = torch.randn(images.shape[1:], generator=torch.Generator().manual_seed(0))
        return (images * pattern).flatten(1).mean(1)


@pytest.mark.parametrize("algorithm", ["grpo", "nft"])
def test_two_iterations_train_both_experts(algorithm, tmp_path):
    from flowalign.trainer import Trainer

    torch.manual_seed(0)
    sampler = "flow_sde" if algorithm == "grpo" else "flow_ode"
    cfg = Config(train=TrainConfig(algorithm=algorithm, prompts_per_iter=2, group_size=2, minibatch=2, lr=1e-3,
                                   out_dir=str(tmp_path)),
                 sampling=SamplingConfig(num_steps=2, guidance_scale=2.0, sampler=sampler, resolution=32,
                                         num_frames=1),
                 grpo=GRPOConfig(clip_range=0.2), model=ModelConfig(lora_rank=2),
                 nft=NFTConfig(timestep_sampling="permutation", timestep_fraction=1.0))  # NFT: both grid steps
    tr = Trainer(cfg, adapter=_make()[1], reward=RandomPattern())
    before = [p.detach().clone() for p in tr.params]
    for _ in range(2):
        m = tr.step()
        assert m["invalid_rewards"] == 0, m
    low = {id(p) for n, p in tr.adapter.denoisers[1].named_parameters() if "lora_" in n}
    moved = [not torch.equal(a, p) for a, p in zip(before, tr.params)]
    assert any(mv for mv, p in zip(moved, tr.params) if id(p) in low)  # the low-noise expert trains
    assert any(mv for mv, p in zip(moved, tr.params) if id(p) not in low)  # and the high-noise one


def test_doctor_precision_casts_and_restores_both_experts(gen):
    """flowalign doctor's dtype case runs BOTH experts in the dtype, then puts back their exact weights."""
    from flowalign.doctor.settings import denoiser_precision

    _, adapter = _make()
    lora.add_lora(adapter, rank=2)
    before = [{n: p.detach().clone() for n, p in den.named_parameters()} for den in adapter.denoisers]
    with denoiser_precision(adapter, torch.bfloat16):
        for den in adapter.denoisers:
            assert all(p.dtype == (torch.float32 if "lora_" in n else torch.bfloat16)
                       for n, p in den.named_parameters() if p.is_floating_point())
    for den, saved in zip(adapter.denoisers, before):
        assert all(torch.equal(p, saved[n]) and p.dtype == saved[n].dtype for n, p in den.named_parameters())
