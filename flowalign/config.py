"""Configuration dataclasses. Fields carry their help text; each section validates in ``__post_init__``
and fails with a message that says how to fix it. YAML and ``key=value`` overrides fill them
(``load_config``); nothing mutates a config after start-up.

Every error from building a config (YAML, overrides, ``config_from_dict`` or the dataclasses built from Python) is
a ``ValueError`` (``FileNotFoundError`` for a config file that is not there) of one line, at most ``MAX_MESSAGE``
characters, naming ``section.key`` and what it accepts; values in messages are shortened and file contents are
never echoed. Numbers must be finite; integers must be ints (not bools or floats).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
import reprlib
from dataclasses import dataclass, field, fields
from typing import Any, Optional

from .resources import asset
from .runtime.kernels import ATTENTION_BACKENDS

DEFAULT_MODEL = asset("toy-sd3")  # the shipped tiny pipeline (flowalign.resources)


SHARDINGS = ("none", "fsdp")  # flowalign.runtime.distributed / flowalign.runtime.fsdp
LOGGERS = ("tensorboard", "wandb")

# bounds of what a config may hold (bad input fails with one line instead of a RecursionError or a huge message)
MAX_DEPTH = 12  # nesting of a whole config: sections -> keys -> mapping fields (opd.teachers.TASK.lora = 4)
MAX_NODES = 10_000  # values (mappings, lists, scalars) in one config or one field, YAML aliases counted each time
MAX_CONFIG_BYTES = 1 << 20  # a config file (the shipped recipes are ~2 kB)
MAX_PATH_CHARS = 4096  # a path or hub id (PATH_MAX)
MAX_TEXT_CHARS = 10_000  # a prompt (negative_prompt; flowalign.prompts reads prompt files with the same bound)
MAX_NAME_CHARS = 200  # a name: reward, schedule, divergence, logger
MAX_INT = 2**63 - 1  # integers fit int64 (torch / numpy)
MAX_MESSAGE = 300  # characters of one error message

_REPR = reprlib.Repr()
_REPR.maxstring, _REPR.maxother, _REPR.maxlong, _REPR.maxlevel = 60, 60, 40, 3
_REPR.maxlist = _REPR.maxtuple = _REPR.maxset = _REPR.maxfrozenset = _REPR.maxdict = 6


def _short(value: Any) -> str:
    """``repr(value)`` shortened for an error message (at most ~70 characters, one line, nesting cut)."""
    try:
        text = _REPR.repr(value)
    except Exception:  # a value whose own __repr__ fails still gets a message
        text = f"<{type(value).__name__}>"
    text = text.replace("\n", "\\n").replace("\r", "\\r")
    return text if len(text) <= 70 else text[:60] + "..." + text[-7:]


def _short_path(path: Any) -> str:
    """A path for an error message: as given when short, else only (the end of) its file name; never contents."""
    try:
        text = os.fspath(path)
    except TypeError:
        return _short(path)
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    if len(text) <= 120 and "\x00" not in text and text.isprintable():
        return repr(text)
    name = os.path.basename(text.rstrip("/")) or text
    return _short(".../" + name if len(name) <= 60 else "..." + name[-57:])


def _one_line(text: str, limit: int = 240) -> str:
    """``text`` on one line, cut to ``limit`` characters."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _names(names, limit: int = 170, first: tuple = ()) -> str:
    """``names`` joined for a message, ``first`` (close matches) in front, cut to about ``limit`` characters."""
    names = [*first, *(n for n in names if n not in first)]
    out, size = [], 0
    for i, n in enumerate(names):
        if out and size + len(n) + 2 > limit:
            return ", ".join(out) + f", ... ({len(names) - i} more)"
        out.append(n)
        size += len(n) + 2
    return ", ".join(out)


def _help(text: str, default: Any) -> Any:
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": text})
    return field(default=default, metadata={"help": text})


def _choice(section: str, name: str, value: Any, choices: tuple) -> None:
    try:
        ok = value in choices
    except Exception:  # a value that cannot be compared is no choice
        ok = False
    if not ok:
        raise ValueError(f"{section}.{name}={_short(value)} is not valid; choose one of {_names(map(str, choices))}")


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _range(section: str, name: str, value: Any, rule: str, ok) -> None:
    """One range check: ``value`` must be a finite number with ``ok(value)``; the message says ``rule``."""
    finite = _is_number(value) and math.isfinite(value)
    if not finite or not ok(value):
        what = rule if finite or not _is_number(value) else f"a finite number {rule}"
        raise ValueError(f"{section}.{name} must be {what}, got {_short(value)}")


def _fraction(section: str, name: str, value: float) -> None:
    _range(section, name, value, "in (0, 1]", lambda v: 0 < v <= 1)


def _decay(section: str, name: str, value: float) -> None:
    """An EMA decay d in ``snap <- d snap + (1 - d) theta``: [0, 1) (1 would never move)."""
    _range(section, name, value, "in [0, 1)", lambda v: 0 <= v < 1)


def _positive(section: str, name: str, value: float, allow_zero: bool = False) -> None:
    if allow_zero:
        _range(section, name, value, ">= 0", lambda v: v >= 0)
    else:
        _range(section, name, value, "> 0", lambda v: v > 0)


def _text(section: str, name: str, value: Any, limit: int, what: str = "a string", empty: bool = False) -> None:
    """A string of at most ``limit`` characters without NUL bytes (non-empty unless ``empty``)."""
    if not isinstance(value, str) or (not value and not empty) or len(value) > limit or "\x00" in value:
        shown = _short_path(value) if isinstance(value, str) else _short(value)
        raise ValueError(f"{section}.{name} must be {what} (a{'' if empty else ' non-empty'} string, at most {limit} "
                         f"characters, no NUL), got {shown}")


def _path(section: str, name: str, value: Any, what: str = "a path") -> None:
    _text(section, name, value, MAX_PATH_CHARS, what)


def _ints(section: str, name: str, value: Any, n: int, form: str) -> tuple:
    """A list of ``n`` integers (``form`` names them, e.g. '[start, length]') -> a tuple of ints."""
    if not isinstance(value, (list, tuple)) or len(value) != n or \
            not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) and abs(v) <= MAX_INT for v in value):
        raise ValueError(f"{section}.{name}={_short(value)} must be {form}: {n} integers")
    return tuple(int(v) for v in value)


def _numbers(section: str, name: str, value: Any, n: int, form: str) -> tuple:
    """A list of ``n`` finite numbers -> a tuple of floats."""
    if not isinstance(value, (list, tuple)) or len(value) != n or \
            not all(_is_number(v) and math.isfinite(v) for v in value):
        raise ValueError(f"{section}.{name}={_short(value)} must be {form}: {n} finite numbers")
    return tuple(float(v) for v in value)


def _shape(where: str, value: Any, max_depth: int) -> None:
    """Nesting of ``value`` (mappings and lists) at most ``max_depth`` deep and ``MAX_NODES`` values, checked
    without recursion (a self-referencing YAML alias or a deep list fails here, not with a RecursionError)."""
    stack, nodes = [(value, 1)], 0
    while stack:
        v, depth = stack.pop()
        nodes += 1
        if nodes > MAX_NODES:
            raise ValueError(f"{where} holds more than {MAX_NODES} values: a config is a few mappings of settings")
        if isinstance(v, dict):
            children = [*v.keys(), *v.values()]
        elif isinstance(v, (list, tuple, set, frozenset)):
            children = list(v)
        else:
            continue
        if depth >= max_depth and children:
            raise ValueError(f"{where} is nested more than {max_depth} levels deep: a config is section -> key -> "
                             "value (mapping fields a few levels more)")
        stack.extend((c, depth + 1) for c in children)


def _check_fields(obj: Any, section: str) -> None:
    """Type of every field of a section dataclass (built from YAML or from Python), normalised in place: ints
    for int fields, floats for float fields, str for str fields (os.PathLike too); fails with one line naming it."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        checked = _check_type(section, f.name, value, str(f.type), yaml_strings=False)
        if isinstance(checked, (dict, list, tuple)):
            _shape(f"{section}.{f.name}", checked, MAX_DEPTH - 2)
        if checked is not value:
            object.__setattr__(obj, f.name, checked)


def _check_finite(obj: Any, section: str) -> None:
    """Backstop after a section's own checks: no float field is NaN or inf."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{section}.{f.name} must be a finite number, got {value}")


# the model families (flowalign.models.ADAPTERS; a test keeps the two in step) and those with a true_cfg_scale
FAMILIES = ("sd3", "flux", "sd", "sdxl", "wan", "flux_kontext", "flux2", "flux2_klein", "zimage", "wan_i2v", "qwenimage",
            "qwenimage_edit", "qwenimage_edit_plus")
TRUE_CFG_FAMILIES = ("flux", "flux_kontext", "qwenimage", "qwenimage_edit", "qwenimage_edit_plus")


