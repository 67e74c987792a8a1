"""A training run's curves for the web app's "Training curves" tab, read while the run is still writing.

``read_run(run_dir)`` reads ``metrics.jsonl`` (one row per iteration: ``reward_mean``, else ``loss``) and
``evals.jsonl`` (one row per held-out evaluation: ``iteration`` and scores such as ``toy_geneval`` and
``toy_geneval_exact``) into points; a line that is not JSON (the one a running trainer is writing) is skipped
without a warning. ``plot_run(curves, path)`` draws them in two panels: the training metric (dots and a running
mean) on top, the held-out scores below (the same iteration axis). ``curves_png`` does both and returns one line
for the app, which is also the message when there is nothing to plot yet. Built on ``matplotlib.figure.Figure``
(not pyplot) so that the app's request threads can each draw.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from ..runtime.metrics import EVALS_JSONL, METRICS_JSONL, parse_jsonl

TRAIN_KEYS = ("reward_mean", "loss")  # the first one a row holds is the training curve (as run_training's plot)
HELDOUT_KEYS = ("toy_geneval", "toy_geneval_exact", "ocr")  # plotted when present, else the first score
NOT_SCORES = ("iteration", "samples", "n")


@dataclass
class RunCurves:
    """The points of one run: ``train`` [(iteration, value of ``key``)], ``heldout`` {score: [(iteration, value)]};
    ``skipped``: lines that were not JSON objects (a row still being written)."""
    key: Optional[str] = None
    train: list = field(default_factory=list)
    heldout: dict = field(default_factory=dict)
    skipped: int = 0


def _rows(path: str) -> tuple[list[dict], int]:
    """(the JSON objects of a .jsonl file, how many lines were not one); ([], 0) when it is missing. A line still
    being written is counted, never warned about or raised (``runtime.metrics.parse_jsonl``)."""
    values, torn = parse_jsonl(path, errors="replace")
    rows = [v for v in values if isinstance(v, dict)]
    return rows, len(torn) + len(values) - len(rows)


def _number(v) -> Optional[float]:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def _series(rows: list[dict], key: str) -> list[tuple[int, float]]:
    """(iteration, rows[key]) of the rows holding both as finite numbers."""
    pts = [(_number(r.get("iteration")), _number(r.get(key))) for r in rows]
    return [(int(i), v) for i, v in pts if i is not None and v is not None]


def _heldout_keys(rows: list[dict]) -> list[str]:
    """HELDOUT_KEYS present in the rows, else the first score (a top-level number, no ``time_`` / ``se/``)."""
    present = [k for k in HELDOUT_KEYS if any(_number(r.get(k)) is not None for r in rows)]
    if present:
        return present
    for r in rows:
        for k, v in r.items():
            if "/" not in k and k not in NOT_SCORES and not k.startswith("time_") and _number(v) is not None:
                return [k]
    return []


def read_run(run_dir: str) -> RunCurves:
    """The run's points (module docstring). Missing files give empty series; raises nothing for a torn line."""
    metrics, bad_m = _rows(os.path.join(run_dir, METRICS_JSONL))
    evals, bad_e = _rows(os.path.join(run_dir, EVALS_JSONL))
    key = next((k for k in TRAIN_KEYS if any(_number(r.get(k)) is not None for r in metrics)), None)
    return RunCurves(key=key, train=_series(metrics, key) if key else [],
                     heldout={k: _series(evals, k) for k in _heldout_keys(evals)}, skipped=bad_m + bad_e)


def plot_run(curves: RunCurves, path: str, title: str = "") -> None:
    """A PNG at ``path``: the training curve (top) and the held-out scores (bottom) against the iteration."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(6, 5.5))
    top, bottom = fig.subplots(2, 1, sharex=True)
    if curves.train:
        its, vals = zip(*curves.train)
        w = len(vals) // 10
        top.plot(its, vals, "." if w >= 2 else ".-", alpha=0.5, label=f"{curves.key} (per iteration)")
        if w >= 2:  # a running mean once there are 20 points
            top.plot(its[w - 1:], np.convolve(vals, np.ones(w) / w, mode="valid"), "-", label=f"running mean ({w})")
        top.legend(fontsize=8)
    top.set_ylabel(curves.key or "training")
    top.set_title(title or "training")
    for name, pts in curves.heldout.items():
        if pts:
            bottom.plot(*zip(*pts), "o-", label=name)
    if any(curves.heldout.values()):
        bottom.legend(fontsize=8)
    bottom.set_ylabel("held-out")
    bottom.set_xlabel("iteration")
    bottom.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def _summary(curves: RunCurves) -> str:
    held = [k for k, v in curves.heldout.items() if v]
    evals = max((len(v) for v in curves.heldout.values()), default=0)
    last = f", last iteration {curves.train[-1][0]}" if curves.train else ""
    text = (f"{len(curves.train)} iterations ({curves.key or 'no training metric yet'}{last}), "
            f"{evals} held-out evaluations ({', '.join(held) or 'none yet'})")
    return text + (f"; {curves.skipped} line(s) not yet complete, skipped" if curves.skipped else "")


def curves_png(run_dir: str, path: str) -> tuple[Optional[str], str]:
    """(``path`` with the run's curves drawn, one-line summary), or (None, one line saying why there is no plot)."""
    run_dir = (run_dir or "").strip()
    if not run_dir:
        return None, "enter a run folder (train.out_dir of a `flowalign train` or `flowalign demo` run)"
    if not os.path.isdir(run_dir):
        return None, f"run folder {run_dir!r} not found: enter the train.out_dir of a run (it holds metrics.jsonl)"
    if not any(os.path.isfile(os.path.join(run_dir, f)) for f in (METRICS_JSONL, EVALS_JSONL)):
        return None, (f"no {METRICS_JSONL} or {EVALS_JSONL} in {run_dir!r} yet: is it a run folder? a starting "
                      "run writes them after its first evaluation / iteration")
    curves = read_run(run_dir)
    if not curves.train and not any(curves.heldout.values()):
        return None, f"{run_dir}: no complete rows yet ({_summary(curves)}); refresh after the first iteration"
    plot_run(curves, path, title=os.path.basename(os.path.normpath(run_dir)))
    return path, f"{run_dir}: {_summary(curves)}"
