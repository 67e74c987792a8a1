"""``remote``: score through an HTTP reward server (a big reward model on another process or machine).

Protocols (option ``protocol``), both JSON in and JSON out, standard library only (urllib):

``flowalign`` (default): POST ``url`` with ``{"images": [base64 PNG, ...], "prompts": [...], "metadata": [...]}``;
  the server answers a JSON list of B numbers or ``{"scores": [...]}``. ``serve(reward)`` is a reference server.
``flow_grpo_json``: the request/reply layout of the reward servers Flow-GRPO talks to (yifan123/reward-server
  GenEval and DeQA apps, the UnifiedReward server): POST ``{"images": [base64 JPEG, ...], "prompts": [...],
  "meta_datas": [...], "only_strict": bool}``, reply ``{"scores": [...], ...}`` (GenEval; also "rewards",
  "strict_rewards", "group_rewards") or ``{"outputs": [...]}`` (DeQA, UnifiedReward); ``score_key`` picks the
  list (default: "scores", else "outputs"). Those servers speak it over ``pickle`` (request and reply), and
  unpickling a reply lets the server run any code on the client, so this client never unpickles: the server
  must accept and answer JSON (in its Flask app: ``request.get_json()``, ``base64.b64decode`` each image,
  ``return jsonify(response)``). A pickle reply, or a server failing to unpickle our JSON, is named as such.

Reliability: each try waits at most ``connect_timeout`` s to connect and ``timeout`` s for each read of the
reply; connection errors, timeouts and HTTP 5xx are tried ``retries`` times in all, sleeping ``backoff`` s,
then twice that, ... between tries, with one progress line on stderr per retry. A server that is down is
therefore reported after about ``retries * connect_timeout + backoff * (2 ** (retries - 1) - 1)`` s (3 tries,
5 s, 1 s: under 20 s; a refused connection: about 3 s), a hung one after ``retries * timeout`` s.
Replies are validated: a JSON object or list, B numbers, no nesting; a wrong count, wrong type or non-JSON reply
raises ``RewardServerUnavailable`` (one line: URL, what came back, the fix). ``null`` / NaN / inf entries become
NaN: ``safe_scores`` leaves those samples out of the advantages and counts them.

Errors: ``RewardServerUnavailable`` (down after all tries, or a reply that breaks the protocol) is a
``RewardUnavailable``: ``safe_scores`` re-raises it at once instead of re-asking the server sample by sample.
``RewardServerError`` (HTTP 4xx: the server rejected this request) is not: the batch is retried one sample at a
time, so one image the server refuses does not sink the batch. Both are ``ConnectionError`` s with a one-line
message (the CLI prints it without a traceback).
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import math
import socket
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Optional, Sequence

import torch

from .base import Images, Reward, RewardUnavailable, to_pil_list

LOOPBACK = ("127.0.0.1", "localhost", "::1")
PROTOCOLS = ("flowalign", "flow_grpo_json")
FIX = "start it or fix `url` (reward_options.url)"


class RewardServerError(ConnectionError):
    """The reward server failed a request; the message is one line naming the URL, the cause and the fix. Raised as
    such for HTTP 4xx (this request was rejected: safe_scores then asks per sample)."""


class RewardServerUnavailable(RewardServerError, RewardUnavailable):
    """The reward server cannot score at all: not answering after every try, or replies that break the protocol."""


def encode_png(image) -> str:
    return _encode(image, "PNG")


def _encode(image, fmt: str) -> str:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def decode_png(data: str):
    from PIL import Image

    return Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB")


def _short(text, limit: int = 160) -> str:
    """A server's message on one line: the JSON "error"/"detail"/"message", a traceback's last line, else the
    text; truncated to ``limit`` characters."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    try:
        obj = json.loads(text)
        if isinstance(obj, dict):
            text = str(next((obj[k] for k in ("error", "detail", "message") if k in obj), text))
    except ValueError:
        pass
    lines = [ln.strip() for ln in str(text).strip().splitlines() if ln.strip()]
    if not lines:
        return ""
    text = " ".join((lines[-1] if "Traceback" in text else " ".join(lines)).split())  # an exception line says most
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _finite(s) -> float:
    """A reply entry -> float, NaN for null / NaN / inf (and ints too big for a float)."""
    try:
        f = float(s) if s is not None else math.nan
    except OverflowError:
        return math.nan
    return f if math.isfinite(f) else math.nan


