"""Preference pairs for offline Flow-DPO (``dpo.pairs: offline``, docs/algorithms/dpo.md): a JSONL file, one object
a line, ``{"prompt": "...", "chosen": "a.png", "rejected": "b.png"}``, image paths relative to the file's folder
(absolute paths are kept). Blank lines are skipped.

Errors are one line naming the file (only its name when the path is long), the line number and which key is at
fault, never a line's contents: a config pointing ``dpo.preference_file`` at some other file must not print what
is in it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Optional

import torch

from .prompts import MAX_PROMPT_CHARS, _show

PAIR_KEYS = ("prompt", "chosen", "rejected")
IMAGE_KEYS = ("chosen", "rejected")
MAX_LINE_CHARS = MAX_PROMPT_CHARS + 2 * 4096 + 1024  # a prompt, two paths (PATH_MAX) and the JSON around them
_EXAMPLE = '{"prompt": "a red circle", "chosen": "win.png", "rejected": "lose.png"}'


@dataclass(frozen=True)
class PreferencePair:
    """One preference: ``chosen`` preferred over ``rejected`` for ``prompt``. chosen / rejected: absolute image paths;
    file / line: where the pair was read (for messages)."""

    prompt: str
    chosen: str
    rejected: str
    file: str
    line: int

    @property
    def where(self) -> str:
        return f"preference file {_show(self.file)} line {self.line}"


def _lines(path: str, shown: str):
    """(line number, stripped text) of the non-blank lines of a UTF-8 file; one-line errors, never the contents."""
    limit = 4 * MAX_LINE_CHARS + 2  # bytes: UTF-8 spends at most 4 a character, plus the line break
    try:
        with open(path, "rb") as f:
            number = 0
            while True:
                raw = f.readline(limit)
                if not raw:
                    return
                number += 1
                if len(raw) >= limit and not raw.endswith(b"\n"):
                    raise ValueError(f"preference file {shown} line {number} is longer than {MAX_LINE_CHARS} "
                                     f"characters: write one pair a line, e.g. {_EXAMPLE}")
                try:
                    text = raw.decode("utf-8").strip()
                except UnicodeDecodeError:
                    raise ValueError(f"preference file {shown} line {number} is not UTF-8 text: save the file as "
                                     "UTF-8 JSON lines") from None
                if "\x00" in text:
                    raise ValueError(f"preference file {shown} line {number} contains NUL bytes (a binary file?): "
                                     "pass a JSONL file of preference pairs")
                if text:
                    yield number, text
    except OSError as err:
        raise ValueError(f"preference file {shown} cannot be read ({err.strerror or type(err).__name__}): pass a "
                         "readable JSONL file of preference pairs") from None


def _string(row: dict, key: str, where: str, limit: int) -> str:
    if key not in row:
        raise ValueError(f"{where} has no {key!r}: give each line the keys {', '.join(map(repr, PAIR_KEYS))}")
    value = row[key]
    if not isinstance(value, str) or not value.strip() or len(value) > limit or "\x00" in value:
        raise ValueError(f"{where}: {key!r} must be a non-empty string of at most {limit} characters")
    return value.strip()


def read_preference_file(path) -> list[PreferencePair]:
    """The pairs of a preference JSONL file (module docstring), in file order. Every image must exist; a missing
    file, a missing image, a line that is not a JSON object, a missing or empty key, an image named both chosen
    and rejected, or a file without pairs raises FileNotFoundError / ValueError in one line naming the file, the
    line number and the key."""
    if isinstance(path, os.PathLike):
        path = os.fspath(path)
    if not isinstance(path, str):
        raise ValueError(f"the preference file must be a path (a string), got {type(path).__name__}")
    shown = _show(path)
    if "\x00" in path or not os.path.isfile(path):
        raise FileNotFoundError(f"preference file {shown} not found: pass a JSONL file, one {_EXAMPLE} a line "
                                "(dpo.preference_file)")
    root = os.path.dirname(os.path.abspath(path))
    pairs = []
    for number, text in _lines(path, shown):
        where = f"preference file {shown} line {number}"
        try:
            row = json.loads(text)
        except (json.JSONDecodeError, RecursionError):
            raise ValueError(f"{where} is not JSON: write one object a line, e.g. {_EXAMPLE}") from None
        if not isinstance(row, dict):
            raise ValueError(f"{where} is not a JSON object: write one object a line, e.g. {_EXAMPLE}")
        prompt = _string(row, "prompt", where, MAX_PROMPT_CHARS)
        images = {}
        for key in IMAGE_KEYS:
            value = _string(row, key, where, 4096)
            image = os.path.normpath(value if os.path.isabs(value) else os.path.join(root, value))
            if not os.path.isfile(image):
                raise FileNotFoundError(f"{where}: the {key} image is not found (relative paths are read from the "
                                        "preference file's folder)")
            images[key] = image
        if images["chosen"] == images["rejected"]:
            raise ValueError(f"{where}: chosen and rejected name the same image; a pair needs two images")
        pairs.append(PreferencePair(prompt, images["chosen"], images["rejected"], path, number))
    if not pairs:
        raise ValueError(f"preference file {shown} has no pairs: write one {_EXAMPLE} a line")
    return pairs


def load_pair_image(pair: PreferencePair, key: str, size: Optional[tuple[int, int]] = None) -> torch.Tensor:
    """The pair's ``key`` image ("chosen" or "rejected") as float32 [3, H, W] in [0, 1] (RGB), resized to
    ``size = (H, W)`` (bicubic) when given; an unreadable file raises one line naming the pair's file and line."""
    from PIL import Image, UnidentifiedImageError

    from .models.base import image_tensor

    if key not in IMAGE_KEYS:
        raise ValueError(f"key must be one of {IMAGE_KEYS}, got {key!r}")
    path = getattr(pair, key)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{pair.where}: the {key} image is not found (it was there when the file was read)")
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            if size is not None and (im.height, im.width) != tuple(size):
                im = im.resize((int(size[1]), int(size[0])), Image.BICUBIC)
            return image_tensor(im)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise ValueError(f"{pair.where}: the {key} image cannot be read ({type(err).__name__}): replace it with a "
                         "PNG or JPEG file") from None
