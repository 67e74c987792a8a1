"""flowalign doctor on tiny in-process pipelines: a clean configuration passes, planted mismatches are flagged.

Each planted mismatch is a mismatch by construction (a denoiser whose output depends on the batch size, weights
rounded to bf16 in one pass only, a LoRA merged into the base weights, a reward that draws random numbers), so
the verdicts do not depend on which kernels a CPU happens to pick.
"""

import json
import math

import pytest
import torch
from PIL import Image

from flowalign import doctor, lora
from flowalign.config import Config, GRPOConfig, SamplingConfig, TrainConfig
from flowalign.doctor import checks, onpolicy, settings
from flowalign.models import adapter_for
from flowalign.rewards import Reward
from flowalign.toy.pipelines import tiny_sd3_pipeline
from flowalign.trainer import add_policy_lora


class MeanPixel(Reward):
    name = "mean_pixel"

    def score(self, images, prompts, metadata=None):
        return images.mean(dim=(1, 2, 3))


class NoisyReward(Reward):
    """Planted: a reward that is not a function of the image."""

    name = "noisy"

    def score(self, images, prompts, metadata=None):
        return torch.rand(len(prompts))


def _cfg(tmp_path, clip_range=1e-4, minibatch=2, grpo=None, **sampling):
    s = dict(num_steps=4, guidance_scale=2.0, sde_window=(0, 2))
    s.update(sampling)
    return Config(sampling=SamplingConfig(**s), grpo=GRPOConfig(clip_range=clip_range, **(grpo or {})),
                  train=TrainConfig(prompts_per_iter=2, group_size=2, minibatch=minibatch, out_dir=str(tmp_path)))


def _adapter():
    torch.manual_seed(0)
    return adapter_for(tiny_sd3_pipeline(image_size=16, with_t5=False))


def _run(tmp_path, cfg, adapter=None, reward=None, dtypes="fp32"):
    return doctor.run(cfg, adapter=adapter or _adapter(), reward=reward or MeanPixel(), out=str(tmp_path / "doc"),
                      dtypes=dtypes, progress=False, echo=False)


def test_a_clean_configuration_passes_and_writes_its_files(tmp_path):
    report = _run(tmp_path, _cfg(tmp_path, minibatch=4))
    for name in ("on_policy", "reference", "reward", "grid"):
        assert report.check(name).status == "ok", report.check(name).line()
    assert report.check("gradients").status in ("ok", "info")
    conf = next(r for r in report.gaps if r.case.configured)
    assert conf.max_gap == 0 and conf.max_clip_frac == 0  # same dtype, same batch: bit-identical re-scoring
    assert conf.steps == [0, 1] and conf.stochastic == [True, True]
    assert report.verdict != "fail"
    text = open(report.paths["md"]).read()
    assert "[OK  ] on_policy" in text and "| **" in text  # verdict lines, and the configured row in bold
    data = json.load(open(report.paths["json"]))
    assert {c["name"] for c in data["checks"]} >= {"on_policy", "reference", "gradients", "kl_scaling", "reward",
                                                   "grid"}
    assert len(data["gaps"]) == len(report.gaps)
    assert Image.open(report.paths["png"]).size[0] > 100


def test_a_minibatch_on_a_batch_size_dependent_pipeline_fails_with_the_fix(tmp_path):
    adapter = _adapter()
    # planted: the prediction depends on how many rows the call holds (as SD3's kernels may on a GPU)
    adapter.denoiser.register_forward_hook(lambda m, args, kw, out: (out[0] + 1e-2 * kw["hidden_states"].shape[0],),
                                           with_kwargs=True)
    report = _run(tmp_path, _cfg(tmp_path, minibatch=2), adapter)  # rollout batch 4, minibatch 2
    check = report.check("on_policy")
    assert check.status == "fail", check.line()
    assert "train.minibatch = the rollout batch (4" in check.fix
    same = next(r for r in report.gaps if r.case.name == "fp32: same batch 4")
    assert same.max_gap == 0  # the fix the doctor names is measured to work


