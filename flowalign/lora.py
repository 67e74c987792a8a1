"""LoRA on the denoiser (transformer or UNet) via peft, in the diffusers LoRA format.

- ``add_lora(adapter, rank, alpha, dropout, adapter_name, target_modules)``: inject (B = 0 at start).
- ``adapter_disabled(adapter)``: context running the base model (reference predictions with no second
  copy of the weights).
- several named adapters on one base: ``set_active_adapter`` / ``using_adapter`` (multi-teacher
  distillation); switching keeps each adapter's ``requires_grad`` as it was (frozen teachers stay frozen).
- ``lora_state_dict`` gives one adapter's whole weights (gathered from the shards of an FSDP-sharded denoiser);
  ``save_lora`` writes ``pytorch_lora_weights.safetensors`` + LoraConfig metadata with the pipeline class's
  ``save_lora_weights``, so ``pipe.load_lora_weights(dir)`` on a fresh pipeline reproduces the outputs;
  ``load_lora`` loads such a folder as a named adapter.
- ``set_precision`` (bf16/fp16 base weights, float32 LoRA; bf16: the whole pipeline), ``load_dtypes`` (the
  same policy as ``from_pretrained(torch_dtype=...)``, so big weights never exist in float32) and
  ``set_gradient_checkpointing``.
- two-expert pipelines (Wan2.2 A14B: ``transformer`` + ``transformer_2``): every helper acts on all of the adapter's
  ``denoisers``; ``add_lora`` puts the LoRA on its ``lora_denoisers`` (``WanAdapter(lora_experts=...)``) and
  ``save_lora`` writes ``transformer_2``'s to ``<out_dir>/transformer_2/`` (load it with
  ``pipe.load_lora_weights(f"{out_dir}/transformer_2", load_into_transformer_2=True)``; :func:`load_lora_weights`
  does both).
LoRA output: ``W x + (alpha / rank) B A x``.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator, Optional, Sequence

import torch

from .models.base import PipelineAdapter
from .models.registry import ADAPTERS

# family -> default LoRA targets, from each adapter's ``lora_target_modules`` (flowalign.models.registry)
LORA_TARGET_MODULES: dict[str, list[str]] = {f: list(cls.lora_target_modules) for f, cls in ADAPTERS.items()}
_SAVE_PREFIX = {"transformer": "transformer", "unet": "unet"}  # <prefix>_lora_layers in save_lora_weights
_SECOND_EXPERTS = ("transformer_2.",)  # lora_state_dict key prefix of a second expert (Wan2.2's low-noise one)


def lora_layers(module: torch.nn.Module) -> list:
    """The peft tuner layers (LoRA-wrapped Linears) inside ``module``."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in module.modules() if isinstance(m, BaseTunerLayer)]


def _named_denoisers(adapter: PipelineAdapter) -> list[tuple[str, torch.nn.Module]]:
    """(pipeline attribute, module) of every denoiser of the adapter: one, or a two-expert pipeline's two."""
    return [(n, getattr(adapter.pipe, n)) for n in adapter.denoiser_names]


def _denoisers(adapter: PipelineAdapter) -> list[torch.nn.Module]:
    return [d for _, d in _named_denoisers(adapter)]


def _lora_modules(adapter: PipelineAdapter):
    return [m for d in _denoisers(adapter) for m in lora_layers(d)]


def _with_adapter(adapter: PipelineAdapter, adapter_name: str) -> list[tuple[str, torch.nn.Module]]:
    """The denoisers that carry LoRA adapter ``adapter_name``."""
    return [(n, d) for n, d in _named_denoisers(adapter) if adapter_name in (getattr(d, "peft_config", {}) or {})]


@contextmanager
def keep_grad_flags(layers) -> Iterator[None]:
    """peft's enable_adapters / set_adapter switch requires_grad on; put every LoRA flag back afterwards."""
    params = [p for m in layers for n, p in m.named_parameters() if "lora_" in n]
    flags = [p.requires_grad for p in params]
    try:
        yield
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)


