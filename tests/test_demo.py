"""`flowalign demo --quick` end to end on the shipped pipeline: the report folder and its numbers."""

import json
import os

import pytest
from PIL import Image

from flowalign.cli import main
from flowalign.config import DEFAULT_MODEL


@pytest.mark.skipif(not os.path.isdir(DEFAULT_MODEL), reason=f"shipped pipeline missing at {DEFAULT_MODEL}")
def test_quick_demo_writes_the_report(tmp_path):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out), "--seed", "1"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    for side in ("base", "aligned"):
        assert 0.0 <= metrics[side]["toy_geneval"] <= 1.0
        assert set(metrics[side]["per_task"]) == {"single_object", "colors", "counting", "two_object",
                                                  "color_attr", "position"}
        assert metrics[side]["n"] == metrics["heldout_images"] == 12
        assert 0.0 <= metrics[side]["extra_objects"] <= 1.0
        checks = metrics[side]["checks"]  # where the scores are lost; one check per single-object image
        # "relation, objects drawn" only when some image drew both objects
        assert {"colour+shape", "relation"} <= set(checks["position"]) <= {"colour+shape", "relation",
                                                                          "relation, objects drawn"}
        assert set(checks["counting"]) >= {"count"}
        assert checks["single_object"]["shape"] == pytest.approx(metrics[side]["per_task"]["single_object"]["fraction"])
        assert all(0.0 <= v <= 1.0 for kinds in checks.values() for v in kinds.values())
    assert metrics["samples"] == metrics["iterations"] * 8
    assert metrics["delta"] == pytest.approx(metrics["aligned"]["toy_geneval"] - metrics["base"]["toy_geneval"])
    assert metrics["wall_s"] > 0
    for png in ("reward_curve.png", "grid.png"):
        with Image.open(out / png) as im:
            assert im.width > 200 and im.height > 100
    report = (out / "report.md").read_text()
    assert "reward_curve.png" in report and "grid.png" in report
    # the training reward, with its options: the demo trains on the exact check
    assert "on the reward `toy_geneval` with strict=True, no_extra=True" in report
    for side in ("base", "aligned"):  # the headline: exact, lenient, strict, extras and the unseen CLIP score
        h = metrics[side]["headline"]
        assert list(h) == ["exact", "lenient", "strict", "extra objects", "clip_score (not trained)"]
        assert h["exact"]["mean"] == metrics[side]["exact"] <= metrics[side]["strict"]
        assert h["lenient"]["mean"] == metrics[side]["toy_geneval"] and h["exact"]["se"] >= 0.0
    counts = metrics["grid_counts"]  # the verdict grid's classes cover every held-out image
    assert sum(counts.values()) == 12 and counts["fixed"] - counts["broken"] == round(metrics["delta_exact"] * 12)
    assert metrics["delta_exact"] == pytest.approx(metrics["aligned"]["exact"] - metrics["base"]["exact"])
    assert f"| exact | {metrics['base']['exact']:.3f} +- {metrics['base']['headline']['exact']['se']:.3f} |" in report
    assert f"{metrics['base']['toy_geneval']:.3f} -> {metrics['aligned']['toy_geneval']:.3f}" in report
    assert f"{metrics['base']['extra_objects']:.3f} -> {metrics['aligned']['extra_objects']:.3f}" in report
    assert (f"| position | relation | {metrics['base']['checks']['position']['relation']:.3f} | "
            f"{metrics['aligned']['checks']['position']['relation']:.3f} |") in report
    assert "## Drift from the base model" in report and "| bright_fraction |" in report  # hacking diagnostics
    assert set(metrics["drift"]) == {"flag", "flagged", "summary", "z"} and "bright_fraction" in metrics["drift"]["z"]
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == metrics["iterations"]
    assert all("stat/bright_fraction" in json.loads(line) for line in lines)
    assert os.path.isfile(out / "lora" / "pytorch_lora_weights.safetensors")
    sweep = metrics["rlg_sweep"]  # --quick samples every scale, the endpoints too: they must be the run's own scores
    assert [r["scale"] for r in sweep] == [0.0, 0.5, 1.0, 1.5, 2.0]
    for w, side in ((0.0, "base"), (1.0, "aligned")):
        row = next(r for r in sweep if r["scale"] == w)
        assert row["exact"]["mean"] == metrics[side]["exact"] and row["lenient"]["mean"] == metrics[side]["toy_geneval"]
        assert row["extra objects"]["mean"] == metrics[side]["extra_objects"]
    assert "## RL guidance" in report and "rlg_sweep.png" in report
    assert f"| 2 | {sweep[-1]['exact']['mean']:.3f} +- {sweep[-1]['exact']['se']:.3f} |" in report
    with Image.open(out / "rlg_sweep.png") as im:
        assert im.width > 200 and im.height > 100


