"""flowalign: align diffusion and flow-matching generators to rewards with LoRA adapters.

The names most users need are here (imported on first use, so ``import flowalign`` stays light)::

    import flowalign
    adapter = flowalign.load_adapter(flowalign.asset("toy-sd3"))   # or flowalign.adapter_for(pipe)
    cfg = flowalign.load_config("configs/toy_grpo.yaml", ["train.iterations=2"])
    flowalign.Trainer(cfg).train()
    flowalign.enable_rlg(pipe, 1.5)                                 # RL Guidance on any supported pipeline
    flowalign.enable_nrg(pipe, {"clip_score": 2.0})                 # Flow-NRG reward guidance (SD3 pipelines)
    reward = flowalign.rewards.get("toy_geneval")

Subpackages: ``flowalign.samplers`` (per-step Gaussian transitions, torch only), ``flowalign.rewards`` (reward
models), ``flowalign.models`` (pipeline adapters), ``flowalign.algorithms`` (losses and update rules, the
``ALGORITHMS`` table), ``flowalign.runtime`` (checkpoints, distributed, FSDP, metrics), ``flowalign.evaluation``
(held-out evaluation, report pictures), ``flowalign.apps`` (the command-line front-ends) and ``flowalign.toy``
(the offline scene world). ``flowalign.callbacks`` observes a training run (docs/extending.md).
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> (module, attribute); attribute None = the module itself. No name here may be a submodule's (the
# import system sets flowalign.<submodule> to the module once it is imported, hiding this table's entry).
_API = {
    "load_adapter": ("flowalign.models", "load_adapter"),
    "adapter_for": ("flowalign.models", "adapter_for"),
    "load_pipeline": ("flowalign.models", "load_pipeline"),
    "enable_rlg": ("flowalign.rlg", "enable_rlg"),
    "disable_rlg": ("flowalign.rlg", "disable_rlg"),
    "enable_nrg": ("flowalign.nrg", "enable_nrg"),
    "disable_nrg": ("flowalign.nrg", "disable_nrg"),
    "Trainer": ("flowalign.trainer", "Trainer"),
    "TrainerCallback": ("flowalign.callbacks", "TrainerCallback"),
    "run_training": ("flowalign.trainer", "run_training"),
    "Config": ("flowalign.config", "Config"),
    "load_config": ("flowalign.config", "load_config"),
    "asset": ("flowalign.resources", "asset"),
    "shipped_config": ("flowalign.resources", "shipped_config"),
    "lora": ("flowalign.lora", None),
    "rewards": ("flowalign.rewards", None),
    "samplers": ("flowalign.samplers", None),
}
__all__ = sorted(_API)


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module 'flowalign' has no attribute {name!r}")
    module, attribute = _API[name]
    value = importlib.import_module(module)
    return value if attribute is None else getattr(value, attribute)


def __dir__():
    return sorted([*globals(), *_API])
