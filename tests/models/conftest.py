"""Shared fixtures: tiny pipelines of every family, built in-process (never downloaded)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from flowalign.models import adapter_for
from flowalign.toy.pipelines import TINY_BUILDERS

PROMPTS = ["a red circle", "two blue squares above"]
# pipeline-call kwargs per family: small sizes, short text
CALL_KW = {
    "sd3": dict(max_sequence_length=16),
    "flux": dict(height=16, width=16, max_sequence_length=16),
    "sd": {},
    "sdxl": {},
    "wan": dict(height=32, width=32, num_frames=5, max_sequence_length=16),
}
SIZE_KW = {"flux": dict(height=16, width=16), "wan": dict(height=32, width=32, num_frames=5)}
FAMILIES = list(TINY_BUILDERS)


def make_adapter(family, **builder_kw):
    """(pipe, adapter) for a fresh tiny pipeline of ``family``."""
    pipe = TINY_BUILDERS[family](**builder_kw)
    kw = {"max_sequence_length": 16} if family in ("sd3", "flux", "wan") else {}
    return pipe, adapter_for(pipe, **kw)


def nonzero_lora(params, seed=1, scale=0.3):
    """Give LoRA parameters random nonzero values (peft initialises B = 0, a no-op)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(scale * torch.randn(p.shape, generator=gen))


@pytest.fixture
def gen():
    return lambda seed=0: torch.Generator().manual_seed(seed)


@pytest.fixture
def h():
    """Helpers as a fixture (test modules import nothing from conftest)."""
    from types import SimpleNamespace

    return SimpleNamespace(PROMPTS=PROMPTS, CALL_KW=CALL_KW, SIZE_KW=SIZE_KW, make_adapter=make_adapter,
                           nonzero_lora=nonzero_lora)
