"""Bad rewards cost images, not runs; a reward outage stops the run with a checkpoint (issue J.5-7).

* a NaN / inf score is that image's failure (scored 0, counted), from any reward,
  the brightness reward and the remote GenEval client included;
* the remote GenEval client: a total deadline per call (a server that drips one
  byte at a time cannot hold it), a reply size cap, type and range checks of
  every entry, retries with backoff;
* the trainer stops with one clear message after `rewards.max_failed_epochs`
  epochs in a row with `rewards.max_failure_fraction` of the reward calls failing,
  after saving a checkpoint.
"""

import json
import math
import os
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch

from advantage_weighted_matching import rewards
from advantage_weighted_matching.rewards import multi_score
from advantage_weighted_matching.rewards.remote_geneval import RemoteGenevalClient, RemoteGenevalError
from advantage_weighted_matching.stopping import RewardOutage, TrainingHalted
from test_train_e2e import run_training

METADATA = [{"tag": "single_object", "include": [{"class": "cat", "count": 1}], "prompt": "a photo of a cat"}] * 4


def _nan_for_first_image(device, reward_config):
    def score(images, prompts, metadata, only_strict=True):
        scores = images.float().mean(dim=(1, 2, 3)).numpy().astype(np.float64)
        scores[0] = math.nan
        return scores, {"num_failures": 0}

    return score


def test_multi_score_counts_non_finite_scores_as_failures(monkeypatch):
    monkeypatch.setitem(rewards.REWARDS, "jpeg_compressibility", _nan_for_first_image)
    fn = multi_score("cpu", {"jpeg_compressibility": 1.0, "brightness": 0.5})
    images = torch.full((3, 3, 8, 8), 0.5)
    result, info = fn(images, ["a"] * 3, [{}] * 3)
    np.testing.assert_array_equal(result["jpeg_compressibility"], [0.0, 0.5, 0.5])
    np.testing.assert_allclose(result["avg"], [0.25, 0.75, 0.75])
    assert info["num_failures"] == 1


def test_brightness_of_a_nan_image_is_a_failure():
    fn = multi_score("cpu", {"brightness": 1.0})
    images = torch.full((3, 3, 8, 8), 0.25)
    images[1, 0, 2, 2] = math.nan
    images[2, 1, 0, 0] = math.inf  # clamped into [0, 1]: a finite score, not a failure
    result, info = fn(images, ["a"] * 3, [{}] * 3)
    assert info["num_failures"] == 1
    assert result["brightness"][1] == 0.0 and np.all(np.isfinite(result["avg"]))
    scorer = rewards.REWARDS["brightness"]("cpu", None)  # the scorer itself counts it
    assert scorer(images, ["a"] * 3, [{}] * 3)[1]["num_failures"] == 1


def test_trainer_survives_a_nan_reward_and_counts_it(tmp_path, tiny_sd3_dir, monkeypatch):
    monkeypatch.setitem(rewards.REWARDS, "jpeg_compressibility", _nan_for_first_image)
    metrics = run_training(tmp_path / "run", tiny_sd3_dir, "--config.num_epochs=1", "--config.eval_freq=0",
                           "--config.log_image_freq=0")
    assert metrics[0]["reward/num_failures"] == 2  # first image of each of the 2 rollout batches
    assert math.isfinite(metrics[0]["reward/avg"]) and math.isfinite(metrics[0]["train/loss"])
    assert metrics[0]["global_step"] == 1


# ---------------------------------------------------------------- remote GenEval client


class ReplyServer:
    """A local HTTP server answering every POST with `handler(request_index) -> (status, body bytes)`."""

    def __init__(self, handler):
        self.calls = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                outer.calls += 1
                status, body = handler(outer.calls)
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/score"

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def _reply(**fields):
    reply = {"scores": [0.5] * 4, "strict_correct": [False] * 4, "correct": [False] * 4}
    reply.update(fields)
    return 200, json.dumps(reply).encode()  # json.dumps writes NaN / Infinity as such


