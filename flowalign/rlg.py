"""RL Guidance (RLG): choose the alignment strength of a LoRA fine-tune at inference time (docs/math.md §7).

For a pipeline whose denoiser carries a LoRA adapter (``pipe.load_lora_weights(dir)``, or
``flowalign.lora.add_lora``), ``enable_rlg(pipe, w)`` makes every denoiser call return

    out_RLG = out_ref + w (out_theta - out_ref)

where ``out_ref`` is the denoiser with all adapters disabled (the base model) and ``out_theta`` the
denoiser with the adapter on. The pipeline's own ``__call__`` is used unchanged: callbacks, output
types, batching and CFG all keep working.

Why it works. If RL fine-tuning reached ``pi_theta ∝ pi_ref exp(R / beta)``, the geometric mix
``pi_ref^(1-w) pi_theta^w ∝ pi_ref exp(w R / beta)`` is the optimum for KL coefficient ``beta / w``.
Log-densities mix linearly, so the scores do: ``s_w = s_ref + w (s_theta - s_ref)``. At a fixed (x, t)
every parametrisation is affine in the score: flow velocity ``v = -(x + t s) / (1 - t)`` (from
``x_t = (1-t) x0 + t eps``), epsilon ``eps = -sigma s``, v-prediction likewise; so the outputs mix with
the same weights: ``v_w = v_ref + w (v_theta - v_ref)``. w = 0 is the base model, w = 1 the fine-tuned
one, w > 1 extrapolates (stronger alignment, the authors use 1-3), 0 < w < 1 interpolates.
(Mixing the scores of the *marginals* p_t is exact for the Gaussian check in the tests, where a base
N(0, 1) and a fine-tuned N(mu, 1) at scale w sample N(w mu, 1); in general it is the usual guidance
approximation.)

CFG. Each CFG branch (conditional and unconditional) is mixed the same way; CFG is linear too, so
``cfg(mix(ref, theta)) = mix(cfg(ref), cfg(theta))``: each model gets its own CFG at the same scale g and the
guided outputs are mixed. Pipelines that batch both branches in one call (SD3, SD/SDXL) and pipelines that
call the denoiser once per branch (FLUX true CFG, Wan) are both covered.

Cost. w = 0 and w = 1 run ONE network evaluation per denoiser call (the other branch is skipped), so they
reproduce the base and fine-tuned outputs bit for bit; any other w runs two.

zero_init_step = N: for the first N denoising steps only the fine-tuned model is used (out = out_theta). Steps are
counted from the timesteps the denoiser receives: within one sampling run the timestep strictly decreases
(Z-Image's transformer receives ``(1000 - t) / 1000``, which rises: counted negated), all calls of one step (e.g.
separate CFG branches) share it, and a timestep larger than the previous one starts a new run at step 0. (Limit: a
run whose first timestep equals the previous run's last one is counted as its continuation; only 1-step runs at the
same timestep do that, and there step 0 is right.)

Implementation: a forward pre-hook and a forward hook on the denoiser (``pipe.transformer``, ``pipe.transformer_2``
when it carries LoRA, or ``pipe.unet``). Two-expert pipelines (Wan2.2 A14B: ``transformer`` for high noise,
``transformer_2`` for low noise) are mixed on both experts, with one step count shared by the two; an expert
without LoRA (``lora_experts="high"`` / ``"low"``) runs as is (there ref = theta) and only counts steps. A denoiser
that returns a list of tensors (Z-Image: one per row) is mixed per tensor. The reference branch is a nested call of
the same module inside the hook with the peft LoRA layers switched off (``BaseTunerLayer.enable_adapters``) and
restored afterwards (also on error); the nested call bypasses the hooks (re-entrancy guard). Not for concurrent
calls of one pipeline from several threads.

Fused / unloaded adapters. RLG needs the adapter as separate LoRA layers: ``pipe.fuse_lora()`` merges it into
the base weights (the reference branch would contain it, and peft silently un-merges a disabled layer), and
``pipe.unload_lora_weights()`` removes the layers (after a fuse, the LoRA stays in the weights, w = 0 would
return the fine-tuned output). So ``enable_rlg`` refuses a pipeline with fused LoRA layers (``pipe.unfuse_lora()``
first) or with LoRAs fused and then unloaded (``pipe.fused_loras``: the base weights are gone), and a denoiser
call raises a RuntimeError, changing nothing, when since ``enable_rlg`` the adapter was fused (``pipe.unfuse_lora()``
makes RLG work again), unloaded, or its layers changed (``disable_rlg``, load the LoRA unfused, ``enable_rlg``).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator, Optional

import torch

from .lora import keep_grad_flags, layers_disabled, lora_layers

_ATTR = "_flowalign_rlg"
DENOISER_NAMES = ("transformer", "transformer_2", "unet")


def rlg_mix(out_ref: torch.Tensor, out_theta: torch.Tensor, scale: float) -> torch.Tensor:
    """``out_ref + w (out_theta - out_ref)``, computed in float32 and returned in out_theta's dtype.

    w = 0 returns out_ref and w = 1 out_theta exactly (no arithmetic)."""
    if scale == 0:
        return out_ref
    if scale == 1:
        return out_theta
    ref = out_ref.float()
    return (ref + scale * (out_theta.float() - ref)).to(out_theta.dtype)


@contextmanager
def _only_adapter(layers, name: Optional[str]) -> Iterator[None]:
    """Only adapter ``name`` active (None: leave the active adapters as they are), restored after."""
    if name is None:
        yield
        return
    previous = [list(m.active_adapters) for m in layers]
    with keep_grad_flags(layers):
        for m in layers:  # a layer without ``name`` then runs no adapter (peft skips unknown names)
            m.set_adapter(name)
        try:
            yield
        finally:
            for m, prev in zip(layers, previous):
                m.set_adapter(prev)


# denoisers whose timestep input RISES during sampling (Z-Image passes (1000 - t) / 1000): counted negated
RISING_TIMESTEP = ("ZImageTransformer2DModel",)


def _timestep(mod: torch.nn.Module, args: tuple, kwargs: dict) -> Optional[float]:
    """The denoiser call's timestep as a number that decreases within one sampling run."""
    t = kwargs.get("timestep", args[1] if len(args) > 1 else None)
    if t is None:
        return None
    t = torch.as_tensor(t).detach().float()
    return -float(t.min()) if type(mod).__name__ in RISING_TIMESTEP else float(t.max())


