"""`flowalign train CONFIG --resume`: a run killed with SIGKILL right after a checkpoint and resumed ends with the
same adapter weights, bit for bit, as an uninterrupted run (GRPO; NFT with its old-model snapshot); its logs are
kept up to the checkpoint; resuming with nothing to resume or a changed LoRA rank is one clear line."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from flowalign.runtime import checkpoint
from flowalign.cli import main
from flowalign.config import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LORA = os.path.join("lora", "pytorch_lora_weights.safetensors")
SMALL = ["sampling.num_steps=2", "sampling.eval_num_steps=1", "sampling.sde_window=null", "train.iterations=6",
         "train.prompts_per_iter=1", "train.group_size=2", "train.minibatch=2", "train.eval_per_task=1",
         "nft.num_timesteps=1", "nft.old_decay_rate=0.3", "model.lora_rank=2", "train.lr=0.05",
         "train.reward=jpeg_incompressibility", "train.checkpoint_every=2", "train.keep_checkpoints=2"]


def _args(name, tiny_pipe_dir, out):
    return ["train", os.path.join(ROOT, "configs", name), f"model.path={tiny_pipe_dir}", f"train.out_dir={out}", *SMALL]


def _kill_after_first_checkpoint(args, out) -> None:
    """Run `flowalign train` in a subprocess and SIGKILL it as soon as ckpt-2 appears."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "flowalign.cli", *args], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline = time.time() + 600  # generous: a loaded machine can take minutes to start torch
    while not (out / "ckpt-2").is_dir():
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.time() < deadline, "no checkpoint after 600 s"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / LORA).exists(), "the run finished before it was killed"


@pytest.mark.parametrize("name", ["toy_grpo.yaml", "toy_nft.yaml"])
def test_sigkill_then_resume_is_bit_identical(tmp_path, tiny_pipe_dir, name, capsys):
    ref, run = tmp_path / "ref", tmp_path / "run"
    assert main(_args(name, tiny_pipe_dir, ref)) == 0, capsys.readouterr().err
    _kill_after_first_checkpoint(_args(name, tiny_pipe_dir, run), run)
    killed_at = checkpoint.list_checkpoints(str(run))[-1][0]
    assert killed_at in (2, 4)

    assert main(_args(name, tiny_pipe_dir, run)) == 2  # forgetting --resume does not wipe the unfinished run
    assert "holds an unfinished run" in capsys.readouterr().err
    assert main([*_args(name, tiny_pipe_dir, run), "--resume"]) == 0, capsys.readouterr().err
    assert f"resuming from {run / f'ckpt-{killed_at}'}" in capsys.readouterr().out

    a, b = load_file(str(ref / LORA)), load_file(str(run / LORA))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(v.abs().sum() > 0 for k, v in a.items() if "lora_B" in k)  # the weights did move
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    ref_rows = [json.loads(line) for line in (ref / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == list(range(1, 7))
    assert [r["loss"] for r in rows] == [r["loss"] for r in ref_rows]
    assert (run / "metrics.csv").read_text().count("\n") == 7
    evals = [json.loads(line) for line in (run / "evals.jsonl").read_text().splitlines()]
    assert [(e["iteration"], e["weights"]) for e in evals] == [(0, "base"), (6, "lora")]
    assert [it for it, _ in checkpoint.list_checkpoints(str(run))] == [4, 6]

    if name == "toy_grpo.yaml":  # the settings a checkpoint depends on must not change
        assert main([*_args(name, tiny_pipe_dir, run), "model.lora_rank=4", "--resume"]) == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith("flowalign: error: cannot resume from ") and "model.lora_rank was 2 there, now 4" in err
        assert load_config(str(run / "config.yaml")).model.lora_rank == 2  # the run's settings are kept


def test_resume_with_no_checkpoint_is_one_line(tmp_path, tiny_pipe_dir, capsys):
    assert main([*_args("toy_grpo.yaml", tiny_pipe_dir, tmp_path / "empty"), "--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("flowalign: error: nothing to resume: no checkpoint") and "Traceback" not in err
