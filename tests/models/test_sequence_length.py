"""T5 prompts are encoded at most at the T5 tokenizer's model_max_length, by adapters and direct pipe() calls."""

import torch

from flowalign.models import adapter_for, pipeline_call_kwargs, t5_sequence_length
from flowalign.toy.pipelines import tiny_sd3_pipeline, tiny_sd_pipeline


def test_sd3_adapter_caps_at_the_t5_tokenizer_limit():
    pipe = tiny_sd3_pipeline(image_size=16, max_text_length=16)
    assert pipe.tokenizer_3.model_max_length == 16
    assert adapter_for(pipe).max_sequence_length == 16
    assert pipeline_call_kwargs(pipe) == {"max_sequence_length": 16}
    assert t5_sequence_length(pipe, 8) == 8  # a smaller request is kept
    cond = adapter_for(pipe).encode_prompts(["a red circle"], 1.0)
    clip_tokens = 16  # CLIP part of SD3's joint sequence, then T5
    assert cond.cond["encoder_hidden_states"].shape[1] == clip_tokens + 16


def test_adapter_and_pipeline_call_agree():
    pipe = tiny_sd3_pipeline(image_size=16, max_text_length=16)
    adapter = adapter_for(pipe)
    ours = adapter.encode_prompts(["two blue squares"], 1.0).cond["encoder_hidden_states"]
    theirs = pipe.encode_prompt("two blue squares", None, None, do_classifier_free_guidance=False,
                                **pipeline_call_kwargs(pipe))[0]
    torch.testing.assert_close(ours, theirs)


def test_pipelines_without_t5_keep_defaults():
    pipe = tiny_sd_pipeline()
    assert t5_sequence_length(pipe, 77) == 77
    assert pipeline_call_kwargs(pipe) == {}