@dataclass(frozen=True)
class ModelConfig:
    path: str = _help("diffusers pipeline: hub id or local folder (default: the shipped toy pipeline)", DEFAULT_MODEL)
    family: Optional[str] = _help(" | ".join(FAMILIES) + "; None = detect from the pipeline class", None)
    dtype: str = _help("weights: float32 | bfloat16 (the whole pipeline) | float16 (the denoiser only); LoRA "
                       "weights, rollout latents and sampler math stay float32", "float32")
    autocast: Optional[str] = _help("opt-in: bfloat16 | float16 runs the denoiser's forwards (rollout, re-scoring, "
                                    "training) under torch.autocast, its output and the sampler math float32; None = "
                                    "off (docs/results.md measures its speed and on-policy gap)", None)
    attention: str = _help("scaled-dot-product attention kernel of every denoiser call: default (torch picks) | "
                           "math | flash | efficient | cudnn (one that the device lacks fails at start-up)", "default")
    compile: bool = _help("opt-in: torch.compile the denoiser in place (nn.Module.compile) after the LoRA is added; "
                          "the first calls of each shape compile (minutes on a CPU)", False)
    cuda_graphs: bool = _help("opt-in, CUDA only: the denoiser's gradient-free calls (rollout, reference passes, "
                              "evaluation) compiled with torch.compile(mode=reduce-overhead), which records one CUDA "
                              "graph per shape and replays it; training forwards stay eager (or compiled in the "
                              "default mode with model.compile)", False)
    lora_rank: int = _help("LoRA rank r", 16)
    lora_alpha: Optional[float] = _help("LoRA alpha, > 0 (None = 2 r)", None)
    lora_dropout: float = _help("LoRA dropout probability, in [0, 1)", 0.0)
    lora_target_modules: Optional[tuple] = _help("module names (peft target_modules) that get LoRA layers, e.g. "
                                                 "[attn.to_q, ff.net.2] (None = the family's attention projections)",
                                                 None)
    gradient_checkpointing: bool = _help("recompute activations in backward to save memory", False)
    device: Optional[str] = _help("where a loaded pipeline runs: cpu | cuda | cuda:N (None = cuda when available)",
                                  None)
    trust_remote_code: bool = _help("let diffusers run Python code shipped with the model (custom pipelines); only "
                                    "for models you trust", False)
    negative_prompt: str = _help("text of CFG's unconditional branch (the pipelines' negative_prompt)", "")
    max_sequence_length: Optional[int] = _help("T5 / UMT5 prompt tokens (None = the family's default: SD3 256, "
                                               "FLUX and Wan 512)", None)
    true_cfg_scale: Optional[float] = _help("FLUX-style families (flux, flux_kontext, qwenimage*): > 1 turns on true "
                                            "CFG with negative_prompt (two passes, as FluxPipeline(true_cfg_scale="
                                            "...)); None = the family's default", None)
    adapter_options: dict = _help("further keyword options of the family's adapter, e.g. {lora_experts: both, "
                                  "guidance_scale_2: 3.0} for two-expert Wan 2.2 (docs/models.md lists them)", {})

    def adapter_kwargs(self) -> dict:
        """The pipeline adapter's options set here (``adapter_for(pipe, **kwargs)``), for the trainer to load with."""
        out = {"negative_prompt": self.negative_prompt} if self.negative_prompt else {}
        if self.max_sequence_length is not None:
            out["max_sequence_length"] = self.max_sequence_length
        if self.true_cfg_scale is not None:
            out["true_cfg_scale"] = self.true_cfg_scale
        return {**out, **self.adapter_options}

    def __post_init__(self):
        _check_fields(self, "model")
        _path("model", "path", self.path, "a hub id or a local folder")
        _choice("model", "dtype", self.dtype, ("float32", "bfloat16", "float16"))
        if self.autocast is not None:
            _choice("model", "autocast", self.autocast, ("bfloat16", "float16"))
        _choice("model", "attention", self.attention, ATTENTION_BACKENDS)
        if self.device is not None:
            _text("model", "device", self.device, MAX_NAME_CHARS, "a torch device")
            import torch

            try:
                torch.device(self.device)
            except (RuntimeError, ValueError, TypeError):
                raise ValueError(f"model.device={_short(self.device)} is not a torch device: use cpu, cuda or cuda:N "
                                 "(null = cuda when available)") from None
        _text("model", "negative_prompt", self.negative_prompt, MAX_TEXT_CHARS, "a prompt", empty=True)
        if not isinstance(self.adapter_options, dict):
            raise ValueError(f"model.adapter_options must be a mapping of option names to values, got "
                             f"{type(self.adapter_options).__name__}")
        bad = [k for k in self.adapter_options if not isinstance(k, str) or not k.isidentifier()]
        if bad:
            raise ValueError(f"model.adapter_options keys must be option names, got {_short(bad[0])}")
        if self.max_sequence_length is not None:
            _positive("model", "max_sequence_length", self.max_sequence_length)
        if self.true_cfg_scale is not None:
            _positive("model", "true_cfg_scale", self.true_cfg_scale)
            if self.family not in (None, *TRUE_CFG_FAMILIES):
                raise ValueError(f"model.true_cfg_scale is for {', '.join(TRUE_CFG_FAMILIES)}; the {self.family} "
                                 "family applies CFG with sampling.guidance_scale")
        _choice("model", "family", self.family, (None, *FAMILIES))
        _positive("model", "lora_rank", self.lora_rank)
        if self.lora_alpha is not None:
            _positive("model", "lora_alpha", self.lora_alpha)
        _range("model", "lora_dropout", self.lora_dropout, "in [0, 1)", lambda v: 0 <= v < 1)
        if self.lora_target_modules is not None:
            names = tuple(self.lora_target_modules)
            if not names or not all(isinstance(m, str) and m and len(m) <= MAX_NAME_CHARS for m in names):
                raise ValueError("model.lora_target_modules must list module names (e.g. [attn.to_q, attn.to_v]) "
                                 f"or be null for the family's defaults, got {_short(self.lora_target_modules)}")
            object.__setattr__(self, "lora_target_modules", names)
        _check_finite(self, "model")


@dataclass(frozen=True)
class SamplingConfig:
    num_steps: int = _help("denoising steps per training rollout", 10)
    eval_num_steps: int = _help("denoising steps at evaluation", 10)
    eval_guidance_scale: Optional[float] = _help("CFG scale at held-out evaluation, >= 0 (None = guidance_scale)",
                                                 None)
    guidance_scale: float = _help("CFG scale of the policy (the policy is the CFG-combined velocity), >= 0; as in "
                                  "diffusers CFG applies only above 1 (0..1 = no CFG)", 4.5)
    sampler: str = _help("flow_sde | flow_constant_noise | flow_cps | flow_ode (deterministic; CRD/OPD/NFT rollouts) "
                         "| flow_dpm2 (deterministic DPM-Solver++(2M), the DiffusionNFT reference's; NFT/CRD) "
                         "| ddim (SD/SDXL)", "flow_sde")
    noise_level: Optional[float] = _help("a of the flow SDE / CPS, eta of the constant-noise SDE / DDIM (None = the "
                                         "sampler's own default: flow_sde 0.7, flow_constant_noise 0.3, flow_cps 0.7, "
                                         "ddim 1.0; deterministic samplers 0)", None)
    sde_window: Optional[tuple] = _help("[start, length]: only these steps are stochastic (Flow-GRPO-Fast)", None)
    sde_window_size: Optional[int] = _help("a window of this many stochastic steps placed at random per rollout "
                                           "batch inside sde_window_range (Flow-GRPO-Fast, VeRL-Omni)", None)
    sde_window_range: Optional[tuple] = _help("[lo, hi]: the random window's start is uniform in lo..hi - size "
                                              "(None = [0, num_steps])", None)
    log_prob_convention: str = _help("density (the true log-density) | squared_error (flow_cps only: the "
                                     "Flow-GRPO/VeRL-Omni code's -mean (x' - mu)^2, which its clip ranges assume)",
                                     "density")
    grid: str = _help("pipeline (the scheduler's own sigmas) | shifted_linear (DanceGRPO: shift(linspace(1, 0, "
                      "N + 1)))", "pipeline")
    grid_shift: Optional[float] = _help("shift of grid=shifted_linear (None = the scheduler config's shift)", None)
    integer_timesteps: bool = _help("the denoiser receives int(sigma * 1000) (DanceGRPO; the DiffusionNFT sampler); "
                                    "the step math keeps the exact sigma", False)
    decode: str = _help("what the reward sees: final (x_N) | last_x0_hat (the last step's x0 prediction, "
                        "DanceGRPO)", "final")
    resolution: Optional[int] = _help("image height = width in pixels (None = the pipeline's default size)", None)
    num_frames: Optional[int] = _help("video frames (Wan; None = the pipeline's default)", None)

    def __post_init__(self):
        _check_fields(self, "sampling")
        _positive("sampling", "num_steps", self.num_steps)
        for name in ("resolution", "num_frames"):
            if getattr(self, name) is not None:
                _positive("sampling", name, getattr(self, name))
        _positive("sampling", "eval_num_steps", self.eval_num_steps)
        _positive("sampling", "guidance_scale", self.guidance_scale, allow_zero=True)
        if self.eval_guidance_scale is not None:
            _positive("sampling", "eval_guidance_scale", self.eval_guidance_scale, allow_zero=True)
        from .rollout import DECODES, GRIDS, SAMPLERS

        _choice("sampling", "sampler", self.sampler, tuple(SAMPLERS))
        spec = SAMPLERS[self.sampler]
        if self.noise_level is None:  # switching sampler without a noise level gets that sampler's own
            object.__setattr__(self, "noise_level", spec.default_noise_level)
        _positive("sampling", "noise_level", self.noise_level, allow_zero=spec.step is None)
        from .samplers.gaussian import LOG_PROB_CONVENTIONS

        _choice("sampling", "log_prob_convention", self.log_prob_convention, LOG_PROB_CONVENTIONS)
        if self.log_prob_convention == "squared_error" and self.sampler != "flow_cps":
            raise ValueError("sampling.log_prob_convention=squared_error is the reference code's CPS log-prob: "
                             f"use it with sampling.sampler=flow_cps (got {self.sampler})")
        _choice("sampling", "grid", self.grid, GRIDS)
        if self.grid_shift is not None:
            _positive("sampling", "grid_shift", self.grid_shift)
        _choice("sampling", "decode", self.decode, DECODES)
        if self.sde_window is not None:
            w = _ints("sampling", "sde_window", self.sde_window, 2, "[start, length]")
            if w[0] < 0 or w[1] < 1 or w[0] + w[1] > self.num_steps:
                raise ValueError(f"sampling.sde_window={list(w)} must be [start, length] with "
                                 f"length >= 1 inside the {self.num_steps} steps")
            object.__setattr__(self, "sde_window", w)
        if self.sde_window_range is not None and self.sde_window_size is None:
            raise ValueError("sampling.sde_window_range needs sampling.sde_window_size (the random window's length)")
        if self.sde_window_size is not None:
            if self.sde_window is not None:
                raise ValueError("give sampling.sde_window (a fixed window) or sampling.sde_window_size (a random "
                                 "one), not both")
            rng = self.sde_window_range if self.sde_window_range is not None else (0, self.num_steps)
            lo, hi = _ints("sampling", "sde_window_range", rng, 2, "[lo, hi]")
            if not 0 <= lo < hi <= self.num_steps or not 1 <= self.sde_window_size <= hi - lo:
                raise ValueError(f"sampling.sde_window_range=[{lo}, {hi}] must satisfy 0 <= lo < hi <= num_steps="
                                 f"{self.num_steps} and hold sde_window_size={self.sde_window_size} steps")
            object.__setattr__(self, "sde_window_range", (int(lo), int(hi)))
        _check_finite(self, "sampling")


