"""Remote reward against loopback servers: round trip, retries, the server-down message, bad replies."""

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from flowalign.rewards import get


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Server:
    """A raw loopback server answering with ``reply(request_json) -> (code, body)``; counts requests."""

    def __init__(self, reply):
        server_self = self
        self.calls = 0

        class H(BaseHTTPRequestHandler):
            def do_POST(self):
                server_self.calls += 1
                req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                code, body = reply(req, server_self.calls)
                out = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            def log_message(self, *a):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/score"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_round_trip_with_reference_server(reward_server):
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    remote = get("remote", url=reward_server)(x, ["a", "b"], [{"k": 1}, {"k": 2}])
    torch.testing.assert_close(remote, get("jpeg_incompressibility")(x, ["a", "b"]))


def test_protocol_and_retry_on_5xx():
    seen = {}

    def reply(req, n):
        seen.update(req)
        return (503, {"error": "warming up"}) if n == 1 else (200, {"scores": [len(p) for p in req["prompts"]]})

    srv = _Server(reply)
    try:
        s = get("remote", url=srv.url, backoff=0.01)(torch.rand(2, 3, 8, 8), ["ab", "abcd"])
    finally:
        srv.close()
    assert s.tolist() == [2.0, 4.0] and srv.calls == 2
    assert set(seen) == {"images", "prompts"} and isinstance(seen["images"][0], str)


def test_server_down_message():
    url = f"http://127.0.0.1:{_free_port()}"
    t = time.time()
    with pytest.raises(ConnectionError) as e:
        get("remote", url=url, backoff=0.01, timeout=2)(torch.rand(1, 3, 8, 8), ["a"])
    assert f"reward server {url} unreachable after 3 tries: start it or fix `url`" in str(e.value)
    assert time.time() - t < 5


def test_bad_replies():
    srv = _Server(lambda req, n: (200, [1.0]) if n == 1 else (400, {"error": "no"}))
    try:
        r = get("remote", url=srv.url, backoff=0.01)
        with pytest.raises(RuntimeError, match="must answer a JSON list of 2 numbers"):
            r(torch.rand(2, 3, 8, 8), ["a", "b"])
        with pytest.raises(RuntimeError, match="rejected the request: HTTP 400"):
            r(torch.rand(2, 3, 8, 8), ["a", "b"])
        assert srv.calls == 2  # 4xx is not retried
    finally:
        srv.close()
    with pytest.raises(ValueError, match="must start with http"):
        get("remote", url="127.0.0.1:8000")
