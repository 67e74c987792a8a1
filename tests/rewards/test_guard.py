"""safe_scores: NaN/inf and raising samples are marked invalid (score 0) with one warning; a reward that
fails on every sample re-raises."""

import pytest
import torch

from flowalign.rewards import Reward, safe_scores


class Fragile(Reward):
    """score = mean pixel; NaN for images whose mean is above 0.8; raises on images whose mean is below 0.1."""

    name = "fragile"

    def score(self, images, prompts, metadata=None):
        m = images.mean(dim=(1, 2, 3))
        if (m < 0.1).any():
            raise RuntimeError("cannot score a dark image")
        return torch.where(m > 0.8, torch.full_like(m, float("nan")), m)


def _images(*levels):
    return torch.stack([torch.full((3, 8, 8), v) for v in levels])


def test_all_good_passes_through():
    s, valid, n_bad = safe_scores(Fragile(), _images(0.3, 0.5), ["a", "b"])
    torch.testing.assert_close(s, torch.tensor([0.3, 0.5]))
    assert valid.all() and n_bad == 0


def test_nan_marked_invalid():
    with pytest.warns(RuntimeWarning, match=r"fragile: 1/3 samples invalid"):
        s, valid, n_bad = safe_scores(Fragile(), _images(0.3, 0.9, 0.5), ["a", "b", "c"])
    assert valid.tolist() == [True, False, True] and n_bad == 1
    torch.testing.assert_close(s, torch.tensor([0.3, 0.0, 0.5]))


def test_raise_on_one_image_scores_the_rest():
    with pytest.warns(RuntimeWarning, match=r"2/4 samples invalid.*cannot score a dark image"):
        s, valid, n_bad = safe_scores(Fragile(), _images(0.3, 0.05, 0.95, 0.5), list("abcd"))
    assert valid.tolist() == [True, False, False, True] and n_bad == 2
    torch.testing.assert_close(s, torch.tensor([0.3, 0.0, 0.0, 0.5]))


def test_reward_broken_on_every_sample_reraises():
    with pytest.raises(RuntimeError, match="dark image"):
        safe_scores(Fragile(), _images(0.0, 0.05), ["a", "b"])


def test_pil_list_input_one_by_one():
    from flowalign.rewards import to_pil_list

    class PilFragile(Reward):
        name = "pil_fragile"

        def score(self, images, prompts, metadata=None):
            if any(p == "bad" for p in prompts):
                raise ValueError("bad prompt")
            return torch.ones(len(prompts))

    with pytest.warns(RuntimeWarning, match="pil_fragile: 1/3"):
        s, valid, _ = safe_scores(PilFragile(), to_pil_list(_images(0.2, 0.2, 0.2)), ["ok", "bad", "ok"],
                                  [{"i": 0}, {"i": 1}, {"i": 2}])
    assert valid.tolist() == [True, False, True] and s.tolist() == [1.0, 0.0, 1.0]
