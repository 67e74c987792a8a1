"""Prompt sources for training: the toy world's GenEval train split ('toy'), chosen toy tasks ('toy:text',
'toy:geneval', 'toy:counting,colors'), or a text file (one prompt a line).

Errors name the file as given (only its name when the path is long) and a line number, never a line of the file:
a config pointing train.prompts at some other file must not print what is in it."""

from __future__ import annotations

import os
from typing import Optional

import numpy as np

MAX_PROMPT_CHARS = 10_000  # one prompt (a line); text encoders read at most a few hundred tokens of it


def _show(path: str) -> str:
    """A path for a message: as given when short, else (the end of) its file name."""
    if len(path) <= 120 and path.isprintable():
        return repr(path)
    name = os.path.basename(path.rstrip("/")) or path
    name = name if len(name) <= 60 else "..." + name[-57:]
    return repr(".../" + name if name.isprintable() else ".../" + name.encode("ascii", "replace").decode())


def read_prompt_file(path: str, what: str = "prompt file", hint: str = "pass a text file, one prompt per line"
                     ) -> list[str]:
    """The non-empty lines of a UTF-8 text file, stripped. A missing, unreadable, binary or empty file, or a line
    over ``MAX_PROMPT_CHARS`` characters, raises FileNotFoundError / ValueError with one line naming ``what``, the
    file (not its contents) and the fix (``hint`` for a missing file)."""
    if isinstance(path, os.PathLike):
        path = os.fspath(path)
    if not isinstance(path, str):
        raise ValueError(f"{what} must be a path (a string), got {type(path).__name__}")
    shown = _show(path)
    if "\x00" in path or not os.path.isfile(path):
        raise FileNotFoundError(f"{what} {shown} not found: {hint}")
    prompts, offset, number = [], 0, 0
    limit = 4 * MAX_PROMPT_CHARS + 2  # bytes: UTF-8 spends at most 4 a character, plus the line break
    try:
        with open(path, "rb") as f:
            while True:
                raw = f.readline(limit)
                if not raw:
                    break
                number += 1
                if len(raw) >= limit and not raw.endswith(b"\n"):
                    raise ValueError(f"{what} {shown} line {number} is longer than {MAX_PROMPT_CHARS} characters: "
                                     "write one prompt per line")
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as err:
                    raise ValueError(f"{what} {shown} is not UTF-8 text (byte {offset + err.start}): save it as "
                                     "UTF-8 text, one prompt per line") from None
                offset += len(raw)
                # universal newlines, as text mode reads them: a lone \r ends a line too
                for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n"):
                    line = line.strip()
                    if not line:
                        continue
                    if "\x00" in line:
                        raise ValueError(f"{what} {shown} contains NUL bytes (a binary file?): pass a text file, "
                                         "one prompt per line")
                    if len(line) > MAX_PROMPT_CHARS:
                        raise ValueError(f"{what} {shown} line {number} is longer than {MAX_PROMPT_CHARS} "
                                         "characters: write one prompt per line")
                    prompts.append(line)
    except OSError as err:
        raise ValueError(f"{what} {shown} cannot be read ({err.strerror or type(err).__name__}): {hint}") from None
    if not prompts:
        raise ValueError(f"{what} {shown} has no prompts: write one prompt per line")
    return prompts


def toy_tasks(spec: str) -> Optional[tuple[str, ...]]:
    """'toy' -> the GenEval tasks; 'toy:text,counting' -> those tasks ('geneval' expands); any other spec (a
    prompt file) -> None. An unknown toy task raises ValueError naming the valid ones."""
    from .toy import GENEVAL_TASKS, TASKS

    if not isinstance(spec, str):
        raise ValueError(f"a prompt source must be 'toy', 'toy:TASK[,TASK...]' or a prompt file path, got "
                         f"{type(spec).__name__}")
    if spec == "toy":
        return tuple(GENEVAL_TASKS)
    if not spec.startswith("toy:"):
        return None
    names = [t.strip() for t in spec[4:].split(",") if t.strip()]
    tasks = tuple(t for n in names for t in (GENEVAL_TASKS if n == "geneval" else (n,)))
    bad = [t for t in tasks if t not in TASKS]
    if not tasks or bad:
        shown = repr(spec) if len(spec) <= 60 and spec.isprintable() else repr(spec[:40]) + "..."
        names = ", ".join(t if len(t) <= 30 and t.isprintable() else repr(t[:20]) + "..." for t in bad[:3])
        more = f" (+{len(bad) - 3} more)" if len(bad) > 3 else ""
        raise ValueError(f"prompt source {shown}: unknown toy task {names or '(none)'}{more}; use "
                         f"toy:TASK[,TASK...] with tasks from geneval, {', '.join(TASKS)}")
    return tasks


class PromptSource:
    """Draws prompts with a numpy Generator; ``sample(n, rng) -> list[str]`` of n prompts."""

    def __init__(self, spec: str):
        if isinstance(spec, os.PathLike):
            spec = os.fspath(spec)
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
