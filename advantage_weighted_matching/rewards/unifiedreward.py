"""UnifiedReward judge over an OpenAI-compatible chat API (the reference's ``unifiedreward``).

The reference serves ``UnifiedReward-7b-v1.5`` with sglang and asks it, per
image, the question ``UNIFIEDREWARD_QUESTION`` (caption alignment and image
quality, "assign a score from 1 to 5 after 'Final Score:'"), all images of a
batch at once, at temperature 0. Here the same request per image:

* the image resized to 512x512 (PIL bicubic, as ``Image.resize``'s default),
  PNG, as a ``data:image;base64,...`` URL, then the question with the prompt;
* POST ``{reward_config['unifiedreward_url']}/chat/completions`` with
  ``{"model": reward_config['unifiedreward_model'], "messages": [...],
  "temperature": 0}``; the header ``Authorization: Bearer $UNIFIEDREWARD_API_KEY``
  when that variable is set (the reference's local server took any key);
* reply: ``choices[0].message.content``, a string.

Scoring rule (``score_from_answer``): the first ``Final Score:\\s*([1-5](?:\\.\\d+)?)``
as a float, divided by 5 (1..5 -> 0.2..1.0). An answer without it scores 0, as
in the reference, and counts in ``num_failures``; so does an image whose
request failed or whose reply has no string content. Requests run
concurrently (at most ``rewards.batch_size`` in flight) and share one total
deadline per batch (``rewards.remote_timeout_s``), each retried with backoff
(``rewards.remote_retries``) through ``http_client.BoundedJsonClient``.
"""

import base64
import io
import logging
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image

from . import images_to_uint8_hwc
from .http_client import BoundedJsonClient

logger = logging.getLogger(__name__)

API_KEY_ENV = "UNIFIEDREWARD_API_KEY"
JUDGE_IMAGE_SIZE = 512
RATING_SCALE = 5.0
SCORE_PATTERN = re.compile(r"Final Score:\s*([1-5](?:\.\d+)?)")
UNIFIEDREWARD_QUESTION = (
    "<image>\nYou are given a text caption and a generated image based on that caption. Your task is to evaluate this "
    "image based on two key criteria:\n1. Alignment with the Caption: Assess how well this image aligns with the "
    "provided caption. Consider the accuracy of depicted objects, their relationships, and attributes as described in "
    "the caption.\n2. Overall Image Quality: Examine the visual quality of this image, including clarity, detail "
    "preservation, color accuracy, and overall aesthetic appeal.\nBased on the above criteria, assign a score from 1 "
    "to 5 after 'Final Score:'.\nYour task is provided as follows:\nText Caption: [{prompt}]"
)


def score_from_answer(text):
    """The judge's answer -> score / 5, or None when it holds no ``Final Score: <1-5>``."""
    match = SCORE_PATTERN.search(text)
    return None if match is None else float(match.group(1)) / RATING_SCALE


def image_data_url(image_uint8):
    """uint8 [H, W, 3] -> ``data:image;base64,<PNG of the image resized to 512x512>``."""
    image = Image.fromarray(image_uint8).resize((JUDGE_IMAGE_SIZE, JUDGE_IMAGE_SIZE), Image.BICUBIC)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def chat_request(model, image_uint8, prompt):
    """The chat-completions body for one image and its prompt."""
    return {
        "model": model,
        "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": image_data_url(image_uint8)}},
            {"type": "text", "text": UNIFIEDREWARD_QUESTION.format(prompt=prompt)},
        ]}],
        "temperature": 0,
    }


def answer_text(reply):
    """``choices[0].message.content`` of a chat-completions reply; ValueError when absent or not a string."""
    try:
        content = reply["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        raise ValueError(f"unifiedreward reply has no choices[0].message.content: {repr(reply)[:200]}") from None
    if not isinstance(content, str):
        raise ValueError(f"unifiedreward reply content is a {type(content).__name__}, not a string")
    return content


class UnifiedRewardClient:
    """``client.score_batch(images NCHW [0,1], prompts) -> (scores float64 [B], num_failures)``."""

    def __init__(self, reward_config):
        key = os.environ.get(API_KEY_ENV)
        self.client = BoundedJsonClient(
            reward_config["unifiedreward_url"].rstrip("/") + "/chat/completions",
            timeout_s=reward_config["remote_timeout_s"], retries=reward_config["remote_retries"],
            headers={"Authorization": f"Bearer {key}"} if key else None,
        )
        self.model = reward_config["unifiedreward_model"]
        self.concurrency = reward_config["batch_size"]
        self.timeout_s = float(reward_config["remote_timeout_s"])

    def score_one(self, image_uint8, prompt, deadline):
        return score_from_answer(answer_text(self.client.post(chat_request(self.model, image_uint8, prompt),
                                                              deadline=deadline)))

    def score_batch(self, images, prompts):
        images_uint8 = images_to_uint8_hwc(images)
        deadline = time.monotonic() + self.timeout_s
        scores = np.zeros(len(prompts), dtype=np.float64)
        num_failures = 0
        with ThreadPoolExecutor(max_workers=max(1, min(self.concurrency, len(prompts)))) as pool:
            futures = [pool.submit(self.score_one, image, prompt, deadline)
                       for image, prompt in zip(images_uint8, prompts)]
            for index, future in enumerate(futures):
                try:
                    value = future.result()
                    if value is None:
                        logger.warning("unifiedreward: no 'Final Score: <1-5>' in the answer for image %d (scored 0)",
                                       index)
                except Exception as error:  # noqa: BLE001 - an outage costs that image only
                    logger.warning("unifiedreward failed on image %d (scored 0): %s", index, error)
                    value = None
                if value is None:
                    num_failures += 1
                else:
                    scores[index] = value
        return scores, num_failures


def make_unifiedreward_scorer(device, reward_config):
    """Factory: ``fn(images, prompts, metadata, only_strict=True) -> (scores [B], info)``."""
    del device
    client = UnifiedRewardClient(reward_config)

    def score(images, prompts, metadata, only_strict=True):
        del metadata, only_strict
        scores, num_failures = client.score_batch(images, list(prompts))
        return scores, {"num_failures": num_failures}

    score.client = client
    return score