def test_demo_with_a_missing_model_fails_in_one_line(tmp_path, capsys):
    assert main(["demo", "--quick", "--out", str(tmp_path / "d"), "--model", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("flowalign: error:") and "nope" in err[0]


def test_report_names_the_training_reward_and_its_options():
    from flowalign.apps.demo import training_reward

    assert training_reward({"reward": "toy_geneval", "reward_options": {}}) == "`toy_geneval`"
    assert training_reward({"reward": "toy_geneval", "reward_options": {"partial": True}}) == (
        "`toy_geneval` with partial=True (held-out scores use the exact checks)")


def test_report_lists_a_check_kind_that_only_one_side_has(tmp_path):
    from flowalign.apps.demo import _write_report

    def side(score, checks):
        return {"toy_geneval": score, "strict": score / 2, "extra_objects": 0.1, "n": 2, "checks": checks,
                "per_task": {"position": {"fraction": score, "strict": score / 2, "extra_objects": 0.1, "n": 2}}}

    r = {"base": side(0.25, {"position": {"colour+shape": 0.25, "relation": 0.0}}),
         "aligned": side(0.75, {"position": {"colour+shape": 0.75, "relation": 0.5, "relation, objects drawn": 1.0}}),
         "base_by_guidance_scale": {}, "config": {"train": {"reward": "toy_geneval", "reward_options": None}},
         "iterations": 1, "samples": 8, "wall_s": 1.0, "seed": 0, "heldout_images": 2, "eval_guidance_scale": 1.0,
         "delta_vs_best_base": 0.5}
    _write_report(str(tmp_path), r, "CRD")
    report = (tmp_path / "report.md").read_text()
    assert "| position | relation | 0.000 | 0.500 |" in report
    # the base's CFG sweep: lenient and exact at each scale, and the aligned model against the best of each
    r.update(base_by_guidance_scale={"1": 0.25, "2": 0.5}, base_exact_by_guidance_scale={"1": 0.125, "2": 0.25},
             delta_exact_vs_best_base=0.125, delta_vs_best_base=0.25)
    _write_report(str(tmp_path), r, "CRD")
    report = (tmp_path / "report.md").read_text()
    assert ("0.250 at CFG 1 (exact 0.125), 0.500 at CFG 2 (exact 0.250); the aligned model is +0.250 over the "
            "base's best lenient score at any of them, and +0.125 over its best exact score") in report
    assert "| position | relation, objects drawn | n/a | 1.000 |" in report  # no base image drew both objects


def test_every_update_rule_has_a_title_and_demo_runs_a_non_toy_reward_recipe(tmp_path):
    # the report names the method by its rule's title (a table lookup used to miss reward backprop)
    from flowalign.algorithms.base import UpdateRule
    from flowalign.algorithms import ALGORITHMS

    assert all(rule.title != UpdateRule.title for rule in ALGORITHMS.values())
    out = tmp_path / "bp"
    from flowalign.resources import shipped_config

    assert main(["demo", "--quick", "--out", str(out), "--config", shipped_config("toy_backprop.yaml")]) == 0
    assert "Reward backprop" in (out / "report.md").read_text()


def test_demo_of_a_text_recipe_reports_its_ocr_score(tmp_path):
    # the toy text prompts are scored by OCR, not toy GenEval: the report names that score (it raised KeyError)
    pytest.importorskip("rapidocr")
    out = tmp_path / "ocr"
    assert main(["demo", "--quick", "--steps", "1", "--out", str(out), "--config", "toy_grpo_ocr.yaml"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["headline"] == "ocr" and set(metrics["base"]["per_task"]) == {"text"}
    assert metrics["delta"] == pytest.approx(metrics["aligned"]["ocr"] - metrics["base"]["ocr"])
    report = (out / "report.md").read_text()
    assert f"Held-out ocr, {metrics['heldout_images']} held-out images" in report
    assert f"{metrics['base']['ocr']:.3f} -> {metrics['aligned']['ocr']:.3f}" in report
    assert (out / "grid.png").is_file() and (out / "ckpt-1" / "state.json").is_file()  # a run like train's


def test_demo_refuses_a_distill_recipe_in_one_line(tmp_path, capsys):
    assert main(["demo", "--quick", "--out", str(tmp_path / "d"), "--config", "toy_fdistill.yaml"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "flowalign distill toy_fdistill.yaml" in err[0]


def test_demo_overrides_reach_the_recipe_and_the_demo_settings_win(tmp_path):
    from flowalign.apps.demo import demo_config

    cfg = demo_config(str(tmp_path / "d"), seed=3, steps=7, config="toy_nft.yaml",
                      overrides=["train.reward_options={strict: true, no_extra: true}", "train.eval_per_task=96",
                                 "train.iterations=99", "train.seed=5"])
    assert cfg.train.algorithm == "nft" and cfg.train.eval_per_task == 96
    assert cfg.train.reward_options == {"strict": True, "no_extra": True}
    # --steps, --seed and --out are the demo's own flags: they win over an override of the same key
    assert (cfg.train.iterations, cfg.train.seed, cfg.train.out_dir) == (7, 3, str(tmp_path / "d"))
    with pytest.raises(ValueError, match="section.key=value"):
        demo_config(str(tmp_path / "d"), overrides=["lr=1"])
