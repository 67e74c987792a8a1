"""Faults a user meets, each ending in a resume or one clear line and losing nothing: damaged checkpoints are
skipped (resume takes the newest that verifies), another run's results are not overwritten without --overwrite,
a full disk is one line, and batches without a finite reward are skipped, counted, and stop the run (with a
checkpoint) only when they keep coming."""

import json
import os
import shutil

import pytest
import torch

from flowalign.config import load_config
from flowalign.errors import FlowalignError
from flowalign.rewards import Reward
from flowalign.runtime import checkpoint
from flowalign.trainer import Trainer, run_training

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = {"sampling.num_steps": 2, "sampling.eval_num_steps": 1, "sampling.sde_window": None, "train.iterations": 3,
         "train.prompts_per_iter": 1, "train.group_size": 2, "train.minibatch": 2, "train.eval_per_task": 1,
         "train.eval_every": 0, "train.checkpoint_every": 1, "train.keep_checkpoints": 0, "model.lora_rank": 2,
         "train.lr": 0.05, "train.reward": "jpeg_incompressibility", "crd.num_timesteps": 1, "crd.steps_per_iter": 1,
         "nft.num_timesteps": 1}


def _cfg(model, out, name="toy_grpo.yaml", **extra):
    return load_config(os.path.join(ROOT, "configs", name),
                       {**SMALL, "model.path": model, "train.out_dir": str(out), **extra})


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_pipe_dir):
    """A 3-iteration GRPO run with ckpt-1..3 (module scope: each test damages its own copy)."""
    out = tmp_path_factory.mktemp("finished")
    run_training(_cfg(tiny_pipe_dir, out), progress=False)
    return out


def _flip_a_bit(path):
    data = bytearray(open(path, "rb").read())
    data[-5] ^= 0x10  # inside the tensor data (the header is at the start)
    open(path, "wb").write(bytes(data))


def _set_state(path, **changes):
    f = os.path.join(path, "state.json")
    meta = json.load(open(f))
    meta.update(changes)
    json.dump(meta, open(f, "w"))


