"""Reward-hacking statistics as the trainer measures them: the toy reward's own diagnostics on rendered scenes,
the meter's values and base fit, and the drift section of a held-out comparison."""

import numpy as np
import pytest
import torch

from flowalign.config import DiagnosticsConfig
from flowalign.evaluation.hacking import HackingMeter, drift_markdown, progress_note
from flowalign.rewards import get as get_reward
from flowalign.toy import render


def _images(prompts):
    return torch.stack([torch.from_numpy(np.array(render(p, 64, seed=i)[0])).permute(2, 0, 1).float() / 255
                        for i, p in enumerate(prompts)])


def test_toy_diagnostics_count_extra_objects_and_check_rates():
    reward = get_reward("toy_geneval")
    prompts = ["a red circle", "a red circle"]
    images = _images(["a red circle", "two red circles"])  # the second draws one circle too many
    d = reward.diagnostics(images, prompts)
    assert d["extra_objects"].tolist() == [0.0, 1.0]
    assert d["check/colour+shape"].tolist() == [1.0, 1.0]  # GenEval's checks pass either way
    assert torch.isnan(d["check/count"]).all()  # "a red circle" makes no count check
    assert reward.diagnostic_directions["extra_objects"] == 1
    assert get_reward("toy_geneval").diagnostics(images, ["not a toy prompt at all!", "x"]) == {}


def test_meter_values_fit_on_the_first_batch_then_report():
    meter = HackingMeter(DiagnosticsConfig(features="none", window=1, significance=0.0),
                         get_reward("toy_geneval").diagnostic_directions)
    prompts = ["a red circle"] * 2 + ["a blue square"] * 2
    images = _images(prompts)
    values = meter.values(images, prompts, get_reward("toy_geneval"))
    assert {"dark_fraction", "bright_fraction", "colour_entropy", "saturation", "edge_density",
            "jpeg_bytes_per_pixel", "extra_objects", "check/colour+shape"} <= set(values)
    assert "diversity" not in values  # features: none
    first = meter.observe(values, reward_mean=0.5, units=2)
    assert first["drift"] == 0 and "drift_z/saturation" not in first and meter.monitor.base_units == 2
    again = meter.observe(values, reward_mean=0.9, units=2)
    assert again["drift"] == 0 and again["drift_z/saturation"] == 0.0
    dark = meter.values(images * 0.05, prompts)  # every pixel dark
    report = meter.observe(dark, reward_mean=0.9, units=2)
    assert report["drift"] == 1 and "dark_fraction" in report["drift_stats"].split(",")
    assert progress_note(report) == {"drift": report["drift_stats"]} and progress_note(again) == {}
    both = HackingMeter.concat([values, dark])
    assert both["dark_fraction"].shape == (8,)


def test_diversity_uses_the_tiny_clip():
    meter = HackingMeter(DiagnosticsConfig(features="tiny_clip"))
    prompts = ["a red circle"] * 3
    same = _images(["a red circle"] * 3)
    same[1:] = same[0]  # three identical images: no diversity
    assert meter.values(same, prompts)["diversity"].tolist() == pytest.approx([0.0], abs=1e-6)
    mixed = _images(["a red circle", "a blue square", "a green triangle"])
    assert float(meter.values(mixed, prompts)["diversity"][0]) > 0.01


def test_drift_markdown_of_a_flagged_evaluation():
    meter = HackingMeter(DiagnosticsConfig(features="none"))
    prompts = ["a red circle"] * 8
    base = meter.values(_images(prompts), prompts)
    dark = meter.values(_images(prompts) * 0.05, prompts)
    report = meter.compare(base, dark, reward_rose=True)
    row = {**HackingMeter.means(dark), **report.metrics(), "drift_summary": report.summary()}
    text = drift_markdown(HackingMeter.means(base), row)
    assert "**Drift flagged**" in text and "| dark_fraction | 0.000 | 1.000 |" in text and "**yes**" in text
    assert drift_markdown({}, {}) == ""


def test_the_diagnostics_leave_the_training_trajectory_unchanged(tmp_path, tiny_pipe_dir):
    """Base batches use their own seed and loading the feature CLIP forks the global RNG: same weights either way."""
    from flowalign.config import load_config
    from flowalign.evaluation import hacking
    from flowalign.trainer import Trainer

    weights = []
    for drift in (True, False):
        hacking._EMBEDDERS.clear()  # the CLIP is loaded (and would draw random numbers) inside this run
        cfg = load_config("configs/toy_grpo.yaml", [
            f"model.path={tiny_pipe_dir}", f"train.out_dir={tmp_path / str(drift)}", "sampling.num_steps=3",
            "sampling.sde_window=[0,2]", "train.prompts_per_iter=2", "train.group_size=2", "train.lr=0.05",
            f"diagnostics.drift={str(drift).lower()}"])
        torch.manual_seed(0)
        trainer = Trainer(cfg, reward=get_reward("jpeg_compressibility"))
        trainer.train(2, progress=False)
        weights.append([p.detach().clone() for p in trainer.params])
    assert all(torch.equal(a, b) for a, b in zip(*weights))
