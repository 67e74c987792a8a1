"""Prompt sources for training: the toy world's GenEval train split ('toy'), chosen toy tasks ('toy:text',
'toy:geneval', 'toy:counting,colors'), or a text file (one prompt a line)."""

from __future__ import annotations

import os

import numpy as np


class PromptSource:
    """Draws prompts with a numpy Generator; ``sample(n, rng) -> list[str]`` of n prompts."""

    def __init__(self, spec: str):
        self.spec = spec
        self._tasks = None
        if spec == "toy":
            self._prompts = None
            return
        if spec.startswith("toy:"):
            from .toy import GENEVAL_TASKS, TASKS

            names = [t.strip() for t in spec[4:].split(",") if t.strip()]
            tasks = [t for n in names for t in (GENEVAL_TASKS if n == "geneval" else (n,))]
            bad = [t for t in tasks if t not in TASKS]
            if not tasks or bad:
                raise ValueError(f"prompt source {spec!r}: unknown toy task {', '.join(bad) or '(none)'}; use "
                                 f"toy:TASK[,TASK...] with tasks from geneval, {', '.join(TASKS)}")
            self._prompts, self._tasks = None, tuple(tasks)
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

            if self._tasks is not None:
                return [sample(rng, tasks=self._tasks)[0] for _ in range(n)]
            return [sample(rng)[0] for _ in range(n)]
        return [self._prompts[i] for i in rng.integers(len(self._prompts), size=n)]