@pytest.mark.parametrize("fields, bad", [
    ({"scores": [0.5, math.nan, math.inf, -math.inf]}, [1, 2, 3]),
    ({"scores": [0.5, "0.7", None, True]}, [1, 2, 3]),
    ({"scores": [1.5, -20.0, -14.0, 1.0]}, [0, 1]),  # strict scores lie in [-14, 1]
    ({"strict_correct": [True, "yes", 2, None]}, [1, 2, 3]),
    ({"correct": [0, 1, 0.5, False]}, [2]),
    ({"failed": [False, "no", True, False], "scores": [0.5, 0.5, math.nan, 0.5]}, [1, 2]),
])
def test_remote_reply_entries_are_type_and_range_checked(fields, bad):
    server = ReplyServer(lambda call: _reply(**fields))
    try:
        fn = multi_score("cpu", {"geneval": 1.0}, {"remote_geneval_url": server.url})
        result, info = fn(torch.zeros(4, 3, 8, 8), ["a"] * 4, METADATA, only_strict=False)
    finally:
        server.close()
    assert info["num_failures"] == len(bad)
    assert np.all(np.isfinite(result["avg"]))
    good = [i for i in range(4) if i not in bad]
    np.testing.assert_array_equal(result["geneval"][bad], 0.0)
    assert np.all(result["geneval"][good] == [float(([0.5] * 4 if "scores" not in fields else fields["scores"])[i])
                                              for i in good])


@pytest.mark.parametrize("body", [b'{"scores": [0.5, 0.5]}', b"[1, 2, 3]", b"not json"])
def test_remote_reply_of_the_wrong_shape_fails_the_batch(body):
    server = ReplyServer(lambda call: (200, body))
    try:
        fn = multi_score("cpu", {"geneval": 1.0}, {"remote_geneval_url": server.url})
        result, info = fn(torch.zeros(4, 3, 8, 8), ["a"] * 4, METADATA)
    finally:
        server.close()
    assert info["num_failures"] == 4 and np.all(result["avg"] == 0)


def test_remote_client_retries_with_backoff():
    server = ReplyServer(lambda call: (500, b'{"error": "busy"}') if call < 3 else _reply())
    try:
        client = RemoteGenevalClient(server.url, timeout_s=30, retries=3, backoff_s=0.2)
        start = time.monotonic()
        scores, info = client.score_batch(torch.zeros(4, 3, 8, 8), METADATA)
        elapsed = time.monotonic() - start
    finally:
        server.close()
    assert server.calls == 3 and info["num_failures"] == 0
    np.testing.assert_array_equal(scores, [0.5] * 4)
    assert 0.2 + 0.4 <= elapsed < 10  # slept 0.2 s, then 0.4 s


def test_remote_client_gives_up_after_its_retries_and_not_on_client_errors():
    server = ReplyServer(lambda call: (503, b"{}"))
    try:
        with pytest.raises(RemoteGenevalError, match="HTTP 503"):
            RemoteGenevalClient(server.url, retries=2, backoff_s=0.01).score_batch(torch.zeros(4, 3, 8, 8), METADATA)
        assert server.calls == 3
    finally:
        server.close()
    server = ReplyServer(lambda call: (400, b'{"error": "bad request"}'))
    try:
        with pytest.raises(RemoteGenevalError, match="HTTP 400"):
            RemoteGenevalClient(server.url, retries=3, backoff_s=0.01).score_batch(torch.zeros(4, 3, 8, 8), METADATA)
        assert server.calls == 1
    finally:
        server.close()


class RawServer:
    """A TCP server that reads a request and runs `respond(connection)` (misbehaving servers)."""

    def __init__(self, respond):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(4)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/"
        self.stop = threading.Event()

        def serve():
            while not self.stop.is_set():
                try:
                    connection, _ = self.sock.accept()
                except OSError:
                    return
                with connection:
                    connection.settimeout(10)
                    data = b""
                    while b"\r\n\r\n" not in data:
                        data += connection.recv(65536)
                    head, body = data.split(b"\r\n\r\n", 1)
                    length = int([line.split(b":")[1] for line in head.split(b"\r\n")
                                  if line.lower().startswith(b"content-length")][0])
                    while len(body) < length:
                        body += connection.recv(65536)
                    try:
                        respond(connection, self.stop)
                    except OSError:
                        pass

        threading.Thread(target=serve, daemon=True).start()

    def close(self):
        self.stop.set()
        self.sock.close()


def _drip(connection, stop):
    """Valid headers, then one byte of the body every 0.5 s: each read succeeds quickly."""
    body = json.dumps({"scores": [0.5] * 4, "strict_correct": [False] * 4, "correct": [False] * 4}).encode()
    connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
                       + str(len(body)).encode() + b"\r\n\r\n")
    for byte in body:
        if stop.wait(0.5):
            return
        connection.sendall(bytes([byte]))