@dataclass(frozen=True)
class AdvantageConfig:
    """Group advantages ``A = (R - mean) / max(std + eps, floor)``, clipped (flowalign.algorithms.advantages); used
    by every reward-driven algorithm. Reference settings: Flow-GRPO / DiffusionNFT (the defaults), VeRL-Omni
    (estimator=unbiased), DanceGRPO (std=group, estimator=unbiased, eps=1e-8), Flow-Factory (eps=0, floor=1e-6)."""

    mean: str = _help("group (each prompt's own mean) | global (one batch mean: Flow-GRPO with per-prompt stat "
                      "tracking off)", "group")
    std: str = _help("global (whole batch, Flow-GRPO default) | group", "global")
    estimator: str = _help("population (Flow-GRPO, DiffusionNFT, Flow-Factory) | unbiased (VeRL-Omni, DanceGRPO)",
                           "population")
    eps: float = _help("added to the std (Flow-GRPO 1e-4, DanceGRPO 1e-8, Flow-Factory 0)", 1e-4)
    floor: float = _help("lower bound of std + eps (Flow-Factory: 1e-6)", 0.0)
    clip: float = _help("clip advantages to +-clip, > 0 (a large number such as 1e6 for no clipping)", 5.0)

    def __post_init__(self):
        _check_fields(self, "advantage")
        from .algorithms.advantages import ESTIMATORS, MEAN_MODES, STD_MODES

        _choice("advantage", "mean", self.mean, MEAN_MODES)
        _choice("advantage", "std", self.std, STD_MODES)
        _choice("advantage", "estimator", self.estimator, ESTIMATORS)
        _positive("advantage", "eps", self.eps, allow_zero=True)
        _positive("advantage", "floor", self.floor, allow_zero=True)
        _positive("advantage", "clip", self.clip)
        _check_finite(self, "advantage")


@dataclass(frozen=True)
class GRPOConfig:
    clip_range: float = _help("ratio clip eps (Flow-GRPO: 1e-4 with mean-reduced log-probs)", 1e-4)
    beta: float = _help("KL coefficient to the adapter-disabled reference (0 = no reference pass)", 0.0)
    kl_scaling: str = _help("exact | reference (the Flow-GRPO code's x Delta scaling; use with beta=0.04)", "exact")
    kl_reward: float = _help("subtract kl_reward x the per-step KL to the reference from the reward before the "
                             "advantages, one advantage per step (Flow-GRPO's sample.kl_reward; a reference pass "
                             "per rollout step)", 0.0)
    timestep_fraction: float = _help("train int(S x fraction) of the S trainable stochastic steps (Flow-GRPO / "
                                     "DanceGRPO timestep_fraction)", 1.0)
    timestep_selection: str = _help("first (the first ones, Flow-GRPO) | random (each sample its own random subset, "
                                    "DanceGRPO)", "first")
    train_last_step: bool = _help("false: the last step may be stochastic but is never trained (DanceGRPO)", True)
    guard: bool = _help("GRPO-Guard ratio normalisation and 1/Delta reweighting", False)
    guard_bias: str = _help("GRPO-Guard's bias b = mean_d(dmu^2) / (2 s^2): sample (per sample, VeRL-Omni) | batch "
                            "(averaged over the batch, as Flow-GRPO's GRPO-Guard script computes it)", "sample")
    kl_divergence: str = _help("f-divergence of the reference regulariser: reverse_kl (the plain KL) | forward_kl | "
                               "js | hellinger | jeffreys | sf | neyman (KL weighted by h(r) of the exact "
                               "transition ratio)", "reverse_kl")
    inner_epochs: int = _help("passes over each rollout batch", 1)

    def __post_init__(self):
        _check_fields(self, "grpo")
        _positive("grpo", "clip_range", self.clip_range)
        _positive("grpo", "beta", self.beta, allow_zero=True)
        _choice("grpo", "kl_scaling", self.kl_scaling, ("exact", "reference"))
        _positive("grpo", "kl_reward", self.kl_reward, allow_zero=True)
        _fraction("grpo", "timestep_fraction", self.timestep_fraction)
        from .algorithms.grpo import GUARD_BIASES, STEP_SELECTIONS

        _choice("grpo", "timestep_selection", self.timestep_selection, STEP_SELECTIONS)
        _choice("grpo", "guard_bias", self.guard_bias, GUARD_BIASES)
        from .algorithms.divergences import DIVERGENCES

        _choice("grpo", "kl_divergence", self.kl_divergence, tuple(DIVERGENCES))
        _positive("grpo", "inner_epochs", self.inner_epochs)
        _check_finite(self, "grpo")


