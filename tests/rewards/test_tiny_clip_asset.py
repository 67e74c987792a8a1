"""The shipped tiny CLIP (assets/tiny-clip, scripts/train_tiny_clip.py): small, safetensors, loads offline
through the "tiny" alias, and ranks held-out toy captions above mismatched ones."""

import os

import pytest
import torch

from flowalign.rewards import get
from flowalign.rewards.hub import TINY_CLIP
from flowalign.toy import detect, render, sample_batch, score

from conftest import toy_images

pytestmark = pytest.mark.skipif(not (TINY_CLIP / "model.safetensors").exists(),
                                reason="assets/tiny-clip not built (python scripts/train_tiny_clip.py)")


def test_small_and_safetensors_only():
    files = os.listdir(TINY_CLIP)
    assert sum(os.path.getsize(TINY_CLIP / f) for f in files) <= 10e6
    assert not any(f.endswith((".bin", ".pt", ".pth", ".pkl")) for f in files)


def test_ranks_heldout_captions_above_mismatched():
    pairs = sample_batch(48, seed=321, split="heldout")
    caps = [p for p, _ in pairs]
    images = [render(spec, 64, seed=1000 + i)[0] for i, (_, spec) in enumerate(pairs)]
    r = get("clip_score", model="tiny")
    sim = r.clip.images(images) @ r.clip.texts(caps).T  # [48 images, 48 captions]
    wins = []
    for i, im in enumerate(images):
        dets = detect(im)
        wrong = [j for j, c in enumerate(caps) if c != caps[i] and score(c, dets)["strict"] < 1]
        wins += [bool(sim[i, i] > sim[i, j]) for j in wrong]
    acc = sum(wins) / len(wins)
    assert acc > 0.8, f"held-out pairwise ranking accuracy {acc:.3f}"


def test_dino_similarity_on_the_tiny_clip_vision_tower():
    refs = toy_images(["a red circle", "a red circle"], size=64, seed=3)
    r = get("dino_similarity", model="tiny", references=refs)
    s = r(toy_images(["a red circle", "the text \"QX\""], size=64, seed=9), ["", ""])
    assert s[0] > s[1]
