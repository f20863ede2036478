"""OCR reward (SPEC section 6).

For a prompt with target text ``t`` (between its first pair of double quotes)
and the recognised lines of the image (RapidOCR, PP-OCRv4 ONNX, no angle
classifier):

* ``recognised`` = concatenation of the lines whose confidence is > 0;
* both lowercased with spaces removed;
* ``dist = 0`` if ``t`` is a substring of ``recognised``, else
  ``Levenshtein.distance(recognised, t)``, capped at ``len(t)``;
* ``reward = 1 - dist / len(t)`` in [0, 1].

An image with no text (the engine returns None) scores 0 as a normal result;
an exception from the engine scores 0 and counts as a failure.

The recogniser is injectable: any callable ``uint8 [H, W, 3] -> list of
(text, confidence) lines, or None``.
"""

import logging

import Levenshtein
import numpy as np

from . import images_to_uint8_hwc

logger = logging.getLogger(__name__)


def target_text(prompt):
    """Text between the first pair of double quotes; ValueError if there is none."""
    parts = prompt.split('"')
    if len(parts) < 3:
        raise ValueError(f"OCR prompt has no quoted target text: {prompt!r}")
    return parts[1]


def normalise(text):
    """Lowercase and drop spaces (SPEC: 'lowercase both and drop spaces')."""
    return text.replace(" ", "").lower()


def ocr_reward_from_lines(lines, target):
    """``1 - dist / len(target)`` for recognised ``lines`` [(text, confidence)] or None."""
    target = normalise(target)
    if not target:
        raise ValueError("OCR target text is empty after removing spaces")
    recognised = normalise("".join(text for text, confidence in (lines or []) if confidence > 0))
    if target in recognised:
        distance = 0
    else:
        distance = min(Levenshtein.distance(recognised, target), len(target))
    return 1.0 - distance / len(target)


class RapidOcrRecognizer:
    """RapidOCR (onnxruntime) engine as a recogniser: image -> [(text, confidence)] or None."""

    def __init__(self):
        from rapidocr_onnxruntime import RapidOCR

        self.engine = RapidOCR()

    def __call__(self, image_hwc_uint8):
        result, _elapsed = self.engine(image_hwc_uint8, use_cls=False)
        if not result:
            return None
        return [(str(text), float(confidence)) for _box, text, confidence in result]


class OcrScorer:
    """Batch OCR reward: ``scorer(images NCHW [0,1], prompts) -> (scores [B], num_failures)``."""

    def __init__(self, recognizer=None):
        self.recognizer = recognizer if recognizer is not None else RapidOcrRecognizer()

    def score_batch(self, images, prompts):
        images_uint8 = images_to_uint8_hwc(images)
        scores = np.zeros(len(prompts), dtype=np.float64)
        num_failures = 0
        for index, (image, prompt) in enumerate(zip(images_uint8, prompts)):
            try:
                target = target_text(prompt)
                scores[index] = ocr_reward_from_lines(self.recognizer(image), target)
            except Exception as error:  # noqa: BLE001 - SPEC: if OCR fails, 0
                num_failures += 1
                logger.warning("ocr reward failed on image %d (scored 0): %r", index, error)
        return scores, num_failures


def make_ocr_scorer(device, reward_config, recognizer=None):
    """Factory: ``fn(images, prompts, metadata, only_strict=True) -> (scores [B], info)``.
    RapidOCR runs on CPU; ``device`` and ``reward_config`` are unused."""
    del device, reward_config
    scorer = OcrScorer(recognizer)

    def score(images, prompts, metadata, only_strict=True):
        del metadata, only_strict
        scores, num_failures = scorer.score_batch(images, prompts)
        return scores, {"num_failures": num_failures}

    return score
