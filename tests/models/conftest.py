"""Shared fixtures: tiny pipelines of every family, built in-process (never downloaded)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from flowalign.models import ADAPTERS, adapter_for
from flowalign.toy.tiny_families import TINY_BUILDERS, TINY_SETTINGS, tiny_condition_images

PROMPTS = ["a red circle", "two blue squares above"]
# pipeline-call kwargs per family (small sizes, short text), the latent sizes, the adapter options
CALL_KW = {f: dict(s["call"]) for f, s in TINY_SETTINGS.items()}
SIZE_KW = {f: dict(s["size"]) for f, s in TINY_SETTINGS.items() if s["size"]}
FAMILIES = list(TINY_BUILDERS)


def make_adapter(family, **builder_kw):
    """(pipe, adapter) for a fresh tiny pipeline of ``family``."""
    pipe = TINY_BUILDERS[family](**builder_kw)
    pipe.set_progress_bar_config(disable=True)
    return pipe, adapter_for(pipe, **TINY_SETTINGS[family]["adapter"])


def condition(family, n, seed=0):
    """``encode_prompts`` keywords for ``n`` rows: the latent size and, for image-conditioned families, one random
    condition image a row."""
    kw = dict(TINY_SETTINGS[family]["size"])
    if ADAPTERS[family].condition_image:
        kw["images"] = tiny_condition_images(n, size=kw.get("height", 32), seed=seed)
    return kw


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
                           condition=condition, nonzero_lora=nonzero_lora)
