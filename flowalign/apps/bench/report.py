"""The benchmark's pictures and table: sample-efficiency curves, the per-iteration cost breakdown, bench.md."""

from __future__ import annotations

import os


from .meters import REPO_ROOT, describe_machine


UNTRAINED_REWARD = "clip_score"  # held-out reward the runs do not train on (reward hacking shows here)


# ---- reports ----------------------------------------------------------------------------------------------


def plot_sample_efficiency(report: dict, path: str) -> None:
    """2 x 2 panels: held-out trained reward (top) and untrained clip_score (bottom) vs reward queries (left)
    and vs training wall time (right), one line per algorithm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(10, 7), sharey="row")
    for alg, r in report["algorithms"].items():
        c = r["curve"]
        g = r["settings"]["eval_guidance_scale"]
        for row, key in enumerate(("heldout", UNTRAINED_REWARD)):
            ys = [p[key] for p in c]
            if any(y is None for y in ys):
                continue
            for col, x in enumerate(("samples", "wall_s")):
                axes[row, col].plot([p[x] for p in c], ys, "o-", label=f"{alg} (eval CFG {g:g})")
    metric = next(iter(report["algorithms"].values()))["heldout_metric"]
    for col, xlabel in enumerate(("reward queries (samples scored)", "training wall time [s]")):
        axes[1, col].set_xlabel(xlabel)
    axes[0, 0].set_ylabel(f"held-out {metric} (trained)")
    axes[1, 0].set_ylabel(f"held-out {UNTRAINED_REWARD} (not trained on)")
    for ax in axes.flat:
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=8)
    fig.suptitle(f"sample efficiency: {describe_machine(report['machine'])}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


COST_PARTS = (  # (label, function of the mean cost record), stacked in this order
    ("denoiser fwd (rollout)", lambda m: m["denoiser_fwd_s_rollout"]),
    ("denoiser fwd (update)", lambda m: m["denoiser_fwd_s_update"] + m["denoiser_fwd_s_reward"]),
    ("denoiser bwd", lambda m: m["denoiser_bwd_s"]),
    ("VAE decode", lambda m: m["vae_decode_s"] + m["vae_decode_s_reward"]),
    ("text encoders", lambda m: m["text_encoder_s"] + m["text_encoder_s_reward"]),
    ("reward model", lambda m: m["time_reward"] - m["vae_decode_s_reward"] - m["text_encoder_s_reward"]
     - m["denoiser_fwd_s_reward"]),
    ("flowalign overhead", lambda m: m["overhead_s"]),
)


def plot_cost_breakdown(report: dict, path: str) -> None:
    """Stacked bars: mean seconds per iteration by component (COST_PARTS), overhead % on top of each bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    algs = list(report["algorithms"])
    fig, ax = plt.subplots(figsize=(1.6 * len(algs) + 4, 4.5))
    bottom = [0.0] * len(algs)
    for label, part in COST_PARTS:
        vals = [max(part(report["algorithms"][a]["mean_cost"]), 0.0) for a in algs]
        ax.bar(algs, vals, bottom=bottom, label=label, width=0.6)
        bottom = [b + v for b, v in zip(bottom, vals)]
    for i, a in enumerate(algs):
        ax.text(i, bottom[i], f"overhead {100 * report['algorithms'][a]['mean_cost']['overhead_frac']:.1f}%",
                ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("seconds per iteration (mean)")
    ax.set_ylim(0, max(bottom) * 1.15 if max(bottom) > 0 else 1)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    ax.set_title(f"per-iteration cost: {describe_machine(report['machine'])}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _mb(pm: dict) -> str:
    if pm.get("cuda_max_allocated_mb") is not None:
        return f"{pm['cuda_max_allocated_mb'] / 1024:.1f} GB (CUDA)"
    return f"{pm['rss_peak_mb']:.0f} MB (RSS)"


def _short_path(path: str) -> str:
    """A path inside the repository relative to it (assets/toy-sd3), anything else unchanged."""
    full = os.path.abspath(path)
    return os.path.relpath(full, REPO_ROOT) if full.startswith(REPO_ROOT + os.sep) else path


def markdown_table(report: dict) -> str:
    """bench.md: the results table (one row per algorithm), the machine and the command, ready for the README."""
    rows = ["| method | eval CFG | held-out {m} base → final | {u} (not trained) base → final | reward queries | "
            "train wall | s/iter rollout / reward / update | denoiser calls (rows) per iter | overhead (x network-only) | "
            "peak memory |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    metric = None
    for alg, r in report["algorithms"].items():
        metric = r["heldout_metric"]
        m, s = r["mean_cost"], r["settings"]
        calls = m["denoiser_calls_rollout"] + m["denoiser_calls_update"]
        rows_ = m["denoiser_rows_rollout"] + m["denoiser_rows_update"]
        u0, u1 = r["base"].get(UNTRAINED_REWARD), r["final"].get(UNTRAINED_REWARD)
        untrained = f"{u0:.3f} → {u1:.3f}" if u0 is not None and u1 is not None else "-"
        rows.append(
            f"| {alg} | {s['eval_guidance_scale']:g} | {r['base'][metric]:.3f} → {r['final'][metric]:.3f} | "
            f"{untrained} | {r['samples']} | {r['train_wall_s']:.0f} s | "
            f"{m['time_iter']:.2f} = {m['time_rollout']:.2f} / {m['time_reward']:.2f} / {m['time_update']:.2f} | "
            f"{calls:.0f} ({rows_:.0f}) | {100 * m['overhead_frac']:.1f}% ({m['network_limit_ratio']:.3f}x) | "
            f"{_mb(r['peak_memory'])} |")
    head = rows[0].format(m=metric, u=UNTRAINED_REWARD)
    n = next(iter(report["algorithms"].values()))["settings"]["eval_images"]
    lines = [head, *rows[1:], "",
             f"Machine: {describe_machine(report['machine'])}. Model: `{_short_path(report['model'])}`; "
             f"seed {report['seed']}; held-out evaluation on {n} images every {report['eval_every']} iterations "
             f"(each recipe's own eval CFG). Overhead = (rollout + update) - denoiser fwd/bwd - VAE decode - text "
             f"encoders, as a fraction of rollout + update; means skip the warm-up iteration."]
    if report.get("command"):
        lines += ["", f"Reproduce: `{report['command']}`"]
    return "\n".join(lines) + "\n"
