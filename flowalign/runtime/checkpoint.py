"""Checkpoints of a training run, so it can be killed at any moment and continued bit for bit.

Layout of ``train.out_dir/ckpt-<iteration>/``:

* ``tensors.safetensors``: every tensor of the state (LoRA parameters, optimizer moments, EMA and algorithm
  snapshots, torch RNG states, the base row of the evaluation grid), keys like ``optimizer/state/3/exp_avg``;
* ``state.json``: everything else (format, iteration, samples, counters, the config, the held-out evaluation
  history, numpy / python RNG states), with ``{"__tensor__": key}`` where a tensor sits in the structure;
* ``lora/``: the evaluation weights (EMA when on) in the diffusers LoRA format, for ``flowalign sample --lora``.

Nothing is pickled and nothing is read with ``torch.load``. A checkpoint is written into ``ckpt-<it>.tmp/``,
fsynced, then renamed with ``os.replace``: a folder named ``ckpt-<it>`` is always complete; ``.tmp`` leftovers of
a killed run are never read and are removed at the next save. The newest ``train.keep_checkpoints`` are kept.
A write that fails (disk full) removes its ``.tmp`` folder, keeps every earlier checkpoint and raises
``CheckpointError`` with one line.

Distributed runs: rank 0 writes (every process holds the same state); under FSDP every process first gathers
the whole tensors from the shards (``fsdp.full_state``, a collective), so a checkpoint is the same files with or
without sharding. On resume every process reads the checkpoint (sharded ones keep their own shard).

This module reads and writes dicts and folders only: ``save(out_dir, iteration, collect)``, ``load(path, cfg)``
(with the config check), ``latest_checkpoint`` and ``start_fresh(out_dir)``. What the state holds is the
trainer's business (``Trainer.state_dict`` / ``load_state_dict``; ``Trainer.save_checkpoint`` / ``resume``).
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import warnings
from typing import Any, Callable, Optional

import torch

from ..errors import FlowalignError
from .distributed import SINGLE, Distributed

FORMAT = 1
STATE_FILE = "state.json"
TENSORS_FILE = "tensors.safetensors"
_NAME = re.compile(r"ckpt-(\d+)")
_TENSOR = "__tensor__"

# Settings a checkpoint cannot be resumed under when they changed (the saved state would not fit or mean the same).
MUST_MATCH = ("model.path", "model.family", "model.lora_rank", "model.lora_alpha", "model.lora_target_modules",
              "train.algorithm", "opd.teachers")
# Settings that may change on resume without a warning.
FREE = ("train.iterations", "train.resume", "train.out_dir", "train.checkpoint_every", "train.keep_checkpoints",
        "train.log_with", "train.max_nan_steps", "train.eval_every", "model.device", "train.shard")


class CheckpointError(FlowalignError):
    """A checkpoint cannot be written, found or resumed; the message says what to do."""


# --- finding checkpoints ---------------------------------------------------------------------------------
def list_checkpoints(out_dir: str) -> list[tuple[int, str]]:
    """Complete checkpoints in ``out_dir`` as (iteration, path), oldest first; ``.tmp`` folders are not listed."""
    if not os.path.isdir(out_dir):
        return []
    found = []
    for name in os.listdir(out_dir):
        m = _NAME.fullmatch(name)
        path = os.path.join(out_dir, name)
        if m and all(os.path.isfile(os.path.join(path, f)) for f in (STATE_FILE, TENSORS_FILE)):
            found.append((int(m.group(1)), path))
    return sorted(found)


def latest_checkpoint(out_dir: str) -> Optional[str]:
    """Path of the newest complete checkpoint in ``out_dir``, or None."""
    found = list_checkpoints(out_dir)
    return found[-1][1] if found else None


# --- tensors <-> safetensors + JSON ------------------------------------------------------------------------
def split_tensors(obj: Any, prefix: str = "") -> tuple[Any, dict[str, torch.Tensor]]:
    """(JSON-able structure, {key: tensor}): every tensor in nested dicts/lists/tuples is replaced by
    ``{"__tensor__": key}`` (key = its path, e.g. ``optimizer/state/0/exp_avg``); tuples become lists."""
    tensors: dict[str, torch.Tensor] = {}

    def walk(x, path):
        if isinstance(x, torch.Tensor):
            tensors[path] = x.detach().cpu().clone().contiguous()  # own storage: safetensors refuses shared ones
            return {_TENSOR: path}
        if isinstance(x, dict):
            return {str(k): walk(v, f"{path}/{k}" if path else str(k)) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [walk(v, f"{path}/{i}" if path else str(i)) for i, v in enumerate(x)]
        return x

    return walk(obj, prefix), tensors


def join_tensors(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of ``split_tensors`` (lists stay lists)."""
    if isinstance(obj, dict):
        if set(obj) == {_TENSOR}:
            return tensors[obj[_TENSOR]]
        return {k: join_tensors(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [join_tensors(v, tensors) for v in obj]
    return obj


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_tensors(path: str, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    save_file(tensors, path)
    _fsync(path)


def write_json(path: str, data: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f)
        f.flush()
        os.fsync(f.fileno())


# --- save ------------------------------------------------------------------------------------------------
def checkpoint_path(out_dir: str, iteration: int) -> str:
    return os.path.join(out_dir, f"ckpt-{iteration}")


def save(out_dir: str, iteration: int, collect: Callable[[], tuple[dict, Callable[[str], None]]],
         dist: Distributed = SINGLE, keep: int = 0) -> str:
    """Write ``out_dir/ckpt-<iteration>/`` atomically, then delete all but the newest ``keep`` (0: keep all).

    collect() -> (state, write_lora): the run's state dict (tensors anywhere in it) and a function writing the
    LoRA folder into a given path; it is called by rank 0, and under FSDP by every process (gathering the shards
    is a collective). Returns the path (unchanged when that iteration is already saved). OSError (disk full,
    ...) -> CheckpointError; the earlier checkpoints stay as they were. Several processes: rank 0 writes and
    tells the others how it went, so a failed write stops every process with the same message."""
    final = checkpoint_path(out_dir, iteration)
    several = dist.world_size > 1
    exists = dist.broadcast_object(os.path.isdir(final)) if several else os.path.isdir(final)  # rank 0 decides
    if exists:
        return final
    error = None
    if dist.is_main or dist.fsdp:  # data parallel: rank 0 writes (every rank holds the same state)
        state, write_lora = collect()
        if dist.is_main:
            error = _write_checkpoint(final, state, write_lora)
    if several:
        error = dist.broadcast_object(error)
    if error is not None:
        raise CheckpointError(error)
    if dist.is_main:
        prune(out_dir, keep)
    return final


def _write_checkpoint(final: str, state: dict, write_lora: Callable[[str], None]) -> Optional[str]:
    """Write ``state`` and the LoRA folder to ``final`` through ``final.tmp``. Returns None, or the one-line error
    message when the write failed (the temp folder removed)."""
    out_dir = os.path.dirname(final)
    tmp = final + ".tmp"
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        meta, tensors = split_tensors(state)
        write_tensors(os.path.join(tmp, TENSORS_FILE), tensors)
        write_lora(os.path.join(tmp, "lora"))
        write_json(os.path.join(tmp, STATE_FILE), meta)  # last: a folder with state.json has everything
        os.replace(tmp, final)
        _fsync(out_dir)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        prev = latest_checkpoint(out_dir)
        why = "the disk is full" if err.errno == errno.ENOSPC else (err.strerror or str(err))
        return (f"could not write checkpoint {final}: {why}; "
                f"{f'the previous checkpoint {prev} is intact' if prev else 'no earlier checkpoint'}"
                f"; free space in {out_dir} (or lower train.keep_checkpoints) and continue with "
                "`flowalign train CONFIG --resume`")
    return None


def prune(out_dir: str, keep: int) -> None:
    """Delete ``.tmp`` leftovers and all complete checkpoints but the newest ``keep`` (0 = keep all)."""
    for name in os.listdir(out_dir):
        if name.endswith(".tmp") and _NAME.fullmatch(name[:-4]):
            shutil.rmtree(os.path.join(out_dir, name), ignore_errors=True)
    found = list_checkpoints(out_dir)
    if keep > 0:
        for _, path in found[:-keep]:
            shutil.rmtree(path, ignore_errors=True)


# --- resume ------------------------------------------------------------------------------------------------
def _flat(d: dict) -> dict:
    """{"train": {"lr": 1}} -> {"train.lr": 1} (one level of sections)."""
    return {f"{s}.{k}": v for s, sec in d.items() for k, v in sec.items()}


def check_config(saved: dict, cfg, path: str) -> None:
    """CheckpointError when a ``MUST_MATCH`` setting (or whether EMA is on) differs from the checkpoint's; a
    warning listing the other changed settings."""
    from ..config import config_to_dict

    old, new = _flat(saved), _flat(config_to_dict(cfg))
    bad = [k for k in MUST_MATCH if old.get(k) != new.get(k)]
    if (old.get("train.ema_decay", 0) > 0) != (new["train.ema_decay"] > 0):
        bad.append("train.ema_decay")
    if bad:
        k = bad[0]
        raise CheckpointError(f"cannot resume from {path}: {k} was {old.get(k)!r} there, now {new.get(k)!r}; resume "
                              f"with the run's settings ({os.path.join(os.path.dirname(path), 'config.yaml')}) or "
                              "start a fresh run in another train.out_dir")
    changed = [f"{k} {old.get(k)!r} -> {v!r}" for k, v in new.items() if k not in FREE and old.get(k) != v]
    if changed:
        warnings.warn(f"resuming {path} with changed settings: {', '.join(changed)}", RuntimeWarning, stacklevel=2)


def load(path: str, cfg) -> dict:
    """The state dict saved in ``path`` (a ckpt-<it> folder), tensors back in place; the run's config ``cfg``
    must match the saved one (``check_config``). CheckpointError when it cannot be read."""
    from safetensors.torch import load_file

    try:
        with open(os.path.join(path, STATE_FILE), encoding="utf-8") as f:
            meta = json.load(f)
        tensors = load_file(os.path.join(path, TENSORS_FILE))
    except (OSError, ValueError) as err:
        raise CheckpointError(f"cannot read checkpoint {path} ({err}); delete it to resume from the one "
                              "before") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path} has format {meta.get('format')}, this flowalign reads {FORMAT}")
    check_config(meta["config"], cfg, path)
    return join_tensors(meta, tensors)


def start_fresh(out_dir: str) -> None:
    """Before a fresh (not resumed) run in ``out_dir``: refuse when it holds an unfinished run's checkpoint
    (continue it with --resume instead), else remove old logs and checkpoints (a fresh run owns its folder)."""
    from .metrics import remove_logs

    newest = latest_checkpoint(out_dir)
    if newest is not None:
        with open(os.path.join(newest, STATE_FILE), encoding="utf-8") as f:
            meta = json.load(f)
        if meta["iteration"] < meta["config"]["train"]["iterations"]:
            raise CheckpointError(f"{out_dir} holds an unfinished run (checkpoint {newest}): continue it with "
                                  "`flowalign train CONFIG --resume`, or set another train.out_dir (or delete "
                                  f"{out_dir}) to start over")
    remove_logs(out_dir)
    for _, path in list_checkpoints(out_dir):
        shutil.rmtree(path)
    prune(out_dir, 0)
