"""The demo's before/after grid: rows ordered fixed -> kept -> failing -> broken by the exact verdict, tasks
interleaved, broken rows kept at the bottom when rows are capped; every image's checks drawn beside it."""

import numpy as np
import pytest
import torch
from PIL import Image

from flowalign.evaluation.verdict_grid import order_rows, verdict_grid, verdicts
from flowalign.toy import parse_prompt, render


def test_rows_go_fixed_kept_failing_broken_and_cycle_through_tasks():
    base = [0, 1, 0, 1, 0, 1, 0, 0]
    aligned = [1, 1, 0, 0, 1, 1, 1, 0]
    tasks = ["a", "a", "a", "a", "b", "b", "b", "b"]
    rows = order_rows(base, aligned, tasks)
    assert [c for _, c in rows] == ["fixed"] * 3 + ["kept"] * 2 + ["failing"] * 2 + ["broken"]
    assert [i for i, _ in rows[:3]] == [0, 4, 6]  # the first fixed image of a, of b, then b's second
    assert rows[-1] == (3, "broken")


def test_capped_rows_keep_the_broken_ones_at_the_bottom():
    base, aligned = [0] * 10 + [1] * 3, [1] * 10 + [0] * 3  # 10 fixed, 3 broken
    rows = order_rows(base, aligned, max_rows=6)
    assert [c for _, c in rows] == ["fixed"] * 4 + ["broken"] * 2  # a third of the rows are broken ones
    assert order_rows([0] * 9, [1] * 9, max_rows=6) == [(i, "fixed") for i in range(6)]  # none broken: all head
    with pytest.raises(ValueError, match="2 base verdicts but 1"):
        order_rows([0, 1], [1])


def _rendered(prompts):
    ims = [render(parse_prompt(p), size=64, seed=i)[0] for i, p in enumerate(prompts)]
    return torch.stack([torch.from_numpy(np.asarray(im, dtype="float32") / 255).permute(2, 0, 1) for im in ims])


def test_grid_marks_what_the_adapter_fixed_and_broke(tmp_path):
    prompts = ["a circle", "a green triangle", "three green squares"]
    good = _rendered(prompts)
    wrong = _rendered(prompts[1:] + prompts[:1])  # each image drawn for another prompt: not exact
    assert [v["exact"] for v in verdicts(good, prompts)] == [1.0, 1.0, 1.0]
    assert all("no extra objects" in " ".join(v["checks"]) for v in verdicts(good, prompts))
    path = tmp_path / "grid.png"
    base = torch.stack([wrong[0], good[1], good[2]])  # image 0 fails at the base
    aligned = torch.stack([good[0], good[1], wrong[2]])  # the adapter fixes 0 and breaks 2
    out = verdict_grid(base, aligned, prompts, str(path), aligned_label="aligned (it 150)")
    assert out["rows"] == [(0, "fixed"), (1, "kept"), (2, "broken")]
    assert out["counts"] == {"fixed": 1, "kept": 1, "failing": 0, "broken": 1}
    with Image.open(path) as im:
        grid = np.asarray(im.convert("RGB"))
    assert grid.shape[1] > 600 and grid.shape[0] > 3 * 128
    bar = grid[:, 1]  # the class bar at the left edge: green for the fixed row, red for the broken one
    assert tuple(bar[25]) == (20, 140, 40) and tuple(bar[-20]) == (200, 30, 30)
    with pytest.raises(ValueError, match="must match"):
        verdict_grid(base, aligned[:2], prompts, str(path))
