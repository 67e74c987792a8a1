"""Load reward weights from a hub id or a local folder, failing with ONE message that says what to fetch.

``load(cls, name, what)`` calls ``cls.from_pretrained(name)``; when the weights cannot be found (offline,
not cached, wrong path) it raises ``FileNotFoundError`` naming the download command and the ``model=``
option. ``resolve("tiny")`` maps the alias to the shipped tiny CLIP (``assets/tiny-clip``).
"""

from __future__ import annotations

import os
from pathlib import Path


def _assets() -> Path:
    """FLOWALIGN_ASSETS, else the checkout's assets/ (editable install: rewards/ sits next to it), else the
    wheel's package data (installed as flowalign/rewards next to flowalign/_assets)."""
    if os.environ.get("FLOWALIGN_ASSETS"):
        return Path(os.environ["FLOWALIGN_ASSETS"])
    here = Path(__file__).resolve().parents[1]
    return here / "assets" if (here / "assets").is_dir() else here / "_assets"


ASSETS = _assets()
TINY_CLIP = ASSETS / "tiny-clip"
ALIASES = {"tiny": TINY_CLIP, "tiny-clip": TINY_CLIP}


def resolve(name) -> str:
    """Alias ('tiny') -> shipped folder; anything else unchanged (hub id or path), '~' expanded."""
    return os.path.expanduser(str(ALIASES.get(str(name), name)))


def missing_message(what: str, name: str, option: str = "model") -> str:
    if name == str(TINY_CLIP):
        return (f"{what}: the shipped tiny CLIP is missing at {TINY_CLIP}: run "
                f"`python scripts/train_tiny_clip.py` or set FLOWALIGN_ASSETS")
    return (f"{what} weights {name!r} not found locally (offline): run `huggingface-cli download {name}` "
            f"or pass {option}=/path/to/folder")


def is_local(name: str) -> bool:
    """A path (starts with '.' or '/', or an existing folder) rather than a hub id."""
    return name.startswith((".", "/")) or os.path.isdir(name)


def load(cls, name, what: str, option: str = "model", **kwargs):
    """``cls.from_pretrained(resolve(name), **kwargs)`` with one clear error when the weights are missing."""
    name = resolve(name)
    if is_local(name) and not os.path.isdir(name):
        raise FileNotFoundError(missing_message(what, name, option))
    try:
        return cls.from_pretrained(name, **kwargs)
    except (OSError, ValueError) as e:  # transformers raises OSError (EnvironmentError) for missing files
        if is_local(name):
            raise OSError(f"{what}: folder {name!r} could not be loaded ({e}); re-save it with save_pretrained") from e
        raise FileNotFoundError(missing_message(what, name, option)) from e
