"""FSDP sharding (train.shard=fsdp, flowalign.runtime.fsdp) and multi-process checkpoints, on 2 CPU processes (gloo):
with the denoiser's base and LoRA weights sharded, GRPO, NFT, CRD and OPD take the same optimizer steps as one
process on the same global batch; FLUX, Wan, SD and SDXL shard their own block lists and get one process's
gradients (GRPO); a checkpoint written by a 2-process run (data parallel or FSDP) continues with --resume to the
same final weights as an uninterrupted 2-process run."""

import copy
import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from flowalign import lora
from flowalign.runtime import fsdp
from flowalign.config import (Config, CRDConfig, GRPOConfig, ModelConfig, NFTConfig, OPDConfig, SamplingConfig,
                              TrainConfig)
from flowalign.runtime.distributed import shard_mode
from flowalign.models import adapter_for
from flowalign.toy.pipelines import tiny_sd3_pipeline
from flowalign.rewards import Reward
from flowalign.trainer import Trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ITERATIONS = 2
LR = 2e-4  # small, as in test_distributed: Adam's 1/sqrt(v) magnifies float-rounding differences of tiny gradients
SDE = SamplingConfig(num_steps=2, guidance_scale=2.0, sampler="flow_sde", noise_level=0.7)
ODE = SamplingConfig(num_steps=2, guidance_scale=1.0, sampler="flow_ode")
# Every GRPO minibatch (1 row) and every CRD micro-batch (1 group) lies on ONE process, and OPD's two tasks land on
# different processes, so the other process runs its forwards on a zero-weight placeholder row (Distributed.part).
RUNS = {
    "grpo": dict(sampling=SDE, grpo=GRPOConfig(clip_range=0.2, beta=0.1), train=dict(minibatch=1)),
    "nft": dict(sampling=ODE, nft=NFTConfig(num_timesteps=2)),
    "crd": dict(sampling=ODE, crd=CRDConfig(num_timesteps=2, steps_per_iter=1)),
    "opd": dict(sampling=SamplingConfig(num_steps=2, guidance_scale=2.0, sampler="flow_ode"), train=dict(prompts_per_iter=1)),
}


class RandomPattern(Reward):
    """Correlation of the image with a fixed random pattern: a reward whose spread within a prompt group (the SDE
    noise's effect on the image) is large against the float rounding that differs between 1 and 2 processes (the
    denoisers' kernels round differently for 1 and 2 rows). The mean pixel, which the decoder smooths to nearly one
    value per group, made group advantages (R - mean) / std amplify that rounding up to 1.7e-3 in a gradient norm
    on AMD EPYC; with this reward the same comparison differs by < 3e-5 on AMD EPYC (AVX-512 and AVX2 kernels)."""

    name = "random_pattern"

    def score(self, images, prompts, metadata=None):
        pattern = torch.randn(images.shape[1:], generator=torch.Generator().manual_seed(0))
        return (images * pattern.to(images.device)).flatten(1).mean(1)


def _config(algorithm: str, out_dir: str, shard: str, teachers: dict) -> Config:
    spec = dict(RUNS[algorithm])
    train = {**dict(algorithm=algorithm, prompts_per_iter=2, group_size=2, minibatch=2, lr=LR, out_dir=out_dir,
                    shard=shard), **spec.pop("train", {})}
    if algorithm == "opd":
        spec["opd"] = OPDConfig(teachers=teachers)
    return Config(train=TrainConfig(**train), **spec)


def _run(algorithm: str, pipe, out_dir: str, shard: str, teachers: dict) -> dict:
    """ITERATIONS iterations -> the (whole) LoRA weights, reward means, gradient norms, and how much of one base
    weight this process holds."""
    tr = Trainer(_config(algorithm, out_dir, shard, teachers), adapter=adapter_for(copy.deepcopy(pipe)),
                 reward=None if algorithm == "opd" else RandomPattern())
    metrics = [tr.step() for _ in range(ITERATIONS)]
    base = tr.adapter.denoiser.transformer_blocks[0].attn.to_q.base_layer.weight
    teacher = lora.lora_parameters(tr.adapter, next(n for n in lora.adapter_names(tr.adapter) if n != "default")) \
        if algorithm == "opd" else []
    return {"params": [fsdp.full(p.detach()).clone() for p in tr.params],
            "teacher": [fsdp.full(p.detach()).clone() for p in teacher],
            "rewards": [m.get("reward_mean") for m in metrics], "losses": [m.get("loss") for m in metrics],
            "grad_norms": [m["grad_norm"] for m in metrics],
            "sharded": all(fsdp.is_sharded(p) for p in tr.params),
            "base_share": _share(base)}


