"""GenEval-style scores: exact numbers on hand-made detections, and the reward can fail."""

import numpy as np
import pytest
import torch

from flowalign.toy import Detected, detect, render, sample_batch, score, toy_geneval


def det(shape, color, x, y, s=12):
    return Detected(shape, color, (x, y, x + s, y + s), (x + s / 2, y + s / 2), s * s, 0.9)


def test_counting_checks():
    three = [det("square", "blue", 5 + 18 * i, 20) for i in range(3)]
    assert score("three blue squares", three)["fraction"] == 1.0
    r = score("three blue squares", three[:2])
    assert (r["fraction"], r["strict"], r["task"]) == (0.5, 0.0, "counting")
    assert score("three blue squares", three + [det("square", "blue", 5, 45)])["fraction"] == 0.5
    assert score("three blue squares", [det("square", "red", 5, 5)])["fraction"] == 0.0
    assert score("three blue squares", [])["fraction"] == 0.0


def test_color_attribution_and_colors():
    swapped = [det("circle", "blue", 5, 5), det("square", "red", 40, 40)]
    r = score("a red circle and a blue square", swapped)
    assert r["fraction"] == 0.5 and r["strict"] == 0.0  # shapes present, colours misattributed
    assert score("a red circle and a blue square", [det("circle", "red", 5, 5), det("square", "blue", 40, 40)])["strict"] == 1
    assert score("a red circle", [det("circle", "green", 5, 5)])["fraction"] == 0.5
    assert score("a circle", [det("circle", "green", 5, 5)])["strict"] == 1.0
    assert score("a circle and a triangle", [det("circle", "green", 5, 5)])["fraction"] == 0.5


def test_position_checks():
    left, right = det("circle", "red", 5, 30), det("square", "blue", 40, 30)
    assert score("a red circle to the left of a blue square", [left, right])["strict"] == 1.0
    r = score("a red circle to the right of a blue square", [left, right])
    assert r["fraction"] == pytest.approx(2 / 3) and r["strict"] == 0.0
    assert score("a red circle above a blue square", [left, right])["fraction"] == pytest.approx(2 / 3)
    # every pair must hold: a second red circle on the wrong side breaks it
    assert score("a red circle to the left of a blue square", [left, right, det("circle", "red", 52, 5)])["strict"] == 0
    assert score("a red circle to the left of a blue square", [left])["fraction"] == pytest.approx(1 / 3)


def test_text_prompts_are_not_geneval():
    with pytest.raises(ValueError, match="OCR"):
        score('the text "AB"', [])


def test_reward_fails_on_renders_of_other_prompts():
    pairs = sample_batch(200, seed=21)
    dets = [detect(render(s, 64, seed=i)[0]) for i, (_, s) in enumerate(pairs)]
    own = [score(p, d) for (p, _), d in zip(pairs, dets)]
    other = [score(pairs[(i + 1) % 200][0], d) for i, d in enumerate(dets)]
    other = [r for r, i in zip(other, range(200)) if pairs[(i + 1) % 200][0] != pairs[i][0]]
    assert np.mean([r["strict"] for r in own]) == 1.0
    assert np.mean([r["fraction"] for r in other]) < 0.5  # measured 0.26
    assert np.mean([r["strict"] for r in other]) < 0.2    # measured 0.13 (e.g. "a circle" on a render of "a red circle")


def test_toy_geneval_batch():
    prompts = ["a red circle", "two green squares", "a circle and a square", "a blue triangle above a red circle"]
    images = [render(p, 64, seed=i)[0] for i, p in enumerate(prompts)]
    wrong = ["a blue circle", "three green squares", "a circle and a triangle", "a blue triangle below a red circle"]
    frac, strict, per_task = toy_geneval(images, prompts)
    assert frac.dtype == torch.float32 and frac.shape == (4,) and torch.all(strict == 1)
    batch = torch.stack([torch.from_numpy(np.array(im)).permute(2, 0, 1).float() / 255 for im in images])
    frac2, strict2, per_task2 = toy_geneval(batch, wrong)
    assert torch.allclose(frac2, torch.tensor([0.5, 0.5, 0.5, 2 / 3])) and torch.all(strict2 == 0)
    assert per_task2["counting"] == {"fraction": 0.5, "strict": 0.0, "extra_objects": 0.0, "n": 1,
                                     "checks": {"colour+shape": 1.0, "count": 0.0, "count, object drawn": 0.0}}
    assert set(per_task) == set(per_task2)
    _, _, per_task3 = toy_geneval(images[1:2], ["a green square"])  # two squares drawn, one asked for
    assert per_task3["colors"]["extra_objects"] == 1.0 and per_task3["colors"]["fraction"] == 1.0
    with pytest.raises(ValueError, match="images but"):
        toy_geneval(images, prompts[:2])


def test_no_extra_check_counts_unrequested_objects():
    pair = [det("circle", "red", 5, 5), det("square", "blue", 40, 40)]
    extra = pair + [det("triangle", "green", 5, 40)]
    prompt = "a red circle and a blue square"
    assert score(prompt, extra)["fraction"] == 1.0  # GenEval's lenient checks ignore the extra triangle
    r = score(prompt, extra, no_extra=True)
    assert r["checks"]["no extra objects (3 > 2)"] is False
    assert (r["fraction"], r["strict"]) == (0.8, 0.0)
    assert score(prompt, pair, no_extra=True)["checks"]["no extra objects"] is True
    assert score("three blue squares", [det("square", "blue", 5 + 18 * i, 20) for i in range(3)],
                 no_extra=True)["strict"] == 1.0  # a count of three asks for three objects
    assert score("a circle", [], no_extra=True)["fraction"] == 0.5  # too few is not "extra"
    frac, strict, _ = toy_geneval([render(s, 64, seed=1)[0] for _, s in sample_batch(4, seed=3)],
                                  [p for p, _ in sample_batch(4, seed=3)], no_extra=True)
    assert frac.shape == (4,) and strict.shape == (4,)


