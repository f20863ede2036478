"""Qwen2.5-VL aesthetic judge, in process (the reference's ``qwenvl``).

Per image: one chat turn ``[image, QWENVL_TASK]`` (the reference's
instruction: rate aesthetic quality 1-5, analysis in ``<Thought>``, then
``<Score>X</Score>``), answered by ``Qwen2_5_VLForConditionalGeneration.generate``
(``reward_config['qwenvl_model']``, default ``Qwen/Qwen2.5-VL-7B-Instruct``,
in ``reward_config['qwenvl_dtype']``, at most
``reward_config['qwenvl_max_new_tokens']`` new tokens, the model's own
generation config: for the 7B-Instruct release top-k 1, i.e. greedy).

Scoring rule (``score_from_answer``): the first ``<Score>(\\d+)</Score>`` in
the decoded answer, divided by 5 (a rating 1..5 -> 0.2..1.0; the digits are
not clamped, as in the reference). An answer without it scores 0, as in the
reference, and is counted in ``num_failures`` so that a judge drifting off
format shows in the logs.

Inputs as the reference builds them with ``qwen_vl_utils``: the image is
resized (PIL bicubic) to ``smart_resize`` of its size (multiples of 28,
between 4 and 16384 patches of 28x28; 512x512 -> 504x504), then the model's
image processor turns it into patches (``pixel_values``, ``image_grid_thw``).
The processor's work on the text is done here explicitly: transformers 5's
``Qwen2_5_VLProcessor`` needs torchvision (for its video processor), which
does not import beside this project's torch. The chat template comes from the
tokenizer; the single ``<|image_pad|>`` is expanded to one token per merged
patch (``prod(grid_thw) / merge_size**2``); prompts are left-padded so that a
batch generates together. Batches of ``reward_config['batch_size']`` images.
"""

import logging
import math
import re

import numpy as np
import torch
from PIL import Image

from . import from_pretrained_or_explain, images_to_uint8_hwc, resolve_device, run_chunks, torch_dtype

logger = logging.getLogger(__name__)

QWENVL_TASK = '''
Your role is to evaluate the aesthetic quality score of given images.
1. Bad: Extremely blurry, underexposed with significant noise, indiscernible
subjects, and chaotic composition.
2. Poor: Noticeable blur, poor lighting, washed-out colors, and awkward
composition with cut-off subjects.
3. Fair: In focus with adequate lighting, dull colors, decent composition but
lacks creativity.
4. Good: Sharp, good exposure, vibrant colors, thoughtful composition with
a clear focal point.
5. Excellent: Exceptional clarity, perfect exposure, rich colors, masterful
composition with emotional impact.

Please first provide a detailed analysis of the evaluation process, including the criteria for judging aesthetic quality, within the <Thought> tag. Then, give a final score from 1 to 5 within the <Score> tag.
<Thought>
[Analyze the evaluation process in detail here]
</Thought>
<Score>X</Score>
'''
SCORE_PATTERN = re.compile(r"<Score>(\d+)</Score>")
RATING_SCALE = 5.0
IMAGE_PAD = "<|image_pad|>"
PATCH_FACTOR = 28  # qwen_vl_utils IMAGE_FACTOR: patch 14 x spatial merge 2
MIN_PIXELS = 4 * 28 * 28
MAX_PIXELS = 16384 * 28 * 28


def score_from_answer(text):
    """The judge's answer -> rating / 5, or None when it holds no ``<Score>digits</Score>``."""
    match = SCORE_PATTERN.search(text)
    return None if match is None else float(match.group(1)) / RATING_SCALE


def smart_resize(height, width, factor=PATCH_FACTOR, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS):
    """(height, width) rounded to multiples of ``factor`` with the pixel count brought
    into [min_pixels, max_pixels] at (about) the same aspect ratio."""
    new_height = max(factor, round(height / factor) * factor)
    new_width = max(factor, round(width / factor) * factor)
    if new_height * new_width > max_pixels:
        shrink = math.sqrt(height * width / max_pixels)
        new_height = max(factor, math.floor(height / shrink / factor) * factor)
        new_width = max(factor, math.floor(width / shrink / factor) * factor)
    elif new_height * new_width < min_pixels:
        grow = math.sqrt(min_pixels / (height * width))
        new_height = math.ceil(height * grow / factor) * factor
        new_width = math.ceil(width * grow / factor) * factor
    return new_height, new_width


def load_chat_template(tokenizer, model_id):
    """The model's chat template: the tokenizer's, else ``chat_template.json`` beside it."""
    if tokenizer.chat_template:
        return tokenizer.chat_template
    import json

    from .weight_files import hub_or_dir_file

    path = hub_or_dir_file(model_id, "chat_template.json", "qwenvl chat template")
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)["chat_template"]


