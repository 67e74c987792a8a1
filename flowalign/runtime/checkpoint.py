"""Checkpoints of a training run, so it can be killed at any moment and continued bit for bit.

Layout of ``train.out_dir/ckpt-<iteration>/``:

* ``tensors.safetensors``: every tensor of the state (LoRA parameters, optimizer moments, EMA and algorithm
  snapshots, torch RNG states, the base row of the evaluation grid), keys like ``optimizer/state/3/exp_avg``;
* ``state.json``: everything else (format, iteration, samples, counters, the config, the held-out evaluation
  history, numpy / python RNG states), with ``{"__tensor__": key}`` where a tensor sits in the structure;
* ``lora/``: the evaluation weights (EMA when on) in the diffusers LoRA format, for ``flowalign sample --lora``;
* ``manifest.json``, written last: every other file with its size and SHA-256.

A checkpoint verifies itself before it is read (``verify``): the manifest's files present with their sizes and
hashes, ``state.json`` whole with an iteration that matches the folder's name, every float tensor finite. Resume
takes the newest checkpoint that verifies and warns, naming each newer one it skipped and why.

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

FORMAT = 2  # 2: with manifest.json
STATE_FILE = "state.json"
TENSORS_FILE = "tensors.safetensors"
MANIFEST_FILE = "manifest.json"
STATE_KEYS = ("format", "iteration", "samples_seen", "config", "lora", "optimizer", "rng")  # what a state must hold
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
    """Checkpoint folders ``ckpt-<it>`` in ``out_dir`` as (iteration, path), oldest first; ``.tmp`` folders are not
    listed. Whether one is complete and intact is ``verify``'s business."""
    if not os.path.isdir(out_dir):
        return []
    found = []
    for name in os.listdir(out_dir):
        m = _NAME.fullmatch(name)
        path = os.path.join(out_dir, name)
        if m and os.path.isdir(path):
            found.append((int(m.group(1)), path))
    return sorted(found)


def latest_checkpoint(out_dir: str) -> Optional[str]:
    """Path of the newest checkpoint in ``out_dir`` that verifies, or None."""
    for _, path in reversed(list_checkpoints(out_dir)):
        if verify(path) is None:
            return path
    return None


# --- verification -------------------------------------------------------------------------------------------
def _sha256(path: str) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _files(folder: str) -> list[str]:
    """Every file below ``folder`` but the manifest, as relative paths, sorted."""
    out = []
    for dirpath, _, names in os.walk(folder):
        out += [os.path.relpath(os.path.join(dirpath, n), folder) for n in names]
    return sorted(f for f in out if f != MANIFEST_FILE)


def write_manifest(folder: str) -> None:
    """``manifest.json``: {"format", "files": {relative path: {"size", "sha256"}}} of every file in ``folder``."""
    files = {f: {"size": os.path.getsize(os.path.join(folder, f)), "sha256": _sha256(os.path.join(folder, f))}
             for f in _files(folder)}
    write_json(os.path.join(folder, MANIFEST_FILE), {"format": FORMAT, "files": files})


def read(path: str) -> tuple[Optional[dict], Optional[str]]:
    """(state, None) when the checkpoint folder ``path`` is whole, with its tensors back in place; else (None, why
    not, in a few words): its manifest missing or unreadable, a listed file missing, of another size or content,
    ``state.json`` without what a state holds, an iteration that is not the folder's, or a non-finite float tensor.
    The tensors are read once, for the check and the state alike."""
    try:
        with open(os.path.join(path, MANIFEST_FILE), encoding="utf-8") as f:
            manifest = json.load(f)
        files = manifest["files"]
    except FileNotFoundError:
        return None, "no manifest.json (an interrupted write, or a checkpoint of an older flowalign)"
    except (OSError, ValueError, KeyError, TypeError):
        return None, "manifest.json is unreadable"
    for name in (STATE_FILE, TENSORS_FILE):
        if name not in files:
            return None, f"the manifest lists no {name}"
    for name, entry in files.items():
        full = os.path.join(path, name)
        if not os.path.isfile(full):
            return None, f"{name} is missing"
        if os.path.getsize(full) != entry.get("size") or _sha256(full) != entry.get("sha256"):
            return None, f"{name} does not match its hash (changed or corrupted)"
    try:
        with open(os.path.join(path, STATE_FILE), encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, ValueError):
        return None, f"{STATE_FILE} is unreadable"
    missing = [k for k in STATE_KEYS if not isinstance(meta, dict) or k not in meta]
    if missing:
        return None, f"{STATE_FILE} has no {missing[0]!r}"
    m = _NAME.fullmatch(os.path.basename(os.path.normpath(path)))
    if not isinstance(meta["iteration"], int) or m is None or meta["iteration"] != int(m.group(1)):
        return None, f"its iteration {meta['iteration']!r} is not the folder's"
    try:
        from safetensors.torch import load_file

        tensors = load_file(os.path.join(path, TENSORS_FILE))
    except Exception as err:  # safetensors raises its own error type on a damaged file  # noqa: BLE001
        return None, f"{TENSORS_FILE} does not load ({type(err).__name__})"
    bad = next((k for k, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())), None)
    if bad is not None:
        return None, f"tensor {bad} is not finite"
    return join_tensors(meta, tensors), None


