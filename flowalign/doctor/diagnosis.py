"""From the gap table to verdicts: the on-policy check of the configured case, with the fix the table supports,
and one finding per setting that moves the ratio (batch size, dtype, CFG batching, attention kernel,
determinism, a cross-dtype rollout).

A case's severity at clip range eps: ``fail`` when the re-scored ratio already leaves ``[1 - eps, 1 + eps]`` for
some row (the first update clips a sample whose policy has not moved), ``warn`` when ``max |rho - 1| > eps / 10``,
else ``ok``.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

from .onpolicy import GapResult
from .settings import DTYPE_NAMES
from .verdict import Check


def case_status(result: GapResult) -> str:
    eps = result.case.clip_range
    err = result.max_ratio_error
    if not math.isfinite(err):  # a deterministic sampler: no ratio; the mean gap alone
        return "ok" if result.max_mean_gap == 0 else "info"
    if result.max_clip_frac > 0:
        return "fail"
    return "warn" if err > eps / 10 else "ok"


def _err(result: Optional[GapResult]) -> float:
    return float("nan") if result is None else result.max_ratio_error


def _find(results: Sequence[GapResult], name: str) -> Optional[GapResult]:
    return next((r for r in results if r.case.name == name), None)


def _fmt(x: float) -> str:
    return "nan" if math.isnan(x) else ("0" if x == 0 else f"{x:.1e}")


def on_policy_check(results: Sequence[GapResult], has_ratio: bool, algorithm: str, rows: int,
                    rollout_batch: int) -> Check:
    """The verdict on the configured case, with the best fix among the measured alternatives."""
    conf = next(r for r in results if r.case.configured)
    status, err, eps = case_status(conf), conf.max_ratio_error, conf.case.clip_range
    data = {"case": conf.case.name, "max_ratio_error": err, "max_clip_frac": conf.max_clip_frac,
            "max_logp_gap": conf.max_gap, "max_mean_gap": conf.max_mean_gap, "clip_range": eps}
    if not math.isfinite(err):
        return Check("on_policy", case_status(conf), f"deterministic sampler: no ratio; re-scored step means "
                     f"differ by {_fmt(conf.max_mean_gap)} (max abs)", data=data)
    msg = (f"{conf.case.name}: max |ratio - 1| = {_fmt(err)}, {conf.max_clip_frac:.0%} of rows clipped at the "
           f"on-policy point (clip range {eps:g})")
    if not has_ratio:
        return Check("on_policy", "info", msg + f"; {algorithm} has no likelihood ratio, so the gap does not enter "
                     "its loss", data=data)
    if status == "ok":
        return Check("on_policy", "ok", msg, data=data)
    d = conf.case.rollout.dtype
    name = DTYPE_NAMES[d]
    fixes = []
    same = _find(results, f"{name}: same batch {rows}")
    if conf.case.rescore.batch != conf.case.rollout.batch and same is not None and _err(same) < err / 10:
        fixes.append((_err(same), f"train.minibatch = the rollout batch ({rollout_batch}; this pipeline's output "
                                  f"changes with the batch size): ratio error {_fmt(err)} -> {_fmt(_err(same))}"))
    if name != "fp32":
        fp32 = _find(results, f"fp32: {conf.case.name.split(': ', 1)[1]}") or _find(results, f"fp32: same batch {rows}")
        if fp32 is not None and _err(fp32) < err / 10:
            fixes.append((_err(fp32), f"model.dtype=float32 (the sampler math is float32 already): ratio error "
                                      f"{_fmt(err)} -> {_fmt(_err(fp32))}"))
    det = _find(results, f"{name}: deterministic algorithms")
    if det is not None and same is not None and _err(det) < _err(same) / 10:
        fixes.append((_err(det), "torch.use_deterministic_algorithms(True) and CUBLAS_WORKSPACE_CONFIG=:4096:8: ratio "
                                 f"error {_fmt(_err(same))} -> {_fmt(_err(det))}"))
    fixes.sort(key=lambda f: f[0])
    fix = fixes[0][1] if fixes else (f"no measured setting removes it: raise grpo.clip_range above {_fmt(err)} or "
                                     "use GRPO-Guard (grpo.guard=true)")
    data["fixes"] = [f for _, f in fixes]
    return Check("on_policy", status, msg, fix, data)


def setting_checks(results: Sequence[GapResult], rows: int) -> list[Check]:
    """One finding per setting that moves the ratio (each against the same-batch case of its dtype), after one
    line that sums up the settings that do not."""
    found = _setting_findings(results, rows)
    quiet = [c for c in found if c.status == "ok"]
    loud = [c for c in found if c.status != "ok"]
    summary = Check("settings", "ok", f"{len(quiet)} of {len(found)} other settings keep max |ratio - 1| within a "
                    "tenth of the clip range (table in doctor.md)",
                    data={"ok": [c.name[len("setting: "):] for c in quiet]})
    return [summary] + loud


def _setting_findings(results: Sequence[GapResult], rows: int) -> list[Check]:
    out = []
    for r in results:
        if r.case.configured or " same batch " in f" {r.case.name} ":
            continue
        name = r.case.name
        d = name.split(":", 1)[0]
        base = _find(results, f"{d}: same batch {rows}")
        err, ref = _err(r), _err(base)
        if not math.isfinite(err):
            continue
        moved = err > (0 if not math.isfinite(ref) else ref) and case_status(r) != "ok"
        text = f"max |ratio - 1| = {_fmt(err)}" + ("" if base is None else f" (same batch: {_fmt(ref)})")
        fix = ""
        if moved and "minibatch" in name:
            fix = "keep train.minibatch equal to the rollout batch, or use fp32 weights"
        elif moved and "CFG" in name:
            fix = "batch CFG's branches the same way in rollout and training (flowalign does)"
        elif moved and name.startswith("rollout "):
            fix = "roll out and train in one dtype (flowalign does; an external bf16 sampler would not)"
        elif moved and "attention" in name:
            fix = "use one attention kernel in rollout and training"
        check = Check(f"setting: {name}", case_status(r) if moved else "ok", text, fix,
                      {"max_ratio_error": err, "same_batch": ref, "max_clip_frac": r.max_clip_frac})
        out.append(check)
    return out
