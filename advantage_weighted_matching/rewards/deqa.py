"""DeQA-Score image-quality reward over HTTP (the reference's ``deqa``).

The reference sends every image as a JPEG (PIL's default quality, 75) to a
DeQA server, 64 images per request; the server runs ``zhiyuanyou/DeQA-Score-Mix3``
and answers ``model.score(images) / 5``: the expected quality level on DeQA's
1..5 scale over 5, so a score in [0.2, 1]. The reference speaks pickle to
that server; this client speaks JSON (never unpickle a network reply):

* request: POST ``reward_config['deqa_url']`` with
  ``{"images": [base64 JPEG q75 of uint8 RGB [H, W, 3]]}``;
* reply: ``{"outputs": [score]}``, one finite number in [0, 1] per image.

``serve_deqa(score_images)`` runs the server side around any
``score_images(list of PIL images) -> list of float`` (e.g. the DeQA model's
``score(images) / 5``), so the reference's server becomes a few lines.

Checks: a reply that is not an object holding a list ``outputs`` of one entry
per image fails its request's images; an entry that is not a finite number in
[0, 1] fails that image. A failed image scores 0 and counts in
``num_failures``. Each request goes through ``http_client.BoundedJsonClient``
(``rewards.remote_timeout_s`` total per request, ``rewards.remote_retries``
retries with backoff, reply size cap).
"""

import base64
import io
import logging

import numpy as np
from PIL import Image

from . import images_to_uint8_hwc
from .http_client import BoundedJsonClient, checked_score, serve_json

logger = logging.getLogger(__name__)

IMAGES_PER_REQUEST = 64
SCORE_RANGE = (0.0, 1.0)


def encode_jpeg_base64(image_uint8):
    """uint8 [H, W, 3] -> base64 (ASCII) of its JPEG at PIL's default quality (75), as the reference sends."""
    buffer = io.BytesIO()
    Image.fromarray(image_uint8).save(buffer, format="JPEG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def decode_image_base64(text):
    return Image.open(io.BytesIO(base64.b64decode(text))).convert("RGB")


def parse_outputs(reply, count):
    """Reply -> (scores float64 [count], failed bool [count]); ValueError for a malformed reply."""
    if not isinstance(reply, dict) or not isinstance(reply.get("outputs"), list) or len(reply["outputs"]) != count:
        raise ValueError(f"deqa reply must be an object with a list 'outputs' of {count} numbers, got "
                         f"{repr(reply)[:200]}")
    values = [checked_score(value, *SCORE_RANGE) for value in reply["outputs"]]
    failed = np.array([value is None for value in values])
    if failed.any():
        logger.warning("deqa: invalid scores for images %s (scored 0): %s", np.flatnonzero(failed).tolist(),
                       [reply["outputs"][i] for i in np.flatnonzero(failed)[:4]])
    return np.array([0.0 if value is None else value for value in values], dtype=np.float64), failed


class DeqaClient:
    """``client.score_batch(images NCHW [0,1]) -> (scores float64 [B], num_failures)``."""

    def __init__(self, reward_config):
        self.client = BoundedJsonClient(reward_config["deqa_url"], timeout_s=reward_config["remote_timeout_s"],
                                        retries=reward_config["remote_retries"])

    def score_batch(self, images):
        images_uint8 = images_to_uint8_hwc(images)
        scores = np.zeros(len(images_uint8), dtype=np.float64)
        failed = np.zeros(len(images_uint8), dtype=bool)
        for start in range(0, len(images_uint8), IMAGES_PER_REQUEST):
            chunk = images_uint8[start:start + IMAGES_PER_REQUEST]
            stop = start + len(chunk)
            try:
                reply = self.client.post({"images": [encode_jpeg_base64(image) for image in chunk]})
                scores[start:stop], failed[start:stop] = parse_outputs(reply, len(chunk))
            except Exception as error:  # noqa: BLE001 - an outage costs this request's images only
                logger.warning("deqa failed on images %d..%d (scored 0): %s", start, stop - 1, error)
                failed[start:stop] = True
        return scores, int(failed.sum())


def make_deqa_scorer(device, reward_config):
    """Factory: ``fn(images, prompts, metadata, only_strict=True) -> (scores [B], info)``."""
    del device
    client = DeqaClient(reward_config)

    def score(images, prompts, metadata, only_strict=True):
        del prompts, metadata, only_strict
        scores, num_failures = client.score_batch(images)
        return scores, {"num_failures": num_failures}

    score.client = client
    return score


def serve_deqa(score_images, host="127.0.0.1", port=0):
    """Server side of the protocol around ``score_images(list of PIL RGB images) -> list of float``."""

    def handle(path, payload):
        del path
        images = [decode_image_base64(text) for text in payload["images"]]
        return {"outputs": [float(value) for value in score_images(images)]}

    return serve_json(handle, host, port)
