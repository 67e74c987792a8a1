"""Scoring a finished rollout chunk on a worker thread while the next chunk samples (train.overlap_rewards) takes
the same steps, bit for bit, as scoring the same chunks after the rollout; and it hides the reward's time."""

import os
import time

import pytest
import torch

from flowalign.config import load_config
from flowalign.rewards import Reward
from flowalign.trainer import Trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class SlowBrightness(Reward):
    """Mean pixel value after a pause (a remote or heavy reward); records which thread scored."""

    name = "slow_brightness"

    def __init__(self, pause: float):
        self.pause, self.threads = pause, set()

    def score(self, images, prompts, metadata=None):
        import threading

        self.threads.add(threading.current_thread().name)
        time.sleep(self.pause)
        return images.float().mean(dim=(1, 2, 3))


def _trainer(model, out, name, overlap, pause=0.0):
    cfg = load_config(os.path.join(ROOT, "configs", name), {
        "model.path": model, "train.out_dir": str(out), "sampling.num_steps": 3, "sampling.sde_window": None,
        "train.prompts_per_iter": 4, "train.group_size": 2, "train.minibatch": 8, "train.eval_every": 0,
        "model.lora_rank": 2, "train.lr": 0.05, "train.reward_chunks": 4, "train.overlap_rewards": overlap,
        "nft.num_timesteps": 1, "crd.num_timesteps": 1, "crd.steps_per_iter": 1,
        "diagnostics.base_batches": 0})  # the base batches are scored in the main thread, before the overlap
    torch.manual_seed(0)
    return Trainer(cfg, reward=SlowBrightness(pause))


@pytest.mark.parametrize("name", ["toy_grpo.yaml", "toy_nft.yaml"])
def test_overlapped_scoring_takes_the_same_steps(tmp_path, tiny_pipe_dir, name):
    seq, ovl = _trainer(tiny_pipe_dir, tmp_path / "a", name, False), _trainer(tiny_pipe_dir, tmp_path / "b", name, True)
    for _ in range(2):
        ms, mo = seq.step(), ovl.step()
        assert ms["reward_mean"] == mo["reward_mean"] and ms.get("loss") == mo.get("loss")
    assert all(torch.equal(a, b) for a, b in zip(seq.params, ovl.params))
    assert seq.reward.threads == {"MainThread"} and all(t.startswith("flowalign-reward") for t in ovl.reward.threads)
    assert ms["time_reward_hidden"] == 0.0


def test_a_slow_reward_is_hidden_behind_the_next_chunks_rollout(tmp_path, tiny_pipe_dir):
    # a pause far shorter than a chunk's rollout on any machine would make this flaky; instead compare with the
    # scoring time the trainer measured itself: all but the last chunk's scoring can be hidden
    tr = _trainer(tiny_pipe_dir, tmp_path, "toy_grpo.yaml", True, pause=0.05)
    m = tr.step()
    assert m["time_reward_scoring"] >= 4 * 0.05
    assert 0.0 < m["time_reward_hidden"] <= m["time_reward_scoring"]
