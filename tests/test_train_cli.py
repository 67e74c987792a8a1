"""`flowalign train CONFIG.yaml [section.key=value ...]`: every shipped config parses; a toy config runs end to
end on a tiny pipeline saved into tmp_path; bad input gives one clear line."""

import glob
import json
import math
import os
import re

import pytest
import torch
from PIL import Image

from flowalign import lora
from flowalign.algorithms import ALGORITHMS
from flowalign.cli import main
from flowalign.config import load_config, parse_overrides, with_overrides
from flowalign.models import adapter_for
from flowalign.toy.pipelines import tiny_sd3_pipeline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "*.yaml")))
SMALL = ["sampling.num_steps=2", "sampling.sde_window=null", "train.iterations=1", "train.prompts_per_iter=1",
         "train.group_size=2", "train.minibatch=4", "nft.num_timesteps=1", "crd.num_timesteps=1",
         "crd.steps_per_iter=1", "opd.train_window=null", "train.eval_per_task=1"]


def cfg_is_distill(path: str) -> bool:
    """Configs with a distill section run with `flowalign distill` (f-distill), the others with `flowalign train`."""
    import yaml

    with open(path) as f:
        return "distill" in (yaml.safe_load(f) or {})


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_every_config_parses_and_names_its_command(path):
    with open(path) as f:
        first = f.readline()
    command = "distill" if cfg_is_distill(path) else "train"
    assert first.startswith(f"# flowalign {command} configs/{os.path.basename(path)}"), first
    cfg = load_config(path)
    assert cfg.train.algorithm in ALGORITHMS


def test_paper_recipes_name_what_they_reproduce():
    # every recipe for a real model says which reference it reproduces (repository, file, commit) or follows, and
    # a "Reproduces:" recipe says what still differs (docs/parity.md)
    for path in CONFIGS:
        name = os.path.basename(path)
        if name.startswith("toy_") or cfg_is_distill(path):
            continue
        header = " ".join(line[1:].strip() for line in open(path) if line.startswith("#"))
        assert "Reproduces:" in header or "Follows:" in header, name
        if "Reproduces:" in header:
            assert re.search(r"[\w-]+/[\w-]+, \S+", header) and re.search(r"commit [0-9a-f]{8,}", header), name
            assert "Still differs:" in header or "deviation" in header, name


def test_expected_configs_exist():
    names = {os.path.basename(p) for p in CONFIGS}
    assert {"toy_grpo.yaml", "toy_nft.yaml", "toy_crd.yaml", "toy_opd.yaml", "sd35m_ocr_grpo.yaml",
            "sd35m_geneval_grpo.yaml", "sd35m_pickscore_grpo.yaml", "sd35m_crd_ocr.yaml",
            "sd35m_opd_three_teachers.yaml", "flux_dancegrpo_hps.yaml", "sd15_ddpo.yaml", "wan21_1_3b_grpo.yaml"} <= names
    pick = load_config(os.path.join(ROOT, "configs", "sd35m_pickscore_grpo.yaml"))
    assert pick.grpo.beta == 0.01 and pick.train.group_size == 24 and pick.grpo.clip_range == 1e-4
    assert load_config(os.path.join(ROOT, "configs", "sd15_ddpo.yaml")).sampling.sampler == "ddim"


