"""Flow-DPO (arXiv 2501.13918; docs/algorithms/dpo.md): the loss is log 2 at the reference, its gradient lowers the
preferred sample's error against the rejected one's, both members of a pair share t and eps, online pairs are each
group's best and worst, offline pairs come from a checked preference file through the pipeline's VAE."""

import json
import math
import os
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from flowalign import lora
from flowalign.algorithms import dpo
from flowalign.algorithms.dpo import (
    check_encodable,
    dpo_beta,
    dpo_loss_from_errors,
    encode_images,
    flow_dpo_loss,
    flow_matching_error,
    pair_forward,
    select_pairs,
)
from flowalign.algorithms.advantages import group_ids_from_prompts
from flowalign.config import Config, DPOConfig, SamplingConfig, TrainConfig
from flowalign.models import adapter_for
from flowalign.preferences import load_pair_image, read_preference_file
from flowalign.rewards import Reward
from flowalign.toy.pipelines import tiny_sd3_pipeline
from flowalign.trainer import Trainer

LOG2 = math.log(2.0)


class MeanPixel(Reward):
    name = "mean_pixel"

    def score(self, images, prompts, metadata=None):
        return images.mean(dim=(1, 2, 3))


class Constant(Reward):
    name = "constant"

    def score(self, images, prompts, metadata=None):
        return torch.full((images.shape[0],), 0.5)


def _tiny():
    torch.manual_seed(0)
    return adapter_for(tiny_sd3_pipeline(image_size=16, with_t5=False))


def _cfg(tmp_path, **dpo_kw):
    return Config(sampling=SamplingConfig(num_steps=3, guidance_scale=1.0, sampler="flow_ode"),
                  train=TrainConfig(prompts_per_iter=2, group_size=3, minibatch=6, lr=1e-2, out_dir=str(tmp_path),
                                    algorithm="dpo", eval_per_task=1),
                  dpo=DPOConfig(**{"timesteps_per_pair": 1, "timestep_grid": 50, **dpo_kw}))


# ---- the loss ---------------------------------------------------------------------------------------


