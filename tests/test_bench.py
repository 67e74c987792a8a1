"""`flowalign bench` on a tiny budget: it runs end to end on a tiny in-process pipeline, counts denoiser calls
as derived from the config, and writes bench.json, bench.md and PNGs. The GPU scale part is only checked for
its configs and shapes (a shrunk variant on the CPU). Benchmarks are not timed tests."""

import json
import math

import pytest
import torch
from PIL import Image

from flowalign.apps.bench import build_transformer, run_scale, scale_config
from flowalign.cli import main
from flowalign.toy.pipelines import tiny_sd3_pipeline

SMALL = ["sampling.num_steps=2", "sampling.eval_num_steps=2", "sampling.sde_window=null",
         "train.prompts_per_iter=1", "train.group_size=4", "train.minibatch=4", "nft.num_timesteps=1"]


@pytest.fixture(scope="module")
def bench_out(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    torch.manual_seed(0)
    tiny_sd3_pipeline(image_size=16).save_pretrained(str(root / "pipe"))
    out = root / "out"
    rc = main(["bench", "--model", str(root / "pipe"), "--out", str(out), "--algorithms", "grpo,nft",
               "--budget-samples", "8", "--eval-every", "1", "--eval-per-task", "1", *SMALL])
    assert rc == 0
    return out, json.loads((out / "bench.json").read_text())


def test_bench_writes_report(bench_out):
    out, report = bench_out
    assert {"machine", "command", "budget", "algorithms"} <= set(report)
    assert report["machine"]["torch"] == torch.__version__ and report["machine"]["cores"] >= 1
    assert report["command"].startswith("flowalign bench --model ")
    assert list(report["algorithms"]) == ["grpo", "nft"]
    for alg, r in report["algorithms"].items():
        assert r["iterations"] == 2 and r["samples"] == 8  # budget 8 at 1 prompt x 4 samples per iteration
        assert [p["samples"] for p in r["curve"]] == [0, 4, 8]  # base, then every iteration
        assert all(0 <= p["heldout"] <= 1 and p["clip_score"] is not None for p in r["curve"])
        assert r["curve"][0]["wall_s"] == 0 and r["curve"][-1]["wall_s"] == pytest.approx(r["train_wall_s"])
        assert r["settings"]["eval_images"] == 6 and r["heldout_metric"] == "toy_geneval"
        m = r["mean_cost"]
        assert 0 <= m["overhead_frac"] < 1 and m["denoiser_fwd_s_rollout"] > 0
        # the ratio to the network-only limit is the overhead share seen from the other side: 1 / (1 - share)
        assert m["network_limit_ratio"] == pytest.approx(1 / (1 - m["overhead_frac"]))
        assert r["peak_memory"]["rss_peak_mb"] > 0
    assert report["algorithms"]["nft"]["settings"]["eval_guidance_scale"] == 1.0  # CFG-free recipe's own
    assert report["algorithms"]["grpo"]["settings"]["eval_guidance_scale"] == 4.5
    for name in ("sample_efficiency.png", "cost_breakdown.png"):
        with Image.open(out / name) as im:
            assert im.width > 300
    md = (out / "bench.md").read_text()
    assert md.count("\n| grpo |") == 1 and "| nft |" in md and "Machine: " in md and "Reproduce: `flowalign" in md


def test_bench_counts_network_calls(bench_out):
    _, report = bench_out
    steps, b = 2, 4  # sampling.num_steps; prompts_per_iter x group_size (= train.minibatch: one minibatch)
    for rec in report["algorithms"]["nft"]["per_iteration"]:
        # rollout at guidance 1 (no CFG): one call of b rows per step
        assert (rec["denoiser_calls_rollout"], rec["denoiser_rows_rollout"]) == (steps, steps * b)
        # update: 1 minibatch x 1 timestep x (old, reference, current) calls; only the current one is trained
        assert (rec["denoiser_calls_update"], rec["denoiser_rows_update"]) == (3, 3 * b)
        assert rec["denoiser_grad_calls"] == 1 and rec["denoiser_bwd_s"] > 0
    grpo = report["algorithms"]["grpo"]["per_iteration"]
    assert any(rec["update_samples"] > 0 for rec in grpo)  # seeded: some rewards differ within the group
    for rec in grpo:
        # rollout with CFG 4.5: one batched call of 2b rows (uncond + cond) per step
        assert (rec["denoiser_calls_rollout"], rec["denoiser_rows_rollout"]) == (steps, steps * 2 * b)
        # update: rows with a nonzero advantage, per minibatch of 4, re-scored at every (stochastic) step with CFG
        n = rec["update_samples"]
        assert rec["denoiser_calls_update"] == math.ceil(n / 4) * steps
        assert rec["denoiser_rows_update"] == steps * 2 * n
        assert rec["denoiser_grad_calls"] == rec["denoiser_calls_update"]
        assert (rec["denoiser_bwd_s"] > 0) == (n > 0)


def test_scale_configs_are_the_published_sizes():
    flux = build_transformer("flux", device="meta")
    assert sum(p.numel() for p in flux.parameters()) / 1e9 == pytest.approx(11.90, abs=0.01)
    cls, family, cfg = scale_config("sd35m")
    assert (cls, family, cfg["num_layers"], cfg["num_attention_heads"] * cfg["attention_head_dim"]) == \
        ("SD3Transformer2DModel", "sd3", 24, 1536)
    with pytest.raises(ValueError, match="unknown --scale 'sdxl'; choose from sd35m, flux"):
        scale_config("sdxl")


@pytest.mark.parametrize("name", ["sd35m", "flux"])
def test_scale_run_on_a_shrunk_model(name):
    r = run_scale(name, resolution=64, batch=2, rank=4, repeats=1, device="cpu", dtype=torch.float32, shrink=True)
    assert r["lora_params_m"] > 0 and r["cfg_passes"] == (2 if name == "sd35m" else 1)
    for key in ("no_checkpointing", "checkpointing"):
        t = r["runs"][key]
        assert t["train_step_s"] > 0 and t["rollout_images_per_s"] == pytest.approx(
            2 / t["forward_s"] / (10 * r["cfg_passes"]))


def test_scale_without_cuda_is_one_clear_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["bench", "--scale", "flux", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--scale needs a CUDA GPU" in err
