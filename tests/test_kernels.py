"""flowalign.runtime.kernels: training on CUDA turns cuDNN attention off (its backward failed on FLUX shapes on an H100);
a CPU device, or FLOWALIGN_CUDNN_ATTENTION=1, leaves torch's flag alone."""

import pytest
import torch

from flowalign.runtime.kernels import avoid_cudnn_attention


@pytest.fixture
def cudnn_flag():
    before = torch.backends.cuda.cudnn_sdp_enabled()
    torch.backends.cuda.enable_cudnn_sdp(True)
    yield
    torch.backends.cuda.enable_cudnn_sdp(before)


def test_cuda_device_turns_cudnn_attention_off(cudnn_flag, monkeypatch):
    monkeypatch.delenv("FLOWALIGN_CUDNN_ATTENTION", raising=False)
    assert avoid_cudnn_attention("cuda:0") is True
    assert not torch.backends.cuda.cudnn_sdp_enabled()


@pytest.mark.parametrize("device,env", [("cpu", None), (torch.device("cpu"), None), ("cuda", "1")])
def test_cpu_or_opt_out_leaves_it(cudnn_flag, monkeypatch, device, env):
    if env is None:
        monkeypatch.delenv("FLOWALIGN_CUDNN_ATTENTION", raising=False)
    else:
        monkeypatch.setenv("FLOWALIGN_CUDNN_ATTENTION", env)
    assert avoid_cudnn_attention(device) is False
    assert torch.backends.cuda.cudnn_sdp_enabled()
