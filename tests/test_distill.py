"""f-distill (docs/math.md §6, flowalign.distill) on a tiny SD3 pipeline: one iteration per divergence moves the student
and the fake score and leaves the teacher alone; the generator weights are h(r) of the discriminator's ratio
(all ones for reverse KL); a discriminator trained on two latent distributions gives r > 1 on the real one."""

import math

import pytest
import torch

from flowalign import lora
from flowalign.algorithms.divergences import DIVERGENCES
from flowalign.algorithms.fdistill import discriminator_loss, discriminator_ratio
from flowalign.config import Config, DistillConfig, TrainConfig, config_from_dict
from flowalign.distill import (FAKE, STUDENT, FDistiller, LatentDiscriminator, bin_times, mean_pairwise_distance,
                              text_features)
from flowalign.models import adapter_for
from flowalign.toy.pipelines import tiny_sd3_pipeline


def _distiller(divergence: str, tmp_path, **options) -> FDistiller:
    cfg = Config(distill=DistillConfig(student_steps=2, divergence=divergence, teacher_steps=2, real_samples=4,
                                       generator_every=1, teacher_guidance_scale=2.0, disc_channels=8, **options),
                 train=TrainConfig(prompts_per_iter=2, group_size=2, lr=1e-2, out_dir=str(tmp_path)))
    adapter = adapter_for(tiny_sd3_pipeline(image_size=16), max_sequence_length=16)
    return FDistiller(cfg, adapter)


def _snapshot(params):
    return [p.detach().clone() for p in params]


def _moved(before, params):
    return max(float((a - p.detach()).abs().max()) for a, p in zip(before, params))


@pytest.mark.parametrize("divergence", ["reverse_kl", "forward_kl", "js"])
def test_one_iteration_per_divergence(divergence, tmp_path):
    dist = _distiller(divergence, tmp_path)
    base = [p for n, p in dist.adapter.denoiser.named_parameters() if "lora_" not in n]
    base_before, student, fake = _snapshot(base), _snapshot(dist.student_params), _snapshot(dist.fake_params)
    m = dist.step()
    assert m["generator_steps"] == 1 and all(math.isfinite(m[k]) for k in ("loss_gen", "loss_fake", "loss_disc"))
    assert _moved(student, dist.student_params) > 0 and _moved(fake, dist.fake_params) > 0
    assert _moved(base_before, base) == 0  # the teacher is the frozen base
    assert lora.active_adapter(dist.adapter) == STUDENT
    if divergence == "reverse_kl":
        assert m["h_min"] == m["h_max"] == 1.0


def test_fastgen_options_multi_head_discriminator_and_ratio_ema(tmp_path):
    # distill.disc_heads = 2 gives [B, 2] logits (averaged for the ratio); distill.ratio_ema keeps per-bin means
    dist = _distiller("neyman", tmp_path, disc_heads=2, ratio_ema=0.5, ratio_bin_range=(0.0, 0.999))
    prompts = dist.batch_prompts()
    x = dist.student_sample(prompts)
    e = text_features(dist.adapter.encode_prompts(prompts))
    assert dist.disc(x, torch.full((4,), 0.5), e).shape == (4, 2)
    m = dist.step()
    assert all(math.isfinite(m[k]) for k in ("loss_gen", "loss_fake", "loss_disc"))
    t = dist.last_generator["t"]
    seen = {min(int(float(v) / 0.999 * 10), 9) for v in t}  # the bins of the generator step's t over [0, 0.999]
    moved = {int(i) for i in torch.nonzero(dist.ratio_bins != 1)}  # moved from 1 towards their batch means
    assert moved == seen and len(seen) <= 2


class FixedLogits(torch.nn.Module):
    """A stand-in discriminator with known logits d_i (still differentiable in x_t for the GAN term)."""

    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, x_t, t, text):
        return self.logits + 0 * x_t.flatten(1).sum(1)


@pytest.mark.parametrize("divergence", ["forward_kl", "js"])
def test_generator_weights_are_h_of_the_discriminator_ratio(divergence, tmp_path):
    dist = _distiller(divergence, tmp_path)
    d = torch.tensor([-1.0, 0.0, 1.0, 2.0])
    dist.disc = FixedLogits(d)
    prompts = dist.batch_prompts()
    dist.generator_step(dist.student_sample(prompts, grad=True), prompts)
    t, w = dist.last_generator["t"], dist.last_generator["weights"]
    assert len({min(int(v * 10), 9) for v in t}) == 1  # one time bin: the ratio is normalised over the batch
    r = d.exp() / d.exp().mean()
    h = r if divergence == "forward_kl" else r / (r + 1)
    torch.testing.assert_close(w, h / h.mean())
    assert w[-1] > w[0]  # more weight where the teacher is more likely than the student


def test_discriminator_ratio_separates_two_latent_distributions():
    torch.manual_seed(0)
    disc = LatentDiscriminator(4, 6, width=8)
    opt = torch.optim.Adam(disc.parameters(), lr=3e-3)
    text = torch.zeros(32, 6)
    t = torch.full((32,), 0.05)

    def draw(shift):
        return torch.randn(32, 4, 8, 8) * 0.5 + shift

    for _ in range(60):
        loss = discriminator_loss(disc(draw(-0.5), t, text), disc(draw(0.5), t, text))  # real: +0.5
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        real, fake = disc(draw(0.5), t, text), disc(draw(-0.5), t, text)
    r = discriminator_ratio(torch.cat([real, fake]), torch.cat([t, t]))
    assert float(r[:32].mean()) > 1.5 and float(r[32:].mean()) < 0.5, r
    assert float(loss.detach()) < 0.5


def test_bins_config_and_diversity():
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        t = bin_times(8, 10, (0.02, 0.98), g)
        assert 0.02 <= float(t.min()) and float(t.max()) <= 0.98 and len({int(v * 10) for v in t}) == 1
    for name in DIVERGENCES:  # the config's choices are the table's names
        assert DistillConfig(divergence=name).divergence == name
    with pytest.raises(ValueError, match="distill.divergence='kl' is not valid; choose one of reverse_kl"):
        config_from_dict({"distill": {"divergence": "kl"}})
    with pytest.raises(ValueError, match="distill.t_range"):
        DistillConfig(t_range=(0.5, 0.2))
    same = torch.rand(1, 3, 4, 4).repeat(3, 1, 1, 1)
    assert mean_pairwise_distance(same) == 0
    assert mean_pairwise_distance(torch.stack([torch.zeros(3, 2, 2), torch.ones(3, 2, 2)])) == pytest.approx(1.0)
    assert FAKE != STUDENT