@contextmanager
def layers_disabled(layers) -> Iterator[None]:
    """All given LoRA layers bypassed (the base model) inside the block; state and grad flags restored after."""
    was_off = [m.disable_adapters for m in layers]
    with keep_grad_flags(layers):
        for m in layers:
            m.enable_adapters(False)
        try:
            yield
        finally:
            for m, off in zip(layers, was_off):
                m.enable_adapters(not off)


def adapter_names(adapter: PipelineAdapter) -> list[str]:
    """Names of the LoRA adapters on the denoiser(s)."""
    return list(dict.fromkeys(n for d in _denoisers(adapter) for n in (getattr(d, "peft_config", {}) or {})))


def _require(adapter: PipelineAdapter, name: str) -> None:
    if name not in adapter_names(adapter):
        raise KeyError(f"no LoRA adapter named {name!r} (have: {adapter_names(adapter) or 'none'}); "
                       "add it with add_lora(...) or load_lora(...)")


def lora_parameters(adapter: PipelineAdapter, adapter_name: str = "default") -> list[torch.nn.Parameter]:
    """The LoRA parameters of one adapter (for the optimizer)."""
    _require(adapter, adapter_name)
    return [p for d in _denoisers(adapter) for n, p in d.named_parameters()
            if "lora_" in n and f".{adapter_name}." in n]


def add_lora(
    adapter: PipelineAdapter,
    rank: int = 32,
    alpha: Optional[float] = None,
    dropout: float = 0.0,
    adapter_name: str = "default",
    target_modules: Optional[Sequence[str]] = None,
    trainable: bool = True,
    init_lora_weights=True,
) -> list[torch.nn.Parameter]:
    """Inject a LoRA adapter into the denoiser (each of the adapter's ``lora_denoisers`` for two-expert pipelines),
    make it active and return its (float32) parameters.

    alpha defaults to 2 * rank (Flow-GRPO's r32/alpha64); target_modules default to
    ``LORA_TARGET_MODULES[family]``. Other adapters stay on the model (inactive).
    """
    from peft import LoraConfig

    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    if adapter_name in adapter_names(adapter):
        raise ValueError(f"LoRA adapter {adapter_name!r} already exists; pick another adapter_name")
    flags = _grad_flags(adapter)
    for den in adapter.lora_denoisers:
        config = LoraConfig(  # one config per expert: peft keeps (and may edit) the object it is given
            r=rank, lora_alpha=float(2 * rank if alpha is None else alpha), lora_dropout=dropout,
            target_modules=list(target_modules or adapter.lora_target_modules), init_lora_weights=init_lora_weights,
        )
        den.add_adapter(config, adapter_name=adapter_name)
    _restore_grad_flags(flags)
    params = lora_parameters(adapter, adapter_name)
    for p in params:
        p.data = p.data.float()
        p.requires_grad_(trainable)
    return params


def _grad_flags(adapter: PipelineAdapter) -> dict[torch.nn.Parameter, bool]:
    return {p: p.requires_grad for d in _denoisers(adapter) for n, p in d.named_parameters() if "lora_" in n}


def _restore_grad_flags(flags: dict[torch.nn.Parameter, bool]) -> None:
    for p, flag in flags.items():
        p.requires_grad_(flag)


def active_adapter(adapter: PipelineAdapter) -> Optional[str]:
    """Name of the active LoRA adapter (None without LoRA)."""
    mods = _lora_modules(adapter)
    if not mods:
        return None
    active = mods[0].active_adapters
    return active[0] if active else None


def set_active_adapter(adapter: PipelineAdapter, adapter_name: str) -> None:
    """Make ``adapter_name`` the only active LoRA; every adapter keeps its requires_grad flags."""
    _require(adapter, adapter_name)
    flags = _grad_flags(adapter)
    for _, den in _with_adapter(adapter, adapter_name):
        den.set_adapter(adapter_name)
    _restore_grad_flags(flags)


