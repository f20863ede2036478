"""GenEval reward, model part (SPEC section 6); the rules live in geneval_rules.py.

Per batch of images (NCHW float [0, 1] -> uint8 [B, H, W, 3]):

0. JPEG round trip: every image is encoded with PIL's JPEG encoder at its
   default quality (75) and decoded again; detector and colour classifier see
   only the decoded image. The reference's GenEval reward sends JPEGs to its
   scoring server, so the compression is part of the reward (SPEC 6).
1. Detector: Mask2Former (``reward_config['geneval_detector']``, COCO
   instance segmentation) with its image processor; instance masks from
   ``post_process_instance_segmentation(threshold=0.3, return_binary_maps=True,
   target_sizes=(H, W))`` -> bool [N, H, W] with scores [N] and class ids [N].
   Box of an instance = tight box of its mask, ``(x1, y1, x2 + 1, y2 + 1)``.
2. Class names: ``reward_config['geneval_object_names']`` (a text file, one
   name per label id) or the detector's ``id2label`` mapped to GenEval's
   spellings (mouse -> computer mouse, remote -> tv remote,
   keyboard -> computer keyboard).
3. Colour classifier: CLIP (``reward_config['geneval_clip']``) zero-shot over
   the 10 SPEC colours. Text side per class: for each colour the three
   templates "a photo of a {c} {cls}", "a photo of a {c}-colored {cls}",
   "a photo of a {c} object", each embedding L2-normalised, averaged,
   normalised again -> [10, D]. Image side: the box crop of the image with
   pixels outside the instance mask replaced by grey #999 (153, 153, 153),
   embedded and normalised -> [n, D]; colour = argmax of the dot product.
4. Rules: ``geneval_rules.score_prompt`` -> (score, strict_correct, correct).

Outputs: scores [B] (strict score) and info arrays ``strict_accuracy``,
``accuracy`` (0 when ``only_strict``), ``{tag}_strict_accuracy``,
``{tag}_accuracy`` (-10 for other tags), plus ``num_failures``.
"""

import io
import logging
import types

import numpy as np
import torch
from PIL import Image

from . import from_pretrained_or_explain, images_to_uint8_hwc, resolve_device, run_chunks, torch_dtype
from .geneval_rules import COLORS, DETECTION_THRESHOLD, geneval_fields, parse_metadata, score_prompt
from .pickscore import load_clip, projected_features

logger = logging.getLogger(__name__)

COLOUR_TEMPLATES = ("a photo of a {c} {cls}", "a photo of a {c}-colored {cls}", "a photo of a {c} object")
MASK_BACKGROUND_RGB = (153, 153, 153)  # "#999"
# COCO label names (detectron2 / transformers spelling) -> GenEval object names.
GENEVAL_NAME_ALIASES = {"mouse": "computer mouse", "remote": "tv remote", "keyboard": "computer keyboard"}


def jpeg_round_trip(images_uint8):
    """uint8 [B, H, W, 3] -> uint8 [B, H, W, 3]: PIL JPEG encode (default quality 75), then decode."""
    decoded = []
    for image in images_uint8:
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="JPEG")
        buffer.seek(0)
        decoded.append(np.asarray(Image.open(buffer).convert("RGB")))
    return np.stack(decoded) if decoded else np.asarray(images_uint8)


def load_object_names(object_names_setting, id2label):
    """Class name per detector label id: from a file (one per line) or id2label + aliases."""
    num_labels = len(id2label)
    if object_names_setting:
        with open(object_names_setting, encoding="utf-8") as handle:
            names = [line.strip() for line in handle if line.strip()]
        if len(names) != num_labels:
            raise ValueError(
                f"geneval_object_names file {object_names_setting!r} has {len(names)} names, "
                f"the detector has {num_labels} labels"
            )
        return names
    return [GENEVAL_NAME_ALIASES.get(id2label[i], id2label[i]) for i in range(num_labels)]


