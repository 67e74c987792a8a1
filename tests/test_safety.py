"""Safety defaults: pipelines and LoRAs load from safetensors only (never a pickle), model code runs only with
model.trust_remote_code, and the servers bind 127.0.0.1 unless told otherwise."""

import inspect
import shutil

import pytest
import torch
from safetensors.torch import load_file

from flowalign import lora
from flowalign.cli import build_parser
from flowalign.config import Config, with_overrides
from flowalign.models import ModelNotFoundError, adapter_for, load_pipeline
from flowalign.toy.pipelines import tiny_sd3_pipeline


@pytest.fixture
def no_torch_load(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("torch.load called: a pickle was read")

    monkeypatch.setattr(torch, "load", refuse)


def test_pickled_pipeline_is_refused(tmp_path, tiny_pipe_dir, no_torch_load):
    shutil.copytree(tiny_pipe_dir, tmp_path / "bin")
    weights = tmp_path / "bin" / "transformer" / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(str(weights)), str(weights.with_suffix(".bin")))  # the same weights, pickled
    weights.unlink()
    with pytest.raises(ModelNotFoundError, match="loads weights from .safetensors files only"):
        load_pipeline(str(tmp_path / "bin"))


def test_pickled_lora_is_refused(tmp_path, no_torch_load):
    ad = adapter_for(tiny_sd3_pipeline(image_size=16, with_t5=False))
    lora.add_lora(ad, rank=2)
    lora.save_lora(ad, str(tmp_path / "lora"))
    (tmp_path / "lora" / "pytorch_lora_weights.safetensors").rename(tmp_path / "lora" / "pytorch_lora_weights.bin")
    with pytest.raises(ValueError, match=r"holds pickled weights \(pytorch_lora_weights.bin\), which can run code"):
        lora.load_lora(ad, str(tmp_path / "lora" / "pytorch_lora_weights.bin"), adapter_name="x")
    with pytest.raises((OSError, ValueError)):  # the folder has only the .bin: not loaded
        lora.load_lora(ad, str(tmp_path / "lora"), adapter_name="y")


def test_trust_remote_code_only_when_asked(monkeypatch, tmp_path):
    import diffusers

    seen = []
    monkeypatch.setattr(diffusers.StableDiffusion3Pipeline, "from_pretrained",
                        classmethod(lambda cls, path, **kw: seen.append(kw) or tiny_sd3_pipeline(image_size=16)))
    load_pipeline("org/model", family="sd3")
    assert seen[-1]["use_safetensors"] is True and seen[-1]["trust_remote_code"] is False
    assert Config().model.trust_remote_code is False
    from flowalign.trainer import Trainer

    cfg = with_overrides(Config(), {"model.path": "org/model", "model.family": "sd3", "model.trust_remote_code": True,
                                    "model.lora_rank": 2, "train.out_dir": str(tmp_path)})
    Trainer(cfg)
    assert seen[-1]["trust_remote_code"] is True


def test_servers_bind_loopback_by_default():
    from flowalign.apps.gradio_app import launch
    from flowalign.rewards.remote import serve

    assert inspect.signature(launch).parameters["host"].default == "127.0.0.1"
    assert inspect.signature(serve).parameters["host"].default == "127.0.0.1"
    assert build_parser().parse_args(["gradio"]).host == "127.0.0.1"
