"""Weight snapshots: shadow copies of some parameters (the LoRA weights) that can be swapped in for a forward
pass, and the in-place EMA update snap <- d snap + (1 - d) theta. Used for the old / sampler models of
DiffusionNFT and CRD (flowalign.algorithms) and the evaluation EMA (flowalign.runtime.ema). No I/O.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable, Iterator, Sequence

import torch

from . import fsdp


@torch.no_grad()
def ema_update_(snapshot: Iterable[torch.Tensor], params: Iterable[torch.Tensor], decay: float) -> None:
    """In place ``snap <- d snap + (1 - d) theta`` for each pair; d <= 0 copies theta exactly, d >= 1 keeps the
    snapshot (an offline schedule)."""
    snapshot, params = list(snapshot), list(params)
    if len(snapshot) != len(params):
        raise ValueError(f"{len(snapshot)} snapshot tensors for {len(params)} parameters")
    for s, p in zip(snapshot, params):
        if s.shape != p.shape:
            raise ValueError(f"snapshot tensor {tuple(s.shape)} does not match parameter {tuple(p.shape)}")
        if decay >= 1:
            continue
        if decay <= 0:
            s.copy_(p.detach())
        else:
            s.mul_(decay).add_(p.detach().to(s.dtype), alpha=1 - decay)


class Snapshot:
    """A shadow copy of some parameters (e.g. the LoRA weights) that can be swapped in for a forward pass.

    ``update(d)``: ``snap <- d snap + (1 - d) theta`` (d <= 0: exact copy). ``swapped_in()``: inside the block
    the live parameters hold the snapshot's values; they are restored exactly afterwards. Costs two copies of
    the parameters per swap (cheap for LoRA) and no second model. With FSDP the parameters are sharded
    ``DTensor`` s and so are the copies: every swap and update acts on this process's shard only (no communication).
    """

    def __init__(self, params: Sequence[torch.nn.Parameter]):
        self.params = list(params)
        self.tensors = [p.detach().clone() for p in self.params]

    def update(self, decay: float) -> None:
        ema_update_(self.tensors, self.params, decay)

    def state_dict(self) -> dict:
        """{"tensors": [copies of the snapshot tensors]} (for checkpoints; sharded ones are gathered there)."""
        return {"tensors": [t.detach().clone() for t in self.tensors]}

    def load_state_dict(self, state: dict) -> None:
        load_tensors_(self.tensors, state["tensors"], "snapshot")

    @contextmanager
    @torch.no_grad()
    def swapped_in(self) -> Iterator[None]:
        live = [p.detach().clone() for p in self.params]
        for s, p in zip(self.tensors, self.params):
            p.copy_(s)
        try:
            yield
        finally:
            for v, p in zip(live, self.params):
                p.copy_(v)


def load_tensors_(targets: Sequence[torch.Tensor], values: Sequence[torch.Tensor], what: str) -> None:
    """Copy ``values`` into ``targets`` in place (device and dtype of the targets); a count or shape mismatch
    raises ValueError naming ``what`` (e.g. a checkpoint written with another LoRA rank). A sharded target (FSDP)
    takes its own shard of the full saved tensor."""
    if len(targets) != len(values):
        raise ValueError(f"{what}: {len(values)} saved tensors for {len(targets)} parameters")
    with torch.no_grad():
        for i, (t, v) in enumerate(zip(targets, values)):
            if tuple(t.shape) != tuple(v.shape):
                raise ValueError(f"{what}: saved tensor {i} has shape {tuple(v.shape)}, expected {tuple(t.shape)}")
            t.copy_(fsdp.local_like(v, t))