def _mix_outputs(ref, theta, scale: float):
    """``rlg_mix`` of a denoiser's output, a tensor or a list of them (Z-Image returns one tensor per row)."""
    if isinstance(theta, (list, tuple)):
        return type(theta)(rlg_mix(r, o, scale) for r, o in zip(ref, theta))
    return rlg_mix(ref, theta, scale)


def _first_tensor(output):
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, tuple):
        return output[0]
    return output[0]  # diffusers BaseOutput (Transformer2DModelOutput / UNet2DConditionOutput): .sample first


def _replace_first(output, value):
    if isinstance(output, torch.Tensor):
        return value
    if isinstance(output, tuple):
        return (value, *output[1:])
    key = next(iter(output.keys()))
    return type(output)(**{**output, key: value})


@dataclass
class _RLGState:
    """Per-pipeline RLG settings and hook handles (stored on the pipeline as ``_flowalign_rlg``)."""

    scale: float
    adapter_name: Optional[str]
    zero_init_step: int
    handles: list = field(default_factory=list)
    step: int = 0
    last_t: Optional[float] = None
    inside: bool = False  # re-entrancy guard: the nested reference call bypasses the hooks

    def count_step(self, t: Optional[float]) -> int:
        """Step index of a denoiser call at timestep t (see the module docstring)."""
        if t is None:
            return self.step
        if self.last_t is None or t > self.last_t:
            self.step = 0
        elif t < self.last_t:
            self.step += 1
        self.last_t = t
        return self.step