def _points(p=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0_w, x0_l, eps = (torch.randn(p, 2, 3, 3, generator=g) for _ in range(3))
    return pair_forward(x0_w, x0_l, torch.rand(p, generator=g), eps), g


def test_loss_is_exactly_log2_at_the_reference():
    (pw, pl), g = _points()
    v_w, v_l = torch.randn(pw.x_t.shape, generator=g), torch.randn(pl.x_t.shape, generator=g)
    for weighting in ("constant", "eps"):
        out = flow_dpo_loss(v_w, v_l, v_w.clone(), v_l.clone(), pw, pl, beta=500.0, weighting=weighting)
        assert out.loss.item() == pytest.approx(LOG2, abs=1e-7)
        assert torch.equal(out.logit, torch.zeros(4))


def test_loss_formula_and_gradient_signs():
    g = torch.Generator().manual_seed(1)
    e_w, e_l = torch.rand(5, generator=g).requires_grad_(), torch.rand(5, generator=g).requires_grad_()
    ref_w, ref_l = torch.rand(5, generator=g), torch.rand(5, generator=g)
    beta = 3.0
    loss, z = dpo_loss_from_errors(e_w, e_l, ref_w, ref_l, beta)
    want_z = -(beta / 2) * ((e_w - ref_w) - (e_l - ref_l))
    torch.testing.assert_close(z, want_z)
    torch.testing.assert_close(loss, -F.logsigmoid(want_z).mean())
    loss.backward()
    assert (e_w.grad > 0).all() and (e_l.grad < 0).all()  # down on the preferred error, up on the rejected one
    # dL/de_w = (beta / 2) sigmoid(-z) / P = -dL/de_l
    torch.testing.assert_close(e_w.grad, (beta / 2) * torch.sigmoid(-z.detach()) / 5)
    torch.testing.assert_close(e_l.grad, -e_w.grad)


def test_flow_dpo_loss_uses_mean_velocity_errors():
    (pw, pl), g = _points(seed=2)
    v_w, v_l, r_w, r_l = (torch.randn(pw.x_t.shape, generator=g) for _ in range(4))
    out = flow_dpo_loss(v_w, v_l, r_w, r_l, pw, pl, beta=2.0)
    e = lambda v, p: ((v - (p.noise - p.x0)) ** 2).mean(dim=(1, 2, 3))  # noqa: E731
    z = -1.0 * ((e(v_w, pw) - e(r_w, pw)) - (e(v_l, pl) - e(r_l, pl)))
    torch.testing.assert_close(out.loss, -F.logsigmoid(z).mean())
    torch.testing.assert_close(out.e_w, e(v_w, pw))
    sums = flow_matching_error(v_w, pw.target, "sum")
    torch.testing.assert_close(sums, e(v_w, pw) * 18)


def test_eps_weighting_is_diffusion_dpo_on_epsilon_predictions():
    # eps_hat = x_t + (1 - t) v, and Diffusion-DPO with a constant weight on |eps - eps_hat|^2 [derived]
    (pw, pl), g = _points(seed=3)
    v_w, v_l, r_w, r_l = (torch.randn(pw.x_t.shape, generator=g) for _ in range(4))
    beta = 7.0
    out = flow_dpo_loss(v_w, v_l, r_w, r_l, pw, pl, beta=beta, weighting="eps")
    t = pw.t.reshape(-1, 1, 1, 1)

    def eps_err(v, p):
        return ((p.noise - (p.x_t + (1 - t) * v)) ** 2).mean(dim=(1, 2, 3))

    z = -(beta / 2) * ((eps_err(v_w, pw) - eps_err(r_w, pw)) - (eps_err(v_l, pl) - eps_err(r_l, pl)))
    torch.testing.assert_close(out.loss, -F.logsigmoid(z).mean())
    torch.testing.assert_close(dpo_beta(beta, pw.t, "eps"), beta * (1 - pw.t) ** 2)


def test_pair_forward_shares_t_and_eps_and_mismatched_t_is_refused():
    (pw, pl), _ = _points(seed=4)
    torch.testing.assert_close(pw.noise, pl.noise)
    torch.testing.assert_close(pw.t, pl.t)
    t = pw.t.reshape(-1, 1, 1, 1)
    torch.testing.assert_close(pw.x_t - (1 - t) * pw.x0, pl.x_t - (1 - t) * pl.x0)  # both = t eps
    other = pair_forward(pl.x0, pl.x0, pw.t.flip(0), pl.noise)[1]
    with pytest.raises(ValueError, match="same t"):
        flow_dpo_loss(pw.x_t, pl.x_t, pw.x_t, pl.x_t, pw, other, beta=1.0)


def test_one_optimizer_step_lowers_the_preferred_error_against_the_rejected_one():
    ad = _tiny()
    params = lora.add_lora(ad, rank=2)
    g = torch.Generator().manual_seed(0)
    p = 3
    x0_w, x0_l, eps = (torch.randn(p, 4, 8, 8, generator=g) for _ in range(3))
    t = torch.tensor([0.3, 0.6, 0.9])
    pw, pl = pair_forward(x0_w, x0_l, t, eps)
    x, ts = torch.cat([pw.x_t, pl.x_t]), torch.cat([t, t]) * 1000
    cond = ad.encode_prompts(["a red circle"] * 2 * p, 1.0)

    def loss():
        v = ad.predict(x, ts, cond, 1.0)
        with torch.no_grad(), lora.adapter_disabled(ad):
            ref = ad.predict(x, ts, cond, 1.0)
        return flow_dpo_loss(v[:p], v[p:], ref[:p], ref[p:], pw, pl, beta=500.0)

    before = loss()
    assert before.loss.item() == pytest.approx(LOG2, abs=1e-6)  # the LoRA starts as a no-op: theta = ref
    opt = torch.optim.SGD(params, lr=1e-2)
    before.loss.backward()
    opt.step()
    with torch.no_grad():
        after = loss()
    assert (after.e_w - after.e_l).sum() < (before.e_w - before.e_l).sum()
    assert after.loss < before.loss and (after.logit > 0).float().mean() > 0


# ---- online pairs -----------------------------------------------------------------------------------


def test_select_pairs_takes_each_groups_argmax_and_argmin():
    nan = float("nan")
    rewards = torch.tensor([0.1, 0.9, 0.5, 0.3, 0.3, 0.3, 1.0, nan, 0.2, 0.4, 0.8, 0.6, 0.7])
    groups = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3, 4])
    valid = torch.ones(13, dtype=torch.bool)
    valid[10] = False  # group 3 without its best row
    w, lo, skipped = select_pairs(rewards, groups, valid)
    assert w.tolist() == [1, 6, 11] and lo.tolist() == [0, 8, 9]
    assert skipped == 2  # group 1 (ties) and group 4 (one row)
    w, lo, skipped = select_pairs(rewards, groups, valid, min_gap=0.5)
    assert w.tolist() == [1, 6] and skipped == 3


