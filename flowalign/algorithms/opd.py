"""DiffusionOPD: on-policy distillation from task teachers (docs/math.md §3). No I/O.

Objective: ``min_theta E_{c, x_{0:N} ~ pi_theta (no grad)} sum_k KL(pi_theta(. | x_k, c) || pi_T(c)(. | x_k, c))``,
a per-step reverse KL on the STUDENT's own rollout, against the teacher of the prompt's task.

Per step (``opd_step_loss``), between the student's and the teacher's Gaussian transitions from the same x_k:
- SDE steps, scaling="exact": ``KL = |mu_S - mu_T|^2 / (2 std^2)`` (GaussianStep.kl, mean over elements by
  default as the reference code averages);
- scaling="reference" [ref]: ``mean_d (mu_S - mu_T)^2 / (2 std_k^2)`` with std_k the sampler's std, where the
  flow SDE uses ``s_t`` WITHOUT sqrt(Delta): the exact KL times Delta (``GaussianStep.kl(scaling="reference")``;
  CPS/DDIM steps carry no Delta and keep their true std);
- deterministic steps (ODE, eta = 0 DDIM; std^2 <= 1e-12), both scalings: "mean matching"
  ``std^2 KL -> 1/2 mean_d (mu_S - mu_T)^2 = (Delta^2 / 2) mean_d (v_S - v_T)^2`` for the flow ODE.

Teachers are frozen LoRA adapters on the student's base, each with its own CFG scale, evaluated at the student's
states by switching adapters (no extra model copies): ``teacher_for_task`` and ``opd_rescore_step``.
ExOPD (G-OPD, "Learning beyond Teacher", arXiv 2602.12125): with ``extrapolation`` lambda != 1 the target is
``pi* ∝ pi_ref (pi_T / pi_ref)^lambda`` (reward extrapolation, pi_ref = the base: every adapter off). For per-step
Gaussians with one shared std it is the Gaussian of mean ``mu* = mu_ref + lambda (mu_T - mu_ref)`` [derived], the
teacher under RL Guidance at scale lambda; the loss above is taken against it (``extrapolated_step``). The
reference runs at the teacher's CFG. lambda = 1 is plain OPD (no reference call).
Optional f-divergence hook: ``divergence=`` multiplies the per-sample loss by the detached, batch-normalised
``h(r)`` of the exact transition density ratio r = p_T(x') / p_S(x') (``fdistill.transition_weights``); the
default (None / "reverse_kl") is the plain objective above.
``OPDUpdate`` is the update rule the trainer drives (teachers = frozen LoRA folders loaded next to the student).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence, Union

import numpy as np
import torch

from .. import lora
from ..models.base import PipelineAdapter
from ..rollout import Trajectory, rescore
from ..samplers import GaussianStep
from .base import UpdateRule
from .fdistill import transition_weights

SCALINGS = ("exact", "reference")
DETERMINISTIC_VAR = 1e-12


@dataclass(frozen=True)
class Teacher:
    """A task teacher: the name of its (frozen) LoRA adapter on the shared base and its own CFG scale."""

    adapter_name: str
    guidance_scale: float


TeacherLike = Union[Teacher, tuple]
# The multi-teacher recipe [ref]: aesthetic 4.5, OCR 4.5, GenEval 1.0 (adapter named after its task).
DEFAULT_TEACHERS: dict[str, Teacher] = {
    "aesthetic": Teacher("aesthetic", 4.5),
    "ocr": Teacher("ocr", 4.5),
    "geneval": Teacher("geneval", 1.0),
}


def teacher_for_task(task: str, teachers: Mapping[str, TeacherLike] = DEFAULT_TEACHERS) -> Teacher:
    """The teacher of ``task``; table values are Teacher or ``(adapter_name, guidance_scale)`` tuples."""
    if task not in teachers:
        raise KeyError(f"no teacher for task {task!r}; known tasks: {', '.join(teachers) or 'none'}")
    t = teachers[task]
    if isinstance(t, Teacher):
        return t
    if isinstance(t, (tuple, list)) and len(t) == 2:
        return Teacher(str(t[0]), float(t[1]))
    raise ValueError(f"teacher of task {task!r} must be Teacher(adapter_name, guidance_scale) or a "
                     f"(name, scale) pair, got {t!r}")


def _is_deterministic(step: GaussianStep) -> bool:
    det = step.std.float() ** 2 <= DETERMINISTIC_VAR
    if det.any() and not det.all():
        raise ValueError("a batch mixes deterministic and stochastic transitions; split it by step type")
    return bool(det.all())


def opd_step_loss(
    student: GaussianStep,
    teacher: GaussianStep,
    scaling: str = "exact",
    reduction: str = "mean",
    divergence: Optional[str] = None,
    alpha: Optional[float] = None,
) -> torch.Tensor:
    """Per-sample OPD loss of one step -> [B].

    Args:
        student: the student's transition at x_k (with grad; prev_sample = its rollout's x_{k+1}).
        teacher: the teacher's transition at the same x_k (no grad), same sampler.
        scaling: "exact" KL or "reference" (the published code's scaling, see the module docstring).
        reduction: "mean" (reference) or "sum" over elements.
        divergence, alpha: f-divergence weighting hook (stochastic steps only); None = plain reverse KL.
    """
    if scaling not in SCALINGS:
        raise ValueError(f"scaling must be one of {SCALINGS}, got {scaling!r}")
    if student.mean.shape != teacher.mean.shape:
        raise ValueError(f"student {tuple(student.mean.shape)} and teacher {tuple(teacher.mean.shape)} steps differ")
    if _is_deterministic(student) or _is_deterministic(teacher):
        loss = student.mean_matching(teacher, reduction=reduction)
        if divergence not in (None, "reverse_kl"):
            raise ValueError(f"divergence={divergence!r} needs density ratios, undefined for deterministic "
                             "(ODE) steps; use divergence=None")
        return loss
    loss = student.kl(teacher, reduction=reduction, scaling=scaling)
    if divergence not in (None, "reverse_kl"):
        loss = loss * transition_weights(student, teacher, divergence, alpha)
    return loss


def extrapolated_step(teacher: GaussianStep, reference: GaussianStep, extrapolation: float) -> GaussianStep:
    """ExOPD's target transition: mean ``mu_ref + lambda (mu_T - mu_ref)`` [B, ...], the teacher's std,
    prev_sample and other fields (the optimum of ``pi_ref (pi_T / pi_ref)^lambda`` for a shared std).
    lambda = 1 returns ``teacher`` itself."""
    lam = float(extrapolation)
    if not np.isfinite(lam):
        raise ValueError(f"extrapolation must be a finite number (1 = plain OPD), got {extrapolation!r}")
    if lam == 1.0:
        return teacher
    mean = reference.mean.float() + lam * (teacher.mean.float() - reference.mean.float())
    return dataclasses.replace(teacher, mean=mean)


def _check_tasks(tasks: Sequence[str], n: int) -> list[str]:
    tasks = [tasks] * n if isinstance(tasks, str) else list(tasks)
    if len(tasks) != n:
        raise ValueError(f"{len(tasks)} task ids for a trajectory of {n} rows; give one task per prompt")
    return tasks


def _combine(parts: list[tuple[torch.Tensor, GaussianStep]], like: GaussianStep) -> GaussianStep:
    """Scatter per-task teacher steps (rows, step) back into batch order."""
    fields = {}
    for name in (f.name for f in dataclasses.fields(GaussianStep)):
        ref = getattr(like, name)
        if not isinstance(ref, torch.Tensor):  # None or a setting such as log_prob_convention
            fields[name] = ref
            continue
        out = torch.empty_like(ref, dtype=torch.float32)
        for rows, step in parts:
            out[rows.to(out.device)] = getattr(step, name).float()
        fields[name] = out
    return GaussianStep(**fields)


def teacher_step(
    adapter: PipelineAdapter,
    traj: Trajectory,
    step_index: int,
    tasks: Sequence[str],
    teachers: Mapping[str, TeacherLike] = DEFAULT_TEACHERS,
    like: Optional[GaussianStep] = None,
    extrapolation: float = 1.0,
) -> GaussianStep:
    """The teachers' transition at step k for every row (no grad): rows of each task are re-scored with that
    task's LoRA adapter active (``lora.using_adapter``) and its own CFG (``rescore(guidance_scale=g,
    index=rows)``). Prompts are re-encoded when the teacher's CFG needs unconditional embeddings the rollout
    did not record. ``like``: a step of the batch's layout (default: re-scored from the first task's rows).
    ``extrapolation`` lambda != 1: ExOPD's target (``extrapolated_step``) instead of the teacher."""
    tasks = _check_tasks(tasks, traj.batch_size)
    parts = []
    for task in dict.fromkeys(tasks):
        rows = torch.tensor([i for i, x in enumerate(tasks) if x == task], dtype=torch.long)
        parts.append((rows, teacher_rescore(adapter, traj, step_index, rows, teacher_for_task(task, teachers),
                                            extrapolation)))
    if like is None:
        like = _expand_layout(parts[0][1], traj.batch_size)
    return _combine(parts, like)


