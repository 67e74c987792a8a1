"""The demo's last picture: the new adapter under RL guidance (RLG, docs/math.md §7),
scored on the demo's held-out prompts and seeds at each scale w.

At every denoiser call ``out = out_ref + w (out_theta - out_ref)`` (flowalign.rlg): w = 0 is the base model,
w = 1 the fine-tuned adapter, w > 1 extrapolates past it. The sweep reuses the held-out evaluator of the training
run (the same N prompts, seeds, steps and CFG as the base -> aligned table), so each point is a held-out row with
its standard errors (se/<score> = std / sqrt(N)). The endpoints are bit-exact (tests/test_rlg.py), so
``known`` rows (the run's own base and final evaluations) stand in for w = 0 and w = 1 instead of sampling again.
"""

from __future__ import annotations

import os
from typing import Optional, Sequence

from ..rlg import disable_rlg, enable_rlg

RLG_SCALES = (0.0, 0.5, 1.0, 1.5, 2.0)
SWEEP_SCORES = (("exact", "toy_geneval_exact"), ("lenient", "toy_geneval"), ("extra objects", "toy_extra_objects"))


def heldout_rlg_sweep(trainer, scales: Sequence[float] = RLG_SCALES, known: Optional[dict] = None) -> list[dict]:
    """Held-out scores of ``trainer``'s adapter at each RLG scale -> [{"scale": w, label: {"mean", "se"}}] for the
    labels of ``SWEEP_SCORES`` the evaluation reports. ``known``: {w: held-out row} taken as is (no sampling)."""
    pipe, ev = trainer.adapter.pipe, trainer.heldout
    out = []
    for w in scales:
        row = (known or {}).get(float(w))
        if row is None:
            enable_rlg(pipe, w)
            try:
                row = ev(pipe, trainer.adapter)[0]
            finally:
                disable_rlg(pipe)
        out.append({"scale": float(w), **{label: {"mean": row[key], "se": row.get(f"se/{key}")}
                                          for label, key in SWEEP_SCORES if key in row}})
    return out


def plot_rlg_sweep(rows: list[dict], path: str, n: int) -> None:
    """rlg_sweep.png: each score of ``rows`` (mean +- standard error) against w, base (w = 0) and fine-tuned (w = 1)
    marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    w = [r["scale"] for r in rows]
    for i, (label, _) in enumerate(SWEEP_SCORES):
        if all(label in r for r in rows):
            ax.errorbar(w, [r[label]["mean"] for r in rows], yerr=[r[label]["se"] or 0.0 for r in rows],
                        fmt="o-", capsize=3, color=f"C{i}", label=label)
    for x, name in ((0.0, "base"), (1.0, "fine-tuned")):
        ax.axvline(x, color="gray", ls=":", lw=1)
        ax.text(x, 1.0, f" {name}", va="top", fontsize=8, color="gray", transform=ax.get_xaxis_transform())
    ax.set_xlabel("RLG scale w")
    ax.set_ylabel("held-out score")
    ax.set_title(f"RL guidance of the new adapter ({n} held-out images per scale)", fontsize=10)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def mean_pm(score: dict) -> str:
    """``{"mean", "se"}`` -> ``mean +- se`` (the mean alone when no standard error was recorded); the demo's
    tables share it."""
    return f"{score['mean']:.3f}" + (f" +- {score['se']:.3f}" if score.get("se") is not None else "")


def sweep_markdown(rows: list[dict]) -> str:
    """The report's table: one row per scale, each score as ``mean +- se``."""
    labels = [label for label, _ in SWEEP_SCORES if all(label in r for r in rows)]
    head = "| RLG scale w | " + " | ".join(labels) + " |\n|---|" + "---|" * len(labels) + "\n"
    return head + "".join(f"| {r['scale']:g} | " + " | ".join(mean_pm(r[label]) for label in labels) + " |\n"
                          for r in rows)
