"""Exponential moving average of trainable parameters for evaluation: ``ema <- d ema + (1 - d) theta``.

A :class:`~flowalign.runtime.snapshot.Snapshot` with a fixed decay; ``swapped_in()`` evaluates with it.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .snapshot import Snapshot


class EMA(Snapshot):
    def __init__(self, params: Sequence[torch.nn.Parameter], decay: float):
        if not 0 <= decay < 1:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        super().__init__(params)
        self.decay = decay

    def update(self) -> None:  # type: ignore[override]
        super().update(self.decay)

    def state_dict(self) -> dict:
        return {"decay": self.decay, **super().state_dict()}