def teacher_rescore(adapter: PipelineAdapter, traj: Trajectory, step_index: int, rows: torch.Tensor,
                    teacher: Teacher, extrapolation: float = 1.0) -> GaussianStep:
    """One teacher's transition at step k for rows ``rows`` (no grad): its LoRA adapter active, its own CFG
    (prompts re-encoded when that CFG needs unconditional embeddings the rollout did not record). With
    ``extrapolation`` lambda != 1, ExOPD's target: the base (every adapter off) re-scored at the same CFG gives
    mu_ref, and the mean is ``mu_ref + lambda (mu_T - mu_ref)``."""
    with torch.no_grad():
        cond = traj.cond.select(rows)
        if cond.uncond is None:
            cond = adapter.encode_prompts(cond.prompts, teacher.guidance_scale)
        kw = dict(index=rows, guidance_scale=teacher.guidance_scale, cond=cond)
        with lora.using_adapter(adapter, teacher.adapter_name):
            step = rescore(adapter, traj, step_index, **kw)
        if float(extrapolation) == 1.0:
            return step
        with lora.adapter_disabled(adapter):
            reference = rescore(adapter, traj, step_index, **kw)
        return extrapolated_step(step, reference, extrapolation)



def _expand_layout(step: GaussianStep, n: int) -> GaussianStep:
    grow = lambda x: x[:1].expand(n, *x.shape[1:]) if isinstance(x, torch.Tensor) else x  # noqa: E731
    return GaussianStep(**{f.name: grow(getattr(step, f.name)) for f in dataclasses.fields(GaussianStep)})


