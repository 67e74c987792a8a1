"""Data-parallel training over processes (``accelerate launch`` / ``torchrun``): the process group, each
process's shard of the global batch, the gathers and the gradient all-reduce. No algorithm logic.

Contract: a run on W processes takes the SAME optimizer steps as one process on the same global batch and seed.

- Every process draws the same global prompt list (same seeded rng) and rolls out its contiguous shard of
  whole prompt groups, ``global rows [r B/W, (r+1) B/W)`` for rank r.
- Noise does not depend on W: a :class:`RowShard` stands in for the shared ``torch.Generator``; it draws the
  noise of the whole batch (or minibatch) and keeps this process's rows, so the generator advances exactly as
  in a 1-process run (initial noise and SDE steps in ``rollout``, forward-process noise in NFT/CRD).
- Rewards and their validity mask are gathered (:meth:`Distributed.gather`) before the group advantages, so
  global-std advantages see the whole batch; every process then holds the global advantages.
- Update rules shuffle and split the GLOBAL rows exactly as one process does; each process computes the rows of
  every minibatch that it holds (:meth:`Distributed.part`), scaled to its share of the minibatch mean, and
  :meth:`Distributed.all_reduce_grads` sums the gradients before clipping, so every process steps identically.

With ``train.shard: fsdp`` (or ``ACCELERATE_USE_FSDP=true``, set by ``accelerate launch --config_file
configs/accelerate/fsdp.yaml``) the denoiser is also sharded over the processes (:mod:`flowalign.runtime.fsdp`). Then
every process must make the same forward and backward calls: :meth:`Distributed.part` gives a process holding
none of a minibatch's rows one placeholder row with weight 0, and :meth:`Distributed.all_reduce_grads` is a no-op
(FSDP's reduce-scatter has summed the gradients already).

One process (no ``WORLD_SIZE`` > 1 in the environment) gets :data:`SINGLE`, whose methods are identities:
no accelerate state, no behaviour change.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch


@dataclass
class RowShard:
    """Rows ``rows`` of a batch of ``total`` rows whose noise comes from one shared generator.

    Used where a ``torch.Generator`` goes (``flowalign.samplers`` ``randn_like``, ``rollout``'s initial noise):
    ``randn_like(sample)`` draws ``[total, *sample.shape[1:]]`` and returns rows ``rows`` [len(rows), ...], so a
    row's noise and the generator's state afterwards are those of the unsharded draw.
    """

    generator: torch.Generator
    rows: Union[slice, torch.Tensor]
    total: int

    @property
    def device(self) -> torch.device:
        return self.generator.device

    def randn_like(self, sample: torch.Tensor) -> torch.Tensor:
        full = torch.randn((self.total, *sample.shape[1:]), generator=self.generator, device=self.generator.device,
                           dtype=torch.float32)
        rows = self.rows if isinstance(self.rows, slice) else self.rows.to(full.device)
        return full[rows].to(sample.device)


@dataclass
class Part:
    """This process's part of a selection of global rows (e.g. a minibatch).

    rows: [m] the global row indices held here (index advantages, rewards, tasks with these);
    local: [m] the same rows as indices into this process's trajectory;
    pos: [m] their positions within the selection (which noise rows are ours), None when all are ours;
    total: the selection's size; share: m / total, the weight of a mean over ``local`` in the selection's mean;
    placeholder: True when the process holds none of the rows but must run the forward and backward calls anyway
    (FSDP): ``rows`` / ``local`` / ``pos`` then name one row of its shard and ``share`` is 0, so its loss only
    keeps the collectives in step; leave it out of metrics.
    """

    rows: torch.Tensor
    local: torch.Tensor
    pos: Optional[torch.Tensor]
    total: int
    share: float
    placeholder: bool = False

    @property
    def size(self) -> int:
        return int(self.rows.numel())


class Distributed:
    """The process group of a run: ``rank``, ``world_size``, ``is_main`` and the collectives the trainer and the
    update rules use. ``Distributed()`` is one process (every method an identity); :func:`setup` builds the
    multi-process one from ``accelerate``'s ``PartialState``."""

    def __init__(self, state=None, fsdp: bool = False):
        self.state = state
        self.rank = state.process_index if state is not None else 0
        self.world_size = state.num_processes if state is not None else 1
        self.fsdp = fsdp and self.world_size > 1  # the denoiser is sharded (flowalign.runtime.fsdp): forwards in lockstep

    @property
    def is_main(self) -> bool:
        """Only the main process writes metrics, evaluations, the LoRA and plots."""
        return self.rank == 0

    @property
    def device(self) -> Optional[str]:
        """Where this process's model runs when ``model.device`` is unset: its own accelerator under a launcher,
        else cuda when available (None = the pipeline's device)."""
        if self.state is not None:
            return str(self.state.device)
        return "cuda" if torch.cuda.is_available() else None

    # ---- sharding ---------------------------------------------------------------------------------
    def check(self, cfg, num_tasks: int = 1) -> None:
        """Fail at start-up on a config that cannot run on these processes (one line saying how to fix it)."""
        if self.world_size == 1:
            return
        t = cfg.train
        self.shard(t.prompts_per_iter * num_tasks * t.group_size, t.group_size)
        if t.algorithm == "backprop":
            raise ValueError("train.algorithm=backprop does not run on several processes yet: launch it as one "
                             "process (flowalign train, no accelerate launch / torchrun)")
        if t.algorithm == "crd" and cfg.crd.centering == "batch":
            raise ValueError("crd.centering=batch centres micro-batches that span processes: use crd.centering=group "
                             "in distributed runs")

    def shard(self, num_rows: int, group_size: int) -> slice:
        """This process's contiguous rows of a global batch of ``num_rows`` = groups x ``group_size`` rows."""
        groups = num_rows // group_size
        if groups % self.world_size:
            raise ValueError(f"{groups} prompt groups per iteration cannot be split over {self.world_size} "
                             f"processes: set train.prompts_per_iter to a multiple of {self.world_size}")
        n = num_rows // self.world_size
        return slice(self.rank * n, (self.rank + 1) * n)

    def noise(self, generator: torch.Generator, part: Union[Part, int]):
        """The noise source of a draw for ``part`` (a :class:`Part`, or the local batch size of a rollout, whose
        rows are this process's shard): the generator itself in one process, else a :class:`RowShard`."""
        if self.world_size == 1:
            return generator
        if isinstance(part, Part):
            return RowShard(generator, part.pos, part.total)
        return RowShard(generator, slice(self.rank * part, (self.rank + 1) * part), self.world_size * part)

    def part(self, rows: torch.Tensor, num_local: int) -> Part:
        """Which of the global ``rows`` [n] this process holds, given its shard of ``num_local`` rows (under FSDP,
        a placeholder :class:`Part` when it holds none)."""
        if self.world_size == 1:
            return Part(rows, rows, None, int(rows.numel()), 1.0)
        start = self.rank * num_local
        pos = torch.nonzero((rows >= start) & (rows < start + num_local)).flatten()
        mine = rows[pos]
        if self.fsdp and not mine.numel():  # the forwards are collectives: run one row at weight 0
            first = torch.tensor([start], dtype=rows.dtype, device=rows.device)
            return Part(first, first - start, torch.zeros_like(first), int(rows.numel()), 0.0, placeholder=True)
        return Part(mine, mine - start, pos, int(rows.numel()), pos.numel() / max(rows.numel(), 1))

    # ---- collectives ------------------------------------------------------------------------------
    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """[n, ...] from every process (same n) -> [W n, ...] in rank order, on x's device and dtype."""
        if self.world_size == 1:
            return x
        import torch.distributed as dist

        dev = self.state.device
        y = x.to(dev, torch.uint8) if x.dtype == torch.bool else x.to(dev)  # gloo/nccl lack bool collectives
        parts = [torch.empty_like(y) for _ in range(self.world_size)]
        dist.all_gather(parts, y.contiguous())
        return torch.cat(parts).to(x.device, x.dtype)

    def gather_objects(self, items: Sequence) -> list:
        """A list from every process -> their concatenation in rank order (e.g. the global prompt list)."""
        if self.world_size == 1:
            return list(items)
        import torch.distributed as dist

        out = [None] * self.world_size
        dist.all_gather_object(out, list(items))
        return [x for part in out for x in part]

    def broadcast_object(self, obj):
        """Rank 0's ``obj`` (any picklable value) on every process (e.g. a decision only rank 0 can make)."""
        if self.world_size == 1:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def sum(self, values: Sequence[float]) -> list[float]:
        """Each value summed over the processes (e.g. per-row loss sums -> the whole batch's)."""
        if self.world_size == 1:
            return list(values)
        import torch.distributed as dist

        t = torch.tensor(list(values), dtype=torch.float64, device=self.state.device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.tolist()

    @torch.no_grad()
    def broadcast_(self, params: Sequence[torch.Tensor]) -> None:
        """Copy rank 0's values into ``params`` on every process (the LoRA initialisation)."""
        if self.world_size == 1:
            return
        import torch.distributed as dist

        for p in params:
            buf = p.detach().to(self.state.device)
            dist.broadcast(buf, src=0)
            p.copy_(buf)

    @torch.no_grad()
    def all_reduce_grads(self, params: Sequence[torch.Tensor]) -> None:
        """Sum every parameter's gradient over the processes (one flat float32 all-reduce). Each process's loss
        is its share of the global mean (:attr:`Part.share`), so the sum is the global-batch gradient. A gradient
        missing here counts as zero; a parameter without a gradient on every process keeps ``grad = None``.
        Under FSDP a no-op: the reduce-scatter in the backward pass has already summed the gradient shards."""
        if self.world_size == 1 or self.fsdp:
            return
        import torch.distributed as dist

        dev = self.state.device
        has = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=dev)
        flat = torch.cat([has] + [(p.grad if p.grad is not None else torch.zeros_like(p)).to(dev, torch.float32)
                                  .flatten() for p in params])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset, anywhere = len(params), flat[: len(params)].tolist()
        for p, has_grad in zip(params, anywhere):
            g = flat[offset : offset + p.numel()].view_as(p)
            offset += p.numel()
            if not has_grad:
                p.grad = None
            elif p.grad is None:
                p.grad = g.to(p.device, p.dtype).clone()
            else:
                p.grad.copy_(g)


SINGLE = Distributed()


def shard_mode(shard: str = "none", environ=None) -> str:
    """The sharding a run uses: ``train.shard``, or ``fsdp`` when ``accelerate launch`` was given an FSDP config
    (``ACCELERATE_USE_FSDP=true``). DeepSpeed (``ACCELERATE_USE_DEEPSPEED=true``) is refused with one line."""
    env = os.environ if environ is None else environ
    if env.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        raise ValueError("DeepSpeed is not supported: launch with configs/accelerate/fsdp.yaml instead (FSDP "
                         "shards the base model and the LoRA; see docs/distributed.md)")
    if env.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        return "fsdp"
    return shard


def setup(shard: str = "none") -> Distributed:
    """The process group this process was launched into: :data:`SINGLE` unless ``WORLD_SIZE`` > 1 (set by
    ``accelerate launch`` and ``torchrun``), then accelerate's ``PartialState`` (gloo on CPU, nccl on GPUs);
    ``shard`` is ``train.shard`` (see :func:`shard_mode`)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return SINGLE
    mode = shard_mode(shard)
    from accelerate import PartialState

    cpu = os.environ.get("ACCELERATE_USE_CPU", "false").lower() in ("1", "true") or not torch.cuda.is_available()
    return Distributed(PartialState(cpu=cpu), fsdp=mode == "fsdp")