def boxes_from_masks(masks):
    """bool [N, H, W] -> float [N, 4] boxes (x1, y1, x2, y2), x2/y2 one past the last pixel."""
    boxes = np.zeros((len(masks), 4), dtype=np.float64)
    for index, mask in enumerate(masks):
        rows = np.flatnonzero(mask.any(axis=1))
        cols = np.flatnonzero(mask.any(axis=0))
        if len(rows) and len(cols):
            boxes[index] = (cols[0], rows[0], cols[-1] + 1, rows[-1] + 1)
    return boxes


def masked_box_crop(image_uint8, mask, box):
    """uint8 [H, W, 3] image, bool [H, W] mask, box -> uint8 crop with grey outside the mask."""
    composite = np.where(mask[..., None], image_uint8, np.asarray(MASK_BACKGROUND_RGB, dtype=np.uint8))
    x1, y1, x2, y2 = (int(round(v)) for v in box)
    return composite[y1:y2, x1:x2]


class GenevalScorer:
    """In-process GenEval scorer: ``score_batch(images, metadata, only_strict)``."""

    def __init__(self, device, reward_config):
        from transformers import AutoImageProcessor, Mask2FormerForUniversalSegmentation

        self.device = torch.device(resolve_device(device, reward_config))
        self.batch_size = reward_config["batch_size"]
        dtype = torch_dtype(reward_config["dtype"])
        detector_id = reward_config["geneval_detector"]
        self.detector_processor = from_pretrained_or_explain(AutoImageProcessor.from_pretrained, detector_id)
        detector = from_pretrained_or_explain(
            Mask2FormerForUniversalSegmentation.from_pretrained, detector_id, dtype=dtype
        )
        self.detector = detector.to(self.device).eval().requires_grad_(False)
        self.detector_dtype = dtype
        id2label = {int(k): v for k, v in self.detector.config.id2label.items()}
        self.class_names = load_object_names(reward_config["geneval_object_names"], id2label)
        self.clip_model, self.clip_processor = load_clip(
            reward_config["geneval_clip"], reward_config["geneval_clip"], self.device, reward_config["dtype"]
        )
        self.clip_dtype = next(self.clip_model.parameters()).dtype
        self._colour_text_embeddings = {}  # class name -> float [10, D]

    # ---- detection -------------------------------------------------------------
    @torch.no_grad()
    def detect_chunk(self, images_uint8):
        """uint8 [b, H, W, 3] -> per image (candidates {class: [(score, box, mask index)]}, masks bool [N, H, W])."""
        height, width = images_uint8.shape[1:3]
        inputs = self.detector_processor(images=list(images_uint8), return_tensors="pt")
        pixel_mask = inputs.get("pixel_mask")
        outputs = self.detector(
            pixel_values=inputs["pixel_values"].to(self.device, self.detector_dtype),
            pixel_mask=None if pixel_mask is None else pixel_mask.to(self.device),
        )
        # post-processing in float32 whatever the model dtype (it reads only these two fields)
        float_outputs = types.SimpleNamespace(
            class_queries_logits=outputs.class_queries_logits.float(),
            masks_queries_logits=outputs.masks_queries_logits.float(),
        )
        results = self.detector_processor.post_process_instance_segmentation(
            float_outputs,
            threshold=DETECTION_THRESHOLD,
            return_binary_maps=True,
            target_sizes=[(height, width)] * len(images_uint8),
        )
        detections = []
        for result in results:
            segments = result["segments_info"]
            if not segments:
                detections.append(({}, np.zeros((0, height, width), dtype=bool)))
                continue
            masks = result["segmentation"].cpu().numpy() > 0.5  # [N, H, W]
            boxes = boxes_from_masks(masks)
            candidates = {}
            for index, segment in enumerate(segments):
                class_name = self.class_names[segment["label_id"]]
                candidates.setdefault(class_name, []).append((float(segment["score"]), boxes[index], index))
            detections.append((candidates, masks))
        return detections

    # ---- colour classification ---------------------------------------------------
    @torch.no_grad()
    def colour_text_embeddings(self, class_name):
        """float [10, D]: per colour the normalised mean of the 3 normalised template embeddings."""
        if class_name not in self._colour_text_embeddings:
            texts = [template.format(c=colour, cls=class_name) for colour in COLORS for template in COLOUR_TEMPLATES]
            tokens = self.clip_processor(text=texts, padding=True, truncation=True, max_length=77, return_tensors="pt")
            embeddings = projected_features(
                self.clip_model.get_text_features(
                    input_ids=tokens["input_ids"].to(self.device),
                    attention_mask=tokens["attention_mask"].to(self.device),
                )
            ).float()
            embeddings = embeddings / embeddings.norm(dim=-1, keepdim=True)
            per_colour = embeddings.reshape(len(COLORS), len(COLOUR_TEMPLATES), -1).mean(dim=1)
            self._colour_text_embeddings[class_name] = per_colour / per_colour.norm(dim=-1, keepdim=True)
        return self._colour_text_embeddings[class_name]

    @torch.no_grad()
    def classify_crops(self, class_name, crops_uint8):
        """list of uint8 crops -> list of colour names (argmax of image . colour embeddings)."""
        text_embeddings = self.colour_text_embeddings(class_name)
        colours = []
        for start in range(0, len(crops_uint8), self.batch_size):
            pil_crops = [Image.fromarray(crop) for crop in crops_uint8[start : start + self.batch_size]]
            pixel_values = self.clip_processor(images=pil_crops, return_tensors="pt")["pixel_values"]
            image_embeddings = projected_features(
                self.clip_model.get_image_features(pixel_values=pixel_values.to(self.device, self.clip_dtype))
            ).float()
            image_embeddings = image_embeddings / image_embeddings.norm(dim=-1, keepdim=True)
            best = (image_embeddings @ text_embeddings.T).argmax(dim=1)
            colours.extend(COLORS[i] for i in best.tolist())
        return colours

    def colour_classifier(self, image_uint8, masks):
        """Callable ``(class_name, [DetectedObject]) -> [colour]`` for one image; the
        strict and GenEval checks share results through a cache keyed on mask ids."""
        cache = {}

        def classify_colours(class_name, objects):
            key = (class_name, tuple(obj.crop_id for obj in objects))
            if key not in cache:
                crops = [masked_box_crop(image_uint8, masks[obj.crop_id], obj.box) for obj in objects]
                cache[key] = self.classify_crops(class_name, crops)
            return cache[key]

        return classify_colours

    # ---- batch -----------------------------------------------------------------
    def score_batch(self, images, metadata, only_strict=True):
        """-> (scores float64 [B], info). A failing image scores 0 (strict and GenEval
        correctness 0) and is counted in ``info['num_failures']``."""
        images_uint8 = jpeg_round_trip(images_to_uint8_hwc(images))
        batch_size = len(images_uint8)
        scores, strict_correct, correct = np.zeros(batch_size), np.zeros(batch_size), np.zeros(batch_size)
        detections, failed = run_chunks(lambda start, stop: self.detect_chunk(images_uint8[start:stop]), batch_size,
                                        self.batch_size, "geneval detector")
        for index in range(batch_size):
            if failed[index]:
                continue
            try:
                candidates, masks = detections[index]
                prompt = parse_metadata(metadata[index])
                classify = self.colour_classifier(images_uint8[index], masks)
                scores[index], strict_correct[index], correct[index] = score_prompt(
                    candidates, prompt, classify, only_strict=only_strict
                )
            except Exception as error:  # noqa: BLE001 - one bad image must not end the run
                failed[index] = True
                scores[index] = strict_correct[index] = correct[index] = 0.0
                logger.warning("geneval scoring failed on image %d (scored 0): %r", index, error)
        tags = [row.get("tag", "") if isinstance(row, dict) else "" for row in metadata]
        info = geneval_fields(tags, scores, strict_correct, correct)
        del info["geneval"]  # returned as the scores
        info["num_failures"] = int(failed.sum())
        return scores, info


def make_geneval_scorer(device, reward_config):
    """Factory: ``fn(images, prompts, metadata, only_strict=True) -> (scores [B], info)``."""
    scorer = GenevalScorer(device, reward_config)

    def score(images, prompts, metadata, only_strict=True):
        del prompts  # the metadata rows carry the prompt
        if len(metadata) != images.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {len(metadata)} metadata rows")
        return scorer.score_batch(images, metadata, only_strict=only_strict)

    score.scorer = scorer
    return score