@contextmanager
def using_adapter(adapter: PipelineAdapter, adapter_name: str) -> Iterator[None]:
    """Run with ``adapter_name`` active, then switch back (e.g. a teacher's prediction)."""
    previous = active_adapter(adapter)
    set_active_adapter(adapter, adapter_name)
    try:
        yield
    finally:
        if previous is not None:
            set_active_adapter(adapter, previous)


@contextmanager
def adapter_disabled(adapter: PipelineAdapter) -> Iterator[None]:
    """Run the base model: all LoRA layers bypassed inside the block, restored after (no weight copy);
    frozen adapters (teachers) stay frozen."""
    with layers_disabled(_lora_modules(adapter)):
        yield


def lora_state_dict(adapter: PipelineAdapter, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """One adapter's weights {peft key: float32 tensor}, whole: a sharded (FSDP) denoiser's shards are gathered,
    a collective that every process must call. A second expert's keys start with ``transformer_2.``."""
    from peft import get_peft_model_state_dict

    from .runtime.fsdp import full

    _require(adapter, adapter_name)
    out = {}
    for name, den in _with_adapter(adapter, adapter_name):
        prefix = "" if name == adapter.denoiser_name else f"{name}."
        state = get_peft_model_state_dict(den, adapter_name=adapter_name)
        out.update({prefix + k: full(v.detach()).float().contiguous() for k, v in state.items()})
    return out


def save_lora(adapter: PipelineAdapter, out_dir: str, adapter_name: str = "default", write: bool = True,
              state: Optional[dict] = None) -> str:
    """Write one adapter in the diffusers LoRA format (``pipe.load_lora_weights(out_dir)`` reads it back).
    Returns out_dir. ``state``: its ``lora_state_dict`` when already gathered. A sharded (FSDP) denoiser's
    weights are gathered first, a collective: every process calls this, only the one with ``write`` writes."""
    from diffusers.utils import convert_state_dict_to_diffusers

    state = lora_state_dict(adapter, adapter_name) if state is None else state
    if not write:
        return out_dir
    for name, den in _with_adapter(adapter, adapter_name):
        if name == adapter.denoiser_name:
            part, folder = {k: v for k, v in state.items() if not k.startswith(_SECOND_EXPERTS)}, out_dir
        else:  # diffusers saves one transformer per file: the second expert's goes to its own folder
            part = {k[len(name) + 1:]: v for k, v in state.items() if k.startswith(f"{name}.")}
            folder = os.path.join(out_dir, name)
        if adapter.denoiser_name == "unet":
            part = convert_state_dict_to_diffusers(part)
        prefix = _SAVE_PREFIX[adapter.denoiser_name]
        meta = den.peft_config[adapter_name].to_dict()
        type(adapter.pipe).save_lora_weights(
            folder, **{f"{prefix}_lora_layers": part, f"{prefix}_lora_adapter_metadata": meta}
        )
    return out_dir


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def load_lora_weights(pipe, path: str, adapter_name: Optional[str] = None) -> None:
    """``pipe.load_lora_weights(path)`` for a diffusers-format LoRA folder or ``.safetensors`` file, safetensors
    only: a pickled file (.bin, .pt, ...) can run code when loaded and is refused. Every failure is one line
    (FileNotFoundError, or ValueError for a pickle, a damaged file or one that is not a LoRA of this pipeline).
    A folder's ``transformer_2/`` LoRA (a two-expert Wan2.2's low-noise expert, :func:`save_lora`) is loaded into
    ``pipe.transformer_2`` (``load_into_transformer_2=True``)."""
    name = os.path.basename(os.path.normpath(path)) or path
    if not os.path.exists(path):
        raise FileNotFoundError(f"LoRA {path!r} not found: pass a folder written by flowalign train/demo")
    files = os.listdir(path) if os.path.isdir(path) else [os.path.basename(path)]
    second = os.path.join(path, "transformer_2")
    second = second if os.path.isdir(second) and any(f.endswith(".safetensors") for f in os.listdir(second)) else None
    if second is not None and getattr(pipe, "transformer_2", None) is None:
        raise ValueError(f"LoRA {name} holds a transformer_2 (low-noise expert) LoRA but {type(pipe).__name__} has "
                         "no transformer_2: load it into a two-expert Wan2.2 pipeline")
    top = any(f.endswith(".safetensors") for f in files)
    loads = ([(path, {})] if top or second is None else []) + \
        ([] if second is None else [(second, {"load_into_transformer_2": True})])  # the low-noise expert's
    if not top and second is None:
        pickled = [f for f in files if f.endswith(PICKLE_SUFFIXES)]
        what = f"holds pickled weights ({pickled[0]}), which can run code when loaded" if pickled else \
            "holds no .safetensors file"
        raise ValueError(f"LoRA {name} {what}: flowalign loads .safetensors only; re-save it with "
                         "safetensors.torch.save_file (or pipe.save_lora_weights)")
    from safetensors import SafetensorError

    kwargs = {} if adapter_name is None else {"adapter_name": adapter_name}
    try:
        for where, extra in loads:
            pipe.load_lora_weights(where, use_safetensors=True, **kwargs, **extra)
    except (SafetensorError, OSError, ValueError, KeyError, RuntimeError) as err:
        short = str(err).splitlines()[0][:120] if str(err) else type(err).__name__
        raise ValueError(f"LoRA {name} could not be loaded ({type(err).__name__}: {short}): the file is damaged "
                         "or not a LoRA of this pipeline; write it again with flowalign train/demo") from None


def load_lora(adapter: PipelineAdapter, path: str, adapter_name: str = "default", trainable: bool = False) -> list:
    """Load a diffusers-format LoRA folder/file as adapter ``adapter_name`` (frozen unless trainable); safetensors
    only, never a pickle. The previously active adapter stays active. Returns its parameters."""
    if adapter_name in adapter_names(adapter):
        raise ValueError(f"LoRA adapter {adapter_name!r} already exists; pick another adapter_name")
    previous = active_adapter(adapter)
    flags = _grad_flags(adapter)
    load_lora_weights(adapter.pipe, path, adapter_name)
    _restore_grad_flags(flags)
    params = lora_parameters(adapter, adapter_name)
    for p in params:
        p.requires_grad_(trainable)
    if previous is not None:
        set_active_adapter(adapter, previous)
    return params


_DENOISERS = ("transformer", "transformer_2", "unet")  # pipeline components that are denoisers


def load_dtypes(dtype: torch.dtype):
    """``torch_dtype`` for ``<Pipeline>.from_pretrained`` under :func:`set_precision`'s policy, so the big
    weights load straight in ``dtype`` (FLUX.1-dev in float32: 48 GB transformer, 19 GB T5-XXL): float32 ->
    None (all float32); bfloat16 -> bfloat16 (every component); float16 -> the denoiser fp16, the rest float32
    (T5 overflows in fp16; SDXL's VAE too). Names a pipeline lacks are ignored."""
    if dtype == torch.float32:
        return None
    if dtype == torch.bfloat16:
        return torch.bfloat16
    return {"default": torch.float32, **{n: dtype for n in _DENOISERS}}


def set_precision(adapter: PipelineAdapter, dtype: torch.dtype = torch.bfloat16) -> None:
    """Mixed precision: denoiser base weights in ``dtype`` (bf16/fp16), LoRA parameters float32; the text
    encoders and VAE in bf16 with bfloat16 (as ``from_pretrained(torch_dtype=torch.bfloat16)``), else float32:
    the layout :func:`load_dtypes` loads. flowalign's rollouts keep float32 latents and sampler math (the
    samplers cast their inputs; ``decode`` casts to the VAE's dtype).

    The pipeline's own ``__call__`` (held-out evaluation, sampling) may feed the denoiser latents of another
    dtype (float32 with fp16): a forward pre-hook casts the inputs to ``dtype`` (timesteps stay as given) and a
    forward hook returns the prediction in the caller's dtype, so the scheduler and the VAE get theirs. With
    bf16 the pipeline runs bf16 latents, as any bf16 diffusers pipeline.
    """
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype}")
    rest = torch.bfloat16 if dtype == torch.bfloat16 else torch.float32  # the layout load_dtypes(dtype) loads
    for name, component in adapter.pipe.components.items():
        if isinstance(component, torch.nn.Module) and name not in _DENOISERS:
            _to(component, rest)
    for den in _denoisers(adapter):  # every expert of a two-expert pipeline
        _to(den, dtype)
        for n, p in den.named_parameters():
            if "lora_" in n:
                p.data = p.data.float()
        set_cast_hooks(den, dtype)


