"""scripts/sweep_recipes.py: a runs file becomes parallel `flowalign train` processes; their held-out curves
become sweep.json, a Markdown table and sweep.png."""

import importlib.util
import json
import os

import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("sweep_recipes", os.path.join(ROOT, "scripts", "sweep_recipes.py"))
sweep = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sweep)

SMALL = ("sampling.num_steps=2 sampling.eval_num_steps=2 train.iterations=2 train.prompts_per_iter=1 "
         "train.group_size=2 train.minibatch=4 crd.num_timesteps=1 crd.steps_per_iter=1 nft.num_timesteps=1 "
         "train.eval_per_task=1 train.eval_every=1")


def test_runs_file_lines_comments_and_quoted_overrides(tmp_path):
    path = tmp_path / "runs.txt"
    path.write_text("# header\n\na | configs/toy_crd.yaml | train.lr=0.002 'train.reward_options={no_extra: true}'\n"
                    "b|configs/toy_nft.yaml   # no overrides\n")
    assert sweep.parse_runs(str(path)) == [
        ("a", "configs/toy_crd.yaml", ["train.lr=0.002", "train.reward_options={no_extra: true}"]),
        ("b", "configs/toy_nft.yaml", [])]


@pytest.mark.parametrize("text,needle", [("a configs/toy_crd.yaml\n", "runs.txt:1: expected"),
                                         ("a | x.yaml\na | y.yaml\n", "runs.txt:2: run names must be unique"),
                                         ("# only a comment\n", "lists no runs")])
def test_bad_runs_file_is_one_line(tmp_path, capsys, text, needle):
    path = tmp_path / "runs.txt"
    path.write_text(text)
    assert sweep.main([str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1


def _write_evals(folder, scores):
    os.makedirs(folder)
    with open(os.path.join(folder, "evals.jsonl"), "w") as f:
        for i, s in enumerate(scores):
            f.write(json.dumps({"iteration": 50 * i, "toy_geneval": s, "toy_geneval_strict": s - 0.2,
                                "toy_extra_objects": 0.1 * i}) + "\n")


def test_summary_table_and_plot(tmp_path, capsys):
    _write_evals(tmp_path / "crd", [0.6, 0.75, 0.7])
    _write_evals(tmp_path / "nft", [0.6, 0.65, 0.8])
    os.makedirs(tmp_path / "crashed")  # a run that wrote no evaluations is left out
    assert sweep.main(["--summarise", str(tmp_path), "--target-gain", "0.15"]) == 0
    curves = json.loads((tmp_path / "sweep.json").read_text())
    assert set(curves) == {"crd", "nft"} and [r["iteration"] for r in curves["nft"]] == [0, 50, 100]
    out = capsys.readouterr().out
    assert "| crd | 0.600 | 0.750 (50) | 0.700 (100) | 0.200 |" in out
    assert "| nft | 0.600 | 0.800 (100) | 0.800 (100) | 0.200 |" in out
    with Image.open(tmp_path / "sweep.png") as im:
        assert im.width > 600


def test_summarise_without_runs_says_how(tmp_path, capsys):
    assert sweep.main(["--summarise", str(tmp_path)]) == 2
    assert "train.eval_every" in capsys.readouterr().err


def test_two_real_runs_in_parallel(tmp_path, tiny_pipe16, capsys):
    runs = tmp_path / "runs.txt"
    runs.write_text(f"crd | {ROOT}/configs/toy_crd.yaml | model.path={tiny_pipe16} {SMALL}\n"
                    f"nft | {ROOT}/configs/toy_nft.yaml | model.path={tiny_pipe16} {SMALL}\n")
    out = tmp_path / "out"
    assert sweep.main([str(runs), "--out", str(out), "--parallel", "2"]) == 0
    curves = json.loads((out / "sweep.json").read_text())
    assert {k: [r["iteration"] for r in v] for k, v in curves.items()} == {"crd": [0, 1, 2], "nft": [0, 1, 2]}
    assert all(0 <= r["toy_geneval"] <= 1 for v in curves.values() for r in v)
    assert (out / "crd" / "lora" / "pytorch_lora_weights.safetensors").is_file() and (out / "nft.log").is_file()


def test_a_run_past_its_time_limit_is_stopped(tmp_path, tiny_pipe16):
    out = tmp_path / "out"
    os.makedirs(out)
    code = sweep.run_one("slow", os.path.join(ROOT, "configs", "toy_crd.yaml"), [f"model.path={tiny_pipe16}"],
                         str(out), threads=1, limit=0.2)
    assert code == -9 and (out / "slow.log").is_file()
