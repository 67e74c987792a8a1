"""Prompt sources for training: the toy world's GenEval train split ('toy'), chosen toy tasks ('toy:text',
'toy:geneval', 'toy:counting,colors'), or a text file (one prompt a line)."""

from __future__ import annotations

import os
from typing import Optional

import numpy as np


def read_prompt_file(path: str, what: str = "prompt file", hint: str = "pass a text file, one prompt per line"
                     ) -> list[str]:
    """The non-empty lines of a UTF-8 text file, stripped. A missing, unreadable, binary or empty file raises
    FileNotFoundError / ValueError with one line naming ``what`` and the fix (``hint`` for a missing file)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} {path!r} not found: {hint}")
    try:
        with open(path, encoding="utf-8") as f:
            prompts = [line.strip() for line in f if line.strip()]
    except UnicodeDecodeError as err:
        raise ValueError(f"{what} {path!r} is not UTF-8 text (byte {err.start}): save it as UTF-8 text, one prompt "
                         "per line") from None
    if any("\x00" in p for p in prompts):
        raise ValueError(f"{what} {path!r} contains NUL bytes (a binary file?): pass a text file, one prompt per line")
    if not prompts:
        raise ValueError(f"{what} {path!r} has no prompts: write one prompt per line")
    return prompts


def toy_tasks(spec: str) -> Optional[tuple[str, ...]]:
    """'toy' -> the GenEval tasks; 'toy:text,counting' -> those tasks ('geneval' expands); any other spec (a
    prompt file) -> None. An unknown toy task raises ValueError naming the valid ones."""
    from .toy import GENEVAL_TASKS, TASKS

    if spec == "toy":
        return tuple(GENEVAL_TASKS)
    if not spec.startswith("toy:"):
        return None
    names = [t.strip() for t in spec[4:].split(",") if t.strip()]
    tasks = tuple(t for n in names for t in (GENEVAL_TASKS if n == "geneval" else (n,)))
    bad = [t for t in tasks if t not in TASKS]
    if not tasks or bad:
        raise ValueError(f"prompt source {spec!r}: unknown toy task {', '.join(bad) or '(none)'}; use "
                         f"toy:TASK[,TASK...] with tasks from geneval, {', '.join(TASKS)}")
    return tasks


class PromptSource:
    """Draws prompts with a numpy Generator; ``sample(n, rng) -> list[str]`` of n prompts."""

    def __init__(self, spec: str):
        self.spec = spec
        tasks = toy_tasks(spec)
        self._prompts = None
        self._tasks = None if spec == "toy" else tasks  # 'toy': the sampler's own default task mix
        if tasks is None:
            self._prompts = read_prompt_file(spec, hint="pass an existing text file or train.prompts=toy")

    def sample(self, n: int, rng: np.random.Generator) -> list[str]:
        if self._prompts is None:
            from .toy import sample

            if self._tasks is not None:
                return [sample(rng, tasks=self._tasks)[0] for _ in range(n)]
            return [sample(rng)[0] for _ in range(n)]
        return [self._prompts[i] for i in rng.integers(len(self._prompts), size=n)]