def test_online_rule_pairs_best_with_worst_under_one_t_and_eps(tmp_path, monkeypatch):
    tr = Trainer(_cfg(tmp_path, timesteps_per_pair=2), adapter=_tiny(), reward=MeanPixel())
    seen, points, calls = {}, [], []
    roll, predict, real_pair_forward = tr.algorithm.rollout, tr.adapter.predict, dpo.pair_forward

    def rollout(prompts, images=None):
        seen["traj"] = roll(prompts, images)
        calls.clear()  # only the update's forwards below
        return seen["traj"]

    def pair_spy(x0_w, x0_l, t, noise):
        out = real_pair_forward(x0_w, x0_l, t, noise)
        points.append(out)
        return out

    def predict_spy(x, ts, cond, guidance):
        calls.append((x.detach().clone(), ts.clone(), list(cond.prompts), guidance))
        return predict(x, ts, cond, guidance)

    monkeypatch.setattr(tr.algorithm, "rollout", rollout)
    monkeypatch.setattr(dpo, "pair_forward", pair_spy)
    monkeypatch.setattr(tr.adapter, "predict", predict_spy)
    m = tr.step()
    traj = seen["traj"]
    with torch.no_grad():
        rewards = MeanPixel().score(tr.adapter.decode(traj.final), traj.prompts)
    gids = group_ids_from_prompts(traj.prompts)
    want = {}
    for gi in range(2):
        rows = torch.nonzero(gids == gi).flatten()
        want[int(rows[rewards[rows].argmax()])] = int(rows[rewards[rows].argmin()])
    assert m["pairs"] == 2 and m["skipped_groups"] == 0 and m["update_samples"] == 4
    assert m["loss"] == pytest.approx(LOG2, abs=1e-6)  # the first step is at the reference
    assert len(points) == 2 and len(calls) == 4  # 2 draws, each a reference and a policy forward
    for k, (pw, pl) in enumerate(points):
        for i in range(pw.x0.shape[0]):  # each pair is a group's best (w) and worst (l)
            w_row = next(r for r in want if torch.equal(traj.final[r], pw.x0[i]))
            assert torch.equal(traj.final[want[w_row]], pl.x0[i])
        t = pw.t.reshape(-1, 1, 1, 1)
        torch.testing.assert_close(pw.x_t - (1 - t) * pw.x0, t * pw.noise)
        torch.testing.assert_close(pl.x_t - (1 - t) * pl.x0, t * pw.noise)  # the same eps on both sides
        for x, ts, prompts, guidance in calls[2 * k: 2 * k + 2]:
            b = pw.x0.shape[0]
            torch.testing.assert_close(x, torch.cat([pw.x_t, pl.x_t]))
            assert torch.equal(ts[:b], ts[b:]) and prompts[:b] == prompts[b:] and guidance == 1.0
            torch.testing.assert_close(ts[:b] / 1000, pw.t)  # SD3: the denoiser's timestep is 1000 t


def test_groups_of_ties_give_no_pairs_and_no_step(tmp_path):
    tr = Trainer(_cfg(tmp_path), adapter=_tiny(), reward=Constant())
    m = tr.step()
    assert m["pairs"] == 0 and m["update_samples"] == 0 and m["skipped_groups"] == 2
    assert tr.algorithm.optimizer_steps == 0


# ---- offline pairs ----------------------------------------------------------------------------------


def _image(path, colour, size=20):
    Image.new("RGB", (size, size), colour).save(path)
    return os.path.basename(path)


def _preference_file(tmp_path, n=3):
    lines = []
    for i in range(n):
        w = _image(tmp_path / f"w{i}.png", (200, 40 * i, 40))
        lo = _image(tmp_path / f"l{i}.png", (30, 30, 40 * i))
        lines.append(json.dumps({"prompt": "a red circle" if i % 2 else "a blue square", "chosen": w,
                                 "rejected": lo}))
    path = tmp_path / "prefs.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_preference_file_reads_relative_paths_and_skips_blank_lines(tmp_path):
    path = _preference_file(tmp_path)
    path.write_text(path.read_text().replace("\n", "\n\n", 1))
    pairs = read_preference_file(str(path))
    assert [p.line for p in pairs] == [1, 3, 4]
    assert pairs[0].chosen == str(tmp_path / "w0.png") and pairs[1].prompt == "a red circle"
    img = load_pair_image(pairs[0], "chosen", (16, 12))
    assert img.shape == (3, 16, 12) and 0 <= float(img.min()) <= float(img.max()) <= 1


SECRET = "hunter2-secret"


