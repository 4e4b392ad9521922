"""A fake Clipdrop image-upscaling API: real HTTP servers on loopback, with switchable faults.

Two ``ThreadingHTTPServer`` instances are started:

* the *API host* (``base_url``) implements the sync endpoint, the async submit / status /
  result endpoints, API keys, credits and a sliding-window rate limiter;
* the *storage host* (``storage_url``) serves finished async results behind signed,
  expiring URLs, like an S3 bucket.  It never needs an API key, and it records every
  request that carried one (a key leak).

Both speak HTTP/1.1 with exact ``Content-Length`` headers, so ``requests`` keeps pooled
keep-alive connections, exactly as against the real service.  Faults can be queued per
endpoint with :meth:`FakeClipdrop.inject` or sprinkled randomly with :meth:`FakeClipdrop.chaos`.

Usage::

    with FakeClipdrop(keys={"k": 10}, async_duration=0.2) as fake:
        fake.inject("sync", "reset")
        ...  # point the client at fake.base_url
        assert fake.charged() == 1 and fake.leaks() == 0

Manual use / benchmarks: ``python -m tests.fake_clipdrop --port 8080 --key K --credits 100``.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import io
import json
import math
import random
import re
import secrets
import signal
import socket
import struct
import sys
import threading
import time
import traceback
import uuid
from collections import Counter, deque
from dataclasses import dataclass, field
from decimal import ROUND_HALF_UP, Decimal
from email.message import Message
from email.parser import BytesHeaderParser, HeaderParser
from email.policy import HTTP
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from PIL import Image

# ---------------------------------------------------------------------------------------
# Contract constants
# ---------------------------------------------------------------------------------------
SYNC_PATH = "/image-upscaling/v1/upscale"
SUBMIT_PATH = "/image-upscaling/v1/async-upscale"
STATUS_PREFIX = "/async-tasks/v1/task-status/"
RESULT_PREFIX = "/async-tasks/v1/result/"

MAX_FILE_BYTES = 30_000_000
SYNC_MAX_PIXELS = 16_000_000
SYNC_MAX_TARGET = 4096
ASYNC_MAX_SIDE = 8192
ASYNC_MAX_TARGET = 12_000

API_ENDPOINTS = ("sync", "submit", "status", "result")
ENDPOINTS = API_ENDPOINTS + ("download",)
CHARGING_ENDPOINTS = ("sync", "submit")

#: Every fault kind accepted by inject()/chaos().  Kinds that reject the request before it
#: is processed never charge credits nor consume rate-limit budget: 500, 502-html, 413-html,
#: 401, 402, 403, 429, redirect, and reset/truncate on sync/submit.  Kinds that let the
#: request be processed normally (and so DO charge on sync/submit): slow, task-fail,
#: expired-url, reset-after-charge, truncate-after-charge.  On the free endpoints
#: (status, result, download) reset/truncate cut the real response, which changes nothing.
FAULT_KINDS = frozenset({
    "500", "502-html", "413-html", "reset", "reset-after-charge", "truncate",
    "truncate-after-charge", "slow", "429", "401", "402", "403", "task-fail",
    "expired-url", "redirect",
})
#: Kinds that only make sense on one endpoint; on "any" they wait for that endpoint.
_ONLY_ON = {"task-fail": "submit", "expired-url": "result"}

ERR_NO_KEY = "No api key provided"
ERR_BAD_KEY = "Invalid or revoked api key"
ERR_NO_CREDITS = "Your account has no remaining credits"
ERR_RATE = "Too many requests, blocked by the rate limiter"
ERR_500 = "Internal server error"

_HTML = "<html><head><title>{0}</title></head><body><center><h1>{0}</h1></center><hr><center>nginx</center></body></html>\n"


# ---------------------------------------------------------------------------------------
# Data types
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RequestRecord:
    """One request seen by either server (appended before the response is written)."""

    time: float  #: epoch seconds when the request arrived
    method: str
    endpoint: str  #: "sync" | "submit" | "status" | "result" | "download" | "unknown"
    status: int  #: status line sent (for reset/truncate: the status the cut response claimed)
    key_ok: bool  #: the x-api-key header named a known, non-revoked key
    task_id: str | None
    api_key: str | None  #: raw x-api-key header value, None when absent
    path: str  #: path + query as requested
    fault: str | None = None  #: injected fault kind applied to this request
    charged: Decimal = Decimal(0)  #: credits charged by this request
    image_sha256: str | None = None  #: sha256 hex of the uploaded image_file, if any

    @property
    def key_sent(self) -> bool:
        """Whether the request carried an x-api-key header at all."""
        return self.api_key is not None


@dataclass
class FakeTask:
    """An async upscaling task; its state is derived from the clock, not a worker."""

    id: str
    key: str
    created: float
    ready_at: float
    width: int
    height: int
    strategy: str
    has_alpha: bool
    fail: bool
    cost: Decimal
    image: bytes = field(repr=False)
    result: bytes | None = field(default=None, repr=False)

    @property
    def ext(self) -> str:
        """File extension of the stored result (PNG keeps the alpha channel)."""
        return "png" if self.has_alpha else "jpg"

    def state(self, now: float) -> str:
        """"queued" until ready_at, then "failed" or "completed"."""
        if now < self.ready_at:
            return "queued"
        return "failed" if self.fail else "completed"


@dataclass
class _Fault:
    endpoint: str
    kind: str
    params: dict[str, Any]


@dataclass
class _Reply:
    """A response to write; ``cut`` makes the handler break the connection mid-body."""

    status: int
    body: bytes = b""
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0
    cut: str | None = None  # None | "reset" | "truncate"


@dataclass
class _Ctx:
    """What a request did, filled in while serving it, for the request record."""

    task_id: str | None = None
    charged: Decimal = Decimal(0)
    sha: str | None = None


def _json(status: int, payload: Any, headers: dict[str, str] | None = None) -> _Reply:
    return _Reply(status, json.dumps(payload).encode(), "application/json", headers or {})


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> _Reply:
    return _json(status, {"error": message}, headers)


def _s3_error(status: int, code: str, message: str) -> _Reply:
    """Storage errors look like S3's: XML, not the API's JSON."""
    body = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
            f"<Message>{message}</Message><RequestId>{secrets.token_hex(8)}</RequestId></Error>")
    return _Reply(status, body.encode(), "application/xml")


def format_credits(value: Decimal, fractional: bool = False) -> str:
    """Credits without needless zeros ("1", "4", "4.19"); fractional forces "1.0"."""
    text = format(value.normalize(), "f")
    if fractional and "." not in text:
        text += ".0"
    return text


def detailed_cost(width: int, height: int) -> Decimal:
    """Detailed strategy: 1 credit per output megapixel, to the cent (min 0.01)."""
    mp = (Decimal(width * height) / Decimal(1_000_000)).quantize(Decimal("0.01"), ROUND_HALF_UP)
    return max(mp, Decimal("0.01"))  # never free: a 1x1 detailed upscale still costs a cent


def parse_multipart(content_type: str, body: bytes) -> dict[str, tuple[bytes, str | None]] | None:
    """Parse multipart/form-data into {name: (bytes, filename)}; None if not multipart.

    The deprecated cgi module is avoided: the boundary and each part's headers go through
    the email package, while bodies are cut with bytes.split, which is exact for binary
    data and fast for multi-megabyte uploads.
    """
    ctype: Message = HeaderParser(policy=HTTP).parsestr(f"Content-Type: {content_type}\r\n\r\n")
    boundary = ctype.get_param("boundary")
    if ctype.get_content_type() != "multipart/form-data" or not isinstance(boundary, str):
        return None
    fields: dict[str, tuple[bytes, str | None]] = {}
    # Every delimiter is CRLF--boundary; prefixing CRLF makes the first one match too.
    chunks = (b"\r\n" + body).split(b"\r\n--" + boundary.encode("latin-1"))
    for chunk in chunks[1:]:
        if chunk.startswith(b"--"):
            break  # close delimiter
        head, sep, content = chunk.partition(b"\r\n\r\n")
        if not sep:
            continue
        headers = BytesHeaderParser(policy=HTTP).parsebytes(head.lstrip(b" \t\r\n") + b"\r\n\r\n")
        name = headers.get_param("name", header="content-disposition")
        if isinstance(name, str) and name not in fields:
            fields[name] = (content, headers.get_filename())
    return fields


def _has_alpha(img: Image.Image) -> bool:
    return img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info


def _render(img: Image.Image, width: int, height: int, fmt: str) -> bytes:
    """Really resize with Pillow and encode, so clients get a decodable image of the right size."""
    alpha = _has_alpha(img)
    resized = img.convert("RGBA" if alpha else "RGB").resize((width, height), Image.Resampling.BICUBIC)
    if fmt == "JPEG" and resized.mode != "RGB":
        resized = resized.convert("RGB")
    out = io.BytesIO()
    resized.save(out, fmt, **({"quality": 90} if fmt in ("JPEG", "WEBP") else {}))
    return out.getvalue()


def _open_image(data: bytes, formats: set[str]) -> tuple[Image.Image | None, str | None]:
    """Open (header only) and check the format; returns (image, None) or (None, error)."""
    try:
        img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError:
        return None, "Image resolution is too big"
    except Exception:  # Pillow raises several types for garbage input
        return None, "Input image format is not valid"
    if img.format not in formats:
        return None, f"Input image format is not valid (expected {', '.join(sorted(formats))})"
    return img, None


def _targets(form: dict[str, tuple[bytes, str | None]], limit: int) -> tuple[int, int] | str:
    """Parse target_width/target_height as integers in 1..limit, or return an error message."""
    values = []
    for name in ("target_width", "target_height"):
        raw = form.get(name, (b"", None))[0].decode("utf-8", "replace").strip()
        if not re.fullmatch(r"\d+", raw) or not 1 <= int(raw) <= limit:
            return f"{name} must be an integer between 1 and {limit}"
        values.append(int(raw))
    return values[0], values[1]


def _route(path: str) -> tuple[str | None, str | None, str]:
    """Map an API path to (endpoint, task_id, expected method)."""
    if path == SYNC_PATH:
        return "sync", None, "POST"
    if path == SUBMIT_PATH:
        return "submit", None, "POST"
    for prefix, name in ((STATUS_PREFIX, "status"), (RESULT_PREFIX, "result")):
        if path.startswith(prefix) and len(path) > len(prefix) and "/" not in path[len(prefix):]:
            return name, path[len(prefix):], "GET"
    return None, None, "GET"


# ---------------------------------------------------------------------------------------
# HTTP plumbing
# ---------------------------------------------------------------------------------------
class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # benchmarks open many connections at once
    fake: FakeClipdrop
    role: str  # "api" | "storage"


class _Handler(BaseHTTPRequestHandler):
    """Thin transport layer: reads the body, asks FakeClipdrop for a _Reply, writes it."""

    protocol_version = "HTTP/1.1"  # keep-alive, so client connection pooling is exercised
    server_version = "FakeClipdrop/1.0"
    timeout = 120  # idle keep-alive sockets eventually free their thread
    # Headers and body go out in separate writes; with Nagle on, the body would wait for
    # the client's delayed ACK (~40 ms per response), which skews latency and benchmarks.
    disable_nagle_algorithm = True
    server: _Server

    def setup(self) -> None:
        super().setup()
        self.server.fake._conn_opened(self.server.role, self.connection)

    def finish(self) -> None:
        try:
            super().finish()
        except OSError:
            pass  # the socket may already be closed by a "reset" fault
        finally:
            self.server.fake._conn_closed(self.connection)

    def version_string(self) -> str:
        return self.server_version  # no Python version in the Server header

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        if self.server.fake.verbose:
            super().log_message(format, *args)

    def do_GET(self) -> None:
        """Every method goes through one dispatcher; routing checks the method."""
        fake = self.server.fake
        try:
            body = self._read_body()
        except (OSError, ValueError):
            self.close_connection = True
            return
        try:
            if self.server.role == "api":
                reply = fake._handle_api(self.command, self.path, self.headers, body)
            else:
                reply = fake._handle_storage(self.command, self.path, self.headers)
        except Exception:  # a bug in the fake must be visible, not a hung client
            fake._errors.append(traceback.format_exc())
            traceback.print_exc()
            reply = _error(500, "fake_clipdrop internal error")
        try:
            self._write(reply)
        except OSError:  # client went away (e.g. it timed out during a "slow" fault)
            self.close_connection = True

    do_POST = do_PUT = do_PATCH = do_DELETE = do_GET

    def _read_body(self) -> bytes:
        """Read the whole request body so the keep-alive stream stays in sync."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                pass  # trailers
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def _write(self, reply: _Reply) -> None:
        if reply.delay > 0:
            time.sleep(reply.delay)
        self.send_response(reply.status)
        self.send_header("Content-Type", reply.content_type)
        self.send_header("Content-Length", str(len(reply.body)))
        for name, value in reply.headers.items():
            self.send_header(name, value)
        self.end_headers()
        if reply.cut is None:
            self.wfile.write(reply.body)
            return
        # Promise len(body) bytes but deliver only half, then break the connection.
        self.wfile.write(reply.body[: len(reply.body) // 2])
        self.close_connection = True
        if reply.cut == "reset":
            time.sleep(0.05)  # let the client read the headers first: a reset *mid-response*
            # SO_LINGER(on, 0) makes close() send a TCP RST instead of a graceful FIN.
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()
        # "truncate": returning with close_connection set closes gracefully (FIN), short body.


# ---------------------------------------------------------------------------------------
# The fake
# ---------------------------------------------------------------------------------------
class FakeClipdrop:
    """Fake Clipdrop API host + storage host.  See the module docstring.

    All constructor options are plain attributes read on every request, so tests may change
    them while the fake runs (e.g. ``fake.latency = 0.5``).
    """

    DEFAULT_KEY = "test-key"

    def __init__(
        self,
        *,
        keys: dict[str, Any] | None = None,
        rpm: float = 60,
        window: float = 60.0,
        retry_after: int | str | None = None,
        latency: float = 0.0,
        sync_latency: float = 0.0,
        async_duration: float = 1.0,
        url_ttl: float = 3600.0,
        task_id_shape: str = "string",
        status_case: str = "lower",
        eta: bool = True,
        fractional_credits: bool = False,
        host: str = "127.0.0.1",
        port: int = 0,
        storage_port: int = 0,
        verbose: bool = False,
    ) -> None:
        """Create (not start) the fake.  ``keys`` maps API key -> credits (default test-key: 100)."""
        if task_id_shape not in ("string", "object"):
            raise ValueError("task_id_shape must be 'string' or 'object'")
        if status_case not in ("lower", "upper"):
            raise ValueError("status_case must be 'lower' or 'upper'")
        if not (retry_after is None or retry_after == "date" or isinstance(retry_after, int)):
            raise ValueError("retry_after must be None, an int or 'date'")
        self.rpm, self.window, self.retry_after = rpm, window, retry_after
        self.latency, self.sync_latency = latency, sync_latency
        self.async_duration, self.url_ttl = async_duration, url_ttl
        self.task_id_shape, self.status_case, self.eta = task_id_shape, status_case, eta
        self.fractional_credits, self.verbose = fractional_credits, verbose
        self.host, self._ports = host, (port, storage_port)
        self.base_url = ""
        self.storage_url = ""

        # One lock guards all mutable state; critical sections are short (no image work).
        self._lock = threading.RLock()
        self._keys: dict[str, Decimal] = {
            k: Decimal(str(v)) for k, v in (keys if keys is not None else {self.DEFAULT_KEY: 100}).items()
        }
        self._revoked: set[str] = set()
        self._rate_log: dict[str, deque[float]] = {}
        self._tasks: dict[str, FakeTask] = {}
        self._records: list[RequestRecord] = []
        self._charged = Decimal(0)
        self._submissions: Counter[str] = Counter()
        self._leaks = 0
        self._n429 = 0
        self._faults: list[_Fault] = []
        self._chaos: tuple[float, list[str], dict[str, Any], random.Random] | None = None
        self._conns: set[socket.socket] = set()
        self._conn_count: Counter[str] = Counter()
        self._errors: list[str] = []
        self._secret = secrets.token_bytes(32)  # URL-signing key, private to the storage host
        self._servers: list[_Server] = []
        self._threads: list[threading.Thread] = []

    # -- lifecycle --------------------------------------------------------------------
    def start(self) -> FakeClipdrop:
        """Bind both servers (port 0 = any free port) and serve them on daemon threads."""
        if self._servers:
            return self
        for role, port in zip(("api", "storage"), self._ports):
            server = _Server((self.host, port), _Handler)
            server.fake, server.role = self, role
            thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02},
                                      name=f"fake-clipdrop-{role}", daemon=True)
            thread.start()
            self._servers.append(server)
            self._threads.append(thread)
        self.base_url = f"http://{self.host}:{self._servers[0].server_address[1]}"
        self.storage_url = f"http://{self.host}:{self._servers[1].server_address[1]}"
        return self

    def stop(self) -> None:
        """Stop serving and drop open keep-alive connections.

        Closing pooled connections matters: otherwise a client's pooled socket would keep
        being answered by its handler thread after stop(), hiding "server went away" bugs.
        """
        # Shut both servers down in parallel: each shutdown() waits up to one poll interval.
        stoppers = [threading.Thread(target=server.shutdown) for server in self._servers]
        for stopper in stoppers:
            stopper.start()
        for stopper in stoppers:
            stopper.join()
        for server in self._servers:
            server.server_close()
        with self._lock:
            conns = list(self._conns)
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for thread in self._threads:
            thread.join(timeout=5)
        self._servers, self._threads = [], []

    def __enter__(self) -> FakeClipdrop:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _conn_opened(self, role: str, conn: socket.socket) -> None:
        with self._lock:
            self._conns.add(conn)
            self._conn_count[role] += 1

    def _conn_closed(self, conn: socket.socket) -> None:
        with self._lock:
            self._conns.discard(conn)

    # -- keys and credits -------------------------------------------------------------
    def add_key(self, key: str, credits: Any = 100) -> None:
        """Add (or un-revoke) a key with the given credit balance."""
        with self._lock:
            self._keys[key] = Decimal(str(credits))
            self._revoked.discard(key)

    def set_credits(self, key: str, credits: Any) -> None:
        """Set a key's balance (adds the key if unknown)."""
        with self._lock:
            self._keys[key] = Decimal(str(credits))

    def revoke(self, key: str) -> None:
        """Revoke a key: the API answers 403 to it from now on."""
        with self._lock:
            self._revoked.add(key)

    def credits(self, key: str = DEFAULT_KEY) -> Decimal:
        """Current balance of a key."""
        with self._lock:
            return self._keys[key]

    def _key_valid(self, key: str | None) -> bool:
        return bool(key) and key in self._keys and key not in self._revoked

    # -- faults -----------------------------------------------------------------------
    def inject(self, endpoint: str, kind: str, times: int = 1, **params: Any) -> None:
        """Queue ``times`` one-shot faults; the next matching requests consume them in order.

        endpoint: "sync" | "submit" | "status" | "result" | "download" | "any".
        params: ``seconds`` for "slow" (default 2.0); ``retry_after`` (None | int | "date")
        for "429".
        """
        if endpoint not in ENDPOINTS + ("any",):
            raise ValueError(f"unknown endpoint {endpoint!r}")
        if kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {kind!r}")
        if kind in _ONLY_ON and endpoint not in (_ONLY_ON[kind], "any"):
            raise ValueError(f"{kind!r} only applies to {_ONLY_ON[kind]!r}")
        with self._lock:
            self._faults.extend(_Fault(endpoint, kind, dict(params)) for _ in range(times))

    def chaos(self, rate: float, kinds: list[str] | tuple[str, ...] | None = None,
              seed: int = 0, **params: Any) -> None:
        """Randomly fault API requests (not downloads) with probability ``rate``.

        Deterministic for a given seed and request order: one random draw per API request.
        ``kinds`` defaults to all kinds; ``rate=0`` turns chaos off.
        """
        kinds = list(kinds) if kinds is not None else sorted(FAULT_KINDS)
        if unknown := set(kinds) - FAULT_KINDS:
            raise ValueError(f"unknown fault kinds {unknown}")
        with self._lock:
            self._chaos = (rate, kinds, dict(params), random.Random(seed)) if rate > 0 else None

    def clear_faults(self) -> None:
        """Drop queued faults and stop chaos mode."""
        with self._lock:
            self._faults.clear()
            self._chaos = None

    def pending_faults(self) -> list[tuple[str, str]]:
        """Queued, not yet consumed faults as (endpoint, kind)."""
        with self._lock:
            return [(f.endpoint, f.kind) for f in self._faults]

    def _take_fault(self, endpoint: str) -> _Fault | None:
        def applies(kind: str) -> bool:
            return _ONLY_ON.get(kind, endpoint) == endpoint

        with self._lock:
            for i, fault in enumerate(self._faults):
                if fault.endpoint in (endpoint, "any") and applies(fault.kind):
                    return self._faults.pop(i)
            if self._chaos and endpoint in API_ENDPOINTS:
                rate, kinds, params, rng = self._chaos
                if rng.random() < rate and (usable := [k for k in kinds if applies(k)]):
                    return _Fault(endpoint, rng.choice(usable), params)
        return None

    def _fault_reply(self, fault: _Fault, endpoint: str, raw_path: str) -> _Reply | None:
        """Reply for faults that reject a request before processing; None = process it."""
        kind = fault.kind
        if kind == "500":
            return _error(500, ERR_500)
        if kind in ("502-html", "413-html"):
            title = "502 Bad Gateway" if kind == "502-html" else "413 Request Entity Too Large"
            return _Reply(int(kind[:3]), _HTML.format(title).encode(), "text/html")
        if kind in ("401", "402", "403"):
            return _error(int(kind), {"401": ERR_NO_KEY, "402": ERR_NO_CREDITS, "403": ERR_BAD_KEY}[kind])
        if kind == "429":
            return _error(429, ERR_RATE, self._retry_after_header(fault.params.get("retry_after"), 1.0))
        if kind == "redirect":
            # Same path on another host: shows whether the client forwards x-api-key.
            return _Reply(302, b"", "text/plain", {"Location": self.storage_url + raw_path})
        if kind in ("reset", "truncate") and endpoint in CHARGING_ENDPOINTS:
            # Cut before any processing: a placeholder body, nothing charged.
            if endpoint == "sync":
                return _Reply(200, b"\xff\xd8\xff\xe0" + bytes(4092), "image/jpeg", cut=kind)
            return _Reply(200, b'{"taskId": "' + b"0" * 4000 + b'"}', "application/json", cut=kind)
        return None

    @staticmethod
    def _after_fault(fault: _Fault, reply: _Reply) -> _Reply:
        """Apply faults that act on an already processed (maybe charged) response."""
        if fault.kind == "slow":
            reply.delay += float(fault.params.get("seconds", 2.0))
        elif fault.kind in ("reset", "reset-after-charge", "truncate", "truncate-after-charge"):
            reply.cut = fault.kind.split("-")[0]
        return reply

    # -- rate limiting ----------------------------------------------------------------
    def _allowed_per_window(self) -> int:
        return max(1, math.floor(self.rpm * self.window / 60))

    @staticmethod
    def _retry_after_header(mode: int | str | None, wait: float) -> dict[str, str]:
        if mode is None:
            return {}
        if mode == "date":  # HTTP-date form, rounded up so waiting until then is enough
            return {"Retry-After": formatdate(math.ceil(time.time() + max(wait, 1.0)), usegmt=True)}
        return {"Retry-After": str(int(mode))}

    def _rate_check(self, key: str, now: float) -> _Reply | None:
        """Sliding-window log per key; only accepted calls occupy the window."""
        with self._lock:
            log = self._rate_log.setdefault(key, deque())
            while log and log[0] <= now - self.window:
                log.popleft()
            if len(log) >= self._allowed_per_window():
                wait = log[0] + self.window - now
                return _error(429, ERR_RATE, self._retry_after_header(self.retry_after, wait))
            log.append(now)
        return None

    # -- request handling: API host ---------------------------------------------------
    def _handle_api(self, method: str, raw_path: str, headers: Message, body: bytes) -> _Reply:
        now = time.time()
        endpoint, task_id, expected = _route(urlsplit(raw_path).path)
        api_key = headers.get("x-api-key")
        ctx, fault = _Ctx(task_id=task_id), None
        if endpoint is None:
            reply = _error(404, "Not found")
        elif method != expected:
            reply = _error(405, f"Method {method} not allowed")
        else:
            fault = self._take_fault(endpoint)
            reply = self._fault_reply(fault, endpoint, raw_path) if fault else None
            if reply is None:
                reply = self._serve_api(endpoint, api_key, headers, body, fault, ctx, now)
                if fault:
                    reply = self._after_fault(fault, reply)
        reply.delay += self.latency + (self.sync_latency if endpoint == "sync" else 0.0)
        self._record(now, method, endpoint or "unknown", reply.status, api_key, raw_path, fault, ctx)
        return reply

    def _serve_api(self, endpoint: str, api_key: str | None, headers: Message, body: bytes,
                   fault: _Fault | None, ctx: _Ctx, now: float) -> _Reply:
        # Order of checks: 401 missing key, 403 bad key, 429 rate, then endpoint logic.
        if not api_key:
            return _error(401, ERR_NO_KEY)
        with self._lock:
            if not self._key_valid(api_key):
                return _error(403, ERR_BAD_KEY)
        if limited := self._rate_check(api_key, now):
            return limited
        if endpoint in CHARGING_ENDPOINTS:
            with self._lock:
                # An empty balance is refused before even looking at the upload.
                if self._keys[api_key] <= 0:
                    return _error(402, ERR_NO_CREDITS)
            form = parse_multipart(headers.get("Content-Type", ""), body)
            if form is None:
                return _error(400, "Request body must be multipart/form-data")
            if "image_file" not in form:
                return _error(400, "Missing image_file in request")
            image = form["image_file"][0]
            ctx.sha = hashlib.sha256(image).hexdigest()
            if len(image) > MAX_FILE_BYTES:
                return _error(400, f"Image file is too large (max {MAX_FILE_BYTES} bytes)")
            if endpoint == "sync":
                return self._sync(api_key, form, image, ctx)
            return self._submit(api_key, form, image, ctx, now, bool(fault and fault.kind == "task-fail"))
        with self._lock:
            task = self._tasks.get(ctx.task_id or "")
            if task is None or task.key != api_key:  # other keys' tasks are invisible
                return _error(404, "Task not found")
            state = task.state(now)
            position = sum(1 for t in self._tasks.values()
                           if t.created < task.created and t.state(now) == "queued")
        if endpoint == "status":
            payload: dict[str, Any] = {"status": state.upper() if self.status_case == "upper" else state}
            if state == "queued":
                payload["position"] = position
                if self.eta:
                    payload["eta"] = int(task.ready_at * 1000)
            return _json(200, payload)
        if state == "queued":
            return _error(400, "Task is not completed yet")
        if state == "failed":
            return _error(404, "Task failed, no result available")
        expired = bool(fault and fault.kind == "expired-url")
        expires = int(now) - 60 if expired else int(now + self.url_ttl)
        name = f"/results/{task.id}.{task.ext}"
        url = f"{self.storage_url}{name}?expires={expires}&signature={self._sign(name, expires)}"
        return _json(200, {"downloadUrl": url})

    def _charge(self, key: str, cost: Decimal, ctx: _Ctx) -> dict[str, str] | None:
        """Atomically debit ``cost``; returns the credit headers, or None if short of credits."""
        with self._lock:
            if self._keys[key] < cost:
                return None
            self._keys[key] -= cost
            self._charged += cost
            self._submissions[ctx.sha or ""] += 1
            ctx.charged = cost
            remaining = self._keys[key]
        frac = self.fractional_credits
        return {"x-remaining-credits": format_credits(remaining, frac),
                "x-credits-consumed": format_credits(cost, frac)}

    def _sync(self, key: str, form: dict[str, tuple[bytes, str | None]], image: bytes, ctx: _Ctx) -> _Reply:
        targets = _targets(form, SYNC_MAX_TARGET)
        if isinstance(targets, str):
            return _error(400, targets)
        img, err = _open_image(image, {"PNG", "JPEG", "WEBP"})
        if img is None:
            return _error(400, err or "")
        if img.width * img.height > SYNC_MAX_PIXELS:
            return _error(400, f"Image resolution is too big (max {SYNC_MAX_PIXELS} pixels)")
        try:
            img.load()  # a valid header with a corrupt body is still a bad input
        except Exception:
            return _error(400, "Input image could not be decoded")
        credit_headers = self._charge(key, Decimal(1), ctx)
        if credit_headers is None:
            return _error(402, "Not enough credits for this request")
        fmt = "WEBP" if _has_alpha(img) else "JPEG"
        data = _render(img, targets[0], targets[1], fmt)
        return _Reply(200, data, f"image/{fmt.lower()}", credit_headers)

    def _submit(self, key: str, form: dict[str, tuple[bytes, str | None]], image: bytes,
                ctx: _Ctx, now: float, fail: bool) -> _Reply:
        targets = _targets(form, ASYNC_MAX_TARGET)
        if isinstance(targets, str):
            return _error(400, targets)
        strategy = form.get("strategy", (b"", None))[0].decode("utf-8", "replace").strip()
        if strategy not in ("smooth", "detailed"):
            return _error(400, "strategy must be 'smooth' or 'detailed'")
        img, err = _open_image(image, {"PNG", "JPEG"})
        if img is None:
            return _error(400, err or "")
        if max(img.size) > ASYNC_MAX_SIDE:
            return _error(400, f"Image dimensions are too big (max {ASYNC_MAX_SIDE} px per side)")
        # Only the header is read here; the image is decoded lazily at download time.
        cost = Decimal(1) if strategy == "smooth" else detailed_cost(*targets)
        credit_headers = self._charge(key, cost, ctx)
        if credit_headers is None:
            return _error(402, "Not enough credits for this request")
        task = FakeTask(id=str(uuid.uuid4()), key=key, created=now, ready_at=now + self.async_duration,
                        width=targets[0], height=targets[1], strategy=strategy,
                        has_alpha=_has_alpha(img), fail=fail, cost=cost, image=image)
        with self._lock:
            self._tasks[task.id] = task
        ctx.task_id = task.id
        task_id: Any = {"value": task.id} if self.task_id_shape == "object" else task.id
        return _json(200, {"taskId": task_id}, credit_headers)

    # -- request handling: storage host -----------------------------------------------
    def _sign(self, name: str, expires: int) -> str:
        return hmac.new(self._secret, f"{name}\n{expires}".encode(), hashlib.sha256).hexdigest()

    def _handle_storage(self, method: str, raw_path: str, headers: Message) -> _Reply:
        now = time.time()
        split = urlsplit(raw_path)
        api_key = headers.get("x-api-key")
        match = re.fullmatch(r"/results/([0-9A-Za-z-]+)\.(png|jpg)", split.path)
        ctx = _Ctx(task_id=match.group(1) if match else None)
        fault = self._take_fault("download")
        reply = self._fault_reply(fault, "download", raw_path) if fault else None
        if reply is None:
            reply = self._download(method, split.path, split.query, match, now)
            if fault:
                reply = self._after_fault(fault, reply)
        self._record(now, method, "download", reply.status, api_key, raw_path, fault, ctx)
        return reply

    def _download(self, method: str, path: str, query: str, match: re.Match[str] | None,
                  now: float) -> _Reply:
        if method != "GET":
            return _s3_error(405, "MethodNotAllowed", "The specified method is not allowed")
        if match is None:
            return _s3_error(404, "NoSuchKey", "The specified key does not exist.")
        params = parse_qs(query)
        expires, signature = params.get("expires", [""])[0], params.get("signature", [""])[0]
        if not expires.isdigit() or not signature:
            return _s3_error(403, "AccessDenied", "Query-string authentication requires expires and signature")
        if not hmac.compare_digest(signature, self._sign(path, int(expires))):
            return _s3_error(403, "SignatureDoesNotMatch", "The request signature we calculated does not match")
        if now >= int(expires):
            return _s3_error(403, "AccessDenied", "Request has expired")
        with self._lock:
            task = self._tasks.get(match.group(1))
        if task is None or task.state(now) != "completed":
            return _s3_error(404, "NoSuchKey", "The specified key does not exist.")
        if task.result is None:  # rendered once, lazily; a racing duplicate render is harmless
            img = Image.open(io.BytesIO(task.image))
            task.result = _render(img, task.width, task.height, "PNG" if task.has_alpha else "JPEG")
        return _Reply(200, task.result, "image/png" if task.has_alpha else "image/jpeg")

    # -- records and counters ---------------------------------------------------------
    def _record(self, now: float, method: str, endpoint: str, status: int, api_key: str | None,
                path: str, fault: _Fault | None, ctx: _Ctx) -> None:
        with self._lock:
            self._records.append(RequestRecord(
                time=now, method=method, endpoint=endpoint, status=status,
                key_ok=self._key_valid(api_key), task_id=ctx.task_id, api_key=api_key, path=path,
                fault=fault.kind if fault else None, charged=ctx.charged, image_sha256=ctx.sha))
            if status == 429:
                self._n429 += 1
            if endpoint == "download" and api_key is not None:
                self._leaks += 1

    @property
    def records(self) -> list[RequestRecord]:
        """A copy of all request records, in arrival order."""
        with self._lock:
            return list(self._records)

    def calls(self, endpoint: str | None = None, status: int | None = None) -> list[RequestRecord]:
        """Records, optionally filtered by endpoint name and/or status code."""
        return [r for r in self.records
                if (endpoint is None or r.endpoint == endpoint) and (status is None or r.status == status)]

    def charged(self) -> Decimal:
        """Total credits charged across all keys."""
        with self._lock:
            return self._charged

    def leaks(self) -> int:
        """Number of storage-host requests that carried an x-api-key header."""
        with self._lock:
            return self._leaks

    def rate_limited(self) -> int:
        """Number of 429 responses sent (rate limiter and injected)."""
        with self._lock:
            return self._n429

    def submissions(self) -> dict[str, int]:
        """Charged submissions (sync + async) per sha256 hex of the uploaded image."""
        with self._lock:
            return dict(self._submissions)

    def paid_twice(self) -> dict[str, int]:
        """Images (sha256 hex) that were charged more than once."""
        return {sha: n for sha, n in self.submissions().items() if n > 1}

    def connections(self, role: str = "api") -> int:
        """TCP connections accepted so far by the "api" or "storage" server (pooling check)."""
        with self._lock:
            return self._conn_count[role]

    def errors(self) -> list[str]:
        """Tracebacks of bugs inside the fake itself (should stay empty)."""
        return list(self._errors)

    def task(self, task_id: str) -> FakeTask:
        """The task with this id (KeyError if unknown)."""
        with self._lock:
            return self._tasks[task_id]

    def tasks(self) -> list[FakeTask]:
        """All tasks, in submission order."""
        with self._lock:
            return list(self._tasks.values())

    def complete_now(self, task_id: str | None = None) -> None:
        """Make one task (or every task) finish immediately, to skip async_duration."""
        with self._lock:
            for task in self._tasks.values():
                if task_id is None or task.id == task_id:
                    task.ready_at = min(task.ready_at, time.time())


