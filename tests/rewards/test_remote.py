"""Remote reward against loopback servers: round trip, retries with progress lines, the server-down message within
the timeout budget, validated replies (count, type, nesting, non-JSON, pickle), HTTP 4xx, NaN/null entries counted
by safe_scores, and the flow_grpo_json protocol (Flow-GRPO's reward-server layout, in JSON)."""

import base64
import json
import socket
import threading
import time
import warnings
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from flowalign.rewards import RewardUnavailable, get, safe_scores
from flowalign.rewards.remote import RewardServerError, RewardServerUnavailable, serve

FAST = dict(backoff=0.01, timeout=2, connect_timeout=1)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Server:
    """A raw loopback server answering with ``reply(request_json, n) -> (code, body)``; ``body`` bytes go out as
    they are, anything else as JSON. Counts requests and keeps them."""

    def __init__(self, reply):
        server_self = self
        self.calls, self.requests = 0, []

        class H(BaseHTTPRequestHandler):
            def do_POST(self):
                server_self.calls += 1
                req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server_self.requests.append(req)
                code, body = reply(req, server_self.calls)
                out = body if isinstance(body, bytes) else json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            def log_message(self, *a):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/score"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def _one_line(err):
    msg = str(err.value)
    assert "\n" not in msg and "Traceback" not in msg
    return msg


def test_round_trip_with_reference_server(reward_server):
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    remote = get("remote", url=reward_server)(x, ["a", "b"], [{"k": 1}, {"k": 2}])
    torch.testing.assert_close(remote, get("jpeg_incompressibility")(x, ["a", "b"]))


def test_correct_scores_and_request_layout():
    with _Server(lambda req, n: (200, {"scores": [len(p) for p in req["prompts"]]})) as srv:
        s = get("remote", url=srv.url, **FAST)(torch.rand(2, 3, 8, 8), ["ab", "abcd"], [{"k": 1}, {"k": 2}])
    assert s.dtype == torch.float32 and s.tolist() == [2.0, 4.0] and srv.calls == 1
    req = srv.requests[0]
    assert set(req) == {"images", "prompts", "metadata"} and req["metadata"] == [{"k": 1}, {"k": 2}]
    assert base64.b64decode(req["images"][0])[:8] == b"\x89PNG\r\n\x1a\n"


def test_retry_on_5xx_then_success_prints_progress(capsys):
    def reply(req, n):
        return (503, {"error": "warming up"}) if n == 1 else (200, [len(p) for p in req["prompts"]])

    with _Server(reply) as srv:
        s = get("remote", url=srv.url, **FAST)(torch.rand(2, 3, 8, 8), ["ab", "abcd"])
    assert s.tolist() == [2.0, 4.0] and srv.calls == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"reward server {srv.url} not answering (HTTP 503 warming up), retry 2/3 in 0.01 s"]


def test_server_down_is_reported_within_the_budget(capsys):
    url = f"http://127.0.0.1:{_free_port()}/"
    t = time.monotonic()
    with pytest.raises(RewardServerUnavailable) as e:
        get("remote", url=url, retries=3, **FAST)(torch.rand(1, 3, 8, 8), ["a"])
    assert time.monotonic() - t < 3
    assert isinstance(e.value, ConnectionError) and isinstance(e.value, RewardUnavailable)
    msg = _one_line(e)
    assert msg.startswith(f"reward server {url} unreachable after 3 tries: start it or fix `url` (reward_options.url)")
    assert msg.endswith("; last error: ConnectionRefused (each try waits connect_timeout=1 s, timeout=2 s)")
    assert capsys.readouterr().err.splitlines() == [
        f"reward server {url} not answering (ConnectionRefused), retry 2/3 in 0.01 s",
        f"reward server {url} not answering (ConnectionRefused), retry 3/3 in 0.02 s"]


def test_hung_server_times_out_per_try(capsys):
    with socket.socket() as sock:  # the kernel accepts the connection; nobody ever answers
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        url = f"http://127.0.0.1:{sock.getsockname()[1]}/"
        t = time.monotonic()
        with pytest.raises(RewardServerUnavailable, match=r"after 2 tries: .*last error: no reply within 0.3 s"):
            get("remote", url=url, timeout=0.3, retries=2, backoff=0.01)(torch.rand(1, 3, 8, 8), ["a"])
        assert time.monotonic() - t < 3
    assert "not answering (no reply within 0.3 s), retry 2/2 in 0.01 s" in capsys.readouterr().err


