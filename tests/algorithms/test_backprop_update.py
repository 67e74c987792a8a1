"""BackpropUpdate (train.algorithm: backprop, docs/math.md §8) on a tiny SD3 pipeline: the loss is the formula, the
reward gradient flows through the last K steps only (none for K = 0), a short run raises a differentiable reward."""

import pytest
import torch

from flowalign import lora
from flowalign.algorithms.backprop import BackpropUpdate
from flowalign.config import BackpropConfig, Config, SamplingConfig, TrainConfig
from flowalign.models import adapter_for
from flowalign.toy.pipelines import tiny_sd3_pipeline
from flowalign.rewards import Reward
from flowalign.rollout import rollout
from flowalign.samplers import flow_ode_step
from flowalign.trainer import Trainer

PROMPTS = ["a red circle", "a red circle", "two blue squares", "two blue squares"]
N = 3


class Brightness(Reward):
    """Mean pixel value: differentiable, with signal on random images."""

    name = "brightness"
    differentiable = True

    def score(self, images, prompts, metadata=None):
        return images.mean(dim=(1, 2, 3))


def _cfg(tmp_path, k=2, lambda_kl=0.5, **train):
    kw = dict(prompts_per_iter=2, group_size=2, minibatch=3, out_dir=str(tmp_path), algorithm="backprop")
    kw.update(train)
    return Config(sampling=SamplingConfig(num_steps=N, guidance_scale=2.0, sampler="flow_ode"),
                  backprop=BackpropConfig(grad_steps=k, lambda_reward=1.0, lambda_kl=lambda_kl),
                  train=TrainConfig(**kw))


def _rule(tmp_path, k):
    adapter = adapter_for(tiny_sd3_pipeline(image_size=16), max_sequence_length=16)
    params = lora.add_lora(adapter, rank=2)
    with torch.no_grad():  # a LoRA away from zero: KL_v > 0 and gradients reach A and B
        for p in params:
            p.add_(0.2 * torch.randn(p.shape, generator=torch.Generator().manual_seed(3)))
    opt = torch.optim.SGD(params, lr=0.0)  # keeps the weights: the gradients stay inspectable
    return BackpropUpdate(_cfg(tmp_path, k), adapter, params, opt, torch.Generator().manual_seed(0),
                          reward=Brightness())


def _manual(rule, traj, k):
    """-lambda_r R + lambda_kl KL_v from the recorded x_{N-K}, written out step by step; its grads."""
    a = rule.adapter
    for p in rule.params:
        p.grad = None
    x = traj.latents[:, N - k]
    kl = torch.zeros(len(PROMPTS))
    for step in range(N - k, N):
        v = a.predict(x, traj.timesteps[step], traj.cond, 2.0)
        with torch.no_grad(), lora.adapter_disabled(a):
            v_ref = a.predict(x, traj.timesteps[step], traj.cond, 2.0)
        kl = kl + ((v - v_ref) ** 2).flatten(1).mean(1)
        x = flow_ode_step(v, x, traj.sigmas[step].expand(4), traj.sigmas[step + 1].expand(4)).prev_sample
    reward = Brightness().score_differentiable(a.decode(x), PROMPTS)
    loss = (-1.0 * reward + 0.5 * kl).mean()
    if loss.requires_grad:
        loss.backward()
    grads = [p.grad.clone() if p.grad is not None else None for p in rule.params]
    return float(loss.detach()), float(reward.detach().mean()), grads


@pytest.mark.parametrize("k", [0, 2])
def test_loss_is_the_formula_and_gradient_only_through_last_k(tmp_path, k):
    rule = _rule(tmp_path, k)
    traj = rule.rollout(PROMPTS)
    assert not traj.stochastic.any() and traj.num_steps == N
    m = rule.update(traj)  # minibatch 3 of 4 rows: accumulation over unequal minibatches
    got = [p.grad.clone() if p.grad is not None else None for p in rule.params]
    loss, reward, want = _manual(rule, traj, k)
    assert m["loss"] == pytest.approx(loss, rel=1e-5, abs=1e-7)
    assert m["reward"] == pytest.approx(reward, rel=1e-5)
    # the re-run window reproduces the rollout's final latent: the logged reward is the trained one
    assert m["reward"] == pytest.approx(float(Brightness()(rule.adapter.decode(traj.final), PROMPTS).mean()), rel=1e-5)
    if k == 0:
        assert m["velocity_kl"] == 0 and all(g is None for g in got)  # no reward gradient at all
        return
    assert m["velocity_kl"] > 0
    assert sum(float(g.abs().sum()) for g in got) > 0
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-8)


class Darkness(Brightness):
    name = "darkness"

    def score(self, images, prompts, metadata=None):
        return -images.mean(dim=(1, 2, 3))


def _brightness_after_training(tmp_path, reward) -> tuple[float, float, list]:
    """Mean brightness of ODE samples from fixed noise before and after 6 iterations training ``reward``."""
    cfg = _cfg(tmp_path, k=N, lambda_kl=0.0, lr=1e-2, minibatch=4, iterations=6, seed=2)
    torch.manual_seed(123)  # the same tiny pipeline for both rewards
    tr = Trainer(cfg, adapter=adapter_for(tiny_sd3_pipeline(image_size=16), max_sequence_length=16), reward=reward)
    assert tr.algorithm.reward is reward
    noise = tr.adapter.prepare_latents(4, 16, 16, generator=torch.Generator().manual_seed(7))

    def brightness():  # on fixed noise (the rule's rollouts draw fresh noise every iteration)
        traj = rollout(tr.adapter, PROMPTS, num_steps=N, guidance_scale=2.0, sampler="flow_ode", latents=noise)
        with torch.no_grad():
            return float(Brightness()(tr.adapter.decode(traj.final), PROMPTS).mean())

    before = brightness()
    history = tr.train(6)
    return before, brightness(), history


def test_short_run_raises_a_differentiable_reward(tmp_path):
    """The tiny random VAE decodes almost every latent to the same grey, so the changes are small in absolute
    terms (~1e-4); training brightness must raise it and training darkness (the same run, the reward negated) must
    lower it, deterministically. A sign error or a missing gradient path fails one of the two."""
    before, up, history = _brightness_after_training(tmp_path / "up", Brightness())
    assert all(m["reward_mean"] is not None and m["update_samples"] == 4 for m in history)
    before2, down, _ = _brightness_after_training(tmp_path / "down", Darkness())
    assert before == before2
    assert up - before > 5e-5 and down - before < -5e-5, (before, up, down)


def test_non_differentiable_reward_and_bad_config_fail_fast(tmp_path):
    from flowalign.rewards import get

    with pytest.raises(ValueError, match="needs a reward differentiable in torch, got 'toy_geneval': use one of "
                                         "aesthetic, clip_score"):
        Trainer(_cfg(tmp_path), adapter=adapter_for(tiny_sd3_pipeline(image_size=16)), reward=get("toy_geneval"))
    with pytest.raises(TypeError, match="reward 'toy_geneval' is not differentiable in torch"):
        get("toy_geneval").score_differentiable(torch.rand(1, 3, 8, 8), ["a red circle"])
    with pytest.raises(ValueError, match="set sampling.sampler=flow_ode"):
        Config(train=TrainConfig(algorithm="backprop"))
    with pytest.raises(ValueError, match="backprop.grad_steps <= sampling.num_steps=2"):
        Config(sampling=SamplingConfig(num_steps=2, sampler="flow_ode"), train=TrainConfig(algorithm="backprop"))
