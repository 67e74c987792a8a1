"""adapter.call_kwargs: the pipeline's own __call__ (held-out evaluation) samples as the adapter does. For every
image family, ``sample_images(pipe, ..., adapter=)`` equals the decoded ODE rollout with the same seeds: the
family's guidance mapping (Z-Image's g - 1), prompt length, negative prompt, true CFG, Kontext's area."""

import pytest
import torch

from flowalign.evaluation.sampling import sample_images
from flowalign.models import ADAPTERS
from flowalign.models.base import image_tensor
from flowalign.rollout import rollout
from flowalign.toy.tiny_families import TINY_SETTINGS

IMAGE_FAMILIES = [f for f, cls in ADAPTERS.items() if not cls.video]
OPTIONS = {  # options that change the pipeline call, beyond the tiny defaults
    "flux": dict(true_cfg_scale=2.0, negative_prompt="three stars"),
    "flux_kontext": dict(true_cfg_scale=2.0),
    "zimage": dict(cfg_truncation=0.5, negative_prompt="three stars"),
    "sd3": dict(negative_prompt="three stars"),
}


@pytest.mark.parametrize("family", IMAGE_FAMILIES)
def test_pipeline_call_samples_as_the_adapter(family, h):
    from flowalign.models import adapter_for

    pipe, _ = h.make_adapter(family)
    adapter = adapter_for(pipe, **TINY_SETTINGS[family]["adapter"], **OPTIONS.get(family, {}))
    cond = h.condition(family, len(h.PROMPTS))
    images = cond.pop("images", None)
    g, steps, seed = 3.0, 3, 5
    sampler = "flow_ode" if adapter.is_flow else "ddim"
    traj = rollout(adapter, h.PROMPTS, num_steps=steps, guidance_scale=g, sampler=sampler, noise_level=0.0,
                   generator=[torch.Generator().manual_seed(seed + i) for i in range(len(h.PROMPTS))], images=images,
                   **cond)
    ours = adapter.decode(traj.final)
    size = cond.get("height")
    tensors = None if images is None else [image_tensor(im) for im in images]
    theirs = sample_images(pipe, h.PROMPTS, seed=seed, steps=steps, guidance_scale=g, images=tensors,
                           adapter=adapter, resolution=size)
    assert theirs.shape == ours.shape
    torch.testing.assert_close(theirs, ours.float(), atol=1e-4, rtol=1e-4)
    # without the adapter's keywords the pipeline samples something else (the test can fail); Kontext would sample
    # at its default area, 1024 x 1024, which the tiny scheduler's shift cannot take
    if family in OPTIONS and family != "flux_kontext":
        plain = sample_images(pipe, h.PROMPTS, seed=seed, steps=steps, guidance_scale=g, images=tensors,
                              resolution=size)
        assert (plain - ours).abs().max() > 1e-3