def test_toy_geneval_reward_no_extra_option():
    from flowalign.rewards.toy import ToyGenEvalReward  # not `rewards.toy`: tests/rewards shadows that name

    img = render("two green squares", 64, seed=0)[0]
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255).permute(2, 0, 1)[None]
    assert ToyGenEvalReward().score(x, ["two green squares"]).item() == 1.0
    assert ToyGenEvalReward(no_extra=True).score(x, ["two green squares"]).item() == 1.0
    assert ToyGenEvalReward().score(x, ["a green square"]).item() == 1.0  # lenient: a square is present
    # colors task: present(square), present(green square) met, "no extra objects" failed
    assert ToyGenEvalReward(no_extra=True).score(x, ["a green square"]).item() == pytest.approx(2 / 3)
    # counting: present met, count 2 of 3 graded 1/2 * (1 - 1/3)
    assert ToyGenEvalReward(partial=True).score(x, ["three green squares"]).item() == pytest.approx((1 + 1 / 3) / 2)
    assert ToyGenEvalReward().score(x, ["three green squares"]).item() == pytest.approx(1 / 2)


def test_check_rates_split_scores_by_check_kind():
    from flowalign.toy import check_kind, check_rates

    assert [check_kind(n) for n in ("present(circle)", "present(red circle)", "count(blue square)==3",
                                    "red circle left of blue square", "no extra objects (3 > 2)")] == [
        "shape", "colour+shape", "count", "relation", "no extra"]
    left, right = det("circle", "red", 5, 30), det("square", "blue", 40, 30)
    prompts = ["a red circle to the left of a blue square", "a red circle to the right of a blue square",
               "a red circle and a blue square", "three blue squares"]
    dets = [[left, right], [left, right], [det("circle", "blue", 5, 5), det("square", "red", 40, 40)],
            [det("square", "blue", 5 + 18 * i, 20) for i in range(2)]]
    results = [score(p, d) for p, d in zip(prompts, dets)]
    # the two position prompts: both objects drawn, one relation met
    assert check_rates(results[:2]) == {"colour+shape": (4, 4), "relation": (1, 2), "relation, objects drawn": (1, 2)}
    assert check_rates(results[2:3]) == {"colour+shape": (0, 2), "shape": (2, 2)}
    assert check_rates(results[3:]) == {"colour+shape": (1, 1), "count": (0, 1), "count, object drawn": (0, 1)}
    # a missing object fails the relation but does not count against "relation, objects drawn"
    missing = score("a red circle to the left of a blue square", [left])
    assert check_rates(results[:1] + [missing]) == {"colour+shape": (3, 4), "relation": (1, 2),
                                                    "relation, objects drawn": (1, 1)}
    assert "count, object drawn" not in check_rates([score("three blue squares", [left])])
    # toy_geneval reports the same rates per task
    batch = sample_batch(4, seed=0, tasks=("position",))
    _, _, per_task = toy_geneval([render(spec, size=64, seed=i)[0] for i, (_, spec) in enumerate(batch)],
                                 [prompt for prompt, _ in batch])
    assert per_task["position"]["checks"] == {"colour+shape": 1.0, "relation": 1.0,  # renders meet every check
                                              "relation, objects drawn": 1.0}


def test_partial_credit_grades_counts_and_relations():
    # partial=True (a training-reward option): a failed count or relation earns up to 1/2 by how near it is;
    # passed checks, the exact checks and the strict score are unchanged
    sq = [det("square", "blue", 5 + 18 * i, 20) for i in range(5)]
    prompt = "three blue squares"
    cases = [(3, 1.0, 1.0), (2, 0.5, (1 + 0.5 * (1 - 1 / 3)) / 2), (5, 0.5, (1 + 0.5 * (1 - 2 / 3)) / 2), (0, 0.0, 0.0)]
    for k, exact, partial in cases:
        r = score(prompt, sq[:k], partial=True)
        assert r["fraction"] == pytest.approx(partial) and score(prompt, sq[:k])["fraction"] == pytest.approx(exact)
        assert r["strict"] == float(k == 3) and r["checks"] == score(prompt, sq[:k])["checks"]
    left, right = det("circle", "red", 5, 30), det("square", "blue", 40, 30)
    # a is 35 px left of b, boxes 12 px: shrunk offset (-35 + 0.1 * 24, 0) / 35 -> dx = -32.6 / 35, dy = 0
    dx = -32.6 / 35
    for rel, s in [("to the right of", dx), ("above", 0.0), ("below", 0.0)]:
        r = score(f"a red circle {rel} a blue square", [left, right], partial=True)
        assert r["fraction"] == pytest.approx((2 + 0.5 * (s + 1) / 2) / 3) and r["strict"] == 0.0
    assert score("a red circle to the left of a blue square", [left, right], partial=True)["fraction"] == 1.0
    assert score("a red circle to the left of a blue square", [left], partial=True)["fraction"] == pytest.approx(1 / 3)


def test_partial_credit_never_lowers_a_score():
    batch = sample_batch(60, seed=5)
    images = [render(s, 64, seed=i)[0] for i, (_, s) in enumerate(batch)]
    prompts = [p for p, _ in sample_batch(60, seed=6)]  # mostly other scenes' prompts: many failed checks
    exact, strict, _ = toy_geneval(images, prompts)
    partial, strict_p, _ = toy_geneval(images, prompts, partial=True)
    assert torch.equal(strict, strict_p) and bool((partial >= exact).all()) and bool((partial > exact).any())
    assert bool((partial[strict == 1] == 1).all())
