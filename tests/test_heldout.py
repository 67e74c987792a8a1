"""Held-out evaluation: the prompt set comes from the held-out split only, and scores are the toy world's
verifiable rewards (rendered ground truth scores ~1, images of other prompts score lower)."""

import pytest
import torch

from flowalign.evaluation.heldout import HeldoutEval, heldout_rows
from flowalign.prompts import toy_tasks
from flowalign.toy import GENEVAL_TASKS, parse_prompt, render, split_of


def test_toy_specs_expand_to_tasks():
    assert toy_tasks("toy") == tuple(GENEVAL_TASKS)
    assert toy_tasks("toy:geneval,text") == tuple(GENEVAL_TASKS) + ("text",)
    assert toy_tasks("prompts.txt") is None
    with pytest.raises(ValueError, match="unknown toy task nope"):
        toy_tasks("toy:nope")


def test_rows_are_held_out_and_per_task():
    rows = heldout_rows("toy:counting,position", 5)
    assert [t for _, t in rows] == ["counting"] * 5 + ["position"] * 5
    assert all(split_of(p) == "heldout" for p, _ in rows)


def test_prompt_file_rows_and_errors(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("a cat\n\n a dog \n")
    assert heldout_rows(str(f), 3) == [("a cat", "file"), ("a dog", "file")]
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(ValueError, match="no prompts"):
        heldout_rows(str(tmp_path / "empty.txt"), 1)
    with pytest.raises(FileNotFoundError, match="train.eval_prompts"):
        heldout_rows(str(tmp_path / "missing.txt"), 1)


def _rendered(prompts, seed=0):
    ims = [render(parse_prompt(p), size=64, seed=seed + i)[0] for i, p in enumerate(prompts)]
    import numpy as np
    return torch.stack([torch.from_numpy(np.asarray(im, dtype="float32") / 255).permute(2, 0, 1) for im in ims])


def test_ground_truth_scores_high_and_mismatched_images_lower():
    ev = HeldoutEval(["toy"], per_task=4, steps=1, guidance_scale=1.0)
    good = ev.score(_rendered(ev.prompts))
    assert good["n"] == 24 and good["toy_geneval"] > 0.95 and good["toy_geneval_strict"] > 0.9
    assert set(GENEVAL_TASKS) <= {k.split("/")[1] for k in good if "/" in k}
    shifted = ev.prompts[4:] + ev.prompts[:4]  # each image rendered for the next task's prompt
    bad = ev.score(_rendered(shifted))
    assert bad["toy_geneval"] < good["toy_geneval"] - 0.2
    assert good["toy_extra_objects"] == 0.0  # renders hold exactly the objects asked for
    assert bad["toy_extra_objects/colors"] == 1.0  # "a red circle" scored on a render of 2-4 counted objects
    # the overall score is the mean over images, i.e. the mean of the equal-sized task means
    assert abs(good["toy_geneval"] - sum(good[f"toy_geneval/{t}"] for t in GENEVAL_TASKS) / 6) < 1e-6


def test_extra_and_training_rewards_are_scored(tmp_path):
    class Brightness:
        name = "brightness"

        def __call__(self, images, prompts):
            return images.mean(dim=(1, 2, 3))

    f = tmp_path / "p.txt"
    f.write_text("a\nb\n")
    ev = HeldoutEval([str(f)], per_task=1, steps=1, guidance_scale=1.0, train_rewards={str(f): Brightness()},
                     extra=["jpeg_compressibility"])
    images = torch.stack([torch.zeros(3, 8, 8), torch.ones(3, 8, 8)])
    s = ev.score(images)
    assert s["brightness"] == pytest.approx(0.5) and s["brightness/file"] == pytest.approx(0.5)
    assert "jpeg_compressibility" in s and s["n"] == 2


def test_exact_score_is_strict_without_extras_and_every_total_has_its_standard_error():
    """toy_geneval_exact = 1 iff every check passes AND the image holds no object the prompt did not ask for
    (the no_extra reward's strict score); se/<name> = sample std / sqrt(n) over the images."""
    from flowalign.toy import toy_geneval

    ev = HeldoutEval(["toy"], per_task=4, steps=1, guidance_scale=1.0)
    shifted = ev.prompts[4:] + ev.prompts[:4]  # renders of other prompts: some pass, some hold extras
    images = _rendered(shifted)
    s = ev.score(images)
    _, exact, _ = toy_geneval(images, ev.prompts, no_extra=True)
    _, strict, _ = toy_geneval(images, ev.prompts)
    assert s["toy_geneval_exact"] == pytest.approx(exact.mean().item())
    assert s["toy_geneval_strict"] == pytest.approx(strict.mean().item())
    assert s["toy_geneval_exact"] <= s["toy_geneval_strict"]
    assert s["toy_extra_objects/colors"] == 1.0 and s["toy_geneval_exact/colors"] == 0.0
    assert s["se/toy_geneval_strict"] == pytest.approx((strict.std() / 24 ** 0.5).item(), rel=1e-5)
    assert s["se/toy_geneval_exact"] == pytest.approx((exact.std() / 24 ** 0.5).item(), rel=1e-5)
    good = ev.score(_rendered(ev.prompts))
    assert good["toy_geneval_exact"] == good["toy_geneval_strict"]  # renders draw no extras
    assert good["se/toy_extra_objects"] == 0.0
