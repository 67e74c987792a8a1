"""Prompt sources for training: the toy world's GenEval train split, or a text file (one prompt a line)."""

from __future__ import annotations

import os

import numpy as np


class PromptSource:
    """Draws prompts with a numpy Generator; ``sample(n, rng) -> list[str]`` of n prompts."""

    def __init__(self, spec: str):
        self.spec = spec
        if spec == "toy":
            self._prompts = None
            return
        if not os.path.isfile(spec):
            raise FileNotFoundError(f"prompt file {spec!r} not found: pass an existing text file or train.prompts=toy")
        with open(spec, encoding="utf-8") as f:
            self._prompts = [line.strip() for line in f if line.strip()]
        if not self._prompts:
            raise ValueError(f"prompt file {spec!r} has no prompts: write one prompt per line")

    def sample(self, n: int, rng: np.random.Generator) -> list[str]:
        if self._prompts is None:
            from .toy import sample

            return [sample(rng)[0] for _ in range(n)]
        return [self._prompts[i] for i in rng.integers(len(self._prompts), size=n)]