@pytest.mark.parametrize("line, error, message", [
    (f"not json {SECRET}", ValueError, "line 2 is not JSON"),
    (json.dumps([SECRET]), ValueError, "line 2 is not a JSON object"),
    (json.dumps({"prompt": SECRET, "chosen": "w0.png"}), ValueError, "line 2 has no 'rejected'"),
    (json.dumps({"chosen": "w0.png", "rejected": "l0.png", "x": SECRET}), ValueError, "line 2 has no 'prompt'"),
    (json.dumps({"prompt": SECRET, "chosen": "", "rejected": "l0.png"}), ValueError, "line 2: 'chosen' must be"),
    (json.dumps({"prompt": "p", "chosen": f"{SECRET}.png", "rejected": "l0.png"}), FileNotFoundError,
     "line 2: the chosen image is not found"),
    (json.dumps({"prompt": SECRET, "chosen": "w0.png", "rejected": "./w0.png"}), ValueError, "the same image"),
])
def test_preference_file_errors_name_the_line_never_its_contents(tmp_path, line, error, message):
    path = _preference_file(tmp_path, n=1)
    path.write_text(path.read_text() + line + "\n")
    with pytest.raises(error, match=message) as info:
        read_preference_file(str(path))
    text = str(info.value)
    assert "prefs.jsonl" in text and SECRET not in text and "\n" not in text


def test_missing_and_empty_preference_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="preference file .*nope.jsonl' not found"):
        read_preference_file(str(tmp_path / "nope.jsonl"))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n  \n")
    with pytest.raises(ValueError, match="empty.jsonl' has no pairs"):
        read_preference_file(str(empty))
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image " + SECRET.encode())
    pair = read_preference_file(str(_preference_file(tmp_path, n=1)))[0]
    pair = type(pair)(pair.prompt, str(bad), pair.rejected, pair.file, pair.line)
    with pytest.raises(ValueError, match="line 1: the chosen image cannot be read") as info:
        load_pair_image(pair, "chosen")
    assert SECRET not in str(info.value)
    with pytest.raises(ValueError, match="dpo.pairs=online"):
        check_encodable(SimpleNamespace(family="wan"))
    with pytest.raises(ValueError, match="dpo.preference_file"):
        DPOConfig(pairs="offline")


def test_encode_inverts_the_adapters_decode_convention():
    # a VAE with a strong shift / scale: decode(encode(x)) must be the VAE's own reconstruction of x exactly
    pipe = tiny_sd3_pipeline(image_size=16, with_t5=False)
    pipe.vae.register_to_config(scaling_factor=0.37, shift_factor=0.8)
    ad = adapter_for(pipe)
    img = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    z = encode_images(ad, img)
    with torch.no_grad():
        mode = pipe.vae.encode(2 * img - 1).latent_dist.mode()
        native = (pipe.vae.decode(mode).sample / 2 + 0.5).clamp(0, 1)
        torch.testing.assert_close(z, (mode - 0.8) * 0.37)
        torch.testing.assert_close(ad.decode(z), native, atol=1e-5, rtol=1e-5)


def test_shipped_vae_round_trip():
    from diffusers import AutoencoderKL, StableDiffusion3Pipeline

    from flowalign.config import DEFAULT_MODEL
    from flowalign.models.base import image_tensor
    from flowalign.toy.render import render

    vae = AutoencoderKL.from_pretrained(os.path.join(DEFAULT_MODEL, "vae")).eval()
    tiny = tiny_sd3_pipeline(image_size=16, with_t5=False)
    ad = adapter_for(StableDiffusion3Pipeline(**{**tiny.components, "vae": vae}))
    imgs = torch.stack([image_tensor(render(p, 64, seed=i)[0]) for i, p in enumerate(["a red circle",
                                                                                     "two blue squares"])])
    with torch.no_grad():
        rec = ad.decode(encode_images(ad, imgs))
    assert rec.shape == imgs.shape and (rec - imgs).abs().mean() < 0.05


def test_offline_rule_trains_on_file_pairs_and_its_order_round_trips(tmp_path):
    path = _preference_file(tmp_path)
    cfg = _cfg(tmp_path, pairs="offline", preference_file=str(path), pairs_per_iter=2)
    tr = Trainer(cfg, adapter=_tiny(), reward=MeanPixel())
    assert tr.algorithm.uses_rewards is False
    m = tr.step()
    assert m["pairs"] == 2 and m["update_samples"] == 4 and m["optimizer_steps"] == 1
    assert m["loss"] == pytest.approx(LOG2, abs=1e-6)
    order = tr.algorithm.order.tolist()
    assert sorted(order) == [0, 1, 2] and tr.algorithm.cursor == 2
    # the cached latents are the VAE encodings of the images resized to the rollout's 16 x 16 pixels
    first = tr.algorithm.pairs[order[0]]
    cached = tr.algorithm._latents[(first.chosen, (16, 16))]
    torch.testing.assert_close(cached, encode_images(tr.adapter, load_pair_image(first, "chosen", (16, 16))[None])[0])
    state = tr.algorithm.state_dict()
    m2 = tr.step()  # one pair left in this pass, then a fresh order
    assert m2["pairs"] == 2 and tr.algorithm.cursor == 1 and math.isfinite(m2["loss"])
    tr.algorithm.load_state_dict(state)
    assert tr.algorithm.order.tolist() == order and tr.algorithm.cursor == 2