def _share(weight: torch.Tensor) -> float:
    """The fraction of ``weight`` this process holds (1.0 when not sharded)."""
    return (weight.to_local().numel() if fsdp.is_sharded(weight) else weight.numel()) / weight.numel()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(fn, *args) -> None:
    """Run ``fn(*args)`` in 2 forked processes set up as torchrun would (gloo on the CPU)."""
    mp.start_processes(_entry, args=(_free_port(), fn, args), nprocs=2, start_method="fork")


def _entry(rank: int, port: int, fn, args) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2", LOCAL_WORLD_SIZE="2", OMP_NUM_THREADS="1")
    try:
        fn(rank, *args)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _same_steps_worker(rank: int, out_dir: str, pipe, teachers: dict) -> None:
    results = {a: _run(a, pipe, os.path.join(out_dir, f"{a}_{rank}"), "fsdp", teachers) for a in RUNS}
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))


def _teachers(pipe, root) -> dict:
    """Two task teachers (random nonzero LoRAs) for OPD, one per toy task."""
    out = {}
    for i, task in enumerate(("colors", "counting")):
        ad = adapter_for(copy.deepcopy(pipe))
        with torch.no_grad():
            for p in lora.add_lora(ad, rank=4):
                p.copy_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(i)))
        out[task] = {"lora": lora.save_lora(ad, str(root / f"teacher_{task}")), "guidance_scale": 2.0 - i,
                     "prompts": f"toy:{task}"}
    return out


def test_fsdp_two_processes_take_the_same_steps_as_one(tmp_path):
    pipe = tiny_sd3_pipeline(image_size=16)
    teachers = _teachers(pipe, tmp_path)
    single = {a: _run(a, pipe, str(tmp_path / f"{a}_single"), "fsdp", teachers) for a in RUNS}  # 1 process: no-op
    _launch(_same_steps_worker, str(tmp_path), pipe, teachers)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for algorithm, one in single.items():
        assert not one["sharded"] and one["base_share"] == 1.0
        for got in ranks:
            assert got[algorithm]["sharded"] and got[algorithm]["base_share"] == 0.5, algorithm  # half each
            if algorithm == "opd":
                assert got[algorithm]["losses"] == pytest.approx(one["losses"], rel=1e-5)
                for a, b in zip(got[algorithm]["teacher"], one["teacher"]):  # the frozen teacher stayed as loaded
                    torch.testing.assert_close(a, b, rtol=0, atol=0)
            else:
                assert got[algorithm]["rewards"] == pytest.approx(one["rewards"], abs=1e-6), algorithm
            assert got[algorithm]["grad_norms"] == pytest.approx(one["grad_norms"], rel=1e-3), algorithm
            for a, b in zip(got[algorithm]["params"], one["params"]):
                torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=algorithm)
        assert any(p.abs().max() > 0 for p in one["params"][1::2]), algorithm  # the LoRA moved (B starts at zero)
    assert (tmp_path / "grpo_0" / "metrics.jsonl").exists() and not (tmp_path / "grpo_1" / "metrics.jsonl").exists()


# ---- every family's block list: FLUX (double and single blocks), Wan, the SD / SDXL UNets ----
FAMILY_SAMPLING = {  # at the tiny pipelines' sizes (FLUX's default 1024 px would shift every sigma to 1)
    "flux": SamplingConfig(num_steps=2, guidance_scale=2.0, sampler="flow_sde", noise_level=0.7, resolution=16),
    "wan": SamplingConfig(num_steps=2, guidance_scale=2.0, sampler="flow_sde", noise_level=0.7, resolution=16,
                          num_frames=1),
    "sd": SamplingConfig(num_steps=2, guidance_scale=2.0, sampler="ddim", noise_level=1.0, resolution=32),
    "sdxl": SamplingConfig(num_steps=2, guidance_scale=2.0, sampler="ddim", noise_level=1.0, resolution=32)}


BLOCKS = {"flux": 2, "wan": 1, "sd": 4, "sdxl": 4}  # the tiny pipelines' FSDP units besides the root


