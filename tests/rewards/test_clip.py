"""CLIP rewards: torch preprocessing (close to PIL's bicubic resize + crop), agreement with CLIPModel's
own logits, gradients through tensor inputs, PickScore/HPS/aesthetic formulas."""

import numpy as np
import pytest
import torch
from PIL import Image

from flowalign.rewards import get
from flowalign.rewards.preprocess import CLIP_MEAN, CLIP_STD, prepare, resize_crop

from conftest import save_aesthetic_head, toy_images

PROMPTS = ["a red circle", "two blue squares"]


def test_resize_crop_shapes_and_normalisation():
    assert resize_crop(torch.rand(2, 3, 40, 80), 32).shape == (2, 3, 32, 32)
    assert resize_crop(torch.rand(1, 3, 90, 30), 32).shape == (1, 3, 32, 32)
    x = prepare(torch.full((1, 3, 50, 70), 0.5), 16)
    expect = (0.5 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    torch.testing.assert_close(x[0, :, 5, 5], expect)


def test_matches_pil_bicubic_resize_and_centre_crop():
    img = Image.fromarray(np.asarray(toy_images(["a red circle above a blue square"], size=96)[0].permute(1, 2, 0) * 255,
                                     dtype=np.uint8)).crop((0, 10, 96, 82))  # 96 x 72
    ours = prepare([img], 48, (0, 0, 0), (1, 1, 1))[0]
    r = img.resize((64, 48), Image.Resampling.BICUBIC)  # shortest side 72 -> 48
    ref = torch.from_numpy(np.asarray(r.crop((8, 0, 56, 48)), dtype=np.float32) / 255).permute(2, 0, 1)
    assert (ours - ref).abs().mean() < 0.01


def test_clip_score_is_the_models_cosine(clip_dir):
    from transformers import CLIPModel, CLIPTokenizer

    x = toy_images(PROMPTS)
    r = get("clip_score", model=clip_dir, scale=2.0)
    model, tok = CLIPModel.from_pretrained(clip_dir).eval(), CLIPTokenizer.from_pretrained(clip_dir)
    with torch.no_grad():
        out = model(input_ids=tok(PROMPTS, padding="max_length", max_length=16, return_tensors="pt").input_ids,
                    pixel_values=prepare(x, 32))
    cos = out.logits_per_image.diagonal() / model.logit_scale.exp()
    torch.testing.assert_close(r(x, PROMPTS), 2.0 * cos, atol=1e-5, rtol=1e-5)
    ps = get("pickscore", model=clip_dir, divisor=26.0)
    torch.testing.assert_close(ps(x, PROMPTS), out.logits_per_image.diagonal() / 26.0, atol=1e-5, rtol=1e-5)


def test_gradient_flows_to_tensor_images(clip_dir):
    x = toy_images(PROMPTS).requires_grad_(True)
    get("clip_score", model=clip_dir)(x, PROMPTS).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_aesthetic_is_mlp_of_normalised_embedding(clip_dir, tmp_path):
    from flowalign.rewards.aesthetic import load_state, mlp_from_state

    head = save_aesthetic_head(tmp_path / "h.pth", 16, hidden=(8, 4, 4))
    r = get("aesthetic", model=clip_dir, head=head)
    x = toy_images(PROMPTS)
    mlp = mlp_from_state(load_state(head))
    assert [type(m).__name__ for m in mlp] == ["Linear", "Identity", "Linear", "Identity", "Linear", "Identity", "Linear"]
    torch.testing.assert_close(r(x, PROMPTS), mlp(r.clip.images(x)).squeeze(-1))
    assert r.clip.images(x).norm(dim=-1).sub(1).abs().max() < 1e-5
    with pytest.raises(ValueError, match="layers"):
        mlp_from_state({"fc.weight": torch.zeros(1, 16)})


def test_prepare_keeps_the_images_device():
    # decoded latents on a GPU are normalised where they are (reward backprop on CUDA once failed here: the
    # mean/std were CPU tensors); the meta device stands in for CUDA on a CPU machine
    x = prepare(torch.rand(2, 3, 16, 16, device="meta"), 8)
    assert x.device.type == "meta" and x.shape == (2, 3, 8, 8)
