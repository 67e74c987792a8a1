"""Drift monitor: flag when image statistics leave the base model's distribution while the reward rises.

A reward that rises while cheap image statistics (``image_stats.STATISTICS``: dark pixels, edges, colour
entropy, ..., or within-prompt diversity, or a reward's own diagnostics) move far from the base model's values is
the signature of reward hacking. ``DriftMonitor.fit`` records the base distribution of each statistic from
per-item values (per image, or per prompt group for diversity); each ``update`` pools the items of the last
``window`` batches and measures how far their mean m has moved, in base standard deviations (an effect size):

    z_s = (m_s - mu_s) / max(sigma_s, resolution_s)

(sigma_s the population std of the base values; the resolution floor keeps a base std of 0, e.g. no dark pixel
at all, from making every change infinite), and whether that move is more than chance, in standard errors:

    t_s = (m_s - mu_s) / sqrt(sigma_s^2 / n_base + sigma'_s^2 / n_now)

with n the independent units behind each side (``units``: e.g. the prompt groups of a GRPO batch, whose images
share their initial noise; default: the items). A statistic is flagged when |z_s| > threshold, |t_s| >
significance and |m_s - mu_s| >= resolution_s (only rises / falls for direction +1 / -1); the report flags drift
when some statistic is flagged and the mean reward of the window is above the base reward.
``compare_distributions`` does the same once, for a held-out evaluation (base and aligned images on the same
prompts and seeds).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch

from .image_stats import STATISTICS

DEFAULT_RESOLUTION = 0.01  # std floor of a statistic that is not in STATISTICS and not given


def _finite(values) -> torch.Tensor:
    """Values (tensor, sequence or number) -> float64 [N] with the non-finite ones dropped."""
    v = torch.as_tensor(values, dtype=torch.float64).detach().cpu().flatten()
    return v[torch.isfinite(v)]


@dataclass(frozen=True)
class StatDistribution:
    """Base distribution of one statistic: mean, population std (ddof 0: sqrt(mean((v - mean)^2))) and the count
    n of the finite values it was fitted on."""

    mean: float
    std: float
    n: int

    @classmethod
    def from_values(cls, values) -> StatDistribution:
        """values: [N] (non-finite ones dropped) -> the distribution; ValueError when none is finite."""
        v = _finite(values)
        if v.numel() == 0:
            raise ValueError("StatDistribution.from_values: no finite value to fit")
        return cls(mean=float(v.mean()), std=float(v.std(correction=0)), n=int(v.numel()))


@dataclass(frozen=True)
class DriftReport:
    """One comparison. z: {stat: z-score}; flagged: the stats past the threshold (respecting their direction),
    largest |z| first; reward_rose: the reward window's mean is above the base reward; flag = flagged and
    reward_rose."""

    z: dict[str, float]
    flagged: list[str] = field(default_factory=list)
    reward_rose: bool = False
    flag: bool = False

    def metrics(self) -> dict:
        """Flat keys for a metrics.jsonl row: ``drift_z/<stat>`` (4 decimals), ``drift`` (1 | 0) and
        ``drift_stats`` (the flagged stats, comma-joined; "" if none)."""
        out: dict = {f"drift_z/{name}": round(z, 4) for name, z in self.z.items()}
        out["drift"] = int(self.flag)
        out["drift_stats"] = ",".join(self.flagged)
        return out

    def summary(self) -> str:
        """One line, e.g. "dark_fraction +3.2 sd, edge_density -1.4 sd while the reward rose"; "" without a flag."""
        if not self.flag:
            return ""
        return ", ".join(f"{name} {self.z[name]:+.1f} sd" for name in self.flagged) + " while the reward rose"


class DriftMonitor:
    """Base distributions of statistics and a window of recent batches; ``update`` -> ``DriftReport``.

    threshold: how many base stds the window's mean of a statistic may move before it is flagged (effect size);
    significance: how many standard errors the move must also exceed (0: no guard); resolution: {stat: floor on
    its base std and on the move} (default: ``STATISTICS[stat].resolution``, else 0.01); directions: {stat: +1
    (flag rises only) | -1 (falls only) | 0 (both, the default)}, e.g. +1 for a reward's own "extra objects";
    window: how many recent batches (values and rewards) ``update`` pools.
    """

    def __init__(self, threshold: float = 0.5, resolution: Optional[dict[str, float]] = None,
                 directions: Optional[dict[str, int]] = None, window: int = 5, significance: float = 4.0):
        if not threshold > 0:
            raise ValueError(f"DriftMonitor: threshold must be > 0 (in base stds), got {threshold}")
        if int(window) < 1:
            raise ValueError(f"DriftMonitor: window must be >= 1, got {window}")
        if not significance >= 0:
            raise ValueError(f"DriftMonitor: significance must be >= 0 (standard errors), got {significance}")
        self.threshold, self.significance = float(threshold), float(significance)
        self.resolution = {k: float(v) for k, v in (resolution or {}).items()}
        bad = [k for k, v in self.resolution.items() if not v > 0]
        if bad:
            raise ValueError(f"DriftMonitor: resolution of {bad[0]!r} must be > 0, got {self.resolution[bad[0]]}")
        self.directions = {k: int(v) for k, v in (directions or {}).items()}
        bad = [k for k, v in self.directions.items() if v not in (-1, 0, 1)]
        if bad:
            raise ValueError(f"DriftMonitor: direction of {bad[0]!r} must be +1, -1 or 0, got "
                             f"{self.directions[bad[0]]}")
        self.window = int(window)
        self.base: dict[str, StatDistribution] = {}
        self.base_units: Optional[int] = None
        self.base_reward: Optional[float] = None
        self.rewards: list[float] = []  # the last `window` finite rewards given to update
        self.batches: list[tuple[dict[str, list[float]], Optional[int]]] = []  # the last `window` batches

    def resolution_of(self, name: str) -> float:
        """The std floor of ``name``: given, else ``STATISTICS[name].resolution``, else 0.01."""
        if name in self.resolution:
            return self.resolution[name]
        return STATISTICS[name].resolution if name in STATISTICS else DEFAULT_RESOLUTION

    def fit(self, values: dict, reward: Optional[float] = None, units: Optional[int] = None) -> DriftMonitor:
        """Base distributions from per-item values {stat: [N]} (stats with no finite value are skipped), the
        base reward (the mean reward of the base batch; None: never reward_rose) and the independent units behind
        the values (None: the items). Clears the window."""
        self.base = {name: StatDistribution.from_values(v) for name, v in values.items() if _finite(v).numel()}
        self.base_units = None if units is None else int(units)
        self.base_reward = None if reward is None or not math.isfinite(float(reward)) else float(reward)
        self.rewards, self.batches = [], []
        return self

    @property
    def fitted(self) -> bool:
        return bool(self.base)

    def _require_fit(self) -> None:
        if not self.fitted:
            raise RuntimeError("DriftMonitor: no base distribution: call fit(base values) with finite values first")

    def z_scores(self, values: dict) -> dict[str, float]:
        """{stat: (mean(values) - base mean) / max(base std, resolution)} for the stats both in ``values`` and the
        base; non-finite values are dropped, and a stat with none left is skipped."""
        self._require_fit()
        out = {}
        for name, v in values.items():
            v = _finite(v)
            if name in self.base and v.numel():
                base = self.base[name]
                out[name] = (float(v.mean()) - base.mean) / max(base.std, self.resolution_of(name))
        return out

    def t_scores(self, values: dict, units: Optional[int] = None) -> dict[str, float]:
        """{stat: (mean(values) - base mean) / standard error of that difference} (module docstring); a stat
        without spread on either side gets +-inf when it moved, 0 when it did not."""
        self._require_fit()
        out = {}
        for name, v in values.items():
            v = _finite(v)
            if name not in self.base or not v.numel():
                continue
            base = self.base[name]
            n_base = min(base.n, self.base_units or base.n)
            n_now = min(v.numel(), units or v.numel())
            se = math.sqrt(base.std ** 2 / n_base + float(v.std(correction=0)) ** 2 / n_now)
            d = float(v.mean()) - base.mean
            out[name] = d / se if se > 0 else (0.0 if d == 0 else math.copysign(math.inf, d))
        return out

    def report(self, values: dict, reward_rose: bool, units: Optional[int] = None) -> DriftReport:
        """The report of ``values`` against the base: z-scores, and the stats past the threshold (respecting
        directions, significance and resolution), largest |z| first."""
        z, t = self.z_scores(values), self.t_scores(values, units)

        def past(name: str) -> bool:
            v, d = z[name], self.directions.get(name, 0)
            moved = v > self.threshold if d > 0 else v < -self.threshold if d < 0 else abs(v) > self.threshold
            base = self.base[name]
            shift = abs(v) * max(base.std, self.resolution_of(name))
            return moved and abs(t[name]) > self.significance and shift >= self.resolution_of(name)

        flagged = sorted((n for n in z if past(n)), key=lambda n: (-abs(z[n]), n))
        return DriftReport(z=dict(z), flagged=flagged, reward_rose=bool(reward_rose),
                           flag=bool(flagged) and bool(reward_rose))

    def update(self, values: dict, reward: Optional[float] = None, units: Optional[int] = None) -> DriftReport:
        """The current batch {stat: [N]} (``units`` independent units, None: the items) joins the window; the
        window's pooled values are compared with the base. reward_rose = mean of the window's rewards > base reward;
        False when ``reward`` or the base reward is None (a non-finite reward counts as None and is not kept)."""
        self._require_fit()
        batch = {k: _finite(v).tolist() for k, v in values.items()}
        self.batches = (self.batches + [(batch, None if units is None else int(units))])[-self.window:]
        pooled = {k: [x for b, _ in self.batches for x in b.get(k, [])] for k in dict.fromkeys(
            k for b, _ in self.batches for k in b)}
        pooled_units = None if any(u is None for _, u in self.batches) else sum(u for _, u in self.batches)
        if reward is not None and math.isfinite(float(reward)):
            self.rewards = (self.rewards + [float(reward)])[-self.window:]
            rose = self.base_reward is not None and sum(self.rewards) / len(self.rewards) > self.base_reward
        else:
            rose = False
        return self.report(pooled, rose, pooled_units)

    def state_dict(self) -> dict:
        """Settings, base distributions, base reward and the window as JSON-able Python types."""
        return {
            "threshold": self.threshold, "significance": self.significance,
            "resolution": dict(self.resolution),
            "directions": dict(self.directions),
            "window": self.window,
            "base": {n: {"mean": d.mean, "std": d.std, "n": d.n} for n, d in self.base.items()},
            "base_units": self.base_units,
            "base_reward": self.base_reward,
            "rewards": list(self.rewards),
            "batches": [{"values": b, "units": u} for b, u in self.batches],
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore ``state_dict()`` (also after a JSON round trip); the settings are restored too."""
        missing = [k for k in ("threshold", "window", "base") if k not in state]
        if missing:
            raise KeyError(f"DriftMonitor.load_state_dict: missing {missing[0]!r}; pass a DriftMonitor.state_dict()")
        fresh = DriftMonitor(state["threshold"], state.get("resolution"), state.get("directions"),
                             state["window"], state.get("significance", 4.0))  # validates the settings
        self.threshold, self.significance, self.resolution = fresh.threshold, fresh.significance, fresh.resolution
        self.directions, self.window = fresh.directions, fresh.window
        self.base = {n: StatDistribution(float(d["mean"]), float(d["std"]), int(d["n"]))
                     for n, d in state["base"].items()}
        units = state.get("base_units")
        self.base_units = None if units is None else int(units)
        reward = state.get("base_reward")
        self.base_reward = None if reward is None else float(reward)
        self.rewards = [float(r) for r in state.get("rewards", [])][-self.window:]
        self.batches = [({k: [float(x) for x in v] for k, v in b["values"].items()},
                         None if b["units"] is None else int(b["units"]))
                        for b in state.get("batches", [])][-self.window:]


def compare_distributions(base: dict, current: dict, threshold: float = 0.5, reward_rose: bool = False,
                          resolution: Optional[dict[str, float]] = None,
                          directions: Optional[dict[str, int]] = None, significance: float = 4.0) -> DriftReport:
    """One comparison for a held-out evaluation: base and aligned per-item values {stat: [N]} (e.g. images of the
    base and the aligned model on the same prompts and seeds); ``reward_rose`` is the caller's verdict."""
    monitor = DriftMonitor(threshold, resolution, directions, significance=significance).fit(base)
    return monitor.report(current, reward_rose)
