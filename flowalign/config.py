"""Configuration dataclasses. Fields carry their help text; each section validates in ``__post_init__``
and fails with a message that says how to fix it. YAML and ``key=value`` overrides fill them
(``load_config``); nothing mutates a config after start-up.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Optional

DEFAULT_MODEL = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "toy-sd3")


def _help(text: str, default: Any) -> Any:
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": text})
    return field(default=default, metadata={"help": text})


def _choice(section: str, name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{section}.{name}={value!r} is not valid; choose one of {', '.join(map(str, choices))}")


def _positive(section: str, name: str, value: float, allow_zero: bool = False) -> None:
    if not (value >= 0 if allow_zero else value > 0):
        raise ValueError(f"{section}.{name} must be {'>= 0' if allow_zero else '> 0'}, got {value}")


@dataclass(frozen=True)
class ModelConfig:
    path: str = _help("diffusers pipeline: hub id or local folder (default: the shipped toy pipeline)", DEFAULT_MODEL)
    family: Optional[str] = _help("sd3 | flux | sd | sdxl | wan; None = detect from the pipeline class", None)
    dtype: str = _help("denoiser weights: float32 | bfloat16 | float16 (sampler math stays float32)", "float32")
    lora_rank: int = _help("LoRA rank r", 16)
    lora_alpha: Optional[float] = _help("LoRA alpha (None = 2 r)", None)
    lora_dropout: float = _help("LoRA dropout", 0.0)
    gradient_checkpointing: bool = _help("recompute activations in backward to save memory", False)

    def __post_init__(self):
        _choice("model", "dtype", self.dtype, ("float32", "bfloat16", "float16"))
        _choice("model", "family", self.family, (None, "sd3", "flux", "sd", "sdxl", "wan"))
        _positive("model", "lora_rank", self.lora_rank)


@dataclass(frozen=True)
class SamplingConfig:
    num_steps: int = _help("denoising steps per training rollout", 10)
    eval_num_steps: int = _help("denoising steps at evaluation", 10)
    guidance_scale: float = _help("CFG scale of the policy (the policy is the CFG-combined velocity)", 4.5)
    sampler: str = _help("flow_sde | flow_constant_noise | flow_cps | ddim (SD/SDXL)", "flow_sde")
    noise_level: float = _help("a of the flow SDE / CPS, eta of the constant-noise SDE / DDIM", 0.7)
    sde_window: Optional[tuple] = _help("[start, length]: only these steps are stochastic (Flow-GRPO-Fast)", None)

    def __post_init__(self):
        _positive("sampling", "num_steps", self.num_steps)
        _positive("sampling", "eval_num_steps", self.eval_num_steps)
        _positive("sampling", "noise_level", self.noise_level)
        _choice("sampling", "sampler", self.sampler, ("flow_sde", "flow_constant_noise", "flow_cps", "ddim"))
        if self.sde_window is not None:
            if len(self.sde_window) != 2 or self.sde_window[0] < 0 or self.sde_window[1] < 1 or \
                    self.sde_window[0] + self.sde_window[1] > self.num_steps:
                raise ValueError(f"sampling.sde_window={list(self.sde_window)} must be [start, length] with "
                                 f"length >= 1 inside the {self.num_steps} steps")
            object.__setattr__(self, "sde_window", tuple(int(v) for v in self.sde_window))


@dataclass(frozen=True)
class GRPOConfig:
    clip_range: float = _help("ratio clip eps (Flow-GRPO: 1e-4 with mean-reduced log-probs)", 1e-4)
    beta: float = _help("KL coefficient to the adapter-disabled reference (0 = no reference pass)", 0.0)
    kl_scaling: str = _help("exact | reference (the Flow-GRPO code's x Delta scaling; use with beta=0.04)", "exact")
    adv_std: str = _help("advantage std: global (whole batch, Flow-GRPO default) | group", "global")
    adv_clip: float = _help("clip advantages to +-adv_clip", 5.0)
    guard: bool = _help("GRPO-Guard ratio normalisation and 1/Delta reweighting", False)
    inner_epochs: int = _help("passes over each rollout batch", 1)

    def __post_init__(self):
        _positive("grpo", "clip_range", self.clip_range)
        _positive("grpo", "beta", self.beta, allow_zero=True)
        _choice("grpo", "kl_scaling", self.kl_scaling, ("exact", "reference"))
        _choice("grpo", "adv_std", self.adv_std, ("global", "group"))
        _positive("grpo", "inner_epochs", self.inner_epochs)


@dataclass(frozen=True)
class TrainConfig:
    reward: str = _help("reward name in flowalign.rewards.REWARDS", "toy_geneval")
    prompts: str = _help("'toy' (the toy world's GenEval train split) or a text file, one prompt per line", "toy")
    iterations: int = _help("rollout -> update iterations", 100)
    prompts_per_iter: int = _help("distinct prompts per iteration", 8)
    group_size: int = _help("samples per prompt (one GRPO group, same initial noise)", 8)
    minibatch: int = _help("samples per forward/backward in the update", 32)
    lr: float = _help("AdamW learning rate", 3e-4)
    weight_decay: float = _help("AdamW weight decay", 1e-4)
    grad_clip: float = _help("max gradient norm", 1.0)
    ema_decay: float = _help("EMA of the LoRA weights for evaluation (0 = off)", 0.0)
    seed: int = _help("seed of prompts, noise and initialisation", 0)
    out_dir: str = _help("where metrics, samples and the LoRA are written", "runs/train")
    eval_every: int = _help("held-out evaluation every N iterations (0 = only at the end)", 0)
    eval_per_task: int = _help("held-out images per toy task at evaluation", 16)

    def __post_init__(self):
        for name in ("iterations", "prompts_per_iter", "group_size", "minibatch", "lr", "eval_per_task"):
            _positive("train", name, getattr(self, name))
        if self.group_size < 2:
            raise ValueError("train.group_size must be >= 2: advantages are relative within a prompt's group")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"train.ema_decay must be in [0, 1), got {self.ema_decay}")


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


SECTIONS = {f.name: f.type for f in dataclasses.fields(Config)}
_SECTION_CLASSES = {"model": ModelConfig, "sampling": SamplingConfig, "grpo": GRPOConfig, "train": TrainConfig}


def config_from_dict(data: dict) -> Config:
    """Build a Config from nested dicts; unknown sections or keys fail naming the valid ones."""
    if not isinstance(data, dict):
        raise ValueError(f"a config must be a mapping of sections ({', '.join(_SECTION_CLASSES)}), got {type(data).__name__}")
    parts = {}
    for section, values in data.items():
        if section not in _SECTION_CLASSES:
            raise ValueError(f"unknown config section {section!r}; valid sections: {', '.join(_SECTION_CLASSES)}")
        cls = _SECTION_CLASSES[section]
        valid = {f.name for f in dataclasses.fields(cls)}
        for key in values or {}:
            if key not in valid:
                raise ValueError(f"unknown key {section}.{key}; valid keys: {', '.join(sorted(valid))}")
        parts[section] = cls(**(values or {}))
    return Config(**parts)


def config_to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def with_overrides(cfg: Config, overrides: dict) -> Config:
    """A new Config with ``{"section.key": value}`` replaced (validated again)."""
    data = config_to_dict(cfg)
    for dotted, value in overrides.items():
        section, _, key = dotted.partition(".")
        data.setdefault(section, {})[key] = value
    return config_from_dict(data)
