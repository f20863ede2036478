"""GenEval rule engine (SPEC section 6): pure functions, no models.

Inputs: candidate detections per class name, ``{class: [(score, box, crop_id)]}``
with ``box = (x1, y1, x2, y2)`` in pixels (x right, y down); a GenEval metadata
row (``tag``, ``prompt``, ``include``: [{class, count, color?, position?:
[relation, include_index]}], ``exclude``?: [{class, count}]); and a colour
classifier ``classify_colours(class_name, objects) -> [colour per object]``
(the scorer crops and classifies with CLIP; tests pass a table).

``score_prompt`` returns ``(score, strict_correct, correct)``:

* detections kept per class: score > 0.3 (> 0.9 for tag ``counting``),
  highest first, at most 16;
* ``score`` / ``strict_correct``: the strict training reward (``evaluate_strict``);
* ``correct``: GenEval correctness (``evaluate_geneval``), or False when
  ``only_strict`` (training does not compute it).
"""

from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
RELATIONS = ("left of", "right of", "above", "below")
TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
# GenEval's object names (its object_names.txt): the 80 COCO classes with GenEval's spellings.
OBJECT_NAMES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "computer mouse", "tv remote",
    "computer keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock",
    "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
)
DETECTION_THRESHOLD = 0.3
COUNTING_DETECTION_THRESHOLD = 0.9
MAX_OBJECTS_PER_CLASS = 16
POSITION_MARGIN = 0.1  # fraction of (dimA + dimB) subtracted from the centre offset
OTHER_TAG_VALUE = -10.0  # per-tag outputs of images of another tag (ignored when averaging)


@dataclass(frozen=True)
class DetectedObject:
    """One kept detection: confidence, box (x1, y1, x2, y2) and an id the colour
    classifier uses to find its crop (e.g. the index of its instance mask)."""

    score: float
    box: tuple
    crop_id: Any = None


@dataclass(frozen=True)
class IncludeClause:
    class_name: str
    count: int
    color: Optional[str] = None
    position: Optional[tuple] = None  # (relation, index of an earlier include clause)


@dataclass(frozen=True)
class ExcludeClause:
    class_name: str
    count: int


@dataclass(frozen=True)
class GenevalPrompt:
    tag: str
    prompt: str
    include: tuple
    exclude: tuple


def _parse_count(clause, where):
    count = clause.get("count")
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"{where}: count must be an integer >= 1, got {count!r}")
    return count


def _parse_class(clause, where):
    class_name = clause.get("class")
    if not isinstance(class_name, str) or not class_name:
        raise ValueError(f"{where}: class must be a non-empty string, got {class_name!r}")
    return class_name


def parse_metadata(row):
    """GenEval metadata row (dict) -> GenevalPrompt; ValueError naming the bad part."""
    if not isinstance(row, dict) or "include" not in row:
        raise ValueError(f"not a GenEval metadata row (needs 'include'): {row!r}")
    tag = row.get("tag", "")
    include = []
    for index, clause in enumerate(row["include"]):
        where = f"include[{index}]"
        class_name, count = _parse_class(clause, where), _parse_count(clause, where)
        color = clause.get("color")
        if color is not None and color not in COLORS:
            raise ValueError(f"{where}: unknown colour {color!r}; known: {COLORS}")
        position = clause.get("position")
        if position is not None:
            if len(position) != 2:
                raise ValueError(f"{where}: position must be [relation, group_index], got {position!r}")
            relation, group_index = position
            if relation not in RELATIONS:
                raise ValueError(f"{where}: unknown relation {relation!r}; known: {RELATIONS}")
            if isinstance(group_index, bool) or not isinstance(group_index, int) or not 0 <= group_index < index:
                raise ValueError(f"{where}: position target must index an earlier include clause, got {group_index!r}")
            position = (relation, group_index)
        include.append(IncludeClause(class_name, count, color, position))
    exclude = tuple(
        ExcludeClause(_parse_class(clause, f"exclude[{i}]"), _parse_count(clause, f"exclude[{i}]"))
        for i, clause in enumerate(row.get("exclude", []))
    )
    return GenevalPrompt(tag=tag, prompt=row.get("prompt", ""), include=tuple(include), exclude=exclude)


def select_detections(candidates, tag):
    """Keep per class the detections with score > 0.3 (> 0.9 for ``counting``),
    highest score first, at most 16: {class: [(score, box, crop_id)]} ->
    {class: [DetectedObject]} (classes with none kept are dropped)."""
    threshold = COUNTING_DETECTION_THRESHOLD if tag == "counting" else DETECTION_THRESHOLD
    kept = {}
    for class_name, detections in candidates.items():
        objects = [
            DetectedObject(float(score), tuple(float(v) for v in box), crop_id) for score, box, crop_id in detections
        ]
        objects = sorted((obj for obj in objects if obj.score > threshold), key=lambda obj: -obj.score)
        if objects:
            kept[class_name] = objects[:MAX_OBJECTS_PER_CLASS]
    return kept


