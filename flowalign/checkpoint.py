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

Trainer hooks: ``after_iteration(trainer)`` (periodic checkpoints and the NaN stop), ``save_checkpoint``,
``resume(trainer)`` (newest checkpoint, config check, logs truncated to it) and ``start_fresh(out_dir)``.
"""

from __future__ import annotations

import errno
import json
import os
import random
import re
import shutil
import warnings
from typing import Any, Optional

import torch

from . import fsdp
from .errors import FlowalignError

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


# --- the trainer's state -------------------------------------------------------------------------------------
def trainer_state(trainer) -> dict:
    """Everything a run needs to continue exactly: weights, optimizer, EMA, algorithm state, RNGs, counters."""
    from .config import config_to_dict

    rng = {"torch": torch.get_rng_state(), "generator": trainer.generator.get_state(),
           "numpy": trainer.rng.bit_generator.state, "python": random.getstate()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return fsdp.full_state({  # FSDP: sharded tensors gathered whole (a collective: every process calls this)
        "format": FORMAT, "iteration": trainer.iteration, "samples_seen": trainer.samples_seen,
        "bad_rewards": trainer.bad_rewards, "config": config_to_dict(trainer.cfg),
        "lora": list(trainer.params), "optimizer": trainer.optimizer.state_dict(),
        "ema": trainer.ema.state_dict() if trainer.ema is not None else None,
        "algorithm": trainer.algorithm.state_dict(), "rng": rng, "evals": trainer.evals,
        "base_images": _to_uint8(trainer._base_images),
    })


def _to_uint8(images: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """Images in [0, 1] as uint8 (what the evaluation grid draws; a quarter of the float32 bytes)."""
    return None if images is None else (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)


def load_trainer_state(trainer, state: dict) -> None:
    """Put ``trainer_state`` output (after a JSON/safetensors round trip) back into a freshly built trainer."""
    from .algorithms.base import load_tensors_

    load_tensors_(trainer.params, state["lora"], "checkpoint LoRA weights (model.lora_rank changed?)")
    opt = state["optimizer"]
    live = trainer.optimizer.state_dict()["param_groups"]
    groups = [{k: tuple(v) if isinstance(g.get(k), tuple) else v for k, v in saved.items()}
              for saved, g in zip(opt["param_groups"], live)]  # JSON turned tuples (betas) into lists
    moments = fsdp.shard_optimizer_state({int(k): v for k, v in opt["state"].items()}, trainer.params)
    trainer.optimizer.load_state_dict({"state": moments, "param_groups": groups})
    for g in trainer.optimizer.param_groups:  # the config's hyper-parameters win over the saved ones
        g["lr"], g["weight_decay"] = trainer.cfg.train.lr, trainer.cfg.train.weight_decay
    if trainer.ema is not None:
        trainer.ema.load_state_dict(state["ema"])
    trainer.algorithm.load_state_dict(state["algorithm"])
    rng = state["rng"]
    torch.set_rng_state(rng["torch"])
    trainer.generator.set_state(rng["generator"])
    trainer.rng.bit_generator.state = rng["numpy"]
    version, internal, gauss = rng["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in rng and torch.cuda.is_available() and len(rng["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(rng["cuda"])
    trainer.iteration, trainer.samples_seen = int(state["iteration"]), int(state["samples_seen"])
    trainer.bad_rewards = int(state["bad_rewards"])
    trainer.evals = list(state["evals"])
    base = state["base_images"]
    trainer._base_images = None if base is None else base.float() / 255


# --- save ------------------------------------------------------------------------------------------------
def save_checkpoint(trainer) -> str:
    """Write ``out_dir/ckpt-<iteration>/`` atomically, then delete all but the newest ``train.keep_checkpoints``.
    Returns its path (unchanged when that iteration is already saved). OSError (disk full, ...) ->
    CheckpointError; the earlier checkpoints stay as they were. Several processes: rank 0 writes and tells the
    others how it went, so a failed write stops every process with the same message (none waits in a collective)."""
    t = trainer.cfg.train
    final = os.path.join(t.out_dir, f"ckpt-{trainer.iteration}")
    dist = getattr(trainer, "dist", None)
    main, sharded = getattr(dist, "is_main", True), getattr(dist, "fsdp", False)
    several = getattr(dist, "world_size", 1) > 1
    exists = dist.broadcast_object(os.path.isdir(final)) if several else os.path.isdir(final)  # rank 0 decides
    if exists:
        return final
    error = None
    if main or sharded:  # data parallel: rank 0 writes (every rank holds the same weights and optimizer state)
        error = _write_checkpoint(trainer, final, main)  # FSDP: every process gathers the shards, rank 0 writes
    if several:
        error = dist.broadcast_object(error)
    if error is not None:
        raise CheckpointError(error)
    if main:
        prune(t.out_dir, t.keep_checkpoints)
    return final


def _write_checkpoint(trainer, final: str, main: bool) -> Optional[str]:
    """Gather the state (a collective under FSDP) and, on rank 0, write it to ``final`` through ``final.tmp``.
    Returns None, or the one-line error message when the write failed (the temp folder removed)."""
    from . import lora

    t = trainer.cfg.train
    state = trainer_state(trainer)
    with trainer.evaluation_weights():
        lora_weights = lora.lora_state_dict(trainer.adapter)
    if not main:
        return None
    tmp = final + ".tmp"
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        meta, tensors = split_tensors(state)
        write_tensors(os.path.join(tmp, TENSORS_FILE), tensors)
        lora.save_lora(trainer.adapter, os.path.join(tmp, "lora"), state=lora_weights)
        write_json(os.path.join(tmp, STATE_FILE), meta)  # last: a folder with state.json has everything
        os.replace(tmp, final)
        _fsync(t.out_dir)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        prev = latest_checkpoint(t.out_dir)
        why = "the disk is full" if err.errno == errno.ENOSPC else (err.strerror or str(err))
        return (f"could not write checkpoint {final}: {why}; "
                f"{f'the previous checkpoint {prev} is intact' if prev else 'no earlier checkpoint'}"
                f"; free space in {t.out_dir} (or lower train.keep_checkpoints) and continue with "
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


def after_iteration(trainer) -> None:
    """Trainer hook after each iteration: a checkpoint every ``train.checkpoint_every`` iterations; after
    ``train.max_nan_steps`` skipped (NaN/inf) optimizer steps in a row, a checkpoint and CheckpointError."""
    t, algo = trainer.cfg.train, trainer.algorithm
    if t.checkpoint_every > 0 and trainer.iteration % t.checkpoint_every == 0:
        save_checkpoint(trainer)
    if algo.nan_streak >= t.max_nan_steps:
        path = save_checkpoint(trainer)
        raise FlowalignError(
            f"stopped at iteration {trainer.iteration}: {algo.nan_streak} optimizer steps in a row had a NaN/inf "
            f"loss or gradient (skipped, weights unchanged; {algo.nan_steps} in all); saved {path}; lower train.lr "
            "or train.grad_clip, or fix the reward/model that gives NaN, then continue with "
            "`flowalign train CONFIG --resume`")


# --- resume ------------------------------------------------------------------------------------------------
def _flat(d: dict) -> dict:
    """{"train": {"lr": 1}} -> {"train.lr": 1} (one level of sections)."""
    return {f"{s}.{k}": v for s, sec in d.items() for k, v in sec.items()}


def check_config(saved: dict, cfg, path: str) -> None:
    """CheckpointError when a ``MUST_MATCH`` setting (or whether EMA is on) differs from the checkpoint's; a
    warning listing the other changed settings."""
    from .config import config_to_dict

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


def load_checkpoint(trainer, path: str) -> None:
    """Load ``path`` (a ckpt-<it> folder) into a freshly built trainer; the config must match (``check_config``)."""
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
    check_config(meta["config"], trainer.cfg, path)
    try:
        load_trainer_state(trainer, join_tensors(meta, tensors))
    except (KeyError, ValueError) as err:
        raise CheckpointError(f"checkpoint {path} does not fit this run ({err}); resume with the run's settings or "
                              "start a fresh run in another train.out_dir") from None


def resume(trainer) -> str:
    """Load the newest checkpoint of ``train.out_dir`` into ``trainer`` and cut metrics.jsonl / metrics.csv /
    evals.jsonl back to its iteration. Returns its path; CheckpointError when there is none."""
    from .logging_utils import write_jsonl

    out = trainer.cfg.train.out_dir
    path = latest_checkpoint(out)
    if path is None:
        raise CheckpointError(f"nothing to resume: no checkpoint (ckpt-<iteration>/) in {out}; run without "
                              "--resume to start, or point train.out_dir at the run to continue")
    load_checkpoint(trainer, path)
    trainer.metrics_log.truncate(trainer.iteration)
    if getattr(getattr(trainer, "dist", None), "is_main", True):  # distributed: rank 0 writes, every rank loads
        write_jsonl(trainer.evals_path, trainer.evals)
    return path


def start_fresh(out_dir: str) -> None:
    """Before a fresh (not resumed) run in ``out_dir``: refuse when it holds an unfinished run's checkpoint
    (continue it with --resume instead), else remove old logs and checkpoints (a fresh run owns its folder)."""
    from .logging_utils import remove_logs

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