def test_overrides_are_yaml_and_reach_mapping_fields():
    o = parse_overrides(["train.lr=1e-4", "sampling.sde_window=[0, 2]", "train.ema_decay=0", "opd.teachers.a.lora=x"])
    assert o == {"train.lr": "1e-4", "sampling.sde_window": [0, 2], "train.ema_decay": 0, "opd.teachers.a.lora": "x"}
    toy = load_config(os.path.join(ROOT, "configs", "toy_grpo.yaml"), ["train.lr=1e-4", "sampling.sde_window=[0, 2]"])
    assert toy.train.lr == 1e-4 and toy.sampling.sde_window == (0, 2)  # YAML 1.1 reads 1e-4 as a string
    cfg = load_config(os.path.join(ROOT, "configs", "toy_opd.yaml"), ["opd.teachers.spatial.lora=/tmp/t"])
    assert cfg.opd.teachers["spatial"]["lora"] == "/tmp/t" and cfg.opd.teachers["spatial"]["guidance_scale"] == 1.0
    with pytest.raises(ValueError, match="must look like section.key=value"):
        parse_overrides(["train.lr"])
    with pytest.raises(ValueError, match="unknown key opd.teachers.spatial.cfg; valid keys: lora, guidance_scale"):
        with_overrides(cfg, {"opd.teachers.spatial.cfg": 2})


