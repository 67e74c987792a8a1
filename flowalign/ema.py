"""Exponential moving average of trainable parameters: ``ema <- d ema + (1 - d) theta``."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Sequence

import torch


class EMA:
    def __init__(self, params: Sequence[torch.nn.Parameter], decay: float):
        if not 0 <= decay < 1:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.params = list(params)
        self.decay = decay
        self.shadow = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def update(self) -> None:
        for s, p in zip(self.shadow, self.params):
            s.lerp_(p.detach(), 1 - self.decay)

    @contextmanager
    @torch.no_grad()
    def swapped_in(self) -> Iterator[None]:
        """Evaluate with the EMA weights inside the block; the live weights come back after it."""
        live = [p.detach().clone() for p in self.params]
        for s, p in zip(self.shadow, self.params):
            p.copy_(s)
        try:
            yield
        finally:
            for v, p in zip(live, self.params):
                p.copy_(v)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "shadow": [s.clone() for s in self.shadow]}

    def load_state_dict(self, state: dict) -> None:
        for s, v in zip(self.shadow, state["shadow"]):
            s.copy_(v)
