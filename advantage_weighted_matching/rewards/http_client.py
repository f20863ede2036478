"""Bounded JSON-over-HTTP client for remote rewards (``deqa``, ``unifiedreward``, remote ``geneval``).

A reward server can hang, drip bytes, send a huge body, answer 500 while it
restarts, or return garbage. ``BoundedJsonClient.post`` bounds all of that:

* **total deadline** per call (``timeout_s``, retries and backoff included):
  the socket is shut down when the deadline passes, so a server that keeps
  sending one byte a second cannot hold the trainer;
* **reply size cap** (``max_bytes``): a larger ``Content-Length`` is refused
  unread, a body without one is read up to the cap and refused beyond it;
* **retry with exponential backoff** (``backoff_s``, doubled each time, never
  past the deadline) on connection errors, timeouts, HTTP 5xx and 429, at most
  ``retries`` times; a 4xx or a reply that is not JSON is not retried (asking
  again gives the same answer);
* ``RemoteRewardError`` with the URL and the reason when it gives up.

Checking every score's type and range is the caller's job; ``checked_score``
does one value. ``serve_json`` runs a small threaded JSON server on
127.0.0.1, used by the tests and handy to put a model behind this protocol.

Only the standard library is imported: the rewards package stays light.
"""

import http.client
import json
import logging
import math
import socket
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 600.0  # total per call, retries included
DEFAULT_RETRIES = 3
DEFAULT_BACKOFF_S = 1.0  # first retry delay; doubled after each failed attempt
DEFAULT_MAX_REPLY_BYTES = 16 * 2**20  # a batch of scores or one judge answer is a few kB
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})


class RemoteRewardError(RuntimeError):
    """No usable reply. ``retry`` says whether asking again may help."""

    def __init__(self, message, retry=False):
        super().__init__(message)
        self.retry = retry


def _shut_down(held):
    """Wake a read blocked on the held socket (the deadline watchdog). The socket is held
    from connect on: http.client drops ``connection.sock`` once the response owns it."""
    if held:
        try:
            held[0].shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def post_json(url, payload, deadline, max_bytes=DEFAULT_MAX_REPLY_BYTES, headers=None):
    """One POST of ``payload`` (JSON-serialisable) to ``url``, finished before
    ``deadline`` (a ``time.monotonic()`` value). Returns the decoded JSON reply;
    raises ``RemoteRewardError`` (``retry`` set for transient failures)."""
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise RemoteRewardError(f"{url}: deadline passed before the request was sent")
    parts = urllib.parse.urlsplit(url)
    body = json.dumps(payload).encode("utf-8")
    connection_class = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    connection = connection_class(parts.hostname, parts.port, timeout=remaining)
    held = []
    watchdog = threading.Timer(remaining, _shut_down, [held])
    watchdog.daemon = True
    watchdog.start()
    try:
        connection.connect()  # bounded by the socket timeout = the time left
        held.append(connection.sock)
        if time.monotonic() >= deadline:  # the watchdog may have fired while connecting
            raise TimeoutError("connected only at the deadline")
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        connection.request("POST", path, body=body,
                           headers={"Content-Type": "application/json", **(headers or {})})
        response = connection.getresponse()
        declared = response.getheader("Content-Length")
        if declared is not None and declared.strip().isdigit() and int(declared) > max_bytes:
            raise RemoteRewardError(f"{url}: reply of {int(declared)} bytes exceeds {max_bytes} bytes (the cap)")
        data = response.read(max_bytes + 1)
        status = response.status
    except (OSError, http.client.HTTPException) as error:
        if time.monotonic() >= deadline - 1e-3:
            raise RemoteRewardError(f"{url}: no complete reply before the deadline ({error!r})") from None
        raise RemoteRewardError(f"{url}: {error!r}", retry=True) from None
    finally:
        watchdog.cancel()
        connection.close()
    if len(data) > max_bytes:
        raise RemoteRewardError(f"{url}: reply exceeds {max_bytes} bytes (the cap)")
    if time.monotonic() > deadline:
        raise RemoteRewardError(f"{url}: no complete reply before the deadline")
    if status != 200:
        raise RemoteRewardError(f"{url}: HTTP {status}: {data[:200]!r}", retry=status in RETRY_STATUSES)
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as error:
        raise RemoteRewardError(f"{url}: reply is not JSON ({error}): {data[:200]!r}") from None


class BoundedJsonClient:
    """``client.post(payload) -> reply`` with a total deadline, a size cap and
    retries with backoff (module docstring)."""

    def __init__(self, url, timeout_s=DEFAULT_TIMEOUT_S, retries=DEFAULT_RETRIES, backoff_s=DEFAULT_BACKOFF_S,
                 max_bytes=DEFAULT_MAX_REPLY_BYTES, headers=None):
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise ValueError(f"reward server URL must start with http:// or https://, got {url!r}")
        if not (timeout_s > 0 and retries >= 0 and backoff_s >= 0 and max_bytes >= 1):
            raise ValueError(f"bad client limits: timeout_s={timeout_s}, retries={retries}, backoff_s={backoff_s}, "
                             f"max_bytes={max_bytes}")
        self.url, self.timeout_s, self.retries = url, float(timeout_s), int(retries)
        self.backoff_s, self.max_bytes, self.headers = float(backoff_s), int(max_bytes), dict(headers or {})

    def post(self, payload, deadline=None):
        """POST ``payload``; the whole call, retries included, ends by ``deadline``
        (default: now + ``timeout_s``). Returns the JSON reply or raises RemoteRewardError."""
        deadline = time.monotonic() + self.timeout_s if deadline is None else deadline
        delay = self.backoff_s
        for attempt in range(self.retries + 1):
            try:
                return post_json(self.url, payload, deadline, self.max_bytes, self.headers)
            except RemoteRewardError as error:
                wait = min(delay, deadline - time.monotonic())
                if not error.retry or attempt == self.retries or wait <= 0:
                    raise
                logger.warning("%s; retry %d of %d in %.1f s", error, attempt + 1, self.retries, wait)
                time.sleep(wait)
                delay *= 2
        raise AssertionError("unreachable")


def checked_score(value, low, high):
    """``float(value)`` when it is a finite real number (not a bool) in [low, high], else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    if not math.isfinite(value) or not low <= value <= high:
        return None
    return value


def serve_json(handle, host="127.0.0.1", port=0):
    """Threaded HTTP server: every POST body is decoded as JSON and passed to
    ``handle(path, payload) -> reply``; the reply is sent as JSON (HTTP 200), an
    exception as ``{"error": ...}`` with HTTP 500. Returns the running server
    (``server.server_address[1]`` is the port; ``server.shutdown()`` stops it)."""

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - http.server naming
            try:
                length = int(self.headers.get("Content-Length", 0))
                reply, status = handle(self.path, json.loads(self.rfile.read(length).decode("utf-8"))), 200
            except Exception as error:  # noqa: BLE001 - report to the client instead of dying
                logger.warning("reward server error: %r", error)
                reply, status = {"error": repr(error)}, 500
            data = json.dumps(reply).encode("utf-8")
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format, *args):  # noqa: A002 - quiet server
            logger.debug(format, *args)

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server