def test_a_bf16_rollout_rescored_in_fp32_is_flagged(tmp_path):
    cfg = _cfg(tmp_path)
    adapter = _adapter()
    add_policy_lora(cfg, adapter)
    prompts = ["a red circle"] * 2 + ["two blue squares"] * 2
    planted = onpolicy.GapCase("bf16 rollout, fp32 training", settings.PassSetting(torch.bfloat16, 4),
                               settings.PassSetting(torch.float32, 4), clip_range=1e-4)
    clean = onpolicy.GapCase("fp32", settings.PassSetting(torch.float32, 4), settings.PassSetting(torch.float32, 4),
                             clip_range=1e-4)
    before = {n: p.detach().clone() for n, p in adapter.denoiser.named_parameters()}
    bad, good = onpolicy.measure(adapter, prompts, cfg, [planted, clean])
    assert bad.max_ratio_error > 1e-5 and doctor.diagnosis.case_status(bad) in ("warn", "fail")
    assert good.max_gap == 0 and doctor.diagnosis.case_status(good) == "ok"
    after = dict(adapter.denoiser.named_parameters())  # the bf16 pass put back the exact float32 weights
    assert all(torch.equal(before[n], after[n]) and after[n].dtype == before[n].dtype for n in before)


def test_the_table_holds_every_dtype_and_a_cross_dtype_row(tmp_path):
    report = _run(tmp_path, _cfg(tmp_path, clip_range=1e-4), dtypes="fp32,bf16")
    assert report.check("settings").status == "ok"  # the summary line of the settings that do not move it
    names = [r.case.name for r in report.gaps]
    assert "bf16: same batch 4" in names and "bf16: minibatch 2 of 4" in names
    assert "fp32: CFG branches apart" in names and "fp32: deterministic algorithms" in names
    cross = report.gaps[names.index("rollout bf16, re-score fp32")]
    assert cross.max_ratio_error > 1e-5  # bf16 rounding in one pass only moves the ratio
    flagged = [c for c in report.checks if c.name == "setting: rollout bf16, re-score fp32"]
    assert flagged and flagged[0].status in ("warn", "fail") and "one dtype" in flagged[0].fix


def test_autocast_gets_its_own_rows_and_runs_every_row_when_configured(tmp_path):
    from dataclasses import replace

    from flowalign.config import ModelConfig

    plain = _cfg(tmp_path, clip_range=1e-4)
    names = {c.name: c for c in doctor.cases.gap_cases(plain, _adapter(), 4, [torch.float32])}
    opt_in = names["fp32 + autocast bf16: same batch 4"]  # what turning the opt-in on would cost
    assert opt_in.rollout.autocast == opt_in.rescore.autocast == torch.bfloat16 and not opt_in.configured
    assert "fp32 + autocast bf16: minibatch 2 of 4" in names and names["fp32: same batch 4"].rollout.autocast is None
    on = replace(plain, model=ModelConfig(autocast="bfloat16"))
    cases = doctor.cases.gap_cases(on, _adapter(), 4, [torch.float32])
    cross = [c for c in cases if c.group == "autocast"]
    assert [c.name for c in cross] == ["rollout autocast bf16, re-score without"]
    assert cross[0].rollout.autocast == torch.bfloat16 and cross[0].rescore.autocast is None
    assert all(c.rollout.autocast == c.rescore.autocast == torch.bfloat16 for c in cases if c.group != "autocast")
    report = _run(tmp_path, on)  # the measured gap of the cross row: bf16 rounding in one pass only
    gap = report.gaps[[g.case.name for g in report.gaps].index("rollout autocast bf16, re-score without")]
    assert gap.max_ratio_error > 1e-5 and report.gaps[0].max_gap == 0  # both passes under autocast: on-policy


def test_a_reference_that_is_not_the_base_fails(tmp_path):
    cfg = _cfg(tmp_path)
    adapter = _adapter()
    probe = checks.make_probe(adapter, cfg, ["a red circle"])
    params = add_policy_lora(cfg, adapter)
    assert checks.check_reference(adapter, params, probe).status == "ok"
    with torch.no_grad():
        for p in params:
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(3)))
    for module in lora._lora_modules(adapter):  # planted: the LoRA fused into the base weights
        module.merge()
    check = checks.check_reference(adapter, params, probe)
    assert check.status == "fail" and "not the base" in check.message


def test_a_nondeterministic_reward_fails_and_a_deterministic_one_passes():
    images = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    prompts = ["a"] * 4
    assert checks.check_reward(NoisyReward(), images, prompts).status == "fail"
    ok = checks.check_reward(MeanPixel(), images, prompts)
    assert ok.status == "ok" and ok.data["max_abs_diff"] == 0 and ok.data["images_per_s"] > 0


