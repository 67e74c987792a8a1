"""Suite-wide settings: one torch thread per test process.

`make test` runs pytest with two workers on a 2-core machine; two threads each would oversubscribe the cores
and make the tiny-model tests many times slower.
"""

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """(pipeline folder, LoRA folder): a saved tiny SD3 pipeline (no T5) and a random nonzero LoRA for it."""
    from flowalign import lora
    from flowalign.models import adapter_for
    from flowalign.toy.pipelines import tiny_sd3_pipeline

    root = tmp_path_factory.mktemp("tiny")
    pipe = tiny_sd3_pipeline(with_t5=False)
    pipe.save_pretrained(str(root / "model"))
    params = lora.add_lora(adapter_for(pipe), rank=4)
    with torch.no_grad():
        for p in params:
            p.add_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    lora.save_lora(adapter_for(pipe), str(root / "lora"))
    return str(root / "model"), str(root / "lora")


@pytest.fixture(scope="module")
def tiny_pipe_dir(tmp_path_factory):
    """A saved tiny SD3 pipeline folder (16 px images, no T5): `model.path` for end-to-end training runs."""
    from flowalign.toy.pipelines import tiny_sd3_pipeline

    path = tmp_path_factory.mktemp("tiny16") / "pipe"
    tiny_sd3_pipeline(image_size=16, with_t5=False).save_pretrained(str(path))
    return str(path)


@pytest.fixture(scope="module")
def tiny_pipe16(tmp_path_factory):
    """Folder of a saved tiny SD3 pipeline (16 px images, with T5), seeded: what `flowalign train` runs load."""
    from flowalign.toy.pipelines import tiny_sd3_pipeline

    path = tmp_path_factory.mktemp("tiny") / "pipe"
    torch.manual_seed(0)
    tiny_sd3_pipeline(image_size=16).save_pretrained(str(path))
    return str(path)


def tiny_dinov2(path, seed=0):
    """Save a random Dinov2Model (patch 8, hidden 32, 1 layer) to ``path``."""
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(seed)
    cfg = Dinov2Config(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=2)
    Dinov2Model(cfg).eval().save_pretrained(str(path))
    return str(path)


@pytest.fixture(scope="session")
def dino_dir(tmp_path_factory):
    return tiny_dinov2(tmp_path_factory.mktemp("tiny_dino"))


def two_adapter_run_dir(tiny_model, tmp_path_factory):
    """(model, run folder): ``run/lora`` = the tiny LoRA, ``run/ckpt-3/lora`` = its weights times -2 (two adapters
    of one run that sample different images; the web app's tests)."""
    import shutil

    from safetensors import safe_open
    from safetensors.torch import save_file

    from flowalign.apps.sample import LORA_FILE

    model, lora_dir = tiny_model
    run = tmp_path_factory.mktemp("runs") / "run"
    shutil.copytree(lora_dir, run / "lora")
    os.makedirs(run / "ckpt-3" / "lora")
    with safe_open(os.path.join(lora_dir, LORA_FILE), "pt") as f:
        tensors, meta = {k: -2 * f.get_tensor(k) for k in f.keys()}, f.metadata()
    save_file(tensors, str(run / "ckpt-3" / "lora" / LORA_FILE), metadata=meta)
    return model, str(run)


@pytest.fixture(scope="module")
def two_adapter_run(tiny_model, tmp_path_factory):
    return two_adapter_run_dir(tiny_model, tmp_path_factory)
