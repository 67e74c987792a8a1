"""FSDP sharding of the denoiser (``train.shard: fsdp``): PyTorch FSDP2 ``fully_shard`` per transformer block,
then the root, after LoRA injection; and the tensor helpers that let the rest of flowalign treat sharded
parameters (``DTensor`` s) like plain ones. No algorithm logic.

After :func:`shard_denoiser` every parameter of the denoiser, the frozen base weights and the LoRA adapters
alike, is a ``DTensor`` holding this process's rows (dim 0) of the full tensor; a forward all-gathers one block
at a time and frees it afterwards (``reshard_after_forward=True`` for the root too, so weights written in place
between two forwards, e.g. a snapshot swapped in, are always the ones the next forward gathers). Rules that
follow from it:

- every process must run the same forward (and backward) calls: the all-gathers and reduce-scatters are
  collectives (``Distributed.part`` gives a process without rows a zero-weight placeholder row);
- in-place updates of the parameters (optimizer, snapshots, EMA) act on the local shard, element for element
  the same as on the full tensor, so they need no communication;
- :func:`full` (``DTensor.full_tensor``, a collective: call it on every process, in the same order) gives the
  whole tensor for checkpoints and LoRA files; :func:`local_like` takes this process's shard of a full tensor
  read from disk (no communication).

Gradients: FSDP reduce-scatters them; the divide factor is set to 1, so the result is the SUM over processes,
as the data-parallel ``all_reduce`` gives (each process's loss is already its share of the global mean).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch



def is_sharded(t: Any) -> bool:
    """True for a ``DTensor`` (a parameter, gradient or optimizer moment sharded by FSDP)."""
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def blocks(denoiser: torch.nn.Module, block_lists: Sequence[str]) -> list[torch.nn.Module]:
    """The transformer (or UNet) blocks of ``denoiser`` that get their own FSDP unit: the modules in its
    attributes ``block_lists`` (a model family's ``fsdp_blocks``, e.g. FLUX's transformer_blocks and
    single_transformer_blocks). A name the denoiser lacks is an error (the family's table is wrong)."""
    missing = [name for name in block_lists if not hasattr(denoiser, name)]
    if missing:
        raise ValueError(f"{type(denoiser).__name__} has no block list {missing[0]!r}: fix the adapter's fsdp_blocks")
    return [block for name in block_lists for block in getattr(denoiser, name)]


def shard_denoiser(denoiser: torch.nn.Module, device: torch.device | str, world_size: int,
                   block_lists: Sequence[str]) -> int:
    """``fully_shard`` each block of ``denoiser`` and then the root over a 1-D mesh of all ``world_size``
    processes (the process group must exist). Call it after LoRA injection (and after loading teacher
    adapters): parameters added later are not sharded. Gradients are summed, not averaged, over processes.
    Returns the number of FSDP units (blocks + root)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(torch.device(device).type, (world_size,))
    units = blocks(denoiser, block_lists)
    for block in units:
        fully_shard(block, mesh=mesh, reshard_after_forward=True)
    fully_shard(denoiser, mesh=mesh, reshard_after_forward=True)
    for module in [*units, denoiser]:
        module.set_gradient_divide_factor(1.0)  # sum over processes (flowalign.runtime.distributed's contract) ...
        module.set_force_sum_reduction_for_comms(True)  # ... as a plain SUM (gloo has no PREMUL_SUM)
    return len(units) + 1


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a sharded ``t`` (an all-gather: every process must call it), else ``t`` itself."""
    return t.full_tensor() if is_sharded(t) else t


def local_like(value: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``value`` (a full tensor) laid out like ``target``: this process's shard as a DTensor with the target's
    mesh and placements when ``target`` is sharded (each process cuts its own rows; no communication), else
    ``value`` unchanged."""
    if not is_sharded(target):
        return value
    from torch.distributed.tensor import distribute_tensor

    value = value.detach().to(target.device, target.dtype)
    return distribute_tensor(value, target.device_mesh, target.placements, src_data_rank=None)


def full_state(obj: Any) -> Any:
    """``obj`` (nested dicts / lists / tuples) with every sharded tensor replaced by its full tensor; a collective
    when ``obj`` holds any (every process walks the same structure in the same order)."""
    if isinstance(obj, torch.Tensor):
        return full(obj)
    if isinstance(obj, dict):
        return {k: full_state(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(full_state(v) for v in obj)
    return obj


def shard_optimizer_state(state: dict, params: Sequence[torch.Tensor]) -> dict:
    """An optimizer ``state_dict`` read from disk (full tensors) with each parameter's moments cut to that
    parameter's shard (tensors shaped like the parameter; scalars such as ``step`` stay as they are)."""
    out = {}
    for key, per_param in state.items():
        p = params[int(key)]
        out[key] = {k: local_like(v, p) if isinstance(v, torch.Tensor) and tuple(v.shape) == tuple(p.shape) else v
                    for k, v in per_param.items()}
    return out