def set_cast_hooks(denoiser: torch.nn.Module, dtype: torch.dtype) -> None:
    """The denoiser's input/output casting hooks for base weights in ``dtype`` (none for float32); replaces any
    installed before (set_precision's, or the doctor's while it measures another dtype)."""
    for handle in getattr(denoiser, "_flowalign_cast_hooks", ()):
        handle.remove()
    denoiser._flowalign_cast_hooks = () if dtype == torch.float32 else (
        denoiser.register_forward_pre_hook(_cast_inputs(dtype), with_kwargs=True),
        denoiser.register_forward_hook(_cast_outputs_back))


def _to(module: torch.nn.Module, dtype: torch.dtype) -> None:
    """``module.to(dtype)`` unless every floating weight already has it (diffusers warns on each ``to``)."""
    if any(p.is_floating_point() and p.dtype != dtype for p in [*module.parameters(), *module.buffers()]):
        module.to(dtype)


def _cast(v, dtype: torch.dtype, name: str = ""):
    """Floating tensors in ``v`` (a tensor, or one level into a dict / tuple / model output) cast to ``dtype``;
    arguments named ``*timestep*`` untouched."""
    if isinstance(v, torch.Tensor):
        return v.to(dtype) if v.is_floating_point() and v.dtype != dtype and "timestep" not in name else v
    if isinstance(v, dict):  # also diffusers' BaseOutput (an OrderedDict)
        for k in list(v.keys()):
            v[k] = _cast(v[k], dtype, k) if not isinstance(v[k], dict) else v[k]
        return v
    if isinstance(v, tuple):
        return tuple(_cast(x, dtype) if not isinstance(x, (dict, tuple)) else x for x in v)
    return v


