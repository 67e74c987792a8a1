"""First contact: a command prints its own output, not third-party noise (``flowalign.runtime.quiet``), and
``--config RECIPE`` works from any folder with a shipped recipe name."""

import logging
import os
import subprocess
import sys
import warnings

import pytest

from flowalign.cli import main

NOISE = ["requires torchvision (not installed)", "Loading pipeline components", "Loading weights",
         "No LoRA keys associated to"]


def _flowalign(args, cwd, quiet=True):
    """Run the CLI in a fresh process (the noise is printed once per process); ``quiet=False``: without
    quiet_third_party, the control run."""
    patch = "" if quiet else "import flowalign.runtime.quiet as q; q.quiet_third_party = lambda: None; "
    code = f"import sys; {patch}from flowalign.cli import main; sys.exit(main(sys.argv[1:]))"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


def test_sample_prints_no_third_party_noise(tiny_model, tmp_path):
    model, lora_dir = tiny_model
    args = ["sample", "--model", model, "--lora", lora_dir, "--prompt", "a red circle", "--steps", "2", "--out",
            "x.png"]
    control = _flowalign(args, tmp_path, quiet=False)
    assert control.returncode == 0, control.stderr
    present = [n for n in NOISE if n in control.stderr]
    assert "Loading pipeline components" in present and "No LoRA keys associated to" in present, control.stderr
    run = _flowalign(args, tmp_path)
    assert run.returncode == 0, run.stderr
    assert [n for n in NOISE if n in run.stderr] == [], run.stderr
    assert "RLG w=1" in run.stderr  # flowalign's own progress bar stays
    assert run.stdout.strip() == "wrote x.png"


def _captured(logger_name, messages):
    """The messages of ``messages`` that reach a handler of ``logger_name`` after quiet_third_party."""
    from flowalign.runtime.quiet import quiet_third_party

    quiet_third_party()
    seen = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    logger = logging.getLogger(logger_name)
    logger.addHandler(handler)
    try:
        for m in messages:
            logger.warning(m)
    finally:
        logger.removeHandler(handler)
    return seen


def test_quiet_drops_only_the_noise():
    text_encoder = ("No LoRA keys associated to CLIPTextModelWithProjection found with the prefix='text_encoder_2'. "
                    "This is safe to ignore")
    denoiser = "No LoRA keys associated to SD3Transformer2DModel found with the prefix='transformer'. This is"
    other = "Some real problem with a LoRA"
    assert _captured("diffusers.loaders.lora_base", [text_encoder, denoiser, other]) == [denoiser, other]
    fallback = ("`CLIPImageProcessor` requires torchvision (not installed); falling back to `CLIPImageProcessorPil` "
                "for backward compatibility.")
    real = "`Foo` requires bar (not installed)"
    assert _captured("transformers.utils.import_utils", [fallback, real]) == [real]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.warn("an unrelated user warning", UserWarning)
    assert [str(w.message) for w in caught] == ["an unrelated user warning"]


def test_quiet_hides_only_the_loading_bars():
    from transformers.utils import logging as tf_logging

    from flowalign.runtime.quiet import quiet_third_party

    quiet_third_party()
    assert tf_logging.tqdm(range(2), desc="Loading weights").disable
    assert not tf_logging.tqdm(range(2), desc="Downloading", disable=False).disable
    assert tf_logging.is_progress_bar_enabled()  # huggingface_hub's download bars stay on


def test_quiet_switches_diffusers_bars_off_after_a_lazy_import(tmp_path):
    """Installed before diffusers is imported (a usage error must not pay for importing it), applied on import."""
    code = ("import sys; from flowalign.runtime.quiet import quiet_third_party; quiet_third_party(); "
            "assert 'diffusers' not in sys.modules; import diffusers.utils.logging as l; "
            "print(l.is_progress_bar_enabled())")
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.strip() == "False", run.stderr


def test_shipped_recipe_name_gives_sample_its_defaults(tmp_path, monkeypatch, capsys):
    import flowalign.apps.sample as sample
    from flowalign.config import DEFAULT_MODEL

    calls = []
    monkeypatch.setattr(sample, "sample_png", lambda out, prompt, scale, **kw: calls.append((scale, kw)) or out)
    monkeypatch.chdir(tmp_path)  # no runs/toy_grpo/lora here
    assert main(["sample", "--config", "toy_grpo.yaml", "--prompt", "a red circle"]) == 0
    scale, kw = calls[0]
    assert (scale, kw["model"], kw["lora_dir"], kw["steps"], kw["guidance_scale"]) == (0.0, DEFAULT_MODEL, None,
                                                                                      10, 4.5)
    assert "runs/toy_grpo/lora not found): sampling the base model" in capsys.readouterr().out
    assert main(["sample", "--config", "nope.yaml", "--prompt", "x"]) == 2
    assert "config file 'nope.yaml' not found" in capsys.readouterr().err
