"""Decoding shapes, prompt caching, save/load of the tiny SD3 pipeline, and the missing-model error."""

import pytest
import torch

from flowalign.models import ModelNotFoundError, adapter_for, load_adapter, load_pipeline
from flowalign.toy.pipelines import tiny_sd3_pipeline
from flowalign.rollout import rollout



def test_wan_frames_shape(gen, h):
    _, adapter = h.make_adapter("wan")
    traj = rollout(adapter, h.PROMPTS, num_steps=2, guidance_scale=1.0, generator=gen(0), height=32, width=32,
                   num_frames=5)
    assert traj.final.shape == (2, 4, 2, 4, 4)  # [B, C, F', h, w]: 4x temporal, 8x spatial
    frames = adapter.decode(traj.final)
    assert frames.shape == (2, 5, 3, 32, 32)
    assert frames.min() >= 0 and frames.max() <= 1


@pytest.mark.parametrize("family,shape", [("sd3", (1, 3, 32, 32)), ("flux", (1, 3, 16, 16)), ("sdxl", (1, 3, 32, 32))])
def test_decode_shape(family, shape, gen, h):
    _, adapter = h.make_adapter(family)
    x = adapter.prepare_latents(1, *shape[2:], generator=gen(0))
    img = adapter.decode(x)
    assert img.shape == shape and img.dtype == torch.float32 and 0 <= img.min() <= img.max() <= 1


def test_prompt_cache(h):
    _, adapter = h.make_adapter("sd3")
    a = adapter.encode_prompts(["a red circle", "a red circle", "two stars"], 2.0)
    assert len(adapter._cache) == 3  # two unique prompts + the empty negative prompt
    assert torch.equal(a.cond["encoder_hidden_states"][0], a.cond["encoder_hidden_states"][1])
    assert not torch.equal(a.cond["encoder_hidden_states"][0], a.cond["encoder_hidden_states"][2])
    assert a.uncond["pooled_projections"].shape == a.cond["pooled_projections"].shape
    assert adapter.encode_prompts(["two stars"], 1.0).uncond is None
    assert a.select([2]).prompts == ["two stars"]


def test_tiny_sd3_save_and_load_offline(tmp_path, gen, h):
    pipe = tiny_sd3_pipeline(image_size=64, vae_channels=(8, 8, 8), patch_size=2, num_layers=2)
    pipe.save_pretrained(str(tmp_path))
    from diffusers import StableDiffusion3Pipeline

    loaded = StableDiffusion3Pipeline.from_pretrained(str(tmp_path), local_files_only=True)
    assert type(loaded.text_encoder_3).__name__ == "T5EncoderModel"
    a, b = adapter_for(pipe, max_sequence_length=16), load_adapter(str(tmp_path), max_sequence_length=16)
    assert b.family == "sd3" and type(load_pipeline(str(tmp_path))).__name__ == "StableDiffusion3Pipeline"
    x = a.prepare_latents(1, generator=gen(0))
    assert x.shape == (1, 4, 16, 16)
    t = a.sampling_grid(2, x).timesteps[0]
    torch.testing.assert_close(a.predict(x, t, a.encode_prompts(h.PROMPTS[:1])),
                               b.predict(x, t, b.encode_prompts(h.PROMPTS[:1])))


def test_tiny_sd3_without_t5_loads_with_load_pipeline(tmp_path, gen, h):
    pipe = tiny_sd3_pipeline(with_t5=False)
    pipe.save_pretrained(str(tmp_path))
    loaded = load_pipeline(str(tmp_path))
    assert loaded.text_encoder_3 is None and loaded.tokenizer_3 is None
    a, b = adapter_for(pipe, max_sequence_length=16), adapter_for(loaded, max_sequence_length=16)
    x = a.prepare_latents(1, generator=gen(0))
    torch.testing.assert_close(a.predict(x, 900.0, a.encode_prompts(h.PROMPTS[:1])),
                               b.predict(x, 900.0, b.encode_prompts(h.PROMPTS[:1])))


def test_missing_model_error(monkeypatch, tmp_path, h):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # an empty cache
    with pytest.raises(ModelNotFoundError) as err:
        load_pipeline("stabilityai/stable-diffusion-3.5-medium", family="sd3")
    msg = str(err.value)
    assert "\n" not in msg
    assert "'stabilityai/stable-diffusion-3.5-medium' not found locally" in msg
    assert "HF_HUB_OFFLINE=1" in msg and "huggingface-cli download stabilityai/stable-diffusion-3.5-medium" in msg
    with pytest.raises(ModelNotFoundError, match="model_index.json"):
        load_pipeline(str(tmp_path))


def test_a_prompts_embedding_does_not_depend_on_the_batch_it_was_first_seen_in(h):
    # text encoders' last bits depend on the other rows of a batch; each new prompt is encoded alone, so a resumed
    # run (empty cache) gets the embeddings the uninterrupted run cached
    from flowalign.models import adapter_for
    from flowalign.toy.pipelines import tiny_sd3_pipeline

    pipe = tiny_sd3_pipeline()
    alone, batched = adapter_for(pipe), adapter_for(pipe)
    a = alone.encode_prompts(["a red circle"]).cond
    b = batched.encode_prompts(["two blue squares", "a red circle", "a green triangle above a star"]).cond
    assert all(torch.equal(a[k][0], b[k][1]) for k in a)
