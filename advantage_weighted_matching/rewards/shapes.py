"""Rule-based reward of the coloured-shapes toy task (issue F.2), from pixels only.

The prompt ("two red squares", grammar in `toy.shapes.parse_prompt`) gives the
target count n and colour c. Per image (uint8 RGB, round(x * 255)):

1. Pixel classes: each pixel goes to the nearest of {background, red, green,
   blue, yellow} (Euclidean RGB distance); a pixel farther than
   ``max_distance`` (127.5 = half the smallest palette spacing) from every
   palette colour is unclassified. One vectorised distance computation per batch.
2. Components: 4-connected components of each colour's pixels (min-label
   propagation over the whole batch at once, no loop over pixels); components
   smaller than ``min_area`` (12 px; a drawn shape has >= 52) are ignored.
3. ``color_accuracy`` = pixels of colour c in kept components / pixels of any
   palette colour in kept components (0 when nothing is kept).
   ``count_accuracy`` = max(0, 1 - |found - n| / n) with found = kept
   components of colour c.
4. ``reward = 0.5 * color_accuracy + 0.5 * count_accuracy``, in [0, 1].

A clean render of the prompt's spec scores exactly 1; the wrong colour scores
0; one shape too many or too few costs 0.5 / n. ``shape_accuracy`` (info only,
not in the reward) is the fraction of the colour-c components whose fill ratio
(area / bounding-box area) says the prompt's shape: > 0.9 square, else circle
(a disc fills ~0.79 of its box).
"""

import numpy as np

from advantage_weighted_matching.toy.shapes import BACKGROUND, COLORS, PALETTE, parse_prompt

MAX_DISTANCE = 127.5
MIN_AREA = 12
SQUARE_FILL = 0.9


def classify_pixels(images_uint8, max_distance=MAX_DISTANCE):
    """[B, H, W, 3] uint8 -> int8 [B, H, W]: -1 unclassified, 0 background, 1 + i for COLORS[i]."""
    references = np.asarray([BACKGROUND] + [PALETTE[c] for c in COLORS], dtype=np.float32)  # [K, 3]
    pixels = images_uint8.astype(np.float32)
    distance = np.sqrt(((pixels[..., None, :] - references) ** 2).sum(-1))  # [B, H, W, K]
    nearest = distance.argmin(-1)
    far = np.take_along_axis(distance, nearest[..., None], -1)[..., 0] > max_distance
    return np.where(far, -1, nearest).astype(np.int8)


def label_components(mask):
    """4-connected components of bool [B, H, W] -> int64 labels (0 = off; labels unique across the batch).

    Min-label propagation: every on pixel starts with its flat index + 1 and takes
    the smallest label among itself and its on 4-neighbours until nothing
    changes (iterations ~ the longest path inside a component).
    """
    big = np.iinfo(np.int64).max
    labels = np.where(mask, np.arange(1, mask.size + 1, dtype=np.int64).reshape(mask.shape), big)
    while True:
        padded = np.pad(labels, ((0, 0), (1, 1), (1, 1)), constant_values=big)
        smallest = np.minimum.reduce([
            labels, padded[:, :-2, 1:-1], padded[:, 2:, 1:-1], padded[:, 1:-1, :-2], padded[:, 1:-1, 2:],
        ])
        smallest = np.where(mask, smallest, big)
        if np.array_equal(smallest, labels):
            return np.where(mask, labels, 0)
        labels = smallest


def component_stats(labels):
    """(image index [N], area [N], bbox area [N]) of the components of `labels` [B, H, W]."""
    batch, height, width = labels.shape
    flat = labels.reshape(-1)
    on = flat > 0
    ids, inverse, area = np.unique(flat[on], return_inverse=True, return_counts=True)
    positions = np.nonzero(on)[0]
    rows, cols = (positions // width) % height, positions % width
    extent = []
    for coordinate in (rows, cols):
        low = np.full(len(ids), np.iinfo(np.int64).max)
        high = np.full(len(ids), -1)
        np.minimum.at(low, inverse, coordinate)
        np.maximum.at(high, inverse, coordinate)
        extent.append(high - low + 1)
    image_index = (ids - 1) // (height * width)
    return image_index, area, extent[0] * extent[1]


def score_shapes(images_uint8, specs, max_distance=MAX_DISTANCE, min_area=MIN_AREA):
    """Rewards of uint8 images [B, H, W, 3] against specs (dicts with count/color/shape).

    Returns (reward, count_accuracy, color_accuracy, shape_accuracy, found), float64 [B]
    except `found` (int64 [B], kept components of the target colour).
    """
    images_uint8 = np.asarray(images_uint8)
    batch = images_uint8.shape[0]
    if len(specs) != batch:
        raise ValueError(f"{batch} images but {len(specs)} specs")
    classes = classify_pixels(images_uint8, max_distance)
    target = np.asarray([COLORS.index(spec["color"]) for spec in specs])
    counts = np.asarray([spec["count"] for spec in specs], dtype=np.float64)
    squares = np.asarray([spec["shape"] == "square" for spec in specs])
    kept_pixels = np.zeros((batch, len(COLORS)))
    found = np.zeros(batch, dtype=np.int64)
    shape_hits = np.zeros(batch)
    for colour_index in range(len(COLORS)):
        image_index, area, box_area = component_stats(label_components(classes == colour_index + 1))
        keep = area >= min_area
        image_index, area, box_area = image_index[keep], area[keep], box_area[keep]
        np.add.at(kept_pixels[:, colour_index], image_index, area)
        is_target = target[image_index] == colour_index
        np.add.at(found, image_index[is_target], 1)
        shape_ok = (area / box_area > SQUARE_FILL) == squares[image_index]
        np.add.at(shape_hits, image_index[is_target & shape_ok], 1)
    total = kept_pixels.sum(1)
    color_accuracy = np.where(total > 0, kept_pixels[np.arange(batch), target] / np.maximum(total, 1), 0.0)
    count_accuracy = np.clip(1 - np.abs(found - counts) / counts, 0, 1)
    shape_accuracy = np.where(found > 0, shape_hits / np.maximum(found, 1), 0.0)
    reward = 0.5 * color_accuracy + 0.5 * count_accuracy
    return reward, count_accuracy, color_accuracy, shape_accuracy, found


def make_shapes_scorer(device, reward_config):
    """Factory: ``fn(images NCHW [0, 1], prompts, metadata, only_strict=True) -> (scores [B], info)``.

    info: ``num_failures`` (0: a prompt outside the grammar raises ShapePromptError
    for the batch instead, it is a configuration error), ``count_accuracy``,
    ``color_accuracy``, ``shape_accuracy`` (float64 [B]).
    """
    del device, reward_config
    from advantage_weighted_matching.rewards import images_to_uint8_hwc

    def score(images, prompts, metadata, only_strict=True):
        del metadata, only_strict
        specs = [parse_prompt(prompt) for prompt in prompts]
        reward, count_accuracy, color_accuracy, shape_accuracy, _ = score_shapes(images_to_uint8_hwc(images), specs)
        info = {
            "num_failures": 0, "count_accuracy": count_accuracy, "color_accuracy": color_accuracy,
            "shape_accuracy": shape_accuracy,
        }
        return reward.astype(np.float64), info

    return score
