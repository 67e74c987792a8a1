"""OCR reward: rendered matching text scores ~1, wrong text low, blank 0; the score formula; bad prompts."""

import pytest
import torch
from PIL import Image

from flowalign.rewards import get
from flowalign.rewards.ocr import levenshtein, quoted_text, text_score
from flowalign.toy import render


@pytest.fixture(scope="module")
def ocr():
    return get("ocr")


def test_rendered_text_is_read(ocr):
    images = [render('the text "ABC"', size=128)[0], render('the text "QZ"', size=64, seed=3)[0],
              Image.new("RGB", (64, 64), (236, 236, 236))]
    right = ocr(images, ['a sign that says "ABC"', 'the text "QZ"', 'the text "HI"'])
    assert right[0] > 0.95 and right[1] > 0.95
    assert right[2] == 0  # no text in the image
    wrong = ocr(images[:2], ['the text "XYW"', 'the text "MN"'])
    assert (wrong < 0.4).all(), wrong


def test_score_formula():
    assert levenshtein("kitten", "sitting") == 3 and levenshtein("", "abc") == 3
    assert text_score("Hello World!", "hello world") == 1.0  # substring after lowercasing, spaces removed
    assert text_score("ABD", "ABC") == pytest.approx(1 - 1 / 3)
    assert text_score("a completely different long line", "AB") == 0.0  # distance capped at |target|
    assert text_score("", "ABC") == 0.0


def test_prompt_needs_quoted_text(ocr):
    assert quoted_text('a cafe sign reading "Open 24h" at night') == "Open 24h"
    with pytest.raises(ValueError, match="quoted text"):
        ocr(torch.rand(1, 3, 32, 32), ["a red circle"])