def test_remote_call_has_a_total_deadline_against_a_dripping_server():
    server = RawServer(_drip)
    try:
        fn = multi_score("cpu", {"geneval": 1.0}, {"remote_geneval_url": server.url, "remote_geneval_timeout_s": 2.0})
        start = time.monotonic()
        result, info = fn(torch.zeros(4, 3, 8, 8), ["a"] * 4, METADATA)
        elapsed = time.monotonic() - start
    finally:
        server.close()
    assert elapsed < 4, f"the call took {elapsed:.1f} s despite a 2 s deadline"
    assert info["num_failures"] == 4 and np.all(result["avg"] == 0)


@pytest.mark.parametrize("declare_length", [True, False])
def test_remote_reply_size_is_capped(declare_length):
    def huge(connection, stop):
        head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
        head += b"Content-Length: 300000000\r\n\r\n" if declare_length else b"Connection: close\r\n\r\n"
        connection.sendall(head + b'{"scores": [' + b"0.5, " * 200_000)  # 1 MB, then hangs up
        stop.wait(1)

    server = RawServer(huge)
    try:
        client = RemoteGenevalClient(server.url, timeout_s=30, retries=0, max_bytes=64 * 1024)
        start = time.monotonic()
        with pytest.raises(RemoteGenevalError, match="exceeds 65536"):
            client.score_batch(torch.zeros(4, 3, 8, 8), METADATA)
        assert time.monotonic() - start < 5
    finally:
        server.close()


# ---------------------------------------------------------------- reward outage


def test_reward_outage_counts_epochs_in_a_row():
    outage = RewardOutage(max_fraction=0.5, max_epochs=2)
    assert outage.update(4, 16) is None  # 25 %
    assert outage.update(8, 16) is None  # 50 %: first failed epoch
    assert outage.update(0, 16) is None  # recovered: the streak restarts
    assert outage.update(16, 16) is None
    reason = outage.update(9, 16)
    assert reason and "2 epoch(s) in a row" in reason and "9 of 16" in reason


def _always_raises(device, reward_config):
    def score(images, prompts, metadata, only_strict=True):
        raise ConnectionError("reward server down")

    return score


def test_total_reward_outage_stops_the_run_after_a_checkpoint(tmp_path, tiny_sd3_dir, monkeypatch):
    monkeypatch.setitem(rewards.REWARDS, "jpeg_compressibility", _always_raises)
    save_dir = tmp_path / "run"
    with pytest.raises(TrainingHalted, match="reward outage: 8 of 8 reward calls failed"):
        run_training(save_dir, tiny_sd3_dir, "--config.num_epochs=4", "--config.eval_freq=0",
                     "--config.rewards.max_failed_epochs=2")
    metrics = [json.loads(line) for line in (save_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [0]  # epoch 0 trained; epoch 1's rollouts were not used
    assert metrics[0]["reward/num_failures"] == 8
    checkpoint = save_dir / "checkpoints" / "checkpoint-000001"
    assert (checkpoint / "COMPLETE").exists()
    state = torch.load(checkpoint / "training_state.pt", weights_only=True)
    assert state["epoch"] == 1 and state["global_step"] == 1
    assert os.path.exists(save_dir / "checkpoints" / "checkpoint-000001" / "checksums.json")


def test_reward_outage_is_one_line_and_exit_status_1(tmp_path, tiny_sd3_dir, monkeypatch, capsys):
    from test_train_e2e import run_cli

    monkeypatch.setitem(rewards.REWARDS, "jpeg_compressibility", _always_raises)
    code = run_cli(tmp_path / "run", tiny_sd3_dir, "--config.num_epochs=3", "--config.eval_freq=0",
                   "--config.rewards.max_failed_epochs=1")
    assert code == 1
    err = capsys.readouterr().err
    messages = [line for line in err.splitlines() if line.startswith("train_sd3_awm:")]
    assert len(messages) == 1 and "Traceback" not in err, err[-3000:]
    assert messages[0].startswith("train_sd3_awm: reward outage: 8 of 8 reward calls failed")
    assert messages[0].endswith("checkpoint saved before epoch 0")
    assert (tmp_path / "run" / "checkpoints" / "checkpoint-000000" / "COMPLETE").exists()
