"""Grammar: templates round-trip, parse errors, splits, sampler determinism, relations."""

import numpy as np
import pytest

from flowalign.toy import (GENEVAL_TASKS, TASKS, TEMPLATES, ObjectSpec, SceneSpec, all_prompts, parse_prompt,
                           prompts_in_split, relations_of, sample, sample_batch, split_of)


@pytest.mark.parametrize("task", GENEVAL_TASKS)
def test_every_prompt_round_trips(task):
    prompts = all_prompts(task)
    assert len(prompts) == {"single_object": 3, "colors": 12, "counting": 48, "two_object": 6,
                            "color_attr": 108, "position": 528}[task]
    for p in prompts:
        spec = parse_prompt(p)
        assert spec.task == task and spec.prompt == p


def test_text_prompts_round_trip():
    words = all_prompts("text")
    assert len(words) == 26 + 26 ** 2 + 26 ** 3
    for p in words[::97]:
        spec = parse_prompt(p)
        assert spec.task == "text" and spec.prompt == p and 1 <= len(spec.text) <= 3


def test_parse_examples_and_normalisation():
    assert parse_prompt("three blue squares") == SceneSpec("counting", (ObjectSpec("square", "blue", 3),))
    assert parse_prompt("  A Red  Circle. ") == SceneSpec("colors", (ObjectSpec("circle", "red"),))
    assert parse_prompt("a red circle to the left of a blue square") == SceneSpec(
        "position", (ObjectSpec("circle", "red"), ObjectSpec("square", "blue")), "left of")
    assert parse_prompt("a circle below a square").relation == "below"  # colours optional in position
    assert parse_prompt('the text "AB"').text == "AB"
    assert parse_prompt("three circles").objects[0] == ObjectSpec("circle", None, 3)


@pytest.mark.parametrize("bad", ["a purple circle", "two circle", "a circles", "five red squares",
                                 "a circle and a circle", "a red circle and a square", "a red circle and a red square",
                                 "two circles and a square", "a circle near a square", 'the text "abcd"', ""])
def test_unparseable_prompts_say_what_is_supported(bad):
    with pytest.raises(ValueError, match="supported templates: single_object"):
        parse_prompt(bad)


def test_templates_cover_all_tasks():
    assert set(TEMPLATES) == set(TASKS)


def test_splits_disjoint_deterministic_and_about_ten_percent():
    n_all = n_held = 0
    for task in TASKS:
        train, held = set(prompts_in_split(task, "train")), set(prompts_in_split(task, "heldout"))
        assert not train & held and train | held == set(all_prompts(task))
        assert train, f"{task} has no train prompts"
        n_all, n_held = n_all + len(train | held), n_held + len(held)
    assert 0.08 < n_held / n_all < 0.12
    assert split_of("a triangle and a square") == "heldout" and split_of("a circle and a square") == "train"
    assert split_of("A Circle and a square.") == "train"  # by canonical prompt


def test_sampler_is_seeded_and_respects_split():
    a, b = sample_batch(200, seed=3), sample_batch(200, seed=3)
    assert a == b and a != sample_batch(200, seed=4)
    assert {s.task for _, s in a} == set(GENEVAL_TASKS)
    assert all(split_of(p) == "train" and parse_prompt(p) == s for p, s in a)
    held = sample_batch(100, seed=0, split="heldout", tasks=TASKS)
    assert all(split_of(p) == "heldout" for p, _ in held)
    text = [sample(np.random.default_rng(i), task="text")[1].text for i in range(300)]
    lengths = np.bincount([len(t) for t in text], minlength=4)[1:] / 300
    assert np.all(lengths > 0.25)  # length-uniform, not dominated by 3-letter words


def test_relations_follow_geneval_rule():
    a, b = (0, 20, 10, 30), (30, 20, 40, 30)
    assert relations_of(a, b) == {"left of"} and relations_of(b, a) == {"right of"}
    assert relations_of((20, 0, 30, 10), (20, 30, 30, 40)) == {"above"}
    assert relations_of((0, 0, 10, 10), (30, 30, 40, 40)) == {"left of", "above"}  # diagonal: both
    assert relations_of((0, 0, 10, 10), (1, 0, 11, 10)) == set()  # within the margin: none



def test_caption_noise_mislabels_counts_relations_and_bindings_only():
    from flowalign.toy import noisy_caption

    rng = np.random.default_rng(0)
    assert all(noisy_caption(p, rng, 0.0) == p for p in all_prompts("position")[:50])
    for task in ("single_object", "colors", "two_object"):
        assert all(noisy_caption(p, rng, 1.0) == p for p in all_prompts(task))
    assert noisy_caption('the text "AB"', rng, 1.0) == 'the text "AB"'
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        noisy_caption("a circle", rng, 1.5)

    def noisy(task):  # (clean spec, noisy spec) for every train prompt of the task, at p = 1
        return [(parse_prompt(p), parse_prompt(noisy_caption(p, rng, 1.0))) for p in prompts_in_split(task, "train")]

    pairs = noisy("counting")  # a neighbouring count, same colour and shape
    assert all((n.objects[0].shape, n.objects[0].color) == (s.objects[0].shape, s.objects[0].color) for s, n in pairs)
    assert all(abs(n.objects[0].count - s.objects[0].count) <= 1 for s, n in pairs)
    assert np.mean([n != s for s, n in pairs]) > 0.8
    pairs = noisy("position")  # another relation, same objects
    assert all(n.objects == s.objects for s, n in pairs) and np.mean([n != s for s, n in pairs]) > 0.8
    pairs = noisy("color_attr")  # the two colours swapped between the shapes
    assert all([o.shape for o in n.objects] == [o.shape for o in s.objects] for s, n in pairs)
    assert all([o.color for o in n.objects] in ([o.color for o in s.objects], [o.color for o in s.objects][::-1])
               for s, n in pairs)
    assert np.mean([n != s for s, n in pairs]) > 0.8
    # a noisy caption never names a held-out prompt, and p is the rate of mislabels
    assert all(split_of(noisy_caption(p, rng, 1.0)) == "train" for t in ("counting", "position", "color_attr")
               for p in prompts_in_split(t, "train"))
    draws = [noisy_caption("three red squares", rng, 0.3) for _ in range(2000)]  # its neighbours are all train
    assert abs(np.mean([d != "three red squares" for d in draws]) - 0.3) < 0.04
    assert set(draws) == {"two red squares", "three red squares", "four red squares"}