def test_kl_scaling_warns_on_flow_grpo_beta_under_the_exact_scaling(tmp_path):
    cfg = _cfg(tmp_path, grpo={"beta": 0.04, "kl_scaling": "exact"})
    adapter = _adapter()
    traj = onpolicy.roll_out(adapter, ["a"] * 4, cfg, settings.PassSetting(torch.float32, 4), seed=0)
    check = checks.check_kl_scaling(adapter, cfg, traj)
    assert check.status == "warn" and "kl_scaling=reference" in check.fix
    for row in check.data["steps"]:  # KL of a unit shift per element: 1 / (2 s^2), x Delta under the reference
        assert math.isclose(row["kl_per_unit_shift_exact"], 1 / (2 * row["std"] ** 2), rel_tol=1e-9)
        k = row["step"]
        delta = float(traj.sigmas[k] - traj.sigmas[k + 1])
        assert math.isclose(row["reference_factor"], delta, rel_tol=1e-5)


def test_grid_matches_the_pipeline_and_a_planted_shift_is_caught(tmp_path):
    cfg = _cfg(tmp_path)
    adapter = _adapter()
    assert checks.check_grid(adapter, cfg, "a red circle").status == "ok"
    by_design = _cfg(tmp_path, grid="shifted_linear", grid_shift=3.0)
    assert checks.check_grid(adapter, by_design, "a red circle").status == "info"
    adapter._grid_sigmas = lambda n: [1.0 - 0.9 * i / n for i in range(n)]  # planted: not the scheduler's grid
    check = checks.check_grid(adapter, cfg, "a red circle")
    assert check.status == "warn" and check.data["max_abs_sigma_diff"] > 0


def test_denoiser_precision_restores_the_exact_weights_and_hooks():
    adapter = _adapter()
    params = lora.add_lora(adapter, rank=2)
    before = {n: p.detach().clone() for n, p in adapter.denoiser.named_parameters()}
    with settings.denoiser_precision(adapter, torch.bfloat16):
        assert settings.denoiser_dtype(adapter) == torch.bfloat16
        assert all(p.dtype == torch.float32 for p in params)  # LoRA stays float32, as set_precision lays it out
        assert len(adapter.denoiser._flowalign_cast_hooks) == 2
    assert settings.denoiser_dtype(adapter) == torch.float32 and adapter.denoiser._flowalign_cast_hooks == ()
    for n, p in adapter.denoiser.named_parameters():
        assert torch.equal(p, before[n])


def test_cli_doctor_prints_verdicts_and_exits_nonzero_on_a_failure(tmp_path, tiny_pipe_dir, capsys):
    from flowalign.cli import main

    yaml_path = tmp_path / "c.yaml"
    yaml_path.write_text(f"model:\n  path: {tiny_pipe_dir}\nsampling:\n  num_steps: 3\n  sde_window: [0, 2]\n"
                         "train:\n  reward: jpeg_compressibility\n  prompts_per_iter: 2\n  group_size: 2\n")
    rc = main(["doctor", str(yaml_path), "train.minibatch=2", "--out", str(tmp_path / "d"), "--dtypes", "fp32"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "on_policy:" in out and "verdict:" in out and (tmp_path / "d" / "doctor.md").exists()
    rc = main(["doctor", str(yaml_path), "--dtypes", "fp64"])
    assert rc == 2 and "--dtypes" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["toy_grpo.yaml", "toy_nft.yaml", "toy_crd.yaml", "toy_demo.yaml",
                                  "toy_backprop.yaml", "toy_opd.yaml", "toy_grpo_ocr.yaml"])
def test_every_shipped_recipe_gets_a_verdict(tmp_path, tiny_pipe_dir, name):
    import os

    from flowalign.config import load_config

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cfg = load_config(os.path.join(root, "configs", name), [
        f"model.path={tiny_pipe_dir}", "sampling.num_steps=3", "train.prompts_per_iter=2", "train.group_size=2",
        "sampling.sde_window=null", "opd.train_window=null", "opd.teachers.spatial.lora=unused",
        "opd.teachers.attributes.lora=unused"] if name == "toy_opd.yaml" else [
        f"model.path={tiny_pipe_dir}", "sampling.num_steps=3", "train.prompts_per_iter=2", "train.group_size=2",
        "sampling.sde_window=null", "backprop.grad_steps=2"])
    report = doctor.run(cfg, reward=None if name == "toy_grpo_ocr.yaml" else MeanPixel(), out=str(tmp_path),
                        dtypes="fp32", progress=False, echo=False)
    names = {c.name for c in report.checks}
    assert {"on_policy", "reference", "gradients", "kl_scaling", "reward", "grid"} <= names
    conf = next(r for r in report.gaps if r.case.configured)
    if cfg.sampling.sampler in ("flow_ode", "flow_dpm2"):  # no ratio: the mean gap alone
        assert math.isnan(conf.max_gap) and conf.max_mean_gap == 0
    else:
        assert conf.max_gap == 0
    assert report.check("on_policy").status in ("ok", "info") and report.verdict != "fail"