@dataclass(frozen=True)
class TrainConfig:
    reward: str = _help("reward name in flowalign.rewards.REWARDS", "toy_geneval")
    prompts: str = _help("'toy' (the toy world's GenEval train split) or a text file, one prompt per line", "toy")
    iterations: int = _help("rollout -> update iterations", 100)
    prompts_per_iter: int = _help("distinct prompts per iteration", 8)
    group_size: int = _help("samples per prompt (one GRPO group, same initial noise)", 8)
    minibatch: int = _help("samples per forward/backward in the update", 32)
    lr: float = _help("AdamW learning rate, > 0", 3e-4)
    weight_decay: float = _help("AdamW weight decay, >= 0", 1e-4)
    grad_clip: float = _help("max gradient norm, > 0 (clip_grad_norm_; 0 would zero every gradient)", 1.0)
    ema_decay: float = _help("EMA of the LoRA weights for evaluation, in [0, 1) (0 = off)", 0.0)
    seed: int = _help("seed of prompts, noise and initialisation, in [0, 2**63)", 0)
    out_dir: str = _help("where metrics, samples and the LoRA are written", "runs/train")
    eval_every: int = _help("held-out evaluation every N iterations (0 = only at the end)", 0)
    eval_per_task: int = _help("held-out images per toy task at evaluation (0 = no held-out evaluation at all: "
                               "neither before, during nor after training)", 16)
    eval_prompts: Optional[str] = _help("held-out prompts: a toy spec or a text file (None = the held-out split of "
                                        "toy training prompts; a training prompt file has none)", None)
    eval_rewards: tuple = _help("extra rewards scored at held-out evaluation, e.g. [clip_score] (one not trained on "
                               "shows reward hacking)", ())
    eval_reward_options: dict = _help("keyword options of train.eval_rewards by name, e.g. {clip_score: {model: "
                                      "tiny}} (the shipped tiny CLIP)", {})
    algorithm: str = _help("update rule: grpo (Flow-GRPO) | nft (DiffusionNFT) | crd (Centered Reward Distillation) "
                           "| opd (DiffusionOPD) | backprop (reward backprop); its section of the same name "
                           "configures it",
                           "grpo")
    reward_options: dict = _help("keyword options of the reward, e.g. {url: http://...} for remote", {})
    checkpoint_every: int = _help("write a checkpoint out_dir/ckpt-<iteration>/ every N iterations (0 = only at the "
                                  "end); `flowalign train CONFIG --resume` continues from the newest", 0)
    keep_checkpoints: int = _help("keep the newest N checkpoints, delete older ones (0 = keep all)", 3)
    resume: bool = _help("continue from the newest complete checkpoint in out_dir (CLI: --resume)", False)
    max_nan_steps: int = _help("stop (with a checkpoint) after this many optimizer steps in a row skipped for a "
                               "NaN/inf loss or gradient", 5)
    log_with: tuple = _help("extra metric loggers besides metrics.jsonl/metrics.csv: tensorboard, wandb (offline "
                            "unless WANDB_MODE=online or WANDB_API_KEY is set)", ())
    shard: str = _help("several processes: none (data parallel, every process holds the whole denoiser) | fsdp "
                       "(the denoiser's base and LoRA weights sharded over the processes per transformer block, "
                       "PyTorch FSDP2; also switched on by accelerate launch --config_file "
                       "configs/accelerate/fsdp.yaml); no effect in one process", "none")
    reward_chunks: int = _help("roll each batch out in this many chunks of whole groups, so a finished chunk can "
                               "be scored while the next samples (overlap_rewards); 1 = the whole batch at once", 1)
    overlap_rewards: bool = _help("with reward_chunks > 1: score each finished chunk on a worker thread while the "
                                  "next one samples (false: the same chunks scored after the rollout; the same "
                                  "weights either way)", True)

    def __post_init__(self):
        _check_fields(self, "train")
        from .algorithms import ALGORITHMS

        _text("train", "reward", self.reward, MAX_NAME_CHARS, "a reward name")
        _path("train", "prompts", self.prompts, "'toy', 'toy:TASK[,TASK...]' or a prompt file path")
        _path("train", "out_dir", self.out_dir, "a folder path")
        if self.eval_prompts is not None:
            _path("train", "eval_prompts", self.eval_prompts, "a toy spec or a prompt file path")
        for name in self.eval_rewards:
            _text("train", "eval_rewards", name, MAX_NAME_CHARS, "a list of reward names, each")
        for name, options in self.eval_reward_options.items():
            if name not in self.eval_rewards or not isinstance(options, dict):
                raise ValueError(f"train.eval_reward_options maps a name of train.eval_rewards to its options "
                                 f"(e.g. {{clip_score: {{model: tiny}}}}); got {_short(name)}: {_short(options)}")
        bad = [k for k in self.reward_options if not isinstance(k, str) or not k]
        if bad:
            raise ValueError(f"train.reward_options keys must be option names (strings), got {_short(bad[0])}")
        _choice("train", "algorithm", self.algorithm, tuple(ALGORITHMS))
        _choice("train", "shard", self.shard, SHARDINGS)
        _positive("train", "checkpoint_every", self.checkpoint_every, allow_zero=True)
        _positive("train", "keep_checkpoints", self.keep_checkpoints, allow_zero=True)
        _positive("train", "eval_every", self.eval_every, allow_zero=True)
        _positive("train", "max_nan_steps", self.max_nan_steps)
        _positive("train", "reward_chunks", self.reward_chunks)
        for name in self.log_with:
            _choice("train", "log_with", name, LOGGERS)
        if len(set(self.log_with)) != len(self.log_with):
            raise ValueError(f"train.log_with={_short(list(self.log_with))} names a logger twice")
        object.__setattr__(self, "log_with", tuple(self.log_with))
        for name in ("iterations", "prompts_per_iter", "group_size", "minibatch", "lr"):
            _positive("train", name, getattr(self, name))
        _positive("train", "eval_per_task", self.eval_per_task, allow_zero=True)
        _positive("train", "weight_decay", self.weight_decay, allow_zero=True)
        _positive("train", "grad_clip", self.grad_clip)
        _range("train", "seed", self.seed, "in [0, 2**63)", lambda v: 0 <= v <= MAX_INT)
        if self.group_size < 2:
            raise ValueError("train.group_size must be >= 2: advantages are relative within a prompt's group")
        _decay("train", "ema_decay", self.ema_decay)
        _check_finite(self, "train")


@dataclass(frozen=True)
class NFTConfig:
    """DiffusionNFT (arXiv 2509.16117; docs/algorithms/nft.md): forward-process loss on the old model's samples,
    no CFG in training."""

    beta: float = _help("implicit-policy step beta in v+- = v_old +- beta (v_theta - v_old) (1; 0.1 for OCR)", 1.0)
    kl_coef: float = _help("lambda_KL of |v_theta - v_ref|^2 to the adapter-disabled model (0 = no reference pass)",
                           1e-4)
    adv_max: float = _help("A_max of the optimality r = clip(A / A_max, -1, 1) / 2 + 1/2 (and of the reference "
                           "form's A_max / beta prefactor)", 5.0)
    loss_form: str = _help("reference (the DiffusionNFT code: x0-space errors with detached adaptive weights, "
                           "policy term x A_max / beta) | velocity_mse (plain velocity MSE; deviation)", "reference")
    adv_mode: str = _help("advantage transform before r: all | positive_only | negative_only | one_only | binary "
                          "(the reference code's adv_mode)", "all")
    timestep_sampling: str = _help("stratified (num_timesteps draws from the top timestep_fraction of the grid, "
                                   "shared by a minibatch) | permutation (reference: each sample its own random "
                                   "permutation of all N grid steps, the first int(N * timestep_fraction) trained)",
                                   "stratified")
    num_timesteps: int = _help("forward-process timesteps per update (timestep_sampling=stratified)", 10)
    timestep_fraction: float = _help("stratified: keep the first (noisiest) fraction of the grid for the draws; "
                                     "permutation: the fraction of each sample's permutation trained", 0.99)
    reduction: str = _help("mean | sum of squared errors over elements (reference: mean)", "mean")
    old_decay_type: int = _help("the reference's old-model decay presets (flat, rate, max): 0 = (0, 0, 0) old = "
                                "current, 1 = (0, 0.001, 0.5) default, 2 = (75, 0.0075, 0.999) its OCR recipe; "
                                "old_decay_flat/rate/max override single values", 1)
    old_decay_flat: Optional[int] = _help("old model = EMA of the policy: hard copy for the first N optimizer steps "
                                          "(None = from old_decay_type)", None)
    old_decay_rate: Optional[float] = _help("then decay d = rate * (s - flat) ... (None = from old_decay_type)", None)
    old_decay_max: Optional[float] = _help("... capped at this value (snap <- d snap + (1 - d) theta; None = from "
                                           "old_decay_type)", None)
    inner_epochs: int = _help("passes over each rollout batch", 1)

    def __post_init__(self):
        _check_fields(self, "nft")
        from .algorithms.nft import ADV_MODES, DECAY_TYPES, LOSS_FORMS, TIMESTEP_SAMPLINGS

        _positive("nft", "beta", self.beta)
        _positive("nft", "kl_coef", self.kl_coef, allow_zero=True)
        _positive("nft", "adv_max", self.adv_max)
        _choice("nft", "loss_form", self.loss_form, LOSS_FORMS)
        _choice("nft", "adv_mode", self.adv_mode, ADV_MODES)
        _choice("nft", "timestep_sampling", self.timestep_sampling, TIMESTEP_SAMPLINGS)
        _positive("nft", "num_timesteps", self.num_timesteps)
        _fraction("nft", "timestep_fraction", self.timestep_fraction)
        _choice("nft", "reduction", self.reduction, ("mean", "sum"))
        _choice("nft", "old_decay_type", self.old_decay_type, tuple(DECAY_TYPES))
        for name, value in zip(("old_decay_flat", "old_decay_rate", "old_decay_max"), DECAY_TYPES[self.old_decay_type]):
            if getattr(self, name) is None:  # resolved once here: the config written to disk holds the numbers
                object.__setattr__(self, name, value)
        _positive("nft", "old_decay_flat", self.old_decay_flat, allow_zero=True)
        _positive("nft", "old_decay_rate", self.old_decay_rate, allow_zero=True)
        _decay("nft", "old_decay_max", self.old_decay_max)
        _positive("nft", "inner_epochs", self.inner_epochs)
        _check_finite(self, "nft")


@dataclass(frozen=True)
class AdvGRPOConfig:
    """Adv-GRPO (arXiv 2511.20256): the reward's discriminator head is trained during RL (a reward with
    head: true, e.g. dino_similarity; docs/algorithms/adv_grpo.md)."""

    head_every: int = _help("train the reward's head after every k-th iteration (reference images positive, the "
                            "generations scored since the last head step negative)", 1)
    head_steps: int = _help("hinge-loss steps of the head each time", 1)

    def __post_init__(self):
        _check_fields(self, "adv_grpo")
        _positive("adv_grpo", "head_every", self.head_every)
        _positive("adv_grpo", "head_steps", self.head_steps)


