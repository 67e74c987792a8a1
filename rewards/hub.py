"""Load reward weights from a hub id or a local folder, failing with ONE message that says what to fetch.

``load(cls, name, what)`` calls ``cls.from_pretrained(name)``; when the weights cannot be found (offline,
not cached, wrong path) it raises ``FileNotFoundError`` naming the download command and the ``model=``
option. ``resolve("tiny")`` maps the alias to the shipped tiny CLIP (``assets/tiny-clip``).

Offline without ``HF_HUB_OFFLINE=1``, transformers would spend ~50 s retrying the Hub before failing. So a hub
id is looked up in the local Hugging Face cache first, and the Hub is probed once (a HEAD of the endpoint,
``PROBE_TIMEOUT`` s, remembered for ``PROBE_TTL`` s): when it cannot be reached, an id that is not cached fails
at once, and a cached one loads with ``local_files_only=True``. When the Hub answers, loading proceeds as usual.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

PROBE_TIMEOUT = 3.0  # s for the one HEAD request that tells whether the Hub can be reached
PROBE_TTL = 60.0  # s a probe's answer is reused
_probe: dict = {}  # endpoint -> (time, reachable)


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
TINY_HINT = {"CLIP", "dino_similarity backbone"}  # rewards where model=tiny (the shipped toy-world CLIP) works


def resolve(name) -> str:
    """Alias ('tiny') -> shipped folder; anything else unchanged (hub id or path), '~' expanded."""
    return os.path.expanduser(str(ALIASES.get(str(name), name)))


def missing_message(what: str, name: str, option: str = "model") -> str:
    if name == str(TINY_CLIP):
        return (f"{what}: the shipped tiny CLIP is missing at {TINY_CLIP}: run "
                f"`python scripts/train_tiny_clip.py` or set FLOWALIGN_ASSETS")
    tiny = ", or model=tiny for the shipped toy-world CLIP" if what in TINY_HINT and option == "model" else ""
    return (f"{what} weights {name!r} not found locally (offline): run `hf download {name}` (or `huggingface-cli "
            f"download {name}`) on a machine with network and copy its Hugging Face cache here, or pass "
            f"{option}=/path/to/folder{tiny}")


def is_local(name: str) -> bool:
    """A path (starts with '.' or '/', or an existing folder) rather than a hub id."""
    return name.startswith((".", "/")) or os.path.isdir(name)


def _env_offline() -> bool:
    from huggingface_hub import constants

    flags = [os.environ.get(k, "").upper() for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")]
    return bool(getattr(constants, "HF_HUB_OFFLINE", False)) or any(f in ("1", "ON", "YES", "TRUE") for f in flags)


def hub_reachable() -> bool:
    """False when offline is asked for (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE) or one HEAD of the Hub endpoint
    fails within PROBE_TIMEOUT s (no retries); the answer is kept PROBE_TTL s."""
    if _env_offline():
        return False
    from huggingface_hub import constants

    endpoint = constants.ENDPOINT
    seen = _probe.get(endpoint)
    if seen is not None and time.monotonic() - seen[0] < PROBE_TTL:
        return seen[1]
    try:
        from huggingface_hub.utils import get_session  # honours the proxy settings huggingface_hub uses

        get_session().head(endpoint, timeout=PROBE_TIMEOUT)
        ok = True
    except Exception:  # DNS, refused, timeout, proxy errors: the Hub cannot be reached from here
        ok = False
    _probe[endpoint] = (time.monotonic(), ok)
    return ok


def is_cached(name: str, cache_dir=None) -> bool:
    """True when the local Hugging Face cache holds a snapshot of the hub id ``name`` (no network)."""
    from huggingface_hub import snapshot_download

    try:
        snapshot_download(name, cache_dir=cache_dir, local_files_only=True)
        return True
    except Exception:  # LocalEntryNotFoundError, an invalid repo id, ...
        return False


def check(name, what: str, option: str = "model", cache_dir=None) -> bool:
    """Fail at once (FileNotFoundError, one line) when ``name`` is a missing folder, or a hub id that is neither
    cached nor reachable; call it before importing a heavy library. -> True when only local files may be used
    (the Hub is unreachable and the id is cached)."""
    name = resolve(name)
    if is_local(name):
        if not os.path.isdir(name):
            raise FileNotFoundError(missing_message(what, name, option))
        return False
    if hub_reachable():
        return False
    if not is_cached(name, cache_dir):
        raise FileNotFoundError(missing_message(what, name, option))
    return True


def load(cls, name, what: str, option: str = "model", **kwargs):
    """``cls.from_pretrained(resolve(name), **kwargs)`` with one clear error when the weights are missing; a hub id
    that is not cached fails at once when the Hub cannot be reached."""
    name = resolve(name)
    local_only = check(name, what, option, kwargs.get("cache_dir"))
    if local_only:
        kwargs["local_files_only"] = True  # cached, Hub unreachable: never wait on it for a missing extra file
    try:
        return cls.from_pretrained(name, **kwargs)
    except (OSError, ValueError) as e:  # transformers raises OSError (EnvironmentError) for missing files
        if is_local(name):
            raise OSError(f"{what}: folder {name!r} could not be loaded ({e}); re-save it with save_pretrained") from e
        if not local_only and not kwargs.get("local_files_only") and hub_reachable():
            first = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
            raise FileNotFoundError(f"{what} weights {name!r} could not be loaded from the Hub ({first[:200]}): check "
                                    f"the id (and a token for gated repos), or pass {option}=/path/to/folder") from e
        raise FileNotFoundError(missing_message(what, name, option)) from e
