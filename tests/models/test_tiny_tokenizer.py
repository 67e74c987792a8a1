"""The tiny CLIP tokenizer: every listed word is one token, so toy prompts fit the 16-token encoders."""

from flowalign.toy.pipelines import DEFAULT_WORDS, clip_vocab, tiny_clip_tokenizer
from flowalign.toy import GENEVAL_TASKS, all_prompts


def test_every_word_is_one_token():
    tok = tiny_clip_tokenizer(DEFAULT_WORDS, max_length=16)
    split = {w: tok.tokenize(w) for w in DEFAULT_WORDS if len(tok.tokenize(w)) != 1}
    assert not split, f"words split into several tokens: {split}"


def test_every_toy_prompt_fits_without_truncation():
    tok = tiny_clip_tokenizer(DEFAULT_WORDS, max_length=16)
    longest = max(len(tok(p).input_ids) for task in GENEVAL_TASKS for p in all_prompts(task))
    assert longest <= 16, f"a toy prompt needs {longest} tokens; the tiny text encoders take 16"


def test_merges_learned_not_colliding():
    # Hand-made per-word merge chains collide ("a n" from "and" split "triangle"); learned BPE merges don't.
    vocab, merges = clip_vocab(["and", "triangle", "green", "red"])
    tok = tiny_clip_tokenizer(["and", "triangle", "green", "red"])
    assert [tok.tokenize(w) for w in ("and", "triangle", "green", "red")] == [
        ["and</w>"], ["triangle</w>"], ["green</w>"], ["red</w>"]]
    assert len(merges) == len(set(merges))
    # Unseen text still tokenizes (byte-level characters are all in the vocabulary).
    assert "".join(tok.tokenize("zebra")).replace("</w>", "") == "zebra"
