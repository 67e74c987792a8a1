"""Prompt sources for training: the toy world's GenEval train split ('toy'), chosen toy tasks ('toy:text',
'toy:geneval', 'toy:counting,colors'), a text file (one prompt a line), or, for the families that edit or animate
an image, (prompt, image) rows: a JSONL file or a folder holding ``metadata.jsonl`` (see ``read_image_rows``).

Errors name the file as given (only its name when the path is long) and a line number, never a line of the file:
a config pointing train.prompts at some other file must not print what is in it."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
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


IMAGE_EXT = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
PROMPT_KEYS, IMAGE_KEYS = ("prompt", "text", "instruction"), ("image", "file_name", "image_path")


@dataclass(frozen=True)
class ImageRow:
    """One (prompt, condition image) row: ``image`` is an absolute path; ``references`` the paths of an identity
    pool (image-to-video identity rewards, IPRO), or () ."""

    prompt: str
    image: str
    references: tuple = ()

    @property
    def key(self) -> str:
        """The row's prompt group: its prompt and its image (one instruction on two images = two groups)."""
        return f"{self.prompt}\x00{self.image}"

    def load(self):
        """The condition image as float [3, H, W] in [0, 1]; a missing or unreadable file raises one line."""
        return load_image(self.image)


def load_image(path: str):
    """An image file -> float32 [3, H, W] in [0, 1] (RGB); FileNotFoundError / ValueError in one line."""
    from PIL import Image, UnidentifiedImageError

    from .models.base import image_tensor

    if not os.path.isfile(path):
        raise FileNotFoundError(f"condition image {_show(path)} not found: fix the row's image path (relative "
                                "paths are read from the JSONL file's folder)")
    try:
        with Image.open(path) as im:
            return image_tensor(im)
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise ValueError(f"condition image {_show(path)} cannot be read ({type(err).__name__}): replace it with a "
                         "PNG or JPEG file") from None


def _field(row: dict, keys: tuple, what: str, where: str):
    for k in keys:
        if k in row:
            value = row[k]
            if not isinstance(value, str) or not value.strip():
                raise ValueError(f"{where}: {k!r} must be a non-empty string")
            return value.strip()
    raise ValueError(f"{where} has no {what}: give each row one of {', '.join(repr(k) for k in keys)}")


def read_image_rows(spec: str) -> list[ImageRow]:
    """(prompt, image) rows from a JSONL file (one object a line) or a folder with ``metadata.jsonl`` (the
    Hugging Face imagefolder layout). A row names its text as "prompt" (or "text", "instruction"), its image as
    "image" (or "file_name", "image_path"), a path relative to the file's folder, and optionally "references":
    a list of image paths or a folder (the row's identity pool). Every image file must exist; errors are one
    line naming the file and the line number, never a line's contents."""
    path = os.path.join(spec, "metadata.jsonl") if os.path.isdir(spec) else spec
    shown = _show(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"prompt file {shown} not found: pass a JSONL file of prompt and image rows, or a "
                                "folder holding metadata.jsonl")
    root = os.path.dirname(os.path.abspath(path))
    resolve = lambda p: p if os.path.isabs(p) else os.path.join(root, p)  # noqa: E731
    rows = []
    for number, line in enumerate(read_prompt_file(path, "prompt file", "pass a JSONL file of prompt and image rows"),
                                  start=1):
        where = f"prompt file {shown} row {number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise ValueError(f"{where} is not JSON: write one object a line, e.g. "
                             '{"prompt": "make it blue", "image": "cat.png"}') from None
        if not isinstance(row, dict):
            raise ValueError(f"{where} is not a JSON object: write one object a line")
        prompt, image = _field(row, PROMPT_KEYS, "prompt", where), resolve(_field(row, IMAGE_KEYS, "image", where))
        if not os.path.isfile(image):
            raise FileNotFoundError(f"{where}: image {_show(image)} not found (relative paths are read from the "
                                    "JSONL file's folder)")
        refs = row.get("references", ())
        if isinstance(refs, str):
            folder = resolve(refs)
            if not os.path.isdir(folder):
                raise FileNotFoundError(f"{where}: references folder {_show(folder)} not found")
            refs = [os.path.join(folder, f) for f in sorted(os.listdir(folder)) if f.lower().endswith(IMAGE_EXT)]
        elif not isinstance(refs, (list, tuple)) or not all(isinstance(r, str) for r in refs):
            raise ValueError(f"{where}: 'references' must be a list of image paths or a folder")
        rows.append(ImageRow(prompt, image, tuple(resolve(r) for r in refs)))
    return rows


def is_image_rows(spec) -> bool:
    """Whether a prompt spec names (prompt, image) rows: a .jsonl file or a folder."""
    spec = os.fspath(spec) if isinstance(spec, os.PathLike) else spec
    return isinstance(spec, str) and (spec.lower().endswith(".jsonl") or os.path.isdir(spec))


class PromptSource:
    """Draws prompts with a numpy Generator; ``sample(n, rng) -> list[str]`` of n prompts. A source of (prompt,
    image) rows (``has_images``) also draws whole rows: ``sample_rows(n, rng) -> list[ImageRow]``."""

    def __init__(self, spec: str):
        if isinstance(spec, os.PathLike):
            spec = os.fspath(spec)
        self.spec = spec
        tasks = toy_tasks(spec)
        self._prompts = None
        self.rows: Optional[list[ImageRow]] = None
        self._tasks = None if spec == "toy" else tasks  # 'toy': the sampler's own default task mix
        if tasks is None and is_image_rows(spec):
            self.rows = read_image_rows(spec)
            self._prompts = [r.prompt for r in self.rows]
        elif tasks is None:
            self._prompts = read_prompt_file(spec, hint="pass an existing text file or train.prompts=toy")

    @property
    def has_images(self) -> bool:
        return self.rows is not None

    def sample_rows(self, n: int, rng: np.random.Generator) -> list[ImageRow]:
        """n (prompt, image) rows (the same draws as ``sample``)."""
        if self.rows is None:
            raise ValueError(f"prompt source {self.spec!r} has no images: pass a JSONL file of prompt and image rows")
        return [self.rows[i] for i in rng.integers(len(self.rows), size=n)]

    def sample(self, n: int, rng: np.random.Generator) -> list[str]:
        if self.rows is not None:
            return [r.prompt for r in self.sample_rows(n, rng)]
        if self._prompts is None:
            from .toy import sample

            if self._tasks is not None:
                return [sample(rng, tasks=self._tasks)[0] for _ in range(n)]
            return [sample(rng)[0] for _ in range(n)]
        return [self._prompts[i] for i in rng.integers(len(self._prompts), size=n)]