def test_safe_scores_does_not_ask_a_down_server_once_per_sample(capsys):
    url = f"http://127.0.0.1:{_free_port()}/"
    t = time.monotonic()
    with pytest.raises(RewardServerUnavailable):
        safe_scores(get("remote", url=url, retries=2, **FAST), torch.rand(8, 3, 8, 8), ["a"] * 8)
    assert time.monotonic() - t < 3
    assert len(capsys.readouterr().err.splitlines()) == 1  # one retry of the batch, not 1 + 8 rounds


@pytest.mark.parametrize("body, needle", [
    ([1.0], "got 1 scores for 2 images"),
    ({"scores": [1.0, 2.0, 3.0]}, "got 3 scores for 2 images"),
    ([[0.5], [0.7]], "got an entry [0.5] (list)"),
    (["0.5", "0.7"], "got an entry \"0.5\" (str)"),
    ([True, False], "got an entry true (bool)"),
    ({"result": "ok"}, "must answer a JSON list of 2 numbers"),
    (b"<html><body>502 Bad Gateway</body></html>", "answered non-JSON (HTTP 200"),
    (b"\x80\x04\x95\x10\x00\x00\x00", "never unpickles"),
])
def test_bad_replies_raise_one_clear_error_without_retrying(body, needle):
    with _Server(lambda req, n: (200, body)) as srv:
        with pytest.raises(RewardServerUnavailable) as e:
            get("remote", url=srv.url, **FAST)(torch.rand(2, 3, 8, 8), ["a", "b"])
    msg = _one_line(e)
    assert needle in msg and srv.url in msg and srv.calls == 1


def test_http_400_names_status_and_short_message_not_retried():
    long = "prompt too long " * 40
    with _Server(lambda req, n: (400, {"error": long})) as srv:
        with pytest.raises(RewardServerError) as e:
            get("remote", url=srv.url, **FAST)(torch.rand(2, 3, 8, 8), ["a", "b"])
    msg = _one_line(e)
    assert f"reward server {srv.url} rejected the request: HTTP 400 prompt too long" in msg
    assert len(msg) < 400 and "..." in msg and srv.calls == 1
    assert not isinstance(e.value, RewardUnavailable)  # safe_scores may still score the other samples


def test_http_400_for_one_sample_leaves_the_others_scored():
    def reply(req, n):
        if any("bad" in p for p in req["prompts"]):
            return 400, {"error": "cannot score 'bad'"}
        return 200, [float(len(p)) for p in req["prompts"]]

    with _Server(reply) as srv, warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        scores, valid, n_bad = safe_scores(get("remote", url=srv.url, **FAST), torch.rand(3, 3, 8, 8),
                                           ["ok", "bad", "fine"])
    assert valid.tolist() == [True, False, True] and n_bad == 1 and scores.tolist() == [2.0, 0.0, 4.0]
    assert any("HTTP 400 cannot score 'bad'" in str(x.message) for x in w)


def test_500_traceback_about_pickle_says_the_server_wants_pickle():
    tb = (b"Traceback (most recent call last):\n  File \"app_geneval.py\", line 31, in inference\n"
          b"_pickle.UnpicklingError: invalid load key, '{'.\n")  # the reference app, sent our JSON
    with _Server(lambda req, n: (500, tb)) as srv:
        with pytest.raises(RewardServerUnavailable, match="UnpicklingError.*expects pickle; flowalign sends JSON only"):
            get("remote", url=srv.url, **FAST)(torch.rand(1, 3, 8, 8), ["a"])
    assert srv.calls == 1


