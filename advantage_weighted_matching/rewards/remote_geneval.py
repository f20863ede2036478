"""Optional remote GenEval scorer: JSON over HTTP (used when
``reward_config['remote_geneval_url']`` is non-empty; off by default).

Protocol (one POST per batch, ``Content-Type: application/json``; never pickle):

* request: ``{"images": [base64 PNG of uint8 RGB [H, W, 3]], "metadata":
  [GenEval metadata row], "only_strict": bool}``
* response: ``{"scores": [float], "strict_correct": [bool], "correct":
  [bool], "failed": [bool] (optional)}``, one entry per image.

The client turns the response into the same outputs as the in-process scorer
(geneval_rules.geneval_fields: ``strict_accuracy``, ``accuracy``, per-tag
fields with -10 for other tags, ``num_failures``). ``serve_geneval`` runs the
server side around any ``score_fn(images_uint8, metadata, only_strict)``,
e.g. an in-process ``GenevalScorer`` on a machine that holds the detector.

The client is bounded (``http_client.BoundedJsonClient``, shared with the
other remote rewards): every call has a total deadline
(``rewards.remote_geneval_timeout_s``, retries included; a socket is shut
down when it passes, so a server that drips bytes cannot hold it), a reply
larger than ``MAX_REPLY_BYTES`` is refused unread, and a connection error,
timeout or HTTP 5xx / 429 is retried ``rewards.remote_geneval_retries``
times with exponential backoff (1, 2, 4 s ...), as the reference's client
retries its server. Every entry of a reply is type- and range-checked: a
score that is not a finite number in the strict score's range, or a
correctness flag that is not a boolean, makes that image a failure (scored 0,
counted in ``num_failures``); a reply of the wrong shape fails the batch.
"""

import base64
import io
import logging
import math

import numpy as np
from PIL import Image

from . import images_to_uint8_hwc
from .geneval_rules import MAX_OBJECTS_PER_CLASS, geneval_fields
from .http_client import BoundedJsonClient, RemoteRewardError, serve_json

logger = logging.getLogger(__name__)

REQUEST_TIMEOUT_S = 600.0  # default total deadline per call, retries included
MAX_REPLY_BYTES = 16 * 2**20  # a reply for a batch of images is a few kB
BACKOFF_S = 1.0  # first retry delay; doubled after each failed attempt
# Strict score = mean of credits in [1 - (found - count) / count, 1] with at most
# MAX_OBJECTS_PER_CLASS objects found per class and count >= 1.
SCORE_RANGE = (1.0 - (MAX_OBJECTS_PER_CLASS - 1), 1.0)


# The server did not give a usable reply (``retry``: whether trying again may help); the
# shared client's error, under the name this module's callers know.
RemoteGenevalError = RemoteRewardError


def encode_png_base64(image_uint8):
    """uint8 [H, W, 3] -> base64 (ASCII str) of its PNG bytes."""
    buffer = io.BytesIO()
    Image.fromarray(image_uint8).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def decode_png_base64(text):
    """base64 PNG -> uint8 [H, W, 3]."""
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(text))).convert("RGB"))


def _valid_score(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) \
        and SCORE_RANGE[0] <= value <= SCORE_RANGE[1]


def _valid_flag(value):
    return isinstance(value, bool) or (isinstance(value, int) and value in (0, 1))


