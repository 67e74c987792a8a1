"""Model rewards with HF_HUB_OFFLINE unset and no network: a hub id that is not cached fails at once with one line
(not ~50 s of Hub retries); a cached id loads local files only; a reachable Hub loads as usual."""

import socket
import time

import pytest

from flowalign.rewards import get, hub

MISSING = "flowalign-test/no-such-model"


def _closed_port_url():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


@pytest.fixture
def online_env_no_network(monkeypatch, tmp_path):
    """HF_HUB_OFFLINE unset (env and huggingface_hub's constant), the Hub endpoint a closed loopback port, an empty
    cache, and a fresh probe: what a laptop without network and without the offline flag sees."""
    from huggingface_hub import constants

    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", _closed_port_url())
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hub, "_probe", {}, raising=False)
    return constants


@pytest.mark.parametrize("name, kw, what, tiny", [
    ("clip_score", dict(model=MISSING), "CLIP", True),
    ("clip_score", {}, "CLIP", True),  # openai/clip-vit-large-patch14, the default
    ("pickscore", dict(model=MISSING, tokenizer=MISSING), "PickScore", False),
    ("dino_similarity", dict(model=MISSING, references=[]), "dino_similarity backbone", True),
])
def test_uncached_hub_id_fails_at_once_without_offline_flag(online_env_no_network, name, kw, what, tiny):
    t = time.monotonic()
    with pytest.raises(FileNotFoundError) as e:
        get(name, **kw)
    assert time.monotonic() - t < 5
    msg = str(e.value)
    model = kw.get("model", "openai/clip-vit-large-patch14")
    assert msg.startswith(f"{what} weights {model!r} not found locally (offline): run `hf download {model}`")
    assert f"huggingface-cli download {model}" in msg and "on a machine with network" in msg
    assert "model=/path/to/folder" in msg and ("model=tiny" in msg) == tiny and "\n" not in msg
    assert hub._probe == {online_env_no_network.ENDPOINT: (pytest.approx(hub._probe[online_env_no_network.ENDPOINT][0]),
                                                         False)}


def test_probe_is_skipped_when_offline_is_asked_for(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub, "_probe", {})
    assert hub.hub_reachable() is False and hub._probe == {}  # no request made


class _Fake:
    calls = []

    @classmethod
    def from_pretrained(cls, name, **kw):
        cls.calls.append((name, kw))
        return cls()


def test_cached_id_with_unreachable_hub_loads_local_files_only(monkeypatch):
    monkeypatch.setattr(hub, "hub_reachable", lambda: False)
    monkeypatch.setattr(hub, "is_cached", lambda name, cache_dir=None: name == "org/cached")
    _Fake.calls = []
    hub.load(_Fake, "org/cached", "CLIP")
    assert _Fake.calls == [("org/cached", {"local_files_only": True})]
    with pytest.raises(FileNotFoundError, match="'org/other' not found locally"):
        hub.load(_Fake, "org/other", "CLIP")
    assert len(_Fake.calls) == 1  # never handed to from_pretrained (which would retry the Hub)


def test_reachable_hub_loads_as_usual(monkeypatch):
    monkeypatch.setattr(hub, "hub_reachable", lambda: True)

    def no_cache_lookup(*a, **k):
        raise AssertionError("the cache is not consulted when the Hub answers")

    monkeypatch.setattr(hub, "is_cached", no_cache_lookup)
    _Fake.calls = []
    hub.load(_Fake, "org/any", "CLIP", revision="main")
    assert _Fake.calls == [("org/any", {"revision": "main"})]


def test_reachable_hub_that_cannot_load_the_id_says_so(monkeypatch):
    monkeypatch.setattr(hub, "hub_reachable", lambda: True)

    class Missing:
        @classmethod
        def from_pretrained(cls, name, **kw):
            raise OSError(f"{name} is not a valid model identifier\nsecond line")

    with pytest.raises(FileNotFoundError) as e:
        hub.load(Missing, "org/typo", "CLIP")
    assert str(e.value) == ("CLIP weights 'org/typo' could not be loaded from the Hub (org/typo is not a valid model "
                            "identifier): check the id (and a token for gated repos), or pass model=/path/to/folder")


def test_is_cached_finds_a_snapshot(monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    assert not hub.is_cached("org/model") and not hub.is_cached("not a valid id!")
    snap = tmp_path / "models--org--model" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (snap / "config.json").write_text("{}")
    (tmp_path / "models--org--model" / "refs").mkdir()
    (tmp_path / "models--org--model" / "refs" / "main").write_text("abc123")
    assert hub.is_cached("org/model")