@dataclass(frozen=True)
class CRDConfig:
    """Centered Reward Distillation (docs/math.md §5)."""

    beta: float = _help("KL strength of the target pi_ref exp(R / beta)", 1.0)
    adv_max: float = _help("A_max: R~ = clip(A, -A_max, A_max) / (2 A_max) + 1/2 and the MSE prefactor A_max / beta",
                           5.0)
    centering: str = _help("group (within each prompt's group: the theory) | batch (public code; deviation: "
                           "log Z(c) does not cancel)", "group")
    form: str = _help("mse | bce (both x A_max / beta, as Flow-Factory)", "mse")
    center_weighting: str = _help("uniform | softmax (two directions, softmax(+-R~/tau) centres, 1/2 each: "
                                  "Flow-Factory weight_temp = tau > 0) | hard (its weight_temp = 0)", "uniform")
    tau: float = _help("temperature of center_weighting=softmax", 1.0)
    old_model: str = _help("v_old inside l: snapshot (the old EMA copy) | reference (the adapter-disabled base: "
                           "Flow-Factory's use_old_for_loss: false)", "snapshot")
    adaptive_weights: bool = _help("divide each squared error by its detached mean |v - u| (Flow-Factory's "
                                   "adaptive_logp)", True)
    beta_kl: float = _help("KL anchor coefficient at R~ = 1 (reward-adaptive: kl_floor + R~ (beta_kl - kl_floor)); "
                           "0 = no anchor pass", 0.1)
    kl_floor: float = _help("KL anchor coefficient at R~ = 0", 1e-4)
    kl_guidance_scale: float = _help("CFG of the base model (adapter off) in the KL anchor", 4.5)
    num_timesteps: int = _help("K stratified forward-process timesteps per optimizer step", 20)
    timestep_fraction: float = _help("draw from the first (noisiest) fraction of the rollout grid (top 99%)", 0.99)
    steps_per_iter: int = _help("optimizer steps per iteration (the prompt groups are split between them)", 2)
    old_schedule: str = _help("decay of the v_old snapshot, 'start_step-start_value-slope-end_value' (Flow-Factory's "
                              "format: d = start_value while s < start_step, then min(start_value + (s - start_step) "
                              "slope, end_value)) or a preset (none, slow, medium, offline, fast, moderate, 0-6)",
                              "0-0.25-0.005-0.999")
    sampler_schedule: str = _help("decay of the sampler (rollout) snapshot, same format", "75-0-0.0075-0.999")
    eps: float = _help("floor of the adaptive weights w = max(mean_d |v - u|, eps)", 1e-5)

    def __post_init__(self):
        _check_fields(self, "crd")
        from .algorithms.crd import CENTER_WEIGHTINGS, CENTERINGS, FORMS, OLD_MODELS, parse_schedule

        _positive("crd", "beta", self.beta)
        _positive("crd", "adv_max", self.adv_max)
        _choice("crd", "centering", self.centering, CENTERINGS)
        _choice("crd", "form", self.form, FORMS)
        _choice("crd", "center_weighting", self.center_weighting, CENTER_WEIGHTINGS)
        _choice("crd", "old_model", self.old_model, OLD_MODELS)
        _positive("crd", "tau", self.tau)
        _positive("crd", "beta_kl", self.beta_kl, allow_zero=True)
        _positive("crd", "kl_floor", self.kl_floor, allow_zero=True)
        _positive("crd", "kl_guidance_scale", self.kl_guidance_scale)
        _positive("crd", "num_timesteps", self.num_timesteps)
        _fraction("crd", "timestep_fraction", self.timestep_fraction)
        _positive("crd", "steps_per_iter", self.steps_per_iter)
        _positive("crd", "eps", self.eps)
        for name in ("old_schedule", "sampler_schedule"):
            _text("crd", name, getattr(self, name), MAX_NAME_CHARS, "a decay schedule")
            try:
                parsed = parse_schedule(getattr(self, name))
            except ValueError as err:
                raise ValueError(f"crd.{name}: {_one_line(err)}") from None
            if not all(math.isfinite(v) for v in parsed):
                raise ValueError(f"crd.{name}={_short(getattr(self, name))} must hold finite numbers "
                                 "('start_step-start_value-slope-end_value', e.g. '75-0-0.0075-0.999')")
        _check_finite(self, "crd")


TEACHER_KEYS = ("lora", "guidance_scale", "prompts", "reward")


@dataclass(frozen=True)
class OPDConfig:
    """DiffusionOPD (docs/math.md §3): per-step reverse KL to each prompt's task teacher on the student's own
    rollouts."""

    teachers: dict = _help("task -> {lora: folder saved by save_lora, guidance_scale: the teacher's CFG, prompts: "
                           "that task's prompt source (default train.prompts; 'toy:text' = the toy text task), "
                           "reward: optional reward name logged for that task}", {})
    scaling: str = _help("exact (KL) | reference (the published code's scaling); ODE steps always use mean matching",
                         "exact")
    reduction: str = _help("mean | sum over elements (reference: mean)", "mean")
    divergence: Optional[str] = _help("f-divergence weighting of stochastic steps (None = reverse KL)", None)
    alpha: Optional[float] = _help("alpha of divergence=alpha", None)
    train_window: Optional[tuple] = _help("[first, last, length]: train `length` consecutive steps placed at random "
                                          "inside steps first..last each iteration [uncertain]; None = all steps",
                                          None)
    extrapolation: float = _help("ExOPD's reward extrapolation lambda (G-OPD, arXiv 2602.12125): distil toward "
                                 "mu_ref + lambda (mu_T - mu_ref), mu_ref the base model's mean at the teacher's "
                                 "CFG; 1 = plain OPD, > 1 extrapolates past the teacher", 1.0)

    def __post_init__(self):
        if not isinstance(self.teachers, dict):
            raise ValueError(f"opd.teachers must map task -> {{lora: ..., guidance_scale: ...}}, got "
                             f"{_short(self.teachers)}")
        _check_fields(self, "opd")
        for task, t in self.teachers.items():
            if not isinstance(task, str) or not task or len(task) > MAX_NAME_CHARS or not task.isprintable():
                raise ValueError(f"opd.teachers task names must be non-empty strings of at most {MAX_NAME_CHARS} "
                                 f"printable characters, got {_short(task)}")
            where = f"opd.teachers.{_short(task)[1:-1] if len(task) > 40 else task}"
            if not isinstance(t, dict) or "lora" not in t:
                raise ValueError(f"{where} must be a mapping with at least lora: FOLDER "
                                 f"(keys: {', '.join(TEACHER_KEYS)})")
            for key in t:
                if key not in TEACHER_KEYS:
                    raise ValueError(f"unknown key {where}.{_key(key)}; valid keys: {', '.join(TEACHER_KEYS)}")
            _path(where, "lora", t["lora"], "a LoRA folder path")
            g = t.get("guidance_scale", 1.0)
            if not _is_number(g) or not math.isfinite(g) or g <= 0:
                raise ValueError(f"{where}.guidance_scale must be a finite number > 0, got {_short(g)}")
            if t.get("prompts") is not None:
                _path(where, "prompts", t["prompts"], "a prompt source ('toy:TASK' or a prompt file path)")
            if t.get("reward") is not None:
                _text(where, "reward", t["reward"], MAX_NAME_CHARS, "a reward name")
        _choice("opd", "scaling", self.scaling, ("exact", "reference"))
        _choice("opd", "reduction", self.reduction, ("mean", "sum"))
        if self.alpha is not None:
            _range("opd", "alpha", self.alpha, "a finite number (not 0 or 1)", lambda v: v not in (0, 1))
        if self.divergence is not None:  # checked here, not at the first update
            from .algorithms.divergences import get_divergence

            _text("opd", "divergence", self.divergence, MAX_NAME_CHARS, "a divergence name")
            try:
                get_divergence(self.divergence, self.alpha)
            except ValueError as err:
                raise ValueError(f"opd.divergence: {_one_line(err)}") from None
        if self.train_window is not None:
            w = _ints("opd", "train_window", self.train_window, 3, "[first, last, length]")
            if w[0] < 0 or w[2] < 1 or w[1] - w[0] + 1 < w[2]:
                raise ValueError(f"opd.train_window={list(w)} must be [first, last, length] with "
                                 "0 <= first, length >= 1 and length <= last - first + 1")
            object.__setattr__(self, "train_window", w)
        _range("opd", "extrapolation", self.extrapolation, "a finite number > 0 (1 = plain OPD)", lambda v: v > 0)
        _check_finite(self, "opd")


