"""InfAlign-CTRL's reward calibration during training (arXiv 2412.19792; the math in
flowalign.algorithms.calibration, docs/algorithms/calibration.md).

``RewardCalibrator`` keeps, per prompt, the raw rewards of M samples of the BASE model (the adapter disabled),
drawn once the first time the prompt is met, and maps a batch's raw rewards to ``transform(calibrate(R, base))``.
The base samples come from a generator of its own (``calibration.seed``) inside ``torch.random.fork_rng``, so
the run's own random draws are the same with or without calibration. Cost: M base rollouts and M reward queries
per distinct prompt, once (``base_queries`` counts them; a prompt file of P prompts costs at most P x M).
"""

from __future__ import annotations

import types
from typing import Callable, Optional, Sequence

import torch

from .. import lora
from ..algorithms.calibration import calibrate, transform
from ..rewards.guard import safe_scores

# prompts [K] and a torch.Generator -> the raw rewards [K] of one base sample per row (NaN: no valid score)
BaseScoreFn = Callable[[Sequence[str], torch.Generator], torch.Tensor]


def base_score_fn(adapter, cfg, reward) -> BaseScoreFn:
    """The default base scorer: ``configured_rollout`` with the run's ``sampling`` section under
    ``lora.adapter_disabled``, decoded as ``sampling.decode``, scored by ``reward`` (invalid scores -> NaN).
    Every base row draws its own initial noise (independent base samples; flowalign's choice, where training
    groups share theirs)."""
    from ..algorithms.base import configured_rollout

    view = types.SimpleNamespace(sampling=cfg.sampling, train=types.SimpleNamespace(group_size=1))

    @torch.no_grad()
    def score(prompts: Sequence[str], generator: torch.Generator) -> torch.Tensor:
        with lora.adapter_disabled(adapter):
            traj = configured_rollout(adapter, list(prompts), view, generator)
            images = adapter.decode(traj.output(cfg.sampling.decode))
        scores, valid, _ = safe_scores(reward, images, traj.prompts, traj.cond.metadata())
        return torch.where(valid.cpu(), scores.float().cpu(), torch.tensor(float("nan")))

    return score


class RewardCalibrator:
    """Per-prompt calibration of rewards to the base model (InfAlign-CTRL).

    Args:
        section: the ``calibration`` config section (``transform``, ``t``, ``base_samples`` M, ``seed``).
        score_fn: prompts [K], generator -> raw base rewards [K] (``base_score_fn(adapter, cfg, reward)``).
        chunk: base rows per ``score_fn`` call (bounds memory when many new prompts arrive at once).
    """

    def __init__(self, section, score_fn: BaseScoreFn, chunk: int = 64):
        if section.transform is None:
            raise ValueError("RewardCalibrator needs calibration.transform (identity, log, exp or neg_exp)")
        self.kind, self.t, self.m = section.transform, float(section.t), int(section.base_samples)
        self.score_fn, self.chunk = score_fn, max(1, int(chunk))
        self.generator = torch.Generator().manual_seed(int(section.seed))
        self.cache: dict[str, torch.Tensor] = {}  # prompt -> [M] raw base rewards
        self.base_queries = 0

    def _draw(self, prompts: list[str]) -> None:
        rows = [p for p in prompts for _ in range(self.m)]
        out = []
        with torch.random.fork_rng(devices=[]):  # whatever the base rollouts draw stays out of the run
            for a in range(0, len(rows), self.chunk):
                out.append(torch.as_tensor(self.score_fn(rows[a:a + self.chunk], self.generator),
                                           dtype=torch.float32).reshape(-1).cpu())
        scores = torch.cat(out).reshape(len(prompts), self.m)
        self.base_queries += len(rows)
        for p, s in zip(prompts, scores):
            self.cache[p] = s.clone()

    def base_scores(self, prompts: Sequence[str]) -> torch.Tensor:
        """[B, M] raw base rewards of each row's prompt (drawn now for prompts not seen before)."""
        new = list(dict.fromkeys(p for p in prompts if p not in self.cache))
        if new:
            self._draw(new)
        return torch.stack([self.cache[p] for p in prompts]) if len(prompts) else torch.zeros(0, self.m)

    def __call__(self, rewards: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """Transformed calibrated rewards [B] of raw ``rewards`` [B] (NaN stays NaN), row b of ``prompts[b]``."""
        base = self.base_scores(prompts)
        c = calibrate(torch.as_tensor(rewards).detach().float().cpu(), base)
        return transform(c, self.kind, self.t, m=torch.isfinite(base).sum(dim=1))

    def state_dict(self) -> dict:
        return {"scores": {p: s.tolist() for p, s in self.cache.items()}, "base_queries": self.base_queries,
                "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.cache = {str(p): torch.tensor(s, dtype=torch.float32) for p, s in state["scores"].items()}
        self.base_queries = int(state["base_queries"])
        gen: Optional[torch.Tensor] = state.get("generator")
        if gen is not None:
            self.generator.set_state(torch.as_tensor(gen, dtype=torch.uint8))