@pytest.mark.parametrize(
    "text,args,needle",
    [
        ("train: {lrr: 0.1}\n", [], "unknown key train.lrr; valid keys: "),
        ("train: {lr: fast}\n", [], "train.lr='fast' must be a number"),
        ("train: {algorithm: ppo}\n", [], "train.algorithm='ppo' is not valid; choose one of grpo, nft, crd, opd"),
        ("train: {lr: 0.1\n", [], "invalid YAML at line"),
        ("crd: {centering: prompt}\n", [], "crd.centering='prompt' is not valid; choose one of group, batch"),
        ("train: {}\n", ["train.group_size=many"], "train.group_size='many' must be an integer"),
        ("train: {}\n", ["trian.lr=1"], "unknown config section 'trian'"),
        ("train: {algorithm: opd}\n", [], "train.algorithm=opd needs opd.teachers"),
        ("model: {attention: sage}\n", [], "model.attention='sage' is not valid; choose one of default, math"),
    ],
)
def test_bad_config_is_one_clear_line(tmp_path, capsys, text, args, needle):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    assert main(["train", str(path), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("flowalign: error: ") and needle in err, err


@pytest.mark.parametrize("name,metric", [("toy_dpo.yaml", "pairs"), ("toy_rwr.yaml", "update_samples"),
                                         ("toy_grpo_calibrated.yaml", "calibration_base_queries"),
                                         ("toy_adv_grpo.yaml", "head_updates")])
def test_seed_method_recipes_train_two_iterations_on_the_shipped_pipeline(tmp_path, name, metric, capsys):
    # SPEC section 11's methods end to end through the CLI on the default (shipped) model, shrunk to 2 iterations
    out = tmp_path / "run"
    small = [a for a in SMALL if not a.startswith("train.iterations")]
    rc = main(["train", os.path.join(ROOT, "configs", name), f"train.out_dir={out}", *small, "train.iterations=2",
               "train.group_size=4", "calibration.base_samples=2", "dpo.timesteps_per_pair=1", "rwr.num_timesteps=1"])
    assert rc == 0, capsys.readouterr().err
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [1, 2] and all(math.isfinite(r["reward_mean"]) for r in rows)
    assert all(metric in r for r in rows), rows  # the method's own bookkeeping ran each iteration
    assert (out / "lora" / "pytorch_lora_weights.safetensors").is_file()


def test_missing_config_file(capsys):
    assert main(["train", "no/such.yaml"]) == 2
    assert "config file 'no/such.yaml' not found" in capsys.readouterr().err


def _check_outputs(out):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [1]
    assert (out / "lora" / "pytorch_lora_weights.safetensors").is_file()
    assert load_config(str(out / "config.yaml")).train.out_dir == str(out)
    with Image.open(out / "reward_curve.png") as im:
        assert im.width > 200
    return rows[0]


@pytest.mark.parametrize("name,extra", [("toy_grpo.yaml", []), ("toy_crd.yaml", []),
                                        ("toy_grpo.yaml", ["grpo.beta=0.04", "grpo.kl_divergence=js"])])
def test_toy_config_runs_end_to_end(tmp_path, tiny_pipe16, name, extra, capsys):
    out = tmp_path / "run"
    (out).mkdir()
    (out / "metrics.jsonl").write_text('{"stale": 1}\n')  # a fresh run owns its log
    rc = main(["train", os.path.join(ROOT, "configs", name), f"model.path={tiny_pipe16}", f"train.out_dir={out}",
               *SMALL, *extra])
    assert rc == 0, capsys.readouterr().err
    row = _check_outputs(out)
    assert 0.0 <= row["reward_mean"] <= 1.0 and row["samples"] == 2
    printed = capsys.readouterr().out
    assert "wrote" in printed and "held-out toy_geneval: base " in printed
    evals = [json.loads(line) for line in (out / "evals.jsonl").read_text().splitlines()]
    assert [(e["iteration"], e["weights"]) for e in evals] == [(0, "base"), (1, "lora")]
    assert all(e["n"] == 6 and 0 <= e["toy_geneval"] <= 1 and "toy_geneval/position" in e for e in evals)
    with Image.open(out / "eval_grid.png") as im:
        assert im.width > 6 * 16


def test_eval_per_task_zero_switches_the_held_out_evaluation_off(tmp_path, tiny_pipe16, capsys, monkeypatch):
    from flowalign.evaluation import heldout

    def no_sampling(*args, **kwargs):
        raise AssertionError("a held-out image was sampled with train.eval_per_task=0")

    monkeypatch.setattr(heldout, "sample_images", no_sampling)
    out = tmp_path / "run"
    rc = main(["train", os.path.join(ROOT, "configs", "toy_grpo.yaml"), f"model.path={tiny_pipe16}",
               f"train.out_dir={out}", *SMALL, "train.eval_per_task=0", "train.eval_every=1", "train.iterations=2"])
    assert rc == 0, capsys.readouterr().err
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2  # trained, with no evaluation at all
    assert not (out / "evals.jsonl").exists() and not (out / "eval_grid.png").exists()
    assert os.path.isfile(out / "lora" / "pytorch_lora_weights.safetensors")


def test_work_done_once_leaves_the_trained_lora_bit_identical(tmp_path, tiny_pipe16, capsys, monkeypatch):
    """The CFG embeddings concatenated once per batch (Conditioning.cfg_pair) and the sampling grid built once
    (FlowAdapter.sampling_grid) only remove repeated work: two GRPO iterations with both undone (a fresh
    concatenation and a fresh scheduler copy at every call) give the same LoRA bit for bit."""
    from safetensors.torch import load_file

    from flowalign.models import base

    def run(name):
        out = tmp_path / name
        args = ["train", os.path.join(ROOT, "configs", "toy_grpo.yaml"), f"model.path={tiny_pipe16}",
                f"train.out_dir={out}", *SMALL, "train.iterations=2", "train.eval_per_task=0",
                "train.reward=jpeg_compressibility"]  # differs between any two images: every row trains
        assert main(args) == 0, capsys.readouterr().err
        return load_file(str(out / "lora" / "pytorch_lora_weights.safetensors"))

    once = run("once")
    monkeypatch.setattr(base.Conditioning, "cfg_pair",
                        lambda self: {k: torch.cat([self.uncond[k], self.cond[k]]) for k in self.cond})
    grid = base.FlowAdapter._build_grid
    monkeypatch.setattr(base.FlowAdapter, "sampling_grid", lambda self, n, x: grid(
        self, n, x, self._shift_mu(x), self._grid_sigmas(n)))
    every_call = run("every_call")
    assert once.keys() == every_call.keys() and all(torch.equal(once[k], every_call[k]) for k in once)
    assert any(v.abs().max() > 0 for k, v in once.items() if "lora_B" in k)  # trained: B left zero


def test_an_attention_kernel_the_device_lacks_fails_at_start_up(tmp_path, tiny_pipe16, capsys):
    # cuDNN attention is CUDA-only: on a CPU it is refused in one line that names what the device has
    if torch.cuda.is_available():
        pytest.skip("the CPU case")
    rc = main(["train", os.path.join(ROOT, "configs", "toy_grpo.yaml"), f"model.path={tiny_pipe16}",
               f"train.out_dir={tmp_path / 'run'}", *SMALL, "model.attention=cudnn"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "model.attention=cudnn has no kernel on cpu" in err, err
    assert "choose one of default, math" in err


def test_model_compile_compiles_each_denoiser_in_place(tmp_path, tiny_pipe16, capsys, monkeypatch):
    compiled = []  # nn.Module.compile recorded, not run: compiling costs minutes on a CPU (docs/results.md times it)
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, *a, **k: compiled.append(type(self).__name__))
    rc = main(["train", os.path.join(ROOT, "configs", "toy_grpo.yaml"), f"model.path={tiny_pipe16}",
               f"train.out_dir={tmp_path / 'run'}", *SMALL, "model.compile=true", "model.autocast=bfloat16"])
    assert rc == 0, capsys.readouterr().err
    assert compiled == ["SD3Transformer2DModel"]


def test_toy_opd_runs_with_teacher_folders(tmp_path, tiny_pipe16, capsys):
    teachers = []
    for name in ("spatial", "attributes"):
        ad = adapter_for(tiny_sd3_pipeline(image_size=16))
        lora.add_lora(ad, rank=4)
        teachers.append(f"opd.teachers.{name}.lora={lora.save_lora(ad, str(tmp_path / name))}")
    out = tmp_path / "run"
    rc = main(["train", os.path.join(ROOT, "configs", "toy_opd.yaml"), f"model.path={tiny_pipe16}",
               f"train.out_dir={out}", *teachers, *SMALL])
    assert rc == 0, capsys.readouterr().err
    row = _check_outputs(out)
    assert row["samples"] == 4 and row["loss"] >= 0 and {"loss_spatial", "loss_attributes"} <= set(row)


def test_bfloat16_run_loads_the_pipeline_in_bf16(tmp_path, tiny_pipe16, monkeypatch, capsys):
    # model.dtype=bfloat16 loads the pipeline in bf16 (no float32 copy of FLUX's 12B transformer or T5-XXL)
    # and still runs end to end, held-out evaluation included
    import flowalign.trainer as trainer_mod

    loaded = []

    def spy(*args, **kwargs):
        adapter = real(*args, **kwargs)
        pipe = adapter.pipe
        loaded.append((kwargs.get("torch_dtype"), pipe.transformer.dtype, pipe.text_encoder_3.dtype, pipe.vae.dtype))
        return adapter

    real = trainer_mod.load_adapter
    monkeypatch.setattr(trainer_mod, "load_adapter", spy)
    out = tmp_path / "run"
    rc = main(["train", os.path.join(ROOT, "configs", "toy_crd.yaml"), f"model.path={tiny_pipe16}",
               f"train.out_dir={out}", "model.dtype=bfloat16", *SMALL])
    assert rc == 0, capsys.readouterr().err
    assert loaded == [(torch.bfloat16, torch.bfloat16, torch.bfloat16, torch.bfloat16)]
    evals = [json.loads(line) for line in (out / "evals.jsonl").read_text().splitlines()]
    assert len(evals) == 2 and all(0 <= e["toy_geneval"] <= 1 for e in evals)


def test_shipped_recipes_resolve_by_name_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for path in ("configs/toy_grpo.yaml", "toy_grpo.yaml"):
        assert load_config(path).train.algorithm == "grpo"
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "toy_grpo.yaml").write_text("train: {iterations: 3}\n")
    assert load_config("configs/toy_grpo.yaml").train.iterations == 3  # a file of that name wins
    with pytest.raises(FileNotFoundError, match="config file 'elsewhere/toy_grpo.yaml' not found"):
        load_config("elsewhere/toy_grpo.yaml")  # only the bare name or configs/NAME stand for a shipped recipe