DAMAGE = {
    "truncated tensors": lambda p: open(os.path.join(p, "tensors.safetensors"), "r+b").truncate(100),
    "empty tensors": lambda p: open(os.path.join(p, "tensors.safetensors"), "w").close(),
    "random bytes": lambda p: open(os.path.join(p, "tensors.safetensors"), "wb").write(os.urandom(4096)),
    "a flipped bit": lambda p: _flip_a_bit(os.path.join(p, "tensors.safetensors")),
    "state.json with only its format": lambda p: json.dump({"format": 2}, open(os.path.join(p, "state.json"), "w")),
    "iteration 999": lambda p: _set_state(p, iteration=999),
    "a deleted lora/": lambda p: shutil.rmtree(os.path.join(p, "lora")),
    "no manifest": lambda p: os.remove(os.path.join(p, "manifest.json")),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_checkpoint_is_skipped_with_one_warning(tmp_path, tiny_pipe_dir, finished_run, damage):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    shutil.rmtree(run / "ckpt-3")  # the run was killed after ckpt-2 ...
    DAMAGE[damage](str(run / "ckpt-2"))  # ... and ckpt-2 got damaged
    assert checkpoint.verify(str(run / "ckpt-1")) is None and checkpoint.verify(str(run / "ckpt-2")) is not None
    tr = Trainer(_cfg(tiny_pipe_dir, run, **{"train.resume": True}))
    with pytest.warns(RuntimeWarning, match=r"resume skips 1 checkpoint\(s\) that do not verify: ckpt-2 \(") as w:
        path = tr.resume()
    assert path == str(run / "ckpt-1") and tr.iteration == 1
    assert len([x for x in w if "do not verify" in str(x.message)]) == 1 and "\n" not in str(w[0].message)


def test_no_checkpoint_verifies_is_one_line(tmp_path, tiny_pipe_dir, finished_run):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    for _, path in checkpoint.list_checkpoints(str(run)):
        DAMAGE["a flipped bit"](path)
    tr = Trainer(_cfg(tiny_pipe_dir, run, **{"train.resume": True}))
    with pytest.warns(RuntimeWarning), pytest.raises(checkpoint.CheckpointError) as err:
        tr.resume()
    msg = str(err.value)
    assert "\n" not in msg and "no checkpoint in" in msg and "verifies (ckpt-3 (tensors.safetensors does not match" in msg


def test_a_checkpoint_with_non_finite_weights_does_not_verify(tmp_path, finished_run):
    from safetensors.torch import load_file, save_file

    path = tmp_path / "ckpt-3"
    shutil.copytree(finished_run / "ckpt-3", path)
    tensors = load_file(str(path / "tensors.safetensors"))
    key = next(k for k in tensors if k.startswith("lora/"))
    tensors[key][0] = float("nan")
    save_file(tensors, str(path / "tensors.safetensors"))
    checkpoint.write_manifest(str(path))  # consistent files, bad numbers
    assert checkpoint.verify(str(path)) == f"tensor {key} is not finite"


def test_a_fresh_run_does_not_overwrite_another_runs_results(tmp_path, tiny_pipe_dir, finished_run):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    lora_file = run / "lora" / "pytorch_lora_weights.safetensors"
    before = lora_file.read_bytes()
    with pytest.raises(checkpoint.CheckpointError, match="holds another run's results .*ckpt-3.*lora.*--overwrite"):
        run_training(_cfg(tiny_pipe_dir, run), progress=False)
    assert lora_file.read_bytes() == before and len(checkpoint.list_checkpoints(str(run))) == 3
    run_training(_cfg(tiny_pipe_dir, run, **{"train.iterations": 1}), progress=False, overwrite=True)
    assert [it for it, _ in checkpoint.list_checkpoints(str(run))] == [1]


def test_disk_full_in_safetensors_is_one_line_and_leaves_no_tmp(tmp_path, tiny_pipe_dir, monkeypatch):
    from safetensors import SafetensorError

    tr = Trainer(_cfg(tiny_pipe_dir, tmp_path))
    tr.step()
    tr.save_checkpoint()
    tr.step()

    def full(path, tensors):
        open(path, "wb").write(b"\0" * 10)
        raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No '
                              'space left on device" })')

    monkeypatch.setattr(checkpoint, "write_tensors", full)
    with pytest.raises(checkpoint.CheckpointError) as err:
        tr.save_checkpoint()
    msg = str(err.value)
    assert "\n" not in msg and "the disk is full" in msg and "ckpt-1 is intact" in msg
    assert sorted(os.listdir(tmp_path)) == sorted(set(os.listdir(tmp_path)) - {"ckpt-2.tmp"}) and not (
        tmp_path / "ckpt-2.tmp").exists()


class Broken(Reward):
    """NaN for every image of the first ``bad`` calls (a reward server that is down), then the mean pixel."""

    name = "broken"

    def __init__(self, bad: int):
        self.bad, self.calls = bad, 0

    def score(self, images, prompts, metadata=None):
        self.calls += 1
        if self.calls <= self.bad:
            return torch.full((len(prompts),), float("nan"))
        return images.float().mean(dim=(1, 2, 3))


@pytest.mark.parametrize("name", ["toy_grpo.yaml", "toy_nft.yaml", "toy_crd.yaml"])
def test_batches_without_a_finite_reward_are_skipped_and_counted(tmp_path, tiny_pipe_dir, name):
    # no base batches: they would spend the reward's two broken calls before training starts
    tr = Trainer(_cfg(tiny_pipe_dir, tmp_path, name, **{"train.max_nan_steps": 3, "diagnostics.base_batches": 0}),
                 reward=Broken(bad=2))
    before = [p.detach().clone() for p in tr.params]
    history = tr.train(3, progress=False)
    assert [m["skipped_batches"] for m in history] == [1, 2, 2] and [m["update_samples"] for m in history][:2] == [0, 0]
    assert history[2]["update_samples"] > 0 and tr.bad_batch_streak == 0
    assert any(not torch.equal(a, b) for a, b in zip(before, tr.params))  # the good batch trained


