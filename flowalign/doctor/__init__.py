"""flowalign.doctor: "is it on-policy, is it learning?" for a config's model, sampler and reward, before training.

``flowalign doctor CONFIG [overrides]`` (or :func:`run`) rolls out a few prompt groups and re-scores them with the
unchanged policy under the settings that break the on-policy ratio in practice (denoiser dtype, rollout batch vs
training minibatch, CFG batching, attention kernel, determinism; ``settings``, ``cases``, ``onpolicy``), checks
the reference, the LoRA gradients, the KL scaling, the reward and the sampling grid (``checks``), prints one
verdict per check with its fix (``diagnosis``, ``verdict``) and writes doctor.md, doctor.json and
doctor_gaps.png (``report``). docs/doctor.md explains every line.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import numpy as np
import torch
from tqdm import tqdm

from .cases import gap_cases, has_ratio
from .checks import check_grid, check_gradients, check_kl_scaling, check_reference, check_reward, make_probe
from .diagnosis import on_policy_check, setting_checks
from .onpolicy import GapResult, measure
from .report import write
from .settings import DTYPE_BY_NAME
from .verdict import Check, worst

__all__ = ["DEFAULT_ROWS", "DoctorReport", "cases", "checks", "diagnosis", "onpolicy", "parse_dtypes", "report",
           "run", "settings", "verdict"]

DEFAULT_ROWS = 16  # rows rolled out per setting when --rows is not given (at most the run's rollout batch)


@dataclass
class DoctorReport:
    """What :func:`run` found: the checks (verdict order), the gap table and the files written."""

    checks: list[Check]
    gaps: list[GapResult]
    paths: dict
    seconds: float

    @property
    def verdict(self) -> str:
        return worst(self.checks)

    def check(self, name: str) -> Check:
        return next(c for c in self.checks if c.name == name)


def parse_dtypes(text: Union[str, Sequence[str], None], device) -> list[torch.dtype]:
    """'fp32,bf16' -> dtypes; None -> fp32, bf16 and fp16."""
    if text is None:
        return [torch.float32, torch.bfloat16, torch.float16]
    names = [t.strip() for t in (text.split(",") if isinstance(text, str) else text) if t.strip()]
    unknown = [n for n in names if n not in DTYPE_BY_NAME]
    if unknown or not names:
        raise ValueError(f"--dtypes takes a comma-separated list of fp32, bf16, fp16 (got {text!r})")
    return list(dict.fromkeys(DTYPE_BY_NAME[n] for n in names))


def _rollout_batch(cfg) -> int:
    """Rows per rollout call in the run (one process): the batch, split in train.reward_chunks chunks."""
    t = cfg.train
    groups = t.prompts_per_iter
    return t.group_size * max(1, groups // max(1, min(t.reward_chunks, groups)))


def _prompts(cfg, rows: int, seed: int) -> list[str]:
    from ..algorithms import ALGORITHMS
    from ..prompts import PromptSource

    _, _, spec = next(iter(ALGORITHMS[cfg.train.algorithm].task_specs(cfg).values()))
    g = cfg.train.group_size
    return [p for p in PromptSource(spec).sample(max(1, rows // g), np.random.default_rng(seed)) for _ in range(g)]


def _reward(cfg):
    from ..algorithms import ALGORITHMS
    from ..rewards import get as get_reward

    name, options, _ = next(iter(ALGORITHMS[cfg.train.algorithm].task_specs(cfg).values()))
    return get_reward(name, **options) if name else None


def run(config, overrides: Sequence[str] = (), *, adapter=None, reward=None, out: Optional[str] = None,
        rows: Optional[int] = None, dtypes=None, seed: int = 0, progress: bool = True,
        echo: bool = True) -> DoctorReport:
    """Diagnose ``config`` (a YAML path or a Config) and write the report into ``out`` (default
    ``<train.out_dir>/doctor``).

    Args:
        adapter: a pipeline adapter to use instead of loading ``model.path`` (no LoRA on it yet).
        reward: a Reward instead of the configured ``train.reward``.
        rows: rows rolled out per setting (default: the run's rollout batch, at most ``DEFAULT_ROWS``; 0: the
            run's rollout batch; whole prompt groups). dtypes: the denoiser dtypes of the table ('fp32,bf16,fp16' or a list).
        echo: print the verdict lines.
    """
    from ..config import Config, load_config
    from ..runtime.machine import describe_machine, machine_info
    from ..trainer import add_policy_lora, prepare_model
    from .. import lora

    t0 = time.perf_counter()
    cfg = config if isinstance(config, Config) else load_config(config, list(overrides))
    device = cfg.model.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtypes = parse_dtypes(dtypes, device)
    batch = _rollout_batch(cfg)
    g = cfg.train.group_size
    rows = min(batch, DEFAULT_ROWS) if rows is None else (batch if rows == 0 else rows)
    rows = max(g, rows // g * g)
    torch.manual_seed(seed)
    bar = tqdm(total=4, desc="doctor", disable=not progress, leave=False)
    say = lambda text: bar.set_postfix_str(text[:60], refresh=True)  # noqa: E731
    say("loading the model")
    adapter = prepare_model(cfg, adapter, device=device)
    prompts = _prompts(cfg, rows, seed)
    probe = make_probe(adapter, cfg, prompts, seed)  # the base pipeline's prediction, before the LoRA exists
    params = add_policy_lora(cfg, adapter)
    if cfg.model.gradient_checkpointing:
        lora.set_gradient_checkpointing(adapter, True)
    checks = [check_reference(adapter, params, probe), check_gradients(adapter, params, probe)]
    bar.update()
    cases = gap_cases(cfg, adapter, len(prompts), dtypes)
    bar.total += len(cases)
    rollouts: dict = {}

    def told(text):
        say(text)
        if text.startswith("re-score"):
            bar.update()

    results = measure(adapter, prompts, cfg, cases, seed, progress=told, rollouts=rollouts)
    conf = next(r for r in results if r.case.configured)
    traj = rollouts[(conf.case.rollout.key(), conf.case.rollout.batch)]
    checks.insert(0, on_policy_check(results, has_ratio(cfg), cfg.train.algorithm, len(prompts), batch))
    checks += setting_checks(results, len(prompts))
    say("KL scaling, reward, grid")
    checks.append(check_kl_scaling(adapter, cfg, traj))
    with torch.no_grad():
        images = adapter.decode(traj.output(cfg.sampling.decode))
    checks.append(check_reward(reward if reward is not None else _reward(cfg), images, traj.prompts))
    bar.update()
    checks.append(check_grid(adapter, cfg, prompts[0]))
    bar.update(2)
    bar.close()
    seconds = time.perf_counter() - t0
    machine = machine_info()
    header = {"config": config if isinstance(config, str) else "(Config)", "overrides": list(overrides),
              "model": cfg.model.path, "family": adapter.family, "algorithm": cfg.train.algorithm,
              "sampler": cfg.sampling.sampler, "rows": len(prompts), "rollout_batch": batch,
              "minibatch": cfg.train.minibatch, "num_steps": cfg.sampling.num_steps, "device": str(adapter.device),
              "machine": describe_machine(machine), "machine_info": machine, "seconds": seconds}
    out = out or os.path.join(cfg.train.out_dir, "doctor")
    paths = write(out, checks, results, header)
    if echo:
        for c in checks:
            print(c.line())
        print(f"verdict: {worst(checks).upper()} ({seconds:.0f} s); wrote {paths['md']}, {paths['json']}, "
              f"{paths['png']}")
    return DoctorReport(checks, results, paths, seconds)
