"""Rule-based reward of the "scenes" toy task (issue H.1), from pixels only.

The prompt (grammar in `toy.scenes.parse_prompt`) gives one or two object
groups (colour c_g, count n_g) and, for relation prompts, a relation between
the first and the second. Per image (uint8 RGB, round(x * 255)):

1. Pixel classes and 4-connected components per colour exactly as the
   "shapes" reward (`rewards.shapes.classify_pixels`, `label_components`);
   components smaller than ``min_area`` (12 px) are ignored.
2. Credits, each in [0, 1]:
   * colour: pixels of kept components in the prompt's colours / pixels of all
     kept components (0 when nothing is kept);
   * one count credit per group: ``max(0, 1 - |found_g - n_g| / n_g)``,
     found_g = kept components of colour c_g;
   * relation prompts: 1 when the largest kept component of colour c_1 stands
     in the relation to the largest of colour c_2 (centroids,
     `toy.scenes.relation_holds`), else 0 (also when either is missing).
3. ``reward`` = the product of the credits: every clause of the prompt must
   hold (a wrong relation, a missing colour or one object too many for "a ..."
   scores 0), counts off by one keep partial credit.

A clean render of the prompt's spec scores exactly 1; the pretrained toy model
scores about 0.4 (colours right, counts and relations often wrong).
``strict_accuracy`` (info) is 1 when every clause holds exactly. The shape word
(square / circle) is not scored, as in the "shapes" reward.
"""

import numpy as np

from advantage_weighted_matching.rewards.shapes import MAX_DISTANCE, MIN_AREA, classify_pixels, label_components
from advantage_weighted_matching.toy.scenes import COLORS, KINDS, parse_prompt, relation_holds

NOT_APPLICABLE = -10.0  # relation_accuracy of prompts without a relation (as GenEval's other-tag fields)


def components(classes, min_area=MIN_AREA):
    """Kept components of every palette colour in `classes` [B, H, W] (int, 1 + colour index).

    Returns a dict of arrays over components: ``image`` (int64), ``color`` (index into
    COLORS), ``area``, ``cy``, ``cx`` (centroid, pixels; y down).
    """
    batch, height, width = classes.shape
    columns = {"image": [], "color": [], "area": [], "cy": [], "cx": []}
    for colour_index in range(len(COLORS)):
        labels = label_components(classes == colour_index + 1).reshape(-1)
        on = np.nonzero(labels)[0]
        ids, inverse, area = np.unique(labels[on], return_inverse=True, return_counts=True)
        rows, cols = (on // width) % height, on % width
        keep = area >= min_area
        columns["image"].append(((ids - 1) // (height * width))[keep])
        columns["color"].append(np.full(int(keep.sum()), colour_index))
        columns["area"].append(area[keep])
        columns["cy"].append((np.bincount(inverse, rows, len(ids)) / area)[keep])
        columns["cx"].append((np.bincount(inverse, cols, len(ids)) / area)[keep])
    return {key: np.concatenate(value) for key, value in columns.items()}


def score_scenes(images_uint8, specs, max_distance=MAX_DISTANCE, min_area=MIN_AREA):
    """Rewards of uint8 images [B, H, W, 3] against scene specs (`toy.scenes`).

    Returns a dict of float64 [B] arrays: ``reward``, ``color_accuracy``,
    ``count_accuracy`` (mean of the groups' count credits), ``relation_accuracy``
    (NOT_APPLICABLE without a relation), ``strict_accuracy``, ``kind`` (index into KINDS).
    """
    images_uint8 = np.asarray(images_uint8)
    batch = images_uint8.shape[0]
    if len(specs) != batch:
        raise ValueError(f"{batch} images but {len(specs)} specs")
    table = components(classify_pixels(images_uint8, max_distance), min_area)
    keys = ("reward", "color_accuracy", "count_accuracy", "relation_accuracy", "strict_accuracy", "kind")
    out = {key: np.zeros(batch) for key in keys}
    for b, spec in enumerate(specs):
        mine = table["image"] == b
        colour, area = table["color"][mine], table["area"][mine]
        wanted = [COLORS.index(o["color"]) for o in spec["objects"]]
        total = area.sum()
        colour_credit = area[np.isin(colour, wanted)].sum() / total if total > 0 else 0.0
        counts = [max(0.0, 1 - abs(int((colour == c).sum()) - o["count"]) / o["count"])
                  for c, o in zip(wanted, spec["objects"])]
        credits = [colour_credit, *counts]
        relation = NOT_APPLICABLE
        if spec["relation"] is not None:
            centres = []
            for c in wanted:
                rows = np.nonzero(mine & (table["color"] == c))[0]
                if len(rows):
                    largest = rows[np.argmax(table["area"][rows])]
                    centres.append((table["cy"][largest], table["cx"][largest]))
            relation = float(len(centres) == 2 and relation_holds(
                spec["relation"], centres[0][0] - centres[1][0], centres[0][1] - centres[1][1]))
            credits.append(relation)
        out["reward"][b] = np.prod(credits)
        out["strict_accuracy"][b] = float(all(credit == 1.0 for credit in credits))
        out["color_accuracy"][b] = colour_credit
        out["count_accuracy"][b] = np.mean(counts)
        out["relation_accuracy"][b] = relation
        out["kind"][b] = KINDS.index(spec["kind"])
    return out


def make_scenes_scorer(device, reward_config):
    """Factory: ``fn(images NCHW [0, 1], prompts, metadata, only_strict=True) -> (scores [B], info)``.

    info: ``num_failures`` (0: a prompt outside the grammar raises ScenePromptError for
    the batch instead, it is a configuration error) and the float64 [B] arrays
    ``color_accuracy``, ``count_accuracy``, ``relation_accuracy``, ``strict_accuracy``, ``kind`` of
    `score_scenes`.
    """
    del device, reward_config
    from advantage_weighted_matching.rewards import images_to_uint8_hwc

    def score(images, prompts, metadata, only_strict=True):
        del metadata, only_strict
        result = score_scenes(images_to_uint8_hwc(images), [parse_prompt(prompt) for prompt in prompts])
        reward = result.pop("reward")
        return reward, {"num_failures": 0, **result}

    return score