def _family_run(family: str, out_dir: str) -> dict:
    """Two GRPO iterations on the tiny ``family`` pipeline with train.shard=fsdp -> whole LoRA, grad norms, units,
    and the share of the first LoRA layer's base weight this process holds."""
    from flowalign.toy.tiny_families import TINY_BUILDERS

    torch.manual_seed(0)
    cfg = Config(train=TrainConfig(algorithm="grpo", prompts_per_iter=2, group_size=2, minibatch=2, lr=LR,
                                   out_dir=out_dir, shard="fsdp"),
                 sampling=FAMILY_SAMPLING[family], grpo=GRPOConfig(clip_range=0.2), model=ModelConfig(lora_rank=2))
    tr = Trainer(cfg, adapter=adapter_for(TINY_BUILDERS[family]()), reward=RandomPattern())
    start = torch.cat([fsdp.full(p.detach()).flatten() for p in tr.params])
    grads, adam_step = [], tr.optimizer.step

    def step(*args, **kwargs):  # record each optimizer step's (whole) gradient
        grads.append(torch.cat([fsdp.full(p.grad).flatten() for p in tr.params]))
        return adam_step(*args, **kwargs)

    tr.optimizer.step = step
    metrics = [tr.step() for _ in range(ITERATIONS)]
    base = lora.lora_layers(tr.adapter.denoiser)[0].base_layer.weight
    end = torch.cat([fsdp.full(p.detach()).flatten() for p in tr.params])
    return {"start": start, "end": end, "first_grad": grads[0],
            "grad_norms": [m["grad_norm"] for m in metrics], "units": len(fsdp.blocks(tr.adapter.denoiser, tr.adapter.fsdp_blocks)),
            "base_share": _share(base)}


def _family_worker(rank: int, out_dir: str) -> None:
    results = {f: _family_run(f, os.path.join(out_dir, f"{f}_{rank}")) for f in FAMILY_SAMPLING}
    torch.save(results, os.path.join(out_dir, f"family{rank}.pt"))


def test_fsdp_shards_flux_wan_and_unet_blocks_like_one_process(tmp_path):
    # each adapter's fsdp_blocks must name its family's blocks (FLUX: transformer_blocks + single_transformer_blocks; Wan:
    # blocks; UNets: down_blocks + up_blocks) and the sharded run must take one process's steps
    _launch(_family_worker, str(tmp_path))  # first: forking after this process ran the UNets' convolutions on
    # its OpenMP pool can hang the children
    single = {f: _family_run(f, str(tmp_path / f"{f}_single")) for f in FAMILY_SAMPLING}
    ranks = [torch.load(tmp_path / f"family{r}.pt") for r in range(2)]
    for family, one in single.items():
        assert one["units"] == BLOCKS[family] and one["base_share"] == 1.0, family
        for got in ranks:
            assert got[family]["units"] == one["units"] and got[family]["base_share"] < 1.0, family
            assert got[family]["grad_norms"] == pytest.approx(one["grad_norms"], rel=1e-3), family
            # The first step's gradient, summed over the shards, is one process's up to rounding: measured on AMD EPYC
            # 1e-6 (FLUX), 7e-6 (Wan), 4e-5 (SD) and 7e-5 (SDXL, whose kernels round differently for 1 and 2 rows);
            # a lost or doubled gradient shard is off by tens of percent, so 1e-3 separates the two with room on any
            # CPU. Later weights are not compared element by element: Adam moves a weight by ~LR whatever its
            # gradient's size, so where the true gradient is ~0 rounding can flip a step's sign.
            torch.testing.assert_close(got[family]["start"], one["start"], rtol=0, atol=0)
            diff = (got[family]["first_grad"] - one["first_grad"]).norm() / one["first_grad"].norm()
            assert diff < 1e-3, (family, diff)
        assert (one["end"] - one["start"]).abs().max() > 0, family  # the LoRA moved


# ---- checkpoint / resume on 2 processes ----------------------------------------------------------------------
LORA = os.path.join("lora", "pytorch_lora_weights.safetensors")
SMALL = ["sampling.num_steps=2", "sampling.eval_num_steps=1", "train.prompts=toy:colors", "train.eval_per_task=1",
         "train.prompts_per_iter=2", "train.group_size=2", "train.minibatch=2", "nft.num_timesteps=1",
         "nft.old_decay_rate=0.3", "model.lora_rank=2", "train.lr=0.05", "train.ema_decay=0.5",
         "train.reward=jpeg_incompressibility", "train.checkpoint_every=2"]