@dataclass(frozen=True)
class BackpropConfig:
    """Reward backprop (docs/math.md §8): ODE rollouts, gradient of a differentiable reward through the last K steps."""

    grad_steps: int = _help("K: steps (the last ones) the reward gradient flows through (IPRO: 4; 0 trains nothing)",
                            4)
    lambda_reward: float = _help("lambda1 in L = -lambda1 R + lambda2 KL_v (IPRO: 0.1)", 0.1)
    lambda_kl: float = _help("lambda2: weight of KL_v = sum_{last K} mean_d |v_theta - v_ref|^2 to the "
                             "adapter-disabled model (IPRO: 1; 0 = no reference pass)", 1.0)
    ref_guidance_scale: Optional[float] = _help("CFG of the reference in KL_v (None = sampling.guidance_scale)", None)

    def __post_init__(self):
        _check_fields(self, "backprop")
        _positive("backprop", "grad_steps", self.grad_steps, allow_zero=True)
        _positive("backprop", "lambda_reward", self.lambda_reward, allow_zero=True)
        _positive("backprop", "lambda_kl", self.lambda_kl, allow_zero=True)
        if self.ref_guidance_scale is not None:
            _positive("backprop", "ref_guidance_scale", self.ref_guidance_scale)
        _check_finite(self, "backprop")


@dataclass(frozen=True)
class DPOConfig:
    """Flow-DPO (arXiv 2501.13918; docs/algorithms/dpo.md): preference pairs on the forward process, the reference is
    the adapter-disabled model, no CFG in training."""

    beta: float = _help("DPO strength beta in -log sigmoid(-(beta_t / 2) [(e_w - e_ref_w) - (e_l - e_ref_l)]) on "
                        "mean-reduced velocity errors ([assumed] value)", 500.0)
    weighting: str = _help("beta_t: constant (beta, the paper's choice) | eps (beta (1 - t)^2: Diffusion-DPO's loss "
                           "on epsilon predictions)", "constant")
    pairs: str = _help("online (each prompt group's best vs worst rollout sample by reward) | offline "
                       "(preference_file)", "online")
    preference_file: Optional[str] = _help("offline pairs: a JSONL file, one {prompt, chosen, rejected} a line, image "
                                           "paths relative to its folder", None)
    pairs_per_iter: int = _help("offline: pairs per iteration (each pair once per pass over the file)", 16)
    min_reward_gap: float = _help("online: a group whose best - worst reward is <= this gives no pair (0: only "
                                  "ties are skipped)", 0.0)
    timesteps_per_pair: int = _help("forward-process draws per pair and minibatch, each one t and one eps shared by "
                                    "both members", 1)
    timestep_grid: int = _help("t is drawn uniformly from the pipeline scheduler's grid of this many steps (its "
                               "shift included)", 1000)
    reduction: str = _help("mean | sum of the squared velocity errors over elements", "mean")
    inner_epochs: int = _help("passes over each iteration's pairs", 1)

    def __post_init__(self):
        _check_fields(self, "dpo")
        from .algorithms.dpo import PAIR_SOURCES, REDUCTIONS, WEIGHTINGS

        _positive("dpo", "beta", self.beta)
        _choice("dpo", "weighting", self.weighting, WEIGHTINGS)
        _choice("dpo", "pairs", self.pairs, PAIR_SOURCES)
        if self.preference_file is not None:
            _path("dpo", "preference_file", self.preference_file, "a JSONL file path")
        if self.pairs == "offline" and self.preference_file is None:
            raise ValueError("dpo.pairs=offline needs dpo.preference_file: a JSONL file, one "
                             '{"prompt", "chosen", "rejected"} object a line')
        _positive("dpo", "pairs_per_iter", self.pairs_per_iter)
        _positive("dpo", "min_reward_gap", self.min_reward_gap, allow_zero=True)
        _positive("dpo", "timesteps_per_pair", self.timesteps_per_pair)
        _positive("dpo", "timestep_grid", self.timestep_grid)
        _choice("dpo", "reduction", self.reduction, REDUCTIONS)
        _positive("dpo", "inner_epochs", self.inner_epochs)
        _check_finite(self, "dpo")


@dataclass(frozen=True)
class RWRConfig:
    """Flow-RWR (arXiv 2501.13918; docs/algorithms/rwr.md): flow matching on the policy's own samples weighted by
    softmax(R / tau) over the batch, no CFG in training."""

    tau: float = _help("temperature of the weights softmax(R / tau) (large: uniform, plain flow matching; small: the "
                       "best sample only)", 1.0)
    weights_from: str = _help("reward (the raw rewards R) | advantage (the group advantages of the advantage section)",
                              "reward")
    num_timesteps: int = _help("stratified forward-process timesteps per minibatch", 10)
    timestep_fraction: float = _help("draw from the first (noisiest) fraction of the rollout grid", 0.99)
    reduction: str = _help("mean | sum of the squared velocity errors over elements", "mean")
    inner_epochs: int = _help("passes over each rollout batch (one optimizer step each)", 1)

    def __post_init__(self):
        _check_fields(self, "rwr")
        from .algorithms.rwr import WEIGHT_SOURCES

        _positive("rwr", "tau", self.tau)
        _choice("rwr", "weights_from", self.weights_from, WEIGHT_SOURCES)
        _positive("rwr", "num_timesteps", self.num_timesteps)
        _fraction("rwr", "timestep_fraction", self.timestep_fraction)
        _choice("rwr", "reduction", self.reduction, ("mean", "sum"))
        _positive("rwr", "inner_epochs", self.inner_epochs)
        _check_finite(self, "rwr")


@dataclass(frozen=True)
class DiagnosticsConfig:
    """Reward-hacking diagnostics (docs/doctor.md#drift-during-training): cheap statistics of every rollout batch's
    images (flowalign.evaluation.image_stats; the reward's own, e.g. the toy world's extra objects), their
    distribution on the first batch (the policy before any update) and a drift flag when a batch mean leaves it
    while the reward rises (flowalign.evaluation.drift)."""

    drift: bool = _help("compute the statistics and the drift flag every iteration (metrics.jsonl, the progress "
                        "bar, evals.jsonl and the report)", True)
    threshold: float = _help("flag a statistic whose mean moved more than this many base standard deviations (of "
                             "single images) while the reward rose, > 0", 0.5)
    significance: float = _help("... and by more than this many standard errors (the batch's prompt groups are its "
                                "independent units), >= 0", 4.0)
    window: int = _help("the last batches pooled for the current statistics and reward, >= 1", 5)
    base_batches: int = _help("batches the adapter-disabled model rolls out before training (own seed: the run's "
                              "draws are unchanged) to measure the base distribution and reward; 0: the first "
                              "training batch is the base", 2)
    features: str = _help("feature space of the within-prompt diversity: tiny_clip (shipped, offline) | none | a CLIP "
                          "hub id or folder", "tiny_clip")

    def __post_init__(self):
        _check_fields(self, "diagnostics")
        _positive("diagnostics", "threshold", self.threshold)
        _positive("diagnostics", "significance", self.significance, allow_zero=True)
        _path("diagnostics", "features", self.features, "tiny_clip, none, or a CLIP hub id or folder")
        if self.window < 1:
            raise ValueError(f"diagnostics.window must be >= 1, got {self.window}")
        if self.base_batches < 0:
            raise ValueError(f"diagnostics.base_batches must be >= 0, got {self.base_batches}")
        _check_finite(self, "diagnostics")


