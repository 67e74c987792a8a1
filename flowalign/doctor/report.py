"""The doctor's files: ``doctor.md`` (verdicts, then the gap table), ``doctor.json`` (everything measured) and
``doctor_gaps.png`` (max |log p_rollout - log p_rescore| per denoising step, one line per case)."""

from __future__ import annotations

import json
import math
import os
from typing import Sequence

from .diagnosis import case_status
from .onpolicy import GapResult
from .verdict import MARKS, Check, worst


def _num(x: float) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return "0" if x == 0 else f"{x:.2e}"


def gap_table(results: Sequence[GapResult]) -> list[str]:
    """Markdown rows: case, rollout -> re-scoring, max/mean |dlogp|, max |ratio - 1|, ratio std, clip share,
    max |dmu|, verdict."""
    lines = ["| case | rollout -> re-score | max abs dlogp | mean abs dlogp | max abs(ratio-1) | ratio std | "
             "clipped | max abs dmu | verdict |", "|---" * 9 + "|"]
    for r in results:
        means = [v for v in r.gap_mean if not math.isnan(v)]
        stds = [v for v in r.ratio_std if not math.isnan(v)]
        clip = r.max_clip_frac
        name = f"**{r.case.name}**" if r.case.configured else r.case.name
        lines.append(f"| {name} | {r.case.rollout.describe()} -> {r.case.rescore.describe()} | {_num(r.max_gap)} | "
                     f"{_num(sum(means) / len(means) if means else float('nan'))} | {_num(r.max_ratio_error)} | "
                     f"{_num(max(stds) if stds else float('nan'))} | "
                     f"{'-' if math.isnan(clip) else f'{clip:.0%}'} | {_num(r.max_mean_gap)} | "
                     f"{MARKS[case_status(r)].strip()} |")
    return lines


def plot_gaps(results: Sequence[GapResult], path: str, title: str) -> str:
    """Per-step max |dlogp| (or max |dmu| for a deterministic sampler), log scale; exact zeros drawn at the floor."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 4.5))
    colours = plt.get_cmap("tab20").colors
    use_logp = any(not math.isnan(v) for r in results for v in r.gap_max)
    values = [v for r in results for v in (r.gap_max if use_logp else r.mean_gap) if not math.isnan(v) and v > 0]
    floor = min(values) / 10 if values else 1e-12
    for i, r in enumerate(results):
        ys = [max(v, floor) if not math.isnan(v) else float("nan") for v in (r.gap_max if use_logp else r.mean_gap)]
        style = dict(linewidth=2.5, color="black") if r.case.configured else \
            dict(linewidth=1, alpha=0.85, color=colours[i % len(colours)])
        ax.plot(r.steps, ys, marker="o", markersize=3 + 4 * r.case.configured, label=r.case.name, **style)
    ax.set_xticks(sorted({k for r in results for k in r.steps}))
    eps = results[0].case.clip_range if results else None
    if use_logp and eps:
        ax.axhline(math.log1p(eps), color="red", linestyle="--", linewidth=1, label=f"clip range {eps:g}")
    ax.set_yscale("log")
    ax.set_xlabel("denoising step")
    ax.set_ylabel("max |log p rollout - log p re-scored|" if use_logp else "max |mean rollout - mean re-scored|")
    ax.set_title(title + (f"  (0 drawn at {floor:.0e})" if values else "  (all exactly 0)"), fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write(out_dir: str, checks: Sequence[Check], results: Sequence[GapResult], header: dict) -> dict:
    """Write doctor.md, doctor.json and doctor_gaps.png into ``out_dir``; returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {k: os.path.join(out_dir, f) for k, f in
             (("md", "doctor.md"), ("json", "doctor.json"), ("png", "doctor_gaps.png"))}
    overall = worst(checks)
    with open(paths["json"] + ".tmp", "w", encoding="utf-8") as f:
        json.dump({**header, "verdict": overall, "checks": [c.as_dict() for c in checks],
                   "gaps": [r.as_dict() for r in results]}, f, indent=1, allow_nan=True)
    os.replace(paths["json"] + ".tmp", paths["json"])
    lines = [f"# flowalign doctor: {header['config']}", "",
             f"{header['model']} ({header['family']}), {header['algorithm']}, sampler {header['sampler']}, "
             f"{header['rows']} rows x {header['num_steps']} steps, on {header['device']} ({header['machine']}); "
             f"{header['seconds']:.0f} s.", "", f"Verdict: **{overall.upper()}**", ""]
    lines += [f"- {c.line()}" for c in checks]
    lines += ["", "## On-policy gap per setting", "",
              "Rollout, then re-scoring of the same transitions with the unchanged policy (docs/doctor.md). "
              "Bold: what the run does.", ""]
    lines += gap_table(results)
    lines += ["", "![per-step gaps](doctor_gaps.png)", ""]
    with open(paths["md"], "w", encoding="utf-8") as f:
        f.write("\n".join(lines))
    plot_gaps(results, paths["png"], f"{header['config']}: on-policy gap per step")
    return paths