class RemoteGenevalClient:
    """``client.score_batch(images, metadata, only_strict) -> (scores [B], info)``."""

    def __init__(self, url, timeout_s=REQUEST_TIMEOUT_S, retries=3, max_bytes=MAX_REPLY_BYTES, backoff_s=BACKOFF_S):
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"remote_geneval_url must be an http(s) URL, got {url!r}")
        self.url = url
        self.client = BoundedJsonClient(url, timeout_s=timeout_s, retries=retries, backoff_s=backoff_s,
                                        max_bytes=max_bytes)

    def request(self, images_uint8, metadata, only_strict):
        """One bounded POST of the batch (http_client.BoundedJsonClient); the decoded reply."""
        return self.client.post({
            "images": [encode_png_base64(image) for image in images_uint8],
            "metadata": list(metadata),
            "only_strict": bool(only_strict),
        })

    def score_batch(self, images, metadata, only_strict=True):
        images_uint8 = images_to_uint8_hwc(images)
        batch_size = len(images_uint8)
        reply = self.request(images_uint8, metadata, only_strict)
        if not isinstance(reply, dict):
            raise ValueError(f"remote GenEval reply is a {type(reply).__name__}, not an object")
        for key in ("scores", "strict_correct", "correct") + (("failed",) if "failed" in reply else ()):
            if not isinstance(reply.get(key), list) or len(reply[key]) != batch_size:
                raise ValueError(f"remote GenEval reply field {key!r} is not a list of {batch_size} entries")
        failed, invalid = np.zeros(batch_size, dtype=bool), []
        for i in range(batch_size):
            flag = reply["failed"][i] if "failed" in reply else False
            if _valid_flag(flag) and flag:
                failed[i] = True  # the server says so: its other entries do not matter
            elif not (_valid_flag(flag) and _valid_score(reply["scores"][i])
                      and _valid_flag(reply["strict_correct"][i]) and _valid_flag(reply["correct"][i])):
                failed[i] = True
                invalid.append(i)
        if invalid:
            logger.warning("remote GenEval reply has invalid entries for images %s (scored 0): %s", invalid,
                           [(reply["scores"][i], reply["strict_correct"][i], reply["correct"][i]) for i in invalid[:4]])
        scores = np.array([0.0 if failed[i] else float(reply["scores"][i]) for i in range(batch_size)])
        strict_correct = np.array([0.0 if failed[i] else float(reply["strict_correct"][i]) for i in range(batch_size)])
        correct = np.array([0.0 if failed[i] else float(reply["correct"][i]) for i in range(batch_size)])
        if only_strict:  # GenEval correctness is not computed during training
            correct = np.zeros(batch_size)
        if failed.any():
            logger.warning("remote GenEval failed on images %s (scored 0)", np.flatnonzero(failed).tolist())
        tags = [row.get("tag", "") if isinstance(row, dict) else "" for row in metadata]
        info = geneval_fields(tags, scores, strict_correct, correct)
        del info["geneval"]
        info["num_failures"] = int(failed.sum())
        return scores, info


def make_remote_geneval_scorer(device, reward_config):
    """Factory: ``fn(images, prompts, metadata, only_strict=True) -> (scores [B], info)``."""
    del device
    client = RemoteGenevalClient(reward_config["remote_geneval_url"], reward_config["remote_geneval_timeout_s"],
                                 reward_config["remote_geneval_retries"])

    def score(images, prompts, metadata, only_strict=True):
        del prompts
        return client.score_batch(images, metadata, only_strict=only_strict)

    score.client = client
    return score


def serve_geneval(score_fn, host="127.0.0.1", port=0):
    """Start a threaded HTTP server for the protocol above; returns the server
    (``server.server_address`` has the port; call ``server.shutdown()`` to stop).

    ``score_fn(images_uint8 [list of uint8 [H, W, 3]], metadata, only_strict)``
    returns a dict with ``scores``, ``strict_correct``, ``correct`` (and
    optionally ``failed``) lists.
    """

    def handle(path, payload):
        del path
        images = [decode_png_base64(text) for text in payload["images"]]
        result = score_fn(images, payload["metadata"], bool(payload.get("only_strict", True)))
        return {key: list(map(_plain, value)) for key, value in result.items()}

    return serve_json(handle, host, port)


def _plain(value):
    """numpy scalars -> Python scalars for JSON."""
    return value.item() if hasattr(value, "item") else value


def scorer_as_score_fn(geneval_scorer):
    """Adapter for ``serve_geneval``: an in-process ``geneval.GenevalScorer`` as a
    ``score_fn(images_uint8, metadata, only_strict) -> reply dict`` (same-size images)."""

    def score_fn(images_uint8, metadata, only_strict):
        batch = np.stack(images_uint8).transpose(0, 3, 1, 2).astype(np.float32) / 255.0  # NCHW [0, 1]
        scores, info = geneval_scorer.score_batch(batch, metadata, only_strict=only_strict)
        return {
            "scores": scores.tolist(),
            "strict_correct": (info["strict_accuracy"] > 0.5).tolist(),
            "correct": (info["accuracy"] > 0.5).tolist(),
        }

    return score_fn
