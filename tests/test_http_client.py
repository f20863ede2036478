"""The bounded JSON client of the remote rewards (rewards/http_client.py) against
local http.server instances on 127.0.0.1: deadline, size cap, retries with
backoff, no retry where asking again cannot help."""

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from advantage_weighted_matching.rewards.http_client import (
    BoundedJsonClient, RemoteRewardError, checked_score, serve_json,
)


class ScriptedServer:
    """A server whose n-th POST is answered by ``script[min(n, len - 1)](handler)``; records request bodies."""

    def __init__(self, *script):
        self.script, self.bodies, self.times = script, [], []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                outer.times.append(time.monotonic())
                outer.bodies.append(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                step = outer.script[min(len(outer.bodies) - 1, len(outer.script) - 1)]
                try:
                    step(self)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/score"

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def reply(status, body, content_length=True):
    def step(handler):
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        handler.send_response(status)
        if content_length:
            handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data)
        handler.wfile.flush()

    return step


def drip(seconds, interval=0.1):
    """Send a 200 with a large Content-Length, then one byte every ``interval`` for ``seconds``."""

    def step(handler):
        handler.send_response(200)
        handler.send_header("Content-Length", "100000")
        handler.end_headers()
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            handler.wfile.write(b" ")
            handler.wfile.flush()
            time.sleep(interval)

    return step


@pytest.fixture
def servers():
    started = []

    def start(*script):
        started.append(ScriptedServer(*script))
        return started[-1]

    yield start
    for server in started:
        server.close()


def test_post_returns_the_json_reply_and_sends_json(servers):
    server = servers(reply(200, {"outputs": [0.5, 1.0]}))
    client = BoundedJsonClient(server.url, timeout_s=5, headers={"Authorization": "Bearer k"})
    assert client.post({"images": ["abc"]}) == {"outputs": [0.5, 1.0]}
    assert json.loads(server.bodies[0]) == {"images": ["abc"]}


def test_5xx_and_429_are_retried_with_doubling_backoff(servers):
    server = servers(reply(500, b"restarting"), reply(429, b"slow down"), reply(200, {"ok": 1}))
    client = BoundedJsonClient(server.url, timeout_s=10, retries=3, backoff_s=0.2)
    assert client.post({}) == {"ok": 1}
    assert len(server.bodies) == 3
    gaps = [later - earlier for earlier, later in zip(server.times, server.times[1:])]
    assert 0.18 <= gaps[0] < 0.35 and 0.38 <= gaps[1] < 0.6  # 0.2 s, then 0.4 s


def test_retries_run_out(servers):
    server = servers(reply(503, b"down"))
    client = BoundedJsonClient(server.url, timeout_s=10, retries=2, backoff_s=0.01)
    with pytest.raises(RemoteRewardError, match="HTTP 503"):
        client.post({})
    assert len(server.bodies) == 3  # first try + 2 retries


@pytest.mark.parametrize("step, message", [
    (reply(400, b"bad request"), "HTTP 400"),
    (reply(200, b"<html>not json</html>"), "not JSON"),
])
def test_client_errors_and_garbage_are_not_retried(servers, step, message):
    server = servers(step)
    client = BoundedJsonClient(server.url, timeout_s=10, retries=3, backoff_s=0.01)
    with pytest.raises(RemoteRewardError, match=message) as error:
        client.post({})
    assert not error.value.retry and len(server.bodies) == 1


def test_a_dripping_server_cannot_outlast_the_deadline(servers):
    server = servers(drip(seconds=5))
    client = BoundedJsonClient(server.url, timeout_s=0.8, retries=3, backoff_s=0.01)
    start = time.monotonic()
    with pytest.raises(RemoteRewardError, match="deadline"):
        client.post({})
    assert time.monotonic() - start < 1.5  # total deadline, though every byte came within any per-read timeout


def test_oversized_replies_are_refused(servers):
    big = {"outputs": [0.5] * 1000}  # about 6 kB
    declared = servers(reply(200, big))
    with pytest.raises(RemoteRewardError, match="exceeds 1000 bytes"):
        BoundedJsonClient(declared.url, timeout_s=5, max_bytes=1000).post({})
    undeclared = servers(reply(200, big, content_length=False))  # body ends when the server closes
    with pytest.raises(RemoteRewardError, match="exceeds 1000 bytes"):
        BoundedJsonClient(undeclared.url, timeout_s=5, max_bytes=1000).post({})


def test_connection_refused_is_retried_then_reported():
    with socket.socket() as probe:  # a port with no listener
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    client = BoundedJsonClient(f"http://127.0.0.1:{port}/", timeout_s=5, retries=2, backoff_s=0.05)
    start = time.monotonic()
    with pytest.raises(RemoteRewardError, match="Connection refused|ConnectionRefused"):
        client.post({})
    assert 0.14 <= time.monotonic() - start < 2  # backoff 0.05 + 0.1 before giving up


def test_bad_urls_and_limits_raise_at_construction():
    with pytest.raises(ValueError, match="http"):
        BoundedJsonClient("127.0.0.1:18086")
    with pytest.raises(ValueError, match="limits"):
        BoundedJsonClient("http://127.0.0.1:1/", timeout_s=0)


@pytest.mark.parametrize("value, expected", [
    (0.5, 0.5), (1, 1.0), (0, 0.0), (1.0000001, None), (-0.1, None), (float("nan"), None), (float("inf"), None),
    (True, None), ("0.5", None), (None, None), ([0.5], None),
])
def test_checked_score(value, expected):
    assert checked_score(value, 0.0, 1.0) == expected


def test_serve_json_round_trip_and_error_status():
    def handle(path, payload):
        if payload.get("boom"):
            raise RuntimeError("model crashed")
        return {"path": path, "echo": payload}

    server = serve_json(handle)
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/v1/x"
        assert BoundedJsonClient(url, timeout_s=5).post({"a": 1}) == {"path": "/v1/x", "echo": {"a": 1}}
        with pytest.raises(RemoteRewardError, match="HTTP 500.*model crashed"):
            BoundedJsonClient(url, timeout_s=5, retries=0).post({"boom": True})
    finally:
        server.shutdown()