@dataclass
class OPDLoss:
    """loss: scalar to minimise (batch mean, summed over the given steps); per_sample: [B] (detached);
    per_step: [S] the batch-mean loss of each step (detached)."""

    loss: torch.Tensor
    per_sample: torch.Tensor
    per_step: torch.Tensor


def opd_rescore_loss(
    adapter: PipelineAdapter,
    traj: Trajectory,
    tasks: Sequence[str],
    teachers: Mapping[str, TeacherLike] = DEFAULT_TEACHERS,
    steps: Optional[Sequence[int]] = None,
    scaling: str = "exact",
    reduction: str = "mean",
    divergence: Optional[str] = None,
    alpha: Optional[float] = None,
    mask: Optional[torch.Tensor] = None,
    extrapolation: float = 1.0,
) -> OPDLoss:
    """OPD loss of a student trajectory (rolled out without grad): ``sum_{k in steps} mean_i loss_k,i``.

    The student (the active adapter) re-scores each step with grad at its recorded states and CFG; each row's
    teacher re-scores it without grad. Call it with one step at a time (``steps=[k]``) and backward each to
    accumulate gradients when memory is tight. steps default: all steps of the trajectory. ``extrapolation``
    lambda: ExOPD's target (module docstring); 1 = plain OPD.
    """
    tasks = _check_tasks(tasks, traj.batch_size)
    steps = list(range(traj.num_steps)) if steps is None else [int(k) for k in steps]
    if not steps:
        raise ValueError("steps is empty; give at least one step index")
    weights = torch.ones(traj.batch_size) if mask is None else mask.float().cpu()
    total, per_sample, per_step = 0.0, 0.0, []
    for k in steps:
        student = rescore(adapter, traj, k)
        teacher = teacher_step(adapter, traj, k, tasks, teachers, like=student, extrapolation=extrapolation)
        loss_k = opd_step_loss(student, teacher, scaling, reduction, divergence, alpha)
        w = weights.to(loss_k.device)
        mean_k = (loss_k * w).sum() / w.sum().clamp_min(1.0)
        total = total + mean_k
        per_sample = per_sample + loss_k.detach()
        per_step.append(mean_k.detach())
    return OPDLoss(loss=total, per_sample=per_sample, per_step=torch.stack(per_step))


# ---- update rule ------------------------------------------------------------------------------------


def load_teachers(adapter: PipelineAdapter, specs: Mapping[str, Mapping]) -> dict[str, Teacher]:
    """Load each task's teacher LoRA folder as a frozen adapter ``teacher_<task>`` on the student's base.

    specs: task -> {lora: folder (``lora.save_lora`` / diffusers format), guidance_scale: the teacher's CFG}.
    The student's adapter stays active and trainable. A ``teacher_<task>`` adapter already on the model (loaded
    before FSDP sharding, ``OPDUpdate.prepare_model``) is used as it is."""
    teachers = {}
    for task, spec in specs.items():
        name = f"teacher_{task}"
        if name in lora.adapter_names(adapter):
            teachers[task] = Teacher(name, float(spec.get("guidance_scale", 1.0)))
            continue
        path = spec["lora"]
        if not os.path.exists(path):
            raise FileNotFoundError(f"teacher LoRA for task {task!r} not found at {path!r}: train it first (e.g. "
                                    "flowalign train with that task's reward) or set opd.teachers."
                                    f"{task}.lora=FOLDER")
        lora.load_lora(adapter, path, adapter_name=name, trainable=False)
        teachers[task] = Teacher(name, float(spec.get("guidance_scale", 1.0)))
    return teachers