def _cast_inputs(dtype: torch.dtype):
    """Forward pre-hook: the denoiser's floating inputs cast to ``dtype`` (SDXL's ``added_cond_kwargs`` dict
    too); remembers the caller's dtype so :func:`_cast_outputs_back` returns the prediction in it."""

    def hook(module, args, kwargs):
        named = [*(("", a) for a in args), *kwargs.items()]
        given = [v for k, v in named if isinstance(v, torch.Tensor) and v.is_floating_point() and "timestep" not in k]
        module._flowalign_caller_dtype = given[0].dtype if given and given[0].dtype != dtype else None
        return (tuple(_cast(a, dtype) for a in args),
                {k: _cast(dict(v), dtype) if isinstance(v, dict) else _cast(v, dtype, k) for k, v in kwargs.items()})

    return hook


def _cast_outputs_back(module, args, output):
    """Forward hook: a prediction made for a caller that passed another dtype (the pipeline's float32 latents)
    goes back in that dtype, so the scheduler keeps float32 latents for the VAE."""
    caller = getattr(module, "_flowalign_caller_dtype", None)
    return _cast(output, caller) if caller is not None else output


def set_gradient_checkpointing(adapter: PipelineAdapter, enabled: bool = True) -> None:
    """Recompute activations in the backward pass (less memory, ~30% more compute); every expert of a two-expert
    pipeline."""
    for den in _denoisers(adapter):
        if enabled:
            den.enable_gradient_checkpointing()
        else:
            den.disable_gradient_checkpointing()