def _fused(layers) -> list[str]:
    """Names of the adapters merged into the base weights of any of ``layers`` (``fuse_lora``)."""
    return sorted({n for m in layers for n in m.merged_adapters})


def _check_layers(mod: torch.nn.Module, layers: list) -> None:
    """RuntimeError unless ``mod``'s LoRA layers are still ``layers``, none of them fused (see the docstring)."""
    name, now = type(mod).__name__, lora_layers(mod)
    if not now:
        raise RuntimeError(f"RLG: the LoRA adapter of {name} was unloaded (unload_lora_weights) after enable_rlg; "
                           "weights fused before that cannot be separated: call disable_rlg(pipe), load the LoRA "
                           "unfused and enable_rlg again")
    if now != layers:
        raise RuntimeError(f"RLG: the LoRA layers of {name} changed (LoRA unloaded or loaded) after enable_rlg: "
                           "call enable_rlg(pipe, ...) again")
    fused = _fused(layers)
    if fused:
        raise RuntimeError(f"RLG: LoRA adapter(s) {', '.join(fused)} of {name} were fused into its weights "
                           "(fuse_lora) after enable_rlg; RLG needs them unfused: call pipe.unfuse_lora()")


def _refuse_fused(pipe) -> None:
    """ValueError if a LoRA of ``pipe`` is fused into its denoiser, or was fused and then unloaded (diffusers'
    ``pipe.fused_loras`` keeps the names; the LoRA stays in the base weights)."""
    comps = [c for c in getattr(pipe, "components", {}).values() if isinstance(c, torch.nn.Module)]
    gone = sorted(set(getattr(pipe, "fused_loras", None) or ()) - {n for c in comps for n in _fused(lora_layers(c))})
    if gone:
        raise ValueError(f"LoRA adapter(s) {', '.join(gone)} were fused (fuse_lora) and then unloaded: the base "
                         "weights contain them, RLG has no reference model; reload the pipeline, load the LoRA unfused")
    fused = sorted({n for d in _denoisers(pipe) for n in _fused(lora_layers(d))})
    if fused:
        raise ValueError(f"LoRA adapter(s) {', '.join(fused)} are fused into the denoiser weights (fuse_lora); RLG "
                         "needs them unfused: call pipe.unfuse_lora() before enable_rlg")


def _make_hooks(state: _RLGState, layers: list):
    """(pre_hook, post_hook) for one denoiser whose peft LoRA layers are ``layers``."""
    open_ctx: list = []  # the adapter context of the outer call: opened in the pre-hook, closed in the post-hook

    def pre_hook(mod, args, kwargs):
        if state.inside:
            return None
        _check_layers(mod, layers)  # raises before any state changes
        step = state.count_step(_timestep(mod, args, kwargs))
        if step < state.zero_init_step or state.scale == 1:
            mode = "theta"  # fine-tuned model only: one evaluation
        elif state.scale == 0:
            mode = "ref"  # base model only: one evaluation
        else:
            mode = "mix"  # this call is the theta branch; the post-hook adds the reference branch
        ctx = layers_disabled(layers) if mode == "ref" else _only_adapter(layers, state.adapter_name)
        ctx.__enter__()
        open_ctx.append((ctx, mode))
        return None

    def post_hook(mod, args, kwargs, output):
        if state.inside or not open_ctx:
            return None
        ctx, mode = open_ctx.pop()
        ctx.__exit__(None, None, None)
        if mode != "mix" or output is None:  # output None: forward raised (always_call hook), just restore
            return None
        state.inside = True
        try:
            with layers_disabled(layers):
                ref = mod(*args, **kwargs)
        finally:
            state.inside = False
        return _replace_first(output, _mix_outputs(_first_tensor(ref), _first_tensor(output), state.scale))

    return pre_hook, post_hook


