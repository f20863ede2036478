"""Remote rewards over HTTP (deqa, unifiedreward) against local servers on 127.0.0.1.

deqa: a DeQA stand-in scores the mean brightness of the JPEG it receives, so
the expected reward is computed here from the same JPEG encoding (PIL,
quality 75). unifiedreward: an OpenAI-compatible stand-in answers from the
prompt it finds in the question, so every scoring rule case is chosen by the
test. Malformed replies, outages and slow servers cost the images concerned,
never the run.
"""

import base64
import io
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch
from PIL import Image

from advantage_weighted_matching.rewards import REWARDS, multi_score
from advantage_weighted_matching.rewards.deqa import serve_deqa
from advantage_weighted_matching.rewards.http_client import serve_json
from advantage_weighted_matching.rewards.unifiedreward import UNIFIEDREWARD_QUESTION, score_from_answer


@pytest.fixture
def start_server():
    servers = []

    def start(server):
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def _images(count, size=16, seed=0):
    return torch.rand((count, 3, size, size), generator=torch.Generator().manual_seed(seed))


def _brightness_after_jpeg(image_chw):
    array = (image_chw * 255).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG")  # PIL default quality 75, as the reference sends
    return float(np.asarray(Image.open(buffer).convert("RGB"), dtype=np.float64).mean() / 255)


def _deqa_config(url, **overrides):
    return {"deqa_url": url, "remote_timeout_s": 10.0, "remote_retries": 0, **overrides}


# ---- deqa ------------------------------------------------------------------------------------------------


def test_deqa_scores_what_the_server_returns_for_the_jpegs(start_server):
    request_sizes = []

    def brightness(pil_images):
        request_sizes.append(len(pil_images))
        return [np.asarray(image, dtype=np.float64).mean() / 255 for image in pil_images]

    url = start_server(serve_deqa(brightness))
    images = _images(70, size=8)
    result, info = multi_score("cpu", {"deqa": 2.0}, _deqa_config(url))(images, ["p"] * 70, [{}] * 70)
    expected = [_brightness_after_jpeg(image) for image in images]
    np.testing.assert_allclose(result["deqa"], expected, rtol=0, atol=1e-12)
    np.testing.assert_allclose(result["avg"], 2 * np.array(expected), atol=1e-12)
    assert info["num_failures"] == 0
    assert request_sizes == [64, 6]  # the reference's 64 images per request


def test_deqa_checks_every_score_and_the_reply_shape(start_server):
    replies = iter([
        {"outputs": [0.5, 1.5, "0.3", None, True, 0.0]},  # one valid in range, one 0.0, four invalid
        {"outputs": [0.5]},  # wrong length: the request's images fail
        ["not", "an", "object"],
    ])
    url = start_server(serve_json(lambda path, payload: next(replies)))
    fn = REWARDS["deqa"]("cpu", _deqa_config(url))
    scores, info = fn(_images(6), ["p"] * 6, [{}] * 6)
    np.testing.assert_array_equal(scores, [0.5, 0.0, 0.0, 0.0, 0.0, 0.0])
    assert info == {"num_failures": 4}
    for _ in range(2):
        scores, info = fn(_images(2), ["p"] * 2, [{}] * 2)
        np.testing.assert_array_equal(scores, [0.0, 0.0])
        assert info == {"num_failures": 2}


def test_deqa_retries_a_restarting_server_and_survives_an_absent_one(start_server):
    calls = []

    def flaky(path, payload):
        calls.append(path)
        if len(calls) == 1:
            raise RuntimeError("model still loading")  # HTTP 500: retried
        return {"outputs": [0.75] * len(payload["images"])}

    url = start_server(serve_json(flaky))
    scores, info = REWARDS["deqa"]("cpu", _deqa_config(url, remote_retries=2))(_images(3), ["p"] * 3, [{}] * 3)
    np.testing.assert_array_equal(scores, [0.75] * 3)
    assert info == {"num_failures": 0} and len(calls) == 2

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    scores, info = REWARDS["deqa"]("cpu", _deqa_config(f"http://127.0.0.1:{port}"))(_images(2), ["p"] * 2, [{}] * 2)
    np.testing.assert_array_equal(scores, [0.0, 0.0])
    assert info == {"num_failures": 2}


