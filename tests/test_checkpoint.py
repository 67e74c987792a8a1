"""Checkpoints in-process on a tiny pipeline: a save/load round trip continues bit for bit (LoRA, AdamW, EMA,
NFT/CRD snapshots, RNGs, counters, evaluations); rotation; a full disk keeps the previous checkpoint; a fresh run
refuses to overwrite an unfinished one; a changed LoRA rank is refused."""

import errno
import json
import os
import random

import numpy as np
import pytest
import torch

from flowalign.runtime import checkpoint
from flowalign.config import Config, CRDConfig, ModelConfig, NFTConfig, SamplingConfig, TrainConfig
from flowalign.rewards import Reward
from flowalign.trainer import Trainer


class MeanPixel(Reward):
    name = "mean_pixel"

    def score(self, images, prompts, metadata=None):
        return images.mean(dim=(1, 2, 3))


def _cfg(model, out, algorithm="grpo", rank=2, **train):
    sampler = "flow_sde" if algorithm == "grpo" else "flow_ode"
    return Config(model=ModelConfig(path=model, lora_rank=rank),
                  sampling=SamplingConfig(num_steps=2, eval_num_steps=1, sampler=sampler, guidance_scale=2.0),
                  nft=NFTConfig(num_timesteps=1, old_decay_rate=0.3), crd=CRDConfig(num_timesteps=1, steps_per_iter=1,
                                                                                  sampler_schedule="1-0-0.0075-0.999"),
                  train=TrainConfig(algorithm=algorithm, prompts_per_iter=1, group_size=2, minibatch=2, lr=0.05,
                                    eval_per_task=1, out_dir=str(out), **train))


def _state(tr):
    """The tensors of a trainer that must survive a checkpoint."""
    out = [p.detach().clone() for p in tr.params]
    out += [v.clone() for s in tr.optimizer.state.values() for v in s.values()]
    if tr.ema is not None:
        out += tr.ema.tensors
    for name in ("old", "sampler"):
        if hasattr(tr.algorithm, name):
            out += getattr(tr.algorithm, name).tensors
    return out


def _uint8(images):
    return (images.float().clamp(0, 1) * 255).round().to(torch.uint8)


@pytest.mark.parametrize("algorithm,ema", [("grpo", 0.5), ("nft", 0.0), ("crd", 0.0)])
def test_round_trip_continues_bit_identically(tmp_path, tiny_pipe_dir, algorithm, ema):
    a = Trainer(_cfg(tiny_pipe_dir, tmp_path, algorithm, ema_decay=ema), reward=MeanPixel())
    a.evaluate(base=True)
    a.step(), a.step()
    random.random()  # the python RNG is part of the state too
    path = a.save_checkpoint()
    py_state = random.getstate()
    assert os.path.basename(path) == "ckpt-2"
    assert sorted(os.listdir(path)) == ["lora", "manifest.json", "state.json", "tensors.safetensors"]
    assert os.path.isfile(os.path.join(path, "lora", "pytorch_lora_weights.safetensors"))
    meta = json.load(open(os.path.join(path, "state.json")))
    assert meta["iteration"] == 2 and meta["config"]["train"]["algorithm"] == algorithm

    b = Trainer(_cfg(tiny_pipe_dir, tmp_path, algorithm, ema_decay=ema, seed=7), reward=MeanPixel())
    with pytest.warns(RuntimeWarning, match="train.seed 0 -> 7"):
        b.load_checkpoint(path)
    assert all(torch.equal(x, y) for x, y in zip(_state(a), _state(b)))
    assert (b.iteration, b.samples_seen, b.algorithm.optimizer_steps) == (2, 4, a.algorithm.optimizer_steps)
    assert b.evals == a.evals
    assert torch.equal(_uint8(b._base_images), _uint8(a._base_images))  # the state keeps the grid row as uint8
    assert torch.equal(b.generator.get_state(), a.generator.get_state())
    assert b.rng.bit_generator.state == a.rng.bit_generator.state and random.getstate() == py_state
    ma, mb = a.step(), b.step()
    assert ma["loss"] == mb["loss"] and a.algorithm.optimizer_steps == b.algorithm.optimizer_steps > 0
    assert all(torch.equal(x, y) for x, y in zip(_state(a), _state(b)))


