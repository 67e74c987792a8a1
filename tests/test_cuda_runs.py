"""On a CUDA machine (skipped elsewhere): every training recipe on the toy pipeline runs end to end on the GPU,
held-out evaluation included. CPU tests cannot see device mix-ups (a CPU index tensor meeting a CUDA mask),
which is how CRD once failed on its first GPU update."""

import json
import os

import pytest
import torch

from flowalign import lora
from flowalign.cli import main
from flowalign.models import adapter_for
from flowalign.toy.pipelines import tiny_sd3_pipeline

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["model.device=cuda", "sampling.num_steps=4", "sampling.eval_num_steps=4", "train.iterations=2",
         "train.prompts_per_iter=2", "train.group_size=4", "train.minibatch=4", "train.eval_per_task=2",
         "opd.train_window=null", "sampling.sde_window=null", "train.eval_every=1"]


@pytest.mark.parametrize("name", ["toy_grpo.yaml", "toy_nft.yaml", "toy_crd.yaml", "toy_demo.yaml",
                                  "toy_backprop.yaml", "toy_opd.yaml"])
def test_recipe_trains_on_cuda(tmp_path, tiny_pipe16, name, capsys):
    extra = []
    if name == "toy_opd.yaml":
        for teacher in ("spatial", "attributes"):
            ad = adapter_for(tiny_sd3_pipeline(image_size=16))
            lora.add_lora(ad, rank=4)
            extra.append(f"opd.teachers.{teacher}.lora={lora.save_lora(ad, str(tmp_path / teacher))}")
    out = tmp_path / "run"
    rc = main(["train", os.path.join(ROOT, "configs", name), f"model.path={tiny_pipe16}", f"train.out_dir={out}",
               *SMALL, *extra])
    assert rc == 0, capsys.readouterr().err
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [1, 2]
    assert all(torch.isfinite(torch.tensor(r["reward_mean"])) for r in rows)
    evals = [json.loads(line) for line in (out / "evals.jsonl").read_text().splitlines()]
    assert [e["iteration"] for e in evals] == [0, 1, 2] and all(0 <= e["toy_geneval"] <= 1 for e in evals)


def test_sample_and_eval_on_cuda(tmp_path, tiny_pipe16, capsys):
    out = tmp_path / "eval.json"
    rc = main(["eval", "--model", tiny_pipe16, "--device", "cuda", "--per-task", "2", "--steps", "3",
               "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    assert 0 <= json.loads(out.read_text())["scores"]["base"]["toy_geneval"] <= 1


def test_doctor_on_cuda(tmp_path, tiny_pipe16, capsys):
    rc = main(["doctor", os.path.join(ROOT, "configs", "toy_grpo.yaml"), f"model.path={tiny_pipe16}",
               "model.device=cuda", "sampling.num_steps=4", "sampling.sde_window=[0,2]", "train.prompts_per_iter=2",
               "train.group_size=4", "train.minibatch=4", "--out", str(tmp_path), "--dtypes", "fp32,bf16"])
    out = capsys.readouterr().out
    assert rc in (0, 1) and "verdict:" in out  # a GPU may well fail a case: what counts is that it is measured
    data = json.loads((tmp_path / "doctor.json").read_text())
    assert data["device"].startswith("cuda") and any(g["name"].startswith("bf16") for g in data["gaps"])


def test_cuda_graphs_rollout_matches_eager_and_trains(tmp_path, tiny_pipe16, capsys):
    """model.cuda_graphs on the GPU: the graphed rollout of the same LoRA and noise gives the eager rollout's
    latents (inductor reorders float32 sums: equal up to rounding), after an optimizer step too (the replay reads
    the weights in place), and a GRPO run trains with it."""
    from flowalign.algorithms.base import configured_rollout
    from flowalign.config import load_config
    from flowalign.trainer import add_policy_lora

    cfg = load_config(os.path.join(ROOT, "configs", "toy_grpo.yaml"),
                      ["model.device=cuda", "sampling.num_steps=4", "train.group_size=2", "model.cuda_graphs=true"])
    adapter = adapter_for(tiny_sd3_pipeline(image_size=16).to("cuda"))
    params = add_policy_lora(cfg, adapter)
    den = adapter.denoiser
    prompts = ["a red cube", "a red cube", "two blue balls", "two blue balls"]

    def both():
        graphed = configured_rollout(adapter, prompts, cfg, torch.Generator().manual_seed(1)).latents
        den.forward, routed = den.eager_forward, den.forward
        try:
            eager = configured_rollout(adapter, prompts, cfg, torch.Generator().manual_seed(1)).latents
        finally:
            den.forward = routed
        return graphed, eager

    for _ in range(2):
        graphed, eager = both()
        torch.testing.assert_close(graphed, eager, rtol=1e-4, atol=1e-4)
        with torch.no_grad():
            for p in params:
                p.add_(0.05 * torch.randn_like(p))
    out = tmp_path / "run"
    rc = main(["train", os.path.join(ROOT, "configs", "toy_grpo.yaml"), f"model.path={tiny_pipe16}",
               f"train.out_dir={out}", *SMALL, "model.cuda_graphs=true"])
    assert rc == 0, capsys.readouterr().err
