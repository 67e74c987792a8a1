"""Data parallel (flowalign.runtime.distributed): 2 CPU processes (gloo) take the same optimizer steps as 1 process on
the same global batch and seed; row sharding and sharded noise; one-process behaviour untouched."""

import copy
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from flowalign.config import Config, CRDConfig, GRPOConfig, NFTConfig, SamplingConfig, TrainConfig
from flowalign.runtime.distributed import SINGLE, Distributed, RowShard, setup
from flowalign.models import adapter_for
from flowalign.toy.pipelines import tiny_sd3_pipeline
from flowalign.rewards import Reward
from flowalign.samplers._checks import randn_like
from flowalign.trainer import Trainer

ITERATIONS = 2
# Adam divides by sqrt(v) + 1e-8: gradient entries near 1e-9, equal up to float error between the two runs, move a
# weight by up to ~3e-3 lr apart; a small lr keeps that under the 1e-6 tolerance (the gradient norms are compared
# at rtol 1e-3, which Adam's scale invariance would otherwise hide).
LR = 2e-4
SDE = SamplingConfig(num_steps=2, guidance_scale=2.0, sampler="flow_sde", noise_level=0.7)
ODE = SamplingConfig(num_steps=2, guidance_scale=1.0, sampler="flow_ode")
# minibatch 2 of a 4-row batch: the shuffled minibatches mix the two processes' rows
RUNS = {
    "grpo": dict(sampling=SDE, grpo=GRPOConfig(clip_range=0.2, beta=0.1)),
    "nft": dict(sampling=ODE, nft=NFTConfig(num_timesteps=2)),
    "crd": dict(sampling=ODE, crd=CRDConfig(num_timesteps=2, steps_per_iter=1)),
    # reference-parity switches that draw from the shared generator or gather per-step statistics (docs/parity.md)
    "grpo_parity": dict(sampling=SamplingConfig(num_steps=3, guidance_scale=2.0, sampler="flow_sde", noise_level=0.7,
                                                sde_window_size=2),
                        grpo=GRPOConfig(clip_range=0.2, kl_reward=0.5, timestep_selection="random",
                                        timestep_fraction=0.5)),
    "nft_parity": dict(sampling=SamplingConfig(num_steps=3, guidance_scale=1.0, sampler="flow_dpm2"),
                       nft=NFTConfig(timestep_sampling="permutation", timestep_fraction=0.67)),
}


class MeanPixel(Reward):
    name = "mean_pixel"

    def score(self, images, prompts, metadata=None):
        return images.mean(dim=(1, 2, 3))


def _run(name: str, pipe, out_dir: str) -> dict:
    """ITERATIONS iterations of RUNS[name] (algorithm: the name's first word) -> the LoRA weights, the logged
    reward means and gradient norms."""
    cfg = Config(train=TrainConfig(algorithm=name.split("_")[0], prompts_per_iter=2, group_size=2, minibatch=2, lr=LR,
                                   out_dir=out_dir), **RUNS[name])
    tr = Trainer(cfg, adapter=adapter_for(copy.deepcopy(pipe)), reward=MeanPixel())
    metrics = [tr.step() for _ in range(ITERATIONS)]
    return {"params": [p.detach().clone() for p in tr.params], "rewards": [m["reward_mean"] for m in metrics],
            "grad_norms": [m["grad_norm"] for m in metrics]}


def _worker(rank: int, world: int, port: int, out_dir: str, pipe) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world), OMP_NUM_THREADS="1")
    results = {a: _run(a, pipe, os.path.join(out_dir, f"{a}_{rank}")) for a in RUNS}
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_take_the_same_steps_as_one(tmp_path):
    pipe = tiny_sd3_pipeline(image_size=16)
    single = {a: _run(a, pipe, str(tmp_path / f"{a}_single")) for a in RUNS}
    # fork: the workers inherit the imported modules and the pipeline (spawn would import torch/diffusers again)
    mp.start_processes(_worker, args=(2, _free_port(), str(tmp_path), pipe), nprocs=2, start_method="fork")
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for algorithm, one in single.items():
        for got in ranks:
            assert got[algorithm]["rewards"] == pytest.approx(one["rewards"], abs=1e-6), algorithm
            assert got[algorithm]["grad_norms"] == pytest.approx(one["grad_norms"], rel=1e-3), algorithm
            for a, b in zip(got[algorithm]["params"], one["params"]):
                torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=algorithm)
        assert any(p.abs().max() > 0 for p in one["params"][1::2])  # the LoRA moved (B starts at zero)
    # rank 0 writes the metrics; the other process writes nothing
    assert (tmp_path / "grpo_0" / "metrics.jsonl").exists() and not (tmp_path / "grpo_1" / "metrics.jsonl").exists()


class _Rank:
    """A stand-in for accelerate's state: rank and world size, no process group (no collectives used)."""

    def __init__(self, rank, world):
        self.process_index, self.num_processes, self.device = rank, world, torch.device("cpu")


def test_shards_parts_and_noise_match_the_unsharded_batch():
    d = Distributed(_Rank(1, 2))
    assert d.shard(8, group_size=2) == slice(4, 8) and not d.is_main
    with pytest.raises(ValueError, match="set train.prompts_per_iter to a multiple of 2"):
        d.check(Config(train=TrainConfig(prompts_per_iter=3)))
    with pytest.raises(ValueError, match="use crd.centering=group"):
        d.check(Config(train=TrainConfig(algorithm="crd"), sampling=ODE, crd=CRDConfig(centering="batch")))
    part = d.part(torch.tensor([6, 1, 4, 3]), num_local=4)
    assert part.rows.tolist() == [6, 4] and part.local.tolist() == [2, 0] and part.pos.tolist() == [0, 2]
    assert part.share == 0.5 and part.total == 4
    full = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)
    torch.testing.assert_close(randn_like(torch.zeros(2, 3), d.noise(g, part)), full[[0, 2]], rtol=0, atol=0)
    assert isinstance(d.noise(g, 2), RowShard) and d.noise(g, 2).rows == slice(2, 4)
    # one process: identities
    assert SINGLE.noise(g, part) is g and SINGLE.part(part.rows, 4).share == 1.0
    assert SINGLE.gather(full) is full and SINGLE.sum([1.0, 2.0]) == [1.0, 2.0]


def test_setup_is_single_without_a_launcher_and_refuses_deepspeed(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert setup() is SINGLE and setup("fsdp") is SINGLE and not SINGLE.fsdp  # one process: nothing to shard
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(ValueError, match="DeepSpeed is not supported: launch with configs/accelerate/fsdp.yaml"):
        setup()