def verify(path: str) -> Optional[str]:
    """None when the checkpoint folder ``path`` is whole, else why not (see ``read``)."""
    return read(path)[1]


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
    from safetensors import SafetensorError

    out_dir = os.path.dirname(final)
    tmp = final + ".tmp"
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        meta, tensors = split_tensors(state)
        write_tensors(os.path.join(tmp, TENSORS_FILE), tensors)
        write_lora(os.path.join(tmp, "lora"))
        write_json(os.path.join(tmp, STATE_FILE), meta)
        write_manifest(tmp)  # last: a folder whose manifest verifies has everything
        os.replace(tmp, final)
        _fsync(out_dir)
    except (OSError, SafetensorError) as err:  # safetensors reports a failed write (disk full) as its own error
        shutil.rmtree(tmp, ignore_errors=True)
        prev = latest_checkpoint(out_dir)
        full = getattr(err, "errno", None) == errno.ENOSPC or "StorageFull" in str(err) or "No space" in str(err)
        why = "the disk is full" if full else (getattr(err, "strerror", None) or str(err)[:200])
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
    """The state dict saved in ``path`` (a ckpt-<it> folder), tensors back in place; it must verify (``read``) and
    the run's config ``cfg`` must match the saved one (``fits``). CheckpointError otherwise."""
    state, why = read(path)
    if why is not None:
        raise CheckpointError(f"checkpoint {path} does not verify: {why}; resume takes the newest one that does")
    fits(state, cfg, path)
    return state


def fits(state: dict, cfg, path: str) -> None:
    """CheckpointError unless ``state`` (read from ``path``) has this flowalign's format and ``cfg``'s settings."""
    if state.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path} has format {state.get('format')}, this flowalign reads {FORMAT}")
    check_config(state["config"], cfg, path)


def start_fresh(out_dir: str, overwrite: bool = False) -> None:
    """Before a fresh (not resumed) run in ``out_dir``: a folder holding another run's results (checkpoints or a
    LoRA) is refused, naming them, unless ``overwrite``; with it they are removed. Logs alone (a run that stopped
    before its first checkpoint) are removed: a fresh run owns its folder. An unfinished run is pointed at
    ``--resume``."""
    from .metrics import remove_logs

    found = [os.path.basename(p) for _, p in list_checkpoints(out_dir)]
    results = found[-1:] + (["lora"] if os.path.exists(os.path.join(out_dir, "lora")) else [])
    if results and not overwrite:
        newest = latest_checkpoint(out_dir)
        unfinished = False
        if newest is not None:
            with open(os.path.join(newest, STATE_FILE), encoding="utf-8") as f:
                meta = json.load(f)
            unfinished = meta["iteration"] < meta["config"]["train"]["iterations"]
        if unfinished:
            raise CheckpointError(f"{out_dir} holds an unfinished run (checkpoint {newest}): continue it with "
                                  "`flowalign train CONFIG --resume`, or pass --overwrite (or set another "
                                  "train.out_dir) to start over")
        raise CheckpointError(f"{out_dir} holds another run's results ({', '.join(results)}): pass --overwrite to "
                              "replace them, or set another train.out_dir")
    remove_logs(out_dir)
    for _, path in list_checkpoints(out_dir):
        shutil.rmtree(path)
    shutil.rmtree(os.path.join(out_dir, "lora"), ignore_errors=True)
    prune(out_dir, 0)