def _cause(err, read_timeout: float) -> str:
    """A short name for why a try failed."""
    reason = getattr(err, "reason", err) if isinstance(err, urllib.error.URLError) else err
    if isinstance(reason, ConnectionRefusedError):
        return "ConnectionRefused"
    if isinstance(reason, socket.gaierror):
        return f"host name not resolved: {reason.strerror or reason}"
    if isinstance(reason, (TimeoutError, socket.timeout)):
        return str(reason) if str(reason) not in ("", "timed out") else f"no reply within {read_timeout:g} s"
    if isinstance(reason, http.client.RemoteDisconnected):
        return "closed the connection without a reply"
    if isinstance(reason, BaseException):
        return f"{type(reason).__name__}: {reason}" if str(reason) else type(reason).__name__
    return str(reason)


def _timed(base, connect_timeout: float):
    """An http.client connection class that connects within ``connect_timeout`` s and then reads with the
    request's own timeout (urllib has a single timeout for both)."""

    class Conn(base):
        def connect(self):
            read_timeout, self.timeout = self.timeout, connect_timeout
            try:
                super().connect()
            except (TimeoutError, socket.timeout):
                raise TimeoutError(f"no connection within {connect_timeout:g} s") from None
            finally:
                self.timeout = read_timeout
            self.sock.settimeout(read_timeout)

    return Conn


class _HTTP(urllib.request.HTTPHandler):
    def __init__(self, connect_timeout: float):
        super().__init__()
        self.conn = _timed(http.client.HTTPConnection, connect_timeout)

    def http_open(self, req):
        return self.do_open(self.conn, req)


class _HTTPS(urllib.request.HTTPSHandler):
    def __init__(self, connect_timeout: float):
        super().__init__()
        self.conn = _timed(http.client.HTTPSConnection, connect_timeout)

    def https_open(self, req):
        return self.do_open(self.conn, req, context=self._context)