# ---- unifiedreward ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("answer, expected", [
    ("The image matches the caption well.\nFinal Score: 4", 0.8),
    ("Final Score:4.5", 0.9),
    ("Final Score: 5.5", 1.1),  # the first digit is in [1, 5], the decimals are not bounded (reference's regex)
    ("Final Score: 1.25 (harsh)", 0.25),
    ("Final Score: 6", None),
    ("Final Score: 0.5", None),
    ("final score: 4", None),
    ("Score: 4", None),
    ("", None),
])
def test_unifiedreward_score_from_answer(answer, expected):
    assert score_from_answer(answer) == (None if expected is None else pytest.approx(expected))


class FakeJudge:
    """An OpenAI-compatible chat endpoint whose answer depends on the caption in the question."""

    ANSWERS = {"good": "Aligned and sharp.\nFinal Score: 4.5", "bad": "Final Score: 1", "chatty": "It is fine."}

    def __init__(self, delay_s=0.0):
        self.requests, self.delay_s = [], delay_s

    def __call__(self, path, payload):
        time.sleep(self.delay_s)
        self.requests.append((path, payload))
        image_part, text_part = payload["messages"][0]["content"]
        header, encoded = image_part["image_url"]["url"].split(",", 1)
        assert header == "data:image;base64"
        image = Image.open(io.BytesIO(base64.b64decode(encoded)))
        assert image.format == "PNG" and image.size == (512, 512)
        caption = text_part["text"].rsplit("Text Caption: [", 1)[1][:-1]
        if caption == "broken":
            return {"choices": []}
        return {"choices": [{"message": {"role": "assistant", "content": self.ANSWERS[caption]}}]}


def _unified_config(url, **overrides):
    return {"unifiedreward_url": f"{url}/v1", "unifiedreward_model": "UnifiedReward-7b-v1.5", "batch_size": 3,
            "remote_timeout_s": 10.0, "remote_retries": 0, **overrides}


def test_unifiedreward_asks_per_image_and_scores_the_answers(start_server, monkeypatch):
    monkeypatch.setenv("UNIFIEDREWARD_API_KEY", "secret")
    judge = FakeJudge()
    url = start_server(serve_json(judge))
    prompts = ["good", "bad", "chatty", "broken", "good"]
    fn = multi_score("cpu", {"unifiedreward": 1.0}, _unified_config(url))
    result, info = fn(_images(5), prompts, [{}] * 5)
    np.testing.assert_allclose(result["unifiedreward"], [0.9, 0.2, 0.0, 0.0, 0.9], atol=1e-12)
    assert info["num_failures"] == 2  # no "Final Score" in one answer, no content in one reply
    assert len(judge.requests) == 5
    path, payload = judge.requests[0]
    assert path == "/v1/chat/completions"
    assert payload["model"] == "UnifiedReward-7b-v1.5" and payload["temperature"] == 0
    texts = sorted(request[1]["messages"][0]["content"][1]["text"] for request in judge.requests)
    assert texts[0] == UNIFIEDREWARD_QUESTION.format(prompt="bad")
    assert "assign a score from 1 to 5 after 'Final Score:'" in texts[0]


def test_unifiedreward_sends_the_api_key_header(start_server, monkeypatch):
    seen = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            seen.append(self.headers.get("Authorization"))
            self.rfile.read(int(self.headers["Content-Length"]))
            data = json.dumps({"choices": [{"message": {"content": "Final Score: 3"}}]}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = start_server(server)
    monkeypatch.setenv("UNIFIEDREWARD_API_KEY", "k-123")
    scores, _ = REWARDS["unifiedreward"]("cpu", _unified_config(url))(_images(1), ["x"], [{}])
    monkeypatch.delenv("UNIFIEDREWARD_API_KEY")
    REWARDS["unifiedreward"]("cpu", _unified_config(url))(_images(1), ["x"], [{}])
    assert scores.tolist() == [0.6] and seen == ["Bearer k-123", None]


def test_unifiedreward_one_deadline_for_the_batch(start_server):
    judge = FakeJudge(delay_s=3.0)
    url = start_server(serve_json(judge))
    fn = REWARDS["unifiedreward"]("cpu", _unified_config(url, remote_timeout_s=1.0, remote_retries=3))
    start = time.monotonic()
    scores, info = fn(_images(4), ["good"] * 4, [{}] * 4)
    assert time.monotonic() - start < 2.5  # 4 requests, 3 at a time, all within the batch's 1 s
    np.testing.assert_array_equal(scores, [0.0] * 4)
    assert info == {"num_failures": 4}