def _resume_worker(rank: int, out_dir: str, pipe_dir: str, mode: str) -> None:
    """An uninterrupted 3-iteration run (ref), and a run stopped after its iteration-2 checkpoint and continued with
    --resume (run); `flowalign train` as the CLI runs it. mode: none | fsdp (train.shard) | accelerate-fsdp
    (ACCELERATE_USE_FSDP=true, as `accelerate launch --config_file configs/accelerate/fsdp.yaml` sets it)."""
    from flowalign.cli import main

    sharded = []
    shard_denoiser = fsdp.shard_denoiser
    fsdp.shard_denoiser = lambda *a: sharded.append(shard_denoiser(*a))  # count the sharded trainers
    if mode == "accelerate-fsdp":
        os.environ["ACCELERATE_USE_FSDP"] = "true"

    def train(out, iterations, *extra):
        args = ["train", os.path.join(ROOT, "configs", "toy_nft.yaml"), f"model.path={pipe_dir}", f"train.out_dir={out}",
                *SMALL, f"train.iterations={iterations}", f"train.shard={'fsdp' if mode == 'fsdp' else 'none'}", *extra]
        assert main(args) == 0
        torch.distributed.barrier()  # rank 0 has written its files

    train(os.path.join(out_dir, "ref"), 3)
    train(os.path.join(out_dir, "run"), 2)
    train(os.path.join(out_dir, "run"), 3, "--resume")
    assert len(sharded) == (0 if mode == "none" else 3), sharded


@pytest.mark.parametrize("mode", ["none", "fsdp", "accelerate-fsdp"])
def test_two_process_checkpoint_resumes_to_the_uninterrupted_weights(tmp_path, tiny_pipe_dir, mode):
    _launch(_resume_worker, str(tmp_path), tiny_pipe_dir, mode)
    ref, run = load_file(str(tmp_path / "ref" / LORA)), load_file(str(tmp_path / "run" / LORA))
    assert ref.keys() == run.keys() and all(torch.equal(ref[k], run[k]) for k in ref)
    assert any(v.abs().sum() > 0 for k, v in ref.items() if "lora_B" in k)  # the weights did move
    assert (tmp_path / "run" / "ckpt-2").is_dir() and (tmp_path / "run" / "ckpt-3").is_dir()
    rows, ref_rows = (_jsonl(tmp_path / d / "metrics.jsonl") for d in ("run", "ref"))
    assert [r["iteration"] for r in rows] == [1, 2, 3] and [r["loss"] for r in rows] == [r["loss"] for r in ref_rows]
    evals = [(e["iteration"], e["weights"]) for e in _jsonl(tmp_path / "run" / "evals.jsonl")]
    assert evals == [(0, "base"), (3, "lora")] == [(e["iteration"], e["weights"]) for e in _jsonl(tmp_path / "ref" / "evals.jsonl")]


def _jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_shard_mode_and_config():
    assert shard_mode("none", {}) == "none" and shard_mode("fsdp", {}) == "fsdp"
    assert shard_mode("none", {"ACCELERATE_USE_FSDP": "true"}) == "fsdp"  # accelerate launch with fsdp.yaml
    with pytest.raises(ValueError, match="DeepSpeed is not supported: launch with configs/accelerate/fsdp.yaml"):
        shard_mode("none", {"ACCELERATE_USE_DEEPSPEED": "true"})
    with pytest.raises(ValueError, match="train.shard='zero3' is not valid; choose one of none, fsdp"):
        TrainConfig(shard="zero3")


def _disk_full_worker(rank: int, out_dir: str, pipe_dir: str, mode: str) -> None:
    """Rank 0's checkpoint write hits a full disk at iteration 2: EVERY process must leave with rank 0's one-line
    message (before the fix, rank 1 went on into the next iteration's collectives and waited there forever)."""
    import errno

    from flowalign.runtime import checkpoint
    from flowalign.cli import main

    def full_disk(path, tensors):
        raise OSError(errno.ENOSPC, "No space left on device", path)

    checkpoint.write_tensors = full_disk
    args = ["train", os.path.join(ROOT, "configs", "toy_nft.yaml"), f"model.path={pipe_dir}",
            f"train.out_dir={out_dir}", *SMALL, "train.iterations=4", f"train.shard={mode}"]
    code = main(args)
    with open(os.path.join(out_dir, f"exit{rank}.json"), "w") as f:
        json.dump({"code": code}, f)


@pytest.mark.parametrize("mode", ["none", "fsdp"])
def test_a_failed_checkpoint_write_stops_every_process(tmp_path, tiny_pipe_dir, mode, capfd):
    _launch(_disk_full_worker, str(tmp_path), tiny_pipe_dir, mode)
    codes = [json.loads((tmp_path / f"exit{r}.json").read_text())["code"] for r in range(2)]
    assert codes == [2, 2]  # both processes stopped with the one-line error, neither hung
    err = capfd.readouterr().err
    assert err.count("could not write checkpoint") == 2 and "the disk is full" in err
    assert not (tmp_path / "ckpt-2").exists() and not (tmp_path / "ckpt-2.tmp").exists()
    assert [r["iteration"] for r in _jsonl(tmp_path / "metrics.jsonl")] == [1, 2]
