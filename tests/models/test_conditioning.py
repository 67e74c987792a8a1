"""Conditioning beyond text: one condition image per row reaches the encoding cache, the rollout, re-scoring, the
adapter-disabled reference and the reward's metadata; (prompt, image) prompt sources; prompt groups per row.

The family here is a test double: the tiny SD3 pipeline whose denoiser input is shifted by the condition image
pooled to the latent size (``x + 0.5 * pooled``), so every path that drops the image changes the numbers."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from flowalign import lora
from flowalign.models import SD3Adapter
from flowalign.models.base import image_key, image_tensor
from flowalign.prompts import PromptSource, read_image_rows
from flowalign.rollout import concat_trajectories, rescore, rollout
from flowalign.toy.pipelines import tiny_sd3_pipeline


class ImageSD3(SD3Adapter):
    """SD3 conditioned on an image: the denoiser sees ``x + 0.5 avgpool(image)`` (one channel, broadcast)."""

    condition_image = True
    encoded = 0

    def _encode_image(self, image, height, width, num_frames=None):
        ImageSD3.encoded += 1
        vsf = self.pipe.vae_scale_factor
        h, w = (height or 32) // vsf, (width or 32) // vsf
        return {"image_latents": F.adaptive_avg_pool2d(image.mean(1, keepdim=True), (h, w))}

    def _forward(self, x, timestep, emb, guidance_scale):
        return super()._forward(x + 0.5 * emb["image_latents"].to(x.dtype), timestep, emb, guidance_scale)


def _images(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(3, 32, 32, generator=g) for _ in range(n)]


@pytest.fixture
def adapter():
    return ImageSD3(tiny_sd3_pipeline(), max_sequence_length=16)


def test_images_are_required_checked_and_cached_per_row(adapter):
    with pytest.raises(ValueError, match="images=") as err:
        adapter.encode_prompts(["a red circle"])
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="one image per prompt"):
        adapter.encode_prompts(["a", "b"], images=_images(1))
    text_only = SD3Adapter(adapter.pipe, max_sequence_length=16)
    with pytest.raises(ValueError, match="text only"):
        text_only.encode_prompts(["a"], images=_images(1))

    a, b = _images(2)
    ImageSD3.encoded = 0
    cond = adapter.encode_prompts(["make it blue"] * 3, 2.0, images=[a, b, a], height=32, width=32)
    # rows: (prompt, a) and (prompt, b), each once, and the negative prompt with each image
    assert ImageSD3.encoded == 4 and len(adapter._image_cache) == 4
    lat = cond.cond["image_latents"]
    assert torch.equal(lat[0], lat[2]) and not torch.equal(lat[0], lat[1])
    assert torch.equal(cond.uncond["image_latents"], lat)  # the null branch sees the image it edits
    assert cond.keys[0] == cond.keys[2] != cond.keys[1] and cond.group_keys == cond.keys
    assert cond.keys[0] == f"make it blue\x00{image_key(a)}"
    picked = cond.select([1, 2])
    assert picked.keys == cond.keys[1:] and torch.equal(picked.images[0], b)
    assert picked.metadata()[1]["condition_image"] is a or torch.equal(picked.metadata()[1]["condition_image"], a)
    adapter.image_cache_size = 2
    adapter.encode_prompts(["other"], 1.0, images=[b])
    assert len(adapter._image_cache) == 2  # least recently used rows go; re-encoding gives the same tensors


def test_image_tensor_accepts_pil_and_tensors():
    from PIL import Image

    arr = (np.arange(4 * 5 * 3) % 256).astype(np.uint8).reshape(4, 5, 3)
    t = image_tensor(Image.fromarray(arr))
    assert t.shape == (3, 4, 5) and torch.allclose(t, torch.from_numpy(arr).permute(2, 0, 1).float() / 255)
    assert torch.equal(image_tensor(t[None]), t)
    with pytest.raises(ValueError, match=r"\[3, H, W\]"):
        image_tensor(torch.zeros(4, 4))


def test_the_condition_reaches_rollout_rescoring_and_the_reference(adapter):
    params = lora.add_lora(adapter, rank=2)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in params:
            p.add_(0.3 * torch.randn_like(p))
    prompts, images = ["make it blue"] * 2, _images(2)
    kw = dict(num_steps=3, guidance_scale=2.0, sde_window=(0, 2), record_means=True, record_reference_kl=True)
    traj = rollout(adapter, prompts, images=images, generator=torch.Generator().manual_seed(0), **kw)
    # same prompt and noise, different images -> different samples (the image is an input, not decoration)
    assert (traj.final[0] - traj.final[1]).abs().max() > 1e-3
    for k in traj.stochastic_steps:
        step = rescore(adapter, traj, k)
        torch.testing.assert_close(step.log_prob(), traj.log_probs[:, k], atol=1e-5, rtol=1e-5)
        with lora.adapter_disabled(adapter):
            ref = rescore(adapter, traj, k)
        torch.testing.assert_close(traj.reference_kl[:, k], step.kl(ref), atol=1e-6, rtol=1e-4)
    # the recorded condition matters for re-scoring: the other image gives another transition mean
    swapped = adapter.encode_prompts(prompts, 2.0, images=images[::-1], height=None, width=None)
    other = rescore(adapter, traj, 0, cond=swapped)
    assert (other.mean - traj.means[:, 0]).abs().max() > 1e-3
    both = concat_trajectories([traj, rollout(adapter, prompts, images=images[::-1],
                                              generator=torch.Generator().manual_seed(1), **kw)])
    assert both.group_keys == traj.group_keys + traj.group_keys[::-1] and len(both.cond.images) == 4


def _rows(tmp_path, n=2):
    from PIL import Image

    (tmp_path / "img").mkdir()
    for i in range(n):
        Image.fromarray(np.full((32, 32, 3), 40 + 80 * i, dtype=np.uint8)).save(tmp_path / "img" / f"{i}.png")
    lines = [json.dumps({"prompt": "make it blue", "image": f"img/{i}.png"}) for i in range(n)]
    (tmp_path / "rows.jsonl").write_text("\n".join(lines) + "\n")
    return tmp_path / "rows.jsonl"


def test_image_row_sources(tmp_path):
    path = _rows(tmp_path)
    rows = read_image_rows(str(path))
    assert [r.prompt for r in rows] == ["make it blue"] * 2
    assert rows[0].image == str(tmp_path / "img" / "0.png") and rows[0].key != rows[1].key
    assert rows[1].load().shape == (3, 32, 32) and abs(float(rows[1].load().mean()) - 120 / 255) < 1e-6
    src = PromptSource(str(path))
    assert src.has_images and len(src.sample_rows(5, np.random.default_rng(0))) == 5
    assert src.sample(3, np.random.default_rng(1)) == [r.prompt for r in src.sample_rows(3, np.random.default_rng(1))]
    # a folder with metadata.jsonl (the imagefolder layout), "text" / "file_name" keys and a references folder
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"text": "a cat", "file_name": "img/0.png",
                                                         "references": "img"}) + "\n")
    (row,) = read_image_rows(str(tmp_path))
    assert row.prompt == "a cat" and len(row.references) == 2
    assert not PromptSource("toy").has_images


@pytest.mark.parametrize("line,match", [
    ('{"prompt": "x", "image": "missing.png"}', "missing.png' not found"),
    ('{"prompt": "x"', "not JSON"),
    ('["x"]', "not a JSON object"),
    ('{"image": "img/0.png"}', "has no prompt"),
    ('{"prompt": "x", "image": "img/0.png", "references": 3}', "references"),
])
def test_bad_rows_get_one_line_errors(tmp_path, line, match):
    _rows(tmp_path, 1)
    (tmp_path / "bad.jsonl").write_text(line + "\n")
    with pytest.raises((ValueError, FileNotFoundError), match=match) as err:
        read_image_rows(str(tmp_path / "bad.jsonl"))
    assert "\n" not in str(err.value) and "row 1" in str(err.value)
    (tmp_path / "img" / "broken.png").write_bytes(b"not a png")
    (tmp_path / "broken.jsonl").write_text('{"prompt": "x", "image": "img/broken.png"}\n')
    with pytest.raises(ValueError, match="cannot be read"):
        read_image_rows(str(tmp_path / "broken.jsonl"))[0].load()


def test_trainer_trains_on_image_rows_with_per_row_groups(tmp_path):
    from flowalign.config import Config, GRPOConfig, ModelConfig, SamplingConfig, TrainConfig
    from flowalign.rewards import Reward
    from flowalign.trainer import Trainer

    seen = []

    class Preservation(Reward):  # closeness to the condition image: needs the metadata
        name = "preservation"

        def score(self, images, prompts, metadata=None):
            seen.append(metadata)
            ref = torch.stack([m["condition_image"] for m in metadata])
            return -(images - ref).abs().flatten(1).mean(1)

    cfg = Config(train=TrainConfig(algorithm="grpo", prompts=str(_rows(tmp_path)), prompts_per_iter=2, group_size=2,
                                   minibatch=4, out_dir=str(tmp_path / "run"), eval_every=0),
                 sampling=SamplingConfig(num_steps=2, guidance_scale=2.0, resolution=32, sde_window=(0, 1)),
                 grpo=GRPOConfig(clip_range=0.2), model=ModelConfig(lora_rank=2), )
    torch.manual_seed(0)
    tr = Trainer(cfg, adapter=ImageSD3(tiny_sd3_pipeline(), max_sequence_length=16), reward=Preservation())
    prompts, _, rows = tr._sample_prompts()
    assert prompts == ["make it blue"] * 4 and len({r.key for r in rows}) <= 2
    assert tr._group_keys(prompts, rows) == [r.key for r in rows]
    before = [p.detach().clone() for p in tr.params]
    m = tr.step()
    assert m["update_samples"] == 4 and m["invalid_rewards"] == 0
    assert m["onpolicy_logp_gap"] < 1e-4
    assert any(not torch.equal(a, p) for a, p in zip(before, tr.params))
    assert seen and all(len(meta) == 4 and meta[0]["condition_image"].shape == (3, 32, 32) for meta in seen)