@dataclass(frozen=True)
class DistillConfig:
    """f-distill (docs/math.md §6), ``flowalign distill``: the pipeline (teacher, adapter off, CFG) distilled into an
    S-step CFG-free student LoRA with a fake-score LoRA and a discriminator (flowalign.distill). Prompts, seed,
    iterations, learning rate, grad clip and out_dir come from the train section; a batch is
    train.prompts_per_iter x train.group_size rows (each its own noise)."""

    student_steps: int = _help("S: the student's sampling steps from noise (1, 2 or 4 typical)", 2)
    divergence: str = _help("f-divergence of the generator weights h(r): reverse_kl (h = 1, DMD) | forward_kl | js "
                            "| hellinger | jeffreys | sf | neyman", "js")
    teacher_guidance_scale: float = _help("CFG of the teacher (adapter disabled), applied in x0 space", 4.5)
    teacher_steps: int = _help("ODE steps of the teacher samples that are the discriminator's real data", 10)
    real_samples: int = _help("teacher samples drawn once at the start (the discriminator's real data)", 256)
    fake_lr: float = _help("AdamW learning rate of the fake-score LoRA", 1e-3)
    disc_lr: float = _help("AdamW learning rate of the discriminator", 1e-3)
    generator_every: int = _help("a generator (student) step every N iterations; the fake score and the "
                                 "discriminator step every iteration (DMD2: 5)", 5)
    lambda_gan: float = _help("weight of the generator's GAN term softplus(-D(fake))", 1e-3)
    num_bins: int = _help("time bins of the ratio normalisation r / mean_bin(r)", 10)
    ratio_bin_range: tuple = _help("[lo, hi]: the t range the bins split (FastGen: the schedule's [t_min, t_max], "
                                   "[0, 0.999] for rectified flow)", (0.0, 1.0))
    ratio_ema: float = _help("EMA rate of the per-bin ratio means across generator steps (FastGen's "
                             "ratio_ema_rate; 0 = this batch's means)", 0.0)
    disc_heads: int = _help("discriminator heads K, one per feature level of its conv net (1-3); the ratio uses the "
                            "mean of the K logits (FastGen)", 1)
    t_range: tuple = _help("[t_min, t_max]: noise levels of the fake-score, discriminator and generator losses",
                           (0.02, 0.98))
    disc_channels: int = _help("width of the discriminator (a small conv net on noised latents)", 32)

    def __post_init__(self):
        _check_fields(self, "distill")
        _positive("distill", "student_steps", self.student_steps)
        from .algorithms.divergences import DIVERGENCES

        _choice("distill", "divergence", self.divergence, tuple(DIVERGENCES))
        _positive("distill", "teacher_guidance_scale", self.teacher_guidance_scale)
        for name in ("teacher_steps", "real_samples", "fake_lr", "disc_lr", "generator_every", "num_bins",
                     "disc_channels"):
            _positive("distill", name, getattr(self, name))
        _positive("distill", "lambda_gan", self.lambda_gan, allow_zero=True)
        _decay("distill", "ratio_ema", self.ratio_ema)
        if not 1 <= self.disc_heads <= 3:
            raise ValueError(f"distill.disc_heads must be 1, 2 or 3 (the discriminator has 3 feature levels), got "
                             f"{self.disc_heads}")
        blo, bhi = _numbers("distill", "ratio_bin_range", self.ratio_bin_range, 2, "[lo, hi]")
        if not 0 <= blo < bhi <= 1:
            raise ValueError(f"distill.ratio_bin_range={list(self.ratio_bin_range)} must be [lo, hi] with "
                             "0 <= lo < hi <= 1")
        object.__setattr__(self, "ratio_bin_range", (blo, bhi))
        lo, hi = _numbers("distill", "t_range", self.t_range, 2, "[t_min, t_max]")
        if not 0 < lo < hi <= 1:
            raise ValueError(f"distill.t_range={list(self.t_range)} must be [t_min, t_max] with "
                             "0 < t_min < t_max <= 1")
        object.__setattr__(self, "t_range", (lo, hi))
        _check_finite(self, "distill")


