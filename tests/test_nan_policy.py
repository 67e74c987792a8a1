"""NaN policy: a non-finite gradient norm or loss skips the optimizer step (grads zeroed, nothing stepped, counted);
`flowalign train` stops after train.max_nan_steps such steps in a row, with a checkpoint and one clear line."""

import dataclasses
import json
import os

import pytest
import torch
from safetensors.torch import load_file

from flowalign.algorithms import grpo
from flowalign.algorithms.base import UpdateRule
from flowalign.cli import main
from flowalign.config import Config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_non_finite_step_is_skipped_and_counted():
    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([p], lr=0.1)
    rule = UpdateRule(Config(), adapter=None, params=[p], optimizer=opt, generator=torch.Generator())
    for bad in (float("nan"), float("inf")):
        (p * bad).sum().backward()
        assert not torch.isfinite(torch.tensor(rule.optimizer_step()))
        assert p.grad is None and not opt.state and torch.equal(p.detach(), torch.ones(3))
    p.sum().backward()
    rule.optimizer_step(loss=float("nan"))  # finite gradient, NaN loss: skipped too
    assert (rule.nan_steps, rule.nan_streak, rule.optimizer_steps) == (3, 3, 0)
    p.sum().backward()
    assert rule.optimizer_step() == pytest.approx(3 ** 0.5)
    assert (rule.nan_steps, rule.nan_streak, rule.optimizer_steps) == (3, 0, 1) and not torch.equal(p, torch.ones(3))


def test_nan_loss_stops_training_with_a_checkpoint(tmp_path, tiny_pipe_dir, monkeypatch, capsys):
    real = grpo.grpo_step_loss
    monkeypatch.setattr(grpo, "grpo_step_loss",
                        lambda *a, **k: dataclasses.replace(out := real(*a, **k), loss=out.loss * float("nan")))
    out = tmp_path / "run"
    rc = main(["train", os.path.join(ROOT, "configs", "toy_grpo.yaml"), f"model.path={tiny_pipe_dir}",
               f"train.out_dir={out}",
               "sampling.num_steps=2", "sampling.sde_window=null", "train.iterations=6", "train.prompts_per_iter=1",
               "train.group_size=2", "train.minibatch=2", "train.eval_per_task=1", "model.lora_rank=2",
               "train.reward=jpeg_incompressibility", "train.max_nan_steps=2"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("flowalign: error: stopped at iteration 2: 2 optimizer steps in a row had a NaN/inf")
    assert f"saved {out / 'ckpt-2'}" in last and "--resume" in last
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["nan_steps"] for r in rows] == [1, 2]
    lora = load_file(str(out / "ckpt-2" / "lora" / "pytorch_lora_weights.safetensors"))
    assert all(torch.isfinite(v).all() for v in lora.values())
    assert all(v.abs().sum() == 0 for k, v in lora.items() if "lora_B" in k)  # never stepped: B still 0
