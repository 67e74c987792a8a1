"""Tiny random CLIP / DINOv2 models built in-process and saved to a temp folder (never downloaded)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

PROMPTS = ["a red circle", "two blue squares", "the text \"AB\"", "a green triangle"]


def tiny_clip(path, seed=0, image_size=32, proj=16):
    """Save a random CLIPModel (vision 32px, patch 8, hidden 32) + toy tokenizer to ``path``."""
    from transformers import CLIPConfig, CLIPModel

    from flowalign.toy.pipelines import tiny_clip_tokenizer

    tok = tiny_clip_tokenizer(max_length=16, save_dir=str(path))
    eos = tok.convert_tokens_to_ids("<|endoftext|>")
    torch.manual_seed(seed)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=16, bos_token_id=eos - 1,
                         eos_token_id=eos, pad_token_id=eos),
        vision_config=dict(image_size=image_size, patch_size=8, hidden_size=32, intermediate_size=64,
                           num_hidden_layers=1, num_attention_heads=2),
        projection_dim=proj,
    )
    CLIPModel(cfg).eval().save_pretrained(str(path))
    tok.save_pretrained(str(path))
    return str(path)


@pytest.fixture(scope="session")
def clip_dir(tmp_path_factory):
    return tiny_clip(tmp_path_factory.mktemp("tiny_clip"))


def toy_images(prompts, size=32, seed=0):
    """Rendered toy-world images for ``prompts`` as a float tensor [B,3,size,size] in [0,1]."""
    import numpy as np

    from flowalign.toy import render

    arrs = [np.asarray(render(p, size=size, seed=seed + i)[0], dtype=np.float32) / 255 for i, p in enumerate(prompts)]
    return torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).contiguous()


def save_aesthetic_head(path, dim, seed=0, hidden=(8, 4)):
    """A random LAION-layout MLP head (Linear at 0, 2, ..., dropout slots between) saved as .pth."""
    from torch import nn

    torch.manual_seed(seed)
    dims = (dim,) + hidden + (1,)
    sd = {}
    for j, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        lin = nn.Linear(a, b)
        sd[f"layers.{2 * j}.weight"], sd[f"layers.{2 * j}.bias"] = lin.weight.data, lin.bias.data
    torch.save(sd, str(path))
    return str(path)


@pytest.fixture(scope="session")
def reward_server():
    """A loopback server scoring with jpeg_incompressibility; yields its url, shut down afterwards."""
    import threading

    from flowalign.rewards import get
    from flowalign.rewards.remote import serve

    server = serve(get("jpeg_incompressibility"))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
