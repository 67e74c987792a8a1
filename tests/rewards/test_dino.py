"""dino_similarity: mean cosine to the reference pool (images, folder or saved features), the CLS and
patch-mean variants, and the Adv-GRPO discriminator head trained with the hinge loss."""

import pytest
import torch
import torch.nn.functional as F

from flowalign.rewards import get, to_pil_list

from conftest import toy_images

REFS = ["a red circle", "a blue square", "two green triangles"]
OTHER = ["a yellow triangle", "four red squares"]


def test_pool_mean_cosine(dino_dir):
    refs, x = toy_images(REFS, seed=1), toy_images(OTHER, seed=2)
    for variant in ("cls", "patch_mean"):
        r = get("dino_similarity", model=dino_dir, references=refs, variant=variant)
        f, fr = F.normalize(r.features(x), dim=-1), F.normalize(r.features(refs), dim=-1)
        torch.testing.assert_close(r(x, OTHER), (f @ fr.T).mean(1), atol=1e-5, rtol=1e-5)
    one = get("dino_similarity", model=dino_dir, references=refs[:1])
    assert one(refs[:1], REFS[:1]).item() == pytest.approx(1.0, abs=1e-5)  # an image is its own best match
    assert one(x, OTHER).max() < 0.9999


def test_features_file_and_folder_match_images(dino_dir, tmp_path):
    from safetensors.torch import save_file

    refs, x = toy_images(REFS, seed=1), toy_images(OTHER, seed=2)
    r = get("dino_similarity", model=dino_dir, references=refs)
    save_file({"features": r.features(refs).contiguous()}, str(tmp_path / "pool.safetensors"))
    for i, im in enumerate(to_pil_list(refs)):
        im.save(tmp_path / f"ref{i}.png")
    expect = r(x, OTHER)
    for kw in (dict(reference_features=str(tmp_path / "pool.safetensors")), dict(references=str(tmp_path))):
        torch.testing.assert_close(get("dino_similarity", model=dino_dir, **kw)(x, OTHER), expect, atol=1e-5, rtol=1e-5)


def test_clip_vision_tower_as_backbone(clip_dir):
    refs = toy_images(REFS, seed=1)
    r = get("dino_similarity", model=clip_dir, references=refs[:1])
    assert r.backbone.size == 32 and r(refs[:1], REFS[:1]).item() == pytest.approx(1.0, abs=1e-5)


def test_head_learns_to_tell_references_from_generated(dino_dir, tmp_path):
    refs = toy_images(REFS * 2, seed=1)
    fake = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))  # "generated": noise
    r = get("dino_similarity", model=dino_dir, references=refs, head=True, head_hidden=16, n_patches=8, lr=5e-3)
    logs = [r.train_head_step(fake) for _ in range(20)]
    assert logs[-1]["loss"] < 0.5 * logs[0]["loss"], (logs[0], logs[-1])
    held_refs, held_fake = toy_images(OTHER, seed=5), torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(9))
    assert r(held_refs, OTHER).min() > r(held_fake, OTHER).max()  # the reward prefers reference-like images
    r.save_head(str(tmp_path / "head.safetensors"))
    r2 = get("dino_similarity", model=dino_dir, head=True, head_hidden=16, n_patches=8,
             head_path=str(tmp_path / "head.safetensors"))
    torch.testing.assert_close(r2(held_fake, OTHER), r(held_fake, OTHER))


def test_per_sample_pools_from_metadata(dino_dir):
    refs, x = toy_images(REFS, seed=1), toy_images(OTHER, seed=2)
    r = get("dino_similarity", model=dino_dir)  # no global pool
    pools = [r.features(refs[:1]), r.features(refs[1:])]
    s = r(x, OTHER, [{"reference_features": p} for p in pools])
    for i, p in enumerate(pools):
        expect = get("dino_similarity", model=dino_dir, reference_features=p)(x[i:i + 1], OTHER[i:i + 1])
        torch.testing.assert_close(s[i:i + 1], expect, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="no reference pool"):
        r(x, OTHER)


def test_bad_options(dino_dir):
    with pytest.raises(ValueError, match="variant must be"):
        get("dino_similarity", model=dino_dir, references=toy_images(REFS), variant="mean")
    with pytest.raises(RuntimeError, match="needs head=True"):
        get("dino_similarity", model=dino_dir, references=toy_images(REFS)).train_head_step(toy_images(OTHER))


def test_condition_image_and_row_reference_pools(dino_dir, tmp_path):
    # edit preservation: each image against its own row's condition image; identity: against the row's pool
    refs, x = toy_images(REFS, seed=1), toy_images(OTHER, seed=2)
    r = get("dino_similarity", model=dino_dir, pool="condition_image")
    meta = [{"condition_image": refs[0]}, {"condition_image": refs[1]}]
    f, fr = F.normalize(r.features(x), dim=-1), F.normalize(r.features(refs[:2]), dim=-1)
    torch.testing.assert_close(r(x, OTHER, meta), (f * fr).sum(-1), atol=1e-5, rtol=1e-5)
    assert r(refs[:2], OTHER, meta).min().item() == pytest.approx(1.0, abs=1e-5)  # an unedited image keeps all
    with pytest.raises(ValueError, match="JSONL"):
        r(x, OTHER)
    for i, im in enumerate(to_pil_list(refs)):
        im.save(tmp_path / f"ref{i}.png")
    rows = get("dino_similarity", model=dino_dir, pool="row_references")
    pool = [str(tmp_path / "ref1.png"), str(tmp_path / "ref2.png")]
    s = rows(x, OTHER, [{"condition_image": refs[0], "references": pool}, {"condition_image": refs[0]}])
    expect = (f[0] * F.normalize(rows.features(refs[1:]), dim=-1).mean(0)).sum()
    torch.testing.assert_close(s[0], expect, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(s[1], (f[1] * fr[0]).sum(), atol=1e-5, rtol=1e-5)  # no pool: the condition image
    with pytest.raises(ValueError, match="pool must be"):
        get("dino_similarity", model=dino_dir, pool="nearest")