def test_rotation_and_disk_full_keep_the_previous_checkpoint(tmp_path, tiny_pipe_dir, monkeypatch):
    tr = Trainer(_cfg(tiny_pipe_dir, tmp_path, checkpoint_every=1, keep_checkpoints=2), reward=MeanPixel())
    tr.train(3, progress=False)
    assert [it for it, _ in checkpoint.list_checkpoints(str(tmp_path))] == [2, 3]
    saved = [p.detach().clone() for p in tr.params]
    junk = tmp_path / "ckpt-9.tmp"  # a run killed while writing: never read as a checkpoint
    junk.mkdir()
    (junk / "state.json").write_text("{")
    (junk / "tensors.safetensors").write_bytes(b"\0")

    def full_disk(path, tensors):
        with open(path, "wb") as f:
            f.write(b"\1" * 100)  # half a file, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device", path)

    monkeypatch.setattr(checkpoint, "write_tensors", full_disk)
    with pytest.raises(checkpoint.CheckpointError) as err:
        tr.train(1, progress=False)
    msg = str(err.value)
    assert "\n" not in msg and "the disk is full" in msg and "ckpt-3 is intact" in msg and "--resume" in msg
    assert not (tmp_path / "ckpt-4").exists() and not (tmp_path / "ckpt-4.tmp").exists()
    assert checkpoint.latest_checkpoint(str(tmp_path)) == str(tmp_path / "ckpt-3")
    monkeypatch.undo()
    fresh = Trainer(_cfg(tiny_pipe_dir, tmp_path), reward=MeanPixel())
    fresh.load_checkpoint(str(tmp_path / "ckpt-3"))
    assert fresh.iteration == 3 and all(torch.equal(x, y) for x, y in zip(saved, fresh.params))


def test_fresh_run_refuses_an_unfinished_one_and_rank_must_match(tmp_path, tiny_pipe_dir):
    tr = Trainer(_cfg(tiny_pipe_dir, tmp_path, iterations=5), reward=MeanPixel())
    tr.step()
    path = tr.save_checkpoint()
    with pytest.raises(checkpoint.CheckpointError, match="holds an unfinished run .*--resume"):
        checkpoint.start_fresh(str(tmp_path))
    other = Trainer(_cfg(tiny_pipe_dir, tmp_path / "x", rank=3, iterations=5), reward=MeanPixel())
    with pytest.raises(checkpoint.CheckpointError, match="model.lora_rank was 2 there, now 3"):
        other.load_checkpoint(path)
    # a finished run's folder is reused by a fresh run only with overwrite: its checkpoints and logs go
    done = Trainer(_cfg(tiny_pipe_dir, tmp_path / "done", iterations=1), reward=MeanPixel())
    done.step()
    done.save_checkpoint()
    with pytest.raises(checkpoint.CheckpointError, match="holds another run's results \\(ckpt-1\\): pass --overwrite"):
        checkpoint.start_fresh(str(tmp_path / "done"))
    checkpoint.start_fresh(str(tmp_path / "done"), overwrite=True)
    assert checkpoint.list_checkpoints(str(tmp_path / "done")) == []
    assert not (tmp_path / "done" / "metrics.jsonl").exists()


def test_split_and_join_tensors_round_trip():
    obj = {"a": torch.arange(3), "b": [1.5, (torch.ones(2), None)], "c": {"d": "x", 0: np.int64(2).item()}}
    meta, tensors = checkpoint.split_tensors(obj)
    assert set(tensors) == {"a", "b/1/0"} and json.loads(json.dumps(meta)) == meta
    back = checkpoint.join_tensors(meta, tensors)
    assert torch.equal(back["a"], obj["a"]) and back["b"][0] == 1.5 and torch.equal(back["b"][1][0], torch.ones(2))
    assert back["c"] == {"d": "x", "0": 2}
