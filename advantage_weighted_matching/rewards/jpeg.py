"""JPEG compressibility and incompressibility rewards (SPEC section 6; the reference's pair).

* ``jpeg_compressibility``: ``-(size of the image saved as JPEG at quality 95, in kB) / 500``;
* ``jpeg_incompressibility``: ``+(the same size in kB)``, unscaled, as the
  reference's ``jpeg_incompressibility`` (a 512x512 SD image: tens of kB),

with kB = bytes / 1000. Images: NCHW float in [0, 1] -> uint8 [B, H, W, 3] once for
the batch (``round(x * 255)``), then one PIL JPEG encode per image.
"""

import io

from PIL import Image

from . import images_to_uint8_hwc, score_each

JPEG_QUALITY = 95
KB_PER_REWARD_UNIT = 500.0


def jpeg_size_kb(image_hwc_uint8):
    """Size in kB (1000 bytes) of one uint8 [H, W, 3] image as JPEG quality 95."""
    buffer = io.BytesIO()
    Image.fromarray(image_hwc_uint8).save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.tell() / 1000.0


def jpeg_compressibility(image_hwc_uint8):
    """``-(JPEG size in kB) / 500`` for one uint8 [H, W, 3] image."""
    return -jpeg_size_kb(image_hwc_uint8) / KB_PER_REWARD_UNIT


def make_jpeg_incompressibility_scorer(device, reward_config):
    """Factory: ``fn(images, prompts, metadata, only_strict=True) -> (scores [B] in kB, info)``.
    ``device`` and ``reward_config`` are unused (pure CPU)."""
    del device, reward_config

    def score(images, prompts, metadata, only_strict=True):
        del prompts, metadata, only_strict
        scores, num_failures = score_each(jpeg_size_kb, list(images_to_uint8_hwc(images)), "jpeg_incompressibility")
        return scores, {"num_failures": num_failures}

    return score


def make_jpeg_compressibility_scorer(device, reward_config):
    """Factory: ``fn(images, prompts, metadata, only_strict=True) -> (scores [B], info)``.
    ``device`` and ``reward_config`` are unused (pure CPU)."""
    del device, reward_config

    def score(images, prompts, metadata, only_strict=True):
        del prompts, metadata, only_strict
        images_uint8 = images_to_uint8_hwc(images)
        scores, num_failures = score_each(jpeg_compressibility, list(images_uint8), "jpeg_compressibility")
        return scores, {"num_failures": num_failures}

    return score
