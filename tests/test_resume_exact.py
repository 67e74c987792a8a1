"""Resume is bit-exact from every checkpoint: a run continued from ckpt-k ends with exactly the state (every tensor:
LoRA, optimizer moments, snapshots, RNGs) of the run that was never interrupted. Several prompts per iteration, so
that the text encoder sees batches of different composition (which once made embeddings, hence weights, drift by
~1e-7 after a resume)."""

import os
import shutil

import pytest
import torch

from flowalign.callbacks import TrainerCallback
from flowalign.config import load_config
from flowalign.runtime import checkpoint
from flowalign.runtime.checkpoint import split_tensors
from flowalign.trainer import run_training

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = {"sampling.num_steps": 2, "sampling.eval_num_steps": 1, "sampling.sde_window": None,
         "train.iterations": 4, "train.prompts_per_iter": 3, "train.group_size": 2, "train.minibatch": 6,
         "train.eval_per_task": 1, "train.eval_every": 2, "train.checkpoint_every": 1, "train.keep_checkpoints": 0,
         "model.lora_rank": 2, "train.lr": 0.05, "train.reward": "jpeg_incompressibility", "nft.num_timesteps": 1,
         "crd.num_timesteps": 1, "crd.steps_per_iter": 1}


class FinalState(TrainerCallback):
    def on_train_end(self, trainer, summary):
        self.tensors = split_tensors(trainer.state_dict())[1]


def _run(name, model, out, resume=False, extra=None) -> dict:
    cfg = load_config(os.path.join(ROOT, "configs", name),
                      {**SMALL, "model.path": model, "train.out_dir": str(out), "train.resume": resume, **(extra or {})})
    final = FinalState()
    run_training(cfg, progress=False, callbacks=[final])
    return final.tensors


@pytest.mark.parametrize("name", ["toy_grpo.yaml", "toy_crd.yaml", "toy_adv_grpo.yaml"])
def test_resume_from_every_checkpoint_ends_in_the_same_state(tmp_path, tiny_pipe_dir, name, request):
    extra = None
    if name == "toy_adv_grpo.yaml":  # the reward head trained during RL (and its optimizer) resumes too
        dino = request.getfixturevalue("dino_dir")
        extra = {"train.reward": "dino_similarity", "train.reward_options": {
            "model": dino, "head": True, "references": "toy:4", "head_hidden": 8, "n_patches": 4, "lr": 1e-2}}
    ref = _run(name, tiny_pipe_dir, tmp_path / "ref", extra=extra)
    if extra:
        assert any(key.startswith("adversary/") for key in ref), "the head's tensors are in the checkpoint state"
    for k in (1, 2, 3):
        run = tmp_path / f"from{k}"
        shutil.copytree(tmp_path / "ref", run)
        for it, path in checkpoint.list_checkpoints(str(run)):
            if it > k:
                shutil.rmtree(path)
        got = _run(name, tiny_pipe_dir, run, resume=True, extra=extra)
        assert got.keys() == ref.keys()
        diff = [key for key in ref if not torch.equal(ref[key], got[key])]
        assert not diff, f"resumed from ckpt-{k}: {len(diff)} tensors differ, e.g. {diff[:3]}"


class _Stall(TrainerCallback):
    """In the child: at the given point, say so (a marker file) and wait to be killed."""

    def __init__(self, marker: str, iteration: int):
        self.marker, self.iteration = marker, iteration

    def on_phase_begin(self, trainer, phase):
        if phase == "update" and trainer.iteration == self.iteration:  # mid-iteration: rollout done, no step yet
            _stall(self.marker)


def _stall(marker: str) -> None:
    import time

    open(marker, "w").close()
    time.sleep(600)


def _child(name: str, model: str, out: str, point: str, marker: str) -> None:
    torch.set_num_threads(1)
    if point == "mid_checkpoint":  # the second checkpoint's files are written, its state.json (written last) not
        write_json = checkpoint.write_json

        def stalling(path, data):
            if os.path.basename(os.path.dirname(path)) == "ckpt-2.tmp":
                _stall(marker)
            write_json(path, data)

        checkpoint.write_json = stalling
        callbacks = []
    else:
        callbacks = [_Stall(marker, iteration=2)]
    cfg = load_config(os.path.join(ROOT, "configs", name), {**SMALL, "model.path": model, "train.out_dir": out})
    run_training(cfg, progress=False, callbacks=callbacks)


@pytest.mark.parametrize("point", ["mid_iteration", "mid_checkpoint"])
def test_sigkill_mid_iteration_or_mid_checkpoint_then_resume_is_exact(tmp_path, tiny_pipe_dir, point):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the child runs single-threaded too: same kernels, same bits
    try:
        _kill_and_resume(tmp_path, tiny_pipe_dir, point)
    finally:
        torch.set_num_threads(threads)


def _kill_and_resume(tmp_path, tiny_pipe_dir, point):
    import multiprocessing as mp
    import signal
    import time

    ref = _run("toy_grpo.yaml", tiny_pipe_dir, tmp_path / "ref")
    run, marker = tmp_path / "run", str(tmp_path / "stalled")
    proc = mp.get_context("spawn").Process(target=_child, args=("toy_grpo.yaml", tiny_pipe_dir, str(run), point,
                                                                 marker))
    proc.start()
    deadline = time.time() + 300
    while not os.path.exists(marker):
        assert proc.is_alive() and time.time() < deadline, f"the child did not reach {point}"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.join()
    assert [it for it, _ in checkpoint.list_checkpoints(str(run))] == [1, 2] if point == "mid_iteration" else [1]
    got = _run("toy_grpo.yaml", tiny_pipe_dir, run, resume=True)
    assert not (run / "ckpt-2.tmp").exists()  # a killed write's leftovers are removed, never read
    diff = [key for key in ref if not torch.equal(ref[key], got[key])]
    assert not diff, f"killed {point}: {len(diff)} tensors differ, e.g. {diff[:3]}"
