"""``remote``: score through an HTTP reward server (a big reward model on another process or machine).

Protocol: POST ``url`` with JSON ``{"images": [base64 PNG, ...], "prompts": [...], "metadata": [...]}``;
the server answers a JSON list of B numbers (or ``{"scores": [...]}``). Standard library only
(urllib); connection errors, timeouts and HTTP 5xx are retried ``retries`` times with exponential
backoff, then one error says the server is unreachable. ``serve(reward)`` is a matching reference server.
"""

from __future__ import annotations

import base64
import io
import json
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Optional, Sequence

import torch

from .base import Images, Reward, to_pil_list

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def encode_png(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def decode_png(data: str):
    from PIL import Image

    return Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB")


class RemoteReward(Reward):
    """score_i = the server's i-th number, [B]. Options: url, timeout (s per try), retries, backoff (s,
    doubled each retry), headers (e.g. an auth token), name (how it is logged)."""

    name = "remote"

    def __init__(self, url: str, timeout: float = 60.0, retries: int = 3, backoff: float = 0.5,
                 headers: Optional[dict] = None, name: Optional[str] = None):
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"remote reward: url must start with http:// or https://, got {url!r}")
        if retries < 1:
            raise ValueError(f"remote reward: retries must be >= 1, got {retries}")
        self.url, self.timeout, self.retries, self.backoff = url, timeout, retries, backoff
        self.headers = {"Content-Type": "application/json", **(headers or {})}
        self.name = name or self.name
        host = urllib.parse.urlparse(url).hostname
        # loopback never goes through an HTTP proxy from the environment
        self.opener = urllib.request.build_opener(*([urllib.request.ProxyHandler({})] if host in LOOPBACK else []))

    def post(self, payload: dict):
        body = json.dumps(payload, default=str).encode()
        last = None
        for attempt in range(self.retries):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            req = urllib.request.Request(self.url, data=body, headers=self.headers, method="POST")
            try:
                with self.opener.open(req, timeout=self.timeout) as resp:
                    return json.loads(resp.read())
            except urllib.error.HTTPError as e:
                detail = e.read()[:200].decode(errors="replace")
                if e.code < 500:  # the request is wrong: retrying will not help
                    raise RuntimeError(f"reward server {self.url} rejected the request: HTTP {e.code} {detail}") from e
                last = f"HTTP {e.code} {detail}"
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as e:
                last = getattr(e, "reason", e)
        raise ConnectionError(f"reward server {self.url} unreachable after {self.retries} tries: start it or fix "
                              f"`url` (last error: {last})")

    def score(self, images: Images, prompts: Sequence[str], metadata: Optional[Sequence[dict]] = None) -> torch.Tensor:
        payload = {"images": [encode_png(im) for im in to_pil_list(images)], "prompts": list(prompts)}
        if metadata is not None:
            payload["metadata"] = list(metadata)
        data = self.post(payload)
        scores = data.get("scores") if isinstance(data, dict) else data
        if not isinstance(scores, list) or len(scores) != len(prompts):
            raise RuntimeError(f"reward server {self.url} must answer a JSON list of {len(prompts)} numbers "
                               f"(or {{'scores': [...]}}), got {str(data)[:200]}")
        return torch.tensor([float("nan") if s is None else float(s) for s in scores], dtype=torch.float32)


def serve(reward, host: str = "127.0.0.1", port: int = 0):
    """A ThreadingHTTPServer that scores POSTed batches with ``reward`` (call ``.serve_forever()``;
    ``server.server_address`` has the port). Reference implementation of the protocol above."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            try:
                req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                images = [decode_png(s) for s in req["images"]]
                scores = reward(images, req["prompts"], req.get("metadata")).tolist()
                code, out = 200, json.dumps(scores).encode()
            except Exception as e:  # report, keep serving
                code, out = 500, json.dumps({"error": repr(e)}).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)

        def log_message(self, *args):  # quiet
            pass

    return ThreadingHTTPServer((host, port), Handler)