def test_null_nan_and_inf_entries_become_nan_and_are_counted():
    with _Server(lambda req, n: (200, b'{"scores": [1.5, null, NaN, Infinity]}')) as srv:
        r = get("remote", url=srv.url, **FAST)
        s = r(torch.rand(4, 3, 8, 8), list("abcd"))
        assert s[0] == 1.5 and torch.isnan(s[1:]).all()
        with pytest.warns(RuntimeWarning, match="reward remote: 3/4 samples invalid"):
            scores, valid, n_bad = safe_scores(r, torch.rand(4, 3, 8, 8), list("abcd"))
    assert valid.tolist() == [True, False, False, False] and n_bad == 3 and scores.tolist() == [1.5, 0, 0, 0]


def test_reference_server_sends_null_for_nan_and_422_when_the_reward_raises():
    def reward(images, prompts, metadata=None):
        if "boom" in prompts:
            raise ValueError("boom")
        return torch.tensor([float("nan") if p == "nan" else 1.0 for p in prompts])

    server = serve(reward)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        r = get("remote", url=url, **FAST)
        with pytest.warns(RuntimeWarning, match="2/3 samples invalid"):
            scores, valid, n_bad = safe_scores(r, torch.rand(3, 3, 8, 8), ["a", "boom", "nan"])
        assert valid.tolist() == [True, False, False] and scores.tolist() == [1.0, 0.0, 0.0]
        with pytest.raises(RewardServerError, match="HTTP 422 ValueError\\('boom'\\)"):
            r(torch.rand(1, 3, 8, 8), ["boom"])
    finally:
        server.shutdown()
        server.server_close()


def _geneval_json(req, n):
    """Flow-GRPO's GenEval reward-server reply, as JSON: per-image lists and per-tag groups."""
    k = len(req["images"])
    return 200, {"scores": [0.5] * k, "rewards": [0.0] * k, "strict_rewards": [1.0] * k,
                 "group_rewards": {"counting": [-10.0] * k}, "group_strict_rewards": {"counting": [1.0] * k}}


def test_flow_grpo_json_protocol_geneval_layout_and_batches():
    meta = [{"tag": "counting", "include": [{"class": "cat", "count": 2}], "prompt": p} for p in "abc"]
    with _Server(_geneval_json) as srv:
        r = get("remote", url=srv.url, protocol="flow_grpo_json", batch_size=2, **FAST)
        assert r(torch.rand(3, 3, 8, 8), list("abc"), meta).tolist() == [0.5, 0.5, 0.5]
        strict = get("remote", url=srv.url, protocol="flow_grpo_json", score_key="strict_rewards", **FAST)
        assert strict(torch.rand(3, 3, 8, 8), list("abc"), meta).tolist() == [1.0, 1.0, 1.0]
    assert srv.calls == 3 and [len(q["images"]) for q in srv.requests] == [2, 1, 3]
    req = srv.requests[0]
    assert set(req) == {"images", "prompts", "meta_datas", "only_strict"} and req["only_strict"] is True
    assert req["meta_datas"] == meta[:2] and req["prompts"] == ["a", "b"]
    assert base64.b64decode(req["images"][0])[:2] == b"\xff\xd8"  # JPEG, as the reference servers expect


def test_flow_grpo_json_outputs_reply_and_missing_key():
    with _Server(lambda req, n: (200, {"outputs": [3.0] * len(req["images"])})) as srv:
        assert get("remote", url=srv.url, protocol="flow_grpo_json", **FAST)(
            torch.rand(2, 3, 8, 8), ["a", "b"]).tolist() == [3.0, 3.0]
        assert srv.requests[0]["meta_datas"] == [{}, {}]
        with pytest.raises(RewardServerUnavailable, match="'strict_rewards': a list of 2 numbers"):
            get("remote", url=srv.url, protocol="flow_grpo_json", score_key="strict_rewards", **FAST)(
                torch.rand(2, 3, 8, 8), ["a", "b"])


@pytest.mark.parametrize("kw, needle", [
    (dict(url="127.0.0.1:8000"), "must start with http"),
    (dict(url="http://x/", protocol="pickle"), "protocol must be one of flowalign, flow_grpo_json"),
    (dict(url="http://x/", retries=0), "retries is the number of tries in all"),
    (dict(url="http://x/", timeout=0), "timeout must be a positive number"),
    (dict(url="http://x/", batch_size=0), "batch_size must be a positive integer"),
])
def test_options_are_checked(kw, needle):
    with pytest.raises(ValueError, match=needle):
        get("remote", **kw)
