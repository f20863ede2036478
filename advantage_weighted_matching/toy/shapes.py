"""Synthetic "coloured shapes" images and prompts: the CPU toy task (issue F.2).

Each image is 32x32 RGB on a black background with 1-3 filled, non-overlapping
shapes of one colour and one kind::

    spec   = {"count": 2, "color": "red", "shape": "square"}
    prompt = "two red squares"                  (prompt_for(spec))
    parse_prompt("two red squares") == spec     (the reward reads the prompt)

Colours are the four pure primaries/secondaries of ``PALETTE`` (pairwise RGB
distance >= 255, and >= 255 from the background), sizes 8-12 px (side of a
square, diameter of a circle), shapes at least ``GAP`` px apart and inside a
1 px border, edges hard (every pixel is exactly the background or the
palette colour). Everything is a pure function of the numpy Generator passed
in: the same seed gives the same bytes.

There are 3 counts x 4 colours x 2 shapes = 24 distinct prompts; images of
one prompt differ in sizes and positions.
"""

import os
import re

import numpy as np

RESOLUTION = 32
BACKGROUND = (0, 0, 0)
PALETTE = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
}
COLORS = tuple(PALETTE)
SHAPES = ("square", "circle")
COUNTS = (1, 2, 3)
MIN_SIZE, MAX_SIZE = 8, 12
GAP = 2  # free pixels between two shapes' bounding boxes
BORDER = 1  # free pixels between a shape and the image edge

COUNT_WORDS = {1: "a", 2: "two", 3: "three"}
_WORD_COUNTS = {"a": 1, "one": 1, "two": 2, "three": 3}
_PROMPT_RE = re.compile(
    r"^(?P<count>a|one|two|three) (?P<color>" + "|".join(COLORS) + r") "
    r"(?P<shape>" + "|".join(SHAPES) + r")(?P<plural>s?)$"
)
PROMPT_GRAMMAR = (
    "'<count> <colour> <shape>[s]' with count in {a, one, two, three}, colour in "
    f"{{{', '.join(COLORS)}}}, shape in {{{', '.join(SHAPES)}}}, plural exactly when count > 1"
)


class ShapePromptError(ValueError):
    """A prompt outside the toy grammar (the message quotes it and the grammar)."""


def all_specs():
    """The 24 distinct specs in a fixed order (count, colour, shape)."""
    return [{"count": n, "color": c, "shape": s} for n in COUNTS for c in COLORS for s in SHAPES]


def sample_spec(rng):
    """A uniformly random spec {"count", "color", "shape"} from numpy Generator `rng`."""
    return {
        "count": int(COUNTS[rng.integers(len(COUNTS))]),
        "color": COLORS[rng.integers(len(COLORS))],
        "shape": SHAPES[rng.integers(len(SHAPES))],
    }


def _check_spec(spec):
    if spec.get("count") not in COUNTS or spec.get("color") not in PALETTE or spec.get("shape") not in SHAPES:
        raise ValueError(f"bad shapes spec {spec!r}: count in {COUNTS}, color in {COLORS}, shape in {SHAPES}")


def prompt_for(spec):
    """"a blue circle", "two red squares", "three yellow circles"."""
    _check_spec(spec)
    noun = spec["shape"] + ("s" if spec["count"] > 1 else "")
    return f"{COUNT_WORDS[spec['count']]} {spec['color']} {noun}"


def parse_prompt(prompt):
    """Inverse of `prompt_for` -> spec dict. Case and surrounding whitespace are
    ignored, nothing else is: anything outside the grammar raises ShapePromptError."""
    if not isinstance(prompt, str):
        raise ShapePromptError(f"shapes prompt must be a string, got {type(prompt).__name__}: {prompt!r}")
    match = _PROMPT_RE.match(prompt.strip().lower())
    if match is None:
        raise ShapePromptError(f"cannot parse shapes prompt {prompt!r}: expected {PROMPT_GRAMMAR}")
    count = _WORD_COUNTS[match["count"]]
    if (count > 1) != bool(match["plural"]):
        raise ShapePromptError(
            f"cannot parse shapes prompt {prompt!r}: {'plural' if match['plural'] else 'singular'} noun with "
            f"count {count}; expected {PROMPT_GRAMMAR}"
        )
    return {"count": count, "color": match["color"], "shape": match["shape"]}


def _place(count, rng, resolution, max_tries=200):
    """`count` boxes (y, x, size) inside the border, pairwise >= GAP apart (rejection sampling)."""
    for max_size in range(MAX_SIZE, MIN_SIZE - 1, -1):  # shrink if the canvas is crowded
        for _ in range(max_tries):
            boxes = []
            for _ in range(count):
                size = int(rng.integers(MIN_SIZE, max_size + 1))
                y, x = (int(v) for v in rng.integers(BORDER, resolution - BORDER - size + 1, size=2))
                if all(
                    y + size + GAP <= by or by + bs + GAP <= y or x + size + GAP <= bx or bx + bs + GAP <= x
                    for by, bx, bs in boxes
                ):
                    boxes.append((y, x, size))
                else:
                    break
            if len(boxes) == count:
                return boxes
    raise RuntimeError(f"could not place {count} shapes on a {resolution}px canvas")


def shape_mask(shape, size):
    """Boolean [size, size] footprint: full square, or a disc (pixel centres within size/2 of the centre)."""
    if shape == "square":
        return np.ones((size, size), dtype=bool)
    centre = (size - 1) / 2
    yy, xx = np.mgrid[:size, :size]
    return (yy - centre) ** 2 + (xx - centre) ** 2 <= (size / 2) ** 2


def render(spec, rng, resolution=RESOLUTION):
    """uint8 [resolution, resolution, 3]: the spec's shapes at random sizes/positions drawn from `rng`."""
    _check_spec(spec)
    image = np.empty((resolution, resolution, 3), dtype=np.uint8)
    image[:] = BACKGROUND
    colour = np.asarray(PALETTE[spec["color"]], dtype=np.uint8)
    for y, x, size in _place(spec["count"], rng, resolution):
        image[y : y + size, x : x + size][shape_mask(spec["shape"], size)] = colour
    return image


def make_dataset(n, seed):
    """(images uint8 [n, 32, 32, 3], prompts list[str], metadata list[dict]) from seed `seed`."""
    rng = np.random.default_rng(seed)
    images = np.empty((n, RESOLUTION, RESOLUTION, 3), dtype=np.uint8)
    prompts, metadata = [], []
    for index in range(n):
        spec = sample_spec(rng)
        images[index] = render(spec, rng)
        prompts.append(prompt_for(spec))
        metadata.append(spec)
    return images, prompts, metadata


def balanced_prompts(n, seed):
    """`n` prompts cycling through all 24 specs (balanced), shuffled with `seed`."""
    specs = all_specs()
    order = np.random.default_rng([seed, 1]).permutation(len(specs))
    return [prompt_for(specs[order[i % len(specs)]]) for i in range(n)]


def write_prompt_files(directory, n_train=1000, n_test=32, seed=0):
    """Write `train.txt` (n_train random prompts) and `test.txt` (n_test balanced
    prompts) in the `general_ocr` format (one prompt a line). Returns `directory`."""
    os.makedirs(directory, exist_ok=True)
    rng = np.random.default_rng([seed, 0])
    train = [prompt_for(sample_spec(rng)) for _ in range(n_train)]
    for name, prompts in (("train.txt", train), ("test.txt", balanced_prompts(n_test, seed))):
        path = os.path.join(directory, name)
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            f.write("\n".join(prompts) + "\n")
        os.replace(path + ".tmp", path)
    return directory
