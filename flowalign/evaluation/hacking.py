"""Reward-hacking diagnostics of a run: what the trainer measures on every scored batch and held-out evaluation.

Per image: the statistics of ``image_stats.STATISTICS`` (dark / bright pixels, colour entropy, saturation, edges,
JPEG size) and the reward's own ``diagnostics`` (the toy world's ``extra_objects`` and ``check/<kind>``); per
prompt group: ``diversity``, the mean pairwise cosine distance of the images' features (``diagnostics.features``:
the shipped tiny CLIP by default). The first batch (the policy before any update) fits the base distribution of
each; the last ``diagnostics.window`` batches are compared with it (``drift.DriftMonitor``: an effect size past
``diagnostics.threshold`` that is also ``diagnostics.significance`` standard errors out, a batch's prompt groups
being its independent units): ``stat/<name>`` (the batch mean),
``drift_z/<name>`` (its shift in base standard deviations), ``drift`` (1 when a statistic moved past
``diagnostics.threshold`` while the reward rose) and ``drift_stats`` (which) join ``metrics.jsonl``.
"""

from __future__ import annotations

import threading
from typing import Optional, Sequence

import torch

from .drift import DriftMonitor, DriftReport, compare_distributions
from .image_stats import feature_embedder, image_statistics, within_prompt_diversity


REWARD_STAT_RESOLUTION = 0.05  # the std floor of a reward's own statistics (rates)
_EMBEDDERS: dict = {}  # diagnostics.features -> its embedder
_LOCK = threading.Lock()  # the reward thread and the main thread may both ask first


class HackingMeter:
    """diagnostics: the config's ``diagnostics`` section; directions: {stat: +1 | -1} of the reward's own
    statistics (``Reward.diagnostic_directions``)."""

    def __init__(self, diagnostics, directions: Optional[dict] = None):
        self.cfg = diagnostics
        self.directions = dict(directions or {})
        # a reward's own statistics are rates (extra objects, check pass rates): a change under 5 points is noise
        self.resolution = {name: REWARD_STAT_RESOLUTION for name in self.directions}
        self.monitor = DriftMonitor(diagnostics.threshold, self.resolution, self.directions, diagnostics.window,
                                    diagnostics.significance)
        self._embed = None

    def _features(self, images: torch.Tensor) -> Optional[torch.Tensor]:
        if self.cfg.features == "none":
            return None
        with _LOCK:
            if self.cfg.features not in _EMBEDDERS:  # loaded once per process (a CLIP is frozen: shared freely)
                with torch.random.fork_rng(devices=[]):  # a model load must not touch the run's RNG
                    _EMBEDDERS[self.cfg.features] = feature_embedder(self.cfg.features)
            self._embed = _EMBEDDERS[self.cfg.features]
        frames = images[:, images.shape[1] // 2] if images.dim() == 5 else images  # video: its middle frame
        with torch.no_grad():
            return self._embed(frames.float().clamp(0, 1).cpu())

    def values(self, images: torch.Tensor, prompts: Sequence[str], reward=None) -> dict[str, torch.Tensor]:
        """{stat: per-item values}: per image [B] (image statistics, the reward's diagnostics) and ``diversity``
        per prompt group [G]."""
        out = dict(image_statistics(images))
        own = getattr(reward, "diagnostics", None)  # a plain callable reward has none
        if own is not None:
            out.update({k: torch.as_tensor(v, dtype=torch.float64) for k, v in own(images, prompts).items()})
        feats = self._features(images)
        if feats is not None:
            out["diversity"], _ = within_prompt_diversity(feats, prompts)
        return out

    @staticmethod
    def concat(parts: Sequence[dict]) -> dict[str, torch.Tensor]:
        """The values of consecutive chunks of one batch, per statistic."""
        keys = dict.fromkeys(k for p in parts for k in p)
        return {k: torch.cat([torch.as_tensor(p[k], dtype=torch.float64) for p in parts if k in p]) for k in keys}

    @staticmethod
    def means(values: dict) -> dict:
        """``stat/<name>``: the mean of each statistic's finite values (None when it has none)."""
        return {f"stat/{k}": _mean(v) for k, v in values.items()}

    @staticmethod
    def finite(values: dict) -> dict:
        """Each statistic's finite values only (what a checkpoint can hold; the comparison drops the rest anyway)."""
        out = {}
        for k, v in values.items():
            v = torch.as_tensor(v, dtype=torch.float64)
            out[k] = v[torch.isfinite(v)]
        return out

    def observe(self, values: dict, reward_mean: Optional[float], units: Optional[int] = None) -> dict:
        """One batch of ``units`` prompt groups -> metrics: ``stat/<name>`` always; the first batch fits the base,
        later ones add the drift keys (``DriftReport.metrics``) of the window of the last batches."""
        means = self.means(values)
        if not self.monitor.fitted:
            self.monitor.fit(values, reward_mean, units)
            return {**means, "drift": 0, "drift_stats": ""}
        return {**means, **self.monitor.update(values, reward_mean, units).metrics()}

    def compare(self, base: dict, current: dict, reward_rose: bool) -> DriftReport:
        """A held-out evaluation: the aligned images' values against the base model's, same prompts and seeds."""
        return compare_distributions(base, current, self.cfg.threshold, reward_rose, self.resolution,
                                     self.directions, self.cfg.significance)

    def state_dict(self) -> dict:
        return self.monitor.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.monitor.load_state_dict(state)


def _mean(v) -> Optional[float]:
    v = torch.as_tensor(v, dtype=torch.float64)
    v = v[torch.isfinite(v)]
    return round(float(v.mean()), 6) if v.numel() else None


def drift_markdown(base: dict, aligned: dict) -> str:
    """A report's drift section from two held-out rows of ``Trainer.evaluate`` (base, aligned): per statistic the
    two means, the shift in base standard deviations and whether it is flagged; "" without statistics."""
    names = [k[len("stat/"):] for k in aligned if k.startswith("stat/") and f"drift_z/{k[5:]}" in aligned]
    if not names:
        return ""
    flagged = set(filter(None, aligned.get("drift_stats", "").split(",")))
    rows = "\n".join(f"| {n} | {_fmt(base.get(f'stat/{n}'))} | {_fmt(aligned.get(f'stat/{n}'))} | "
                     f"{aligned[f'drift_z/{n}']:+.2f} | {'**yes**' if n in flagged else ''} |" for n in names)
    verdict = (f"**Drift flagged**: {aligned['drift_summary']}." if aligned.get("drift") else
               "No drift flagged" + (" (some statistics moved, but the held-out score did not rise)." if flagged
                                     else "."))
    return ("## Drift from the base model (reward-hacking diagnostics)\n\n"
            "Cheap statistics of the held-out images, base vs aligned on the same prompts and seeds; a statistic is "
            "flagged when it moved by more than `diagnostics.threshold` base standard deviations and "
            "`diagnostics.significance` standard errors while the held-out score rose (docs/doctor.md).\n\n"
            f"{verdict}\n\n| statistic | base | aligned | shift (base sd) | flagged |\n|---|---|---|---|---|\n{rows}\n\n")


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.3f}"


def progress_note(metrics: dict) -> dict:
    """The progress bar's drift entry: ``{"drift": "dark_fraction,edge_density"}`` when the flag is up."""
    return {"drift": metrics["drift_stats"]} if metrics.get("drift") else {}