def _present(pipe) -> list[torch.nn.Module]:
    found = [getattr(pipe, n, None) for n in DENOISER_NAMES]
    return [d for d in found if isinstance(d, torch.nn.Module)]


def _denoisers(pipe) -> list[torch.nn.Module]:
    return [d for d in _present(pipe) if lora_layers(d)]


def _counting_hook(state: _RLGState):
    """Pre-hook of a denoiser without LoRA (one expert of two): its calls only advance the shared step count."""

    def pre_hook(mod, args, kwargs):
        if not state.inside:
            state.count_step(_timestep(mod, args, kwargs))
        return None

    return pre_hook


def enable_rlg(pipe, scale: float, adapter_name: Optional[str] = None, zero_init_step: int = 0):
    """Make ``pipe(...)`` sample with RL guidance ``out = out_ref + scale (out_theta - out_ref)``.

    Args:
        pipe: a diffusers pipeline (SD3, FLUX, SD1.5, SDXL, Wan) whose denoiser has a LoRA adapter.
        scale: w. 0 = base model, 1 = fine-tuned, > 1 stronger alignment; any finite float.
        adapter_name: the adapter used as the fine-tuned model (None: the currently active adapters,
            with their diffusers ``set_adapters`` weights).
        zero_init_step: the first N denoising steps use the fine-tuned model alone.
    Calling it again replaces the settings (one set of hooks; adapters loaded since are picked up).
    Raises ValueError for fused LoRAs (``pipe.fuse_lora()``; see the module docstring).
    Returns ``pipe``.
    """
    scale = float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"RLG scale must be a finite number, got {scale}")
    if int(zero_init_step) != zero_init_step or zero_init_step < 0:
        raise ValueError(f"zero_init_step must be an integer >= 0, got {zero_init_step}")
    _refuse_fused(pipe)
    dens = _denoisers(pipe)
    if not dens:
        raise ValueError(f"{type(pipe).__name__} has no LoRA adapter on its denoiser: load one with "
                         "pipe.load_lora_weights(dir) before enable_rlg")
    if adapter_name is not None:
        names = {n for d in dens for m in lora_layers(d) for n in m._get_available_adapters()}
        if adapter_name not in names:
            raise ValueError(f"no LoRA adapter named {adapter_name!r} (have: {', '.join(sorted(names))})")
    disable_rlg(pipe)  # calling again: new settings, hooks installed once, fresh step count
    state = _RLGState(scale=scale, adapter_name=adapter_name, zero_init_step=int(zero_init_step))
    for den in dens:
        pre, post = _make_hooks(state, lora_layers(den))
        state.handles.append(den.register_forward_pre_hook(pre, with_kwargs=True))
        # always_call: the hook also runs when forward raises, so the adapters are switched back on
        state.handles.append(den.register_forward_hook(post, with_kwargs=True, always_call=True))
    for den in _present(pipe):
        if not any(den is d for d in dens):  # an expert without LoRA: counted, so zero_init_step sees every step
            state.handles.append(den.register_forward_pre_hook(_counting_hook(state), with_kwargs=True))
    setattr(pipe, _ATTR, state)
    return pipe


def disable_rlg(pipe):
    """Remove RL guidance: ``pipe(...)`` samples with the adapters as configured before. Returns ``pipe``."""
    state: Optional[_RLGState] = getattr(pipe, _ATTR, None)
    if state is not None:
        for handle in state.handles:
            handle.remove()
        delattr(pipe, _ATTR)
    return pipe


def rlg_scale(pipe) -> Optional[float]:
    """The active RLG scale of ``pipe`` (None when RLG is off)."""
    state = getattr(pipe, _ATTR, None)
    return None if state is None else state.scale


__all__ = ["enable_rlg", "disable_rlg", "rlg_mix", "rlg_scale"]
