"""The pipeline adapters' options (negative prompt, T5 length, FLUX true CFG) reach them from the YAML config."""

import pytest
import torch

from flowalign.config import config_from_dict
from flowalign.models import adapter_for, load_adapter
from flowalign.toy.pipelines import tiny_flux_pipeline, tiny_sd3_pipeline


def test_flux_true_cfg_and_negative_prompt_from_yaml(tmp_path):
    path = str(tmp_path / "flux")
    tiny_flux_pipeline().save_pretrained(path)
    cfg = config_from_dict({"model": {"path": path, "negative_prompt": "blurry", "true_cfg_scale": 3.0,
                                      "max_sequence_length": 8}})
    ad = load_adapter(cfg.model.path, **cfg.model.adapter_kwargs())
    assert (ad.negative_prompt, ad.true_cfg_scale, ad.max_sequence_length) == ("blurry", 3.0, 8)
    # true CFG: v = v_null + s (v_c - v_null) with the negative prompt as the null branch
    g = torch.Generator().manual_seed(0)
    x = ad.prepare_latents(1, height=16, width=16, generator=g)
    t = ad.sampling_grid(2, x).timesteps[:1]
    cond = ad.encode_prompts(["a red circle"], 3.5)
    v = ad.predict(x, t, cond, 3.5)
    plain = adapter_for(ad.pipe, max_sequence_length=8)  # guidance embedding only, same pipeline
    v_c = plain.predict(x, t, plain.encode_prompts(["a red circle"], 3.5), 3.5)
    v_null = plain.predict(x, t, plain.encode_prompts(["blurry"], 3.5), 3.5)
    assert torch.allclose(v, v_null + 3.0 * (v_c - v_null), atol=1e-5)
    assert not torch.allclose(v, v_c, atol=1e-3)


def test_adapter_options_are_checked():
    with pytest.raises(ValueError, match="model.true_cfg_scale is for flux, flux_kontext, qwenimage, qwenimage_edit, "
                                         "qwenimage_edit_plus; the sd3 family"):
        config_from_dict({"model": {"family": "sd3", "true_cfg_scale": 2.0}})
    with pytest.raises(ValueError, match="model.max_sequence_length must be > 0"):
        config_from_dict({"model": {"max_sequence_length": 0}})
    with pytest.raises(ValueError, match="true_cfg_scale is not an option of the sd3 adapter .*remove model.true_cfg"):
        adapter_for(tiny_sd3_pipeline(), true_cfg_scale=2.0)
    assert config_from_dict({}).model.adapter_kwargs() == {}


def test_config_knows_every_family_and_which_take_true_cfg():
    """config.py cannot import the adapters (torch, diffusers): its family lists must follow the registry."""
    import inspect

    from flowalign.config import FAMILIES, TRUE_CFG_FAMILIES
    from flowalign.models import ADAPTERS

    assert sorted(FAMILIES) == sorted(ADAPTERS)
    takes = [f for f, cls in ADAPTERS.items() if "true_cfg_scale" in inspect.signature(cls.__init__).parameters]
    assert sorted(TRUE_CFG_FAMILIES) == sorted(takes)
