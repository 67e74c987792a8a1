"""Image statistics for reward hacking: exact values on synthetic images built so that every result holds by
construction (one-colour, half/half, step edges), input forms (video, PIL) and within-prompt diversity."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from flowalign.evaluation.image_stats import (STATISTICS, feature_embedder, image_statistics, sobel_magnitude,
                                              within_prompt_diversity)

NAMES = ["dark_fraction", "bright_fraction", "colour_entropy", "saturation", "edge_density", "jpeg_bytes_per_pixel"]


def flat(rgb, h=8, w=8) -> torch.Tensor:
    """One image [1,3,h,w] of one colour."""
    return torch.tensor(rgb, dtype=torch.float32).view(1, 3, 1, 1).expand(1, 3, h, w).clone()


def step(left: float, right: float, h=4, w=10, at=5) -> torch.Tensor:
    """[1,3,h,w] grey image: columns < at are ``left``, the others ``right`` (a vertical step edge)."""
    x = torch.full((1, 3, h, w), left)
    x[..., at:] = right
    return x


def test_table_has_the_documented_statistics():
    assert list(STATISTICS) == NAMES
    for s in STATISTICS.values():
        assert s.resolution > 0 and s.description and "\n" not in s.description


def test_all_black_image():
    s = image_statistics(flat((0, 0, 0)))
    assert s["dark_fraction"].tolist() == [1.0]
    assert s["bright_fraction"].tolist() == [0.0]
    assert s["colour_entropy"].tolist() == [0.0]
    assert s["saturation"].tolist() == [0.0]  # max = 0: saturation 0, not NaN
    assert s["edge_density"].tolist() == [0.0]
    assert all(v.dtype == torch.float64 and v.shape == (1,) for v in s.values())


def test_half_black_half_white():
    x = torch.zeros(1, 3, 8, 8)
    x[..., 4:, :] = 1.0
    s = image_statistics(x)
    assert s["dark_fraction"].item() == 0.5 and s["bright_fraction"].item() == 0.5
    assert s["colour_entropy"].item() == 1.0  # two equally full bins: exactly one bit
    assert s["saturation"].item() == 0.0


def test_entropy_of_four_and_of_all_512_colours():
    levels = (torch.arange(8) + 0.5) / 8  # the centre of each quantisation level
    r, g, b = torch.meshgrid(levels, levels, levels, indexing="ij")
    x = torch.stack([r, g, b]).reshape(1, 3, 16, 32)  # every one of the 512 bins once
    assert image_statistics(x, ["colour_entropy"])["colour_entropy"].item() == 9.0
    four = torch.zeros(1, 3, 2, 2)
    four[0, 0, 0, 1] = four[0, 1, 1, 0] = four[0, 2, 1, 1] = 1.0  # black, red, green, blue
    assert image_statistics(four, ["colour_entropy"])["colour_entropy"].item() == 2.0


def test_saturation_of_pure_and_half_saturated_colours():
    assert image_statistics(flat((1, 0, 0)), ["saturation"])["saturation"].item() == 1.0
    assert image_statistics(flat((1, 0.5, 0.5)), ["saturation"])["saturation"].item() == 0.5


def test_step_edge_marks_the_two_columns_either_side():
    x = step(0.0, 1.0, h=4, w=10, at=5)
    g = sobel_magnitude(x)[0]
    assert (g[:, [4, 5]] > 0.9).all()  # ~1: the step's contrast
    assert (g[:, [0, 1, 2, 3, 6, 7, 8, 9]] < 0.01).all()  # ~0 (rounding of the conv: not exactly 0)
    assert image_statistics(x, ["edge_density"])["edge_density"].item() == 2 / 10  # 2 columns x 4 rows / 40
    # the normalisation: g of a step is its contrast, so 0.3 is an edge (> 0.25) and 0.2 is not
    assert image_statistics(step(0.35, 0.65), ["edge_density"])["edge_density"].item() == 2 / 10
    assert image_statistics(step(0.4, 0.6), ["edge_density"])["edge_density"].item() == 0.0


def test_flat_image_has_no_edges():
    assert image_statistics(flat((0.3, 0.6, 0.2), 16, 16), ["edge_density"])["edge_density"].item() == 0.0


def test_jpeg_size_flat_below_noise_and_equal_to_pil():
    noise = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    s_flat = image_statistics(flat((0.5, 0.5, 0.5), 32, 32), ["jpeg_bytes_per_pixel"])["jpeg_bytes_per_pixel"]
    s_noise = image_statistics(noise, ["jpeg_bytes_per_pixel"])["jpeg_bytes_per_pixel"]
    assert s_flat.item() < s_noise.item()
    arr = (noise[0].double() * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(arr)).save(buf, format="JPEG", quality=75)
    assert s_noise.item() == buf.tell() / (32 * 32)


def test_video_is_the_mean_over_frames():
    g = torch.Generator().manual_seed(1)
    video = torch.rand(2, 2, 3, 8, 8, generator=g)
    video[0, 1] = 0.0  # a black frame: dark_fraction 1 in frame 1 of video 0
    s = image_statistics(video)
    f0, f1 = image_statistics(video[:, 0]), image_statistics(video[:, 1])
    for n in NAMES:
        assert torch.equal(s[n], (f0[n] + f1[n]) / 2), n
    assert s["dark_fraction"][0].item() == (f0["dark_fraction"][0].item() + 1.0) / 2


def test_pil_list_equals_tensor():
    g = torch.Generator().manual_seed(2)
    u8 = torch.randint(0, 256, (3, 8, 12, 3), generator=g, dtype=torch.uint8)  # [B,H,W,3]
    x = u8.permute(0, 3, 1, 2).float() / 255  # the same float32 values PIL images convert to
    pils = [Image.fromarray(a.numpy()) for a in u8]
    s_pil, s_t = image_statistics(pils), image_statistics(x)
    for n in NAMES:
        assert torch.equal(s_pil[n], s_t[n]), n
    mixed = image_statistics([pils[0], Image.new("RGB", (5, 7))])  # sizes differ: per image
    assert mixed["dark_fraction"].tolist() == [s_t["dark_fraction"][0].item(), 1.0]


def test_names_select_and_bad_inputs_fail_in_one_line():
    assert list(image_statistics(flat((0, 0, 0)), ["saturation", "dark_fraction"])) == ["saturation", "dark_fraction"]
    for bad in (torch.rand(2, 4, 8, 8), torch.rand(3, 8, 8), torch.zeros(1, 3, 8, 8, dtype=torch.uint8),
                np.zeros((1, 3, 8, 8)), "image.png"):
        with pytest.raises(ValueError, match=r"\[B,3,H,W\].*\[B,F,3,H,W\]") as e:
            image_statistics(bad)
        assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="unknown image statistic 'darkness'; known: dark_fraction, bright_fraction"):
        image_statistics(flat((0, 0, 0)), ["darkness"])


def test_within_prompt_diversity():
    prompts = ["a", "b", "a", "c", "b", "b", "d", "d"]
    feats = torch.tensor([[2.0, 0, 0], [3.0, 0, 0], [5.0, 0, 0], [1.0, 1, 1], [0, 4.0, 0], [0, 0, 0.5],
                          [1.0, 0, 0], [-1.0, 0, 0]])
    d, groups = within_prompt_diversity(feats, prompts)
    assert groups == ["a", "b", "d"]  # first-seen order; "c" has one row and is skipped
    assert d.dtype == torch.float64
    assert d.tolist() == [0.0, 1.0, 2.0]  # identical (any scale) -> 0, orthogonal -> 1, opposite -> 2
    d3, _ = within_prompt_diversity(torch.tensor([[1.0, 0], [0, 1.0], [1.0, 0]]), ["p"] * 3)
    assert d3.item() == pytest.approx(2 / 3, abs=1e-12)  # pairs: 1, 0, 1
    empty, none = within_prompt_diversity(torch.eye(2), ["x", "y"])
    assert empty.shape == (0,) and none == []
    with pytest.raises(ValueError, match=r"\[B, D\]"):
        within_prompt_diversity(torch.eye(3), ["x", "y"])


def test_feature_embedder_specs(monkeypatch):
    import flowalign.rewards.clip as clip
    from flowalign.rewards.hub import TINY_CLIP, resolve

    assert feature_embedder("none") is None and feature_embedder(None) is None
    made = []

    class FakeEmbedder:  # the real one loads transformers (seconds); the spec -> model mapping is what we test
        def __init__(self, model, **kw):
            made.append(model)

        def images(self, images):
            return torch.ones(len(images), 4)

    monkeypatch.setattr(clip, "CLIPEmbedder", FakeEmbedder)
    embed = feature_embedder("tiny_clip")
    assert embed(torch.rand(2, 3, 8, 8)).shape == (2, 4)
    assert resolve(made[0]) == str(TINY_CLIP) and TINY_CLIP.is_dir()  # the rewards' own tiny-CLIP path
    feature_embedder("openai/clip-vit-base-patch32")
    assert made[1] == "openai/clip-vit-base-patch32"
