"""Missing weights fail with one message naming what to download and the option to pass."""

import pytest

from flowalign.rewards import get
from flowalign.rewards.hub import TINY_CLIP, missing_message


def test_pickscore_missing_names_the_download():
    with pytest.raises(FileNotFoundError) as e:
        get("pickscore")  # not cached, offline
    msg = str(e.value)
    assert "PickScore weights 'yuvalkirstain/PickScore_v1' not found locally (offline)" in msg
    assert "huggingface-cli download yuvalkirstain/PickScore_v1" in msg and "model=/path/to/folder" in msg


@pytest.mark.parametrize("name, kw, needle", [
    ("clip_score", dict(model="openai/clip-vit-large-patch14"), "huggingface-cli download openai/clip-vit-large-patch14"),
    ("clip_score", dict(model="/no/such/folder"), "'/no/such/folder' not found"),
    ("dino_similarity", dict(references=[]), "huggingface-cli download facebook/dinov2-small"),
    ("aesthetic", {}, "sac+logos+ava1-l14-linearMSE.pth"),
    ("hps", {}, "huggingface-cli download xswu/HPSv2 HPS_v2.1_compressed.pt"),
])
def test_missing_weights_message(name, kw, needle):
    with pytest.raises(FileNotFoundError, match="not found") as e:
        get(name, **kw)
    assert needle in str(e.value)
    assert "\n" not in str(e.value)


def test_pickscore_tokenizer_missing_names_tokenizer_option(clip_dir):
    with pytest.raises(FileNotFoundError, match="tokenizer=/path/to/folder"):
        get("pickscore", model=clip_dir, tokenizer="laion/CLIP-ViT-H-14-laion2B-s32B-b79K")


def test_tiny_alias_message_says_how_to_build_it():
    assert "scripts/train_tiny_clip.py" in missing_message("CLIP", str(TINY_CLIP))


def test_unknown_reward_lists_choices():
    with pytest.raises(ValueError, match="choose one of: .*clip_score.*ocr"):
        get("clipscore")