class QwenVLScorer:
    """``scorer.score_batch(images NCHW [0,1]) -> (scores float64 [B], num_failures, answers)``."""

    def __init__(self, device, reward_config):
        from transformers import AutoImageProcessor, AutoTokenizer, Qwen2_5_VLForConditionalGeneration

        self.device = torch.device(resolve_device(device, reward_config))
        self.batch_size = reward_config["batch_size"]
        self.max_new_tokens = int(reward_config["qwenvl_max_new_tokens"])
        model_id = reward_config["qwenvl_model"]
        self.model = from_pretrained_or_explain(
            Qwen2_5_VLForConditionalGeneration.from_pretrained, model_id,
            dtype=torch_dtype(reward_config["qwenvl_dtype"]),
        ).to(self.device).eval().requires_grad_(False)
        self.tokenizer = from_pretrained_or_explain(AutoTokenizer.from_pretrained, model_id)
        self.tokenizer.padding_side = "left"  # batched generation continues every prompt from its last token
        self.image_processor = from_pretrained_or_explain(AutoImageProcessor.from_pretrained, model_id)
        self.merge_size = int(getattr(self.image_processor, "merge_size", 2))
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QWENVL_TASK}]}]
        self.prompt = self.tokenizer.apply_chat_template(
            messages, chat_template=load_chat_template(self.tokenizer, model_id), tokenize=False,
            add_generation_prompt=True,
        )
        if self.prompt.count(IMAGE_PAD) != 1:
            raise ValueError(f"qwenvl: the chat template of {model_id} gave {self.prompt.count(IMAGE_PAD)} "
                             f"{IMAGE_PAD} tokens for one image, expected 1")

    def model_inputs(self, images_uint8):
        """uint8 [b, H, W, 3] -> the generate() inputs (left-padded ids, mask, patches, grid)."""
        pil_images = []
        for image in images_uint8:
            height, width = image.shape[:2]
            new_height, new_width = smart_resize(height, width)
            pil = Image.fromarray(image)
            pil_images.append(pil if (new_height, new_width) == (height, width)
                              else pil.resize((new_width, new_height), Image.BICUBIC))
        vision = self.image_processor(images=pil_images, return_tensors="pt")
        grid = vision["image_grid_thw"]  # [b, 3]: temporal, height, width patches
        texts = [self.prompt.replace(IMAGE_PAD, IMAGE_PAD * (int(thw.prod()) // self.merge_size**2))
                 for thw in grid]
        tokens = self.tokenizer(texts, padding=True, return_tensors="pt")
        return {
            "input_ids": tokens["input_ids"].to(self.device),
            "attention_mask": tokens["attention_mask"].to(self.device),
            "pixel_values": vision["pixel_values"].to(self.device, self.model.dtype),
            "image_grid_thw": grid.to(self.device),
        }

    @torch.no_grad()
    def answer_chunk(self, images_uint8):
        """uint8 [b, H, W, 3] -> b decoded answers (prompt tokens removed, special tokens skipped)."""
        inputs = self.model_inputs(images_uint8)
        generated = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens)
        new_tokens = generated[:, inputs["input_ids"].shape[1]:]
        return self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def score_batch(self, images):
        images_uint8 = images_to_uint8_hwc(images)
        answers, failed = run_chunks(lambda start, stop: self.answer_chunk(images_uint8[start:stop]),
                                     len(images_uint8), self.batch_size, "qwenvl")
        scores = np.zeros(len(images_uint8), dtype=np.float64)
        unparsed = []
        for index, answer in enumerate(answers):
            value = None if failed[index] else score_from_answer(answer)
            if value is None and not failed[index]:
                unparsed.append(index)
            scores[index] = 0.0 if value is None else value
        if unparsed:
            logger.warning("qwenvl: no <Score>N</Score> in the answers for images %s (scored 0); first answer: %r",
                           unparsed, answers[unparsed[0]][-300:])
        return scores, int(failed.sum()) + len(unparsed), answers


def make_qwenvl_scorer(device, reward_config):
    """Factory: ``fn(images, prompts, metadata, only_strict=True) -> (scores [B], info)``."""
    scorer = QwenVLScorer(device, reward_config)

    def score(images, prompts, metadata, only_strict=True):
        del prompts, metadata, only_strict
        scores, num_failures, _answers = scorer.score_batch(images)
        return scores, {"num_failures": num_failures}

    score.scorer = scorer
    return score