# ---------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    """Serve until SIGINT/SIGTERM; prints the API base URL as the first stdout line."""
    parser = argparse.ArgumentParser(prog="python -m tests.fake_clipdrop", description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0, help="API port (0 = any free port)")
    parser.add_argument("--storage-port", type=int, default=0, help="storage host port")
    parser.add_argument("--key", default=FakeClipdrop.DEFAULT_KEY)
    parser.add_argument("--credits", default="100")
    parser.add_argument("--latency", type=float, default=0.0)
    parser.add_argument("--sync-latency", type=float, default=0.0)
    parser.add_argument("--rpm", type=float, default=60)
    parser.add_argument("--window", type=float, default=60.0)
    parser.add_argument("--async-duration", type=float, default=1.0)
    parser.add_argument("--verbose", action="store_true", help="log every request to stderr")
    args = parser.parse_args(argv)

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    fake = FakeClipdrop(keys={args.key: Decimal(args.credits)}, port=args.port, storage_port=args.storage_port,
                        latency=args.latency, sync_latency=args.sync_latency, rpm=args.rpm,
                        window=args.window, async_duration=args.async_duration, verbose=args.verbose)
    with fake:
        print(fake.base_url, flush=True)
        print(f"storage host: {fake.storage_url}", file=sys.stderr, flush=True)
        while not stop.wait(0.2):  # a timed wait keeps the main thread responsive to signals
            pass
    print(f"charged {fake.charged()} credits in {len(fake.records)} requests", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
