"""One contract every reward passes: shape [B] float32 on the CPU, batch == one by one, deterministic,
PIL == tensor input, video [B,F,3,H,W] == the mean over frames. Model-based rewards use tiny random
models saved to a temp folder (so loading from a local folder is exercised too)."""

import pytest
import torch

from flowalign.rewards import REWARDS, Reward, get, to_pil_list

from conftest import save_aesthetic_head, toy_images

SCENES = ["a red circle", "two blue squares", "a green triangle above a yellow circle"]
TEXTS = ['the text "AB"', 'the text "C"', 'the text "XYZ"']
# the images shown: two match their prompt, the third only partly, so scores differ within a batch
SHOWN = {tuple(SCENES): SCENES[:2] + ["a yellow circle above a green triangle"], tuple(TEXTS): TEXTS[:2] + ['the text "XY"']}


def _cases(clip_dir, dino_dir, tmp, url):
    """name -> (factory, prompts); every REWARDS entry appears at least once."""
    refs = toy_images(SCENES, seed=100)
    return {
        "toy_geneval": (lambda: get("toy_geneval"), SCENES),
        "clip_score": (lambda: get("clip_score", model=clip_dir), SCENES),
        "dino_similarity": (lambda: get("dino_similarity", model=dino_dir, references=refs), SCENES),
        "dino_similarity/patch_mean_clip": (
            lambda: get("dino_similarity", model=clip_dir, references=refs, variant="patch_mean"), SCENES),
        "dino_similarity/head": (lambda: get("dino_similarity", model=dino_dir, references=refs, head=True,
                                             head_hidden=8, n_patches=4), SCENES),
        "ocr": (lambda: get("ocr"), TEXTS),
        "pickscore": (lambda: get("pickscore", model=clip_dir), SCENES),
        "hps": (lambda: get("hps", backend="hf", model=clip_dir), SCENES),
        "aesthetic": (lambda: get("aesthetic", model=clip_dir, head=save_aesthetic_head(tmp / "head.pth", 16)), SCENES),
        "jpeg_compressibility": (lambda: get("jpeg_compressibility"), SCENES),
        "jpeg_incompressibility": (lambda: get("jpeg_incompressibility"), SCENES),
        "remote": (lambda: get("remote", url=url), SCENES),
        "multi": (lambda: get("multi", rewards={"jpeg_incompressibility": {}, "clip_score": {"model": clip_dir}},
                              weights={"clip_score": 2.0}, normalize="scale", scales={"jpeg_incompressibility": 3.0}),
                  SCENES),
    }


CASES = ["toy_geneval", "clip_score", "dino_similarity", "dino_similarity/patch_mean_clip", "dino_similarity/head",
         "ocr", "pickscore", "hps", "aesthetic", "jpeg_compressibility", "jpeg_incompressibility", "remote", "multi"]


def test_every_reward_has_a_case():
    assert {c.split("/")[0] for c in CASES} == set(REWARDS)


@pytest.fixture(scope="module")
def built(clip_dir, dino_dir, tmp_path_factory, reward_server):
    cases = _cases(clip_dir, dino_dir, tmp_path_factory.mktemp("heads"), reward_server)
    cache = {}

    def build(case):
        if case not in cache:
            factory, prompts = cases[case]
            cache[case] = (factory(), prompts)
        return cache[case]

    return build


@pytest.mark.parametrize("case", CASES)
def test_contract(case, built):
    reward, prompts = built(case)
    assert isinstance(reward, Reward) and isinstance(reward.name, str)
    x = toy_images(SHOWN[tuple(prompts)], seed=0)  # exact multiples of 1/255: PIL round trips are lossless
    s = reward(x, prompts)
    assert s.shape == (3,) and s.dtype == torch.float32 and s.device.type == "cpu"
    assert torch.isfinite(s).all()
    assert s.unique().numel() > 1, f"{case}: constant scores {s.tolist()} would make the checks below vacuous"
    # batching: one by one gives the same scores
    one = torch.cat([reward(x[i:i + 1], prompts[i:i + 1]) for i in range(3)])
    torch.testing.assert_close(one, s, atol=1e-4, rtol=1e-4)
    # determinism, and PIL input == tensor input
    torch.testing.assert_close(reward(x, prompts), s, atol=0, rtol=0)
    torch.testing.assert_close(reward(to_pil_list(x), prompts), s, atol=1e-4, rtol=1e-4)
    # video [B,F,3,H,W]: scored per frame, averaged
    video = torch.stack([x[:2], toy_images(prompts[:2], seed=7)], dim=1)  # [2,2,3,H,W]
    frames = torch.stack([reward(video[:, f], prompts[:2]) for f in range(2)], 1)
    torch.testing.assert_close(reward(video, prompts[:2]), frames.mean(1), atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="images but"):
        reward(x, prompts[:2])


DIFFERENTIABLE = {"clip_score", "dino_similarity", "dino_similarity/patch_mean_clip", "dino_similarity/head",
                  "pickscore", "hps", "aesthetic"}  # torch all the way from pixels to score (reward backprop)


@pytest.mark.parametrize("case", CASES)
def test_differentiable_flag_is_honest(case, built):
    reward, prompts = built(case)
    x = toy_images(SHOWN[tuple(prompts)], seed=0)
    assert reward.differentiable == (case in DIFFERENTIABLE)
    if not reward.differentiable:
        with pytest.raises(TypeError, match="is not differentiable in torch"):
            reward.score_differentiable(x, prompts)
        return
    x = x.clone().requires_grad_(True)
    s = reward.score_differentiable(x, prompts)
    torch.testing.assert_close(s.detach().cpu(), reward(x.detach(), prompts), atol=1e-5, rtol=1e-5)
    s.sum().backward()
    assert x.grad is not None and float(x.grad.abs().sum()) > 0
