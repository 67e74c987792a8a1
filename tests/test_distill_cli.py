"""`flowalign distill CONFIG [section.key=value ...]` end to end on a tiny pipeline: its files, and a student
LoRA that diffusers loads."""

import json
import os

from flowalign.cli import main
from flowalign.models import load_pipeline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_distill_cli_writes_metrics_lora_and_samples(tmp_path, tiny_model, capsys):
    model, _ = tiny_model
    out = tmp_path / "distill"
    rc = main(["distill", os.path.join(ROOT, "configs", "toy_fdistill.yaml"), f"model.path={model}",
               f"train.out_dir={out}", "train.iterations=2", "train.prompts_per_iter=1", "train.group_size=2",
               "distill.real_samples=2", "distill.teacher_steps=1", "distill.student_steps=1",
               "distill.generator_every=1", "distill.disc_channels=8"])
    assert rc == 0, capsys.readouterr().err
    assert "f-distill (js, 1-step student): 2 iterations, 2 student steps" in capsys.readouterr().out
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2
    assert (out / "samples.png").is_file() and (out / "config.yaml").is_file()
    pipe = load_pipeline(model)
    pipe.load_lora_weights(str(out / "lora"))  # the student is a diffusers-format LoRA


def test_distill_cli_bad_divergence_is_one_line(tmp_path, capsys):
    rc = main(["distill", os.path.join(ROOT, "configs", "toy_fdistill.yaml"), "distill.divergence=tv"])
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "distill.divergence" in err[0]