def relative_position(box_a, box_b):
    """Relations of A relative to B from box centres c and sizes d:
    ``offset = cA - cB``; ``revised = max(|offset| - 0.1 (dA + dB), 0) * sign(offset)``;
    no relation if all ``|revised| < 1e-3``; else ``(dx, dy) = revised / |offset|`` and
    'left of' dx < -0.5, 'right of' dx > 0.5, 'above' dy < -0.5, 'below' dy > 0.5."""
    boxes = np.asarray([box_a[:4], box_b[:4]], dtype=np.float64).reshape(2, 2, 2)  # [obj, corner, xy]
    center_a, center_b = boxes.mean(axis=1)
    dim_a, dim_b = np.abs(boxes[:, 1] - boxes[:, 0])
    offset = center_a - center_b
    revised = np.maximum(np.abs(offset) - POSITION_MARGIN * (dim_a + dim_b), 0) * np.sign(offset)
    if np.all(np.abs(revised) < 1e-3):
        return set()
    dx, dy = revised / np.linalg.norm(offset)
    relations = set()
    if dx < -0.5:
        relations.add("left of")
    if dx > 0.5:
        relations.add("right of")
    if dy < -0.5:
        relations.add("above")
    if dy > 0.5:
        relations.add("below")
    return relations


def _all_have_relation(found_objects, target_objects, relation):
    """True when every found object has ``relation`` to every target object."""
    return all(
        relation in relative_position(obj.box, target.box) for obj in found_objects for target in target_objects
    )


def evaluate_strict(objects, prompt, classify_colours):
    """Strict score (training reward) and strict correctness of one image.

    ``objects``: {class: [DetectedObject]} after ``select_detections``;
    ``prompt``: GenevalPrompt. Per include clause, in order, credits are
    appended (see SPEC section 6); score = mean credit (0 with no credits).
    Exclude clauses do not enter the strict score nor strict correctness.
    """
    credits = []
    strict_correct = True
    matched_groups = []  # per include clause: its found objects, or None when it failed
    for clause in prompt.include:
        found = objects.get(clause.class_name, [])
        credits.append(1 - abs(clause.count - len(found)) / clause.count)
        matched = len(found) == clause.count
        if not matched:
            if clause.color is not None or clause.position is not None:
                credits.append(0.0)
        else:
            if clause.color is not None:
                colours = classify_colours(clause.class_name, found)
                n_matches = list(colours).count(clause.color)
                credits.append(1 - abs(clause.count - n_matches) / clause.count)
                matched = n_matches == clause.count
            if clause.position is not None and matched:
                relation, group_index = clause.position
                target_group = matched_groups[group_index]
                if target_group is None:
                    credits.append(0.0)
                    matched = False
                else:
                    if not _all_have_relation(found, target_group, relation):
                        credits.append(0.0)
                        matched = False
                    # Reference quirk kept for parity: after the relation loop the
                    # reference appends a credit of 1 even when the check failed
                    # (a failed position clause thus adds both a 0 and a 1).
                    credits.append(1.0)
        strict_correct = strict_correct and matched
        matched_groups.append(found if matched else None)
    score = sum(credits) / len(credits) if credits else 0.0
    return float(score), bool(strict_correct)


def evaluate_geneval(objects, prompt, classify_colours):
    """GenEval correctness (evaluation) of one image.

    Include clause: its first ``count`` objects, needs at least ``count``;
    colour: at least ``count`` of them classified as the colour; position: as
    in the strict score; any exclude clause with at least ``count`` objects fails.
    """
    correct = True
    matched_groups = []
    for clause in prompt.include:
        found = objects.get(clause.class_name, [])[: clause.count]
        matched = len(found) >= clause.count
        if matched and clause.color is not None:
            matched = list(classify_colours(clause.class_name, found)).count(clause.color) >= clause.count
        if matched and clause.position is not None:
            relation, group_index = clause.position
            target_group = matched_groups[group_index]
            matched = target_group is not None and _all_have_relation(found, target_group, relation)
        correct = correct and matched
        matched_groups.append(found if matched else None)
    for clause in prompt.exclude:
        if len(objects.get(clause.class_name, [])) >= clause.count:
            correct = False
    return bool(correct)


def score_prompt(candidates, metadata_row, classify_colours, only_strict=False):
    """(strict score, strict_correct, correct) of one image.

    ``candidates``: {class: [(score, box, crop_id)]} from the detector (any
    order, any score); ``metadata_row``: dict or GenevalPrompt;
    ``classify_colours(class_name, [DetectedObject]) -> [colour]``.
    ``correct`` is False when ``only_strict`` (not computed during training).
    """
    prompt = metadata_row if isinstance(metadata_row, GenevalPrompt) else parse_metadata(metadata_row)
    objects = select_detections(candidates, prompt.tag)
    score, strict_correct = evaluate_strict(objects, prompt, classify_colours)
    correct = False if only_strict else evaluate_geneval(objects, prompt, classify_colours)
    return score, strict_correct, correct


def geneval_fields(tags, scores, strict_correct, correct):
    """Per-image output arrays [B]: ``geneval`` (score), ``strict_accuracy``,
    ``accuracy`` and per tag ``{tag}_strict_accuracy`` / ``{tag}_accuracy``
    holding the image's value for its own tag and -10 for the other tags."""
    strict = np.asarray(strict_correct, dtype=np.float64)
    acc = np.asarray(correct, dtype=np.float64)
    fields = {"geneval": np.asarray(scores, dtype=np.float64), "strict_accuracy": strict, "accuracy": acc}
    tags = np.asarray(list(tags), dtype=object)
    for tag in TAGS:
        own = tags == tag
        fields[f"{tag}_strict_accuracy"] = np.where(own, strict, OTHER_TAG_VALUE)
        fields[f"{tag}_accuracy"] = np.where(own, acc, OTHER_TAG_VALUE)
    return fields


def failed_geneval_fields(metadata):
    """Fields for a batch whose scoring failed entirely: all zero, -10 for other tags."""
    tags = [row.get("tag", "") if isinstance(row, dict) else "" for row in metadata]
    zeros = np.zeros(len(tags))
    return geneval_fields(tags, zeros, zeros, zeros)
