"""Where the shipped files live: ``assets/`` (the tiny pipeline, the tiny CLIP) and ``configs/`` (recipes).

In a source checkout or an editable install they sit next to the package (``<repo>/assets``); a wheel installs
them as package data (``flowalign/_assets``, ``flowalign/_configs``: see pyproject.toml). ``FLOWALIGN_ASSETS``
overrides the assets folder.
"""

from __future__ import annotations

import os

_PACKAGE = os.path.dirname(os.path.abspath(__file__))
_CHECKOUT = os.path.dirname(_PACKAGE)


def _root(kind: str) -> str:
    """The folder of ``kind`` ('assets' | 'configs'): the checkout's when present, else the installed copy."""
    if kind not in ("assets", "configs"):
        raise ValueError(f"kind must be 'assets' or 'configs', got {kind!r}")
    if kind == "assets" and os.environ.get("FLOWALIGN_ASSETS"):
        return os.environ["FLOWALIGN_ASSETS"]
    checkout = os.path.join(_CHECKOUT, kind)
    return checkout if os.path.isdir(checkout) else os.path.join(_PACKAGE, f"_{kind}")


def asset(*parts: str) -> str:
    """Path of a shipped asset, e.g. ``asset('toy-sd3')``."""
    return os.path.join(_root("assets"), *parts)


def shipped_config(name: str) -> str:
    """Path of a shipped recipe, e.g. ``shipped_config('toy_demo.yaml')``."""
    return os.path.join(_root("configs"), name)