@dataclass(frozen=True)
class CalibrationConfig:
    """InfAlign-CTRL (arXiv 2412.19792): train on a transform of the reward calibrated per prompt to the base
    model's rewards, C = P_base[R(x') <= R(x)] from base_samples adapter-disabled samples of the same prompt
    (docs/algorithms/calibration.md). Off unless transform is set."""

    transform: Optional[str] = _help("None = off | identity (C) | log (log C, smoothed) | exp (exp(t C): best-of-N "
                                     "sampling) | neg_exp (-exp(-t C): best-of-N jailbreaking)", None)
    t: float = _help("temperature of exp / neg_exp, in (0, 50] (4.0 is flowalign's [assumed] default)", 4.0)
    base_samples: int = _help("M base samples (and reward queries) per distinct prompt, drawn once, >= 1", 8)
    seed: int = _help("seed of the base samples' own generator (the run's draws are unchanged), in [0, 2**63)", 0)

    def __post_init__(self):
        _check_fields(self, "calibration")
        if self.transform is not None:
            _choice("calibration", "transform", self.transform, ("identity", "log", "exp", "neg_exp"))
        _range("calibration", "t", self.t, "in (0, 50]", lambda v: 0 < v <= 50)
        if self.base_samples < 1:
            raise ValueError(f"calibration.base_samples must be >= 1, got {self.base_samples}")
        if self.seed < 0:
            raise ValueError(f"calibration.seed must be in [0, 2**63), got {self.seed}")
        _check_finite(self, "calibration")


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    advantage: AdvantageConfig = field(default_factory=AdvantageConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    nft: NFTConfig = field(default_factory=NFTConfig)
    crd: CRDConfig = field(default_factory=CRDConfig)
    adv_grpo: AdvGRPOConfig = field(default_factory=AdvGRPOConfig)
    opd: OPDConfig = field(default_factory=OPDConfig)
    backprop: BackpropConfig = field(default_factory=BackpropConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    rwr: RWRConfig = field(default_factory=RWRConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    diagnostics: DiagnosticsConfig = field(default_factory=DiagnosticsConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)

    def __post_init__(self):
        """Checks across sections (the ones that only matter for the chosen algorithm)."""
        for name, cls in _SECTION_CLASSES.items():
            if not isinstance(getattr(self, name), cls):
                raise ValueError(f"Config.{name} must be a {cls.__name__} (build a config from mappings with "
                                 f"config_from_dict), got {type(getattr(self, name)).__name__}")
        algo, s = self.train.algorithm, self.sampling
        if s.sde_window_size is not None and self.train.reward_chunks > 1:
            raise ValueError("sampling.sde_window_size draws a random SDE window per rollout, so chunks of one batch "
                             "would get different windows: use train.reward_chunks=1 with it (or a fixed "
                             "sampling.sde_window)")
        if s.sampler == "flow_dpm2" and algo not in ("nft", "crd"):
            raise ValueError(f"sampling.sampler=flow_dpm2 (a multistep solver) cannot be re-scored step by step: use "
                             f"it with train.algorithm=nft or crd, or flow_ode for {algo}")
        if algo in ("nft", "crd") and s.sampler == "ddim":
            raise ValueError(f"train.algorithm={algo} uses the rectified-flow forward process: it needs a flow "
                             "sampler (sampling.sampler=flow_ode, flow_sde, ...) and a flow pipeline (sd3/flux/wan)")
        if algo == "opd" and not self.opd.teachers:
            raise ValueError("train.algorithm=opd needs opd.teachers: {task: {lora: FOLDER, guidance_scale: G}}")
        if algo == "opd" and self.opd.train_window is not None and self.opd.train_window[1] >= s.num_steps:
            raise ValueError(f"opd.train_window={list(self.opd.train_window)} must lie inside the "
                             f"{s.num_steps} steps (last <= {s.num_steps - 1})")
        if algo == "crd" and self.crd.steps_per_iter > self.train.prompts_per_iter:
            raise ValueError(f"crd.steps_per_iter={self.crd.steps_per_iter} splits the prompt groups between "
                             f"optimizer steps: it must be <= train.prompts_per_iter={self.train.prompts_per_iter}")
        if algo == "backprop" and (s.sampler != "flow_ode" or self.backprop.grad_steps > s.num_steps):
            raise ValueError(f"train.algorithm=backprop differentiates the flow ODE: set sampling.sampler=flow_ode "
                             f"(got {s.sampler}) and backprop.grad_steps <= sampling.num_steps={s.num_steps}")


# section name -> its dataclass, read from Config's fields (a new section is one field there)
_SECTION_CLASSES = {f.name: globals()[f.type] if isinstance(f.type, str) else f.type for f in fields(Config)}


# old key -> where it went (a config naming an old key fails with this hint)
MOVED_KEYS = {"grpo.adv_std": "advantage.std", "grpo.adv_clip": "advantage.clip",
              "crd.old_decay_max": "crd.old_schedule ('0-0.25-0.005-<max>')",
              "crd.sampler_decay_max": "crd.sampler_schedule ('75-0-0.0075-<max>')",
              "crd.sampler_hard_copy_steps": "crd.sampler_schedule ('<steps>-0-0.0075-0.999')"}

_TYPE_NAMES = {"int": "an integer", "float": "a number", "str": "a string", "bool": "true or false",
               "tuple": "a list", "dict": "a mapping"}


def _key(key: Any) -> str:
    """A key for a message: as written when short and printable, else shortened."""
    if isinstance(key, str) and len(key) <= 40 and key.isprintable() and key.strip() == key:
        return key
    return _short(key)


def _check_type(section: str, key: str, value: Any, annotation: str, yaml_strings: bool = True) -> Any:
    """``value`` checked against a field annotation ('int', 'Optional[float]', ...); returns it normalised
    (int -> float for float fields, numpy scalars -> Python numbers, os.PathLike -> str; with ``yaml_strings`` a
    YAML 1.1 string like '1e-4' -> float). Fails with one line naming the key. Ranges (and NaN / inf) are the
    sections' own checks."""
    optional = annotation.startswith("Optional[")
    base = annotation[len("Optional["):-1] if optional else annotation
    what = f"{_TYPE_NAMES.get(base, base)}{' or null' if optional else ''}"
    if value is None:
        if optional:
            return None
        raise ValueError(f"{section}.{key} must be {_TYPE_NAMES.get(base, base)}, got null")
    if base == "int" and isinstance(value, numbers.Integral) and not isinstance(value, bool):
        if abs(value) > MAX_INT:
            raise ValueError(f"{section}.{key}={_short(value)} must be an integer below 2**63")
        return value if type(value) is int else int(value)
    if base == "float":
        if isinstance(value, str) and yaml_strings and len(value) <= 100:
            try:
                value = float(value)  # YAML 1.1 reads 1e-4 (no dot) as a string
            except ValueError:
                pass
        if _is_number(value):
            try:
                return value if type(value) is float else float(value)
            except (OverflowError, ValueError, TypeError):
                raise ValueError(f"{section}.{key}={_short(value)} must be a finite number") from None
    if base == "str":
        if isinstance(value, str):
            return value
        if isinstance(value, os.PathLike) and isinstance(os.fspath(value), str):
            return os.fspath(value)
    ok = {
        "bool": lambda v: isinstance(v, bool),
        "tuple": lambda v: isinstance(v, (list, tuple)),
        "dict": lambda v: isinstance(v, dict),
    }.get(base)
    if ok is not None and ok(value):
        return value
    raise ValueError(f"{section}.{key}={_short(value)} must be {what}")


def _build(data: Any) -> Config:
    if not isinstance(data, dict):
        raise ValueError(f"a config must be a mapping of sections ({', '.join(_SECTION_CLASSES)}), got "
                         f"{type(data).__name__}")
    _shape("the config", data, MAX_DEPTH)
    parts = {}
    for section, values in data.items():
        if not isinstance(section, str) or section not in _SECTION_CLASSES:
            raise ValueError(f"unknown config section {_short(section)}; valid sections: {', '.join(_SECTION_CLASSES)}")
        cls = _SECTION_CLASSES[section]
        if values is not None and not isinstance(values, dict):
            raise ValueError(f"config section {section!r} must be a mapping of keys, got {_short(values)}")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        checked = {}
        for key, value in (values or {}).items():
            if isinstance(key, str) and f"{section}.{key}" in MOVED_KEYS:
                raise ValueError(f"{section}.{key} is now {MOVED_KEYS[f'{section}.{key}']}: rename the key")
            if not isinstance(key, str) or key not in fields:
                import difflib

                close = difflib.get_close_matches(str(key)[:40], list(fields), n=3) if isinstance(key, str) else []
                raise ValueError(f"unknown key {section}.{_key(key)}; valid keys: "
                                 f"{_names(sorted(fields), first=tuple(close))}")
            checked[key] = _check_type(section, key, value, str(fields[key].type))
        parts[section] = cls(**checked)
    return Config(**parts)


def config_from_dict(data: dict) -> Config:
    """Build a Config from nested dicts; unknown sections or keys, and values of the wrong type or out of range,
    fail with one ValueError line naming the key and what it accepts."""
    try:
        return _build(data)
    except ValueError as err:
        raise ValueError(_one_line(err, MAX_MESSAGE)) from None


def config_to_dict(cfg: Config) -> dict:
    """Plain nested dicts (tuples as lists), ready for YAML/JSON."""
    def plain(v):
        if isinstance(v, (tuple, list)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(dataclasses.asdict(cfg))


def with_overrides(cfg: Config, overrides: dict) -> Config:
    """A new Config with ``{"section.key": value}`` replaced (validated again). Mapping fields take deeper keys,
    e.g. ``{"opd.teachers.ocr.lora": "runs/ocr/lora"}``."""
    if not isinstance(cfg, Config):
        raise ValueError(f"with_overrides needs a Config (load_config / config_from_dict), got {type(cfg).__name__}")
    if not isinstance(overrides, dict):
        raise ValueError(f"overrides must be a mapping {{'section.key': value}}, got {type(overrides).__name__}")
    data = config_to_dict(cfg)
    for dotted, value in overrides.items():
        if not isinstance(dotted, str):
            raise ValueError(f"override key {_short(dotted)} must be a string section.key (e.g. train.lr)")
        section, _, key = dotted.partition(".")
        if not key:
            raise ValueError(f"override {_short(dotted)} must name section.key (sections: "
                             f"{', '.join(_SECTION_CLASSES)})")
        key, *deeper = key.split(".")
        if len(deeper) > MAX_DEPTH:
            raise ValueError(f"override {_short(dotted)} is nested more than {MAX_DEPTH} levels deep")
        if deeper and section not in _SECTION_CLASSES:
            raise ValueError(f"unknown config section {_short(section)}; valid sections: {', '.join(_SECTION_CLASSES)}")
        target = data.setdefault(section, {})
        if deeper:
            if not isinstance(target, dict) or not isinstance(target.get(key, {}), dict) or \
                    (section in data and key not in target):
                raise ValueError(f"override {_short(dotted)}: {section}.{_key(key)} is not a mapping field")
            target = target.setdefault(key, {})
            for part in deeper[:-1]:
                if not isinstance(target.setdefault(part, {}), dict):
                    raise ValueError(f"override {_short(dotted)}: {_key(part)} is not a mapping")
                target = target[part]
            key = deeper[-1]
        if not isinstance(target, dict):
            raise ValueError(f"override {_short(dotted)}: {_key(section)} is not a config section")
        target[key] = value
    return config_from_dict(data)


def _yaml_load(text: str, where: str) -> Any:
    """``yaml.safe_load(text)`` with nesting bounded *before* the (recursive) composer runs; any failure -> one
    ValueError line starting with ``where``."""
    import yaml

    try:
        depth = 0
        for event in yaml.parse(text, Loader=yaml.SafeLoader):  # the parser is iterative; the composer is not
            if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
                depth += 1
                if depth > MAX_DEPTH:
                    raise ValueError(f"{where}: YAML nested more than {MAX_DEPTH} levels deep: a config is "
                                     "section -> key -> value")
            elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
                depth -= 1
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or (str(err).splitlines() or [type(err).__name__])[0]
        raise ValueError(f"{where}: invalid YAML{at}: {_one_line(problem, 100)}") from None
    except (TypeError, AttributeError, OverflowError, KeyError, IndexError, RecursionError) as err:
        raise ValueError(f"{where}: invalid YAML: a value cannot be read ({type(err).__name__})") from None
    except ValueError as err:  # a YAML constructor's (e.g. a date 2024-13-01, !!float abc), or the nesting bound
        msg = str(err)
        raise ValueError(msg if msg.startswith(where) else f"{where}: invalid YAML: {_one_line(msg, 100)}") from None


def parse_overrides(items: list[str]) -> dict:
    """``["train.lr=1e-3", "sampling.sde_window=[0, 2]"]`` -> ``{"train.lr": 0.001, ...}``; each value is read
    with yaml.safe_load (numbers, booleans, null, lists, mappings; anything else stays a string)."""
    if isinstance(items, (str, bytes)) or not isinstance(items, (list, tuple)):
        raise ValueError(f"overrides must be a list of 'section.key=value' strings, got {type(items).__name__}")
    out = {}
    for item in items:
        if not isinstance(item, str):
            raise ValueError(f"override {_short(item)} must be a string section.key=value (e.g. train.lr=1e-4)")
        key, eq, raw = item.partition("=")
        if not eq or "." not in key or not key.split(".")[0]:
            raise ValueError(f"override {_short(item)} must look like section.key=value (e.g. train.lr=1e-4)")
        where = f"override {_short(item)}"
        try:
            out[key.strip()] = _yaml_load(raw, where) if raw.strip() else None
        except ValueError as err:  # the message of the old API: "override ...: cannot read the value as YAML (...)"
            problem = str(err)[len(where) + 2:]
            raise ValueError(f"{where}: cannot read the value as YAML ({problem})") from None
    return out


def resolve_config_path(path: str) -> str:
    """``path`` if it is a file, else the shipped recipe it names (``configs/toy_grpo.yaml`` or ``toy_grpo.yaml``
    from any folder); FileNotFoundError naming it otherwise."""
    from .resources import shipped_config

    if isinstance(path, os.PathLike):
        path = os.fspath(path)
    if not isinstance(path, str):
        raise ValueError(f"a config path must be a string, got {type(path).__name__}")
    if "\x00" not in path and os.path.isfile(path):
        return path
    name = os.path.basename(path)
    shipped = shipped_config(name) if "\x00" not in name and name not in ("", ".", "..") else ""
    if shipped and os.path.normpath(path) in (name, os.path.join("configs", name)) and os.path.isfile(shipped):
        return shipped
    raise FileNotFoundError(f"config file {_short_path(path)} not found (shipped recipes: "
                            f"`ls {os.path.dirname(shipped_config('x.yaml'))}`)")


def load_config(path: str, overrides: Optional[list[str] | dict] = None) -> Config:
    """Read a YAML config file and apply ``section.key=value`` overrides; every error is one line naming the
    file (its name, not its folder or contents) or key."""
    path = resolve_config_path(path)
    name = os.path.basename(path)
    name = name if len(name) <= 60 and name.isprintable() else _short(name)[1:-1]
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as err:
        raise ValueError(f"config file {name}: cannot read it ({err.strerror or type(err).__name__})") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ValueError(f"{name}: a config file is a YAML text of at most {MAX_CONFIG_BYTES} bytes; this one is "
                         "larger")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{name}: not UTF-8 text (byte {err.start}): a config is a YAML text file") from None
    data = _yaml_load(text, name)
    data = {} if data is None else data
    try:
        cfg = config_from_dict(data)
        if overrides:
            cfg = with_overrides(cfg, parse_overrides(overrides) if isinstance(overrides, list) else overrides)
    except (ValueError, TypeError) as err:
        raise ValueError(_one_line(f"{name}: {err}", MAX_MESSAGE)) from None
    return cfg