class RemoteReward(Reward):
    """score_i = the server's i-th number, [B] (NaN where it answered null/NaN/inf).

    Options: url (http:// or https://); protocol ('flowalign' or 'flow_grpo_json', module docstring);
    timeout (s to wait for each read of the reply, default 30; raise it for slow scorers); connect_timeout
    (s to connect, default 5); retries (tries in all, default 3); backoff (s before the 2nd try, doubled
    after, default 1); headers (e.g. an auth token); batch_size (images per request, default all; Flow-GRPO
    sends 64); score_key and only_strict (flow_grpo_json: the reply list to use, default "scores" else
    "outputs"; GenEval's only_strict flag, default True as in Flow-GRPO training); name (how it is logged).
    """

    name = "remote"

    def __init__(self, url: str, timeout: float = 30.0, retries: int = 3, backoff: float = 1.0,
                 headers: Optional[dict] = None, name: Optional[str] = None, protocol: str = "flowalign",
                 connect_timeout: float = 5.0, batch_size: Optional[int] = None, score_key: Optional[str] = None,
                 only_strict: bool = True):
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise ValueError(f"remote reward: url must start with http:// or https://, got {url!r} "
                             f"(reward_options.url, e.g. http://127.0.0.1:8000/)")
        if protocol not in PROTOCOLS:
            raise ValueError(f"remote reward: protocol must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")
        if not isinstance(retries, int) or retries < 1:
            raise ValueError(f"remote reward: retries is the number of tries in all and must be >= 1, got {retries!r}")
        for key, val in (("timeout", timeout), ("connect_timeout", connect_timeout)):
            if not isinstance(val, (int, float)) or not val > 0:
                raise ValueError(f"remote reward: {key} must be a positive number of seconds, got {val!r}")
        if not isinstance(backoff, (int, float)) or backoff < 0:
            raise ValueError(f"remote reward: backoff must be >= 0 seconds, got {backoff!r}")
        if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
            raise ValueError(f"remote reward: batch_size must be a positive integer or None, got {batch_size!r}")
        self.url, self.timeout, self.retries, self.backoff = url, float(timeout), retries, float(backoff)
        self.connect_timeout, self.protocol, self.batch_size = float(connect_timeout), protocol, batch_size
        self.score_key, self.only_strict = score_key, only_strict
        self.headers = {"Content-Type": "application/json", "Accept": "application/json", **(headers or {})}
        self.name = name or self.name
        host = urllib.parse.urlparse(url).hostname
        handlers = [_HTTP(self.connect_timeout), _HTTPS(self.connect_timeout)]
        if host in LOOPBACK:  # loopback never goes through an HTTP proxy from the environment
            handlers.append(urllib.request.ProxyHandler({}))
        self.opener = urllib.request.build_opener(*handlers)

    # -- transport -------------------------------------------------------------------------------------------
    def post(self, payload: dict):
        """POST ``payload`` as JSON with retries; -> the decoded JSON reply. Raises RewardServerError (4xx) or
        RewardServerUnavailable (every try failed, or the reply is not JSON)."""
        body = json.dumps(payload, default=str).encode()
        for attempt in range(1, self.retries + 1):
            req = urllib.request.Request(self.url, data=body, headers=self.headers, method="POST")
            try:
                with self.opener.open(req, timeout=self.timeout) as resp:
                    return self._decode(resp.read(), resp.status, resp.headers.get("Content-Type", ""))
            except urllib.error.HTTPError as e:
                try:
                    detail = _short(e.read())
                except (OSError, http.client.HTTPException):
                    detail = ""
                if e.code < 500:  # the request is wrong: retrying will not help
                    raise RewardServerError(f"reward server {self.url} rejected the request: HTTP {e.code} "
                                            f"{detail or e.reason} (check reward_options and the server's log)"
                                            ) from None
                if "pickl" in detail.lower():
                    raise RewardServerUnavailable(
                        f"reward server {self.url} failed with HTTP {e.code} {detail}: it expects pickle; flowalign "
                        f"sends JSON only (unpickling lets a peer run code): make the server read JSON "
                        f"(protocol flow_grpo_json, see flowalign.rewards.remote)") from None
                cause = f"HTTP {e.code} {detail}".strip()
            except RewardServerError:
                raise
            except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
                cause = _cause(e, self.timeout)
            if attempt < self.retries:
                wait = self.backoff * 2 ** (attempt - 1)
                print(f"reward server {self.url} not answering ({cause}), retry {attempt + 1}/{self.retries} "
                      f"in {wait:g} s", file=sys.stderr, flush=True)
                time.sleep(wait)
        raise RewardServerUnavailable(
            f"reward server {self.url} unreachable after {self.retries} tries: {FIX}; last error: {cause} (each try "
            f"waits connect_timeout={self.connect_timeout:g} s, timeout={self.timeout:g} s)")

    def _decode(self, raw: bytes, status: int, ctype: str):
        if raw[:1] == b"\x80":  # a pickle stream (protocol >= 2): never unpickled
            raise RewardServerUnavailable(
                f"reward server {self.url} answered a pickle (HTTP {status}, {len(raw)} bytes): flowalign never "
                f"unpickles replies (that lets the server run code here); make it answer JSON "
                f"(protocol flow_grpo_json, see flowalign.rewards.remote)")
        try:
            return json.loads(raw)
        except ValueError:
            raise RewardServerUnavailable(
                f"reward server {self.url} answered non-JSON (HTTP {status}, {ctype or 'no Content-Type'}): "
                f"{_short(raw, 120)!r}; is reward_options.url the scoring endpoint?") from None

    # -- protocol --------------------------------------------------------------------------------------------
    def _payload(self, images: list, prompts: list, metadata) -> dict:
        if self.protocol == "flow_grpo_json":
            meta = [dict(m) if isinstance(m, dict) else {} for m in (metadata or [None] * len(prompts))]
            return {"images": [_encode(im, "JPEG") for im in images], "prompts": prompts, "meta_datas": meta,
                    "only_strict": bool(self.only_strict)}
        payload = {"images": [encode_png(im) for im in images], "prompts": prompts}
        if metadata is not None:
            payload["metadata"] = list(metadata)
        return payload

    def _scores(self, data, n: int) -> list:
        """The reply's list of n scores, validated; one clear error otherwise."""
        if self.protocol == "flow_grpo_json":
            keys = [self.score_key] if self.score_key else ["scores", "outputs"]
            key = next((k for k in keys if isinstance(data, dict) and k in data), None)
            want = f'a JSON object with {" or ".join(repr(k) for k in keys)}: a list of {n} numbers'
            scores = data[key] if key is not None else None
        else:
            want = f"a JSON list of {n} numbers (or {{'scores': [...]}})"
            scores = data.get("scores") if isinstance(data, dict) else data
        got = _short(json.dumps(data, default=str), 120)
        wrong = [s for s in scores if s is not None and (isinstance(s, bool) or not isinstance(s, (int, float)))] \
            if isinstance(scores, list) else []
        if not isinstance(scores, list):
            why = f"got {got}"
        elif len(scores) != n:
            why = f"got {len(scores)} scores for {n} images: {got}"
        elif wrong:
            why = f"got an entry {_short(json.dumps(wrong[0], default=str), 60)} ({type(wrong[0]).__name__}): {got}"
        else:
            return [_finite(s) for s in scores]
        raise RewardServerUnavailable(f"reward server {self.url} must answer {want}, {why} (protocol "
                                      f"{self.protocol!r}; reward_options.protocol chooses)")

    def score(self, images: Images, prompts: Sequence[str], metadata: Optional[Sequence[dict]] = None) -> torch.Tensor:
        pil, prompts = to_pil_list(images), list(prompts)
        meta = None if metadata is None else list(metadata)
        step = self.batch_size or max(len(pil), 1)
        out = []
        for i in range(0, len(pil), step):
            chunk = slice(i, i + step)
            data = self.post(self._payload(pil[chunk], prompts[chunk], None if meta is None else meta[chunk]))
            out += self._scores(data, len(prompts[chunk]))
        return torch.tensor(out, dtype=torch.float32)


def serve(reward, host: str = "127.0.0.1", port: int = 0):
    """A ThreadingHTTPServer that scores POSTed batches with ``reward`` (call ``.serve_forever()``;
    ``server.server_address`` has the port). Reference implementation of the ``flowalign`` protocol: a request
    it cannot read answers 400, a reward that raises on the batch 422 (the client then asks per sample), NaN
    scores go out as null."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            try:
                req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                images = [decode_png(s) for s in req["images"]]
                prompts, metadata = req["prompts"], req.get("metadata")
            except Exception as e:  # a malformed request
                return self.reply(400, {"error": f"bad request: {e!r}"})
            try:
                scores = [s if math.isfinite(s) else None for s in reward(images, prompts, metadata).tolist()]
            except Exception as e:  # report, keep serving
                return self.reply(422, {"error": repr(e)})
            self.reply(200, scores)

        def reply(self, code: int, obj):
            out = json.dumps(obj).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)

        def log_message(self, *args):  # quiet
            pass

    return ThreadingHTTPServer((host, port), Handler)