def train_steps(num_steps: int, window: Optional[tuple], generator: Optional[torch.Generator]) -> list[int]:
    """Steps trained this iteration: all, or ``length`` consecutive steps placed uniformly at random inside
    ``first..last`` for window = (first, last, length) [uncertain reading of "a window of 3 steps in [0, 5]"]."""
    if window is None:
        return list(range(num_steps))
    first, last, length = window
    if last >= num_steps:
        raise ValueError(f"train window {list(window)} does not fit in {num_steps} steps")
    start = first + int(torch.randint(last - first - length + 2, (1,), generator=generator))
    return list(range(start, start + length))


class OPDUpdate(UpdateRule):
    """DiffusionOPD (docs/math.md §3) on a trainer state.

    The student (the live LoRA) rolls out with the configured sampler and CFG (the paper: ODE, CFG 4.5).
    Teachers are frozen LoRA adapters loaded from ``opd.teachers`` folders; each row's task (the trainer samples
    prompts per task from that teacher's ``prompts``) picks its teacher and its CFG. Update: for every trained
    step k and every task-homogeneous minibatch the student re-scores the step with grad, the teacher without,
    and ``opd_step_loss`` (exact KL / reference scaling; mean matching on deterministic steps) is summed over
    steps and averaged over the batch; ONE optimizer step per iteration (a full cycle over the tasks).
    ``opd.extrapolation`` lambda != 1 distils toward ExOPD's extrapolated target instead (module docstring).
    Rewards are not used (they are only logged when a task names one). Metrics: loss, ``loss_<task>``,
    ``per_step`` (list), steps, grad_norm, update_samples.
    """

    name = "opd"
    title = "DiffusionOPD"  # how reports name the method
    uses_rewards = False

    def __init__(self, cfg, adapter, params, optimizer, generator):
        super().__init__(cfg, adapter, params, optimizer, generator)
        self.teachers = load_teachers(adapter, cfg.opd.teachers)

    @classmethod
    def prepare_model(cls, cfg, adapter) -> None:
        """The teacher adapters go onto the model before it is sharded (FSDP shards them with the base)."""
        load_teachers(adapter, cfg.opd.teachers)

    @classmethod
    def task_specs(cls, cfg) -> dict:
        """One task per teacher: its optional ``reward`` (no options) on its ``prompts`` (default train.prompts)."""
        return {task: (spec.get("reward"), {}, spec.get("prompts") or cfg.train.prompts)
                for task, spec in cfg.opd.teachers.items()}

    @property
    def tasks(self) -> list[str]:
        return list(self.teachers)

    def update(self, traj: Trajectory, adv=None, valid=None, rewards=None, tasks=None) -> dict:
        c, t = self.cfg.opd, self.cfg.train
        tasks = _check_tasks(tasks, traj.batch_size * self.dist.world_size)  # global, one per row
        steps = train_steps(traj.num_steps, c.train_window, self.generator)
        by_task = {task: torch.tensor([i for i, x in enumerate(tasks) if x == task], dtype=torch.long)
                   for task in dict.fromkeys(tasks)}
        n = len(tasks)
        per_task = {task: 0.0 for task in by_task}
        per_step = []
        self.optimizer.zero_grad(set_to_none=True)
        for k in steps:
            step_total = 0.0
            for task, rows in by_task.items():
                teacher = teacher_for_task(task, self.teachers)
                for mb in rows.split(t.minibatch):
                    part = self.dist.part(mb, traj.batch_size)  # the rows of mb this process holds (all, in one)
                    if not part.size:
                        continue
                    student = rescore(self.adapter, traj, k, index=part.local)
                    target = teacher_rescore(self.adapter, traj, k, part.local, teacher, c.extrapolation)
                    loss = opd_step_loss(student, target, c.scaling, c.reduction, c.divergence, c.alpha)
                    (loss.sum() * (0.0 if part.placeholder else 1.0) / n).backward()
                    if part.placeholder:  # FSDP: a zero-weight row that only keeps the collectives in step
                        continue
                    per_task[task] += loss.detach().sum().item()
                    step_total += loss.detach().sum().item()
            per_step.append(step_total / n)
        grad_norm = self.optimizer_step()
        per_step = self.dist.sum(per_step)  # distributed: the whole batch's losses
        per_task = dict(zip(per_task, self.dist.sum(list(per_task.values()))))
        out = {"update_samples": n, "loss": float(np.sum(per_step)), "per_step": per_step, "steps": steps,
               "grad_norm": grad_norm}
        out.update({f"loss_{task}": per_task[task] / len(rows) for task, rows in by_task.items()})
        return out