def test_a_reward_that_stays_broken_stops_the_run_with_a_checkpoint(tmp_path, tiny_pipe_dir):
    tr = Trainer(_cfg(tiny_pipe_dir, tmp_path, **{"train.max_nan_steps": 2, "train.checkpoint_every": 0,
                                                  "diagnostics.base_batches": 0}), reward=Broken(bad=10))
    with pytest.raises(FlowalignError) as err:
        tr.train(5, progress=False)
    msg = str(err.value)
    assert "\n" not in msg and "2 batches in a row had no finite reward" in msg and "--resume" in msg
    assert checkpoint.latest_checkpoint(str(tmp_path)) == str(tmp_path / "ckpt-2")


def test_train_refuses_another_runs_folder_until_overwrite(tmp_path, tiny_pipe_dir, capsys):
    from flowalign.cli import main

    args = ["train", os.path.join(ROOT, "configs", "toy_grpo.yaml"), f"model.path={tiny_pipe_dir}",
            f"train.out_dir={tmp_path}", *(f"{k}={v}" for k, v in {**SMALL, "train.iterations": 1}.items()
                                           if v is not None), "sampling.sde_window=null"]
    assert main(args) == 0
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("flowalign: error: ") and "pass --overwrite" in err[-1]
    assert main([*args, "--overwrite"]) == 0


def test_lora_loading_is_safetensors_only_and_one_line(tmp_path, tiny_pipe_dir, finished_run):
    from flowalign.lora import load_lora_weights
    from flowalign.models import load_pipeline

    pipe = load_pipeline(tiny_pipe_dir)
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    torch.save({"w": torch.zeros(1)}, pickled / "pytorch_lora_weights.bin")
    with pytest.raises(ValueError, match=r"^LoRA pickled holds pickled weights \(pytorch_lora_weights.bin\), which "
                                         r"can run code when loaded: flowalign loads .safetensors only"):
        load_lora_weights(pipe, str(pickled))
    damaged = tmp_path / "damaged"
    shutil.copytree(finished_run / "lora", damaged)
    open(damaged / "pytorch_lora_weights.safetensors", "r+b").truncate(64)
    with pytest.raises(ValueError) as err:
        load_lora_weights(pipe, str(damaged))
    assert "\n" not in str(err.value) and "LoRA damaged could not be loaded" in str(err.value)
    with pytest.raises(FileNotFoundError, match="not found"):
        load_lora_weights(pipe, str(tmp_path / "missing"))
    load_lora_weights(pipe, str(finished_run / "lora"))  # the real thing loads


def test_binding_beyond_loopback_warns():
    from flowalign.cli import bind_warning

    assert bind_warning("127.0.0.1") is None and bind_warning("localhost") is None
    assert "anyone who can reach this machine" in bind_warning("0.0.0.0")


def test_a_file_that_is_not_a_prompt_file_is_not_echoed(tmp_path, tiny_pipe_dir, capsys):
    from flowalign.cli import main

    secret = tmp_path / "passwd"
    secret.write_text("root:x:0:0:root:/root:/bin/bash\ndaemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin\n")
    args = ["train", os.path.join(ROOT, "configs", "toy_grpo.yaml"), f"model.path={tiny_pipe_dir}",
            f"train.out_dir={tmp_path / 'run'}", f"train.prompts={secret}", "train.reward=toy_geneval",
            *(f"{k}={v}" for k, v in {**SMALL, "train.iterations": 1}.items() if v is not None and k != "train.reward"),
            "sampling.sde_window=null"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("flowalign: error: toy_geneval scores the toy world's prompts only")
    assert "root:" not in err[-1] and "daemon" not in err[-1]


def test_an_output_path_that_cannot_be_a_folder_is_one_line(tmp_path, tiny_pipe_dir, capsys):
    from flowalign.cli import main

    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    args = ["train", os.path.join(ROOT, "configs", "toy_grpo.yaml"), f"model.path={tiny_pipe_dir}",
            f"train.out_dir={blocker / 'run'}", "train.iterations=1"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("flowalign: error: cannot write ") and "output path" in err[0]
