"""Silence third-party noise that is not the user's business, precisely, so real warnings still show.

``quiet_third_party()`` (called once by ``flowalign.cli.main``) removes what every command printed on a fresh
clone (diffusers 0.42, transformers 5.24, no torchvision):

* "`CLIPImageProcessor` requires torchvision (not installed); falling back to `CLIPImageProcessorPil`" (and the
  Siglip one): ``logger.warning_once`` of ``transformers.utils.import_utils``; the PIL fallback is what the
  rewards use;
* the nested "Loading pipeline components..." (diffusers' ``logging.tqdm``, used only while loading weights)
  and "Loading weights" (transformers, ``core_model_loading``) bars of every pipeline load;
* "No LoRA keys associated to CLIPTextModelWithProjection found with the prefix='text_encoder'" (and
  'text_encoder_2'), warned by ``diffusers.loaders.lora_base`` on each ``load_lora_weights``: flowalign's LoRAs
  live on the denoiser only.

Everything else stays: other records of those loggers, the same warning for a denoiser (a LoRA that loaded
nothing), huggingface_hub's download bars, Python warnings and flowalign's own tqdm bars.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import logging
import re
import sys

# logger -> the message it logs that is dropped (re.match on the formatted message)
DROPPED = {
    "transformers.utils.import_utils": r"`\w+ImageProcessor` requires torchvision \(not installed\); falling back "
                                       r"to `\w+ImageProcessorPil`",
    "diffusers.loaders.lora_base": r"No LoRA keys associated to \w+ found with the prefix='text_encoder(_\d+)?'",
}
_done = False


class DropMessage(logging.Filter):
    """A logger filter that drops the records whose message matches ``pattern``; every other record passes."""

    def __init__(self, pattern: str):
        super().__init__()
        self.pattern = re.compile(pattern)

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.match(record.getMessage())


def _diffusers_bars(module) -> None:
    """diffusers' own bars (``logging.tqdm``) only show loading: pipeline components, checkpoint shards; a
    pipeline's denoising bar is plain tqdm and stays under ``set_progress_bar_config``."""
    module.disable_progress_bar()


def _transformers_bars(module) -> None:
    """Only the "Loading weights" bar: transformers' ``disable_progress_bar`` would hide the Hub's download bars."""
    set_hook = getattr(module, "set_tqdm_hook", None)
    if set_hook is None:  # transformers < 5: no such bar
        return
    previous = set_hook(None)

    def hook(factory, args, kwargs):
        if kwargs.get("desc") == "Loading weights":
            kwargs = {**kwargs, "disable": True}
        return previous(factory, args, kwargs) if previous else factory(*args, **kwargs)

    set_hook(hook)


class _AfterImport(importlib.abc.MetaPathFinder):
    """Runs ``fn(module)`` right after module ``name`` is first imported, so a command that fails on a usage
    error does not pay the seconds of importing diffusers just to switch its bars off."""

    def __init__(self, name: str, fn):
        self.name, self.fn = name, fn

    def find_spec(self, name, path=None, target=None):
        if name != self.name or self not in sys.meta_path:
            return None
        sys.meta_path.remove(self)  # once, and the lookup below must not find this finder again
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def run(module):
            exec_module(module)
            self.fn(module)

        spec.loader.exec_module = run
        return spec


def _after_import(name: str, fn) -> None:
    """``fn(module)`` now if ``name`` is imported, else right after its first import."""
    if name in sys.modules:
        fn(sys.modules[name])
    else:
        sys.meta_path.insert(0, _AfterImport(name, fn))


def quiet_third_party() -> None:
    """Install the filters and switch the loading bars off (see the module docstring); idempotent."""
    global _done
    if _done:
        return
    _done = True
    for name, pattern in DROPPED.items():
        logging.getLogger(name).addFilter(DropMessage(pattern))
    _after_import("diffusers.utils.logging", _diffusers_bars)
    _after_import("transformers.utils.logging", _transformers_bars)
